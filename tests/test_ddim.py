"""DDIM both ways against diffusers 0.42.1 `DDIMScheduler` / `DDIMInverseScheduler`, plus an exact round-trip
property. fp32 on CPU; our update does the reference's arithmetic in the same order, so 1e-6 is a loose bound."""

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import diffusers
from diffedit.schedulers import DDIMConfig, DDIMInverseScheduler, DDIMScheduler
from diffedit.validation import ConfigError

torch.set_num_threads(1)
logging.getLogger("diffusers").setLevel(logging.ERROR)  # "config attributes ... will be ignored" chatter

# The scheduler configs the official SD repos ship (SD 1.5's is a PNDM config, SD 2.1's a v-prediction DDIM one).
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}
SHAPE = (2, 4, 8, 8)
TOL = dict(rtol=1e-6, atol=1e-6)


def sd_config(**changes) -> DDIMConfig:
    return dataclasses.replace(DDIMConfig.from_dict(SD15_SCHEDULER), **changes)


def reference(config: DDIMConfig, inverse: bool = False):
    """diffusers' scheduler built from the same fields."""
    kwargs = dataclasses.asdict(config)
    if kwargs["trained_betas"] is not None:
        kwargs["trained_betas"] = list(kwargs["trained_betas"])
    if inverse:
        del kwargs["thresholding"]
        return diffusers.DDIMInverseScheduler(**kwargs)
    return diffusers.DDIMScheduler(**kwargs)


def assert_steps_match(config: DDIMConfig, n: int, inverse: bool, scale: float = 1.0, seed: int = 0):
    """Ours and the reference give the same timesteps and the same step output at every one of them."""
    ours = (DDIMInverseScheduler if inverse else DDIMScheduler)(config)
    ref = reference(config, inverse)
    ref.set_timesteps(n)
    timesteps = ours.timesteps(n)
    assert torch.equal(timesteps, ref.timesteps)
    g = torch.Generator().manual_seed(seed)
    for t in timesteps:  # 0-dim tensors, as pipelines pass them
        model_output, sample = torch.randn(2, *SHAPE, generator=g) * scale
        got = ours.step(model_output, t, sample, n)
        want = ref.step(model_output, t, sample)
        torch.testing.assert_close(got.prev_sample, want.prev_sample, **TOL)
        torch.testing.assert_close(got.pred_original_sample, want.pred_original_sample, **TOL)


# ---------------------------------------------------------------------------------------------------------------
# Timesteps


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_equal_diffusers_for_every_step_count(spacing, offset):
    config = sd_config(timestep_spacing=spacing, steps_offset=offset)
    ours, ref = DDIMScheduler(config), reference(config)
    for n in range(1, 1000 if (spacing, offset) == ("leading", 1) else 1001):
        ref.set_timesteps(n)
        want = ref.timesteps
        if spacing == "trailing" and len(want) == n + 1:  # diffusers' float-arange quirk: an extra timestep -1
            assert want[-1] == -1
            want = want[:n]
        assert torch.equal(ours.timesteps(n), want), n


def test_sd_timesteps_are_981_to_1_and_inverse_1_to_981():
    ours = DDIMScheduler(sd_config())
    assert ours.timesteps(50).tolist() == list(range(981, 0, -20))
    assert ours.inverse().timesteps(50).tolist() == list(range(1, 982, 20))


def test_trailing_quirk_step_counts_give_exactly_n_timesteps():
    config = sd_config(timestep_spacing="trailing")
    ref = reference(config)
    ref.set_timesteps(61)
    assert len(ref.timesteps) == 62 and ref.timesteps[-1] == -1  # the reference's bug we do not reproduce
    assert DDIMScheduler(config).timesteps(61).tolist() == ref.timesteps[:61].tolist()
    assert DDIMInverseScheduler(config).timesteps(61).tolist() == ref.timesteps[:61].flip(0).tolist()


def test_leading_offset_past_the_last_train_step_fails_clearly():
    # 1000 steps + steps_offset 1 would give timestep 1000; diffusers only fails later, indexing alphas_cumprod
    with pytest.raises(ValueError, match="steps_offset"):
        DDIMScheduler(sd_config()).timesteps(1000)


@pytest.mark.parametrize("n", [0, -3, 1001, 2.0, True])
def test_bad_step_counts_fail(n):
    scheduler = DDIMScheduler(sd_config())
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.timesteps(n)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.step(torch.zeros(SHAPE), 1, torch.zeros(SHAPE), n)


def test_timestep_outside_training_range_fails():
    with pytest.raises(ValueError, match="timestep"):
        DDIMScheduler(sd_config()).step(torch.zeros(SHAPE), -1, torch.zeros(SHAPE), 50)
    with pytest.raises(ValueError, match="timestep"):
        DDIMInverseScheduler(sd_config()).step(torch.zeros(SHAPE), 1000, torch.zeros(SHAPE), 50)


def test_inverse_linspace_fails_like_diffusers():
    config = sd_config(timestep_spacing="linspace")
    with pytest.raises(ValueError, match="linspace"):
        DDIMInverseScheduler(config).timesteps(50)
    with pytest.raises(ValueError):
        reference(config, inverse=True).set_timesteps(50)


# ---------------------------------------------------------------------------------------------------------------
# Steps


GRID = [(spacing, prediction, n) for spacing in ["leading", "trailing", "linspace"]
        for prediction in ["epsilon", "v_prediction", "sample"] for n in [1, 7, 50, 1000]]


@pytest.mark.parametrize("spacing,prediction,n", GRID)
def test_step_equals_diffusers_at_every_timestep(spacing, prediction, n):
    offset = 0 if (spacing, n) == ("leading", 1000) else 1  # offset 1 with 1000 leading steps is invalid
    config = sd_config(timestep_spacing=spacing, prediction_type=prediction, steps_offset=offset)
    assert_steps_match(config, n, inverse=False)


@pytest.mark.parametrize("spacing,prediction,n", [g for g in GRID if g[0] != "linspace"])
def test_inverse_step_equals_diffusers_at_every_timestep(spacing, prediction, n):
    offset = 0 if (spacing, n) == ("leading", 1000) else 1
    config = sd_config(timestep_spacing=spacing, prediction_type=prediction, steps_offset=offset)
    assert_steps_match(config, n, inverse=True)


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("alpha_to_one", [False, True])
@pytest.mark.parametrize("offset", [0, 1])
def test_clean_edge_level_and_offset_equal_diffusers(inverse, alpha_to_one, offset):
    assert_steps_match(sd_config(set_alpha_to_one=alpha_to_one, steps_offset=offset), 50, inverse)


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip_range", [1.0, 0.5])
def test_clip_sample_equals_diffusers(inverse, prediction, clip_range):
    config = sd_config(clip_sample=True, clip_sample_range=clip_range, prediction_type=prediction)
    assert_steps_match(config, 20, inverse, scale=3.0)  # scaled up so clipping bites


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_steps_on_other_beta_schedules_equal_diffusers(schedule):
    config = DDIMConfig(beta_schedule=schedule)  # diffusers' defaults: clip_sample, set_alpha_to_one
    assert_steps_match(config, 25, inverse=False)
    assert_steps_match(config, 25, inverse=True)


def test_step_keeps_half_precision_dtype():
    scheduler = DDIMScheduler(sd_config())
    x = torch.randn(SHAPE).half()
    assert scheduler.step(x, 981, x, 50, eta=1.0).prev_sample.dtype == torch.float16
    assert scheduler.inverse().step(x, 21, x, 50).prev_sample.dtype == torch.float16


# ---------------------------------------------------------------------------------------------------------------
# Stochastic steps (eta > 0)


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_eta_chain_with_seeded_generator_equals_diffusers(eta, prediction):
    """A 50-step chain drawing its noise from one generator: same draws, same order, same numbers."""
    config = sd_config(prediction_type=prediction)
    ours, ref = DDIMScheduler(config), reference(config)
    ref.set_timesteps(50)
    g_ours, g_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    x_ours = x_ref = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    for t in ours.timesteps(50):
        model_output = torch.sin(x_ours * (1 + t / 1000))  # any fixed model
        x_ours = ours.step(model_output, t, x_ours, 50, eta=eta, generator=g_ours).prev_sample
        x_ref = ref.step(torch.sin(x_ref * (1 + t / 1000)), t, x_ref, eta=eta, generator=g_ref).prev_sample
    torch.testing.assert_close(x_ours, x_ref, rtol=1e-5, atol=1e-5)


def test_eta_with_a_list_of_generators_equals_diffusers():
    ours, ref = DDIMScheduler(sd_config()), reference(sd_config())
    ref.set_timesteps(50)
    model_output, sample = torch.randn(2, *SHAPE)
    got = ours.step(model_output, 501, sample, 50, eta=0.5,
                    generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).prev_sample
    want = ref.step(model_output, 501, sample, eta=0.5,
                    generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).prev_sample
    torch.testing.assert_close(got, want, **TOL)


def test_variance_noise_override_equals_diffusers_and_excludes_generator():
    ours, ref = DDIMScheduler(sd_config()), reference(sd_config())
    ref.set_timesteps(50)
    model_output, sample, z = torch.randn(3, *SHAPE)
    got = ours.step(model_output, 501, sample, 50, eta=0.8, variance_noise=z).prev_sample
    torch.testing.assert_close(got, ref.step(model_output, 501, sample, eta=0.8, variance_noise=z).prev_sample, **TOL)
    with pytest.raises(ValueError, match="generator"):
        ours.step(model_output, 501, sample, 50, eta=0.8, variance_noise=z, generator=torch.Generator())


def test_eta_zero_draws_no_noise():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    x = torch.randn(SHAPE)
    DDIMScheduler(sd_config()).step(x, 501, x, 50, eta=0.0, generator=g)
    assert torch.equal(g.get_state(), state)


# ---------------------------------------------------------------------------------------------------------------
# Schedule, add_noise, velocity


@pytest.mark.parametrize("changes", [
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(beta_schedule="scaled_linear"),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(trained_betas=tuple(np.linspace(1e-4, 0.03, 1000).tolist())),
    dict(beta_schedule="scaled_linear", rescale_betas_zero_snr=True),
    dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=500),
], ids=["linear", "scaled_linear", "squaredcos_cap_v2", "trained_betas", "zero_snr", "cosine_500"])
def test_alphas_cumprod_equal_diffusers(changes):
    config = sd_config(**changes)
    assert torch.equal(DDIMScheduler(config).alphas_cumprod, reference(config).alphas_cumprod)
    assert torch.equal(DDIMInverseScheduler(config).alphas_cumprod, reference(config, True).alphas_cumprod)


def test_zero_snr_trailing_v_prediction_steps_equal_diffusers():
    config = sd_config(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    assert_steps_match(config, 10, inverse=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("timesteps", [torch.tensor([0, 481, 999]), torch.tensor(481), 481])
def test_add_noise_and_velocity_equal_diffusers(dtype, timesteps):
    ours, ref = DDIMScheduler(sd_config()), reference(sd_config())
    x0, noise = torch.randn(2, 3, 4, 8, 8).to(dtype)
    ref_t = torch.as_tensor(timesteps)
    torch.testing.assert_close(ours.add_noise(x0, noise, timesteps), ref.add_noise(x0, noise, ref_t), rtol=0, atol=0)
    torch.testing.assert_close(ours.get_velocity(x0, noise, timesteps), ref.get_velocity(x0, noise, ref_t),
                               rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Config parsing


def test_sd15_pndm_config_parses_to_the_sd_schedule():
    config = DDIMConfig.from_dict(SD15_SCHEDULER)
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (config.set_alpha_to_one, config.steps_offset, config.clip_sample) == (False, 1, False)
    assert (config.prediction_type, config.timestep_spacing) == ("epsilon", "leading")
    ref = diffusers.DDIMScheduler.from_config(SD15_SCHEDULER)
    assert torch.equal(DDIMScheduler.from_dict(SD15_SCHEDULER).alphas_cumprod, ref.alphas_cumprod)


def test_sd21_config_parses_as_v_prediction_and_steps_like_diffusers(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(SD21_SCHEDULER))
    ours = DDIMScheduler.from_config_file(tmp_path)  # a folder, like an SD repo's scheduler/
    assert ours.config.prediction_type == "v_prediction"
    assert ours.config == DDIMConfig.from_file(tmp_path / "scheduler_config.json")
    ref = diffusers.DDIMScheduler.from_config(SD21_SCHEDULER)
    ref.set_timesteps(50)
    model_output, sample = torch.randn(2, *SHAPE)
    torch.testing.assert_close(ours.step(model_output, 981, sample, 50).prev_sample,
                               ref.step(model_output, 981, sample).prev_sample, **TOL)


@pytest.mark.parametrize("inverse", [False, True])
def test_configs_saved_by_diffusers_parse_back_to_the_same_fields(tmp_path, inverse):
    cls = diffusers.DDIMInverseScheduler if inverse else diffusers.DDIMScheduler
    cls(prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1, clip_sample_range=2.0,
        timestep_spacing="trailing", rescale_betas_zero_snr=True).save_config(tmp_path)
    ours = (DDIMInverseScheduler if inverse else DDIMScheduler).from_config_file(tmp_path)
    assert ours.config == DDIMConfig(prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1,
                                     clip_sample_range=2.0, timestep_spacing="trailing", rescale_betas_zero_snr=True)


@pytest.mark.filterwarnings("ignore:The `set_alpha_to_zero` argument is deprecated:FutureWarning")
@pytest.mark.parametrize("alpha_to_zero", [None, False, True])
@pytest.mark.parametrize("alpha_to_one", [False, True])
def test_set_alpha_to_zero_alias_behaves_like_diffusers_from_config(alpha_to_zero, alpha_to_one):
    """DDIMInverseScheduler.from_config applies the deprecated alias over set_alpha_to_one; DDIMScheduler ignores it."""
    d = {**SD15_SCHEDULER, "set_alpha_to_one": alpha_to_one, "set_alpha_to_zero": alpha_to_zero}
    ref_inverse = diffusers.DDIMInverseScheduler.from_config(d)
    assert torch.equal(DDIMInverseScheduler.from_dict(d).edge_alpha, ref_inverse.initial_alpha_cumprod)
    assert torch.equal(DDIMScheduler.from_dict(d).edge_alpha, diffusers.DDIMScheduler.from_config(d).final_alpha_cumprod)


def test_inverse_built_from_a_forward_config_equals_diffusers_from_config():
    forward = diffusers.DDIMScheduler.from_config(SD15_SCHEDULER)
    ref = diffusers.DDIMInverseScheduler.from_config(forward.config)
    ours = DDIMScheduler.from_dict(SD15_SCHEDULER).inverse()
    assert torch.equal(ours.edge_alpha, ref.initial_alpha_cumprod)
    ref.set_timesteps(50)
    assert torch.equal(ours.timesteps(50), ref.timesteps)


@pytest.mark.parametrize("changes,field", [
    ({"beta_schedul": "linear"}, "beta_schedul"),
    ({"thresholding": True}, "thresholding"),
    ({"prediction_type": "flow"}, "prediction_type"),
    ({"beta_schedule": "cosine"}, "beta_schedule"),
    ({"timestep_spacing": "karras"}, "timestep_spacing"),
    ({"steps_offset": "1"}, "steps_offset"),
    ({"clip_sample": "false"}, "clip_sample"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
])
def test_bad_config_fails_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        DDIMConfig.from_dict({**SD15_SCHEDULER, **changes})


@pytest.mark.parametrize("betas, got", [
    (["0.1"] * 1000, r"got '0.1' at index 0"),  # was float()'s bare "could not convert string to float"
    ([0.01] * 999 + [True], r"got True at index 999"),  # was read as 1.0, alphas_cumprod 0 from there
    ([0.01] * 500 + [float("nan")] * 500, r"got nan at index 500"),
    ([0.01] * 999 + [1.5], r"got 1.5 at index 999"),
    ([[0.01]] * 1000, r"got \[0.01\] at index 0"),  # was float()'s TypeError
    (5, r"got 5"),  # was 'int' object is not iterable
])
def test_trained_betas_that_are_not_betas_are_refused_naming_the_entry(tmp_path, betas, got):
    (tmp_path / "scheduler_config.json").write_text(json.dumps({**SD15_SCHEDULER, "trained_betas": betas}))
    with pytest.raises(ConfigError, match=rf"scheduler_config.json: DDIMConfig.trained_betas: expected .*{got}"):
        DDIMScheduler.from_config_file(tmp_path)


@pytest.mark.parametrize("changes, field", [
    (dict(beta_end=2.0), "beta_end"),  # linear betas past 1: alphas_cumprod changes sign, NaN steps in diffusers too
    (dict(beta_start=-0.001), "beta_start"),  # scaled_linear: sqrt of a negative, torch's complex-dtype error
    (dict(beta_schedule="linear", beta_end=1.0), "beta_end"),
])
def test_beta_range_outside_0_1_is_refused_naming_the_field(changes, field):
    with pytest.raises(ConfigError, match=rf"DDIMConfig.{field}: expected a number in \[0, 1\)"):
        DDIMConfig.from_dict({**SD15_SCHEDULER, **changes})
    # the cosine schedule does not read them, as in diffusers
    assert DDIMConfig.from_dict({**SD15_SCHEDULER, **changes, "beta_schedule": "squaredcos_cap_v2"})


def test_other_scheduler_class_keys_are_ignored():
    d = {**SD15_SCHEDULER, "use_karras_sigmas": True, "interpolation_type": "linear", "timestep_type": "discrete",
         "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "solver_order": 2, "variance_type": None}
    assert DDIMConfig.from_dict(d) == DDIMConfig.from_dict(SD15_SCHEDULER)


# ---------------------------------------------------------------------------------------------------------------
# Round trip


def trajectory_model(z: torch.Tensor, e: torch.Tensor, prediction_type: str):
    """An exact network for the DDIM trajectory x = c z + s e (c = sqrt(a), s = sqrt(1 - a)) through a clean point
    z with noise e: it reads (c, s) off x by least squares and returns e, z or v = c e - s z. Being a function of x
    alone, it is exact under the inverse scheduler's convention too (network at the destination timestep, latent
    at the source level), so inverting then sampling must retrace every latent."""
    basis = torch.stack([z.flatten(), e.flatten()], dim=1)  # (D, 2)

    def model(x, t):
        c, s = torch.linalg.lstsq(basis, x.flatten()[:, None]).solution.flatten()
        return {"epsilon": e, "sample": z, "v_prediction": c * e - s * z}[prediction_type]

    return model


@st.composite
def even_schedules(draw):
    """Step counts whose timesteps sit exactly T // N apart, where a DDIM step lands on the next timestep: every
    'leading' count, and 'trailing' counts dividing T. (Elsewhere the reference's step moves by T // N but the
    next timestep is a different one, so inversion is approximate whatever the model.)"""
    if draw(st.booleans()):
        return "leading", draw(st.integers(1, 200))
    return "trailing", draw(st.sampled_from([d for d in range(1, 201) if 1000 % d == 0]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    schedule_and_steps=even_schedules(),
    prediction=st.sampled_from(["epsilon", "v_prediction", "sample"]),
    schedule=st.sampled_from(["scaled_linear", "linear", "squaredcos_cap_v2"]),
    offset=st.integers(0, 1),
    alpha_to_one=st.booleans(),
    clip=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_inversion_then_sampling_with_an_exact_model_returns_every_latent(
        schedule_and_steps, prediction, schedule, offset, alpha_to_one, clip, seed):
    spacing, n = schedule_and_steps
    # "sample" prediction at level 1 divides 0 by 0 (as in diffusers): x0 is then the latent itself
    assume(not (prediction == "sample" and alpha_to_one))
    config = DDIMConfig(beta_schedule=schedule, prediction_type=prediction, timestep_spacing=spacing,
                        steps_offset=offset, set_alpha_to_one=alpha_to_one, clip_sample=clip)
    forward, inverse = DDIMScheduler(config), DDIMInverseScheduler(config)
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(1, 4, 4, 4, generator=g, dtype=torch.float64) * 1.8 - 0.9  # inside the clip range
    e = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    model = trajectory_model(z, e, prediction)
    a0 = inverse.edge_alpha.double()
    x = a0.sqrt() * z + (1 - a0).sqrt() * e  # the clean end of the trajectory

    latents = [x]
    for t in inverse.timesteps(n):
        x = inverse.step(model(x, t), t, x, n).prev_sample
        a = inverse.alphas_cumprod[t].double()
        torch.testing.assert_close(x, a.sqrt() * z + (1 - a).sqrt() * e, rtol=1e-5, atol=1e-5)  # on the trajectory
        latents.append(x)
    for t, expected in zip(forward.timesteps(n), reversed(latents[:-1])):
        x = forward.step(model(x, t), t, x, n).prev_sample
        torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


def test_too_many_leading_steps_say_exactly_how_many_fit():
    """T = 1000: with steps_offset 1, 1000 steps reach timestep 1000 and 999 fit (998 + 1); with steps_offset 5,
    995 fit (994 x 1 + 5 = 999) and 996 do not (995 + 5 = 1000)."""
    with pytest.raises(ValueError, match=r"gives timestep 1000 >= num_train_timesteps=1000 \(at most 999 steps fit"):
        DDIMScheduler(sd_config()).timesteps(1000)
    with pytest.raises(ValueError, match=r"gives timestep 1004 >= num_train_timesteps=1000 \(at most 995 steps fit"):
        DDIMScheduler(sd_config(steps_offset=5)).timesteps(1000)
    assert DDIMScheduler(sd_config(steps_offset=5)).timesteps(995)[0] == 999
    with pytest.raises(ValueError, match="at most 995 steps fit"):
        DDIMScheduler(sd_config(steps_offset=5)).timesteps(996)



def test_a_large_steps_offset_can_leave_room_for_a_single_step():
    """T = 1000, steps_offset 500: two steps give timesteps 500 and 1000, over the end; one step (timestep 500)
    fits. Three steps (stride 333: 500, 833, 1166) say so: at most 1, not the N - 1 a careless count gives."""
    with pytest.raises(ValueError, match=r"gives timestep 1166 >= num_train_timesteps=1000 \(at most 1 steps fit"):
        DDIMScheduler(sd_config(steps_offset=500)).timesteps(3)
    assert DDIMScheduler(sd_config(steps_offset=500)).timesteps(1).tolist() == [500]


def test_a_config_file_with_trained_betas_uses_them():
    betas = np.linspace(1e-4, 0.03, 1000).tolist()
    ours = DDIMScheduler.from_dict({**SD15_SCHEDULER, "trained_betas": betas})
    assert ours.config.trained_betas == tuple(betas)
    hash(ours.config)  # frozen, so hashable: the betas are kept as a tuple, not the file's list
    assert torch.equal(ours.alphas_cumprod, reference(dataclasses.replace(sd_config(), trained_betas=tuple(betas)))
                       .alphas_cumprod)


@pytest.mark.filterwarnings("ignore:The `set_alpha_to_zero` argument is deprecated:FutureWarning")
def test_config_files_read_the_alias_only_for_the_inverse_scheduler(tmp_path):
    """The same file through every entry point: the inverse scheduler applies set_alpha_to_zero, the forward one and
    a plain DDIMConfig (forward unless told) ignore it."""
    d = {**SD15_SCHEDULER, "set_alpha_to_one": False, "set_alpha_to_zero": True}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(d))
    assert DDIMInverseScheduler.from_config_file(tmp_path).config.set_alpha_to_one is True
    assert DDIMConfig.from_file(tmp_path, inverse=True).set_alpha_to_one is True
    assert DDIMScheduler.from_config_file(tmp_path / "scheduler_config.json").config.set_alpha_to_one is False
    assert DDIMConfig.from_file(tmp_path).set_alpha_to_one is False
    assert DDIMConfig.from_dict(d).set_alpha_to_one is False


# ---------------------------------------------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize("inverse", [False, True])
def test_timestep_as_int_0d_and_1_element_tensor_give_the_same_step(inverse):
    scheduler = (DDIMInverseScheduler if inverse else DDIMScheduler)(sd_config())
    model_output, sample = torch.randn(2, *SHAPE)
    steps = [scheduler.step(model_output, t, sample, 50).prev_sample
             for t in (981, np.int64(981), torch.tensor(981), torch.tensor([981]), torch.tensor(981, dtype=torch.int32))]
    for got in steps[1:]:
        assert torch.equal(got, steps[0])


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("timestep, error, message", [
    (981.7, TypeError, "got float 981.7"),  # was truncated to 981 (diffusers fails indexing with a float)
    (981.0, TypeError, "got float 981.0"),
    (torch.tensor(981.5), TypeError, "expected an integer tensor, got torch.float32"),
    (True, TypeError, "got bool True"),  # was timestep 1
    ("981", TypeError, "got str '981'"),  # was int("981")
    (torch.tensor([981, 961]), ValueError, r"expected one timestep, got a tensor of shape \(2,\)"),
])
def test_a_timestep_that_is_not_one_integer_is_refused_naming_it(inverse, timestep, error, message):
    scheduler = (DDIMInverseScheduler if inverse else DDIMScheduler)(sd_config())
    with pytest.raises(error, match=rf"timestep: .*{message}"):
        scheduler.step(torch.zeros(SHAPE), timestep, torch.zeros(SHAPE), 50)


@pytest.mark.parametrize("eta, error, message", [
    (-0.5, ValueError, "got -0.5"),  # diffusers draws no noise for eta < 0 yet shrinks the direction term by sigma^2
    (float("nan"), ValueError, "got nan"),
    (float("inf"), ValueError, "got inf"),
    ("0.5", TypeError, "got str"),
    (None, TypeError, "got NoneType"),
])
def test_eta_that_is_not_a_number_at_least_0_is_refused_before_any_draw(eta, error, message):
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    with pytest.raises(error, match=rf"eta: expected a number >= 0 .*{message}"):
        DDIMScheduler(sd_config()).step(torch.zeros(SHAPE), 981, torch.zeros(SHAPE), 50, eta=eta, generator=g)
    assert torch.equal(g.get_state(), state)


def test_shapes_that_do_not_match_the_sample_are_refused_not_broadcast():
    """diffusers broadcasts a (4, 8, 8) output over a (2, 4, 8, 8) sample, or a (4, 1, 1) variance_noise, silently."""
    scheduler = DDIMScheduler(sd_config())
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match=r"model_output has shape \(4, 8, 8\) but sample \(2, 4, 8, 8\)"):
        scheduler.step(x[0], 981, x, 50)
    with pytest.raises(ValueError, match=r"model_output has shape \(4, 8, 8\) but sample \(2, 4, 8, 8\)"):
        scheduler.inverse().step(x[0], 21, x, 50)
    with pytest.raises(ValueError, match=r"variance_noise has shape \(4, 1, 1\), expected model_output's"):
        scheduler.step(x, 981, x, 50, eta=0.5, variance_noise=torch.zeros(4, 1, 1))
    with pytest.raises(TypeError, match="sample: expected a torch.Tensor, got ndarray"):
        scheduler.step(x, 981, x.numpy(), 50)

"""DPM-Solver++ (2M) against diffusers' DPMSolverMultistepScheduler on the same config, step for step."""

import json

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from diffedit.schedulers.ddim import DDIMConfig
from diffedit.schedulers.dpm_solver import DPMSolverScheduler, dpm_timesteps
from diffedit.validation import ConfigError

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          steps_offset=1)  # SD's scheduler config, as far as DPM-Solver reads it
TOL = dict(rtol=1e-5, atol=1e-5)  # float32 arithmetic in the same order; measured max 0


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 2, 5, 10, 20, 25])
def test_timesteps_equal_diffusers(spacing, steps):
    ref = DPMSolverMultistepScheduler(**SD, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    ours = dpm_timesteps(DDIMConfig(**SD, clip_sample=False, timestep_spacing=spacing), steps)
    assert ours.tolist() == ref.timesteps.tolist()


def assert_steps_like(ours: DPMSolverScheduler, ref, steps: int, seed: int, batch: int = 1) -> None:
    """Both solvers step the same random latents and network outputs; each step's latents equal within TOL."""
    ref.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x_ref = x = torch.randn(batch, 4, 8, 8, generator=g)
    previous = None
    for i, t in enumerate(ours.timesteps(steps)):
        output = torch.randn(batch, 4, 8, 8, generator=g)
        x_ref = ref.step(output, t, x_ref).prev_sample
        x, previous = ours.step(output, i, x, steps, previous)
        torch.testing.assert_close(x, x_ref, **TOL)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 5, 15, 20])
def test_every_step_equals_diffusers(prediction_type, steps):
    """The first step first-order, the middle ones second-order from the previous x0, the last first-order onto
    the clean end (s = 0): each latent equal to diffusers' with the same network outputs."""
    config = dict(SD, prediction_type=prediction_type, timestep_spacing="leading")
    ours = DPMSolverScheduler(DDIMConfig(**config, clip_sample=False))
    assert_steps_like(ours, DPMSolverMultistepScheduler(**config), steps, seed=steps, batch=2)
    assert ours.levels(steps)[-1] == 0


def test_a_dpm_decoding_of_a_bare_latent_tensor_is_refused_naming_what_it_needs(sd1_folder):
    from diffedit import DiffEditParams, StableDiffusion
    from diffedit import method

    model = StableDiffusion.from_pretrained(sd1_folder)
    p = DiffEditParams(num_inference_steps=4, sampler="dpmsolver++")
    text = method.encode_text(model, ["a cat"], [""])
    with pytest.raises(TypeError, match=r"decodes an Inversion .* not Tensor"):
        method.decode(model, torch.zeros(1, 3, 4, 8, 8), None, text, p)


def test_trailing_step_counts_of_diffusers_float_quirk_give_the_n_intended_timesteps():
    """T = 1000, N = 61: diffusers' float arange adds a 62nd timestep, -1; ours stops at the 61 intended ones (as
    DDIM does), every step but the last equal to diffusers' (tolerance TOL), the last landing on the clean end."""
    config = dict(SD, timestep_spacing="trailing")
    ref = DPMSolverMultistepScheduler(**config)
    ref.set_timesteps(61)
    assert len(ref.timesteps) == 62 and ref.timesteps[-1] == -1
    ours = DPMSolverScheduler(DDIMConfig(**config, clip_sample=False))
    assert ours.timesteps(61).tolist() == ref.timesteps[:61].tolist()
    assert ours.levels(61).shape == (62,) and ours.levels(61)[-1] == 0
    g = torch.Generator().manual_seed(0)
    x_ref = x = torch.randn(1, 4, 8, 8, generator=g)
    previous = None
    for i, t in enumerate(ours.timesteps(61)[:60]):
        output = torch.randn(1, 4, 8, 8, generator=g)
        x_ref = ref.step(output, t, x_ref).prev_sample
        x, previous = ours.step(output, i, x, 61, previous)
        torch.testing.assert_close(x, x_ref, **TOL)


@pytest.mark.parametrize("spacing, steps, message", [
    ("leading", 999, r"timestep 1000 >= num_train_timesteps=1000 \(at most 998 steps fit"),
    ("leading", 1000, r"a timestep twice .*at most 998 steps fit"),
    ("linspace", 1000, r"a timestep twice .*at most 999 steps fit"),
])
def test_step_counts_whose_timesteps_repeat_or_pass_the_schedule_are_refused(spacing, steps, message):
    """diffusers gives timestep 1000 (leading, steps_offset 1, N = 999) or repeated timesteps (N = 1000), and then
    NaN or an IndexError; ours refuses the count, saying how many steps fit."""
    with pytest.raises(ValueError, match=message):
        dpm_timesteps(DDIMConfig(**SD, timestep_spacing=spacing), steps)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_zero_terminal_snr_steps_equal_diffusers_from_timestep_999(spacing):
    """rescale_betas_zero_snr makes alphas_cumprod[999] = 0 (s_t infinite: NaN from the first step); diffusers'
    DPM-Solver keeps it at 2**-24, and so do we: every step equal within TOL."""
    config = dict(SD, timestep_spacing=spacing, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    ref = DPMSolverMultistepScheduler(**config)
    ref.set_timesteps(10)
    ours = DPMSolverScheduler(DDIMConfig(**config, clip_sample=False))
    assert ours.timesteps(10)[0] == 999 and ours.alphas_cumprod[-1] == 2.0**-24
    g = torch.Generator().manual_seed(1)
    x_ref = x = torch.randn(1, 4, 8, 8, generator=g)
    previous = None
    for i, t in enumerate(ours.timesteps(10)):
        output = torch.randn(1, 4, 8, 8, generator=g)
        x_ref = ref.step(output, t, x_ref).prev_sample
        x, previous = ours.step(output, i, x, 10, previous)
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, x_ref, **TOL)


def saved_dpm_config(tmp_path, **changes) -> dict:
    """The scheduler_config.json diffusers writes for DPMSolverMultistepScheduler on the SD schedule."""
    DPMSolverMultistepScheduler(**SD, timestep_spacing="leading", **changes).save_config(tmp_path)
    return json.loads((tmp_path / "scheduler_config.json").read_text())


def test_a_dpm_solver_config_saved_by_diffusers_steps_like_diffusers_from_config(tmp_path):
    """Every key of the file (solver_order 2, dpmsolver++, midpoint, lower_order_final, -Infinity lambda clip...)
    is read or ignored, and the steps equal DPMSolverMultistepScheduler.from_config's within TOL."""
    d = saved_dpm_config(tmp_path)
    assert_steps_like(DPMSolverScheduler.from_config_file(tmp_path), DPMSolverMultistepScheduler.from_config(d), 12,
                      seed=2)


@pytest.mark.parametrize("changes, line", [
    (dict(solver_order=3), r"solver_order=3 is not supported by sampler 'dpmsolver\+\+' \(supported: 2\)"),
    (dict(solver_order=1), r"solver_order=1 is not supported"),
    (dict(use_karras_sigmas=True), r"use_karras_sigmas=True is not supported .*\(supported: False\)"),
    (dict(use_lu_lambdas=True), r"use_lu_lambdas=True is not supported"),
    (dict(algorithm_type="sde-dpmsolver++"), r"algorithm_type='sde-dpmsolver\+\+' is not supported"),
    (dict(solver_type="heun"), r"solver_type='heun' is not supported"),
    (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), r"algorithm_type='dpmsolver' is not supported"),
    (dict(final_sigmas_type="sigma_min"), r"final_sigmas_type='sigma_min' is not supported .*\(supported: 'zero'\)"),
    (dict(lambda_min_clipped=-1.0), r"lambda_min_clipped=-1.0 clips this schedule's timesteps"),
    (dict(variance_type="learned_range"), r"variance_type='learned_range' is not supported"),
])
def test_dpm_solver_settings_we_do_not_implement_are_refused_by_dpm_and_ignored_by_ddim(tmp_path, changes, line):
    """diffusers' DPMSolverMultistepScheduler.from_config runs these (third order, Karras sigmas, SDE noise, ...);
    ours ran 2M on uniform levels without a word. DPM-Solver++ now refuses the file's value in one line naming it;
    DDIM ignores the key, as diffusers' DDIMScheduler.from_config does."""
    d = saved_dpm_config(tmp_path, **changes)
    plain = saved_dpm_config(tmp_path / "plain")
    assert DDIMConfig.from_dict(d) == DDIMConfig.from_dict(plain)  # the same DDIM schedule
    with pytest.raises(ConfigError, match=line):
        DPMSolverScheduler.from_dict(d)


@pytest.mark.parametrize("changes", [dict(solver_type="bh2"), dict(solver_type="logrho"),
                                     dict(lambda_min_clipped=-5.1),
                                     dict(lower_order_final=False), dict(euler_at_final=True)])
def test_dpm_solver_settings_diffusers_reads_as_ours_are_accepted_and_step_alike(changes):
    """DEIS' and UniPC's solver_type names, a clip below every level, lower_order_final / euler_at_final (the last step is
    first order onto 0 anyway): diffusers' DPMSolverMultistepScheduler.from_config gives our numbers (TOL)."""
    d = {**SD, "timestep_spacing": "leading", **changes}
    assert_steps_like(DPMSolverScheduler.from_dict(d), DPMSolverMultistepScheduler.from_config(d), 6, seed=4)

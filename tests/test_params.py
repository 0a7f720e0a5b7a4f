"""diffedit.params: named presets, layered between a model's stored editing defaults and explicit overrides; the
values DiffEditParams refuses before any work."""

import numpy as np
import pytest
import torch

from diffedit.params import MAX_INT, MAX_NUM_MAPS, PRESETS, DiffEditParams, layered, with_preset

torch.set_num_threads(1)

# The shipped model's stored defaults that the fast preset changes or keeps (its diffedit.json).
STORED = {"num_inference_steps": 25, "inpaint_strength": 0.6, "num_maps_per_mask": 10}


def test_no_preset_gives_the_overrides_back_as_a_new_dict():
    overrides = {"guidance_scale": 3.0}
    result = with_preset(None, overrides)
    assert result == overrides and result is not overrides


def test_the_fast_preset_sits_over_the_stored_defaults_and_under_explicit_overrides():
    p = layered(STORED, with_preset("fast", {}))
    assert p.num_inference_steps == 15  # the preset over the stored defaults
    assert p.num_maps_per_mask == 10 and p.inpaint_strength == 0.6  # stored defaults the preset does not name
    assert layered(STORED, with_preset("fast", {"num_inference_steps": 20})).num_inference_steps == 20  # explicit
    assert layered({}, with_preset("fast", {})).num_inference_steps == 15  # over DiffEditParams' 50 too


def test_an_override_equal_to_the_presets_value_changes_nothing_and_every_preset_is_valid():
    for name, fields in PRESETS.items():
        DiffEditParams().updated(fields)  # names and values valid on their own
        assert with_preset(name, dict(fields)) == fields


def test_an_unknown_or_mistyped_preset_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="preset 'slow': choose from fast"):
        with_preset("slow", {})
    with pytest.raises(ValueError, match="preset 'Fast'"):  # names are exact
        with_preset("Fast", {})
    with pytest.raises(TypeError, match="preset: expected a preset name"):
        with_preset(["fast"], {})


# --- values checked before any work -------------------------------------------------------------------------------


def test_numpy_scalars_are_taken_as_the_python_numbers_they_equal_and_a_float_for_an_int_stays_refused():
    """np.int64(4) and np.float32(0.5) were refused while np.float64 and a numpy seed were accepted; later code
    (JSON reports, tensors, the CLI's summaries) sees plain ints and floats."""
    p = DiffEditParams(num_inference_steps=np.int64(4), num_maps_per_mask=np.int32(3), eta=np.float32(0.5),
                       guidance_scale=np.float64(2.0), mask_thresholding_ratio=np.float16(2.5), clip_skip=np.uint8(1))
    got = {name: getattr(p, name) for name in ("num_inference_steps", "num_maps_per_mask", "eta", "guidance_scale",
                                                 "mask_thresholding_ratio", "clip_skip")}
    assert got == {"num_inference_steps": 4, "num_maps_per_mask": 3, "eta": 0.5, "guidance_scale": 2.0,
                   "mask_thresholding_ratio": 2.5, "clip_skip": 1}
    assert [type(v) for v in got.values()] == [int, int, float, float, float, int]
    assert DiffEditParams().updated({"inpaint_strength": np.float32(0.75)}).inpaint_strength == 0.75
    for name, bad in [("num_inference_steps", np.float32(4.0)), ("num_inference_steps", np.bool_(True)),
                      ("guidance_scale", np.float32("nan")), ("paste_matching_step", np.bool_(True))]:
        with pytest.raises(ValueError, match=f"DiffEditParams.{name}: expected"):
            DiffEditParams(**{name: bad})


def test_eta_is_refused_past_one_where_diffusers_ddim_takes_the_root_of_a_negative():
    """DDIM's eta interpolates between no noise (0) and DDPM's (1); past 1 the step's sqrt(1 - a_prev - sigma^2) goes
    negative: NaN latents in diffusers' own DDIMScheduler, so the value is refused."""
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1)
    ref.set_timesteps(50)

    def finite(eta):
        x, g = torch.ones(1, 4, 8, 8), torch.Generator().manual_seed(0)
        return all(bool(torch.isfinite(ref.step(torch.zeros_like(x), t, x, eta=eta, generator=g).prev_sample).all())
                   for t in ref.timesteps)

    assert finite(1.0) and not finite(1.5)
    assert DiffEditParams(eta=1).eta == 1
    for bad in (1.5, 1.0001, -0.1):
        with pytest.raises(ValueError, match=r"DiffEditParams.eta: expected a number in \[0, 1\]"):
            DiffEditParams(eta=bad)


@pytest.mark.parametrize("name, value", [("eta", 0.5), ("num_reg_steps", 1)])
def test_ddim_only_settings_are_refused_with_dpm_solver_not_ignored(name, value):
    """DPM-Solver++ draws no noise (eta was silently ignored) and has no regularizer (refused only once the mask step
    had run): both refused when the parameters are made, whichever field comes last."""
    with pytest.raises(ValueError, match=f"DiffEditParams.{name}: {name}={value} .*runs with sampler='ddim' only; "
                                         f"set {name}=0 or sampler='ddim'"):
        DiffEditParams(sampler="dpmsolver++", **{name: value})
    with pytest.raises(ValueError, match=f"{name}={value}"):
        DiffEditParams(**{name: value}).updated({"sampler": "dpmsolver++"})
    with pytest.raises(ValueError, match=f"{name}={value}"):
        layered({"sampler": "dpmsolver++"}, {name: value})
    assert DiffEditParams(sampler="dpmsolver++", **{name: 0}).sampler == "dpmsolver++"


def test_num_maps_per_mask_is_capped_by_one_rule_for_the_api_and_the_command_line():
    """The API took 10**12 noise draws and died allocating; the cap is the command line's --num-maps one."""
    assert DiffEditParams(num_maps_per_mask=MAX_NUM_MAPS).num_maps_per_mask == MAX_NUM_MAPS == 1000
    for bad in (MAX_NUM_MAPS + 1, 10**12):
        with pytest.raises(ValueError, match=r"DiffEditParams.num_maps_per_mask: expected an int in \[1, 1000\]"):
            DiffEditParams(num_maps_per_mask=bad)


@pytest.mark.parametrize("name", ["guidance_min_timestep", "num_inference_steps", "num_reg_steps",
                                  "num_auto_corr_rolls", "clip_skip"])
def test_ints_past_int32_are_refused_before_they_reach_a_tensor(name):
    """guidance_min_timestep=10**30 failed at the first decoding step ("int too big to convert")."""
    assert getattr(DiffEditParams(**{name: MAX_INT}), name) == MAX_INT == 2**31 - 1
    for bad in (MAX_INT + 1, 10**30):
        with pytest.raises(ValueError, match=rf"DiffEditParams.{name}: expected an int in \[[01], 2147483647\]"):
            DiffEditParams(**{name: bad})

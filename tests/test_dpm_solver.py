"""DPM-Solver++ (2M) against diffusers' DPMSolverMultistepScheduler on the same config, step for step."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from diffedit.schedulers.ddim import DDIMConfig
from diffedit.schedulers.dpm_solver import DPMSolverScheduler, dpm_timesteps

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


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 5, 15, 20])
def test_every_step_equals_diffusers(prediction_type, steps):
    """The first step first-order, the middle ones second-order from the previous x0, the last first-order onto
    the clean end (s = 0): each latent equal to diffusers' with the same network outputs."""
    config = dict(SD, prediction_type=prediction_type, timestep_spacing="leading")
    ref = DPMSolverMultistepScheduler(**config)
    ref.set_timesteps(steps)
    ours = DPMSolverScheduler(DDIMConfig(**config, clip_sample=False))
    g = torch.Generator().manual_seed(steps)
    x_ref = x = torch.randn(2, 4, 8, 8, generator=g)
    previous = None
    for i, t in enumerate(ours.timesteps(steps)):
        output = torch.randn(2, 4, 8, 8, generator=g)
        x_ref = ref.step(output, t, x_ref).prev_sample
        x, previous = ours.step(output, i, x, steps, previous)
        torch.testing.assert_close(x, x_ref, **TOL)
    assert ours.levels(steps)[-1] == 0


def test_a_dpm_decoding_of_a_bare_latent_tensor_is_refused_naming_what_it_needs(sd1_folder):
    from diffedit import DiffEditParams, StableDiffusion
    from diffedit import method

    model = StableDiffusion.from_pretrained(sd1_folder)
    p = DiffEditParams(num_inference_steps=4, sampler="dpmsolver++")
    text = method.encode_text(model, ["a cat"], [""])
    with pytest.raises(TypeError, match=r"decodes an Inversion .* not Tensor"):
        method.decode(model, torch.zeros(1, 3, 4, 8, 8), None, text, p)

"""Multistep DPM-Solver++ (Lu, Zhou, Bao, Chen, Li, Zhu, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", arXiv 2211.01095): second order, deterministic, in data prediction (x0) form.

Gives the numbers of diffusers 0.42.1 `DPMSolverMultistepScheduler` built from an SD scheduler config (its defaults:
algorithm "dpmsolver++", solver_order 2, solver_type "midpoint", lower_order_final, final_sigmas_type "zero"),
without its state: the caller keeps the previous step's x0 prediction and passes it back (`step(..., previous=)`).

Notation: a_t = alphas_cumprod[t]; alpha_t = sqrt(a_t), sigma_t = sqrt(1 - a_t); lambda_t = log(alpha_t / sigma_t),
the half log-SNR. The schedule is kept as s_t = sigma_t / alpha_t = sqrt((1 - a_t) / a_t) per step, with s = 0 after
the last step (the clean end).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..validation import ConfigError
from .ddim import DDIMConfig, NoiseSchedule, check_num_steps


class DPMStep(NamedTuple):
    prev_sample: torch.Tensor  # the latent at the next level
    x0: torch.Tensor  # this step's data prediction: pass it as `previous` to the next step


def dpm_spacing(config: DDIMConfig, num_inference_steps: int) -> np.ndarray:
    """The timesteps diffusers' DPM-Solver spaces N steps at, unchecked (`dpm_timesteps` checks them):
    1. "leading": multiples of T // (N + 1), the zero dropped, plus steps_offset (SD, N=10: 901, 811, ..., 91);
    2. "trailing": T, T - T/N, ... rounded, minus 1; the first N only (see `dpm_timesteps`);
    3. "linspace": N + 1 points over [0, T - 1], rounded, the zero dropped."""
    T, N = config.num_train_timesteps, int(num_inference_steps)
    if config.timestep_spacing == "leading":
        return (np.arange(0, N + 1) * (T // (N + 1))).round()[::-1][:-1].astype(np.int64) + config.steps_offset
    if config.timestep_spacing == "trailing":
        return np.arange(T, 0, -T / N).round().astype(np.int64)[:N] - 1
    return np.linspace(0, T - 1, N + 1).round()[::-1][:-1].astype(np.int64)


def _usable(steps: np.ndarray, T: int) -> bool:
    """Timesteps inside the schedule, each below the one before (a repeated level is a step of length 0)."""
    return bool(steps[0] < T and (np.diff(steps) < 0).all())


def dpm_timesteps(config: DDIMConfig, num_inference_steps: int) -> torch.Tensor:
    """(N,) int64, noisiest first, as diffusers' DPM-Solver spaces them (not DDIM's spacing; `dpm_spacing`).

    Where we differ on purpose (docs/design.md): "trailing" sometimes gives diffusers N + 1 timesteps ending in -1
    (T=1000: N=61, 103, 121, ...), as for DDIM; we keep the N intended ones, so the last step lands on the clean
    end from the N-th timestep. Step counts whose timesteps repeat or pass T - 1 ("leading" and "linspace" near
    N = T; diffusers returns NaN or fails indexing) are refused, saying how many steps fit."""
    check_num_steps(config, num_inference_steps)
    T, N = config.num_train_timesteps, int(num_inference_steps)
    steps = dpm_spacing(config, N)
    if not _usable(steps, T):
        fits = max((n for n in range(1, N) if _usable(dpm_spacing(config, n), T)), default=0)
        problem = (f"timestep {steps[0]} >= num_train_timesteps={T}" if steps[0] >= T
                   else "a timestep twice (a step of length 0)")
        raise ValueError(f"num_inference_steps={N} with '{config.timestep_spacing}' spacing gives DPM-Solver++ "
                         f"{problem} (at most {fits} steps fit this schedule)")
    return torch.from_numpy(steps.copy())


def alpha_sigma(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) from s_t = sigma_t / alpha_t, on the unit circle alpha^2 + sigma^2 = 1."""
    alpha = 1 / (s**2 + 1) ** 0.5
    return alpha, s * alpha


def data_prediction(model_output: torch.Tensor, sample: torch.Tensor, s: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    """x0 implied by the network's output at level s: eps -> (x - sigma eps) / alpha; v -> alpha x - sigma v."""
    alpha, sigma = alpha_sigma(s)
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output
    return model_output


def dpm_update(sample: torch.Tensor, x0: torch.Tensor, previous: torch.Tensor | None, s_prev: torch.Tensor | None,
               s_now: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
    """One DPM-Solver++ update from level s_now to s_next (arXiv 2211.01095, Algorithm 2 with the midpoint rule):

    1. first order (no `previous`): x' = (sigma'/sigma) x - alpha' (e^-h - 1) x0, h = lambda' - lambda (the DDIM step);
    2. second order: the same with x0 replaced by D0 + D1 / 2, D0 = x0, D1 = (x0 - previous) h / h_prev, where
       h_prev = lambda - lambda_prev is the previous step's length."""
    lam = lambda s: torch.log(alpha_sigma(s)[0]) - torch.log(alpha_sigma(s)[1])  # noqa: E731
    alpha_next, sigma_next = alpha_sigma(s_next)
    sigma_now = alpha_sigma(s_now)[1]
    h = lam(s_next) - lam(s_now)
    out = (sigma_next / sigma_now) * sample - (alpha_next * (torch.exp(-h) - 1.0)) * x0
    if previous is None:
        return out
    d1 = (1.0 / ((lam(s_now) - lam(s_prev)) / h)) * (x0 - previous)
    return out - 0.5 * (alpha_next * (torch.exp(-h) - 1.0)) * d1


# What DPMSolverMultistepScheduler's config may say for its numbers to be ours (2M, dpmsolver++, midpoint, onto 0):
# 1. solver_order 2; 2. algorithm_type dpmsolver++ (diffusers refuses DEIS' "deis" with final_sigmas_type zero);
# 3. solver_type midpoint (and DEIS' / UniPC's names, which diffusers reads as it); 4. the uniform spacing: no Karras, exponential, beta, Lu or
# flow sigmas (diffusers fails on None); 5. final_sigmas_type zero; 6. a variance_type whose output is not split.
# lambda_min_clipped is checked on the schedule: allowed where it clips no timestep.
DPM_SUPPORTED = {
    "solver_order": (2,),
    "algorithm_type": ("dpmsolver++",),
    "solver_type": ("midpoint", "logrho", "bh1", "bh2"),
    **{key: (False,) for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                      "use_lu_lambdas", "use_flow_sigmas")},
    "final_sigmas_type": ("zero",),
    "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),
}


def check_dpm_settings(config: DDIMConfig, alphas_cumprod: torch.Tensor) -> None:
    """A ConfigError for the first DPM-Solver setting of the config file (`DDIMConfig.dpm_settings`) that would
    give other numbers in diffusers' DPMSolverMultistepScheduler than ours (`DPM_SUPPORTED`)."""
    for key, value in config.dpm_settings:
        if key == "lambda_min_clipped":
            lam = 0.5 * (torch.log(alphas_cumprod) - torch.log(1 - alphas_cumprod))
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and not (lam < value).any()):
                raise ConfigError(f"scheduler config: lambda_min_clipped={value!r} clips this schedule's timesteps, "
                                  "which sampler 'dpmsolver++' does not do (supported: -Infinity or a value at or "
                                  f"below {lam.min().item():.4g}); the DDIM sampler ignores it")
            continue
        allowed = DPM_SUPPORTED[key]
        if not any(type(value) is type(a) and value == a for a in allowed):  # True is not 1, nor 0 False
            raise ConfigError(f"scheduler config: {key}={value!r} is not supported by sampler 'dpmsolver++' "
                              f"(supported: {', '.join(map(repr, allowed))}); the DDIM sampler ignores it, as "
                              "diffusers' DDIMScheduler.from_config does")


class DPMSolverScheduler(NoiseSchedule):
    """Denoising DPM-Solver++ (2M), number for number diffusers' `DPMSolverMultistepScheduler` on the same config,
    without `set_timesteps` state."""

    def __post_init__(self):
        super().__post_init__()
        if self.config.rescale_betas_zero_snr:  # as diffusers: the last level 2**-24, not 0, so its s_t is finite
            a = self.alphas_cumprod.clone()
            a[-1] = 2.0**-24
            object.__setattr__(self, "alphas_cumprod", a)
        check_dpm_settings(self.config, self.alphas_cumprod)

    def timesteps(self, num_inference_steps: int) -> torch.Tensor:
        return dpm_timesteps(self.config, num_inference_steps)

    def levels(self, num_inference_steps: int) -> torch.Tensor:
        """(N + 1,) float32: s_t at each step's timestep, then 0 (the clean end)."""
        a = self.alphas_cumprod
        s = (((1 - a) / a) ** 0.5).numpy()  # float32, as diffusers computes it
        at = np.interp(self.timesteps(num_inference_steps).numpy(), np.arange(len(s)), s)
        return torch.from_numpy(np.concatenate([at, [0.0]]).astype(np.float32))

    def step(self, model_output: torch.Tensor, index: int, sample: torch.Tensor, num_inference_steps: int,
             previous: torch.Tensor | None = None) -> DPMStep:
        """Step `index` (0-based) of N from its timestep to the next level. The first step and the last (the
        clean end, s = 0) are first order; the others use `previous`, the last step's `DPMStep.x0`."""
        s = self.levels(num_inference_steps)
        x0 = data_prediction(model_output, sample, s[index], self.config.prediction_type)
        first_order = index == 0 or index == num_inference_steps - 1 or previous is None
        x = dpm_update(sample.to(torch.float32), x0, None if first_order else previous,
                       None if index == 0 else s[index - 1], s[index], s[index + 1])
        return DPMStep(x.to(model_output.dtype), x0)

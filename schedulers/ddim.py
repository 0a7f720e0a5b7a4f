"""DDIM sampling in both directions (Song, Meng, Ermon, "Denoising Diffusion Implicit Models", ICLR 2021).

Gives the numbers of diffusers 0.42.1 `DDIMScheduler` (denoising) and `DDIMInverseScheduler` (inversion) without
their state: a scheduler here is a frozen config plus its `alphas_cumprod` table, and every call says how many
inference steps the schedule has. One update, `ddim_step` (the paper's eq. 12), serves both directions.

Notation: a_t = alphas_cumprod[t] ("alpha-bar"), x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
import torch

from ..validation import (BOOL, NUMBER, ConfigError, check_fields, check_keys, int_at_least, is_integral, is_number,
                          one_of, optional)
from .noise import randn

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Keys a scheduler config.json may carry that do not change DDIM: diffusers' bookkeeping, the thresholding knobs
# (read only when thresholding is on, which we refuse), and the settings of the other SD-compatible diffusers
# schedulers (PNDM, LMS, Euler, Heun, DPM-Solver, DEIS, UniPC, KDPM2, DDPM, EDM), which
# `DDIMScheduler.from_config` drops too. Anything else is an error.
IGNORED_KEYS = frozenset({
    "_class_name", "_diffusers_version", "_use_default_values",
    "dynamic_thresholding_ratio", "sample_max_value",
    "skip_prk_steps", "variance_type", "interpolation_type", "timestep_type", "final_sigmas_type",
    "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas", "use_lu_lambdas",
    "sigma_min", "sigma_max", "sigma_data", "sigma_schedule", "rho",
    "solver_order", "solver_type", "algorithm_type", "lower_order_final", "euler_at_final", "lambda_min_clipped",
    "predict_x0", "solver_p", "disable_corrector",
    "use_dynamic_shifting", "time_shift_type", "flow_shift", "shift_terminal",
})

# The keys among those that change diffusers' DPMSolverMultistepScheduler: DDIM drops them (as
# `DDIMScheduler.from_config` does), but `DDIMConfig.from_dict` keeps them aside (`dpm_settings`) for DPM-Solver++,
# which refuses the values it does not implement (`dpm_solver.DPM_SUPPORTED`).
DPM_KEYS = frozenset({
    "solver_order", "algorithm_type", "solver_type", "final_sigmas_type", "lambda_min_clipped", "variance_type",
    "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
})


@dataclass(frozen=True)
class DDIMConfig:
    """A diffusers scheduler `config.json`, as far as DDIM reads it. Defaults are diffusers' defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None  # when set, replaces the three fields above
    clip_sample: bool = True  # clamp x0_hat to [-clip_sample_range, clip_sample_range]; SD configs say false
    clip_sample_range: float = 1.0
    # The level just past the clean end of the schedule (the last denoising step's target, the first inversion
    # step's source): 1 if true, else alphas_cumprod[0]. SD configs say false.
    set_alpha_to_one: bool = True
    steps_offset: int = 0  # added to "leading" timesteps only (SD: 1, giving 981 .. 1 for 50 steps)
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False
    thresholding: bool = False  # Imagen's dynamic thresholding is not implemented: only false is accepted
    # The file's DPM_KEYS as (key, value) pairs, set by `from_dict` only: not a field (DDIM does not read them; not in
    # repr, ==, asdict, so a config is the same DDIM schedule with or without them).
    dpm_settings: ClassVar[tuple[tuple[str, object], ...]] = ()

    def __post_init__(self):
        T = self.num_train_timesteps
        check_fields(self, {
            "num_train_timesteps": int_at_least(1), "steps_offset": int_at_least(0), "beta_start": NUMBER,
            "beta_end": NUMBER, "clip_sample_range": NUMBER, "clip_sample": BOOL, "set_alpha_to_one": BOOL,
            "rescale_betas_zero_snr": BOOL, "beta_schedule": one_of(BETA_SCHEDULES),
            "prediction_type": one_of(PREDICTION_TYPES), "timestep_spacing": one_of(TIMESTEP_SPACINGS),
            "thresholding": ((lambda v: v is False), "false (dynamic thresholding is not supported)"),
            "trained_betas": optional(((lambda v: isinstance(v, tuple) and len(v) == T),
                                       f"{T} values (num_train_timesteps)")),
        }, "DDIMConfig", ConfigError)
        if self.trained_betas is None and self.beta_schedule != "squaredcos_cap_v2":  # the betas span these two
            check_fields(self, {name: ((lambda v: 0 <= v < 1), "a number in [0, 1) (a beta)")
                                for name in ("beta_start", "beta_end")}, "DDIMConfig", ConfigError)
        bad = next((i for i, b in enumerate(self.trained_betas or ()) if not (is_number(b) and 0 <= b < 1)), None)
        if bad is not None:  # a beta of 1 or more, or below 0, makes alphas_cumprod 0 or > 1: NaN downstream
            raise ConfigError(f"DDIMConfig.trained_betas: expected numbers in [0, 1), got "
                              f"{self.trained_betas[bad]!r} at index {bad}")

    @classmethod
    def from_dict(cls, d: dict, *, inverse: bool = False) -> DDIMConfig:
        """Parse a scheduler config dict. Unknown keys fail, naming them; `IGNORED_KEYS` are skipped.

        `set_alpha_to_zero` is `DDIMInverseScheduler`'s deprecated alias of `set_alpha_to_one` (same meaning despite
        the name: true -> 1). As in diffusers, the inverse scheduler (`inverse=True`) lets a non-null value override
        `set_alpha_to_one`, and the forward scheduler ignores the key.
        """
        names = {f.name for f in fields(cls)}
        check_keys("scheduler", d, names, IGNORED_KEYS | {"set_alpha_to_zero"})
        kwargs = {k: v for k, v in d.items() if k in names}
        if isinstance(kwargs.get("trained_betas"), list):  # kept as a tuple (hashable); DDIMConfig checks each
            kwargs["trained_betas"] = tuple(kwargs["trained_betas"])
        if inverse and d.get("set_alpha_to_zero") is not None:
            kwargs["set_alpha_to_one"] = d["set_alpha_to_zero"]
        config = cls(**kwargs)
        object.__setattr__(config, "dpm_settings", tuple((k, d[k]) for k in sorted(DPM_KEYS & d.keys())))
        return config

    def replaced(self, **changes) -> DDIMConfig:
        """`dataclasses.replace` keeping the file's `dpm_settings` (not a field, so `replace` would drop them and
        DPM-Solver++ would run settings it refuses)."""
        config = replace(self, **changes)
        object.__setattr__(config, "dpm_settings", self.dpm_settings)
        return config

    @classmethod
    def from_file(cls, path: str | Path, *, inverse: bool = False) -> DDIMConfig:
        """Read a `scheduler_config.json` (or a folder holding one, like an SD repo's `scheduler/`)."""
        path = Path(path)
        if path.is_dir():
            path = path / "scheduler_config.json"
        try:
            return cls.from_dict(json.loads(path.read_text()), inverse=inverse)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# Noise schedule


def make_betas(config: DDIMConfig) -> torch.Tensor:
    """Per-step betas, (T,) float32."""
    T, b0, b1 = config.num_train_timesteps, config.beta_start, config.beta_end
    if config.trained_betas is not None:
        betas = torch.tensor(config.trained_betas, dtype=torch.float32)
    elif config.beta_schedule == "linear":
        betas = torch.linspace(b0, b1, T, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":  # linear in sqrt(beta): the LDM / SD schedule
        betas = torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float32) ** 2
    else:  # cosine alpha-bar (Nichol & Dhariwal 2021, eq. 17), betas capped at 0.999; evaluated in float64
        s = np.arange(T + 1) / T
        alpha_bar = np.array([math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2 for x in s])
        betas = torch.tensor(np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999), dtype=torch.float32)
    if config.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha-bar) so the last step has zero SNR and the first is unchanged
    (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", 2024, Algorithm 1)."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def check_num_steps(config: DDIMConfig, num_inference_steps: int):
    T = config.num_train_timesteps
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
            or not 1 <= num_inference_steps <= T:
        raise ValueError(f"num_inference_steps must be an int in [1, num_train_timesteps={T}], "
                         f"got {num_inference_steps!r}")


def ddim_timesteps(config: DDIMConfig, num_inference_steps: int) -> torch.Tensor:
    """Denoising timesteps, noisiest first, (N,) int64, exactly as diffusers' `DDIMScheduler.set_timesteps`:

    - leading:  arange(N) * (T // N), reversed, + steps_offset      (SD, N=50: 981, 961, ..., 1)
    - trailing: round(arange(T, 0, -T/N)) - 1                        (999, ..., ending near T/N - 1)
    - linspace: round(linspace(0, T - 1, N)), reversed               (999, ..., 0)
    steps_offset only shifts "leading". The step itself always moves by T // N (see `DDIMScheduler.step`).
    """
    check_num_steps(config, num_inference_steps)
    T, N = config.num_train_timesteps, int(num_inference_steps)
    if config.timestep_spacing == "leading":
        t = (np.arange(N) * (T // N))[::-1] + config.steps_offset
    elif config.timestep_spacing == "trailing":
        # np.arange with a float step sometimes yields one extra value ~1e-13, i.e. timestep -1 (T=1000: N=61,
        # 103, 121, ...); diffusers keeps it, we keep the N intended values.
        t = np.round(np.arange(T, 0, -T / N))[:N] - 1
    else:
        t = np.linspace(0, T - 1, N).round()[::-1]
    t = t.astype(np.int64)
    if t[0] >= T:
        fits = max(n for n in range(1, N) if (n - 1) * (T // n) + config.steps_offset < T)
        raise ValueError(f"steps_offset={config.steps_offset} with {N} 'leading' steps gives timestep {t[0]} "
                         f">= num_train_timesteps={T} (at most {fits} steps fit this schedule)")
    return torch.from_numpy(t.copy())


# ---------------------------------------------------------------------------------------------------------------
# The DDIM update, both directions


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor  # the latent at the step's target level
    pred_original_sample: torch.Tensor  # x0_hat, after clipping


def predict_x0_and_eps(model_output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor,
                       prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) from the network's output for a sample at level alpha (= a_t)."""
    beta = 1 - alpha
    if prediction_type == "epsilon":
        return (sample - beta**0.5 * model_output) / alpha**0.5, model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha**0.5 * model_output) / beta**0.5
    # v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022, section 4), a rotation of (x0, eps)
    return alpha**0.5 * sample - beta**0.5 * model_output, alpha**0.5 * model_output + beta**0.5 * sample


def ddim_step(config: DDIMConfig, model_output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor,
              alpha_next: torch.Tensor, sigma: torch.Tensor | float = 0.0,
              noise: torch.Tensor | None = None) -> StepOutput:
    """Move `sample` from level `alpha` to level `alpha_next` (Song et al. 2021, eq. 12):

        x_next = sqrt(a_next) x0_hat + sqrt(1 - a_next - sigma^2) eps_hat + sigma z

    Denoising when alpha_next > alpha; deterministic inversion (sigma = 0) when alpha_next < alpha.
    `alpha`, `alpha_next` are 0-dim float32 tensors, so the result keeps the sample's dtype.
    """
    x0, eps = predict_x0_and_eps(model_output, sample, alpha, config.prediction_type)
    if config.clip_sample:
        x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    x_next = alpha_next**0.5 * x0 + (1 - alpha_next - sigma**2) ** 0.5 * eps
    if noise is not None:
        x_next = x_next + sigma * noise
    return StepOutput(x_next, x0)


def ddim_sigma(alpha: torch.Tensor, alpha_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """sigma_t(eta) = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev) (Song et al. 2021, eq. 16):
    eta = 0 is DDIM, eta = 1 the DDPM posterior's standard deviation."""
    variance = ((1 - alpha_prev) / (1 - alpha)) * (1 - alpha / alpha_prev)
    return eta * variance**0.5


# ---------------------------------------------------------------------------------------------------------------
# Schedulers: a config and its alphas_cumprod, nothing that changes


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A scheduler config plus its `alphas_cumprod` table, and the level arithmetic every sampler shares (the
    DDIM schedulers here, DPM-Solver++ in `dpm_solver.py`)."""

    config: DDIMConfig
    alphas_cumprod: torch.Tensor = field(init=False, repr=False)  # (T,) float32, CPU
    _inverse: ClassVar[bool] = False

    def __post_init__(self):
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - make_betas(self.config), dim=0))

    @classmethod
    def from_dict(cls, d: dict):
        return cls(DDIMConfig.from_dict(d, inverse=cls._inverse))

    @classmethod
    def from_config_file(cls, path: str | Path):
        return cls(DDIMConfig.from_file(path, inverse=cls._inverse))

    @property
    def edge_alpha(self) -> torch.Tensor:
        """The level just past the clean end of the schedule: 1, or alphas_cumprod[0] (set_alpha_to_one)."""
        return torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def alpha(self, t: int) -> torch.Tensor:
        """a_t as a 0-dim float32 tensor; t < 0 means past the clean end (`edge_alpha`)."""
        return self.alphas_cumprod[t] if t >= 0 else self.edge_alpha

    def _check_timestep(self, timestep) -> int:
        """One timestep as an int: an int, a numpy integer or a one-element integer tensor (a pipeline's `t`).
        A float is refused, not truncated (diffusers fails indexing alphas_cumprod with it)."""
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"timestep: expected one timestep, got a tensor of shape {tuple(timestep.shape)} "
                                 "(step one timestep of timesteps(num_inference_steps) at a time)")
            if timestep.dtype.is_floating_point or timestep.dtype.is_complex or timestep.dtype == torch.bool:
                raise TypeError(f"timestep: expected an integer tensor, got {timestep.dtype} "
                                "(pass a timestep of timesteps(num_inference_steps))")
        elif not is_integral(timestep):
            raise TypeError(f"timestep: expected an int or a one-element integer tensor, got "
                            f"{type(timestep).__name__} {timestep!r} (pass a timestep of timesteps(num_inference_steps))")
        t = int(timestep)
        if not 0 <= t < self.config.num_train_timesteps:
            raise ValueError(f"timestep {t} outside [0, {self.config.num_train_timesteps})")
        return t

    @staticmethod
    def _check_step_tensors(model_output, sample) -> None:
        """A network output of the sample's shape (diffusers broadcasts other shapes without a word)."""
        for name, value in (("model_output", model_output), ("sample", sample)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample {tuple(sample.shape)}: "
                             "pass the network's output for this sample")

    def _sqrt_levels(self, timesteps: torch.Tensor | int, like: torch.Tensor):
        """sqrt(a_t) and sqrt(1 - a_t) in like's dtype, shaped (B, 1, ..., 1) to broadcast over like."""
        a = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)
        a = a[torch.as_tensor(timesteps, device=like.device)].flatten()  # (B,)
        a = a.view(-1, *[1] * (like.ndim - 1))  # (B, 1, 1, 1)
        return a**0.5, (1 - a) ** 0.5

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | int) -> torch.Tensor:
        """Forward diffusion q(x_t | x0): sqrt(a_t) x0 + sqrt(1 - a_t) noise, one timestep per batch row (or one
        for all)."""
        sqrt_a, sqrt_b = self._sqrt_levels(timesteps, original)
        return sqrt_a * original + sqrt_b * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | int) -> torch.Tensor:
        """The v-prediction target sqrt(a_t) noise - sqrt(1 - a_t) x0 (Salimans & Ho 2022)."""
        sqrt_a, sqrt_b = self._sqrt_levels(timesteps, sample)
        return sqrt_a * noise - sqrt_b * sample


class DDIMScheduler(NoiseSchedule):
    """Denoising DDIM, number for number diffusers' `DDIMScheduler`, without `set_timesteps` state."""

    def timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """(N,) int64, noisiest first; see `ddim_timesteps`."""
        return ddim_timesteps(self.config, num_inference_steps)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             num_inference_steps: int, eta: float = 0.0,
             generator: torch.Generator | list[torch.Generator] | None = None,
             variance_noise: torch.Tensor | None = None) -> StepOutput:
        """One step from `timestep` to `timestep - T // N` (the clean edge when negative), whatever the spacing,
        as diffusers does. eta > 0 adds sigma_t(eta) z (eq. 12, 16) with z = `variance_noise`, or drawn from
        `generator` in model_output's shape, dtype and device; eta = 0 draws nothing."""
        check_num_steps(self.config, num_inference_steps)
        t = self._check_timestep(timestep)
        self._check_step_tensors(model_output, sample)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)):
            raise TypeError(f"eta: expected a number >= 0 (0: DDIM, 1: DDPM's variance), got {type(eta).__name__}")
        if not eta >= 0 or not math.isfinite(eta):  # diffusers adds no noise for eta < 0 but keeps its sigma
            raise ValueError(f"eta: expected a number >= 0 (0: DDIM, 1: DDPM's variance), got {eta!r}")
        if variance_noise is not None and tuple(variance_noise.shape) != tuple(model_output.shape):
            raise ValueError(f"variance_noise has shape {tuple(variance_noise.shape)}, expected model_output's "
                             f"{tuple(model_output.shape)}")
        alpha, alpha_prev = self.alpha(t), self.alpha(t - self.config.num_train_timesteps // num_inference_steps)
        sigma = ddim_sigma(alpha, alpha_prev, eta)
        noise = None
        if eta > 0:
            if generator is not None and variance_noise is not None:
                raise ValueError("pass either generator or variance_noise, not both")
            noise = variance_noise
            if noise is None:
                noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
        return ddim_step(self.config, model_output, sample, alpha, alpha_prev, sigma, noise)

    def inverse(self) -> DDIMInverseScheduler:
        """The inversion scheduler of the same config, like `DDIMInverseScheduler.from_config(ddim.config)`."""
        return DDIMInverseScheduler(self.config)


class DDIMInverseScheduler(NoiseSchedule):
    """Deterministic DDIM inversion (eq. 12 with sigma = 0, run from clean to noisy), number for number diffusers'
    `DDIMInverseScheduler`. Note its convention: at timestep t the network is evaluated at t while the latent still
    sits at level t - T // N (the clean edge, `edge_alpha`, for the first step); the step lands at level t."""

    _inverse: ClassVar[bool] = True

    def timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """(N,) int64, cleanest first: the denoising timesteps reversed (SD, N=50: 1, 21, ..., 981).
        Like diffusers, only "leading" and "trailing" spacing."""
        if self.config.timestep_spacing == "linspace":
            raise ValueError("timestep_spacing 'linspace' is not supported for inversion (nor by diffusers' "
                             "DDIMInverseScheduler); use 'leading' or 'trailing'")
        return ddim_timesteps(self.config, num_inference_steps).flip(0)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             num_inference_steps: int) -> StepOutput:
        """One step from level `timestep - T // N` to level `timestep`; model_output is the network at `timestep`.
        (diffusers also clamps the source to T - 1, which no valid timestep reaches.)"""
        check_num_steps(self.config, num_inference_steps)
        t = self._check_timestep(timestep)
        self._check_step_tensors(model_output, sample)
        source = self.alpha(t - self.config.num_train_timesteps // num_inference_steps)
        return ddim_step(self.config, model_output, sample, source, self.alphas_cumprod[t])

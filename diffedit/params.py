"""DiffEdit's settings: one frozen dataclass, so an ablation is `dataclasses.replace(params, ...)`.

The numbers default to those of the paper as diffusers 0.42.1's `StableDiffusionDiffEditPipeline` runs it
(Couairon et al., "DiffEdit", arXiv 2210.11427, §3.2 and §4.1: n = 10 noise draws at 50% strength for the mask,
encoding ratio r = 0.8, 50 DDIM steps; the clamp at 3x the mean difference is diffusers' way of rescaling the map to
[0, 1] before the 0.5 threshold).

The boolean fields are the corrections of the reference's defects D1-D9 (docs/design.md §2). They are on here, which is
what the one-call API and the command line run; the diffusers-compatible facade turns them all off
(`DiffEditParams.reference()`), so it gives diffusers' numbers for the same weights, inputs and seed.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from .validation import (BOOL, POSITIVE, ConfigError, check_fields, int_at_least, is_number, number_at_least,
                         number_in, one_of, optional)

THRESHOLD_RULES = ("ratio", "otsu")
SAMPLERS = ("ddim", "dpmsolver++")

# Which field corrects which defect of the reference (docs/design.md §2).
CORRECTIONS = {
    "D1": "paste_matching_step",
    "D2": "per_image_mask_scale",
    "D3": "empty_mask_when_equal",
    "D4": "honor_all_call_options",
    "D5": "portable_regularizer",
    "D6": "pair_repeated_masks",
    "D7": "slice_inverted_latents",
    "D8": "encode_image_once",
    "D9": "mask_without_guidance",
}

# Fields diffusers 0.42.1's pipeline has no argument for, with the one value it runs: the command line's
# --reference-behaviour refuses other values given as flags and resets the model's stored ones to these.
NOT_IN_REFERENCE = {"guidance_min_timestep": 0, "mask_threshold_rule": "ratio", "sampler": "ddim"}

# Noise draws per mask: the paper and diffusers use 10; the mask step runs them in UNet calls of a bounded number of
# draws, so memory stays flat, but the time grows with the count: past 1000 the average changes little and a run
# would take hours, so larger counts are refused before any work (the command line's --num-maps too).
MAX_NUM_MAPS = 1000
# The largest value of the other int fields: int32's. Past it a count is no setting (hours or years of work) and a
# timestep cannot be compared with the schedule's tensors (10**30: "int too big to convert").
MAX_INT = 2**31 - 1


@dataclass(frozen=True)
class DiffEditParams:
    # Step 1, mask estimation (§3.2): n noise draws at this strength, |eps_Q - eps_R| clamped at ratio x its mean.
    num_maps_per_mask: int = 10
    mask_encode_strength: float = 0.5
    mask_thresholding_ratio: float = 3.0  # diffusers' default; the shipped model stores 4.0 (its diffedit.json)
    mask_guidance_scale: float = 7.5
    # How the map becomes a mask (`method.threshold_map`): "ratio", diffusers' clamp at ratio x mean, rescale, cut
    # at 0.5; "otsu", Otsu's threshold on that rescaled map, per image (Otsu 1979: the cut that maximizes the
    # between-class variance).
    mask_threshold_rule: str = "ratio"
    # Step 2, DDIM encoding up to the encoding ratio r (§3.2); the optional pix2pix-zero noise regularizer
    # (Parmar et al., "Zero-shot Image-to-Image Translation", arXiv 2302.03027, §3.1) is not in the paper: off (0).
    inpaint_strength: float = 0.8  # r: the fraction of the schedule that is inverted, then re-generated
    inversion_guidance_scale: float = 7.5  # diffusers inverts with CFG on the source prompt; the paper uses 1
    num_reg_steps: int = 0
    lambda_auto_corr: float = 20.0
    lambda_kl: float = 20.0
    num_auto_corr_rolls: int = 5
    # Step 3, decoding with mask guidance (§3.2), conditioned on the target text.
    guidance_scale: float = 7.5
    # Guidance interval (Kynkaanniemi et al., arXiv 2404.07724): steps at timesteps below this run on the target
    # prompt alone (scale 1, one UNet call), the rest with guidance_scale. 0, the paper's way: every step guided.
    guidance_min_timestep: int = 0
    eta: float = 0.0  # DDIM's eta in [0, 1] (Song et al. 2021, eq. 16): 0 draws no noise, 1 is DDPM's; DDIM only
    # All three steps.
    num_inference_steps: int = 50
    clip_skip: int | None = None
    # The sampler of the encoding and the decoding (and the mask step's noise level): "ddim" (the paper's), or
    # "dpmsolver++" (Lu et al., arXiv 2211.01095, 2nd-order multistep, as the original implementation decodes:
    # `method.invert_dpm`, `method.decode_dpm`), which needs fewer steps.
    sampler: str = "ddim"
    # The LoRA scale (diffusers' cross_attention_kwargs={"scale": s}): each loaded adapter's branch times this, in
    # the UNet and the text encoder of all three steps; no effect without LoRA adapters (models/lora.py).
    lora_scale: float = 1.0

    # Corrections of diffusers 0.42.1 (on here, off in the compatible facade).
    paste_matching_step: bool = True  # D1: background from the step's target level; the clean latents at the end
    per_image_mask_scale: bool = True  # D2: the clamp scalar is each image's own, not the batch's
    empty_mask_when_equal: bool = True  # D3: no text difference -> empty mask (and a warning), not 0/0 -> full
    honor_all_call_options: bool = True  # D4: pil masks; clip_skip (negatives too), LoRA scale: every call, text too
    portable_regularizer: bool = True  # D5: rolls drawn on the generator's device; v-pred with CFG; per-image loss
    pair_repeated_masks: bool = True  # D6: num_images_per_prompt repeats masks like prompts and latents
    slice_inverted_latents: bool = True  # D7: mismatched strength / steps use the matching inverted latents
    encode_image_once: bool = True  # D8: one VAE encode, n posterior draws (same numbers, n times cheaper)
    mask_without_guidance: bool = True  # D9: mask_guidance_scale <= 1 works; CFG on the mask is (uncond, cond)

    def __post_init__(self):
        for f in fields(self):  # numpy scalars (np.int64(4), np.float32(0.5)) as the Python numbers they equal
            value = getattr(self, f.name)
            if type(value) not in (int, float, bool) and (plain := plain_number(value)) is not value:
                object.__setattr__(self, f.name, plain)
        check_fields(self, _RULES, "DiffEditParams")
        for name, (lo, cap) in _CAPS.items():
            value = getattr(self, name)
            if value is not None and value > cap:
                raise ValueError(f"DiffEditParams.{name}: expected an int in [{lo}, {cap}]"
                                 f"{_CAP_REASONS.get(name, '')}, got {value!r}")
        if self.sampler != "ddim":
            for name, off, what in (("eta", 0, "DDIM's noise; DPM-Solver++ draws none"),
                                    ("num_reg_steps", 0, "the noise regularizer")):
                if getattr(self, name) != off:
                    raise ValueError(f"DiffEditParams.{name}: {name}={getattr(self, name)!r} ({what}) runs with "
                                     f"sampler='ddim' only; set {name}={off} or sampler='ddim' (sampler is "
                                     f"{self.sampler!r})")

    @classmethod
    def reference(cls, **overrides) -> DiffEditParams:
        """diffusers 0.42.1's behaviour: every correction off (then `overrides` applied)."""
        return cls(**{**{name: False for name in CORRECTIONS.values()}, **overrides})

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def updated(self, overrides: dict) -> DiffEditParams:
        """`replace` with a clear error naming every valid field when a name is unknown."""
        unknown = sorted(set(overrides) - set(self.field_names()))
        if unknown:
            raise TypeError(f"unknown DiffEdit parameter(s) {', '.join(unknown)}; valid names: "
                            f"{', '.join(self.field_names())}")
        return replace(self, **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_model(cls, model, **overrides) -> DiffEditParams:
        """What the one-call API and the command line run with `model` (a StableDiffusion): the defaults, under
        the model's stored editing defaults (its diffedit.json, `model.edit_defaults`), under `overrides`."""
        return layered(model.edit_defaults, overrides)


def plain_number(value):
    """A numpy scalar (or another `numbers.Integral` / `numbers.Real`) as the Python int / float it equals, so that
    later code sees Python numbers; anything else (bools and np.bool_ included) as it is."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


_RULES = {
    **{name: int_at_least(1) for name in ("num_maps_per_mask", "num_inference_steps", "num_auto_corr_rolls")},
    **{name: int_at_least(0) for name in ("num_reg_steps", "guidance_min_timestep")},
    **{name: number_in(0, 1) for name in ("mask_encode_strength", "inpaint_strength", "eta")},
    "mask_thresholding_ratio": POSITIVE,
    "mask_threshold_rule": one_of(THRESHOLD_RULES),
    "sampler": one_of(SAMPLERS),
    **{name: number_at_least(0) for name in ("mask_guidance_scale", "inversion_guidance_scale", "guidance_scale",
                                             "lambda_auto_corr", "lambda_kl")},
    "clip_skip": optional(int_at_least(0)),
    "lora_scale": (is_number, "a finite number"),
    **{name: BOOL for name in CORRECTIONS.values()},
}
# Upper bounds of the int fields, checked after _RULES (which says the type and the lower bound)
_CAPS = {"num_maps_per_mask": (1, MAX_NUM_MAPS), "num_inference_steps": (1, MAX_INT),
         "num_auto_corr_rolls": (1, MAX_INT), "num_reg_steps": (0, MAX_INT), "guidance_min_timestep": (0, MAX_INT),
         "clip_skip": (0, MAX_INT)}
_CAP_REASONS = {"num_maps_per_mask": " (noise draws averaged per mask: the time grows with the count, the average "
                                     "changes little past the cap)",
                "guidance_min_timestep": " (a model's num_train_timesteps, usually 1000, already guides no step)"}


# Named settings between a model's stored defaults and explicit overrides (`--preset NAME`, `preset=` in the API).
# "fast": 15 sampler steps, chosen on the shipped model with `diffedit evaluate` (README, "The fast preset": every
# goal held over 900 held-out edits in about 0.7x the time of its 25 steps; DPM-Solver++ at 15 steps and fewer noise
# draws for the mask lost edits).
# The fields only step 1 reads: with a mask given instead of estimated, setting one of them has no effect.
MASK_STEP_FIELDS = ("num_maps_per_mask", "mask_encode_strength", "mask_thresholding_ratio", "mask_guidance_scale",
                    "mask_threshold_rule", "per_image_mask_scale", "empty_mask_when_equal", "encode_image_once",
                    "mask_without_guidance")

PRESETS = {"fast": {"num_inference_steps": 15}}


def with_preset(name: str | None, overrides: dict) -> dict:
    """`overrides` over the fields of preset `name` (nothing for None): layered over a model's stored defaults,
    what runs is the defaults, under the preset, under the overrides. An unknown name is a ValueError."""
    if name is None:
        return dict(overrides)
    if not isinstance(name, str):
        raise TypeError(f"preset: expected a preset name (a string) or None, got {type(name).__name__}")
    if name not in PRESETS:
        raise ValueError(f"preset {name!r}: choose from {', '.join(PRESETS)}")
    return {**PRESETS[name], **overrides}


EDIT_DEFAULTS_FILE = "diffedit.json"  # editing defaults stored in a model folder (the shipped model has them)


def read_edit_defaults(folder: Path) -> dict:
    """A model folder's stored editing defaults (its diffedit.json: DiffEditParams fields), {} when it has none.
    Torch-free, so the command line reads them before loading the model."""
    path = Path(folder) / EDIT_DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        defaults = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: expected an object of DiffEditParams fields, got {type(defaults).__name__}")
    return defaults


def layered(edit_defaults: dict, overrides: dict) -> DiffEditParams:
    """DiffEditParams() under a model's stored editing defaults (its diffedit.json), under explicit overrides:
    what the one-call API and the command line run."""
    try:
        base = DiffEditParams().updated(dict(edit_defaults))
    except (TypeError, ValueError) as e:
        raise ValueError(f"the model's stored edit defaults (diffedit.json) are invalid: {e}") from None
    return base.updated(overrides)


def least_strength(num_inference_steps: int) -> float:
    """A short decimal, within 0.1% above 1 / N, that runs one step: int(N * s) >= 1. 1 / N itself can miss in
    floating point (int(49 * (1 / 49)) = 0), and so can its 6-digit form (int(3 * 0.333333) = 0)."""
    N = num_inference_steps
    for digits in range(1, 18):
        s = -(-10**digits // N) / 10**digits  # 1 / N rounded up at `digits` decimals
        if int(N * s) >= 1 and s <= 1.001 / N:
            return s
    return 1.0  # not reached for N >= 1

"""The safety checker as diffusers' Stable Diffusion pipelines use it: loaded from `safety_checker/` and
`feature_extractor/` when model_index.json names them, run on decoded pictures (`run_safety_checker`).

The decoded pixels (B, 3, H, W) in [-1, 1] are turned into uint8 PIL pictures, prepared by the model's CLIP image
processor and scored by its `StableDiffusionSafetyChecker`; flagged pictures come back as zeros, which the output
conversion then leaves black (`image_tensors.to_output`'s `do_denormalize`). A model without a checker (the
shipped one) gives the pixels back and no flags (None).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import image_tensors
from .models.config import SafetyCheckerConfig
from .models.image_processor import CONFIG_FILE, PROCESSOR_TYPES, CLIPImageProcessor
from .models.safety_checker import StableDiffusionSafetyChecker
from .models.weights import component_weights, load_state
from .validation import ConfigError

if TYPE_CHECKING:
    from .stable_diffusion import StableDiffusion

SAFETY_CHECKER = "safety_checker"
FEATURE_EXTRACTOR = "feature_extractor"
SAFETY_CHECKER_CLASSES = (["stable_diffusion", "StableDiffusionSafetyChecker"],)
# One processor under its three transformers names (CLIPImageProcessorPil: transformers 5's name without torchvision)
FEATURE_EXTRACTOR_CLASSES = tuple(["transformers", name] for name in PROCESSOR_TYPES)
# diffusers' pipelines warn when no checker is loaded but `requires_safety_checker` is true, set so or absent (its
# default); the line says which
NO_CHECKER_WARNING = ("{source} has no safety checker but {requires} (diffusers warns the same): keep the filter on "
                      "for anything public, as the Stable Diffusion license asks, or set requires_safety_checker to "
                      "false in model_index.json to say it is off on purpose")
REQUIRES_SET = "its model_index.json sets requires_safety_checker to true"
REQUIRES_DEFAULT = "its model_index.json does not set requires_safety_checker, so diffusers' default, true, applies"


def run_safety_checker(sd: StableDiffusion, pixels: torch.Tensor) -> tuple[torch.Tensor, list[bool] | None]:
    """(pixels with flagged pictures zeroed, one flag per picture), or (pixels, None) without a checker."""
    if sd.safety_checker is None:
        return pixels, None
    clip_input = sd.feature_extractor(image_tensors.to_output(pixels, "pil"))  # (B, 3, S, S) float32
    checker = sd.safety_checker
    return checker(clip_input.to(device=checker.device, dtype=checker.dtype), pixels)


def names_component(index: dict, name: str, allowed: tuple[list[str], ...]) -> bool:
    """Whether model_index.json names the optional component `name`: absent, null or [null, null] mean none; a
    class we do not implement is a ConfigError."""
    entry = index.get(name)
    if entry is None or entry == [None, None]:
        return False
    if entry not in allowed:
        raise ConfigError(f"model_index.json: unsupported {name} {entry!r} (supported: "
                          f"{' or '.join(map(str, allowed))}, or [null, null] for none)")
    return True


def load_safety_components(folder: Path, index: dict, source: str, device: torch.device | str, dtype: torch.dtype,
                           variant: str | None = None
                           ) -> tuple[StableDiffusionSafetyChecker | None, CLIPImageProcessor | None]:
    """The checker and its image processor named by model_index.json (each None when not named), on `device` in
    `dtype`; diffusers' warning when none is named but `requires_safety_checker` (true when absent, as diffusers'
    default) asks for one. Every way the folders are broken is one ConfigError / WeightsError line."""
    has_checker = names_component(index, SAFETY_CHECKER, SAFETY_CHECKER_CLASSES)
    has_processor = names_component(index, FEATURE_EXTRACTOR, FEATURE_EXTRACTOR_CLASSES)
    requires = index.get("requires_safety_checker", True)  # diffusers' default
    if not isinstance(requires, bool):
        raise ConfigError(f"model_index.json: requires_safety_checker={requires!r} must be true or false")
    if has_checker and not has_processor:
        raise ConfigError("model_index.json names a safety_checker but no feature_extractor, which the checker needs "
                          "to prepare pictures: add feature_extractor/, or set safety_checker to [null, null]")
    # Without a checker the image processor has no use: a folder that names one but lacks it (SD 2.x repos fetched
    # before these folders were downloaded) still loads.
    has_processor = has_processor and (has_checker or (folder / FEATURE_EXTRACTOR).is_dir())
    for name, present in ((SAFETY_CHECKER, has_checker), (FEATURE_EXTRACTOR, has_processor)):
        if present and not (folder / name).is_dir():
            raise ConfigError(f"model_index.json names a {name} but {folder} has no {name}/ folder: fetch the "
                              f"model again, or set safety_checker to [null, null] in model_index.json to run "
                              "without a safety checker")
    if not has_checker and requires:
        said = REQUIRES_SET if "requires_safety_checker" in index else REQUIRES_DEFAULT
        warnings.warn(NO_CHECKER_WARNING.format(source=source, requires=said), stacklevel=3)
    processor = CLIPImageProcessor.from_folder(folder / FEATURE_EXTRACTOR) if has_processor else None
    if not has_checker:
        return None, processor
    config = checker_config(folder / SAFETY_CHECKER / "config.json")
    if processor.config.output_size != (config.vision.image_size,) * 2:
        raise ConfigError(f"{FEATURE_EXTRACTOR}/{CONFIG_FILE} makes {processor.config.output_size} pictures but the "
                          f"safety checker takes {config.vision.image_size}x{config.vision.image_size}: the two "
                          "folders are from different models")
    with torch.device("meta"):
        checker = StableDiffusionSafetyChecker(config)
    state = component_weights(folder / SAFETY_CHECKER, "transformers", variant)
    checker = load_state(checker, state, f"{SAFETY_CHECKER}/", device, dtype)
    return checker.eval().requires_grad_(False), processor


def checker_config(path: Path) -> SafetyCheckerConfig:
    """The checker's config.json; an empty one (0 bytes, only whitespace, or {}) is named as the fault, not
    read as transformers' defaults (whose 224x224 tower then fails a later check that blames another file)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        text = None  # `from_file` names what is wrong
    if text is not None:
        fix = ("fetch the model again (a download may not have finished), or set safety_checker to [null, null] in "
               "model_index.json to run without a safety checker")
        if not text.strip():
            what = "is empty (0 bytes)" if not text else "holds only whitespace"
            raise ConfigError(f"config file {path} {what}: it must describe the safety checker (its vision_config); "
                              f"{fix}")
        try:
            empty = json.loads(text) == {}
        except json.JSONDecodeError:
            empty = False  # `from_file` names it
        if empty:
            raise ConfigError(f"config file {path} is an empty JSON object ({{}}): it must describe the safety "
                              f"checker (its vision_config); {fix}")
    return SafetyCheckerConfig.from_file(path)

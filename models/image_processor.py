"""The CLIP image processor that prepares pictures for the safety checker (transformers' `CLIPImageProcessor`,
read from `feature_extractor/preprocessor_config.json`): resize (shortest edge, Pillow's resampling filter),
center crop, rescale to [0, 1], normalize with the CLIP mean and std.

Pillow and numpy, step for step as transformers' Pillow backend (the one it uses without torchvision, and the only
one of its older releases): the resize is Pillow's `Image.resize` on the uint8 picture, the rescale multiplies in
float64 and stores float32, the normalization runs in float32. transformers' torchvision backend resizes with
torch's antialiased bicubic instead, which differs by a few 1/255 steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..validation import ConfigError, check_keys
from .config import load_json_object

CONFIG_FILE = "preprocessor_config.json"
PROCESSOR_TYPES = ("CLIPImageProcessor", "CLIPFeatureExtractor", "CLIPImageProcessorPil")  # one processor, 3 names
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_IGNORED = {"processor_class"}


@dataclass(frozen=True)
class ImageProcessorConfig:
    do_resize: bool = True
    shortest_edge: int | None = 224  # resize the shorter side to this, keeping the aspect ratio ...
    resize_to: tuple[int, int] | None = None  # ... or to this (height, width)
    resample: int = PIL.Image.Resampling.BICUBIC
    do_center_crop: bool = True
    crop_size: tuple[int, int] = (224, 224)  # (height, width)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = _OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = _OPENAI_CLIP_STD

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every processed picture, when the config fixes it."""
        return self.crop_size if self.do_center_crop else self.resize_to if self.do_resize else None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ImageProcessorConfig":
        kind = raw.get("image_processor_type", raw.get("feature_extractor_type", "CLIPImageProcessor"))
        if kind not in PROCESSOR_TYPES:
            raise ConfigError(f"feature_extractor config: unsupported processor {kind!r} (supported: "
                              f"{PROCESSOR_TYPES[0]})")
        read = {"do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                "do_normalize", "image_mean", "image_std", "image_processor_type", "feature_extractor_type"}
        check_keys("feature_extractor", raw, read, _IGNORED, {"do_convert_rgb": (True, None)})
        shortest, resize_to = _size(raw.get("size", {"shortest_edge": 224}))
        resample = raw.get("resample", PIL.Image.Resampling.BICUBIC)
        if resample not in {int(r) for r in PIL.Image.Resampling}:
            raise ConfigError(f"feature_extractor config: unsupported value resample={resample!r} (a Pillow filter "
                              "number 0-5)")
        return cls(
            do_resize=_flag(raw, "do_resize"), shortest_edge=shortest, resize_to=resize_to, resample=int(resample),
            do_center_crop=_flag(raw, "do_center_crop"), crop_size=_crop(raw.get("crop_size", 224)),
            do_rescale=_flag(raw, "do_rescale"), rescale_factor=_number(raw, "rescale_factor", 1 / 255),
            do_normalize=_flag(raw, "do_normalize"),
            image_mean=_triple(raw, "image_mean", _OPENAI_CLIP_MEAN), image_std=_triple(raw, "image_std",
                                                                                       _OPENAI_CLIP_STD))

    @classmethod
    def from_file(cls, path: str | Path) -> "ImageProcessorConfig":
        path = Path(path)
        path = path / CONFIG_FILE if path.is_dir() else path
        raw = load_json_object(path)
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


def _flag(raw: dict, name: str) -> bool:
    value = raw.get(name, True)
    if not isinstance(value, bool):
        raise ConfigError(f"feature_extractor config: {name}={value!r} must be true or false")
    return value


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(raw: dict, name: str, default: float) -> float:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"feature_extractor config: {name}={value!r} must be a positive number")
    return float(value)


def _triple(raw: dict, name: str, default: tuple) -> tuple[float, float, float]:
    value = raw.get(name, default)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise ConfigError(f"feature_extractor config: {name}={value!r} must be three numbers (one per RGB channel)")
    if name == "image_std" and min(value) <= 0:
        raise ConfigError(f"feature_extractor config: {name}={value!r} must be positive")
    return tuple(float(v) for v in value)


def _size(value: Any) -> tuple[int | None, tuple[int, int] | None]:
    """transformers' `size`: an int or {"shortest_edge": n} (shorter side, aspect kept) or {"height", "width"}."""
    if _positive_int(value):
        return value, None
    if isinstance(value, dict) and set(value) == {"shortest_edge"} and _positive_int(value["shortest_edge"]):
        return value["shortest_edge"], None
    if isinstance(value, dict) and set(value) == {"height", "width"} and all(map(_positive_int, value.values())):
        return None, (value["height"], value["width"])
    raise ConfigError(f"feature_extractor config: unsupported size={value!r} (supported: {{\"shortest_edge\": n}} "
                      "or {\"height\": h, \"width\": w})")


def _crop(value: Any) -> tuple[int, int]:
    if _positive_int(value):
        return value, value
    if isinstance(value, dict) and set(value) == {"height", "width"} and all(map(_positive_int, value.values())):
        return value["height"], value["width"]
    raise ConfigError(f"feature_extractor config: unsupported crop_size={value!r} (supported: n or "
                      "{\"height\": h, \"width\": w})")


def _shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the shorter side `size` and the longer one scaled and truncated, as torchvision's and
    transformers' `get_resize_output_image_size`."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def _center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, H, W) -> (C, height, width) around the centre; a picture smaller than the crop is padded with zeros
    first (centred, the extra pixel after), as transformers' `center_crop`."""
    c, h, w = image.shape
    if h < height or w < width:
        big_h, big_w = max(h, height), max(w, width)
        padded = np.zeros((c, big_h, big_w), dtype=image.dtype)
        top, left = math.ceil((big_h - h) / 2), math.ceil((big_w - w) / 2)
        padded[:, top:top + h, left:left + w] = image
        image, h, w = padded, big_h, big_w
    top, left = (h - height) // 2, (w - width) // 2
    return image[:, top:top + height, left:left + width]


class CLIPImageProcessor:
    """RGB pictures -> `pixel_values` (B, 3, height, width) float32, the safety checker's input."""

    def __init__(self, config: ImageProcessorConfig):
        self.config = config

    @classmethod
    def from_folder(cls, folder: str | Path) -> "CLIPImageProcessor":
        return cls(ImageProcessorConfig.from_file(Path(folder) / CONFIG_FILE))

    def preprocess(self, picture: PIL.Image.Image) -> np.ndarray:
        """One picture -> (3, height, width) float32."""
        c = self.config
        picture = picture.convert("RGB")
        if c.do_resize:
            size = c.resize_to or _shortest_edge_size(picture.height, picture.width, c.shortest_edge)
            picture = picture.resize((size[1], size[0]), resample=c.resample)
        image = np.asarray(picture).transpose(2, 0, 1)  # (3, H, W) uint8
        if c.do_center_crop:
            image = _center_crop(image, *c.crop_size)
        image = (image.astype(np.float64) * c.rescale_factor if c.do_rescale else image).astype(np.float32)
        if c.do_normalize:
            mean, std = (np.asarray(v, dtype=np.float32)[:, None, None] for v in (c.image_mean, c.image_std))
            image = (image - mean) / std
        return image

    def __call__(self, pictures: list[PIL.Image.Image]) -> torch.Tensor:
        """PIL pictures -> (B, 3, height, width) float32; all must come out the same size."""
        arrays = [self.preprocess(p) for p in pictures]
        if len({a.shape for a in arrays}) != 1:
            raise ValueError(f"the processed pictures differ in size {sorted({a.shape for a in arrays})}: set "
                             "crop_size, or resize to a fixed height and width")
        return torch.from_numpy(np.stack(arrays))

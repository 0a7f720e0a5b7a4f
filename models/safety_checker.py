"""The Stable Diffusion safety checker (diffusers' `StableDiffusionSafetyChecker`): a picture is flagged when its
CLIP image embedding is close enough to one of 17 concept embeddings.

Scoring, per picture, exactly as diffusers 0.42.1 does it (numpy float32, scores rounded to 3 decimals):
- cosine similarity of the projected image embedding with each of the 3 "special care" embeddings and each of the
  17 concept embeddings;
- special scores, in order: round(cos - threshold + adjustment, 3), with adjustment 0.0 until a special score is
  > 0, and 0.01 from then on (so it already raises the later special scores of the same picture);
- concept scores: round(cos - threshold + adjustment, 3); the picture is flagged when any concept score is > 0.
A score that is positive before rounding but below 0.0005 rounds to 0.0 and does not flag (diffusers' ONNX variant,
which does not round, would).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .clip_vision import CLIPVisionModel
from .config import SafetyCheckerConfig

NUM_CONCEPTS = 17
NUM_SPECIAL_CARE = 3
SPECIAL_CARE_ADJUSTMENT = 0.01  # added to every later score of a picture once one special-care score is > 0
SCORE_DECIMALS = 3
FLAGGED_WARNING = ("Potential NSFW content was detected in one or more images. A black image will be returned "
                   "instead. Try again with a different prompt and/or seed.")


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, P), (K, P) -> (B, K): cosine of every row of `a` with every row of `b`."""
    return F.normalize(a) @ F.normalize(b).t()


def flag_scores(special_cos: np.ndarray, special_thresholds: list[float], concept_cos: np.ndarray,
                concept_thresholds: list[float]) -> list[bool]:
    """The decision rule of the module docstring. Cosines are float32 arrays (B, 3) and (B, 17), thresholds python
    floats: the operand types diffusers uses, so the arithmetic (float32 under numpy 2, whose python floats are
    weak) and the rounding are the same as its own, under any numpy version."""
    flags = []
    for special, concept in zip(special_cos, concept_cos):
        adjustment = 0.0
        for cos, threshold in zip(special, special_thresholds):
            if round(cos - threshold + adjustment, SCORE_DECIMALS) > 0:
                adjustment = SPECIAL_CARE_ADJUSTMENT
        flags.append(any(round(cos - threshold + adjustment, SCORE_DECIMALS) > 0
                         for cos, threshold in zip(concept, concept_thresholds)))
    return flags


class StableDiffusionSafetyChecker(nn.Module):
    """CLIP vision tower, a projection without bias, and the concept embeddings with their thresholds ("weights").
    Attribute names are the checkpoint's keys."""

    def __init__(self, config: SafetyCheckerConfig):
        super().__init__()
        self.config = config
        p = config.projection_dim
        self.vision_model = CLIPVisionModel(config.vision)
        self.visual_projection = nn.Linear(config.vision.hidden_size, p, bias=False)
        self.concept_embeds = nn.Parameter(torch.ones(NUM_CONCEPTS, p), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(NUM_SPECIAL_CARE, p), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.ones(NUM_CONCEPTS), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.ones(NUM_SPECIAL_CARE), requires_grad=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual_projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.visual_projection.weight.device

    def image_embeds(self, clip_input: torch.Tensor) -> torch.Tensor:
        """Processed pixels (B, 3, S, S) -> projected image embeddings (B, projection_dim)."""
        return self.visual_projection(self.vision_model(clip_input))

    @torch.no_grad()
    def has_nsfw_concepts(self, clip_input: torch.Tensor) -> list[bool]:
        """One flag per picture (the module docstring's rule); cosines cast to float32 on the CPU, as diffusers."""
        embeds = self.image_embeds(clip_input)  # (B, P)
        as_numpy = lambda t: t.detach().cpu().float().numpy()
        return flag_scores(as_numpy(cosine_similarity(embeds, self.special_care_embeds)),
                           self.special_care_embeds_weights.tolist(),
                           as_numpy(cosine_similarity(embeds, self.concept_embeds)),
                           self.concept_embeds_weights.tolist())

    @torch.no_grad()
    def forward(self, clip_input: torch.Tensor, images: torch.Tensor | np.ndarray
                ) -> tuple[torch.Tensor | np.ndarray, list[bool]]:
        """diffusers' forward: `images` (B, ...), a tensor or a numpy array as diffusers takes, with flagged ones
        replaced by zeros (a new one; the input is left alone), the flags, and diffusers' warning when any picture is
        flagged. The arguments are checked before the checker runs."""
        if not isinstance(images, (torch.Tensor, np.ndarray)) or images.ndim == 0:
            raise TypeError(f"images must be a tensor or a numpy array of pictures (B, ...), got "
                            f"{type(images).__name__}{'' if getattr(images, 'ndim', 1) else ' with no batch axis'}")
        if not isinstance(clip_input, torch.Tensor) or clip_input.ndim != 4:
            raise TypeError(f"clip_input must be a tensor (B, 3, S, S) of processed pictures, got "
                            f"{type(clip_input).__name__}{tuple(getattr(clip_input, 'shape', ()))}")
        if clip_input.shape[0] != images.shape[0]:
            raise ValueError(f"clip_input has {clip_input.shape[0]} pictures but images has {images.shape[0]}")
        flags = self.has_nsfw_concepts(clip_input)
        keep = np.array([not f for f in flags]).reshape(-1, *[1] * (images.ndim - 1))
        if any(flags):
            warnings.warn(FLAGGED_WARNING, stacklevel=2)
        if isinstance(images, np.ndarray):
            return np.where(keep, images, np.zeros_like(images)), flags
        return torch.where(torch.from_numpy(keep).to(images.device), images, torch.zeros_like(images)), flags

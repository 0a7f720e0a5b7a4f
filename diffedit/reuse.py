"""Work shared between the settings of an experiment, without changing a number.

A grid of settings repeats work: settings that differ only in how the map is thresholded need one difference map,
and settings that differ only in the decoding need one inversion (an encoding ratio sweep needs one, to the largest
r: the DDIM encoding to a smaller r runs the first steps of the same loop). `SharedSteps` runs DiffEdit's steps as
`method` does and remembers each result under

- the model it ran on, with its LoRA adapters as they run and its VAE options (a LoRA loaded, weighted or
  disabled between two calls makes the second one run),
- the content of its inputs (the image, the texts' embeddings),
- the `DiffEditParams` fields the step reads (`MASK_FIELDS`, `INVERSION_FIELDS`; tests/test_reuse.py changes every
  other field and checks the result does not move),
- the state of each random generator on entry.

A repeat returns the remembered result and leaves each generator in the state the step left it in, so every later
draw (the inversion's posterior sample after the mask step, the decoding's eta noise) is what a fresh run draws:
rows computed with sharing equal rows computed alone, bit for bit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from . import method
from .method import Generator, Inversion, MaskEstimate, TextEmbeddings
from .params import DiffEditParams
from .stable_diffusion import StableDiffusion

# What `method.estimate_mask` reads before `method.threshold_map` (whose fields, THRESHOLD_FIELDS, only cut the map);
# not encode_image_once (D8), which changes the cost only: each repeat's encode is of the same B pictures, so the
# same numbers
MASK_FIELDS = ("num_inference_steps", "num_maps_per_mask", "mask_encode_strength", "mask_guidance_scale",
               "mask_without_guidance", "sampler", "lora_scale")
THRESHOLD_FIELDS = ("mask_thresholding_ratio", "mask_threshold_rule", "per_image_mask_scale", "empty_mask_when_equal")
# What `method.invert` reads, besides inpaint_strength (how far it runs)
INVERSION_FIELDS = ("num_inference_steps", "inversion_guidance_scale", "num_reg_steps", "lambda_auto_corr",
                    "lambda_kl", "num_auto_corr_rolls", "portable_regularizer", "sampler", "lora_scale")


class Steps:
    """DiffEdit's three steps as the methods of `baselines` run them: `method`'s functions, nothing remembered."""

    estimate_mask = staticmethod(method.estimate_mask)
    invert = staticmethod(method.invert)
    decode = staticmethod(method.decode)


@dataclass
class _Done:
    value: object
    after: list[torch.Tensor]  # each generator's state when the step finished (torch.Generator.get_state)


class SharedSteps(Steps):
    """`Steps` that remember the mask step's difference map and the inversion (see the module's docstring).

    `deepest_strength`: the largest encoding ratio the caller will ask for; the first inversion runs that far, and
    later ones with a smaller r are its last steps. Only without the noise regularizer, whose random rolls make
    the generator's state after the loop depend on r; with it, each r inverts on its own.

    `limit`: the most results remembered (maps and inversions together), the least recently used forgotten first;
    None: all (an experiment's grid is finite; a long-running server's is not)."""

    def __init__(self, deepest_strength: float | None = None, limit: int | None = None):
        if limit is not None and limit < 1:
            raise ValueError(f"limit: expected None or at least 1 result, got {limit}")
        self.deepest_strength = deepest_strength
        self.limit = limit
        self.done: dict[tuple, _Done] = {}  # least recently used first
        self.hits = {"mask": 0, "inversion": 0}
        self.models: dict[int, StableDiffusion] = {}  # the models results were computed with, by id

    def estimate_mask(self, sd: StableDiffusion, image: torch.Tensor, source: TextEmbeddings,
                      target: TextEmbeddings, params: DiffEditParams, generator: Generator = None) -> MaskEstimate:
        key = ("mask", self._model(sd), content_digest(image, source.cond, source.uncond, target.cond, target.uncond),
               _fields(params, MASK_FIELDS), _states(generator))
        if key in self.done:
            self.hits["mask"] += 1
            difference = self._recall(key, generator)
        else:
            difference = method.estimate_mask(sd, image, source, target, params, generator).difference
            self._remember(key, difference, generator)
        return method.threshold_map(difference, params)

    def invert(self, sd: StableDiffusion, image: torch.Tensor, text: TextEmbeddings, params: DiffEditParams,
               generator: Generator = None, callback: method.StepCallback | None = None) -> Inversion:
        if callback is not None:  # a caller watching the steps gets them run
            return method.invert(sd, image, text, params, generator, callback)
        deepest = params.inpaint_strength
        if params.num_reg_steps == 0 and self.deepest_strength is not None:
            deepest = max(deepest, self.deepest_strength)
        key = ("inversion", self._model(sd), content_digest(image, text.cond, text.uncond),
               _fields(params, INVERSION_FIELDS), deepest, _states(generator))
        if key in self.done:
            self.hits["inversion"] += 1
            inversion = self._recall(key, generator)
        else:
            inversion = method.invert(sd, image, text, _replace_strength(params, deepest), generator)
            self._remember(key, inversion, generator)
        n = len(method.strength_timesteps(sd.scheduler, params.num_inference_steps, params.inpaint_strength,
                                          "inpaint_strength"))
        return Inversion(inversion.latents[:, -n:], inversion.timesteps[-n:], inversion.clean)  # the r-inversion

    def _model(self, sd: StableDiffusion) -> tuple:
        """What of the model a result depends on besides the inputs: which model (held, so its id is never reused
        while remembered), its LoRA adapters as they run (`LoraAdapters.record`: active weights, fused ones), and
        the VAE options that change the encoded latents."""
        self.models[id(sd)] = sd
        return id(sd), repr(sd.lora.record()), sd.vae_tiling, sd.vae_slicing

    def _remember(self, key: tuple, value, generator: Generator) -> None:
        self.done[key] = _Done(value, [g.get_state() for g in _generators(generator)])
        while self.limit is not None and len(self.done) > self.limit:
            del self.done[next(iter(self.done))]

    def _recall(self, key: tuple, generator: Generator):
        done = self.done[key] = self.done.pop(key)  # now the most recently used
        for g, state in zip(_generators(generator), done.after):
            g.set_state(state)
        return done.value


def _replace_strength(params: DiffEditParams, strength: float) -> DiffEditParams:
    return params if strength == params.inpaint_strength else params.updated({"inpaint_strength": strength})


def _fields(params: DiffEditParams, names: tuple[str, ...]) -> tuple:
    return tuple(getattr(params, name) for name in names)


def _generators(generator: Generator) -> list[torch.Generator]:
    if generator is None:
        return []
    return list(generator) if isinstance(generator, list) else [generator]


def _states(generator: Generator) -> tuple:
    """Each generator's state as bytes, for a key. No generator (torch's global one) cannot be restored, so it is
    never a repeat."""
    if generator is None:
        return (object(),)  # unique: never equal to a later call's
    return tuple(g.get_state().numpy().tobytes() for g in _generators(generator))


def content_digest(*tensors: torch.Tensor | None) -> str:
    """A sha1 of the tensors' shapes, dtypes, devices and bytes (None counts as a value): equal digests, equal
    inputs."""
    digest = hashlib.sha1()
    for t in tensors:
        if t is None:
            digest.update(b"none")
        else:
            digest.update(str((tuple(t.shape), t.dtype, t.device)).encode())
            digest.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

"""One call: `edit(image, source, target)` runs DiffEdit with every correction on and returns an `EditResult`.

`edit_targets` does several targets for one image with one inversion (the source side) and one mask per target;
both run `edit_each` (the command line does too), which composes `method.estimate_mask`, `method.invert` and
`method.decode`; these take a loaded model and `DiffEditParams` for finer control.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from . import image_tensors
from . import method
from .locations import model_location
from .params import MASK_STEP_FIELDS, DiffEditParams, with_preset
from .safety import run_safety_checker
from .stable_diffusion import StableDiffusion, checked_device, checked_dtype, same_device
from .validation import one_line, shorten


@dataclass(frozen=True)
class EditResult:
    image: PIL.Image.Image  # the edited image, RGB, at the input's size
    mask: PIL.Image.Image  # "L" at the input's size, white (255) where edited
    guidance_map: np.ndarray | None  # (h, w) float32 in [0, 1] at latent resolution: the map the mask was cut
    # from (None when the mask was given)
    latent_mask: np.ndarray  # (h, w) bool at latent resolution: the mask the decoding used
    params: DiffEditParams  # what was run (model defaults and explicit parameters applied)
    seed: int


def pick_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Names as the command line takes them -> (device, dtype). "auto": cuda, then mps, then cpu; float16 on a
    GPU, float32 on the CPU. A GPU that is not there is a ValueError naming the choices."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA device is available (use cpu or auto)")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device mps: no Apple GPU is available (use cpu or auto)")
    elif device not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r}: expected auto, cpu, cuda or mps")
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "float16"
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype {dtype!r}: expected auto, float32, float16 or bfloat16")
    return torch.device(device), getattr(torch, dtype)


def load_model(model: StableDiffusion | str | os.PathLike | None = None, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None) -> StableDiffusion:
    """None: the model shipped with the package; a folder or hub repo id: loaded; a single-file .safetensors
    checkpoint: loaded with the official configs it matches (`StableDiffusion.from_single_file` takes a config
    folder); a StableDiffusion: as is (a `device` or `dtype` it does not have is an error, not ignored).
    device: "cpu" (the default), "cuda", "cuda:1", "mps" or a torch.device; dtype: torch.float32 (the default),
    float16 or bfloat16, or its name."""
    # None: not asked (a loaded model keeps its own), else checked as from_pretrained checks them
    where = None if device is None else checked_device(device)
    kind = None if dtype is None else checked_dtype(dtype)
    if isinstance(model, StableDiffusion):
        wrong = [f"{name} {want} (it has {have})" for name, want, have in
                 (("device", where, model.device), ("dtype", kind, model.dtype))
                 if want is not None and want != have and not (name == "device" and same_device(want, have))]
        if wrong:
            raise ValueError(f"model is already loaded; it cannot be given {' or '.join(wrong)}: load it again "
                             "with those, or drop device= / dtype=")
        return model
    if model is None or isinstance(model, (str, os.PathLike)):
        location = model_location(model)
        where, kind = where or torch.device("cpu"), kind or torch.float32
        if isinstance(location, Path) and location.is_file():
            return StableDiffusion.from_single_file(location, device=where, dtype=kind)
        return StableDiffusion.from_pretrained(location, device=where, dtype=kind)
    raise TypeError(f"model must be None, a folder or hub repo id, or a StableDiffusion; got {type(model).__name__}")


def prompt_text(sd: StableDiffusion, prompt: str, p: DiffEditParams) -> method.TextEmbeddings:
    """One prompt with the empty negative prompt, both through `clip_skip` (defect D4's fix) and at the LoRA
    scale."""
    return method.encode_text(sd, [prompt], [""], clip_skip=p.clip_skip, negative_clip_skip=p.clip_skip,
                              lora_scale=p.lora_scale)


def prompt_warnings(sd: StableDiffusion, named: list[tuple[str, str]]) -> list[str]:
    """What is odd about each (label, prompt): more tokens than the text encoder reads (and from about which word
    on they are dropped), or an empty target (a label starting with "--target" or "target")."""
    tok = sd.tokenizer
    room = tok.model_max_length - 2
    messages = []
    for label, text in named:
        n = tok.num_tokens(text)
        if n > room:
            words = text.split()
            lo, hi = 0, len(words)  # the most words that fit
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if tok.num_tokens(" ".join(words[:mid])) <= room else (lo, mid - 1)
            messages.append(f"{label} has {n} tokens but the text encoder reads {room}: the last {n - room} are "
                            f"dropped (from about {shorten(' '.join(words[lo:]))})")
        if label.lstrip("-").startswith("target") and not text.strip():
            messages.append(empty_target(label))
    return messages


def empty_target(label: str) -> str:
    """The warning for an empty or blank target prompt, `label` naming it ("--target" on the command line,
    "target" or "targets[i]" in the API)."""
    return f"{label} is empty: the edit has no text to steer towards"


def empty_mask(given: PIL.Image.Image, rule: str, factor: int) -> str:
    """The warning for a given mask that edits no latent cell (the command line's for an empty --mask): the decoding
    then pastes the inverted latents everywhere, so the output is the input through the VAE."""
    if given.getextrema()[1] == 0:
        return "mask is empty: the output is the input, re-encoded"
    return (f"mask covers no latent cell by mask_rule={rule!r} (at least half of a cell's {factor}x{factor} pixels): "
            "the output is the input, re-encoded; mask_rule='any' edits every cell the mask touches")


def same_prompt(sd: StableDiffusion, source: str, target: str) -> bool:
    """Whether two prompts give the same token ids (so the same text embeddings: nothing to edit)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # over-long prompts: `prompt_warnings` says so
        return bool((sd.tokenizer(source) == sd.tokenizer(target)).all())


def size_notes(sd: StableDiffusion, size: tuple[int, int]) -> tuple[tuple[int, int], list[str]]:
    """The working size of a picture of `size` (sides rounded to a multiple of the VAE factor) and what is odd
    about it: not a multiple (outputs are restored to `size`), or far from the size the model was trained at."""
    f = sd.vae_scale_factor
    working = image_tensors.working_size(size, f)
    notes = []
    if working != size:
        notes.append(f"{size[0]}x{size[1]} is not a multiple of {f}: the model works at {working[0]}x{working[1]}, "
                     f"outputs are restored to {size[0]}x{size[1]}")
    native = sd.unet.config.sample_size * f
    if max(working) > 4 * native or max(working) * 4 < native:
        notes.append(f"the model was trained at {native}x{native}; {working[0]}x{working[1]} is far from it")
    return working, notes


def model_pixels(sd: StableDiffusion, picture: PIL.Image.Image) -> torch.Tensor:
    """An RGB picture of any size as the model's input: (1, 3, H, W) in [-1, 1], sides a multiple of the VAE factor."""
    return image_tensors.to_tensor(image_tensors.fit_to_multiple(picture, sd.vae_scale_factor), sd.vae_scale_factor)


def to_picture(sd: StableDiffusion, latents: torch.Tensor, size: tuple[int, int],
               source: torch.Tensor | None = None) -> PIL.Image.Image:
    """Decoded latents (1, C, h, w) as an RGB picture of `size` (the input's). A picture of one colour from a
    `source` (the input pixels) of several is an ImpossibleResultError: no edit erases a whole picture."""
    pixels = method.to_pixels(sd, latents)
    picture = image_tensors.to_output(pixels, "pil")[0]
    one_colour = all(lo == hi for lo, hi in picture.getextrema())
    if one_colour and source is not None and bool(source.amax() > source.amin()):
        raise method.ImpossibleResultError(f"the edit decoded to a picture of one colour "
                                           f"{picture.getpixel((0, 0))}: the model's weights or numbers are broken")
    if sd.safety_checker is not None:  # as diffusers: a flagged picture is black, and its warning says so
        _, flags = run_safety_checker(sd, pixels)
        if flags[0]:
            picture = PIL.Image.new("RGB", picture.size)
    return picture if picture.size == size else picture.resize(size, resample=PIL.Image.LANCZOS)


def edit(image, source: str, target: str, model: StableDiffusion | str | os.PathLike | None = None,
         seed: int | None = None, mask=None, mask_rule: str = "half", preset: str | None = None,
         **params) -> EditResult:
    """Edit `image` from the text `source` (what it shows; may be "") to `target`.

    image: a path, a PIL image, a numpy (H, W, 3) array or a torch (3, H, W) tensor, uint8 0-255 or floats in
    [0, 1] (`image_tensors.load_rgb`); model: None (the shipped model), a folder or hub repo id, or a loaded
    `StableDiffusion`; seed: None (a random one, returned in the result) or an int in [0, 2**63); mask: None (DiffEdit
    estimates it) or the region to edit at the image's size (a path, a PIL image, or an (H, W) array of bools /
    0-1 / 0-255: `image_tensors.load_mask`), put on the latent grid by `mask_rule` ("half" of a cell's pixels or
    "any": `image_tensors.latent_mask_from_image`; "any" without a mask is refused; a mask that covers no cell is
    warned about, as the command line warns); preset: None or a name in `params.PRESETS` ("fast"), whose
    fields go between the model's stored defaults and `params`; `params`: `DiffEditParams` fields. Every argument
    is checked before any work: a wrong type is a TypeError, a wrong value a ValueError, each naming the argument.
    An empty or blank target is warned about (a UserWarning), as the command line warns about --target."""
    _check_prompt(target, "target")
    return _edit(image, source, [target], model, seed, mask, mask_rule, preset, params, labels=["target"])[0]


def _check_prompt(text, name: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{name}: expected a string (a prompt; may be \"\"), got {type(text).__name__}")


def check_arguments(source, targets, seed, params: dict) -> None:
    """What `edit_targets` can check before it loads anything: prompt types, the seed, the parameters' names and
    values (against the paper's defaults; the model's own defaults are layered in after loading)."""
    _check_prompt(source, "source")
    if isinstance(targets, str) or not isinstance(targets, (list, tuple)):
        raise TypeError(f"targets: expected a list of strings (use edit() for one target), got "
                        f"{type(targets).__name__}")
    if not targets:
        raise ValueError("targets: expected at least one target prompt, got none")
    for i, target in enumerate(targets):
        _check_prompt(target, f"targets[{i}]")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not 0 <= seed < 2**63):
        raise ValueError(f"seed: expected None or an int in [0, 2**63), got {seed!r}")
    DiffEditParams().updated(params)


def check_params_for_model(sd: StableDiffusion, p: DiffEditParams,
                           uses: tuple[str, ...] = ("mask", "invert", "decode")) -> None:
    """The parameters that depend on the model, checked before any work: the step count fits its schedules,
    `clip_skip` its text encoder's depth, `guidance_min_timestep` its schedule's length, and the strength of each
    step in `uses` runs at least one step."""
    layers = len(sd.text_encoder.encoder.layers)
    if p.clip_skip is not None and p.clip_skip > layers:
        raise ValueError(f"clip_skip={p.clip_skip} is past the model's text encoder, which has {layers} layers: "
                         f"give None or 0 .. {layers} ({layers}: its token embeddings, normalized)")
    train_steps = sd.scheduler.config.num_train_timesteps
    if p.guidance_min_timestep > train_steps:
        raise ValueError(f"guidance_min_timestep={p.guidance_min_timestep} is past the model's schedule: give 0 .. "
                         f"{train_steps} (its num_train_timesteps; {train_steps} already guides no step, 0 guides "
                         "every step)")
    schedule = method.schedule(sd, p)  # DPM-Solver++ refuses the config's settings it does not run, here
    try:
        for scheduler in (sd.scheduler, sd.inverse_scheduler, schedule):
            scheduler.timesteps(p.num_inference_steps)
    except ValueError as e:
        raise ValueError(f"num_inference_steps={p.num_inference_steps} does not fit the model's schedule: "
                         f"{one_line(e)}") from None
    names = (["mask_encode_strength"] if "mask" in uses else []) + \
        (["inpaint_strength"] if {"invert", "decode"} & set(uses) else [])
    for name in names:
        method.strength_timesteps(schedule, p.num_inference_steps, getattr(p, name), name)


def edit_targets(image, source: str, targets: list[str], model: StableDiffusion | str | os.PathLike | None = None,
                 seed: int | None = None, mask=None, mask_rule: str = "half", preset: str | None = None,
                 **params) -> list[EditResult]:
    """`edit` for several targets: one inversion of the image, one mask (or the given one) and one decoding per
    target. The first result equals `edit(image, source, targets[0], ..., seed=seed)`."""
    return _edit(image, source, targets, model, seed, mask, mask_rule, preset, params)


def _edit(image, source: str, targets: list[str], model, seed: int | None, mask, mask_rule: str, preset: str | None,
          params: dict, labels: list[str] | None = None) -> list[EditResult]:
    """`edit_targets`' work; `labels` name the targets in warnings (`targets[i]` by default). Called by `edit` and
    `edit_targets` alike, so a warning points at the caller's line."""
    unused = [name for name in MASK_STEP_FIELDS if name in params] if mask is not None else []
    if unused:
        raise ValueError(f"{', '.join(unused)}: step 1's parameter(s), which do nothing when mask= is given; drop "
                         "them, or drop mask= to estimate the mask")
    params = with_preset(preset, params)
    check_arguments(source, targets, seed, params)
    if mask_rule not in image_tensors.MASK_CELL_RULES:
        raise ValueError(f"mask_rule: expected one of {image_tensors.MASK_CELL_RULES}, got {mask_rule!r}")
    if mask is None and mask_rule != "half":
        raise ValueError(f"mask_rule={mask_rule!r} puts a given mask on the latent grid, but no mask= is given (the "
                         "estimated mask is on that grid already): drop mask_rule, or give mask=")
    picture = image_tensors.load_rgb(image)
    size = picture.size
    given = None if mask is None else image_tensors.load_mask(mask, size)
    sd = load_model(model)
    p = DiffEditParams.for_model(sd, **params)
    check_params_for_model(sd, p, uses=("invert", "decode") if given is not None else ("mask", "invert", "decode"))
    for i, target in enumerate(targets):
        if not target.strip():
            warnings.warn(empty_target(labels[i] if labels else f"targets[{i}]"), UserWarning, stacklevel=3)
    pixels = model_pixels(sd, picture)
    latent_mask = None if given is None else image_tensors.latent_mask_from_image(
        given, (pixels.shape[-1], pixels.shape[-2]), sd.vae_scale_factor, mask_rule)  # (h, w) bool
    if latent_mask is not None and not latent_mask.any():
        warnings.warn(empty_mask(given, mask_rule, sd.vae_scale_factor), UserWarning, stacklevel=3)
    seed = random.randrange(2**63) if seed is None else int(seed)
    generator = torch.Generator().manual_seed(seed)
    target_texts = [prompt_text(sd, target, p) for target in targets]
    return [EditResult(image=picture, mask=image_tensors.latent_mask_to_image(latent_mask, size),
                       guidance_map=guidance, latent_mask=latent_mask, params=p, seed=seed)
            for picture, latent_mask, guidance in edit_each(sd, pixels, size, prompt_text(sd, source, p),
                                                            target_texts, p, generator, latent_mask)]


Stage = Callable[[str, int], contextlib.AbstractContextManager]  # (step name, target index) -> context


@contextlib.contextmanager
def no_stage(name: str, index: int) -> Iterator[None]:
    yield None  # no step callback


def edit_each(sd: StableDiffusion, pixels: torch.Tensor, size: tuple[int, int],
              source: method.TextEmbeddings | None, targets: list[method.TextEmbeddings], p: DiffEditParams,
              generator: torch.Generator | None, mask: np.ndarray | None = None,
              inversion: method.Inversion | None = None, stage: Stage = no_stage
              ) -> Iterator[tuple[PIL.Image.Image, np.ndarray, np.ndarray | None]]:
    """DiffEdit's three steps (§3.2) for one image and each target in turn: yield (edited picture at `size`, latent
    mask (h, w) bool, guidance map (h, w) or None). The random draws come in diffusers' order: the first target's
    mask, then the image's one inversion, then its decoding; then mask and decoding per further target. A given
    `mask` (h, w) replaces the mask step, a given `inversion` the inversion (with both, `source` may be None).
    `stage(name, index)` wraps each step ("mask", "invert", "decode") and yields the DDIM loops' per-step callback
    (progress bars and timings)."""
    for i, target in enumerate(targets):
        latent_mask, guidance = mask, None
        if latent_mask is None:
            with stage("mask", i):
                est = method.estimate_mask(sd, pixels, source, target, p, generator)
            latent_mask = est.mask[0].cpu().numpy().astype(bool)  # (h, w)
            guidance = est.guidance_map[0].float().cpu().numpy()  # (h, w)
        if inversion is None:
            with stage("invert", i) as step:
                inversion = method.invert(sd, pixels, source, p, generator, callback=step)
        with stage("decode", i) as step:
            m = torch.from_numpy(latent_mask).to(sd.device, sd.dtype)[None, None]  # (1, 1, h, w)
            latents = method.decode(sd, inversion, m, target, p, generator, callback=step)
            picture = to_picture(sd, latents, size, source=pixels)
        yield picture, latent_mask, guidance

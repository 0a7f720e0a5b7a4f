"""`StableDiffusionDiffEdit`: diffusers' `StableDiffusionDiffEditPipeline` calls on our components.

A thin layer: it translates diffusers' arguments (prompts or embeddings, num_images_per_prompt, output types,
callbacks) into `DiffEditParams` and calls the three steps of `method`. With its default parameters every
correction is off, so `generate_mask`, `invert` and `__call__` give diffusers 0.42.1's numbers for the same weights,
inputs and `torch.Generator` seed; `StableDiffusionDiffEdit(model, DiffEditParams())` runs the corrected method
behind the same calls.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, ClassVar

import numpy as np
import PIL.Image
import torch

from . import image_tensors
from . import method
from .memory import vae_decode
from .models.image_processor import CLIPImageProcessor
from .models.lora import NETWORKS, WEIGHT_NAME
from .models.safety_checker import StableDiffusionSafetyChecker
from .params import DiffEditParams
from .safety import run_safety_checker
from .stable_diffusion import StableDiffusion
from .validation import is_integral

Prompt = str | list[str] | None
Callback = Callable[[int, torch.Tensor, torch.Tensor], None] | None


class _IndexedOutput:
    """diffusers' `BaseOutput` reads: `out[0]` (the i-th field that is not None, in order), `out["images"]`,
    `out.to_tuple()`. Only diffusers' own fields (`_TUPLE_FIELDS`) count, so indices match diffusers'."""

    _TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ()

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, name) for name in self._TUPLE_FIELDS if getattr(self, name) is not None)

    def __getitem__(self, key):
        if isinstance(key, str):
            names = [f.name for f in fields(self)]
            if key not in names or getattr(self, key) is None:  # diffusers: None fields are not keys
                raise KeyError(key)
            return getattr(self, key)
        if isinstance(key, (int, slice)) and not isinstance(key, bool):
            return self.to_tuple()[key]
        raise TypeError(f"{type(self).__name__} indices must be an int, a slice or a field name, "
                        f"not {type(key).__name__}")


@dataclass
class DiffEditInversionOutput(_IndexedOutput):
    latents: torch.Tensor  # (B, T, C, h, w), noisiest first
    images: list[PIL.Image.Image] | np.ndarray | None  # the decoded latents when decode_latents, else None
    timesteps: torch.Tensor | None = None  # (T,) the level of each latent (not in diffusers)
    image_latents: torch.Tensor | None = None  # (B, C, h, w) the clean latents the inversion started from (ditto)
    _TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ("latents", "images")

    @property
    def inversion(self) -> method.Inversion:
        return method.Inversion(self.latents, self.timesteps, self.image_latents)


@dataclass
class DiffEditPipelineOutput(_IndexedOutput):
    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nsfw_content_detected: list[bool] | None = None  # one flag per image; None without a safety checker
    _TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ("images", "nsfw_content_detected")


def _batch_size(prompt: Prompt, embeds: torch.Tensor | None) -> int:
    return 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else embeds.shape[0]


def _check_prompt(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, names=("prompt", "negative_prompt")):
    for name, embeds in ((names[0], prompt_embeds), (names[1], negative_prompt_embeds)):
        if embeds is not None and (not isinstance(embeds, torch.Tensor) or embeds.ndim != 3):
            shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"`{name}_embeds` must be a (batch, tokens, width) tensor, the text encoder's output, "
                             f"got {shape}; add the batch dimension with .unsqueeze(0)")
    if prompt is not None and prompt_embeds is not None:
        raise ValueError(f"Cannot forward both `{names[0]}` and `{names[0]}_embeds`; give one of the two.")
    if prompt is None and prompt_embeds is None:
        raise ValueError(f"Provide either `{names[0]}` or `{names[0]}_embeds`.")
    if prompt is not None and not isinstance(prompt, (str, list)):
        raise ValueError(f"`{names[0]}` has to be of type `str` or `list` but is {type(prompt)}")
    if isinstance(prompt, list) and not prompt:
        raise ValueError(f"`{names[0]}` is an empty list: give at least one prompt")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError(f"Cannot forward both `{names[1]}` and `{names[1]}_embeds`; give one of the two.")
    if prompt_embeds is not None and negative_prompt_embeds is not None \
            and prompt_embeds.shape != negative_prompt_embeds.shape:
        raise ValueError(f"`{names[0]}_embeds` and `{names[1]}_embeds` must have the same shape, got "
                         f"{tuple(prompt_embeds.shape)} != {tuple(negative_prompt_embeds.shape)}.")


def _check_call(strength, callback_steps, strength_name: str = "inpaint_strength"):
    if strength is None or not 0 <= strength <= 1:
        raise ValueError(f"The value of `{strength_name}` should be in [0.0, 1.0] but is {strength}")
    if not isinstance(callback_steps, int) or isinstance(callback_steps, bool) or callback_steps <= 0:
        raise ValueError(f"`callback_steps` has to be a positive integer but is {callback_steps}")


def _check_num_images(num_images_per_prompt) -> int:
    if not is_integral(num_images_per_prompt) or num_images_per_prompt < 1:
        raise ValueError(f"`num_images_per_prompt` must be a positive integer (1, 2, ...), got "
                         f"{num_images_per_prompt!r}")
    return int(num_images_per_prompt)


def _check_mask_dtype(mask_image) -> None:
    """Masks are floats in [0, 1], booleans, or generate_mask's int64 0 / 1 (and uint8 0 / 1); other integer
    types (uint16, ...) are refused by name rather than failing inside torch."""
    for m in mask_image if isinstance(mask_image, list) else [mask_image]:
        if not isinstance(m, (np.ndarray, torch.Tensor)):
            continue
        name = str(m.dtype).removeprefix("torch.")
        if name.startswith(("float", "bfloat")) or name in ("bool", "int64", "int32", "uint8"):
            continue
        raise TypeError(f"`mask_image` has dtype {name}, which is not supported: pass floats in [0, 1] (e.g. "
                        "mask.astype(np.float32)), or the int64 0 / 1 mask generate_mask returns")


def _check_image_values(image) -> None:
    """A numpy or torch image of integers (0-255, e.g. np.array(pil_image)) is refused with the fix: diffusers
    would compute on it as if in [0, 1] and give garbage."""
    for x in image if isinstance(image, list) else [image]:
        integer = (isinstance(x, np.ndarray) and x.dtype.kind in "iu") or \
            (isinstance(x, torch.Tensor) and not x.is_floating_point() and x.dtype != torch.bool)
        if integer:
            raise ValueError(f"`image` is an integer array ({str(x.dtype).removeprefix('torch.')}), which looks like "
                             "0-255 pixel values: pass the PIL image itself, or floats in [0, 1] "
                             "(np.asarray(image) / 255.0)")


_LORA_SCALE_ARG = "`cross_attention_kwargs['scale']` (the lora_scale)"  # how refusals name the LoRA scale


def _lora_scale(cross_attention_kwargs: dict | None) -> float:
    """The LoRA scale of diffusers' `cross_attention_kwargs={"scale": s}` (1 when absent); any other key, an
    attention processor's argument, is refused."""
    other = sorted(set(cross_attention_kwargs or {}) - {"scale"})
    if other:
        raise ValueError(f"cross_attention_kwargs {other} are not supported: only {{'scale': s}}, the LoRA scale")
    scale = (cross_attention_kwargs or {}).get("scale")
    return 1.0 if scale is None else scale


def _warn_if_not_ddim(folder) -> None:
    """Warn once when the folder names a scheduler other than DDIM (the official SD 1.5 layout names PNDM):
    diffusers' pipeline would sample with that one, while diffedit always runs DDIM on its config, which is what
    diffusers' DiffEdit recipe does with `DDIMScheduler.from_config(pipe.scheduler.config)`."""
    if folder is None or not os.path.isdir(folder):
        return
    named = []
    for path, key in ((os.path.join(folder, "model_index.json"), "scheduler"),
                      (os.path.join(folder, "scheduler", "scheduler_config.json"), "_class_name")):
        try:
            with open(path) as f:
                value = json.load(f).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        name = value[-1] if isinstance(value, list) and value else value
        if isinstance(name, str):
            named.append(name)
    other = next((n for n in named if n != "DDIMScheduler"), None)
    if other is not None:
        warnings.warn(f"the model folder names the scheduler {other}; diffedit runs DDIM on its config, as diffusers' "
                      "DiffEdit recipe does with DDIMScheduler.from_config(pipe.scheduler.config) and "
                      f"DDIMInverseScheduler.from_config(...), not {other}", UserWarning, stacklevel=3)


def _every(callback: Callback, callback_steps: int, bar) -> method.StepCallback:
    """The loop's step callback: a tick of the progress bar, and the user's callback every `callback_steps`."""
    def step(i: int, t: torch.Tensor, x: torch.Tensor) -> None:
        bar.update(1)
        if callback is not None and i % callback_steps == 0:
            callback(i, t, x)
    return step


KEEP_CHECKER = object()  # from_pretrained's safety_checker when not given: the folder's checker, if any


class SchedulerView:
    """A DDIM scheduler of ours as diffusers' code reads a pipeline's scheduler: `config` is a plain dict under
    diffusers' key names, so DiffEdit's recipe `DDIMScheduler.from_config(pipe.scheduler.config)` runs; every other
    attribute is the scheduler's own."""

    def __init__(self, scheduler):
        object.__setattr__(self, "scheduler", scheduler)

    @property
    def config(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.scheduler.config).items()}

    def __getattr__(self, name: str):
        return getattr(self.scheduler, name)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"the scheduler's {name} is read-only: it is built from the model folder's scheduler "
                             "config")

    def __repr__(self) -> str:
        return f"SchedulerView({self.scheduler!r})"


class TokenizerView:
    """Our CLIP tokenizer as diffusers' code calls a pipeline's: `tokenizer(text, padding="max_length",
    max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids` (the one form SD
    pipelines use; our tokenizer always pads and cuts so); every other attribute is the tokenizer's own."""

    def __init__(self, tokenizer):
        object.__setattr__(self, "tokenizer", tokenizer)

    def __call__(self, text: str | list[str], padding: str | bool = "max_length", max_length: int | None = None,
                 truncation: bool = True, return_tensors: str | None = "pt") -> TokenizerOutput:
        t = self.tokenizer
        if padding != "max_length" or truncation is not True or return_tensors != "pt" \
                or max_length not in (None, t.model_max_length):
            raise ValueError(f"tokenizer(...): only padding=\"max_length\", max_length={t.model_max_length} (or "
                             "None), truncation=True, return_tensors=\"pt\" are supported (Stable Diffusion's own "
                             f"form), got padding={padding!r}, max_length={max_length!r}, truncation={truncation!r}, "
                             f"return_tensors={return_tensors!r}")
        ids = t(text)  # (B, model_max_length)
        length = (ids == t.eos_token_id).int().argmax(dim=1) + 1  # bos .. eos; the rest is padding
        mask = (torch.arange(ids.shape[1]) < length[:, None]).long()
        return TokenizerOutput(ids, mask)

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)


@dataclass(frozen=True)
class TokenizerOutput:
    """transformers' BatchEncoding as far as SD code reads it: `.input_ids`, `.attention_mask`, or by key."""

    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64: 1 for bos .. eos, 0 for padding

    def __getitem__(self, key: str) -> torch.Tensor:
        return getattr(self, key)


class TextEncoderView:
    """Our CLIP text encoder as diffusers' code calls a pipeline's: `text_encoder(input_ids, attention_mask=None)`
    gives a tuple-like output whose `[0]` / `.last_hidden_state` are the states (B, T, D); every other attribute
    (parameters, dtype, ...) is the encoder's own."""

    def __init__(self, encoder):
        object.__setattr__(self, "encoder", encoder)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple:
        if attention_mask is not None:
            raise ValueError("text_encoder(..., attention_mask=...): Stable Diffusion's text encoder runs without an "
                             "attention mask (diffusers' pipelines pass None for it); pass attention_mask=None")
        return TextEncoderOutput(self.encoder(input_ids))

    def __getattr__(self, name: str):
        return getattr(self.encoder, name)


class TextEncoderOutput(tuple):
    """transformers' CLIPTextModel output as far as SD code reads it: `[0]` or `.last_hidden_state`."""

    def __new__(cls, last_hidden_state: torch.Tensor):
        return super().__new__(cls, (last_hidden_state,))

    @property
    def last_hidden_state(self) -> torch.Tensor:
        return self[0]


def _same_schedule(value, ours, class_name: str) -> bool:
    """Whether `value`, assigned to the facade's scheduler or inverse_scheduler, is the schedule the facade runs
    anyway: its own view, or diffusers' `class_name` (by name: diffusers is not imported) whose config holds our
    config's values (diffusers' recipe `DDIMScheduler.from_config(pipe.scheduler.config)`)."""
    if isinstance(value, SchedulerView):
        return value.scheduler is ours
    config = getattr(value, "config", None)
    if type(value).__name__ != class_name or not hasattr(config, "get"):
        return False
    mine = SchedulerView(ours).config
    return all(config.get(key, object()) == want for key, want in mine.items())


_INSIDE_THE_CALLS = ("an internal step of diffusers' generate_mask / invert / __call__, which the facade runs "
                     "inside those calls (diffedit.method): call them instead")
_NOT_PROVIDED = {  # diffusers' pipeline attributes the facade lacks -> what to do instead
    "config": "the pipeline's diffusers config (model_index.json) is not kept: pipe.name_or_path is what it was "
              "loaded from, pipe.unet.config / pipe.vae.config / pipe.scheduler.config its parts'",
    "image_processor": "pictures are converted by diffedit.image_tensors (to_tensor: PIL / numpy / torch -> "
                       "(B, 3, H, W) in [-1, 1]; to_output: back to 'pil' / 'np' / 'pt'), as diffusers' "
                       "VaeImageProcessor defaults do",
    "save_pretrained": "saving is not supported: the facade runs the model folder it was loaded from "
                       "(pipe.name_or_path), so copy that folder; LoRA adapters save with save_lora_weights",
    "register_modules": "the facade runs the components of the model it was loaded with; load another folder "
                        "with StableDiffusionDiffEdit.from_pretrained",
    "enable_freeu": "FreeU is not implemented (it changes the numbers); run without it",
    "disable_freeu": "FreeU is not implemented, so it is always off: drop the line",
    "fuse_qkv_projections": "not needed: attention already runs as one fused scaled_dot_product_attention call; "
                            "drop the line",
    **dict.fromkeys(("check_inputs", "prepare_extra_step_kwargs", "get_timesteps", "get_inverse_timesteps",
                     "prepare_image_latents", "prepare_latents", "run_safety_checker"), _INSIDE_THE_CALLS),
}


class StableDiffusionDiffEdit:
    """DiffEdit with diffusers' `StableDiffusionDiffEditPipeline` calls: `generate_mask`, `invert`, `__call__`."""

    _STATE = ("model", "params", "_progress_bar_config")  # the facade's own attributes; nothing else is assigned

    def __init__(self, model: StableDiffusion | None = None, params: DiffEditParams | None = None, **components):
        if components or model is None:
            given = f"the components {sorted(components)}" if components else "no model"
            raise TypeError(f"StableDiffusionDiffEdit(model, params) takes a diffedit StableDiffusion, got {given} "
                            "(diffusers' StableDiffusionDiffEditPipeline(**pipe.components) form): use "
                            "StableDiffusionDiffEdit.from_pipe(pipe), StableDiffusionDiffEdit(pipe.model) or "
                            "StableDiffusionDiffEdit.from_pretrained(folder)")
        if not isinstance(model, StableDiffusion):
            raise TypeError(f"model: expected a diffedit StableDiffusion, got {type(model).__name__}; for a folder or "
                            "hub repo id use StableDiffusionDiffEdit.from_pretrained(...)")
        if params is not None and not isinstance(params, DiffEditParams):
            raise TypeError(f"params: expected a DiffEditParams, got {type(params).__name__}")
        self.model = model
        # Only the corrections (and numbers no call argument sets) are read from here; each call sets the rest.
        self.params = params if params is not None else DiffEditParams.reference()
        self._progress_bar_config: dict = {}

    def __setattr__(self, name: str, value) -> None:
        """Only the facade's own state and `safety_checker` (None turns it off, as in diffusers) may be assigned:
        diffusers' component swaps (`pipe.scheduler = ...`, `pipe.unet = ...`) would otherwise be accepted and
        ignored, so they are refused with what to do instead."""
        attr = getattr(type(self), name, None)
        if name in self._STATE or (isinstance(attr, property) and attr.fset is not None):
            object.__setattr__(self, name, value)
            return
        if name in ("scheduler", "inverse_scheduler"):
            if _same_schedule(value, getattr(self.model, name),
                              "DDIMScheduler" if name == "scheduler" else "DDIMInverseScheduler"):
                return  # diffusers' DiffEdit recipe: the DDIM schedule the facade runs anyway
            raise AttributeError(
                f"pipe.{name} cannot be replaced: diffedit runs its own DDIM schedule (and inverse DDIM) built from "
                "the model folder's scheduler config, which gives diffusers' numbers for DiffEdit's recipe "
                "`DDIMScheduler.from_config(pipe.scheduler.config)`; for DPM-Solver++ use "
                "StableDiffusionDiffEdit(pipe.model, DiffEditParams(sampler='dpmsolver++', ...)) or "
                "diffedit.edit(..., sampler='dpmsolver++')")
        if name in ("unet", "vae", "text_encoder", "tokenizer", "feature_extractor"):
            raise AttributeError(
                f"pipe.{name} cannot be replaced: the facade runs the components of the model it was loaded with; "
                "load another model folder (StableDiffusionDiffEdit.from_pretrained(folder)) or wrap your own "
                f"StableDiffusion: StableDiffusionDiffEdit(model)")
        raise AttributeError(f"StableDiffusionDiffEdit has no setting `{name}`: assigning it would change nothing, "
                             "so it is refused; call options go to generate_mask / invert / __call__, the "
                             "corrections to DiffEditParams (StableDiffusionDiffEdit(model, params))")

    def __getattr__(self, name: str):
        """Called only for names the facade lacks: diffusers' pipeline attributes it does not provide say what to
        do instead (`_NOT_PROVIDED`); any other name is Python's usual AttributeError."""
        if name in _NOT_PROVIDED:
            raise AttributeError(f"StableDiffusionDiffEdit has no `{name}` (diffusers' pipeline has): "
                                 f"{_NOT_PROVIDED[name]}")
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    @classmethod
    def from_pipe(cls, pipeline, **kwargs) -> StableDiffusionDiffEdit:
        """diffusers' `from_pipe`: a new facade on the same model (networks shared, nothing copied) and with the
        same DiffEditParams; a `StableDiffusion` is taken too. Components given as keywords are refused (the
        facade runs one model's parts), as are diffusers' own pipelines (load their folder with from_pretrained)."""
        if kwargs:
            raise TypeError(f"from_pipe(pipeline, {', '.join(sorted(kwargs))}=...): the facade runs the components "
                            "of one model; load another folder with from_pretrained, or give the corrections as "
                            "StableDiffusionDiffEdit(pipe.model, DiffEditParams(...))")
        if isinstance(pipeline, StableDiffusion):
            return cls(pipeline)
        if not isinstance(pipeline, StableDiffusionDiffEdit):
            raise TypeError(f"from_pipe takes a StableDiffusionDiffEdit or a diffedit StableDiffusion, got "
                            f"{type(pipeline).__name__}: load a diffusers pipeline's folder with "
                            "StableDiffusionDiffEdit.from_pretrained(folder)")
        return cls(pipeline.model, pipeline.params)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str | None = None, revision: str | None = None,
                        variant: str | None = None, params: DiffEditParams | None = None, *,
                        torch_dtype: torch.dtype | str | None = None,
                        safety_checker: object = KEEP_CHECKER,
                        use_safetensors: bool | None = None) -> StableDiffusionDiffEdit:
        """A model folder or hub repo id (`StableDiffusion.from_pretrained`; dtype None: float32). diffusers' two
        keywords users write first are taken too: `torch_dtype` (its name for `dtype`), `safety_checker=None`
        (load without the checker; any other `safety_checker` is refused: the checker comes from the folder) and
        `use_safetensors=True` (what we do anyway; False is refused)."""
        if torch_dtype is not None and dtype is not None:
            raise ValueError("dtype and torch_dtype are one setting (torch_dtype is diffusers' name): give one")
        if use_safetensors is False:
            raise ValueError("use_safetensors=False: diffedit loads safetensors weights only (it never unpickles); "
                             "drop the argument or give True")
        if safety_checker is not KEEP_CHECKER and safety_checker is not None:
            raise TypeError("safety_checker: only None (no checker) is taken; a folder's own checker loads with it")
        model = StableDiffusion.from_pretrained(path_or_repo_id, device, torch_dtype or dtype, revision, variant)
        _warn_if_not_ddim(model.folder)
        pipe = cls(model, params)
        if safety_checker is None:
            pipe.safety_checker = None
        return pipe

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path: str | os.PathLike,
                         config: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32, prediction_type: str | None = None,
                         params: DiffEditParams | None = None) -> StableDiffusionDiffEdit:
        """An original-layout .safetensors checkpoint (`StableDiffusion.from_single_file`). diffusers 0.42.1's
        DiffEdit pipeline has no `from_single_file`; its `StableDiffusionPipeline.from_single_file` reads the same
        files and takes the same `config`."""
        model = StableDiffusion.from_single_file(pretrained_model_link_or_path, config, device, dtype, prediction_type)
        return cls(model, params)

    @property
    def vae_scale_factor(self) -> int:
        return self.model.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def _execution_device(self) -> torch.device:
        """diffusers' `_execution_device`: where inputs go (the accelerator under model CPU offload)."""
        return self.model.device

    @property
    def name_or_path(self) -> str:
        """What the model was loaded from, as given (a folder, a hub repo id or a single file), as diffusers'."""
        return self.model.source

    # diffusers' component attributes, read-only: our own objects (assigning them is refused, see __setattr__);
    # the scheduler is the DDIM schedule every call runs, built from the folder's scheduler config
    unet, vae = (property(lambda self, name=name: getattr(self.model, name), doc=f"the model's {name} (read-only)")
                 for name in ("unet", "vae"))
    text_encoder = property(lambda self: TextEncoderView(self.model.text_encoder),
                            doc="the model's text encoder, called as transformers' (read-only)")
    tokenizer = property(lambda self: TokenizerView(self.model.tokenizer),
                         doc="the model's tokenizer, called as transformers' (read-only)")
    scheduler, inverse_scheduler = (
        property(lambda self, name=name: SchedulerView(getattr(self.model, name)),
                 doc=f"the model's {name}, its config a dict as diffusers' (read-only)")
        for name in ("scheduler", "inverse_scheduler"))

    @property
    def components(self) -> dict:
        """diffusers' `components`: the parts by name (our objects)."""
        return {"vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer, "unet": self.unet,
                "scheduler": self.scheduler, "safety_checker": self.safety_checker,
                "feature_extractor": self.feature_extractor, "inverse_scheduler": self.inverse_scheduler}

    @property
    def safety_checker(self) -> StableDiffusionSafetyChecker | None:
        """The model's `StableDiffusionSafetyChecker` or None; `pipe.safety_checker = None` turns it off, as in
        diffusers."""
        return self.model.safety_checker

    @safety_checker.setter
    def safety_checker(self, checker: StableDiffusionSafetyChecker | None) -> None:
        self.model.safety_checker = checker

    @property
    def feature_extractor(self) -> CLIPImageProcessor | None:
        """The model's CLIP image processor (the checker's input) or None."""
        return self.model.feature_extractor

    # diffusers' pipeline utilities

    def set_progress_bar_config(self, disable: bool | None = None, desc: str | None = None, leave: bool | None = None,
                                position: int | None = None, ncols: int | None = None,
                                dynamic_ncols: bool | None = None, mininterval: float | None = None,
                                file=None) -> None:
        """diffusers' `set_progress_bar_config`: tqdm's settings for the progress bars of `invert` and `__call__`
        (one tick per denoising step, on stderr; `disable=True` hides them)."""
        given = dict(disable=disable, desc=desc, leave=leave, position=position, ncols=ncols,
                     dynamic_ncols=dynamic_ncols, mininterval=mininterval, file=file)
        self._progress_bar_config = {k: v for k, v in given.items() if v is not None}  # replaced, as in diffusers

    def progress_bar(self, iterable=None, total: int | None = None):
        """diffusers' `progress_bar`: a tqdm bar over `iterable`, or of `total` steps, with
        `set_progress_bar_config`'s settings."""
        from tqdm.auto import tqdm
        if iterable is not None:
            return tqdm(iterable, **self._progress_bar_config)
        if total is not None:
            return tqdm(total=total, **self._progress_bar_config)
        raise ValueError("Either `total` or `iterable` has to be defined.")

    @contextlib.contextmanager
    def _progress_bar(self, total: int):
        """A tqdm bar over a loop's `total` steps (`progress_bar`), closed at the end."""
        bar = self.progress_bar(total=total)
        try:
            yield bar
        finally:
            bar.close()

    def to(self, device: str | torch.device | torch.dtype | None = None, dtype: torch.dtype | None = None,
           silence_dtype_warnings: bool = False) -> StableDiffusionDiffEdit:
        """diffusers' `to`: `pipe.to("cuda")`, `pipe.to(torch.float16)`, `pipe.to("cuda", torch.float16)` move and
        cast every network (`StableDiffusion.to`); the pipeline itself is returned, as in diffusers."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        self.model.to(device, dtype)
        return self

    def enable_attention_slicing(self, slice_size: str | int | None = "auto") -> None:
        """Accepted, does nothing: attention runs as one fused `scaled_dot_product_attention` call, which already
        keeps memory low (the same numbers, as slicing gives in diffusers)."""

    def disable_attention_slicing(self) -> None:
        """Accepted, does nothing (see enable_attention_slicing)."""

    def enable_xformers_memory_efficient_attention(self, attention_op=None) -> None:
        """Accepted, does nothing: attention is already one memory-efficient `scaled_dot_product_attention` call
        (see enable_attention_slicing)."""

    def disable_xformers_memory_efficient_attention(self) -> None:
        """Accepted, does nothing (see enable_xformers_memory_efficient_attention)."""

    @staticmethod
    def numpy_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
        """diffusers' `numpy_to_pil`: (B, H, W, C) or (H, W, C) floats in [0, 1] -> PIL images."""
        return image_tensors.numpy_to_pil(images)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """diffusers' deprecated `decode_latents`: (B, 4, h, w) latents -> (B, H, W, 3) float32 pictures in
        [0, 1] (the VAE's memory options apply)."""
        warnings.warn("decode_latents is deprecated in diffusers: __call__(..., output_type='np') decodes too",
                      FutureWarning, stacklevel=2)
        return self._decoded(latents, "np")

    def _decoded(self, latents: torch.Tensor, output_type: str):
        """diffusers' `decode_latents` rule, shared by it and `invert(decode_latents=True)`: the latents times
        1 / scaling_factor through the VAE (its memory options apply), as `output_type` pictures."""
        pixels = vae_decode(self.model, 1 / self.model.vae.scaling_factor * latents.to(self.device, self.dtype))
        return image_tensors.to_output(pixels, output_type)

    def maybe_convert_prompt(self, prompt: str | list[str], tokenizer=None) -> str | list[str]:
        """diffusers' `maybe_convert_prompt`, for multi-vector learned words: the prompt unchanged, since our
        tokenizer reads a word `<tok>` as all of its vectors' tokens itself (diffusers spells them out as
        `<tok> <tok>_1 ...` for its tokenizer); the token ids are the same."""
        return prompt

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device = "cuda") -> None:
        """Refused: not implemented; enable_model_cpu_offload() moves whole networks to the accelerator in turn."""
        raise NotImplementedError("enable_sequential_cpu_offload is not supported: use enable_model_cpu_offload() "
                                  "(whole networks on the accelerator in turn) or enable_vae_slicing / "
                                  "enable_vae_tiling")

    # Memory options (diffedit/memory.py), diffusers' names; they set the model's own options

    def enable_vae_slicing(self) -> None:
        self.model.enable_vae_slicing()

    def disable_vae_slicing(self) -> None:
        self.model.disable_vae_slicing()

    def enable_vae_tiling(self) -> None:
        self.model.enable_vae_tiling()

    def disable_vae_tiling(self) -> None:
        self.model.disable_vae_tiling()

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device | None = None) -> None:
        self.model.enable_model_cpu_offload(gpu_id, device)

    def maybe_free_model_hooks(self) -> None:
        self.model.maybe_free_model_hooks()

    def remove_all_hooks(self) -> None:
        self.model.remove_all_hooks()

    # LoRA, with diffusers' names: `StableDiffusion`'s methods (models/lora.py)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
                          adapter_name: str | None = None, weight_name: str | None = None) -> None:
        self.model.load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name, weight_name)

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None):
        self.model.set_adapters(adapter_names, adapter_weights)

    def get_active_adapters(self) -> list[str]:
        return self.model.get_active_adapters()

    def get_list_adapters(self) -> dict[str, list[str]]:
        return self.model.get_list_adapters()

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        self.model.delete_adapters(adapter_names)

    def disable_lora(self) -> None:
        self.model.disable_lora()

    def enable_lora(self) -> None:
        self.model.enable_lora()

    def fuse_lora(self, components: tuple[str, ...] | list[str] = NETWORKS, lora_scale: float = 1.0,
                  safe_fusing: bool = False, adapter_names: list[str] | None = None) -> None:
        """diffusers' `fuse_lora`. As there (peft's `scale_layer`), a `lora_scale` other than 1 also stays on every
        active adapter's weight: after `unfuse_lora` the adapters run at weight * lora_scale until `set_adapters`
        sets their weights again. An active adapter with layers in a network left out of `components` would then
        need two weights (diffusers scales only the fused networks' layers), so that case is refused."""
        lora = self.model.lora
        if lora_scale != 1:
            networks = self.get_list_adapters()
            split = sorted({a for n, names in networks.items() if n not in components for a in names
                            if a in lora.weights})
            if split:
                raise ValueError(f"fuse_lora(lora_scale={lora_scale}, components={list(components)}): active "
                                 f"adapter(s) {split} also have layers in a network left out, which diffusers would "
                                 "leave at another scale; fuse all of their networks, or use lora_scale=1 with "
                                 "set_adapters(names, weights) for the scale")
        self.model.fuse_lora(components, lora_scale, safe_fusing, adapter_names)
        if lora_scale != 1:
            for name in lora.weights:
                lora.weights[name] *= lora_scale

    def unfuse_lora(self, components: tuple[str, ...] | list[str] = NETWORKS) -> None:
        self.model.unfuse_lora(components)

    def unload_lora_weights(self) -> None:
        self.model.unload_lora_weights()

    def save_lora_weights(self, save_directory: str | os.PathLike, adapter_name: str | None = None,
                          weight_name: str = WEIGHT_NAME):
        return self.model.save_lora_weights(save_directory, adapter_name, weight_name)

    def load_textual_inversion(self, pretrained_model_name_or_path, token: str | list[str | None] | None = None):
        """diffusers' `load_textual_inversion` (see `StableDiffusion.load_textual_inversion`)."""
        self.model.load_textual_inversion(pretrained_model_name_or_path, token)

    def unload_textual_inversion(self, tokens: str | list[str] | None = None) -> None:
        """diffusers' `unload_textual_inversion`: the named learned words, or all of them."""
        self.model.unload_textual_inversion(tokens)

    # ------------------------------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: Prompt, device: str | torch.device | None, num_images_per_prompt: int,
                      do_classifier_free_guidance: bool, negative_prompt: Prompt = None,
                      prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                      lora_scale: float | None = None, clip_skip: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """diffusers' `encode_prompt`, with its arguments and its result: (prompt_embeds, negative_prompt_embeds),
        each (B * num_images_per_prompt, 77, D) on `device` (None: the model's) in the model's dtype; the negative
        ones ("" by default) only when `do_classifier_free_guidance`, else None. `clip_skip` applies to the prompt
        only and `lora_scale` scales the text encoder's LoRA adapters (1 when None), as in diffusers."""
        _check_prompt(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        num_images_per_prompt = _check_num_images(num_images_per_prompt)
        text = self._embed_prompts(prompt, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
                                   prompt_embeds, negative_prompt_embeds, clip_skip, None, lora_scale)
        where = self.device if device is None else torch.device(device)
        return text.cond.to(where), None if text.uncond is None else text.uncond.to(where)

    def _encode_prompt(self, prompt: Prompt, device: str | torch.device | None, num_images_per_prompt: int,
                       do_classifier_free_guidance: bool, negative_prompt: Prompt = None,
                       prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                       lora_scale: float | None = None, clip_skip: int | None = None) -> torch.Tensor:
        """diffusers' deprecated `_encode_prompt` (older tutorials call it): `encode_prompt`'s pair concatenated,
        negative embeddings first, (2 * B * num_images_per_prompt, 77, D); without guidance the prompt embeddings
        alone (diffusers fails there)."""
        warnings.warn("`_encode_prompt()` is deprecated in diffusers: use encode_prompt(), which returns the pair "
                      "(prompt_embeds, negative_prompt_embeds)", FutureWarning, stacklevel=2)
        cond, uncond = self.encode_prompt(prompt, device, num_images_per_prompt, do_classifier_free_guidance,
                                          negative_prompt, prompt_embeds, negative_prompt_embeds, lora_scale,
                                          clip_skip)
        return cond if uncond is None else torch.cat([uncond, cond])

    def _embed_prompts(self, prompt: Prompt, num_images_per_prompt: int, do_classifier_free_guidance: bool,
                       negative_prompt: Prompt = None, prompt_embeds: torch.Tensor | None = None,
                       negative_prompt_embeds: torch.Tensor | None = None, clip_skip: int | None = None,
                       negative_clip_skip: int | None = None, lora_scale: float | None = None
                       ) -> method.TextEmbeddings:
        """`encode_prompt`'s work as one `TextEmbeddings` (diffusers' `_encode_prompt` is the one above): prompts (or
        given embeddings), negative prompts ("" by default) when guided, each repeated `num_images_per_prompt` times
        in a row. diffusers applies clip_skip to the prompt only; `negative_clip_skip` is that of the negative
        prompt. `lora_scale` scales the text encoder's LoRA adapters (1 when None)."""
        lora_scale = 1.0 if lora_scale is None else lora_scale
        batch_size = _batch_size(prompt, prompt_embeds)
        if prompt_embeds is None:
            prompt_embeds = method.encode_text(self.model, [prompt] if isinstance(prompt, str) else prompt,
                                               clip_skip=clip_skip, lora_scale=lora_scale).cond
        uncond = None
        if do_classifier_free_guidance:
            if negative_prompt_embeds is None:
                if negative_prompt is None:
                    negative_prompt = [""] * batch_size
                elif prompt is not None and type(prompt) is not type(negative_prompt):
                    raise TypeError(f"`negative_prompt` should be the same type as `prompt`, but got "
                                    f"{type(negative_prompt)} != {type(prompt)}.")
                elif isinstance(negative_prompt, str):
                    negative_prompt = [negative_prompt] * batch_size
                elif len(negative_prompt) != batch_size:
                    raise ValueError(f"`negative_prompt` has batch size {len(negative_prompt)}, but `prompt` has "
                                     f"batch size {batch_size}.")
                negative_prompt_embeds = method.encode_text(self.model, negative_prompt,
                                                            clip_skip=negative_clip_skip,
                                                            lora_scale=lora_scale).cond
            uncond = negative_prompt_embeds.to(device=self.device, dtype=self.model.dtype)
        text = method.TextEmbeddings(prompt_embeds.to(device=self.device, dtype=self.model.dtype), uncond)
        return text.repeat_interleave(num_images_per_prompt)

    def _text(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guided: bool, clip_skip,
              in_call: bool, num_images_per_prompt: int = 1, lora_scale: float = 1.0) -> method.TextEmbeddings:
        """The prompts of one call. diffusers honours clip_skip only in __call__ (`in_call`), and there only for
        the prompt, not the negative prompt, and gives the text encoder the LoRA scale only in __call__ (its
        generate_mask computes the scale and drops it; invert never reads it); honor_all_call_options applies
        both everywhere (D4)."""
        fixed = self.params.honor_all_call_options
        skip = clip_skip if in_call or fixed else None
        return self._embed_prompts(prompt, num_images_per_prompt, guided, negative_prompt, prompt_embeds,
                                  negative_prompt_embeds, skip, skip if fixed else None,
                                  lora_scale if in_call or fixed else None)

    def _call_params(self, names: dict[str, str], **changes) -> DiffEditParams:
        """`self.params` with this call's values; a refused value is named by the argument the caller typed
        (`names`: field -> how to name it; others by their own name), not by the DiffEditParams field it fills."""
        try:
            return replace(self.params, **changes)
        except (ValueError, TypeError) as e:
            message = str(e)
            for field in sorted(changes, key=len, reverse=True):
                message = message.replace(f"DiffEditParams.{field}", names.get(field, f"`{field}`"))
            raise type(e)(message) from None

    def _refuse_clip_skip(self, clip_skip, call: str) -> None:
        """diffusers 0.42.1's generate_mask and invert have no clip_skip (a TypeError there); the corrected mode
        (honor_all_call_options) applies it."""
        if clip_skip is not None and not self.params.honor_all_call_options:
            raise TypeError(f"{call}() got clip_skip={clip_skip!r}: diffusers 0.42.1's {call} has no clip_skip "
                            "argument; to skip text encoder layers in every call use "
                            "StableDiffusionDiffEdit(model, DiffEditParams(honor_all_call_options=True, ...))")

    @torch.no_grad()
    def generate_mask(self, image: torch.Tensor | PIL.Image.Image = None, target_prompt: Prompt = None,
                      target_negative_prompt: Prompt = None, target_prompt_embeds: torch.Tensor | None = None,
                      target_negative_prompt_embeds: torch.Tensor | None = None, source_prompt: Prompt = None,
                      source_negative_prompt: Prompt = None, source_prompt_embeds: torch.Tensor | None = None,
                      source_negative_prompt_embeds: torch.Tensor | None = None, num_maps_per_mask: int = 10,
                      mask_encode_strength: float = 0.5, mask_thresholding_ratio: float = 3.0,
                      num_inference_steps: int = 50, guidance_scale: float = 7.5,
                      generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "np",
                      cross_attention_kwargs: dict | None = None, clip_skip: int | None = None,
                      return_guidance_map: bool = False):
        """The edit mask (B, h, w) at latent resolution, int64 0 / 1, as a numpy array ("np"; "pil": a list of
        "L" images, "pt": a tensor, both with honor_all_call_options). With `return_guidance_map`, also the
        continuous map (B, h, w) in [0, 1] that was thresholded at 0.5."""
        _check_call(mask_encode_strength, 1, "mask_encode_strength")
        self._refuse_clip_skip(clip_skip, "generate_mask")
        _check_prompt(target_prompt, target_negative_prompt, target_prompt_embeds, target_negative_prompt_embeds,
                      ("target_prompt", "target_negative_prompt"))
        _check_prompt(source_prompt, source_negative_prompt, source_prompt_embeds, source_negative_prompt_embeds,
                      ("source_prompt", "source_negative_prompt"))
        fixed = self.params.honor_all_call_options
        if output_type == "pil" and not fixed:
            raise TypeError("Cannot handle this data type: (1, 1, 8), |u1 (diffusers 0.42.1's generate_mask fails "
                            "with output_type='pil'; honor_all_call_options=True fixes it)")
        params = self._call_params({"mask_guidance_scale": "`guidance_scale`", "lora_scale": _LORA_SCALE_ARG},
                                   num_maps_per_mask=num_maps_per_mask, mask_encode_strength=mask_encode_strength,
                                   mask_thresholding_ratio=mask_thresholding_ratio,
                                   num_inference_steps=num_inference_steps, mask_guidance_scale=guidance_scale,
                                   clip_skip=clip_skip, lora_scale=_lora_scale(cross_attention_kwargs))
        guided = guidance_scale > 1
        target = self._text(target_prompt, target_negative_prompt, target_prompt_embeds,
                            target_negative_prompt_embeds, guided, clip_skip, in_call=False,
                            lora_scale=params.lora_scale)
        source = self._text(source_prompt, source_negative_prompt, source_prompt_embeds,
                            source_negative_prompt_embeds, guided, clip_skip, in_call=False,
                            lora_scale=params.lora_scale)
        _check_image_values(image)
        image = image_tensors.to_tensor(image, self.vae_scale_factor)
        est = method.estimate_mask(self.model, image, source, target, params, generator)
        if output_type == "pil":
            mask = image_tensors.mask_to_pil(est.mask)
        elif output_type == "pt" and fixed:
            mask = est.mask
        else:
            mask = est.mask.cpu().numpy()
        self.maybe_free_model_hooks()
        return (mask, est.guidance_map.cpu().numpy()) if return_guidance_map else mask

    @torch.no_grad()
    def invert(self, prompt: Prompt = None, image: torch.Tensor | PIL.Image.Image = None,
               num_inference_steps: int = 50, inpaint_strength: float = 0.8, guidance_scale: float = 7.5,
               negative_prompt: Prompt = None, generator: torch.Generator | list[torch.Generator] | None = None,
               prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
               decode_latents: bool = False, output_type: str = "pil", return_dict: bool = True,
               callback: Callback = None, callback_steps: int = 1, cross_attention_kwargs: dict | None = None,
               lambda_auto_corr: float = 20.0, lambda_kl: float = 20.0, num_reg_steps: int = 0,
               num_auto_corr_rolls: int = 5, clip_skip: int | None = None):
        """Inverted latents (B, T, C, h, w), noisiest first, and (with decode_latents) their B*T decoded images.
        Beyond diffusers, the output also carries each latent's timestep and the clean image latents; pass the
        whole output as `image_latents` to `__call__` to let the corrections use them. As in diffusers, the
        decoded latents are not shown to the safety checker."""
        _check_call(inpaint_strength, callback_steps)
        self._refuse_clip_skip(clip_skip, "invert")
        _check_prompt(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        if image is None:
            raise ValueError("`image` input cannot be undefined.")
        params = self._call_params({"inversion_guidance_scale": "`guidance_scale`", "lora_scale": _LORA_SCALE_ARG},
                                   num_inference_steps=num_inference_steps, inpaint_strength=inpaint_strength,
                                   inversion_guidance_scale=guidance_scale, lambda_auto_corr=lambda_auto_corr,
                                   lambda_kl=lambda_kl, num_reg_steps=num_reg_steps,
                                   num_auto_corr_rolls=num_auto_corr_rolls, clip_skip=clip_skip,
                                   lora_scale=_lora_scale(cross_attention_kwargs))
        _check_image_values(image)
        image = image_tensors.to_tensor(image, self.vae_scale_factor)
        text = self._text(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guidance_scale > 1,
                          clip_skip, in_call=False, lora_scale=params.lora_scale)
        with self._progress_bar(len(method.inversion_timesteps(self.model, params))) as bar:
            inv = method.invert(self.model, image, text, params, generator, _every(callback, callback_steps, bar))
        images = None
        if decode_latents:
            images = self._decoded(inv.latents.flatten(0, 1), "pil" if output_type == "pil" else "np")
        self.maybe_free_model_hooks()
        if not return_dict:
            return inv.latents, images
        return DiffEditInversionOutput(inv.latents, images, inv.timesteps, inv.clean)

    @torch.no_grad()
    def __call__(self, prompt: Prompt = None, mask_image=None, image_latents=None, inpaint_strength: float = 0.8,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, negative_prompt: Prompt = None,
                 num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, callback: Callback = None, callback_steps: int = 1,
                 cross_attention_kwargs: dict | None = None, clip_skip: int | None = None):
        """Decode the inverted latents under `prompt`, keeping them outside `mask_image`. `image_latents` is
        `invert(...).latents` (B, T, C, h, w) or (B*T, C, h, w), or the whole `invert` output. `latents` is
        accepted and unused, as in diffusers."""
        _check_call(inpaint_strength, callback_steps)
        _check_prompt(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        if mask_image is None:
            raise ValueError("`mask_image` input cannot be undefined. Use `generate_mask()` to compute it.")
        if image_latents is None:
            raise ValueError("`image_latents` input cannot be undefined. Use `invert()` to compute it.")
        num_images_per_prompt = _check_num_images(num_images_per_prompt)
        _check_mask_dtype(mask_image)
        batch_size = _batch_size(prompt, prompt_embeds)
        params = self._call_params({"lora_scale": _LORA_SCALE_ARG}, num_inference_steps=num_inference_steps,
                                   inpaint_strength=inpaint_strength, guidance_scale=guidance_scale, eta=eta,
                                   clip_skip=clip_skip, lora_scale=_lora_scale(cross_attention_kwargs))
        text = self._text(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guidance_scale > 1,
                          clip_skip, in_call=True, num_images_per_prompt=num_images_per_prompt,
                          lora_scale=params.lora_scale)
        # Mask (B, 1, h, w); diffusers tiles it over num_images_per_prompt while prompts and latents repeat (D6)
        mask = image_tensors.prepare_mask(mask_image, batch_size)
        if self.params.pair_repeated_masks:
            mask = mask.repeat_interleave(num_images_per_prompt, dim=0)
        else:
            mask = torch.cat([mask] * num_images_per_prompt)
        mask = mask.to(device=self.device, dtype=self.model.dtype)
        inversion = self._inversion(image_latents, batch_size, mask.shape[-2:], params)
        inversion = inversion.repeat_interleave(num_images_per_prompt) if isinstance(inversion, method.Inversion) \
            else inversion.repeat_interleave(num_images_per_prompt, dim=0)
        steps = method.strength_timesteps(self.model.scheduler, params.num_inference_steps, params.inpaint_strength,
                                          "inpaint_strength")
        with self._progress_bar(len(steps)) as bar:
            x = method.decode(self.model, inversion, mask, text, params, generator,
                              _every(callback, callback_steps, bar))
        nsfw = None
        if output_type not in ("latent", "pt", "np", "pil"):  # diffusers' postprocess: a deprecation, then numpy
            warnings.warn(f"output_type={output_type!r} is not one of 'latent', 'pt', 'np', 'pil': returning numpy "
                          "arrays, as diffusers does", FutureWarning, stacklevel=2)
            output_type = "np"
        if output_type == "latent":
            images = x
        else:  # diffusers runs the safety checker on the decoded pixels; flagged images stay black
            pixels, nsfw = run_safety_checker(self.model, method.to_pixels(self.model, x))
            images = image_tensors.to_output(pixels, output_type,
                                             None if nsfw is None else [not flagged for flagged in nsfw])
        self.maybe_free_model_hooks()
        return DiffEditPipelineOutput(images, nsfw) if return_dict else (images, nsfw)

    def _inversion(self, image_latents, batch_size: int, latent_hw, params: DiffEditParams):
        """image_latents as (B, T, C, h, w) on the model's device, or an `Inversion` when the output of `invert`
        (which knows its timesteps and clean latents) is given."""
        if isinstance(image_latents, DiffEditInversionOutput):
            image_latents = image_latents.inversion if image_latents.timesteps is not None else image_latents.latents
        latents = image_latents.latents if isinstance(image_latents, method.Inversion) else image_latents
        if isinstance(latents, (list, tuple)):  # diffusers: 5-D (or 4-D) pieces concatenated, (C, h, w) ones stacked
            if not latents or not all(isinstance(x, torch.Tensor) for x in latents) \
                    or len({x.ndim for x in latents}) != 1 or latents[0].ndim not in (3, 4, 5):
                raise TypeError("a list given as `image_latents` must hold tensors of one rank: (C, h, w) latents "
                                "(stacked), or (N, C, h, w) / (B, T, C, h, w) pieces (concatenated)")
            latents = torch.stack(list(latents)) if latents[0].ndim == 3 else torch.cat(list(latents))
        if not isinstance(latents, torch.Tensor):
            raise TypeError("image_latents must be the output of invert() or its latents tensor")
        if latents.ndim not in (3, 4, 5):
            raise ValueError(f"`image_latents` must be invert()'s latents, (B, T, C, h, w) or (B*T, C, h, w), got "
                             f"a {latents.ndim}-D tensor of shape {tuple(latents.shape)}")
        if latents.ndim == 3:  # one latent image (C, h, w), as diffusers' preprocess takes it
            latents = latents.unsqueeze(0)
        channels = self.model.vae.config.latent_channels
        if latents.shape[-3:] != (channels, *latent_hw):
            raise ValueError(f"Each latent image in `image_latents` must have shape {(channels, *latent_hw)}, "
                             f"but has shape {tuple(latents.shape[-3:])}")
        if latents.ndim == 4:
            steps = len(method.strength_timesteps(self.model.scheduler, params.num_inference_steps,
                                                  params.inpaint_strength, "inpaint_strength"))
            per_prompt = latents.shape[0] / batch_size
            if per_prompt != int(per_prompt) or (not params.slice_inverted_latents and per_prompt != steps):
                expected = f"{batch_size} x {steps}" if not params.slice_inverted_latents else \
                    f"a multiple of {batch_size}"
                raise ValueError(f"`image_latents` holds {latents.shape[0]} latent images, but this call needs "
                                 f"{expected} (batch size x inverted steps): pass invert()'s latents (B, T, C, h, w) "
                                 "made with the same num_inference_steps and inpaint_strength")
            latents = latents.reshape(batch_size, -1 if params.slice_inverted_latents else steps, *latents.shape[1:])
        if latents.shape[0] != batch_size:
            raise ValueError(f"`image_latents` must have batch size {batch_size}, but has {latents.shape[0]}")
        latents = latents.detach().to(device=self.device, dtype=self.model.dtype)
        if isinstance(image_latents, method.Inversion):
            return method.Inversion(latents, image_latents.timesteps,
                                    image_latents.clean.to(device=self.device, dtype=self.model.dtype))
        return latents

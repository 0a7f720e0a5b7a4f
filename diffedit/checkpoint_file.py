"""Stable Diffusion from one original-layout (CompVis / LDM) .safetensors file, and back.

The weights' names are `models/single_file.py`'s business; this module puts the configs, tokenizer and schedulers
around them, as diffusers' `StableDiffusionPipeline.from_single_file` does:
- with `config` (a diffusers model folder or hub repo id): that folder's unet/vae/text_encoder configs, tokenizer,
  scheduler (and inverse scheduler, diffedit.json when present);
- without: SD 1.x or SD 2.x by diffusers 0.42.1's rule (the UNet's cross-attention width 1024 means SD 2.x) and the
  official SD 1.5 / SD 2.1 configs (`official_configs`), the packaged CLIP vocabulary as the tokenizer (SD 2.x pads
  with "!", id 0, as its tokenizer folder says). SD 2.x is then assumed v-prediction: diffusers takes SD 2.1's config
  for it (its scheduler says v_prediction). SD 2 *base* (512 px) is epsilon: pass prediction_type="epsilon".
`prediction_type=` changes the prediction type only. diffusers' deprecated `prediction_type=` argument also swaps in
a legacy scheduler whose betas run from 0.02 to 0.085 (not SD's 0.00085 to 0.012) unless an original YAML config is
given; we do not copy that: the schedule stays the config's (or the official one).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import official_configs as official
from .models.clip_text import CLIPTextModel
from .models.config import CLIPTextConfig, UNetConfig, VAEConfig, check_parts_fit
from .models.single_file import (TEXT_LAYOUTS, is_sd2, join_state, read_single_file, save_single_file_state,
                                 split_state)
from .models.tokenizer import CLIPTokenizer
from .models.unet import UNet2DConditionModel
from .models.vae import AutoencoderKL
from .models.weights import load_state
from .params import read_edit_defaults
from .schedulers.ddim import PREDICTION_TYPES, DDIMConfig, DDIMInverseScheduler, DDIMScheduler
from .stable_diffusion import StableDiffusion, _read, resolve_model_folder

_NETWORKS = (("unet", UNet2DConditionModel, UNetConfig), ("vae", AutoencoderKL, VAEConfig),
             ("text_encoder", CLIPTextModel, CLIPTextConfig))
# The official repos' configs, by family: (unet, vae, text encoder, scheduler, tokenizer pad token).
_OFFICIAL = {
    "SD 1.x": (official.SD15_UNET, official.SD_VAE, official.SD15_TEXT, official.SD15_SCHEDULER, "<|endoftext|>"),
    "SD 2.x": (official.SD21_UNET, official.SD_VAE, official.SD21_TEXT, official.SD21_SCHEDULER, "!"),
}


def load_single_file(path: str | os.PathLike, config: str | os.PathLike | None = None,
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     prediction_type: str | None = None) -> StableDiffusion:
    """`StableDiffusion.from_single_file`: see the module docstring for where configs come from."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be None or one of {', '.join(PREDICTION_TYPES)}, "
                         f"not {prediction_type!r}")
    path = Path(path).expanduser()
    source = str(path)
    if config is not None:  # the configs first: they are cheap to check, the file is not
        parts = _folder_parts(resolve_model_folder(config))
        state = read_single_file(path)
    else:
        state = read_single_file(path)
        family = "SD 2.x" if is_sd2(state) else "SD 1.x"
        parts = _official_parts(family)
        source += f" (read as {family} with its official configs: for other shapes give its diffusers config folder)"
    networks, tokenizer, scheduler_config, inverse_config, edit_defaults = parts
    check_parts_fit(networks["unet"], networks["vae"], networks["text_encoder"])
    with torch.device("meta"):
        modules = {name: cls(networks[name]) for name, cls, _ in _NETWORKS}  # shapes only
    states = split_state(state, modules, source)
    loaded = {name: load_state(modules[name], states[name], f"{path} ({name})", device, dtype).eval()
              .requires_grad_(False) for name in modules}
    if prediction_type is not None:
        scheduler_config = scheduler_config.replaced(prediction_type=prediction_type)
        inverse_config = inverse_config.replaced(prediction_type=prediction_type)
    return StableDiffusion(tokenizer=tokenizer, text_encoder=loaded["text_encoder"], unet=loaded["unet"],
                           vae=loaded["vae"], scheduler=DDIMScheduler(scheduler_config),
                           inverse_scheduler=DDIMInverseScheduler(inverse_config), edit_defaults=edit_defaults,
                           source=str(path), folder=path.resolve())


def _folder_parts(folder: Path):
    """Configs, tokenizer, schedulers and edit defaults from a diffusers model folder (its weights are not read)."""
    networks = {name: config_cls.from_file(folder / name / "config.json") for name, _, config_cls in _NETWORKS}
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = _read(scheduler_file, lambda: DDIMConfig.from_file(scheduler_file))
    inverse_file = folder / "inverse_scheduler" / "scheduler_config.json"
    inverse = (_read(inverse_file, lambda: DDIMConfig.from_file(inverse_file, inverse=True))
               if inverse_file.is_file() else scheduler)
    tokenizer = _read(folder / "tokenizer", lambda: CLIPTokenizer.from_folder(folder / "tokenizer"))
    return networks, tokenizer, scheduler, inverse, read_edit_defaults(folder)


def _official_parts(family: str):
    """The official SD 1.5 or SD 2.1 configs and the packaged tokenizer with that family's padding."""
    unet, vae, text, scheduler, pad = _OFFICIAL[family]
    networks = {"unet": UNetConfig.from_dict(unet), "vae": VAEConfig.from_dict(vae),
                "text_encoder": CLIPTextConfig.from_dict(text)}
    schedule = DDIMConfig.from_dict(scheduler)
    return networks, CLIPTokenizer.default(pad_token=pad), schedule, schedule, {}


def save_single_file(model: StableDiffusion, path: str | os.PathLike, text_layout: str | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """Write `model`'s UNet, VAE and text encoder as one original-layout .safetensors file (the reverse of
    `from_single_file`); floating-point weights in `dtype` when given, else as they are.

    text_layout: "openai" (SD 1.x: `cond_stage_model.transformer.text_model.*`) or "openclip" (SD 2.x:
    `cond_stage_model.model.*`, q/k/v fused); by default OpenCLIP when the text encoder uses exact gelu (OpenCLIP
    ViT-H), else OpenAI. OpenCLIP's unused entries (its last block, `text_projection`, `logit_scale`) are not
    written, since the model does not have them; diffusers and `from_single_file` load the file without them.
    Configs, tokenizer and scheduler are not part of the file: load it with `config=` a folder that has them,
    unless they are the official SD 1.5 / SD 2.1 ones.
    """
    text_layout = text_layout or ("openclip" if model.text_encoder.config.hidden_act == "gelu" else "openai")
    if text_layout not in TEXT_LAYOUTS:
        raise ValueError(f"text_layout must be None or one of {TEXT_LAYOUTS}, not {text_layout!r}")
    modules = {"unet": model.unet, "vae": model.vae, "text_encoder": model.text_encoder}
    states = {name: {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
                     for k, v in m.state_dict().items()} for name, m in modules.items()}
    return save_single_file_state(join_state(states, modules, text_layout), path)


__all__ = ["load_single_file", "save_single_file"]

"""Model folders with random weights in official shapes, for `diffedit bench --config NAME`: speed does not depend on
the weights' values, so SD 1.5 and SD 2.1 can be measured without downloading them.

Each folder is the diffusers layout that `StableDiffusion.from_pretrained` and diffusers both load: config.json and
safetensors for the UNet, the VAE and the text encoder, the scheduler's config, the shipped model's cut CLIP
vocabulary as the tokenizer (the prompts' ids stay below its 573 entries; the text encoder keeps its official vocab
size). Weights are drawn N(0, 0.02), norm scales 1, biases 0: small, so activations stay moderate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import official_configs as official
from . import shipped_model as shipped

STD = 0.02


@dataclass(frozen=True)
class Preset:
    unet: dict
    vae: dict
    text: dict
    prediction_type: str = "epsilon"


_SD_SCALE = {"scaling_factor": 0.18215}
_TINY_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 2,
    "block_out_channels": [32, 64], "center_input_sample": False, "cross_attention_dim": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "out_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 8, "sample_size": 8,
}
_TINY_VAE = {**official.SD_VAE, "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 4,
             "sample_size": 64}
_TINY_TEXT = {**official.SD15_TEXT, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
              "num_attention_heads": 4, "projection_dim": 32}

PRESETS = {
    "sd15": Preset(official.SD15_UNET, {**official.SD_VAE, **_SD_SCALE}, official.SD15_TEXT),
    "sd21": Preset(official.SD21_UNET, {**official.SD_VAE, **_SD_SCALE}, official.SD21_TEXT, "v_prediction"),
    "shapes": Preset(shipped.UNET_CONFIG, shipped.VAE_CONFIG, shipped.TEXT_CONFIG),
    "tiny": Preset(_TINY_UNET, _TINY_VAE, _TINY_TEXT),
}


def random_state(module: torch.nn.Module, generator: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random values for every entry of `module`'s state dict (a module built on the meta device: shapes only)."""
    state = {}
    for name, t in module.state_dict().items():
        if name.endswith("bias"):
            state[name] = torch.zeros(t.shape, dtype=dtype)
        elif "norm" in name and name.endswith("weight"):
            state[name] = torch.ones(t.shape, dtype=dtype)
        else:
            state[name] = (STD * torch.randn(t.shape, generator=generator)).to(dtype)
    return state


def write_random_model(name: str, folder: Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write preset `name` (sd15, sd21, shapes, tiny) with random weights into `folder` (created); return it."""
    from .models.clip_text import CLIPTextModel
    from .models.config import CLIPTextConfig, UNetConfig, VAEConfig
    from .models.unet import UNet2DConditionModel
    from .models.vae import AutoencoderKL
    from .models.weights import save_state

    if name not in PRESETS:
        raise ValueError(f"unknown model config {name!r}; choose from {', '.join(PRESETS)}")
    preset, folder = PRESETS[name], Path(folder)
    vocab_size = shipped.write_tokenizer(folder / "tokenizer")  # the cut vocabulary: ids below vocab_size
    text = {**preset.text, "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1,
            "pad_token_id": vocab_size - 1, "vocab_size": max(preset.text.get("vocab_size", 0), vocab_size)}
    generator = torch.Generator().manual_seed(seed)
    parts = [("unet", UNet2DConditionModel, UNetConfig, preset.unet, "diffusers"),
             ("vae", AutoencoderKL, VAEConfig, preset.vae, "diffusers"),
             ("text_encoder", CLIPTextModel, CLIPTextConfig, text, "transformers")]
    for sub, cls, config_cls, raw, kind in parts:
        with torch.device("meta"):
            module = cls(config_cls.from_dict(raw))  # names and shapes only
        save_state(random_state(module, generator, dtype), raw, folder / sub, kind)
    (folder / "scheduler").mkdir(exist_ok=True)
    scheduler = {**shipped.SCHEDULER_CONFIG, "prediction_type": preset.prediction_type}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    (folder / "model_index.json").write_text(json.dumps(shipped.MODEL_INDEX, indent=2) + "\n")
    return folder

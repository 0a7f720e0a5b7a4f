"""The model that ships with the package, as a definition: its architecture (configs in the diffusers layout), its
cut CLIP vocabulary, its editing defaults, and the export to a diffusers model folder. `diffedit.train` trains it;
this module says what it is.

A tiny Stable Diffusion for the shapes world (`diffedit.shapes`): a VAE with factor 4 (64x64 images -> 16x16x4
latents), a cross-attention UNet, a 4-layer CLIP text encoder over a CLIP-BPE vocabulary that spells only the world's
words (with OpenAI's own merges), and SD's DDIM schedule.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from . import shapes
from .locations import SHIPPED_MODEL
from .models.clip_text import CLIPTextModel
from .models.config import CLIPTextConfig, UNetConfig, VAEConfig
from .models.tokenizer import VOCAB_DIR as CLIP_VOCAB_DIR
from .models.unet import UNet2DConditionModel
from .models.vae import AutoencoderKL
from .models.weights import save_component
from .params import EDIT_DEFAULTS_FILE

# The world's words, the only ones the small vocabulary spells with merges (anything else falls back to bytes).
WORLD_WORDS = sorted({w for c in shapes.all_captions() for w in c.split()})

VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1", "act_fn": "silu",
    "block_out_channels": [32, 64, 128],  # 3 levels: downsampling factor 4, 64x64 -> 16x16 latents
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 16,
    "sample_size": 64, "scaling_factor": 1.0,  # set from the trained encoder's latents
}
UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1", "act_fn": "silu",
    "attention_head_dim": 4,  # diffusers' name for the number of heads (head dims 32, 40)
    "block_out_channels": [64, 128, 160], "layers_per_block": 1,
    # Attention at 8x8 and 4x4 only: at 16x16 it took ~40% of a CPU edit's time (one core)
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "center_input_sample": False, "cross_attention_dim": 128, "downsample_padding": 1, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "out_channels": 4, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "sample_size": 16,
}
TEXT_CONFIG = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "quick_gelu",
    "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
    "max_position_embeddings": 77, "layer_norm_eps": 1e-05, "projection_dim": 128, "attention_dropout": 0.0,
    "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
    # vocab_size, bos/eos/pad ids: filled in from the small vocabulary (see `text_config`)
}
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.42.1", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading", "clip_sample": False,
    "trained_betas": None,
}
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
    "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
}
# DiffEditParams fields that suit this model, chosen with `python -m diffedit.evaluate --param ...` on the shipped
# weights: clamping at 4x the mean and noising the mask's copies to 0.6 give tighter masks (IoU 0.536 -> 0.564 on
# the held-out set); no guidance below t = 300 keeps regenerated squares' corners (colour-edit success 0.913 -> 0.947
# and shape-edit success 0.853 -> 0.967 over seeds 0-2, measured with the base UNet before the shipped fine-tune).
# The shipped diffedit.json is this dict (a test checks).
EDIT_DEFAULTS = {
    "num_inference_steps": 25, "inpaint_strength": 0.6, "guidance_scale": 7.5, "inversion_guidance_scale": 1.0,
    "num_maps_per_mask": 10, "mask_encode_strength": 0.6, "mask_guidance_scale": 5.0,
    "mask_thresholding_ratio": 4.0, "guidance_min_timestep": 300,
}


# --------------------------------------------------------------------------------------------------- vocabulary


def _bpe_ranks_used(word: str, ranks: dict[tuple[str, str], int]) -> set[int]:
    """The ranks of the merges CLIP's BPE applies to one word (lowest rank first, all occurrences left to right)."""
    parts, used = [*word[:-1], word[-1] + "</w>"], set()
    while len(parts) > 1:
        rank, pair = min((ranks.get(p, math.inf), p) for p in zip(parts, parts[1:]))
        if rank == math.inf:
            break
        used.add(rank)
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return used


def small_clip_vocab(words=WORLD_WORDS, vocab_dir: Path = CLIP_VOCAB_DIR) -> tuple[dict[str, int], list[str]]:
    """A CLIP-format vocabulary that spells `words` exactly as OpenAI's CLIP does, and nothing else with merges.

    The 512 byte tokens (CLIP's ids 0..511), then one token per real CLIP merge that the words need, in CLIP's
    merge order, then `<|startoftext|>`, `<|endoftext|>`; ids renumbered densely. Keeping exactly the merges that
    fire keeps BPE's result: at every step the lowest-ranked pair present is one of them.
    """
    full = json.loads((vocab_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = (vocab_dir / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    merges = [m for m in merges if m]
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    if not all(w.isascii() and w.isalpha() and w.islower() for w in words):
        raise ValueError("the small vocabulary only spells lower-case ASCII words")  # byte tokens = the letters
    used = sorted(set().union(*(_bpe_ranks_used(w, ranks) for w in words)))
    tokens = [t for t, i in sorted(full.items(), key=lambda kv: kv[1]) if i < 512]
    tokens += [merges[r].replace(" ", "") for r in used] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate tokens"
    return vocab, [merges[r] for r in used]


def write_tokenizer(folder: Path) -> int:
    """Write tokenizer/ (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json) as SD 1.x ships
    it, padding with <|endoftext|>; return the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = small_clip_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>"}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "add_prefix_space": False, "errors": "replace", **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return len(vocab)


def text_config(vocab_size: int) -> dict:
    return {**TEXT_CONFIG, "vocab_size": vocab_size, "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1,
            "pad_token_id": vocab_size - 1}


# --------------------------------------------------------------------------------------------------- networks


def build_vae(scaling_factor: float = 1.0, init_logvar: float = -6.0) -> tuple[AutoencoderKL, dict]:
    """A fresh VAE whose posterior starts nearly deterministic (log-variance bias `init_logvar`), so the decoder
    is not first trained on latents drowned in unit noise."""
    raw = {**VAE_CONFIG, "scaling_factor": scaling_factor}
    vae = AutoencoderKL(VAEConfig.from_dict(raw))
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:] = init_logvar  # moments = (mean, logvar)
    return vae, raw


def with_scaling_factor(vae: AutoencoderKL, scale: float) -> AutoencoderKL:
    """The VAE with its config's scaling factor set (the trained encoder's 1 / latent std)."""
    vae.config = replace(vae.config, scaling_factor=scale)
    return vae


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(UNetConfig.from_dict(UNET_CONFIG))


def build_text_encoder(vocab_size: int) -> CLIPTextModel:
    """GPT-2-style init (normal 0.02, zero biases); LayerNorms at 1, 0."""
    model = CLIPTextModel(CLIPTextConfig.from_dict(text_config(vocab_size)))
    for name, p in model.named_parameters():
        if "layer_norm" in name:
            continue
        torch.nn.init.normal_(p, std=0.02) if p.ndim > 1 else torch.nn.init.zeros_(p)
    return model


# --------------------------------------------------------------------------------------------------- export


def export(folder: Path, vae: AutoencoderKL, unet: UNet2DConditionModel, text: CLIPTextModel,
           provenance: dict) -> Path:
    """Write the diffusers folder layout with fp16 safetensors weights (replacing any previous export)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    vocab_size = write_tokenizer(folder / "tokenizer")
    save_component(vae, {**VAE_CONFIG, "scaling_factor": vae.scaling_factor}, folder / "vae", "diffusers",
                   torch.float16)
    save_component(unet, UNET_CONFIG, folder / "unet", "diffusers", torch.float16)
    save_component(text, text_config(vocab_size), folder / "text_encoder", "transformers", torch.float16)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    (folder / EDIT_DEFAULTS_FILE).write_text(json.dumps(EDIT_DEFAULTS, indent=2) + "\n")
    (folder / "training.json").write_text(json.dumps(provenance, indent=2) + "\n")
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # safetensors writes 0600; the files ship with the package
    return folder


def install_shipped(folder: Path) -> Path:
    """Copy an exported model folder over the package's shipped model (`locations.SHIPPED_MODEL`)."""
    if SHIPPED_MODEL.exists():
        shutil.rmtree(SHIPPED_MODEL)
    shutil.copytree(folder, SHIPPED_MODEL)
    return SHIPPED_MODEL


def folder_size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20

"""Tiny random Stable Diffusion checkpoints, built and saved by the reference libraries (diffusers, transformers).

They are written with `save_pretrained` into the official diffusers folder layout (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/, safetensors weights), exactly what our loader reads from the hub. Weights are
re-drawn with a larger spread than the libraries' initializers so that zero-initialised layers cannot hide a bug.
"""

from __future__ import annotations

from pathlib import Path

import torch

import diffedit.models

VOCAB_DIR = Path(diffedit.models.__file__).parent / "clip_vocab"

# (name, unet extras, text activation, prediction type, tokenizer pad token)
STYLES = {
    # SD 1.x: 1x1-conv projections, one head count, quick_gelu text encoder, epsilon, pad with end-of-text.
    "sd1": dict(unet=dict(attention_head_dim=2), hidden_act="quick_gelu", prediction_type="epsilon",
                pad_token="<|endoftext|>"),
    # SD 2.x: linear projections, per-level heads, upcast attention, gelu text encoder, v-prediction, pad with "!".
    "sd2": dict(unet=dict(attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True),
                hidden_act="gelu", prediction_type="v_prediction", pad_token="!"),
}


def _randomize(module: torch.nn.Module, seed: int, std: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + std * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))


def build_components(style: str, seed: int = 0) -> dict:
    """The reference's components for a tiny SD1- or SD2-style model (64x64 images, 8x8 latents)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    s = STYLES[style]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, **s["unet"])
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        norm_num_groups=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act=s["hidden_act"], layer_norm_eps=1e-5, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=1))
    _randomize(unet, seed + 1, 0.05)
    _randomize(vae, seed + 2, 0.05)
    _randomize(text_encoder, seed + 3, 0.1)
    tokenizer = CLIPTokenizer(str(VOCAB_DIR / "vocab.json"), str(VOCAB_DIR / "merges.txt"), pad_token=s["pad_token"],
                              model_max_length=77)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=s["prediction_type"])
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                scheduler=scheduler)


def save_checkpoint(style: str, path: Path, seed: int = 0) -> Path:
    """Save a tiny model in the diffusers layout of the official SD repos (no inverse scheduler, no safety checker)."""
    from diffusers import StableDiffusionPipeline

    parts = build_components(style, seed)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)

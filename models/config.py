"""Frozen configs for the networks, parsed from each component's `config.json`.

Every key of a config file is either read, ignored on purpose (bookkeeping, or a training-only value), or pinned
to the one value we implement. Anything else fails loudly with the field named, so a checkpoint we do not support
is refused at load time instead of giving wrong pictures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..validation import ConfigError, check_keys

# Keys that never change the computation.
_BOOKKEEPING = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "architectures",
                "transformers_version", "torch_dtype", "dtype", "model_type"}


def load_json_object(path: str | Path) -> dict[str, Any]:
    """A config file's JSON object (a folder: its config.json); missing, unreadable, not JSON or not an object is
    one ConfigError naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"missing config file {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    return raw


def _per_level(kind: str, name: str, value: Any, levels: int) -> tuple[int, ...]:
    """An int, or one int per UNet level."""
    if isinstance(value, int):
        return (value,) * levels
    value = tuple(value)
    if len(value) != levels:
        raise ConfigError(f"{kind} config: {name} has {len(value)} entries for {levels} levels")
    return value


# --------------------------------------------------------------------------------------------------- UNet

_UNET_PINNED = {
    "act_fn": "silu",
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "addition_embed_type_num_heads": 64,  # only read when addition_embed_type is set
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
    "class_embeddings_concat": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "cross_attention_norm": None,
    "attention_type": "default",
    "mid_block_only_cross_attention": None,
    "reverse_transformer_layers_per_block": None,
}
_UNET_IGNORED = {"sample_size", "dropout"}  # sample_size: a default resolution only; dropout: training only
_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    num_heads: tuple[int, ...] = (8, 8, 8, 8)  # per level; diffusers stores this as "attention_head_dim"
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False  # SD 2.x: nn.Linear proj_in/proj_out instead of 1x1 convs
    upcast_attention: bool = False  # SD 2.1 (768): attention scores in float32
    sample_size: int = 64

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "UNetConfig":
        read = {f.name for f in fields(cls)} | {"attention_head_dim", "num_attention_heads"}
        check_keys("unet", raw, read - {"num_heads"}, _UNET_IGNORED | _BOOKKEEPING, _UNET_PINNED)
        blocks = tuple(raw.get("block_out_channels", cls.block_out_channels))
        levels = len(blocks)
        down = tuple(raw.get("down_block_types", cls.down_block_types))
        up = tuple(raw.get("up_block_types", cls.up_block_types))
        for name, types, allowed in (("down_block_types", down, _DOWN_TYPES), ("up_block_types", up, _UP_TYPES)):
            if len(types) != levels:
                raise ConfigError(f"unet config: {name} has {len(types)} entries for {levels} levels")
            for t in types:
                if t not in allowed:
                    raise ConfigError(f"unet config: unsupported block {t!r} in {name} (supported: {allowed})")
        # diffusers' SD UNets store the *number of heads* under attention_head_dim; num_attention_heads wins if set.
        heads = raw.get("num_attention_heads") or raw.get("attention_head_dim", 8)
        layers = raw.get("transformer_layers_per_block", 1)
        groups = raw.get("norm_num_groups", 32)
        if groups is None:
            raise ConfigError("unet config: norm_num_groups=None is not supported")
        return cls(
            in_channels=raw.get("in_channels", 4),
            out_channels=raw.get("out_channels", 4),
            block_out_channels=blocks,
            down_block_types=down,
            up_block_types=up,
            layers_per_block=_int_only("unet", "layers_per_block", raw.get("layers_per_block", 2)),
            num_heads=_per_level("unet", "attention_head_dim", heads, levels),
            transformer_layers_per_block=_per_level("unet", "transformer_layers_per_block", layers, levels),
            cross_attention_dim=_int_only("unet", "cross_attention_dim", raw.get("cross_attention_dim", 768)),
            norm_num_groups=groups,
            norm_eps=raw.get("norm_eps", 1e-5),
            use_linear_projection=bool(raw.get("use_linear_projection", False)),
            upcast_attention=bool(raw.get("upcast_attention", False)),
            sample_size=raw.get("sample_size") or 64,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "UNetConfig":
        return cls.from_dict(load_json_object(path))


def _int_only(kind: str, name: str, value: Any) -> int:
    if not isinstance(value, int):
        raise ConfigError(f"{kind} config: {name}={value!r} must be a single integer")
    return value


# --------------------------------------------------------------------------------------------------- VAE

_VAE_PINNED = {
    "act_fn": "silu",
    "shift_factor": (None, 0, 0.0),
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
_VAE_IGNORED = {"force_upcast"}  # a dtype policy of diffusers pipelines, not part of the network


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    sample_size: int = 512

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "VAEConfig":
        read = {f.name for f in fields(cls)} | {"down_block_types", "up_block_types"}
        check_keys("vae", raw, read, _VAE_IGNORED | _BOOKKEEPING, _VAE_PINNED)
        blocks = tuple(raw.get("block_out_channels", cls.block_out_channels))
        for name, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = tuple(raw.get(name, (allowed,) * len(blocks)))
            if len(types) != len(blocks) or any(t != allowed for t in types):
                raise ConfigError(f"vae config: unsupported {name}={list(types)} (expected {allowed} per level)")
        sample = raw.get("sample_size", 512)
        return cls(
            in_channels=raw.get("in_channels", 3),
            out_channels=raw.get("out_channels", 3),
            block_out_channels=blocks,
            layers_per_block=raw.get("layers_per_block", 2),
            latent_channels=raw.get("latent_channels", 4),
            norm_num_groups=raw.get("norm_num_groups", 32),
            scaling_factor=float(raw.get("scaling_factor", 0.18215)),
            sample_size=sample[0] if isinstance(sample, (list, tuple)) else sample,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "VAEConfig":
        return cls.from_dict(load_json_object(path))


# --------------------------------------------------------------------------------------------------- CLIP text

# Generic keys that transformers writes into every config; none of them changes the text encoder's forward pass.
_HF_GENERIC = {
    "add_cross_attention", "bad_words_ids", "begin_suppress_tokens", "chunk_size_feed_forward",
    "cross_attention_hidden_size", "decoder_start_token_id", "diversity_penalty", "do_sample", "early_stopping",
    "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "finetuning_task", "forced_bos_token_id",
    "forced_eos_token_id", "id2label", "is_decoder", "is_encoder_decoder", "label2id", "length_penalty",
    "max_length", "min_length", "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_return_sequences",
    "output_attentions", "output_hidden_states", "output_scores", "prefix", "problem_type", "pruned_heads",
    "remove_invalid_values", "repetition_penalty", "return_dict", "return_dict_in_generate", "sep_token_id",
    "suppress_tokens", "task_specific_params", "temperature", "tf_legacy_loss", "tie_encoder_decoder",
    "tie_word_embeddings", "tokenizer_class", "top_k", "top_p", "torchscript", "typical_p", "use_bfloat16",
    "gradient_checkpointing", "output_past", "use_cache", "_attn_implementation_autoset", "_commit_hash",
    # training-only or used by heads we do not build
    "initializer_range", "initializer_factor", "attention_dropout", "dropout", "projection_dim",
    "pad_token_id", "bos_token_id", "eos_token_id",
}
_TEXT_ACTIVATIONS = ("quick_gelu", "gelu")


def _check_activation(component: str, act: str) -> None:
    """The CLIP towers' MLP activations we implement (SD 1.x: quick_gelu; SD 2.x's OpenCLIP: gelu)."""
    if act not in _TEXT_ACTIVATIONS:
        raise ConfigError(f"{component} config: unsupported value hidden_act={act!r} (supported: {_TEXT_ACTIVATIONS})")


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # SD 1.x (OpenAI ViT-L/14); SD 2.x (OpenCLIP ViT-H) uses "gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "CLIPTextConfig":
        if "text_config" in raw:  # a full CLIPModel config: take its text half
            raw = raw["text_config"]
        read = {f.name for f in fields(cls)}
        check_keys("text_encoder", raw, read, _HF_GENERIC | _BOOKKEEPING)
        _check_activation("text_encoder", raw.get("hidden_act", "quick_gelu"))
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})

    @classmethod
    def from_file(cls, path: str | Path) -> "CLIPTextConfig":
        return cls.from_dict(load_json_object(path))


# --------------------------------------------------------------------------------------------------- CLIP vision

@dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers' CLIPVisionConfig: a ViT over `patch_size` squares of an `image_size` square picture."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_positions(self) -> int:
        """The patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "CLIPVisionConfig":
        check_keys("safety_checker vision_config", raw, {f.name for f in fields(cls)}, _HF_GENERIC | _BOOKKEEPING)
        config = cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})
        _check_activation("safety_checker vision_config", config.hidden_act)
        if config.image_size % config.patch_size or config.hidden_size % config.num_attention_heads:
            raise ConfigError(f"safety_checker vision_config: image_size={config.image_size} must be a multiple of "
                              f"patch_size={config.patch_size} and hidden_size={config.hidden_size} of "
                              f"num_attention_heads={config.num_attention_heads}")
        return config


# --------------------------------------------------------------------------------------------------- safety checker

_SAFETY_IGNORED = {"text_config", "text_config_dict", "logit_scale_init_value", "initializer_factor",
                   "initializer_range"}  # the text tower and the contrastive logit scale are not part of the checker


@dataclass(frozen=True)
class SafetyCheckerConfig:
    """diffusers' StableDiffusionSafetyChecker config (a transformers CLIPConfig): the vision tower and the width of
    the projected image embedding that is compared with the concept embeddings."""

    vision: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "SafetyCheckerConfig":
        if not isinstance(raw, dict):
            raise ConfigError("safety_checker config: expected a JSON object")
        check_keys("safety_checker", raw, {"vision_config", "vision_config_dict", "projection_dim"},
                   _SAFETY_IGNORED | _HF_GENERIC | _BOOKKEEPING)
        parts = [raw.get("vision_config") or {}, raw.get("vision_config_dict") or {}]
        if not all(isinstance(part, dict) for part in parts):
            raise ConfigError("safety_checker config: vision_config and vision_config_dict must be JSON objects")
        # Configs written by transformers < 4.23 repeat the non-default values in vision_config_dict; as in
        # transformers' CLIPConfig, those win.
        vision = {**parts[0], **parts[1]}
        projection_dim = raw.get("projection_dim", 512)
        if isinstance(projection_dim, bool) or not isinstance(projection_dim, int) or projection_dim < 1:
            raise ConfigError(f"safety_checker config: projection_dim={projection_dim!r} must be a positive integer")
        return cls(vision=CLIPVisionConfig.from_dict(vision), projection_dim=projection_dim)

    @classmethod
    def from_file(cls, path: str | Path) -> "SafetyCheckerConfig":
        return cls.from_dict(load_json_object(path))

"""Frozen configs for the networks, parsed from each component's `config.json`.

Every key of a config file is either read, ignored on purpose (bookkeeping, or a training-only value), or pinned
to the one value we implement. Anything else fails loudly with the field named, so a checkpoint we do not support
is refused at load time instead of giving wrong pictures. Every value read is checked too: sizes are ints (not bools)
>= 1, lists hold what they should, epsilons and scales are finite positive numbers, the heads divide the width they
split and norm_num_groups every channel count; `from_file` names the file in the error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..validation import BOOL, POSITIVE, ConfigError, Rule, check_keys, int_at_least, is_int, optional

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


POSITIVE_INT: Rule = int_at_least(1)


def _ints(value: Any) -> bool:
    """A non-empty JSON list of ints >= 1."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(is_int(v) and v >= 1 for v in value)


INT_LIST: Rule = _ints, "a non-empty list of ints >= 1"
INT_OR_LIST: Rule = (lambda v: (is_int(v) and v >= 1) or _ints(v)), "an int >= 1 or a list of them, one per level"
TEXT_LIST: Rule = ((lambda v: isinstance(v, (list, tuple)) and all(isinstance(t, str) for t in v)),
                   "a list of block names")
# A default picture size: one int, or [height, width] of equal ints (diffusers accepts a pair; every SD pipeline
# multiplies it as a number, so only a square one has a meaning here).
SAMPLE_SIZE: Rule = ((lambda v: (is_int(v) and v >= 1) or (isinstance(v, (list, tuple)) and len(v) == 2
                                                            and all(is_int(x) and x >= 1 for x in v) and v[0] == v[1])),
                     "an int >= 1 (or a pair of equal ones: a non-square default size is not supported)")


def _read(kind: str, raw: dict[str, Any], name: str, default: Any, rule: Rule) -> Any:
    """The field's value (`default` when absent), checked: a ConfigError names the field, the value and what it
    must be."""
    value = raw.get(name, default)
    test, what = rule
    if not test(value):
        raise ConfigError(f"{kind} config: {name}={value!r} must be {what}")
    return value


def _per_level(kind: str, name: str, value: Any, levels: int) -> tuple[int, ...]:
    """An int, or one int per UNet level (the value already checked as INT_OR_LIST)."""
    if is_int(value):
        return (value,) * levels
    value = tuple(value)
    if len(value) != levels:
        raise ConfigError(f"{kind} config: {name} has {len(value)} entries for {levels} levels")
    return value


def _sample_size(value: Any) -> int:
    """A checked SAMPLE_SIZE as one int."""
    return value[0] if isinstance(value, (list, tuple)) else value


def _check_groups(kind: str, groups: int, channels: tuple[int, ...]) -> None:
    """GroupNorm splits every channel count of the network into `groups` equal groups."""
    if bad := [c for c in channels if c % groups]:
        raise ConfigError(f"{kind} config: norm_num_groups={groups} must divide every channel count of "
                          f"block_out_channels={list(channels)} (not {', '.join(map(str, bad))})")


def _with_file(path: Path, error: ConfigError) -> ConfigError:
    """A parse error of a config file, with the file named first."""
    return ConfigError(f"{path}: {error}")


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
        field = lambda name, default, rule: _read("unet", raw, name, default, rule)
        blocks = tuple(field("block_out_channels", cls.block_out_channels, INT_LIST))
        levels = len(blocks)
        down = tuple(field("down_block_types", cls.down_block_types, TEXT_LIST))
        up = tuple(field("up_block_types", cls.up_block_types, TEXT_LIST))
        for name, types, allowed in (("down_block_types", down, _DOWN_TYPES), ("up_block_types", up, _UP_TYPES)):
            if len(types) != levels:
                raise ConfigError(f"unet config: {name} has {len(types)} entries for {levels} levels")
            for t in types:
                if t not in allowed:
                    raise ConfigError(f"unet config: unsupported block {t!r} in {name} (supported: {allowed})")
        # diffusers' SD UNets store the *number of heads* under attention_head_dim; num_attention_heads wins if set.
        heads_name = "num_attention_heads" if raw.get("num_attention_heads") is not None else "attention_head_dim"
        heads = _per_level("unet", heads_name, field(heads_name, 8, INT_OR_LIST), levels)
        # Each attention splits its level's channels into equal heads. (diffusers builds a narrower attention,
        # heads x (channels // heads) wide, when they do not divide; its checkpoints then do not fit this UNet.)
        attending = {i for i, t in enumerate(down) if t.startswith("CrossAttn")} | {levels - 1}  # + the mid block
        attending |= {levels - 1 - k for k, t in enumerate(up) if t.startswith("CrossAttn")}
        for i in sorted(attending):
            if blocks[i] % heads[i]:
                raise ConfigError(f"unet config: {heads_name}={raw.get(heads_name, 8)!r} gives {heads[i]} attention "
                                  f"heads at level {i}, which do not divide its {blocks[i]} channels "
                                  "(diffusers' SD UNets store the number of heads under this name)")
        layers = _per_level("unet", "transformer_layers_per_block",
                            field("transformer_layers_per_block", 1, INT_OR_LIST), levels)
        groups = raw.get("norm_num_groups", 32)
        if groups is None:
            raise ConfigError("unet config: norm_num_groups=None is not supported")
        groups = field("norm_num_groups", 32, POSITIVE_INT)
        _check_groups("unet", groups, blocks)
        sample = raw.get("sample_size")
        return cls(
            in_channels=field("in_channels", 4, POSITIVE_INT),
            out_channels=field("out_channels", 4, POSITIVE_INT),
            block_out_channels=blocks,
            down_block_types=down,
            up_block_types=up,
            layers_per_block=_int_only("unet", "layers_per_block", field("layers_per_block", 2, INT_OR_LIST)),
            num_heads=heads,
            transformer_layers_per_block=layers,
            cross_attention_dim=_int_only("unet", "cross_attention_dim",  # absent: diffusers' default, 1280
                                          field("cross_attention_dim", 1280, INT_OR_LIST)),
            norm_num_groups=groups,
            norm_eps=field("norm_eps", 1e-5, POSITIVE),
            use_linear_projection=bool(field("use_linear_projection", False, optional(BOOL))),  # null: off
            upcast_attention=bool(field("upcast_attention", False, optional(BOOL))),
            # diffusers' default is None (no default size); ours 64, SD 1.x's latent side
            sample_size=64 if sample is None else _sample_size(field("sample_size", 64, SAMPLE_SIZE)),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "UNetConfig":
        raw = load_json_object(path)
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise _with_file(_config_path(path), e) from None


def _config_path(path: str | Path) -> Path:
    """The config file a path names (a folder: its config.json), as `load_json_object` reads it."""
    path = Path(path)
    return path / "config.json" if path.is_dir() else path


def _int_only(kind: str, name: str, value: Any) -> int:
    if not is_int(value):
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
        """An absent key takes diffusers' AutoencoderKL default (one level of 64 channels, one ResNet per block,
        sample_size 32), not SD's values: the network and the tile size are the ones diffusers builds. (Absent block
        types are one per level, where diffusers' single one would not run with several levels.)"""
        read = {f.name for f in fields(cls)} | {"down_block_types", "up_block_types"}
        check_keys("vae", raw, read, _VAE_IGNORED | _BOOKKEEPING, _VAE_PINNED)
        field = lambda name, default, rule: _read("vae", raw, name, default, rule)
        blocks = tuple(field("block_out_channels", (64,), INT_LIST))
        for name, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = tuple(field(name, (allowed,) * len(blocks), TEXT_LIST))
            if len(types) != len(blocks) or any(t != allowed for t in types):
                raise ConfigError(f"vae config: unsupported {name}={list(types)} (expected {allowed} per level)")
        groups = field("norm_num_groups", 32, POSITIVE_INT)
        _check_groups("vae", groups, blocks)  # the VAE's attention has one head: nothing to divide there
        return cls(
            in_channels=field("in_channels", 3, POSITIVE_INT),
            out_channels=field("out_channels", 3, POSITIVE_INT),
            block_out_channels=blocks,
            layers_per_block=_int_only("vae", "layers_per_block", field("layers_per_block", 1, INT_OR_LIST)),
            latent_channels=field("latent_channels", 4, POSITIVE_INT),
            norm_num_groups=groups,
            scaling_factor=float(field("scaling_factor", 0.18215, POSITIVE)),
            sample_size=_sample_size(field("sample_size", 32, SAMPLE_SIZE)),  # the tile size of vae_tiling
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "VAEConfig":
        raw = load_json_object(path)
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise _with_file(_config_path(path), e) from None


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
            if not isinstance(raw, dict):
                raise ConfigError("text_encoder config: text_config must be a JSON object")
        read = {f.name for f in fields(cls)}
        check_keys("text_encoder", raw, read, _HF_GENERIC | _BOOKKEEPING)
        return cls(**_clip_tower_fields("text_encoder", raw, cls))

    @classmethod
    def from_file(cls, path: str | Path) -> "CLIPTextConfig":
        raw = load_json_object(path)
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise _with_file(_config_path(path), e) from None


def _clip_tower_fields(kind: str, raw: dict[str, Any], cls) -> dict[str, Any]:
    """A CLIP text or vision config's values, each checked (sizes are ints >= 1, layer_norm_eps a positive number,
    the activation one we implement), and the heads dividing the width as transformers requires; the dataclass's
    default for an absent field."""
    defaults = {f.name: f.default for f in fields(cls)}
    values = {}
    for name, default in defaults.items():
        if name == "hidden_act":
            _check_activation(kind, raw.get(name, default))
            values[name] = raw.get(name, default)
        else:
            values[name] = _read(kind, raw, name, default, POSITIVE if name == "layer_norm_eps" else POSITIVE_INT)
    if values["hidden_size"] % values["num_attention_heads"]:
        raise ConfigError(f"{kind} config: num_attention_heads={values['num_attention_heads']} must divide "
                          f"hidden_size={values['hidden_size']} (each head takes an equal share of the width)")
    return values


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
        kind = "safety_checker vision_config"
        check_keys(kind, raw, {f.name for f in fields(cls)}, _HF_GENERIC | _BOOKKEEPING)
        config = cls(**_clip_tower_fields(kind, raw, cls))
        if config.image_size % config.patch_size:
            raise ConfigError(f"{kind}: image_size={config.image_size} must be a multiple of "
                              f"patch_size={config.patch_size}")
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
        raw = load_json_object(path)
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise _with_file(_config_path(path), e) from None


# --------------------------------------------------------------------------------------------------- model_index.json

# diffusers' schedulers for SD pipelines (its KarrasDiffusionSchedulers, the `_compatibles` of DDIMScheduler), less
# EDMEulerScheduler (a model trained for EDM's sigmas: its config has no beta schedule for DDIM to read). DiffEdit
# samples with DDIM whatever the folder ships, reading the scheduler's betas and prediction type; any other class
# (flow matching, LCM, TCD, ...) belongs to a model DDIM does not sample.
SD_SCHEDULERS = (
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverSDEScheduler",
)
# The inverse schedulers diffusers' DiffEdit pipeline takes (it saves the one it ran with).
INVERSE_SCHEDULERS = ("DDIMInverseScheduler", "DPMSolverMultistepInverseScheduler")
# component -> the [library, class] entries we build it from; each is required.
MODEL_INDEX_CLASSES: dict[str, tuple[list[str], ...]] = {
    "unet": (["diffusers", "UNet2DConditionModel"],),
    "vae": (["diffusers", "AutoencoderKL"],),
    "text_encoder": (["transformers", "CLIPTextModel"],),
    "tokenizer": (["transformers", "CLIPTokenizer"], ["transformers", "CLIPTokenizerFast"]),
    "scheduler": tuple(["diffusers", name] for name in SD_SCHEDULERS),
}
_OPTIONAL_INDEX = {"inverse_scheduler": tuple(["diffusers", name] for name in INVERSE_SCHEDULERS),
                   "image_encoder": ()}  # only absent or none: an IP-Adapter image encoder is not used
# Read by `diffedit/safety.py` (checker, image processor, requires_safety_checker), or bookkeeping.
_INDEX_ELSEWHERE = {"safety_checker", "feature_extractor", "requires_safety_checker", "_class_name",
                    "_diffusers_version", "_name_or_path"}


def _named(entry: Any) -> bool:
    """A model_index.json entry that names a component (not absent, null or [null, null])."""
    return entry is not None and entry != [None, None]


def check_parts_fit(unet: UNetConfig, vae: VAEConfig, text: CLIPTextConfig) -> None:
    """The three networks' configs fit together: the UNet takes and predicts the VAE's latents and attends to the
    text encoder's states. A ConfigError names the fields otherwise (before any weight is read), where the first
    edit would fail deep in a convolution or a matmul."""
    latents = vae.latent_channels
    if unet.in_channels != latents:
        kind = " (an inpainting UNet: latents + mask + masked-image latents)" if unet.in_channels == 2 * latents + 1 \
            else ""
        raise ConfigError(f"the UNet's in_channels is {unet.in_channels} but the VAE's latent_channels is "
                          f"{latents}{kind}; DiffEdit runs on a text-to-image model whose UNet takes the latents alone")
    if unet.out_channels != latents:
        raise ConfigError(f"the UNet's out_channels is {unet.out_channels} but the VAE's latent_channels is "
                          f"{latents}; the UNet must predict one value per latent channel")
    if unet.cross_attention_dim != text.hidden_size:
        raise ConfigError(f"the UNet's cross_attention_dim is {unet.cross_attention_dim} but the text "
                          f"encoder's hidden_size is {text.hidden_size}; the UNet and text encoder come from different "
                          "models")


def check_model_index(raw: dict[str, Any], path: str | Path) -> None:
    """A model folder's model_index.json names, for each component we build, the class we build it as (diffusers'
    [library, class] pairs, `MODEL_INDEX_CLASSES`), and no component we would leave out (an SDXL `text_encoder_2`,
    say); the scheduler may be any of `SD_SCHEDULERS`, since DiffEdit samples with DDIM from its config. One
    ConfigError names the file and the entry. (The safety checker's entries are `safety.load_safety_components`'.)"""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    for name, allowed in {**MODEL_INDEX_CLASSES, **_OPTIONAL_INDEX}.items():
        entry = raw.get(name)
        if name in MODEL_INDEX_CLASSES and not _named(entry):
            raise ConfigError(f"{path}: no {name} entry; a Stable Diffusion folder names it ({allowed[0]})")
        if _named(entry) and entry not in allowed:
            if name == "scheduler":
                what = f"DiffEdit samples with DDIM from the config of one of diffusers' SD schedulers: " \
                       f"{', '.join(SD_SCHEDULERS)}"
            else:
                what = f"diffedit builds {' or '.join(map(str, allowed))}" if allowed else "set it to [null, null]"
            raise ConfigError(f"{path}: unsupported {name} {entry!r}; {what}")
    if unknown := sorted(set(raw) - set(MODEL_INDEX_CLASSES) - set(_OPTIONAL_INDEX) - _INDEX_ELSEWHERE):
        raise ConfigError(f"{path}: unknown component(s) {', '.join(unknown)}; diffedit loads Stable Diffusion 1.x "
                          f"/ 2.x folders ({', '.join(MODEL_INDEX_CLASSES)}, optionally inverse_scheduler, "
                          "safety_checker, feature_extractor)")

"""The original (CompVis / LDM) single-file layout of Stable Diffusion checkpoints, next to `weights.py`.

One .safetensors holds the whole model under three prefixes:
- `model.diffusion_model.`: the UNet, in LDM's numbering (`input_blocks.N.M`, `middle_block.M`, `output_blocks.N.M`,
  `time_embed`, `out`), ResNets named `in_layers` / `emb_layers` / `out_layers` / `skip_connection`;
- `first_stage_model.`: the VAE (`encoder.down.I.block.J`, `mid.block_1`, `mid.attn_1.{q,k,v,proj_out}` as 1x1
  convolutions, `nin_shortcut`, `norm_out`; the decoder's `up.I` counted from the lowest resolution);
- the text encoder: `cond_stage_model.transformer.text_model.` (OpenAI CLIP, SD 1.x: the transformers keys; files
  written with transformers < 4.x lack `text_model.`, which is put back) or
  `cond_stage_model.model.` (OpenCLIP, SD 2.x: `resblocks.I` with q, k and v fused into `attn.in_proj_weight/bias`,
  `positional_embedding`, `token_embedding`, `ln_final`).

The key tables are built from our modules' own state-dict keys (so from the configs), never listed per model. Reading
is strict like `weights.load_state`: files of another kind (SDXL, SD 3, an inpainting UNet, a VAE on its own, a LoRA,
every key under a training wrapper's prefix, no tensors) are named in one line first (`other_kind`); then every key
of the file is used or is one of the known unused entries below, every shape and dtype is checked (a floating-point
weight stored as integers is refused; the UNet's proj_in / proj_out exactly as the config has them, a convolution
in SD 1.x and a matrix in SD 2.x), and one WeightsError lists every problem. Known unused entries (diffusers'
converter skips them too):
- `model_ema.*`: EMA copies of the UNet (diffusers loads the non-EMA weights unless asked; so do we);
- the training schedule's buffers (`betas`, `alphas_cumprod`, ...) and CLIP's `position_ids`;
- OpenCLIP's `text_projection` and `logit_scale` (used by image-text similarity only), and its last residual block,
  which SD 2.x never runs (it conditions on the penultimate layer; diffusers' text encoder has one layer fewer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .config import UNetConfig, VAEConfig
from ..validation import PICKLE_SUFFIXES
from .weights import IGNORED_KEYS, WeightsError, key_problems, not_floating, read_safetensors, shape_fits

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
OPENAI_CLIP_PREFIX = "cond_stage_model.transformer.text_model."
_OPENAI_CLIP_BARE = "cond_stage_model.transformer."  # the same without transformers' text_model level
OPEN_CLIP_PREFIX = "cond_stage_model.model."
TEXT_LAYOUTS = ("openai", "openclip")  # SD 1.x, SD 2.x
# diffusers' SD 1.x / 2.x test (infer_diffusers_model_type): this key's context width is 1024 on SD 2.x only.
SD2_PROBE = UNET_PREFIX + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"

_SCHEDULE_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights",
}
_UNUSED_OPEN_CLIP = ("text_projection", "logit_scale")
# A UNet transformer's projections: 1x1 convolutions in SD 1.x, matrices in SD 2.x (use_linear_projection), as the
# original files store them. Their shape must be the config's exactly (diffusers' converter is as strict): in files of
# equal widths it is what tells an SD 1.x file from an SD 2.x one.
_UNET_PROJECTION = re.compile(r"\.proj_(in|out)\.weight$")

# Leaf renames (start of the key after the block's prefix), ours -> the file's.
_UNET_RESNET = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
                "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection."}
_VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
_VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
_OPEN_CLIP_LAYER = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "self_attn.out_proj.": "attn.out_proj.",
                    "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}
_FUSED_QKV = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")


@dataclass(frozen=True)
class Slot:
    """Where one of our tensors sits in the single file: `key`, whole, or row block `part` of `parts` equal blocks
    (OpenCLIP's fused q, k, v); `conv` when the file stores our linear weight as a 1x1 convolution (VAE attention)."""

    key: str
    part: int = 0
    parts: int = 1
    conv: bool = False


# --------------------------------------------------------------------------------------------------- tables

Table = list[tuple[str, str, dict[str, str]]]  # (our prefix, the file's prefix, leaf renames)


def unet_table(config: UNetConfig) -> Table:
    """Our UNet block prefixes -> LDM's, from the config's levels and layers_per_block."""
    n = config.layers_per_block
    levels = len(config.block_out_channels)
    table = [("time_embedding.linear_1.", "time_embed.0.", {}), ("time_embedding.linear_2.", "time_embed.2.", {}),
             ("conv_in.", "input_blocks.0.0.", {}), ("conv_norm_out.", "out.0.", {}), ("conv_out.", "out.2.", {}),
             ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
             ("mid_block.attentions.0.", "middle_block.1.", {}),
             ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET)]
    for i in range(levels):  # encoder: input block 1 + i*(n+1) + j
        for j in range(n):
            block = 1 + i * (n + 1) + j
            table += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0.", _UNET_RESNET),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.", {})]
        table.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{1 + i * (n + 1) + n}.0.op.", {}))
    for k, block_type in enumerate(config.up_block_types):  # decoder: output block k*(n+1) + j
        for j in range(n + 1):
            block = k * (n + 1) + j
            table += [(f"up_blocks.{k}.resnets.{j}.", f"output_blocks.{block}.0.", _UNET_RESNET),
                      (f"up_blocks.{k}.attentions.{j}.", f"output_blocks.{block}.1.", {})]
        upsampler = 2 if block_type.startswith("CrossAttn") else 1  # after the attention, when there is one
        table.append((f"up_blocks.{k}.upsamplers.0.", f"output_blocks.{k * (n + 1) + n}.{upsampler}.", {}))
    return [(ours, UNET_PREFIX + theirs, leaves) for ours, theirs, leaves in table]


def vae_table(config: VAEConfig) -> Table:
    """Our VAE prefixes -> LDM's; the decoder's up blocks are numbered from the lowest resolution there."""
    levels = len(config.block_out_channels)
    table = [("encoder.conv_norm_out.", "encoder.norm_out.", {}), ("decoder.conv_norm_out.", "decoder.norm_out.", {})]
    for part in ("encoder", "decoder"):
        table += [(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION)]
    for i in range(levels):
        up = levels - 1 - i
        table += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET)
                  for j in range(config.layers_per_block)]
        table += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.", _VAE_RESNET)
                  for j in range(config.layers_per_block + 1)]  # the decoder has one ResNet more per level
        table += [(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", {}),
                  (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample.", {})]
    table.append(("", "", {}))  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
    return [(ours, VAE_PREFIX + theirs, leaves) for ours, theirs, leaves in table]


def text_table(layers: int, layout: str) -> Table:
    """Our CLIP text encoder's prefixes -> the file's: OpenAI's (transformers' keys) or OpenCLIP's."""
    if layout == "openai":
        return [("", OPENAI_CLIP_PREFIX, {})]
    table = [("embeddings.token_embedding.", "token_embedding.", {}),
             ("embeddings.position_embedding.weight", "positional_embedding", {}),
             ("final_layer_norm.", "ln_final.", {})]
    table += [(f"encoder.layers.{i}.", f"transformer.resblocks.{i}.", _OPEN_CLIP_LAYER) for i in range(layers)]
    return [(ours, OPEN_CLIP_PREFIX + theirs, leaves) for ours, theirs, leaves in table]


def _slot(key: str, table: Table) -> Slot:
    """The file slot of one of our keys: the longest matching prefix of the table, then the leaf renames."""
    ours, theirs, leaves = max((row for row in table if key.startswith(row[0])), key=lambda row: len(row[0]),
                               default=(None, None, None))
    if ours is None:
        raise KeyError(f"no single-file name for {key}")  # a model bug: the tables cover every module
    leaf = key[len(ours):]
    fused = _FUSED_QKV.match(leaf) if theirs.startswith(OPEN_CLIP_PREFIX) else None
    if fused:  # q, k, v are the three row blocks of OpenCLIP's in_proj
        return Slot(f"{theirs}attn.in_proj_{fused.group(2)}", "qkv".index(fused.group(1)), 3)
    for old, new in leaves.items():
        if leaf.startswith(old):
            leaf = new + leaf[len(old):]
            break
    conv = leaves is _VAE_ATTENTION and leaf.endswith("weight") and not leaf.startswith("norm.")
    return Slot(theirs + leaf, conv=conv)


def layout(modules: dict[str, nn.Module], text_layout: str) -> dict[str, dict[str, Slot]]:
    """For each component ("unet", "vae", "text_encoder"), our state-dict key -> its slot in the single file."""
    if text_layout not in TEXT_LAYOUTS:
        raise ValueError(f"text_layout must be one of {TEXT_LAYOUTS}, not {text_layout!r}")
    text = modules["text_encoder"]
    tables = {"unet": unet_table(modules["unet"].config), "vae": vae_table(modules["vae"].config),
              "text_encoder": text_table(text.config.num_hidden_layers, text_layout)}
    return {name: {key: _slot(key, tables[name]) for key in modules[name].state_dict()} for name in tables}


def text_layout_of(keys) -> str | None:
    """"openclip" or "openai" by the text encoder's prefix in the file's keys; None when it has neither."""
    keys = list(keys)
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in keys):
        return "openclip"
    if any(k.startswith(_OPENAI_CLIP_BARE) for k in keys):
        return "openai"
    return None


def other_kind(state: dict[str, torch.Tensor]) -> str | None:
    """What a file that is no SD 1.x / 2.x text-to-image checkpoint is, with what to do, by keys or shapes such files
    always have; None for anything else (whose keys `split_state` then checks one by one)."""
    keys = list(state)
    if not keys:
        return "empty (it holds no tensors)"
    starts = lambda *prefixes: any(k.startswith(prefixes) for k in keys)
    if starts("lora_unet_", "lora_te") or any(".lora_down." in k or ".lora_A." in k for k in keys):
        return "a LoRA file: load it onto a model with load_lora_weights (--lora on the command line)"
    if starts("conditioner.embedders."):
        return "an SDXL checkpoint (text encoders under conditioner.embedders.), which diffedit does not read"
    if starts(UNET_PREFIX + "joint_blocks.", "text_encoders."):
        return "an SD 3 checkpoint (an MMDiT, not a UNet), which diffedit does not read"
    conv_in = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    latents = state.get(VAE_PREFIX + "post_quant_conv.weight")  # (z, z, 1, 1): the VAE's latent channels
    n, z = (conv_in.shape[1], latents.shape[1]) if conv_in is not None and latents is not None else (0, 0)
    if n != z:
        what = "an inpainting checkpoint" if n == 2 * z + 1 else "not a text-to-image checkpoint"
        return (f"{what} (its UNet takes {n} input channels, its VAE gives {z}), which diffedit does not read: "
                "DiffEdit masks and edits with a text-to-image model")
    if all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in keys):
        return "a VAE on its own, which diffedit does not read"
    for wrapper in ("state_dict.", "module."):
        if all(k.startswith(wrapper) for k in keys):
            return (f"a checkpoint with every key under a {wrapper} prefix (a training wrapper's), which diffedit "
                    "does not strip: save the tensors again without it")
    return None


def is_sd2(state: dict[str, torch.Tensor]) -> bool:
    """diffusers' rule: SD 2.x when the UNet's second input block cross-attends to 1024-wide text states."""
    return SD2_PROBE in state and state[SD2_PROBE].shape[-1] == 1024


def _known_unused(key: str, text_layers: int) -> bool:
    """Entries of original checkpoints that the model does not use (see the module docstring)."""
    if key in _SCHEDULE_BUFFERS or key.startswith("model_ema.") or IGNORED_KEYS.search(key):
        return True
    if key in (OPEN_CLIP_PREFIX + name for name in _UNUSED_OPEN_CLIP):
        return True
    return key.startswith(f"{OPEN_CLIP_PREFIX}transformer.resblocks.{text_layers}.")  # the layer SD 2.x skips


# --------------------------------------------------------------------------------------------------- read / write


def read_single_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The file's tensors; a pickle (.ckpt, .pt, .bin) is refused without being opened."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(f"{path} is a pickle checkpoint; diffedit loads safetensors only: convert it to "
                           ".safetensors first (e.g. load it with torch and save it with safetensors.torch.save_file)")
    if path.suffix.lower() != ".safetensors":
        raise WeightsError(f"{path}: a single-file checkpoint is a .safetensors file")
    state = read_safetensors([path])
    kind = other_kind(state)
    if kind:
        raise WeightsError(f"{path} is {kind}; from_single_file reads one SD 1.x / 2.x text-to-image checkpoint (UNet, "
                           "VAE and text encoder under model.diffusion_model., first_stage_model. and "
                           "cond_stage_model.)")
    return state


def split_state(state: dict[str, torch.Tensor], modules: dict[str, nn.Module], source: str,
                text_layout: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """A single file's tensors -> one state dict per component in our key names, every key and shape checked.

    `modules` (built from the configs, e.g. on the meta device) give the expected keys and shapes. Raises one
    WeightsError listing the missing, unexpected and mis-shaped entries under the file's names.
    """
    state = {_with_text_model(k): v for k, v in state.items()}
    text_layout = text_layout or text_layout_of(state) or "openai"
    slots = layout(modules, text_layout)
    text_layers = modules["text_encoder"].config.num_hidden_layers
    wanted: dict[str, tuple] = {}  # file key -> expected shape (blocks of a fused key summed)
    floating: set[str] = set()  # file keys of tensors the model holds in floating point
    for name, table in slots.items():
        expected = modules[name].state_dict()
        for key, slot in table.items():
            shape = tuple(expected[key].shape)
            if slot.parts > 1:
                shape = (shape[0] * slot.parts, *shape[1:])
            wanted[slot.key] = shape + ((1, 1) if slot.conv else ())
            if expected[key].is_floating_point():
                floating.add(slot.key)
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(k for k in set(state) - set(wanted) if not _known_unused(k, text_layers))
    exact = {slot.key for key, slot in slots["unet"].items() if _UNET_PROJECTION.search(key)}
    misshaped = sorted(f"{k} {tuple(state[k].shape)} != {wanted[k]}" for k in set(wanted) & set(state)
                       if not (tuple(state[k].shape) == wanted[k] if k in exact
                               else shape_fits(state[k], torch.Size(wanted[k]))))
    wrong_dtype = not_floating(state, floating, 8)
    problems = key_problems(missing, unexpected, misshaped, 8) + ([f"  {wrong_dtype}"] if wrong_dtype else [])
    if problems and not (missing or unexpected or misshaped):  # this model's checkpoint, with damaged values
        raise WeightsError(f"{source}: its keys and shapes are this model's, but the {wrong_dtype}")
    if problems:
        raise WeightsError("\n".join([f"{source}: not a single-file checkpoint of this model ({_describe(state)}, "
                                      f"{'OpenCLIP' if text_layout == 'openclip' else 'OpenAI CLIP'} text encoder "
                                      "expected)", *problems]))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, table in slots.items():
        out[name] = {key: state[s.key].chunk(s.parts, dim=0)[s.part] if s.parts > 1 else state[s.key]
                     for key, s in table.items()}
    return out


def _with_text_model(key: str) -> str:
    """An OpenAI CLIP key of an old file (`cond_stage_model.transformer.encoder...`) under transformers' names."""
    if key.startswith(_OPENAI_CLIP_BARE) and not key.startswith(OPENAI_CLIP_PREFIX):
        return OPENAI_CLIP_PREFIX + key[len(_OPENAI_CLIP_BARE):]
    return key


def _describe(state: dict[str, torch.Tensor]) -> str:
    """What the file seems to hold, for the error's first line."""
    layout_name = text_layout_of(state)
    parts = [part for part, prefix in (("UNet", UNET_PREFIX), ("VAE", VAE_PREFIX))
             if any(k.startswith(prefix) for k in state)]
    text = {"openai": "OpenAI CLIP", "openclip": "OpenCLIP", None: "no text encoder"}[layout_name]
    return f"the file has {' + '.join(parts) or 'no UNet or VAE'}, {text}"


def join_state(states: dict[str, dict[str, torch.Tensor]], modules: dict[str, nn.Module],
               text_layout: str) -> dict[str, torch.Tensor]:
    """The reverse of `split_state`: our per-component state dicts -> the single file's tensors (q, k, v fused
    for OpenCLIP, VAE attention weights as 1x1 convolutions). OpenCLIP's unused entries are not written."""
    fused: dict[str, list] = {}
    out: dict[str, torch.Tensor] = {}
    for name, table in layout(modules, text_layout).items():
        for key, slot in table.items():
            value = states[name][key].detach()
            if slot.parts > 1:
                fused.setdefault(slot.key, [None] * slot.parts)[slot.part] = value
            else:
                out[slot.key] = value[..., None, None] if slot.conv and value.ndim == 2 else value
    out.update({key: torch.cat(blocks, dim=0) for key, blocks in fused.items()})
    return out


def save_single_file_state(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write single-file tensors as one .safetensors (metadata format "pt", as the hub's files)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: a single-file checkpoint is written as .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu().contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path

"""The one place that knows checkpoint files: safetensors reading, key normalization, and the checked copy.

Our modules are named after the diffusers/transformers keys, so loading is a copy with every key and shape checked.
The only translations, each for a reason:
- `text_model.` prefix: hub CLIP checkpoints carry it; transformers 5 saves without it. We strip it.
- `*.position_ids`: a constant buffer some CLIP checkpoints store; we compute it instead, so it is ignored.
- `vision_model.vision_model.` (the safety checker's vision tower as transformers < 5 saved it, the hub's files)
  is `vision_model.`, as transformers 5 saves it.
- legacy VAE attention names (`query`, `key`, `value`, `proj_attn`, written by diffusers < 0.14) map to
  `to_q`, `to_k`, `to_v`, `to_out.0`.
- a 1x1 convolution weight (out, in, 1, 1) and a linear weight (out, in) are the same numbers; either is accepted.
Weights are read from safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..validation import FileError, listed


class WeightsError(FileError):
    """A weight file that is missing, unreadable, or does not fit the model, with the file named."""


# Base file names per component kind, as the diffusers / transformers `save_pretrained` write them.
_DIFFUSERS_NAME = "diffusion_pytorch_model"
_TRANSFORMERS_NAME = "model"
_PICKLE_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin", "model.ckpt", "diffusion_pytorch_model.ckpt")

IGNORED_KEYS = re.compile(r"(^|\.)position_ids$")
_LEGACY_VAE = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_VAE_KEY = re.compile(r"^(.*attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def weight_files(folder: Path, base: str, variant: str | None = None) -> list[Path]:
    """The safetensors file(s) of one component folder: single file or sharded with an index, optional variant."""
    suffix = f".{variant}" if variant else ""
    single = folder / f"{base}{suffix}.safetensors"
    if single.is_file():
        return [single]
    index = folder / f"{base}.safetensors.index{suffix}.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightsError(f"weight index {index} is unreadable: {e}") from None
        return [folder / s for s in shards]
    pickles = [p.name for p in map(folder.joinpath, _PICKLE_NAMES) if p.is_file()]
    if pickles:
        raise WeightsError(f"{folder} holds only pickle weights ({', '.join(pickles)}); diffedit loads safetensors "
                           "only: convert them to .safetensors, or pick a revision that has them")
    if variant and (folder / f"{base}.safetensors").is_file():
        raise WeightsError(f"{folder} has no '{variant}' variant ({single.name}); drop variant= to load "
                           f"{base}.safetensors")
    raise WeightsError(f"missing weight file {single}")


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Read one or more safetensors files into one state dict (CPU, stored dtype)."""
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise WeightsError(f"missing weight file {f}")
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise WeightsError(f"weight file {f} is truncated or corrupt ({e})") from None
    return state


def normalize_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply the translations listed in the module docstring (prefix, ignored buffers, legacy VAE names)."""
    out = {}
    for key, value in state.items():
        if IGNORED_KEYS.search(key):
            continue
        if key.startswith("text_model."):
            key = key[len("text_model."):]
        if key.startswith("vision_model.vision_model."):
            key = key[len("vision_model."):]
        m = _LEGACY_VAE_KEY.match(key)
        if m:
            key = f"{m.group(1)}.{_LEGACY_VAE[m.group(2)]}.{m.group(3)}"
        out[key] = value
    return out


def shape_fits(value: torch.Tensor, shape: torch.Size) -> bool:
    """Same shape, or the same matrix seen as a 1x1 convolution or as a linear layer."""
    if value.shape == shape:
        return True
    squeeze = lambda s: tuple(s[:2]) if len(s) == 4 and tuple(s[2:]) == (1, 1) else tuple(s)
    return squeeze(value.shape) == squeeze(shape)


def key_problems(missing: list[str], unexpected: list[str], misshaped: list[str], limit: int) -> list[str]:
    """The lines of a key mismatch's error, one per non-empty kind, each listing at most `limit` keys."""
    return [f"  {label}: {listed(keys, limit)}" for label, keys in
            (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]


def not_floating(state: dict[str, torch.Tensor], floating: set[str], limit: int = 6) -> str:
    """The problem, or "": tensors of `state` whose keys the model holds in floating point (`floating`) stored as
    integers or bools (a damaged or mislabelled file: converting them would run the model on truncated weights)."""
    wrong = sorted(f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in state.items()
                   if k in floating and not v.is_floating_point())
    if not wrong:
        return ""
    return (f"weights the model holds in floating point are stored as integers or bools: {listed(wrong, limit)}; "
            "a damaged or mislabelled file (save them as float32, float16 or bfloat16)")


def load_state(module: nn.Module, state: dict[str, torch.Tensor], source: str,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Copy a checkpoint into `module` after checking every key and shape; fail once, listing every problem.

    `module` may live on the meta device: its parameters are then replaced by the checkpoint's tensors, converted to
    `dtype` on `device` (no random initialization of a model that is about to be overwritten).
    """
    state = normalize_keys(state)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
                       for k in set(state) & set(expected) if not shape_fits(state[k], expected[k].shape))
    problems = key_problems(missing, unexpected, misshaped, 12)
    if problems:
        raise WeightsError("\n".join([f"{source}: weights do not fit the model", *problems]))
    if wrong := not_floating(state, {k for k, v in expected.items() if v.is_floating_point()}):
        raise WeightsError(f"{source}: {wrong}")
    ready = {k: state[k].reshape(expected[k].shape).to(device=device, dtype=_cast(state[k], dtype))
             for k in expected}
    assert len(ready) == len(expected), "every key of the model is copied exactly once"
    # A result that cannot be right is an error: NaN / inf weights give black pictures and full masks downstream.
    bad = sorted(k for k, t in ready.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise WeightsError(f"{source}: non-finite values (NaN or inf) in {listed(bad, 6)}: a damaged file, a diverged "
                           f"training run, or values too large for {str(dtype).removeprefix('torch.')}")
    module.load_state_dict(ready, strict=True, assign=True)
    for name, buf in module.named_buffers():
        if buf.is_meta:
            raise WeightsError(f"{source}: buffer {name} was not restored (a model bug, not a checkpoint problem)")
    return module


def _cast(value: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """Floating-point tensors take the requested dtype; integer tensors keep theirs."""
    return dtype if value.is_floating_point() else value.dtype


def save_component(module: nn.Module, raw_config: dict, folder: str | Path, kind: str,
                   dtype: torch.dtype | None = None) -> Path:
    """Write a component the way `save_pretrained` does: config.json plus one safetensors file (`save_state`);
    floating-point weights in `dtype` when given."""
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in module.state_dict().items()}
    return save_state(state, raw_config, folder, kind)


def save_state(state: dict[str, torch.Tensor], raw_config: dict, folder: str | Path, kind: str) -> Path:
    """Write a component's state dict (our module's key names) as config.json plus one safetensors file.

    kind: "diffusers" (unet, vae: diffusion_pytorch_model.safetensors) or "transformers" (text encoder:
    model.safetensors, keys with the hub's `text_model.` prefix).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "transformers":
        state = {f"text_model.{k}": v for k, v in state.items()}
        name = _TRANSFORMERS_NAME
    elif kind == "diffusers":
        name = _DIFFUSERS_NAME
    else:
        raise ValueError(f"kind must be 'diffusers' or 'transformers', not {kind!r}")
    (folder / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")
    save_file(state, str(folder / f"{name}.safetensors"), metadata={"format": "pt"})
    return folder


def component_weights(folder: Path, kind: str, variant: str | None = None) -> dict[str, torch.Tensor]:
    """Read a component folder's weights (see `save_component` for the kinds)."""
    base = _TRANSFORMERS_NAME if kind == "transformers" else _DIFFUSERS_NAME
    return read_safetensors(weight_files(folder, base, variant))

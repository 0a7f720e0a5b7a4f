"""LoRA adapters (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685): the key
knowledge of LoRA files and the low-rank branches that run them on our UNet and text encoder.

A LoRA adds, to a linear or convolution layer W, the branch  scale * B(A(x)):  A ("down", rank r rows) reads the
layer's input with the layer's own kernel, stride and padding, B ("up", a 1x1 map) writes the layer's output width.
The scale is alpha / r per layer (the kohya `.alpha` value; alpha = r, scale 1, when a file stores none; a layer
without one, in a file whose other layers of that network have one, takes their most common alpha, as diffusers
reads it), times the adapter's weight (`set_adapters`), times the call's LoRA scale (`DiffEditParams.lora_scale`,
diffusers' `cross_attention_kwargs={"scale": s}`): the rule of diffusers 0.42.1 + peft (`peft_utils.get_peft_kwargs`,
`LoraLayer.set_scale` / `scale_layer`). One difference on purpose: an attention projection's own `.alpha` that is
not the most common one is kept (as kohya and A1111 run it); diffusers' converter loses it.

Files (safetensors only), each key mapped onto one of our modules (our attribute names are diffusers' keys):
- diffusers / peft: `unet.<module>.lora_A.weight`, `.lora_B.weight`; `text_encoder.text_model.<module>...`; the older
  attention-processor keys `...attn1.processor.to_q_lora.down.weight` (to_out_lora = to_out.0; q_proj ... out_proj
  in the text encoder), `...lora.down.weight` and `...lora_linear_layer.down.weight`; alphas from the
  `lora_adapter_metadata` header diffusers writes (lora_alpha, alpha_pattern, r, rank_pattern) or `.alpha` keys
  (which diffusers 0.42.1 refuses in this layout; we read them as kohya's);
- kohya / A1111: `lora_unet_<module with _ for .>.lora_down.weight`, `.lora_up.weight`, `.alpha`, and
  `lora_te_text_model_<module>...`. The flattened names are matched against our own module names, so every layer
  with a LoRA key is found (attention, proj_in / proj_out, feed-forward, ResNet convolutions, 3x3 LoCon with a 1x1
  up) without diffusers' string heuristics.

How it runs: a forward hook on each targeted layer adds the branches of the active adapters to the layer's output.
A hook, not a wrapper module or a parametrization, because it leaves the base model's modules and state_dict keys
exactly as they are (loading and saving a base model do not change), every caller of the layer sees the branch (the
cross-attention keys and values `TextKV` computes once per loop included), and the branch stays unmerged as peft
runs it, B(A(x)) * scale added to W x, so the numbers match diffusers + peft closely. The call's scale is set by the
caller for the duration of a step (`LoraAdapters.scaled`, a context manager), never left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save, save_file
from torch import nn

from ..validation import is_number
from .weights import WeightsError

NETWORKS = ("unet", "text_encoder")  # the networks a LoRA file may adapt, by diffusers' key prefix
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header entry (peft LoraConfig fields per network)
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name in a save directory
_KOHYA_PREFIX = {"lora_unet_": ("unet", ""), "lora_te_": ("text_encoder", "text_model_")}
_UNSUPPORTED = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "hada_": "LoHa (LyCORIS)",
                "lokr_": "LoKr (LyCORIS)", "lora_mid": "LoCon with a CP-decomposed mid layer", "lora_te1_": "SDXL",
                "lora_te2_": "SDXL", "text_encoder_2.": "SDXL", "lora_B.bias": "LoRA-with-biases",
                "lora_up.bias": "LoRA-with-biases"}
_UNSUPPORTED_ENDING = {".diff": "full-weight-difference", ".diff_b": "full-weight-difference",  # LyCORIS "full"
                       ".w_norm": "LyCORIS norm-layer", ".b_norm": "LyCORIS norm-layer"}
_PROCESSOR_KEY = re.compile(r"^(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_PART_KEY = re.compile(r"^(.+)\.(lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|"
                       r"lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|alpha)$")
_PART = {"lora_A.weight": "down", "lora.down.weight": "down", "lora_linear_layer.down.weight": "down",
         "lora_B.weight": "up", "lora.up.weight": "up", "lora_linear_layer.up.weight": "up", "alpha": "alpha"}
_PROCESSOR_TARGET = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                     "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}


@dataclass(frozen=True)
class LowRank:
    """One adapter's low-rank pair on one layer."""

    down: torch.Tensor  # A: (r, in) for a linear layer, (r, in, kh, kw) for a convolution
    up: torch.Tensor  # B: (out, r), or (out, r, 1, 1) for a convolution
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        """alpha / r, the factor every LoRA convention puts on B A."""
        return self.alpha / self.rank

    def to(self, device: torch.device, dtype: torch.dtype) -> LowRank:
        """The same pair on `device` in `dtype` (where its layer now runs)."""
        return LowRank(self.down.to(device, dtype), self.up.to(device, dtype), self.alpha)

    def branch(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """B(A(x)), unscaled, in the layer's output shape."""
        down, up = self.down, self.up
        if isinstance(layer, nn.Conv2d):
            h = F.conv2d(x, down, stride=layer.stride, padding=layer.padding, dilation=layer.dilation)  # (B, r, h, w)
            return F.conv2d(h, up)  # (B, out, h, w)
        return F.linear(F.linear(x, down), up)  # (..., r) -> (..., out)

    def delta(self) -> torch.Tensor:
        """B A as a weight of the layer's shape, unscaled: (out, in) or (out, in, kh, kw)."""
        if self.down.ndim == 2:
            return self.up @ self.down
        return torch.einsum("or,rihw->oihw", self.up[:, :, 0, 0], self.down)


Adapter = dict[str, dict[str, LowRank]]  # network name -> module name -> its low-rank pair


# ------------------------------------------------------------------------------------------------ reading files


def lora_file(path: str | Path, weight_name: str | None = None) -> Path:
    """The LoRA file a path names: the path itself, or in a folder the file `weight_name` (diffusers'
    pytorch_lora_weights.safetensors by default), as diffusers' `load_lora_weights` finds it."""
    path = Path(path)
    if path.is_dir():
        inside = path / (weight_name or WEIGHT_NAME)
        if not inside.is_file():
            raise WeightsError(f"LoRA folder {path} has no {inside.name}; pass weight_name= with the .safetensors "
                               "file's name in it")
        return inside
    if weight_name is not None:
        raise WeightsError(f"weight_name={weight_name!r} names a file in a folder, but {path} is not a folder; give "
                           "the folder, or the file alone")
    return path


def read_lora_file(path: str | Path, networks: dict[str, nn.Module]) -> Adapter:
    """A LoRA file's pairs, each checked against the layer of `networks` ({"unet": ..., "text_encoder": ...}) that
    it adapts (`lora_from_tensors`)."""
    path = Path(path)
    tensors, header = _read(path)
    return lora_from_tensors(tensors, header, f"LoRA file {path}", networks)


def lora_from_tensors(tensors: dict[str, torch.Tensor], header: dict[str, str], source: str,
                      networks: dict[str, nn.Module]) -> Adapter:
    """The pairs of a LoRA state dict (a file's tensors and header metadata, or a dict given in Python); any key
    that maps to no layer, a value that is not a finite floating-point weight, a pair that does not fit its layer,
    or a format we do not read is one WeightsError naming `source` and the fix."""
    layers = {network: _layers(module) for network, module in networks.items()}
    parts = _parts(source, tensors, layers)
    alphas = _metadata_alphas(source, header)
    usual = _usual_alphas(parts)
    adapter: Adapter = {}
    for (network, name), found in sorted(parts.items()):
        layer = layers[network][name]
        if "down" not in found or "up" not in found:
            missing = "lora_up / lora_B" if "down" in found else "lora_down / lora_A"
            raise WeightsError(f"{source}: {network}.{name} has no {missing} weight: the file is incomplete")
        down, up = _fitted(source, network, name, layer, found["down"], found["up"])
        if down.shape[0] == 0:
            raise WeightsError(f"{source}: {network}.{name} has rank 0 (an empty pair): the file is damaged")
        alpha = found.get("alpha", usual.get(network))
        alpha = alphas(network, name, down.shape[0]) if alpha is None else alpha
        if not is_number(alpha):
            raise WeightsError(f"{source}: the alpha of {network}.{name} is {alpha!r}, not a finite number")
        adapter.setdefault(network, {})[name] = LowRank(down, up, float(alpha))
    if not adapter:
        raise WeightsError(f"{source} holds no LoRA weights: give a LoRA .safetensors file")
    return adapter


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors and header metadata; a pickle or anything else is refused."""
    if not path.exists():
        raise WeightsError(f"LoRA file {path} does not exist: give a .safetensors file or a folder holding "
                           f"{WEIGHT_NAME} on this machine")
    if path.suffix != ".safetensors" or not path.is_file():
        raise WeightsError(f"LoRA file {path} is not a .safetensors file: diffedit never unpickles .bin/.ckpt/.pt "
                           "files; convert it to .safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"LoRA file {path} is truncated or corrupt ({str(e).splitlines()[0]}); download it "
                           "again") from None


def _parts(source: str, tensors: dict[str, torch.Tensor],
           layers: dict[str, dict[str, nn.Module]]) -> dict[tuple[str, str], dict]:
    """(network, module name) -> {"down": A, "up": B, "alpha": float}, from keys in any supported layout;
    `layers`: each network's `_layers`. One layer given twice (two layouts in one file) is refused."""
    flat = {network: {name.replace(".", "_"): name for name in names} for network, names in layers.items()}
    parts: dict[tuple[str, str], dict] = {}
    keys: dict[tuple[str, str, str], str] = {}  # (network, name, part) -> the key that gave it
    for key, value in tensors.items():
        what = ([w for marker, w in _UNSUPPORTED.items() if marker in key]
                + [w for ending, w in _UNSUPPORTED_ENDING.items() if key.endswith(ending)])
        if what:
            raise WeightsError(f"{source} is a {what[0]} file (key {key}), which diffedit does not read: "
                               "use a plain LoRA for SD 1.x / 2.x")
        network, name, part = _locate(key, layers, flat)
        if network is None and _locate(f"unet.{key}", layers, flat)[0]:
            raise WeightsError(f"{source}: key {key} names a UNet layer without the unet. prefix (a file written by "
                               "UNet2DConditionModel.save_attn_procs, or a bare peft state dict), which diffusers' "
                               "load_lora_weights skips: add the prefix to its keys to load it")
        if network is None:
            raise WeightsError(f"{source}: key {key} maps to no layer of this model: a LoRA for another "
                               "architecture (SDXL, another UNet) or a format diffedit does not read")
        if (network, name, part) in keys:
            raise WeightsError(f"{source}: {keys[network, name, part]} and {key} both give the {part} of "
                               f"{network}.{name}: a file mixing two LoRA layouts for one layer; keep one")
        keys[network, name, part] = key
        parts.setdefault((network, name), {})[part] = _checked_value(source, key, value, part)
    return parts


def _checked_value(source: str, key: str, value, part: str) -> torch.Tensor | float:
    """A weight as a floating-point tensor, an alpha as a float; both finite, or a WeightsError naming the key."""
    if not isinstance(value, torch.Tensor):
        raise WeightsError(f"{source}: {key} is a {type(value).__name__}, not a tensor")
    integer_alpha = part == "alpha" and value.dtype != torch.bool and not value.is_complex()
    if not value.is_floating_point() and not integer_alpha:  # kohya trainers write some alphas as int64
        raise WeightsError(f"{source}: {key} holds {str(value.dtype).removeprefix('torch.')} values; LoRA weights "
                           "are floating point (a quantized or damaged file)")
    if part == "alpha" and value.numel() != 1:
        raise WeightsError(f"{source}: {key} holds {value.numel()} values; an alpha is one number per layer")
    if not bool(torch.isfinite(value).all()):
        raise WeightsError(f"{source}: {key} holds non-finite values (NaN or inf): a damaged file or a diverged "
                           "training run")
    return float(value.item()) if part == "alpha" else value


def _locate(key: str, layers: dict[str, dict[str, nn.Module]],
            flat: dict[str, dict[str, str]]) -> tuple[str | None, str, str]:
    """(network, module name, "down" | "up" | "alpha") of one key, or (None, "", "") when it names no layer.
    `flat`: per network, kohya's flattened layer names (dots as underscores) -> our module names."""
    for prefix, (network, inner) in _KOHYA_PREFIX.items():
        if key.startswith(prefix):
            flat_name, _, part = key[len(prefix):].partition(".")
            kohya = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(part)
            name = flat[network].get(flat_name[len(inner):] if flat_name.startswith(inner) else None)
            return (network, name, kohya) if kohya and name else (None, "", "")
    network, _, rest = key.partition(".")
    if network not in layers:
        return None, "", ""
    if network == "text_encoder":
        rest = rest.removeprefix("text_model.")
    m = _PROCESSOR_KEY.match(rest)
    if m:
        name, part = f"{m.group(1)}.{_PROCESSOR_TARGET[network][m.group(2)]}", m.group(3)
    else:
        m = _PART_KEY.match(rest)
        if not m:
            return None, "", ""
        name, part = m.group(1), _PART[m.group(2)]
    return (network, name, part) if name in layers[network] else (None, "", "")


def _layers(network: nn.Module) -> dict[str, nn.Module]:
    """The layers a LoRA can adapt, by module name: every nn.Linear and nn.Conv2d."""
    return {n: m for n, m in network.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _fitted(source: str, network: str, name: str, layer: nn.Module, down: torch.Tensor,
            up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B in the layer's form (a 1x1 convolution's pair may come as matrices, and the reverse), or an error
    saying the LoRA belongs to another model."""
    weight = layer.weight
    out_width, in_width = weight.shape[:2]
    if isinstance(layer, nn.Conv2d):
        kernel = tuple(weight.shape[2:])
        down = down.reshape(*down.shape, 1, 1) if down.ndim == 2 and kernel == (1, 1) else down
        up = up.reshape(*up.shape, 1, 1) if up.ndim == 2 else up
        want_down, want_up = (down.shape[0], in_width, *kernel), (out_width, down.shape[0], 1, 1)
    else:
        down = down.reshape(down.shape[:2]) if down.ndim == 4 and tuple(down.shape[2:]) == (1, 1) else down
        up = up.reshape(up.shape[:2]) if up.ndim == 4 and tuple(up.shape[2:]) == (1, 1) else up
        want_down, want_up = (down.shape[0], in_width), (out_width, down.shape[0])
    if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
        raise WeightsError(f"{source} does not fit this model: {network}.{name} takes A {want_down} and B "
                           f"{want_up} but the file has {tuple(down.shape)} and {tuple(up.shape)}: a LoRA trained "
                           "for another base model (e.g. SD 2.x on SD 1.x); use one made for this model")
    # Where the layer runs, in memory of their own: a tensor read from a file may sit at any offset of it, and
    # oneDNN's kernels round differently on differently aligned buffers (1e-7 between two copies of one LoRA).
    return (down.to(weight.device, weight.dtype, copy=True, memory_format=torch.contiguous_format),
            up.to(weight.device, weight.dtype, copy=True, memory_format=torch.contiguous_format))


def _usual_alphas(parts: dict[tuple[str, str], dict]) -> dict[str, float]:
    """Per network, the alpha of its layers that have no `.alpha` key of their own: the most common of its `.alpha`
    values (the first met on a tie), as diffusers' `get_peft_kwargs` makes it peft's lora_alpha; a network without
    `.alpha` keys is absent (its alphas come from the metadata header, or are the ranks)."""
    given: dict[str, Counter] = {}
    for (network, _), found in parts.items():  # in the file's key order
        if "alpha" in found:
            given.setdefault(network, Counter())[found["alpha"]] += 1
    return {network: counts.most_common(1)[0][0] for network, counts in given.items()}


def _metadata_alphas(source: str, header: dict[str, str]):
    """alpha(network, module name, rank) from diffusers' `lora_adapter_metadata` header (peft's lora_alpha and
    alpha_pattern, matched as peft's `get_pattern_key` does); the rank (scale 1) when the file has none."""
    if METADATA_KEY not in header:
        return lambda network, name, rank: rank
    try:
        meta = json.loads(header[METADATA_KEY])
    except ValueError:
        raise WeightsError(f"{source}: its {METADATA_KEY} header is not JSON; re-save the file") from None
    variants = sorted(k for k in meta if k.endswith((".use_rslora", ".use_dora")) and meta[k])
    if variants:  # another scale rule (alpha / sqrt(r)) or another layer: refused rather than run wrong
        raise WeightsError(f"{source} is a {', '.join(variants)} adapter, which diffedit does not read: use a "
                           "plain LoRA")

    def alpha(network: str, name: str, rank: int) -> float:
        patterns = meta.get(f"{network}.alpha_pattern") or {}
        for pattern, value in patterns.items():
            if re.match(rf"(.*\.)?({pattern})$", name):
                return value
        return meta.get(f"{network}.lora_alpha", rank)

    return alpha


def file_digest(path: str | Path) -> str:
    """The first 16 hex digits of the file's SHA-256: which LoRA file an adapter came from, by content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """`file_digest` of a LoRA given as a dict: the SHA-256 of its safetensors serialization."""
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    return hashlib.sha256(data).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ writing files


def save_lora_file(adapter: Adapter, path: str | Path) -> Path:
    """Write one adapter in diffusers' layout: peft keys (`unet.<module>.lora_A.weight`; the text encoder's under
    `text_encoder.text_model.`) and the `lora_adapter_metadata` header with each network's rank and alpha (the most
    common as r / lora_alpha, the others as rank_pattern / alpha_pattern), which diffusers' `load_lora_weights`
    reads back."""
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, object] = {}
    for network, layers in adapter.items():
        prefix = f"{network}.text_model" if network == "text_encoder" else network
        for name, pair in layers.items():
            tensors[f"{prefix}.{name}.lora_A.weight"] = pair.down.detach().cpu().contiguous()
            tensors[f"{prefix}.{name}.lora_B.weight"] = pair.up.detach().cpu().contiguous()
        metadata.update({f"{network}.{k}": v for k, v in _peft_config(layers).items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    return path


def _peft_config(layers: dict[str, LowRank]) -> dict:
    """peft LoraConfig fields for these layers: anchored exact-name patterns for ranks and alphas off the mode."""
    r = Counter(p.rank for p in layers.values()).most_common(1)[0][0]
    alpha = Counter(p.alpha for p in layers.values()).most_common(1)[0][0]
    exact = lambda name: "^" + re.escape(name)
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(layers),
            "rank_pattern": {exact(n): p.rank for n, p in layers.items() if p.rank != r},
            "alpha_pattern": {exact(n): p.alpha for n, p in layers.items() if p.alpha != alpha}}


# ------------------------------------------------------------------------------------------------ running adapters


class LoraAdapters:
    """The adapters loaded into one model: their pairs, which are active with what weight, the hooks that run them,
    the call's scale per network, and the original weights of fused layers (so unfusing restores them exactly)."""

    def __init__(self):
        self.adapters: dict[str, Adapter] = {}
        self.weights: dict[str, float] = {}  # the active adapters, in order, and their weights
        self.digests: dict[str, str] = {}  # adapter -> `file_digest` of the file it was read from
        self._layers: dict[tuple[str, str], nn.Module] = {}
        self._hooks: dict[tuple[str, str], torch.utils.hooks.RemovableHandle] = {}
        self._scales: dict[str, float] = {}
        self._fused: set[tuple[str, str]] = set()  # (adapter, network) pairs added into the weights
        self._originals: dict[tuple[str, str], torch.Tensor] = {}
        self.enabled = True  # False: no branch runs (diffusers' disable_lora); fused weights stay fused

    def add(self, name: str, adapter: Adapter, networks: dict[str, nn.Module], digest: str = "") -> None:
        """Attach an adapter and make it the only active one, weight 1 (as diffusers' load_lora_weights does);
        `digest` names the file it came from (`file_digest`)."""
        if name in self.adapters:
            raise ValueError(f"adapter name {name!r} is already in use; pass another adapter_name")
        for network, layers in adapter.items():
            modules = _layers(networks[network])
            for module_name in layers:
                key = (network, module_name)
                if key not in self._hooks:
                    self._layers[key] = modules[module_name]
                    self._hooks[key] = modules[module_name].register_forward_hook(self._hook(*key))
        self.adapters[name] = adapter
        self.digests[name] = digest
        self.weights = {name: 1.0}

    def record(self) -> list[list]:
        """What the adapters change, for a saved inversion to compare: [file digest, weight] of each active
        adapter, in order, then [file digest, "fused"] of each fused (adapter, network)."""
        running = [[self.digests[a], w] for a, w in self.weights.items()] if self.enabled else []
        return running + sorted([self.digests[a], f"fused {n}"] for a, n in self._fused)

    def next_name(self) -> str:
        """diffusers' default adapter name: default_<number of adapters loaded so far>."""
        return f"default_{len(self.adapters)}"

    def set_active(self, names: list[str], weights: list[float]) -> None:
        """These adapters run, in this order, with these weights; the others are loaded but idle."""
        self.check_names(names)
        self.weights = dict(zip(names, map(float, weights)))

    def delete(self, names: list[str]) -> None:
        """Forget these adapters (diffusers' delete_adapters); the other active ones keep running. A fused adapter is
        in the weights, so it is refused: unfuse first."""
        self.check_names(names)
        fused = sorted({a for a, _ in self._fused if a in names})
        if fused:
            raise ValueError(f"adapter(s) {', '.join(map(repr, fused))} are fused into the weights; unfuse_lora() "
                             "before deleting them")
        for name in names:
            del self.adapters[name], self.digests[name]
            self.weights.pop(name, None)

    def check_names(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ValueError(f"adapter(s) {', '.join(map(repr, unknown))} not loaded; loaded: "
                             f"{', '.join(map(repr, self.adapters)) or 'none'}")

    @contextlib.contextmanager
    def scaled(self, network: str, scale: float) -> Iterator[None]:
        """Run the block with `network`'s adapters at this LoRA scale (diffusers' cross_attention_kwargs scale)."""
        previous = self._scales.get(network, 1.0)
        self._scales[network] = float(scale)
        try:
            yield
        finally:
            self._scales[network] = previous

    def _hook(self, network: str, name: str):
        def add_branches(layer: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            running = [a for a in self.weights if self.enabled and (a, network) not in self._fused
                       and name in self.adapters[a].get(network, {})]
            if not running:
                return None
            scale, x = self._scales.get(network, 1.0), inputs[0]
            for adapter in running:  # peft: scaling = weight * alpha / r, times the call's scale
                pair = self.adapters[adapter][network][name]
                if pair.down.device != x.device or pair.down.dtype != x.dtype:  # the layer moved (offload, .to)
                    pair = self.adapters[adapter][network][name] = pair.to(x.device, x.dtype)  # once, not per call
                output = output + pair.branch(layer, x) * (self.weights[adapter] * pair.scale * scale)
            return output
        return add_branches

    @torch.no_grad()
    def fuse(self, networks: tuple[str, ...], lora_scale: float, names: list[str] | None,
             safe_fusing: bool = False) -> None:
        """Add the adapters' B A, times weight * alpha / r * lora_scale, into the layers' weights of `networks`
        (the originals kept); a fused adapter no longer runs as a branch there. `safe_fusing`: weights that would
        not be finite are refused before anything changes."""
        names = list(self.weights) if names is None else names
        self.check_names(names)
        todo = [(name, network) for name in names for network in networks if (name, network) not in self._fused]
        fused: dict[tuple[str, str], torch.Tensor] = {}  # layer -> its new weight
        for name, network in todo:  # an adapter already fused is in the weights once (peft skips it too)
            for module_name, pair in self.adapters[name].get(network, {}).items():
                key = (network, module_name)
                weight = fused.get(key, self._layers[key].weight)
                factor = self.weights.get(name, 1.0) * pair.scale * lora_scale
                fused[key] = weight + (pair.delta() * factor).to(weight)
        if safe_fusing and not all(bool(torch.isfinite(w).all()) for w in fused.values()):
            raise ValueError("fusing the LoRA gives non-finite (NaN or inf) weights: the LoRA file is broken")
        for key, weight in fused.items():
            self._originals.setdefault(key, self._layers[key].weight.detach().clone())
            self._layers[key].weight.copy_(weight)
        self._fused.update(todo)

    @torch.no_grad()
    def unfuse(self, networks: tuple[str, ...]) -> None:
        """Put back the exact original weights of the fused layers of `networks`."""
        for key in [k for k in self._originals if k[0] in networks]:
            self._layers[key].weight.copy_(self._originals.pop(key))
        self._fused = {(a, n) for a, n in self._fused if n not in networks}

    def remove_all(self) -> None:
        """Detach every adapter (fused weights stay fused, as after diffusers' fuse_lora + unload_lora_weights)."""
        for handle in self._hooks.values():
            handle.remove()
        for state in (self.adapters, self.weights, self.digests, self._layers, self._hooks, self._scales,
                      self._originals):
            state.clear()
        self._fused.clear()
        self.enabled = True

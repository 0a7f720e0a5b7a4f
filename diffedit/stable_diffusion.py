"""Stable Diffusion's parts, loaded from a diffusers-layout folder or a hub repo id.

A folder holds model_index.json and one sub-folder per component: unet/, vae/, text_encoder/ (config.json +
safetensors), tokenizer/ and scheduler/ (scheduler_config.json); inverse_scheduler/ is optional (the official SD
repos ship none, so we build the inverse DDIM from the forward scheduler's config). safety_checker/ and
feature_extractor/ are loaded when model_index.json names them (`safety.load_safety_components`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .locations import ModelNotFoundError, model_location
from .memory import ModelOffload, model_cpu_offload
from .params import EDIT_DEFAULTS_FILE, plain_number, read_edit_defaults
from .models.clip_text import CLIPTextModel
from .models.lora import (NETWORKS, WEIGHT_NAME, LoraAdapters, file_digest, lora_file, lora_from_tensors,
                          read_lora_file, save_lora_file, tensors_digest)
from .models.config import CLIPTextConfig, ConfigError, UNetConfig, VAEConfig, check_model_index, check_parts_fit
from .models.image_processor import CLIPImageProcessor
from .models.safety_checker import StableDiffusionSafetyChecker
from .models import textual_inversion
from .models.tokenizer import CLIPTokenizer
from .models.unet import UNet2DConditionModel
from .models.vae import AutoencoderKL
from .models.weights import WeightsError, component_weights, load_state
from .safety import load_safety_components
from .validation import is_number
from .schedulers.ddim import DDIMConfig, DDIMInverseScheduler, DDIMScheduler

_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class StableDiffusion:
    """The components DiffEdit runs on. Not a module: a plain holder, so each part stays what it is."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: DDIMScheduler
    inverse_scheduler: DDIMInverseScheduler
    edit_defaults: dict = field(default_factory=dict)
    source: str = ""  # what it was loaded from, as given: a folder, a hub repo id or a single .safetensors file
    # the local folder it was loaded from (a hub repo's cache snapshot), or its single file; None if built
    folder: Path | None = None
    safety_checker: StableDiffusionSafetyChecker | None = None  # None: no checker (the shipped model has none)
    feature_extractor: CLIPImageProcessor | None = None  # prepares decoded pictures for the safety checker
    # Memory options (diffedit/memory.py), read by the method's VAE calls and the offload hooks
    vae_slicing: bool = False
    vae_tiling: bool = False
    offload: ModelOffload | None = field(default=None, repr=False, compare=False)
    lora: LoraAdapters = field(default_factory=LoraAdapters, repr=False)  # LoRA adapters (models/lora.py)

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def device(self) -> torch.device:
        """Where inputs go: the UNet's device, or under model CPU offload the accelerator the networks run on."""
        return self.offload.device if self.offload is not None else next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def enable_vae_slicing(self) -> None:
        """Encode and decode one image of a batch at a time (less memory for batches; same numbers)."""
        self.vae_slicing = True

    def disable_vae_slicing(self) -> None:
        self.vae_slicing = False

    def enable_vae_tiling(self) -> None:
        """Encode and decode images larger than the VAE's sample_size in overlapping, blended tiles (memory
        independent of the image size; slightly different numbers, as diffusers' tiled VAE)."""
        self.vae_tiling = True

    def disable_vae_tiling(self) -> None:
        self.vae_tiling = False

    def compile_unet(self, mode: str = "default") -> None:
        """torch.compile the UNet in place (`nn.Module.compile`, in torch.compile's `mode`; the weights stay
        parameters, never frozen constants, so LoRA, fusing and moves stay right). Names, state-dict keys and hooks are
        unchanged. The first call at each new input shape compiles (minutes for the shipped model on a CPU); the
        numbers stay the same up to float rounding. "reduce-overhead" adds CUDA graphs on a GPU (README, Speed)."""
        self.unet.compile(mode=mode)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None) -> StableDiffusion:
        """Move the networks (UNet, VAE, text encoder, safety checker; learned words and LoRA branches with them)
        to `device` and/or cast them to `dtype`, both checked as `from_pretrained` checks them, before anything
        moves. Refused under model CPU offload, which places each network itself (`remove_all_hooks()` first).
        Casting is the same as loading in that dtype: the same weights, bit for bit."""
        where = None if device is None else checked_device(device)
        kind = None if dtype is None else checked_dtype(dtype)
        if self.offload is not None and where is not None:
            raise ValueError(f"to({where}): model CPU offload is on and places each network itself; call "
                             "remove_all_hooks() first")
        for network in (self.unet, self.vae, self.text_encoder, self.safety_checker):
            if network is not None:
                network.to(device=where, dtype=kind)
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device | None = None) -> None:
        """Keep the networks on the CPU and move each to the accelerator (`device`, default the available one,
        index `gpu_id`) only while it runs. Without an accelerator: a warning, and nothing changes."""
        self.offload = model_cpu_offload(self, gpu_id, device)

    def maybe_free_model_hooks(self) -> None:
        """Under model CPU offload, send the network still on the accelerator back to the CPU; else nothing."""
        if self.offload is not None:
            self.offload.free()

    def remove_all_hooks(self) -> None:
        """End model CPU offload: the hooks go and every network is placed on the accelerator it ran on."""
        if self.offload is not None:
            self.offload.remove()
            self.offload = None

    def load_textual_inversion(self, pretrained_model_name_or_path: textual_inversion.Source | list,
                               token: str | list[str | None] | None = None) -> list[str]:
        """Add learned words (textual inversion) as diffusers' `load_textual_inversion` does: a safetensors file
        or folder (diffusers, kohya or A1111 layout), a state dict or a tensor, or a list of them with a list of
        tokens; return the tokens added. Every prompt of every step then reads them (models/textual_inversion.py)."""
        embeddings = textual_inversion.read_embeddings(pretrained_model_name_or_path, token)
        return textual_inversion.load(self.tokenizer, self.text_encoder, embeddings)

    def unload_textual_inversion(self, tokens: str | list[str] | None = None) -> None:
        """Remove the named learned words (each with all its vectors), or all of them."""
        textual_inversion.unload(self.tokenizer, self.text_encoder, tokens)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, device: str | torch.device | None = "cpu",
                        dtype: torch.dtype | str | None = torch.float32, revision: str | None = None,
                        variant: str | None = None) -> "StableDiffusion":
        """Load every component; weights in any stored dtype are converted to `dtype` on `device`.

        device: "cpu" (None: the same), "cuda", "cuda:N", "mps" or a torch.device, present on this machine; dtype:
        torch.float32 (None: the same), torch.float16 or torch.bfloat16, or its name ("float16"). Anything else is
        a ValueError (a TypeError for a device that is neither a name nor a torch.device) naming `device` or
        `dtype`, before anything is read (`checked_device`, `checked_dtype`)."""
        device, dtype = checked_device(device), checked_dtype(dtype)
        folder = resolve_model_folder(path_or_repo_id, revision, variant)
        if folder.is_file():
            raise ModelNotFoundError(f"{folder} is a single-file checkpoint: load it with "
                                     "StableDiffusion.from_single_file")
        index = folder / "model_index.json"
        if not index.is_file():
            raise ModelNotFoundError(f"{folder} is not a diffusers model folder: model_index.json is missing")
        for name in _COMPONENTS:
            if not (folder / name).is_dir():
                raise ModelNotFoundError(f"{folder} has no {name}/ folder")
        model_index = _read(index, lambda: json.loads(index.read_text()))
        check_model_index(model_index, index)
        configs = {name: config_cls.from_file(folder / name / "config.json") for name, config_cls in
                   (("unet", UNetConfig), ("vae", VAEConfig), ("text_encoder", CLIPTextConfig))}
        check_parts_fit(configs["unet"], configs["vae"], configs["text_encoder"])  # before any weight is read
        safety_checker, feature_extractor = load_safety_components(folder, model_index, str(path_or_repo_id),
                                                                   device, dtype, variant)

        def build(name: str, module_cls, kind: str):
            config = configs[name]
            with torch.device("meta"):
                module = module_cls(config)
            state = component_weights(folder / name, kind, variant)
            return load_state(module, state, f"{name}/", device, dtype).eval().requires_grad_(False)

        scheduler_file = folder / "scheduler" / "scheduler_config.json"
        scheduler_config = _read(scheduler_file, lambda: DDIMConfig.from_file(scheduler_file))
        inverse_file = folder / "inverse_scheduler" / "scheduler_config.json"
        inverse_config = (_read(inverse_file, lambda: DDIMConfig.from_file(inverse_file, inverse=True))
                          if inverse_file.is_file() else scheduler_config)
        return cls(
            tokenizer=_read(folder / "tokenizer", lambda: CLIPTokenizer.from_folder(folder / "tokenizer")),
            text_encoder=build("text_encoder", CLIPTextModel, "transformers"),
            unet=build("unet", UNet2DConditionModel, "diffusers"),
            vae=build("vae", AutoencoderKL, "diffusers"),
            scheduler=DDIMScheduler(scheduler_config),
            inverse_scheduler=DDIMInverseScheduler(inverse_config),
            edit_defaults=read_edit_defaults(folder),
            source=str(path_or_repo_id),
            folder=folder,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
        )

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path: str | os.PathLike,
                         config: str | os.PathLike | None = None, device: str | torch.device | None = "cpu",
                         dtype: torch.dtype | str | None = torch.float32,
                         prediction_type: str | None = None) -> "StableDiffusion":
        """Load an original-layout (CompVis / LDM) .safetensors checkpoint holding the UNet, VAE and text encoder.

        config: a diffusers model folder or hub repo id whose configs, tokenizer and scheduler go with the weights;
        without it the file's keys say SD 1.x or SD 2.x (diffusers' rule) and the official SD 1.5 / SD 2.1 configs
        are used, SD 2.x assumed v-prediction as diffusers does (SD 2 base is epsilon: say so).
        prediction_type: overrides the scheduler's ("epsilon", "v_prediction", "sample"). device and dtype: as
        `from_pretrained` takes them, checked before the file is read.
        Strict like `from_pretrained`: one WeightsError lists every missing, unexpected or mis-shaped entry; a
        pickle (.ckpt) is refused. See `checkpoint_file` and `models/single_file.py`.
        """
        from .checkpoint_file import load_single_file

        return load_single_file(pretrained_model_link_or_path, config, checked_device(device), checked_dtype(dtype),
                                prediction_type)

    # --------------------------------------------------------------------------------------------- LoRA
    # diffusers' names and arguments; the substance is in models/lora.py.

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
                          adapter_name: str | None = None, weight_name: str | None = None) -> None:
        """Load a LoRA (diffusers or kohya layout, UNet and/or text encoder) as a new adapter, which becomes the only
        active one (weight 1): a .safetensors file, a folder holding `weight_name` (diffusers'
        pytorch_lora_weights.safetensors by default), or a state dict of tensors. `adapter_name` defaults to
        diffusers' default_<n>."""
        networks = self._lora_networks()
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, dict):
            if weight_name is not None:
                raise ValueError("weight_name= names a file in a folder; a LoRA given as a dict has none")
            adapter = lora_from_tensors(source, {}, "LoRA state dict", networks)
            digest = tensors_digest(source)
        elif isinstance(source, (str, os.PathLike)):
            path = lora_file(source, weight_name)
            adapter, digest = read_lora_file(path, networks), file_digest(path)
        else:
            raise TypeError(f"a LoRA is a .safetensors path, a folder or a dict of tensors, not a "
                            f"{type(source).__name__}")
        self.lora.add(adapter_name or self.lora.next_name(), adapter, networks, digest)

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None):
        """Run these adapters together, each branch times its weight (1 when not given): one number for all, or
        one per adapter (diffusers' per-component dicts are not supported)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if len(set(names)) != len(names):
            raise ValueError(f"adapter_names {names} name an adapter twice; give each once")
        if isinstance(adapter_weights, dict):
            raise ValueError("per-component adapter weights (a dict) are not supported; give one number per adapter")
        weights = list(adapter_weights) if isinstance(adapter_weights, (list, tuple)) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapter names but {len(weights)} adapter_weights; give one weight each")
        weights = [1.0 if w is None else adapter_weight(w) for w in weights]
        bad = [w for w in weights if not is_number(w)]
        if bad:
            raise ValueError(f"adapter_weights must be finite numbers (or None for 1), not {bad[0]!r}")
        self.lora.set_active(names, weights)

    def get_active_adapters(self) -> list[str]:
        return list(self.lora.weights)

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        """Remove these adapters; the other active ones keep their weights (a fused one: unfuse first)."""
        self.lora.delete([adapter_names] if isinstance(adapter_names, str) else list(adapter_names))

    def disable_lora(self) -> None:
        """Run without any LoRA branch until `enable_lora` (the adapters stay loaded; fused weights stay fused)."""
        self.lora.enabled = False

    def enable_lora(self) -> None:
        self.lora.enabled = True

    def get_list_adapters(self) -> dict[str, list[str]]:
        """Per network, the adapters loaded into it (diffusers' form)."""
        return {n: [a for a, ad in self.lora.adapters.items() if n in ad] for n in NETWORKS
                if any(n in ad for ad in self.lora.adapters.values())}

    def fuse_lora(self, components: tuple[str, ...] | list[str] = NETWORKS, lora_scale: float = 1.0,
                  safe_fusing: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or named) adapters, times their weights and `lora_scale`, into the weights."""
        self.lora.fuse(self._components(components), lora_scale, adapter_names, safe_fusing)

    def unfuse_lora(self, components: tuple[str, ...] | list[str] = NETWORKS) -> None:
        """Restore the exact weights the components had before `fuse_lora` (kept, not subtracted)."""
        self.lora.unfuse(self._components(components))

    def unload_lora_weights(self) -> None:
        """Remove every adapter; fused weights stay (fuse_lora + unload_lora_weights bakes a LoRA in)."""
        self.lora.remove_all()

    def save_lora_weights(self, save_directory: str | os.PathLike, adapter_name: str | None = None,
                          weight_name: str = WEIGHT_NAME) -> Path:
        """Write one adapter (the only active one by default) in diffusers' format, readable by diffusers'
        `load_lora_weights`; returns the file."""
        if adapter_name is None:
            if len(self.lora.weights) != 1:
                raise ValueError(f"{len(self.lora.weights)} adapters are active; pass adapter_name= to pick one")
            adapter_name = next(iter(self.lora.weights))
        self.lora.check_names([adapter_name])
        return save_lora_file(self.lora.adapters[adapter_name], Path(save_directory) / weight_name)

    def _lora_networks(self) -> dict:
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    @staticmethod
    def _components(components: list[str]) -> tuple[str, ...]:
        unknown = sorted(set(components) - set(NETWORKS))
        if unknown:
            raise ValueError(f"components {unknown} carry no LoRA; choose from {list(NETWORKS)}")
        return tuple(components)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # what the networks run in


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one: "cuda" is the current CUDA device ("cuda" and "cuda:0" are one device when
    the current device is 0)."""
    index = lambda d: d.index if d.index is not None else (torch.cuda.current_device() if d.type == "cuda" else 0)
    return a.type == b.type and index(a) == index(b)


def checked_device(device: str | torch.device | None) -> torch.device:
    """The device a model loads onto: None is the CPU; a name ("cpu", "cuda", "cuda:1", "mps") or a torch.device
    that exists on this machine. Anything else is a ValueError naming `device` and the fix (a TypeError for what is
    neither a name nor a torch.device): torch's own errors (an AssertionError for CUDA on a CPU-only build, a raw
    RuntimeError for "gpu") would come only after the first files are read."""
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device: expected a name such as 'cpu' or 'cuda', or a torch.device; got "
                        f"{type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r}: not a device name (cpu, cuda, cuda:N or mps)") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device}: a model loads onto cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise ValueError(f"device {device}: no such CUDA device here (use cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device}: no Apple GPU is available (use cpu)")
    return device


def checked_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """The dtype a model loads in: None is float32; torch.float32, torch.float16 or torch.bfloat16, or its name
    ("float16" or "torch.float16"). Anything else ("auto", "fp16", numpy's float16, torch.int8) is a ValueError
    naming `dtype`."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    if not isinstance(dtype, torch.dtype) or dtype not in DTYPES.values():
        raise ValueError(f"dtype {dtype!r}: expected torch.float32, torch.float16 or torch.bfloat16 (or its name)")
    return dtype


def _read(path: Path, reader):
    """Run the reader of a scheduler, tokenizer or edit-defaults file; any way it fails (missing, not JSON, a field
    the code does not support) becomes one ConfigError naming the file, like the networks' configs."""
    try:
        return reader()
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError) as e:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"{path}: {e}") from None


def _allow_patterns(variant: str | None) -> list[str]:
    """Only the files a load reads: configs, tokenizer files, safetensors weights (never pickles)."""
    v = f".{variant}" if variant else ""
    patterns = ["model_index.json", EDIT_DEFAULTS_FILE, "scheduler/*.json", "inverse_scheduler/*.json",
                "tokenizer/*", "*/config.json", "feature_extractor/preprocessor_config.json"]
    for name, base in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model"), ("safety_checker", "model")):
        patterns += [f"{name}/{base}{v}.safetensors", f"{name}/{base}.safetensors.index{v}.json",
                     f"{name}/{base}*{v}.safetensors" if v else f"{name}/{base}-*.safetensors"]
    return patterns


def resolve_model_folder(path_or_repo_id: str | os.PathLike, revision: str | None = None,
                         variant: str | None = None) -> Path:
    """A local folder as is; otherwise a hub repo id fetched (or found in the cache) with huggingface_hub."""
    location = model_location(path_or_repo_id)
    if isinstance(location, Path):
        return location
    text = location
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=_allow_patterns(variant)))
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(f"model {text} is neither a local folder nor in the hub cache, and the hub cannot "
                                 "be reached (download it once with network access, or pass a folder)") from None
    except HfHubHTTPError as e:
        raise ModelNotFoundError(f"model {text} could not be fetched from the hub: {str(e).splitlines()[0]}") from None
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"model {text} could not be fetched: {str(e).splitlines()[0]}") from None


__all__ = ["StableDiffusion", "ModelNotFoundError", "WeightsError", "ConfigError", "resolve_model_folder"]


def adapter_weight(value):
    """A one-number tensor (not a bool) as the number it holds, a numpy number as its Python number
    (`params.plain_number`), anything else as it is: diffusers takes `np.float32(0.5)` as an adapter weight."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool and not value.is_complex():
        return value.item()
    return plain_number(value)

"""Memory options of a loaded `StableDiffusion`, with diffusers' names: VAE slicing and tiling (the VAE's calls run
in pieces: `models/vae_tiling.py`) and model CPU offload (each network on the accelerator only while it runs).

The options are plain attributes of the `StableDiffusion` holder (`vae_slicing`, `vae_tiling`, `offload`), set by
its `enable_*` / `disable_*` methods and read here by the method's VAE calls and by the offload hooks; nothing is
global.

Model CPU offload (diffusers' `enable_model_cpu_offload`, model_cpu_offload_seq "text_encoder->unet->vae"): the
text encoder, the UNet and the VAE wait on the CPU; the one about to run is moved to the accelerator and every
other one back to the CPU first, so at most one network is on the accelerator at a time (diffusers keeps the
previous network of its sequence there until the next one starts; we are stricter). The UNet and the text encoder
move in a forward pre-hook, so every caller gets them placed; the VAE moves in `vae_encode` / `vae_decode`, the
method's only way to it. `maybe_free_model_hooks` sends the last one back at the end of a call. While offload is
on, `StableDiffusion.device` is the accelerator (where inputs go), not the UNet's current device.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from .models import vae_tiling
from .models.vae import DiagonalGaussian

if TYPE_CHECKING:
    from .stable_diffusion import StableDiffusion

OFFLOAD_ORDER = ("text_encoder", "unet", "vae")  # diffusers' model_cpu_offload_seq for the DiffEdit pipeline
HOOKED = ("text_encoder", "unet")  # called through forward; the VAE's encode / decode are not
CPU = torch.device("cpu")


def move(module: torch.nn.Module, device: torch.device) -> None:
    """Every parameter and buffer of `module` to `device` (one place, so tests can watch the moves)."""
    module.to(device)


def offload_device(gpu_id: int | None = None, device: str | torch.device | None = None) -> torch.device | None:
    """The device components run on under offload, by diffusers' rule: `device` (default: the available
    accelerator; None when there is none), with index `gpu_id`, else the device's own index, else 0. A bad gpu_id is
    refused on any machine, with an accelerator or not."""
    if gpu_id is not None and (isinstance(gpu_id, bool) or not isinstance(gpu_id, int) or gpu_id < 0):
        raise ValueError(f"enable_model_cpu_offload: gpu_id must be an accelerator index >= 0, got {gpu_id!r}")
    if device is None:
        if not torch.accelerator.is_available():
            return None
        device = torch.accelerator.current_accelerator()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):  # torch's "Invalid device string", or not a device at all
        raise ValueError(f"enable_model_cpu_offload: device={device!r} is not a device torch knows (e.g. 'cuda', "
                         "'cuda:1', 'xpu', 'mps', 'cpu')") from None
    if device.type == "meta":
        raise ValueError("enable_model_cpu_offload: device='meta' holds no data; the networks' weights would be lost")
    if gpu_id is not None and device.index is not None:
        raise ValueError(f"enable_model_cpu_offload: gpu_id={gpu_id} and device={device} both give an index; pass "
                         f"one of the two (device={device.type!r} with gpu_id, or device={str(device)!r} alone)")
    if device.type == "cpu":
        return CPU  # accepted: the moves are no-ops
    device = torch.device(device.type, gpu_id or device.index or 0)
    check_available(device)
    return device


def check_available(device: torch.device) -> None:
    """A ValueError unless tensors can be made on `device`: a device this torch build or machine lacks used to be
    accepted and fail at the first move, with the offload already set up."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # CUDA missing from the build is an AssertionError
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"enable_model_cpu_offload: device {device} is not available here ({reason}); pick an "
                         "available accelerator, or leave device out to use the one present") from None


class ModelOffload:
    """Which network is on the accelerator, and the hooks that move the others out before one runs."""

    def __init__(self, sd: StableDiffusion, device: torch.device):
        self.sd, self.device = sd, device
        self.active: str | None = None  # the network now on `device`; the others are on the CPU
        self.hooks = [getattr(sd, name).register_forward_pre_hook(self._hook(name)) for name in HOOKED]
        self.free()

    def _hook(self, name: str):
        def before_forward(module, args) -> None:
            self.onload(name)
        return before_forward

    def onload(self, name: str) -> None:
        """Network `name` onto the accelerator, after sending the one there back to the CPU."""
        if self.active == name:
            return
        if self.active is not None:
            move(getattr(self.sd, self.active), CPU)
        move(getattr(self.sd, name), self.device)
        self.active = name

    def free(self) -> None:
        """Every network back on the CPU (diffusers' `maybe_free_model_hooks`, at the end of each call)."""
        for name in OFFLOAD_ORDER:
            move(getattr(self.sd, name), CPU)
        self.active = None

    def remove(self) -> None:
        """No more hooks; every network on the accelerator, so the model runs whole there again."""
        for hook in self.hooks:
            hook.remove()
        for name in OFFLOAD_ORDER:
            move(getattr(self.sd, name), self.device)
        self.hooks, self.active = [], None


def model_cpu_offload(sd: StableDiffusion, gpu_id: int | None = None,
                      device: str | torch.device | None = None) -> ModelOffload | None:
    """Offload for `sd` (its previous offload removed first), or None with a warning when there is no
    accelerator to offload to: diffusers raises there; we run as before on the CPU, same numbers."""
    target = offload_device(gpu_id, device)  # first: a bad argument leaves the current offload as it is
    if sd.offload is not None:
        sd.offload.remove()
        sd.offload = None
    if target is None:
        warnings.warn("enable_model_cpu_offload: no accelerator is available, so nothing is offloaded and the model "
                      "runs where it is (on the CPU)", stacklevel=3)
        return None
    return ModelOffload(sd, target)


def vae_encode(sd: StableDiffusion, images: torch.Tensor) -> DiagonalGaussian:
    """The VAE posterior of images (B, 3, H, W) in [-1, 1] under `sd`'s memory options."""
    if sd.offload is not None:
        sd.offload.onload("vae")
    return vae_tiling.encode(sd.vae, images, sd.vae_slicing, sd.vae_tiling)


def vae_decode(sd: StableDiffusion, latents: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) of unscaled latents (B, C, h, w) under `sd`'s memory options."""
    if sd.offload is not None:
        sd.offload.onload("vae")
    return vae_tiling.decode(sd.vae, latents, sd.vae_slicing, sd.vae_tiling)

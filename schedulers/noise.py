"""Gaussian noise drawn exactly as diffusers' `randn_tensor` draws it, so that a torch.Generator seed gives the
same numbers here and there. The VAE's posterior samples, the scheduler's eta noise and DiffEdit's noising all use it.
"""

from __future__ import annotations

import torch

Generator = torch.Generator | list[torch.Generator] | None


def randn(shape: tuple[int, ...], generator: Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise of `shape` on `device`. A CPU generator draws on the CPU and the result moves to
    `device`; a generator on another kind of device is an error; a list of generators draws one batch row each."""
    gens = generator if isinstance(generator, list) else [generator]
    rand_device = device
    if gens[0] is not None and gens[0].device.type == "cpu" and device.type != "cpu":
        rand_device = torch.device("cpu")
    elif gens[0] is not None and gens[0].device.type != device.type:
        raise ValueError(f"cannot draw a {device.type} tensor from a {gens[0].device.type} generator")
    if len(gens) == 1:
        return torch.randn(shape, generator=gens[0], device=rand_device, dtype=dtype).to(device)
    if len(gens) != shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]}")
    rows = [torch.randn((1, *shape[1:]), generator=g, device=rand_device, dtype=dtype) for g in gens]
    return torch.cat(rows).to(device)  # (B, ...)

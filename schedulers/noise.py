"""Gaussian noise drawn exactly as diffusers' `randn_tensor` draws it, so that a torch.Generator seed gives the
same numbers here and there. The VAE's posterior samples, the scheduler's eta noise and DiffEdit's noising all use it.
"""

from __future__ import annotations

import torch

Generator = torch.Generator | list[torch.Generator] | None


def randn(shape: tuple[int, ...], generator: Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise of `shape` on `device`. A CPU generator draws on the CPU and the result moves to
    `device`; a generator on another kind of device is an error; a list of generators draws one batch row each,
    as diffusers does, or, for a batch of k rows per generator (a batch of images with k noise draws each),
    generator i draws rows i k .. i k + k - 1 in one draw: what it draws for its image alone."""
    gens = generator if isinstance(generator, list) else [generator]
    if not gens or any(g is not None and not isinstance(g, torch.Generator) for g in gens) or (
            len(gens) > 1 and None in gens):
        raise TypeError(f"generator: expected None, a torch.Generator or a non-empty list of them, got {generator!r}")
    rand_device = device
    if gens[0] is not None and gens[0].device.type == "cpu" and device.type != "cpu":
        rand_device = torch.device("cpu")
    elif gens[0] is not None and gens[0].device.type != device.type:
        raise ValueError(f"cannot draw a {device.type} tensor from a {gens[0].device.type} generator")
    if len(gens) == 1:
        return torch.randn(shape, generator=gens[0], device=rand_device, dtype=dtype).to(device)
    if shape[0] % len(gens):
        raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]}")
    k = shape[0] // len(gens)  # rows per generator: 1 as in diffusers; k > 1, one draw of k rows each
    rows = [torch.randn((k, *shape[1:]), generator=g, device=rand_device, dtype=dtype) for g in gens]
    return torch.cat(rows).to(device)  # (B, ...)

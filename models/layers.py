"""Blocks shared by the UNet and the VAE. Attribute names follow the diffusers checkpoint keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with an optional timestep embedding added in between (DDPM's ResNet)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nn.Module):
    """Strided 3x3 conv. The VAE pads (0, 1, 0, 1) by hand instead of padding 1 on every side."""

    def __init__(self, channels: int, asymmetric_pad: bool = False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x (or to `size`, for latents whose sides are not a multiple of 2**levels), then a conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False) -> torch.Tensor:
    """Multi-head scaled dot-product attention over token sequences.

    q: (B, N, C), k and v: (B, M, C) -> (B, N, C). With `upcast` (SD 2.x: its float16 scores overflow), scores and
    softmax run in float32. On CUDA that is already so inside the fused kernels (flash and memory-efficient attention
    keep the scores in float32 registers and never store them), so the inputs stay in their dtype there: upcasting
    them would only force a slower kernel. diffusers' default attention processor does the same (it ignores
    `upcast_attention`), so a CUDA half-precision run keeps its numbers too.
    """
    b, n, c = q.shape
    q, k, v = (t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, d)
    dtype = q.dtype
    if upcast and dtype != torch.float32 and q.device.type != "cuda":
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
    return out.to(dtype).transpose(1, 2).reshape(b, n, c)

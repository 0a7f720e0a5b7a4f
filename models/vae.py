"""Stable Diffusion's KL-regularized autoencoder (the "first stage" of latent diffusion).

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv 2112.10752, Sec. 3.1 and
App. G: a convolutional encoder maps an image to a diagonal Gaussian over latents 2**(levels-1) times smaller per
side (Kingma & Welling, "Auto-Encoding Variational Bayes", arXiv 1312.6114); the decoder maps latents back to pixels.
Attribute names follow diffusers' `AutoencoderKL` checkpoint keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..schedulers.noise import Generator, randn
from .config import VAEConfig
from .layers import Downsample2D, ResnetBlock2D, Upsample2D, attention

_EPS = 1e-6  # every norm of the SD VAE uses eps 1e-6, not the config's (absent) norm_eps


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, diag(exp(logvar))), from moments (B, 2*latent_channels, h, w)."""

    def __init__(self, moments: torch.Tensor):
        self.moments = moments
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)  # as diffusers, keeps exp() finite

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: Generator = None) -> torch.Tensor:
        """mean + std * eps, with eps drawn like diffusers' `DiagonalGaussianDistribution.sample`."""
        eps = randn(tuple(self.mean.shape), generator, self.moments.device, self.moments.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per batch row."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class VAEAttention(nn.Module):
    """Single-head self-attention over pixels with a residual connection (the VAE's mid-block attention)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # Pixels as tokens
        t = self.group_norm(x).view(b, c, h * w).transpose(1, 2)  # (B, H*W, C)
        # Self attention
        out = self.to_out[0](attention(self.to_q(t), self.to_k(t), self.to_v(t), heads=1))
        # Back to an image, plus the residual
        return out.transpose(1, 2).reshape(b, c, h, w) + x  # (B, C, H, W)


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.attentions = nn.ModuleList([VAEAttention(channels, groups)])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, None, groups, _EPS) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock(nn.Module):
    """`layers` resnets, then (except at the last level) a stride-2 conv with the VAE's asymmetric padding."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, _EPS)
             for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, asymmetric_pad=True)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock(nn.Module):
    """`layers` resnets, then (except at the last level) nearest 2x upsampling and a conv."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, _EPS)
             for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> posterior moments (B, 2*latent_channels, H/f, W/f), f = 2**(levels-1)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, groups = config.block_out_channels, config.norm_num_groups
        last = len(ch) - 1
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [DownEncoderBlock(ch[max(i - 1, 0)], ch[i], config.layers_per_block, groups, downsample=i < last)
             for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        # Down
        for block in self.down_blocks:
            x = block(x)
        # Middle
        x = self.mid_block(x)
        # Out
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latents (B, latent_channels, h, w) -> image (B, 3, h*f, w*f); each level has one resnet more than the encoder."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        last = len(ch) - 1
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], 3, padding=1)
        # up_blocks registered before mid_block, so the state_dict order matches diffusers'
        self.up_blocks = nn.ModuleList(
            [UpDecoderBlock(ch[max(i - 1, 0)], ch[i], config.layers_per_block + 1, groups, upsample=i < last)
             for i in range(len(ch))])
        self.mid_block = MidBlock(ch[0], groups)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        # Middle
        x = self.mid_block(x)
        # Up
        for block in self.up_blocks:
            x = block(x)
        # Out
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """Stable Diffusion's VAE: `encode` images in [-1, 1] to a posterior, `decode` unscaled latents to images.

    Latents seen by the UNet are `posterior.sample() * scaling_factor`; divide by it before `decode`.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """(B, 3, H, W) in [-1, 1] -> q(z|x) over (B, latent_channels, H/f, W/f)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, latent_channels, h, w) -> images (B, 3, h*f, w*f), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents))

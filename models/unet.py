"""The text-conditioned UNet of Stable Diffusion 1.x and 2.x (Rombach et al., "High-Resolution Image Synthesis
with Latent Diffusion Models", arXiv 2112.10752): the noise (or v) of a latent at a timestep, given CLIP text states.

A DDPM UNet (Ho et al., arXiv 2006.11239) of ResNet blocks at each level, with a spatial transformer (self-attention,
cross-attention to the text, GEGLU feed-forward; Vaswani et al., arXiv 1706.03762) after each ResNet on the
cross-attention levels. Attribute names follow diffusers' `UNet2DConditionModel` checkpoint keys.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNetConfig
from .layers import Downsample2D, ResnetBlock2D, Upsample2D, attention

# --------------------------------------------------------------------------------------------------- timestep


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) float32, cosines first (flip_sin_to_cos, freq_shift 0).

    Frequencies max_period**(-i / (dim/2)) as in "Attention Is All You Need" (arXiv 1706.03762, section 3.5).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps[:, None].float() * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(emb, (0, dim % 2))  # odd dim: one zero column


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on the sinusoidal embedding: linear -> SiLU -> linear."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# --------------------------------------------------------------------------------------------------- transformer


class TextKV:
    """Text states whose cross-attention keys and values are computed once per attention layer and then reused:
    passed as the UNet's `encoder_hidden_states` at every step of a sampling loop, the text's projections are made
    at the first step only (diffusers makes them at every step; the numbers are the same)."""

    def __init__(self, states: torch.Tensor):
        self.states = states  # (B, T, cross_attention_dim)
        self._kv: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def kv(self, attn: Attention) -> tuple[torch.Tensor, torch.Tensor]:
        if attn not in self._kv:
            self._kv[attn] = (attn.to_k(self.states), attn.to_v(self.states))
        return self._kv[attn]


class Attention(nn.Module):
    """Multi-head attention; `context_dim` set makes it cross-attention (keys and values from the text states)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, upcast: bool = False):
        super().__init__()
        self.heads = heads
        self.upcast = upcast
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # checkpoint index 1 was a dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor | TextKV | None = None) -> torch.Tensor:
        if isinstance(context, TextKV):
            k, v = context.kv(self)
        else:
            context = x if context is None else context
            k, v = self.to_k(context), self.to_v(context)
        return self.to_out[0](attention(self.to_q(x), k, v, self.heads, self.upcast))


class GEGLU(nn.Module):
    """Gated GELU: one projection to twice the width, half gating the other (Shazeer, arXiv 2002.05202)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU to 4x width, then back. `net` keeps the checkpoint's indices (net.1 was a dropout)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer layer: self-attention, cross-attention to the text, feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | TextKV) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))  # Self attention
        x = x + self.attn2(self.norm2(x), context)  # Cross attention
        return x + self.ff(self.norm3(x))  # FFN


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm, project in, transformer layers over the H*W tokens, project out, residual.

    SD 1.x projects with 1x1 convs before flattening to tokens; SD 2.x (`linear`) flattens first and uses nn.Linear.
    """

    def __init__(self, channels: int, heads: int, layers: int, context_dim: int, groups: int, linear: bool,
                 upcast: bool):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        proj = nn.Linear if linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim, upcast) for _ in range(layers))
        self.proj_out = proj(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor | TextKV) -> torch.Tensor:
        b, c, h, w = x.shape
        # Project in and flatten to tokens
        t = self.norm(x)
        t = t if self.linear else self.proj_in(t)
        t = t.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        t = self.proj_in(t) if self.linear else t
        # Transformer layers
        for block in self.transformer_blocks:
            t = block(t, context)
        # Project out and restore the image layout
        t = self.proj_out(t) if self.linear else t
        t = t.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        t = t if self.linear else self.proj_out(t.contiguous())
        return x + t


# --------------------------------------------------------------------------------------------------- blocks


class DownBlock(nn.Module):
    """One encoder level (diffusers' CrossAttnDownBlock2D, or DownBlock2D when `heads` is None).

    Returns the output and every intermediate state (after each ResNet/transformer pair, and after the
    downsampler) as skip connections for the decoder.
    """

    def __init__(self, cfg: UNetConfig, in_ch: int, out_ch: int, heads: int | None, layers: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps)
            for j in range(cfg.layers_per_block))
        self.attentions = None if heads is None else nn.ModuleList(
            Transformer2DModel(out_ch, heads, layers, cfg.cross_attention_dim, cfg.norm_num_groups,
                               cfg.use_linear_projection, cfg.upcast_attention) for _ in range(cfg.layers_per_block))
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)]) if downsample else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | TextKV
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            x = x if self.attentions is None else self.attentions[j](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class CrossAttnMidBlock(nn.Module):
    """Bottleneck (diffusers' UNetMidBlock2DCrossAttn): ResNet, transformer, ResNet."""

    def __init__(self, cfg: UNetConfig, channels: int, heads: int, layers: int):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(channels, channels, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps) for _ in range(2))
        self.attentions = nn.ModuleList([Transformer2DModel(
            channels, heads, layers, cfg.cross_attention_dim, cfg.norm_num_groups, cfg.use_linear_projection,
            cfg.upcast_attention)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor | TextKV) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """One decoder level (diffusers' CrossAttnUpBlock2D, or UpBlock2D when `heads` is None).

    layers_per_block + 1 ResNets, each taking the concatenation of the running state and one skip connection
    (`skip_chs`, in the order they are consumed: the encoder's last state first).
    """

    def __init__(self, cfg: UNetConfig, prev_ch: int, out_ch: int, skip_chs: list[int], heads: int | None,
                 layers: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D((prev_ch if j == 0 else out_ch) + skip, out_ch, cfg.time_embed_dim, cfg.norm_num_groups,
                          cfg.norm_eps) for j, skip in enumerate(skip_chs))
        self.attentions = None if heads is None else nn.ModuleList(
            Transformer2DModel(out_ch, heads, layers, cfg.cross_attention_dim, cfg.norm_num_groups,
                               cfg.use_linear_projection, cfg.upcast_attention) for _ in skip_chs)
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor, context: torch.Tensor | TextKV,
                size: tuple[int, int] | None) -> torch.Tensor:
        for j, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)  # (B, C + C_skip, H, W) -> (B, C_out, H, W)
            x = x if self.attentions is None else self.attentions[j](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


# --------------------------------------------------------------------------------------------------- UNet


class UNet2DConditionModel(nn.Module):
    """eps (or v) = unet(latents, timestep, text states). Keys and shapes equal diffusers' for SD 1.x / 2.x configs."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        chs, levels = config.block_out_channels, len(config.block_out_channels)
        self.conv_in = nn.Conv2d(config.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], config.time_embed_dim)

        def heads_if(block_type: str, i: int) -> int | None:
            return config.num_heads[i] if block_type.startswith("CrossAttn") else None

        # Encoder: the channels of every skip connection, in the order they are produced
        self.down_blocks = nn.ModuleList()
        skip_chs = [chs[0]]
        for i, block_type in enumerate(config.down_block_types):
            last = i == levels - 1
            self.down_blocks.append(DownBlock(config, chs[max(i - 1, 0)], chs[i], heads_if(block_type, i),
                                              config.transformer_layers_per_block[i], downsample=not last))
            skip_chs += [chs[i]] * (config.layers_per_block + (0 if last else 1))

        self.mid_block = CrossAttnMidBlock(config, chs[-1], config.num_heads[-1],
                                           config.transformer_layers_per_block[-1])

        # Decoder: levels in reverse, each consuming layers_per_block + 1 skips from the end
        self.up_blocks = nn.ModuleList()
        prev = chs[-1]
        for k, block_type in enumerate(config.up_block_types):
            i = levels - 1 - k  # the matching encoder level
            n = config.layers_per_block + 1
            skips, skip_chs = skip_chs[-n:][::-1], skip_chs[:-n]
            self.up_blocks.append(UpBlock(config, prev, chs[i], skips, heads_if(block_type, i),
                                          config.transformer_layers_per_block[i], upsample=i > 0))
            prev = chs[i]

        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, chs[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(chs[0], config.out_channels, 3, padding=1)

    def time_embed(self, sample: torch.Tensor, timestep: torch.Tensor | float | int) -> torch.Tensor:
        """Broadcast the timestep to the batch and embed it; sinusoids in float32, then the sample's dtype.

        A single timestep held on the host (a Python number, or a one-element CPU tensor as the samplers' timestep
        tables are) becomes a fill on the sample's device: no host-to-device copy, which on CUDA would wait for
        every queued kernel at each step of a sampling loop."""
        single = not isinstance(timestep, torch.Tensor) or (timestep.numel() == 1 and timestep.device != sample.device)
        if single:
            dtype = timestep.dtype if isinstance(timestep, torch.Tensor) else None  # None: int64 or float32, as given
            value = timestep.item() if isinstance(timestep, torch.Tensor) else timestep  # host memory: no GPU sync
            t = torch.full((sample.shape[0],), value, dtype=dtype, device=sample.device)  # (B,)
        else:
            t = timestep.to(sample.device).reshape(-1).expand(sample.shape[0])  # (B,)
        emb = timestep_embedding(t, self.config.block_out_channels[0]).to(sample.dtype)
        return self.time_embedding(emb)

    def check_inputs(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                     encoder_hidden_states: torch.Tensor | TextKV) -> None:
        """A TypeError / ValueError naming the argument and the shape it must have, before any work (torch's own
        errors came from a convolution or an attention reshape deep inside, as diffusers' do)."""
        cfg, shape = self.config, lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        states = encoder_hidden_states.states if isinstance(encoder_hidden_states, TextKV) else encoder_hidden_states
        if not isinstance(sample, torch.Tensor) or not isinstance(states, torch.Tensor):
            raise TypeError(f"sample and encoder_hidden_states must be tensors, got {shape(sample)} and {shape(states)}")
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"sample must be (B, {cfg.in_channels}, H, W) latents, got shape {shape(sample)}")
        batch = sample.shape[0]
        if states.ndim != 3 or states.shape[0] != batch or states.shape[2] != cfg.cross_attention_dim:
            raise ValueError(f"encoder_hidden_states must be (B, T, {cfg.cross_attention_dim}) text states with the "
                             f"sample's B={batch}, got shape {shape(states)}")
        if isinstance(timestep, bool) or not isinstance(timestep, (torch.Tensor, numbers.Real)):
            raise TypeError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")
        if isinstance(timestep, torch.Tensor) and timestep.numel() not in (1, batch):
            raise ValueError(f"timestep must be one value or one per sample (B={batch}), got shape {shape(timestep)}")

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                encoder_hidden_states: torch.Tensor | TextKV) -> torch.Tensor:
        """sample (B, in_channels, H, W), timestep scalar or (B,), encoder_hidden_states (B, T, cross_attention_dim)
        or a `TextKV` of them (a loop's projections made once) -> (B, out_channels, H, W)."""
        self.check_inputs(sample, timestep, encoder_hidden_states)
        temb = self.time_embed(sample, timestep)
        # Encoder, keeping every intermediate state for the skip connections
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, states = block(x, temb, encoder_hidden_states)
            skips += states
        x = self.mid_block(x, temb, encoder_hidden_states)
        # Decoder; sides that do not halve evenly upsample to the matching skip's size
        uneven = any(s % 2 ** (len(self.up_blocks) - 1) for s in sample.shape[-2:])
        for block in self.up_blocks:
            n = len(block.resnets)
            level_skips, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[-2:]) if uneven and block.upsamplers is not None else None
            x = block(x, level_skips, temb, encoder_hidden_states, size)
        # Output
        return self.conv_out(F.silu(self.conv_norm_out(x)))

"""The CLIP vision tower (Radford et al., arXiv 2103.00020; a ViT, Dosovitskiy et al., arXiv 2010.11929) that the
Stable Diffusion safety checker embeds generated pictures with.

A picture (B, 3, S, S) is cut into (S / patch)^2 patches by a strided convolution, a learned class token is put in
front, learned position embeddings are added, and a pre-LayerNorm transformer without a causal mask runs over the
sequence; the pooled output is the class token after `post_layernorm`. The encoder layers are the text tower's
(`clip_text.CLIPEncoder`), attention unmasked. Attribute names are transformers' `CLIPVisionModel` keys
(`pre_layrnorm` is spelled as transformers spells it), so loading is a checked copy.
"""

from __future__ import annotations

import torch
from torch import nn

from .clip_text import CLIPEncoder, _embedding
from .config import CLIPVisionConfig


class CLIPVisionEmbeddings(nn.Module):
    """Patches -> tokens, a class token in front, plus a learned absolute position embedding."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        class_embedding = torch.empty(d)
        if not class_embedding.is_meta:  # see clip_text._embedding
            nn.init.normal_(class_embedding)
        self.class_embedding = nn.Parameter(class_embedding)
        self.patch_embedding = nn.Conv2d(config.num_channels, d, config.patch_size, stride=config.patch_size,
                                         bias=False)
        self.position_embedding = _embedding(config.num_positions, d)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, N, D)
        tokens = torch.cat([self.class_embedding.expand(b, 1, -1), patches], dim=1)  # (B, N + 1, D)
        return tokens + self.position_embedding.weight  # (B, N + 1, D)


class CLIPVisionModel(nn.Module):
    """Pixels (B, C, S, S), normalized as the CLIP image processor does -> pooled embedding (B, D)."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config, causal=False)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pooled output: the class token of the last layer, after `post_layernorm` (transformers'
        `pooler_output`)."""
        c, s = self.config.num_channels, self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (c, s, s):
            raise ValueError(f"pixel_values must be (batch, {c}, {s}, {s}), got shape {tuple(pixel_values.shape)}")
        x = self.pre_layrnorm(self.embeddings(pixel_values.to(self.post_layernorm.weight.dtype)))  # (B, N + 1, D)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])  # (B, D)

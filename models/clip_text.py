"""The CLIP text encoder that conditions Stable Diffusion (Radford et al., "Learning Transferable Visual Models From
Natural Language Supervision", arXiv 2103.00020): a causal, pre-LayerNorm transformer over BPE tokens.

SD 1.x uses OpenAI's ViT-L/14 text tower (quick_gelu), SD 2.x OpenCLIP's ViT-H/14 one (exact gelu). Attribute names
are the transformers `CLIPTextModel` keys without the hub's `text_model.` prefix, so loading is a checked copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import is_integral
from .config import CLIPTextConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid approximation of GELU that OpenAI's CLIP was trained with (Hendrycks & Gimpel, arXiv 1606.08415)."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # "gelu" is the exact erf form


def _embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding with N(0, 1) init, skipped for meta tensors (loading): `normal_` on meta imports torch._dynamo,
    a second or more of every model load."""
    weight = torch.empty(num, dim)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding.from_pretrained(weight, freeze=False)


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding.

    Rows for added tokens (textual inversion) live apart from the checkpoint's `token_embedding`: ids from
    `added_start` on read `added_rows` (a buffer outside the state dict, so it follows `.to()` but loading and
    saving the base model never see it). diffusers grows the embedding matrix instead; the vectors are the same.
    """

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = _embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = _embedding(config.max_position_embeddings, config.hidden_size)
        self.added_start: int | None = None  # the first added id; None: no added rows

    def set_added_rows(self, start: int | None, rows: torch.Tensor | None) -> None:
        """Ids start, start + 1, ... read rows (N, D) from now on; (None, None) removes them."""
        if rows is None:
            self.added_start = None
            self._buffers.pop("added_rows", None)
            return
        self.added_start = start
        self.register_buffer("added_rows", rows.to(self.token_embedding.weight), persistent=False)

    def check_ids(self, input_ids: torch.Tensor) -> None:
        """Refuse ids with no row (an index error on the CPU, a device-side assert on CUDA), naming the first."""
        if input_ids.is_meta:
            return
        n_base = self.token_embedding.num_embeddings
        valid = (input_ids >= 0) & (input_ids < n_base)  # (B, T)
        if self.added_start is not None:
            valid |= (input_ids >= self.added_start) & (input_ids < self.added_start + len(self.added_rows))
        if not bool(valid.all()):  # one host sync per text encoding
            rows = f"[0, {n_base})" + ("" if self.added_start is None else
                                       f" or [{self.added_start}, {self.added_start + len(self.added_rows)})")
            raise ValueError(f"input_ids: token id {input_ids[~valid][0].item()} has no embedding row (ids in {rows}): "
                             "ids from another model's tokenizer, or a word unloaded since")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,); not a checkpoint buffer
        if self.added_start is None:
            tokens = self.token_embedding(input_ids)  # (B, T, D)
        else:
            added = input_ids >= self.added_start  # (B, T)
            tokens = torch.where(added[..., None], self.added_rows[(input_ids - self.added_start).clamp(min=0)],
                                 self.token_embedding(input_ids.masked_fill(added, 0)))  # (B, T, D)
        return tokens + self.position_embedding(positions)


class CLIPAttention(nn.Module):
    """Multi-head self-attention; causal (token i sees tokens 0..i only) in the text tower, full in the vision one."""

    def __init__(self, config: CLIPTextConfig, causal: bool = True):
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_attention_heads
        self.causal = causal
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (p(x).reshape(b, t, self.heads, c // self.heads).transpose(1, 2)  # (B, heads, T, d)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, heads, T, d)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, c))  # (B, T, C)


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.act = _ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig, causal: bool = True):
        super().__init__()
        self.self_attn = CLIPAttention(config, causal)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))  # Self attention
        return x + self.mlp(self.layer_norm2(x))  # FFN


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig, causal: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config, causal) for _ in range(config.num_hidden_layers))


class CLIPTextModel(nn.Module):
    """Token ids (B, T) -> per-token hidden states (B, T, D), the UNet's cross-attention context.

    No padding mask: like diffusers' SD pipelines, every position (including the padding after the end token)
    attends causally to everything before it.
    """

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.final_layer_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.final_layer_norm.weight.device

    def forward(self, input_ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
        """The last hidden state after `final_layer_norm`.

        clip_skip=k follows diffusers' `encode_prompt`: the output of layer `num_hidden_layers - k` (k=1: the
        penultimate layer), still passed through `final_layer_norm`. k=0 equals None; k=num_hidden_layers gives the
        normalized embeddings. input_ids is a long (or int32) tensor (B, T <= max_position_embeddings) of ids that
        have a row (the checkpoint's or an added word's); anything else is refused naming input_ids.
        """
        n_layers = len(self.encoder.layers)
        if clip_skip is not None and (not is_integral(clip_skip) or not 0 <= clip_skip <= n_layers):
            raise ValueError(f"clip_skip must be None or an integer in [0, {n_layers}], got {clip_skip!r}")
        clip_skip = None if clip_skip is None else int(clip_skip)  # a numpy int as the Python int it equals
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int32):
            kind = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise TypeError(f"input_ids: expected a torch.long tensor of token ids (what the tokenizer returns), "
                            f"got {kind}")
        if input_ids.ndim != 2 or input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"input_ids must be (batch, length <= {self.config.max_position_embeddings}), "
                             f"got shape {tuple(input_ids.shape)}")
        self.embeddings.check_ids(input_ids)
        return self.encode(input_ids, clip_skip)

    def encode(self, input_ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
        """`forward` without its argument checks, for a loop whose ids were checked once (training: the check of the
        ids waits for the device, which a per-step call would do every step)."""
        x = self.embeddings(input_ids)  # (B, T, D)
        for layer in self.encoder.layers[: len(self.encoder.layers) - (clip_skip or 0)]:
            x = layer(x)
        return self.final_layer_norm(x)

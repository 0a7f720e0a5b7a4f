"""Textual inversion (Gal et al., "An Image is Worth One Word", arXiv 2208.01618): a new word whose embedding was
learned, added to the tokenizer and the text encoder. Reads the files people share and loads them as diffusers'
`load_textual_inversion` does (0.42.1): the same token names, ids and vectors.

Files are safetensors only (a .pt / .bin pickle is refused with the fix: convert it). The layouts:
- diffusers (`learned_embeds.safetensors`): one tensor, named by its token: `{"<cat-toy>": (D,) or (n, D)}`;
- kohya / A1111 safetensors: one tensor `emb_params` (n, D);
- A1111's `.pt` layout flattened to safetensors: `string_to_param.*` (n, D) (and `string_to_token.*`, ignored).
The token is `token=` when given, else the diffusers file's key; an `emb_params` / `string_to_param` file has no
usable name in it (diffusers would register the key itself, `emb_params`, as the word), so, as A1111 does, the
file's name without its extension is the token.

A vector of shape (D,) or (1, D) adds one token; (n, D) adds `<tok>`, `<tok>_1`, ..., `<tok>_{n-1}`, and `<tok>`
in a prompt stands for all n. Refused as diffusers refuses them: a token already in the vocabulary (or its
`<tok>_1`), a width other than the text encoder's, duplicate tokens, path and token lists of different lengths.
Refused where diffusers accepts them: a token the tokenizer already reads as one token, such as a plain word
("paintings", whose entry is `paintings</w>`) or a known token in other letter case ("Red"), which would take
that word's place in every prompt; vectors that overflow the text encoder's dtype (float16), which would be rows of
inf. The vectors are copied, as diffusers copies them: a tensor that requires grad leaves its graph behind.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..validation import PICKLE_SUFFIXES, listed
from .tokenizer import END_OF_WORD
from .weights import WeightsError, read_safetensors

DIFFUSERS_FILE = "learned_embeds.safetensors"  # what diffusers looks for in a folder
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # torch.save's zip; pickles
KOHYA_KEY, A1111_KEY, A1111_TOKEN_KEY = "emb_params", "string_to_param.*", "string_to_token.*"
Source = str | os.PathLike | dict | torch.Tensor


@dataclass(frozen=True)
class Embedding:
    """One learned word: its token and its vectors (n, D), n >= 1, from `origin` (a file, or "state dict")."""

    token: str
    vectors: torch.Tensor  # (n, D)
    origin: str


def _pickle_refusal(path: Path) -> WeightsError:
    return WeightsError(f"{path} is a pickle file; diffedit loads safetensors only: convert it to .safetensors "
                        "(torch.load it where you trust it, then safetensors.torch.save_file)")


def embedding_file(path: str | os.PathLike) -> Path:
    """The safetensors file a path names: the file itself, or a folder's `learned_embeds.safetensors`."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / DIFFUSERS_FILE).is_file():
            if (path / "learned_embeds.bin").is_file():
                raise _pickle_refusal(path / "learned_embeds.bin")
            raise WeightsError(f"embedding folder {path} has no {DIFFUSERS_FILE}")
        path = path / DIFFUSERS_FILE
    if not path.is_file():
        raise WeightsError(f"embedding file {path} not found")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_refusal(path)
    if path.stat().st_size == 0:
        raise WeightsError(f"embedding file {path} is empty")
    return path


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors; a file that is not safetensors but starts like a pickle is named as one."""
    try:
        return read_safetensors([path])
    except WeightsError:
        with path.open("rb") as f:
            if f.read(4).startswith(_PICKLE_MAGIC):
                raise _pickle_refusal(path) from None
        raise


def _check_token(token, origin: str) -> str:
    if not isinstance(token, str) or not token or any(c.isspace() for c in token):
        raise ValueError(f"{origin}: the token must be a non-empty text without spaces, got {token!r}")
    return token


def _vectors(value, origin: str) -> torch.Tensor:
    """A stored embedding as (n, D) float vectors; anything else is refused, naming the file."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise WeightsError(f"{origin}: the embedding is {kind}, not a floating-point tensor")
    if value.ndim not in (1, 2) or value.numel() == 0:
        raise WeightsError(f"{origin}: an embedding is (D,) or (n, D) with n >= 1, got shape {tuple(value.shape)}")
    if not bool(torch.isfinite(value).all()):
        raise WeightsError(f"{origin}: the embedding holds NaN or infinite values (a damaged file or a diverged run)")
    return value.reshape(-1, value.shape[-1])


def from_state(state: dict, token: str | None, origin: str, file_name: str | None = None) -> Embedding:
    """The embedding in a state dict of one of the module docstring's layouts; `file_name` (the file's stem)
    names an `emb_params` / `string_to_param` embedding when `token` is None."""
    keys = sorted(state)
    if {"clip_l", "clip_g"} <= set(keys):
        raise WeightsError(f"{origin}: an SDXL embedding (clip_l, clip_g); diffedit runs SD 1.x and 2.x models")
    if isinstance(state.get("string_to_param"), dict) and "*" in state["string_to_param"]:
        value, named = state["string_to_param"]["*"], state.get("name")  # A1111's layout, in memory
    elif keys == [KOHYA_KEY] or A1111_KEY in keys and set(keys) <= {A1111_KEY, A1111_TOKEN_KEY}:
        value, named = state[keys[0] if keys == [KOHYA_KEY] else A1111_KEY], file_name
    elif len(keys) == 1:
        value, named = state[keys[0]], keys[0]  # diffusers: {token: vectors}
    else:
        raise WeightsError(f"{origin}: not a textual-inversion embedding (tensors: {listed(keys, 6) or 'none'}); "
                           f"expected one tensor named by its token, {KOHYA_KEY}, or {A1111_KEY}")
    if token is None and named is None:
        raise ValueError(f"{origin}: the embedding names no token; pass token=")
    return Embedding(_check_token(token if token is not None else named, origin), _vectors(value, origin), origin)


def read_embedding(source: Source, token: str | None = None) -> Embedding:
    """One embedding from a file or folder path, a state dict, or a tensor (which needs `token`)."""
    if isinstance(source, torch.Tensor):
        if token is None:
            raise ValueError("an embedding given as a tensor needs its token: pass token=")
        return Embedding(_check_token(token, "tensor"), _vectors(source, "tensor"), "tensor")
    if isinstance(source, dict):
        return from_state(source, token, "state dict")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"an embedding is a path, a state dict or a tensor, not {type(source).__name__}")
    path = embedding_file(source)
    return from_state(_read_file(path), token, str(path), path.stem)


def read_embeddings(sources: Source | list[Source], tokens: str | list[str | None] | None = None) -> list[Embedding]:
    """diffusers' argument rules: one source or a list, one token or a list of the same length (None: each
    file's own); one tensor (k, D) with k tokens gives k single-vector words."""
    sources = sources if isinstance(sources, list) else [sources]
    if not all(t is None or isinstance(t, str) for t in (tokens if isinstance(tokens, list) else [tokens])):
        raise TypeError(f"token: expected a string, None (the file's own) or a list of them, got {tokens!r}")
    if isinstance(tokens, str) and len(sources) > 1:
        raise ValueError(f"{len(sources)} embeddings and one token {tokens!r}: give token=[...] with one token (or "
                         "None: the file's own) per embedding")
    tokens = tokens if isinstance(tokens, list) else [tokens] * len(sources)
    if len(sources) == 1 and len(tokens) > 1 and isinstance(sources[0], torch.Tensor):
        if len(sources[0]) != len(tokens):
            raise ValueError(f"a tensor of {len(sources[0])} embeddings with {len(tokens)} tokens; give one each")
        sources = list(sources[0])
    if len(sources) != len(tokens):
        raise ValueError(f"{len(sources)} embedding(s) and {len(tokens)} tokens; give one token per embedding")
    if not sources:
        raise ValueError("no embedding given")
    given = [t for t in tokens if t is not None]
    if len(set(given)) < len(given):
        raise ValueError(f"duplicate tokens: {tokens}")
    return [read_embedding(source, token) for source, token in zip(sources, tokens)]


def check_fits(embeddings: list[Embedding], tokenizer, width: int) -> None:
    """Refuse what diffusers refuses before anything is changed: a width other than the text encoder's, a token
    already in the vocabulary, or whose `<tok>_1` is, or given twice. Also refused (diffusers would add them and
    then read a prompt's `<tok>` as `<tok> <tok>_1`): one of the new `<tok>_i` names already taken, and a token
    `<w>_i` next to an added word `<w>`."""
    vocab, seen = tokenizer.get_vocab(), set()
    added = {w for w, _ in tokenizer.added_words}
    for e in embeddings:
        if e.vectors.shape[-1] != width:
            raise WeightsError(f"{e.origin}: embedding width {e.vectors.shape[-1]}, but this model's text encoder "
                               f"takes {width} (an embedding trained for another model)")
        names = tokenizer.word_tokens(e.token, max(len(e.vectors), 2))  # `<tok>_1` checked even for one vector
        for name in names:
            if name in vocab:
                raise ValueError(f"{e.origin}: token {name!r} is already in the tokenizer's vocabulary; pick "
                                 "another with token= (or unload_textual_inversion() the loaded one)")
        # diffusers checks the vocabulary's entries only, and CLIP's whole words are entries with `</w>` ("red</w>"):
        # it takes "paintings" or "Red" and every prompt's word then reads as the learned one. A token the tokenizer
        # already reads as one token (in any case) is refused.
        if (known := tokenizer.single_token(e.token)) is not None:
            word = known.removesuffix(END_OF_WORD)
            raise ValueError(f"{e.origin}: token {e.token!r} is already a word of the tokenizer ({known!r}): every "
                             f"prompt's {word!r} would read as the learned one; pick another with token= (e.g. "
                             f"'<{e.token.lower()}>')")
        vector_of = re.fullmatch(r"(.+)_\d+", e.token)
        if vector_of and vector_of.group(1) in added | {o.token for o in embeddings if o is not e}:
            raise ValueError(f"{e.origin}: token {e.token!r} reads as a vector of the word {vector_of.group(1)!r}; "
                             "pick another with token=")
        for name in names[:len(e.vectors)]:
            if name in seen:
                raise ValueError(f"{e.origin}: token {name!r} is given twice")
            seen.add(name)


def load(tokenizer, text_encoder, embeddings: list[Embedding]) -> list[str]:
    """Add the words to the tokenizer and their vectors to the text encoder (in its dtype, on its device);
    return the tokens added. All checks run first, so a refused load changes nothing."""
    check_fits(embeddings, tokenizer, text_encoder.config.hidden_size)
    if not embeddings:
        return []
    table = text_encoder.embeddings
    dtype = table.token_embedding.weight.dtype
    for e in embeddings:  # as the weights' check at load: after the cast to the run's dtype
        if not bool(torch.isfinite(e.vectors.to(dtype)).all()):
            raise WeightsError(f"{e.origin}: the embedding overflows {str(dtype).removeprefix('torch.')} (values up "
                               f"to {e.vectors.abs().max().item():.3g}), the text encoder's dtype; load the model "
                               "in float32")
    rows = [table.added_rows] if table.added_start is not None else []  # (N, D) each
    start = table.added_start
    for e in embeddings:
        ids = tokenizer.add_word(e.token, len(e.vectors))
        start = ids[0] if start is None else start
        assert ids[0] == start + sum(len(r) for r in rows), "added ids run on from the rows already there"
        rows.append(e.vectors.detach())  # a copy of the values, as diffusers' `.data[id] = vector`: no autograd link
    table.set_added_rows(start, torch.cat([r.to(table.token_embedding.weight) for r in rows]))  # (N, D)
    return [e.token for e in embeddings]


def unload(tokenizer, text_encoder, tokens: str | list[str] | None = None) -> None:
    """Remove the named words (each with its `<tok>_i` vectors), or every added word when `tokens` is None."""
    if not (tokens is None or isinstance(tokens, str) or isinstance(tokens, (list, tuple, set, frozenset))
            and all(isinstance(t, str) for t in tokens)):
        raise TypeError(f"tokens: expected a word (a string), a list of words, or None for all, got {tokens!r}")
    words = tokenizer.added_words
    names = [w for w, _ in words] if tokens is None else [tokens] if isinstance(tokens, str) else list(tokens)
    table = text_encoder.embeddings
    kept, offset = [], 0
    for word, n in words:
        if word not in names:
            kept.append(table.added_rows[offset:offset + n])
        offset += n
    tokenizer.remove_words(names)  # refuses a word that was never added, before the table changes
    start = len(tokenizer) - sum(len(r) for r in kept)
    if kept:
        table.set_added_rows(start, torch.cat(kept))
    else:
        table.set_added_rows(None, None)

"""CLIP's byte-level BPE tokenizer: prompts -> (B, 77) token ids for the text encoder.

The ids match transformers' `CLIPTokenizer` (5.x, what diffusers pipelines call) with
`padding="max_length", truncation=True, max_length=model_max_length`:

- text cleaning: Unicode NFC, every whitespace run -> one space, lower case (no ftfy, no html unescaping,
  unlike openai/open_clip);
- words: CLIP's split (letter runs, single digits, runs of other symbols, English contractions), then
  GPT-2's byte-to-unicode mapping and BPE with the `</w>` end-of-word suffix;
- the checkpoint's special tokens (bos, eos, unk, pad) are matched in the prompt text as whole tokens, so a
  literal `<|endoftext|>` becomes id 49407 and, with SD 2.x's pad token "!", every "!" becomes id 0;
- `<|startoftext|>` + ids + `<|endoftext|>`, cut to `model_max_length` (eos kept last), padded with the pad
  token (SD 1.x: `<|endoftext|>` 49407; SD 2.x: "!" 0).

Words added later (`add_word`, for textual inversion) are matched as transformers' `add_tokens` matches them:
anywhere in the text, after lower-casing. A word added with n > 1 ids stands for all n in a row (its
`word_1` ... `word_{n-1}` are tokens too), the ids diffusers' `maybe_convert_prompt` produces by rewriting
`word` as `word word_1 ...` before tokenizing. Words a folder was saved with (tokenizer.json's added tokens,
`added_tokens_decoder`, or transformers < 4.34's added_tokens.json) follow the same rule: an added `word` with
`word_1` beside it stands for `word word_1 ...`.
"""

import json
import warnings
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

VOCAB_DIR = Path(__file__).with_name("clip_vocab")
END_OF_WORD = "</w>"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# The named special tokens, in the order transformers registers them: for one text declared twice with
# different flags (SD 1.5 declares <|endoftext|> as eos, unk and pad), the last declaration wins.
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
DEFAULT_SPECIALS = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
# CLIP's word pattern; the text between matches (whitespace) is dropped.
CLIP_WORDS = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"
MAX_LENGTH_LIMIT = 1024  # larger: transformers' "no limit" placeholder (int(1e30)), no real text encoder's


def _is_token(value) -> bool:
    return isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("content"), str))


# tokenizer_config.json: field -> check of its value. Fields absent here are rejected.
_CONFIG_FIELDS = {
    **{key: _is_token for key in SPECIAL_KEYS},
    "model_max_length": lambda v: type(v) is int and 2 <= v <= MAX_LENGTH_LIMIT,
    "added_tokens_decoder": lambda v: isinstance(v, dict) and all(map(_is_token, v.values()))
                                      and all(key.isdecimal() for key in v),  # ids
    "add_prefix_space": lambda v: v is False,
    "do_lower_case": lambda v: v is True,
    "tokenizer_class": lambda v: v in ("CLIPTokenizer", "CLIPTokenizerFast"),
    "backend": lambda v: v == "tokenizers",
    "padding_side": lambda v: v == "right",
    "truncation_side": lambda v: v == "right",
    "split_special_tokens": lambda v: v is False,
    "additional_special_tokens": lambda v: not v,
    "extra_special_tokens": lambda v: not v,
    # Decoding options, provenance and file names: no effect on the ids.
    **dict.fromkeys(
        ("errors", "clean_up_tokenization_spaces", "name_or_path", "special_tokens_map_file", "processor_class",
         "model_input_names", "is_local", "local_files_only", "vocab_file", "merges_file", "tokenizer_file"),
        lambda v: True,
    ),
}
_SPECIAL_MAP_FIELDS = {**{key: _is_token for key in SPECIAL_KEYS}, "additional_special_tokens": lambda v: not v}
_ADDED_TOKEN_FLAGS = ("content", "lstrip", "rstrip", "single_word", "normalized", "special", "__type", "id")


def _check_fields(config: dict, fields: dict, source: str) -> None:
    for key, value in config.items():
        if key not in fields:
            raise ValueError(f"{source}: unknown field {key!r}")
        if not fields[key](value):
            raise ValueError(f"{source}: unsupported value for {key!r}: {value!r}")


def _added_token(value, named: bool = False) -> AddedToken:
    """A config's token declaration as transformers reads it.

    A plain string is a special token matched on the raw text (normalized=False). A dict keeps its flags;
    `normalized` defaults to `not special`, as in `tokenizers`. The named tokens (bos, eos, unk, pad) are
    special whatever the dict says.
    """
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if unknown := set(value) - set(_ADDED_TOKEN_FLAGS):
        raise ValueError(f"token {value.get('content')!r}: unknown field(s) {sorted(unknown)}")
    special = value.get("special", False)
    flags = {k: value[k] for k in ("lstrip", "rstrip", "single_word") if k in value}
    return AddedToken(value["content"], special=special or named, normalized=value.get("normalized", not special),
                      **flags)


def _read_json(path: Path) -> dict:
    """A JSON object file's content, {} when the file is absent; anything else is a ValueError naming the file."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path.name}: not a UTF-8 JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path.name}: expected a JSON object, got a {type(data).__name__}")
    return data


def _bpe(build, source: str):
    """Run `build`, turning the `tokenizers` library's errors (plain Exceptions) into a ValueError naming `source`."""
    try:
        return build()
    except Exception as e:
        if type(e) is not Exception:
            raise
        raise ValueError(f"{source}: {e}") from None


class CLIPTokenizer:
    """Prompt(s) -> LongTensor (B, model_max_length): bos, BPE ids, eos, then padding.

    Build with `from_folder` (a checkpoint's `tokenizer/` folder) or `default()` (the packaged OpenAI
    vocabulary with SD 1.x's special tokens).
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], specials: dict,
                 added: tuple[AddedToken, ...] = (), model_max_length: int = 77):
        """`specials` maps bos/eos/unk/pad_token to a string or an AddedToken dict; `added` are
        tokens declared before them (a tokenizer.json's `added_tokens`, in id order)."""
        specials = {**DEFAULT_SPECIALS, **specials}
        unk = _added_token(specials["unk_token"]).content
        backend = Tokenizer(_bpe(lambda: BPE(vocab, merges, unk_token=unk, end_of_word_suffix=END_OF_WORD,
                                             fuse_unk=False), "the vocabulary and the merges do not agree"))
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_WORDS), behavior="removed", invert=True),  # keep the matches
            pre_tokenizers.ByteLevel(add_prefix_space=False),  # also splits with GPT-2's regex
        ])
        # Explicitly added tokens first; then each named token unless its text is already there.
        added = list(added)
        named = [_added_token(specials[key], named=True) for key in SPECIAL_KEYS]
        known = {t.content for t in added}
        backend.add_tokens(added + [t for t in named if t.content not in known])

        self._backend = backend
        self._base_backend: str | None = None  # the backend before any `add_word`, serialized on the first one
        self._words: list[tuple[str, int]] = []  # added words and their id counts, in id order
        self._saved_runs = _saved_runs(backend, [t.content for t in added])  # words saved with the folder
        self._runs: dict[int, list[int]] = dict(self._saved_runs)  # a multi-id word's first id -> all its ids
        self.model_max_length = model_max_length
        self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id = (
            self._token_id(key, token.content) for key, token in zip(SPECIAL_KEYS, named))

    def _token_id(self, key: str, text: str) -> int:
        token_id = self._backend.token_to_id(text)
        if token_id is None or token_id >= self._backend.get_vocab_size(with_added_tokens=False):
            raise ValueError(f"{key} {text!r} is not in the vocabulary")  # a new id would overflow the embedding
        return token_id

    @classmethod
    def default(cls, pad_token: str = EOS) -> "CLIPTokenizer":
        """The OpenAI CLIP vocabulary shipped with this package, configured as SD 1.x's `tokenizer/` folder:
        pad = eos = unk = `<|endoftext|>`, model_max_length 77. pad_token="!" gives SD 2.x's (pad "!", id 0)."""
        vocab, merges = BPE.read_file(str(VOCAB_DIR / "vocab.json"), str(VOCAB_DIR / "merges.txt"))
        # SD 1.5's declarations: AddedToken dicts with normalized=True, but pad a plain string, which (being
        # declared last) makes <|endoftext|> match case-sensitively while <|startoftext|> does not. SD 2.1 declares
        # the same, with pad "!" (a plain string in its special_tokens_map.json).
        sd15 = {key: {"content": text, "normalized": True} for key, text in DEFAULT_SPECIALS.items()}
        return cls(vocab, merges, {**sd15, "pad_token": pad_token})

    @classmethod
    def from_folder(cls, path) -> "CLIPTokenizer":
        """Load a checkpoint's `tokenizer/` folder: tokenizer.json, or vocab.json + merges.txt, with optional
        tokenizer_config.json and special_tokens_map.json (the layouts transformers 4.x and 5.x write).

        Special tokens follow transformers 5: tokenizer_config.json's values, overridden by
        special_tokens_map.json unless the config lists `added_tokens_decoder` (SD 2.x declares pad "!" only
        in special_tokens_map.json). Unknown fields or values raise ValueError naming the field.
        """
        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        _check_fields(config, _CONFIG_FIELDS, "tokenizer_config.json")
        if (path / "tokenizer.json").is_file():  # transformers prefers it to vocab.json + merges.txt
            vocab, merges, added = _read_tokenizer_json(path / "tokenizer.json")
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            vocab, merges = _bpe(lambda: BPE.read_file(str(path / "vocab.json"), str(path / "merges.txt")),
                                 "vocab.json / merges.txt")
            added = ()
        else:
            raise FileNotFoundError(f"{path}: neither tokenizer.json nor vocab.json + merges.txt")

        specials = {key: config[key] for key in SPECIAL_KEYS if key in config}
        stated = {}  # added tokens' ids as added_tokens.json states them
        if "added_tokens_decoder" in config:
            decoder = {int(i): _added_token(t) for i, t in config["added_tokens_decoder"].items()}
            added = tuple(decoder[i] for i in sorted(decoder))
            for i, token in decoder.items():
                if vocab.get(token.content, i) != i:
                    raise ValueError(f"tokenizer_config.json: added_tokens_decoder gives {token.content!r} id {i}, "
                                     f"the vocabulary {vocab[token.content]}")
        else:
            special_map = _read_json(path / "special_tokens_map.json")
            _check_fields(special_map, _SPECIAL_MAP_FIELDS, "special_tokens_map.json")
            specials.update({key: _as_special(special_map[key]) for key in SPECIAL_KEYS if key in special_map})
            if not added:  # transformers < 4.34's file of added tokens, {text: id}
                stated = _read_json(path / "added_tokens.json")
                added = _legacy_added_tokens(stated, specials)
        tokenizer = cls(vocab, merges, specials, added, config.get("model_max_length", 77))
        for text, i in stated.items():  # the ids the file states are the ids the tokens took
            if (got := tokenizer._backend.token_to_id(text)) != i:
                raise ValueError(f"added_tokens.json: {text!r} has id {i}, but the vocabulary and the tokens before "
                                 f"it give it {got}")
        return tokenizer

    def num_tokens(self, prompt: str) -> int:
        """Number of tokens of `prompt`, without bos and eos (0 for an empty or blank prompt); a multi-id added
        word counts all its ids."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt: expected a string, got {type(prompt).__name__}")
        return len(self._encode(prompt)[0])

    def _encode(self, prompt: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The prompt's ids (no bos / eos) and each id's (start, end) in the prompt; a multi-id word's ids all
        carry the word's span."""
        encoding = self._backend.encode(prompt)
        if not self._runs:
            return encoding.ids, encoding.offsets
        ids, offsets = [], []
        for token_id, span in zip(encoding.ids, encoding.offsets):
            run = self._runs.get(token_id, [token_id])
            ids += run
            offsets += [span] * len(run)
        return ids, offsets

    # ------------------------------------------------------------------------------------------------------------
    # Words added after loading (textual inversion)

    def get_vocab(self) -> dict[str, int]:
        """Every token text and its id, added tokens included (transformers' `get_vocab`)."""
        return self._backend.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        """The number of ids, added tokens included (transformers' `len(tokenizer)`); new words take the next."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def added_words(self) -> list[tuple[str, int]]:
        """The words `add_word` added, with their id counts, in id order."""
        return list(self._words)

    def single_token(self, text: str) -> str | None:
        """The one token the tokenizer reads `text` as (after lower-casing: a vocabulary word `word</w>`, a
        vocabulary entry, a special or an added token), or None when it reads it as several."""
        tokens = self._backend.encode(text).tokens
        return tokens[0] if len(tokens) == 1 else None

    @staticmethod
    def word_tokens(word: str, n_ids: int) -> list[str]:
        """The token texts of a word with n ids: `word`, `word_1`, ..., `word_{n-1}` (diffusers' names)."""
        return [word] + [f"{word}_{i}" for i in range(1, n_ids)]

    def add_word(self, word: str, n_ids: int) -> list[int]:
        """Add `word` (and `word_1` ... `word_{n_ids-1}`) as new tokens after every existing id; return the ids.
        None of the texts may be in the vocabulary already (the caller checks, naming the file)."""
        names = self.word_tokens(word, n_ids)
        if taken := [name for name in names if self._backend.token_to_id(name) is not None]:
            raise ValueError(f"token(s) {taken} already in the vocabulary")
        if self._base_backend is None:
            self._base_backend = self._backend.to_str()
        start = len(self)
        # transformers' add_tokens(str): not special, normalized (matched in the lower-cased text)
        self._backend.add_tokens([AddedToken(name, special=False, normalized=True) for name in names])
        ids = [self._backend.token_to_id(name) for name in names]
        assert ids == list(range(start, start + n_ids)), "new tokens take the next ids, in order"
        self._words.append((word, n_ids))
        if n_ids > 1:
            self._runs[ids[0]] = ids
        return ids

    def remove_words(self, words: list[str]) -> None:
        """Remove added words (with their `word_i` tokens); the words left keep their order and take the ids
        right after the base vocabulary again, as diffusers' `unload_textual_inversion` renumbers them."""
        if unknown := sorted(set(words) - {w for w, _ in self._words}):
            raise ValueError(f"no added word {unknown[0]!r} (added: {[w for w, _ in self._words]})")
        kept = [(w, n) for w, n in self._words if w not in words]
        if self._base_backend is not None:
            self._backend = Tokenizer.from_str(self._base_backend)
        self._words, self._runs = [], dict(self._saved_runs)
        for word, n_ids in kept:
            self.add_word(word, n_ids)

    def __call__(self, prompts: list[str] | str) -> torch.Tensor:
        """LongTensor (B, model_max_length). Prompts longer than model_max_length - 2 tokens are cut (eos
        stays last) with a warning naming the prompt and the dropped text. Anything but a string or a list (or
        tuple) of strings is a TypeError naming the offending prompt."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts: expected a string or a list of strings, got {type(prompts).__name__}")
        for row, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompts[{row}]: expected a string (a prompt; may be \"\"), got "
                                f"{type(prompt).__name__}")
        room = self.model_max_length - 2  # bos and eos
        ids = torch.full((len(prompts), self.model_max_length), self.pad_token_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens, offsets = self._encode(prompt)  # one by one: encode_batch's threads upset forked workers
            if len(tokens) > room:
                dropped = prompt[offsets[room][0]:]
                warnings.warn(
                    f"prompt {row} ({_shorten(prompt)}) has {len(tokens)} tokens but the text encoder takes {room}: "
                    f"dropped the last {len(tokens) - room} ({_shorten(dropped)})", stacklevel=2)
                tokens = tokens[:room]
            ids[row, : len(tokens) + 2] = torch.tensor([self.bos_token_id, *tokens, self.eos_token_id])
        return ids


def _legacy_added_tokens(stated: dict, specials: dict) -> tuple[AddedToken, ...]:
    """added_tokens.json's {text: id}, where transformers < 4.34 saved added tokens (a pipeline saved after
    `load_textual_inversion`), as transformers 5 reads them: a named special token's text is special and matched on
    the raw text, any other is normalized. In id order."""
    for text, i in stated.items():
        if type(i) is not int:
            raise ValueError(f"added_tokens.json: {text!r} has id {i!r}, not an integer")
    names = {_added_token(value).content for value in specials.values()}
    return tuple(AddedToken(text, special=text in names, normalized=text not in names)
                 for text, _ in sorted(stated.items(), key=lambda item: item[1]))


def _saved_runs(backend: Tokenizer, added: list[str]) -> dict[int, list[int]]:
    """Multi-vector words a folder was saved with (a pipeline saved after `load_textual_inversion`): an added token
    `word` with `word_1` beside it stands for `word word_1 ... word_k` (while `word_i` exists), as diffusers'
    `maybe_convert_prompt` rewrites a prompt with any added token it finds."""
    names, runs = set(added), {}
    for word in added:
        run = [word]
        while f"{word}_{len(run)}" in names:
            run.append(f"{word}_{len(run)}")
        if len(run) > 1:
            runs[backend.token_to_id(word)] = [backend.token_to_id(name) for name in run]
    return runs


def _as_special(value):
    """special_tokens_map.json declarations are special tokens whatever their `special` field says."""
    return value if isinstance(value, str) else {**value, "special": True}


def _shorten(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _read_tokenizer_json(path: Path) -> tuple[dict, list, tuple[AddedToken, ...]]:
    """Vocabulary, merges and added tokens of a tokenizer.json. Like transformers' CLIPTokenizer, its
    normalizer, pre-tokenizer and post-processor are ignored: CLIP's are rebuilt."""
    data = _read_json(path)
    model = data.get("model", {})
    if not isinstance(model, dict):
        raise ValueError(f"tokenizer.json: model is a {type(model).__name__}, not an object")
    expected = {"type": "BPE", "end_of_word_suffix": END_OF_WORD, "dropout": None}
    for key, value in expected.items():
        if model.get(key) != value:
            raise ValueError(f"tokenizer.json: model.{key} is {model.get(key)!r}, CLIP needs {value!r}")
    if model.get("continuing_subword_prefix") not in (None, ""):
        raise ValueError(f"tokenizer.json: unsupported model.continuing_subword_prefix "
                         f"{model['continuing_subword_prefix']!r}")
    if not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
        raise ValueError("tokenizer.json: model.vocab must be an object and model.merges a list")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    added = sorted(data.get("added_tokens", []), key=lambda t: t["id"])
    for token in added:
        if model["vocab"].get(token["content"], token["id"]) != token["id"]:
            raise ValueError(f"tokenizer.json: added token {token['content']!r} has id {token['id']}, "
                             f"the vocabulary {model['vocab'][token['content']]}")
    return model["vocab"], merges, tuple(_added_token(t) for t in added)

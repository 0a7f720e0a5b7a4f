"""How every config and parameter dataclass checks its values, and the errors it raises.

One family of errors (docs/design.md §5): a value given as an argument that cannot be right is a
`ValueError` (or `TypeError` for an unknown name); a file we cannot use is a `FileError`, itself a `ValueError`,
so one `except ValueError` catches both. `ConfigError` (a model's config.json, scheduler config, tokenizer or
diffedit.json), `models.weights.WeightsError`, `saved_inversion.InversionFileError` and `image_files.ImageFileError`
are its kinds.

This module imports nothing but the standard library, so `models/` and `schedulers/` use it without depending on
the rest of `diffedit`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


# Files that only unpickling could read (torch.save, pickle): refused wherever a path is taken (models, LoRAs,
# embeddings), never opened. One list, here, because `models/` and `diffedit/` both check it.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


class FileError(ValueError):
    """A file this code cannot use (missing, unreadable, corrupt, or holding values it does not support),
    with the file named."""


class ConfigError(FileError):
    """A config file this code cannot run, with the offending field named."""


def one_line(error: BaseException) -> str:
    """An error's message on one line (its lines joined with "; "), as the command line prints it."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def listed(items: list[str], limit: int) -> str:
    """The first `limit` items, comma-separated, and how many there are in all when some are left out."""
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def shorten(text: str, limit: int = 40) -> str:
    """A text (a prompt) quoted for a message, cut with "..." past `limit` characters."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


# ---------------------------------------------------------------------------------------------------------------
# Predicates: what a field may hold, and how the message says it


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_integral(value: Any) -> bool:
    """A Python or numpy int, not a bool (`is_int` takes Python ints only, as config files hold)."""
    import numpy as np

    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): NaN and inf are never a usable setting."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (
        isinstance(value, int) or math.isfinite(value))


Rule = tuple[Callable[[Any], bool], str]  # (predicate, what it expects, as the message says it)


def int_at_least(lo: int) -> Rule:
    return (lambda v: is_int(v) and v >= lo), f"an int >= {lo}"


def number_in(lo: float, hi: float) -> Rule:
    return (lambda v: is_number(v) and lo <= v <= hi), f"a number in [{lo:g}, {hi:g}]"


def number_at_least(lo: float) -> Rule:
    return (lambda v: is_number(v) and v >= lo), f"a number >= {lo:g}"


POSITIVE: Rule = (lambda v: is_number(v) and v > 0), "a positive number"
NUMBER: Rule = is_number, "a number"
BOOL: Rule = (lambda v: isinstance(v, bool)), "True or False"


def one_of(choices: Iterable[Any]) -> Rule:
    choices = tuple(choices)
    return (lambda v: v in choices), f"one of {choices}"


def optional(rule: Rule) -> Rule:
    test, what = rule
    return (lambda v: v is None or test(v)), f"None or {what}"


def check_fields(obj: Any, rules: dict[str, Rule], owner: str, error: type[Exception] = ValueError) -> None:
    """Raise `error("{owner}.{field}: expected {what}, got {value!r}")` for the first field that breaks its rule.
    Dataclasses call this from `__post_init__`, so no instance with a bad value exists."""
    for name, (test, what) in rules.items():
        value = getattr(obj, name)
        if not test(value):
            raise error(f"{owner}.{name}: expected {what}, got {value!r}")


def check_keys(kind: str, raw: dict[str, Any], read: Iterable[str], ignored: Iterable[str] = (),
               pinned: dict[str, Any] | None = None) -> None:
    """A config dict's keys: each one read, ignored on purpose, or pinned to the value(s) we implement (a tuple
    lists several). An unknown key or an unsupported pinned value is a ConfigError naming it."""
    read, ignored, pinned = set(read), set(ignored), pinned or {}
    for key, value in raw.items():
        if key in read or key in ignored:
            continue
        if key not in pinned:
            raise ConfigError(f"{kind} config: unknown field {key!r}")
        allowed = pinned[key]
        if not (value in allowed if isinstance(allowed, tuple) else value == allowed):
            raise ConfigError(f"{kind} config: unsupported value {key}={value!r} (supported: {allowed!r})")


def check_readable(path: Path, what: str, error: type[FileError] = FileError) -> None:
    """A file that exists, is not a folder, and can be opened for reading; else `error` naming it as `what`."""
    if not path.exists():
        raise error(f"{what} {path} does not exist" + (" (a broken link)" if path.is_symlink() else ""))
    if path.is_dir():
        raise error(f"{what} {path} is a folder, not a file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None

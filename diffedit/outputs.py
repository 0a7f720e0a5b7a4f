"""Writing results: every output location checked before any work, then all outputs written or none.

A run plans its outputs first (`Planned`: a path and what it is), checks them (`check_outputs`: an existing,
writable folder, a file name we can write, no two outputs on one path, no input overwritten unless asked), does its
work, and only then writes (`commit`): each file to a temporary file beside its destination, then all renamed into
place. A failure at any point leaves every existing file as it was and no partial file behind. Torch-free.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from .validation import one_line

LOSSY_FORMATS = {"JPEG", "WEBP"}  # a binary mask written in these is no longer exactly binary


class OutputPathError(ValueError):
    """An output location that cannot be written (or must not be, without asking), with the path named."""


@dataclass
class Planned:
    """One file a run will write: its final path, what it is (for messages), and how to write it to a given
    path (set once the run has the data)."""

    path: Path
    what: str
    write: Callable[[Path], None] | None = None


def _slug(text: str) -> str:
    """The text as a file-name part: letters and digits of any script (NFC), runs of anything else one "-"."""
    return re.sub(r"[\W_]+", "-", unicodedata.normalize("NFC", text).lower()).strip("-")[:48] or "empty"


def expand_names(pattern: str, targets: list[str]) -> list[Path]:
    """One path per target: {i} / {target} placeholders filled in, else "-1", "-2" ... before the extension when
    there are several targets."""
    if "{i}" in pattern or "{target}" in pattern:
        return [Path(pattern.replace("{i}", str(i)).replace("{target}", _slug(t))) for i, t in enumerate(targets, 1)]
    path = Path(pattern)
    if len(targets) == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, len(targets) + 1)]


def image_format(path: Path, what: str, mode: str = "RGB") -> str:
    """The Pillow format an output's extension names, refused when Pillow cannot write it, or cannot write it in
    `mode` ("RGB" pictures, "L" masks): tried on a 1x1 picture in memory, so the refusal comes before any work."""
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise OutputPathError(f"{what} {path}: unknown image extension {path.suffix!r} (use .png, .jpg, .webp, "
                              ".bmp or .tif)")
    try:
        Image.new(mode, (1, 1)).save(io.BytesIO(), format=fmt)
    except Exception as e:  # noqa: BLE001 - each plugin refuses in its own way (OSError, KeyError, ValueError)
        kind = {"RGB": "colour pictures", "L": "greyscale masks"}.get(mode, f"mode {mode}")
        raise OutputPathError(f"{what} {path}: Pillow cannot write {kind} as {fmt} ({one_line(e)}); use .png, .jpg, "
                              ".webp, .bmp or .tif") from None
    return fmt


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_outputs(planned: list[Planned], inputs: dict[str, Path], overwrite_inputs: bool = False,
                  overwrite_hint: str = "pass overwrite_inputs=True",
                  protected: list[tuple[str, Path]] | None = None) -> None:
    """Every output: a file path in an existing, writable folder, distinct from the others, and not one of the
    `inputs` ({label: path}) unless `overwrite_inputs` (`overwrite_hint` says how to ask for that), nor one of the
    `protected` files or inside a protected folder (`check_protected`)."""
    check_protected(planned, protected or [])
    seen: dict[str, Planned] = {}
    for p in planned:
        if p.path.is_dir():
            raise OutputPathError(f"{p.what} {p.path} is a folder; give a file name")
        if p.path.exists() and not p.path.is_file():  # renaming over /dev/null or a pipe would replace it
            raise OutputPathError(f"{p.what} {p.path} is not a regular file (a device, pipe or socket); give a "
                                  "file name")
        folder = p.path.parent
        if not folder.exists():
            raise OutputPathError(f"output folder {folder} does not exist (create it first)")
        if not folder.is_dir():
            raise OutputPathError(f"{p.what} {p.path}: {folder} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputPathError(f"output folder {folder} is not writable")
        # the entry the rename replaces: in the folder as it really is (a symlinked folder is the same folder)
        key = os.path.normcase(os.path.join(os.path.realpath(folder), p.path.name))
        if key in seen:
            raise OutputPathError(f"{seen[key].what} and {p.what} would both be written to {p.path}")
        seen[key] = p
        for label, path in inputs.items():
            if _same_file(p.path, path) and not overwrite_inputs:
                raise OutputPathError(f"{p.what} {p.path} is the {label}; {overwrite_hint} to overwrite it")


def check_protected(planned: list[Planned], protected: list[tuple[str, Path]]) -> None:
    """No output is a protected input ((label, file or folder) pairs: the model, its configs, a LoRA or embedding file)
    or lies inside a protected folder: those are never overwritten, whatever the overwrite flag says (an inversion
    written over the UNet's weights used to replace them)."""
    for p in planned:
        out = os.path.normcase(os.path.realpath(p.path))
        for label, path in protected:
            base = os.path.normcase(os.path.realpath(path))
            inside = os.path.isdir(base) and out.startswith(base.rstrip(os.sep) + os.sep)
            if out == base or inside:
                raise OutputPathError(f"{p.what} {p.path} would {'write into' if inside else 'overwrite'} the "
                                      f"{label} {path}; write it elsewhere")


def plan_images(outs: list[tuple[str, str | None]], targets: list[str], inputs: dict[str, Path],
                overwrite_inputs: bool = False, overwrite_hint: str = "pass overwrite_inputs=True",
                modes: dict[str, str] | None = None,
                protected: list[tuple[str, Path]] | None = None) -> dict[str, list[tuple[Path, str]]]:
    """Image outputs by kind: for each (kind, name pattern or None), one (path, Pillow format) per target
    (`expand_names`), every path checked (`check_outputs`, `image_format` in the kind's mode from `modes`, "RGB"
    when not named) before any work."""
    paths = {what: expand_names(pattern, targets) for what, pattern in outs if pattern is not None}
    check_outputs([Planned(path, what) for what, ps in paths.items() for path in ps], inputs, overwrite_inputs,
                  overwrite_hint, protected)
    modes = modes or {}
    return {what: [(path, image_format(path, what, modes.get(what, "RGB"))) for path in ps]
            for what, ps in paths.items()}


def planned_image(plan: dict[str, list[tuple[Path, str]]], what: str, i: int, img: Image.Image) -> Planned:
    """Target i's output of kind `what` from a `plan_images` plan, to be written from `img`."""
    path, fmt = plan[what][i]
    return Planned(path, what, image_writer(img, fmt))


def commit(planned: list[Planned]) -> None:
    """Write every output to a temporary file beside it, then rename them all into place; on any failure remove
    the temporary files and leave the destinations untouched. A replaced file keeps its permissions."""
    temps: list[tuple[str, Path]] = []
    try:
        for p in planned:
            fd, tmp = tempfile.mkstemp(prefix=f".{p.path.name}.", suffix=".part", dir=p.path.parent)
            os.close(fd)
            temps.append((tmp, p.path))
            p.write(Path(tmp))
            mode = os.stat(p.path).st_mode & 0o777 if p.path.exists() else 0o666 & ~_umask()
            os.chmod(tmp, mode)
        for tmp, dest in temps:
            os.replace(tmp, dest)
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def image_writer(img: Image.Image, fmt: str) -> Callable[[Path], None]:
    """A `Planned.write` that saves `img` in Pillow format `fmt` (lossy formats at quality 95)."""
    def write(tmp: Path) -> None:
        img.save(tmp, format=fmt, **({"quality": 95} if fmt in LOSSY_FORMATS else {}))

    return write

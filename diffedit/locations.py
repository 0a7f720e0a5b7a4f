"""Where models come from, without importing torch (the command line checks its arguments before loading torch)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .validation import PICKLE_SUFFIXES

SHIPPED_MODEL = Path(__file__).parent / "assets" / "shapes-sd"  # the model that ships with the package
EXAMPLE_IMAGE = Path(__file__).parent / "assets" / "examples" / "red_circle.png"  # a picture of its world, 64x64
_REPO_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


class ModelNotFoundError(FileNotFoundError):
    """A model folder or hub repo that cannot be found or fetched."""


def looks_like_repo_id(text: str) -> bool:
    """`owner/name` as the hub spells repo ids (and not a relative or absolute path)."""
    return bool(_REPO_ID.match(text)) and not text.startswith((".", "/", "~"))


def shipped_model_installed() -> bool:
    return (SHIPPED_MODEL / "model_index.json").is_file()


SINGLE_FILE_SUFFIX = ".safetensors"  # an original-layout checkpoint in one file (`StableDiffusion.from_single_file`)


def model_location(path_or_repo_id: str | os.PathLike | None) -> Path | str:
    """None: the shipped model's folder; an existing folder or .safetensors file (a single-file checkpoint): as a
    Path; something shaped like a hub repo id: as is (whether the hub has it is found out when it is fetched).
    Anything else (a pickle checkpoint among them) is a ModelNotFoundError."""
    if path_or_repo_id is None:
        if not shipped_model_installed():
            raise ModelNotFoundError(f"the model that ships with diffedit is not installed (expected a diffusers "
                                     f"model folder at {SHIPPED_MODEL}); pass a model folder or hub repo id")
        return SHIPPED_MODEL
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo_id)
    if path.is_file() and path.suffix.lower() == SINGLE_FILE_SUFFIX:
        return path
    if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelNotFoundError(f"model file {text} is a pickle checkpoint; diffedit loads safetensors only: convert "
                                 f"it to {SINGLE_FILE_SUFFIX} first")
    if path.exists():
        raise ModelNotFoundError(f"model path {text} is a file; give the folder that holds model_index.json or a "
                                 f"single-file {SINGLE_FILE_SUFFIX} checkpoint")
    if path.suffix.lower() in (SINGLE_FILE_SUFFIX, *PICKLE_SUFFIXES):
        raise ModelNotFoundError(f"model file {text} does not exist")
    if not looks_like_repo_id(text):
        raise ModelNotFoundError(f"model folder {text} does not exist (not found here, and not shaped like a hub "
                                 "repo id such as stabilityai/stable-diffusion-2-1): give a diffusers model folder "
                                 "or a repo id")
    return text

"""Where models come from, without importing torch (the command line checks its arguments before loading torch)."""

from __future__ import annotations

import re
from pathlib import Path

SHIPPED_MODEL = Path(__file__).parent / "assets" / "shapes-sd"  # the model that ships with the package
_REPO_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


def looks_like_repo_id(text: str) -> bool:
    """`owner/name` as the hub spells repo ids (and not a relative or absolute path)."""
    return bool(_REPO_ID.match(text)) and not text.startswith((".", "/", "~"))


def shipped_model_installed() -> bool:
    return (SHIPPED_MODEL / "model_index.json").is_file()

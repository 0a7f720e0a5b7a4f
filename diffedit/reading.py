"""Any image Pillow opens, as the 8-bit RGB picture a person sees: first frame, EXIF orientation applied, alpha
composited onto white, 16-bit and float samples scaled. Torch-free: the command line reads its input before it loads
torch, and the one-call API uses the same rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

Note = Callable[[str], None]


def _silent(message: str) -> None:
    pass


def displayed_rgb(img: Image.Image, name: str, note: Note = _silent, png_bits: int | None = None) -> Image.Image:
    """The first frame, turned as its EXIF orientation says, converted to 8-bit RGB; each change noted."""
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        note(f"{name} has {frames} frames: using the first")
        img.seek(0)
        img.load()
    orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation
    if orientation not in (1, None):
        size = img.size
        img = ImageOps.exif_transpose(img)
        note(f"{name} is turned as its EXIF orientation ({orientation}) says: {size[0]}x{size[1]} -> "
             f"{img.width}x{img.height}")
    return to_rgb(img, name, note, png_bits)


def to_rgb(img: Image.Image, name: str, note: Note = _silent, png_bits: int | None = None) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; `note` hears what was changed. Transparency is composited onto white."""
    mode = img.mode
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 1.0 if mode == "F" and a.max(initial=0) <= 1.0 else 65535.0 if a.max(initial=0) > 255 else 255.0
        depth = "32-bit float" if mode == "F" else "16-bit" if top == 65535.0 else "32-bit integer"
        note(f"{name} is {depth} greyscale: converted to 8-bit RGB")
        return Image.fromarray(np.round(np.clip(a / top, 0, 1) * 255).astype(np.uint8), "L").convert("RGB")
    if png_bits == 16 and mode in ("RGB", "RGBA", "LA", "L"):
        note(f"{name} has 16 bits per channel: reduced to 8")
    if has_alpha:
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            note(f"{name} has transparent pixels: composited onto white (the output has no alpha)")
        else:
            note(f"{name} has an alpha channel (fully opaque): dropped")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return img
    described = {"L": "greyscale", "1": "black-and-white (1-bit)", "P": "a palette image", "CMYK": "CMYK",
                 "YCbCr": "YCbCr", "LAB": "Lab", "HSV": "HSV"}.get(mode, f"mode {mode}")
    note(f"{name} is {described}: converted to RGB")
    return img.convert("RGB")


def png_bit_depth(path: Path) -> int | None:
    """Bits per sample of a PNG file (Pillow reads 16-bit RGB PNGs as 8-bit without saying so); None otherwise."""
    with open(path, "rb") as f:
        head = f.read(25)
    return head[24] if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) == 25 else None

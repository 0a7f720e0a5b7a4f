"""Image and mask files in: any image Pillow opens, as the 8-bit RGB picture a person sees (first frame, EXIF
orientation applied, alpha composited onto white, 16-bit and float samples scaled), and masks as binary images.

Every way a file can be unusable (missing, a folder, unreadable, not an image, over the pixel limit, truncated,
corrupt, a mask of the wrong size) is one `ImageFileError` line naming the file. Torch-free: the command line reads
its input before it loads torch, and the one-call API uses the same rules.
"""

from __future__ import annotations

import contextlib
import math
import threading
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .validation import FileError, check_readable

Note = Callable[[str], None]
DEFAULT_MAX_PIXELS = 2048 * 2048  # the command line's limit (--max-pixels)


class ImageFileError(FileError):
    """An image or mask file that cannot be used, with the file named."""


def open_image(path: Path, what: str = "image", max_pixels: int | None = None,
               limit_name: str = "max_pixels") -> Image.Image:
    """Open and fully decode an image file; every way it can fail is one ImageFileError line. `max_pixels` is
    checked before decoding (`limit_name` is how the message names it: the command line's flag); without it,
    Pillow's own decompression-bomb limit applies."""
    check_readable(Path(path), what, ImageFileError)
    try:
        with pillow_limit_off(max_pixels is not None):  # our own limit is checked before decoding
            img = Image.open(path)
    except UnidentifiedImageError:
        raise ImageFileError(f"{what} {path} is not an image (or not in a format Pillow reads)") from None
    except Image.DecompressionBombError:  # only without max_pixels: it was "corrupt"
        raise ImageFileError(f"{what} {path} is over Pillow's decompression-bomb limit of "
                             f"{2 * Image.MAX_IMAGE_PIXELS} pixels: downscale it (or, trusting the file, raise "
                             "PIL.Image.MAX_IMAGE_PIXELS)") from None
    except Exception as e:  # noqa: BLE001 - Pillow plugins raise many types on corrupt headers
        raise ImageFileError(f"{what} {path} is corrupt: {e}") from None
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        s = math.sqrt(max_pixels / (w * h))
        raise ImageFileError(f"{what} {path} is {w}x{h} ({w * h / 1e6:.1f} megapixels), over {limit_name} "
                             f"{max_pixels}: downscale it (to {max(1, int(w * s))}x{max(1, int(h * s))} or less) "
                             f"or pass {limit_name} {w * h}")
    try:
        with pillow_limit_off(max_pixels is not None):  # some plugins check it again as they decode
            img.load()
    except Exception as e:  # noqa: BLE001 - truncated data: OSError; some plugins SyntaxError, ValueError, EOFError
        raise ImageFileError(f"{what} {path} is truncated or corrupt ({e})") from None
    return img


_PILLOW_LIMIT = threading.Lock()


@contextlib.contextmanager
def pillow_limit_off(off: bool):
    """Pillow's decompression-bomb limit (a process-wide setting) off inside, when `off`, and back as it was after:
    left off, every later Pillow user in the process (the demo's web server, the caller's code) lost it."""
    if not off:
        yield
        return
    with _PILLOW_LIMIT:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def read_image(path: Path, note: Note | None = None, max_pixels: int | None = None,
               limit_name: str = "max_pixels") -> Image.Image:
    """An image file as 8-bit RGB at its displayed orientation; `note` hears every conversion."""
    path = Path(path)
    img = open_image(path, "input image", max_pixels, limit_name)
    return displayed_rgb(img, path.name, note or _silent, png_bit_depth(path))


def read_mask(path: Path, size: tuple[int, int], max_pixels: int | None = None,
              limit_name: str = "max_pixels", note: Note | None = None) -> Image.Image:
    """A mask file of the image's `size` as a binary "L" image (0 / 255), read by `mask_cells`' rule; as the image,
    its first frame, turned as its EXIF orientation says (what a viewer shows, and where the user drew). A colour
    picture is read by its brightness, with a note (a photo given as the mask reads as one)."""
    img = displayed(open_image(Path(path), "mask", max_pixels, limit_name))
    if img.size != size:
        raise ImageFileError(f"mask {path} is {img.width}x{img.height} but the image is {size[0]}x{size[1]}")
    if note is not None and is_colour(img):
        note(f"mask {path} is a colour picture: read by its brightness (edited where >= 128 of 255); a mask is white "
             "where to edit on black")
    return Image.fromarray(mask_cells(mask_samples(img), f"mask {path}", sample_bits(img)).astype(np.uint8) * 255,
                           "L")


def is_colour(img: Image.Image) -> bool:
    """Whether a picture holds colours, not only greys (a channel apart from the others by more than 16 of 255)."""
    if img.mode not in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"):
        return False
    rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
    return bool((rgb.max(axis=2) - rgb.min(axis=2) > 16).any())


def mask_samples(img: Image.Image) -> np.ndarray:
    """A mask picture's samples as one (H, W) array in the picture's own range: 8-bit luminance for the common
    modes, with transparent pixels as 0 (not edited: a stroke drawn on a transparent layer marks the region);
    16-bit, 32-bit integer and float samples as they are."""
    if img.mode in _WIDE_MODES:
        return np.asarray(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return np.asarray(img.convert("L"))


def sample_bits(img: Image.Image) -> int | None:
    """16 for a picture stored with 16-bit samples (its values are 0-65535 whatever its darkest and brightest
    pixels), else None: the values say."""
    return 16 if img.mode.startswith("I;16") else None


def mask_cells(samples: np.ndarray, what: str, bits: int | None = None) -> np.ndarray:
    """(H, W) mask samples -> (H, W) bool, edit where True; one reading for every form a mask comes in:
    - bools as they are;
    - floats in [0, 1]: edit where >= 0.5;
    - integers: all in {0, 1}: edit where 1 (a 0/1 mask, as numpy users write one); else 8-bit (0-255) values,
      edit where >= 128, or 16-bit ones (0-65535, any value over 255, or `bits` 16: a 16-bit picture, however
      dark), edit where >= 32768.
    Anything else (NaN, negative values, floats past 1, integers past 65535) is a ValueError naming `what`."""
    if samples.dtype == np.bool_:
        return samples
    if not np.issubdtype(samples.dtype, np.number):
        raise ValueError(f"{what}: expected bools, 0 / 1, 0-255 or floats in [0, 1], got dtype {samples.dtype}")
    lo, hi = (samples.min(), samples.max()) if samples.size else (0, 0)
    if np.issubdtype(samples.dtype, np.floating):
        if not np.isfinite(samples).all():
            raise ValueError(f"{what}: float values must be in [0, 1], got NaN or inf")
        if not (0 <= lo and hi <= 1):
            raise ValueError(f"{what}: float values must be in [0, 1], got [{lo:g}, {hi:g}] (0-255 values: pass "
                             "integers)")
        return samples >= 0.5
    if lo < 0 or hi > 65535:
        raise ValueError(f"{what}: integer values must be 0 / 1, 0-255 or 0-65535, got [{lo}, {hi}]")
    if hi <= 1:
        return samples == 1
    return samples >= (128 if hi <= 255 and bits != 16 else 32768)


_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # 16-bit, 32-bit integer and float samples


def _silent(message: str) -> None:
    pass


def displayed_rgb(img: Image.Image, name: str, note: Note = _silent, png_bits: int | None = None) -> Image.Image:
    """The first frame, turned as its EXIF orientation says, converted to 8-bit RGB; each change noted."""
    return to_rgb(displayed(img, name, note), name, note, png_bits)


def displayed(img: Image.Image, name: str = "", note: Note = _silent) -> Image.Image:
    """The picture a viewer shows: the first frame, turned as its EXIF orientation says; each change noted."""
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
    return img


def to_rgb(img: Image.Image, name: str, note: Note = _silent, png_bits: int | None = None) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; `note` hears what was changed. Transparency is composited onto white."""
    mode = img.mode
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if mode in _WIDE_MODES:
        a = np.asarray(img, dtype=np.float64)
        lo, hi = (a.min(), a.max()) if a.size else (0.0, 0.0)
        if mode == "F" and not (np.isfinite(a).all() and 0 <= lo and hi <= 1):
            raise ImageFileError(f"{name} is a float picture with values in [{lo:g}, {hi:g}]: float samples must be "
                                 "in [0, 1] (nothing is clipped); rescale it, or save it as 8- or 16-bit")
        if mode == "I" and (lo < 0 or hi > 65535):
            raise ImageFileError(f"{name} is a 32-bit integer picture with values in [{lo:g}, {hi:g}]: only 0-65535 "
                                 "(16-bit) values are read; rescale it, or save it as 8- or 16-bit")
        top = 1.0 if mode == "F" else 255.0 if mode == "I" and hi <= 255 else 65535.0
        depth = "32-bit float" if mode == "F" else "16-bit" if mode.startswith("I;16") else "32-bit integer"
        note(f"{name} is {depth} greyscale ({'0-255' if top == 255 else '0-65535' if top > 1 else '0-1'} values): "
             "converted to 8-bit RGB")
        return Image.fromarray(np.round(a / top * 255).astype(np.uint8), "L").convert("RGB")
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

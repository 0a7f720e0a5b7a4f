"""Pictures that show what an edit did: the mask over the input, the guidance map as a heat map, and a strip with
input, mask, heat map and result side by side.

Pure Pillow + NumPy (no torch, no matplotlib), so they are cheap to make and to test. Every panel of a strip is drawn
at display size: small images are enlarged by a whole factor with nearest-neighbour sampling (pixels stay sharp
squares, a 64x64 image is readable), large ones shrunk; masks and maps are always resampled with nearest-neighbour so
that what is drawn is exactly the binary mask / the latent-resolution map the method used.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# Anchors of a perceptually ordered black -> purple -> orange -> yellow map (close to matplotlib's "inferno").
_HEAT_ANCHORS = np.array([
    [0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39],
    [252, 255, 164]], dtype=np.float64)
OVERLAY_COLOUR = (20, 20, 20)  # the mask's outline: dark on the faded surroundings
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (20, 20, 20)


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape S; clipped, NaN -> 0) -> uint8 RGB of shape S + (3,)."""
    v = np.nan_to_num(np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0), nan=0.0)
    pos = v * (len(_HEAT_ANCHORS) - 1)
    lo = np.minimum(np.floor(pos).astype(int), len(_HEAT_ANCHORS) - 2)
    frac = (pos - lo)[..., None]
    rgb = _HEAT_ANCHORS[lo] * (1 - frac) + _HEAT_ANCHORS[lo + 1] * frac
    return np.round(rgb).astype(np.uint8)


def heat_map(values, size: tuple[int, int], vmax: float | None = None) -> Image.Image:
    """A 2-D map (array-like (h, w), e.g. the guidance map at latent resolution) as an RGB heat map of `size`
    (width, height), 0 -> black, `vmax` (default: the map's maximum) -> pale yellow; nearest-neighbour resampling,
    so each latent cell is a visible block."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"heat_map takes a 2-D map, got shape {v.shape}")
    top = float(np.nanmax(v)) if vmax is None and v.size and not np.isnan(v).all() else (vmax or 0.0)
    scaled = v / top if top > 0 else np.zeros_like(v)
    return Image.fromarray(colorize(scaled), "RGB").resize(size, Image.Resampling.NEAREST)


def _binary(mask: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """A mask image (any mode; white / non-zero = edited) at `size` as a bool array (H, W)."""
    mask = mask.convert("L")
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.NEAREST)
    return np.asarray(mask) >= 128


def mask_overlay(image: Image.Image, mask: Image.Image, colour: tuple[int, int, int] = OVERLAY_COLOUR,
                 fade: float = 0.6) -> Image.Image:
    """The image with the edited region (mask white) as it is, outlined in `colour` (1 px), and the rest faded
    towards white by `fade`: the region reads at a glance whatever its own colours (a tint in a colour like the
    object's hid it)."""
    base = np.asarray(image.convert("RGB"), dtype=np.float64)
    inside = _binary(mask, image.size)
    out = base.copy()
    out[~inside] = (1 - fade) * base[~inside] + fade * 255.0
    # Outline: mask pixels with a non-mask 4- or 8-neighbour (mask minus its 3x3 erosion)
    eroded = np.asarray(Image.fromarray(inside.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(3))) >= 128
    if min(image.size) >= 8:  # on tiny images the border would cover the whole region
        out[inside & ~eroded] = colour
    return Image.fromarray(np.round(out).astype(np.uint8), "RGB")


def display_scale(height: int, min_height: int = 256, max_height: int = 768) -> float:
    """Factor that brings an image of `height` into [min_height, max_height]: whole factors when enlarging."""
    if height < min_height:
        return float(math.ceil(min_height / height))
    if height > max_height:
        return max_height / height
    return 1.0


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def strip(panels: Sequence[tuple[str, Image.Image]], gap: int = 8, font_size: int = 14) -> Image.Image:
    """Panels (label, image of equal size) side by side on white, each with its label above it."""
    if not panels:
        raise ValueError("strip needs at least one panel")
    w, h = panels[0][1].size
    if any(p.size != (w, h) for _, p in panels):
        raise ValueError(f"panels differ in size: {[p.size for _, p in panels]}")
    font = _font(font_size)
    label_h = font_size + 8
    sheet = Image.new("RGB", (len(panels) * w + (len(panels) + 1) * gap, h + label_h + 2 * gap), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for i, (label, panel) in enumerate(panels):
        x = gap + i * (w + gap)
        draw.text((x, gap), _fit_text(draw, label, font, w), fill=TEXT_COLOUR, font=font)
        sheet.paste(panel.convert("RGB"), (x, gap + label_h))
    return sheet


def compare_strip(image: Image.Image, result: Image.Image, mask: Image.Image, guidance=None,
                  target: str | None = None, guidance_vmax: float | None = None,
                  min_height: int = 256, max_height: int = 768, source: str | None = None) -> Image.Image:
    """Input | mask overlay | guidance heat map | result, at display size (see `display_scale`), under the edit's
    texts when given (`source` -> `target`, wrapped to the strip's width: nothing cut).

    `mask` is the binary edit mask (any size; white = edited), `guidance` the 2-D map the mask was thresholded from
    (any resolution) or None when the mask was given rather than estimated (the panel then shows the mask alone).
    """
    scale = display_scale(image.height, min_height, max_height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    smooth = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    shown = image.convert("RGB").resize(size, smooth)
    edited = result.convert("RGB").resize(size, smooth)
    binary = Image.fromarray(_binary(mask, size).astype(np.uint8) * 255, "L")
    if guidance is not None:
        heat_label, heat = "guidance map (dark 0, yellow max)", heat_map(guidance, size, guidance_vmax)
    else:
        heat_label, heat = "mask (given)", binary.convert("RGB")
    coverage = float(_binary(mask, mask.size).mean())
    panels = strip([("input", shown), (f"mask {coverage:.0%}", mask_overlay(shown, binary)), (heat_label, heat),
                    ("result", edited)])
    if target is None:
        return panels
    said = f'"{source}" -> "{target}"' if source is not None else f'target: "{target}"'
    return titled_to_fit(panels, said)


def wrapped(text: str, fits) -> list[str]:
    """`text` in lines that each pass `fits` (a line's width test): words kept whole where one fits a line, else
    cut."""
    lines = [""]
    for word in text.split():
        joined = f"{lines[-1]} {word}".strip()
        if fits(joined):
            lines[-1] = joined
            continue
        lines.append("")
        for char in word:  # a word longer than a line is cut where it must be
            if lines[-1] and not fits(lines[-1] + char):
                lines.append("")
            lines[-1] += char
    return [line for line in lines if line]


def stacked(rows: Sequence[Image.Image]) -> Image.Image:
    """Pictures one under another on white, left-aligned (the sheet as wide as the widest)."""
    sheet = Image.new("RGB", (max(row.width for row in rows), sum(row.height for row in rows)), "white")
    y = 0
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.height
    return sheet


def titled_to_fit(picture: Image.Image, title: str, font_size: int = 14, gap: int = 8) -> Image.Image:
    """The picture under its title, wrapped over as many lines as the picture's width needs (nothing cut)."""
    font, line_height = _font(font_size), font_size + 4
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = wrapped(title, lambda line: measure.textlength(line, font=font) <= picture.width - 2 * gap)
    top = len(lines) * line_height + 2 * gap
    sheet = Image.new("RGB", (picture.width, picture.height + top), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for k, line in enumerate(lines):
        draw.text((gap, gap + k * line_height), line, fill=TEXT_COLOUR, font=font)
    sheet.paste(picture, (0, top))
    return sheet


__all__ = ["colorize", "heat_map", "mask_overlay", "display_scale", "strip", "compare_strip", "stacked",
           "titled_to_fit"]

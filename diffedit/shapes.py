"""The shapes world: one flat-coloured shape on a background, its caption and its exact pixel mask.

A 64x64 RGB scene holds one object (circle, square or upward equilateral triangle of size d = 14..30 px, fully
inside the image, flat fill in one of six colours) on one of four backgrounds, which is plain, a smooth linear
gradient (up to +/-30 levels across the image) or faint sinusoidal stripes (period 16 px, up to +/-12 levels, any
angle). Its caption is "a {colour} {shape} on a {background} background". Rendering has no anti-aliasing, so the
object's mask is exact: every pixel is either background or exactly the object's colour.

Everything is a function of a `Scene` spec, and specs are drawn from a `numpy.random.Generator`, so a seed gives the
same scenes everywhere; an edit's ground truth is the same spec with another colour or shape
(`dataclasses.replace(scene, colour="blue")`). `render_batch` draws many scenes at once with torch on any device (the
training data); `render` draws one on the CPU (the ground truth). Both run the same code in float64.

`classify` is the analytic judge of edited images: segment the object against the known (or estimated) background,
take the nearest palette colour of its median pixel and the shape whose bounding-box fill ratio is nearest (circle
pi/4, square 1, triangle 1/2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np
import torch

SIZE = 64  # image side in pixels
MIN_D, MAX_D = 14, 30  # object size d: circle diameter, square side, triangle side
GRADIENT_MAX = 30.0  # levels: the gradient offset reaches +/-amplitude at the far corners
STRIPES_MAX = 12.0  # levels
STRIPES_PERIOD = 16.0  # pixels

BACKGROUNDS = {"white": (235, 235, 235), "gray": (128, 128, 128), "black": (20, 20, 20), "pink": (250, 185, 200)}
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30),
           "purple": (140, 40, 180), "orange": (245, 140, 20)}
SHAPES = ("circle", "square", "triangle")
STYLES = ("plain", "gradient", "stripes")
FILL_RATIOS = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # area / bounding box, continuous shapes

_BG_NAMES, _COLOUR_NAMES = tuple(BACKGROUNDS), tuple(COLOURS)


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one scene. (x, y) is the top-left corner of the object's d x d box."""

    colour: str
    shape: str
    background: str
    size: int  # d
    x: int
    y: int
    style: str = "plain"
    amplitude: float = 0.0  # levels; 0 for plain
    angle: float = 0.0  # radians: gradient direction or stripe normal
    phase: float = 0.0  # radians, stripes only

    def __post_init__(self):
        if self.colour not in COLOURS or self.shape not in SHAPES or self.background not in BACKGROUNDS:
            raise ValueError(f"unknown colour, shape or background in {self}")
        if self.style not in STYLES:
            raise ValueError(f"unknown background style {self.style!r} (expected one of {STYLES})")
        if not (MIN_D <= self.size <= MAX_D and 0 <= self.x <= SIZE - self.size and 0 <= self.y <= SIZE - self.size):
            raise ValueError(f"object of size {self.size} at ({self.x}, {self.y}) is not a valid object in the image")

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.background)

    def replace(self, **changes) -> "Scene":
        return replace(self, **changes)


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def all_captions() -> list[str]:
    """The 72 captions of the world, in a fixed order (colour, shape, background)."""
    return [caption(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]


# --------------------------------------------------------------------------------------------------- sampling


def sample_arrays(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """n scene specs as arrays (indices into COLOURS, SHAPES, BACKGROUNDS, STYLES); one fixed sequence of draws."""
    colour = rng.integers(0, len(COLOURS), n)
    shape = rng.integers(0, len(SHAPES), n)
    background = rng.integers(0, len(BACKGROUNDS), n)
    style = rng.integers(0, len(STYLES), n)
    size = rng.integers(MIN_D, MAX_D + 1, n)
    x = (rng.random(n) * (SIZE - size + 1)).astype(np.int64)  # uniform in 0..SIZE-size
    y = (rng.random(n) * (SIZE - size + 1)).astype(np.int64)
    amplitude = rng.random(n) * np.where(style == 1, GRADIENT_MAX, STRIPES_MAX) * (style > 0)
    angle = rng.random(n) * 2 * math.pi * (style > 0)
    phase = rng.random(n) * 2 * math.pi * (style == 2)
    return dict(colour=colour, shape=shape, background=background, size=size, x=x, y=y, style=style,
                amplitude=amplitude, angle=angle, phase=phase)


def scenes_from_arrays(a: dict[str, np.ndarray]) -> list[Scene]:
    return [Scene(colour=_COLOUR_NAMES[a["colour"][i]], shape=SHAPES[a["shape"][i]],
                  background=_BG_NAMES[a["background"][i]], size=int(a["size"][i]), x=int(a["x"][i]),
                  y=int(a["y"][i]), style=STYLES[a["style"][i]], amplitude=float(a["amplitude"][i]),
                  angle=float(a["angle"][i]), phase=float(a["phase"][i]))
            for i in range(len(a["colour"]))]


def arrays_from_scenes(scenes: Sequence[Scene]) -> dict[str, np.ndarray]:
    index = dict(colour=_COLOUR_NAMES, shape=SHAPES, background=_BG_NAMES, style=STYLES)
    out = {}
    for f in fields(Scene):
        values = [getattr(s, f.name) for s in scenes]
        if f.name in index:
            values = [index[f.name].index(v) for v in values]
        out[f.name] = np.asarray(values, dtype=np.float64 if f.name in ("amplitude", "angle", "phase") else np.int64)
    return out


def sample_scenes(rng: np.random.Generator, n: int) -> list[Scene]:
    """n random scenes; the same generator state gives the same scenes."""
    return scenes_from_arrays(sample_arrays(rng, n))


def caption_indices(a: dict[str, np.ndarray]) -> np.ndarray:
    """Index of each scene's caption in `all_captions()`."""
    return (a["colour"] * len(SHAPES) + a["shape"]) * len(BACKGROUNDS) + a["background"]


# --------------------------------------------------------------------------------------------------- rendering


def _masks(a: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """(B, H, W) bool object masks, testing pixel centres against the exact shapes (float64)."""
    centres = torch.arange(size, dtype=torch.float64, device=a["size"].device) + 0.5
    py, px = centres[None, :, None], centres[None, None, :]  # (1, H, 1), (1, 1, W)
    d = a["size"].double()[:, None, None]
    cx, cy = a["x"].double()[:, None, None] + d / 2, a["y"].double()[:, None, None] + d / 2
    dx, dy = (px - cx).abs(), py - cy
    circle = dx**2 + dy**2 <= (d / 2) ** 2
    square = (dx <= d / 2) & (dy.abs() <= d / 2)
    # Upward equilateral triangle of side d, its bounding box (d x d*sqrt(3)/2) centred in the d x d box
    h = d * math.sqrt(3) / 2
    from_top = dy + h / 2
    triangle = (from_top >= 0) & (from_top <= h) & (dx <= from_top / math.sqrt(3))
    shape = a["shape"][:, None, None]
    return torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))


def _backgrounds(a: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """(B, 3, H, W) float64 backgrounds, unrounded."""
    dev = a["size"].device
    centres = torch.arange(size, dtype=torch.float64, device=dev) + 0.5
    py, px = centres[None, :, None] - size / 2, centres[None, None, :] - size / 2  # relative to the image centre
    cos, sin = a["angle"].cos()[:, None, None], a["angle"].sin()[:, None, None]
    along = px * cos + py * sin  # (B, H, W) signed distance along the direction
    # Gradient: +/-amplitude at the farthest corner; stripes: a sine of period STRIPES_PERIOD
    gradient = along / (size / 2 * (cos.abs() + sin.abs()))
    stripes = torch.sin(2 * math.pi * along / STRIPES_PERIOD + a["phase"][:, None, None])
    style = a["style"][:, None, None]
    offset = a["amplitude"][:, None, None] * torch.where(style == 1, gradient, torch.where(style == 2, stripes, 0.0))
    base = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float64, device=dev)[a["background"]]  # (B, 3)
    return base[:, :, None, None] + offset[:, None]


def render_batch(a: dict[str, np.ndarray | torch.Tensor], device: str | torch.device = "cpu",
                 size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Scene arrays -> (images uint8 (B, 3, H, W), masks bool (B, H, W)) on `device`."""
    t = {k: torch.as_tensor(v, device=device) for k, v in a.items()}
    t["amplitude"], t["angle"], t["phase"] = (t[k].double() for k in ("amplitude", "angle", "phase"))
    masks = _masks(t, size)
    background = _backgrounds(t, size).round().clamp(0, 255)
    colour = torch.tensor(list(COLOURS.values()), dtype=torch.float64, device=device)[t["colour"]]  # (B, 3)
    images = torch.where(masks[:, None], colour[:, :, None, None], background)
    return images.to(torch.uint8), masks


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """One scene -> (image uint8 (H, W, 3), mask bool (H, W)), on the CPU."""
    images, masks = render_batch(arrays_from_scenes([scene]))
    return images[0].permute(1, 2, 0).numpy(), masks[0].numpy()


def render_background(scene: Scene) -> np.ndarray:
    """The scene without its object, uint8 (H, W, 3)."""
    t = {k: torch.as_tensor(v) for k, v in arrays_from_scenes([scene]).items()}
    t["amplitude"], t["angle"], t["phase"] = (t[k].double() for k in ("amplitude", "angle", "phase"))
    return _backgrounds(t, SIZE).round().clamp(0, 255)[0].permute(1, 2, 0).numpy().astype(np.uint8)


def mask(scene: Scene) -> np.ndarray:
    return render(scene)[1]


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1], the range the VAE sees."""
    return images.float() / 127.5 - 1.0


# --------------------------------------------------------------------------------------------------- edits


@dataclass(frozen=True)
class Edit:
    """A source scene and the same scene with another colour ("colour" edit) or shape ("shape" edit)."""

    kind: str
    source: Scene
    target: Scene

    @property
    def region(self) -> np.ndarray:
        """Ground-truth edit region: pixels of the source object or of the target object (H, W) bool."""
        return mask(self.source) | mask(self.target)


def sample_edit(rng: np.random.Generator, kind: str) -> Edit:
    """One random edit of `kind` ("colour" or "shape"): the target differs from the source in exactly that
    attribute."""
    scene = sample_scenes(rng, 1)[0]
    if kind == "colour":
        others = [c for c in COLOURS if c != scene.colour]
        return Edit("colour", scene, scene.replace(colour=others[rng.integers(len(others))]))
    if kind == "shape":
        others = [s for s in SHAPES if s != scene.shape]
        return Edit("shape", scene, scene.replace(shape=others[rng.integers(len(others))]))
    raise ValueError(f"unknown edit kind {kind!r}: colour or shape")


def sample_edits(rng: np.random.Generator, n: int) -> list[Edit]:
    """n edits alternating colour, shape, colour, ..., all from the one generator."""
    return [sample_edit(rng, "colour" if i % 2 == 0 else "shape") for i in range(n)]


# --------------------------------------------------------------------------------------------------- classifier


@dataclass(frozen=True)
class Classification:
    colour: str | None  # None when no object was found
    shape: str | None
    fill_ratio: float
    mask: np.ndarray  # (H, W) bool, the segmented object


def _largest_component(m: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (label propagation; ties go to the lowest label)."""
    labels = np.where(m, np.arange(m.size).reshape(m.shape) + 1, 0)
    big = m.size + 1
    while True:
        padded = np.pad(np.where(m, labels, big), 1, constant_values=big)
        neighbours = np.minimum.reduce([padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1],
                                        padded[1:-1, :-2], padded[1:-1, 2:]])
        new = np.where(m, neighbours, 0)
        if np.array_equal(new, labels):
            break
        labels = new
    if not m.any():
        return m
    ids, counts = np.unique(labels[m], return_counts=True)
    return labels == ids[np.argmax(counts)]


def estimate_background(image: np.ndarray) -> np.ndarray:
    """A plain background guess: the per-channel median of the image border, broadcast to (H, W, 3)."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float64)
    return np.broadcast_to(np.median(border, axis=0), image.shape)


def segment(image: np.ndarray, background: np.ndarray | None = None, min_distance: float = 40.0) -> np.ndarray:
    """Object pixels: farther than `min_distance` (RGB levels) from the background and nearer to some object colour
    than to the background; the largest 4-connected component of those."""
    img = image.astype(np.float64)
    bg = estimate_background(image) if background is None else background.astype(np.float64)
    palette = np.array(list(COLOURS.values()), dtype=np.float64)  # (6, 3)
    to_bg = np.linalg.norm(img - bg, axis=-1)
    to_palette = np.linalg.norm(img[:, :, None] - palette, axis=-1).min(-1)  # (H, W)
    return _largest_component((to_bg > min_distance) & (to_palette < to_bg))


def classify(image: np.ndarray, background: np.ndarray | None = None) -> Classification:
    """Colour and shape of the object in a uint8 (H, W, 3) image, given the scene's background (rendered by
    `render_background`) or, if None, a plain background estimated from the border."""
    m = segment(image, background)
    if m.sum() < 4:
        return Classification(None, None, 0.0, m)
    rows, cols = np.nonzero(m)
    fill = m.sum() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
    shape = min(FILL_RATIOS, key=lambda s: abs(FILL_RATIOS[s] - fill))
    median = np.median(image[m].astype(np.float64), axis=0)
    colour = min(COLOURS, key=lambda c: np.sum((np.array(COLOURS[c]) - median) ** 2))
    return Classification(colour, shape, float(fill), m)


__all__ = ["Scene", "Edit", "Classification", "SIZE", "BACKGROUNDS", "COLOURS", "SHAPES", "STYLES", "caption",
           "all_captions", "sample_arrays", "sample_scenes", "scenes_from_arrays", "arrays_from_scenes",
           "caption_indices", "render_batch", "render", "render_background", "mask", "to_model_range",
           "sample_edit", "sample_edits", "classify", "segment", "estimate_background"]

"""`diffedit demo`: a web page (Gradio) for editing pictures with DiffEdit, and for watching it work, and fail, on
the shapes world's held-out edits.

    diffedit demo                         # http://127.0.0.1:7860, the shipped model
    diffedit demo --port 8000 --model FOLDER --device cuda

The page's work is done by `Demo`, importable and testable without Gradio or a server: `Demo.edit` runs DiffEdit's
three steps through one `reuse.SharedSteps`, so a repeat with only the decoding changed reuses the inversion and one
with only the thresholding changed reuses the difference map (both exact: the result equals a fresh
`diffedit.edit`); `Demo.rethreshold` cuts a remembered map again without the model (the page does so only while
the picture, prompts and mask settings are those the map was computed from: `Demo.map_changes`);
`Demo.shapes_edit` runs one held-out shapes-world edit against its ground truth. Settings are named and checked as
the command line names and checks them (`diffedit edit --strength ...`, the same messages). `build_page` wraps a
`Demo` in Gradio's Blocks; Gradio is imported only there and in `main`, so `import diffedit` and the other commands
never need it. Uploads reach `Demo` unopened (`Upload`), so every bad one gets its one line, naming the picture as
the user knows it.

One model per process, one edit at a time (a lock, and one queue slot for the events that run the model); the
server listens on 127.0.0.1 unless --host says otherwise, and is never shared through Gradio's tunnel unless --share.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import errno
import hashlib
import math
import os
import socket
import sys
import threading
import traceback
import urllib.parse
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from .console import COUNT, DEVICES, BadInput, Parser, guarded
from .image_files import DEFAULT_MAX_PIXELS, ImageFileError, read_image
from .locations import EXAMPLE_IMAGE, SHIPPED_MODEL, model_location
from .validation import one_line, shorten

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
INSTALL_HINT = 'the demo needs Gradio, an optional extra: pip install -e ".[demo]"'
MAX_PIXELS_FLAG = "--max-pixels"
MAX_UPLOAD = "256mb"  # Gradio refuses larger uploads before they fill the disk (--max-pixels is checked after)
REMEMBERED = 8  # most difference maps and inversions kept at once (of one image and source prompt; `SharedSteps`)

_EXAMPLES_DIR = EXAMPLE_IMAGE.parent
# (picture, source, target): pictures of the shipped model's world that ship with the package
EXAMPLES = (
    (EXAMPLE_IMAGE, "a red circle on a gray background", "a blue circle on a gray background"),
    (_EXAMPLES_DIR / "blue_square.png", "a blue square on a pink background", "a blue triangle on a pink background"),
    (_EXAMPLES_DIR / "yellow_triangle.png", "a yellow triangle on a black background",
     "a green triangle on a black background"),
)

# The page's settings, named as `diffedit edit`'s flags (same meaning, same checks, same messages), and the
# DiffEditParams field each shows when not given. `mask_guidance` has no flag: given with `guidance`, it replaces
# the mask's share of it (the flag --guidance sets both, as in the paper).
FLAGS = ("strength", "threshold_ratio", "threshold_rule", "num_maps", "mask_strength", "guidance", "steps", "seed")
SETTINGS = FLAGS[:-2] + ("mask_guidance",) + FLAGS[-2:]
SHOWN_FIELD = {"strength": "inpaint_strength", "threshold_ratio": "mask_thresholding_ratio",
               "threshold_rule": "mask_threshold_rule", "num_maps": "num_maps_per_mask",
               "mask_strength": "mask_encode_strength", "guidance": "guidance_scale",
               "mask_guidance": "mask_guidance_scale", "steps": "num_inference_steps"}
# What each setting does, in one line (the page's slider notes and the README's list)
HELP = {
    "strength": "encoding ratio r: the share of the schedule inverted and re-generated (more: bigger changes)",
    "threshold_ratio": "the map is clamped at this multiple of its mean, rescaled to [0, 1] (more: a smaller mask)",
    "threshold_rule": "where the rescaled map is cut: ratio (at 0.5, the paper's) or otsu (Otsu's threshold)",
    "num_maps": "noise draws averaged into the difference map (more: a smoother map, slower)",
    "mask_strength": "noise level of the noised copies the map is computed from",
    "guidance": "classifier-free guidance of the decoding (more: follows the target text harder)",
    "mask_guidance": "classifier-free guidance of the mask's noise predictions",
    "steps": "sampler steps over the whole schedule (fewer: faster, rougher)",
    "seed": "random seed: the same settings and seed give the same picture",
}


def _require_gradio():
    """Gradio, or the one line that says how to install it (bad input: exit status 2)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    try:
        import gradio
    except ImportError:
        raise BadInput(INSTALL_HINT) from None
    return gradio


# ---------------------------------------------------------------------------------------------------------------
# What the page shows


# The mask step's settings (`reuse.MASK_FIELDS`) by the page's names; a field the page does not show keeps its own
MAP_SETTING = {"num_inference_steps": "steps", "num_maps_per_mask": "num_maps", "mask_encode_strength": "mask_strength",
               "mask_guidance_scale": "mask_guidance"}


@dataclass(frozen=True)
class MapState:
    """What re-thresholding needs, kept per browser session: the difference map (1, h, w) of the last edit, the
    picture it was computed for and the parameters it was cut with; `inputs`: what the map was computed from (the
    picture's digest, the prompts, the mask step's settings and the seed, by the page's names), so that a map is
    never cut for another picture or other settings (`Demo.map_changes`)."""

    difference: object  # torch.Tensor (1, h, w)
    picture: Image.Image
    params: object  # DiffEditParams
    inputs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Upload:
    """A picture uploaded through the page or the API: the server's copy (`path`) and the name the user knows it by
    (`name`, the uploaded file's; None when the browser sent none). The page hands uploads to `Demo` unopened, so
    that every way one is unusable gets `Demo`'s one line (naming the picture as `name`, with a fix a web user can
    act on), not Gradio's bare error."""

    path: str
    name: str | None = None

    def shown(self) -> str:
        return f"the uploaded picture {self.name!r}" if self.name else "the uploaded picture"


@dataclass(frozen=True)
class EditView:
    edited: Image.Image  # RGB at the input's size
    mask: Image.Image  # "L" at the input's size, white (255) where edited
    overlay: Image.Image  # the mask over the input, at display size
    heat: Image.Image  # the guidance map (the map the mask was cut from), at display size
    timings: dict[str, float]  # seconds per step: mask, inversion, decoding
    reused: tuple[str, ...]  # "difference map", "inversion": the work a previous edit had done
    coverage: float  # share of the picture's pixels the mask edits
    notes: tuple[str, ...]  # notes and warnings, as the command line words them
    state: MapState

    def report(self) -> str:
        """The page's text under the pictures (Markdown)."""
        how = {"mask": " (map reused, cut again)" if "difference map" in self.reused else "",
               "inversion": " (reused)" if "inversion" in self.reused else "", "decode": ""}
        steps = ", ".join(f"{name} {self.timings[key]:.2f} s{how[key]}"
                          for key, name in (("mask", "mask"), ("inversion", "inversion"), ("decode", "decoding")))
        said = ("reused " + " and ".join(self.reused) + " from an earlier edit") if self.reused else \
            "nothing reused: every step ran"
        lines = [f"**{said}**", f"timings: {steps}; total {sum(self.timings.values()):.2f} s",
                 f"mask: {self.coverage:.0%} of the picture"]
        return "\n\n".join(lines + [f"note: {n}" for n in self.notes])


def store_inline(url: str, name: str | None, cache: str) -> Path:
    """A data: URL's bytes, unchanged, as a file under `cache` (one folder per content, as Gradio stores uploads);
    one that cannot be decoded is one BadInput line."""
    head, _, body = url.partition(",")
    try:
        data = base64.b64decode(body, validate=True) if head.endswith(";base64") else \
            urllib.parse.unquote_to_bytes(body)
    except (binascii.Error, ValueError):
        raise BadInput(f"{Upload('', name).shown()} is not an image (its data: URL does not decode): upload a "
                       "picture file (PNG, JPEG, WebP or any format Pillow reads)") from None
    folder = Path(cache) / hashlib.sha256(data).hexdigest()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (Path(name or "").name or "picture")
    if not path.exists():
        path.write_bytes(data)
    return path


@contextlib.contextmanager
def own_warnings():
    """The warnings this thread raises inside, each one (as `warnings.catch_warnings(record=True)` with "always"),
    in the list yielded; another thread's go on to be shown as before. The warnings machinery is the process's: an
    edit recorded the deprecation warnings of Gradio's workers (an upload meanwhile) as its own notes."""
    me, caught = threading.get_ident(), []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        shown = warnings.showwarning  # restored on leaving

        def show(message, category, filename, lineno, file=None, line=None):
            if threading.get_ident() == me:
                caught.append(warnings.WarningMessage(message, category, filename, lineno, file, line))
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield caught


def picture_digest(picture: Image.Image) -> str:
    """A sha1 of a picture's mode, size and pixels: equal digests, the same picture."""
    digest = hashlib.sha1(f"{picture.mode} {picture.size}".encode())
    digest.update(picture.tobytes())
    return digest.hexdigest()


def too_large(shown: str, width: int, height: int, max_pixels: int) -> str:
    """The web user's line for a picture over the server's pixel limit: the size to resize it to, not a flag."""
    s = math.sqrt(max_pixels / (width * height))
    w, h = max(1, int(width * s)), max(1, int(height * s))
    h = max(1, min(h, max_pixels // w))  # float rounding, or a sliver whose short side was raised to 1
    w = max(1, min(w, max_pixels // h))
    return (f"{shown} is {width}x{height} ({width * height / 1e6:.1f} megapixels), over this server's limit of "
            f"{max_pixels} pixels: resize it to at most {w}x{h} pixels and upload it again")


def coverage(mask: Image.Image) -> float:
    """Share of a binary "L" mask's pixels that are white (edited)."""
    return float(np.asarray(mask).mean() / 255)


def display_size(picture: Image.Image) -> tuple[int, int]:
    from .figures import display_scale

    scale = display_scale(picture.height)
    return max(1, round(picture.width * scale)), max(1, round(picture.height * scale))


def mask_pictures(picture: Image.Image, latent_mask: np.ndarray, guidance: np.ndarray
                  ) -> tuple[Image.Image, Image.Image]:
    """(mask over the picture, guidance map as a heat map), both at display size; latent_mask (h, w) bool,
    guidance (h, w) in [0, 1]."""
    from . import image_tensors
    from .figures import heat_map, mask_overlay

    size = display_size(picture)
    smooth = Image.Resampling.NEAREST if size[1] >= picture.height else Image.Resampling.LANCZOS
    mask = image_tensors.latent_mask_to_image(latent_mask, size)
    return mask_overlay(picture.resize(size, smooth), mask), heat_map(guidance, size, vmax=1.0)


# ---------------------------------------------------------------------------------------------------------------
# Settings, checked as the command line checks them


def settings_argv(settings: dict) -> list[str]:
    """The given settings (None: not given) as `diffedit edit` flags."""
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise TypeError(f"unknown setting(s) {', '.join(unknown)}; valid names: {', '.join(SETTINGS)}")
    argv = []
    for name in FLAGS:
        value = settings.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise BadInput(f"argument --{name.replace('_', '-')}: expected a number or a name, got "
                           f"{type(value).__name__}")
        argv.append(f"--{name.replace('_', '-')}={value}")  # one word: a value may start with "-"
    return argv


def check_settings(settings: dict):
    """The settings parsed by `diffedit edit`'s own parser (so out-of-range values get its messages): the
    argparse namespace. `mask_guidance` is checked with --guidance's rule."""
    from .cli import build_parser
    from .console import GUIDANCE

    args = build_parser().parse_args(["edit", "image.png", "--source", "", "--target", "", "-o", "out.png",
                                      *settings_argv(settings)])
    mask_guidance = settings.get("mask_guidance")
    if mask_guidance is not None:
        try:
            args.mask_guidance = GUIDANCE(str(mask_guidance))
        except argparse.ArgumentTypeError as e:
            raise BadInput(f"mask_guidance: {e}") from None
    else:
        args.mask_guidance = None
    return args


# ---------------------------------------------------------------------------------------------------------------
# The work


@dataclass
class Demo:
    """The page's work on one loaded model: edits with reuse, re-thresholding, shapes-world edits."""

    sd: object  # StableDiffusion
    max_pixels: int = DEFAULT_MAX_PIXELS
    lock: threading.Lock = field(default_factory=threading.Lock)
    steps: object = None  # reuse.SharedSteps of the current image and source prompt
    _steps_key: str | None = None

    @classmethod
    def load(cls, model: str | None = None, device: str = "auto", dtype: str = "auto",
             max_pixels: int = DEFAULT_MAX_PIXELS) -> Demo:
        """The model loaded once, as the command line loads it (its bad-input messages)."""
        from .api import pick_device
        from .cli import load_or_refuse

        location = str(model_location(model))
        try:
            torch_device, torch_dtype = pick_device(device, dtype)
        except ValueError as e:
            raise BadInput(f"--{e}") from None
        return cls(load_or_refuse(location, torch_device, torch_dtype), max_pixels)

    def params(self, settings: dict):
        """DiffEditParams for `settings` (`SETTINGS` names; None or absent: the model's default) and the seed,
        with the command line's checks and messages, before any work."""
        from .api import check_params_for_model
        from .cli import command_params

        args = check_settings(settings)
        p = command_params(args, self.sd.edit_defaults, ("mask", "invert", "decode"))
        if args.mask_guidance is not None:
            p = p.updated({"mask_guidance_scale": args.mask_guidance})
        try:
            check_params_for_model(self.sd, p, uses=())
        except ValueError as e:  # named as the command line names it
            raise BadInput(one_line(e).replace("num_inference_steps=", "--steps ", 1)) from None
        return p, args.seed

    def defaults(self) -> dict:
        """Each setting's value when not given: the model's stored defaults over the paper's; seed 0."""
        from .params import DiffEditParams

        p = DiffEditParams.for_model(self.sd)
        return {**{name: getattr(p, f) for name, f in SHOWN_FIELD.items()}, "seed": 0}

    def read_picture(self, image) -> tuple[Image.Image, list[str]]:
        """An image file (checked as the command line checks it, --max-pixels included), an `Upload` (checked the
        same way, named as the user knows it, with fixes a web user can act on), a PIL picture, or a numpy array or
        torch tensor as `diffedit.edit` takes them (`image_tensors.load_rgb`), as RGB; with its notes."""
        notes: list[str] = []
        if isinstance(image, Upload):
            return self._read_upload(image, notes.append), notes
        if image is None or isinstance(image, str) and image == "":
            raise BadInput("no image: upload one or pick an example")
        if isinstance(image, (str, os.PathLike)):
            return read_image(Path(image), notes.append, self.max_pixels, MAX_PIXELS_FLAG), notes
        from .image_files import displayed_rgb
        from .image_tensors import decoded, load_rgb

        picture = image if isinstance(image, Image.Image) else load_rgb(image)  # anything else: its one line
        w, h = picture.size
        if w * h > self.max_pixels:
            raise BadInput(f"the image is {w}x{h}, over {MAX_PIXELS_FLAG} {self.max_pixels}: downscale it")
        if picture is image:
            return displayed_rgb(decoded(image, "image"), "the image", notes.append), notes
        return picture, notes

    def _read_upload(self, upload: Upload, note) -> Image.Image:
        """An uploaded picture as RGB; too large, not an image, corrupt: one line naming it as the user knows it
        (never the server's copy) and what to do."""
        path, shown = Path(upload.path), upload.shown()
        from .image_files import pillow_limit_off

        try:  # the server's own limit is checked here, before decoding (as `open_image`)
            with pillow_limit_off(True), Image.open(path) as probe:  # reads the header only
                width, height = probe.size
        except Exception:  # noqa: BLE001 - not an image, corrupt: `read_image` below names what is wrong
            pass
        else:
            if width * height > self.max_pixels:
                raise ImageFileError(too_large(shown, width, height, self.max_pixels))
        try:
            return read_image(path, note, self.max_pixels, MAX_PIXELS_FLAG)
        except ImageFileError as e:
            said = str(e)
            opened = f"input image {path}" not in said  # the file opened: the message's own fix applies
            said = said.replace(f"input image {path}", shown).replace(str(path), shown)
            fix = "" if opened else ": upload the picture again, or another one (PNG, JPEG, WebP or any format " \
                                    "Pillow reads)"
            raise ImageFileError(said + fix) from None

    def map_inputs(self, picture: Image.Image, source: str, target: str, p, seed: int) -> dict:
        """What an edit's difference map is computed from: the picture's digest, the prompts, the mask step's
        settings (`reuse.MASK_FIELDS`, by the page's names) and the seed."""
        from .reuse import MASK_FIELDS

        return {"picture": picture_digest(picture), "source": source, "target": target,
                **{MAP_SETTING.get(f, f): getattr(p, f) for f in MASK_FIELDS}, "seed": seed}

    def map_changes(self, state: MapState, image, source: str, target: str, **settings) -> tuple[str, ...]:
        """What differs between the inputs of `state`'s map and these (picture, source, target, a mask setting,
        seed: the page's names), in that order; () when re-thresholding `state` shows the mask an edit of these
        inputs would cut. Bad input: the edit's one line."""
        p, seed = self.params(settings)
        picture, _ = self.read_picture(image)
        now = self.map_inputs(picture, source, target, p, seed)
        return tuple(name for name, value in state.inputs.items() if now.get(name) != value)

    def _shared_steps(self, pixels, source):
        """The SharedSteps of this image and source prompt: a new one (the old forgotten) when either changed, so
        what is remembered is one image's work, at most `REMEMBERED` results."""
        from .reuse import SharedSteps, content_digest

        key = content_digest(pixels, source.cond, source.uncond)
        if key != self._steps_key:
            self.steps, self._steps_key = SharedSteps(deepest_strength=0.0, limit=REMEMBERED), key
        return self.steps

    def edit(self, image, source: str, target: str, **settings) -> EditView:
        """DiffEdit on `image` from `source` to `target` with `settings` (`SETTINGS`); the same picture as
        `diffedit.edit(image, source, target, seed=seed, **params)`, reusing what an earlier edit computed."""
        for name, text in (("source", source), ("target", target)):
            if not isinstance(text, str):
                raise BadInput(f"{name}: expected a prompt (a string; may be \"\"), got {type(text).__name__}")
        p, seed = self.params(settings)
        picture, notes = self.read_picture(image)
        with self.lock, own_warnings() as caught:
            view = self._edit(picture, source, target, p, seed, notes)
        identical = any("say the same thing" in n for n in view.notes)
        own = ("tokens but the text encoder",) + (("identical noise predictions",) if identical else ())  # noted
        said = [one_line(w.message) for w in caught if not any(text in str(w.message) for text in own)]
        return replace(view, notes=view.notes + tuple(said))

    def _edit(self, picture: Image.Image, source: str, target: str, p, seed: int, notes: list[str]) -> EditView:
        import torch

        from . import image_tensors, method
        from .api import model_pixels, prompt_text, prompt_warnings, same_prompt, size_notes, to_picture
        from .timing import timed

        sd = self.sd
        notes += prompt_warnings(sd, [("source", source), ("target", target)])
        if same_prompt(sd, source, target):
            notes.append(f"source and target say the same thing ({shorten(target)}): nothing to edit, the mask is "
                         "empty")
        notes += size_notes(sd, picture.size)[1]
        pixels = model_pixels(sd, picture)  # (1, 3, H, W)
        source_text, target_text = prompt_text(sd, source, p), prompt_text(sd, target, p)
        steps = self._shared_steps(pixels, source_text)
        steps.deepest_strength = max(steps.deepest_strength, p.inpaint_strength)  # one inversion for every r
        before = dict(steps.hits)
        generator = torch.Generator().manual_seed(seed)
        timings: dict[str, float] = {}
        # The three steps in `api.edit_each`'s order, so the generator's draws are a fresh edit's
        with timed(timings, "mask", sd.device):
            est = steps.estimate_mask(sd, pixels, source_text, target_text, p, generator)
        with timed(timings, "inversion", sd.device):
            inversion = steps.invert(sd, pixels, source_text, p, generator)
        with timed(timings, "decode", sd.device):
            latent_mask = est.mask[0].cpu().numpy().astype(bool)  # (h, w)
            m = torch.from_numpy(latent_mask).to(sd.device, sd.dtype)[None, None]  # (1, 1, h, w)
            latents = method.decode(sd, inversion, m, target_text, p, generator)
            edited = to_picture(sd, latents, picture.size, source=pixels)
        reused = tuple(name for key, name in (("mask", "difference map"), ("inversion", "inversion"))
                       if steps.hits[key] > before[key])
        overlay, heat = mask_pictures(picture, latent_mask, est.guidance_map[0].float().cpu().numpy())
        mask = image_tensors.latent_mask_to_image(latent_mask, picture.size)
        return EditView(edited, mask, overlay, heat, timings, reused, coverage(mask), tuple(notes),
                        MapState(est.difference.cpu(), picture, p, self.map_inputs(picture, source, target, p, seed)))

    @staticmethod
    def rethreshold(state: MapState, threshold_ratio=None, threshold_rule=None) -> tuple[Image.Image, Image.Image,
                                                                                         str]:
        """The remembered map cut again with another thresholding (no model call): (mask over the picture, heat
        map, what was done)."""
        from . import image_tensors, method

        args = check_settings({"threshold_ratio": threshold_ratio, "threshold_rule": threshold_rule})
        changes = {f: v for f, v in (("mask_thresholding_ratio", args.threshold_ratio),
                                     ("mask_threshold_rule", args.threshold_rule)) if v is not None}
        p = state.params.updated(changes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a zero map: the edit's notes said so
            est = method.threshold_map(state.difference, p)
        latent_mask = est.mask[0].numpy().astype(bool)
        overlay, heat = mask_pictures(state.picture, latent_mask, est.guidance_map[0].float().numpy())
        share = coverage(image_tensors.latent_mask_to_image(latent_mask, state.picture.size))
        return overlay, heat, (f"**re-thresholded the remembered map** (ratio {p.mask_thresholding_ratio:g}, rule "
                               f"{p.mask_threshold_rule}; no model call): mask {share:.0%} of the picture. Edit "
                               "again to decode with it (reuses the map and the inversion)")

    def shapes_edit(self, number: int, kind: str = "colour") -> ShapesView:
        """Held-out shapes-world edit `number` of `kind` ("colour" or "shape"; `evaluate.heldout_edits`, seed
        `number`) run at the model's defaults, against its ground truth."""
        from . import evaluate, shapes

        if kind not in ("colour", "shape"):
            raise BadInput(f"kind: expected colour or shape, got {kind!r}")
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number != int(number) \
                or not 0 <= number < 2**63:
            raise BadInput(f"edit number: expected an integer in [0, 2**63), got {number!r}")
        number = int(number)
        edit = evaluate.heldout_edits(2, seed=number)[0 if kind == "colour" else 1]
        source, _ = shapes.render(edit.source)  # (H, W, 3) uint8
        view = self.edit(Image.fromarray(source), edit.source.caption, edit.target.caption, seed=number)
        truth, estimated = edit.region, np.asarray(view.mask) > 127  # (H, W) bool each
        ok, judged = evaluate.judge(edit, np.asarray(view.edited))
        return ShapesView(edit, Image.fromarray(source), view.edited, truth, estimated, evaluate.iou(estimated, truth),
                          ok, f"a {judged.colour} {judged.shape}" if judged.colour else "no object", view)


@dataclass(frozen=True)
class ShapesView:
    edit: object  # shapes.Edit
    source: Image.Image  # the rendered source scene
    edited: Image.Image
    truth: np.ndarray  # (H, W) bool: the ground-truth edit region (source object | target object)
    estimated: np.ndarray  # (H, W) bool: DiffEdit's mask at the picture's size
    iou: float
    success: bool  # the edited attribute reads as the target's, the other as the source's (`evaluate.judge`)
    judged: str  # what the judge sees in the result: "a red circle", or "no object"
    view: EditView

    def report(self) -> str:
        e = self.edit
        verdict = "worked" if self.success else "failed"
        return "\n\n".join([f"**{e.kind} edit:** {e.source.caption} → {e.target.caption}",
                            f"**mask IoU {self.iou:.2f}** against the ground truth (the shipped model's goal: mean "
                            f"IoU >= 0.55 over 100 held-out edits)",
                            f"**the edit {verdict}**: the judge sees {self.judged}", self.view.report()])


def mask_picture(mask: np.ndarray) -> Image.Image:
    """A (H, W) bool mask as a black-and-white picture at display size."""
    picture = Image.fromarray(mask.astype(np.uint8) * 255, "L").convert("RGB")
    return picture.resize(display_size(picture), Image.Resampling.NEAREST)


# ---------------------------------------------------------------------------------------------------------------
# The page (Gradio)

# Pictures shown as large as their box allows, small ones with sharp pixels (the shipped model's are 64x64)
CSS = ("#image img, #edited img { width: 100%; height: 100%; object-fit: contain; }\n"
       "#image img, #edited img, #overlay img, #heat img, .shapes img { image-rendering: pixelated; }")
INTRO = ("**DiffEdit** (Couairon et al., ICLR 2023): describe what the picture shows (source) and what it should show "
         "(target); the mask of what to change is found from where the two texts predict different noise, and only "
         "that region is re-generated. Changing only the thresholding re-cuts the remembered map at once; editing "
         "again with only the decoding changed reuses the inversion.")


def page_errors(fn: Callable) -> Callable:
    """`fn` for the page: bad input shown as its one line (the command line's message), a failure inside as one
    line too (its traceback on the server's stderr), never a traceback in the page."""
    import functools

    gr = _require_gradio()
    from .console import BAD_INPUT

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (*BAD_INPUT, TypeError, ValueError) as e:
            raise gr.Error(one_line(e), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001 - the page's last line of defence, as `console.guarded`
            traceback.print_exc()
            raise gr.Error(f"{type(e).__name__}: {one_line(e)}", print_exception=False) from None

    return run


def build_page(demo: Demo):
    """The Gradio Blocks of `demo`: the edit tab (its button is the API endpoint /edit) and the shapes-world tab."""
    gr = _require_gradio()
    d = demo.defaults()

    def as_sent(control):
        """`control` with its value reaching `Demo`'s checks as sent, so an API call out of range, a fractional seed
        or an unknown rule gets the command line's message (Gradio's own range and choice checks, and its
        rounding, would answer first, or round silently). An instance attribute, not a subclass: Gradio writes a
        .pyi file beside the module of every component class."""
        control.preprocess = lambda payload: payload
        return control

    def slider(name: str, lo: float, hi: float, step: float, label: str, integer: bool = False):
        return as_sent(gr.Slider(lo, hi, value=d[name], step=step, precision=0 if integer else None, label=label,
                                 info=HELP[name], elem_id=name))

    def take_upload(payload):
        """The image's payload as an `Upload`, unopened (Gradio's own preprocessing opens it with Pillow and fails
        on a file that is not a picture with a bare "Error"). A picture sent inline (a data: URL) is stored as sent
        (Gradio's would re-encode it as lossy WebP) in Gradio's cache, as an upload is."""
        if payload is not None and payload.url and payload.url.startswith("data:"):
            try:
                return Upload(str(store_inline(payload.url, payload.orig_name, image.GRADIO_CACHE)), payload.orig_name)
            except BadInput as e:  # raised here, before `page_errors` can word it
                raise gr.Error(str(e), print_exception=False) from None
        return Upload(payload.path, payload.orig_name) if payload is not None and payload.path else None  # None: none

    with gr.Blocks(title="DiffEdit demo") as page:
        gr.Markdown(INTRO)
        with gr.Tab("Edit a picture"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                     label="picture", elem_id="image", height=256)
                    image.preprocess = take_upload  # an instance attribute, as in `as_sent`
                    source = gr.Textbox(label="source: what the picture shows", elem_id="source")
                    target = gr.Textbox(label="target: what it should show", elem_id="target")
                    run = gr.Button("Edit", variant="primary", elem_id="run")
                    gr.Examples([[str(path), s, t] for path, s, t in EXAMPLES], [image, source, target],
                                label="examples (the shipped model's world)")
                with gr.Column():
                    edited = gr.Image(type="pil", format="png", label="edited", elem_id="edited", height=256,
                                      interactive=False)
                    with gr.Row():
                        overlay = gr.Image(type="pil", format="png", label="mask over the picture",
                                           elem_id="overlay", interactive=False)
                        heat = gr.Image(type="pil", format="png", label="guidance map (cut into the mask)",
                                        elem_id="heat", interactive=False)
                    report = gr.Markdown(elem_id="report")
            with gr.Row():
                strength = slider("strength", 0.05, 1.0, 0.05, "encoding ratio")
                steps = slider("steps", 1, 100, 1, "steps", integer=True)
                guidance = slider("guidance", 0.0, 15.0, 0.5, "guidance")
                seed = as_sent(gr.Number(value=0, precision=0, label="seed", info=HELP["seed"], elem_id="seed"))
            with gr.Row():
                threshold_ratio = slider("threshold_ratio", 0.5, 10.0, 0.1, "thresholding ratio")
                threshold_rule = as_sent(gr.Radio(["ratio", "otsu"], value=d["threshold_rule"],
                                                  label="thresholding rule", info=HELP["threshold_rule"],
                                                  elem_id="threshold_rule"))
                num_maps = slider("num_maps", 1, 20, 1, "number of maps", integer=True)
                mask_strength = slider("mask_strength", 0.05, 1.0, 0.05, "mask strength")
                mask_guidance = slider("mask_guidance", 0.0, 15.0, 0.5, "mask guidance")
            state = gr.State()

            @page_errors
            def edit(image, source, target, strength=None, threshold_ratio=None, threshold_rule=None, num_maps=None,
                     mask_strength=None, guidance=None, mask_guidance=None, steps=None, seed=None):
                """Edit the picture: returns the edited picture (at the input's size) first, then the mask over
                the picture, the guidance map, and the report (timings, reused work, notes)."""
                view = demo.edit(image, source, target, strength=strength, threshold_ratio=threshold_ratio,
                                 threshold_rule=threshold_rule, num_maps=num_maps, mask_strength=mask_strength,
                                 guidance=guidance, mask_guidance=mask_guidance, steps=steps, seed=seed)
                return view.edited, view.overlay, view.heat, view.report(), view.state

            named = {"strength": strength, "threshold_ratio": threshold_ratio, "threshold_rule": threshold_rule,
                     "num_maps": num_maps, "mask_strength": mask_strength, "guidance": guidance,
                     "mask_guidance": mask_guidance, "steps": steps, "seed": seed}
            settings = list(named.values())

            @page_errors
            def rethreshold(state, image, source, target, *values):
                """The last edit's map cut again, only if it is the map of what the page shows now: the same picture,
                prompts, mask settings and seed (a new upload, or one that arrived while an edit ran, is not cut
                with another picture's map)."""
                if state is None:
                    return gr.skip(), gr.skip(), "edit first: the thresholding cuts the map an edit computed"
                given = dict(zip(named, values))
                changed = demo.map_changes(state, image, source, target, **given)
                if changed:
                    shown = (None, None) if "picture" in changed else (gr.skip(), gr.skip())  # never another's mask
                    return (*shown, f"**not re-thresholded**: the {', '.join(changed)} changed since the last edit, "
                                    "whose map this would cut; press Edit to compute the map of what is shown now")
                return demo.rethreshold(state, given["threshold_ratio"], given["threshold_rule"])

            def forget():
                """A new picture: the last edit's results and map are another picture's."""
                return None, None, None, "", None

            editing = run.click(edit, [image, source, target, *settings], [edited, overlay, heat, report, state],
                                api_name="edit", concurrency_id="model", concurrency_limit=1)
            image.change(forget, None, [edited, overlay, heat, report, state], api_visibility="private",
                         show_progress="hidden", cancels=[editing])  # an edit of the old picture never shows
            for control in (threshold_ratio, threshold_rule):  # as the user moves it (dragging included) or resets
                control.change(rethreshold, [state, image, source, target, *settings], [overlay, heat, report],
                               api_visibility="private", show_progress="hidden", trigger_mode="always_last")

        with gr.Tab("Shapes world: held-out edits"):
            gr.Markdown("A random edit from the held-out stream the shipped model is scored on (never seen in "
                        "training), run at the model's defaults: the ground-truth region (the object before and "
                        "after) beside DiffEdit's mask, their IoU, and whether the edit worked. Meaningful with the "
                        "shipped model (or one trained on the shapes world).")
            with gr.Row():
                kind = as_sent(gr.Radio(["colour", "shape"], value="colour", label="edit", elem_id="kind"))
                number = as_sent(gr.Number(value=0, precision=0, minimum=0, label="edit number (its seed)",
                                           elem_id="number"))
                draw = gr.Button("Draw a random edit and run it", variant="primary", elem_id="draw")
                again = gr.Button("Run this one", elem_id="again")
            with gr.Row(elem_classes="shapes"):
                shown = [gr.Image(type="pil", format="png", label=label, interactive=False, elem_id=f"shapes_{key}")
                         for key, label in (("source", "source"), ("edited", "edited"), ("truth", "ground-truth mask"),
                                            ("estimated", "DiffEdit's mask"))]
            shapes_report = gr.Markdown(elem_id="shapes_report")

            @page_errors
            def run_shapes(kind, number):
                v = demo.shapes_edit(number, kind)
                big = display_size(v.source)
                return (v.source.resize(big, Image.Resampling.NEAREST), v.edited.resize(big, Image.Resampling.NEAREST),
                        mask_picture(v.truth), mask_picture(v.estimated), v.report())

            def random_number():
                import random

                return random.randrange(10**6)

            outputs = [*shown, shapes_report]
            draw.click(random_number, None, number, api_visibility="private").then(
                run_shapes, [kind, number], outputs, api_name="shapes", concurrency_id="model", concurrency_limit=1)
            again.click(run_shapes, [kind, number], outputs, api_visibility="private", concurrency_id="model",
                        concurrency_limit=1)
    return page


ANY_ADDRESS_HINT = "e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every network interface)"


def check_address(host: str, port: int) -> None:
    """That the server can listen on host:port, checked as it will listen (uvicorn's socket: IPv6 when the host has a
    colon, SO_REUSEADDR, so a port just closed counts as free) and before the model loads: a host that is empty,
    unknown or not this machine's, a port in use or reserved is one BadInput line naming it and the fix."""
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1], as Gradio takes it
    if not name or name != name.strip():
        raise BadInput(f"argument --host: expected an address or a host name, got {host!r}: pass one, "
                       f"{ANY_ADDRESS_HINT}")
    family = socket.AF_INET6 if ":" in name else socket.AF_INET
    try:
        socket.getaddrinfo(name, port, family, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise BadInput(f"argument --host: {host!r} is not an address and no host of that name is known "
                       f"({getattr(e, 'strerror', None) or e}): pass an address of this machine, {ANY_ADDRESS_HINT}"
                       ) from None
    with socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((name, port))
            return
        except OSError as e:
            error = e
    reason = error.strerror or str(error)
    if error.errno == errno.EADDRINUSE:
        hint = ""
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((name, 0))
                hint = f", e.g. --port {s.getsockname()[1]} (free now)"
        except OSError:
            pass
        raise BadInput(f"argument --port: port {port} on {host} is in use (another program listens there): pass "
                       f"another --port{hint}")
    if error.errno == errno.EADDRNOTAVAIL:
        raise BadInput(f"argument --host: {host} is not an address of this machine ({reason}): pass one of its "
                       f"addresses, {ANY_ADDRESS_HINT}")
    if error.errno == errno.EACCES:
        raise BadInput(f"argument --port: listening on port {port} needs administrator rights here ({reason}): pass "
                       "a --port of 1024 or more")
    raise BadInput(f"cannot listen on {host}:{port} ({reason}): pass another --host or --port")


def serve(page, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, share: bool = False, block: bool = True,
          started: Callable[[object], None] | None = None):
    """Launch `page` on host:port (one request at a time runs the model; the rest wait in the queue); `started`
    hears the page once it listens (its `local_url`, and `share_url` with `share`). With `block` False, return once
    it is serving (close it with `page.close()`); else serve until interrupted."""
    page.queue(max_size=32)
    name = f"[{host}]" if ":" in host and not host.startswith("[") else host  # Gradio puts it in URLs as is
    try:
        launched = page.launch(server_name=name, server_port=port, share=share, prevent_thread_lock=True,
                               quiet=True, css=CSS, footer_links=["api"], max_file_size=MAX_UPLOAD)
    except OSError as e:  # taken since `check_address`, or a failure it cannot foresee: its line if it sees one
        check_address(host, port)
        said = one_line(e).split(". You can specify")[0]  # Gradio's advice names its own settings, not our flags
        raise BadInput(f"cannot serve on {host}:{port}: {said} (pass another --port or --host)") from None
    if started is not None:
        started(page)
    if block:
        page.block_thread()
    return launched


# ---------------------------------------------------------------------------------------------------------------
# The command


def parse_args(argv: list[str]) -> argparse.Namespace:
    from .console import number

    p = Parser(prog="diffedit demo", description="Serve a web page for editing pictures with DiffEdit (Gradio).",
               epilog="needs the optional extra: pip install -e \".[demo]\"")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 opens it to the "
                        "network)")
    p.add_argument("--port", type=number(int, 1, 65535), default=DEFAULT_PORT, metavar="N",
                   help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--share", action="store_true", help="also publish a temporary public link through Gradio's "
                                                        "tunnel (off unless given)")
    p.add_argument("--model", metavar="PATH_OR_REPO_ID",
                   help=f"diffusers-layout model folder or hub repo id (default: the shipped model, "
                        f"{SHIPPED_MODEL.name})")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where to run (default auto: cuda, then mps, then cpu)")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="weights and activations (default auto: float16 on a GPU, float32 on the CPU)")
    p.add_argument(MAX_PIXELS_FLAG, type=COUNT, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse larger images (default {DEFAULT_MAX_PIXELS}, 2048x2048)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    """The model found, Gradio present, the address free, the model loaded, then the page served until
    interrupted; "serving" is said once it listens."""
    model_location(args.model)  # a missing model is said before anything is imported or loaded
    _require_gradio()
    check_address(args.host, args.port)  # before the model loads
    demo = Demo.load(args.model, args.device, args.dtype, args.max_pixels)

    def started(page) -> None:
        shared = f"; public link {page.share_url}" if getattr(page, "share_url", None) else \
            "; no public link (Gradio's tunnel could not be reached)" if args.share else ""
        print(f"diffedit demo: {args.model or SHIPPED_MODEL.name} on {demo.sd.device}, serving {page.local_url}"
              f"{shared} (Ctrl-C stops it)", file=sys.stderr, flush=True)

    serve(build_page(demo), args.host, args.port, args.share, block=True, started=started)


def main(argv: list[str] | None = None) -> int:
    """`diffedit demo` under the command-line contract (`console.guarded`): bad input is one line, exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    return guarded(lambda: run(parse_args(argv)), debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())

"""`diffedit demo`: a web page (Gradio) for editing pictures with DiffEdit, and for watching it work, and fail, on
the shapes world's held-out edits.

    diffedit demo                         # http://127.0.0.1:7860, the shipped model
    diffedit demo --port 8000 --model FOLDER --device cuda

The page's work is done by `Demo`, importable and testable without Gradio or a server: `Demo.edit` runs DiffEdit's
three steps through one `reuse.SharedSteps`, so a repeat with only the decoding changed reuses the inversion and one
with only the thresholding changed reuses the difference map (both exact: the result equals a fresh
`diffedit.edit`); `Demo.rethreshold` cuts a remembered map again without the model; `Demo.shapes_edit` runs one
held-out shapes-world edit against its ground truth. Settings are named and checked as the command line names and
checks them (`diffedit edit --strength ...`, the same messages). `build_page` wraps a `Demo` in Gradio's Blocks;
Gradio is imported only there and in `main`, so `import diffedit` and the other commands never need it.

One model per process, one edit at a time (a lock, and one queue slot for the events that run the model); the
server listens on 127.0.0.1 unless --host says otherwise, and is never shared through Gradio's tunnel unless --share.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from .console import COUNT, BadInput, Parser, guarded
from .image_files import DEFAULT_MAX_PIXELS, read_image
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


@dataclass(frozen=True)
class MapState:
    """What re-thresholding needs, kept per browser session: the difference map (1, h, w) of the last edit, the
    picture it was computed for and the parameters it was cut with."""

    difference: object  # torch.Tensor (1, h, w)
    picture: Image.Image
    params: object  # DiffEditParams


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
        """An image file (checked as the command line checks it, --max-pixels included) or a PIL picture, as RGB;
        with its notes."""
        notes: list[str] = []
        if isinstance(image, Image.Image):
            w, h = image.size
            if w * h > self.max_pixels:
                raise BadInput(f"the image is {w}x{h}, over {MAX_PIXELS_FLAG} {self.max_pixels}: downscale it")
            from .image_files import to_rgb

            return to_rgb(image, "the image", notes.append), notes
        if image is None or image == "":
            raise BadInput("no image: upload one or pick an example")
        return read_image(Path(image), notes.append, self.max_pixels, MAX_PIXELS_FLAG), notes

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
        with self.lock, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
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
                        MapState(est.difference.cpu(), picture, p))

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

    def slider(name: str, lo: float, hi: float, step: float, label: str, integer: bool = False):
        control = gr.Slider(lo, hi, value=d[name], step=step, precision=0 if integer else None, label=label,
                            info=HELP[name], elem_id=name)
        # The value reaches `Demo`'s checks as sent, so an API call out of range gets the command line's message
        # (Gradio's own range check, and its rounding, would answer first). An instance attribute, not a subclass:
        # Gradio writes a .pyi file beside the module of every component class.
        control.preprocess = lambda payload: payload
        return control

    with gr.Blocks(title="DiffEdit demo") as page:
        gr.Markdown(INTRO)
        with gr.Tab("Edit a picture"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                     label="picture", elem_id="image", height=256)
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
                seed = gr.Number(value=0, precision=0, label="seed", info=HELP["seed"], elem_id="seed")
            with gr.Row():
                threshold_ratio = slider("threshold_ratio", 0.5, 10.0, 0.1, "thresholding ratio")
                threshold_rule = gr.Radio(["ratio", "otsu"], value=d["threshold_rule"], label="thresholding rule",
                                          info=HELP["threshold_rule"], elem_id="threshold_rule")
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

            @page_errors
            def rethreshold(state, threshold_ratio, threshold_rule):
                if state is None:
                    return gr.skip(), gr.skip(), "edit first: the thresholding cuts the map an edit computed"
                return demo.rethreshold(state, threshold_ratio, threshold_rule)

            settings = [strength, threshold_ratio, threshold_rule, num_maps, mask_strength, guidance, mask_guidance,
                        steps, seed]
            run.click(edit, [image, source, target, *settings], [edited, overlay, heat, report, state],
                      api_name="edit", concurrency_id="model", concurrency_limit=1)
            for control in (threshold_ratio, threshold_rule):  # as the user moves it, dragging included
                control.input(rethreshold, [state, threshold_ratio, threshold_rule], [overlay, heat, report],
                              api_visibility="private", show_progress="hidden", trigger_mode="always_last")

        with gr.Tab("Shapes world: held-out edits"):
            gr.Markdown("A random edit from the held-out stream the shipped model is scored on (never seen in "
                        "training), run at the model's defaults: the ground-truth region (the object before and "
                        "after) beside DiffEdit's mask, their IoU, and whether the edit worked. Meaningful with the "
                        "shipped model (or one trained on the shapes world).")
            with gr.Row():
                kind = gr.Radio(["colour", "shape"], value="colour", label="edit", elem_id="kind")
                number = gr.Number(value=0, precision=0, minimum=0, label="edit number (its seed)", elem_id="number")
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


def serve(page, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, share: bool = False, block: bool = True):
    """Launch `page` on host:port (one request at a time runs the model; the rest wait in the queue); with
    `block` False, return once it is serving (close it with `page.close()`)."""
    page.queue(max_size=32)
    try:
        return page.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                           quiet=not block, css=CSS, footer_links=["api"], max_file_size=MAX_UPLOAD)
    except OSError as e:
        raise BadInput(f"cannot serve on {host}:{port}: {one_line(e)} (pass another --port or --host)") from None


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
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="where to run (default auto: cuda, then mps, then cpu)")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="weights and activations (default auto: float16 on a GPU, float32 on the CPU)")
    p.add_argument(MAX_PIXELS_FLAG, type=COUNT, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse larger images (default {DEFAULT_MAX_PIXELS}, 2048x2048)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    """The model found, Gradio present, the model loaded, then the page served until interrupted."""
    model_location(args.model)  # a missing model is said before anything is imported or loaded
    _require_gradio()
    demo = Demo.load(args.model, args.device, args.dtype, args.max_pixels)
    print(f"diffedit demo: {args.model or SHIPPED_MODEL.name} on {demo.sd.device}, serving http://{args.host}:"
          f"{args.port} (Ctrl-C stops it)", file=sys.stderr)
    serve(build_page(demo), args.host, args.port, args.share, block=True)


def main(argv: list[str] | None = None) -> int:
    """`diffedit demo` under the command-line contract (`console.guarded`): bad input is one line, exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    return guarded(lambda: run(parse_args(argv)), debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())

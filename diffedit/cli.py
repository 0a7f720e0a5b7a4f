"""The `diffedit` command: edit an image with a text query (DiffEdit), or run one step of the method alone.

    diffedit edit cat.png --source "a cat" --target "a dog" -o dog.png
    diffedit mask cat.png --source "a cat" --target "a dog" -o mask.png --heatmap-out heat.png
    diffedit invert cat.png --prompt "a cat" -o cat.safetensors
    diffedit edit cat.png --latents cat.safetensors --mask mask.png --target "a dog" -o dog.png

Order of work, so that a mistake costs as little as possible: arguments, the input files and the output paths are
checked first (without importing torch or loading a model), then the model is loaded, then the method runs. Outputs
are written last, each to a temporary file in its own folder that is then renamed over the destination, so a failed
or interrupted run leaves every existing file as it was. Bad input of any kind (arguments, image, paths, model,
latents) ends with one line `diffedit: error: ...` on stderr and exit status 2 (a traceback only with --debug);
anything else that fails is a bug or a resource problem (exit status 1).
"""

from __future__ import annotations

import argparse
import importlib
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import __version__
from .reading import displayed_rgb, png_bit_depth
from .locations import SHIPPED_MODEL, looks_like_repo_id, shipped_model_installed

PROG = "diffedit"
DELEGATED = {"train": "train", "evaluate": "evaluate"}  # subcommands whose modules parse their own arguments
EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130
DEFAULT_MAX_PIXELS = 2048 * 2048
LATENTS_FORMAT = "diffedit-latents"
LATENTS_VERSION = "1"
_LOSSY = {"JPEG", "WEBP"}


class BadInput(Exception):
    """A problem with what the user gave (arguments, files, model): one line, exit status 2."""


# ---------------------------------------------------------------------------------------------------------------
# Arguments


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`diffedit: error: ...`), so they read like every other bad input."""

    def error(self, message):
        raise BadInput(f"{message} (see `{self.prog} --help`)")


def _number(kind: type, lo=None, hi=None, lo_open=False):
    """An argparse type: an int or float (finite) in a range, refused with the valid range named."""
    if hi is not None:
        what = f" in {'(' if lo_open else '['}{lo}, {hi}]"
    else:
        what = f" {'>' if lo_open else '>='} {lo}"
    noun = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}{what}, got {text!r}") from None
        too_low = value <= lo if lo_open else value < lo
        if (kind is float and not math.isfinite(value)) or too_low or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected {noun}{what}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


STEPS = _number(int, 1)
RATIO = _number(float, 0, 1, lo_open=True)
COUNT = _number(int, 1)
POSITIVE = _number(float, 0, lo_open=True)
GUIDANCE = _number(float, 0)
TIMESTEP = _number(int, 0)
SEED = _number(int, 0, 2**63 - 1)

EXAMPLES = """\
examples:
  diffedit edit bowl.png --source "a bowl of fruits" --target "a bowl of pears" -o pears.png
  diffedit edit shape.png --source "a red circle" --target "a blue circle" --target "a green circle" -o out.png
      (several targets: one inversion, one output each: out-1.png, out-2.png; or name them with {i} / {target})
  diffedit mask shape.png --source "a red circle" --target "a red square" -o mask.png --heatmap-out heat.png
  diffedit invert shape.png --prompt "a red circle" -o shape.safetensors
  diffedit edit shape.png --latents shape.safetensors --mask mask.png --target "a red square" -o square.png
"""

EDIT_EPILOG = """\
several targets: --target may be given several times; the image is inverted once and each target gets its own
mask and output. Output names (-o, --mask-out, --compare-out): with one target, as given; with several, "-1", "-2"
... is added before the extension (out.png -> out-1.png, out-2.png), unless the name holds a placeholder: {i} (the
target's number, from 1) or {target} (the target text made file-name safe), e.g. -o "edits/{i}-{target}.png".

reuse: `diffedit invert` saves the inversion, `diffedit mask` the mask; pass them with --latents / --mask. Steps,
strength, image size and model must match the inversion's (taken from the file when not given).

example:
  diffedit edit bowl.png --source "a bowl of fruits" --target "a bowl of pears" -o pears.png --compare-out cmp.png
"""


def _add_common(p: argparse.ArgumentParser, defaults_note: str) -> None:
    g = p.add_argument_group("model and run")
    g.add_argument("--model", metavar="PATH_OR_REPO_ID",
                   help="diffusers-layout model folder or hub repo id (default: the shipped model, "
                        f"{SHIPPED_MODEL.name})")
    g.add_argument("--steps", type=STEPS, metavar="N", help=f"DDIM steps over the whole schedule{defaults_note}")
    g.add_argument("--seed", type=SEED, default=0, metavar="N",
                   help="random seed (default 0: the same command gives the same result)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="where to run (default auto: cuda, then mps, then cpu)")
    g.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="weights and activations (default auto: float16 on a GPU, float32 on the CPU)")
    g.add_argument("--reference-behaviour", "--reference-behavior", action="store_true",
                   help="diffusers-compatible numbers (StableDiffusionDiffEditPipeline 0.42.1), with its defects, "
                        "instead of the corrected mode")
    g.add_argument("--max-pixels", type=COUNT, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse larger images (default {DEFAULT_MAX_PIXELS}, 2048x2048)")
    o = p.add_argument_group("output and messages")
    o.add_argument("--force", action="store_true", help="allow an output to overwrite an input file")
    o.add_argument("--json", action="store_true",
                   help="print a machine-readable summary on stdout (paths, parameters, mask coverage, timings)")
    o.add_argument("--quiet", "-q", action="store_true", help="no progress bars, notes or summary (warnings stay)")
    o.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_mask_options(p: argparse.ArgumentParser, defaults_note: str) -> None:
    g = p.add_argument_group("mask estimation")
    g.add_argument("--mask-strength", type=RATIO, metavar="R",
                   help=f"noise level of the mask's noised copies, in (0, 1]{defaults_note}")
    g.add_argument("--num-maps", type=COUNT, metavar="N", help=f"noise draws averaged per mask{defaults_note}")
    g.add_argument("--threshold-ratio", type=POSITIVE, metavar="R",
                   help=f"the map is clamped at R x its mean, rescaled to [0, 1], cut at 0.5{defaults_note}")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    note = " (default: the model's, else the paper's)"
    parser = _Parser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="DiffEdit (Couairon et al., ICLR 2023): edit an image by describing the change. "
                                 "The mask of what to change is found automatically from the difference between "
                                 "the two texts.",
                     epilog=EXAMPLES)
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{edit,mask,invert,train,evaluate}", parser_class=_Parser)

    edit = sub.add_parser("edit", help="edit an image: mask, inversion and masked decoding",
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EDIT_EPILOG,
                          description="Edit IMAGE from what it shows (--source) to what it should show (--target).")
    edit.add_argument("image", metavar="IMAGE")
    edit.add_argument("--source", metavar="TEXT", help="what the image shows (may be empty: \"\"; not needed with "
                                                        "both --latents and --mask)")
    edit.add_argument("--target", metavar="TEXT", action="append", required=True,
                      help="what it should show; repeat for several edits of one inversion")
    edit.add_argument("-o", "--output", required=True, metavar="OUT", help="edited image (.png, .jpg, .webp ...)")
    edit.add_argument("--strength", type=RATIO, metavar="R",
                      help=f"encoding ratio: the fraction of the schedule inverted and re-generated, in (0, 1]{note}")
    edit.add_argument("--guidance", type=GUIDANCE, metavar="G",
                      help=f"classifier-free guidance scale of the mask and the decoding; <= 1 turns it off{note}")
    edit.add_argument("--inversion-guidance", type=GUIDANCE, metavar="G",
                      help="guidance scale of the DDIM inversion (1: none, the paper's deterministic encoding)"
                           f"{note}")
    edit.add_argument("--guidance-min-timestep", type=TIMESTEP, metavar="T",
                      help="decoding steps at timesteps below T run without guidance (a guidance interval; 0: "
                           f"every step guided){note}")
    edit.add_argument("--mask-out", metavar="PATH", help="also write the binary mask (white = edited, image size)")
    edit.add_argument("--compare-out", metavar="PATH",
                      help="also write input | mask | guidance map | result side by side")
    edit.add_argument("--latents", metavar="FILE", help="reuse an inversion saved by `diffedit invert`")
    edit.add_argument("--mask", metavar="FILE", help="reuse a mask (white = edited, the image's size) instead of "
                                                     "estimating one")
    _add_mask_options(edit, note)
    _add_common(edit, note)

    mask = sub.add_parser("mask", help="estimate the edit mask only",
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          description="Estimate where IMAGE must change to go from --source to --target.",
                          epilog="example:\n  diffedit mask shape.png --source \"a red circle\" --target \"a red "
                                 "square\" -o mask.png --heatmap-out heat.png\n")
    mask.add_argument("image", metavar="IMAGE")
    mask.add_argument("--source", metavar="TEXT", required=True, help="what the image shows (may be empty: \"\")")
    mask.add_argument("--target", metavar="TEXT", required=True, action="append",
                      help="what it should show (repeatable, named as for `edit`)")
    mask.add_argument("-o", "--output", required=True, metavar="MASK", help="binary mask (white = edited)")
    mask.add_argument("--heatmap-out", metavar="PATH", help="also write the guidance map as a heat map")
    mask.add_argument("--guidance", type=GUIDANCE, metavar="G",
                      help=f"classifier-free guidance scale of the noise predictions; <= 1 turns it off{note}")
    _add_mask_options(mask, note)
    _add_common(mask, note)

    invert = sub.add_parser("invert", help="DDIM-invert an image and save the latents for `edit --latents`",
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Invert IMAGE (deterministic DDIM encoding conditioned on --prompt) and save "
                                        "every intermediate latent to a safetensors file.",
                            epilog="example:\n  diffedit invert shape.png --prompt \"a red circle\" -o "
                                   "shape.safetensors\n")
    invert.add_argument("image", metavar="IMAGE")
    invert.add_argument("--prompt", metavar="TEXT", required=True, help="what the image shows (the edit's --source)")
    invert.add_argument("-o", "--output", required=True, metavar="LATENTS", help="output .safetensors file")
    invert.add_argument("--strength", type=RATIO, metavar="R", help=f"encoding ratio, in (0, 1]{note}")
    invert.add_argument("--guidance", type=GUIDANCE, metavar="G", dest="inversion_guidance",
                        help=f"guidance scale of the inversion (1: none; edit's --inversion-guidance){note}")
    _add_common(invert, note)

    # Listed here for --help; main() hands their arguments to their own modules' parsers.
    sub.add_parser("train", help="train the shipped shapes-world model (python -m diffedit.train; see --help)")
    sub.add_parser("evaluate", help="score a model on held-out shapes-world edits (python -m diffedit.evaluate)")
    return parser


# ---------------------------------------------------------------------------------------------------------------
# Messages


class Reporter:
    """Notes (odd but valid input), warnings, progress bars and the summary, all on stderr; --json owns stdout."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.notes: list[str] = []
        self.warnings: list[str] = []
        self.bars = not quiet and sys.stderr.isatty()

    def note(self, message: str) -> None:
        self.notes.append(message)
        if not self.quiet:
            print(f"{PROG}: note: {message}", file=sys.stderr)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            print(f"{PROG}: warning: {message}", file=sys.stderr)

    def progress(self, total: int, desc: str):
        """A tqdm bar on stderr, or a stand-in when stderr is not a terminal or with --quiet."""
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, disable=not self.bars, leave=False, unit="step")


# ---------------------------------------------------------------------------------------------------------------
# Reading the input image (and a given mask)


def _check_input_file(path: Path, what: str) -> None:
    if not path.exists():
        raise BadInput(f"{what} {path} does not exist" + (" (a broken link)" if path.is_symlink() else ""))
    if path.is_dir():
        raise BadInput(f"{what} {path} is a folder, not a file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise BadInput(f"cannot read {what} {path}: {e.strerror or e}") from None


def open_image(path: Path, what: str, max_pixels: int) -> Image.Image:
    """Open and fully decode an image, turning every way it can fail into one BadInput line."""
    _check_input_file(path, what)
    Image.MAX_IMAGE_PIXELS = None  # our own limit (--max-pixels) is checked before decoding
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        raise BadInput(f"{what} {path} is not an image (or not in a format Pillow reads)") from None
    except Exception as e:  # noqa: BLE001 - Pillow plugins raise many types on corrupt headers
        raise BadInput(f"{what} {path} is corrupt: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        s = math.sqrt(max_pixels / (w * h))
        raise BadInput(f"{what} {path} is {w}x{h} ({w * h / 1e6:.1f} megapixels), over --max-pixels {max_pixels}: "
                       f"downscale it (to {max(1, int(w * s))}x{max(1, int(h * s))} or less) or pass "
                       f"--max-pixels {w * h}")
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 - truncated data: OSError; some plugins SyntaxError, ValueError, EOFError
        raise BadInput(f"{what} {path} is truncated or corrupt ({e})") from None
    return img


def read_image(path: Path, max_pixels: int, report: Reporter) -> Image.Image:
    """The input as 8-bit RGB at its displayed orientation; every conversion is noted."""
    img = open_image(path, "input image", max_pixels)
    return displayed_rgb(img, path.name, report.note, png_bit_depth(path))


def read_mask(path: Path, size: tuple[int, int], max_pixels: int) -> Image.Image:
    """A mask file (white / non-zero = edited) of the input image's size, as a binary "L" image (0 / 255)."""
    img = open_image(path, "mask", max_pixels)
    if img.size != size:
        raise BadInput(f"mask {path} is {img.width}x{img.height} but the image is {size[0]}x{size[1]}")
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        a = a / (a.max() or 1.0)
    else:
        a = np.asarray(img.convert("L"), dtype=np.float64) / 255.0
    return Image.fromarray(((a >= 0.5) * 255).astype(np.uint8), "L")


# ---------------------------------------------------------------------------------------------------------------
# Output paths


@dataclass
class Planned:
    """One file the run will write: its final path and how to make it (set once the run has the data)."""

    path: Path
    what: str
    write: Callable[[Path], None] | None = None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "empty"


def expand_names(pattern: str, targets: list[str]) -> list[Path]:
    """One path per target: {i} / {target} placeholders filled in, else "-1", "-2" ... before the extension when
    there are several targets."""
    if "{i}" in pattern or "{target}" in pattern:
        return [Path(pattern.replace("{i}", str(i)).replace("{target}", _slug(t))) for i, t in enumerate(targets, 1)]
    path = Path(pattern)
    if len(targets) == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, len(targets) + 1)]


def image_format(path: Path, what: str) -> str:
    """The Pillow format an output's extension names, refused when Pillow cannot write it."""
    formats = Image.registered_extensions()
    fmt = formats.get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise BadInput(f"{what} {path}: unknown image extension {path.suffix!r} (use .png, .jpg, .webp, .bmp or "
                       ".tif)")
    return fmt


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_outputs(planned: list[Planned], inputs: dict[str, Path], force: bool) -> None:
    """Every output: a writable file path in an existing folder, distinct from the others, not an input (unless
    --force)."""
    seen: dict[str, Planned] = {}
    for p in planned:
        if p.path.is_dir():
            raise BadInput(f"{p.what} {p.path} is a folder; give a file name")
        folder = p.path.parent
        if not folder.exists():
            raise BadInput(f"output folder {folder} does not exist (create it first)")
        if not folder.is_dir():
            raise BadInput(f"{p.what} {p.path}: {folder} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise BadInput(f"output folder {folder} is not writable")
        key = os.path.normcase(os.path.abspath(p.path))
        if key in seen:
            raise BadInput(f"{seen[key].what} and {p.what} would both be written to {p.path}")
        seen[key] = p
        for label, path in inputs.items():
            if _same_file(p.path, path) and not force:
                raise BadInput(f"{p.what} {p.path} is the {label}; pass --force to overwrite it")


def commit(planned: list[Planned]) -> None:
    """Write every output to a temporary file beside it, then rename them all into place; on any failure remove
    the temporary files and leave the destinations untouched."""
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
    def write(tmp: Path) -> None:
        img.save(tmp, format=fmt, **({"quality": 95} if fmt in _LOSSY else {}))

    return write


# ---------------------------------------------------------------------------------------------------------------
# Model


def check_model_argument(model: str | None) -> str:
    """Cheap checks before torch is imported: a folder that exists, or something shaped like a hub repo id."""
    if model is None:
        if not shipped_model_installed():
            raise BadInput(f"the shipped model is missing ({SHIPPED_MODEL}); pass --model FOLDER_OR_REPO_ID")
        return str(SHIPPED_MODEL)
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise BadInput(f"--model {model} is a file; give the folder that holds model_index.json")
    if not looks_like_repo_id(model):
        raise BadInput(f"model folder {model} does not exist (give a diffusers model folder or a hub repo id)")
    return model


def pick_device(name: str, dtype_name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: no CUDA device is available (use --device cpu or auto)")
    elif name == "mps" and not torch.backends.mps.is_available():
        raise BadInput("--device mps: no Apple GPU is available (use --device cpu or auto)")
    if dtype_name == "auto":
        dtype_name = "float32" if name == "cpu" else "float16"
    return torch.device(name), getattr(torch, dtype_name)


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def load_model(model: str, device, dtype):
    from .models.config import ConfigError
    from .models.weights import WeightsError
    from .stable_diffusion import ModelNotFoundError, StableDiffusion

    try:
        return StableDiffusion.from_pretrained(model, device=device, dtype=dtype)
    except (ModelNotFoundError, WeightsError, ConfigError) as e:  # every way a model folder can be unusable
        raise BadInput(f"cannot load model {model}: {_one_line(e)}") from e


def model_fingerprint(folder: Path) -> str:
    """A cheap identity of a model folder: its configs and, for each weight file, its size and first and last
    64 KiB. Equal for a moved or copied model, different for retrained weights."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*/*")):
        if f.name.endswith(".json") and f.parent.name != "tokenizer":
            h.update(f"{f.parent.name}/{f.name}".encode())
            h.update(f.read_bytes())
        elif f.suffix == ".safetensors":
            size = f.stat().st_size
            h.update(f"{f.parent.name}/{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(65536))
                fh.seek(max(0, size - 65536))
                h.update(fh.read(65536))
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Parameters: flags -> DiffEditParams fields; DiffEditParams() < the model's diffedit.json < the flags

FLAG_FIELDS = {
    "steps": ("num_inference_steps",),
    "strength": ("inpaint_strength",),
    "guidance": ("guidance_scale", "mask_guidance_scale"),  # the paper guides the mask and the decoding
    "inversion_guidance": ("inversion_guidance_scale",),  # `invert --guidance` too
    "mask_strength": ("mask_encode_strength",),
    "num_maps": ("num_maps_per_mask",),
    "threshold_ratio": ("mask_thresholding_ratio",),
    "guidance_min_timestep": ("guidance_min_timestep",),
}


def explicit_params(args) -> dict:
    return {name: getattr(args, flag) for flag, names in FLAG_FIELDS.items()
            if getattr(args, flag, None) is not None for name in names}


def local_edit_defaults(model: str) -> dict:
    """A local model folder's diffedit.json, read before the model is loaded (a hub model's comes with it)."""
    path = Path(model).expanduser() / "diffedit.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"the model's edit defaults {path} are unreadable: {e}") from None


def resolve_params(explicit: dict, edit_defaults: dict, reference: bool, uses: tuple[str, ...]):
    """The run's DiffEditParams; `uses` names the steps run ("mask", "invert", "decode") whose step counts are
    checked: a strength with int(steps x strength) = 0 would run no step."""
    from .params import CORRECTIONS, layered

    try:
        p = layered(edit_defaults, explicit)
    except (TypeError, ValueError) as e:
        raise BadInput(_one_line(e)) from None
    if reference:  # the flags name no correction, so turning them all off last is the same as in between
        p = p.updated({name: False for name in CORRECTIONS.values()})
    n = p.num_inference_steps
    checks = [("--mask-strength", p.mask_encode_strength)] if "mask" in uses else []
    checks += [("--strength", p.inpaint_strength)] if {"invert", "decode"} & set(uses) else []
    for flag, value in checks:
        if int(n * value) == 0:
            raise BadInput(f"{flag} {value:g} with --steps {n} runs no step (int({n} x {value:g}) = 0): use "
                           f"{flag} >= {1 / n:g} or --steps >= {math.ceil(1 / value)}")
    return p


def params_summary(p) -> dict:
    return {"steps": p.num_inference_steps, "strength": p.inpaint_strength, "guidance": p.guidance_scale,
            "mask_guidance": p.mask_guidance_scale, "inversion_guidance": p.inversion_guidance_scale,
            "mask_strength": p.mask_encode_strength, "num_maps": p.num_maps_per_mask,
            "threshold_ratio": p.mask_thresholding_ratio, "guidance_min_timestep": p.guidance_min_timestep}


# ---------------------------------------------------------------------------------------------------------------
# Saved inversions: a safetensors file with the latents and, in its metadata, what they are compatible with


def read_latents_metadata(path: Path) -> dict:
    """The metadata of a file written by `diffedit invert`, checked before anything heavy is loaded."""
    _check_input_file(path, "latents file")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta, keys = f.metadata() or {}, set(f.keys())
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends: not a safetensors file, or truncated
        raise BadInput(f"latents file {path} is not a safetensors file or is corrupt ({_one_line(e)})") from None
    if meta.get("format") != LATENTS_FORMAT or not {"latents", "timesteps", "clean"} <= keys:
        raise BadInput(f"{path} is not a latents file written by `diffedit invert`")
    if meta.get("version") != LATENTS_VERSION:
        raise BadInput(f"latents file {path} has version {meta.get('version')}; this diffedit reads version "
                       f"{LATENTS_VERSION} (invert again)")
    try:
        for key in ("steps", "width", "height"):
            meta[key] = int(meta[key])
        meta["strength"], meta["guidance"] = float(meta["strength"]), float(meta["guidance"])
    except (KeyError, ValueError) as e:
        raise BadInput(f"latents file {path} has damaged metadata ({e})") from None
    return meta


def apply_latents_metadata(meta: dict, path: Path, args, image_size: tuple[int, int]) -> None:
    """Take steps, strength and inversion guidance from the file when not given; refuse a mismatch with the image
    or the flags."""
    if (meta["width"], meta["height"]) != image_size:
        raise BadInput(f"{path} was inverted from a {meta['width']}x{meta['height']} image but {args.image} is "
                       f"{image_size[0]}x{image_size[1]}")
    for flag, key in (("steps", "steps"), ("strength", "strength"), ("inversion_guidance", "guidance")):
        given, name = getattr(args, flag), "--" + flag.replace("_", "-")
        if given is None:
            setattr(args, flag, meta[key])
        elif given != meta[key]:
            raise BadInput(f"{path} was inverted with {name} {meta[key]:g} but this run asks {name} {given:g}: "
                           f"drop {name} (the file's value is used) or invert again")


def save_latents(inversion, meta: dict) -> Callable[[Path], None]:
    from safetensors.torch import save_file

    tensors = {"latents": inversion.latents[0].float().cpu().contiguous(),  # (T, C, h, w)
               "timesteps": inversion.timesteps.cpu().contiguous(),  # (T,)
               "clean": inversion.clean[0].float().cpu().contiguous()}  # (C, h, w)
    strings = {k: str(v) for k, v in meta.items()}
    return lambda tmp: save_file(tensors, str(tmp), metadata=strings)


def load_latents(path: Path, sd):
    from safetensors.torch import load_file

    from .method import Inversion

    try:
        t = load_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise BadInput(f"latents file {path} is truncated or corrupt ({_one_line(e)})") from None
    latents, timesteps, clean = t["latents"], t["timesteps"], t["clean"]
    if latents.ndim != 4 or clean.shape != latents.shape[1:] or timesteps.shape != latents.shape[:1]:
        raise BadInput(f"latents file {path} holds tensors of unexpected shapes")
    device, dtype = sd.device, sd.dtype
    return Inversion(latents[None].to(device, dtype), timesteps.long(), clean[None].to(device, dtype))


# ---------------------------------------------------------------------------------------------------------------
# A run: what every command shares once the arguments are read


@dataclass
class Run:
    args: argparse.Namespace
    report: Reporter
    started: float = field(default_factory=time.perf_counter)
    timings: dict = field(default_factory=dict)
    sd: object = None
    model: str = ""
    image: Image.Image | None = None
    identical: bool = False

    @contextmanager
    def timed(self, key: str):
        """Add the block's wall time to timings[key] (after the GPU's queued work is done)."""
        start = time.perf_counter()
        yield
        if self.sd is not None and self.sd.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        self.timings[key] = round(self.timings.get(key, 0.0) + time.perf_counter() - start, 4)

    def load(self, model: str, params_uses: tuple[str, ...]):
        """Device and dtype, the model, and the parameters with the model's own defaults."""
        device, dtype = pick_device(self.args.device, self.args.dtype)
        with self.timed("load_model"):
            self.sd = load_model(model, device, dtype)
        self.model = model
        return resolve_params(explicit_params(self.args), self.sd.edit_defaults, self.args.reference_behaviour,
                              params_uses)

    def check_prompts(self, named: list[tuple[str, str]], pairs: list[tuple[str, str]]) -> None:
        """Warn about empty and over-long prompts, and source / target pairs that say the same thing."""
        tok = self.sd.tokenizer
        room = tok.model_max_length - 2
        for flag, text in named:
            n = tok.num_tokens(text)
            if n > room:
                words = text.split()
                lo, hi = 0, len(words)  # the most words that fit
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    lo, hi = (mid, hi) if tok.num_tokens(" ".join(words[:mid])) <= room else (lo, mid - 1)
                self.report.warn(f"{flag} has {n} tokens but the text encoder reads {room}: the last {n - room} "
                                 f"are dropped (from about {_shorten(' '.join(words[lo:]))})")
            if flag.startswith("--target") and not text.strip():
                self.report.warn(f"{flag} is empty: the edit has no text to steer towards")
        for source, target in pairs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # over-long prompts: said above
                same = source is not None and bool((tok(source) == tok(target)).all())
            if same:
                self.identical = True
                full = " (with --reference-behaviour the mask is full instead: diffusers' 0/0, defect D3)"
                self.report.warn(f"--source and --target say the same thing ({_shorten(target)}): nothing to "
                                 "edit, the mask is empty" + (full if self.args.reference_behaviour else ""))

    def note_sizes(self) -> tuple[int, int]:
        """The working size (sides a multiple of the VAE factor), noted when it differs from the input's."""
        from .images import working_size

        f = self.sd.vae_scale_factor
        size = working_size(self.image.size, f)
        if size != self.image.size:
            self.report.note(f"{self.image.width}x{self.image.height} is not a multiple of {f}: the model works at "
                             f"{size[0]}x{size[1]}, outputs are restored to {self.image.width}x{self.image.height}")
        native = self.sd.unet.config.sample_size * f
        if max(size) > 4 * native or max(size) * 4 < native:
            self.report.note(f"the model was trained at {native}x{native}; {size[0]}x{size[1]} is far from it")
        return size

    def pixels(self):
        from .api import model_pixels

        return model_pixels(self.sd, self.image)

    def text(self, prompt: str, p):
        from .api import prompt_text

        return prompt_text(self.sd, prompt, p)

    def generator(self):
        import torch

        return torch.Generator().manual_seed(self.args.seed)

    @contextmanager
    def warnings_as_lines(self):
        """Library warnings as `diffedit: warning:` lines; those the CLI already said in its own words are dropped."""
        own = ("tokens but the text encoder takes",) + (("identical noise predictions",) if self.identical else ())

        def show(message, category, filename, lineno, file=None, line=None):
            if not any(s in str(message) for s in own):
                self.report.warn(_one_line(message))

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            yield

    def summary(self, command: str, params, outputs: list[dict], extra: dict | None = None) -> dict:
        self.timings["total"] = round(time.perf_counter() - self.started, 4)
        out = {"command": command, "version": __version__, "input": str(self.args.image),
               "input_size": list(self.image.size), "model": self.model, "device": str(self.sd.device),
               "dtype": str(self.sd.dtype).removeprefix("torch."),
               "mode": "reference" if self.args.reference_behaviour else "corrected", "seed": self.args.seed,
               "parameters": params_summary(params), "outputs": outputs, **(extra or {}),
               "notes": self.report.notes, "warnings": self.report.warnings, "timings": self.timings}
        return out

    def say_done(self, written: list[Path], detail: str) -> None:
        if self.report.quiet:
            return
        t = self.timings
        parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in t.items() if k != "total")
        names = ", ".join(str(p) for p in written)
        print(f"{PROG}: wrote {names}{detail} in {t['total']:.1f} s ({parts})", file=sys.stderr)


def _shorten(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def latent_mask_from_image(mask: Image.Image, working: tuple[int, int], factor: int) -> np.ndarray:
    """A binary mask at the image's size -> (h, w) bool at latent resolution: each latent cell is in the mask when
    at least half of its pixels are (exact for masks written by this command)."""
    m = np.asarray(mask.resize(working, Image.Resampling.NEAREST)) >= 128
    h, w = working[1] // factor, working[0] // factor
    return m.reshape(h, factor, w, factor).mean(axis=(1, 3)) >= 0.5  # (h, w)


def mask_image(latent_mask: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """(h, w) bool at latent resolution -> "L" mask (0 / 255) at the image's size, nearest-neighbour."""
    return Image.fromarray(latent_mask.astype(np.uint8) * 255, "L").resize(size, Image.Resampling.NEAREST)


def _check_model_or_latents_model(args, meta: dict | None) -> str:
    """--model, else the model a latents file was inverted with, else the shipped model."""
    if args.model is None and meta is not None and meta.get("model"):
        try:
            return check_model_argument(meta["model"])
        except BadInput:
            raise BadInput(f"{args.latents} was inverted with model {meta['model']}, which is not found here; "
                           "pass --model") from None
    return check_model_argument(args.model)


def check_model_identity(meta: dict, path: Path, model: str) -> None:
    from .stable_diffusion import resolve_model_folder

    if meta.get("model_fingerprint") != model_fingerprint(resolve_model_folder(model)):
        raise BadInput(f"{path} was inverted with another model ({meta.get('model')}) than {model}: pass that "
                       "--model or invert again")


# ---------------------------------------------------------------------------------------------------------------
# Commands


def plan_images(outs: list[tuple[str, str | None]], targets: list[str], inputs: dict[str, Path],
                force: bool) -> dict[str, list[tuple[Path, str]]]:
    """Image outputs by option: one (path, Pillow format) per target, checked (see `check_outputs`)."""
    paths = {what: expand_names(pattern, targets) for what, pattern in outs if pattern is not None}
    check_outputs([Planned(path, what) for what, ps in paths.items() for path in ps], inputs, force)
    return {what: [(path, image_format(path, what)) for path in ps] for what, ps in paths.items()}


def planned_image(plan: dict, what: str, i: int, img: Image.Image) -> Planned:
    path, fmt = plan[what][i]
    return Planned(path, what, image_writer(img, fmt))


def run_edits(run: Run, p, targets: list[str], source: str | None, fixed_mask: np.ndarray | None,
              inversion=None) -> list[tuple[Image.Image, np.ndarray, np.ndarray | None]]:
    """`api.edit_each` with a progress bar and timings: (edited image at the input's size, latent mask, guidance
    map or None) per target, so the same seed gives `api.edit_targets`' images."""
    from .api import edit_each

    T = int(p.num_inference_steps * p.inpaint_strength)
    total = (len(targets) if fixed_mask is None else 0) + (T if inversion is None else 0) + T * len(targets)
    with run.warnings_as_lines(), run.report.progress(total, "diffedit") as bar:

        @contextmanager
        def stage(name: str, i: int):
            labels = {"mask": f"mask {i + 1}/{len(targets)}", "invert": "inversion",
                      "decode": f"decoding {i + 1}/{len(targets)}"}
            bar.set_description(labels[name])
            with run.timed(name):
                yield lambda *_: bar.update(1)
            if name == "mask":
                bar.update(1)

        source_text = run.text(source, p) if source is not None else None
        return list(edit_each(run.sd, run.pixels(), run.image.size, source_text, [run.text(t, p) for t in targets],
                              p, run.generator(), fixed_mask, inversion, stage))


def _coverage(entry: dict, full_mask: Image.Image, latent_mask: np.ndarray) -> dict:
    return {**entry, "mask_coverage": round(float(np.asarray(full_mask).mean() / 255), 4),
            "latent_mask_coverage": round(float(latent_mask.mean()), 4)}


def _flag_names(targets: list[str]) -> list[str]:
    return [f"--target {i}" if len(targets) > 1 else "--target" for i in range(1, len(targets) + 1)]


def cmd_edit(args, report: Reporter) -> dict:
    run, targets, image_path = Run(args, report), args.target, Path(args.image)
    # Arguments and paths (no torch yet)
    if args.source is None and not (args.mask and args.latents):
        raise BadInput("edit needs --source (what the image shows; may be \"\") unless --latents and --mask give "
                       "the inversion and the mask")
    _check_input_file(image_path, "input image")
    meta = read_latents_metadata(Path(args.latents)) if args.latents else None
    inputs = {"input image": image_path, **({"latents file": Path(args.latents)} if args.latents else {}),
              **({"mask file": Path(args.mask)} if args.mask else {})}
    plan = plan_images([("output", args.output), ("--mask-out", args.mask_out), ("--compare-out", args.compare_out)],
                       targets, inputs, args.force)
    if any(fmt in _LOSSY for _, fmt in plan.get("--mask-out", [])):
        report.note("--mask-out in a lossy format (JPEG/WebP) is not exactly binary; .png keeps it exact")
    model = _check_model_or_latents_model(args, meta)
    # Inputs
    run.image = read_image(image_path, args.max_pixels, report)
    if meta is not None:
        apply_latents_metadata(meta, Path(args.latents), args, run.image.size)
    given_mask = read_mask(Path(args.mask), run.image.size, args.max_pixels) if args.mask else None
    uses = ("decode",) + (() if given_mask is not None else ("mask",)) + (() if meta else ("invert",))
    resolve_params(explicit_params(args), local_edit_defaults(model), args.reference_behaviour, uses)
    # Model, and the checks that need it
    p = run.load(model, uses)
    if meta is not None:
        check_model_identity(meta, Path(args.latents), model)
        if args.source is not None and args.source != meta.get("prompt"):
            report.note(f"the inversion in {args.latents} was conditioned on {_shorten(meta.get('prompt', ''))}; "
                        f"--source {_shorten(args.source)} is used for the mask only")
    named = ([("--source", args.source)] if args.source is not None else []) + list(zip(_flag_names(targets), targets))
    run.check_prompts(named, [] if given_mask is not None else [(args.source, t) for t in targets])
    working = run.note_sizes()
    fixed_mask = None
    if given_mask is not None:
        fixed_mask = latent_mask_from_image(given_mask, working, run.sd.vae_scale_factor)
        if not fixed_mask.any():
            report.warn(f"the mask {args.mask} is empty: the output is the input, re-encoded")
    # The method
    inversion = load_latents(Path(args.latents), run.sd) if meta else None
    results = run_edits(run, p, targets, args.source, fixed_mask, inversion)
    # Outputs, all or nothing
    from .pictures import compare_strip

    planned, outputs = [], []
    for i, (target, (edited, latent_mask, guidance)) in enumerate(zip(targets, results)):
        full_mask = given_mask if given_mask is not None else mask_image(latent_mask, run.image.size)
        entry = _coverage({"target": target, "image": str(plan["output"][i][0])}, full_mask, latent_mask)
        planned.append(planned_image(plan, "output", i, edited))
        if "--mask-out" in plan:
            entry["mask"] = str(plan["--mask-out"][i][0])
            planned.append(planned_image(plan, "--mask-out", i, full_mask))
        if "--compare-out" in plan:
            entry["compare"] = str(plan["--compare-out"][i][0])
            sheet = compare_strip(run.image, edited, full_mask, guidance, target=target, guidance_vmax=1.0)
            planned.append(planned_image(plan, "--compare-out", i, sheet))
        outputs.append(entry)
    with run.timed("write"):
        commit(planned)
    summary = run.summary("edit", p, outputs, {"source": args.source, "latents": args.latents, "mask": args.mask})
    coverage = ", ".join(f"{o['mask_coverage']:.0%}" for o in outputs)
    run.say_done([o.path for o in planned], f" (mask {coverage} of the image)")
    return summary


def cmd_mask(args, report: Reporter) -> dict:
    run, targets, image_path = Run(args, report), args.target, Path(args.image)
    # Arguments and paths (no torch yet)
    _check_input_file(image_path, "input image")
    plan = plan_images([("output", args.output), ("--heatmap-out", args.heatmap_out)], targets,
                       {"input image": image_path}, args.force)
    if any(fmt in _LOSSY for _, fmt in plan["output"]):
        report.note("a mask in a lossy format (JPEG/WebP) is not exactly binary; .png keeps it exact")
    model = check_model_argument(args.model)
    run.image = read_image(image_path, args.max_pixels, report)
    resolve_params(explicit_params(args), local_edit_defaults(model), args.reference_behaviour, ("mask",))
    # Model, checks, the method
    p = run.load(model, ("mask",))
    run.check_prompts([("--source", args.source)] + list(zip(_flag_names(targets), targets)),
                      [(args.source, t) for t in targets])
    run.note_sizes()
    from . import method
    from .pictures import heat_map

    pixels, generator = run.pixels(), run.generator()
    planned, outputs = [], []
    with run.warnings_as_lines(), report.progress(len(targets), "mask") as bar:
        source_text = run.text(args.source, p)
        for i, target in enumerate(targets):
            with run.timed("mask"):
                est = method.estimate_mask(run.sd, pixels, source_text, run.text(target, p), p, generator)
            bar.update(1)
            latent_mask = est.mask[0].cpu().numpy().astype(bool)  # (h, w)
            full_mask = mask_image(latent_mask, run.image.size)
            entry = _coverage({"target": target, "mask": str(plan["output"][i][0])}, full_mask, latent_mask)
            planned.append(planned_image(plan, "output", i, full_mask))
            if "--heatmap-out" in plan:
                heat = heat_map(est.guidance_map[0].float().cpu().numpy(), run.image.size, vmax=1.0)
                entry["heatmap"] = str(plan["--heatmap-out"][i][0])
                planned.append(planned_image(plan, "--heatmap-out", i, heat))
            outputs.append(entry)
    # Outputs, all or nothing
    with run.timed("write"):
        commit(planned)
    summary = run.summary("mask", p, outputs, {"source": args.source})
    coverage = ", ".join(f"{o['mask_coverage']:.0%}" for o in outputs)
    run.say_done([o.path for o in planned], f" (mask {coverage} of the image)")
    return summary


def cmd_invert(args, report: Reporter) -> dict:
    run = Run(args, report)
    image_path, out = Path(args.image), Path(args.output)
    _check_input_file(image_path, "input image")
    check_outputs([Planned(out, "output")], {"input image": image_path}, args.force)
    if out.suffix.lower() != ".safetensors":
        raise BadInput(f"output {out}: latents are saved as .safetensors (name it e.g. "
                       f"{out.with_suffix('.safetensors')})")
    model = check_model_argument(args.model)
    run.image = read_image(image_path, args.max_pixels, report)
    resolve_params(explicit_params(args), local_edit_defaults(model), args.reference_behaviour, ("invert",))
    p = run.load(model, ("invert",))
    run.check_prompts([("--prompt", args.prompt)], [])
    if not args.prompt.strip():
        report.note("empty --prompt: the inversion is unconditional")
    working = run.note_sizes()
    from . import method
    from .stable_diffusion import resolve_model_folder

    T = int(p.num_inference_steps * p.inpaint_strength)
    with run.warnings_as_lines(), report.progress(T, "inversion") as bar:
        with run.timed("invert"):
            inversion = method.invert(run.sd, run.pixels(), run.text(args.prompt, p), p, run.generator(),
                                      callback=lambda *_: bar.update(1))
    recorded = str(Path(model).expanduser().resolve()) if Path(model).expanduser().is_dir() else model
    meta = {"format": LATENTS_FORMAT, "version": LATENTS_VERSION, "model": recorded,
            "model_fingerprint": model_fingerprint(resolve_model_folder(model)), "steps": p.num_inference_steps,
            "strength": p.inpaint_strength, "width": run.image.width, "height": run.image.height,
            "working_width": working[0], "working_height": working[1], "prompt": args.prompt,
            "guidance": p.inversion_guidance_scale, "seed": args.seed,
            "mode": "reference" if args.reference_behaviour else "corrected", "diffedit_version": __version__}
    with run.timed("write"):
        commit([Planned(out, "output", save_latents(inversion, meta))])
    entry = {"latents": str(out), "num_latents": int(inversion.latents.shape[1]),
             "latent_shape": list(inversion.latents.shape[2:])}
    summary = run.summary("invert", p, [entry], {"prompt": args.prompt})
    run.say_done([out], f" ({entry['num_latents']} latents)")
    return summary


COMMANDS = {"edit": cmd_edit, "mask": cmd_mask, "invert": cmd_invert}


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        return importlib.import_module(f".{DELEGATED[argv[0]]}", __package__).main(argv[1:])
    debug = "--debug" in argv
    try:
        args = build_parser(prog).parse_args(argv)
        if args.command is None:
            raise BadInput("give a command: edit, mask or invert (see `diffedit --help`)")
        report = Reporter(args.quiet)
        summary = COMMANDS[args.command](args, report)
        if args.json:
            print(json.dumps(summary, indent=2))
        return 0
    except BadInput as e:
        if debug:
            import traceback

            traceback.print_exception(e)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line unless --debug
        if debug:
            raise
        hint = ""
        if "out of memory" in str(e).lower():
            hint = " (try --dtype float16, a smaller image, or --device cpu)"
        print(f"{PROG}: error: {type(e).__name__}: {_one_line(e)}{hint} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_FAILURE

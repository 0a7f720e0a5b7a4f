"""The `diffedit` command: edit an image with a text query (DiffEdit), or run one step of the method alone.

    diffedit edit IMAGE --source TEXT --target TEXT -o OUT.png      (examples that run: `diffedit --help`)

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
import json
import math
import re
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import __version__
from .console import (COUNT, DEVICES, GUIDANCE, MAX_NUM_MAPS, NUM_MAPS, POSITIVE, PROG, RATIO, SEED, STEPS, TIMESTEP,
                      BadInput, Parser, Reporter, add_compile_flag, guarded)
from .image_files import DEFAULT_MAX_PIXELS, ImageFileError, read_image, read_mask
from .locations import EXAMPLE_IMAGE, SHIPPED_MODEL, ModelNotFoundError, model_location
from .outputs import LOSSY_FORMATS, Planned, check_outputs, commit, expand_names, plan_images, planned_image
from .params import PRESETS, SAMPLERS, THRESHOLD_RULES
from .saved_inversion import check_picture, load_inversion, read_inversion_metadata, save_inversion
from .timing import timed
from .validation import FileError, check_readable, one_line, shorten

# Subcommands whose modules parse their own arguments
DELEGATED = {"train": "train", "evaluate": "evaluate", "experiment": "experiment", "bench": "bench", "demo": "demo"}
MAX_PIXELS_FLAG = "--max-pixels"


# ---------------------------------------------------------------------------------------------------------------
# Arguments


# The help's examples, in an order that runs as written (a test does) on the bundled picture with the shipped model.
_RED, _BLUE, _SQUARE = ('"a red circle on a gray background"', '"a blue circle on a gray background"',
                        '"a red square on a gray background"')
EXAMPLES = [
    ("edit", f"--source {_RED} --target {_BLUE} -o blue.png --compare-out compare.png"),
    ("edit", f'--source {_RED} --target {_BLUE} --target "a green circle on a gray background" -o out.png'),
    ("mask", f"--source {_RED} --target {_SQUARE} -o mask.png --heatmap-out heat.png"),
    ("invert", f"--prompt {_RED} -o circle.safetensors"),
    ("edit", f"--latents circle.safetensors --mask mask.png --target {_SQUARE} -o square.png"),
]


def examples(command: str | None = None) -> str:
    """The help's example lines (of one command, or all)."""
    picked = [(c, a) for c, a in EXAMPLES if command in (None, c)]
    lines = "".join(f"  diffedit {c} {EXAMPLE_IMAGE} \\\n      {a}\n" for c, a in picked)
    return f"{'examples' if command is None else 'example'}: on the picture that ships with the package\n{lines}"


EDIT_EPILOG = """\
several targets: --target may be given several times; the image is inverted once and each target gets its own
mask and output. Output names (-o, --mask-out, --compare-out): with one target, as given; with several, "-1", "-2"
... is added before the extension (out.png -> out-1.png, out-2.png), unless the name holds a placeholder: {i} (the
target's number, from 1) or {target} (the target text made file-name safe: its letters and digits, any script),
e.g. -o "edits/{i}-{target}.png".

reuse: `diffedit invert` saves the inversion, `diffedit mask` the mask; pass them with --latents / --mask. The
picture, model, steps, strength, sampler, inversion guidance, LoRA files, weights and --lora-scale must match the
inversion's (the settings are taken from the file when not given). With --mask the mask-step flags (--num-maps,
--mask-strength, --threshold-ratio, --threshold-rule) have nothing to do and are refused.

"""


def _add_common(p: argparse.ArgumentParser, defaults_note: str) -> None:
    g = p.add_argument_group("model and run")
    g.add_argument("--model", metavar="PATH_OR_REPO_ID",
                   help="diffusers-layout model folder, hub repo id or single-file .safetensors checkpoint "
                        f"(default: the shipped model, {SHIPPED_MODEL.name})")
    g.add_argument("--config", metavar="PATH_OR_REPO_ID",
                   help="with a single-file --model: the diffusers model folder (or repo id) whose configs, tokenizer "
                        "and scheduler go with it (default: the official SD 1.5 or SD 2.1 ones, told from the file)")
    g.add_argument("--steps", type=STEPS, metavar="N", help=f"sampler steps over the whole schedule{defaults_note}")
    g.add_argument("--sampler", choices=SAMPLERS,
                   help="ddim (the paper's) or dpmsolver++ (2nd-order multistep: fewer steps) for the encoding, the "
                        f"decoding and the mask's noise level{defaults_note}")
    g.add_argument("--preset", choices=tuple(PRESETS),
                   help="named settings between the model's defaults and these flags: fast = --steps 15 (about 0.7x "
                        "the time of the shipped model's defaults, every goal kept; README, The fast preset)")
    g.add_argument("--seed", type=SEED, default=0, metavar="N",
                   help="random seed (default 0: the same command gives the same result)")
    g.add_argument("--device", choices=DEVICES, default="auto",
                   help="where to run (default auto: cuda, then mps, then cpu)")
    g.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="weights and activations (default auto: float16 on a GPU, float32 on the CPU)")
    g.add_argument("--embedding", type=embedding_arg, action="append", default=[], metavar="FILE[:TOKEN]",
                   help="a textual-inversion embedding (.safetensors: diffusers, kohya or A1111 layout) whose token "
                        "the prompts may use; TOKEN overrides the file's own (repeatable)")
    g.add_argument("--reference-behaviour", "--reference-behavior", action="store_true",
                   help="diffusers-compatible numbers (StableDiffusionDiffEditPipeline 0.42.1), with its defects, "
                        "instead of the corrected mode")
    g.add_argument("--max-pixels", type=COUNT, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse larger images (default {DEFAULT_MAX_PIXELS}, 2048x2048)")
    g.add_argument("--vae-tiling", action="store_true",
                   help="encode and decode images larger than the VAE's tile (its sample_size: 512 pixels for SD) "
                        "in overlapping, blended tiles, as diffusers' tiled VAE: far less memory, other pixels (on "
                        "the shipped model's 64-pixel tiles the result is spoiled: README, Memory: VAE slicing, tiling, CPU offload); smaller images "
                        "are unchanged")
    add_compile_flag(g)
    g.add_argument("--vae-slicing", action="store_true",
                   help="encode and decode one image at a time (less memory for several targets; same pixels)")
    g.add_argument("--lora", type=lora_spec, action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="a LoRA .safetensors file (diffusers or kohya/A1111 layout) for the UNet and text encoder, "
                        "its branch times WEIGHT (default 1); repeat for several")
    g.add_argument("--lora-scale", type=lora_scale, metavar="S",
                   help="the LoRA scale of every step, on all adapters (diffusers' cross_attention_kwargs "
                        "{'scale': S}; default 1, or the model's diffedit.json)")
    o = p.add_argument_group("output and messages")
    o.add_argument("--force", action="store_true", help="allow an output to overwrite an input file")
    o.add_argument("--json", action="store_true",
                   help="print a machine-readable summary on stdout (paths, parameters, mask coverage, timings)")
    o.add_argument("--quiet", "-q", action="store_true", help="no progress bars, notes or summary (warnings stay)")
    o.add_argument("--debug", action="store_true", help="show tracebacks")


def lora_scale(text: str) -> float:
    """--lora-scale S: any finite number (0: no LoRA effect; negative: the opposite direction)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def lora_spec(text: str) -> tuple[Path, float]:
    """--lora FILE[:WEIGHT] -> (file, weight); the file must exist and be a readable .safetensors (torch-free: the
    header only), so a bad one is refused before any model work."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty: give a LoRA .safetensors file name")
    path, weight = _lora_path_and_weight(text)
    if path.suffix != ".safetensors":
        raise argparse.ArgumentTypeError(f"{path} is not a .safetensors file: diffedit never unpickles "
                                         ".bin/.ckpt/.pt LoRAs; convert it to .safetensors")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"LoRA file {path} does not exist")
    from safetensors import safe_open  # the header only, as saved_inversion.read_inversion_metadata reads one

    try:
        with safe_open(str(path), framework="np"):
            pass
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends: not a safetensors file, or truncated
        raise argparse.ArgumentTypeError(f"LoRA file {path} is not a safetensors file or is corrupt "
                                         f"({one_line(e)})") from None
    return path, weight


def _lora_path_and_weight(text: str) -> tuple[Path, float]:
    """FILE[:WEIGHT] split at its last colon; a path that exists as written keeps its colons. After a
    .safetensors name the part past the colon must be a finite number (else: a bad weight, named)."""
    head, sep, tail = text.rpartition(":")
    if not sep or not head or Path(text).is_file():
        return Path(text), 1.0
    try:
        weight = float(tail)
    except ValueError:
        if Path(head).suffix != ".safetensors":  # a colon that is part of the path
            return Path(text), 1.0
        weight = math.nan
    if not math.isfinite(weight):
        raise argparse.ArgumentTypeError(f"bad LoRA weight {tail!r} in {text!r}: give FILE[:WEIGHT] with WEIGHT a "
                                         "finite number (e.g. style.safetensors:0.8)")
    return Path(head), weight


def embedding_arg(text: str) -> tuple[str, str | None]:
    """--embedding FILE[:TOKEN] -> (FILE, TOKEN or None); a path that exists as written keeps its colons."""
    if ":" in text and not Path(text).exists():
        path, token = text.rsplit(":", 1)
        return path, token
    return text, None


def _add_mask_options(p: argparse.ArgumentParser, defaults_note: str) -> None:
    g = p.add_argument_group("mask estimation")
    g.add_argument("--mask-strength", type=RATIO, metavar="R",
                   help=f"noise level of the mask's noised copies, in (0, 1]{defaults_note}")
    g.add_argument("--num-maps", type=NUM_MAPS, metavar="N",
                   help=f"noise draws averaged per mask, 1 to {MAX_NUM_MAPS} (the mask step's time grows with it)"
                        f"{defaults_note}")
    g.add_argument("--threshold-ratio", type=POSITIVE, metavar="R",
                   help=f"the map is clamped at R x its mean and rescaled to [0, 1]{defaults_note}")
    g.add_argument("--threshold-rule", choices=THRESHOLD_RULES,
                   help="where the rescaled map is cut: ratio (at 0.5, the paper's way) or otsu (Otsu's threshold, "
                        f"per image){defaults_note}")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    note = " (default: the model's, else the paper's)"
    parser = Parser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="DiffEdit (Couairon et al., ICLR 2023): edit an image by describing the change. "
                                 "The mask of what to change is found automatically from the difference between "
                                 "the two texts.",
                     epilog=examples())
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{edit,mask,invert,train,evaluate,experiment,bench,demo}",
                                parser_class=Parser)

    edit = sub.add_parser("edit", help="edit an image: mask, inversion and masked decoding",
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog=EDIT_EPILOG + examples("edit"),
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
                          epilog=examples("mask"))
    mask.add_argument("image", metavar="IMAGE")
    mask.add_argument("--source", metavar="TEXT", required=True, help="what the image shows (may be empty: \"\")")
    mask.add_argument("--target", metavar="TEXT", required=True, action="append",
                      help="what it should show (repeatable, named as for `edit`)")
    mask.add_argument("-o", "--output", required=True, metavar="MASK", help="binary mask (white = edited)")
    mask.add_argument("--heatmap-out", metavar="PATH", help="also write the guidance map as a heat map")
    mask.add_argument("--guidance", type=GUIDANCE, metavar="G",
                      help="classifier-free guidance scale of the noise predictions; <= 1 turns it off. It cannot "
                           "change the mask (both texts share the empty negative prompt, so it only scales the "
                           f"difference the threshold divides out); accepted for scripts shared with edit{note}")
    _add_mask_options(mask, note)
    _add_common(mask, note)

    invert = sub.add_parser("invert", help="DDIM-invert an image and save the latents for `edit --latents`",
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Invert IMAGE (deterministic DDIM encoding conditioned on --prompt) and save "
                                        "every intermediate latent to a safetensors file.",
                            epilog=examples("invert"))
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
    sub.add_parser("experiment", help="the paper's comparisons and thresholding ablations over a grid of settings")
    sub.add_parser("bench", help="time the default edit, ours against diffusers' pipeline on the same weights")
    sub.add_parser("demo", help="serve a web page for editing pictures (Gradio: pip install -e \".[demo]\")")
    return parser


# ---------------------------------------------------------------------------------------------------------------
# Model


def read_embeddings_or_refuse(given: list[tuple[str, str | None]]) -> list:
    """The --embedding files, read and checked before the model is loaded."""
    from .models.textual_inversion import read_embedding

    embeddings = []
    for path, token in given:
        try:
            embeddings.append(read_embedding(path, token))
        except ValueError as e:
            raise BadInput(f"--embedding {path}: {one_line(e)}") from None
    return embeddings


def load_embeddings_or_refuse(sd, embeddings: list) -> None:
    """Add the read embeddings to the loaded model; one that does not fit it (width, a taken token) is bad input."""
    from .models import textual_inversion

    try:
        textual_inversion.load(sd.tokenizer, sd.text_encoder, embeddings)
    except ValueError as e:
        raise BadInput(f"--embedding {one_line(e)}") from None


def load_or_refuse(model: str, device, dtype, config: str | None = None):
    """The model (a folder, repo id or single file, with `config` for a single file), or one line of bad input
    naming every way it is unusable."""
    from .stable_diffusion import StableDiffusion

    try:
        if Path(model).is_file():
            return StableDiffusion.from_single_file(model, config=config, device=device, dtype=dtype)
        return StableDiffusion.from_pretrained(model, device=device, dtype=dtype)
    except (ModelNotFoundError, FileError) as e:  # missing, or a config or weight file it cannot use
        raise BadInput(f"cannot load model {model}: {few_keys(one_line(e))}") from e


KEYS_SHOWN = 3  # keys named per kind (missing, unexpected, mis-shaped) in a message about a model's weights
_KEY_LIST = re.compile(r"\b(missing|unexpected|mis-shaped): (.*?)(?=(?:; (?:missing|unexpected|mis-shaped): )|$)")


def few_keys(message: str, limit: int = KEYS_SHOWN) -> str:
    """A weights error's lists of keys cut to `limit` each, with how many there are in all, so that a foreign
    checkpoint's error stays one readable line (the loaders list up to a dozen keys of up to a hundred characters)."""
    def cut(match: re.Match) -> str:
        text = match.group(2)
        counted = re.search(r", \.\.\. \((\d+) in all\)$", text)  # `listed` left some out already
        if counted:
            text = text[:counted.start()]
        items = re.split(r", (?![^(]*\))", text)  # a mis-shaped entry holds commas inside its parentheses
        total = int(counted.group(1)) if counted else len(items)
        if total <= limit:
            return match.group(0)
        return f"{match.group(1)}: {', '.join(items[:limit])}, ... ({total} in all)"

    return _KEY_LIST.sub(cut, message)


def model_config(args, model: str) -> str | None:
    """--config, checked before any model work: only with a single-file model, and a folder or repo id."""
    config = getattr(args, "config", None)
    if config is None:
        return None
    if not Path(model).is_file():
        raise BadInput(f"--config goes with a single-file .safetensors --model; {model} is a model folder or repo "
                       "id, which has its own configs")
    if Path(config).expanduser().is_file():  # before model_location, which calls it a model path
        raise BadInput(f"--config {config} is a file; give the diffusers model folder (or repo id) whose configs go "
                       "with the checkpoint")
    try:
        return str(model_location(config))
    except ModelNotFoundError as e:
        raise BadInput(f"--config {config}: {one_line(e)}") from None


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
    "threshold_rule": ("mask_threshold_rule",),
    "sampler": ("sampler",),
    "guidance_min_timestep": ("guidance_min_timestep",),
    "lora_scale": ("lora_scale",),
}


def explicit_params(args) -> dict:
    return {name: getattr(args, flag) for flag, names in FLAG_FIELDS.items()
            if getattr(args, flag, None) is not None for name in names}


# Below this VAE tile (its sample_size, in pixels) --vae-tiling's blended seams cover most of each tile: a warning.
# Stable Diffusion's are 512 (768 for 2.x); the shipped model's 64.
SMALL_TILE = 256


def local_edit_defaults(model: str, config: str | None = None) -> dict:
    """A local model folder's diffedit.json (a single file's: its --config folder's), read before the model is
    loaded (a hub model's comes with it)."""
    from .params import read_edit_defaults

    return read_edit_defaults(Path(config or model).expanduser())


def command_params(args, edit_defaults: dict, uses: tuple[str, ...], max_steps: int = 1000):
    """The run's DiffEditParams: the flags over the model's `edit_defaults`; `uses` names the steps run ("mask",
    "invert", "decode") whose step counts are checked: a strength with int(steps x strength) = 0 would run no step.
    Called before the model is loaded (with a local folder's diffedit.json) and again after, with `max_steps`, the
    model's schedule length (before: 1000, Stable Diffusion's and the shipped model's), the most steps that fit."""
    from .params import CORRECTIONS, NOT_IN_REFERENCE, layered, least_strength, with_preset

    try:
        given = with_preset(args.preset, explicit_params(args))
        p = layered(edit_defaults, given)
    except (TypeError, ValueError) as e:
        raise BadInput(one_line(e)) from None
    if args.reference_behaviour:  # the flags name no correction, so turning them all off last is the same as in between
        for name, only in NOT_IN_REFERENCE.items():
            if name in given and given[name] != only:
                flag = next(f for f, names in FLAG_FIELDS.items() if name in names).replace("_", "-")
                raise BadInput(f"--{flag} {given[name]} has no counterpart in diffusers, whose numbers "
                               f"--reference-behaviour gives: drop one of the two")
        # the model's stored defaults for them (the shipped model's guidance interval) are set aside
        p = p.updated({**{name: False for name in CORRECTIONS.values()}, **NOT_IN_REFERENCE})
    n = p.num_inference_steps
    checks = [("--mask-strength", p.mask_encode_strength)] if "mask" in uses else []
    checks += [("--strength", p.inpaint_strength)] if {"invert", "decode"} & set(uses) else []
    for flag, value in checks:
        if int(n * value) == 0:
            needed = 1 / value  # inf for a subnormal value
            if needed > max_steps:
                shown = math.ceil(needed) if needed < 1e6 else f"{needed:.3g}"  # not a 300-digit number
                needs = f"it runs a step only from --steps {shown}, and " if math.isfinite(needed) else ""
                raise BadInput(f"{flag} {value:g} is too small for any allowed step count: {needs}the model's "
                               f"schedule has {max_steps}; with --steps {n} use {flag} >= {least_strength(n):g}")
            needed = math.ceil(needed)
            needed += int(needed * value) == 0  # 1 / value can round a step short (int(49 x (1 / 49)) = 0)
            raise BadInput(f"{flag} {value:g} with --steps {n} runs no step (int({n} x {value:g}) = 0): use "
                           f"{flag} >= {least_strength(n):g} or --steps >= {needed}")
    return p


def params_summary(p) -> dict:
    """The run's settings under the flags' names (--guidance's second field as mask_guidance), for --json."""
    return {**{flag: getattr(p, names[0]) for flag, names in FLAG_FIELDS.items()},
            "mask_guidance": p.mask_guidance_scale}


# ---------------------------------------------------------------------------------------------------------------
# Saved inversions (diffedit.saved_inversion): the file's settings become the run's


def apply_latents_metadata(meta: dict, path: Path, args, picture: Image.Image, report: Reporter) -> None:
    """Take steps, strength, inversion guidance, the sampler and the LoRA scale from the file when not given; refuse
    a mismatch with the picture (its size, then its pixels' digest where the file records one), the flags or the
    preset's fields. A file from before the picture's digest was recorded is used unchecked, with a note."""
    image_size = picture.size
    if (meta["width"], meta["height"]) != image_size:
        raise BadInput(f"{path} was inverted from a {meta['width']}x{meta['height']} image but {args.image} is "
                       f"{image_size[0]}x{image_size[1]}")
    if not check_picture(meta, picture, path):
        report.note(f"{path} does not record which picture it inverted (written by an older diffedit): it is not "
                    f"checked against {args.image}; invert again to have it checked")
    from .params import NOT_IN_REFERENCE

    preset = PRESETS[args.preset] if args.preset else {}
    fields = (("steps", "steps"), ("strength", "strength"), ("inversion_guidance", "guidance"), ("sampler", "sampler"),
              ("lora_scale", "lora_scale"))
    for flag, key in fields:
        given, name, field = getattr(args, flag), "--" + flag.replace("_", "-"), FLAG_FIELDS[flag][0]
        recorded = meta.get(key, "ddim") if key == "sampler" else meta[key]  # files from before: DDIM
        if given is None and field in preset and preset[field] != recorded:
            raise BadInput(f"{path} was inverted with {name} {_shown(recorded)} but --preset {args.preset} asks "
                           f"{name} {_shown(preset[field])}: drop --preset or invert again with it")
        if given is None:
            if args.reference_behaviour and NOT_IN_REFERENCE.get(field, recorded) != recorded:
                raise BadInput(f"{path} was inverted with {name} {_shown(recorded)}, which has no counterpart in "
                               "diffusers, whose numbers --reference-behaviour gives: invert again without it, or "
                               "drop --reference-behaviour")
            setattr(args, flag, recorded)
        elif given != recorded:
            raise BadInput(f"{path} was inverted with {name} {_shown(recorded)} but this run asks {name} "
                           f"{_shown(given)}: drop {name} (the file's value is used) or invert again")


def _shown(value) -> str:
    """A number as short as it reads (1, 0.5), in full where that would round it (0.50000001 is not 0.5)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:g}" if float(f"{value:g}") == value else repr(value)
    return str(value)


# ---------------------------------------------------------------------------------------------------------------
# Flag combinations that would be silently ignored or silently wrong, refused before anything is read

MASK_STEP_FLAGS = ("mask_strength", "num_maps", "threshold_ratio", "threshold_rule")


def check_flag_combinations(args) -> None:
    """Refuse flags that could not do what they say: an empty path, --lora-scale without --lora, one LoRA file
    given twice (its effect would double), and with `edit --mask` the mask step's flags (no mask is estimated)."""
    named = _path_flags(args) + [("--embedding", path) for path, _ in getattr(args, "embedding", [])]
    for flag, value in named + [(flag, getattr(args, name, None)) for flag, name in (("--model", "model"),
                                                                                     ("--config", "config"))]:
        if value is not None and not value.strip():  # "" is the current folder: a model, or a protected input
            what = "a model folder, file or repo id" if flag in ("--model", "--config") else "a file name"
            raise BadInput(f"{flag} is empty: give {what}")
    if args.lora_scale is not None and not args.lora:
        raise BadInput("--lora-scale needs --lora (it scales the LoRA adapters; without one it changes nothing)")
    seen: dict[Path, Path] = {}
    for path, _ in args.lora:
        key = path.resolve()
        if key in seen:
            also = "" if seen[key] == path else f" (also as {seen[key]})"
            raise BadInput(f"--lora {path} is given twice{also}: its effect would add up; give it once, with the "
                           "weight you want (FILE:WEIGHT)")
        seen[key] = path
    if getattr(args, "mask", None) is not None:
        given = ["--" + flag.replace("_", "-") for flag in MASK_STEP_FLAGS if getattr(args, flag) is not None]
        if given:
            named = " and ".join(given)
            raise BadInput(f"{named} set{'s' if len(given) == 1 else ''} how the mask is estimated, but --mask "
                           f"{args.mask} gives the mask: drop {named}")


def _path_flags(args) -> list[tuple[str, str]]:
    """(flag, value) of every file the command reads or writes that was given."""
    names = (("IMAGE", "image"), ("-o", "output"), ("--mask-out", "mask_out"), ("--compare-out", "compare_out"),
             ("--heatmap-out", "heatmap_out"), ("--latents", "latents"), ("--mask", "mask"))
    return [(flag, getattr(args, name)) for flag, name in names if getattr(args, name, None) is not None]


def check_distinct_names(outs: list[tuple[str, str | None]], targets: list[str]) -> None:
    """Refuse two targets whose outputs of one kind would have the same name (the same target twice, or two that
    a {target} placeholder spells alike), naming both targets."""
    for flag, pattern in outs:
        if pattern is None:
            continue
        first: dict[str, int] = {}
        for i, path in enumerate(expand_names(pattern, targets), 1):
            key = str(path.resolve())
            if key in first:
                j = first[key]
                raise BadInput(f"--target {j} ({shorten(targets[j - 1])}) and --target {i} "
                               f"({shorten(targets[i - 1])}) would both be written to {path} ({flag} {pattern}): "
                               "give different targets, or put {i} in the name")
            first[key] = i


def mask_guidance_note(args, report: Reporter) -> None:
    """`mask --guidance G`: say that it cannot change the mask. Both texts are guided from the same negative prompt
    (""), so eps_Q - eps_R = G (c_Q - c_R) (diffusers' swapped guidance: (1 - G) (c_Q - c_R)), and the threshold,
    relative to the map's mean, divides the constant out; G <= 1 runs unguided: the same map up to that constant."""
    if args.guidance is not None:
        report.note(f"--guidance {args.guidance:g} does not change the mask (beyond float rounding): both texts are "
                    "guided from the same empty negative prompt, so it only scales the noise difference, which the "
                    "threshold (relative to its mean) divides out; it matters for `diffedit edit`'s decoding")


# ---------------------------------------------------------------------------------------------------------------
# A run: what every command shares once the arguments are read


@dataclass
class CommandRun:
    args: argparse.Namespace
    report: Reporter
    started: float = field(default_factory=time.perf_counter)
    timings: dict = field(default_factory=dict)
    sd: object = None
    model: str = ""
    image: Image.Image | None = None
    identical: bool = False

    def timed(self, key: str):
        """Add the block's wall time to timings[key] (after the GPU's queued work is done)."""
        return timed(self.timings, key, None if self.sd is None else self.sd.device)

    def load_model_and_params(self, model: str, params_uses: tuple[str, ...]):
        """Device and dtype, the model, and the parameters with the model's own defaults."""
        from .api import pick_device

        try:
            device, dtype = pick_device(self.args.device, self.args.dtype)
        except ValueError as e:
            raise BadInput(f"--{e}") from None
        embeddings = read_embeddings_or_refuse(self.args.embedding)
        with self.timed("load_model"):
            self.sd = load_or_refuse(model, device, dtype, model_config(self.args, model))
            self.load_loras()
            load_embeddings_or_refuse(self.sd, embeddings)
        if self.args.compile:
            self.sd.compile_unet(self.args.compile)
        if self.args.vae_tiling:
            self.sd.enable_vae_tiling()
            tile = self.sd.vae.config.sample_size
            if tile < SMALL_TILE and max(self.image.size) > tile:
                self.report.warn(f"--vae-tiling with this model's {tile}-pixel tiles: tiles this small change the "
                                 "picture far past their seams (up to 186 of 255 measured on the shipped model; "
                                 "README, Memory); drop --vae-tiling unless the picture does not fit otherwise")
        if self.args.vae_slicing:
            self.sd.enable_vae_slicing()
        self.model = model
        from .api import check_params_for_model

        p = command_params(self.args, self.sd.edit_defaults, params_uses,  # the strengths, by their flags
                           self.sd.scheduler.config.num_train_timesteps)
        try:
            check_params_for_model(self.sd, p, uses=())  # the step count against the model's schedule
        except ValueError as e:  # the library names the field, the command line its flag
            raise BadInput(one_line(e).replace("num_inference_steps=", "--steps ", 1)
                           .replace("guidance_min_timestep=", "--guidance-min-timestep ", 1)) from None
        return p

    def check_prompts(self, named: list[tuple[str, str]], pairs: list[tuple[str, str]]) -> None:
        """Warn about empty and over-long prompts, and source / target pairs that say the same thing."""
        from .api import prompt_warnings, same_prompt

        for message in prompt_warnings(self.sd, named):
            self.report.warn(message)
        for source, target in pairs:
            if source is not None and same_prompt(self.sd, source, target):
                self.identical = True
                full = " (with --reference-behaviour the mask is full instead: diffusers' 0/0, defect D3)"
                self.report.warn(f"--source and --target say the same thing ({shorten(target)}): nothing to "
                                 "edit, the mask is empty" + (full if self.args.reference_behaviour else ""))

    def note_sizes(self) -> tuple[int, int]:
        """The working size (sides a multiple of the VAE factor); each way it is odd, noted."""
        from .api import size_notes

        size, notes = size_notes(self.sd, self.image.size)
        for message in notes:
            self.report.note(message)
        return size

    def method_inputs(self, p, prompts: list[str | None]):
        """The image as the model's pixels, each prompt's embeddings (None stays None), the seeded generator."""
        import torch

        from .api import model_pixels, prompt_text

        texts = [None if prompt is None else prompt_text(self.sd, prompt, p) for prompt in prompts]
        return model_pixels(self.sd, self.image), texts, torch.Generator().manual_seed(self.args.seed)

    @contextmanager
    def warnings_as_lines(self):
        """Library warnings as `diffedit: warning:` lines; those the CLI already said in its own words are dropped."""
        own = ("tokens but the text encoder takes",) + (("identical noise predictions",) if self.identical else ())

        def show(message, category, filename, lineno, file=None, line=None):
            if not any(s in str(message) for s in own):
                self.report.warn(one_line(message))

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
               "preset": self.args.preset, "lora": [{"file": str(path), "weight": w} for path, w in self.args.lora],
               "embeddings": [{"file": str(path), "token": token} for path, token in self.args.embedding],
               "parameters": params_summary(params), "outputs": outputs, **(extra or {}),
               "notes": self.report.notes, "warnings": self.report.warnings, "timings": self.timings}
        return out

    def write_masked(self, planned: list[Planned], command: str, params, outputs: list[dict], extra: dict) -> dict:
        """Write the planned outputs, all or nothing; say so with each mask's coverage; the JSON summary."""
        with self.timed("write"):
            commit(planned)
        summary = self.summary(command, params, outputs, extra)
        coverage = ", ".join(f"{o['mask_coverage']:.0%}" for o in outputs)
        self.say_done([o.path for o in planned], f" (mask {coverage} of the image)")
        return summary

    def read_image(self, path: Path) -> Image.Image:
        """The input image (--max-pixels checked), every conversion noted."""
        self.image = read_image(path, self.report.note, self.args.max_pixels, MAX_PIXELS_FLAG)
        return self.image

    def load_loras(self) -> None:
        """The --lora files as adapters, all active with their weights; one that does not fit is bad input."""
        from .models.weights import WeightsError

        specs = self.args.lora
        for i, (path, _) in enumerate(specs):
            try:
                self.sd.load_lora_weights(path, adapter_name=f"lora_{i + 1}")
            except WeightsError as e:
                raise BadInput(f"--lora {path}: {one_line(e)}") from None
        if specs:
            self.sd.set_adapters([f"lora_{i + 1}" for i in range(len(specs))], [w for _, w in specs])

    def say_done(self, written: list[Path], detail: str) -> None:
        if self.report.quiet:
            return
        t = self.timings
        parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in t.items() if k != "total")
        names = ", ".join(str(p) for p in written)
        print(f"{PROG}: wrote {names}{detail} in {t['total']:.1f} s ({parts})", file=sys.stderr)


def protected_inputs(args, model: str) -> list[tuple[str, Path]]:
    """What no output may overwrite, --force or not: the model (folder or single file), its --config folder, the
    LoRA and embedding files."""
    config = getattr(args, "config", None)
    return [("model", Path(model)), *([("--config folder", Path(config))] if config else []),
            *[("--lora file", Path(path)) for path, _ in args.lora],
            *[("--embedding file", Path(path)) for path, _ in args.embedding]]


def _check_model_or_latents_model(args, meta: dict | None) -> str:
    """--model, else the model a latents file was inverted with, else the shipped model."""
    if args.model is None and meta is not None and meta.get("model"):
        try:
            return str(model_location(meta["model"]))
        except ModelNotFoundError:
            raise BadInput(f"{args.latents} was inverted with model {meta['model']}, which is not found here; "
                           "pass --model") from None
    return str(model_location(args.model))


# ---------------------------------------------------------------------------------------------------------------
# Commands


def edit_with_progress(run: CommandRun, p, targets: list[str], source: str | None, fixed_mask: np.ndarray | None,
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

        pixels, (source_text, *target_texts), generator = run.method_inputs(p, [source, *targets])
        return list(edit_each(run.sd, pixels, run.image.size, source_text, target_texts, p, generator, fixed_mask,
                              inversion, stage))


def _coverage(entry: dict, full_mask: Image.Image, latent_mask: np.ndarray) -> dict:
    return {**entry, "mask_coverage": round(float(np.asarray(full_mask).mean() / 255), 4),
            "latent_mask_coverage": round(float(latent_mask.mean()), 4)}


def _add_output(planned: list[Planned], entry: dict, key: str, plan: dict, what: str, i: int, img: Image.Image):
    """Plan target i's output of kind `what` and name it under `key` in the target's --json entry."""
    entry[key] = str(plan[what][i][0])
    planned.append(planned_image(plan, what, i, img))


def _flag_names(targets: list[str]) -> list[str]:
    return [f"--target {i}" if len(targets) > 1 else "--target" for i in range(1, len(targets) + 1)]


def cmd_edit(args, report: Reporter) -> dict:
    run, targets, image_path = CommandRun(args, report), args.target, Path(args.image)
    # Arguments and paths (no torch yet)
    check_flag_combinations(args)
    if args.source is None and not (args.mask and args.latents):
        raise BadInput("edit needs --source (what the image shows; may be \"\") unless --latents and --mask give "
                       "the inversion and the mask")
    check_readable(image_path, "input image", ImageFileError)
    meta = read_inversion_metadata(Path(args.latents)) if args.latents else None  # torch-free: the header only
    inputs = {"input image": image_path, **({"latents file": Path(args.latents)} if args.latents else {}),
              **({"mask file": Path(args.mask)} if args.mask else {})}
    outs = [("output", args.output), ("--mask-out", args.mask_out), ("--compare-out", args.compare_out)]
    check_distinct_names([("-o" if kind == "output" else kind, pattern) for kind, pattern in outs], targets)
    model = _check_model_or_latents_model(args, meta)
    plan = plan_images(outs, targets, inputs, args.force, "pass --force", {"--mask-out": "L"},
                       protected_inputs(args, model))
    if any(fmt in LOSSY_FORMATS for _, fmt in plan.get("--mask-out", [])):
        report.note("--mask-out in a lossy format (JPEG/WebP) is not exactly binary; .png keeps it exact")
    # Inputs
    run.read_image(image_path)
    if meta is not None:
        apply_latents_metadata(meta, Path(args.latents), args, run.image, report)
    given_mask = read_mask(Path(args.mask), run.image.size, args.max_pixels, MAX_PIXELS_FLAG,
                           report.note) if args.mask else None
    uses = ("decode",) + (() if given_mask is not None else ("mask",)) + (() if meta else ("invert",))
    command_params(args, local_edit_defaults(model, model_config(args, model)), uses)
    # Model, and the checks that need it
    p = run.load_model_and_params(model, uses)
    if meta is not None:
        ran = str(run.sd.dtype).removeprefix("torch.")
        if meta.get("dtype", ran) != ran:  # files from before the dtype was recorded: unknown, no note
            report.note(f"the inversion in {args.latents} was made in {meta['dtype']}; this run decodes it in {ran}, "
                        f"so the picture differs a little from a one-step edit in {ran}")
        if args.source is not None and args.source != meta.get("prompt"):
            report.note(f"the inversion in {args.latents} was conditioned on {shorten(meta.get('prompt', ''))}; "
                        f"--source {shorten(args.source)} is used for the mask only")
    named = ([("--source", args.source)] if args.source is not None else []) + list(zip(_flag_names(targets), targets))
    run.check_prompts(named, [] if given_mask is not None else [(args.source, t) for t in targets])
    working = run.note_sizes()
    from . import image_tensors

    fixed_mask = None
    if given_mask is not None:
        fixed_mask = image_tensors.latent_mask_from_image(given_mask, working, run.sd.vae_scale_factor)
        if not fixed_mask.any():
            report.warn(f"the mask {args.mask} is empty: the output is the input, re-encoded")
    # The method
    inversion = load_inversion(Path(args.latents), run.sd)[0] if meta else None
    results = edit_with_progress(run, p, targets, args.source, fixed_mask, inversion)
    # Outputs, all or nothing
    from .figures import compare_strip

    planned, outputs = [], []
    for i, (target, (edited, latent_mask, guidance)) in enumerate(zip(targets, results)):
        full_mask = (given_mask if given_mask is not None
                     else image_tensors.latent_mask_to_image(latent_mask, run.image.size))
        entry = _coverage({"target": target, "image": str(plan["output"][i][0])}, full_mask, latent_mask)
        planned.append(planned_image(plan, "output", i, edited))
        if "--mask-out" in plan:
            _add_output(planned, entry, "mask", plan, "--mask-out", i, full_mask)
        if "--compare-out" in plan:
            sheet = compare_strip(run.image, edited, full_mask, guidance, target=target, guidance_vmax=1.0,
                                  source=args.source)
            _add_output(planned, entry, "compare", plan, "--compare-out", i, sheet)
        outputs.append(entry)
    return run.write_masked(planned, "edit", p, outputs, {"source": args.source, "latents": args.latents,
                                                          "mask": args.mask})


def cmd_mask(args, report: Reporter) -> dict:
    run, targets, image_path = CommandRun(args, report), args.target, Path(args.image)
    # Arguments and paths (no torch yet)
    check_flag_combinations(args)
    check_readable(image_path, "input image", ImageFileError)
    outs = [("output", args.output), ("--heatmap-out", args.heatmap_out)]
    check_distinct_names([("-o" if kind == "output" else kind, pattern) for kind, pattern in outs], targets)
    model = str(model_location(args.model))
    plan = plan_images(outs, targets, {"input image": image_path}, args.force, "pass --force", {"output": "L"},
                       protected_inputs(args, model))
    if any(fmt in LOSSY_FORMATS for _, fmt in plan["output"]):
        report.note("a mask in a lossy format (JPEG/WebP) is not exactly binary; .png keeps it exact")
    mask_guidance_note(args, report)
    run.read_image(image_path)
    command_params(args, local_edit_defaults(model, model_config(args, model)), ("mask",))
    # Model, checks, the method
    p = run.load_model_and_params(model, ("mask",))
    run.check_prompts([("--source", args.source)] + list(zip(_flag_names(targets), targets)),
                      [(args.source, t) for t in targets])
    run.note_sizes()
    from . import image_tensors, method
    from .figures import heat_map

    planned, outputs = [], []
    with run.warnings_as_lines(), report.progress(len(targets), "mask") as bar:
        pixels, (source_text, *target_texts), generator = run.method_inputs(p, [args.source, *targets])
        for i, target in enumerate(targets):
            with run.timed("mask"):
                est = method.estimate_mask(run.sd, pixels, source_text, target_texts[i], p, generator)
            bar.update(1)
            latent_mask = est.mask[0].cpu().numpy().astype(bool)  # (h, w)
            full_mask = image_tensors.latent_mask_to_image(latent_mask, run.image.size)
            entry = _coverage({"target": target, "mask": str(plan["output"][i][0])}, full_mask, latent_mask)
            planned.append(planned_image(plan, "output", i, full_mask))
            if "--heatmap-out" in plan:
                heat = heat_map(est.guidance_map[0].float().cpu().numpy(), run.image.size, vmax=1.0)
                _add_output(planned, entry, "heatmap", plan, "--heatmap-out", i, heat)
            outputs.append(entry)
    return run.write_masked(planned, "mask", p, outputs, {"source": args.source})


def cmd_invert(args, report: Reporter) -> dict:
    run = CommandRun(args, report)
    image_path, out = Path(args.image), Path(args.output)
    check_flag_combinations(args)
    check_readable(image_path, "input image", ImageFileError)
    model = str(model_location(args.model))
    check_outputs([Planned(out, "output")], {"input image": image_path}, args.force, "pass --force",
                  protected_inputs(args, model))
    if out.suffix.lower() != ".safetensors":
        raise BadInput(f"output {out}: latents are saved as .safetensors (name it e.g. "
                       f"{out.with_suffix('.safetensors')})")
    run.read_image(image_path)
    command_params(args, local_edit_defaults(model, model_config(args, model)), ("invert",))
    p = run.load_model_and_params(model, ("invert",))
    run.check_prompts([("--prompt", args.prompt)], [])
    if not args.prompt.strip():
        report.note("empty --prompt: the inversion is unconditional")
    run.note_sizes()
    from . import method

    T = int(p.num_inference_steps * p.inpaint_strength)
    with run.warnings_as_lines(), report.progress(T, "inversion") as bar:
        with run.timed("invert"):
            pixels, (text,), generator = run.method_inputs(p, [args.prompt])
            inversion = method.invert(run.sd, pixels, text, p, generator, callback=lambda *_: bar.update(1))
    with run.timed("write"):
        save_inversion(out, inversion, model=run.sd, params=p, image_size=run.image.size, prompt=args.prompt,
                       seed=args.seed, picture=run.image)
    entry = {"latents": str(out), "num_latents": int(inversion.latents.shape[1]),
             "latent_shape": list(inversion.latents.shape[2:])}
    summary = run.summary("invert", p, [entry], {"prompt": args.prompt})
    run.say_done([out], f" ({entry['num_latents']} latents)")
    return summary


COMMANDS = {"edit": cmd_edit, "mask": cmd_mask, "invert": cmd_invert}


def finite_or_none(value):
    """`value` with every non-finite float (NaN, inf) inside it made None, so that it is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def strict_json(summary: dict) -> str:
    """The --json summary as standard JSON: never NaN or Infinity (json's default writes both, which JSON parsers
    other than Python's refuse)."""
    return json.dumps(finite_or_none(summary), indent=2, allow_nan=False)


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        return importlib.import_module(f".{DELEGATED[argv[0]]}", __package__).main(argv[1:])

    def run() -> None:
        args = build_parser(prog).parse_args(argv)
        if args.command is None:
            names = [*COMMANDS, *DELEGATED]
            raise BadInput(f"give a command: {', '.join(names[:-1])} or {names[-1]} (see `diffedit --help`)")
        summary = COMMANDS[args.command](args, Reporter(args.quiet))
        if args.json:
            if sys.stdout is None:  # fd 1 closed (`>&-`): print would drop the summary without a word
                raise BrokenPipeError("stdout is closed")
            sys.stdout.write(strict_json(summary) + "\n")  # one write, newline included, even unbuffered (-u)

    return guarded(run, debug="--debug" in argv)

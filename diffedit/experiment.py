"""`diffedit experiment`: the paper's comparisons and mask-thresholding ablations over a grid of settings, from one
command (Couairon et al., arXiv 2210.11427, §4).

    diffedit experiment --out runs/paper --edits shapes --n 200 \\
        --methods diffedit,diffedit-gt-mask,encode-decode,sdedit --sweep inpaint_strength=0.4,0.6,0.8
    diffedit experiment --out runs/thr --edits shapes --n 100 --methods diffedit \\
        --sweep mask_thresholding_ratio=1.5,2,3,4 --sweep mask_threshold_rule=ratio,otsu
    diffedit experiment --out runs/mine --edits photos.jsonl --model stabilityai/stable-diffusion-2-1

Edits come from the shapes world's held-out stream (with ground truth and a judge) or from a manifest, one JSON
object per line: {"image": path, "source": text, "target": text, "mask": optional ground-truth region, "id":
optional}; paths are relative to the manifest. Every (edit, method, setting, seed) is one row of `records.csv`,
computed from its own seed (seed + the edit's index), so rows do not depend on each other: `--resume` keeps the
finished rows and computes the rest, with the same records as an uninterrupted run. Everything is checked before any
work (one line, exit 2). Writes `config.json`, `records.csv`, `summary.csv`, `summary.md` and `plots/` (with the
optional matplotlib: `diffedit.plots`) into --out.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import __version__
from .console import COUNT, DEVICES, EDIT_COUNT, MAX_EDITS, SEED, BadInput, Parser, add_compile_flag, guarded
from .evaluate import (SEED_MAX, background_psnr, background_ssim, heldout_edits, iou, judge,
                       mask_agreement, parse_param, psnr)
from .image_files import DEFAULT_MAX_PIXELS
from .image_tensors import latent_mask_to_image
from .locations import model_location
from .outputs import Planned, commit
from .params import PRESETS, DiffEditParams, with_preset
from .validation import FileError, is_integral, one_line

METHOD_NAMES = ("diffedit", "diffedit-gt-mask", "encode-decode", "sdedit")  # = baselines.METHODS, torch-free
NEEDS_TRUTH = {"diffedit-gt-mask"}
EXAMPLES = 4  # edits whose pictures are kept (first seed), for examples_METHOD.png
METRICS = ("mask_iou", "mask_precision", "mask_recall", "mask_coverage", "best_threshold_iou", "map_auroc",
           "background_psnr_db", "background_ssim", "psnr_db", "edit_success", "guided_steps", "seconds")


# ---------------------------------------------------------------------------------------------------------------
# Edits


@dataclass(frozen=True)
class Case:
    """One edit to run: the picture, the two texts, and what it is judged against."""

    id: str
    image: Image.Image  # RGB
    source: str
    target: str
    kind: str = ""  # "colour" / "shape" for the shapes world
    truth: np.ndarray | None = None  # (H, W) bool: the ground-truth edit region at the image's size
    edit: object = None  # the shapes world's Edit, for its judge


def shapes_cases(n: int, seed: int) -> list[Case]:
    """The evaluation's held-out stream: half colour, half shape edits, with ground truth and the shapes judge."""
    from . import shapes

    cases = []
    for i, e in enumerate(heldout_edits(n, seed)):
        source, _ = shapes.render(e.source)
        cases.append(Case(f"shapes-{seed}-{i}", Image.fromarray(source), e.source.caption, e.target.caption, e.kind,
                          e.region, e))
    return cases


class ManifestError(FileError):
    """A manifest line that cannot be run, with the file and line named."""


MANIFEST_FIELDS = {"image", "source", "target", "mask", "id"}
MAX_PIXELS_FLAG = "--max-pixels"
LINE_EXAMPLE = '{"image": "a.png", "source": "...", "target": "..."}'
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false",
               type(None): "null"}


def manifest_text(path: Path) -> str:
    """The manifest's text: UTF-8, a leading byte-order mark dropped; a file that cannot be read or decoded is one
    ManifestError naming it (and the line of the first bad byte)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ManifestError(f"manifest {path} cannot be read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ManifestError(f"manifest {path} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the "
                            "manifest as UTF-8") from None


def check_case_id(case_id: str, where: str) -> None:
    """An id names the edit's folder under examples/: it must be one plain file name, so nothing is written outside
    --out."""
    if case_id in ("", ".", "..") or any(c in case_id for c in "/\\\0") or os.path.isabs(case_id):
        raise ManifestError(f"{where}: id {case_id!r} is not a plain file name (it names the edit's folder under "
                            "examples/): give a non-empty id without / or \\, other than . and ..")


def manifest_row(line: str, where: str) -> dict:
    """One line's object, its fields checked: each of image, source, target (and the optional mask, id) once, a
    string; a path not empty."""
    def fields(pairs: list[tuple[str, object]]) -> dict:
        names = [name for name, _ in pairs]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:  # json.loads would keep the last one silently
            raise ManifestError(f"{where}: {', '.join(twice)} given twice; give each field once")
        return dict(pairs)

    try:
        row = json.loads(line, object_pairs_hook=fields)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where}: not JSON ({e.msg}, column {e.colno}): each non-blank line is one JSON object "
                            f"{LINE_EXAMPLE} (no comments, no trailing commas)") from None
    if not isinstance(row, dict):
        raise ManifestError(f"{where}: expected an object with image, source and target, got "
                            f"{_JSON_KINDS.get(type(row), 'a value')}: write {LINE_EXAMPLE}")
    missing = [k for k in ("image", "source", "target") if k not in row]
    if missing:
        raise ManifestError(f"{where}: {', '.join(missing)} missing: expected an object with image, source and "
                            f"target ({LINE_EXAMPLE})")
    unknown = set(row) - MANIFEST_FIELDS
    if unknown:
        raise ManifestError(f"{where}: unknown fields {sorted(unknown)}; the fields are image, source, target and "
                            "the optional mask and id")
    for key, value in row.items():
        if not isinstance(value, str):
            raise ManifestError(f"{where}: {key} must be a string, got {json.dumps(value)}"
                                + (f": leave {key} out instead" if value is None and key in ("mask", "id") else ""))
    for key in ("image", "mask"):
        if key in row and not row[key].strip():
            raise ManifestError(f"{where}: {key} is empty: give the picture's path (relative to the manifest's "
                                "folder)")
    return row


def manifest_pictures(folder: Path, row: dict, where: str, max_pixels: int | None = None
                      ) -> tuple[Image.Image, np.ndarray | None]:
    """A line's picture and ground-truth region (None without a `mask`), any problem with either named by line;
    pictures over `max_pixels` (--max-pixels) are refused before they are decoded."""
    from .image_files import read_image, read_mask

    try:
        image = read_image(folder / row["image"], max_pixels=max_pixels, limit_name=MAX_PIXELS_FLAG)
        truth = None if "mask" not in row else np.asarray(read_mask(folder / row["mask"], image.size, max_pixels,
                                                                    MAX_PIXELS_FLAG)) > 0
    except (FileError, ValueError) as e:  # a file that cannot be read, or a mask's values that cannot be read as one
        raise ManifestError(f"{where}: {one_line(e)}") from None
    return image, truth


def manifest_cases(path: Path, max_pixels: int | None = None) -> list[Case]:
    """A JSON-lines manifest: every line checked (fields, id, files, pixel count, mask size) before any work. Lines
    are numbered as in the file (blank lines count), in messages and in the default ids (`line-N`)."""
    path = Path(path)
    numbered = [(number, line) for number, line in enumerate(manifest_text(path).split("\n"), 1) if line.strip()]
    if not numbered:
        raise ManifestError(f"manifest {path} holds no edits")
    cases, seen = [], {}
    for number, line in numbered:
        where = f"manifest {path} line {number}"
        row = manifest_row(line, where)
        case_id = row.get("id", f"line-{number}")
        check_case_id(case_id, where)
        if case_id.casefold() in seen:  # ids that differ only in case name one folder on macOS and Windows
            other, at = seen[case_id.casefold()]
            raise ManifestError(f"{where}: id {case_id!r} is used twice (line {at}"
                                f"{'' if other == case_id else f' has {other!r}, the same examples/ folder on macOS and Windows'}"
                                "); give each edit its own id")
        seen[case_id.casefold()] = (case_id, number)
        image, truth = manifest_pictures(path.parent, row, where, max_pixels)
        cases.append(Case(case_id, image, row["source"], row["target"], truth=truth))
    return cases


def cases_digest(cases: list[Case]) -> str:
    """A digest of the edits as they will run (ids, texts, pictures, ground-truth regions): a resumed run must edit
    the same pictures, whatever the manifest's layout."""
    h = hashlib.sha256()
    for case in cases:
        h.update(json.dumps([case.id, case.source, case.target, case.kind, case.image.size]).encode())
        h.update(case.image.tobytes())
        h.update(b"-" if case.truth is None else np.packbits(case.truth).tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# The grid


def parse_sweep(text: str) -> tuple[str, list]:
    """FIELD=V1,V2,... with each value read as JSON when it parses, else as a string."""
    key, sep, values = text.partition("=")
    if not sep or not values:
        raise argparse.ArgumentTypeError(f"expected FIELD=V1,V2,..., got {text!r}")
    if not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} has no field name before '=': give FIELD=V1,V2,... with FIELD a "
                                         "DiffEditParams field, e.g. inpaint_strength=0.4,0.6")
    return key.strip(), [parse_param(f"{key}={v}")[1] for v in values.split(",")]


def repeated(values: list) -> list:
    """The values given more than once, each named once, in the order given (1 and 1.0 are one value, True and 1
    two)."""
    keys = [(isinstance(v, bool), v) for v in values]
    return [v for i, (k, v) in enumerate(zip(keys, values)) if keys.count(k) > 1 and keys.index(k) == i]


def setting_cell(value) -> str:
    """A swept value as records.csv holds it and a row's key reads it: None as `null` (as --sweep takes it), else
    its text; a cell read back is already its own text."""
    return "null" if value is None else str(value)


def settings_grid(sweeps: list[tuple[str, list]]) -> list[dict]:
    """Every combination of the swept values, in the order given (the last sweep varies fastest)."""
    names = [name for name, _ in sweeps]
    return [dict(zip(names, values)) for values in itertools.product(*(v for _, v in sweeps))]


def check_grid(fixed: dict, grid: list[dict], edit_defaults: dict) -> None:
    """Every setting is a valid DiffEditParams under the model's stored defaults, before any work."""
    from .params import layered

    for setting in grid:
        try:
            layered(edit_defaults, {**fixed, **setting})
        except (TypeError, ValueError) as e:
            raise BadInput(f"setting {setting or fixed}: {one_line(e)}") from None


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def best_threshold_iou(scores: np.ndarray, truth: np.ndarray) -> float:
    """The best IoU any threshold on the continuous map reaches (the map nearest-upsampled to the image), one above
    its maximum (an empty mask: 1 against an empty region, as `iou` scores it) included."""
    return max(iou(np.zeros_like(truth), truth), *(iou(scores >= t, truth) for t in np.unique(scores)))


def auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve of the map as a detector of the region: the probability that a region pixel
    scores above a background pixel, ties counting half (Mann-Whitney U / (n_pos n_neg))."""
    pos, neg = int(truth.sum()), int((~truth).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    values, inverse = np.unique(scores.ravel(), return_inverse=True)
    counts = np.bincount(inverse)
    ranks = np.cumsum(counts) - (counts - 1) / 2.0  # the mean rank of each distinct value, 1-based
    rank_sum = ranks[inverse][truth.ravel()].sum()
    return float((rank_sum - pos * (pos + 1) / 2) / (pos * neg))


def row_metrics(case: Case, result: np.ndarray, latent_mask: np.ndarray | None, guidance: np.ndarray | None
                ) -> dict:
    """The metrics of one edited picture (uint8 (H, W, 3) at the input's size) against its case."""
    source = np.asarray(case.image)
    size = case.image.size
    out = {"psnr_db": psnr(result, source)}
    if latent_mask is not None:
        pred = np.asarray(latent_mask_to_image(latent_mask, size)) > 0
        out["mask_coverage"] = float(pred.mean())
    if case.truth is not None:
        out["background_psnr_db"] = background_psnr(result, source, case.truth)
        out["background_ssim"] = background_ssim(result, source, case.truth)
        if latent_mask is not None:
            out.update({f"mask_{k}": v for k, v in mask_agreement(pred, case.truth).items()})
        if guidance is not None:
            scores = np.asarray(Image.fromarray(guidance.astype(np.float32), "F").resize(size, Image.NEAREST))
            out.update(best_threshold_iou=best_threshold_iou(scores, case.truth), map_auroc=auroc(scores, case.truth))
    if case.edit is not None:
        out["edit_success"] = float(judge(case.edit, result)[0])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Running


def example_name(method_name: str, setting: dict) -> str:
    return "__".join([method_name, *(f"{k}={setting_cell(v)}" for k, v in setting.items())])


def example_grids(out: Path, methods: list[str], grid: list[dict],
                  texts: dict[str, tuple[str, str]] | None = None) -> list[Path]:
    """examples_METHOD.png: a row per kept edit under its id and texts (`texts`: id -> (source, target)), the input
    then the method's result under each setting (Pillow only, so there whether or not matplotlib is)."""
    from .figures import display_scale, stacked, strip, titled_to_fit

    written = []
    folders = sorted((out / "examples").glob("*"), key=lambda p: (len(p.name), p.name))  # edit 2 before edit 10
    for method_name in methods:
        rows = []
        for folder in folders:
            labels = [", ".join(setting_cell(v) for v in s.values()) or method_name for s in grid]  # names: title
            files = [("input", folder / "input.png")] + [
                (label, folder / f"{example_name(method_name, s)}.png") for label, s in zip(labels, grid)]
            if not all(path.is_file() for _, path in files):
                continue
            pictures = [(label, Image.open(path).convert("RGB")) for label, path in files]
            scale = display_scale(pictures[0][1].height, 128, 256)
            size = (round(pictures[0][1].width * scale), round(pictures[0][1].height * scale))
            row = strip([(label, picture.resize(size, Image.NEAREST)) for label, picture in pictures], font_size=12)
            source, target = (texts or {}).get(folder.name, (None, None))
            said = f'"{source}" -> "{target}"' if target is not None else ""
            rows.append(titled_to_fit(row, f"{folder.name}: {said}".rstrip(": "), font_size=12, gap=6))
        if rows:
            sheet = stacked(rows)
            fields = ", ".join(grid[0]) if grid and grid[0] else "the model's defaults"
            titled_to_fit(sheet, f"{method_name}: the input, then one column per setting ({fields})").save(
                out / f"examples_{method_name}.png")
            written.append(out / f"examples_{method_name}.png")
    return written


def row_key(edit: str, method: str, seed: int | str, setting: dict) -> str:
    """A row's identity, the same whether built from a run's values or read back from records.csv's cells."""
    return json.dumps([edit, method, int(seed), {k: setting_cell(v) for k, v in setting.items()}], sort_keys=True)


@dataclass(frozen=True)
class Job:
    """Rows computed together: a batch of edits under one method and seed, every setting of the grid."""

    cases: tuple[tuple[int, Case], ...]  # (the edit's index, the edit)
    method: str
    seed: int


def batchable(params: DiffEditParams) -> bool:
    """Whether edits under these settings can share a batch and keep their numbers: not when the mask's clamp is
    the batch's mean (D2's reference behaviour) or the noise regularizer pools or draws for the batch as a whole
    (D5's)."""
    return params.per_image_mask_scale and (params.num_reg_steps == 0 or params.portable_regularizer)


def plan_jobs(cases: list[Case], methods: list[str], seeds: list[int], batch_size: int) -> list[Job]:
    """Batches of `batch_size` consecutive edits of one working size (a manifest's pictures may differ), then
    every seed, then every method: the order rows are computed in. It depends on nothing but its arguments, so
    every rank of a sharded run and every resumed run batches the edits alike (batching moves numbers by ~1e-6)."""
    batches: list[list[tuple[int, Case]]] = []
    for i, case in enumerate(cases):
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and last[-1][1].image.size == case.image.size:
            last.append((i, case))
        else:
            batches.append([(i, case)])
    return [Job(tuple(batch), method, seed) for batch in batches for seed in seeds for method in methods]


def shard(jobs: list[Job], methods: list[str], rank: int, world: int) -> list[Job]:
    """This rank's jobs: each method's jobs dealt round the ranks in turn, method m's first to rank m mod world, so
    that every rank gets a share of each method (their costs differ several times over) even with few batches."""
    dealt: dict[str, int] = {}
    mine = []
    for job in jobs:
        k = dealt.get(job.method, 0)
        dealt[job.method] = k + 1
        if (k + methods.index(job.method)) % world == rank:
            mine.append(job)
    return mine


def job_rows(job: Job, grid: list[dict]) -> list[tuple[int, Case, dict]]:
    return [(i, case, setting) for i, case in job.cases for setting in grid]


def run_job(sd, job: Job, grid: list[dict], fixed: dict) -> list[tuple[dict, Image.Image]]:
    """Every row of a job, in `job_rows` order: (metrics, edited picture). The edits run as one batch through the
    method's steps, each with its own generator seeded by seed + the edit's index, so an edit draws what it draws
    alone; settings share the difference map and the inversion where only thresholding or decoding differs
    (`reuse.SharedSteps`, exact). A row's `seconds` is its share of the job's time."""
    import torch

    from . import api, baselines, method
    from .image_tensors import latent_mask_from_image
    from .reuse import SharedSteps

    start = time.perf_counter()
    all_params = [DiffEditParams.for_model(sd, **fixed, **setting) for setting in grid]
    pixels = torch.cat([api.model_pixels(sd, case.image) for _, case in job.cases])  # (B, 3, H, W)
    working = (pixels.shape[-1], pixels.shape[-2])
    truth = None
    if all(case.truth is not None for _, case in job.cases):
        truth = torch.cat([torch.from_numpy(latent_mask_from_image(Image.fromarray(case.truth.astype(np.uint8) * 255),
                                                                   working, sd.vae_scale_factor))[None]
                           for _, case in job.cases])  # (B, h, w)
    steps = SharedSteps(deepest_strength=max(p.inpaint_strength for p in all_params))
    texts: dict[tuple, method.TextEmbeddings] = {}

    def text(prompts: list[str], params: DiffEditParams) -> method.TextEmbeddings:
        key = (tuple(prompts), params.clip_skip, params.lora_scale)
        if key not in texts:
            texts[key] = method.encode_text(sd, prompts, [""] * len(prompts), params.clip_skip, params.clip_skip,
                                            params.lora_scale)
        return texts[key]

    by_setting = []
    for params in all_params:
        generators = [torch.Generator().manual_seed(job.seed + i) for i, _ in job.cases]
        edited = baselines.METHODS[job.method](
            sd, pixels, text([c.source for _, c in job.cases], params), text([c.target for _, c in job.cases], params),
            params, generators if len(generators) > 1 else generators[0], truth, steps)
        decoding = method.strength_timesteps(method.schedule(sd, params), params.num_inference_steps,
                                             params.inpaint_strength, "inpaint_strength")
        guided = int((decoding >= params.guidance_min_timestep).sum()) if params.guidance_scale > 1 else 0
        by_setting.append((edited, guided))
    rows = []
    for b, (_, case) in enumerate(job.cases):
        for edited, guided in by_setting:
            picture = api.to_picture(sd, edited.latents[b : b + 1], case.image.size, source=pixels[b : b + 1])
            latent_mask = None if edited.latent_mask is None else edited.latent_mask[b].cpu().numpy()
            guidance = None if edited.guidance_map is None else edited.guidance_map[b].float().cpu().numpy()
            metrics = row_metrics(case, np.asarray(picture.convert("RGB")), latent_mask, guidance)
            rows.append(({**metrics, "guided_steps": guided}, picture))
    seconds = (time.perf_counter() - start) / len(rows)
    return [({**metrics, "seconds": seconds}, picture) for metrics, picture in rows]


def read_records(path: Path, columns: list[str] | None = None, repair: bool = True) -> list[dict]:
    """The rows of a records.csv written so far. A last line cut by an interruption is dropped from the file
    (rewritten whole, by rename), so that rows appended after it start on a line of their own; with `repair` False
    (a file another process may be appending to) it is only left out of the rows."""
    if not path.is_file():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        if repair:
            commit([Planned(path, "records", lambda tmp: Path(tmp).write_text(text))])
    rows = list(csv.DictReader(text.splitlines()))
    if columns is not None and rows and list(rows[0]) != columns:
        raise BadInput(f"--resume: {path} has the columns {list(rows[0])}, this run writes {columns}")
    return rows


RUN_FILES = ("records.csv", "summary.csv", "summary.md", "shards", "examples", "plots")
MODEL_KEYS = ("model_fingerprint", "model_edit_defaults")  # config.json's entries known once the model is loaded
WHAT_CHANGED = {"edits_digest": "the edits' pictures, texts or ids", "model_fingerprint": "the model's weights or "
                "configs", "model_edit_defaults": "the model's stored edit defaults, its diffedit.json"}


def check_methods(methods: list[str]) -> None:
    """Known method names, at least one, each once."""
    unknown = sorted(set(methods) - set(METHOD_NAMES))
    if unknown or not methods:
        raise BadInput(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from "
                       f"{', '.join(METHOD_NAMES)}")
    if repeated(methods):
        raise BadInput(f"--methods: {', '.join(repeated(methods))} given twice; name each method once")


def check_seeds(seeds: list[int]) -> None:
    """Ints in [0, SEED_MAX], each once."""
    text = ",".join(str(s) if isinstance(s, int) else repr(s) for s in seeds)  # "1" (a str) shown as '1'
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= SEED_MAX for s in seeds):
        raise BadInput(f"--seeds {text}: seeds are ints in [0, {SEED_MAX}]")
    if repeated(seeds):
        raise BadInput(f"--seeds {text}: {', '.join(map(str, repeated(seeds)))} given twice; give each seed once")


def check_sweep(sweep: list[tuple[str, list]], fixed: dict) -> None:
    """Each field swept once and not also fixed, each of its values once."""
    swept = [name for name, _ in sweep]
    twice = sorted({f for f in swept if swept.count(f) > 1} | (set(swept) & set(fixed)))
    if twice:
        raise BadInput(f"--sweep / --param: {', '.join(twice)} given twice; sweep a field once, or fix it")
    for name, values in sweep:
        if not values:
            raise BadInput(f"--sweep {name}: no values; give {name}=V1,V2,...")
        if repeated(values):
            raise BadInput(f"--sweep {name}: {', '.join(setting_cell(v) for v in repeated(values))} given twice; "
                           "give each value once")


def check_out(out: str | Path) -> Path:
    """The run's folder: given (an empty --out would be the current folder), and not a file."""
    if not str(out).strip():  # "" is the current folder; " " a folder named by a slip of the keyboard
        raise BadInput("--out is empty: give the run's folder (it is created if need be)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file; give a folder")
    return out


def run_files(out: Path) -> list[str]:
    """The run's files in `out` that hold something (a folder: any entry)."""
    found = [name for name in RUN_FILES if ((out / name).is_file() and (out / name).stat().st_size)
             or ((out / name).is_dir() and any((out / name).iterdir()))]
    return found + sorted(p.name for p in out.glob("examples_*.png"))


def previous_config(out: Path, resume: bool) -> dict | None:
    """The config.json of the run already in `out`, None when there is none; refused without `resume`. A folder
    holding a run's files without its config.json is refused either way: nothing says what its rows are."""
    config_file = out / "config.json"
    if not config_file.is_file():
        found = run_files(out) if out.is_dir() else []
        if found:
            raise BadInput(f"--out {out} holds part of a run ({', '.join(found)}) but no config.json, so it cannot "
                           "be resumed: remove those files or choose another --out")
        return None
    if not resume:
        raise BadInput(f"{out} holds a run already: pass --resume to continue it, or choose another --out")
    try:
        before = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"--resume: {config_file} cannot be read ({one_line(e)}); choose another --out") from None
    if not isinstance(before, dict):
        raise BadInput(f"--resume: {config_file} is not a run's config; choose another --out")
    return {"preset": None, "compile": None, **before}  # runs from before both


def check_same_run(before: dict | None, config: dict, keys: list[str], out: Path) -> None:
    """A resumed run's `keys` of config.json must be the run's: else refused, each difference named (old -> new)."""
    if before is None:
        return
    now = json.loads(json.dumps(config))  # tuples as lists, as config.json holds them
    changed = [difference(k, before, now) for k in keys if (k in before, before.get(k)) != (k in now, now.get(k))]
    if changed:
        raise BadInput(f"--resume: {out} was run with other settings: {'; '.join(changed)}; resume it with its own "
                       "settings, or choose another --out")


def difference(key: str, before: dict, now: dict) -> str:
    """`key old -> new` (JSON values; "(not recorded)" for a key one side lacks), with what a digest stands for."""
    shown = [json.dumps(d[key]) if key in d else "(not recorded)" for d in (before, now)]
    return f"{key} {shown[0]} -> {shown[1]}" + (f" ({WHAT_CHANGED[key]} changed)" if key in WHAT_CHANGED else "")


def finished_rows(out: Path, columns: list[str], world: int, own: Path) -> list[dict]:
    """The rows already written: records.csv's and every shard's (an interrupted torchrun run's, of any size).
    One process repairs a cut last line in each; under torchrun a rank repairs only its `own` shard."""
    paths = [out / "records.csv", *sorted((out / "shards").glob("records-*.csv"))]
    return [r for path in paths for r in read_records(path, columns, repair=world == 1 or path == own)]


class Interrupted(KeyboardInterrupt):
    """An experiment stopped by the user once it had begun writing: the message says what is kept and how to
    continue."""


def interrupted(out: Path) -> Interrupted:
    """What an interrupted run says: config.json and the rows written so far (records.csv's and the shards') are
    kept, and --resume continues."""
    files = [out / "records.csv", *sorted((out / "shards").glob("records-*.csv"))]
    kept = sum(len(read_records(path, repair=False)) for path in files)
    return Interrupted(f"interrupted; kept {out / 'config.json'} and the {kept} rows finished so far "
                       f"({', '.join(str(p) for p in files if p.is_file()) or 'none yet'}): run the same command with "
                       "--resume to continue")


def run_experiment(out: str | Path, *, edits: str | Path = "shapes", n: int = 40, edit_seed: int = 0,
                   methods: list[str] | tuple[str, ...] = ("diffedit",),
                   sweep: list[tuple[str, list]] | dict[str, list] = (), param: dict | None = None,
                   preset: str | None = None, seeds: list[int] | tuple[int, ...] = (0,), model=None,
                   device: str | None = None, batch_size: int = 1, resume: bool = False, quiet: bool = True,
                   compile_mode: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Path:
    """Run (or, with `resume`, continue) an experiment into the folder `out`; return the path of records.csv.

    out: the run's folder (str or os.PathLike; not the model's folder nor inside it); edits: "shapes" (`n` edits
    of the held-out draw `edit_seed`, an int in [0, 2**63 - 1]; n an int >= 1) or the path of a JSON-lines
    manifest; methods: a list of names from `baselines.METHODS`, each once; sweep: [(DiffEditParams field,
    [values])] or {field: [values]}, every combination; param: a dict of fields fixed for every row; preset: None
    or a name in `params.PRESETS`, its fields under `param` and `sweep`; seeds: a list of ints, each row's generator
    seeded by seed + the edit's index (seeds in [0, 2**63 - 1], each once); model: None (the shipped model), a
    folder or hub repo id, or a loaded StableDiffusion (used as it is: compile_mode compiles its UNet in place; its
    active LoRA adapters and learned words are part of the run's model fingerprint); device: None (cpu, or a loaded
    model's own), "auto", "cpu", "cuda" or "mps"; batch_size: an int >= 1, edits run together through the three
    steps (the same numbers as one at a time within ~1e-5; settings that keep the reference's batch-wide mask clamp
    or regularizer run one at a time); compile_mode: None, or one of `console.COMPILE_MODES` (torch.compile's mode
    for the UNet, `StableDiffusion.compile_unet`); max_pixels: an int >= 1, a manifest picture (or mask) with more
    pixels is refused before it is decoded (the command line's --max-pixels, as `diffedit edit`'s). `lora_scale` can be swept or fixed only with a loaded model
    that has active LoRA adapters (the command line loads none). Every check comes before any work: a wrong value
    (a wrong type of a number or name included) is a ValueError naming it, in the command line's words; a wrong
    type of a list, dict, path or model a TypeError. Numpy ints are taken as ints. Interrupted once it has begun
    writing, it raises `Interrupted` (a KeyboardInterrupt) saying what is kept."""
    from .api import check_params_for_model, pick_device
    from .stable_diffusion import StableDiffusion

    # Before any work: every argument, the output folder, the grid, edits, the model, a run already there
    a = checked_arguments(out, edits, n, edit_seed, methods, sweep, param, seeds, model, device, batch_size, resume,
                          quiet, compile_mode)
    if not is_integral(max_pixels) or max_pixels < 1:
        raise BadInput(f"{MAX_PIXELS_FLAG} {max_pixels!r}: expected an int >= 1")
    out, methods, fixed, sweep, seeds, batch_size = a.out, a.methods, a.fixed, a.sweep, a.seeds, a.batch_size
    given = model if isinstance(model, StableDiffusion) else None
    check_sweep(sweep, fixed)
    if given is None or not (given.lora.enabled and given.lora.weights):
        from .evaluate import refuse_lora_scale

        refuse_lora_scale([name for name, _ in sweep], "--sweep", "diffedit experiment")
        refuse_lora_scale(fixed, "--param", "diffedit experiment")
    if edits == "shapes":
        cases = shapes_cases(a.n, a.edit_seed)
    elif Path(edits).is_file():
        cases = manifest_cases(Path(edits), int(max_pixels))
    else:
        raise BadInput(f"--edits {edits}: give `shapes` or a .jsonl manifest that exists")
    if NEEDS_TRUTH & set(methods) and any(c.truth is None for c in cases):
        raise BadInput("--methods diffedit-gt-mask needs a ground-truth mask for every edit (a `mask` in each "
                       "manifest line)")
    swept = [name for name, _ in sweep]
    try:  # the preset's fields under --param; a swept field is the sweep's
        fixed = {**{k: v for k, v in with_preset(preset, {}).items() if k not in swept}, **fixed}
    except ValueError as e:
        raise BadInput(f"--{one_line(e)}") from None
    grid = settings_grid(sweep)
    from .evaluate import model_files, stored_defaults
    from .params import read_edit_defaults
    from .saved_inversion import model_fingerprint

    if given is not None:
        location, source = given.folder, given.source or (str(given.folder) if given.folder else "(built in memory)")
        local_defaults = stored_defaults(given.folder, given.edit_defaults)
    else:
        location = model_location(model)
        source = str(location)
        local = isinstance(location, Path) and location.is_dir()
        local_defaults = stored_defaults(location, read_edit_defaults(location)) if local else {}
    check_run_folder(out, model_files(location), [("--edits manifest", Path(edits))] if edits != "shapes" else [])
    check_grid(fixed, grid, local_defaults)
    config = {"edits": str(edits), "n": a.n, "edit_seed": a.edit_seed, "methods": methods, "preset": preset,
              "param": fixed, "sweep": [[k, v] for k, v in sweep], "seeds": seeds, "model": source,
              "device": a.device, "batch_size": batch_size, "compile": compile_mode, "diffedit_version": __version__,
              "edits_digest": cases_digest(cases)}
    before = previous_config(out, resume)
    # a local folder's identity is known before loading: every difference is named in one message
    if given is not None:
        early = {"model_fingerprint": model_identity(given), "model_edit_defaults": local_defaults}
    else:
        early = {"model_fingerprint": model_fingerprint(location), "model_edit_defaults": local_defaults} if local \
            else {}
    check_same_run(before, {**config, **early},
                   [k for k in {**(before or {}), **config} if k not in MODEL_KEYS or k in early], out)
    try:
        torch_device, _ = pick_device(a.device, "float32")
    except ValueError as e:
        raise BadInput(f"--{e}") from None
    if given is not None:
        from .stable_diffusion import same_device

        if not same_device(torch_device, given.device):
            raise BadInput(f"--device {a.device}: the model given is already loaded on {given.device}; pass "
                           f"device=None (its own) or load it on {a.device}")
        sd = given
    else:
        sd = StableDiffusion.from_pretrained(location, device=torch_device)
        if not local and sd.folder is not None:  # a hub model's cache folder, known once it is fetched
            check_run_folder(out, [("model", sd.folder)], [])
            stored_defaults(sd.folder, sd.edit_defaults)
    if compile_mode is not None:
        sd.compile_unet(compile_mode)
    for setting in grid:
        try:
            check_params_for_model(sd, DiffEditParams.for_model(sd, **fixed, **setting))
        except (TypeError, ValueError) as e:
            raise BadInput(f"setting {setting or fixed}: {one_line(e)}") from None
    config.update(model_fingerprint=model_identity(sd), model_edit_defaults=dict(sd.edit_defaults))
    check_same_run(before, config, list(MODEL_KEYS), out)
    rank, world = distributed()  # after every check: joining the group waits for every rank's checks
    plan = Plan(cases, methods, seeds, grid, fixed, batch_size)
    done = finished_rows(out, plan.columns, world, own_file(out, rank, world))
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    try:
        new_rows = run_rows(sd, plan, out, done, rank, world, quiet)
        if rank == 0:
            finish(out, plan, new_rows, quiet)
    except KeyboardInterrupt:
        raise interrupted(out) from None
    finally:
        leave_group(world)
    return out / "records.csv"


# A row's generator takes seed + the edit's index up to this (torch's manual_seed): seeds <= 2**63 - 1 and at most
# MAX_EDITS edits (a manifest of 2**63 lines aside) never reach it, so no run needs a check (tests/test_experiment.py)
GENERATOR_SEED_MAX = 2**64 - 1


@dataclass(frozen=True)
class Arguments:
    """`run_experiment`'s arguments as checked: plain ints, lists and dicts."""

    out: Path
    n: int
    edit_seed: int
    methods: list[str]
    sweep: list[tuple[str, list]]
    fixed: dict
    seeds: list[int]
    device: str
    batch_size: int


def checked_arguments(out, edits, n, edit_seed, methods, sweep, param, seeds, model, device, batch_size, resume,
                      quiet, compile_mode) -> Arguments:
    """`run_experiment`'s arguments checked on their own, before anything is read: what the command line's flags
    refuse is refused in the flags' words (a ValueError), a container or path of the wrong type is a TypeError
    naming the argument."""
    from .console import COMPILE_MODES
    from .stable_diffusion import StableDiffusion

    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out: expected the run's folder (str or os.PathLike), got {type(out).__name__}")
    out = check_out(out)
    if not isinstance(edits, (str, os.PathLike)):
        raise TypeError(f"edits: expected \"shapes\" or a manifest's path (str or os.PathLike), got "
                        f"{type(edits).__name__}")
    if not is_integral(n) or not 1 <= n <= MAX_EDITS:
        raise BadInput(f"--n: expected an integer in [1, {MAX_EDITS}], got {n!r}")
    if not is_integral(edit_seed) or not 0 <= edit_seed <= SEED_MAX:
        raise BadInput(f"--edit-seed: expected an integer in [0, {SEED_MAX}], got {edit_seed!r}")
    if isinstance(methods, (str, bytes)) or not isinstance(methods, (list, tuple)):
        raise TypeError(f"methods: expected a list of method names such as [\"diffedit\"], got "
                        f"{type(methods).__name__}{f' {methods!r}' if isinstance(methods, str) else ''}")
    if not all(isinstance(m, str) for m in methods):
        raise TypeError(f"methods: expected a list of method names (strings), got {list(methods)!r}")
    check_methods(list(methods))
    if isinstance(sweep, dict):
        sweep = list(sweep.items())
    if isinstance(sweep, (str, bytes)) or not isinstance(sweep, (list, tuple)):
        raise TypeError(f"sweep: expected [(field, [values]), ...] or {{field: [values]}}, got {type(sweep).__name__}")
    for entry in sweep:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise TypeError(f"sweep: expected [(field, [values]), ...] or {{field: [values]}}; {entry!r} is not a "
                            "(field name, list of values) pair")
        if isinstance(entry[1], (str, bytes)) or not isinstance(entry[1], (list, tuple)):
            raise TypeError(f"sweep: {entry[0]}'s values must be a list, e.g. ({entry[0]!r}, [{entry[1]!r}]), got "
                            f"{type(entry[1]).__name__}")
    if param is not None and not isinstance(param, dict):
        raise TypeError(f"param: expected None or a dict of DiffEditParams fields, got {type(param).__name__}")
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, (list, tuple, range, np.ndarray)):
        raise TypeError(f"seeds: expected a list of seeds (ints) such as [0, 1], got {type(seeds).__name__}")
    seeds = [int(s) if is_integral(s) else s for s in seeds]  # numpy ints as ints; anything else is named below
    check_seeds(seeds)
    if not (model is None or isinstance(model, (str, os.PathLike, StableDiffusion))):
        raise TypeError(f"model: expected None (the shipped model), a folder or hub repo id, or a loaded "
                        f"StableDiffusion; got {type(model).__name__}")
    if device is None:
        device = model.device.type if isinstance(model, StableDiffusion) else "cpu"
    if not isinstance(device, str):
        raise TypeError(f"device: expected None or a name: {', '.join(DEVICES)}; got {type(device).__name__}")
    if device not in DEVICES:
        raise BadInput(f"--device: expected one of {', '.join(DEVICES)}, got {device!r}")
    if not is_integral(batch_size) or batch_size < 1:
        raise BadInput(f"--batch-size {batch_size}: expected an int >= 1")
    for name, flag in (("resume", resume), ("quiet", quiet)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name}: expected True or False, got {type(flag).__name__}")
    if compile_mode is not None and not isinstance(compile_mode, str):
        raise TypeError(f"compile_mode: expected None or a mode name ({', '.join(COMPILE_MODES)}), got "
                        f"{type(compile_mode).__name__}")
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
        raise BadInput(f"--compile {compile_mode}: expected one of {', '.join(COMPILE_MODES)} (the torch.compile "
                       "modes diffedit offers), or None not to compile")
    return Arguments(out, int(n), int(edit_seed), list(methods), [(k, list(v)) for k, v in sweep], dict(param or {}),
                     [int(s) for s in seeds], device, int(batch_size))


def check_run_folder(out: Path, protected: list[tuple[str, Path]], inputs: list[tuple[str, Path]]) -> None:
    """The run's folder is not a protected folder (the model's) nor inside one, and no protected path or input (the
    manifest) is one of the files or folders the run writes in it."""
    folder = Path(os.path.realpath(out))
    for label, path in protected:
        base = Path(os.path.realpath(path))
        if folder == base or base in folder.parents:
            raise BadInput(f"--out {out} is {'the' if folder == base else 'inside the'} {label}'s folder {path}: the "
                           "run's files would go among its files; choose another --out")
    for label, path in [*protected, *inputs]:
        real = Path(os.path.realpath(path))
        written = next((name for name in ("config.json", *RUN_FILES) if folder / name in (real, *real.parents)), None)
        if written is None and real.parent == folder and real.name.startswith("examples_"):
            written = real.name
        if written is not None:
            raise BadInput(f"--out {out}: the run writes {written} there, which would overwrite the {label} {path}; "
                           "choose another --out")


def own_file(out: Path, rank: int, world: int) -> Path:
    """The file a process appends its rows to: records.csv alone, a shard of its own under torchrun."""
    return out / "records.csv" if world == 1 else out / "shards" / f"records-{rank}.csv"


def model_identity(sd) -> str | None:
    """The model's fingerprint (`saved_inversion.fingerprint_of`), None for a model without files; a model given
    loaded with LoRA adapters or learned words has them in it too (`lora_record`, `embeddings_record`), so that a
    resumed run with other ones is refused."""
    from .saved_inversion import embeddings_record, fingerprint_of, lora_record

    if sd.folder is None:
        return None
    extra = [record for record in (lora_record(sd), embeddings_record(sd)) if record != "[]"]
    if not extra:
        return fingerprint_of(sd)
    return f"{fingerprint_of(sd)}+{hashlib.sha256(json.dumps(extra).encode()).hexdigest()[:16]}"


@dataclass(frozen=True)
class Plan:
    """What a run computes: its edits, methods, seeds, settings (over the fixed fields) and batch size."""

    cases: list[Case]
    methods: list[str]
    seeds: list[int]
    grid: list[dict]
    fixed: dict
    batch_size: int

    @property
    def swept(self) -> list[str]:
        return list(self.grid[0]) if self.grid else []

    @property
    def columns(self) -> list[str]:
        return ["edit", "kind", "method", "seed", *self.swept, *METRICS]

    def order(self) -> list[str]:
        """records.csv's order of row keys (edit, seed, method, setting), whatever the batching."""
        return [row_key(case.id, method, seed, setting) for case in self.cases for seed in self.seeds
                for method in self.methods for setting in self.grid]


def run_rows(sd, plan: Plan, out: Path, done: list[dict], rank: int, world: int, quiet: bool) -> int:
    """This rank's jobs not done yet, each job's rows appended to its file (`own_file`) and flushed when it finishes
    (the first seed's pictures of the first edits kept for the examples grid); the number of new rows, over every
    rank."""
    from tqdm import tqdm

    grid, swept, shard_file = plan.grid, plan.swept, own_file(out, rank, world)
    done_keys = {row_key(r["edit"], r["method"], r["seed"], {k: r[k] for k in swept}) for r in done}
    together = plan.batch_size if all(batchable(DiffEditParams.for_model(sd, **plan.fixed, **s)) for s in grid) else 1
    key = lambda job, case, setting: row_key(case.id, job.method, job.seed, setting)
    todo = [job for job in shard(plan_jobs(plan.cases, plan.methods, plan.seeds, together), plan.methods, rank, world)
            if any(key(job, case, setting) not in done_keys for _, case, setting in job_rows(job, grid))]
    shard_file.parent.mkdir(exist_ok=True)
    fresh = not shard_file.is_file() or not shard_file.read_text()
    new_rows = 0
    with open(shard_file, "a", newline="") as f:  # the rows kept stay; new ones are appended, one flush per job
        writer = csv.DictWriter(f, fieldnames=plan.columns)
        if fresh:
            writer.writeheader()
        bar = tqdm(total=sum(len(job_rows(job, grid)) for job in todo), desc="experiment", unit="row",
                   disable=quiet or not sys.stderr.isatty())
        for job in todo:
            results = run_job(sd, job, grid, plan.fixed)
            for (i, case, setting), (metrics, picture) in zip(job_rows(job, grid), results):
                if key(job, case, setting) in done_keys:
                    continue  # kept from before the interruption
                if i < EXAMPLES and job.seed == plan.seeds[0]:  # kept for the examples grid
                    keep_example(out / "examples" / case.id, case, example_name(job.method, setting), picture)
                writer.writerow({"edit": case.id, "kind": case.kind, "method": job.method, "seed": job.seed,
                                 **{k: setting_cell(v) for k, v in setting.items()},
                                 **{k: _cell(metrics.get(k)) for k in METRICS}})
                new_rows += 1
            f.flush()
            bar.update(len(results))
        bar.close()
    return new_rows if world == 1 else all_ranks_sum(new_rows)


def keep_example(folder: Path, case: Case, name: str, picture: Image.Image) -> None:
    """An edit's input and one result, for the examples grid (the folder is the edit's id: a plain file name)."""
    folder.mkdir(parents=True, exist_ok=True)
    case.image.save(folder / "input.png")
    picture.save(folder / f"{name}.png")


def leave_group(world: int) -> None:
    """Under torchrun, leave the process group before the process ends: a gloo group left to the interpreter's
    exit could abort a rank ("terminate called without an active exception", SIGABRT) once it had finished."""
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def all_ranks_sum(count: int) -> int:
    """The sum of every rank's `count`; also waits until every rank (and so every shard) is done."""
    import torch
    import torch.distributed as dist

    counted = torch.tensor([count])
    dist.all_reduce(counted)
    return int(counted)


def finish(out: Path, plan: Plan, new_rows: int, quiet: bool) -> None:
    """Rank 0, every row written: records.csv in edit, seed, method, setting order whatever order the rows were
    written in (batches, ranks, resumed runs), the summary, the examples grids and the plots."""
    records_file = out / "records.csv"
    merge_shards(records_file, sorted((out / "shards").glob("records-*.csv")), plan.columns, plan.swept,
                 plan.order())
    rows = read_records(records_file)
    write_summary(rows, plan.swept, out)
    example_grids(out, plan.methods, plan.grid, {case.id: (case.source, case.target) for case in plan.cases})
    from . import plots

    if plots.available():
        for reason in plots.write_plots(rows, plan.swept, out)[1]:
            print(f"diffedit: note: {reason}", file=sys.stderr)
    else:
        print("diffedit: note: no plots: matplotlib is not installed (pip install -e \".[plots]\")", file=sys.stderr)
    if not quiet:
        print(f"diffedit: wrote {len(rows)} rows ({new_rows} new) to {records_file}, summary in "
              f"{out / 'summary.md'}", file=sys.stderr)


def distributed() -> tuple[int, int]:
    """(rank, world size) under torch's launcher (`torchrun --nproc-per-node K -m diffedit experiment ...`, which
    sets WORLD_SIZE, RANK and the rendezvous), joining its process group (gloo: CPU ranks too); (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def merge_shards(records_file: Path, shards: list[Path], columns: list[str], swept: list[str],
                 order: list[str]) -> None:
    """Rank 0: records.csv and every rank's shard (none in a one-process run), in the `order` of their keys,
    written whole (by rename); the shards are removed once merged."""
    rows = {row_key(r["edit"], r["method"], r["seed"], {k: r[k] for k in swept}): r
            for path in [records_file, *shards] for r in read_records(path, columns)}
    merged = [rows[key] for key in order if key in rows]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(merged)

    commit([Planned(records_file, "records", write)])
    for path in shards:
        path.unlink()
    folder = records_file.parent / "shards"
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _cell(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6g}"


# ---------------------------------------------------------------------------------------------------------------
# Summary


Z_975 = 1.959963984540054  # the normal distribution's 0.975 quantile


def t_975(df: int) -> float:
    """Student's t distribution's 0.975 quantile with `df` degrees of freedom (12.706 at 1, 2.228 at 10, 1.972 at
    199): below 200 by bisection on the closed form of P(|T| <= t) (Abramowitz & Stegun 26.7.3-4), from 200 on by
    its expansion around the normal quantile (26.7.5, within 1e-9 there). Torch- and scipy-free."""
    if df >= 200:
        z = Z_975
        g = [(z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96, (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
             (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160]
        return z + sum(gk / df ** (k + 1) for k, gk in enumerate(g))

    def within(t: float) -> float:  # P(|T| <= t)
        theta = math.atan(t / math.sqrt(df))
        c2 = math.cos(theta) ** 2
        if df % 2:  # 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2.4/(3.5) cos^4 + ...)), (df - 1) / 2 terms
            term, total = math.cos(theta), 0.0
            for j in range(1, (df - 1) // 2 + 1):
                total += term
                term *= c2 * 2 * j / (2 * j + 1)
            return 2 / math.pi * (theta + math.sin(theta) * total)
        term, total = 1.0, 0.0  # sin (1 + 1/2 cos^2 + 1.3/(2.4) cos^4 + ...), df / 2 terms
        for j in range(1, df // 2 + 1):
            total += term
            term *= c2 * (2 * j - 1) / (2 * j)
        return math.sin(theta) * total

    lo, hi = Z_975, 20.0  # t_975(1) = 12.706
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if within(mid) < 0.95 else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: list[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95% confidence interval t s / sqrt(n), n): s the sample standard deviation, t
    Student's 0.975 quantile with n - 1 degrees of freedom (`t_975`; the normal 1.96 would be too narrow for few
    rows: 6.5 times at n = 2, 3% at n = 40); NaN for n < 2."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = float(np.mean(values))
    half = t_975(n - 1) * float(np.std(values, ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return mean, half, n


def write_summary(rows: list[dict], swept: list[str], out: Path) -> None:
    """summary.csv and summary.md: per method x setting, each metric's mean and 95% CI over edits and seeds, and
    how many rows hold it (`n` counts the group's rows; a metric's empty cells, say an AUROC of a region that is
    empty, are left out of its mean and count: summary.csv's `METRIC_n`, summary.md's "(n=K)" where K < n);
    written together (all or none: a run that fails while writing them keeps the previous pair)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], *(r[k] for k in swept)), []).append(r)
    header = ["method", *swept, "n"] + [f"{m}{s}" for m in METRICS for s in ("", "_ci95", "_n")]
    lines = []
    for key, members in groups.items():
        cells = list(key) + [str(len(members))]
        for m in METRICS:
            mean, half, n = mean_ci([float(r[m]) for r in members if r.get(m) not in ("", None)])
            cells += [_cell(mean), _cell(half), str(n)]
        lines.append(cells)
    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([header, *lines])

    shown = ("mask_iou", "best_threshold_iou", "background_psnr_db", "background_ssim", "edit_success", "seconds")
    md = ["| method | " + " | ".join(swept) + (" | " if swept else "") + "n | " + " | ".join(shown) + " |",
          "| --- " * (len(swept) + 2 + len(shown)) + "|"]
    for key, members in groups.items():
        stats = []
        for m in shown:
            mean, half, n = mean_ci([float(r[m]) for r in members if r.get(m) not in ("", None)])
            stats.append("" if n == 0 else f"{mean:.3g}" + (f" ± {half:.2g}" if not math.isnan(half) else "")
                         + (f" (n={n})" if n < len(members) else ""))
        md.append("| " + " | ".join([*key, str(len(members)), *stats]) + " |")
    text = "Mean ± 95% confidence interval over edits and seeds.\n\n" + "\n".join(md) + "\n"
    commit([Planned(out / "summary.csv", "summary", write_csv),  # both or neither
            Planned(out / "summary.md", "summary", lambda tmp: Path(tmp).write_text(text))])


# ---------------------------------------------------------------------------------------------------------------
# Command


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="diffedit experiment", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder: config.json, records.csv, summary.csv, summary.md")
    p.add_argument("--edits", default="shapes", help="`shapes` (the held-out stream, with ground truth) or a .jsonl "
                                                     "manifest")
    p.add_argument("--n", "--num-edits", dest="n", type=EDIT_COUNT, default=40,
                   help="shapes edits (default 40; under torchrun write --num-edits: torchrun takes --n for its own)")
    p.add_argument("--edit-seed", type=SEED, default=0, help="which held-out draw of shapes edits (default 0)")
    p.add_argument("--methods", default="diffedit", help=f"comma-separated: {', '.join(METHOD_NAMES)}")
    p.add_argument("--sweep", type=parse_sweep, action="append", default=[], metavar="FIELD=V1,V2",
                   help="a DiffEditParams field and its values (repeatable: the grid is every combination)")
    p.add_argument("--param", type=parse_param, action="append", default=[], metavar="FIELD=V",
                   help="fix a DiffEditParams field for every row (repeatable)")
    p.add_argument("--preset", choices=tuple(PRESETS),
                   help="named settings over the model's defaults, under --param and --sweep (fast: README)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--model", help="model folder or hub repo id (default: the shipped model)")
    p.add_argument("--device", choices=DEVICES, default="cpu")
    p.add_argument("--max-pixels", type=COUNT, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse larger manifest pictures (default {DEFAULT_MAX_PIXELS}, 2048x2048)")
    p.add_argument("--batch-size", type=COUNT, default=1,
                   help="edits run together through the three steps, each with its own generator (default 1; 16 "
                        "took 0.75x the time per edit on one CPU thread)")
    add_compile_flag(p)
    p.add_argument("--resume", action="store_true", help="continue a run in --out: finished rows are kept")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary line")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    try:
        [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise BadInput(f"--seeds {args.seeds}: expected comma-separated ints") from None
    fields = [name for name, _ in args.param]
    if repeated(fields):
        raise BadInput(f"--param: {', '.join(repeated(fields))} given twice; fix each field once")
    return args


def main(argv: list[str] | None = None) -> int:
    """`diffedit experiment` under the command-line contract (`console.guarded`)."""
    argv = sys.argv[1:] if argv is None else argv

    def run() -> int | None:
        args = parse_args(argv)
        # interrupted once writing began, the Interrupted's message says what is kept (`console.guarded`)
        run_experiment(args.out, edits=args.edits, n=args.n, edit_seed=args.edit_seed,
                       methods=[m.strip() for m in args.methods.split(",") if m.strip()], sweep=args.sweep,
                       param=dict(args.param), preset=args.preset, seeds=[int(s) for s in args.seeds.split(",")],
                       model=args.model, device=args.device, batch_size=args.batch_size, resume=args.resume,
                       quiet=args.quiet, compile_mode=args.compile, max_pixels=args.max_pixels)

    return guarded(run, debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())

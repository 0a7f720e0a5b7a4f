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
from .console import COUNT, SEED, BadInput, Parser, add_compile_flag, guarded
from .evaluate import background_psnr, background_ssim, heldout_edits, iou, judge, mask_agreement, parse_param, psnr
from .image_tensors import latent_mask_to_image
from .locations import model_location
from .outputs import Planned, commit
from .params import PRESETS, DiffEditParams, with_preset
from .validation import FileError, one_line

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


def manifest_cases(path: Path) -> list[Case]:
    """A JSON-lines manifest: every line checked (fields, files, mask size) before any work."""
    from .image_files import read_image, read_mask

    cases, seen = [], set()
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ManifestError(f"manifest {path} holds no edits")
    for number, line in enumerate(lines, 1):
        where = f"manifest {path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not {"image", "source", "target"} <= set(row):
            raise ManifestError(f"{where}: expected an object with image, source and target")
        unknown = set(row) - {"image", "source", "target", "mask", "id"}
        if unknown or not all(isinstance(row[k], str) for k in row):
            raise ManifestError(f"{where}: unknown fields {sorted(unknown)}" if unknown else f"{where}: values must be "
                           "strings")
        image = read_image(path.parent / row["image"])
        truth = None
        if "mask" in row:
            truth = np.asarray(read_mask(path.parent / row["mask"], image.size)) > 0
        case_id = row.get("id", f"line-{number}")
        if case_id in seen:
            raise ManifestError(f"{where}: id {case_id!r} is used twice")
        seen.add(case_id)
        cases.append(Case(case_id, image, row["source"], row["target"], truth=truth))
    return cases


# ---------------------------------------------------------------------------------------------------------------
# The grid


def parse_sweep(text: str) -> tuple[str, list]:
    """FIELD=V1,V2,... with each value read as JSON when it parses, else as a string."""
    key, sep, values = text.partition("=")
    if not sep or not values:
        raise argparse.ArgumentTypeError(f"expected FIELD=V1,V2,..., got {text!r}")
    return key.strip(), [parse_param(f"{key}={v}")[1] for v in values.split(",")]


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
    """The best IoU any threshold on the continuous map reaches (the map nearest-upsampled to the image)."""
    return max(iou(scores >= t, truth) for t in np.unique(scores))


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
    return "__".join([method_name, *(f"{k}={v}" for k, v in setting.items())])


def example_grids(out: Path, methods: list[str], grid: list[dict]) -> list[Path]:
    """examples_METHOD.png: a row per kept edit, the input then the method's result under each setting (Pillow
    only, so there whether or not matplotlib is)."""
    from .figures import display_scale, strip, titled

    written = []
    folders = sorted((out / "examples").glob("*"), key=lambda p: (len(p.name), p.name))  # edit 2 before edit 10
    for method_name in methods:
        rows = []
        for folder in folders:
            labels = [", ".join(str(v) for v in s.values()) or method_name for s in grid]  # the names: the title
            files = [("input", folder / "input.png")] + [
                (label, folder / f"{example_name(method_name, s)}.png") for label, s in zip(labels, grid)]
            if not all(path.is_file() for _, path in files):
                continue
            pictures = [(label, Image.open(path).convert("RGB")) for label, path in files]
            scale = display_scale(pictures[0][1].height, 128, 256)
            size = (round(pictures[0][1].width * scale), round(pictures[0][1].height * scale))
            rows.append(strip([(f"{folder.name}: {label}" if label == "input" else label,
                                picture.resize(size, Image.NEAREST)) for label, picture in pictures], font_size=12))
        if rows:
            sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
            y = 0
            for row in rows:
                sheet.paste(row, (0, y))
                y += row.height
            fields = ", ".join(grid[0]) if grid and grid[0] else "the model's defaults"
            titled(sheet, f"{method_name}: the input, then one column per setting ({fields})").save(
                out / f"examples_{method_name}.png")
            written.append(out / f"examples_{method_name}.png")
    return written


def row_key(edit: str, method: str, seed: int | str, setting: dict) -> str:
    """A row's identity, the same whether built from a run's values or read back from records.csv's cells."""
    return json.dumps([edit, method, int(seed), {k: str(v) for k, v in setting.items()}], sort_keys=True)


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


def read_records(path: Path, columns: list[str] | None = None) -> list[dict]:
    """The rows of a records.csv written so far. A last line cut by an interruption is dropped from the file
    (rewritten whole, by rename), so that rows appended after it start on a line of their own."""
    if not path.is_file():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        commit([Planned(path, "records", lambda tmp: Path(tmp).write_text(text))])
    rows = list(csv.DictReader(text.splitlines()))
    if columns is not None and rows and list(rows[0]) != columns:
        raise BadInput(f"--resume: {path} has the columns {list(rows[0])}, this run writes {columns}")
    return rows


def run_experiment(out: str | Path, *, edits: str | Path = "shapes", n: int = 40, edit_seed: int = 0,
                   methods: list[str] | tuple[str, ...] = ("diffedit",), sweep: list[tuple[str, list]] = (),
                   param: dict | None = None, preset: str | None = None, seeds: list[int] | tuple[int, ...] = (0,),
                   model=None, device: str = "cpu", batch_size: int = 1, resume: bool = False,
                   quiet: bool = True, compile_mode: str | None = None) -> Path:
    """Run (or, with `resume`, continue) an experiment into the folder `out`; return the path of records.csv.

    edits: "shapes" (`n` edits of the held-out draw `edit_seed`) or a JSON-lines manifest; methods: names from
    `baselines.METHODS`; sweep: [(DiffEditParams field, [values])], every combination; param: fields fixed for every
    row; preset: None or a name in `params.PRESETS`, its fields under `param` and `sweep`; seeds: each row's
    generator is seeded by seed + the edit's index; batch_size: edits run together through the three steps (the
    same numbers as one at a time within ~1e-5; settings that keep the reference's batch-wide mask clamp or
    regularizer run one at a time); compile_mode: None, or torch.compile's mode for the UNet
    (`StableDiffusion.compile_unet`). Every check comes before any work; a bad value is a ValueError naming it."""
    from .api import check_params_for_model, pick_device
    from .stable_diffusion import StableDiffusion

    # Before any work: methods, edits, the grid, the model, the output folder
    methods = list(methods)
    unknown = sorted(set(methods) - set(METHOD_NAMES))
    if unknown or not methods:
        raise BadInput(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from "
                       f"{', '.join(METHOD_NAMES)}")
    if edits == "shapes":
        cases = shapes_cases(n, edit_seed)
    elif Path(edits).is_file():
        cases = manifest_cases(Path(edits))
    else:
        raise BadInput(f"--edits {edits}: give `shapes` or a .jsonl manifest that exists")
    if NEEDS_TRUTH & set(methods) and any(c.truth is None for c in cases):
        raise BadInput("--methods diffedit-gt-mask needs a ground-truth mask for every edit (a `mask` in each "
                       "manifest line)")
    fixed, sweep, seeds = dict(param or {}), list(sweep), list(seeds)
    swept = [name for name, _ in sweep]
    twice = sorted({f for f in swept if swept.count(f) > 1} | (set(swept) & set(fixed)))
    if twice:
        raise BadInput(f"--sweep / --param: {', '.join(twice)} given twice; sweep a field once, or fix it")
    try:  # the preset's fields under --param; a swept field is the sweep's
        fixed = {**{k: v for k, v in with_preset(preset, {}).items() if k not in swept}, **fixed}
    except (TypeError, ValueError) as e:
        raise BadInput(f"--{one_line(e)}") from None
    grid = settings_grid(sweep)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise BadInput(f"--seeds {','.join(map(str, seeds))}: seeds are ints >= 0")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BadInput(f"--batch-size {batch_size}: expected an int >= 1")
    location = model_location(model)
    from .params import read_edit_defaults

    local_defaults = read_edit_defaults(Path(location)) if isinstance(location, Path) else {}
    check_grid(fixed, grid, local_defaults)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file; give a folder")
    config = {"edits": str(edits), "n": n, "edit_seed": edit_seed, "methods": methods, "preset": preset,
              "param": fixed, "sweep": [[k, v] for k, v in sweep], "seeds": seeds, "model": str(location),
              "device": device, "batch_size": batch_size, "compile": compile_mode, "diffedit_version": __version__}
    config_file = out / "config.json"
    if config_file.is_file():
        if not resume:
            raise BadInput(f"{out} holds a run already: pass --resume to continue it, or choose another --out")
        before = {"preset": None, "compile": None, **json.loads(config_file.read_text())}  # runs from before both
        if {k: v for k, v in before.items() if k != "model_fingerprint"} != config:
            raise BadInput(f"--resume: {out} was run with other settings ({config_file}); choose another --out")
    try:
        torch_device, _ = pick_device(device, "float32")
    except ValueError as e:
        raise BadInput(f"--{e}") from None
    sd = StableDiffusion.from_pretrained(location, device=torch_device)
    if compile_mode is not None:
        sd.compile_unet(compile_mode)
    for setting in grid:
        try:
            check_params_for_model(sd, DiffEditParams.for_model(sd, **fixed, **setting))
        except (TypeError, ValueError) as e:
            raise BadInput(f"setting {setting or fixed}: {one_line(e)}") from None
    rank, world = distributed()  # after every check: joining the group waits for every rank's checks
    out.mkdir(parents=True, exist_ok=True)
    if sd.folder is not None:
        from .saved_inversion import fingerprint_of

        config["model_fingerprint"] = fingerprint_of(sd)
    if rank == 0:
        config_file.write_text(json.dumps(config, indent=2) + "\n")

    # The jobs not done yet (this rank's share of them); each job's rows appended and flushed when it finishes
    columns = ["edit", "kind", "method", "seed", *swept, *METRICS]
    records_file = out / "records.csv"
    shard_file = records_file if world == 1 else out / "shards" / f"records-{rank}.csv"
    shard_file.parent.mkdir(exist_ok=True)
    done = read_records(records_file, columns) + (read_records(shard_file, columns) if world > 1 else [])
    done_keys = {row_key(r["edit"], r["method"], r["seed"], {k: r[k] for k in swept}) for r in done}
    together = batch_size if all(batchable(DiffEditParams.for_model(sd, **fixed, **s)) for s in grid) else 1
    jobs = plan_jobs(cases, methods, seeds, together)

    def key(job: Job, case: Case, setting: dict) -> str:
        return row_key(case.id, job.method, job.seed, setting)

    order = [row_key(case.id, method, seed, setting)  # records.csv's order, whatever the batching
             for case in cases for seed in seeds for method in methods for setting in grid]
    todo = [job for job in shard(jobs, methods, rank, world)
            if any(key(job, case, setting) not in done_keys for _, case, setting in job_rows(job, grid))]
    from tqdm import tqdm

    fresh = not shard_file.is_file() or not shard_file.read_text()
    new_rows = 0
    with open(shard_file, "a", newline="") as f:  # the rows kept stay; new ones are appended, one flush per job
        writer = csv.DictWriter(f, fieldnames=columns)
        if fresh:
            writer.writeheader()
        bar = tqdm(total=sum(len(job_rows(job, grid)) for job in todo), desc="experiment", unit="row",
                   disable=quiet or not sys.stderr.isatty())
        for job in todo:
            results = run_job(sd, job, grid, fixed)
            for (i, case, setting), (metrics, picture) in zip(job_rows(job, grid), results):
                if key(job, case, setting) in done_keys:
                    continue  # kept from before the interruption
                if i < EXAMPLES and job.seed == seeds[0]:  # kept for the examples grid
                    folder = out / "examples" / case.id
                    folder.mkdir(parents=True, exist_ok=True)
                    case.image.save(folder / "input.png")
                    picture.save(folder / f"{example_name(job.method, setting)}.png")
                writer.writerow({"edit": case.id, "kind": case.kind, "method": job.method, "seed": job.seed,
                                 **setting, **{k: _cell(metrics.get(k)) for k in METRICS}})
                new_rows += 1
            f.flush()
            bar.update(len(results))
        bar.close()
    if world > 1:
        import torch.distributed as dist

        import torch

        counted = torch.tensor([new_rows])
        dist.all_reduce(counted)  # also waits until every shard is complete
        new_rows = int(counted)
        if rank != 0:
            return records_file
    # records.csv in edit, seed, method, setting order, whatever order the rows were written in (batches, ranks,
    # resumed runs)
    merge_shards(records_file, sorted((out / "shards").glob("records-*.csv")), columns, swept, order)
    rows = read_records(records_file)
    write_summary(rows, swept, out)
    example_grids(out, methods, grid)
    from . import plots

    if plots.available():
        plots.write_plots(rows, swept, out)
    else:
        print("diffedit: note: no plots: matplotlib is not installed (pip install -e \".[plots]\")", file=sys.stderr)
    if not quiet:
        print(f"diffedit: wrote {len(rows)} rows ({new_rows} new) to {records_file}, summary in "
              f"{out / 'summary.md'}", file=sys.stderr)
    return records_file


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


def mean_ci(values: list[float]) -> tuple[float, float, int]:
    """(mean, half-width of the normal 95% confidence interval 1.96 s / sqrt(n), n)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = float(np.mean(values))
    half = 1.96 * float(np.std(values, ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return mean, half, n


def write_summary(rows: list[dict], swept: list[str], out: Path) -> None:
    """summary.csv and summary.md: per method x setting, each metric's mean and 95% CI over edits and seeds;
    written together (all or none: a run that fails while writing them keeps the previous pair)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], *(r[k] for k in swept)), []).append(r)
    header = ["method", *swept, "n"] + [f"{m}{s}" for m in METRICS for s in ("", "_ci95")]
    lines = []
    for key, members in groups.items():
        cells = list(key) + [str(len(members))]
        for m in METRICS:
            mean, half, _ = mean_ci([float(r[m]) for r in members if r.get(m) not in ("", None)])
            cells += [_cell(mean), _cell(half)]
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
            stats.append("" if n == 0 else f"{mean:.3g}" + (f" ± {half:.2g}" if not math.isnan(half) else ""))
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
    p.add_argument("--n", "--num-edits", dest="n", type=COUNT, default=40,
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
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="cpu")
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
    return args


def main(argv: list[str] | None = None) -> int:
    """`diffedit experiment` under the command-line contract (`console.guarded`)."""
    argv = sys.argv[1:] if argv is None else argv

    def run() -> None:
        args = parse_args(argv)
        run_experiment(args.out, edits=args.edits, n=args.n, edit_seed=args.edit_seed,
                       methods=[m.strip() for m in args.methods.split(",") if m.strip()], sweep=args.sweep,
                       param=dict(args.param), preset=args.preset, seeds=[int(s) for s in args.seeds.split(",")],
                       model=args.model,
                       device=args.device, batch_size=args.batch_size, resume=args.resume, quiet=args.quiet,
                       compile_mode=args.compile)

    return guarded(run, debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())

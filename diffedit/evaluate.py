"""Score DiffEdit with a model on held-out shapes-world edits, against the goals of the shipped model.

A fixed set of edits (half colour, half shape; `shapes.sample_edit` with one generator per edit, so the first k
of a longer draw are the k-edit draw) comes from a seed stream that training never uses; each is run through
`diffedit.edit` at the model's defaults (plus any --param overrides) and judged against the exact ground truth the
world gives:

- mask IoU: the edit's mask against the ground-truth edit region (source object | target object); also recall,
  precision, and the ceiling a 16x16 latent mask can reach (best block threshold, per edit);
- colour-edit success: the result shows the target colour and keeps the shape; shape-edit success: the target
  shape with the colour kept; both judged by `shapes.classify` against the scene's background;
- background PSNR: result vs input, outside a 3-px ring around the ground-truth region;
- seconds per edit (median, on --threads CPU threads; the goal is for one core).

    python -m diffedit.evaluate                        # the shipped model, 100 edits, one CPU thread
    python -m diffedit.evaluate --model runs/shapes/shapes-sd --n 100 --json report.json --grid edits.png
    python -m diffedit.evaluate --param mask_thresholding_ratio=2.5 --param guidance_scale=4
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import shapes
from .console import DEVICES, EDIT_COUNT, SEED, THREADS, BadInput, Parser, add_compile_flag, guarded
from .locations import model_location
from .outputs import Planned, check_outputs, commit, image_format
from .params import PRESETS, DiffEditParams, with_preset
from .validation import one_line

# The held-out edits' generator is seeded by (EVAL_STREAM, seed); training draws from (seed, 1 or 2, step).
EVAL_STREAM = 0x5EED_E7A1
RING_PX = 3


@dataclass(frozen=True)
class Goal:
    metric: str
    op: str  # ">=" or "<="
    value: float
    aim: float | None = None

    def passed(self, x: float) -> bool:
        return x >= self.value if self.op == ">=" else x <= self.value


GOALS = (
    Goal("mask_iou", ">=", 0.55, aim=0.65),
    Goal("colour_edit_success", ">=", 0.95),
    Goal("shape_edit_success", ">=", 0.70),
    Goal("background_psnr_db", ">=", 35.0),
    Goal("seconds_per_edit", "<=", 3.0),
)


def heldout_edits(n: int = 100, seed: int = 0) -> list[shapes.Edit]:
    """The evaluation set: n edits alternating colour and shape, from a stream training never draws from. Edit i
    has its own generator (EVAL_STREAM, seed, i), so the stream is prefix-stable: the first k edits of
    `heldout_edits(n, seed)` are `heldout_edits(k, seed)` for every k <= n."""
    return [shapes.sample_edit(np.random.default_rng([EVAL_STREAM, seed, i]), "colour" if i % 2 == 0 else "shape")
            for i in range(n)]


# --------------------------------------------------------------------------------------------------- metrics


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(pred, truth).sum()
    return float(np.logical_and(pred, truth).sum() / union) if union else 1.0


def mask_agreement(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """A predicted mask against the truth, both (H, W) bool: IoU, recall (share of the truth found; 0 of an empty
    truth counts as 0 / 1) and precision (share of the prediction that is true; an empty prediction scores 0)."""
    inter = np.logical_and(pred, truth).sum()
    return {"iou": iou(pred, truth), "recall": float(inter / max(truth.sum(), 1)),
            "precision": float(inter / pred.sum()) if pred.sum() else 0.0}


def dilate(m: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a Euclidean disk of `radius` pixels."""
    out = m.copy()
    h, w = m.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius:
                shifted = np.zeros_like(m)
                shifted[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
                    m[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
                out |= shifted
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB, peak 255) between two uint8 arrays of pixels; 100 when they are equal."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 100.0 if mse == 0 else float(10 * math.log10(255.0**2 / mse))


def background_psnr(result: np.ndarray, source: np.ndarray, region: np.ndarray, ring: int = RING_PX) -> float:
    """PSNR (dB, peak 255) between two uint8 images over the pixels farther than `ring` px from `region`."""
    keep = ~dilate(region, ring)
    return psnr(result[keep], source[keep])


SSIM_SIGMA = 1.5  # Wang et al. 2004's Gaussian window: sigma 1.5 px, cut at 3.5 sigma (11 taps)


def ssim_map(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> np.ndarray:
    """SSIM at every pixel (Wang, Bovik, Sheikh, Simoncelli, "Image quality assessment: from error visibility to
    structural similarity", 2004, eq. 13) between two (H, W, C) images, averaged over the channels: local means,
    variances and covariance under the Gaussian window (the picture mirrored at its borders, edge pixel repeated),
    C1 = (0.01 peak)^2, C2 = (0.03 peak)^2. 1 where the two agree. In float64."""
    radius = int(3.5 * SSIM_SIGMA + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / SSIM_SIGMA) ** 2)
    taps /= taps.sum()

    def smooth(x: np.ndarray) -> np.ndarray:  # separable Gaussian filter of (H, W, C)
        x = np.pad(x, ((radius, radius), (radius, radius), (0, 0)), mode="symmetric")
        x = sum(w * x[k : k + x.shape[0] - 2 * radius] for k, w in enumerate(taps))  # along H
        return sum(w * x[:, k : k + x.shape[1] - 2 * radius] for k, w in enumerate(taps))  # along W

    x, y = a.astype(np.float64), b.astype(np.float64)
    mx, my = smooth(x), smooth(y)
    vx, vy, cxy = smooth(x * x) - mx * mx, smooth(y * y) - my * my, smooth(x * y) - mx * my
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))  # (H, W, C)
    return s.mean(axis=2)


def background_ssim(result: np.ndarray, source: np.ndarray, region: np.ndarray, ring: int = RING_PX) -> float:
    """Mean SSIM between two (H, W, 3) images over the pixels farther than `ring` px from `region` (each pixel's
    window still sees up to 5 px around it, so pixels next to the ring feel the edit)."""
    keep = ~dilate(region, ring)
    return float(ssim_map(result, source)[keep].mean()) if keep.any() else float("nan")


def latent_mask_ceiling(region: np.ndarray, factor: int) -> float:
    """The best IoU a mask of (H/factor, W/factor) blocks, upsampled, can reach against `region`: the best
    threshold on each block's covered fraction."""
    h, w = region.shape
    frac = region.reshape(h // factor, factor, w // factor, factor).mean((1, 3))
    best = 0.0
    for thr in np.unique(frac[frac > 0]):
        pred = np.kron(frac >= thr, np.ones((factor, factor), dtype=bool))
        best = max(best, iou(pred, region))
    return best


def judge(edit: shapes.Edit, result: np.ndarray) -> tuple[bool, shapes.Classification]:
    """Success: the attribute that was edited has the target's value, the other keeps the source's."""
    c = shapes.classify(result, shapes.render_background(edit.source))
    return (c.colour == edit.target.colour and c.shape == edit.target.shape), c


# --------------------------------------------------------------------------------------------------- run


def score_edits(model, edits: list[shapes.Edit], seed: int, params: dict, progress: bool = True) -> list[dict]:
    """Edit each source render into its target caption; one record of metrics per edit."""
    from tqdm import tqdm

    from .api import edit as diffedit_edit

    records = []
    for i, e in enumerate(tqdm(edits, desc="edits", disable=not progress, mininterval=5.0)):
        source, _ = shapes.render(e.source)
        region = e.region
        start = time.perf_counter()
        out = diffedit_edit(Image.fromarray(source), e.source.caption, e.target.caption, model=model,
                            seed=seed + i, **params)
        seconds = time.perf_counter() - start
        result = np.asarray(out.image.convert("RGB").resize(source.shape[1::-1], Image.LANCZOS))
        pred = np.asarray(out.mask.convert("L").resize(source.shape[1::-1], Image.NEAREST)) > 127
        ok, c = judge(e, result)
        agreement = mask_agreement(pred, region)
        records.append({
            "index": i, "kind": e.kind, "source": e.source.caption, "target": e.target.caption,
            "iou": agreement["iou"], "recall": agreement["recall"], "precision": agreement["precision"],
            "ceiling": latent_mask_ceiling(region, source.shape[0] // out.latent_mask.shape[0]),
            "success": bool(ok), "judged_colour": c.colour, "judged_shape": c.shape,
            "fill_ratio": round(c.fill_ratio, 4), "background_psnr_db": background_psnr(result, source, region),
            "seconds": seconds, "_images": (source, region, pred, result)})
    return records


def summarize(records: list[dict]) -> dict:
    def mean(key, kind=None):
        values = [r[key] for r in records if kind is None or r["kind"] == kind]
        return float(np.mean(values)) if values else float("nan")

    times = [r["seconds"] for r in records]
    return {
        "n": len(records), "mask_iou": mean("iou"), "mask_recall": mean("recall"),
        "mask_precision": mean("precision"), "mask_iou_ceiling": mean("ceiling"),
        "colour_edit_success": mean("success", "colour"), "shape_edit_success": mean("success", "shape"),
        "background_psnr_db": mean("background_psnr_db"),
        "background_psnr_db_min": float(min(r["background_psnr_db"] for r in records)),
        "seconds_per_edit": statistics.median(times[1:] if len(times) > 1 else times),  # first one warms up
    }


NO_EDITS = "no edits of this kind"  # the verdict of a goal with nothing to measure: neither PASS nor FAIL


def report_lines(summary: dict, timing_applies: bool) -> list[tuple[str, str, str, str]]:
    """(metric, value, goal, verdict) rows. A goal whose metric has no value (NaN: a success rate of a kind of edit
    the set holds none of, with --n 1) is neither passed nor failed: its value is "-", its verdict NO_EDITS."""
    rows = []
    for g in GOALS:
        x = summary[g.metric]
        goal = f"{g.op} {g.value:g}" + (f" (aim {g.aim:g})" if g.aim is not None else "")
        if math.isnan(x):
            rows.append((g.metric, "-", goal, NO_EDITS))
            continue
        verdict = ("PASS" if g.passed(x) else "FAIL") if (g.metric != "seconds_per_edit" or timing_applies) else "n/a"
        rows.append((g.metric, f"{x:.3f}", goal, verdict))
    for key in ("mask_recall", "mask_precision", "mask_iou_ceiling", "background_psnr_db_min"):
        rows.append((key, f"{summary[key]:.3f}", "", "info"))
    return rows


def save_grid(records: list[dict], path: Path, count: int = 16, zoom: int = 2, fmt: str | None = None) -> None:
    """One row per edit under its texts: input | ground-truth region | predicted mask (with its IoU) | result (with
    the judge's verdict), each panel labelled (in Pillow format `fmt`, or as the path's extension says)."""
    from .figures import stacked, strip, titled_to_fit

    rows = []
    for r in records[:count]:
        source, region, pred, result = r["_images"]
        panel = lambda a: Image.fromarray(a).resize((a.shape[1] * zoom, a.shape[0] * zoom), Image.NEAREST)
        as_rgb = lambda m: np.repeat((m * 255).astype(np.uint8)[:, :, None], 3, axis=2)
        row = strip([("input", panel(source)), ("true region", panel(as_rgb(region))),
                     (f"mask, IoU {r['iou']:.2f}", panel(as_rgb(pred))),
                     (f"result: {'pass' if r['success'] else 'FAIL'}", panel(result))], font_size=12)
        rows.append(titled_to_fit(row, f"{r['index']} ({r['kind']}): \"{r['source']}\" -> \"{r['target']}\"",
                                  font_size=12, gap=6))
    stacked(rows).save(path, format=fmt)


def parse_param(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as JSON when it parses (numbers, true/false, null), else as a string; a KEY that
    is empty (`=3`) is refused."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    if not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} has no parameter name before '=': give KEY=VALUE with KEY a "
                                         "DiffEditParams field, e.g. guidance_scale=4")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def json_safe(value):
    """`value` with every NaN or infinite float as None, so that it is valid JSON (null); dicts and lists through."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="diffedit evaluate", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder or hub repo id (default: the model shipped with the package)")
    p.add_argument("--n", type=EDIT_COUNT, default=100, help="number of edits, half colour, half shape (default 100)")
    p.add_argument("--seed", type=SEED, default=0, help="held-out set and edit seeds (default 0)")
    p.add_argument("--preset", choices=tuple(PRESETS),
                   help="named settings over the model's defaults, under --param (fast: README, The fast preset)")
    p.add_argument("--param", type=parse_param, action="append", default=[], metavar="KEY=VALUE",
                   help="override a DiffEditParams field (repeatable)")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where the edits run (default cpu, the timing goal's device; auto: cuda, then mps, then cpu)")
    p.add_argument("--threads", type=THREADS, default=1, help="torch CPU threads (default 1: the timing goal's setting)")
    add_compile_flag(p)
    p.add_argument("--json", type=Path, help="write the summary and per-edit records here")
    p.add_argument("--grid", type=Path, help="write a PNG of the first 16 edits (source, truth, mask, result)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    fields = [name for name, _ in args.param]
    twice = sorted({name for name in fields if fields.count(name) > 1})
    if twice:
        raise BadInput(f"--param: {', '.join(twice)} given twice; give each field once")
    check_seed_stream(args.seed, args.n, "--seed", "--n")
    return args


SEED_MAX = 2**63 - 1  # the largest seed `diffedit.edit` takes


def check_seed_stream(seed: int, n: int, seed_flag: str, n_flag: str, most: int = SEED_MAX) -> None:
    """Edit i of n runs at seed + i, so the last edit's seed, seed + n - 1, must be at most `most`; else a
    BadInput naming both flags and the largest seed that fits."""
    if seed + n - 1 > most:
        raise BadInput(f"{seed_flag} {seed} with {n_flag} {n}: edit i runs at seed + i, and the last one's seed "
                       f"{seed + n - 1} is over {most}; give {seed_flag} at most {most - n + 1} or a smaller {n_flag}")


def refuse_lora_scale(fields, where: str, command: str) -> None:
    """`lora_scale` among `fields`: refused, since `command` loads no LoRA (it has no --lora flag) and the scale
    could not act, as `edit --lora-scale` without --lora is refused."""
    if "lora_scale" in fields:
        raise BadInput(f"{where} lora_scale: {command} loads no LoRA (it has no --lora), so lora_scale could not act; "
                       "drop it (or run `diffedit edit --lora FILE --lora-scale S`)")


def stored_defaults(folder: Path | None, defaults: dict) -> dict:
    """A model's stored edit defaults (its diffedit.json, read from `folder`), checked on their own: an invalid one
    is a BadInput naming the file, not the flags layered over it."""
    from .params import EDIT_DEFAULTS_FILE

    try:
        DiffEditParams().updated(dict(defaults))
    except (TypeError, ValueError) as e:
        where = f"{Path(folder) / EDIT_DEFAULTS_FILE}" if folder is not None else f"the model's {EDIT_DEFAULTS_FILE}"
        raise BadInput(f"{where}: the model's stored edit defaults are invalid ({one_line(e)}); fix or remove the "
                       "file") from None
    return defaults


def model_files(location: Path | str) -> list[tuple[str, Path]]:
    """What no output may overwrite (`outputs.check_protected`): a local model folder (every file in it) or
    single file; nothing yet for a hub repo id (its cache folder is checked once it is loaded)."""
    return [("model", location)] if isinstance(location, Path) else []


def evaluate(args: argparse.Namespace) -> int:
    """The command: every argument and output location checked before the model loads and the edits run; the
    report printed; 0 when every goal is met, 1 when one is not."""
    from .api import check_params_for_model, pick_device
    from .params import layered, read_edit_defaults
    from .stable_diffusion import StableDiffusion

    # Before any work: parameters, outputs, model location, device
    refuse_lora_scale(dict(args.param), "--param", "diffedit evaluate")
    folder = model_location(args.model)
    local = isinstance(folder, Path) and folder.is_dir()
    defaults = stored_defaults(folder, read_edit_defaults(folder)) if local else {}
    try:
        params = with_preset(args.preset, dict(args.param))
        layered(defaults, params)
    except (TypeError, ValueError) as e:
        raise BadInput(f"--param: {one_line(e)}") from None
    planned = ([Planned(args.json, "--json")] if args.json else []) + \
        ([Planned(args.grid, "--grid")] if args.grid else [])
    check_outputs(planned, {}, protected=model_files(folder))
    grid_format = image_format(args.grid, "--grid") if args.grid else None
    try:
        device, _ = pick_device(args.device, "float32")
    except ValueError as e:
        raise BadInput(f"--{e}") from None
    torch.set_num_threads(args.threads)
    model = StableDiffusion.from_pretrained(folder, device=device)
    if not local and model.folder is not None:  # a hub model's cache folder, known once it is fetched
        check_outputs(planned, {}, protected=model_files(model.folder))
        stored_defaults(model.folder, model.edit_defaults)
    if args.compile:
        model.compile_unet(args.compile)
    try:
        check_params_for_model(model, DiffEditParams.for_model(model, **params))
    except (TypeError, ValueError) as e:
        raise BadInput(f"--param: {one_line(e)}") from None
    # The edits
    edits = heldout_edits(args.n, args.seed)
    records = score_edits(model, edits, args.seed, params, progress=not args.quiet)
    summary = summarize(records)
    timing_applies = device.type == "cpu" and args.threads == 1

    print(f"model {folder}, {len(edits)} held-out edits (seed {args.seed}), defaults {model.edit_defaults}"
          + (f", preset {args.preset}" if args.preset else "") + (f", overrides {params}" if params else ""))
    rows = report_lines(summary, timing_applies)
    width = max(len(r[0]) for r in rows)
    for metric, value, goal, verdict in rows:
        print(f"{metric:<{width}}  {value:>8}  {goal:<18}  {verdict}")
    verdicts = [r[3] for r in rows if r[3] in ("PASS", "FAIL")]
    print("all goals met" if all(v == "PASS" for v in verdicts) else
          f"{verdicts.count('FAIL')} goal(s) not met")
    report = json.dumps(json_safe({
        "model": str(folder), "seed": args.seed, "preset": args.preset, "params": {**model.edit_defaults, **params},
        "device": device.type, "threads": args.threads, "summary": summary,
        "goals": [{"metric": m, "value": summary[m], "goal": g, "verdict": x} for m, _, g, x in rows],
        "edits": [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]}), indent=1,
        allow_nan=False) + "\n"
    writers = {"--json": lambda tmp: Path(tmp).write_text(report),
               "--grid": lambda tmp: save_grid(records, tmp, fmt=grid_format)}
    commit([Planned(p.path, p.what, writers[p.what]) for p in planned])
    return 0 if all(v == "PASS" for v in verdicts) else 1


def main(argv: list[str] | None = None) -> int:
    """`diffedit evaluate` under the command-line contract (`console.guarded`): bad input is one line, exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    threads = torch.get_num_threads()  # the run sets --threads; a caller in this process gets its own count back
    try:
        return guarded(lambda: evaluate(parse_args(argv)), debug="--debug" in argv)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())

"""Plots of an experiment's records (`diffedit experiment` writes them into OUT/plots/): the paper's trade-off
curve and the mask ablations. matplotlib is an optional extra (`pip install -e ".[plots]"`); without it the
experiment writes everything else and says how to get these.

- `tradeoff.png` (when `inpaint_strength` is swept): for each method, mean edit success against mean background
  PSNR, one point per encoding ratio r (its marker), joined in r's order (Couairon et al., arXiv 2210.11427,
  Fig. 4's shape: the further up and right, the better).
- `mask_iou_vs_{field}.png` (when a mask field is swept: the thresholding ratio, the number of maps, the mask
  noise): DiffEdit's mean mask IoU with its 95% confidence interval against the field, one line per value of the
  other swept fields (e.g. the thresholding rule), and the best-threshold IoU of the same maps dashed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # one per encoding ratio in the trade-off plot
MASK_FIELDS = ("mask_thresholding_ratio", "num_maps_per_mask", "mask_encode_strength", "mask_guidance_scale")
LABELS = {"mask_thresholding_ratio": "thresholding ratio (clamp at ratio x mean)",
          "num_maps_per_mask": "noise draws averaged per map (n)", "mask_encode_strength": "mask noise level",
          "mask_guidance_scale": "guidance scale of the mask step"}


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _mean_ci(rows: list[dict], metric: str) -> tuple[float, float] | None:
    from .experiment import mean_ci

    mean, half, n = mean_ci([float(r[metric]) for r in rows if r.get(metric) not in ("", None)])
    return None if n == 0 else (mean, 0.0 if half != half else half)


def tradeoff(rows: list[dict], path: Path) -> bool:
    """The trade-off curve; False (nothing written) when the records lack what it needs."""
    import matplotlib.pyplot as plt

    ratios = sorted({float(r["inpaint_strength"]) for r in rows})
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    drawn = False
    for method in sorted({r["method"] for r in rows}):
        points = []
        for ratio in ratios:
            members = [r for r in rows if r["method"] == method and float(r["inpaint_strength"]) == ratio]
            success, psnr = _mean_ci(members, "edit_success"), _mean_ci(members, "background_psnr_db")
            if success and psnr:
                points.append((ratio, success[0], psnr[0], psnr[1]))
        if not points:
            continue
        drawn = True
        colour = ax.errorbar([p[1] for p in points], [p[2] for p in points], yerr=[p[3] for p in points],
                             capsize=3, label=method)[0].get_color()
        for ratio, x, y, _ in points:  # the marker tells r (a legend of its own): no labels to collide
            ax.plot([x], [y], linestyle="none", marker=MARKERS[ratios.index(ratio) % len(MARKERS)], markersize=7,
                    color=colour)
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("edit success (share of edits the shapes judge accepts)")
    ax.set_ylabel("background PSNR outside the 3-px ring (dB)")
    ax.set_title("Edit success against background preservation\n(one point per encoding ratio r; bars: 95% CI)",
                 fontsize=11)
    ax.grid(alpha=0.3)
    methods = ax.legend(title="method", loc="lower left")
    ax.add_artist(methods)
    ax.legend(handles=[plt.Line2D([], [], linestyle="none", marker=MARKERS[k % len(MARKERS)], color="gray",
                                  label=f"{ratio:g}") for k, ratio in enumerate(ratios)],
              title="encoding ratio r", loc="lower center")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def mask_iou_vs(rows: list[dict], field: str, others: list[str], path: Path) -> bool:
    """DiffEdit's mask IoU against a swept mask field; False when there is no DiffEdit row with ground truth."""
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["method"] == "diffedit" and r.get("mask_iou") not in ("", None)]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    groups = sorted({tuple(r[o] for o in others) for r in rows})
    for group in groups:
        members = [r for r in rows if tuple(r[o] for o in others) == group]
        xs = sorted({float(r[field]) for r in members})
        label = ", ".join(f"{o}={v}" for o, v in zip(others, group)) or "DiffEdit"
        iou = [_mean_ci([r for r in members if float(r[field]) == x], "mask_iou") for x in xs]
        line = ax.errorbar(xs, [m for m, _ in iou], yerr=[h for _, h in iou], marker="o", capsize=3, label=label)
        best = [_mean_ci([r for r in members if float(r[field]) == x], "best_threshold_iou") for x in xs]
        if all(best):
            ax.plot(xs, [m for m, _ in best], linestyle="--", color=line[0].get_color(), alpha=0.6,
                    label=f"{label}: best threshold")
    ax.set_xlabel(LABELS.get(field, field))
    ax.set_ylabel("mask IoU against the ground-truth region")
    ax.set_title(f"DiffEdit's mask against the {LABELS.get(field, field).split(' (')[0]}\n(mean; bars: 95% CI)",
                 fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_plots(rows: list[dict], swept: list[str], out: Path) -> tuple[list[Path], list[str]]:
    """Every plot the records support, into out/plots/ (left out when there is none): the paths written, and a
    line for each plot the sweep asks for but the records cannot give, saying why."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    folder = out / "plots"
    existed = folder.is_dir()
    folder.mkdir(exist_ok=True)
    written, skipped = [], []
    if "inpaint_strength" in swept:
        if tradeoff(rows, folder / "tradeoff.png"):
            written.append(folder / "tradeoff.png")
        else:
            skipped.append("no plots/tradeoff.png: no row has both an edit success and a background PSNR (they need "
                           "the shapes judge and a ground-truth region: run --edits shapes)")
    for field in (f for f in swept if f in MASK_FIELDS):
        path = folder / f"mask_iou_vs_{field}.png"
        if mask_iou_vs(rows, field, [o for o in swept if o != field], path):
            written.append(path)
        else:
            skipped.append(f"no plots/{path.name}: no diffedit row has a mask IoU (it needs --methods diffedit and a "
                           "ground-truth region for the edits: a `mask` in each manifest line, or --edits shapes)")
    if not existed and not any(folder.iterdir()):
        folder.rmdir()
    return written, skipped

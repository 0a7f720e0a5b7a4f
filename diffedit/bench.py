"""`diffedit bench`: the default edit (mask, invert, decode) with ours and with diffusers' deprecated
`StableDiffusionDiffEditPipeline`, on the same weights, inputs and seed, in one process, measured side by side.

    diffedit bench                                  # the shipped model at diffusers' defaults, one CPU thread
    diffedit bench --config sd15 --device cuda --dtype float16 --runs 5 --json bench.json
    diffedit bench --model FOLDER_OR_REPO --device cuda --dtype float16 --batch-size 16
    diffedit bench --config sd15 --device cuda --dtype float16 --size 2048 --vae-tiling --steps 10 --runs 1

Ours is the diffusers-compatible facade (`StableDiffusionDiffEdit`, every correction off), called exactly as the
reference is called, so both do the same work and their outputs must agree (mask, inverted latents, picture; the
facade's parity tolerances). After a warm-up of each, the runs alternate (ours, reference, ours, ...), and each
stage is timed after the device has finished its work. Printed per stage: the median and the min-max of the runs,
and the median of the per-run ratios ours / reference; the peak memory (CUDA: max allocated per side; CPU: the
process's max RSS, which the two sides share); the achieved TFLOP/s (each side's FLOPs for one edit as torch's
FlopCounterMode counts them, over its median total time).

The reference is diffusers, imported here and nowhere else in the package, and only when it is installed and not
turned off (`--no-reference`): this command exists to measure against it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from .console import COUNT, DEVICES, THREADS, BadInput, Parser, add_compile_flag, guarded
from .locations import model_location
from .outputs import Planned, check_outputs, commit

STAGES = ("mask", "invert", "decode")
SOURCE, TARGET = "a red circle on a white background", "a blue square on a white background"
MASK_AGREEMENT = 0.99  # share of mask cells that must agree (tests/test_facade.py's MASK_TOL)
LATENT_TOL = 1e-3  # relative Frobenius error of the inverted latents (tests/test_facade.py)
IMAGE_TOL = 5e-3  # max abs error of the picture in [0, 1] (tests/test_facade.py)


@dataclass(frozen=True)
class Settings:
    """diffusers' defaults for the three calls (the paper's numbers: 10 maps at 0.5, r 0.8, 50 steps, 7.5)."""

    num_inference_steps: int = 50
    inpaint_strength: float = 0.8
    num_maps_per_mask: int = 10
    mask_encode_strength: float = 0.5
    guidance_scale: float = 7.5
    batch_size: int = 1


def reference_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("diffusers") is not None


def load_reference(folder: Path, device, dtype):
    """diffusers' pipeline on the same folder, with the DDIM schedulers the DiffEdit docs use."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its notices are not the measurement
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")
    from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionDiffEditPipeline

    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    pipe = StableDiffusionDiffEditPipeline.from_pretrained(
        folder, scheduler=scheduler, inverse_scheduler=DDIMInverseScheduler.from_config(scheduler.config),
        safety_checker=None, requires_safety_checker=False, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def one_edit(pipe, image, s: Settings, seed: int, device) -> tuple[dict, dict]:
    """The three calls as diffusers' DiffEdit docs make them; (stage seconds, outputs)."""
    import torch

    from .timing import timed

    times: dict[str, float] = {}
    source, target = [SOURCE] * s.batch_size, [TARGET] * s.batch_size
    images = [image] * s.batch_size
    generator = torch.Generator().manual_seed(seed)
    with timed(times, "mask", device):
        mask = pipe.generate_mask(image=images, source_prompt=source, target_prompt=target,
                                  num_maps_per_mask=s.num_maps_per_mask, mask_encode_strength=s.mask_encode_strength,
                                  num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                                  generator=generator)
    with timed(times, "invert", device):
        latents = pipe.invert(prompt=source, image=images, num_inference_steps=s.num_inference_steps,
                              inpaint_strength=s.inpaint_strength, guidance_scale=s.guidance_scale,
                              generator=generator).latents
    with timed(times, "decode", device):
        picture = decode_call(pipe, mask, latents, s, generator)
    times["total"] = round(sum(times[k] for k in STAGES), 4)
    return times, {"mask": mask, "latents": latents, "picture": picture}


def decode_call(pipe, mask, latents, s: Settings, generator):
    """The third call, `__call__`, as diffusers' docs make it; the picture as a numpy array in [0, 1]."""
    return pipe(prompt=[TARGET] * s.batch_size, mask_image=mask, image_latents=latents,
                inpaint_strength=s.inpaint_strength, num_inference_steps=s.num_inference_steps,
                guidance_scale=s.guidance_scale, generator=generator, output_type="np").images


def agreement(ours: dict, theirs: dict) -> dict:
    """Masks (share of equal cells) and inverted latents (relative error) as each side made them; the picture as
    ours decodes the reference's own mask and latents (`ours["picture"]`, see `run_bench`), so that a mask cell at
    the threshold, which the mask tolerance allows to differ, does not count twice."""
    import numpy as np
    import torch

    def array(x):
        return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)

    mask = float((array(ours["mask"]) == array(theirs["mask"])).mean())
    a, b = array(ours["latents"]).reshape(-1), array(theirs["latents"]).reshape(-1)
    latents = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))
    picture = float(np.abs(array(ours["picture"]) - array(theirs["picture"])).max())
    return {"mask_agreement": mask, "latent_relative_error": latents, "picture_max_abs_error": picture,
            "agree": mask >= MASK_AGREEMENT and latents <= LATENT_TOL and picture <= IMAGE_TOL}


def flop_count(pipe, image, s: Settings, device) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        one_edit(pipe, image, s, 0, device)
    return counter.get_total_flops()


def summarize(runs: list[dict]) -> dict:
    out = {}
    for stage in (*STAGES, "total"):
        values = [r[stage] for r in runs]
        out[stage] = {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values)}
    return out


def run_bench(model=None, *, config: str | None = None, device: str = "cpu", dtype: str = "float32", runs: int = 3,
              threads: int | None = 1, settings: Settings = Settings(), reference: bool = True, seed: int = 0,
              compile_unet: bool = False, compile_mode: str = "default", size: int | None = None,
              vae_tiling: bool = False) -> dict:
    """Measure ours (and the reference, when installed and asked for) and return the report as a dict. `config`
    (sd15, sd21, shapes, tiny: `random_models.PRESETS`) measures random weights in that shape instead of `model`.
    `size`: the picture's side in pixels (default: the model's sample size); `vae_tiling`: both sides' VAEs tile
    (`enable_vae_tiling`); `compile_mode`: torch.compile's mode for both UNets when `compile_unet`."""
    import tempfile

    import torch
    from PIL import Image

    from .api import check_params_for_model, pick_device
    from .facade import StableDiffusionDiffEdit
    from .locations import EXAMPLE_IMAGE
    from .params import DiffEditParams
    from .random_models import PRESETS, write_random_model
    from .shipped_model import SCHEDULER_CONFIG
    from .stable_diffusion import resolve_model_folder

    try:  # before anything is written or loaded
        torch_device, torch_dtype = pick_device(device, dtype)
    except ValueError as e:
        raise BadInput(f"--{e}") from None
    if config is not None:
        if model is not None:
            raise BadInput("--model and --config: give one (a folder to measure, or a shape to fill at random)")
        if config not in PRESETS:
            raise BadInput(f"--config {config}: choose from {', '.join(PRESETS)}")
        # what can be checked on the preset's configs, before its weights are written (6 GB for sd15)
        check_size(size, 2 ** (len(PRESETS[config].vae["block_out_channels"]) - 1))
        check_steps(settings.num_inference_steps, SCHEDULER_CONFIG["num_train_timesteps"])
        with tempfile.TemporaryDirectory(prefix=f"diffedit-bench-{config}-") as folder:
            write_random_model(config, Path(folder))
            report = run_bench(folder, device=device, dtype=dtype, runs=runs, threads=threads, settings=settings,
                               reference=reference, seed=seed, compile_unet=compile_unet, compile_mode=compile_mode,
                               size=size, vae_tiling=vae_tiling)
        return {**report, "model": f"random weights, {config} shapes"}
    if threads is not None:
        torch.set_num_threads(threads)
    location = model_location(model)
    if isinstance(location, Path) and location.is_file():
        raise BadInput(f"--model {model} is a single-file checkpoint; bench measures a diffusers model folder (the "
                       "reference loads folders): give the folder, or --config for official shapes")
    folder = resolve_model_folder(location)
    ours = StableDiffusionDiffEdit.from_pretrained(folder, device=torch_device, dtype=torch_dtype)
    ours.set_progress_bar_config(disable=True)  # as the reference's: bars would be timed and clutter the table
    try:  # before any timed work: the settings run on this model's schedule
        check_params_for_model(ours.model, DiffEditParams.reference(
            num_inference_steps=settings.num_inference_steps, inpaint_strength=settings.inpaint_strength,
            mask_encode_strength=settings.mask_encode_strength, num_maps_per_mask=settings.num_maps_per_mask))
    except ValueError as e:
        raise BadInput(f"--steps {settings.num_inference_steps}: {e}") from None
    check_size(size, ours.vae_scale_factor)
    size = size or ours.model.unet.config.sample_size * ours.vae_scale_factor
    image = Image.open(EXAMPLE_IMAGE).convert("RGB").resize((size, size), Image.BICUBIC)
    sides = {"ours": ours}
    if reference and reference_available():
        sides["diffusers"] = load_reference(folder, torch_device, torch_dtype)
    if vae_tiling:  # ours through the facade, diffusers on its VAE (its pipeline-level switch is deprecated)
        ours.enable_vae_tiling()
        if "diffusers" in sides:
            sides["diffusers"].vae.enable_tiling()
    if compile_unet:  # both UNets in the same mode (ours as users compile it); the warm-up pays the compilation
        ours.model.compile_unet(compile_mode)
        if "diffusers" in sides:
            sides["diffusers"].unet = torch.compile(sides["diffusers"].unet, mode=compile_mode)
    for pipe in sides.values():  # warm-up
        one_edit(pipe, image, settings, seed, torch_device)
    times: dict[str, list[dict]] = {name: [] for name in sides}
    outputs, peaks = {}, {}
    for _ in range(runs):
        for name, pipe in sides.items():
            if torch_device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(torch_device)
            t, outputs[name] = one_edit(pipe, image, settings, seed, torch_device)
            times[name].append(t)
            if torch_device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated(torch_device))
    report = {"model": str(folder), "device": str(torch_device), "dtype": dtype, "threads": torch.get_num_threads(),
              "runs": runs, "settings": settings.__dict__, "torch": torch.__version__, "compiled": compile_unet,
              "compile_mode": compile_mode if compile_unet else None, "size": size, "vae_tiling": vae_tiling,
              "sides": {}}
    for name, pipe in sides.items():
        summary, batch_tflop = summarize(times[name]), flop_count(pipe, image, settings, torch_device) / 1e12
        report["sides"][name] = {  # the FLOPs are counted over one call, a whole batch
            "stages": summary, "edit_tflop": batch_tflop / settings.batch_size,
            "achieved_tflops": batch_tflop / summary["total"]["median_s"],
            "seconds_per_edit": summary["total"]["median_s"] / settings.batch_size,
            "peak_memory_mib": (peaks[name] / 2**20 if name in peaks else None)}
    if torch_device.type != "cuda":
        report["process_max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if "diffusers" in sides:
        import diffusers

        report["diffusers"] = diffusers.__version__
        report["ratio"] = {stage: statistics.median(o[stage] / d[stage] for o, d in zip(times["ours"],
                                                                                       times["diffusers"]))
                           for stage in (*STAGES, "total")}
        ref = outputs["diffusers"]
        same_inputs = decode_call(sides["ours"], ref["mask"], ref["latents"], settings,
                                  torch.Generator().manual_seed(seed))
        report["agreement"] = agreement({**outputs["ours"], "picture": same_inputs}, ref)
    return report


# The largest --size: 8192x8192 pixels, 16 times the 2048x2048 tiling check; past it the picture alone is gigabytes.
MAX_SIZE = 8192


def check_size(size: int | None, factor: int) -> None:
    """--size: at most MAX_SIZE, a multiple of the VAE's downsampling factor."""
    if size is not None and size > MAX_SIZE:
        raise BadInput(f"--size {size}: at most {MAX_SIZE} pixels a side")
    if size is not None and size % factor:
        nearest = max(1, round(size / factor)) * factor
        raise BadInput(f"--size {size}: the picture's side must be a multiple of the VAE's factor {factor}, e.g. "
                       f"--size {nearest}")


def check_steps(steps: int, schedule: int) -> None:
    """--steps: at most the schedule's timesteps."""
    if steps > schedule:
        raise BadInput(f"--steps {steps}: the model's schedule has {schedule} timesteps; use --steps {schedule} or "
                       "fewer")


def render(report: dict) -> str:
    compiled = f", UNets compiled ({report['compile_mode']})" if report["compiled"] else ""
    tiling = ", VAE tiling" if report["vae_tiling"] else ""
    lines = [f"model {report['model']}", f"device {report['device']}, {report['dtype']}, {report['threads']} "
             f"thread(s), torch {report['torch']}" + (f", diffusers {report['diffusers']}" if "diffusers" in report
                                                       else ", no reference (diffusers not installed or turned off)"),
             f"{report['runs']} runs after a warm-up{compiled}; {report['size']}x{report['size']} pixels{tiling}; "
             f"settings {report['settings']}",
             f"{'stage':<8} " + " ".join(f"{name + ' median (min-max) s':>34}" for name in report["sides"])
             + ("  ours / diffusers" if "ratio" in report else "")]
    for stage in (*STAGES, "total"):
        cells = [f"{s['stages'][stage]['median_s']:>10.3f} ({s['stages'][stage]['min_s']:.3f}-"
                 f"{s['stages'][stage]['max_s']:.3f})" for s in report["sides"].values()]
        ratio = f"  {report['ratio'][stage]:>8.2f}" if "ratio" in report else ""
        lines.append(f"{stage:<8} " + " ".join(f"{c:>34}" for c in cells) + ratio)
    for name, s in report["sides"].items():
        memory = (f"peak memory {s['peak_memory_mib']:.0f} MiB" if s["peak_memory_mib"] is not None
                  else f"process max RSS {report['process_max_rss_mib']:.0f} MiB (both sides)")
        lines.append(f"{name}: {s['seconds_per_edit']:.3f} s per edit, {s['achieved_tflops']:.3f} TFLOP/s achieved "
                     f"({s['edit_tflop']:.3f} TFLOP per edit), {memory}")
    if "agreement" in report:
        a = report["agreement"]
        lines.append(f"outputs {'agree' if a['agree'] else 'DISAGREE'}: masks {a['mask_agreement']:.4f} equal "
                     f"(>= {MASK_AGREEMENT}), inverted latents {a['latent_relative_error']:.2e} relative (<= "
                     f"{LATENT_TOL}), picture from the reference's mask and latents "
                     f"{a['picture_max_abs_error']:.2e} max abs (<= {IMAGE_TOL})")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="diffedit bench", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder or hub repo id (default: the shipped model)")
    p.add_argument("--config", choices=("sd15", "sd21", "shapes", "tiny"),
                   help="measure random weights in these official shapes instead of a model folder")
    p.add_argument("--device", choices=DEVICES, default="cpu")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--runs", type=COUNT, default=3, help="timed runs of each side after the warm-up (default 3)")
    p.add_argument("--threads", type=THREADS, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--batch-size", type=COUNT, default=1, help="pictures per call (default 1)")
    p.add_argument("--steps", type=COUNT, default=50, help="num_inference_steps (default 50, diffusers')")
    p.add_argument("--no-reference", action="store_true", help="time ours only")
    add_compile_flag(p, "both sides' UNets (the warm-up compiles)")
    p.add_argument("--size", type=COUNT, metavar="PX",
                   help="the picture's side in pixels (default: the model's sample size; a multiple of the VAE's "
                        "factor)")
    p.add_argument("--vae-tiling", action="store_true", help="both sides' VAEs encode and decode in tiles")
    p.add_argument("--json", help="also write the report here (JSON)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def run() -> None:
        args = parse_args(argv)
        planned = [Planned(Path(args.json), "--json")] if args.json else []
        protected = [] if args.config else [("model", Path(model_location(args.model)))]
        check_outputs(planned, {}, protected=protected)  # before any work: a file path in a writable folder
        report = run_bench(args.model, config=args.config, device=args.device, dtype=args.dtype, runs=args.runs,
                           threads=args.threads,
                           settings=Settings(num_inference_steps=args.steps, batch_size=args.batch_size),
                           reference=not args.no_reference, compile_unet=args.compile is not None,
                           compile_mode=args.compile or "default", size=args.size, vae_tiling=args.vae_tiling)
        print(render(report))
        if args.json:
            text = json.dumps(report, indent=2) + "\n"
            commit([Planned(Path(args.json), "--json", lambda tmp: Path(tmp).write_text(text))])

    return guarded(run, debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())

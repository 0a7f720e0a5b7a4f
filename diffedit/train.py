"""Train the tiny Stable Diffusion that ships with the package, on the shapes world (`diffedit.shapes`).

Two stages, each resumable and stopped gracefully by a wall-clock budget:

1. VAE (Rombach et al., arXiv 2112.10752, Sec. 3.1): an `AutoencoderKL` with downsampling factor 4 (64x64 images ->
   16x16x4 latents), trained on L1 + MSE reconstruction, an L1 on image gradients (sharp edges), and a small KL to
   N(0, I) (weight 1e-6 relative to the per-image sums, as in the LDM configs). Its scaling factor is then set to
   1 / std of the latents, as SD's 0.18215 was.
2. UNet + CLIP text encoder, jointly, on the epsilon loss of DDPM (Ho et al., arXiv 2006.11239, Alg. 1) on scaled
   latents, noised with the DDIM scheduler's `add_noise`; captions are dropped to "" with p = 0.1 for
   classifier-free guidance (Ho & Salimans, arXiv 2207.12598). EMA weights of both are what gets saved.

Scenes are drawn on the fly (numpy `Generator` seeded by (seed, stage, step), rendered in torch on the training
device), so a run is a function of --seed, and a resumed run sees the same data as an uninterrupted one.

    python -m diffedit.train --out runs/shapes --seed 0            # CPU defaults: ~1.6 h on 2 cores, capped at 6900 s
    python -m diffedit.train --out runs/shapes --device cuda       # GPU defaults: batch 256, 450 s budget
    python -m diffedit.train --out runs/shapes --resume            # continue after an interruption
    python -m diffedit.train --out runs/shapes --resume --install  # (re)export, copy to the package
    python -m diffedit.train --out runs/ft --init-from diffedit/assets/shapes-sd --unet-lr 1e-4 --edit-t-share 0.5

--init-from FOLDER fine-tunes a trained model: its VAE is kept as is (no stage 1), its UNet and text encoder are
the starting point of stage 2 (with fresh optimizer state and EMA), and training.json records the base's own
training.json. --edit-t-share P draws a share P of each batch's timesteps below --edit-t-max (600: the levels the
default edits visit), so the UNet's capacity goes where DiffEdit uses it.

--time-budget-s T bounds the whole command: the VAE stage stops at `vae_budget_fraction` of T (less a reserve for
the export), the UNet stage at T less the reserve; a stage that stops early still saves its checkpoint, and the
learning rate follows max(step / steps, elapsed / stage budget), so a budgeted run still ends its cosine decay.
Without a budget (T <= 0) a run is a function of --seed alone (on the CPU, bit for bit, resumed or not).

The run folder gets `log.jsonl` (losses, learning rate, elapsed time), `checkpoints/` (or --checkpoint-dir; one
safetensors file per stage with the weights, EMA weights and optimizer moments, and JSON metadata: no pickles),
`shapes-sd/` (the diffusers-layout model folder, fp16 safetensors, with `diffedit.json` edit defaults),
`samples.png` and `vae_reconstructions.png` (a look at the result). --install copies `shapes-sd/` to
`diffedit/assets/shapes-sd/`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from . import shapes
from .console import COUNT, POSITIVE, RATIO, SEED, THREADS, BadInput, Parser, guarded, number
from .locations import SHIPPED_MODEL, model_location
from .models.clip_text import CLIPTextModel
from .models.tokenizer import CLIPTokenizer
from .models.unet import UNet2DConditionModel
from .models.vae import AutoencoderKL
from .schedulers.ddim import DDIMConfig, DDIMScheduler
from .shipped_model import (SCHEDULER_CONFIG, build_text_encoder, build_unet, build_vae, export, folder_size_mb,
                            install_shipped, small_clip_vocab, with_scaling_factor, write_tokenizer)
from .outputs import OutputPathError
from .validation import one_line
from .stable_diffusion import StableDiffusion

STEPS_OR_NONE = number(int, 0)  # a count that may be 0 (no steps, no samples)
FRACTION = number(float, 0, 1)
FINITE = number(float, -math.inf)  # any finite number (--time-budget-s <= 0: no budget)

# --------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    seed: int = 0
    device: str = "cpu"
    vae_steps: int = 1500
    vae_batch_size: int = 16
    vae_lr: float = 1e-3
    unet_steps: int = 6000
    batch_size: int = 32
    unet_lr: float = 4e-4
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of the peak
    kl_weight: float = 1e-6  # relative to per-image sums, as LDM's KL-f4 configs
    edge_weight: float = 0.5  # L1 on horizontal/vertical pixel differences
    cfg_dropout: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    time_budget_s: float | None = 6900.0  # whole command; None: step counts only
    vae_budget_fraction: float = 0.2  # of the budget, for the VAE stage
    amp: bool = False  # bf16 autocast (cuda)
    threads: int | None = None  # torch CPU threads
    log_every: int = 50
    save_every_s: float = 600.0
    preview_n: int = 32  # generated samples scored by the classifier at the end (0: none)
    scale_samples: int = 512  # scenes whose latents set the VAE scaling factor
    init_from: str | None = None  # a model folder: fine-tune its UNet and text encoder, keep its VAE (no stage 1)
    edit_t_share: float = 0.0  # share of each UNet batch whose timesteps are drawn below edit_t_max
    edit_t_max: int = 600  # the noisiest level the model's default edits visit (strength / mask noise 0.6)


CPU_DEFAULTS = Settings()
CUDA_DEFAULTS = replace(
    Settings(), device="cuda", vae_steps=8000, vae_batch_size=128, vae_lr=1e-3, unet_steps=50000, batch_size=256,
    unet_lr=5e-4, warmup_steps=500, time_budget_s=450.0, vae_budget_fraction=0.3, amp=True, log_every=250,
    save_every_s=300.0, preview_n=64)

_STAGE_SEED = {"vae": 1, "unet": 2}

# The settings that make a run what it is: a checkpoint is resumed only with the same ones. The others may change
# between an interruption and its resume: where it runs (device, amp, threads), how long (the step counts, the time
# budget and its VAE share), and the log, checkpoint and preview cadence.
RUN_FIELDS = ("seed", "vae_batch_size", "vae_lr", "batch_size", "unet_lr", "warmup_steps", "min_lr_ratio", "kl_weight",
              "edge_weight", "cfg_dropout", "ema_decay", "grad_clip", "scale_samples", "init_from", "edit_t_share",
              "edit_t_max")


def step_rng(seed: int, stage: str, step: int) -> np.random.Generator:
    """The scene generator of one training step: a function of (seed, stage, step) only."""
    return np.random.default_rng([seed, _STAGE_SEED[stage], step])


def step_generator(seed: int, stage: str, step: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device).manual_seed((seed * 1_000_003 + _STAGE_SEED[stage]) * 10_000_019 + step)


def scene_batch(rng: np.random.Generator, batch: int, device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """(images (B, 3, 64, 64) in [-1, 1] on device, caption indices (B,)) drawn from rng."""
    arrays = shapes.sample_arrays(rng, batch)
    images, _ = shapes.render_batch(arrays, device)
    return shapes.to_model_range(images), shapes.caption_indices(arrays)


def lr_factor(step: int, progress: float, s: Settings) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio` over progress in [0, 1]."""
    warm = min(1.0, (step + 1) / max(1, s.warmup_steps))
    return warm * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# --------------------------------------------------------------------------------------------------- run bookkeeping


class TrainingRun:
    """Folders, the JSONL log, progress lines, checkpoints and the wall-clock deadlines of one command."""

    def __init__(self, out: Path, settings: Settings, checkpoint_dir: Path | None, resume: bool):
        self.out, self.s, self.t0 = out, settings, time.time()
        self.ckpt_dir = checkpoint_dir or out / "checkpoints"
        if not resume and any(self.ckpt_dir.glob("*.safetensors")):
            raise OutputPathError(f"{self.ckpt_dir} already holds checkpoints: pass --resume to continue that run, "
                                  "or choose another --out / --checkpoint-dir")
        if not resume and (out / "log.jsonl").is_file():  # a log of another run: this one's would be appended to it
            raise OutputPathError(f"{out} already holds a run (its log.jsonl): pass --resume to continue that run, "
                                  "or choose another --out")
        if resume:
            self.check_resumable()
        out.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = (out / "log.jsonl").open("a")
        budget = settings.time_budget_s
        self.reserve = 0.0 if budget is None else min(60.0, 0.06 * budget)  # export, preview
        vae_share = math.inf if budget is None else settings.vae_budget_fraction * (budget - self.reserve)
        self.vae_deadline = self.t0 + vae_share
        self.unet_deadline = math.inf if budget is None else self.t0 + budget - self.reserve

    def check_resumable(self) -> None:
        """Refuse to continue a stage whose checkpoint was written with other `RUN_FIELDS` (another seed, batch,
        learning rate, base model ...): the resumed run would be neither. Read from the checkpoints' headers only,
        before any work; a stage its time budget ended is finished and is only loaded, so its settings may differ
        (`--resume --install` exports it on any device)."""
        for stage in ("vae", "unet"):
            path = self.ckpt(stage)
            if not path.is_file():
                continue
            try:
                with safe_open(str(path), "np") as f:
                    meta = json.loads(f.metadata()["state"])
            except Exception as e:  # noqa: BLE001 - SafetensorError, a missing or non-JSON "state"
                raise BadInput(f"checkpoint {path} is not one `diffedit train` wrote, or is damaged ({one_line(e)}): "
                               "remove it or choose another --out / --checkpoint-dir") from None
            if meta.get("stopped_by") == "time budget":
                continue
            old = meta.get("settings", {})
            differ = [name for name in RUN_FIELDS if name in old and old[name] != getattr(self.s, name)]
            if differ:
                was = ", ".join(f"{name} {old[name]!r}" for name in differ)
                now = ", ".join(f"{name} {getattr(self.s, name)!r}" for name in differ)
                raise BadInput(f"--resume: {path} was written by a run with {was}, but this run has {now}: resume "
                               "with that run's flags (the settings line of its log.jsonl), or choose another --out")

    def elapsed(self) -> float:
        return time.time() - self.t0

    def log(self, record: dict, echo: bool = True) -> None:
        record = {"elapsed_s": round(self.elapsed(), 1), **record}
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()
        if echo:
            tqdm.write(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()), file=sys.stdout)

    def ckpt(self, stage: str) -> Path:
        return self.ckpt_dir / f"{stage}.safetensors"

    def save_checkpoint(self, stage: str, state: dict) -> None:
        """One safetensors file per stage (written atomically): module state dicts and the optimizer's tensors as
        tensors, everything else (step, settings, the optimizer's param_groups) as JSON metadata. No pickles."""
        tensors, meta = {}, {"modules": []}
        for key, value in state.items():
            if key == "opt":
                for index, per_param in value["state"].items():
                    tensors.update({f"opt.{index}.{name}": t.contiguous() for name, t in per_param.items()})
                meta["opt_param_groups"] = value["param_groups"]
            elif isinstance(value, dict) and all(isinstance(t, torch.Tensor) for t in value.values()):
                tensors.update({f"{key}.{name}": t.contiguous() for name, t in value.items()})
                meta["modules"].append(key)
            else:
                meta[key] = value
        tmp = self.ckpt(stage).with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
        os.replace(tmp, self.ckpt(stage))

    def load_checkpoint(self, stage: str) -> dict | None:
        """What `save_checkpoint` wrote, as the same dict (None when the stage has no checkpoint)."""
        path = self.ckpt(stage)
        if not path.is_file():
            return None
        # on the CPU: load_state_dict copies into the modules' device, and the optimizer moves its moments there
        # while keeping Adam's step counts on the CPU, where non-capturable Adam wants them
        with safe_open(str(path), "pt", device="cpu") as f:
            meta = json.loads(f.metadata()["state"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        state = {k: v for k, v in meta.items() if k not in ("modules", "opt_param_groups")}
        for module in meta["modules"]:
            state[module] = {n[len(module) + 1:]: t for n, t in tensors.items() if n.startswith(module + ".")}
        opt_state: dict[int, dict] = {}
        for name, t in tensors.items():
            if name.startswith("opt."):
                _, index, field_name = name.split(".", 2)
                opt_state.setdefault(int(index), {})[field_name] = t
        state["opt"] = {"state": opt_state, "param_groups": meta["opt_param_groups"]}
        return state


class StageClock:
    """The wall clock of one training stage: whether it may take another step (step count and deadline), its
    progress for the learning-rate schedule (max(step / steps, elapsed / stage budget), so a budgeted stage still
    ends its cosine decay), its training time across resumes, and when a checkpoint is due."""

    def __init__(self, steps: int, deadline: float, save_every_s: float, prior_elapsed_s: float = 0.0):
        self.steps, self.deadline, self.save_every_s = steps, deadline, save_every_s
        self.prior_elapsed_s = prior_elapsed_s  # seconds this stage trained before a resume
        self.start = self.last_save = time.time()
        self.budget = max(1e-9, deadline - self.start)

    def running(self, step: int) -> bool:
        return step < self.steps and time.time() < self.deadline

    def fraction_done(self, step: int) -> float:
        return max(step / self.steps, (time.time() - self.start) / self.budget)

    def elapsed_s(self) -> float:
        """Training seconds of this stage, including those before a resume."""
        return self.prior_elapsed_s + time.time() - self.start

    def save_if_due(self, save) -> None:
        """Call `save()` when `save_every_s` have passed since the last save (or the stage's start)."""
        if time.time() - self.last_save > self.save_every_s:
            save()
            self.last_save = time.time()

    def stopped_by(self, step: int) -> str:
        return "steps" if step >= self.steps else "time budget"


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _progress(stage: str, start: int, total: int) -> tqdm:
    return tqdm(total=total, initial=start, desc=stage, unit="step", mininterval=10.0, dynamic_ncols=True,
                file=sys.stderr)


# --------------------------------------------------------------------------------------------------- stage 1: VAE


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, gen: torch.Generator, s: Settings) -> tuple[torch.Tensor, dict]:
    """L1 + MSE + edge L1 (per pixel means) + kl_weight * KL (per-image sum, divided by the pixel count)."""
    posterior = vae.encode(x)
    y = vae.decode(posterior.sample(gen)).float()
    l1, mse = (y - x).abs().mean(), (y - x).square().mean()
    edge = (y.diff(dim=2) - x.diff(dim=2)).abs().mean() + (y.diff(dim=3) - x.diff(dim=3)).abs().mean()
    kl = posterior.kl().float().mean() / x[0].numel()
    loss = l1 + mse + s.edge_weight * edge + s.kl_weight * kl
    return loss, {"l1": l1, "mse": mse, "edge": edge, "kl": kl}


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, seed: int, device: torch.device, n: int = 512) -> float:
    """1 / std of the posterior samples over n fresh scenes (SD's recipe for its 0.18215)."""
    x, _ = scene_batch(step_rng(seed, "vae", 10**9), n, device)  # a step index training never reaches
    z = torch.cat([vae.encode(chunk).sample(step_generator(seed, "vae", 10**9 + i, device))
                   for i, chunk in enumerate(x.split(64))])
    return float(f"{1.0 / z.float().std().item():.5g}")


def train_vae(run: TrainingRun, device: torch.device) -> tuple[AutoencoderKL, dict]:
    """Train (or resume, or load when finished) the VAE; return it in eval mode with its scaling factor set."""
    s = run.s
    torch.manual_seed(s.seed)
    vae, _ = build_vae()
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0, betas=(0.9, 0.99))
    step, prior_elapsed = 0, 0.0
    state = run.load_checkpoint("vae")
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, prior_elapsed = state["step"], state["elapsed_s"]
        finished = step >= s.vae_steps or state.get("stopped_by") == "time budget" or run.ckpt("unet").is_file()
        if state["scaling_factor"] is not None and finished:
            run.log({"stage": "vae", "event": "loaded", "step": step, "scaling_factor": state["scaling_factor"]})
            info = {"vae_steps": step, "vae_train_s": round(prior_elapsed, 1)}
            return with_scaling_factor(vae, state["scaling_factor"]).eval().requires_grad_(False), info

    def save(scaling_factor=None, stopped_by=None):
        run.save_checkpoint("vae", {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                                    "scaling_factor": scaling_factor, "elapsed_s": clock.elapsed_s(),
                                    "stopped_by": stopped_by, "settings": asdict(s)})

    clock = StageClock(s.vae_steps, run.vae_deadline, s.save_every_s, prior_elapsed)
    run.log({"stage": "vae", "event": "start", "step": step, "params_M": _millions(vae), "batch": s.vae_batch_size})
    bar, sums, count = _progress("vae", step, s.vae_steps), {}, 0
    while clock.running(step):
        lr = s.vae_lr * lr_factor(step, clock.fraction_done(step), s)
        set_lr(opt, lr)
        x, _ = scene_batch(step_rng(s.seed, "vae", step), s.vae_batch_size, device)
        with _autocast(device, s.amp):
            loss, parts = vae_loss(vae, x, step_generator(s.seed, "vae", step, device), s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), s.grad_clip)
        opt.step()
        step += 1
        bar.update(1)
        for k, v in {"loss": loss, **parts}.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        count += 1
        if step % s.log_every == 0 or step == s.vae_steps:
            means = {k: float(v) / count for k, v in sums.items()}
            psnr = 10 * math.log10(4.0 / max(means["mse"], 1e-12))  # images span 2 units
            run.log({"stage": "vae", "step": step, **means, "psnr": psnr, "lr": lr})
            sums, count = {}, 0
        clock.save_if_due(save)
    bar.close()
    vae.eval().requires_grad_(False)
    scale = latent_scale(vae, s.seed, device, s.scale_samples)
    save(scale, clock.stopped_by(step))
    info = {"vae_steps": step, "vae_train_s": round(clock.elapsed_s(), 1)}
    run.log({"stage": "vae", "event": "done", "step": step, "scaling_factor": scale,
             "stopped_by": clock.stopped_by(step)})
    return with_scaling_factor(vae, scale), info


def _base_provenance(folder: Path) -> dict | None:
    """The training.json of a model folder, if it has one (a fine-tune records what it started from)."""
    path = folder / "training.json"
    return json.loads(path.read_text()) if path.is_file() else None  # (None for a hub repo id)


def _millions(*modules) -> float:
    return round(sum(p.numel() for m in modules for p in m.parameters()) / 1e6, 3)


# --------------------------------------------------------------------------------------------------- stage 2: UNet


def draw_timesteps(s: Settings, num_train_timesteps: int, gen: torch.Generator, device: torch.device
                   ) -> torch.Tensor:
    """(batch,) training timesteps: uniform over the schedule, except that a share `edit_t_share` of them is
    uniform below `edit_t_max` (the levels the default edits visit). With share 0 nothing more is drawn, so runs
    made before the option existed are unchanged."""
    t = torch.randint(0, num_train_timesteps, (s.batch_size,), generator=gen, device=device)
    if s.edit_t_share > 0:
        low = torch.randint(0, s.edit_t_max, (s.batch_size,), generator=gen, device=device)
        pick = torch.rand(s.batch_size, generator=gen, device=device) < s.edit_t_share
        t = torch.where(pick, low, t)
    return t


def caption_ids(tokenizer: CLIPTokenizer) -> torch.Tensor:
    """(73, 77): the world's 72 captions in `shapes.all_captions()` order, then "" (the unconditional row)."""
    return tokenizer(shapes.all_captions() + [""])


def train_unet(run: TrainingRun, device: torch.device, vae: AutoencoderKL, tokenizer: CLIPTokenizer,
               vocab_size: int, base: StableDiffusion | None = None
               ) -> tuple[UNet2DConditionModel, CLIPTextModel, dict]:
    """Train (or resume) the UNet and the text encoder jointly, from scratch or from `base`'s weights (a
    fine-tune); return their EMA copies."""
    s = run.s
    torch.manual_seed(s.seed + 1)
    unet = build_unet()
    text = build_text_encoder(vocab_size)
    if base is not None:  # strict: the base must have exactly this architecture and vocabulary
        unet.load_state_dict(base.unet.state_dict())
        text.load_state_dict(base.text_encoder.state_dict())
    unet, text = unet.to(device).train(), text.to(device).train()
    params = [*unet.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=s.unet_lr, weight_decay=0.01, betas=(0.9, 0.999))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    ema_params = [*ema_unet.parameters(), *ema_text.parameters()]
    scheduler = DDIMScheduler(DDIMConfig.from_dict(SCHEDULER_CONFIG))
    ids = caption_ids(tokenizer).to(device)
    text.embeddings.check_ids(ids)  # once: the loop below takes rows of these ids (text.encode, no per-step wait)
    empty = ids.shape[0] - 1
    step, prior_elapsed = 0, 0.0
    state = run.load_checkpoint("unet")
    if state is not None:
        for module, key in ((unet, "unet"), (text, "text_encoder"), (ema_unet, "ema_unet"), (ema_text, "ema_text")):
            module.load_state_dict(state[key])
        opt.load_state_dict(state["opt"])
        step, prior_elapsed = state["step"], state["elapsed_s"]
        if state.get("stopped_by") == "time budget":  # finished: resuming would restart its decayed learning rate
            run.log({"stage": "unet", "event": "loaded", "step": step})
            info = {"unet_steps": step, "unet_train_s": round(prior_elapsed, 1)}
            return ema_unet.requires_grad_(False), ema_text.requires_grad_(False), info

    def save(stopped_by=None):
        run.save_checkpoint("unet", {"unet": unet.state_dict(), "text_encoder": text.state_dict(),
                                     "ema_unet": ema_unet.state_dict(), "ema_text": ema_text.state_dict(),
                                     "opt": opt.state_dict(), "step": step, "elapsed_s": clock.elapsed_s(),
                                     "stopped_by": stopped_by, "settings": asdict(s)})

    clock = StageClock(s.unet_steps, run.unet_deadline, s.save_every_s, prior_elapsed)
    run.log({"stage": "unet", "event": "start", "step": step, "unet_params_M": _millions(unet),
             "text_params_M": _millions(text), "batch": s.batch_size})
    bar, loss_sum, count = _progress("unet", step, s.unet_steps), 0.0, 0
    while clock.running(step):
        lr = s.unet_lr * lr_factor(step, clock.fraction_done(step), s)
        set_lr(opt, lr)
        # Data: scenes, captions with CFG dropout, latents, noise at uniform timesteps
        rng = step_rng(s.seed, "unet", step)
        x, caps = scene_batch(rng, s.batch_size, device)
        caps = np.where(rng.random(s.batch_size) < s.cfg_dropout, empty, caps)
        gen = step_generator(s.seed, "unet", step, device)
        with torch.no_grad():
            latents = vae.encode(x).sample(gen) * vae.scaling_factor  # (B, 4, 16, 16)
        noise = torch.randn(latents.shape, generator=gen, device=device)
        t = draw_timesteps(s, scheduler.config.num_train_timesteps, gen, device)
        noisy = scheduler.add_noise(latents, noise, t)
        # Epsilon loss
        with _autocast(device, s.amp):
            context = text.encode(ids[torch.as_tensor(caps, device=device)])  # (B, 77, 128)
            pred = unet(noisy, t, context)
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        step += 1
        # EMA, warmed up so that early averages are not dominated by the random init
        decay = min(s.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        bar.update(1)
        loss_sum, count = loss_sum + loss.detach(), count + 1
        if step % s.log_every == 0 or step == s.unet_steps:
            run.log({"stage": "unet", "step": step, "loss": float(loss_sum) / count, "lr": lr, "ema_decay": decay})
            loss_sum, count = 0.0, 0
        clock.save_if_due(save)
    bar.close()
    save(clock.stopped_by(step))
    info = {"unet_steps": step, "unet_train_s": round(clock.elapsed_s(), 1)}
    run.log({"stage": "unet", "event": "done", "step": step, "stopped_by": clock.stopped_by(step)})
    return ema_unet.requires_grad_(False), ema_text.requires_grad_(False), info


# --------------------------------------------------------------------------------------------------- preview


@torch.no_grad()
def generate(unet: UNet2DConditionModel, text: CLIPTextModel, vae: AutoencoderKL, ids: torch.Tensor,
             uncond: torch.Tensor, generator: torch.Generator, steps: int = 25, guidance: float = 5.0
             ) -> torch.Tensor:
    """Text-to-image with DDIM and classifier-free guidance -> uint8 (B, 3, 64, 64)."""
    scheduler = DDIMScheduler(DDIMConfig.from_dict(SCHEDULER_CONFIG))
    device, b = ids.device, ids.shape[0]
    context = text(torch.cat([uncond.expand(b, -1), ids]))  # (2B, 77, D)
    x = torch.randn((b, 4, 16, 16), generator=generator, device=generator.device).to(device)
    for t in scheduler.timesteps(steps):
        eps_u, eps_c = unet(torch.cat([x, x]), int(t), context).chunk(2)
        x = scheduler.step(eps_u + guidance * (eps_c - eps_u), int(t), x, steps).prev_sample
    images = vae.decode(x / vae.scaling_factor)
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _grid(images: torch.Tensor, cols: int = 8) -> np.ndarray:
    """uint8 (B, 3, H, W) -> one (rows*H, cols*W, 3) array."""
    b, _, h, w = images.shape
    rows = -(-b // cols)
    pad = torch.zeros((rows * cols - b, 3, h, w), dtype=images.dtype, device=images.device)
    x = torch.cat([images, pad]).cpu().numpy().reshape(rows, cols, 3, h, w)
    return x.transpose(0, 3, 1, 4, 2).reshape(rows * h, cols * w, 3)


@torch.no_grad()
def preview(run: TrainingRun, device: torch.device, vae: AutoencoderKL, unet: UNet2DConditionModel,
            text: CLIPTextModel, tokenizer: CLIPTokenizer) -> dict:
    """VAE reconstruction PSNR and classifier accuracy of generated samples; pictures of both in the run folder."""
    from PIL import Image

    s, n = run.s, run.s.preview_n
    x, _ = scene_batch(step_rng(s.seed, "vae", 10**9 + 1), 32, device)  # held out from training steps
    recon = vae.decode(vae.encode(x).mean).clamp(-1, 1)
    orig8, recon8 = ((x + 1) * 127.5).round(), ((recon + 1) * 127.5).round()
    psnr = float(10 * torch.log10(255.0**2 / (orig8 - recon8).square().mean((1, 2, 3))).mean())
    Image.fromarray(_grid(torch.stack([orig8[:16], recon8[:16]], 1).flatten(0, 1).to(torch.uint8))).save(
        run.out / "vae_reconstructions.png")
    stats = {"vae_psnr_db": round(psnr, 2)}
    if n > 0:
        arrays = shapes.sample_arrays(np.random.default_rng([s.seed, 3]), n)
        captions = np.array(shapes.all_captions())[shapes.caption_indices(arrays)]
        ids = tokenizer(list(captions)).to(device)
        images = torch.cat([generate(unet, text, vae, ids[i:i + 64], tokenizer([""]).to(device),
                                     torch.Generator().manual_seed(s.seed + i)) for i in range(0, n, 64)])
        Image.fromarray(_grid(images)).save(run.out / "samples.png")
        scenes = shapes.scenes_from_arrays(arrays)
        judged = [shapes.classify(img.permute(1, 2, 0).cpu().numpy()) for img in images]
        stats["sample_colour_acc"] = float(np.mean([j.colour == sc.colour for j, sc in zip(judged, scenes)]))
        stats["sample_shape_acc"] = float(np.mean([j.shape == sc.shape for j, sc in zip(judged, scenes)]))
    return stats


# --------------------------------------------------------------------------------------------------- command


def settings_from_args(args: argparse.Namespace) -> Settings:
    base = CUDA_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS
    overrides = {f.name: getattr(args, f.name) for f in fields(Settings)
                 if getattr(args, f.name, None) is not None and f.name != "time_budget_s"}
    if args.time_budget_s is not None:
        overrides["time_budget_s"] = None if args.time_budget_s <= 0 else args.time_budget_s
    if args.no_amp:
        overrides["amp"] = False
    return replace(base, **{**overrides, "device": args.device})


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="diffedit train", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=f"CPU defaults: {CPU_DEFAULTS}\nCUDA defaults: {CUDA_DEFAULTS}")
    p.add_argument("--out", type=Path, required=True, help="run folder (log, checkpoints, shapes-sd/ model)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--vae-steps", type=STEPS_OR_NONE)
    p.add_argument("--unet-steps", type=STEPS_OR_NONE)
    p.add_argument("--batch-size", type=COUNT, help="UNet stage batch size")
    p.add_argument("--vae-batch-size", type=COUNT)
    p.add_argument("--vae-lr", type=POSITIVE)
    p.add_argument("--unet-lr", type=POSITIVE)
    p.add_argument("--warmup-steps", type=STEPS_OR_NONE)
    p.add_argument("--ema-decay", type=FRACTION)
    p.add_argument("--time-budget-s", type=FINITE,
                   help="wall-clock budget of the whole command; each stage stops at its share and still saves "
                        "(<= 0: none). Default: CPU 6900, CUDA 450")
    p.add_argument("--vae-budget-fraction", type=RATIO,
                   help="share of the budget for the VAE stage (CPU 0.2, CUDA 0.3)")
    p.add_argument("--threads", type=THREADS, help="torch CPU threads")
    p.add_argument("--log-every", type=COUNT)
    p.add_argument("--save-every-s", type=POSITIVE)
    p.add_argument("--preview-n", type=STEPS_OR_NONE, help="generated samples to score at the end (0: none)")
    p.add_argument("--scale-samples", type=COUNT, help="scenes whose latents set the VAE scaling factor (512)")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on cuda")
    p.add_argument("--checkpoint-dir", type=Path, help="where checkpoints go (default OUT/checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints")
    p.add_argument("--init-from", help="model folder to fine-tune: its VAE is kept (no VAE stage), its UNet and "
                                       "text encoder are the starting point")
    p.add_argument("--edit-t-share", type=FRACTION,
                   help="share of each UNet batch with timesteps below --edit-t-max (default 0: uniform)")
    p.add_argument("--edit-t-max", type=COUNT, help="see --edit-t-share (default 600)")
    p.add_argument("--install", action="store_true", help=f"copy the model folder to {SHIPPED_MODEL}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def check_command(args: argparse.Namespace) -> None:
    """What `diffedit train` checks before any work: the device, the run folder, the model to fine-tune."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise BadInput(f"--device {args.device}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise BadInput(f"--device {args.device}: training runs on cpu or cuda")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise BadInput(f"--device {args.device}: no such CUDA device is available (use --device cpu)")
    for flag, path in (("--out", args.out), ("--checkpoint-dir", args.checkpoint_dir)):
        if path is not None and path.exists() and not path.is_dir():
            raise BadInput(f"{flag} {path} is a file; give a folder (it is created when missing)")
    if args.init_from is not None:
        model_location(args.init_from)  # a ModelNotFoundError is bad input
        check_base(args.init_from)
    if args.edit_t_max is not None and args.edit_t_max > 1000:
        raise BadInput(f"--edit-t-max {args.edit_t_max}: the schedule has 1000 timesteps")


def check_base(init_from: str) -> None:
    """--init-from, before the run folder is made: a model that loads, with the shapes model's UNet and text encoder
    (the fine-tune loads them strictly), else bad input naming the flag."""
    try:
        base = StableDiffusion.from_pretrained(init_from, dtype=torch.float32)
    except ValueError as e:  # FileError, ConfigError: a folder that is no model, or a damaged one
        raise BadInput(f"--init-from {init_from}: {one_line(e)}") from None
    with torch.device("meta"):  # shapes only: no memory, no random initialisation
        built = {"UNet": (build_unet(), base.unet),
                 "text encoder": (build_text_encoder(len(small_clip_vocab()[0])), base.text_encoder)}
    for name, (shapes_model, loaded) in built.items():
        want = {k: tuple(v.shape) for k, v in shapes_model.state_dict().items()}
        if {k: tuple(v.shape) for k, v in loaded.state_dict().items()} != want:
            raise BadInput(f"--init-from {init_from}: its {name} is not the shapes model's (other layers or sizes); "
                           "fine-tune a model `diffedit train` made")


def train(settings: Settings, out: Path, checkpoint_dir: Path | None = None, resume: bool = False,
          install: bool = False, command: str = "") -> Path:
    """Both stages, then the preview and the export; returns the model folder (out/shapes-sd)."""
    s, device = settings, torch.device(settings.device)
    if s.threads:
        torch.set_num_threads(s.threads)
    torch.set_flush_denormal(True)  # Adam's tiny second moments can otherwise slow CPU steps down
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    run = TrainingRun(Path(out), s, checkpoint_dir, resume)
    try:
        return _stages(run, device, install, command)
    except KeyboardInterrupt:  # files are written from the first step on: say what is kept
        saved = sorted(p.name for p in run.ckpt_dir.glob("*.safetensors"))
        kept = f"the checkpoints {', '.join(saved)} in {run.ckpt_dir}" if saved else "no checkpoint yet"
        raise KeyboardInterrupt(f"interrupted; kept {run.out / 'log.jsonl'} and {kept}: continue with the same "
                                "command and --resume") from None
    finally:
        run.log_file.close()


def _stages(run: TrainingRun, device: torch.device, install: bool, command: str) -> Path:
    """`train`'s work in `run`'s folders: the stages, the preview, the export and the install."""
    s = run.s
    run.log({"event": "settings", **asdict(s), "torch": torch.__version__,
             "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
             "threads": torch.get_num_threads()})
    vocab_size = write_tokenizer(run.out / "tokenizer")
    tokenizer = CLIPTokenizer.from_folder(run.out / "tokenizer")

    if s.init_from:  # fine-tune: the base's VAE as is, its UNet and text encoder as the starting point
        base = StableDiffusion.from_pretrained(s.init_from, dtype=torch.float32)
        vae = base.vae.to(device).eval().requires_grad_(False)
        vae_info = {"init_from": str(s.init_from), "base_training": _base_provenance(Path(s.init_from))}
        run.log({"stage": "vae", "event": "loaded", "from": str(s.init_from), "scaling_factor": vae.scaling_factor})
    else:
        base = None
        vae, vae_info = train_vae(run, device)
    unet, text, unet_info = train_unet(run, device, vae, tokenizer, vocab_size, base)

    stats = preview(run, device, vae, unet, text, tokenizer)
    provenance = {"command": command, "seed": s.seed, "device": s.device, "vae_batch_size": s.vae_batch_size,
                  "batch_size": s.batch_size, **vae_info, **unet_info, **stats}
    folder = export(run.out / "shapes-sd", vae.cpu(), unet.cpu(), text.cpu(), provenance)
    run.log({"event": "exported", "folder": str(folder), "size_mb": round(folder_size_mb(folder), 2), **stats})
    if install:
        run.log({"event": "installed", "folder": str(install_shipped(folder))})
    return folder


def main(argv: list[str] | None = None) -> int:
    """`diffedit train` under the command-line contract (`console.guarded`): bad input is one line, exit 2."""
    argv = sys.argv[1:] if argv is None else argv

    def run() -> None:
        args = parse_args(argv)
        check_command(args)
        train(settings_from_args(args), args.out, args.checkpoint_dir, args.resume, args.install,
              "diffedit train " + " ".join(argv))

    return guarded(run, debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())

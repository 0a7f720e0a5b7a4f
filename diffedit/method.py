"""DiffEdit's three steps as functions of a loaded `StableDiffusion` and `DiffEditParams`.

Couairon, Verbeek, Schwenk, Cord, "DiffEdit: Diffusion-based semantic image editing with mask guidance",
arXiv 2210.11427 (ICLR 2023), §3.2:

1. `estimate_mask`: noise the image's latents, predict the noise under the query Q and the reference R, and
   threshold the averaged |eps_Q - eps_R| into the edit region M.
2. `invert`: DDIM-encode the image up to the encoding ratio r, keeping every intermediate latent x_t
   (optionally with pix2pix-zero's noise regularization, `regularize_noise`).
3. `decode`: DDIM-decode from x_r under Q, pasting the inverted latents outside M after every step.

The corrections of diffusers' defects (the boolean fields of `DiffEditParams`) change these functions in place;
with every correction off they reproduce diffusers 0.42.1 `StableDiffusionDiffEditPipeline` number for number,
drawing the same random numbers in the same order and shapes. Nothing here keeps state between calls.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .memory import vae_decode, vae_encode
from .params import DiffEditParams, least_strength
from .stable_diffusion import StableDiffusion
from .models.unet import TextKV
from .schedulers.dpm_solver import DPMSolverScheduler, dpm_update
from .schedulers.dpm_solver import alpha_sigma as dpm_alpha_sigma
from .schedulers.dpm_solver import data_prediction as dpm_data_prediction
from .models.vae import DiagonalGaussian
from .schedulers.noise import randn
from .validation import shorten

Generator = torch.Generator | list[torch.Generator] | None
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step index, timestep, latents)


class ImpossibleResultError(RuntimeError):
    """A result that cannot be right, so no result: latents or pixels that stopped being numbers (NaN or inf), or
    an edit that decoded to a constant picture."""


class FirstNonFinite:
    """Where a loop's latents first stopped being finite: one check per step boundary, kept on the device (no
    host sync inside the loop); `check` reads it once, after the loop."""

    def __init__(self, device: torch.device):
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.dtype = torch.float32  # the latents' (for the message)

    def see(self, i: int, x: torch.Tensor) -> None:
        self.dtype = x.dtype
        self.step = torch.where((self.step < 0) & ~torch.isfinite(x).all(), i, self.step)

    def check(self, what: str, timesteps: torch.Tensor) -> None:
        k = int(self.step)
        if k >= 0:
            raise ImpossibleResultError(f"the {what} latents became non-finite (NaN or inf) at step {k + 1} of "
                                 f"{len(timesteps)} (t={int(timesteps[k])}); {overflow_hint(self.dtype)}")


def overflow_hint(dtype: torch.dtype) -> str:
    """Why numbers stop being finite, and what to try, for a model run in `dtype`."""
    if dtype == torch.float32:
        return ("the model's numbers overflowed: a setting far outside its usual range (a guidance scale, a LoRA "
                "weight or scale) or broken weights")
    return (f"the model's numbers overflowed in {str(dtype).removeprefix('torch.')}: try float32, a setting closer "
            "to its usual range, or check the weights")


# ----------------------------------------------------------------------------------------------------------------
# What every step checks before it starts


def check_images(sd: StableDiffusion, image: torch.Tensor, prompts: int) -> None:
    """The steps' image argument: (B, 3, H, W) pixels in [-1, 1] or (B, C, h, w) latents, finite; one picture per
    prompt, or a batch that the `prompts` tile (one picture for all: diffusers' deprecated broadcast)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise ValueError(f"image: expected a (B, 3, H, W) tensor in [-1, 1] (or latents), got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    if prompts % image.shape[0]:
        raise ValueError(f"image: {image.shape[0]} picture(s) for {prompts} prompt(s): give one prompt per picture "
                         "(or one picture for all the prompts)")
    channels = sd.vae.config.latent_channels
    if image.shape[1] not in (3, channels):
        raise ValueError(f"image: expected 3 channels (pixels) or {channels} (latents), got {image.shape[1]}")
    if not image.is_floating_point() or not bool(torch.isfinite(image).all()):
        raise ValueError("image: expected finite floating-point values")
    if image.shape[1] == 3 and not bool((image.abs() <= 1 + 1e-3).all()):
        raise ValueError(f"image: pixels must be in [-1, 1], got [{float(image.min()):g}, {float(image.max()):g}] "
                         "(from [0, 1]: 2 x - 1; from 0-255: x / 127.5 - 1)")


def check_generator(generator: Generator, pictures: int, draws: int = 1) -> None:
    """None, a torch.Generator, or a list of them: one per picture, or (when each picture takes `draws` random
    rows, as the mask step's noise draws) one per row. Any other count would silently share generators."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, list) or not all(isinstance(g, torch.Generator) for g in generator):
        raise TypeError(f"generator: expected None, a torch.Generator or a list of them, got "
                        f"{type(generator).__name__}")
    counts = sorted({pictures, pictures * draws})
    if len(generator) not in counts:
        raise ValueError(f"generator: a list of {len(generator)} generators for {pictures} picture(s)"
                         f"{f' x {draws} draws' if draws > 1 else ''}; give {' or '.join(map(str, counts))}")


def check_texts(*texts: TextEmbeddings, guided: bool = False) -> None:
    """Text batches of one size; with guidance, each with its negative prompt embeddings."""
    sizes = [len(t) for t in texts]
    if len(set(sizes)) > 1:
        raise ValueError(f"the prompt batches differ in size ({', '.join(map(str, sizes))}): give one prompt of each "
                         "kind per picture")
    if guided and any(t.uncond is None for t in texts):
        raise ValueError("a guidance scale > 1 needs negative prompt embeddings (TextEmbeddings.uncond)")


def check_mask(mask: torch.Tensor | None, latents: torch.Tensor) -> torch.Tensor | None:
    """The decoding's mask: None, or (B or 1, 1, h, w) of values in [0, 1] on the latents' grid (bools become
    0 / 1), in the latents' dtype."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a (B, 1, h, w) tensor or None, got {type(mask).__name__}")
    batch, (h, w) = latents.shape[0], latents.shape[-2:]
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, batch) or tuple(mask.shape[-2:]) != (h, w):
        batches = "1" if batch == 1 else f"{batch} or 1"
        raise ValueError(f"mask: expected shape ({batches}, 1, {h}, {w}) (the latent grid), got "
                         f"{tuple(mask.shape)}" + ("; estimate_mask's (B, h, w) mask is mask[:, None]"
                                                   if mask.ndim == 3 else ""))
    if mask.is_complex() or not bool(((mask >= 0) & (mask <= 1)).all()):
        raise ValueError("mask: expected values in [0, 1] (1 = edit), e.g. 0 / 1 floats, integers or bools")
    return mask.to(latents.dtype)  # bools and integers (0 / 1) become 0 / 1 floats


# ----------------------------------------------------------------------------------------------------------------
# Text conditioning and classifier-free guidance, shared by the three steps


@dataclass(frozen=True)
class TextEmbeddings:
    """A batch of prompts as the UNet's cross-attention context, and their negative prompts for guidance."""

    cond: torch.Tensor  # (B, 77, D)
    uncond: torch.Tensor | None = None  # (B, 77, D); needed when a guidance scale is > 1

    def __len__(self) -> int:
        return self.cond.shape[0]

    def rows(self, start: int, stop: int) -> TextEmbeddings:
        """Prompts start .. stop - 1 of the batch."""
        return TextEmbeddings(self.cond[start:stop], None if self.uncond is None else self.uncond[start:stop])

    def repeat_interleave(self, n: int) -> TextEmbeddings:
        """Each prompt n times in a row (diffusers' `num_images_per_prompt` order)."""
        uncond = None if self.uncond is None else self.uncond.repeat_interleave(n, dim=0)
        return TextEmbeddings(self.cond.repeat_interleave(n, dim=0), uncond)


def encode_text(sd: StableDiffusion, prompts: list[str], negative_prompts: list[str] | None = None,
                clip_skip: int | None = None, negative_clip_skip: int | None = None,
                lora_scale: float = 1.0) -> TextEmbeddings:
    """CLIP text states of the prompts (and of the negative prompts, when given, one per prompt), the text
    encoder's LoRA adapters (if any) at `lora_scale`. `prompts` is a list even for one prompt: a bare string is
    refused, not read as one prompt per character."""
    check_prompt_list(prompts, "prompts")
    if negative_prompts is not None:
        check_prompt_list(negative_prompts, "negative_prompts")
        if len(negative_prompts) != len(prompts):
            raise ValueError(f"negative_prompts: {len(negative_prompts)} negative prompt(s) for {len(prompts)} "
                             "prompt(s): give one per prompt ([\"\"] * len(prompts) for none)")

    def states(texts: list[str], skip: int | None) -> torch.Tensor:
        with sd.lora.scaled("text_encoder", lora_scale):
            return sd.text_encoder(sd.tokenizer(list(texts)).to(sd.device), clip_skip=skip)

    uncond = None if negative_prompts is None else states(negative_prompts, negative_clip_skip)
    return TextEmbeddings(states(prompts, clip_skip), uncond)


def check_prompt_list(texts, name: str) -> None:
    """A non-empty list (or tuple) of strings, else a TypeError / ValueError naming `name` and the fix."""
    if isinstance(texts, str):
        raise TypeError(f"{name}: expected a list of strings, got a string: pass [{shorten(texts)}] for one prompt")
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"{name}: expected a list of strings, got {type(texts).__name__}")
    if not texts:
        raise ValueError(f"{name}: expected at least one prompt, got an empty list")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}]: expected a string (a prompt; may be \"\"), got {type(text).__name__}")


def check_params(params) -> None:
    """The steps' `params`: a DiffEditParams (a dict of fields is refused, not read field by field)."""
    if not isinstance(params, DiffEditParams):
        fix = "DiffEditParams(**params)" if isinstance(params, dict) else "DiffEditParams(...)"
        raise TypeError(f"params: expected a DiffEditParams, got {type(params).__name__}: pass {fix} (or "
                        "DiffEditParams.for_model(sd, ...) for the model's stored defaults)")


def at_lora_scale(step):
    """Run a step (a function of `sd` and `params`) with the UNet's LoRA adapters at `params.lora_scale`: the scale
    lives for the step's call only."""
    signature = inspect.signature(step)

    @functools.wraps(step)
    def run(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        sd, params = bound.arguments["sd"], bound.arguments["params"]
        check_params(params)
        with sd.lora.scaled("unet", params.lora_scale):
            return step(*args, **kwargs)
    return run


def guide(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans, arXiv 2207.12598, eq. 6): uncond + scale (cond - uncond)."""
    return uncond + scale * (cond - uncond)


class LoopText:
    """A text batch as a sampling loop feeds it to the UNet, [uncond; cond] for guided steps and cond alone for
    the others, each a `TextKV`: the text's cross-attention keys and values are made at the first step and reused
    at every later one (diffusers makes them at every step; the numbers are the same). Made per loop, so it never
    outlives the weights it was computed with."""

    def __init__(self, text: TextEmbeddings):
        self.guided = None if text.uncond is None else TextKV(torch.cat([text.uncond, text.cond]))  # (2B, 77, D)
        self.plain = TextKV(text.cond)  # (B, 77, D)


def predict_noise(sd: StableDiffusion, x: torch.Tensor, t: torch.Tensor, text: TextEmbeddings | LoopText,
                  scale: float) -> torch.Tensor:
    """The UNet's output at timestep t; guided, with one call on [uncond, cond], when scale > 1."""
    text = text if isinstance(text, LoopText) else LoopText(text)
    if scale <= 1:
        return sd.unet(x, t, text.plain)
    if text.guided is None:
        raise ValueError(f"guidance_scale {scale} > 1 needs negative prompt embeddings")
    uncond, cond = sd.unet(torch.cat([x, x]), t, text.guided).chunk(2)
    return guide(uncond, cond, scale)


def strength_timesteps(scheduler, num_inference_steps: int, strength: float, name: str) -> torch.Tensor:
    """The last int(N * strength) denoising timesteps, noisiest first (diffusers' `get_timesteps`)."""
    n = min(int(num_inference_steps * strength), num_inference_steps)
    if n == 0:
        raise ValueError(f"{name}={strength} with num_inference_steps={num_inference_steps} runs no step "
                         f"(int({num_inference_steps} * {strength}) = 0); use {name} >= "
                         f"{least_strength(num_inference_steps):g} or more steps")
    return scheduler.timesteps(num_inference_steps)[num_inference_steps - n:]


def schedule(sd: StableDiffusion, params: DiffEditParams):
    """The denoising schedule `params.sampler` runs on: the model's DDIM scheduler, or DPM-Solver++ on the same
    config (its own timesteps: `schedulers.dpm_solver.dpm_timesteps`)."""
    return sd.scheduler if params.sampler == "ddim" else DPMSolverScheduler(sd.scheduler.config)


def encode_images(sd: StableDiffusion, image: torch.Tensor, generator: Generator, repeats: int = 1, once: bool = True,
                  rows: int | None = None) -> torch.Tensor:
    """Latents sampled from the VAE posterior, times the scaling factor (Rombach et al. 2022, §3.1):
    (B * repeats, C, h, w), each image's `repeats` rows together, from one draw of that shape.

    `once=False` encodes each repeat separately, as diffusers' `generate_mask` does (D8; in `repeats` calls of the B
    pictures, where diffusers makes one call of B * repeats rows); the numbers are the same.
    `rows`, a multiple of the sampled rows, tiles the samples (diffusers' deprecated image-to-prompt broadcast).
    A batch with the latent channel count is taken as latents and only repeated."""
    image = image.to(device=sd.device, dtype=sd.dtype)
    if image.shape[1] == sd.vae.config.latent_channels:
        latents = image.repeat_interleave(repeats, dim=0)
    else:
        # once: one encode, its moments repeated; else each repeat encoded as diffusers does, B pictures per call
        # (one call of B * repeats rows held every copy's activations at once)
        moments = [vae_encode(sd, image).moments for _ in range(1 if once else repeats)]  # each (B, 2C, h, w)
        post = DiagonalGaussian(torch.stack(moments, dim=1).flatten(0, 1) if not once else
                                moments[0].repeat_interleave(repeats, dim=0))  # (B * repeats, 2C, h, w)
        latents = sd.vae.scaling_factor * post.sample(generator)
    rows = rows or latents.shape[0]
    if rows % latents.shape[0]:
        raise ValueError(f"cannot repeat {latents.shape[0] // repeats} image(s) over {rows // repeats} prompts")
    return torch.cat([latents] * (rows // latents.shape[0]))


# ----------------------------------------------------------------------------------------------------------------
# Step 1: mask estimation


@dataclass(frozen=True)
class MaskEstimate:
    mask: torch.Tensor  # (B, h, w) int64 at latent resolution, 1 = edit
    guidance_map: torch.Tensor  # (B, h, w) in [0, 1]: the map clamped at ratio x its mean, rescaled (before 0.5)
    difference: torch.Tensor  # (B, h, w): mean |eps_Q - eps_R| over the draws and channels, unscaled


@at_lora_scale
@torch.no_grad()
def estimate_mask(sd: StableDiffusion, image: torch.Tensor, source: TextEmbeddings, target: TextEmbeddings,
                  params: DiffEditParams, generator: Generator = None) -> MaskEstimate:
    """DiffEdit §3.2 step 1: the region where the reference text R (`source`) and the query Q (`target`) predict
    different noise. image (B, 3, H, W) in [-1, 1]; one prompt pair per image."""
    B, n, N = len(target), params.num_maps_per_mask, params.num_inference_steps
    check_images(sd, image, B)
    check_texts(source, target, guided=params.mask_guidance_scale > 1)
    check_generator(generator, B, n)
    t = strength_timesteps(schedule(sd, params), N, params.mask_encode_strength, "mask_encode_strength")[0]
    # n posterior samples per image (draw 1), noised to the mask strength (draw 2)
    x0 = encode_images(sd, image, generator, n, params.encode_image_once, rows=B * n)
    xt = sd.scheduler.add_noise(x0, randn(tuple(x0.shape), generator, x0.device, x0.dtype), t)
    # Noise predictions for both texts: one UNet call per MASK_DRAWS_PER_CALL draws (one call at the defaults)
    source, target = source.repeat_interleave(n), target.repeat_interleave(n)
    gaps = []
    for start in range(0, B * n, MASK_DRAWS_PER_CALL):
        stop = start + MASK_DRAWS_PER_CALL
        eps_source, eps_target = _text_pair_noise(sd, xt[start:stop], t, source.rows(start, stop),
                                                  target.rows(start, stop), params)
        gaps.append((eps_target - eps_source).abs())  # (draws, C, h, w)
    gap = torch.cat(gaps)
    if not bool(torch.isfinite(gap).all()):
        raise ImpossibleResultError(f"the mask step's noise predictions are non-finite (NaN or inf); "
                                    f"{overflow_hint(sd.dtype)}")
    # |eps_Q - eps_R| averaged over the n draws and the latent channels
    difference = gap.reshape(B, n, *gap.shape[1:]).mean([1, 2])  # (B, h, w)
    return threshold_map(difference, params)


# The mask step's draws per UNet call (each two or three rows): many maps, or many pictures at once, run in calls of
# this size instead of one call whose activations outgrow memory (and which is no faster per row on a CPU).
MASK_DRAWS_PER_CALL = 64


def _text_pair_noise(sd: StableDiffusion, xt: torch.Tensor, t: torch.Tensor, source: TextEmbeddings,
                     target: TextEmbeddings, params: DiffEditParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps_R, eps_Q) from one UNet call on [R-, R, Q-, Q] (guided; R- computed once when it equals Q-) or [R, Q].

    diffusers unpacks `encode_prompt`'s (prompt, negative) as (negative, prompt), so it guides from the prompt
    towards the negative prompt, and without guidance it has no second element to unpack (D9, TypeError). The
    compatible mode keeps the swapped guidance; since both negatives are usually "", the swap only rescales the
    map by (scale - 1), which the mean-relative threshold removes."""
    scale = params.mask_guidance_scale
    if scale <= 1:
        if not params.mask_without_guidance:
            raise TypeError("expected Tensor as element 0 in argument 0, but got NoneType (diffusers 0.42.1's "
                            "generate_mask fails when guidance_scale <= 1; mask_without_guidance=True fixes it)")
        return sd.unet(torch.cat([xt] * 2), t, torch.cat([source.cond, target.cond])).chunk(2)
    pairs = [(text.uncond, text.cond) for text in (source, target)]
    if not params.mask_without_guidance:
        pairs = [(cond, uncond) for uncond, cond in pairs]
    a_source, b_source, a_target, b_target = _noise_under(sd, xt, t, [e for pair in pairs for e in pair])
    return guide(a_source, b_source, scale), guide(a_target, b_target, scale)


def _noise_under(sd: StableDiffusion, x: torch.Tensor, t: torch.Tensor,
                 contexts: list[torch.Tensor]) -> list[torch.Tensor]:
    """The UNet's output for x under each context, from one call in which a context equal to an earlier one (the
    two negative prompts, both "" by default) is computed once: three rows per draw instead of four."""
    distinct: list[torch.Tensor] = []
    index = []
    for c in contexts:
        k = next((i for i, d in enumerate(distinct) if d is c or (d.shape == c.shape and torch.equal(d, c))), None)
        if k is None:
            distinct.append(c)
            k = len(distinct) - 1
        index.append(k)
    out = sd.unet(torch.cat([x] * len(distinct)), t, torch.cat(distinct)).chunk(len(distinct))
    return [out[k] for k in index]


def threshold_map(difference: torch.Tensor, params: DiffEditParams) -> MaskEstimate:
    """Clamp the map at `mask_thresholding_ratio` times its mean, rescale to [0, 1] (the guidance map), and
    binarize it by `mask_threshold_rule`:
    - "ratio" (the default, diffusers' and the paper's way): edit where the rescaled map is > 0.5;
    - "otsu": edit where it is above Otsu's threshold (Otsu, "A threshold selection method from gray-level
      histograms", 1979): per image, the cut between two of its distinct values that maximizes the between-class
      variance w0 w1 (mu0 - mu1)^2, the lowest such cut on a tie; a map of one value has no cut: an empty mask.

    The mean is the batch's in diffusers (D2) and each image's when `per_image_mask_scale`. A zero map (the two
    texts give the same noise) is 0/0 = NaN in diffusers, hence a full mask (D3); `empty_mask_when_equal` makes
    it an empty mask and warns. It also takes a clamp that rounds to 0 on a map that is not zero (a tiny ratio:
    1e-300 is 0 in float32) as what it tends to, a clamp just above 0: the rescaled map is 1 where the map is
    > 0, 0 where it is 0 (diffusers: 0/0, a full mask)."""
    check_params(params)
    if params.per_image_mask_scale:
        scale = difference.mean(dim=(1, 2), keepdim=True) * params.mask_thresholding_ratio  # (B, 1, 1)
    else:
        scale = difference.mean() * params.mask_thresholding_ratio
    clamped = difference.clamp(min=0)
    if params.empty_mask_when_equal:
        # identical texts: told by the map itself (all zero), not by the clamp (which a tiny ratio rounds to 0)
        equal = ~(clamped > 0).flatten(1).any(dim=1)  # (B,)
        if bool(equal.any()):
            which = "" if len(equal) == 1 else f" for picture(s) {', '.join(map(str, equal.nonzero()[:, 0].tolist()))}"
            warnings.warn(f"the source and target prompts give identical noise predictions{which}: the mask is "
                          "empty (nothing would be edited)", stacklevel=3)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        guidance_map = torch.where(scale > 0, torch.minimum(clamped, safe) / safe, (clamped > 0).to(clamped.dtype))
    else:
        guidance_map = torch.minimum(clamped, scale) / scale
    cut = 0.5 if params.mask_threshold_rule == "ratio" else otsu_threshold(guidance_map)  # scalar or (B, 1, 1)
    mask = torch.where(guidance_map <= cut, 0, 1)
    return MaskEstimate(mask, guidance_map, difference)


def otsu_threshold(maps: torch.Tensor) -> torch.Tensor:
    """Otsu's threshold of each map (B, h, w) -> (B, 1, 1): the value t that splits the map's values into
    {<= t} and {> t} with the largest between-class variance w0 w1 (mu0 - mu1)^2 (the lowest t on a tie); a map of
    one value gets its maximum, so nothing lies above it."""
    values, _ = maps.flatten(1).double().sort(dim=1)  # (B, n), ascending
    n = values.shape[1]
    below = torch.arange(1, n, device=maps.device, dtype=torch.float64)  # the first k values are class 0
    lower = values.cumsum(1)[:, :-1]  # (B, n-1) sums of the k lowest
    mu0, mu1 = lower / below, (values.sum(1, keepdim=True) - lower) / (n - below)
    between = (below / n) * (1 - below / n) * (mu0 - mu1) ** 2
    between = torch.where(values[:, :-1] < values[:, 1:], between, -1.0)  # cut only between distinct values
    best = between.argmax(1)  # the first maximum: the lowest cut on a tie
    cut = torch.where(between.amax(1) >= 0, values.gather(1, best[:, None])[:, 0], values[:, -1])
    return cut.to(maps.dtype)[:, None, None]


# ----------------------------------------------------------------------------------------------------------------
# Step 2: DDIM encoding (inversion), with pix2pix-zero's optional noise regularization


def inversion_timesteps(sd: StableDiffusion, params: DiffEditParams) -> torch.Tensor:
    """The levels an inversion with `params` leaves latents at, noisiest first: DDIM's inverse schedule up to the
    encoding ratio, or (DPM-Solver++) the decoding's own levels, which `decode` pastes."""
    N = params.num_inference_steps
    if params.sampler == "dpmsolver++":
        return strength_timesteps(schedule(sd, params), N, params.inpaint_strength, "inpaint_strength")
    n = len(strength_timesteps(sd.scheduler, N, params.inpaint_strength, "inpaint_strength"))
    return sd.inverse_scheduler.timesteps(N)[:n].flip(0)


@dataclass(frozen=True)
class Inversion:
    """The DDIM encoding of a batch: what `decode` pastes outside the mask, reusable for any number of targets."""

    latents: torch.Tensor  # (B, T, C, h, w): x_t at each level, noisiest (x_r) first, as diffusers returns them
    timesteps: torch.Tensor  # (T,) int64: the level t of each latent, descending (SD, r=0.8: 781, 761, ..., 1)
    clean: torch.Tensor  # (B, C, h, w): the sampled image latents x_0 the encoding started from

    def repeat_interleave(self, n: int) -> Inversion:
        return Inversion(self.latents.repeat_interleave(n, dim=0), self.timesteps,
                         self.clean.repeat_interleave(n, dim=0))


@at_lora_scale
@torch.no_grad()
def invert(sd: StableDiffusion, image: torch.Tensor, text: TextEmbeddings, params: DiffEditParams,
           generator: Generator = None, callback: StepCallback | None = None) -> Inversion:
    """DiffEdit §3.2 step 2: deterministic DDIM encoding (Song et al. 2021, eq. 13 run backwards) of the image up
    to the encoding ratio r = `inpaint_strength`, keeping every intermediate latent. The network is conditioned
    on `text` (the reference R) with `inversion_guidance_scale`; image (B, 3, H, W) in [-1, 1] or latents."""
    check_images(sd, image, len(text))
    check_texts(text, guided=params.inversion_guidance_scale > 1)
    check_generator(generator, len(text))
    if params.sampler == "dpmsolver++":
        return invert_dpm(sd, image, text, params, generator, callback)
    N = params.num_inference_steps
    steps = inversion_timesteps(sd, params).flip(0)  # cleanest first: 1, 21, ..., 781
    x = clean = encode_images(sd, image, generator, rows=len(text))
    guided = params.inversion_guidance_scale > 1
    latents, watch, loop_text = [], FirstNonFinite(x.device), LoopText(text)
    for i, t in enumerate(steps):
        eps = predict_noise(sd, x, t, loop_text, params.inversion_guidance_scale)
        if params.num_reg_steps > 0:
            # diffusers converts v to eps against the guided batch [x, x] (D5); the fix uses x itself
            sample = torch.cat([x, x]) if guided and not params.portable_regularizer else x
            eps = regularize_noise(eps, sample, sd.inverse_scheduler.alphas_cumprod[t],
                                   sd.inverse_scheduler.config.prediction_type, params, generator)
        x = sd.inverse_scheduler.step(eps, t, x, N).prev_sample
        latents.append(x)
        watch.see(i, x)
        if callback is not None:
            callback(i, t, x)
    watch.check("inversion's", steps)
    return Inversion(torch.stack(latents[::-1], dim=1), steps.flip(0), clean)  # (B, T, C, h, w)


def as_epsilon(model_output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor,
               prediction_type: str) -> torch.Tensor:
    """The noise implied by the network's output for a sample at level alpha (v: Salimans & Ho 2022, §4)."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha**0.5 * model_output + (1 - alpha) ** 0.5 * sample
    return (sample - alpha**0.5 * model_output) / (1 - alpha) ** 0.5


def auto_corr_loss(noise: torch.Tensor, generator: Generator = None, portable: bool = True) -> torch.Tensor:
    """pix2pix-zero's pairwise auto-correlation loss (Parmar et al., arXiv 2302.03027, §3.1): for each image and
    channel, and each level of a 2x2 average-pooling pyramid down to 8 rows, the squared mean of the map times
    itself rolled by a random s in [0, H/2) along each axis. One `randint` per image, channel and level.

    diffusers draws the rolls on the CPU whatever the generator (a CUDA generator fails, D5); `portable` draws
    them on the generator's device and, for a list of generators, image i's rolls from generator i."""
    loss = 0.0
    for i in range(noise.shape[0]):
        gen = generator[i] if portable and isinstance(generator, list) else generator
        for j in range(noise.shape[1]):
            x = noise[i : i + 1, j : j + 1]  # (1, 1, H, W)
            while True:
                shift = _randint(x.shape[2] // 2, gen, portable)
                loss += (x * torch.roll(x, shifts=shift, dims=2)).mean() ** 2
                loss += (x * torch.roll(x, shifts=shift, dims=3)).mean() ** 2
                if x.shape[2] <= 8:
                    break
                x = F.avg_pool2d(x, kernel_size=2)
    return loss


def _randint(high: int, generator: Generator, portable: bool) -> int:
    if not portable:
        return torch.randint(high, (1,), generator=generator).item()
    device = generator.device if isinstance(generator, torch.Generator) else torch.device("cpu")
    return torch.randint(high, (1,), generator=generator, device=device).item()


def kl_loss(noise: torch.Tensor, per_image: bool = True) -> torch.Tensor:
    """var + mean^2 - 1 - log(var): zero iff the values have mean 0 and variance 1 (pix2pix-zero §3.1).
    diffusers pools a batch into one set of values; `per_image` sums each image's own term."""
    def term(x):
        return x.var() + x.mean() ** 2 - 1 - torch.log(x.var() + 1e-7)

    return sum(term(x) for x in noise) if per_image else term(noise)


def regularize_noise(model_output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor, prediction_type: str,
                     params: DiffEditParams, generator: Generator = None) -> torch.Tensor:
    """pix2pix-zero's noise regularization of an inversion step (not in the DiffEdit paper): `num_reg_steps`
    rounds of gradient steps on the network's output that pull its implied noise towards i.i.d. N(0, I):
    `num_auto_corr_rolls` steps of `lambda_auto_corr` x the auto-correlation loss, then one of `lambda_kl` x KL."""
    portable = params.portable_regularizer

    def gradient(loss_fn) -> torch.Tensor:
        with torch.enable_grad():
            out = model_output.detach().clone().requires_grad_(True)
            return torch.autograd.grad(loss_fn(as_epsilon(out, sample, alpha, prediction_type)), out)[0]

    for _ in range(params.num_reg_steps):
        if params.lambda_auto_corr > 0:
            for _ in range(params.num_auto_corr_rolls):
                grad = gradient(lambda eps: auto_corr_loss(eps, generator, portable))
                model_output = model_output - params.lambda_auto_corr * (grad / params.num_auto_corr_rolls)
        if params.lambda_kl > 0:
            grad = gradient(lambda eps: kl_loss(eps, per_image=portable))
            model_output = model_output - params.lambda_kl * grad
    return model_output.detach()


# ----------------------------------------------------------------------------------------------------------------
# Step 3: decoding with mask guidance


@at_lora_scale
@torch.no_grad()
def decode(sd: StableDiffusion, inversion: Inversion | torch.Tensor, mask: torch.Tensor | None, text: TextEmbeddings,
           params: DiffEditParams, generator: Generator = None,
           callback: StepCallback | None = None) -> torch.Tensor:
    """DiffEdit §3.2 step 3: DDIM decoding from x_r conditioned on the query Q (`text`, `guidance_scale`, or no
    guidance at timesteps below `guidance_min_timestep`); after each step the latents outside the mask are
    replaced by the inverted ones, y = M y + (1 - M) x.
    mask (B, 1, h, w) of 0 / 1, or None for plain DDIM decoding (the paper's "Encode-Decode" baseline).
    Returns the final latents (B, C, h, w); `to_pixels` decodes them."""
    latents = inversion.latents if isinstance(inversion, Inversion) else inversion
    if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
        raise ValueError("inversion: expected an Inversion or its (B, T, C, h, w) latents")
    if latents.shape[0] != len(text):
        raise ValueError(f"the inversion holds {latents.shape[0]} picture(s) but {len(text)} target prompt(s) were "
                         "given: give one prompt per inverted picture (invert with as many prompts as you decode "
                         "with, or Inversion.repeat_interleave(n) for n targets per picture)")
    mask = check_mask(mask, latents)
    check_texts(text, guided=params.guidance_scale > 1)
    check_generator(generator, len(text))
    if params.sampler == "dpmsolver++":
        return decode_dpm(sd, inversion, mask, text, params, callback)
    N = params.num_inference_steps
    steps = strength_timesteps(sd.scheduler, N, params.inpaint_strength, "inpaint_strength")
    start, backgrounds = pasted_latents(sd, inversion, steps, params, backgrounds=mask is not None)
    x, watch, loop_text = start.clone(), FirstNonFinite(start.device), LoopText(text)
    for i, t in enumerate(steps):
        scale = params.guidance_scale if t >= params.guidance_min_timestep else 1.0
        eps = predict_noise(sd, x, t, loop_text, scale)
        x = sd.scheduler.step(eps, t, x, N, eta=params.eta, generator=generator).prev_sample
        if mask is not None:
            x = x * mask + backgrounds[i] * (1 - mask)
        watch.see(i, x)
        if callback is not None:
            callback(i, t, x)
    watch.check("decoding's", steps)
    return x


@torch.no_grad()
def invert_dpm(sd: StableDiffusion, image: torch.Tensor, text: TextEmbeddings, params: DiffEditParams,
               generator: Generator = None, callback: StepCallback | None = None) -> Inversion:
    """Step 2 with DPM-Solver++ (arXiv 2211.01095, the 2M update run towards noise): the image's latents climb the
    decoding's own levels, cleanest first, so that the decoding finds a latent at every level it pastes. The first
    step leaves the clean end as DDIM's inversion does (the network at the first level, on the clean latents:
    x = alpha x0 + sigma eps); the next is first order, the rest second order on the previous x0."""
    check_params(params)  # a DiffEditParams refuses num_reg_steps > 0 and eta > 0 with this sampler
    dpm, N = schedule(sd, params), params.num_inference_steps
    steps = inversion_timesteps(sd, params)  # noisiest first
    s = dpm.levels(N)[N - len(steps) : N].flip(0)  # (n,) the levels, cleanest first
    up = steps.flip(0)  # the timesteps, cleanest first
    x = clean = encode_images(sd, image, generator, rows=len(text))
    latents, watch, loop_text, previous = [], FirstNonFinite(x.device), LoopText(text), None
    for k, t in enumerate(up):
        if k == 0:
            eps = as_epsilon(predict_noise(sd, x, t, loop_text, params.inversion_guidance_scale), x,
                             sd.scheduler.alphas_cumprod[t], sd.scheduler.config.prediction_type)
            alpha, sigma = dpm_alpha_sigma(s[0])
            x = alpha * clean + sigma * eps  # noise predicted at the first level, from the clean latents
        else:
            out = predict_noise(sd, x, up[k - 1], loop_text, params.inversion_guidance_scale)  # at the source level
            x0 = dpm_data_prediction(out, x, s[k - 1], sd.scheduler.config.prediction_type)
            x = dpm_update(x, x0, previous, s[k - 2] if k >= 2 else None, s[k - 1], s[k]).to(x.dtype)
            previous = x0
        latents.append(x)
        watch.see(k, x)
        if callback is not None:
            callback(k, t, x)
    watch.check("inversion's", up)
    return Inversion(torch.stack(latents[::-1], dim=1), steps, clean)  # (B, n, C, h, w), noisiest first


@torch.no_grad()
def decode_dpm(sd: StableDiffusion, inversion: Inversion, mask: torch.Tensor | None, text: TextEmbeddings,
               params: DiffEditParams, callback: StepCallback | None = None) -> torch.Tensor:
    """Step 3 with DPM-Solver++ (2M; first order at the first step and onto the clean end): from the inverted
    latent at the first decoding level; after each step, outside the mask, the inverted latent at the level the
    step reached (the clean latents after the last)."""
    check_params(params)
    dpm, N = schedule(sd, params), params.num_inference_steps
    steps = strength_timesteps(dpm, N, params.inpaint_strength, "inpaint_strength")
    s, first = dpm.levels(N), N - len(steps)  # s: (N + 1,) levels of the whole schedule, then 0
    if not isinstance(inversion, Inversion):
        raise TypeError(f"sampler='dpmsolver++' decodes an Inversion (latents with their levels, as invert "
                        f"returns), not {type(inversion).__name__}: a bare latent tensor does not say which level "
                        "each latent is at")
    by_level = {int(t): inversion.latents[:, k] for k, t in enumerate(inversion.timesteps)}
    needed = steps if mask is not None else steps[:1]  # without a mask only the starting latent is read
    missing = [int(t) for t in needed if int(t) not in by_level]
    if missing:
        raise ValueError(f"the inverted latents hold timesteps {sorted(by_level, reverse=True)} but this decoding "
                         f"needs {missing}: invert with the same sampler, num_inference_steps and an "
                         "inpaint_strength at least as large")
    x, previous = by_level[int(steps[0])].clone(), None
    watch, loop_text = FirstNonFinite(x.device), LoopText(text)
    for i, t in enumerate(steps):
        scale = params.guidance_scale if t >= params.guidance_min_timestep else 1.0
        x0 = dpm_data_prediction(predict_noise(sd, x, t, loop_text, scale), x, s[first + i],
                                 sd.scheduler.config.prediction_type)
        last = i == len(steps) - 1
        x = dpm_update(x, x0, None if i == 0 or last else previous, s[first + i - 1] if i else None,
                       s[first + i], s[first + i + 1]).to(x0.dtype)
        previous = x0
        if mask is not None:
            background = inversion.clean if last else by_level[int(steps[i + 1])]
            x = x * mask + background * (1 - mask)
        watch.see(i, x)
        if callback is not None:
            callback(i, t, x)
    watch.check("decoding's", steps)
    return x


def pasted_latents(sd: StableDiffusion, inversion: Inversion | torch.Tensor, steps: torch.Tensor,
                   params: DiffEditParams, backgrounds: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The starting latent and, for each decoding step, the inverted latent pasted outside the mask.

    diffusers pairs step i with the i-th inverted latent by position: the pasted background sits at the step's
    source level (one step noisier than the edited part), the last one at t=1, never the clean latents (D1), and
    the inversion must have exactly as many latents as the call has steps (D7). With `slice_inverted_latents`
    each latent is found by its level (an `Inversion` knows them; a bare tensor is taken to come from this step
    count), so any strength up to the inverted one and any step count whose levels the inversion visited work;
    with `paste_matching_step` the background is taken at the step's target level, and the clean latents after
    the last step (a bare tensor has none: its t=1 latent stays). Without `backgrounds` (a decoding without a
    mask) only the starting latent is looked up."""
    latents = inversion.latents if isinstance(inversion, Inversion) else inversion
    clean = inversion.clean if isinstance(inversion, Inversion) else None
    if not params.slice_inverted_latents:
        if latents.shape[1] != len(steps):
            raise ValueError(f"image_latents hold latent images from {latents.shape[1]} timesteps, but this call "
                             f"runs {len(steps)} (invert and decode with the same num_inference_steps and "
                             "inpaint_strength, or set slice_inverted_latents=True)")
        levels = steps.tolist()
    elif isinstance(inversion, Inversion):
        levels = inversion.timesteps.tolist()
    else:
        levels = sd.scheduler.timesteps(params.num_inference_steps)[-latents.shape[1]:].tolist()
    by_level = {t: latents[:, k] for k, t in enumerate(levels)}

    def at(t: int) -> torch.Tensor:
        if t not in by_level:
            raise ValueError(f"the inverted latents hold timesteps {levels[0]} .. {levels[-1]} ({len(levels)} "
                             f"levels) but this call needs timestep {t}: invert with the same num_inference_steps "
                             "(or one whose timesteps include these) and an inpaint_strength at least as large")
        return by_level[t]

    stride = sd.scheduler.config.num_train_timesteps // params.num_inference_steps
    steps = steps.tolist()
    if not backgrounds:
        return at(steps[0]), []
    if not params.paste_matching_step:
        return at(steps[0]), [at(t) for t in steps]
    last = clean if clean is not None else at(steps[-1])
    # A step's target level t - stride; at or below 0 (and not itself inverted: steps_offset 0 inverts level 0) it
    # is the clean end of the schedule, whose latent is the image's own
    return at(steps[0]), [at(t - stride) if t - stride in by_level or t - stride > 0 else last for t in steps]


@torch.no_grad()
def to_pixels(sd: StableDiffusion, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, C, h, w) -> images (B, 3, H, W), roughly in [-1, 1]; non-finite pixels are an error."""
    channels = sd.vae.config.latent_channels
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents: expected a (B, {channels}, h, w) tensor (decode's output), got "
                        f"{type(latents).__name__}")
    if latents.ndim != 4 or latents.shape[1] != channels or not latents.is_floating_point():
        raise ValueError(f"latents: expected floating-point (B, {channels}, h, w) latents (decode's output; "
                         f"{channels}: the VAE's latent channels), got {tuple(latents.shape)} {latents.dtype}"
                         + ("; one picture's latents are latents[None]" if latents.ndim == 3 else ""))
    pixels = vae_decode(sd, latents / sd.vae.scaling_factor)
    if not bool(torch.isfinite(pixels).all()):
        raise ImpossibleResultError(f"the decoded pixels are non-finite (NaN or inf); {overflow_hint(sd.dtype)}")
    return pixels

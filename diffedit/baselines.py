"""DiffEdit and the methods the paper compares it with, as functions of one signature (as k-diffusion's samplers
share one), so that a new baseline is one more function:

    edited = METHODS[name](sd, pixels, source, target, params, generator, truth, steps)   # -> Edited

pixels (B, 3, H, W) in [-1, 1]; source, target: `method.TextEmbeddings` with one row per image; generator: one, or
one per image (each image then draws what it draws alone); truth: a (B, h, w) bool region on the latent grid, or None
(only "diffedit-gt-mask" needs it); steps: how DiffEdit's steps are run (`reuse.Steps`, the default: `method`'s
functions; `reuse.SharedSteps` shares the map and the inversion between settings).
Couairon et al., arXiv 2210.11427, §4:

- "diffedit": the estimated mask, the DDIM encoding to r, the masked decoding (§3.2; random draws in diffusers'
  order, so one image gives `api.edit_each`'s numbers);
- "diffedit-gt-mask": the same encoding and decoding with the ground-truth region as the mask (the mask
  estimation's ceiling);
- "encode-decode": the DDIM encoding to r and a plain decoding under the target, no mask;
- "sdedit": Meng et al., "SDEdit", arXiv 2108.01073: fresh Gaussian noise to level r instead of the encoding, then the
  same plain decoding (diffusers' image-to-image pipeline with DDIM, same draws).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import method
from .method import Inversion, TextEmbeddings
from .params import DiffEditParams
from .reuse import Steps
from .schedulers.noise import randn
from .stable_diffusion import StableDiffusion


@dataclass(frozen=True)
class Edited:
    latents: torch.Tensor  # (B, C, h, w): the edit's final latents (`method.to_pixels` decodes them)
    latent_mask: torch.Tensor | None  # (B, h, w) bool: the region the decoding edited apart; None: no mask
    guidance_map: torch.Tensor | None = None  # (B, h, w) in [0, 1]: the map an estimated mask was cut from


def diffedit(sd: StableDiffusion, pixels: torch.Tensor, source: TextEmbeddings, target: TextEmbeddings,
             params: DiffEditParams, generator: method.Generator = None, truth: torch.Tensor | None = None,
             steps: Steps = Steps()) -> Edited:
    """DiffEdit (§3.2): mask, encoding, masked decoding. `truth` is not used."""
    est = steps.estimate_mask(sd, pixels, source, target, params, generator)
    inversion = steps.invert(sd, pixels, source, params, generator)
    mask = est.mask[:, None].to(inversion.latents.dtype)  # (B, 1, h, w)
    return Edited(steps.decode(sd, inversion, mask, target, params, generator), est.mask.bool(), est.guidance_map)


def diffedit_gt_mask(sd: StableDiffusion, pixels: torch.Tensor, source: TextEmbeddings, target: TextEmbeddings,
                     params: DiffEditParams, generator: method.Generator = None,
                     truth: torch.Tensor | None = None, steps: Steps = Steps()) -> Edited:
    """DiffEdit's encoding and masked decoding with the ground-truth region `truth` (B, h, w) as the mask."""
    if truth is None:
        raise ValueError("diffedit-gt-mask needs the ground-truth edit region (truth)")
    inversion = steps.invert(sd, pixels, source, params, generator)
    mask = truth[:, None].to(inversion.latents.device, inversion.latents.dtype)  # (B, 1, h, w)
    return Edited(steps.decode(sd, inversion, mask, target, params, generator), truth.bool())


def encode_decode(sd: StableDiffusion, pixels: torch.Tensor, source: TextEmbeddings, target: TextEmbeddings,
                  params: DiffEditParams, generator: method.Generator = None,
                  truth: torch.Tensor | None = None, steps: Steps = Steps()) -> Edited:
    """Encode-Decode (§4): the DDIM encoding to r, then decoding under the target with no mask."""
    inversion = steps.invert(sd, pixels, source, params, generator)
    return Edited(steps.decode(sd, inversion, None, target, params, generator), None)


def sdedit(sd: StableDiffusion, pixels: torch.Tensor, source: TextEmbeddings, target: TextEmbeddings,
           params: DiffEditParams, generator: method.Generator = None, truth: torch.Tensor | None = None,
           steps: Steps = Steps()) -> Edited:
    """SDEdit: x_r = sqrt(a_r) x_0 + sqrt(1 - a_r) eps with fresh noise at the first decoding level r, then the
    plain decoding. The source text is not used: SDEdit knows only the target."""
    N = params.num_inference_steps
    t = method.strength_timesteps(method.schedule(sd, params), N, params.inpaint_strength, "inpaint_strength")[:1]
    x0 = method.encode_images(sd, pixels, generator, rows=len(target))  # draw 1: the posterior sample
    xt = sd.scheduler.add_noise(x0, randn(tuple(x0.shape), generator, x0.device, x0.dtype), t)  # draw 2
    noised = Inversion(xt[:, None], t.cpu().long(), x0)  # one level: nothing to paste, so found by its level
    plain = dataclasses.replace(params, slice_inverted_latents=True)
    return Edited(steps.decode(sd, noised, None, target, plain, generator), None)


Method = Callable[..., Edited]
METHODS: dict[str, Method] = {"diffedit": diffedit, "diffedit-gt-mask": diffedit_gt_mask,
                              "encode-decode": encode_decode, "sdedit": sdedit}
NEEDS_TRUTH = frozenset({"diffedit-gt-mask"})

"""What the pipeline parity tests share: diffusers' DiffEdit pipeline on a tiny folder, the test pictures and
generators, the error measures and the facade's tolerances (the same everywhere our pipeline meets diffusers')."""

import numpy as np
import PIL.Image
import torch

MASK_TOL = 0.99  # fraction of mask pixels that must agree
LATENT_TOL = 1e-3  # relative (Frobenius) error of latents
IMAGE_TOL = 5e-3  # max abs error of decoded images in [0, 1]


def reference_pipeline(folder, safety_checker: bool = False):
    """diffusers' StableDiffusionDiffEditPipeline on `folder` with a DDIM inverse scheduler of the same config;
    without its safety checker unless asked (then the folder's own)."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionDiffEditPipeline

    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    off = {} if safety_checker else {"safety_checker": None, "requires_safety_checker": False}
    pipe = StableDiffusionDiffEditPipeline.from_pretrained(
        folder, scheduler=scheduler, inverse_scheduler=DDIMInverseScheduler.from_config(scheduler.config), **off)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(seed: int = 0, size=(64, 64)) -> PIL.Image.Image:
    """A smooth random picture (blurred blobs), so the tiny VAE sees structure rather than pixel noise."""
    small = np.random.RandomState(seed).rand(4, 4, 3)
    return PIL.Image.fromarray((small * 255).astype(np.uint8)).resize(size, PIL.Image.BICUBIC)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel(ours, ref) -> float:
    ours, ref = torch.as_tensor(np.asarray(ours)).double(), torch.as_tensor(np.asarray(ref)).double()
    return ((ours - ref).norm() / ref.norm()).item()


def max_abs(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, dtype=np.float64) - np.asarray(ref, dtype=np.float64)).max())

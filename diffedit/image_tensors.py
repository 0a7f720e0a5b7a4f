"""Pictures to the model's tensors and back: PIL / numpy / torch in, (B, 3, H, W) in [-1, 1] with sides a multiple
of the VAE factor; [-1, 1] tensors out as numpy, PIL or torch; binary masks between latent grids and pictures.
Number for number diffusers' `VaeImageProcessor` defaults (and the DiffEdit pipeline's `preprocess_mask`), so the
compatible facade sees the same pixels.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .image_files import displayed, displayed_rgb, mask_cells, mask_samples, read_image, read_mask, sample_bits, to_rgb
from .validation import one_line

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | list


def numpy_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
    """(B, H, W, C) or (H, W, C) floats in [0, 1] -> PIL images (one channel -> mode "L")."""
    if images.ndim == 3:
        images = images[None]
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [PIL.Image.fromarray(image[..., 0], mode="L") for image in images]
    return [PIL.Image.fromarray(image) for image in images]


def _floor_to_multiple(height: int, width: int, factor: int) -> tuple[int, int]:
    return height - height % factor, width - width % factor


def to_tensor(image: ImageInput, vae_scale_factor: int) -> torch.Tensor:
    """PIL image(s), numpy (H, W, C) / (B, H, W, C) in [0, 1], or torch (C, H, W) / (B, C, H, W) in [0, 1] ->
    (B, C, H', W') float32 in [-1, 1], H' and W' rounded down to a multiple of `vae_scale_factor` (PIL: Lanczos
    resize; arrays: nearest). Arrays already in [-1, 1] (a negative value) are kept, with a warning, as diffusers
    does; a torch batch with 4 channels is taken as latents and returned as is. PIL images of any mode are read as
    `image_files.to_rgb` reads them; arrays of another shape, dtype or range are a ValueError (`_checked_pixels`)."""
    images = image if isinstance(image, list) else [image]
    if not images:
        raise ValueError("no image given")
    first = images[0]
    if isinstance(first, PIL.Image.Image):
        w, h = first.size
        h, w = _floor_to_multiple(h, w, vae_scale_factor)
        if h == 0 or w == 0:
            raise ValueError(f"image of size {first.size} is smaller than the VAE factor {vae_scale_factor}")
        # as everywhere in diffedit (`image_files.to_rgb`): 16-bit, 32-bit and float samples by their format's
        # range (Pillow's own conversion clips them to 0-255), transparency onto white
        images = [to_rgb(im, "image") for im in images]
        arrays = [np.array(im.resize((w, h), resample=PIL.Image.LANCZOS)).astype(np.float32) / 255.0 for im in images]
        batch = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2))  # (B, 3, H, W)
    elif isinstance(first, np.ndarray):
        arrays = np.concatenate(images) if first.ndim == 4 else np.stack(images)
        if arrays.ndim == 3:
            arrays = arrays[..., None]
        if arrays.ndim == 4:
            arrays = arrays.transpose(0, 3, 1, 2)
        batch = _resize_nearest(_checked_pixels(torch.from_numpy(arrays), first, vae_scale_factor), vae_scale_factor)
    elif isinstance(first, torch.Tensor):
        batch = torch.cat(images) if first.ndim == 4 else torch.stack(images)
        if batch.ndim == 4 and batch.shape[1] == 4:  # latents, not pixels
            return batch
        batch = _resize_nearest(_checked_pixels(batch, first, vae_scale_factor), vae_scale_factor)
    else:
        raise TypeError(f"image must be a PIL image, a numpy array, a torch tensor or a list of them, "
                        f"got {type(first).__name__}")
    if batch.min() < 0:
        warnings.warn("image values are below 0: taken as already in [-1, 1] (pass [0, 1] images)", FutureWarning)
        return batch
    return 2.0 * batch - 1.0


def _checked_pixels(batch: torch.Tensor, first: np.ndarray | torch.Tensor, factor: int) -> torch.Tensor:
    """A numpy or torch batch (B, C, H, W) as the VAE can take it, or a ValueError naming `image`, what it holds
    and the fix: 3 channels, sides of at least `factor`, finite floats in [0, 1] (or [-1, 1]). diffusers takes
    anything here: other values become garbage pixels, silently (0-255 floats, NaN); other shapes fail deep in the
    VAE or in a resize."""
    kind = "an array" if isinstance(first, np.ndarray) else "a tensor"
    layout = "(H, W, 3) or (B, H, W, 3)" if isinstance(first, np.ndarray) else "(3, H, W) or (B, 3, H, W)"
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"image: {kind} of pixels must be {layout} (RGB), got shape {tuple(first.shape)}")
    if batch.shape[2] < factor or batch.shape[3] < factor:
        raise ValueError(f"image of size {batch.shape[3]}x{batch.shape[2]} is smaller than the VAE factor {factor}")
    if not batch.is_floating_point():
        raise ValueError(f"image: expected floats in [0, 1], got dtype {str(batch.dtype).removeprefix('torch.')}")
    if not bool(torch.isfinite(batch).all()):
        raise ValueError("image holds NaN or infinite values: give floats in [0, 1]")
    lo, hi = float(batch.min()), float(batch.max())
    if lo < -1 or hi > 1:
        raise ValueError(f"image: values in [{lo:g}, {hi:g}]: give floats in [0, 1] (or in [-1, 1]); 0-255 values: "
                         "divide by 255")
    return batch


def _resize_nearest(batch: torch.Tensor, factor: int) -> torch.Tensor:
    h, w = _floor_to_multiple(batch.shape[2], batch.shape[3], factor)
    return F.interpolate(batch, size=(h, w))


def to_output(images: torch.Tensor, output_type: str = "pil", do_denormalize: list[bool] | None = None):
    """(B, 3, H, W) in [-1, 1] -> "pt": the tensor in [0, 1]; "np": (B, H, W, 3) float32 in [0, 1]; "pil": list
    of PIL images. `do_denormalize` (diffusers' postprocess): False leaves that picture's values as they are (the
    safety checker's zeros stay black)."""
    if output_type not in ("pt", "np", "pil"):
        raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
    if do_denormalize is None:
        images = (images * 0.5 + 0.5).clamp(0, 1)
    else:
        images = torch.stack([(x * 0.5 + 0.5).clamp(0, 1) if d else x for x, d in zip(images, do_denormalize)])
    if output_type == "pt":
        return images
    array = images.cpu().permute(0, 2, 3, 1).float().numpy()  # (B, H, W, 3)
    return array if output_type == "np" else numpy_to_pil(array)


def mask_to_pil(mask: np.ndarray | torch.Tensor) -> list[PIL.Image.Image]:
    """Binary masks (B, h, w) -> PIL "L" images, white (255) where 1."""
    mask = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return [PIL.Image.fromarray((m > 0.5).astype(np.uint8) * 255, mode="L") for m in mask]


def prepare_mask(mask, batch_size: int = 1) -> torch.Tensor:
    """A mask as the DiffEdit pipeline takes it -> (B, 1, h, w) with values 0 / 1 (threshold 0.5).

    PIL images are read as luminance / 255; numpy arrays and tensors in [0, 1] as (h, w), (B, h, w) or
    (B, 1, h, w); one mask is repeated over `batch_size`."""
    if not isinstance(mask, torch.Tensor):
        masks = mask if isinstance(mask, list) else [mask]
        if isinstance(masks[0], PIL.Image.Image):
            masks = [np.array(m.convert("L")).astype(np.float32) / 255.0 for m in masks]
        if isinstance(masks[0], np.ndarray):
            mask = torch.from_numpy(np.stack(masks) if masks[0].ndim < 3 else np.concatenate(masks))
        elif isinstance(masks[0], torch.Tensor):
            mask = torch.stack(masks) if masks[0].ndim < 3 else torch.cat(masks)
        else:
            raise TypeError(f"mask_image must be a PIL image, a numpy array, a tensor or a list of them, "
                            f"got {type(masks[0]).__name__}")
    if mask.ndim == 2:
        mask = mask[None, None]  # (1, 1, h, w)
    elif mask.ndim == 3:
        mask = mask[None] if mask.shape[0] == 1 else mask[:, None]  # (B, 1, h, w)
    if batch_size > 1 and mask.shape[0] == 1:
        mask = torch.cat([mask] * batch_size)
    elif mask.shape[0] != batch_size:  # diffusers lets a batch of masks through for one prompt, to fail in the UNet
        raise ValueError(f"mask_image with batch size {mask.shape[0]} cannot be broadcast to batch size {batch_size}")
    if mask.shape[1] != 1:
        raise ValueError(f"mask_image must have 1 channel, but has {mask.shape[1]} channels")
    if mask.is_floating_point() and bool(torch.isnan(mask).any()):  # would pass the range check and become 1
        raise ValueError("mask_image holds NaN values: give a mask of 0 / 1 (or values in [0, 1])")
    if mask.min() < 0 or mask.max() > 1:
        raise ValueError("mask_image should be in the [0, 1] range")
    return torch.where(mask < 0.5, 0, 1).to(mask.dtype)


# ----------------------------------------------------------------------------------------------------------------
# The one-call API's input and output: any size in, the same size out


def load_rgb(image: PIL.Image.Image | np.ndarray | torch.Tensor | str | os.PathLike) -> PIL.Image.Image:
    """The one-call API's image argument -> an RGB PIL image. Accepted, and nothing else:
    - a path (str or os.PathLike) or a PIL image, read as the command line reads files (`image_files`);
    - a numpy array (H, W, 3), (H, W, 1) or (H, W): uint8 (or any integer type) with values 0-255, or floats in
      [0, 1];
    - a torch tensor (3, H, W) or (1, H, W), with the same dtypes and ranges.
    Anything else is a TypeError or ValueError naming `image`, its shape, dtype or range, and the fix: values are
    never clipped or rescaled silently."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(Path(image))
    if isinstance(image, PIL.Image.Image):
        return displayed_rgb(decoded(image, "image"), "image")
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"image: a tensor must be (3, H, W) or (1, H, W), got shape {tuple(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0)  # (H, W, C)
        image = (image.double() if image.is_floating_point() else image).numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image: expected a path, a PIL image, a numpy array or a torch tensor, got "
                        f"{type(image).__name__}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3) or 0 in image.shape:
        raise ValueError(f"image: an array must be (H, W, 3), (H, W, 1) or (H, W) with H, W >= 1, got shape "
                         f"{image.shape}")
    if image.dtype == np.bool_ or not (np.issubdtype(image.dtype, np.integer)
                                       or np.issubdtype(image.dtype, np.floating)):
        raise ValueError(f"image: expected uint8 values 0-255 or floats in [0, 1], got dtype {image.dtype}")
    lo, hi = image.min(), image.max()
    if np.issubdtype(image.dtype, np.floating):
        if not (np.isfinite(lo) and np.isfinite(hi) and 0 <= lo and hi <= 1):
            raise ValueError(f"image: float values must be in [0, 1], got [{lo:g}, {hi:g}] (values 0-255: divide "
                             "by 255 or pass uint8; values in [-1, 1]: pass (x + 1) / 2)")
        image = (image.astype(np.float64) * 255).round()
    elif lo < 0 or hi > 255:
        raise ValueError(f"image: integer values must be 0-255, got [{lo}, {hi}] (16-bit pictures: scale them to "
                         "8 bits, or pass floats in [0, 1])")
    image = image.astype(np.uint8)
    return PIL.Image.fromarray(image.repeat(3, axis=2) if image.shape[2] == 1 else image)


def decoded(image: PIL.Image.Image, name: str) -> PIL.Image.Image:
    """A PIL image the caller opened, decoded now: one that cannot be (a truncated or corrupt file, a closed image)
    is a ValueError naming the argument, not Pillow's OSError from the middle of the work."""
    try:
        image.load()
    except Exception as e:  # noqa: BLE001 - truncated data: OSError; closed: ValueError; some plugins others
        raise ValueError(f"{name}: the PIL image cannot be decoded ({one_line(e)}): pass a complete, open picture, or "
                         "its file's path") from None
    return image


def working_size(size: tuple[int, int], factor: int) -> tuple[int, int]:
    """(width, height) rounded to the nearest multiple of `factor` (at least one factor)."""
    return tuple(max(factor, int(round(s / factor)) * factor) for s in size)


def fit_to_multiple(image: PIL.Image.Image, factor: int) -> PIL.Image.Image:
    """Resize (Lanczos) so both sides are multiples of `factor`; unchanged when they already are."""
    size = working_size(image.size, factor)
    return image if size == image.size else image.resize(size, resample=PIL.Image.LANCZOS)


def latent_mask_to_image(latent_mask: np.ndarray, size: tuple[int, int]) -> PIL.Image.Image:
    """(h, w) bool at latent resolution -> "L" mask (0 / 255) at the image's `size`, nearest-neighbour."""
    mask = PIL.Image.fromarray(np.asarray(latent_mask).astype(np.uint8) * 255, "L")
    return mask.resize(size, PIL.Image.Resampling.NEAREST)


MASK_CELL_RULES = ("half", "any")


def latent_mask_from_image(mask: PIL.Image.Image, working: tuple[int, int], factor: int,
                           rule: str = "half") -> np.ndarray:
    """A binary mask at the image's size -> (h, w) bool on the latent grid, after a nearest-neighbour resize to
    the `working` size: a latent cell (factor x factor pixels) is in the mask when at least half of its pixels are
    ("half", what the command line's --mask does; exact for masks written by `latent_mask_to_image`) or when any
    of them is ("any": the region is covered whole, at the price of a coarser edge)."""
    if rule not in MASK_CELL_RULES:
        raise ValueError(f"rule: expected one of {MASK_CELL_RULES}, got {rule!r}")
    m = np.asarray(mask.convert("L").resize(working, PIL.Image.Resampling.NEAREST)) >= 128
    h, w = working[1] // factor, working[0] // factor
    cells = m.reshape(h, factor, w, factor).mean(axis=(1, 3))  # (h, w): the share of each cell's pixels
    return cells >= 0.5 if rule == "half" else cells > 0


def load_mask(mask, size: tuple[int, int]) -> PIL.Image.Image:
    """The one-call API's mask argument -> a binary "L" picture (0 / 255) of the image's `size` (width, height):
    a path, a PIL image, or a numpy array or torch tensor (H, W), all read by one rule (`image_files.mask_cells`:
    bools; 0 / 1; 0-255 from 128 up; floats in [0, 1] from 0.5 up; transparent pixels are not edited; pictures
    turned by their EXIF orientation, as the image is). Another
    size, shape or type is an error naming `mask`."""
    if isinstance(mask, (str, os.PathLike)):
        return read_mask(Path(mask), size)
    bits = None
    if isinstance(mask, PIL.Image.Image):
        mask = displayed(decoded(mask, "mask"))  # as the image: the first frame, turned as its EXIF orientation says
        samples, bits = mask_samples(mask), sample_bits(mask)
    elif isinstance(mask, (np.ndarray, torch.Tensor)):
        if isinstance(mask, torch.Tensor):
            mask = mask.detach().cpu()
            mask = (mask.float() if mask.dtype == torch.bfloat16 else mask).numpy()  # numpy has no bfloat16
        samples = mask
        if samples.ndim != 2:
            raise ValueError(f"mask: an array must be (H, W), got shape {samples.shape}")
    else:
        raise TypeError(f"mask: expected a path, a PIL image, a numpy array or a torch tensor, got "
                        f"{type(mask).__name__}")
    if samples.shape[::-1] != tuple(size):
        raise ValueError(f"mask: {samples.shape[1]}x{samples.shape[0]} but the image is {size[0]}x{size[1]}")
    return PIL.Image.fromarray(mask_cells(samples, "mask", bits).astype(np.uint8) * 255, "L")

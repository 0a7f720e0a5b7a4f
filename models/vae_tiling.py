"""The VAE run in pieces, so that large images fit in memory: one image of a batch at a time (slicing), or
overlapping spatial tiles blended linearly at their seams (tiling). Same numbers as diffusers 0.42.1's
`AutoencoderKL` with `enable_slicing()` / `enable_tiling()`.

The tile grid (diffusers' `_tiled_encode` / `tiled_decode`): the sample tile is the VAE config's `sample_size` T
(512 for SD 1.x / 2.x), the latent tile L = int(T / f) with f the downsampling factor (64). Tiles start every
`int(tile * 0.75)` input pixels (or latents) along each axis, from 0 while the start is inside the input, and span
`tile` (the last ones are cut by the input's edge). Each tile runs through the whole encoder (or decoder) alone.
In raster order, each output tile is blended with the already-blended tile above it over its first
`extent = int(out_tile * 0.25)` rows, then with the already-blended tile to its left over its first `extent`
columns: row y of the overlap becomes above[-extent + y] * (1 - y/extent) + tile[y] * (y/extent) (extent shrinks
to the smaller tile's size at the edges). Each tile then keeps its top-left (out_tile - extent) square, and the kept
pieces are concatenated. The result is not the untiled output: each tile sees only its own context (the mid-block
attention and the group norms are per tile), which the blend hides at the seams.

Tiling applies only to inputs with a side over the tile (H > T or W > T for encode, h > L or w > L for decode):
an input exactly the tile's size runs whole, as in diffusers.
"""

from __future__ import annotations

from typing import Callable

import torch

from .vae import AutoencoderKL, DiagonalGaussian

OVERLAP = 0.25  # diffusers' tile_overlap_factor: the fraction of a tile shared with its neighbour


def tile_sizes(vae: AutoencoderKL) -> tuple[int, int]:
    """(sample tile, latent tile): diffusers' tile_sample_min_size and tile_latent_min_size."""
    sample = vae.config.sample_size
    return sample, int(sample / vae.downsample_factor)


def blend_rows(above: torch.Tensor, tile: torch.Tensor, extent: int) -> torch.Tensor:
    """`tile` with its first rows faded in linearly from the last rows of the tile above it (diffusers'
    `blend_v`); both (B, C, h, w) with the same width."""
    extent = min(above.shape[2], tile.shape[2], extent)
    if extent == 0:
        return tile
    ramp = torch.arange(extent, dtype=torch.float64) / extent  # y / extent, as diffusers' Python floats
    # diffusers multiplies by Python floats, which torch applies in float32 to half-precision tensors: each product
    # is rounded once to the tile's dtype (rounding the factors to it first gave other bits in float16 / bfloat16)
    math = torch.promote_types(tile.dtype, torch.float32)
    keep, fade = ramp.to(tile.device, math)[:, None], (1 - ramp).to(tile.device, math)[:, None]
    product = lambda t, factor: (t.to(math) * factor).to(tile.dtype)
    seam = product(above[:, :, -extent:], fade) + product(tile[:, :, :extent], keep)  # (B, C, extent, w)
    return torch.cat([seam, tile[:, :, extent:]], dim=2)


def blend_columns(left: torch.Tensor, tile: torch.Tensor, extent: int) -> torch.Tensor:
    """`tile` with its first columns faded in from the last columns of the tile to its left (diffusers'
    `blend_h`): `blend_rows` on the transposed tiles."""
    return blend_rows(left.transpose(2, 3), tile.transpose(2, 3), extent).transpose(2, 3)


def tiled(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, out_tile: int) -> torch.Tensor:
    """`run` (a network that scales sides by out_tile / tile) applied tile by tile over x (B, C, H, W) and blended
    into one output (B, C', H * out_tile / tile, W * out_tile / tile); the grid is the module docstring's."""
    stride, extent = int(tile * (1 - OVERLAP)), int(out_tile * OVERLAP)
    keep = out_tile - extent
    rows = [[run(x[:, :, i:i + tile, j:j + tile]) for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)]
    for i, row in enumerate(rows):
        for j in range(len(row)):
            if i > 0:
                row[j] = blend_rows(rows[i - 1][j], row[j], extent)
            if j > 0:
                row[j] = blend_columns(row[j - 1], row[j], extent)
    return torch.cat([torch.cat([t[:, :, :keep, :keep] for t in row], dim=3) for row in rows], dim=2)


def tiled_encode(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Posterior moments (B, 2 * latent_channels, H/f, W/f) of images (B, 3, H, W), encoded tile by tile
    (diffusers' `_tiled_encode`), whatever the image size."""
    sample_tile, latent_tile = tile_sizes(vae)
    return tiled(lambda t: vae.encode(t).moments, images, sample_tile, latent_tile)


def tiled_decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, h*f, w*f) of unscaled latents (B, latent_channels, h, w), decoded tile by tile (diffusers'
    `tiled_decode`), whatever the latent size."""
    sample_tile, latent_tile = tile_sizes(vae)
    return tiled(vae.decode, latents, latent_tile, sample_tile)


def encode(vae: AutoencoderKL, images: torch.Tensor, slicing: bool = False, tiling: bool = False) -> DiagonalGaussian:
    """`vae.encode` under the memory options: with `slicing`, one image of the batch at a time; with `tiling`, an
    image with a side over the sample tile in tiles (diffusers' `AutoencoderKL.encode`)."""
    sample_tile, _ = tile_sizes(vae)

    def moments(x: torch.Tensor) -> torch.Tensor:
        if tiling and (x.shape[2] > sample_tile or x.shape[3] > sample_tile):
            return tiled_encode(vae, x)
        return vae.encode(x).moments

    parts = images.split(1) if slicing and images.shape[0] > 1 else [images]
    return DiagonalGaussian(torch.cat([moments(x) for x in parts]))  # (B, 2C, h, w)


def decode(vae: AutoencoderKL, latents: torch.Tensor, slicing: bool = False, tiling: bool = False) -> torch.Tensor:
    """`vae.decode` under the memory options: with `slicing`, one latent of the batch at a time; with `tiling`, a
    latent with a side over the latent tile in tiles (diffusers' `AutoencoderKL.decode`)."""
    _, latent_tile = tile_sizes(vae)

    def pixels(z: torch.Tensor) -> torch.Tensor:
        if tiling and (z.shape[2] > latent_tile or z.shape[3] > latent_tile):
            return tiled_decode(vae, z)
        return vae.decode(z)

    parts = latents.split(1) if slicing and latents.shape[0] > 1 else [latents]
    return torch.cat([pixels(z) for z in parts])  # (B, 3, H, W)

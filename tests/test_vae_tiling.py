"""models/vae_tiling.py against diffusers 0.42.1's AutoencoderKL with enable_tiling() / enable_slicing() (the
oracle), same random weights, fp32 on CPU. A tiny VAE with sample_size 32 (latent tile 16: two levels, f = 2) so
tiling starts at small sizes; inputs non-square and not multiples of the tile stride (24 pixels, 12 latents)."""

import pytest
import torch

from diffedit.models import vae_tiling
from diffedit.models.config import VAEConfig
from diffedit.models.vae import AutoencoderKL
from diffedit.official_configs import SD_VAE
from test_vae import _images, _pair

torch.set_num_threads(1)

TOL = 1e-5  # relative to the reference's largest value; measured: 0.0 (the same operations in the same order)
TILED = {"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4,
         "sample_size": 32}
THREE_LEVELS = {"block_out_channels": [8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4,
                "latent_channels": 4, "sample_size": 32}  # f = 4, latent tile 8


def close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, rtol=TOL, atol=TOL * ref.abs().max().item())


@pytest.fixture(scope="module")
def vaes():
    ours, ref = _pair(TILED, seed=5)
    ref.enable_tiling()
    return ours, ref


def test_tile_sizes_follow_diffusers_for_each_depth():
    for raw in (TILED, THREE_LEVELS):
        ours, ref = _pair(raw)
        assert vae_tiling.tile_sizes(ours) == (ref.tile_sample_min_size, ref.tile_latent_min_size)
    with torch.device("meta"):  # the SD 1.x / 2.x VAE, shapes only
        sd = AutoencoderKL(VAEConfig.from_dict(SD_VAE))
    assert vae_tiling.tile_sizes(sd) == (512, 64)


@pytest.mark.parametrize("raw", [TILED, THREE_LEVELS], ids=["f2", "f4"])
@torch.no_grad()
def test_tiled_encode_matches_diffusers_and_differs_from_the_whole_image(raw):
    ours, ref = _pair(raw, seed=2)
    ref.enable_tiling()
    x = _images(2, 96, 80)  # 4 x 4 tiles, the last row and column cut by the edge
    moments = vae_tiling.encode(ours, x, tiling=True).moments
    close(moments, ref.encode(x).latent_dist.parameters)
    close(vae_tiling.tiled_encode(ours, x), ref._tiled_encode(x))
    whole = ours.encode(x).moments
    assert moments.shape == whole.shape
    assert (moments - whole).abs().max() > 100 * TOL * whole.abs().max()  # tiles were really used


@pytest.mark.parametrize("raw", [TILED, THREE_LEVELS], ids=["f2", "f4"])
@torch.no_grad()
def test_tiled_decode_matches_diffusers_and_differs_from_the_whole_latent(raw):
    ours, ref = _pair(raw, seed=3)
    ref.enable_tiling()
    f = ours.downsample_factor
    z = torch.randn(2, 4, 96 // f, 80 // f, generator=torch.Generator().manual_seed(4))
    pixels = vae_tiling.decode(ours, z, tiling=True)
    close(pixels, ref.decode(z).sample)
    close(vae_tiling.tiled_decode(ours, z), ref.tiled_decode(z).sample)
    assert (pixels - ours.decode(z)).abs().max() > 100 * TOL * pixels.abs().max()


@pytest.mark.parametrize("hw, tiles", [((32, 32), False), ((33, 32), True), ((32, 33), True), ((34, 40), True),
                                       ((31, 20), False)])
@torch.no_grad()
def test_encode_tiles_only_when_a_side_exceeds_the_sample_tile(vaes, hw, tiles):
    ours, ref = vaes
    x = _images(1, *hw, seed=6)
    moments = vae_tiling.encode(ours, x, tiling=True).moments
    close(moments, ref.encode(x).latent_dist.parameters)
    whole = ours.encode(x).moments
    if tiles:
        assert (moments - whole).abs().max() > 100 * TOL * whole.abs().max()
    else:
        assert torch.equal(moments, whole)


@pytest.mark.parametrize("hw, tiles", [((16, 16), False), ((17, 16), True), ((16, 17), True), ((9, 40), True),
                                       ((15, 10), False)])
@torch.no_grad()
def test_decode_tiles_only_when_a_side_exceeds_the_latent_tile(vaes, hw, tiles):
    ours, ref = vaes
    z = torch.randn(1, 4, *hw, generator=torch.Generator().manual_seed(7))
    pixels = vae_tiling.decode(ours, z, tiling=True)
    close(pixels, ref.decode(z).sample)
    whole = ours.decode(z)
    if tiles:
        assert (pixels - whole).abs().max() > 100 * TOL * whole.abs().max()
    else:
        assert torch.equal(pixels, whole)


@torch.no_grad()
def test_tiling_off_is_the_whole_image_even_when_large(vaes):
    ours, ref = vaes
    x, z = _images(1, 96, 80), torch.randn(1, 4, 48, 40)
    assert torch.equal(vae_tiling.encode(ours, x).moments, ours.encode(x).moments)
    assert torch.equal(vae_tiling.decode(ours, z), ours.decode(z))


@pytest.mark.parametrize("tiling", [False, True])
@torch.no_grad()
def test_slicing_matches_diffusers_and_the_batched_call(tiling):
    ours, ref = _pair(TILED, seed=8)
    ref.enable_slicing()
    if tiling:
        ref.enable_tiling()
    x, z = _images(3, 48, 40, seed=9), torch.randn(3, 4, 24, 20, generator=torch.Generator().manual_seed(9))
    moments = vae_tiling.encode(ours, x, slicing=True, tiling=tiling).moments
    pixels = vae_tiling.decode(ours, z, slicing=True, tiling=tiling)
    close(moments, ref.encode(x).latent_dist.parameters)
    close(pixels, ref.decode(z).sample)
    close(moments, vae_tiling.encode(ours, x, tiling=tiling).moments)  # one at a time = the batch at once
    close(pixels, vae_tiling.decode(ours, z, tiling=tiling))


@torch.no_grad()
def test_blend_fades_linearly_over_the_overlap_as_diffusers_blend_v_and_blend_h(vaes):
    _, ref = vaes
    gen = torch.Generator().manual_seed(10)
    a, b = torch.randn(1, 2, 7, 9, generator=gen), torch.randn(1, 2, 5, 9, generator=gen)
    for extent in (0, 1, 3, 5, 8):  # 8: clipped to the smaller tile's 5 rows
        assert torch.equal(vae_tiling.blend_rows(a, b.clone(), extent), ref.blend_v(a, b.clone(), extent))
        at, bt = a.transpose(2, 3).contiguous(), b.transpose(2, 3).contiguous()
        assert torch.equal(vae_tiling.blend_columns(at, bt.clone(), extent), ref.blend_h(at, bt.clone(), extent))
    seam = vae_tiling.blend_rows(torch.zeros(1, 1, 4, 1), torch.ones(1, 1, 4, 1), 4)
    assert seam.flatten().tolist() == [0.0, 0.25, 0.5, 0.75]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.no_grad()
def test_half_precision_blend_and_tiled_decode_equal_diffusers_bit_for_bit(dtype):
    """The fade factors were rounded to the tile's dtype before multiplying; diffusers multiplies by Python floats
    (applied in float32, one rounding per product). With a blend extent that is not a power of two (9 pixels:
    sample_size 36) tiled decodes differed by about one half-precision step. Tolerance: none (torch.equal)."""
    ours, ref = _pair({**TILED, "sample_size": 36}, seed=11)
    ours, ref = ours.to(dtype), ref.to(dtype)
    ref.enable_tiling()
    gen = torch.Generator().manual_seed(12)
    a, b = torch.randn(1, 2, 9, 5, generator=gen).to(dtype), torch.randn(1, 2, 9, 5, generator=gen).to(dtype)
    for extent in (3, 7, 9):
        assert torch.equal(vae_tiling.blend_rows(a, b.clone(), extent), ref.blend_v(a, b.clone(), extent))
    z = torch.randn(1, 4, 21, 19, generator=gen).to(dtype)  # latent tile 18: 2 x 2 tiles, cut by the edges
    assert torch.equal(vae_tiling.decode(ours, z, tiling=True), ref.decode(z).sample)

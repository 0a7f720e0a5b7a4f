"""Parity of models/vae.py with diffusers 0.42.1's AutoencoderKL (the oracle), fp32 on CPU."""

from dataclasses import asdict

import pytest
import torch
from diffusers import AutoencoderKL as RefAutoencoderKL

from diffedit.models.config import VAEConfig
from diffedit.official_configs import SD_VAE
from diffedit.models.vae import AutoencoderKL, DiagonalGaussian

torch.set_num_threads(1)

RTOL = 1e-4

TINY = {"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4,
        "sample_size": 32}
THREE_LEVELS = {"block_out_channels": [8, 16, 16], "layers_per_block": 2, "norm_num_groups": 4, "latent_channels": 4,
                "sample_size": 32}
CONFIGS = {"two_levels": TINY, "three_levels_4_groups": THREE_LEVELS}


def _reference(raw: dict) -> RefAutoencoderKL:
    levels = len(raw["block_out_channels"])
    return RefAutoencoderKL(**raw, down_block_types=("DownEncoderBlock2D",) * levels,
                            up_block_types=("UpDecoderBlock2D",) * levels)


def _pair(raw: dict, seed: int = 0) -> tuple[AutoencoderKL, RefAutoencoderKL]:
    """A reference with every parameter (norm affines included) random, and ours loaded from it strictly."""
    torch.manual_seed(seed)
    ref = _reference(raw)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    ours = AutoencoderKL(VAEConfig.from_dict(raw))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.eval(), ref.eval()


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=RTOL * ref.abs().max().item())


def _images(b: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_posterior_mean_std_sample_and_decode_match_diffusers(name):
    ours, ref = _pair(CONFIGS[name])
    x = _images(2, 32, 32)
    post, ref_post = ours.encode(x), ref.encode(x).latent_dist
    assert_close(post.mean, ref_post.mean)
    assert_close(post.std, ref_post.std)
    assert_close(post.logvar, ref_post.logvar)
    z = post.sample(torch.Generator().manual_seed(7))
    ref_z = ref_post.sample(torch.Generator().manual_seed(7))
    assert_close(z, ref_z)
    assert_close(ours.decode(ref_z), ref.decode(ref_z).sample)


@torch.no_grad()
def test_non_square_input_round_trips_shape_and_matches_diffusers():
    ours, ref = _pair(THREE_LEVELS, seed=3)
    x = _images(1, 24, 40)
    post = ours.encode(x)
    assert post.mean.shape == (1, 4, 24 // ours.downsample_factor, 40 // ours.downsample_factor)
    assert_close(post.mean, ref.encode(x).latent_dist.mean)
    out = ours.decode(post.mode())
    assert out.shape == x.shape
    assert_close(out, ref.decode(post.mode()).sample)


def test_sample_draws_the_same_noise_as_diffusers_for_a_list_of_generators():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    moments = torch.randn(3, 8, 5, 6)
    ours = DiagonalGaussian(moments).sample([torch.Generator().manual_seed(s) for s in range(3)])
    ref = DiagonalGaussianDistribution(moments).sample([torch.Generator().manual_seed(s) for s in range(3)])
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_logvar_clamped_and_kl_matches_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    moments = torch.randn(2, 8, 3, 3) * 40  # logvar far outside [-30, 20]
    ours, ref = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)
    assert ours.logvar.min() >= -30 and ours.logvar.max() <= 20
    torch.testing.assert_close(ours.var, ref.var, rtol=0, atol=0)
    torch.testing.assert_close(ours.kl(), ref.kl(), rtol=1e-6, atol=0)
    assert torch.equal(ours.mode(), ref.mode())


def test_sd_vae_full_size_state_dict_keys_and_shapes_equal_diffusers_on_meta():
    with torch.device("meta"):
        ref = RefAutoencoderKL.from_config(SD_VAE)
        ours = AutoencoderKL(VAEConfig.from_dict(SD_VAE))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert list(our_shapes) == list(ref_shapes)  # same order too
    assert len(our_shapes) == 248


def test_properties_follow_the_config():
    config = VAEConfig.from_dict(SD_VAE)
    with torch.device("meta"):
        vae = AutoencoderKL(config)
    assert vae.config == config
    assert vae.scaling_factor == 0.18215
    assert vae.downsample_factor == 8
    assert asdict(vae.config)["latent_channels"] == 4


@pytest.mark.parametrize("change, words", [
    ({"layers_per_block": [1, 1]}, "layers_per_block=[1, 1] must be a single integer"),
    ({"scaling_factor": "abc"}, "scaling_factor='abc' must be a positive number"),
    ({"scaling_factor": 0}, "scaling_factor=0 must be a positive number"),
    ({"norm_num_groups": 3}, "norm_num_groups=3 must divide every channel count of block_out_channels=[16, 32]"),
    ({"sample_size": [32, 16]}, "sample_size=[32, 16] must be an int >= 1 (or a pair of equal ones"),
    ({"latent_channels": None}, "latent_channels=None must be an int >= 1"),
    ({"block_out_channels": [16, 32.0]}, "block_out_channels=[16, 32.0] must be a non-empty list of ints"),
])
def test_config_values_that_cannot_run_are_refused_at_parse_time_naming_the_field(change, words):
    """They used to escape as raw TypeErrors, fail in the first forward pass, or (a non-square sample_size) take
    the first side as the tile size."""
    from diffedit.validation import ConfigError

    with pytest.raises(ConfigError) as e:
        VAEConfig.from_dict({**TINY, **change})
    assert str(e.value).startswith(f"vae config: {words}")



@torch.no_grad()
def test_absent_keys_take_diffusers_defaults_so_its_weights_load_and_its_tile_size_applies():
    """block_out_channels, layers_per_block and sample_size read as SD's values (4 levels, 2 ResNets, 512): a
    config.json without them failed on loading (blamed on the weights), and a missing sample_size silently gave
    512-pixel tiles where diffusers tiles at 32. Tolerance: assert_close (RTOL relative to the largest value)."""
    from diffedit.models import vae_tiling

    raw = {"norm_num_groups": 8}
    torch.manual_seed(0)
    ref = RefAutoencoderKL(**raw).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    ours = AutoencoderKL(VAEConfig.from_dict(raw)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert vae_tiling.tile_sizes(ours) == (ref.tile_sample_min_size, ref.tile_latent_min_size) == (32, 32)
    ref.enable_tiling()
    x = _images(1, 40, 36)  # over the 32-pixel tile: tiled
    assert_close(vae_tiling.encode(ours, x, tiling=True).moments, ref.encode(x).latent_dist.parameters)

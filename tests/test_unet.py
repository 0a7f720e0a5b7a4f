"""Parity of our UNet with diffusers' UNet2DConditionModel on tiny random configs, and full-size key coverage."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from diffedit.models.config import UNetConfig
from diffedit.official_configs import SD15_UNET, SD21_UNET
from diffedit.models.unet import UNet2DConditionModel

torch.set_num_threads(1)

_TINY = dict(in_channels=4, out_channels=4, cross_attention_dim=32, layers_per_block=2, sample_size=16)
CONFIGS = {
    # SD 1.x: 1x1-conv projections, one head count.
    "sd1": dict(_TINY, block_out_channels=[32, 64], norm_num_groups=8, attention_head_dim=2,
                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]),
    # SD 2.x: linear projections, per-level heads, upcast attention.
    "sd2": dict(_TINY, block_out_channels=[32, 64], norm_num_groups=8, attention_head_dim=[2, 4],
                use_linear_projection=True, upcast_attention=True,
                down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
    # Three levels, mixed block types, two transformer layers per block, 4 groups, 3-channel in/out.
    "3level": dict(_TINY, in_channels=3, out_channels=5, block_out_channels=[16, 24, 32], norm_num_groups=4,
                   attention_head_dim=[2, 3, 4], transformer_layers_per_block=2, layers_per_block=1,
                   down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                   up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
}


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Redraw every parameter (norm scales around 1) so that zero-initialised layers cannot hide a bug."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = std * torch.randn(p.shape, generator=gen)
            p.copy_(1 + noise if "norm" in name and name.endswith("weight") else noise)


@functools.lru_cache(maxsize=None)
def _pair(name: str) -> tuple[torch.nn.Module, UNet2DConditionModel]:
    """The reference with random weights, and ours loaded from its state_dict (strict)."""
    from diffusers import UNet2DConditionModel as RefUNet

    raw = CONFIGS[name]
    ref = RefUNet(**raw).eval()
    _randomize(ref, seed=sorted(CONFIGS).index(name))
    ours = UNet2DConditionModel(UNetConfig.from_dict(raw)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    return request.param, *_pair(request.param)


def _inputs(name: str, size: tuple[int, int] = (16, 16), batch: int = 2):
    gen = torch.Generator().manual_seed(1)
    raw = CONFIGS[name]
    sample = torch.randn(batch, raw["in_channels"], *size, generator=gen)
    context = torch.randn(batch, 7, raw["cross_attention_dim"], generator=gen)
    return sample, context


def _assert_matches(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


TIMESTEPS = {
    "per_row_tensor": lambda: torch.tensor([981, 3]),
    "python_int": lambda: 481,
    "python_float": lambda: 500.5,
    "zero_dim_tensor": lambda: torch.tensor(21),
}


@pytest.mark.parametrize("timestep", sorted(TIMESTEPS))
def test_output_matches_diffusers_for_each_timestep_form(pair, timestep):
    name, ref, ours = pair
    sample, context = _inputs(name)
    t = TIMESTEPS[timestep]()
    with torch.no_grad():
        expected = ref(sample, t, context).sample
        got = ours(sample, t, context)
    assert got.shape == (2, CONFIGS[name]["out_channels"], 16, 16)
    _assert_matches(got, expected)


@pytest.mark.parametrize("size", [(10, 14), (9, 16), (12, 12)])
def test_latent_sides_not_multiple_of_total_downsampling_match_diffusers(size):
    _, ref, ours = ("3level", *_pair("3level"))
    sample, context = _inputs("3level", size)
    t = torch.tensor([700, 40])
    with torch.no_grad():
        expected = ref(sample, t, context).sample
        got = ours(sample, t, context)
    assert got.shape == (2, 5, *size)
    _assert_matches(got, expected)


def test_rows_of_a_batch_are_independent(pair):
    name, _, ours = pair
    sample, context = _inputs(name, batch=3)
    t = torch.tensor([900, 500, 100])
    with torch.no_grad():
        batched = ours(sample, t, context)
        single = ours(sample[1:2], t[1:2], context[1:2])
    _assert_matches(batched[1:2], single)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_runs_and_keeps_dtype(dtype):
    ours = copy.deepcopy(_pair("sd2")[1]).to(dtype)
    sample, context = _inputs("sd2")
    with torch.no_grad():
        out = ours(sample.to(dtype), torch.tensor([981, 1]), context.to(dtype))
    assert out.dtype == dtype and out.shape == sample.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("raw", [SD15_UNET, SD21_UNET], ids=["sd15", "sd21"])
def test_full_size_state_dict_keys_and_shapes_equal_diffusers(raw):
    from diffusers import UNet2DConditionModel as RefUNet

    with torch.device("meta"):
        ref = RefUNet.from_config(raw)
        ours = UNet2DConditionModel(UNetConfig.from_dict(raw))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes


def test_text_kv_gives_the_same_output_and_projects_the_text_once_per_layer(pair):
    """A sampling loop passes `TextKV`: bit-identical outputs, and each cross-attention layer's to_k / to_v run
    at the first call only."""
    from diffedit.models.unet import BasicTransformerBlock, TextKV

    name, _, ours = pair
    sample, context = _inputs(name)
    projected = []
    hooks = [m.attn2.to_k.register_forward_hook(lambda *a: projected.append(1))
             for m in ours.modules() if isinstance(m, BasicTransformerBlock)]
    text = TextKV(context)
    with torch.no_grad():
        ours(sample, 21, text)
        after_first = len(projected)
        second = ours(sample, 981, text)
        after_second = len(projected)
        plain = ours(sample, 981, context)
    for h in hooks:
        h.remove()
    assert after_first == len(hooks) > 0 and after_second == after_first  # once per layer, at the first step
    assert torch.equal(second, plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_upcast_attention_in_half_precision_on_cuda_runs_the_fused_kernel_in_its_dtype_as_diffusers_does():
    """diffusers' default processor (AttnProcessor2_0) ignores upcast_attention; the fused kernels keep the scores in
    float32 anyway. Scores far past float16's range (|q.k| / 8 ~ 1e5) must still give finite outputs."""
    from diffedit.models.layers import attention

    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4096 if i == 0 else 77, 320, generator=g, device="cuda") * (40 if i < 2 else 1)
               for i in range(3))
    half = [t.half() for t in (q, k, v)]
    got = attention(*half, heads=5, upcast=True)
    split = lambda t: t.reshape(2, -1, 5, 64).transpose(1, 2)
    expected = F.scaled_dot_product_attention(*map(split, half)).transpose(1, 2).reshape(2, 4096, 320)
    assert torch.equal(got, expected)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("change, words", [
    ({"attention_head_dim": 3}, "attention_head_dim=3 gives 3 attention heads at level 0, which do not divide its 32 "
                                "channels"),
    ({"attention_head_dim": 64}, "attention_head_dim=64 gives 64 attention heads at level 0"),
    ({"attention_head_dim": [2, 3]}, "attention_head_dim=[2, 3] gives 3 attention heads at level 1, which do not "
                                     "divide its 64 channels"),
    ({"norm_num_groups": 7}, "norm_num_groups=7 must divide every channel count of block_out_channels=[32, 64] (not "
                             "32, 64)"),
    ({"norm_num_groups": 0}, "norm_num_groups=0 must be an int >= 1"),
    ({"sample_size": [16, 8]}, "sample_size=[16, 8] must be an int >= 1 (or a pair of equal ones"),
    ({"sample_size": "16"}, "sample_size='16' must be"),
    ({"in_channels": 4.0}, "in_channels=4.0 must be an int >= 1"),
    ({"layers_per_block": "2"}, "layers_per_block='2' must be an int >= 1 or a list"),
    ({"norm_eps": "1e-5"}, "norm_eps='1e-5' must be a positive number"),
    ({"upcast_attention": 1}, "upcast_attention=1 must be None or True or False"),
    ({"down_block_types": "CrossAttnDownBlock2D"}, "down_block_types='CrossAttnDownBlock2D' must be a list of block"),
    ({"transformer_layers_per_block": [[1], [1]]}, "transformer_layers_per_block=[[1], [1]] must be an int >= 1 or "
                                                   "a list of them"),
    ({"block_out_channels": []}, "block_out_channels=[] must be a non-empty list of ints >= 1"),
])
def test_config_values_that_cannot_run_are_refused_at_parse_time_naming_the_field(change, words):
    """They used to load (and crash at the first forward pass, or store a list as the sample size) or escape as raw
    TypeErrors."""
    from diffedit.validation import ConfigError

    with pytest.raises(ConfigError) as e:
        UNetConfig.from_dict({**CONFIGS["sd1"], **change})
    assert str(e.value).startswith(f"unet config: {words}")


def test_heads_of_a_level_without_attention_are_not_checked_and_a_square_pair_is_its_side():
    """diffusers never reads them there (3level's first level has no attention); [16, 16] reads as 16."""
    raw = {**CONFIGS["3level"], "attention_head_dim": [3, 3, 4], "sample_size": [16, 16]}
    config = UNetConfig.from_dict(raw)
    assert config.num_heads == (3, 3, 4) and config.sample_size == 16


def test_group_count_diffusers_refuses_is_refused_too():
    from diffusers import UNet2DConditionModel as RefUNet

    with pytest.raises(ValueError, match="must be divisible by num_groups"):
        RefUNet(**{**CONFIGS["sd1"], "norm_num_groups": 7})
    with pytest.raises(ValueError, match="norm_num_groups=7 must divide"):
        UNetConfig.from_dict({**CONFIGS["sd1"], "norm_num_groups": 7})


@torch.no_grad()
def test_absent_cross_attention_dim_is_diffusers_default_1280_so_its_weights_load_and_match():
    """It read as 768: a config.json without the key failed on loading with a shape error blamed on the weights
    (or, beside a 768-wide text encoder, was not refused for its 1280-wide attention). Tolerance: _assert_matches."""
    from diffusers import UNet2DConditionModel as RefUNet

    raw = {k: v for k, v in CONFIGS["sd1"].items() if k != "cross_attention_dim"}
    ref = RefUNet(**raw).eval()
    _randomize(ref, seed=3)
    ours = UNet2DConditionModel(UNetConfig.from_dict(raw)).eval()
    assert ours.config.cross_attention_dim == ref.config.cross_attention_dim == 1280
    ours.load_state_dict(ref.state_dict(), strict=True)
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    context = torch.randn(1, 7, 1280, generator=torch.Generator().manual_seed(3))
    _assert_matches(ours(sample, 10, context), ref(sample, 10, context).sample)


@pytest.mark.parametrize("args, error, words", [
    (lambda x, c: (x[:, :3], 5, c), ValueError, "sample must be (B, 4, H, W) latents, got shape (2, 3, 16, 16)"),
    (lambda x, c: (x[0], 5, c), ValueError, "sample must be (B, 4, H, W) latents, got shape (4, 16, 16)"),
    (lambda x, c: (x, 5, c[..., :16]), ValueError, "encoder_hidden_states must be (B, T, 32) text states with the "
                                                   "sample's B=2, got shape (2, 7, 16)"),
    (lambda x, c: (x, 5, c[:1]), ValueError, "encoder_hidden_states must be (B, T, 32) text states with the sample's "
                                             "B=2, got shape (1, 7, 32)"),
    (lambda x, c: (x, torch.tensor([1, 2, 3]), c), ValueError, "timestep must be one value or one per sample (B=2), "
                                                               "got shape (3,)"),
    (lambda x, c: (x, "5", c), TypeError, "timestep must be a number or a tensor, got str"),
    (lambda x, c: (x.numpy(), 5, c), TypeError, "sample and encoder_hidden_states must be tensors, got ndarray and "
                                                "(2, 7, 32)"),
])
def test_bad_forward_arguments_are_refused_naming_the_argument_before_any_work(args, error, words):
    """They failed deep inside (a convolution, an attention reshape, torch.full) with torch's own message, as
    diffusers' do; the timestep embedding was already made."""
    _, ours = _pair("sd1")
    sample, context = _inputs("sd1")
    hook = ours.time_embedding.register_forward_pre_hook(lambda *a: pytest.fail("the forward pass started"))
    try:
        with pytest.raises(error) as e:
            ours(*args(sample, context))
        assert str(e.value) == words
    finally:
        hook.remove()

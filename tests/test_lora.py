"""LoRA (models/lora.py and its API on StableDiffusion / the facade) against diffusers 0.42.1 + peft 0.21.2.

Files are written here with random non-zero A and B (so a missed or mis-scaled branch moves the numbers): both
layouts (diffusers' peft keys and kohya's flattened names), ranks 1 and 4, alphas that differ from the ranks, linear
layers and 3x3 / 1x1 convolutions. UNet adapters are compared with diffusers' pipeline after its
`load_lora_weights` (peft runs them); text-encoder adapters with a diffusers pipeline whose text encoder holds the
explicitly merged weights W + s * alpha / r * B A (transformers 5.24 refuses peft 0.21.2 for text encoders).
Tolerances as in test_facade.py: masks agree on >= 99% of pixels, latents within 1e-3 relative (Frobenius), decoded
images within 5e-3 max abs in [0, 1].
"""

from __future__ import annotations

import re

import numpy as np

import pytest
import safetensors.torch
import torch
from safetensors.torch import save_file
from torch import nn

from diffedit import DiffEditParams, StableDiffusionDiffEdit
from diffedit.models.lora import LowRank
from diffedit.models.weights import WeightsError
from parity import IMAGE_TOL, LATENT_TOL, MASK_TOL, gen, max_abs, picture, reference_pipeline, rel

STEPS = 5


# ------------------------------------------------------------------------------------------------ LoRA files


def layers(network: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in network.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def random_pairs(network: nn.Module, seed: int, rank_of=lambda name: 4, alpha_of=lambda name, r: 3.0,
                 chosen=lambda name: True) -> dict[str, LowRank]:
    """Random non-zero A and B for the chosen layers: A in the layer's kernel, B a 1x1 map."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for name, layer in layers(network).items():
        if not chosen(name):
            continue
        r, (out_width, in_width) = rank_of(name), layer.weight.shape[:2]
        kernel = tuple(layer.weight.shape[2:])
        down = torch.randn((r, in_width, *kernel), generator=g) * 0.3
        up = torch.randn((out_width, r, *((1, 1) if kernel else ())), generator=g) * 0.3
        pairs[name] = LowRank(down, up, float(alpha_of(name, r)))
    return pairs


def write_lora(path, unet_pairs: dict[str, LowRank] | None = None, te_pairs: dict[str, LowRank] | None = None,
               layout: str = "kohya", with_alpha: bool = True):
    """A LoRA file in kohya's layout (`lora_unet_<flat>.lora_down.weight`, `.alpha`) or diffusers' (peft keys)."""
    tensors = {}
    for network, pairs in (("unet", unet_pairs or {}), ("text_encoder", te_pairs or {})):
        for name, p in pairs.items():
            if layout == "kohya":
                flat = ("lora_unet_" if network == "unet" else "lora_te_text_model_") + name.replace(".", "_")
                tensors[f"{flat}.lora_down.weight"], tensors[f"{flat}.lora_up.weight"] = p.down, p.up
                if with_alpha:
                    tensors[f"{flat}.alpha"] = torch.tensor(p.alpha)
            else:
                key = f"unet.{name}" if network == "unet" else f"text_encoder.text_model.{name}"
                tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = p.down, p.up
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def mixed_rank(name: str) -> int:
    return 1 if "conv" in name or "fc" in name else 4


def mixed_alpha(name: str, r: int) -> float:
    return 0.5 if r == 1 else 3.0


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def style(request):
    return request.param


@pytest.fixture(scope="module")
def models(style, request):
    """(our compatible facade, diffusers' pipeline) on the same tiny checkpoint; adapters are removed after use."""
    return request.getfixturevalue(f"{style}_models")


def _cleaned(ours, ref):
    yield ours, ref
    for pipe in (ours, ref):  # unfused first: fuse + unload would keep the LoRA in the weights
        pipe.unfuse_lora()
        pipe.unload_lora_weights()


@pytest.fixture
def pair(models):
    """Both styles: for what the architecture changes (conv or linear projections, head counts, v-prediction)."""
    yield from _cleaned(*models)


@pytest.fixture(scope="module")
def sd1_models(sd1_folder):
    return StableDiffusionDiffEdit.from_pretrained(sd1_folder), reference_pipeline(sd1_folder)


@pytest.fixture(scope="module")
def sd2_models(sd2_folder):
    return StableDiffusionDiffEdit.from_pretrained(sd2_folder), reference_pipeline(sd2_folder)


@pytest.fixture
def sd1_pair(sd1_models):
    """SD1 only: for the bookkeeping (adapters, weights, fusing, saving), which no architecture changes."""
    yield from _cleaned(*sd1_models)


def edit(pipe, scale: float | None, seed: int = 5):
    """generate_mask, invert, __call__ in a row on one generator, at this LoRA scale (None: no kwargs)."""
    kwargs = None if scale is None else {"scale": scale}
    g, image = gen(seed), picture(4)
    mask = pipe.generate_mask(image=image, source_prompt="a cat", target_prompt="a dog", mask_thresholding_ratio=2.0,
                              generator=g, cross_attention_kwargs=kwargs)
    inv = pipe.invert(prompt="a cat", image=image, num_inference_steps=STEPS, generator=g,
                      cross_attention_kwargs=kwargs)
    out = pipe(prompt="a dog", mask_image=mask, image_latents=inv.latents, num_inference_steps=STEPS, generator=g,
               output_type="np", cross_attention_kwargs=kwargs)
    return mask, inv.latents, out.images


def assert_same_edit(got, expected):
    (m, l, i), (m_ref, l_ref, i_ref) = got, expected
    assert (m == m_ref).mean() >= MASK_TOL
    assert rel(l, l_ref) < LATENT_TOL
    assert max_abs(i, i_ref) < IMAGE_TOL


# ------------------------------------------------------------------------------------------------ UNet parity


@pytest.mark.parametrize("layout,scale", [("kohya", 0.6), ("diffusers", None)])
def test_unet_lora_on_every_layer_matches_diffusers_in_all_three_calls(pair, tmp_path, layout, scale):
    """Every linear and convolution layer of the UNet (attention, proj_in/out, feed-forward, 3x3 ResNet, stride-2
    and 1x1 shortcut convolutions, time embedding), ranks 4 and 1; kohya alphas 3 and 0.5 (scale 0.75 and 0.5),
    the diffusers layout without alphas (scale 1)."""
    ours, ref = pair
    pairs = random_pairs(ours.model.unet, 1, rank_of=mixed_rank,
                         alpha_of=mixed_alpha if layout == "kohya" else lambda name, r: float(r))
    path = write_lora(tmp_path / "unet.safetensors", pairs, layout=layout)
    ours.load_lora_weights(path)
    ref.load_lora_weights(str(path))
    got, expected = edit(ours, scale), edit(ref, scale)
    assert_same_edit(got, expected)
    ours.set_adapters([])  # no adapter active: the base model, far from the LoRA's numbers
    kw = dict(prompt="a cat", image=picture(4), num_inference_steps=STEPS, generator=gen(5))
    assert rel(ours.invert(**kw).latents, expected[1]) > 100 * LATENT_TOL


def test_two_adapters_with_weights_match_diffusers(sd1_pair, tmp_path):
    ours, ref = sd1_pair
    a = write_lora(tmp_path / "a.safetensors", random_pairs(ours.model.unet, 2, rank_of=mixed_rank,
                                                            alpha_of=mixed_alpha))
    b = write_lora(tmp_path / "b.safetensors", random_pairs(ours.model.unet, 3, rank_of=lambda n: 2,
                                                            chosen=lambda n: "attn" in n), layout="diffusers")
    for pipe in (ours, ref):
        pipe.load_lora_weights(str(a), adapter_name="a")
        pipe.load_lora_weights(str(b), adapter_name="b")
    assert ours.get_active_adapters() == ref.get_active_adapters() == ["b"]  # a new adapter runs alone
    for pipe in (ours, ref):
        pipe.set_adapters(["a", "b"], adapter_weights=[0.7, -0.4])
    assert ours.get_active_adapters() == ["a", "b"]
    assert ours.get_list_adapters() == ref.get_list_adapters() == {"unet": ["a", "b"]}
    kw = dict(prompt="a cat", image=picture(0), num_inference_steps=STEPS, cross_attention_kwargs={"scale": 0.8})
    expected = ref.invert(**kw, generator=gen(2)).latents
    assert rel(ours.invert(**kw, generator=gen(2)).latents, expected) < LATENT_TOL
    ours.set_adapters(["a", "b"])  # weights 1 each
    assert rel(ours.invert(**kw, generator=gen(2)).latents, expected) > 100 * LATENT_TOL



def test_deleting_an_adapter_and_disabling_lora_match_diffusers(sd1_pair, tmp_path):
    """delete_adapters keeps the other active adapter at its weight; disable_lora runs the base model (bit for bit
    ours, and a saved inversion's record says no LoRA ran); enable_lora brings the branches back."""
    ours, ref = sd1_pair
    a = write_lora(tmp_path / "a.safetensors", random_pairs(ours.model.unet, 2, rank_of=mixed_rank))
    b = write_lora(tmp_path / "b.safetensors", random_pairs(ours.model.unet, 3, rank_of=lambda n: 2))
    kw = dict(prompt="a cat", image=picture(0), num_inference_steps=STEPS)
    base = ours.invert(**kw, generator=gen(2)).latents
    for pipe in (ours, ref):
        pipe.load_lora_weights(str(a), adapter_name="a")
        pipe.load_lora_weights(str(b), adapter_name="b")
        pipe.set_adapters(["a", "b"], adapter_weights=[0.7, -0.4])
        pipe.delete_adapters("a")
    assert ours.get_active_adapters() == ref.get_active_adapters() == ["b"]
    only_b = ours.invert(**kw, generator=gen(2)).latents
    assert rel(only_b, ref.invert(**kw, generator=gen(2)).latents) < LATENT_TOL
    assert rel(only_b, base) > 100 * LATENT_TOL
    for pipe in (ours, ref):
        pipe.disable_lora()
    disabled = ours.invert(**kw, generator=gen(2)).latents
    assert torch.equal(disabled, base)
    assert rel(disabled, ref.invert(**kw, generator=gen(2)).latents) < LATENT_TOL
    assert ours.model.lora.record() == []
    for pipe in (ours, ref):
        pipe.enable_lora()
    assert torch.equal(ours.invert(**kw, generator=gen(2)).latents, only_b)
    with pytest.raises(ValueError, match="'a'.* not loaded"):
        ours.delete_adapters(["a"])
    ours.fuse_lora()
    with pytest.raises(ValueError, match="fused into the weights; unfuse_lora"):
        ours.delete_adapters("b")


# ------------------------------------------------------------------------------------------------ text encoder


def merge_text_encoder(pipe, pairs: dict[str, LowRank], scale: float) -> dict[str, torch.Tensor]:
    """Put W + scale * alpha / r * B A into the reference text encoder's layers (transformers 5 names them as
    we do, without text_model.); returns the originals."""
    originals = {}
    with torch.no_grad():
        for name, p in pairs.items():
            layer = pipe.text_encoder.get_submodule(name)
            originals[name] = layer.weight.clone()
            layer.weight += scale * p.alpha / p.rank * (p.up @ p.down)
    return originals


def restore_text_encoder(pipe, originals: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, weight in originals.items():
            pipe.text_encoder.get_submodule(name).weight.copy_(weight)


@pytest.mark.parametrize("honor_all_call_options", [False, True])
def test_text_encoder_lora_reaches_the_calls_diffusers_gives_it_the_scale(pair, tmp_path, honor_all_call_options):
    """diffusers 0.42.1's generate_mask computes the LoRA scale and drops it, and invert never reads it: the text
    encoder runs at scale 1 there and at the call's scale only in __call__ (D4). With honor_all_call_options the
    scale reaches the text encoder in all three. One kohya file with UNet and text-encoder pairs; diffusers runs
    the UNet part with peft, its text encoder holds the merged weights of each call's scale."""
    from diffusers import StableDiffusionDiffEditPipeline

    ours, ref = pair
    if honor_all_call_options:
        ours = StableDiffusionDiffEdit(ours.model, DiffEditParams.reference(honor_all_call_options=True))
    te_pairs = random_pairs(ours.model.text_encoder, 4, rank_of=mixed_rank, alpha_of=mixed_alpha)
    unet_pairs = random_pairs(ours.model.unet, 5, chosen=lambda n: "attn2" in n)
    path = write_lora(tmp_path / "both.safetensors", unet_pairs, te_pairs)
    ours.load_lora_weights(path)
    state, alphas = StableDiffusionDiffEditPipeline.lora_state_dict(str(path))
    ref.load_lora_into_unet(state, alphas, unet=ref.unet, adapter_name="unet_part", _pipeline=ref)
    scale, kwargs, image = 0.6, {"scale": 0.6}, picture(4)
    steps_scale = scale if honor_all_call_options else 1.0

    def calls(pipe, merged: bool):
        g = gen(5)
        originals = merge_text_encoder(pipe, te_pairs, steps_scale) if merged else {}
        mask = pipe.generate_mask(image=image, source_prompt="a cat", target_prompt="a dog",
                                  mask_thresholding_ratio=2.0, generator=g, cross_attention_kwargs=kwargs)
        inv = pipe.invert(prompt="a cat", image=image, num_inference_steps=STEPS, generator=g,
                          cross_attention_kwargs=kwargs)
        if merged:
            restore_text_encoder(pipe, originals)
            originals = merge_text_encoder(pipe, te_pairs, scale)
        out = pipe(prompt="a dog", mask_image=mask, image_latents=inv.latents, num_inference_steps=STEPS,
                   generator=g, output_type="np", cross_attention_kwargs=kwargs)
        restore_text_encoder(pipe, originals)
        return mask, inv.latents, out.images

    got = calls(ours, merged=False)
    expected = calls(ref, merged=True)
    if honor_all_call_options:  # the reference's pil-free numbers, with the scale everywhere
        assert (got[0] == expected[0]).mean() >= MASK_TOL
        assert rel(got[1], expected[1]) < LATENT_TOL and max_abs(got[2], expected[2]) < IMAGE_TOL
    else:
        assert_same_edit(got, expected)
    ours.model.set_adapters([])
    assert rel(calls(ours, merged=False)[1], expected[1]) > 100 * LATENT_TOL


def test_lora_scale_zero_gives_the_base_model_bit_for_bit(sd1_pair, tmp_path):
    """Scale 0 multiplies every branch by 0 in the UNet and the text encoder, in all three steps."""
    from diffedit import api, method

    ours, _ = sd1_pair
    sd = ours.model
    path = write_lora(tmp_path / "both.safetensors", random_pairs(sd.unet, 6, rank_of=mixed_rank),
                      random_pairs(sd.text_encoder, 7))
    p = DiffEditParams(lora_scale=0.0, num_inference_steps=STEPS, num_maps_per_mask=2)

    def steps():
        pixels = api.model_pixels(sd, picture(0))
        source, target = api.prompt_text(sd, "a cat", p), api.prompt_text(sd, "a dog", p)
        est = method.estimate_mask(sd, pixels, source, target, p, gen(1))
        inv = method.invert(sd, pixels, source, p, gen(2))
        return est.difference, inv.latents, method.decode(sd, inv, est.mask[:, None].float(), target, p, gen(3))

    base = steps()
    sd.load_lora_weights(path)
    with_lora = steps()
    assert all(torch.equal(a, b) for a, b in zip(base, with_lora))
    p = DiffEditParams(lora_scale=0.5, num_inference_steps=STEPS, num_maps_per_mask=2)
    assert rel(steps()[1], base[1]) > 100 * LATENT_TOL


# ------------------------------------------------------------------------------------------------ fuse, save


def test_fuse_matches_the_branches_and_unfuse_restores_every_weight_bit_for_bit(sd1_pair, tmp_path):
    ours, _ = sd1_pair
    sd = ours.model
    corrected = StableDiffusionDiffEdit(sd, DiffEditParams())
    path = write_lora(tmp_path / "both.safetensors", random_pairs(sd.unet, 8, rank_of=mixed_rank,
                                                                  alpha_of=mixed_alpha),
                      random_pairs(sd.text_encoder, 9, alpha_of=mixed_alpha))
    before = {k: v.clone() for k, v in {**sd.unet.state_dict(), **sd.text_encoder.state_dict()}.items()}
    ours.load_lora_weights(path)
    ours.set_adapters(["default_0"], [0.8])
    kw = dict(prompt="a cat", image=picture(0), num_inference_steps=STEPS)
    branches = corrected.invert(**kw, generator=gen(2), cross_attention_kwargs={"scale": 0.5}).latents
    ours.fuse_lora(lora_scale=0.5)
    ours.fuse_lora(lora_scale=0.5)  # a second fuse adds nothing more
    assert set(sd.unet.state_dict()) | set(sd.text_encoder.state_dict()) == set(before)  # keys unchanged
    fused = corrected.invert(**kw, generator=gen(2), cross_attention_kwargs={"scale": 0.3}).latents  # scale: no-op
    assert rel(fused, branches) < LATENT_TOL
    assert any(not torch.equal(v, before[k]) for k, v in sd.unet.state_dict().items())
    ours.unfuse_lora()
    after = {**sd.unet.state_dict(), **sd.text_encoder.state_dict()}
    assert all(torch.equal(after[k], v) for k, v in before.items())
    ours.set_adapters(["default_0"], [0.8])  # unfuse leaves lora_scale on the weight, as diffusers does: reset it
    assert torch.equal(corrected.invert(**kw, generator=gen(2), cross_attention_kwargs={"scale": 0.5}).latents,
                       branches)
    # fuse + unload bakes the LoRA in (diffusers' recipe); unload alone gives the base model back
    ours.fuse_lora(lora_scale=0.5)
    ours.unload_lora_weights()
    assert rel(corrected.invert(**kw, generator=gen(2)).latents, branches) < LATENT_TOL
    with torch.no_grad():
        for k, v in sd.unet.state_dict().items():
            v.copy_(before[k])
        for k, v in sd.text_encoder.state_dict().items():
            v.copy_(before[k])


def test_fused_unet_lora_matches_diffusers_fuse_lora(sd1_pair, tmp_path):
    ours, ref = sd1_pair
    path = write_lora(tmp_path / "unet.safetensors", random_pairs(ours.model.unet, 14, rank_of=mixed_rank,
                                                                  alpha_of=mixed_alpha))
    for pipe in (ours, ref):
        pipe.load_lora_weights(str(path), adapter_name="x")
        pipe.set_adapters(["x"], [0.8])
        pipe.fuse_lora(lora_scale=0.5)
    kw = dict(prompt="a cat", image=picture(0), num_inference_steps=STEPS)
    expected = ref.invert(**kw, generator=gen(2)).latents
    assert rel(ours.invert(**kw, generator=gen(2)).latents, expected) < LATENT_TOL


def test_safe_fusing_refuses_non_finite_weights_and_changes_nothing(sd1_pair, tmp_path):
    ours, _ = sd1_pair
    pairs = {name: LowRank(p.down * 1e25, p.up * 1e25, p.alpha)
             for name, p in random_pairs(ours.model.unet, 15, chosen=lambda n: n == UNET_Q).items()}
    ours.load_lora_weights(write_lora(tmp_path / "huge.safetensors", pairs))
    before = {k: v.clone() for k, v in ours.model.unet.state_dict().items()}
    assert "non-finite" in one_line_error(ValueError, lambda: ours.fuse_lora(safe_fusing=True))
    assert all(torch.equal(v, before[k]) for k, v in ours.model.unet.state_dict().items())


def test_saved_lora_loads_in_diffusers_with_the_same_numbers(sd1_pair, tmp_path):
    """Our save of a kohya file (ranks 4 and 1, alphas 3 and 0.5) in diffusers' layout: diffusers' load gives the
    same inversion; our own reload of it gives bit-for-bit what the original file gave."""
    ours, ref = sd1_pair
    path = write_lora(tmp_path / "unet.safetensors", random_pairs(ours.model.unet, 10, rank_of=mixed_rank,
                                                                  alpha_of=mixed_alpha))
    ours.load_lora_weights(path, adapter_name="kohya")
    saved = ours.save_lora_weights(tmp_path / "out")
    assert saved == tmp_path / "out" / "pytorch_lora_weights.safetensors"
    ref.load_lora_weights(str(tmp_path / "out"), weight_name=saved.name)
    kw = dict(prompt="a cat", image=picture(0), num_inference_steps=STEPS, cross_attention_kwargs={"scale": 0.7})
    original = ours.invert(**kw, generator=gen(2)).latents
    assert rel(original, ref.invert(**kw, generator=gen(2)).latents) < LATENT_TOL
    ours.load_lora_weights(saved, adapter_name="saved")
    assert torch.equal(ours.invert(**kw, generator=gen(2)).latents, original)


def test_text_encoder_pairs_survive_save_and_reload(sd1_pair, tmp_path):
    ours, _ = sd1_pair
    path = write_lora(tmp_path / "te.safetensors", te_pairs=random_pairs(ours.model.text_encoder, 11,
                                                                         rank_of=mixed_rank, alpha_of=mixed_alpha))
    ours.load_lora_weights(path, adapter_name="first")
    text = lambda: ours.encode_prompt("a cat", None, 1, False, lora_scale=0.9)[0]
    original = text()
    ours.load_lora_weights(ours.save_lora_weights(tmp_path / "out", adapter_name="first"), adapter_name="again")
    assert torch.equal(text(), original)


# ------------------------------------------------------------------------------------------------ bad input


def one_line_error(error_type, call) -> str:
    with pytest.raises(error_type) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


UNET_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
KOHYA = lambda name: "lora_unet_" + name.replace(".", "_")  # kohya's flattened name of a UNet layer
KOHYA_Q = KOHYA(UNET_Q)


@pytest.mark.parametrize("tensors,expected", [
    ({"lora_unet_no_such_layer.lora_down.weight": torch.ones(1, 32)}, "maps to no layer"),
    ({"unet.no_such.layer.lora_A.weight": torch.ones(1, 32)}, "maps to no layer"),
    ({f"{UNET_Q}.lora_A.weight": torch.ones(4, 32), f"{UNET_Q}.lora_B.weight": torch.ones(32, 4)},
     "without the unet. prefix"),  # diffusers loads nothing from it (a warning); was "maps to no layer"
    ({UNET_Q.replace("to_q", "processor.to_q_lora.down.weight"): torch.ones(4, 32)}, "without the unet. prefix"),
    ({f"{KOHYA_Q}.lora_down.weight": torch.ones(4, 1024), f"{KOHYA_Q}.lora_up.weight": torch.ones(32, 4)},
     "another base model"),  # an SD 2.x width on this model
    ({f"{KOHYA_Q}.lora_down.weight": torch.ones(4, 32), f"{KOHYA_Q}.lora_up.weight": torch.ones(32, 2)},
     "another base model"),  # ranks of A and B disagree
    ({f"{KOHYA_Q}.lora_down.weight": torch.ones(4, 32)}, "incomplete"),
    ({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(4, 32)}, "SDXL"),
    ({f"{KOHYA_Q}.dora_scale": torch.ones(1, 32)}, "DoRA"),
    ({f"{KOHYA_Q}.hada_w1_a": torch.ones(1, 32)}, "LoHa"),
    ({f"{KOHYA_Q}.diff": torch.ones(32, 32)}, "full-weight-difference"),  # was "maps to no layer", of a layer it
    ({f"{KOHYA_Q}.diff_b": torch.ones(32)}, "full-weight-difference"),  # names
    ({"lora_unet_down_blocks_0_resnets_0_norm1.w_norm": torch.ones(32)}, "LyCORIS norm-layer"),
    ({"something_else": torch.ones(1)}, "maps to no layer"),
    ({}, "holds no LoRA weights"),
    ({f"{KOHYA_Q}.lora_down.weight": torch.full((4, 32), float("nan")), f"{KOHYA_Q}.lora_up.weight": torch.ones(32, 4)},
     "non-finite"),
    ({f"{KOHYA_Q}.lora_down.weight": torch.ones(4, 32), f"{KOHYA_Q}.lora_up.weight": torch.ones(32, 4),
      f"{KOHYA_Q}.alpha": torch.tensor(float("inf"))}, "non-finite"),
    ({f"{KOHYA_Q}.lora_down.weight": torch.ones(4, 32, dtype=torch.int8),
      f"{KOHYA_Q}.lora_up.weight": torch.ones(32, 4, dtype=torch.int8)}, "int8 values"),
    ({f"{KOHYA_Q}.lora_down.weight": torch.ones(4, 32), f"{KOHYA_Q}.lora_up.weight": torch.ones(32, 4),
      f"{KOHYA_Q}.alpha": torch.tensor([4.0, 4.0])}, "one number per layer"),
    ({f"{KOHYA_Q}.lora_down.weight": torch.ones(0, 32), f"{KOHYA_Q}.lora_up.weight": torch.ones(32, 0)}, "rank 0"),
    ({f"{KOHYA_Q}.lora_down.weight": torch.ones(4, 32), f"{KOHYA_Q}.lora_up.weight": torch.ones(32, 4),
      f"unet.{UNET_Q}.lora_A.weight": torch.ones(2, 32), f"unet.{UNET_Q}.lora_B.weight": torch.ones(32, 2)},
     "two LoRA layouts"),
])
def test_a_lora_file_that_does_not_fit_is_one_line_naming_the_file(sd1_pair, tmp_path, tensors, expected):
    ours, _ = sd1_pair
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    message = one_line_error(WeightsError, lambda: ours.load_lora_weights(path))
    assert expected in message and str(path) in message
    assert ours.get_list_adapters() == {}  # nothing half-loaded


@pytest.mark.parametrize("header,expected", [
    ('{"unet.r": 4, "unet.lora_alpha": 8, "unet.use_rslora": true}', "use_rslora"),
    ("{not json", "not JSON"),
])
def test_a_metadata_header_we_cannot_honour_is_refused(sd1_pair, tmp_path, header, expected):
    """rsLoRA scales by alpha / sqrt(r): read with alpha / r it would run with the wrong strength, silently."""
    ours, _ = sd1_pair
    path = tmp_path / "meta.safetensors"
    save_file({f"unet.{UNET_Q}.lora_A.weight": torch.ones(4, 32), f"unet.{UNET_Q}.lora_B.weight": torch.ones(32, 4)},
              str(path), metadata={"lora_adapter_metadata": header})
    assert expected in one_line_error(WeightsError, lambda: ours.load_lora_weights(path))


def test_a_kohya_file_with_integer_alphas_matches_diffusers(sd1_pair, tmp_path):
    """Some kohya trainers store `.alpha` as int64; diffusers reads the number (it was refused as not floating
    point); a bool alpha is still refused."""
    ours, ref = sd1_pair
    path = write_lora(tmp_path / "f.safetensors", random_pairs(ours.model.unet, 4, alpha_of=lambda n, r: 2))
    tensors = safetensors.torch.load_file(str(path))
    save_file({k: v.long() if k.endswith(".alpha") else v for k, v in tensors.items()}, str(tmp_path / "i.safetensors"))
    kw = dict(prompt="a cat", image=picture(0), num_inference_steps=STEPS)
    for pipe in (ours, ref):
        pipe.load_lora_weights(str(tmp_path / "i.safetensors"), adapter_name="ints")
    assert rel(ours.invert(**kw, generator=gen(2)).latents, ref.invert(**kw, generator=gen(2)).latents) < LATENT_TOL
    assert all(p.alpha == 2.0 for p in ours.model.lora.adapters["ints"]["unet"].values())
    save_file({k: v.bool() if k.endswith(".alpha") else v for k, v in tensors.items()}, str(tmp_path / "b.safetensors"))
    assert "holds bool values" in one_line_error(WeightsError, lambda: ours.load_lora_weights(tmp_path / "b.safetensors"))


def test_a_kohya_file_with_some_alpha_keys_missing_matches_diffusers(sd1_pair, tmp_path):
    """A layer without `.alpha` in a file whose other layers have one takes the most common alpha of the file
    (diffusers makes it peft's lora_alpha), not its rank: 2 here (scale 0.5 at rank 4), where alpha = rank would run
    it at scale 1. ResNet layers keep their own alpha 1 (attention layers with an alpha off the most common one are
    left out: diffusers 0.42.1 loses those, see test_lora_file_alphas_on_attention_layers_are_each_layers_own).
    Tolerance: latents within LATENT_TOL (1e-3 relative, Frobenius)."""
    ours, ref = sd1_pair
    pairs = random_pairs(ours.model.unet, 6, alpha_of=lambda n, r: 1.0 if "resnets" in n else 2.0)
    path = write_lora(tmp_path / "all.safetensors", pairs)
    tensors = safetensors.torch.load_file(str(path))
    dropped = sorted(pairs)[::3]
    kept = {k: v for k, v in tensors.items() if k.removesuffix(".alpha") not in {KOHYA(n) for n in dropped}}
    assert len(kept) < len(tensors) and any("resnets" in n for n in dropped) and any("attn" in n for n in dropped)
    assert sum(v.item() == 2.0 for k, v in kept.items() if k.endswith(".alpha")) > len(pairs) / 3  # the usual one
    save_file(kept, str(tmp_path / "some.safetensors"))
    kw = dict(prompt="a cat", image=picture(0), num_inference_steps=STEPS)
    for pipe in (ours, ref):
        pipe.load_lora_weights(str(tmp_path / "some.safetensors"), adapter_name="some")
    assert rel(ours.invert(**kw, generator=gen(2)).latents, ref.invert(**kw, generator=gen(2)).latents) < LATENT_TOL
    loaded = ours.model.lora.adapters["some"]["unet"]
    assert {loaded[n].alpha for n in dropped} == {2.0}
    assert all(loaded[n].alpha == pairs[n].alpha for n in pairs if n not in dropped)


def test_lora_file_alphas_on_attention_layers_are_each_layers_own(sd1_pair, tmp_path):
    """Where we differ from diffusers 0.42.1 on purpose: a kohya `.alpha` on an attention projection that is not the
    file's most common alpha is that layer's (as kohya and A1111 run it); diffusers' converter names it
    `...processor.to_k_lora.down.weight`, which peft's alpha_pattern never matches (peft warns), so it runs that
    layer at the most common alpha. The two differ by far more than LATENT_TOL."""
    ours, ref = sd1_pair
    pairs = random_pairs(ours.model.unet, 7, alpha_of=lambda n, r: 8.0 if n.endswith("attn2.to_k") else 2.0)
    path = write_lora(tmp_path / "f.safetensors", pairs)
    kw = dict(prompt="a cat", image=picture(0), num_inference_steps=STEPS)
    ours.load_lora_weights(path, adapter_name="f")
    assert ours.model.lora.adapters["f"]["unet"][UNET_Q.replace("attn1.to_q", "attn2.to_k")].alpha == 8.0
    with pytest.warns(RuntimeWarning, match="alpha_pattern keys did not match"):
        ref.load_lora_weights(str(path), adapter_name="f")
    assert rel(ours.invert(**kw, generator=gen(2)).latents, ref.invert(**kw, generator=gen(2)).latents) > 10 * LATENT_TOL


def test_pickles_missing_and_corrupt_files_are_refused(sd1_pair, tmp_path):
    ours, _ = sd1_pair
    pickle = tmp_path / "lora.bin"
    pickle.write_bytes(b"not read")
    assert ".safetensors" in one_line_error(WeightsError, lambda: ours.load_lora_weights(pickle))
    for missing in (tmp_path / "none.safetensors", tmp_path / "nofolder", "nofolder"):  # named as missing, not
        assert "does not exist" in one_line_error(WeightsError, lambda: ours.load_lora_weights(missing))  # as pickles
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert "corrupt" in one_line_error(WeightsError, lambda: ours.load_lora_weights(corrupt))


def test_adapter_names_weights_and_components_are_checked(sd1_pair, tmp_path):
    ours, _ = sd1_pair
    path = write_lora(tmp_path / "a.safetensors", random_pairs(ours.model.unet, 1, chosen=lambda n: n == UNET_Q))
    ours.load_lora_weights(path, adapter_name="a")
    assert "already in use" in one_line_error(ValueError, lambda: ours.load_lora_weights(path, adapter_name="a"))
    assert "not loaded" in one_line_error(ValueError, lambda: ours.set_adapters(["a", "zz"]))
    assert "one weight each" in one_line_error(ValueError, lambda: ours.set_adapters(["a"], [1.0, 2.0]))
    assert "no LoRA" in one_line_error(ValueError, lambda: ours.fuse_lora(components=["vae"]))
    ours.load_lora_weights(path, adapter_name="b")
    ours.set_adapters(["a", "b"])
    assert "adapter_name" in one_line_error(ValueError, lambda: ours.save_lora_weights(tmp_path / "out"))
    ours.set_adapters("a", 0.5)  # one name, one weight, as diffusers accepts
    assert ours.model.lora.weights == {"a": 0.5}
    ours.set_adapters(("a", "b"), (0.5, 0.25))  # tuples as lists
    assert ours.model.lora.weights == {"a": 0.5, "b": 0.25}
    for weights, expected in [(float("nan"), "finite numbers"), ("0.5", "finite numbers"), (True, "finite numbers"),
                              ({"unet": 0.5}, "per-component")]:
        assert expected in one_line_error(ValueError, lambda: ours.set_adapters("a", weights))
    assert "twice" in one_line_error(ValueError, lambda: ours.set_adapters(["a", "a"], [0.5, 0.7]))
    # numpy numbers and one-number tensors are numbers (diffusers takes np.float32); they are stored as Python's
    ours.set_adapters(["a", "b"], [np.float32(0.5), torch.tensor(0.25, dtype=torch.float64)])
    assert ours.model.lora.weights == {"a": 0.5, "b": 0.25}
    assert all(type(w) is float for w in ours.model.lora.weights.values())
    ours.set_adapters(["a", "b"], (np.int64(2), torch.tensor([1])))
    assert ours.model.lora.weights == {"a": 2, "b": 1}
    ours.set_adapters(["a", "b"], (0.5, 0.25))
    for weights in (np.bool_(True), np.float64("nan"), torch.tensor([0.5, 0.5]), torch.tensor(True)):
        assert "finite numbers" in one_line_error(ValueError, lambda: ours.set_adapters("a", weights))
    assert ours.model.lora.weights == {"a": 0.5, "b": 0.25}  # a refused call changes nothing


def test_a_lora_loads_from_a_folder_or_a_dict_as_from_its_file(sd1_pair, tmp_path):
    """diffusers' other two forms: a folder holding pytorch_lora_weights.safetensors (or weight_name=), and a state
    dict; each gives the adapter its file gives, bit for bit."""
    ours, _ = sd1_pair
    pairs = random_pairs(ours.model.unet, 3, chosen=lambda n: n == UNET_Q)
    folder = tmp_path / "folder"
    folder.mkdir()
    path = write_lora(folder / "pytorch_lora_weights.safetensors", pairs)
    write_lora(folder / "other.safetensors", pairs)
    ours.load_lora_weights(path, adapter_name="file")
    ours.load_lora_weights(folder, adapter_name="folder")
    ours.load_lora_weights(folder, adapter_name="named", weight_name="other.safetensors")
    ours.load_lora_weights(safetensors.torch.load_file(str(path)), adapter_name="dict")
    loaded = ours.model.lora.adapters
    for name in ("folder", "named", "dict"):
        got, want = loaded[name]["unet"][UNET_Q], loaded["file"]["unet"][UNET_Q]
        assert torch.equal(got.down, want.down) and torch.equal(got.up, want.up) and got.alpha == want.alpha
    assert "no missing.safetensors" in one_line_error(
        WeightsError, lambda: ours.load_lora_weights(folder, weight_name="missing.safetensors"))
    assert "not a folder" in one_line_error(WeightsError, lambda: ours.load_lora_weights(path, weight_name="x"))
    assert "dict of tensors" in one_line_error(TypeError, lambda: ours.load_lora_weights(3))
    assert "non-finite" in one_line_error(WeightsError, lambda: ours.load_lora_weights(
        {f"{KOHYA_Q}.lora_down.weight": torch.full((4, 32), float("inf")), f"{KOHYA_Q}.lora_up.weight": torch.ones(32, 4)}))


def test_lora_scale_is_validated_and_other_cross_attention_kwargs_are_refused(sd1_pair):
    ours, _ = sd1_pair
    for bad in (float("nan"), float("inf"), "1", True, None):
        one_line_error(ValueError, lambda: DiffEditParams(lora_scale=bad))
    assert DiffEditParams(lora_scale=-0.5).lora_scale == -0.5  # a negative scale subtracts a LoRA: allowed
    message = one_line_error(ValueError, lambda: ours.invert(prompt="a cat", image=picture(0), num_inference_steps=2,
                                                             cross_attention_kwargs={"scale": 1.0, "gligen": {}}))
    assert "gligen" in message and "scale" in message
    with pytest.raises(ValueError, match="lora_scale"):
        ours.invert(prompt="a cat", image=picture(0), num_inference_steps=2,
                    cross_attention_kwargs={"scale": float("nan")})


# ------------------------------------------------------------------------------------------------ other layouts


OLD_TEXT_NAMES = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}


def test_older_diffusers_keys_and_alpha_keys_give_what_the_kohya_layout_gives(sd1_pair, tmp_path):
    """The attention-processor keys (`attn1.processor.to_q_lora.down.weight`, to_out_lora = to_out.0; the text
    encoder's to_q_lora = q_proj, `mlp.fc1.lora_linear_layer.down.weight`), `.lora.down.weight` keys, and `.alpha`
    keys in diffusers' layout give bit for bit the numbers of the same pairs in kohya's layout; diffusers reads the
    older UNet keys the same way."""
    ours, ref = sd1_pair
    attn = lambda n: ".attn1." in n or ".attn2." in n
    unet_pairs = random_pairs(ours.model.unet, 12, rank_of=mixed_rank, alpha_of=mixed_alpha,
                              chosen=lambda n: attn(n) or n.endswith("proj_in"))
    te_pairs = random_pairs(ours.model.text_encoder, 13, rank_of=mixed_rank, alpha_of=mixed_alpha,
                            chosen=lambda n: "layers.0." in n)
    old = {}
    for name, p in unet_pairs.items():
        if attn(name):
            block, proj = re.match(r"(.*\.attn[12])\.(.*)", name).groups()
            kind = {"to_out.0": "to_out"}.get(proj, proj)
            key = f"unet.{block}.processor.{kind}_lora"
        else:
            key = f"unet.{name}.lora"
        old[f"{key}.down.weight"], old[f"{key}.up.weight"] = p.down, p.up
        old[f"unet.{name}.alpha"] = torch.tensor(p.alpha)
    for name, p in te_pairs.items():
        layer, proj = name.rsplit(".", 1)
        if proj.endswith("_proj"):
            key = f"text_encoder.text_model.{layer}.{OLD_TEXT_NAMES[proj]}_lora"
        else:
            key = f"text_encoder.text_model.{name}.lora_linear_layer"
        old[f"{key}.down.weight"], old[f"{key}.up.weight"] = p.down, p.up
        old[f"text_encoder.text_model.{name}.alpha"] = torch.tensor(p.alpha)
    save_file({k: v.contiguous() for k, v in old.items()}, str(tmp_path / "old.safetensors"))
    write_lora(tmp_path / "kohya.safetensors", unet_pairs, te_pairs)
    corrected = StableDiffusionDiffEdit(ours.model, DiffEditParams())
    kw = dict(prompt="a cat", image=picture(0), num_inference_steps=STEPS, cross_attention_kwargs={"scale": 0.7})
    results = []
    for name in ("kohya", "old"):
        ours.load_lora_weights(tmp_path / f"{name}.safetensors", adapter_name=name)
        results.append(corrected.invert(**kw, generator=gen(2)).latents)
    assert torch.equal(*results)
    assert ours.model.lora.adapters["old"].keys() == {"unet", "text_encoder"}
    # diffusers: the older UNet keys without alphas (it refuses `.alpha` keys in this layout) against ours
    unet_only = {k: v for k, v in old.items() if k.startswith("unet.") and not k.endswith(".alpha")}
    save_file({k: v.contiguous() for k, v in unet_only.items()}, str(tmp_path / "old_unet.safetensors"))
    ours.load_lora_weights(tmp_path / "old_unet.safetensors")
    ref.load_lora_weights(str(tmp_path / "old_unet.safetensors"))
    expected = ref.invert(**kw, generator=gen(2)).latents
    assert rel(ours.invert(**kw, generator=gen(2)).latents, expected) < LATENT_TOL


def test_pairs_follow_their_layer_once_when_the_model_moves(sd1_folder, tmp_path):
    """A model moved after its LoRA was loaded (offload, `.to`): each pair is converted at the layer's first call
    and kept there, not copied at every call; the numbers equal a LoRA loaded after the move. (float64 stands in
    for another device: the CPU has one.)"""
    from diffedit import StableDiffusion

    sd, moved_first = StableDiffusion.from_pretrained(sd1_folder), StableDiffusion.from_pretrained(sd1_folder)
    path = write_lora(tmp_path / "unet.safetensors", random_pairs(sd.unet, 9))
    sd.load_lora_weights(path, adapter_name="style")
    sd.unet.to(torch.float64)
    moved_first.unet.to(torch.float64)
    moved_first.load_lora_weights(path, adapter_name="style")
    x, t = torch.randn(1, 4, 8, 8, generator=gen(0), dtype=torch.float64), torch.tensor(501)
    context = torch.randn(1, 77, sd.unet.config.cross_attention_dim, generator=gen(1), dtype=torch.float64)
    pairs = sd.lora.adapters["style"]["unet"]
    assert {p.down.dtype for p in pairs.values()} == {torch.float32}
    with torch.no_grad():
        got = sd.unet(x, t, context)
        after_first = dict(pairs)
        again = sd.unet(x, t, context)
        expected = moved_first.unet(x, t, context)
    assert {p.down.dtype for p in pairs.values()} == {torch.float64}
    assert all(pairs[name] is after_first[name] for name in pairs)  # moved once, then reused
    assert torch.equal(got, again)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())

"""The three steps of DiffEdit as functions: properties of the mask, inversion and masked decoding, and the
pix2pix-zero regularizer's losses against diffusers' own."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffedit import DiffEditParams, StableDiffusion
from diffedit import method
from diffedit.params import CORRECTIONS

torch.set_num_threads(1)

FAST = DiffEditParams(num_inference_steps=5, num_maps_per_mask=2)


@pytest.fixture(scope="module")
def sd(sd1_folder):
    return StableDiffusion.from_pretrained(sd1_folder)


@pytest.fixture(scope="module")
def sd_v(sd2_folder):
    return StableDiffusion.from_pretrained(sd2_folder)


def images(batch: int, seed: int = 0, size: int = 64) -> torch.Tensor:
    """Smooth random pictures in [-1, 1], (B, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(batch, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(small, size=(size, size), mode="bicubic").clamp(0, 1) * 2 - 1


def texts(sd, prompts):
    return method.encode_text(sd, prompts, [""] * len(prompts))


# ----------------------------------------------------------------------------------------------------------------
# Parameters


def test_params_reference_turns_every_correction_off_and_ablation_is_replace():
    ref = DiffEditParams.reference()
    assert all(getattr(DiffEditParams(), name) for name in CORRECTIONS.values())
    assert not any(getattr(ref, name) for name in CORRECTIONS.values())
    assert sorted(CORRECTIONS) == [f"D{i}" for i in range(1, 10)]
    assert dataclasses.replace(ref, inpaint_strength=0.5).inpaint_strength == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.inpaint_strength = 0.5


def test_params_reject_bad_values_and_unknown_names_listing_valid_ones():
    with pytest.raises(ValueError, match="inpaint_strength"):
        DiffEditParams(inpaint_strength=1.5)
    with pytest.raises(ValueError, match="num_maps_per_mask"):
        DiffEditParams(num_maps_per_mask=0)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="guidance_min_timestep: expected an int >= 0"):
            DiffEditParams(guidance_min_timestep=bad)
    with pytest.raises(TypeError, match="unknown DiffEdit parameter.*strenght.*valid names:.*inpaint_strength"):
        DiffEditParams().updated({"strenght": 0.5})


# ----------------------------------------------------------------------------------------------------------------
# Step 1: mask


@settings(max_examples=4, deadline=None)
@given(batch=st.integers(1, 3), n=st.integers(1, 3), ratio=st.floats(0.5, 4.0), guidance=st.sampled_from([1.0, 5.0]),
       seed=st.integers(0, 100))
def test_mask_is_binary_and_of_latent_shape_for_any_batch(sd, batch, n, ratio, guidance, seed):
    prompts = [f"a photo of thing {i}" for i in range(batch)]
    params = dataclasses.replace(FAST, num_maps_per_mask=n, mask_thresholding_ratio=ratio,
                                 mask_guidance_scale=guidance)
    est = method.estimate_mask(sd, images(batch, seed), texts(sd, prompts), texts(sd, [p + " and a dog" for p in
                                                                                      prompts]),
                               params, torch.Generator().manual_seed(seed))
    assert est.mask.shape == est.guidance_map.shape == (batch, 8, 8) and est.mask.dtype == torch.int64
    assert set(est.mask.unique().tolist()) <= {0, 1}
    assert est.guidance_map.min() >= 0 and est.guidance_map.max() <= 1
    assert torch.equal(est.mask, (est.guidance_map > 0.5).long())


def test_threshold_is_per_image_and_equal_texts_give_an_empty_mask():
    difference = torch.stack([torch.arange(16.0).reshape(4, 4), 10 * torch.arange(16.0).reshape(4, 4),
                              torch.zeros(4, 4)])
    with pytest.warns(UserWarning, match="identical"):
        fixed = method.threshold_map(difference, DiffEditParams(mask_thresholding_ratio=1.0))
    assert torch.equal(fixed.mask[0], fixed.mask[1]) and fixed.mask[2].max() == 0
    ref = method.threshold_map(difference, DiffEditParams.reference(mask_thresholding_ratio=1.0))
    assert not torch.equal(ref.mask[0], ref.mask[1])  # one scalar for the whole batch (D2)
    one = method.threshold_map(difference[2:], DiffEditParams.reference())
    assert torch.isnan(one.guidance_map).all() and one.mask.min() == 1  # 0/0 (D3)


@pytest.mark.parametrize("ratio", [1e-300, 1e-45])  # 0 in float32; float32's smallest, whose product is 0
def test_a_tiny_thresholding_ratio_clamps_just_above_zero_and_is_not_taken_for_identical_prompts(ratio):
    """ratio x mean rounds to 0 in float32 for a tiny ratio: that clamp was read as "identical prompts" (the scale
    swapped for 1, a 76% mask of a map over [0, 1] and a false warning). A clamp at ~0 rescales every value > 0 to 1:
    the mask is where the map is > 0, as a tiny ratio whose clamp does not round to 0 (1e-30) gives; zero values stay
    unedited."""
    difference = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0))
    difference[:, :2] = 0.0
    for per_image in (True, False):
        params = DiffEditParams(mask_thresholding_ratio=ratio, per_image_mask_scale=per_image)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "identical noise predictions" warning
            est = method.threshold_map(difference, params)
        assert torch.equal(est.mask, (difference > 0).long()) and int(est.mask.sum()) == 2 * 6 * 8
        representable = method.threshold_map(difference, dataclasses.replace(params, mask_thresholding_ratio=1e-30))
        assert torch.equal(est.guidance_map, representable.guidance_map)
        assert torch.equal(est.mask, representable.mask)
    ref = method.threshold_map(difference, DiffEditParams.reference(mask_thresholding_ratio=1e-300))
    assert torch.isnan(ref.guidance_map).all() and bool(ref.mask.eq(1).all())  # diffusers' 0/0 (D3) is kept


def test_identical_prompts_are_told_by_a_zero_map_even_when_the_clamp_is_the_batchs():
    """D2 off, D3 on: one picture's texts agree (its map is zero) while the batch's clamp is not: its mask is empty
    and the warning names it; the other picture is cut as before."""
    difference = torch.stack([torch.arange(16.0).reshape(4, 4), torch.zeros(4, 4)])
    params = DiffEditParams(per_image_mask_scale=False, mask_thresholding_ratio=1.0)
    with pytest.warns(UserWarning, match=r"identical noise predictions for picture\(s\) 1: the mask is empty"):
        est = method.threshold_map(difference, params)
    # the clamp is the batch's mean, 3.75; the cut at half of it
    assert est.mask[1].max() == 0 and torch.equal(est.mask[0], (difference[0] > 1.875).long())


def test_one_encode_with_n_draws_equals_n_encodes(sd):
    x = images(2, seed=3)
    once = method.encode_images(sd, x, torch.Generator().manual_seed(0), repeats=3, once=True)
    each = method.encode_images(sd, x, torch.Generator().manual_seed(0), repeats=3, once=False)
    assert once.shape == (6, 4, 8, 8)
    torch.testing.assert_close(once, each, rtol=1e-5, atol=1e-5)
    assert not torch.equal(once[0], once[1])  # distinct draws per row


def test_encoding_each_repeat_runs_the_vae_on_the_pictures_not_on_every_copy_at_once(sd, monkeypatch):
    """D8 off (the reference behaviour): 10 maps of 2 pictures are 10 VAE calls of 2 rows (one call of 20 rows held
    every copy's activations at once); each call's row order is the pictures', the draws the same as one encode."""
    calls, encode = [], sd.vae.encode
    monkeypatch.setattr(sd.vae, "encode", lambda x: calls.append(x.shape[0]) or encode(x))
    x = images(2, seed=4)
    each = method.encode_images(sd, x, torch.Generator().manual_seed(1), repeats=10, once=False)
    assert calls == [2] * 10
    once = method.encode_images(sd, x, torch.Generator().manual_seed(1), repeats=10, once=True)
    torch.testing.assert_close(each, once, rtol=0, atol=1e-6)  # the same encoding, rounded in other batches


# ----------------------------------------------------------------------------------------------------------------
# Steps 2 and 3: inversion and masked decoding


@settings(max_examples=3, deadline=None)
@given(strength=st.sampled_from([0.4, 0.8, 1.0]), steps=st.integers(3, 6), guidance=st.sampled_from([1.0, 4.0]),
       seed=st.integers(0, 100))
def test_zero_mask_returns_the_vae_round_trip_and_full_mask_equals_unmasked_decoding(sd, strength, steps, guidance,
                                                                                    seed):
    params = dataclasses.replace(FAST, num_inference_steps=steps, inpaint_strength=strength,
                                 inversion_guidance_scale=guidance, guidance_scale=guidance)
    x = images(1, seed)
    inv = method.invert(sd, x, texts(sd, ["a cat"]), params, torch.Generator().manual_seed(seed))
    assert inv.latents.shape == (1, int(steps * strength), 4, 8, 8)
    target = texts(sd, ["a dog"])
    zero = method.decode(sd, inv, torch.zeros(1, 1, 8, 8), target, params)
    assert torch.equal(zero, inv.clean)
    assert torch.equal(method.to_pixels(sd, zero), sd.vae.decode(inv.clean / sd.vae.scaling_factor))
    one = method.decode(sd, inv, torch.ones(1, 1, 8, 8), target, params)
    assert torch.equal(one, method.decode(sd, inv, None, target, params))


def test_guidance_interval_guides_only_timesteps_at_or_above_its_start(sd):
    params = dataclasses.replace(FAST, num_inference_steps=10, inpaint_strength=1.0, guidance_scale=6.0)
    inv = method.invert(sd, images(1), texts(sd, ["a cat"]), params, torch.Generator().manual_seed(0))
    target = texts(sd, ["a dog"])

    def trajectory(p):
        seen = []
        method.decode(sd, inv, None, target, p, callback=lambda i, t, x: seen.append(x.clone()))
        return seen

    guided = trajectory(params)
    never = trajectory(dataclasses.replace(params, guidance_min_timestep=1000))
    assert torch.equal(never[-1], trajectory(dataclasses.replace(params, guidance_scale=1.0))[-1])
    split = trajectory(dataclasses.replace(params, guidance_min_timestep=450))  # steps 901..501 guided, 401..1 not
    steps = sd.scheduler.timesteps(10).tolist()
    assert all(torch.equal(a, b) for a, b in zip(split[:5], guided[:5])) and not torch.equal(split[5], guided[5])
    x = guided[4]
    for t in steps[5:]:  # the rest, by hand, on the target prompt alone
        x = sd.scheduler.step(method.predict_noise(sd, x, torch.tensor(t), target, 1.0), t, x, 10).prev_sample
    assert torch.equal(x, split[-1])
    # At the cut-off: a step whose timestep equals guidance_min_timestep (501) is guided; one past it is not
    at = trajectory(dataclasses.replace(params, guidance_min_timestep=501))
    past = trajectory(dataclasses.replace(params, guidance_min_timestep=502))
    assert steps[4] == 501 and torch.equal(at[4], guided[4]) and torch.equal(past[3], guided[3])
    assert not torch.equal(past[4], guided[4])


def test_inversion_records_each_level_noisiest_first(sd):
    params = dataclasses.replace(FAST, num_inference_steps=10)
    inv = method.invert(sd, images(1), texts(sd, ["a cat"]), params, torch.Generator().manual_seed(0))
    assert inv.timesteps.tolist() == list(range(701, 0, -100))
    # each latent is one inverse DDIM step from the next-cleaner one
    x, t = inv.latents[:, -2], 101
    eps = method.predict_noise(sd, inv.latents[:, -1], torch.tensor(t), texts(sd, ["a cat"]), 7.5)
    torch.testing.assert_close(sd.inverse_scheduler.step(eps, t, inv.latents[:, -1], 10).prev_sample, x)


def test_pasted_latents_pair_by_position_or_by_level(sd):
    latents = torch.arange(8.0).reshape(1, 8, 1, 1, 1).expand(1, 8, 4, 8, 8)  # latent k holds the value k
    levels = torch.arange(701, 0, -100)
    inv = method.Inversion(latents, levels, torch.full((1, 4, 8, 8), -1.0))
    steps = method.strength_timesteps(sd.scheduler, 10, 0.8, "inpaint_strength")

    def values(params, inversion=inv, steps=steps):
        start, backgrounds = method.pasted_latents(sd, inversion, steps, params)
        return start[0, 0, 0, 0].item(), [b[0, 0, 0, 0].item() for b in backgrounds]

    ref, fixed = DiffEditParams.reference(num_inference_steps=10), DiffEditParams(num_inference_steps=10)
    assert values(ref) == (0, list(range(8)))  # D1: one step behind, ends on t=1
    assert values(fixed) == (0, list(range(1, 8)) + [-1])  # the step's target level, then x_0
    assert values(fixed, latents) == (0, list(range(1, 8)) + [7])  # a bare tensor has no x_0
    fewer = method.strength_timesteps(sd.scheduler, 10, 0.5, "inpaint_strength")  # 401 .. 1
    assert values(fixed, steps=fewer) == (3, [4, 5, 6, 7, -1])
    with pytest.raises(ValueError, match="5"):
        values(ref, steps=fewer)
    half = dataclasses.replace(fixed, num_inference_steps=5)  # levels 601, 401, 201, 1
    assert values(half, steps=method.strength_timesteps(sd.scheduler, 5, 0.8, "s")) == (1, [3, 5, 7, -1])


# ----------------------------------------------------------------------------------------------------------------
# pix2pix-zero regularizer


def test_auto_corr_and_kl_losses_equal_diffusers_and_draw_the_same_rolls():
    from diffusers.pipelines.deprecated.stable_diffusion_diffedit import pipeline_stable_diffusion_diffedit as ref

    noise = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    for portable in (False, True):
        g_ref, g_ours = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        torch.testing.assert_close(method.auto_corr_loss(noise, g_ours, portable), ref.auto_corr_loss(noise, g_ref))
        assert torch.equal(torch.randint(100, (1,), generator=g_ours), torch.randint(100, (1,), generator=g_ref))
    torch.testing.assert_close(method.kl_loss(noise, per_image=False), ref.kl_divergence(noise))
    torch.testing.assert_close(method.kl_loss(noise[:1], per_image=True), ref.kl_divergence(noise[:1]))
    assert method.kl_loss(torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(2))) < 1e-2


def test_regularizer_steps_lower_each_loss():
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.randn(1, 4, 8, 8, generator=g), size=(32, 32), mode="bilinear")

    def regularized(**kw):
        params = DiffEditParams(num_reg_steps=3, **kw)
        return method.regularize_noise(smooth, smooth, torch.tensor(0.5), "epsilon", params,
                                       torch.Generator().manual_seed(1))

    def auto_corr(x):
        return method.auto_corr_loss(x, torch.Generator().manual_seed(2))

    assert auto_corr(regularized(lambda_kl=0.0)) < auto_corr(smooth)
    assert method.kl_loss(regularized(lambda_auto_corr=0.0)) < method.kl_loss(smooth)
    assert torch.equal(regularized(lambda_kl=0.0, lambda_auto_corr=0.0), smooth)


def test_v_prediction_epsilon_conversion_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    x0, eps, a = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g), torch.tensor(0.3)
    xt, v = a.sqrt() * x0 + (1 - a).sqrt() * eps, a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(method.as_epsilon(v, xt, a, "v_prediction"), eps)
    torch.testing.assert_close(method.as_epsilon(x0, xt, a, "sample"), eps)
    assert method.as_epsilon(eps, xt, a, "epsilon") is eps


def test_regularized_inversion_of_a_v_prediction_batch_equals_each_image_alone(sd_v):
    params = dataclasses.replace(FAST, num_inference_steps=3, num_reg_steps=1, num_auto_corr_rolls=2)
    x, prompts = images(2, seed=5), ["a cat", "a bowl"]
    batch = method.invert(sd_v, x, texts(sd_v, prompts), params, [torch.Generator().manual_seed(i) for i in (0, 1)])
    for i in range(2):
        alone = method.invert(sd_v, x[i : i + 1], texts(sd_v, prompts[i : i + 1]), params,
                              torch.Generator().manual_seed(i))
        torch.testing.assert_close(batch.latents[i], alone.latents[0], rtol=1e-4, atol=1e-4)


def test_mask_needs_a_strength_that_runs_a_step(sd):
    with pytest.raises(ValueError, match="mask_encode_strength=0.01"):
        method.estimate_mask(sd, images(1), texts(sd, ["a"]), texts(sd, ["b"]),
                             dataclasses.replace(FAST, mask_encode_strength=0.01), None)
    assert np.isclose(FAST.mask_encode_strength, 0.5)


# ----------------------------------------------------------------------------------------------------------------
# Results that cannot be right are errors, never results


def nan_after(sd, monkeypatch, calls: int):
    """Make the UNet return NaN from its `calls`-th call on (1-based)."""
    forward, seen = sd.unet.forward, [0]

    def broken(*args, **kwargs):
        seen[0] += 1
        out = forward(*args, **kwargs)
        return out * float("nan") if seen[0] >= calls else out

    monkeypatch.setattr(sd.unet, "forward", broken)


@pytest.mark.parametrize("calls", [1, 3])
def test_non_finite_inversion_latents_are_an_error_naming_the_first_bad_step(sd, monkeypatch, calls):
    params = dataclasses.replace(FAST, inversion_guidance_scale=1.0)  # one UNet call per step
    nan_after(sd, monkeypatch, calls)
    steps = sd.inverse_scheduler.timesteps(5)[:4]
    with pytest.raises(method.ImpossibleResultError, match=f"inversion's latents .* at step {calls} of 4 "
                                                           f"\\(t={int(steps[calls - 1])}\\)"):
        method.invert(sd, images(1), texts(sd, ["a cat"]), params, torch.Generator().manual_seed(0))


def test_non_finite_decoding_mask_and_pixels_are_errors(sd, monkeypatch):
    params = dataclasses.replace(FAST, guidance_scale=1.0)
    inversion = method.invert(sd, images(1), texts(sd, ["a cat"]), params, torch.Generator().manual_seed(0))
    nan_after(sd, monkeypatch, 2)
    with pytest.raises(method.ImpossibleResultError, match="decoding's latents .* at step 2 of 4"):
        method.decode(sd, inversion, None, texts(sd, ["a dog"]), params)
    with pytest.raises(method.ImpossibleResultError, match="mask step's noise predictions are non-finite"):
        method.estimate_mask(sd, images(1), texts(sd, ["a cat"]), texts(sd, ["a dog"]), params,
                             torch.Generator().manual_seed(0))
    with pytest.raises(method.ImpossibleResultError, match="decoded pixels are non-finite"):
        method.to_pixels(sd, torch.full((1, 4, 8, 8), float("inf")))


def test_the_reference_modes_nan_map_is_not_an_error(sd):
    """D3: identical prompts give a 0/0 map in diffusers, hence a full mask; the noise itself is finite."""
    same = texts(sd, ["a cat"])
    est = method.estimate_mask(sd, images(1), same, same, DiffEditParams.reference(num_inference_steps=5,
                                                                                   num_maps_per_mask=2),
                               torch.Generator().manual_seed(0))
    assert bool(est.mask.eq(1).all())


@pytest.mark.parametrize("steps", [999, 500])  # stride 1: the last step's target level is exactly 0; stride 2: -1
def test_the_last_step_pastes_the_clean_latents_when_its_target_level_is_zero_or_below(sd, steps):
    params = dataclasses.replace(FAST, num_inference_steps=steps, inpaint_strength=4.5 / steps)  # 4 steps
    inversion = method.invert(sd, images(1), texts(sd, ["a cat"]), params, torch.Generator().manual_seed(0))
    assert len(inversion.timesteps) == 4 and int(inversion.timesteps[-1]) == 1
    out = method.decode(sd, inversion, torch.zeros(1, 1, 8, 8), texts(sd, ["a dog"]), params)
    assert torch.equal(out, inversion.clean)  # nothing edited: the image's own latents, not an error


# ----------------------------------------------------------------------------------------------------------------
# Thresholding rules


@pytest.mark.parametrize("values, cut, mask", [
    ([0.0, 0.0, 1.0, 1.0], 0.0, [0, 0, 1, 1]),  # the one cut between distinct values
    ([0.0, 0.1, 0.2, 0.9], 0.2, [0, 0, 0, 1]),  # between-class variances 0.03, 0.0625, 0.12: the last wins
    ([0.0, 0.0, 3.0, 6.0, 6.0, 3.0], 0.0, [0, 0, 1, 1, 1, 1]),  # cuts at 0 and 3 tie (4.5 each): the lowest
    ([0.5, 0.5, 0.5, 0.5], 0.5, [0, 0, 0, 0]),  # one value, no cut: nothing above it
])
def test_otsu_cuts_where_hand_computed_between_class_variance_peaks(values, cut, mask):
    maps = torch.tensor(values, dtype=torch.float32).reshape(1, 1, -1)
    assert method.otsu_threshold(maps).item() == pytest.approx(cut)
    est = method.threshold_map(maps * 0.1, DiffEditParams(mask_threshold_rule="otsu", mask_thresholding_ratio=100))
    assert est.mask.flatten().tolist() == mask  # on the rescaled map: the same cut, scaled


def test_otsu_is_per_image_and_ratio_stays_the_default():
    maps = torch.tensor([[[0.0, 0.1, 0.2, 0.9]], [[0.0, 0.0, 1.0, 1.0]]])
    assert method.otsu_threshold(maps).flatten().tolist() == pytest.approx([0.2, 0.0])
    assert DiffEditParams().mask_threshold_rule == "ratio"
    with pytest.raises(ValueError, match="mask_threshold_rule: expected one of \\('ratio', 'otsu'\\)"):
        DiffEditParams(mask_threshold_rule="mean")


def test_the_mask_step_computes_the_shared_unconditional_rows_once(sd):
    """Both negative prompts are "": three UNet rows per draw instead of four, with the four-row call's numbers
    (up to the batch's arithmetic); different negatives keep all four."""
    params = dataclasses.replace(FAST, num_maps_per_mask=3)
    rows, unet = [], sd.unet.forward

    def counting(x, t, context):
        rows.append(x.shape[0])
        return unet(x, t, context)

    image, source, target = images(1), texts(sd, ["a cat"]), texts(sd, ["a dog"])
    sd.unet.forward = counting
    try:
        got = method.estimate_mask(sd, image, source, target, params, torch.Generator().manual_seed(0))
        other = method.TextEmbeddings(target.cond, method.encode_text(sd, ["a dog"], ["blurry"]).uncond)
        method.estimate_mask(sd, image, source, other, params, torch.Generator().manual_seed(0))
    finally:
        sd.unet.forward = unet
    assert rows == [9, 12]
    # the four-row call, built by hand: [R-, R, Q-, Q] on the same noised latents
    g = torch.Generator().manual_seed(0)
    t = method.strength_timesteps(sd.scheduler, params.num_inference_steps, params.mask_encode_strength, "m")[0]
    x0 = method.encode_images(sd, image, g, 3, rows=3)
    xt = sd.scheduler.add_noise(x0, method.randn(tuple(x0.shape), g, x0.device, x0.dtype), t)
    s3, t3 = source.repeat_interleave(3), target.repeat_interleave(3)
    out = sd.unet(torch.cat([xt] * 4), t, torch.cat([s3.uncond, s3.cond, t3.uncond, t3.cond])).chunk(4)
    scale = params.mask_guidance_scale
    want = (method.guide(out[2], out[3], scale) - method.guide(out[0], out[1], scale)).abs().mean([0, 1])[None]
    torch.testing.assert_close(got.difference, want, rtol=1e-5, atol=1e-6)


def test_a_map_value_of_exactly_half_is_not_edited_and_the_clamp_is_at_ratio_times_the_mean():
    """Map [0, 0, 1, 2, 4, 8]: mean 2.5, ratio 0.8 -> clamp at 2.0 (exact in float32); rescaled
    [0, 0, 0.5, 1, 1, 1]: the value at exactly 0.5 stays out ("> 0.5" edits), the value at exactly the clamp is 1."""
    difference = torch.tensor([[[0.0, 0.0, 1.0, 2.0, 4.0, 8.0]]])  # (1, 1, 6)
    params = dataclasses.replace(FAST, mask_thresholding_ratio=0.8)
    est = method.threshold_map(difference, params)
    assert est.guidance_map.tolist() == [[[0.0, 0.0, 0.5, 1.0, 1.0, 1.0]]]
    assert est.mask.tolist() == [[[0, 0, 0, 1, 1, 1]]]
    just_over = method.threshold_map(difference + torch.tensor([0, 0, 1e-6, 0, 0, 0]), params)
    assert just_over.mask.tolist() == [[[0, 0, 1, 1, 1, 1]]]


@pytest.mark.parametrize("steps, strength, n", [(10, 0.1, 1), (10, 0.19, 1), (10, 0.2, 2), (50, 0.8, 40),
                                                (25, 0.6, 15), (10, 1.0, 10), (10, 0.3, 3)])
def test_a_strength_runs_int_steps_times_strength_of_the_last_timesteps(sd, steps, strength, n):
    """diffusers' `get_timesteps`: int(N * strength), the last of the schedule (10 * 0.3 = 3.0000000000000004)."""
    got = method.strength_timesteps(sd.scheduler, steps, strength, "s")
    assert got.tolist() == sd.scheduler.timesteps(steps).tolist()[steps - n:] and len(got) == n


def test_a_strength_under_one_step_is_refused_at_the_cut_off(sd):
    with pytest.raises(ValueError, match=r"int\(10 \* 0.099\) = 0"):
        method.strength_timesteps(sd.scheduler, 10, 0.099, "inpaint_strength")
    assert len(method.strength_timesteps(sd.scheduler, 10, 0.1, "inpaint_strength")) == 1


@pytest.mark.parametrize("steps", [3, 7, 49, 98, 4, 25])
def test_the_strength_a_refusal_suggests_runs_a_step(sd, steps):
    """The hint's value must itself be accepted: 1 / N printed with 6 digits is not for N = 3 (int(3 * 0.333333)
    = 0), nor 1 / N exactly for N = 49 (int(49 * (1 / 49)) = 0)."""
    import re

    with pytest.raises(ValueError, match="runs no step") as refused:
        method.strength_timesteps(sd.scheduler, steps, 0.5 / steps, "inpaint_strength")
    suggested = float(re.search(r"use inpaint_strength >= ([0-9.e-]+) or more steps", str(refused.value))[1])
    assert len(method.strength_timesteps(sd.scheduler, steps, suggested, "inpaint_strength")) == 1
    assert 1 / steps <= suggested <= 1.001 / steps


def _otsu_by_definition(values: np.ndarray) -> float:
    """Otsu's cut straight from the definition: try every distinct value t, split into {<= t} and {> t}, keep the
    largest w0 w1 (mu0 - mu1)^2 (the first on a tie); one value: that value."""
    best, cut = -1.0, float(values.max())
    for t in np.unique(values)[:-1]:
        low, high = values[values <= t], values[values > t]
        w0, w1 = len(low) / len(values), len(high) / len(values)
        between = w0 * w1 * (low.mean() - high.mean()) ** 2
        if between > best:
            best, cut = between, float(t)
    return cut


def test_otsu_equals_the_definition_on_a_batch_of_uneven_maps():
    """Maps of different sizes of classes, sums and repeated values, in one batch: each image its own cut."""
    rng = np.random.default_rng(0)
    maps = np.stack([rng.integers(0, k, 16).astype(np.float64) for k in (2, 3, 5, 9, 40)]
                    + [np.r_[np.zeros(13), [5.0, 6.0, 7.0]], np.full(16, 2.0)])  # (7, 16): skewed; one value
    got = method.otsu_threshold(torch.tensor(maps).reshape(7, 4, 4)).flatten().tolist()
    assert got == [_otsu_by_definition(m) for m in maps]


def test_guidance_between_one_and_two_is_guidance(sd):
    """A scale of 1.5 runs the guided pair (scale <= 1 alone means no guidance)."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text, t = texts(sd, ["a cat"]), torch.tensor(500)
    uncond, cond = sd.unet(x, t, text.uncond), sd.unet(x, t, text.cond)
    torch.testing.assert_close(method.predict_noise(sd, x, t, text, 1.5), uncond + 1.5 * (cond - uncond),
                               rtol=1e-4, atol=1e-5)  # one call on the pair against two: the batch's rounding
    assert torch.equal(method.predict_noise(sd, x, t, text, 1.0), cond)


def test_with_steps_offset_0_a_step_whose_target_is_level_0_pastes_the_inverted_level_0(sd):
    """steps_offset 0 inverts level 0 itself (DDIM leading, 10 steps: 0, 100, ..., 900): the step from t=100 pastes
    that latent, and only the last step (t=0, target -100) pastes the clean latents. Each inverted latent is filled
    with its level, so what is pasted can be read off."""
    from diffedit.schedulers.ddim import DDIMInverseScheduler, DDIMScheduler

    config = dataclasses.replace(sd.scheduler.config, steps_offset=0)
    zero = dataclasses.replace(sd, scheduler=DDIMScheduler(config), inverse_scheduler=DDIMInverseScheduler(config))
    levels = zero.scheduler.timesteps(10)  # 900, 800, ..., 0
    assert levels.tolist() == list(range(900, -1, -100))
    latents = levels.float().reshape(1, 10, 1, 1, 1).expand(1, 10, 4, 2, 2)  # latent k holds its level
    inversion = method.Inversion(latents, levels, torch.full((1, 4, 2, 2), -1.0))  # clean: -1
    params = dataclasses.replace(FAST, num_inference_steps=10, inpaint_strength=1.0)
    start, backgrounds = method.pasted_latents(zero, inversion, levels, params)
    assert float(start.flatten()[0]) == 900
    assert [float(b.flatten()[0]) for b in backgrounds] == [800, 700, 600, 500, 400, 300, 200, 100, 0, -1]


def test_latents_given_for_the_image_are_repeated_not_encoded(sd):
    """A batch with the latent channel count is taken as latents: each repeated `repeats` times in a row (and
    tiled over `rows`), nothing drawn."""
    latents = torch.arange(2 * 4 * 8 * 8, dtype=torch.float32).reshape(2, 4, 8, 8)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    out = method.encode_images(sd, latents, g, repeats=3)
    assert out.shape == (6, 4, 8, 8) and torch.equal(g.get_state(), state)
    assert all(torch.equal(out[i], latents[i // 3]) for i in range(6))
    tiled = method.encode_images(sd, latents, g, rows=4)
    assert torch.equal(tiled, torch.cat([latents, latents]))


def test_an_inversion_repeats_each_images_latents_in_a_row():
    """(B, T, C, h, w) latents and (B, C, h, w) clean latents repeated along the batch, as prompts are repeated."""
    latents = torch.arange(2 * 3 * 1 * 1 * 1, dtype=torch.float32).reshape(2, 3, 1, 1, 1)
    inv = method.Inversion(latents, torch.tensor([21, 11, 1]), torch.tensor([10.0, 20.0]).reshape(2, 1, 1, 1))
    twice = inv.repeat_interleave(2)
    assert twice.latents.flatten().tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]
    assert twice.clean.flatten().tolist() == [10, 10, 20, 20] and torch.equal(twice.timesteps, inv.timesteps)
    assert twice.clean.shape == (4, 1, 1, 1) and twice.latents.shape == (4, 3, 1, 1, 1)  # rows, not channels


def test_the_regularizer_helpers_default_to_the_portable_per_image_forms():
    """Called directly, auto_corr_loss draws its rolls on the generator's device (portable) and kl_loss sums each
    image's term; the reference's forms are the explicit False."""
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    noise[1] *= 3  # two images with different statistics: pooling them differs from summing each
    assert method.kl_loss(noise) == method.kl_loss(noise, per_image=True) != method.kl_loss(noise, per_image=False)
    calls = []
    original = method._randint
    try:
        method._randint = lambda high, generator, portable: calls.append(portable) or 0
        method.auto_corr_loss(noise, torch.Generator())
    finally:
        method._randint = original
    assert calls and all(calls)


# ----------------------------------------------------------------------------------------------------------------
# DPM-Solver++ as the sampler


@pytest.mark.parametrize("strength, guidance", [(1.0, 1.0), (0.6, 5.0)])
def test_dpm_decoding_without_a_mask_equals_diffusers_dpm_solver_from_the_same_latent(sd, strength, guidance):
    """The decoding loop against diffusers' DPMSolverMultistepScheduler started at the same level (set_begin_index,
    as its image-to-image pipelines do) with the same network outputs."""
    from diffusers import DPMSolverMultistepScheduler

    c = sd.scheduler.config
    ref = DPMSolverMultistepScheduler(num_train_timesteps=c.num_train_timesteps, beta_start=c.beta_start,
                                      beta_end=c.beta_end, beta_schedule=c.beta_schedule, steps_offset=c.steps_offset,
                                      prediction_type=c.prediction_type, timestep_spacing=c.timestep_spacing)
    params = dataclasses.replace(FAST, sampler="dpmsolver++", num_inference_steps=10, inpaint_strength=strength,
                                 guidance_scale=guidance)
    steps = method.strength_timesteps(method.schedule(sd, params), 10, strength, "s")
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    inversion = method.Inversion(start[:, None], steps[:1], torch.zeros(1, 4, 8, 8))
    text = texts(sd, ["a dog"])
    got = method.decode(sd, inversion, None, text, params)
    ref.set_timesteps(10)
    ref.set_begin_index(10 - len(steps))
    assert ref.timesteps[10 - len(steps):].tolist() == steps.tolist()
    x = start
    for t in steps:
        x = ref.step(method.predict_noise(sd, x, t, text, guidance), t, x).prev_sample
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


def test_dpm_inversion_climbs_the_decodings_levels_and_reconstructs_the_image():
    """On the shipped model, the source prompt, no guidance, 10 steps at r = 0.6: the inverted latents sit at the
    decoding's 6 timesteps, and decoding them without a mask gives the image back (measured 45.0 dB PSNR; DDIM at
    10 steps: 47.6 dB)."""
    from PIL import Image

    from diffedit import api, evaluate
    from diffedit.locations import EXAMPLE_IMAGE, SHIPPED_MODEL

    shipped = StableDiffusion.from_pretrained(SHIPPED_MODEL)
    pixels = api.model_pixels(shipped, Image.open(EXAMPLE_IMAGE).convert("RGB"))
    params = dataclasses.replace(DiffEditParams.for_model(shipped), sampler="dpmsolver++", num_inference_steps=10,
                                 guidance_scale=1.0)
    text = api.prompt_text(shipped, "a red circle on a gray background", params)
    inversion = method.invert(shipped, pixels, text, params, torch.Generator().manual_seed(0))
    steps = method.strength_timesteps(method.schedule(shipped, params), 10, params.inpaint_strength, "s")
    assert inversion.timesteps.tolist() == steps.tolist() == [541, 451, 361, 271, 181, 91]
    back = api.to_picture(shipped, method.decode(shipped, inversion, None, text, params), (64, 64))
    image = api.to_picture(shipped, inversion.clean, (64, 64))
    assert evaluate.psnr(np.asarray(back), np.asarray(image)) > 43.0


def test_dpm_refuses_the_regularizer_and_ddim_inversions(sd):
    params = dataclasses.replace(FAST, sampler="dpmsolver++", num_inference_steps=10)
    with pytest.raises(ValueError, match="sampler='ddim' only"):
        method.invert(sd, images(1), texts(sd, ["a"]), dataclasses.replace(params, num_reg_steps=1))
    ddim = method.invert(sd, images(1), texts(sd, ["a"]), dataclasses.replace(params, sampler="ddim"))
    with pytest.raises(ValueError, match="invert with the same sampler"):
        method.decode(sd, ddim, torch.ones(1, 1, 8, 8), texts(sd, ["b"]), params)


def test_dpm_on_a_v_prediction_model_inverts_and_decodes_with_the_mask(sd_v):
    """SD 2.x style (v-prediction): the data prediction alpha x - sigma v in both directions; the masked decoding
    keeps the inverted latents outside the mask exactly and ends on the clean latents there."""
    params = dataclasses.replace(FAST, sampler="dpmsolver++", num_inference_steps=10, inpaint_strength=0.5)
    inversion = method.invert(sd_v, images(1), texts(sd_v, ["a cat"]), params, torch.Generator().manual_seed(0))
    assert inversion.timesteps.tolist() == [451, 361, 271, 181, 91]
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    out = method.decode(sd_v, inversion, mask, texts(sd_v, ["a dog"]), params)
    assert torch.isfinite(out).all()
    assert torch.equal(out[..., 4:], inversion.clean[..., 4:])  # outside: the clean latents after the last step
    assert not torch.equal(out[..., :4], inversion.clean[..., :4])


def test_a_step_whose_target_level_1_was_not_inverted_is_refused_not_pasted_clean(sd):
    """Level 1 is a real level (above the clean end): a decoding step that lands on it needs its inverted latent;
    an inversion that lacks it is refused rather than pasting the clean latents."""
    levels = sd.scheduler.timesteps(10)  # 901, 801, ..., 101, 1
    inversion = method.Inversion(torch.zeros(1, 9, 4, 2, 2), levels[:-1], torch.zeros(1, 4, 2, 2))  # no level 1
    params = dataclasses.replace(FAST, num_inference_steps=10, inpaint_strength=0.9)  # 801 .. 1
    with pytest.raises(ValueError, match="needs timestep 1"):
        method.pasted_latents(sd, inversion, method.strength_timesteps(sd.scheduler, 10, 0.9, "s"), params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++"])
def test_the_inversion_and_decoding_loops_never_wait_for_the_gpu_between_steps(sd1_folder, sampler):
    """Every step after the first runs with CUDA's sync debug mode set to "error": any host-device sync inside the
    loop (a timestep copied to the device, `.item()`, a branch on a device tensor) raises. The mode is set by the
    first step's callback and cleared by the last one's, before the one read of the non-finite watch after the loop."""
    model = StableDiffusion.from_pretrained(sd1_folder, device="cuda")
    p = dataclasses.replace(FAST, num_inference_steps=6, inpaint_strength=1.0, sampler=sampler)
    image = images(1).to("cuda")
    text = texts(model, ["a cat"])

    def strict(n: int):
        def callback(i, t, x):
            torch.cuda.set_sync_debug_mode("error" if i < n - 1 else "default")
        return callback

    try:
        inv = method.invert(model, image, text, p, callback=strict(6))
        method.decode(model, inv, torch.ones(1, 1, 8, 8, device="cuda"), text, p, callback=strict(6))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("shape", [(1, 4, 18, 12), (2, 4, 12, 36)])
def test_auto_corr_loss_on_non_square_latents_equals_diffusers(shape):
    """diffusers rolls both axes by a draw below height // 2 and stops pooling once the height is at most 8; on
    non-square latents (and a height of 18, pooled to 9 then 4) the width must not stand in for the height."""
    from diffusers.pipelines.deprecated.stable_diffusion_diffedit import pipeline_stable_diffusion_diffedit as ref

    noise = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    for portable in (False, True):
        g_ref, g_ours = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        torch.testing.assert_close(method.auto_corr_loss(noise, g_ours, portable), ref.auto_corr_loss(noise, g_ref))
        assert torch.equal(torch.randint(100, (1,), generator=g_ours), torch.randint(100, (1,), generator=g_ref))


@pytest.mark.parametrize("field", ["lambda_auto_corr", "lambda_kl"])
def test_a_regularizer_weight_below_one_still_regularizes(field):
    """Each loss runs for any positive weight: 0.5 moves the noise, 0 leaves it (the other weight off)."""
    g = torch.Generator().manual_seed(0)
    noise = torch.nn.functional.interpolate(torch.randn(1, 4, 8, 8, generator=g), size=(32, 32), mode="bilinear")
    other = "lambda_kl" if field == "lambda_auto_corr" else "lambda_auto_corr"

    def regularized(weight):
        params = DiffEditParams(num_reg_steps=2, **{field: weight, other: 0.0})
        return method.regularize_noise(noise, noise, torch.tensor(0.5), "epsilon", params,
                                       torch.Generator().manual_seed(1))

    assert torch.equal(regularized(0.0), noise)
    assert (regularized(0.5) - noise).abs().max() > 1e-6


def test_mask_guidance_between_one_and_two_is_guidance(sd):
    """The mask step guides at any mask_guidance_scale above 1: 1.5 gives another map than 1 (unguided)."""
    p = dataclasses.replace(FAST, mask_without_guidance=True)
    run = lambda scale: method.estimate_mask(sd, images(1), texts(sd, ["a cat"]), texts(sd, ["a dog"]),
                                             dataclasses.replace(p, mask_guidance_scale=scale),
                                             torch.Generator().manual_seed(0)).difference
    assert (run(1.5) - run(1.0)).abs().max() > 1e-6


def test_the_negative_prompts_take_their_own_clip_skip(sd):
    """negative_clip_skip reaches the negative prompts' states only; clip_skip the prompts' only."""
    base = method.encode_text(sd, ["a cat"], ["a dog"])
    skipped = method.encode_text(sd, ["a cat"], ["a dog"], negative_clip_skip=1)
    assert torch.equal(skipped.cond, base.cond)
    assert torch.equal(skipped.uncond, method.encode_text(sd, ["a dog"], clip_skip=1).cond)
    assert not torch.equal(skipped.uncond, base.uncond)


# ----------------------------------------------------------------------------------------------------------------
# Arguments checked before any work


def test_each_step_refuses_arguments_that_would_fail_deep_inside_or_run_wrong(sd, monkeypatch):
    """Pictures out of [-1, 1] (0-255 values ran silently), prompt batches of different sizes, guidance without
    negative prompts (an AttributeError), generator lists of a count that is neither one per picture nor one per
    draw (silently shared), a generator that is not one (AttributeError), masks off the latent grid or outside
    [0, 1]: each a ValueError or TypeError naming the argument, before the UNet runs."""
    p = FAST
    monkeypatch.setattr(sd.unet, "forward", lambda *a: pytest.fail("the UNet ran"))
    two, one = texts(sd, ["a cat", "a dog"]), texts(sd, ["a cat"])
    x = images(1)
    cases = [
        (lambda: method.estimate_mask(sd, x * 127.5 + 127.5, one, one, p), ValueError, r"pixels must be in \[-1, 1\]"),
        (lambda: method.estimate_mask(sd, x, two, one, p), ValueError, "prompt batches differ in size"),
        (lambda: method.estimate_mask(sd, x, method.TextEmbeddings(one.cond), one, p), ValueError,
         "negative prompt embeddings"),
        (lambda: method.estimate_mask(sd, x, one, one, p, [torch.Generator()] * 3), ValueError,
         "a list of 3 generators for 1 picture"),
        (lambda: method.estimate_mask(sd, x, one, one, p, 0), TypeError, "generator: expected"),
        (lambda: method.invert(sd, x, one, p, [torch.Generator()] * 2), ValueError, "give 1"),
        (lambda: method.invert(sd, x[:, :2], one, p), ValueError, "3 channels"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    latents = torch.zeros(1, 4, 4, 8, 8)
    for mask, message in [(torch.ones(1, 1, 4, 4), r"expected shape \(1, 1, 8, 8\)"),
                          (torch.ones(1, 8, 8), r"expected shape \(1, 1, 8, 8\).*mask\[:, None\]"),
                          (torch.full((1, 1, 8, 8), 255.0), r"values in \[0, 1\]"),
                          (torch.full((1, 1, 8, 8), float("nan")), r"values in \[0, 1\]")]:
        with pytest.raises(ValueError, match=message):
            method.decode(sd, latents, mask, one, p)
    # prompts and inverted pictures one to one: 2 prompts on 1 inversion (silently decoded the first picture under
    # both) and 1 prompt on 2 inversions (a raw shape error inside the UNet)
    for inverted, text, message in [(latents, two, "holds 1 picture.* but 2 target prompt"),
                                     (torch.zeros(2, 4, 4, 8, 8), one, "holds 2 picture.* but 1 target prompt")]:
        with pytest.raises(ValueError, match=message):
            method.decode(sd, inverted, None, text, p)
    # one generator per picture, or one per draw, are both fine (the UNet is reached)
    for gens in ([torch.Generator()], [torch.Generator()] * p.num_maps_per_mask):
        with pytest.raises(pytest.fail.Exception, match="the UNet ran"):
            method.estimate_mask(sd, x, one, one, p, gens)


def test_a_picture_batch_the_prompts_do_not_tile_is_refused_before_the_vae_runs(sd, monkeypatch):
    """2 pictures for 3 prompts (or 3 for 1) failed after the VAE had encoded them, with "cannot repeat 2 image(s)
    over 3 prompts", naming no argument; one picture for several prompts (diffusers' broadcast) still runs."""
    monkeypatch.setattr(method, "vae_encode", lambda *a, **k: pytest.fail("the VAE ran"))
    three, one = texts(sd, ["a cat", "a dog", "a cow"]), texts(sd, ["a cat"])
    for pictures, text, message in [(images(2), three, r"image: 2 picture\(s\) for 3 prompt\(s\): give one prompt per"),
                                    (images(3), one, r"image: 3 picture\(s\) for 1 prompt\(s\)")]:
        for call in (lambda: method.estimate_mask(sd, pictures, text, text, FAST),
                     lambda: method.invert(sd, pictures, text, FAST)):
            with pytest.raises(ValueError, match=message):
                call()
    with pytest.raises(pytest.fail.Exception, match="the VAE ran"):
        method.invert(sd, images(1), three, FAST)


def test_encode_text_refuses_a_bare_string_mismatched_negatives_and_non_strings(sd, monkeypatch):
    """A string was read as one prompt per character ("a red circle": 12 prompts), negative_prompts="" as an empty
    batch, and mismatched batch sizes failed later inside the UNet: each refused naming the argument and the fix."""
    monkeypatch.setattr(sd.text_encoder, "forward", lambda *a, **k: pytest.fail("the text encoder ran"))
    cases = [
        (("a red circle", [""]), TypeError, r"prompts: expected a list of strings, got a string: pass \['a red circle'\]"),
        ((["a red circle"], ""), TypeError, r"negative_prompts: expected a list of strings, got a string"),
        ((["a", "b"], [""]), ValueError, r"negative_prompts: 1 negative prompt\(s\) for 2 prompt\(s\)"),
        ((["a"], ["", ""]), ValueError, r"negative_prompts: 2 negative prompt\(s\) for 1 prompt\(s\)"),
        ((None,), TypeError, "prompts: expected a list of strings, got NoneType"),
        (([],), ValueError, "prompts: expected at least one prompt"),
        ((["a", None],), TypeError, r"prompts\[1\]: expected a string"),
        ((["a"], [3]), TypeError, r"negative_prompts\[0\]: expected a string .*got int"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            method.encode_text(sd, *args)


def test_each_step_refuses_params_that_are_not_a_diffedit_params(sd, monkeypatch):
    """A dict of fields gave AttributeError ('dict' object has no attribute 'lora_scale')."""
    monkeypatch.setattr(sd.unet, "forward", lambda *a: pytest.fail("the UNet ran"))
    one, x, fields = texts(sd, ["a cat"]), images(1), {"num_maps_per_mask": 2}
    for call in (lambda: method.estimate_mask(sd, x, one, one, fields),
                 lambda: method.invert(sd, x, one, fields),
                 lambda: method.decode(sd, torch.zeros(1, 4, 4, 8, 8), None, one, fields),
                 lambda: method.invert_dpm(sd, x, one, fields),
                 lambda: method.threshold_map(torch.rand(1, 8, 8), fields)):
        with pytest.raises(TypeError, match=r"params: expected a DiffEditParams, got dict: pass DiffEditParams\(\*\*params\)"):
            call()


def test_to_pixels_refuses_latents_that_are_not_b_c_h_w(sd, monkeypatch):
    """3-D latents failed inside the VAE's group norm with a RuntimeError about weights."""
    monkeypatch.setattr(sd.vae, "decode", lambda *a, **k: pytest.fail("the VAE ran"))
    for latents, error, message in [
        (torch.zeros(4, 8, 8), ValueError, r"latents: expected floating-point \(B, 4, h, w\) latents .*got \(4, 8, 8\)"
                                           r".*latents\[None\]"),
        (torch.zeros(1, 3, 8, 8), ValueError, r"got \(1, 3, 8, 8\)"),
        (torch.zeros(1, 4, 8, 8, dtype=torch.long), ValueError, "torch.int64"),
        (np.zeros((1, 4, 8, 8), np.float32), TypeError, "latents: expected a .* tensor .*got ndarray"),
    ]:
        with pytest.raises(error, match=message):
            method.to_pixels(sd, latents)


def test_a_bool_mask_decodes_as_its_0_1_float(sd):
    one = texts(sd, ["a dog"])
    p = dataclasses.replace(FAST, inpaint_strength=0.4)
    inv = method.invert(sd, images(1), texts(sd, ["a cat"]), p)
    region = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    region[..., 2:6, 2:6] = True
    assert torch.equal(method.decode(sd, inv, region, one, p), method.decode(sd, inv, region.float(), one, p))


def test_an_integer_0_1_mask_decodes_as_its_float_and_other_integers_are_refused(sd):
    """estimate_mask's own mask is int64: mask[:, None] is a valid decoding mask (it was refused as not float)."""
    one, p = texts(sd, ["a dog"]), dataclasses.replace(FAST, inpaint_strength=0.4)
    inv = method.invert(sd, images(1), texts(sd, ["a cat"]), p)
    region = torch.zeros(1, 1, 8, 8, dtype=torch.int64)
    region[..., 2:6, 2:6] = 1
    float_mask = method.decode(sd, inv, region.float(), one, p)
    for dtype in (torch.int64, torch.uint8, torch.int32):
        assert torch.equal(method.decode(sd, inv, region.to(dtype), one, p), float_mask)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        method.decode(sd, inv, region * 255, one, p)


def test_the_mask_step_runs_many_draws_in_calls_of_bounded_size_with_the_same_map(sd, monkeypatch):
    """Many maps (or pictures) are not one UNet call of unbounded size (100000 maps were an out-of-memory kill):
    MASK_DRAWS_PER_CALL draws per call, the same random draws, the same map up to the batch's rounding."""
    p = dataclasses.replace(FAST, num_maps_per_mask=5)
    source, target, x = texts(sd, ["a cat", "a bowl"]), texts(sd, ["a dog", "a cup"]), images(2)
    whole = method.estimate_mask(sd, x, source, target, p, torch.Generator().manual_seed(3))
    calls = []
    forward = sd.unet.forward
    monkeypatch.setattr(sd.unet, "forward", lambda x, *a: calls.append(x.shape[0]) or forward(x, *a))
    monkeypatch.setattr(method, "MASK_DRAWS_PER_CALL", 3)
    parts = method.estimate_mask(sd, x, source, target, p, torch.Generator().manual_seed(3))
    assert calls == [9, 9, 9, 3]  # 10 draws in calls of 3, three rows each (the shared "" computed once)
    torch.testing.assert_close(parts.difference, whole.difference, rtol=0, atol=1e-5)  # rounding of other batches
    assert torch.equal(parts.mask, whole.mask)

"""`StableDiffusionDiffEdit` gives diffusers 0.42.1's numbers, and each corrected defect D1-D9 is shown against
the reference's behaviour (diffusers run on the same tiny checkpoint folders)."""

import inspect

import numpy as np
import PIL.Image
import pytest
import torch

from diffedit import DiffEditParams, StableDiffusionDiffEdit
from parity import IMAGE_TOL, LATENT_TOL, MASK_TOL, gen, max_abs, picture, reference_pipeline, rel

torch.set_num_threads(1)

STEPS = 10  # inversion / decoding steps where the parity point does not need 50 (mask: always the default 50)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pipes(request):
    """(reference pipeline, our compatible facade, our corrected facade) on the same folder."""
    folder = request.getfixturevalue(f"{request.param}_folder")
    ours = StableDiffusionDiffEdit.from_pretrained(folder)
    return reference_pipeline(folder), ours, StableDiffusionDiffEdit(ours.model, DiffEditParams())


@pytest.fixture(scope="module")
def sd1(sd1_folder):
    ours = StableDiffusionDiffEdit.from_pretrained(sd1_folder)
    return reference_pipeline(sd1_folder), ours, StableDiffusionDiffEdit(ours.model, DiffEditParams())


@pytest.fixture(scope="module")
def sd2(sd2_folder):
    ours = StableDiffusionDiffEdit.from_pretrained(sd2_folder)
    return reference_pipeline(sd2_folder), ours, StableDiffusionDiffEdit(ours.model, DiffEditParams())


# ----------------------------------------------------------------------------------------------------------------
# Parity with diffusers (every correction off)


def test_masks_match_reference_for_several_thresholding_ratios(pipes):
    ref, ours, _ = pipes
    image = picture(0)
    agree, coverages = [], []
    for ratio in (1.5, 2.0, 2.5, 3.0):
        for negatives in ((None, None), ("blurry", "a drawing")):  # distinct negatives expose the swapped CFG
            kw = dict(image=image, source_prompt="a cat", target_prompt="a dog", mask_thresholding_ratio=ratio,
                      source_negative_prompt=negatives[0], target_negative_prompt=negatives[1])
            expected = ref.generate_mask(**kw, generator=gen(1))
            got = ours.generate_mask(**kw, generator=gen(1))
            assert got.dtype == expected.dtype == np.int64 and got.shape == expected.shape == (1, 8, 8)
            agree.append((got == expected).mean())
            coverages.append(expected.mean())
    assert np.mean(agree) >= MASK_TOL
    assert any(0.2 <= c <= 0.8 for c in coverages) and min(coverages) < max(coverages)


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_inversion_matches_reference_with_and_without_guidance(pipes, guidance_scale):
    ref, ours, _ = pipes
    kw = dict(prompt="a cat", image=picture(0), num_inference_steps=STEPS, guidance_scale=guidance_scale,
              decode_latents=True, output_type="np")
    expected, got = ref.invert(**kw, generator=gen(2)), ours.invert(**kw, generator=gen(2))
    assert got.latents.shape == expected.latents.shape == (1, 8, 4, 8, 8)
    assert rel(got.latents, expected.latents) < LATENT_TOL
    assert got.images.shape == expected.images.shape == (8, 64, 64, 3)
    assert max_abs(got.images, expected.images) < IMAGE_TOL


def test_inversion_matches_reference_with_pix2pix_zero_regularization(pipes):
    """On SD2 (v-prediction, CFG) this includes diffusers' doubled-batch epsilon (D5's quirk for one image)."""
    ref, ours, _ = pipes
    kw = dict(prompt="a cat", image=picture(0), num_inference_steps=STEPS, num_reg_steps=2, num_auto_corr_rolls=2)
    expected, got = ref.invert(**kw, generator=gen(3)), ours.invert(**kw, generator=gen(3))
    plain = ours.invert(prompt="a cat", image=picture(0), num_inference_steps=STEPS, generator=gen(3))
    assert rel(got.latents, expected.latents) < LATENT_TOL
    assert rel(plain.latents, expected.latents) > 10 * LATENT_TOL  # the regularizer did something


@pytest.mark.parametrize("guidance_scale,eta,steps", [(7.5, 0.0, STEPS), (1.0, 0.0, STEPS), (7.5, 0.7, STEPS),
                                                      (7.5, 0.0, 50)])
def test_edit_matches_reference_end_to_end(pipes, guidance_scale, eta, steps):
    ref, ours, _ = pipes
    image = picture(4)

    def run(pipe):
        g = gen(5)
        mask = pipe.generate_mask(image=image, source_prompt="a cat", target_prompt="a dog",
                                  mask_thresholding_ratio=2.0, generator=g)
        inv = pipe.invert(prompt="a cat", image=image, num_inference_steps=steps, guidance_scale=guidance_scale,
                          generator=g)
        out = pipe(prompt="a dog", mask_image=mask, image_latents=inv.latents, num_inference_steps=steps,
                   guidance_scale=guidance_scale, eta=eta, generator=g, output_type="np")
        return mask, inv.latents, out.images

    (m_ref, l_ref, i_ref), (m, l, i) = run(ref), run(ours)
    assert (m == m_ref).mean() >= MASK_TOL and 0 < m_ref.mean() < 1
    assert rel(l, l_ref) < LATENT_TOL
    assert i.shape == i_ref.shape == (1, 64, 64, 3)
    assert max_abs(i, i_ref) < IMAGE_TOL


def test_batch_of_two_images_with_two_prompt_pairs_matches_reference(pipes):
    ref, ours, _ = pipes
    images = [picture(6), picture(7)]
    sources, targets = ["a cat", "a bowl of fruit"], ["a dog", "a bowl of pears"]

    def run(pipe):
        g = gen(8)
        mask = pipe.generate_mask(image=images, source_prompt=sources, target_prompt=targets,
                                  mask_thresholding_ratio=2.0, num_maps_per_mask=3, generator=g)
        inv = pipe.invert(prompt=sources, image=images, num_inference_steps=STEPS, generator=g)
        out = pipe(prompt=targets, mask_image=mask, image_latents=inv.latents, num_inference_steps=STEPS,
                   generator=g, output_type="np")
        return mask, inv.latents, out.images

    (m_ref, l_ref, i_ref), (m, l, i) = run(ref), run(ours)
    assert m.shape == (2, 8, 8) and (m == m_ref).mean() >= MASK_TOL
    assert l.shape == (2, 8, 4, 8, 8) and rel(l, l_ref) < LATENT_TOL
    assert i.shape == (2, 64, 64, 3) and max_abs(i, i_ref) < IMAGE_TOL


def test_output_types_and_callbacks_follow_reference(sd1):
    ref, ours, _ = sd1
    image = picture(0)
    inv = ref.invert(prompt="a cat", image=image, num_inference_steps=STEPS, generator=gen())
    mask = ref.generate_mask(image=image, source_prompt="a cat", target_prompt="a dog", generator=gen())
    kw = dict(prompt="a dog", mask_image=mask, image_latents=inv.latents, num_inference_steps=STEPS)
    calls = {"ref": [], "ours": []}
    for name, pipe in (("ref", ref), ("ours", ours)):
        pipe(**kw, callback=lambda i, t, x, name=name: calls[name].append((i, int(t))), callback_steps=3)
    assert calls["ours"] == calls["ref"] and len(calls["ref"]) == 3
    pil, pt = ours(**kw, output_type="pil").images, ours(**kw, output_type="pt").images
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (64, 64)
    assert pt.shape == (1, 3, 64, 64) and 0 <= pt.min() and pt.max() <= 1
    np.testing.assert_allclose(np.asarray(pil[0]), np.asarray(ref(**kw, output_type="pil").images[0]), atol=2)
    latents, nsfw = ours(**kw, output_type="latent", return_dict=False)
    assert latents.shape == (1, 4, 8, 8) and nsfw is None
    assert len(ours.invert(prompt="a cat", image=image, num_inference_steps=STEPS, decode_latents=True).images) == 8


def test_call_with_clip_skip_and_a_pil_mask_matches_reference(sd1):
    """diffusers' __call__ skips CLIP layers for the prompt only, not the negative prompt: so do we, by default.
    (Its own clip_skip path reads `text_encoder.text_model`, which transformers 5 no longer has, so the reference
    is fed the embeddings.)"""
    ref, ours, _ = sd1
    encoder, tokenizer = ours.model.text_encoder, ours.model.tokenizer
    inv = ref.invert(prompt="a cat", image=picture(0), num_inference_steps=STEPS, generator=gen())
    mask = PIL.Image.fromarray((np.random.RandomState(0).rand(8, 8) > 0.5).astype(np.uint8) * 255, "L")
    kw = dict(mask_image=mask, image_latents=inv.latents, num_inference_steps=STEPS, output_type="latent")
    with pytest.raises(AttributeError, match="text_model"):
        ref(prompt="a dog", clip_skip=1, **kw)
    expected = ref(prompt_embeds=encoder(tokenizer(["a dog"]), clip_skip=1),
                   negative_prompt_embeds=encoder(tokenizer(["blurry"])), **kw).images
    got = ours(prompt="a dog", negative_prompt="blurry", clip_skip=1, **kw).images
    assert rel(got, expected) < LATENT_TOL
    assert rel(ours(prompt="a dog", negative_prompt="blurry", **kw).images, expected) > 10 * LATENT_TOL


# ----------------------------------------------------------------------------------------------------------------
# D1-D9: the reference's behaviour, and ours with the correction on


def test_d1_background_comes_from_the_matching_step_and_the_clean_latents_at_the_end(sd1):
    """With an all-zero mask every step is pure pasting: diffusers pastes the latent of the step's source level
    (one step noisier) and ends on the t=1 latent; the fix pastes the target level and ends on x_0."""
    ref, _, fixed = sd1
    image, zeros = picture(0), np.zeros((1, 8, 8), dtype=np.int64)
    inv = fixed.invert(prompt="a cat", image=image, num_inference_steps=STEPS, generator=gen())
    T = inv.latents.shape[1]
    seen = {"ref": [], "ours": []}
    kw = dict(prompt="a dog", mask_image=zeros, num_inference_steps=STEPS, output_type="latent")
    ref(**kw, image_latents=inv.latents, callback=lambda i, t, x: seen["ref"].append(x.clone()))
    out = fixed(**kw, image_latents=inv, callback=lambda i, t, x: seen["ours"].append(x.clone()))
    for i in range(T):
        assert torch.equal(seen["ref"][i], inv.latents[:, i])  # the level it started the step from
    for i in range(T - 1):
        assert torch.equal(seen["ours"][i], inv.latents[:, i + 1])  # the level the step reached
    assert torch.equal(out.images, inv.image_latents)  # x_0 at the end; the reference ends at t=1
    assert not torch.equal(seen["ref"][-1], inv.image_latents)


def test_d2_mask_threshold_is_per_image(sd1):
    """diffusers computes the clamp scalar over the batch, so an image's mask depends on its batch mates."""
    ref, ours, fixed = sd1
    images = [picture(0), PIL.Image.new("RGB", (64, 64), (128, 128, 128))]
    n = 3

    def mask(pipe, imgs, sources, targets):
        gens = [gen(k) for k in range(len(imgs) * n)]  # one generator per row: row k draws the same alone
        return pipe.generate_mask(image=imgs, source_prompt=sources, target_prompt=targets, num_maps_per_mask=n,
                                  mask_thresholding_ratio=2.0, generator=gens)

    pair = (["a cat", "a gray wall"], ["a dog", "a gray square in a cat"])
    alone = (["a cat"], ["a dog"])
    ref_batch, ref_alone = mask(ref, images, *pair), mask(ref, images[:1], *alone)
    assert (ref_batch[0] != ref_alone[0]).any()
    assert (mask(ours, images, *pair) == ref_batch).all()
    fixed_batch, fixed_alone = mask(fixed, images, *pair), mask(fixed, images[:1], *alone)
    assert (fixed_batch[0] == fixed_alone[0]).all()


def test_d3_identical_prompts_give_an_empty_mask(sd1):
    ref, ours, fixed = sd1
    kw = dict(image=picture(0), source_prompt="a cat", target_prompt="a cat", num_maps_per_mask=2)
    assert ref.generate_mask(**kw, generator=gen()).min() == 1  # 0/0 = NaN, and NaN <= 0.5 is False
    assert ours.generate_mask(**kw, generator=gen()).min() == 1
    with pytest.warns(UserWarning, match="identical noise predictions"):
        mask, guidance_map = fixed.generate_mask(**kw, generator=gen(), return_guidance_map=True)
    assert mask.max() == 0 and np.all(guidance_map == 0)


def test_d4_pil_masks_and_clip_skip_in_every_call(sd1):
    ref, ours, fixed = sd1
    text_encoder, tokenizer = fixed.model.text_encoder, fixed.model.tokenizer
    kw = dict(image=picture(0), source_prompt="a cat", target_prompt="a dog", num_maps_per_mask=2)
    with pytest.raises(TypeError):
        ref.generate_mask(**kw, output_type="pil")
    with pytest.raises(TypeError):
        ours.generate_mask(**kw, output_type="pil")
    pil = fixed.generate_mask(**kw, output_type="pil", generator=gen())
    array = fixed.generate_mask(**kw, generator=gen())
    assert pil[0].mode == "L" and np.array_equal(np.asarray(pil[0]), array[0].astype(np.uint8) * 255)
    out = fixed(prompt="a dog", mask_image=pil, num_inference_steps=STEPS, output_type="latent",
                image_latents=fixed.invert(prompt="a cat", image=picture(0), num_inference_steps=STEPS).latents)
    assert out.images.shape == (1, 4, 8, 8)
    # diffusers' generate_mask and invert have no clip_skip; ours equals feeding diffusers skipped embeddings
    assert "clip_skip" not in inspect.signature(ref.invert).parameters
    assert "clip_skip" not in inspect.signature(ref.generate_mask).parameters

    def skipped(text):
        return text_encoder(tokenizer([text]), clip_skip=1)

    inv_kw = dict(image=picture(0), num_inference_steps=STEPS)
    expected = ref.invert(prompt_embeds=skipped("a cat"), negative_prompt_embeds=skipped(""), **inv_kw,
                          generator=gen())
    got = fixed.invert(prompt="a cat", clip_skip=1, **inv_kw, generator=gen())
    assert rel(got.latents, expected.latents) < LATENT_TOL
    with pytest.raises(TypeError, match="no clip_skip argument"):  # as diffusers' invert refuses it
        ours.invert(prompt="a cat", clip_skip=1, **inv_kw, generator=gen())


def test_d5_regularization_with_v_prediction_batches_and_any_device(sd2, monkeypatch):
    ref, ours, fixed = sd2
    images, prompts = [picture(0), picture(1)], ["a cat", "a bowl"]
    kw = dict(num_inference_steps=4, num_reg_steps=1, num_auto_corr_rolls=2)
    with pytest.raises(RuntimeError, match="must match"):  # eps of a doubled batch against a single one
        ref.invert(prompt=prompts, image=images, generator=gen(), **kw)
    with pytest.raises(RuntimeError, match="must match"):
        ours.invert(prompt=prompts, image=images, generator=gen(), **kw)
    # Fixed: a batch (one generator per image) equals each image alone
    batch = fixed.invert(prompt=prompts, image=images, generator=[gen(0), gen(1)], **kw).latents
    for i in range(2):
        alone = fixed.invert(prompt=prompts[i], image=images[i], generator=gen(i), **kw).latents
        assert rel(batch[i], alone[0]) < 1e-5
    # The rolls are drawn on the generator's device (diffusers: always the CPU, so a CUDA generator fails)
    devices = []
    randint = torch.randint

    def spy(*args, **kwargs):
        devices.append(kwargs.get("device"))
        return randint(*args, **kwargs)

    monkeypatch.setattr(torch, "randint", spy)
    ref.invert(prompt="a cat", image=images[0], generator=gen(), **kw)
    assert devices and set(devices) == {None}
    devices.clear()
    fixed.invert(prompt="a cat", image=images[0], generator=gen(), **kw)
    assert devices and set(devices) == {torch.device("cpu")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_d5_regularization_accepts_a_cuda_generator(sd1_folder):
    pipe = reference_pipeline(sd1_folder).to("cuda")
    fixed = StableDiffusionDiffEdit.from_pretrained(sd1_folder, device="cuda", params=DiffEditParams())
    kw = dict(prompt="a cat", image=picture(0), num_inference_steps=4, num_reg_steps=1, num_auto_corr_rolls=2)
    with pytest.raises(RuntimeError):
        pipe.invert(**kw, generator=torch.Generator("cuda").manual_seed(0))
    assert torch.isfinite(fixed.invert(**kw, generator=torch.Generator("cuda").manual_seed(0)).latents).all()


def test_d6_repeated_images_keep_their_own_masks(sd1):
    """Two prompts, two images each: diffusers tiles the masks (m0, m1, m0, m1) under repeated latents and prompts
    (p0, p0, p1, p1), so the two images of one prompt get different masks; with eta=0 they must be equal."""
    ref, ours, fixed = sd1
    images, sources, targets = [picture(0), picture(1)], ["a cat", "a bowl"], ["a dog", "a plate"]
    masks = np.stack([np.zeros((8, 8), np.int64), np.ones((8, 8), np.int64)])
    kw = dict(prompt=targets, mask_image=masks, num_inference_steps=STEPS, num_images_per_prompt=2,
              output_type="latent")
    inv = ref.invert(prompt=sources, image=images, num_inference_steps=STEPS, generator=gen())
    expected = ref(**kw, image_latents=inv.latents).images
    assert not torch.equal(expected[0], expected[1])
    assert rel(ours(**kw, image_latents=inv.latents).images, expected) < LATENT_TOL
    got = fixed(**kw, image_latents=inv.latents).images
    assert torch.equal(got[0], got[1]) and torch.equal(got[2], got[3]) and not torch.equal(got[0], got[2])


def test_d7_mismatched_strength_or_steps_use_the_matching_inverted_latents(sd1):
    ref, ours, _ = sd1
    only_d7 = StableDiffusionDiffEdit(ours.model, DiffEditParams.reference(slice_inverted_latents=True))
    image, mask = picture(0), np.ones((1, 8, 8), np.int64)
    inv = ref.invert(prompt="a cat", image=image, num_inference_steps=STEPS, generator=gen())  # levels 701 .. 1
    kw = dict(prompt="a dog", mask_image=mask, output_type="latent")
    # Weaker strength, same steps: diffusers refuses; we take the last 5 latents (levels 401 .. 1)
    with pytest.raises(ValueError, match="timesteps"):
        ref(**kw, image_latents=inv.latents, inpaint_strength=0.5, num_inference_steps=STEPS)
    with pytest.raises(ValueError):
        ours(**kw, image_latents=inv.latents, inpaint_strength=0.5, num_inference_steps=STEPS)
    expected = ref(**kw, image_latents=inv.latents[:, 3:], inpaint_strength=0.5, num_inference_steps=STEPS).images
    got = only_d7(**kw, image_latents=inv.latents, inpaint_strength=0.5, num_inference_steps=STEPS).images
    assert rel(got, expected) < LATENT_TOL
    # Half the steps (levels 601, 401, 201, 1 of the 10-step inversion): needs the inversion's timesteps
    ours_inv = only_d7.invert(prompt="a cat", image=image, num_inference_steps=STEPS, generator=gen())
    expected = ref(**kw, image_latents=inv.latents[:, 1::2], num_inference_steps=5).images
    got = only_d7(**kw, image_latents=ours_inv, num_inference_steps=5).images
    assert rel(got, expected) < LATENT_TOL
    # Strengths that run no step: diffusers crashes inside torch.stack; we say why
    with pytest.raises(RuntimeError, match="non-empty"):
        ref.invert(prompt="a cat", image=image, num_inference_steps=STEPS, inpaint_strength=0.05)
    with pytest.raises(ValueError, match="runs no step"):
        only_d7.invert(prompt="a cat", image=image, num_inference_steps=STEPS, inpaint_strength=0.05)
    with pytest.raises(ValueError, match="needs timestep"):  # asking for more noise than was inverted
        only_d7(**kw, image_latents=ours_inv, inpaint_strength=1.0, num_inference_steps=STEPS)


def test_d8_image_is_encoded_once_for_all_mask_samples(sd1):
    """diffusers VAE-encodes the image once per noise map; one encode and n posterior draws give the same numbers."""
    ref, ours, fixed = sd1
    only_d8 = StableDiffusionDiffEdit(ours.model, DiffEditParams.reference(encode_image_once=True))
    rows = {"ref": [], "ours": []}
    hooks = [ref.vae.encoder.register_forward_hook(lambda m, a, o: rows["ref"].append(a[0].shape[0])),
             ours.model.vae.encoder.register_forward_hook(lambda m, a, o: rows["ours"].append(a[0].shape[0]))]
    kw = dict(image=picture(0), source_prompt="a cat", target_prompt="a dog", mask_thresholding_ratio=2.0)
    try:
        expected = ref.generate_mask(**kw, generator=gen())
        mask, guidance_map = only_d8.generate_mask(**kw, generator=gen(), return_guidance_map=True)
        fixed.generate_mask(**kw, generator=gen())
    finally:
        for h in hooks:
            h.remove()
    assert rows == {"ref": [10], "ours": [1, 1]}
    assert (mask == expected).mean() >= MASK_TOL
    _, compatible_map = ours.generate_mask(**kw, generator=gen(), return_guidance_map=True)
    np.testing.assert_allclose(guidance_map, compatible_map, atol=1e-3)  # batched-conv rounding, amplified


def test_d9_mask_without_guidance(sd1):
    """diffusers raises TypeError for guidance_scale <= 1. With the same negative prompt on both sides any CFG map
    is a multiple of |eps_Q - eps_R| (the unconditional predictions cancel), so our unguided mask equals its
    guided one; diffusers guides from the prompt towards the negative, which shows with distinct negatives."""
    ref, ours, fixed = sd1
    kw = dict(image=picture(0), source_prompt="a cat", target_prompt="a dog", mask_thresholding_ratio=2.0)
    with pytest.raises(TypeError):
        ref.generate_mask(**kw, guidance_scale=1.0)
    with pytest.raises(TypeError):
        ours.generate_mask(**kw, guidance_scale=1.0)
    unguided, unguided_map = fixed.generate_mask(**kw, guidance_scale=1.0, generator=gen(),
                                                 return_guidance_map=True)
    _, reference_map = ours.generate_mask(**kw, generator=gen(), return_guidance_map=True)
    assert (unguided == ref.generate_mask(**kw, generator=gen())).mean() >= MASK_TOL
    np.testing.assert_allclose(unguided_map, reference_map, atol=1e-4)
    # With distinct negative prompts the direction of guidance matters: the fix guides from them to the prompts
    kw.update(source_negative_prompt="blurry", target_negative_prompt="a drawing")
    _, swapped_map = ours.generate_mask(**kw, generator=gen(), return_guidance_map=True)
    _, guided_map = fixed.generate_mask(**kw, generator=gen(), return_guidance_map=True)
    assert np.abs(guided_map - swapped_map).max() > 1e-2


def test_facade_invert_output_feeds_call_whole_or_as_latents(sd1):
    _, ours, fixed = sd1
    inv = ours.invert(prompt="a cat", image=picture(0), num_inference_steps=STEPS, generator=gen())
    assert inv.timesteps.tolist() == list(range(701, 0, -100)) and inv.image_latents.shape == (1, 4, 8, 8)
    mask = np.ones((1, 8, 8), np.int64)
    kw = dict(prompt="a dog", mask_image=mask, num_inference_steps=STEPS, output_type="latent")
    assert torch.equal(ours(**kw, image_latents=inv).images, ours(**kw, image_latents=inv.latents).images)
    flat = inv.latents.flatten(0, 1)  # (B*T, C, h, w), as diffusers also accepts
    assert torch.equal(ours(**kw, image_latents=flat).images, ours(**kw, image_latents=inv.latents).images)
    with pytest.raises(ValueError, match="must have shape"):
        ours(**kw, image_latents=inv.latents[..., :4])


def _embeds(pipe, text: str) -> torch.Tensor:
    ids = pipe.tokenizer([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


# Every argument of the three calls that changes numbers, each with a non-default value, against diffusers: (call,
# arguments). `inpaint_strength` goes to both invert and __call__, as a caller must pass it.
ONE_ARGUMENT = [
    ("mask", dict(num_maps_per_mask=3)), ("mask", dict(mask_encode_strength=0.7)),
    ("mask", dict(num_inference_steps=20)), ("mask", dict(guidance_scale=4.0)),
    ("mask", dict(mask_thresholding_ratio=1.5)), ("mask", dict(source_negative_prompt="blurry")),
    ("mask", dict(target_negative_prompt="a drawing")), ("mask", "target_prompt_embeds"),
    ("mask", "source_prompt_embeds"), ("mask", "target_negative_prompt_embeds"),
    ("mask", "source_negative_prompt_embeds"),
    ("invert", dict(guidance_scale=3.0)), ("invert", dict(negative_prompt="blurry")),
    ("invert", dict(num_reg_steps=1, num_auto_corr_rolls=2, lambda_auto_corr=5.0, lambda_kl=7.0)),
    ("invert", "prompt_embeds"), ("invert", "negative_prompt_embeds"),
    ("both", dict(inpaint_strength=0.5)),
    ("call", dict(guidance_scale=3.0)), ("call", dict(negative_prompt="a drawing")), ("call", dict(eta=0.3)),
    ("call", dict(num_images_per_prompt=2)), ("call", "prompt_embeds"),
    ("call", "negative_prompt_embeds"),
]


@pytest.mark.parametrize("call, change", ONE_ARGUMENT, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={x}" for k, x in v.items()))
def test_each_argument_with_a_non_default_value_matches_diffusers(sd1, call, change):
    ref, ours, _ = sd1
    image = picture(6)

    def run(pipe):
        if isinstance(change, str):  # an embeddings argument: the reference's own encoder's states, given to both
            text = {"target_prompt_embeds": "a dog", "source_prompt_embeds": "a cat",
                    "source_negative_prompt_embeds": "blurry", "target_negative_prompt_embeds": "a drawing",
                    "prompt_embeds": "a cat" if call == "invert" else "a dog",
                    "negative_prompt_embeds": "blurry"}[change]
            extra = {change: _embeds(ref, text)}
        else:
            extra = dict(change)
        mask_kw = extra if call == "mask" else {}
        inv_kw = extra if call in ("invert", "both") else {}
        call_kw = extra if call in ("call", "both") else {}
        g = gen(7)
        mask_prompts = dict(source_prompt="a cat", target_prompt="a dog")
        for side in ("source", "target"):
            if f"{side}_prompt_embeds" in mask_kw:
                del mask_prompts[f"{side}_prompt"]
        mask = pipe.generate_mask(image=image, **mask_prompts, generator=g, **mask_kw)
        inv = pipe.invert(**({} if "prompt_embeds" in inv_kw else {"prompt": "a cat"}), image=image,
                          num_inference_steps=STEPS, generator=g, **inv_kw)
        out = pipe(**({} if "prompt_embeds" in call_kw else {"prompt": "a dog"}), mask_image=mask,
                   image_latents=inv.latents, num_inference_steps=STEPS, generator=g, output_type="np", **call_kw)
        return mask, inv.latents, out.images

    (m_ref, l_ref, i_ref), (m, l, i) = run(ref), run(ours)
    assert m.shape == m_ref.shape and (m == m_ref).mean() >= MASK_TOL
    assert l.shape == l_ref.shape and rel(l, l_ref) < LATENT_TOL
    assert i.shape == i_ref.shape and max_abs(i, i_ref) < IMAGE_TOL


def test_every_argument_that_changes_numbers_is_in_the_one_argument_table():
    """The table above names every numeric or text argument of the three calls (the rest choose output forms,
    callbacks, or are unused by diffusers too). clip_skip: diffusers' generate_mask has none and its invert and
    __call__ fail with transformers 5, so it is compared through embeddings in
    test_call_with_clip_skip_and_a_pil_mask_matches_reference and test_d4_pil_masks_and_clip_skip_in_every_call;
    cross_attention_kwargs, the LoRA scale, moves numbers only with a LoRA loaded: tests/test_lora.py compares it."""
    import inspect

    named = {k for _, change in ONE_ARGUMENT for k in ([change] if isinstance(change, str) else change)}
    forms = {"self", "image", "generator", "output_type", "return_dict", "callback", "callback_steps",
             "cross_attention_kwargs", "decode_latents", "latents", "mask_image", "image_latents",
             "return_guidance_map",
             "prompt", "source_prompt", "target_prompt", "num_inference_steps",  # prompts and steps: every test
             "clip_skip"}
    for f in (StableDiffusionDiffEdit.generate_mask, StableDiffusionDiffEdit.invert, StableDiffusionDiffEdit.__call__):
        missing = set(inspect.signature(f).parameters) - named - forms
        assert not missing, (f.__name__, missing)


def test_bad_call_arguments_are_refused_before_the_work_where_diffusers_runs_on_or_fails_late(sd1):
    """An empty prompt list (diffusers: a batch-1 inversion, or a reshape error deep in the mask step), a batch of
    masks for one prompt (diffusers: a shape error in the UNet, after decoding began), and a NaN mask (diffusers:
    NaN pictures; it passed our range check and became a full mask) are each one ValueError up front; an unknown
    output_type warns and returns numpy arrays, as diffusers' postprocess does."""
    ref, ours, _ = sd1
    image = picture(0)
    with pytest.raises(ValueError, match="`prompt` is an empty list"):
        ours.invert(prompt=[], image=image, num_inference_steps=2)
    with pytest.raises(ValueError, match="`target_prompt` is an empty list"):
        ours.generate_mask(image=image, source_prompt=[], target_prompt=[])
    inv = ours.invert(prompt="a cat", image=image, num_inference_steps=2)
    kw = dict(prompt="a dog", image_latents=inv.latents, num_inference_steps=2)
    with pytest.raises(ValueError, match="batch size 2 cannot be broadcast to batch size 1"):
        ours(**kw, mask_image=np.ones((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        ours(**kw, mask_image=np.full((1, 8, 8), np.nan, np.float32))
    mask = np.ones((1, 8, 8), np.float32)
    for output_type in (None, "bogus"):
        with pytest.warns(FutureWarning, match="returning numpy"):
            images = ours(**kw, mask_image=mask, output_type=output_type).images
        with pytest.warns(FutureWarning):
            expected = ref(**kw, mask_image=mask, output_type=output_type).images
        assert isinstance(images, np.ndarray) and isinstance(expected, np.ndarray) and images.shape == expected.shape


# ----------------------------------------------------------------------------------------------------------------
# diffusers' pipeline surface: what diffusers accepts works the same or is refused by name


@pytest.mark.parametrize("name", ["scheduler", "inverse_scheduler", "unet", "vae", "text_encoder", "tokenizer",
                                  "progress_bar"])
def test_assigning_a_scheduler_or_component_is_refused_not_ignored(sd1, name):
    """diffusers' DiffEdit recipe swaps schedulers (`pipe.scheduler = DPMSolverMultistepScheduler.from_config(...)`);
    the facade would have kept the attribute and run its own DDIM, so any assignment but its own state is refused."""
    from diffusers import DPMSolverMultistepScheduler

    ref, ours, _ = sd1
    value = DPMSolverMultistepScheduler.from_config(ref.scheduler.config) if name == "scheduler" else None
    with pytest.raises(AttributeError, match=rf"`?{name}`? cannot be replaced|no setting `{name}`"):
        setattr(ours, name, value)
    assert name not in vars(ours)


def test_scheduler_message_says_what_to_do_and_safety_checker_none_still_works(sd1):
    ref, ours, _ = sd1
    with pytest.raises(AttributeError, match=r"DDIMScheduler\.from_config.*sampler='dpmsolver\+\+'"):
        ours.scheduler = None
    with pytest.raises(AttributeError, match="load another model folder"):
        ours.text_encoder = None
    checker = ours.safety_checker
    ours.safety_checker = None  # diffusers' way of turning it off
    assert ours.model.safety_checker is None
    ours.safety_checker = checker


def test_component_attributes_read_like_diffusers(sd1):
    ref, ours, _ = sd1
    assert ours.unet is ours.model.unet and ours.vae is ours.model.vae
    # diffusers' code calls these as transformers' / reads a dict config: views over our objects
    assert ours.text_encoder.encoder is ours.model.text_encoder and ours.tokenizer.tokenizer is ours.model.tokenizer
    assert ours.scheduler.scheduler is ours.model.scheduler
    assert ours.inverse_scheduler.scheduler is ours.model.inverse_scheduler
    assert ours.scheduler.config == {k: v for k, v in ref.scheduler.config.items() if k in ours.scheduler.config}
    assert ours.tokenizer.model_max_length == 77 and ours.text_encoder.config is ours.model.text_encoder.config
    assert ours.dtype == ref.dtype == torch.float32
    assert set(ours.components) == set(ref.components)


def _pndm_copy(folder, tmp_path):
    """The tiny folder with the official SD 1.5 scheduler files: PNDMScheduler and its config."""
    import json
    import shutil

    copy = tmp_path / "pndm"
    shutil.copytree(folder, copy)
    (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        "clip_sample": False}))
    index = json.loads((copy / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    (copy / "model_index.json").write_text(json.dumps(index))
    return copy


def test_pndm_folder_warns_and_matches_diffusers_recipe_of_ddim_from_config(sd1_folder, tmp_path):
    from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionDiffEditPipeline

    folder = _pndm_copy(sd1_folder, tmp_path)
    with pytest.warns(UserWarning, match="PNDMScheduler; diffedit runs DDIM on its config") as record:
        ours = StableDiffusionDiffEdit.from_pretrained(folder)
    assert sum("PNDMScheduler" in str(w.message) for w in record) == 1
    ref = StableDiffusionDiffEditPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    assert type(ref.scheduler).__name__ == "PNDMScheduler"
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)  # diffusers' DiffEdit recipe
    ref.inverse_scheduler = DDIMInverseScheduler.from_config(ref.scheduler.config)
    image = picture(5)

    def run(pipe):
        g = gen(11)
        mask = pipe.generate_mask(image=image, source_prompt="a cat", target_prompt="a dog", generator=g)
        inv = pipe.invert(prompt="a cat", image=image, num_inference_steps=STEPS, generator=g)
        out = pipe(prompt="a dog", mask_image=mask, image_latents=inv.latents, num_inference_steps=STEPS,
                   generator=g, output_type="np")
        return mask, inv.latents, out.images

    (m_ref, l_ref, i_ref), (m, l, i) = run(ref), run(ours)
    assert (m == m_ref).mean() >= MASK_TOL
    assert rel(l, l_ref) < LATENT_TOL and max_abs(i, i_ref) < IMAGE_TOL


def test_lora_scale_of_fuse_lora_stays_after_unfuse_as_in_diffusers(sd1, tmp_path):
    """peft's fuse scales the active adapters' layers by lora_scale and unfuse does not undo it: after fuse_lora(
    lora_scale=0.7) + unfuse_lora() the adapter runs at 0.8 * 0.7 in diffusers, and in ours."""
    from test_lora import random_pairs, write_lora

    ref, ours, _ = sd1
    path = write_lora(tmp_path / "both.safetensors", random_pairs(ours.model.unet, 21),
                      random_pairs(ours.model.text_encoder, 22))
    kw = dict(prompt="a cat", image=picture(0), num_inference_steps=STEPS)
    try:
        results = []
        for pipe in (ref, ours):
            pipe.load_lora_weights(str(path), adapter_name="x")
            pipe.set_adapters(["x"], [0.8])
            pipe.fuse_lora(lora_scale=0.7)
            pipe.unfuse_lora()
            results.append(pipe.invert(**kw, generator=gen(2)).latents)
        ours.set_adapters(["x"], [0.8 * 0.7])
        assert torch.equal(ours.invert(**kw, generator=gen(2)).latents, results[1])
        assert rel(results[1], results[0]) < LATENT_TOL
        ours.set_adapters(["x"], [0.8])
        assert rel(ours.invert(**kw, generator=gen(2)).latents, results[0]) > 10 * LATENT_TOL
    finally:
        for pipe in (ref, ours):
            pipe.unfuse_lora()
            pipe.unload_lora_weights()


def test_fuse_lora_with_a_scale_on_part_of_an_adapters_networks_is_refused(sd1, tmp_path):
    from test_lora import random_pairs, write_lora

    _, ours, _ = sd1
    path = write_lora(tmp_path / "both.safetensors", random_pairs(ours.model.unet, 23),
                      random_pairs(ours.model.text_encoder, 24))
    ours.load_lora_weights(str(path), adapter_name="x")
    try:
        with pytest.raises(ValueError, match="also have layers in a network left out"):
            ours.fuse_lora(components=["unet"], lora_scale=0.5)
        ours.fuse_lora(components=["unet"])  # scale 1: one weight is still right
    finally:
        ours.unfuse_lora()
        ours.unload_lora_weights()


def _diffusers_docs_recipe(pipeline_class, folder) -> dict:
    """diffusers' DiffEdit guide (docs/source/en/using-diffusers/diffedit.md, 0.42), line for line on `folder`: the
    loading and scheduler lines, the three calls with prompts, then its "generate source and target embeddings"
    section (the tokenizer and text encoder called as transformers' are)."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    pipeline = pipeline_class.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None,
                                              use_safetensors=True)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.inverse_scheduler = DDIMInverseScheduler.from_config(pipeline.scheduler.config)
    try:
        pipeline.enable_model_cpu_offload()
    except RuntimeError:  # diffusers' without an accelerator (ours warns and changes nothing)
        assert pipeline_class.__module__.startswith("diffusers")
    if hasattr(pipeline, "enable_vae_slicing"):  # diffusers 0.42 removed the pipeline's switch: its VAE's
        pipeline.enable_vae_slicing()
    else:
        pipeline.vae.enable_slicing()
    pipeline.set_progress_bar_config(disable=True)
    raw_image = picture(3)
    source_prompt, target_prompt = "a bowl of fruits", "a basket of pears"
    out = {"mask": pipeline.generate_mask(image=raw_image, source_prompt=source_prompt, target_prompt=target_prompt,
                                          num_maps_per_mask=3, generator=gen(1))}
    out["latents"] = pipeline.invert(prompt=source_prompt, image=raw_image, num_inference_steps=STEPS,
                                     generator=gen(2)).latents
    out["image"] = pipeline(prompt=target_prompt, mask_image=out["mask"], image_latents=out["latents"],
                            negative_prompt=source_prompt, num_inference_steps=STEPS, generator=gen(3),
                            output_type="np").images

    @torch.no_grad()
    def embed_prompts(sentences, tokenizer, text_encoder, device="cpu"):
        embeddings = []
        for sent in sentences:
            text_inputs = tokenizer(sent, padding="max_length", max_length=tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt")
            text_input_ids = text_inputs.input_ids
            prompt_embeds = text_encoder(text_input_ids.to(device), attention_mask=None)[0]
            embeddings.append(prompt_embeds)
        return torch.concatenate(embeddings, dim=0).mean(dim=0).unsqueeze(0)

    source_embeds = embed_prompts(["a bowl of fruits", "a bowl of apples"], pipeline.tokenizer, pipeline.text_encoder)
    target_embeds = embed_prompts(["a basket of pears", "a basket of fruit"], pipeline.tokenizer,
                                  pipeline.text_encoder)
    out["embeds"] = source_embeds
    out["embeds_mask"] = pipeline.generate_mask(image=raw_image, source_prompt_embeds=source_embeds,
                                                target_prompt_embeds=target_embeds, num_maps_per_mask=3,
                                                generator=gen(4))
    out["embeds_latents"] = pipeline.invert(prompt_embeds=source_embeds, image=raw_image,
                                            num_inference_steps=STEPS, generator=gen(5)).latents
    out["embeds_image"] = pipeline(mask_image=out["embeds_mask"], image_latents=out["embeds_latents"],
                                   prompt_embeds=target_embeds, negative_prompt_embeds=source_embeds,
                                   num_inference_steps=STEPS, generator=gen(6), output_type="np").images
    return out


def test_diffusers_own_diffedit_guide_runs_line_for_line_with_diffusers_numbers(sd1_folder, tmp_path):
    """The guide's code with only the class swapped: `use_safetensors=True`, the DDIM scheduler lines (a dict
    `scheduler.config`; assigning the schedule the facade runs anyway is accepted), CPU offload, VAE slicing, and
    the embeddings recipe (`tokenizer(..., padding="max_length", ...).input_ids`, `text_encoder(ids,
    attention_mask=None)[0]`). Each raised before; now masks equal, latents within LATENT_TOL, images within
    IMAGE_TOL of diffusers' on the same folder (the official SD 1.5 PNDM scheduler files, as the guide's repos)."""
    import warnings

    from diffusers import StableDiffusionDiffEditPipeline

    folder = _pndm_copy(sd1_folder, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PNDM folder, offload without an accelerator: both sides warn
        expected = _diffusers_docs_recipe(StableDiffusionDiffEditPipeline, folder)
        got = _diffusers_docs_recipe(StableDiffusionDiffEdit, folder)
    assert max_abs(got["embeds"], expected["embeds"]) < 1e-5
    for mask, latents, image in (("mask", "latents", "image"), ("embeds_mask", "embeds_latents", "embeds_image")):
        assert (got[mask] == expected[mask]).mean() >= MASK_TOL
        assert rel(got[latents], expected[latents]) < LATENT_TOL
        assert max_abs(got[image], expected[image]) < IMAGE_TOL


def test_assigning_a_ddim_schedule_other_than_the_one_run_is_refused(sd1):
    """Only the schedule the facade runs is accepted (as a no-op); another config would be ignored, so it is
    refused, and tokenizer / text encoder calls outside Stable Diffusion's form are refused by name."""
    from diffusers import DDIMScheduler

    _, ours, _ = sd1
    ours.scheduler = ours.scheduler  # its own view: nothing changes
    with pytest.raises(AttributeError, match="cannot be replaced"):
        ours.scheduler = DDIMScheduler.from_config(ours.scheduler.config, timestep_spacing="trailing")
    with pytest.raises(AttributeError, match="cannot be replaced"):
        ours.inverse_scheduler = DDIMScheduler.from_config(ours.scheduler.config)  # not the inverse class
    with pytest.raises(ValueError, match="use_safetensors=False"):
        StableDiffusionDiffEdit.from_pretrained(ours.model.folder, use_safetensors=False)
    with pytest.raises(ValueError, match='only padding="max_length"'):
        ours.tokenizer("a cat", padding="longest", return_tensors="pt")
    ids = ours.tokenizer("a cat", padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert ids["input_ids"].shape == (1, 77) and ids.attention_mask[0].tolist() == [1] * 4 + [0] * 73
    with pytest.raises(ValueError, match="runs without an attention mask"):
        ours.text_encoder(ids.input_ids, attention_mask=ids.attention_mask)
    assert ours.text_encoder(ids.input_ids).last_hidden_state.shape == (1, 77, 32)


def test_outputs_index_by_position_and_name_and_to_tuple_like_diffusers(sd1):
    ref, ours, _ = sd1
    kw = dict(prompt="a cat", image=picture(0), num_inference_steps=2)
    inv, inv_ref = ours.invert(**kw, generator=gen()), ref.invert(**kw, generator=gen())
    assert torch.equal(inv[0], inv.latents) and torch.equal(inv["latents"], inv.latents)
    assert len(inv.to_tuple()) == len(inv_ref.to_tuple()) == 1  # images None: not a field of the tuple
    with pytest.raises(IndexError):
        inv[1]
    with pytest.raises(IndexError):
        inv_ref[1]
    call = dict(prompt="a dog", mask_image=np.ones((1, 8, 8), np.float32), num_inference_steps=2, output_type="np")
    out, out_ref = ours(**call, image_latents=inv.latents), ref(**call, image_latents=inv_ref.latents)
    assert out[0] is out.images and out["images"] is out.images and out.to_tuple()[0] is out.images
    assert len(out.to_tuple()) == len(out_ref.to_tuple()) and out[0].shape == out_ref[0].shape
    with pytest.raises(KeyError):
        out["nsfw_content_detected"]  # None, so not a key, as in diffusers
    with pytest.raises(KeyError):
        out_ref["nsfw_content_detected"]


def test_common_pipeline_utilities_are_accepted_or_refused_by_name(sd1):
    _, ours, _ = sd1
    ours.set_progress_bar_config(disable=True, leave=False, desc="edit")
    ours.enable_attention_slicing()
    ours.enable_attention_slicing("max")
    ours.disable_attention_slicing()
    assert ours.to("cpu") is ours and ours.to(torch.float32) is ours and ours.to("cpu", torch.float32) is ours
    assert ours.dtype == torch.float32 and ours.device == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'tpu'"):
        ours.to("tpu")
    with pytest.raises(NotImplementedError, match="enable_model_cpu_offload"):
        ours.enable_sequential_cpu_offload()


def test_diffusers_pipeline_helpers_work_as_there_or_are_refused_saying_what_to_do(sd1_folder):
    """The pipeline helpers user code calls: progress_bar, numpy_to_pil, decode_latents (pictures within IMAGE_TOL
    of diffusers'), name_or_path, _execution_device, maybe_convert_prompt (a multi-vector learned word gives
    diffusers' token ids), from_pipe, enable_xformers_memory_efficient_attention (a no-op, as attention slicing)
    work; StableDiffusionDiffEdit(**pipe.components), from_pipe of a diffusers pipeline and diffusers' attributes
    the facade lacks (config, image_processor, save_pretrained, its internal steps, ...) are refused with what to
    do. Each was Python's bare AttributeError / TypeError."""
    from test_textual_inversion import vectors

    ref, ours = reference_pipeline(sd1_folder), StableDiffusionDiffEdit.from_pretrained(sd1_folder)
    ours.set_progress_bar_config(disable=True)
    assert list(ours.progress_bar(range(3))) == list(ref.progress_bar(range(3))) == [0, 1, 2]
    assert ours.progress_bar(total=4).total == 4
    with pytest.raises(ValueError, match="Either `total` or `iterable`"):
        ours.progress_bar()
    pixels = np.random.RandomState(0).rand(2, 8, 8, 3)
    for a, b in zip(StableDiffusionDiffEdit.numpy_to_pil(pixels), ref.numpy_to_pil(pixels)):
        assert a.mode == b.mode and np.array_equal(np.asarray(a), np.asarray(b))
    latents = torch.randn(2, 4, 8, 8, generator=gen())
    with torch.no_grad(), pytest.warns(FutureWarning):
        expected = ref.decode_latents(latents)
    with pytest.warns(FutureWarning, match="decode_latents"):
        got = ours.decode_latents(latents)
    assert got.shape == expected.shape == (2, 64, 64, 3) and max_abs(got, expected) < IMAGE_TOL
    assert ours.name_or_path == str(ref.name_or_path) == str(sd1_folder)  # diffusers: as given (a Path here)
    assert ours._execution_device == ref._execution_device == torch.device("cpu")
    for pipe in (ref, ours):
        pipe.load_textual_inversion({"<three>": vectors(3, 5)})
    prompts = ["a <three> cat", "a dog"]
    ids = [pipe.tokenizer(pipe.maybe_convert_prompt(prompts, pipe.tokenizer), padding="max_length", max_length=77,
                          truncation=True, return_tensors="pt").input_ids for pipe in (ref, ours)]
    assert torch.equal(ids[0], ids[1])
    ours.enable_xformers_memory_efficient_attention()
    ours.disable_xformers_memory_efficient_attention()
    other = StableDiffusionDiffEdit.from_pipe(ours)
    assert other.model is ours.model and other.params == ours.params and other is not ours
    with pytest.raises(TypeError, match="from_pretrained"):
        StableDiffusionDiffEdit.from_pipe(ref)
    with pytest.raises(TypeError, match=r"components \[.*from_pipe\(pipe\)"):
        StableDiffusionDiffEdit(**ours.components)
    for name in ("config", "image_processor", "save_pretrained", "register_modules", "enable_freeu", "disable_freeu",
                 "fuse_qkv_projections", "check_inputs", "prepare_extra_step_kwargs", "get_timesteps",
                 "get_inverse_timesteps", "prepare_image_latents", "prepare_latents", "run_safety_checker"):
        assert hasattr(ref, name), name  # only diffusers' own names
        with pytest.raises(AttributeError, match=f"no `{name}` \\(diffusers' pipeline has\\): .+"):
            getattr(ours, name)
    with pytest.raises(AttributeError, match="has no attribute 'bogus'"):
        ours.bogus


@pytest.mark.parametrize("args", [(torch.bfloat16,), ("cpu", torch.float16), ()],
                         ids=["dtype", "place-and-dtype", "nothing"])
def test_pipe_to_casts_every_network_and_edits_as_a_pipe_loaded_that_way(sd1_folder, args):
    """diffusers' most common line, `pipe = pipe.to(...)`, was refused unless it changed nothing; now it moves and
    casts the networks, and the edit equals (bit for bit) that of a pipe loaded with that dtype."""
    pipe = StableDiffusionDiffEdit.from_pretrained(sd1_folder)
    assert pipe.to(*args) is pipe
    dtype = args[-1] if args else torch.float32
    loaded = StableDiffusionDiffEdit.from_pretrained(sd1_folder, dtype=dtype)
    for name in ("unet", "vae"):
        for (key, a), b in zip(getattr(pipe, name).state_dict().items(), getattr(loaded, name).state_dict().values()):
            assert a.dtype == b.dtype == dtype and torch.equal(a, b), (name, key)
    assert pipe.text_encoder.dtype == dtype

    def edit(p):
        p.set_progress_bar_config(disable=True)
        inv = p.invert(prompt="a cat", image=picture(0), num_inference_steps=2, generator=gen())
        return p(prompt="a dog", mask_image=np.ones((1, 8, 8), np.float32), image_latents=inv.latents,
                 num_inference_steps=2, generator=gen(), output_type="latent").images

    assert torch.equal(edit(pipe), edit(loaded))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pipe_to_another_device_edits_as_a_pipe_loaded_there(sd1_folder):
    """`pipe.to("cuda")` after loading on the CPU: every network, learned word and LoRA branch runs there, and the
    edit equals that of a pipe loaded on the device (within the facade's tolerances: the same kernels)."""
    moved = StableDiffusionDiffEdit.from_pretrained(sd1_folder).to("cuda")
    there = StableDiffusionDiffEdit.from_pretrained(sd1_folder, device="cuda")
    token_rows = moved.text_encoder.embeddings.token_embedding.weight
    assert moved.device == there.device and token_rows.device.type == "cuda"
    outputs = []
    for p in (moved, there):
        p.set_progress_bar_config(disable=True)
        mask = p.generate_mask(image=picture(0), source_prompt="a cat", target_prompt="a dog", generator=gen())
        inv = p.invert(prompt="a cat", image=picture(0), num_inference_steps=2, generator=gen())
        outputs.append((mask, p(prompt="a dog", mask_image=mask, image_latents=inv.latents, num_inference_steps=2,
                                generator=gen(), output_type="np").images))
    assert (outputs[0][0] == outputs[1][0]).all() and max_abs(outputs[0][1], outputs[1][1]) < IMAGE_TOL


def test_progress_bars_tick_as_diffusers_and_hide_when_disabled(sd1):
    """invert and __call__ show a tqdm bar per loop with diffusers' totals; set_progress_bar_config replaces the
    settings as diffusers' does (a later call without disable shows bars again)."""
    import io
    import re

    ref, ours, _ = sd1
    image = picture(0)

    def bars(pipe, **config) -> list[str]:
        out = io.StringIO()
        pipe.set_progress_bar_config(file=out, **config)
        inv = pipe.invert(prompt="a cat", image=image, num_inference_steps=6, inpaint_strength=0.5, generator=gen())
        pipe(prompt="a dog", mask_image=np.ones((1, 8, 8), np.float32), image_latents=inv.latents,
             num_inference_steps=6, inpaint_strength=0.5, generator=gen(), output_type="latent")
        return re.findall(r"(\d+/\d+)", out.getvalue())

    try:
        expected = bars(ref)
        assert expected and bars(ours) == expected, (bars(ours), expected)
        assert bars(ours, disable=True) == []
        assert bars(ours) == expected
    finally:
        ref.set_progress_bar_config(disable=True)
        ours.set_progress_bar_config(disable=True)


@pytest.mark.parametrize("kw", [
    dict(prompt="a cat", do_classifier_free_guidance=True),
    dict(prompt=["a cat", "a bowl"], do_classifier_free_guidance=True, num_images_per_prompt=2,
         negative_prompt=["blurry", "dark"]),
    dict(prompt="a cat", do_classifier_free_guidance=False, clip_skip=1),
    dict(prompt="a cat", do_classifier_free_guidance=True, negative_prompt="dark", clip_skip=1),
    dict(prompt_embeds="a cat", do_classifier_free_guidance=True)],
    ids=["defaults", "batch-repeats-negatives", "no-guidance-clip-skip", "clip-skip-prompt-only", "embeds"])
def test_encode_prompt_takes_diffusers_arguments_and_returns_its_pair(sd1, kw, monkeypatch):
    """diffusers' encode_prompt(prompt, device, num_images_per_prompt, do_classifier_free_guidance, ...) returns
    (prompt_embeds, negative_prompt_embeds); ours had no `device` (a diffusers-style call shifted every argument)
    and returned one object. Both sides' tensors here must be equal within 1e-5 (the same text encoder weights).
    diffusers' clip_skip path reads `text_encoder.text_model.final_layer_norm`, which transformers 5 keeps at
    `text_encoder.final_layer_norm`: it is pointed there."""
    from types import SimpleNamespace

    ref, ours, _ = sd1
    monkeypatch.setattr(ref.text_encoder, "text_model",
                        SimpleNamespace(final_layer_norm=ref.text_encoder.final_layer_norm), raising=False)
    kw = dict(kw)
    if "prompt_embeds" in kw:  # embeddings given: passed through, repeated, negatives computed
        kw["prompt"], kw["prompt_embeds"] = None, ref.encode_prompt(kw["prompt_embeds"], "cpu", 1, False)[0].detach()
    n = kw.pop("num_images_per_prompt", 1)
    expected = ref.encode_prompt(device="cpu", num_images_per_prompt=n, **kw)
    got = ours.encode_prompt(device=None, num_images_per_prompt=n, **kw)
    assert isinstance(got, tuple) and len(got) == 2
    for a, b in zip(got, expected):
        assert (a is None) == (b is None)
        if b is not None:
            assert a.shape == b.shape and max_abs(a, b.detach()) < 1e-5
    positional = ours.encode_prompt("a cat", "cpu", 1, True)
    assert torch.equal(positional[0], ours.encode_prompt(prompt="a cat", device="cpu", num_images_per_prompt=1,
                                                         do_classifier_free_guidance=True)[0])
    with pytest.raises(ValueError, match="Provide either `prompt` or `prompt_embeds`"):
        ours.encode_prompt(None, "cpu", 1, True)


def test_deprecated_underscore_encode_prompt_returns_diffusers_concatenation(sd1):
    """Older tutorials call diffusers' `_encode_prompt(prompt, device, num_images_per_prompt,
    do_classifier_free_guidance, negative_prompt)`, which returns cat([negative, prompt]). Ours was a private helper
    of another signature: the same positional call failed with a TypeError about `negative_prompt`. Equal to
    diffusers' within 1e-5 (the same text encoder weights)."""
    ref, ours, _ = sd1
    args = (["a cat", "a bowl"], "cpu", 2, True, ["blurry", "dark"])
    with pytest.warns(FutureWarning):
        expected = ref._encode_prompt(*args)
    with pytest.warns(FutureWarning, match="encode_prompt"):
        got = ours._encode_prompt(*args)
    assert got.shape == expected.shape == (8, 77, 32) and max_abs(got, expected.detach()) < 1e-5
    with pytest.warns(FutureWarning):
        alone = ours._encode_prompt("a cat", "cpu", 1, False)  # diffusers fails on cat([None, ...]) here
    assert torch.equal(alone, ours.encode_prompt("a cat", "cpu", 1, False)[0])


def test_bad_num_images_per_prompt_and_mask_dtype_are_refused_by_name(sd1):
    _, ours, _ = sd1
    inv = ours.invert(prompt="a cat", image=picture(0), num_inference_steps=2)
    kw = dict(prompt="a dog", image_latents=inv.latents, num_inference_steps=2,
              mask_image=np.ones((1, 8, 8), np.float32))
    for n in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="`num_images_per_prompt` must be a positive integer"):
            ours(**kw | dict(num_images_per_prompt=n))
    with pytest.raises(TypeError, match="`mask_image` has dtype uint16"):
        ours(**kw | dict(mask_image=np.ones((1, 8, 8), np.uint16)))


def test_refused_values_are_named_by_the_argument_typed(sd1):
    _, ours, _ = sd1
    image = picture(0)
    inv = ours.invert(prompt="a cat", image=image, num_inference_steps=2)
    call = dict(prompt="a dog", image_latents=inv.latents, num_inference_steps=2,
                mask_image=np.ones((1, 8, 8), np.float32))
    cases = [
        (lambda: ours.invert(prompt="a cat", image=image, guidance_scale=float("nan")), "`guidance_scale`"),
        (lambda: ours.generate_mask(image=image, source_prompt="a", target_prompt="b", guidance_scale=-1),
         "`guidance_scale`"),
        (lambda: ours.generate_mask(image=image, source_prompt="a", target_prompt="b", mask_encode_strength=2),
         "`mask_encode_strength`"),
        (lambda: ours(**call, eta=-1), "`eta`"),
        (lambda: ours(**call | dict(inpaint_strength=float("nan"))), "`inpaint_strength`"),
        (lambda: ours.invert(prompt="a cat", image=image, inpaint_strength=1.5), "`inpaint_strength`"),
    ]
    for run, name in cases:
        with pytest.raises(ValueError, match=name) as e:
            run()
        assert "DiffEditParams" not in str(e.value)


def test_an_integer_image_is_refused_with_how_to_pass_it(sd1):
    _, ours, _ = sd1
    pixels = np.asarray(picture(0))  # uint8 0-255
    with pytest.raises(ValueError, match=r"0-255 pixel values: pass the PIL image.*floats in \[0, 1\]"):
        ours.generate_mask(image=pixels, source_prompt="a", target_prompt="b")
    with pytest.raises(ValueError, match="0-255 pixel values"):
        ours.invert(prompt="a cat", image=pixels)
    inv = ours.invert(prompt="a cat", image=pixels / 255.0, num_inference_steps=2, generator=gen())
    assert rel(inv.latents, ours.invert(prompt="a cat", image=picture(0), num_inference_steps=2,
                                        generator=gen()).latents) < LATENT_TOL


def test_clip_skip_in_generate_mask_and_invert_is_a_type_error_as_in_diffusers(sd1):
    ref, ours, fixed = sd1
    image = picture(0)
    with pytest.raises(TypeError):
        ref.invert(prompt="a cat", image=image, clip_skip=1)
    with pytest.raises(TypeError, match="generate_mask has no clip_skip argument.*honor_all_call_options=True"):
        ours.generate_mask(image=image, source_prompt="a", target_prompt="b", clip_skip=1)
    with pytest.raises(TypeError, match="invert has no clip_skip argument"):
        ours.invert(prompt="a cat", image=image, clip_skip=1)
    fixed.invert(prompt="a cat", image=image, clip_skip=1, num_inference_steps=2)  # the corrected mode uses it


def test_wrong_rank_tensors_are_refused_naming_the_argument(sd1):
    ref, ours, _ = sd1
    image = picture(0)
    flat = _embeds(ref, "a dog")[0]  # (77, D), the batch dimension dropped
    inv = ours.invert(prompt="a cat", image=image, num_inference_steps=2)
    kw = dict(image_latents=inv.latents, num_inference_steps=2, mask_image=np.ones((1, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"`prompt_embeds` must be a \(batch, tokens, width\) tensor"):
        ours(prompt_embeds=flat, **kw)
    with pytest.raises(ValueError, match="`source_prompt_embeds` must be a"):
        ours.generate_mask(image=image, source_prompt_embeds=flat, target_prompt="a dog")
    with pytest.raises(ValueError, match="`image_latents` must be invert\\(\\)'s latents.*2-D"):
        ours(prompt="a dog", **kw | dict(image_latents=inv.latents[0, 0, 0]))
    with pytest.raises(ValueError, match="`image_latents` holds 4 latent images, but this call needs 1 x 1"):
        ours(prompt="a dog", **kw | dict(image_latents=inv.latents.repeat(1, 4, 1, 1, 1)[0]))


def test_a_list_of_per_step_latents_is_taken_as_diffusers_takes_it(sd1):
    ref, ours, _ = sd1
    inv = ours.invert(prompt="a cat", image=picture(0), num_inference_steps=STEPS, generator=gen())
    steps = list(inv.latents[0].unbind(0))  # T latents (C, h, w)
    kw = dict(prompt="a dog", mask_image=np.ones((1, 8, 8), np.float32), num_inference_steps=STEPS,
              output_type="np")
    expected = ref(**kw, image_latents=steps, generator=gen(3)).images
    got = ours(**kw, image_latents=steps, generator=gen(3)).images
    assert max_abs(got, expected) < IMAGE_TOL
    assert np.array_equal(got, ours(**kw, image_latents=inv.latents, generator=gen(3)).images)


def test_the_constructor_refuses_what_is_not_a_model_or_params():
    """StableDiffusionDiffEdit("folder") built a facade whose first call failed deep inside; a path belongs to
    from_pretrained."""
    with pytest.raises(TypeError, match="model: expected a diffedit StableDiffusion, got str.*from_pretrained"):
        StableDiffusionDiffEdit("some/folder")
    with pytest.raises(TypeError, match="got no model"):
        StableDiffusionDiffEdit()

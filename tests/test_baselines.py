"""DiffEdit and its baselines under one signature: DiffEdit gives the one-call API's numbers, the ground-truth-mask
variant brackets Encode-Decode (full mask) and the input (empty mask), and SDEdit gives diffusers' image-to-image
pipeline's numbers on the same weights, image and seed."""

import dataclasses
import inspect

import numpy as np
import PIL.Image
import pytest
import torch

from diffedit import DiffEditParams, StableDiffusion, api, baselines, method

torch.set_num_threads(1)

FAST = DiffEditParams(num_inference_steps=10, num_maps_per_mask=2)
LATENT_TOL = 1e-3  # relative (Frobenius) error of latents against diffusers, as the facade's parity tests


@pytest.fixture(scope="module")
def sd(sd1_folder):
    return StableDiffusion.from_pretrained(sd1_folder)


def picture(seed: int = 0) -> PIL.Image.Image:
    rng = np.random.RandomState(seed)
    return PIL.Image.fromarray((rng.rand(4, 4, 3) * 255).astype(np.uint8)).resize((64, 64), PIL.Image.BICUBIC)


def inputs(sd, params, source="a cat", target="a dog"):
    return (api.model_pixels(sd, picture()), api.prompt_text(sd, source, params), api.prompt_text(sd, target, params))


def run(name, sd, params, truth=None, seed=0):
    pixels, source, target = inputs(sd, params)
    return baselines.METHODS[name](sd, pixels, source, target, params, torch.Generator().manual_seed(seed), truth)


def test_every_method_has_the_one_signature():
    signatures = {name: list(inspect.signature(f).parameters) for name, f in baselines.METHODS.items()}
    one = ["sd", "pixels", "source", "target", "params", "generator", "truth", "steps"]
    assert all(s == one for s in signatures.values())
    assert set(baselines.METHODS) == {"diffedit", "diffedit-gt-mask", "encode-decode", "sdedit"}


def test_diffedit_gives_the_one_call_apis_picture(sd):
    edited = run("diffedit", sd, FAST)
    pixels, source, target = inputs(sd, FAST)
    want, latent_mask, guidance = next(api.edit_each(sd, pixels, (64, 64), source, [target], FAST,
                                                     torch.Generator().manual_seed(0)))
    got = api.to_picture(sd, edited.latents, (64, 64))
    assert np.array_equal(np.asarray(got), np.asarray(want))
    assert np.array_equal(edited.latent_mask[0].numpy(), latent_mask)
    assert np.array_equal(edited.guidance_map[0].numpy(), guidance)


def test_the_ground_truth_mask_brackets_encode_decode_and_the_input(sd):
    full, empty = torch.ones(1, 8, 8, dtype=torch.bool), torch.zeros(1, 8, 8, dtype=torch.bool)
    plain = run("encode-decode", sd, FAST)
    assert plain.latent_mask is None
    assert torch.equal(run("diffedit-gt-mask", sd, FAST, truth=full).latents, plain.latents)  # nothing kept apart
    pixels, source, _ = inputs(sd, FAST)
    clean = method.invert(sd, pixels, source, FAST, torch.Generator().manual_seed(0)).clean
    assert torch.equal(run("diffedit-gt-mask", sd, FAST, truth=empty).latents, clean)  # nothing edited
    with pytest.raises(ValueError, match="needs the ground-truth edit region"):
        run("diffedit-gt-mask", sd, FAST)


@pytest.mark.parametrize("strength, guidance", [(0.6, 7.5), (0.3, 1.0)])
def test_sdedit_matches_diffusers_img2img_with_ddim(sd, sd1_folder, strength, guidance):
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    scheduler = DDIMScheduler.from_pretrained(sd1_folder, subfolder="scheduler")
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(sd1_folder, scheduler=scheduler, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt="a dog", image=picture(), strength=strength, num_inference_steps=10, guidance_scale=guidance,
               eta=0.0, generator=torch.Generator().manual_seed(0), output_type="latent").images
    params = dataclasses.replace(FAST, inpaint_strength=strength, guidance_scale=guidance)
    ours = run("sdedit", sd, params).latents  # scaled latents, as output_type="latent" returns them
    assert ((ours - ref).norm() / ref.norm()).item() < LATENT_TOL


BATCH_TOL = 1e-4  # largest |difference| of the latents relative to their largest |value|; measured 2e-5 (eta 0.5)


@pytest.mark.parametrize("name", sorted(baselines.METHODS))
def test_a_batch_with_a_generator_per_image_gives_each_images_own_edit(sd, name):
    """Two pictures and prompt pairs in one batch against each alone (eta > 0, so the decoding draws too): the
    same masks, latents equal up to the batch's arithmetic."""
    params = dataclasses.replace(FAST, eta=0.5)
    pixels = torch.cat([api.model_pixels(sd, picture(s)) for s in (0, 1)])
    sources, targets = ["a cat", "a red car"], ["a dog", "a blue car"]
    truth = torch.zeros(2, 8, 8, dtype=torch.bool)
    truth[0, 2:6, 2:6] = truth[1, 1:4, 3:8] = True
    batch = baselines.METHODS[name](sd, pixels, method.encode_text(sd, sources, ["", ""]),
                                    method.encode_text(sd, targets, ["", ""]), params,
                                    [torch.Generator().manual_seed(10 + i) for i in range(2)], truth)
    for i in range(2):
        alone = baselines.METHODS[name](sd, pixels[i : i + 1], api.prompt_text(sd, sources[i], params),
                                        api.prompt_text(sd, targets[i], params), params,
                                        torch.Generator().manual_seed(10 + i), truth[i : i + 1])
        error = (alone.latents - batch.latents[i : i + 1]).abs().max() / alone.latents.abs().max()
        assert error <= BATCH_TOL
        if alone.latent_mask is not None:
            assert torch.equal(alone.latent_mask, batch.latent_mask[i : i + 1])

"""Shared work between settings changes no number: a remembered map or inversion is bit-identical to a fresh one,
the generators are left where a fresh run leaves them, and the fields a step is keyed on are all it reads."""

import contextlib
import dataclasses

import numpy as np
import PIL.Image
import pytest
import torch

from diffedit import DiffEditParams, StableDiffusion, api, baselines, method, reuse
from diffedit.models.lora import LoraAdapters

torch.set_num_threads(1)

BASE = DiffEditParams(num_inference_steps=10, num_maps_per_mask=2, eta=0.5)


@pytest.fixture(scope="module")
def sd(sd1_folder):
    return StableDiffusion.from_pretrained(sd1_folder)


@pytest.fixture(scope="module")
def inputs(sd):
    rng = np.random.RandomState(0)
    picture = PIL.Image.fromarray((rng.rand(4, 4, 3) * 255).astype(np.uint8)).resize((64, 64), PIL.Image.BICUBIC)
    return (api.model_pixels(sd, picture), api.prompt_text(sd, "a cat", BASE), api.prompt_text(sd, "a dog", BASE))


def edit(sd, inputs, params, steps, name="diffedit"):
    pixels, source, target = inputs
    return baselines.METHODS[name](sd, pixels, source, target, params, torch.Generator().manual_seed(3), None, steps)


def test_a_threshold_and_encoding_ratio_sweep_computes_one_map_and_one_inversion_with_identical_results(
        sd, inputs):
    """eta > 0, so the decoding draws noise: a remembered step that left the generator elsewhere would show."""
    grid = [dataclasses.replace(BASE, mask_thresholding_ratio=ratio, mask_threshold_rule=rule, inpaint_strength=r)
            for r in (0.5, 0.8) for ratio in (2.0, 3.0) for rule in ("ratio", "otsu")]
    shared = reuse.SharedSteps(deepest_strength=0.8)
    for params in grid:
        fresh = edit(sd, inputs, params, reuse.Steps())
        again = edit(sd, inputs, params, shared)
        assert torch.equal(fresh.latents, again.latents) and torch.equal(fresh.latent_mask, again.latent_mask)
    assert shared.hits == {"mask": len(grid) - 1, "inversion": len(grid) - 1}
    assert len(shared.done) == 2


def test_encode_decode_and_the_ground_truth_mask_share_an_inversion_but_not_with_diffedit(sd, inputs):
    """Their inversions start from a fresh generator; DiffEdit's starts after the mask step's draws."""
    shared = reuse.SharedSteps()
    edit(sd, inputs, BASE, shared, "encode-decode")
    edit(sd, inputs, BASE, shared, "diffedit")
    assert shared.hits["inversion"] == 0
    pixels, source, target = inputs
    truth = torch.ones(1, *pixels.shape[-2:], dtype=torch.bool)[:, ::sd.vae_scale_factor, ::sd.vae_scale_factor]
    shared_gt = baselines.diffedit_gt_mask(sd, pixels, source, target, BASE, torch.Generator().manual_seed(3), truth,
                                           shared)
    fresh_gt = baselines.diffedit_gt_mask(sd, pixels, source, target, BASE, torch.Generator().manual_seed(3), truth)
    assert shared.hits["inversion"] == 1 and torch.equal(shared_gt.latents, fresh_gt.latents)


def test_a_remembered_step_leaves_the_generator_where_a_fresh_one_does(sd, inputs):
    pixels, source, target = inputs
    shared = reuse.SharedSteps()
    states = []
    for _ in range(2):
        g = torch.Generator().manual_seed(4)
        shared.estimate_mask(sd, pixels, source, target, BASE, g)
        shared.invert(sd, pixels, source, BASE, g)
        states.append(g.get_state())
    fresh = torch.Generator().manual_seed(4)
    method.estimate_mask(sd, pixels, source, target, BASE, fresh)
    method.invert(sd, pixels, source, BASE, fresh)
    assert shared.hits == {"mask": 1, "inversion": 1}
    assert torch.equal(states[0], fresh.get_state()) and torch.equal(states[1], fresh.get_state())


def test_a_limited_memory_forgets_the_least_recently_used_result_first(sd, inputs):
    pixels, source, target = inputs
    shared = reuse.SharedSteps(limit=2)

    def difference(strength: float) -> torch.Tensor:
        p = BASE.updated({"mask_encode_strength": strength})
        return shared.estimate_mask(sd, pixels, source, target, p, torch.Generator().manual_seed(0)).difference

    first = difference(0.5)
    difference(0.6)
    assert torch.equal(difference(0.5), first) and shared.hits["mask"] == 1  # 0.5: now the most recently used
    difference(0.7)  # a third result: 0.6, the least recently used, is forgotten
    assert len(shared.done) == 2
    assert torch.equal(difference(0.5), first) and shared.hits["mask"] == 2
    difference(0.6)
    assert shared.hits["mask"] == 2  # computed again
    with pytest.raises(ValueError, match="^limit: expected None or at least 1 result, got 0$"):
        reuse.SharedSteps(limit=0)


def test_no_generator_is_never_a_repeat(sd, inputs):
    pixels, source, target = inputs
    shared = reuse.SharedSteps()
    shared.estimate_mask(sd, pixels, source, target, BASE)
    shared.estimate_mask(sd, pixels, source, target, BASE)
    assert shared.hits["mask"] == 0


def test_a_regularized_inversion_is_not_cut_from_a_deeper_one(sd, inputs):
    """The regularizer's rolls draw at every step, so the generator's state after the loop depends on r."""
    pixels, source, _ = inputs
    shared = reuse.SharedSteps(deepest_strength=0.8)
    for r in (0.8, 0.5):
        params = dataclasses.replace(BASE, num_reg_steps=1, num_auto_corr_rolls=1, inpaint_strength=r)
        g = torch.Generator().manual_seed(1)
        got = shared.invert(sd, pixels, source, params, g)
        fresh_g = torch.Generator().manual_seed(1)
        want = method.invert(sd, pixels, source, params, fresh_g)
        assert torch.equal(got.latents, want.latents) and torch.equal(g.get_state(), fresh_g.get_state())
    assert shared.hits["inversion"] == 0


# Values that differ from BASE for every field, each valid
OTHER = {"num_maps_per_mask": 3, "mask_encode_strength": 0.6, "mask_thresholding_ratio": 2.0,
         "mask_guidance_scale": 5.0, "mask_threshold_rule": "otsu", "inpaint_strength": 0.6,
         "inversion_guidance_scale": 3.0, "num_reg_steps": 1, "lambda_auto_corr": 5.0, "lambda_kl": 5.0,
         "num_auto_corr_rolls": 2, "guidance_scale": 3.0, "guidance_min_timestep": 500, "eta": 0.0,
         "num_inference_steps": 20, "clip_skip": 1, "sampler": "dpmsolver++", "lora_scale": 0.5}


def test_other_values_cover_every_field_but_the_corrections_which_are_flipped():
    from diffedit.params import CORRECTIONS

    assert set(DiffEditParams.field_names()) - set(OTHER) == set(CORRECTIONS.values())


def _changed(field):
    value = OTHER.get(field, not getattr(BASE, field))  # the corrections are booleans: flip them
    other = {"eta": 0.0} if field == "sampler" else {}  # DPM-Solver++ draws no DDIM noise: eta > 0 is refused
    return dataclasses.replace(BASE, **{field: value, **other})


@pytest.mark.parametrize("field", [f for f in DiffEditParams.field_names()
                                   if f not in reuse.MASK_FIELDS + reuse.THRESHOLD_FIELDS + ("clip_skip",)])
def test_the_difference_map_reads_no_field_outside_its_key(sd, inputs, field):
    """clip_skip acts through the text embeddings, which are keyed by their content."""
    pixels, source, target = inputs
    base = method.estimate_mask(sd, pixels, source, target, BASE, torch.Generator().manual_seed(0)).difference
    other = method.estimate_mask(sd, pixels, source, target, _changed(field), torch.Generator().manual_seed(0))
    assert torch.equal(base, other.difference)


@pytest.mark.parametrize("field", [f for f in DiffEditParams.field_names()
                                   if f not in reuse.INVERSION_FIELDS + ("inpaint_strength", "clip_skip")])
def test_the_inversion_reads_no_field_outside_its_key(sd, inputs, field):
    pixels, source, _ = inputs
    regularized = dataclasses.replace(BASE, num_reg_steps=1, num_auto_corr_rolls=1)  # so its fields are read
    base = method.invert(sd, pixels, source, regularized, torch.Generator().manual_seed(0))
    changed = dataclasses.replace(_changed(field), num_reg_steps=1, num_auto_corr_rolls=1)
    other = method.invert(sd, pixels, source, changed, torch.Generator().manual_seed(0))
    assert torch.equal(base.latents, other.latents)


@contextlib.contextmanager
def _with_lora(sd: StableDiffusion):
    """The same networks in a new holder, with a random rank-2 UNet LoRA on every cross-attention key projection
    while the block runs."""
    from diffedit.models.lora import LowRank

    g = torch.Generator().manual_seed(0)
    pairs = {n: LowRank(torch.randn(2, m.in_features, generator=g), torch.randn(m.out_features, 2, generator=g), 2.0)
             for n, m in sd.unet.named_modules() if n.endswith("attn2.to_k")}
    other = dataclasses.replace(sd, lora=LoraAdapters())
    other.lora.add("random", {"unet": pairs}, {"unet": sd.unet, "text_encoder": sd.text_encoder})
    try:
        yield other
    finally:
        other.lora.remove_all()


@pytest.mark.parametrize("field", reuse.MASK_FIELDS + reuse.INVERSION_FIELDS)
def test_every_keyed_field_changes_its_steps_result(sd, inputs, field):
    """The keys are not wider than they need be: each field in them moves the map or the inversion."""
    pixels, source, target = inputs
    regularized = field != "sampler"  # DPM-Solver++ runs without the regularizer
    params = dataclasses.replace(BASE, num_reg_steps=int(regularized), num_auto_corr_rolls=1)
    changed = dataclasses.replace(_changed(field), num_reg_steps=params.num_reg_steps if field != "num_reg_steps"
                                  else 2, num_auto_corr_rolls=1 if field != "num_auto_corr_rolls" else 2)
    with _with_lora(sd) if field == "lora_scale" else contextlib.nullcontext(sd) as sd:  # the scale needs a LoRA
        if field in reuse.MASK_FIELDS:
            a = method.estimate_mask(sd, pixels, source, target, params, torch.Generator().manual_seed(0)).difference
            b = method.estimate_mask(sd, pixels, source, target, changed, torch.Generator().manual_seed(0)).difference
        else:  # two images: portable_regularizer sums each image's KL term instead of pooling them
            two, text = torch.cat([pixels, pixels.flip(-1)]), source.repeat_interleave(2)
            a = method.invert(sd, two, text, params, torch.Generator().manual_seed(0)).latents
            b = method.invert(sd, two, text, changed, torch.Generator().manual_seed(0)).latents
    assert a.shape != b.shape or not torch.equal(a, b)


def test_a_lora_or_vae_option_changed_between_calls_is_not_a_repeat(sd, inputs, tmp_path):
    """The model's state is part of the key: after a UNet LoRA is loaded the same inputs and fields run again (and
    give a fresh run's numbers); with it disabled the first result is remembered again; VAE tiling is keyed too."""
    from safetensors.torch import save_file

    pixels, source, target = inputs
    name, layer = next((n, m) for n, m in sd.unet.named_modules() if n.endswith("attn2.to_k"))
    flat, g = "lora_unet_" + name.replace(".", "_"), torch.Generator().manual_seed(0)
    save_file({f"{flat}.lora_down.weight": torch.randn(2, layer.in_features, generator=g),
               f"{flat}.lora_up.weight": torch.randn(layer.out_features, 2, generator=g)},
              str(tmp_path / "l.safetensors"))
    shared = reuse.SharedSteps()
    run = lambda: shared.estimate_mask(sd, pixels, source, target, BASE, torch.Generator().manual_seed(1)).difference
    plain = run()
    try:
        sd.load_lora_weights(tmp_path / "l.safetensors")
        with_lora = run()
        assert shared.hits["mask"] == 0 and not torch.equal(with_lora, plain)
        fresh = method.estimate_mask(sd, pixels, source, target, BASE, torch.Generator().manual_seed(1)).difference
        assert torch.equal(with_lora, fresh)
        sd.disable_lora()
        assert torch.equal(run(), plain) and shared.hits["mask"] == 1
    finally:
        sd.unload_lora_weights()
    sd.enable_vae_tiling()
    try:
        run()
        assert shared.hits["mask"] == 1
    finally:
        sd.disable_vae_tiling()


def test_a_dpm_solver_encoding_ratio_sweep_cuts_one_inversion_with_identical_results(sd, inputs):
    """DPM-Solver++'s inversion climbs the decoding's own levels, cleanest first, so a smaller r is the first
    steps of the deeper one too: one inversion for the sweep, each row equal to its fresh run."""
    base = dataclasses.replace(BASE, sampler="dpmsolver++", eta=0.0)
    shared = reuse.SharedSteps(deepest_strength=0.8)
    for r in (0.8, 0.5, 0.3):
        params = dataclasses.replace(base, inpaint_strength=r)
        fresh = edit(sd, inputs, params, reuse.Steps())
        again = edit(sd, inputs, params, shared)
        assert torch.equal(fresh.latents, again.latents) and torch.equal(fresh.latent_mask, again.latent_mask)
    assert shared.hits == {"mask": 2, "inversion": 2}

"""diffedit/memory.py: VAE slicing and tiling through the whole edit give diffusers 0.42.1's DiffEdit pipeline's
numbers with the same options on (tiny SD1 checkpoint, VAE sample_size 64: tiles of 64 pixels / 8 latents); model
CPU offload is accepted and harmless without an accelerator, and moves the networks in the order they run.

What only a GPU can show (not checked here): that the networks really leave the accelerator (memory drops) and
that the outputs on the accelerator under offload equal those without it."""

import warnings

import numpy as np
import pytest
import torch

from diffedit import StableDiffusionDiffEdit, memory
from test_facade import IMAGE_TOL, LATENT_TOL, MASK_TOL, gen, max_abs, picture, reference_pipeline, rel

torch.set_num_threads(1)

STEPS = 10
WIDE = (96, 80)  # PIL (width, height): latents 10 x 12, over the 8-latent tile on both sides; 2 x 2 tiles


@pytest.fixture(scope="module")
def pipes(sd1_folder):
    return reference_pipeline(sd1_folder), StableDiffusionDiffEdit.from_pretrained(sd1_folder)


def edit(pipe, images, sources, targets):
    """generate_mask, invert (with its decoded latents) and __call__, as the README's three calls."""
    g = gen(11)
    mask = pipe.generate_mask(image=images, source_prompt=sources, target_prompt=targets,
                              mask_thresholding_ratio=2.0, num_maps_per_mask=3, generator=g)
    inv = pipe.invert(prompt=sources, image=images, num_inference_steps=STEPS, generator=g, decode_latents=True,
                      output_type="np")
    out = pipe(prompt=targets, mask_image=mask, image_latents=inv.latents, num_inference_steps=STEPS, generator=g,
               output_type="np")
    return mask, inv.latents, inv.images, out.images


def set_options(pipe, options) -> None:
    """Our facade's diffusers-named calls; off first, so a fixture's pipes start clean."""
    pipe.disable_vae_slicing()
    pipe.disable_vae_tiling()
    if "slicing" in options:
        pipe.enable_vae_slicing()
    if "tiling" in options:
        pipe.enable_vae_tiling()


def set_reference_options(pipe, options) -> None:
    """diffusers 0.42.1's pipelines no longer have enable_vae_slicing / enable_vae_tiling: the VAE's own calls."""
    pipe.vae.disable_slicing()
    pipe.vae.disable_tiling()
    if "slicing" in options:
        pipe.vae.enable_slicing()
    if "tiling" in options:
        pipe.vae.enable_tiling()


@pytest.mark.parametrize("options, size, batch", [(("tiling",), WIDE, 1), (("slicing",), (64, 64), 2),
                                                  (("tiling", "slicing"), WIDE, 2)])
def test_edit_with_vae_options_matches_diffusers_with_the_same_options(pipes, options, size, batch):
    ref, ours = pipes
    images = [picture(20 + i, size) for i in range(batch)]
    sources, targets = ["a cat", "a bowl of fruit"][:batch], ["a dog", "a bowl of pears"][:batch]
    set_reference_options(ref, options)
    expected = edit(ref, images, sources, targets)
    set_reference_options(ref, ())
    set_options(ours, options)
    got = edit(ours, images, sources, targets)
    set_options(ours, ())
    plain = edit(ours, images, sources, targets)
    (m_ref, l_ref, d_ref, i_ref), (m, l, d, i) = expected, got
    h, w = size[1] // 8, size[0] // 8
    assert m.shape == (batch, h, w) and (m == m_ref).mean() >= MASK_TOL and 0 < m_ref.mean() < 1
    assert l.shape == (batch, 8, 4, h, w) and rel(l, l_ref) < LATENT_TOL
    assert d.shape == (batch * 8, size[1], size[0], 3) and max_abs(d, d_ref) < IMAGE_TOL
    assert i.shape == (batch, size[1], size[0], 3) and max_abs(i, i_ref) < IMAGE_TOL
    if "tiling" in options:  # the tiles changed the numbers, as they do in diffusers
        assert max_abs(i, plain[3]) > 10 * IMAGE_TOL and max_abs(d, plain[2]) > 10 * IMAGE_TOL
    else:  # slicing alone changes nothing beyond float noise: one image through the VAE rounds unlike a batch of
        # two (1e-7), which 8 inversion and 8 decoding steps grow to 6e-6 (latents, relative) and 2e-4 (pixels)
        assert max_abs(i, plain[3]) < 1e-3 and rel(l, plain[1]) < 1e-4


def test_tiling_leaves_images_within_the_tile_exactly_unchanged(pipes):
    _, ours = pipes
    image = picture(30)  # 64 x 64: exactly the sample tile, 8 x 8 latents: exactly the latent tile
    plain = edit(ours, [image], ["a cat"], ["a dog"])
    ours.enable_vae_tiling()
    try:
        tiled = edit(ours, [image], ["a cat"], ["a dog"])
    finally:
        ours.disable_vae_tiling()
    for a, b in zip(plain, tiled):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_facade_names_set_the_models_own_options(pipes):
    _, ours = pipes
    sd = ours.model
    ours.enable_vae_slicing()
    ours.enable_vae_tiling()
    assert sd.vae_slicing and sd.vae_tiling
    ours.disable_vae_slicing()
    assert not sd.vae_slicing and sd.vae_tiling
    ours.disable_vae_tiling()
    assert not sd.vae_slicing and not sd.vae_tiling
    ours.maybe_free_model_hooks()  # no offload: nothing to do
    ours.remove_all_hooks()
    assert sd.offload is None


# ----------------------------------------------------------------------------------------------------------------
# Model CPU offload


@pytest.fixture
def moves(monkeypatch):
    """Every move the offload makes, as (network name, device type), while still moving."""
    seen = []

    def recording_move(module, device):
        name = next(n for n in memory.OFFLOAD_ORDER if getattr(recording_move.sd, n) is module)
        seen.append((name, torch.device(device).type))
        module.to(device)

    monkeypatch.setattr(memory, "move", recording_move)
    return seen, recording_move


def onloads(seen, device_type="cpu"):
    """The networks in the order they were put on the offload device (after the initial all-to-CPU)."""
    return [name for name, d in seen if d == device_type]


def test_offload_on_cpu_gives_the_same_edit_and_onloads_each_network_in_the_order_it_runs(pipes, moves):
    _, ours = pipes
    seen, recording_move = moves
    recording_move.sd = ours.model
    image = picture(31, WIDE)
    plain = edit(ours, [image], ["a cat"], ["a dog"])
    ours.enable_model_cpu_offload(device="cpu")  # explicit device: the mechanics run, the moves are no-ops
    try:
        assert ours.device == torch.device("cpu") and ours.model.offload is not None
        assert seen == [(n, "cpu") for n in memory.OFFLOAD_ORDER]  # enabling puts every network on the CPU
        seen.clear()
        offloaded = edit(ours, [image], ["a cat"], ["a dog"])
        during = list(seen)
    finally:
        ours.remove_all_hooks()
    for a, b in zip(plain, offloaded):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # Each `onload` sends the active network back and then moves the next one; `free` ends each call
    free = [(n, "cpu") for n in memory.OFFLOAD_ORDER]

    def call(*names):
        steps = []
        for k, name in enumerate(names):
            steps += ([(names[k - 1], "cpu")] if k else []) + [(name, "cpu")]
        return steps + free
    assert during == (call("text_encoder", "vae", "unet")  # generate_mask: prompts, image latents, noise
                    + call("text_encoder", "vae", "unet", "vae")  # invert: ..., decode_latents
                    + call("text_encoder", "unet", "vae"))  # __call__: prompt, decoding, pixels
    seen.clear()
    ours.model.unet(torch.zeros(1, 4, 8, 8), torch.tensor(1), ours.encode_prompt("a", None, 1, False)[0])
    assert seen == []  # remove_all_hooks took the hooks off


def test_offload_keeps_at_most_one_network_on_the_accelerator_and_device_points_there(pipes, monkeypatch):
    """With moves only recorded (nothing leaves the CPU), a fake accelerator shows the bookkeeping: the
    holder's device is the accelerator while the UNet's weights are elsewhere, and one network at a time is
    there."""
    _, ours = pipes
    sd = ours.model
    placed = {}
    monkeypatch.setattr(memory, "move", lambda module, device: placed.__setitem__(id(module), torch.device(device)))
    offload = memory.ModelOffload(sd, torch.device("meta"))
    sd.offload = offload
    try:
        assert sd.device == torch.device("meta") and next(sd.unet.parameters()).device.type == "cpu"
        on = lambda: sorted(n for n in memory.OFFLOAD_ORDER if placed[id(getattr(sd, n))].type == "meta")
        assert on() == []
        for name in ("text_encoder", "unet", "unet", "vae", "text_encoder"):
            offload.onload(name)
            assert on() == [name] and offload.active == name
        sd.maybe_free_model_hooks()
        assert on() == [] and offload.active is None
    finally:
        for hook in offload.hooks:
            hook.remove()
        sd.offload = None


def test_offload_without_an_accelerator_warns_once_and_changes_nothing(pipes, monkeypatch):
    _, ours = pipes
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="no accelerator") as record:
        ours.enable_model_cpu_offload()
    assert len(record) == 1 and ours.model.offload is None and ours.device == torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing more during the calls
        mask = ours.generate_mask(image=picture(32), source_prompt="a cat", target_prompt="a dog",
                                  num_maps_per_mask=2, generator=gen(1))
    assert mask.shape == (1, 8, 8)


def test_offload_device_follows_diffusers_rules(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    monkeypatch.setattr(memory, "check_available", lambda device: None)  # the rules, on any machine
    assert memory.offload_device() == torch.device("cuda", 0)
    assert memory.offload_device(gpu_id=1) == torch.device("cuda", 1)
    assert memory.offload_device(device="cuda:2") == torch.device("cuda", 2)
    assert memory.offload_device(gpu_id=3, device="xpu") == torch.device("xpu", 3)
    assert memory.offload_device(device="cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="both give an index"):
        memory.offload_device(gpu_id=0, device="cuda:1")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="gpu_id must be"):
            memory.offload_device(gpu_id=bad, device="cuda")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert memory.offload_device() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the moves are real only there")
def test_offload_on_a_gpu_moves_each_network_there_only_while_it_runs(sd1_folder):
    """On a GPU: during the UNet's loop only the UNet is on the GPU, after each call nothing is, and the edit equals
    the one with the whole model on the GPU."""
    offloaded = StableDiffusionDiffEdit.from_pretrained(sd1_folder)
    offloaded.enable_model_cpu_offload()
    sd = offloaded.model
    assert offloaded.device == torch.device("cuda", 0) and next(sd.unet.parameters()).device.type == "cpu"
    where = lambda: tuple(next(getattr(sd, n).parameters()).device.type for n in memory.OFFLOAD_ORDER)
    seen = []
    image = picture(33, WIDE)
    mask = offloaded.generate_mask(image=image, source_prompt="a cat", target_prompt="a dog", generator=gen(1))
    assert where() == ("cpu", "cpu", "cpu")
    inv = offloaded.invert(prompt="a cat", image=image, num_inference_steps=STEPS, generator=gen(2),
                           callback=lambda i, t, x: seen.append(where()))
    out = offloaded(prompt="a dog", mask_image=mask, image_latents=inv.latents, num_inference_steps=STEPS,
                    generator=gen(3), output_type="np", callback=lambda i, t, x: seen.append(where()))
    assert set(seen) == {("cpu", "cuda", "cpu")} and where() == ("cpu", "cpu", "cpu")
    assert torch.cuda.memory_allocated() < sum(p.numel() * p.element_size() for p in sd.unet.parameters())
    on_gpu = StableDiffusionDiffEdit.from_pretrained(sd1_folder, device="cuda")
    want_mask = on_gpu.generate_mask(image=image, source_prompt="a cat", target_prompt="a dog", generator=gen(1))
    want_inv = on_gpu.invert(prompt="a cat", image=image, num_inference_steps=STEPS, generator=gen(2))
    want = on_gpu(prompt="a dog", mask_image=want_mask, image_latents=want_inv.latents, num_inference_steps=STEPS,
                  generator=gen(3), output_type="np")
    assert (mask == want_mask).mean() >= MASK_TOL and rel(inv.latents.cpu(), want_inv.latents.cpu()) < 1e-5
    assert max_abs(out.images, want.images) < 1e-4  # the same kernels; only cuDNN's algorithm choice may differ
    offloaded.remove_all_hooks()
    assert where() == ("cuda", "cuda", "cuda") and offloaded.model.offload is None


@pytest.mark.parametrize("device", ["tpu9", "cpu:x", "", 1.5])
def test_a_device_torch_does_not_know_is_one_value_error_naming_the_argument(sd1_folder, device):
    """It used to escape as torch's RuntimeError "Invalid device string"; the offload already on stays on."""
    sd = StableDiffusionDiffEdit.from_pretrained(sd1_folder).model
    sd.enable_model_cpu_offload(device="cpu")
    before = sd.offload
    with pytest.raises(ValueError) as e:
        sd.enable_model_cpu_offload(device=device)
    assert type(e.value) is ValueError
    assert str(e.value) == (f"enable_model_cpu_offload: device={device!r} is not a device torch knows (e.g. 'cuda', "
                            "'cuda:1', 'xpu', 'mps', 'cpu')")
    assert sd.offload is before and before.hooks
    sd.remove_all_hooks()


@pytest.mark.parametrize("device", ["xpu", "cuda:63"], ids=["xpu", "index_63"])
def test_offload_to_a_device_this_machine_lacks_is_refused_and_the_current_offload_stays(sd1_folder, device):
    """It was accepted, and the next step failed inside the hooks (an AssertionError from torch without CUDA)."""
    sd = StableDiffusionDiffEdit.from_pretrained(sd1_folder).model
    sd.enable_model_cpu_offload(device="cpu")
    before = sd.offload
    with pytest.raises(ValueError, match=r"device .* is not available here \(.+\); pick an available accelerator"):
        sd.enable_model_cpu_offload(device=device)
    assert sd.offload is before and all(next(getattr(sd, n).parameters()).device.type == "cpu"
                                        for n in memory.OFFLOAD_ORDER)
    sd.remove_all_hooks()


def test_offload_to_the_meta_device_is_refused_and_the_weights_stay(sd1_folder):
    """torch takes "meta" as a device: the networks would have been moved there, their weights gone."""
    sd = StableDiffusionDiffEdit.from_pretrained(sd1_folder).model
    with pytest.raises(ValueError, match="device='meta' holds no data"):
        sd.enable_model_cpu_offload(device="meta")
    assert sd.offload is None and all(next(getattr(sd, n).parameters()).device.type == "cpu"
                                      for n in memory.OFFLOAD_ORDER)


@pytest.mark.parametrize("gpu_id", [-1, 1.5, True, "0"])
def test_a_bad_accelerator_index_is_refused_on_a_machine_without_an_accelerator_too(gpu_id, monkeypatch):
    """Without an accelerator it was accepted with the "nothing is offloaded" warning (the check came after that
    return), so the same call failed only on a GPU machine."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"gpu_id must be an accelerator index >= 0, got "):
        memory.offload_device(gpu_id=gpu_id)

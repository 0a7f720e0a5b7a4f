"""Image pre- and post-processing equal diffusers' `VaeImageProcessor` (defaults) and the DiffEdit pipeline's
`preprocess_mask`; the one-call API's resizing keeps any input size."""

import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from diffedit import image_tensors as imgs

torch.set_num_threads(1)


def processor():
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=8)


def photo(size=(70, 50), seed=0, mode="RGB") -> PIL.Image.Image:
    rng = np.random.RandomState(seed)
    return PIL.Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype(np.uint8)).convert(mode)


def test_pil_numpy_and_torch_inputs_preprocess_like_diffusers():
    proc = processor()
    pil = [photo(seed=0), photo(seed=1)]
    array = np.random.RandomState(2).rand(2, 52, 69, 3).astype(np.float32)
    tensor = torch.rand(2, 3, 52, 69, generator=torch.Generator().manual_seed(3))
    for image in (pil[0], pil, array, array[0], tensor, tensor[0], [tensor[0], tensor[1]]):
        ours, ref = imgs.to_tensor(image, 8), proc.preprocess(image)
        assert ours.shape == ref.shape and ours.shape[-2:] == (48, 64)
        assert torch.equal(ours, ref)
    latents = torch.randn(1, 4, 8, 8)
    assert torch.equal(imgs.to_tensor(latents, 8), latents)


def test_images_already_in_minus_one_one_are_kept_with_a_warning():
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with pytest.warns(FutureWarning, match="already in"):
        assert torch.equal(imgs.to_tensor(x, 8), x)


def test_non_rgb_pil_images_are_converted():
    out = imgs.to_tensor([photo(mode="L"), photo(mode="RGBA")], 8)
    assert out.shape == (2, 3, 48, 64)
    with pytest.raises(ValueError, match="smaller than the VAE factor"):
        imgs.to_tensor(PIL.Image.new("RGB", (7, 30)), 8)


@pytest.mark.parametrize("output_type", ["np", "pil", "pt"])
def test_postprocess_like_diffusers(output_type):
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    ours, ref = imgs.to_output(x, output_type), processor().postprocess(x, output_type=output_type)
    if output_type == "pil":
        assert [np.asarray(a).tolist() for a in ours] == [np.asarray(b).tolist() for b in ref]
    elif output_type == "np":
        assert ours.shape == (2, 16, 24, 3) and np.array_equal(ours, ref)
    else:
        assert torch.equal(ours, ref)
    with pytest.raises(ValueError, match="output_type"):
        imgs.to_output(x, "jpeg")


def test_masks_prepare_like_diffusers_preprocess_mask():
    from diffusers.pipelines.deprecated.stable_diffusion_diffedit.pipeline_stable_diffusion_diffedit import (
        preprocess_mask,
    )

    rng = np.random.RandomState(0)
    cases = [
        (rng.randint(0, 2, (1, 8, 8)).astype(np.int64), 1),
        (rng.randint(0, 2, (1, 8, 8)).astype(np.int64), 3),
        (rng.rand(2, 8, 8).astype(np.float32), 2),
        (rng.rand(8, 8).astype(np.float32), 1),
        (torch.rand(2, 1, 8, 8), 2),
        ([PIL.Image.fromarray((rng.rand(8, 8) * 255).astype(np.uint8), "L")] * 2, 2),
    ]
    for mask, batch in cases:
        copy = mask.clone() if isinstance(mask, torch.Tensor) else mask.copy() if isinstance(mask, np.ndarray) \
            else mask
        ours, ref = imgs.prepare_mask(mask, batch), preprocess_mask(copy, batch)
        assert ours.shape == ref.shape and ours.dtype == ref.dtype and torch.equal(ours, ref)
    with pytest.raises(ValueError, match="broadcast"):
        imgs.prepare_mask(np.zeros((2, 8, 8)), 3)
    with pytest.raises(ValueError, match="range"):
        imgs.prepare_mask(np.full((8, 8), 2.0), 1)


def test_mask_to_pil_is_white_where_edited():
    mask = np.array([[[0, 1], [1, 0]]])
    (image,) = imgs.mask_to_pil(mask)
    assert image.mode == "L" and np.asarray(image).tolist() == [[0, 255], [255, 0]]


def test_api_inputs_become_rgb_and_sizes_round_to_the_nearest_multiple():
    p = photo((70, 50))
    array = np.asarray(p)
    for image in (p, array, array.astype(np.float32) / 255, torch.from_numpy(array).permute(2, 0, 1) / 255.0):
        out = imgs.load_rgb(image)
        assert out.mode == "RGB" and out.size == (70, 50) and np.array_equal(np.asarray(out), array)
    assert imgs.working_size((70, 50), 8) == (72, 48) and imgs.working_size((3, 64), 8) == (8, 64)
    assert imgs.fit_to_multiple(p, 8).size == (72, 48)
    same = photo((64, 48))
    assert imgs.fit_to_multiple(same, 8) is same
    with pytest.raises(TypeError):
        imgs.load_rgb(3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        imgs.load_rgb(photo(mode="L"))


@pytest.mark.parametrize("size", [(64, 64), (50, 70), (13, 9), (200, 120)])
def test_a_written_mask_reads_back_as_the_same_latent_mask(size):
    working = imgs.working_size(size, 8)
    grid = np.random.default_rng(sum(size)).random((working[1] // 8, working[0] // 8)) > 0.5
    written = imgs.latent_mask_to_image(grid, size)
    assert written.size == size
    assert np.array_equal(imgs.latent_mask_from_image(written, working, 8), grid)


def test_api_images_take_uint8_0_255_or_floats_0_1_and_refuse_the_rest_by_name():
    array = np.asarray(photo((6, 4)))  # (4, 6, 3) uint8
    want = np.asarray(imgs.load_rgb(array))
    as_tensor = torch.from_numpy(array).permute(2, 0, 1)
    for same in (as_tensor, as_tensor.to(torch.int64), array.astype(np.int32), array / 255.0,
                 as_tensor.float() / 255, (as_tensor.float() / 255).to(torch.bfloat16).float()):
        assert np.array_equal(np.asarray(imgs.load_rgb(same)), want), type(same)
    # the bounds themselves are fine: 0 and 255, 0.0 and 1.0
    assert np.asarray(imgs.load_rgb(np.array([[0, 255]], np.uint8))).tolist() == [[[0] * 3, [255] * 3]]
    assert np.asarray(imgs.load_rgb(np.array([[0.0, 1.0]]))).tolist() == [[[0] * 3, [255] * 3]]
    refused = [
        (array.astype(np.float32), ValueError, r"image: float values must be in \[0, 1\], got \[4, 252\]"),
        (as_tensor.float() / 127.5 - 1, ValueError, r"got \[-0.968627, 0.976471\].*pass \(x \+ 1\) / 2"),
        (np.full((4, 6, 3), np.nan), ValueError, "float values must be in"),
        (array.astype(np.int32) * 300, ValueError, "integer values must be 0-255"),
        (np.zeros((4, 6, 3), np.int16) - 1, ValueError, r"integer values must be 0-255, got \[-1, -1\]"),
        (array > 0, ValueError, "dtype bool"),
        (np.zeros((4, 6, 4), np.uint8), ValueError, r"\(H, W, 3\)"),
        (np.zeros((0, 6, 3), np.uint8), ValueError, "H, W >= 1"),
        (torch.zeros(2, 3, 4, 6), ValueError, r"image: a tensor must be \(3, H, W\)"),
        ([array], TypeError, "image: expected a path"),
    ]
    for image, error, message in refused:
        with pytest.raises(error, match=message):
            imgs.load_rgb(image)


def test_a_pixel_mask_goes_on_the_latent_grid_by_half_or_any_of_each_cells_pixels():
    mask = np.zeros((8, 8), bool)  # a 2x2 grid of 4x4 cells
    mask[0, 0] = True  # 1 of 16 pixels of the top-left cell
    mask[0:4, 4:6] = True  # 8 of 16 of the top-right: exactly half
    mask[4:8, 4:7] = True  # 12 of 16 of the bottom-right
    picture = imgs.load_mask(mask, (8, 8))
    assert imgs.latent_mask_from_image(picture, (8, 8), 4).tolist() == [[False, True], [False, True]]
    assert imgs.latent_mask_from_image(picture, (8, 8), 4, rule="any").tolist() == [[True, True], [False, True]]
    with pytest.raises(ValueError, match="rule: expected one of"):
        imgs.latent_mask_from_image(picture, (8, 8), 4, rule="most")


def test_api_masks_take_bools_0_1_or_0_255_at_the_images_size_and_refuse_the_rest():
    want = np.zeros((4, 6), bool)
    want[1:3, 2:5] = True
    for given in (want, want.astype(np.uint8), want.astype(np.uint8) * 255, torch.from_numpy(want),
                  PIL.Image.fromarray(want.astype(np.uint8) * 255)):
        assert np.array_equal(np.asarray(imgs.load_mask(given, (6, 4))) > 0, want), type(given)
    for given, error, message in [(want, ValueError, "mask: 6x4 but the image is 4x6"),
                                  (want[None], ValueError, r"mask: an array must be \(H, W\)"),
                                  (want * 300.0, ValueError, r"mask: float values must be in \[0, 1\]"),
                                  (want * np.nan, ValueError, r"mask: float values must be in \[0, 1\], got NaN or inf$"),
                                  (want.astype(np.int32) - 1, ValueError, "mask: integer values must be"),
                                  (want.astype(np.int32) * 70000, ValueError, "mask: integer values must be"),
                                  (want.astype(str), ValueError, "mask: expected bools"),
                                  ([want], TypeError, "mask: expected a path")]:
        with pytest.raises(error, match=message):
            imgs.load_mask(given, (4, 6) if "6x4" in message else (6, 4))


def test_a_mask_means_the_same_region_in_every_form_it_comes_in(tmp_path):
    """One rule for arrays, tensors, PIL images and files: a 0/1 mask is 0/1 whether it is an array, a PIL image
    or a PNG (a PIL image of 0/1 was read as 8-bit, all black: an empty mask, silently); 8-bit values count from
    128, 16-bit ones from 32768, floats from 0.5, whatever else the mask holds; transparent pixels are not edited."""
    want = np.zeros((4, 6), bool)
    want[1:3, 2:5] = True
    zero_one = want.astype(np.uint8)
    PIL.Image.fromarray(zero_one).save(tmp_path / "m01.png")
    for given in (zero_one, PIL.Image.fromarray(zero_one), tmp_path / "m01.png", str(tmp_path / "m01.png")):
        assert np.array_equal(np.asarray(imgs.load_mask(given, (6, 4))) > 0, want), given
    grey = np.where(want, 128, 127).astype(np.uint8)
    grey[0, 0] = 1  # a 1 among 8-bit values is dark grey, not "edit"
    assert np.array_equal(np.asarray(imgs.load_mask(grey, (6, 4))) > 0, want)
    assert np.array_equal(np.asarray(imgs.load_mask(PIL.Image.fromarray(grey), (6, 4))) > 0, want)
    floats = np.where(want, 0.5, 0.49).astype(np.float32)
    for given in (floats, torch.from_numpy(floats), torch.from_numpy(floats).bfloat16(), PIL.Image.fromarray(floats, "F")):
        assert np.array_equal(np.asarray(imgs.load_mask(given, (6, 4))) > 0, want), type(given)
    wide = np.where(want, 32768, 32767).astype(np.uint16)
    PIL.Image.fromarray(wide).save(tmp_path / "m16.png")
    assert np.array_equal(np.asarray(imgs.load_mask(tmp_path / "m16.png", (6, 4))) > 0, want)
    # a 16-bit picture is 0-65535 however dark: one whose brightest pixel is 255 is all black, not 8-bit white
    # (it was read by its values, as 0-255: the dark region became the edit)
    dark = np.where(want, 255, 0).astype(np.uint16)
    PIL.Image.fromarray(dark).save(tmp_path / "dark16.png")
    for given in (PIL.Image.fromarray(dark), tmp_path / "dark16.png"):
        assert not np.asarray(imgs.load_mask(given, (6, 4))).any(), given
    assert np.array_equal(np.asarray(imgs.load_mask(dark, (6, 4))) > 0, want)  # an array says no depth: 0-255
    PIL.Image.fromarray(zero_one.astype(np.uint16)).save(tmp_path / "m01_16.png")  # 0/1 in 16 bits is still 0/1
    assert np.array_equal(np.asarray(imgs.load_mask(tmp_path / "m01_16.png", (6, 4))) > 0, want)
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere...
    rgba[..., 3] = want * 255  # ...but opaque only inside the region
    PIL.Image.fromarray(rgba, "RGBA").save(tmp_path / "stroke.png")
    for given in (PIL.Image.fromarray(rgba, "RGBA"), tmp_path / "stroke.png"):
        assert np.array_equal(np.asarray(imgs.load_mask(given, (6, 4))) > 0, want), given


def test_facade_pixels_that_diffusers_turns_into_garbage_are_refused_by_name_before_work():
    """diffusers' processor computes on anything: 0-255 floats became values up to 509 and NaN stayed NaN, silently
    (the VAE encoded them); greyscale, RGBA and channel-last arrays, and pictures smaller than the VAE factor, failed
    deep in the VAE or in a resize. Each is now a ValueError naming `image` and the fix."""
    proc = processor()
    rgb255 = np.full((16, 16, 3), 200.0, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert proc.preprocess(rgb255).max() > 1  # what diffusers does with it
    for image, message in [(rgb255, r"values in \[200, 200\]: give floats in \[0, 1\].*divide by 255"),
                           (torch.full((3, 16, 16), -2.0), r"values in \[-2, -2\]"),
                           (np.full((16, 16, 3), np.nan, np.float32), "NaN or infinite"),
                           (np.ones((16, 16, 3), bool), "expected floats in"),
                           (np.full((16, 16), 0.5, np.float32), r"an array of pixels must be \(H, W, 3\).*\(16, 16\)"),
                           (np.full((16, 16, 4), 0.5, np.float32), r"got shape \(16, 16, 4\)"),
                           (torch.full((16, 16, 3), 0.5), r"a tensor of pixels must be \(3, H, W\).*\(16, 16, 3\)"),
                           (torch.full((16, 16), 0.5), r"a tensor of pixels"),
                           (np.full((4, 4, 3), 0.5, np.float32), "4x4 is smaller than the VAE factor 8")]:
        with pytest.raises(ValueError, match=message):
            imgs.to_tensor(image, 8)
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(imgs.to_tensor(x, 8), proc.preprocess(x))  # [0, 1] pixels: diffusers' numbers


def test_facade_16_bit_and_float_pil_images_are_read_by_their_range_not_clipped():
    """Pillow's convert("RGB") clips 16-bit samples to 255 (a mid-grey 30000 became white) and truncates float ones
    (0.5 became black)."""
    mid16 = PIL.Image.fromarray(np.full((16, 16), 257 * 128, np.uint16))
    half = PIL.Image.fromarray(np.full((16, 16), 0.5, np.float32))
    for picture in (mid16, half):
        assert abs(float(imgs.to_tensor(picture, 8).mean())) < 0.01  # mid-grey is 0 in [-1, 1]

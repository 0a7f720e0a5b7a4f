"""The pictures that show an edit: heat map colours and scale, mask overlay, compare strip layout and enlargement."""

import numpy as np
import pytest
from PIL import Image

from diffedit.figures import colorize, compare_strip, display_scale, heat_map, mask_overlay, strip


def box_mask(size, box):
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def test_colorize_runs_dark_to_light_monotonically_and_clips():
    rgb = colorize(np.linspace(-0.5, 1.5, 201)).astype(int)
    luminance = rgb @ np.array([299, 587, 114])
    assert (np.diff(luminance) >= 0).all()
    assert tuple(rgb[0]) == (0, 0, 4) and tuple(rgb[-1]) == (252, 255, 164)
    assert tuple(colorize(np.array([np.nan]))[0]) == (0, 0, 4)


def test_heat_map_blocks_each_latent_cell_and_scales_by_vmax():
    values = np.array([[0.0, 1.0], [0.5, 0.25]])
    img = np.asarray(heat_map(values, (16, 16)))
    assert img.shape == (16, 16, 3)
    assert (img[:8, :8] == img[0, 0]).all() and (img[:8, 8:] == img[0, 8]).all()  # nearest: one block per cell
    assert tuple(img[0, 8]) == (252, 255, 164)  # the maximum maps to the top colour
    half = np.asarray(heat_map(values, (2, 2), vmax=2.0))
    # 1 / vmax 2 = 0.5: halfway between anchors 3 and 4 of 0..7, (159, 42, 99) and (212, 72, 66): (185.5, 57, 82.5),
    # rounded half to even
    assert tuple(half[0, 1]) == (186, 57, 82)
    assert np.asarray(heat_map(np.zeros((3, 3)), (3, 3))).max() <= 4  # a flat zero map is all dark
    with pytest.raises(ValueError, match="2-D"):
        heat_map(np.zeros((1, 2, 2)), (2, 2))


def test_mask_overlay_fades_what_is_outside_the_region_and_outlines_it():
    """The region keeps its pixels (a tint in a colour like the object's hid it) and the rest fades towards white."""
    image = Image.new("RGB", (32, 32), (40, 120, 200))
    out = np.asarray(mask_overlay(image, box_mask((32, 32), (8, 8, 24, 24))))
    faded = np.round(0.4 * np.array([40, 120, 200]) + 0.6 * 255)
    assert (out[:8] == faded).all() and (out[:, 24:] == faded).all()  # outside faded
    assert (out[12:20, 12:20] == (40, 120, 200)).all()  # inside as it was
    assert tuple(out[8, 16]) == (20, 20, 20) and tuple(out[12, 12]) != (20, 20, 20)  # border, not interior


def test_display_scale_enlarges_by_whole_factors_and_shrinks_large_images():
    assert display_scale(64) == 4.0 and display_scale(100) == 3.0
    assert display_scale(512) == 1.0
    assert display_scale(1536) == 0.5


def test_strip_places_labelled_panels_side_by_side():
    a, b = Image.new("RGB", (20, 10), (255, 0, 0)), Image.new("RGB", (20, 10), (0, 0, 255))
    sheet = strip([("a", a), ("b", b)], gap=4, font_size=10)
    arr = np.asarray(sheet)
    assert sheet.size == (2 * 20 + 3 * 4, 10 + 18 + 2 * 4)
    assert tuple(arr[-5, 4]) == (255, 0, 0) and tuple(arr[-5, 4 + 24]) == (0, 0, 255)
    with pytest.raises(ValueError, match="differ in size"):
        strip([("a", a), ("c", Image.new("RGB", (5, 5)))])


def test_compare_strip_enlarges_small_images_and_keeps_pixels_sharp():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 48, 3), dtype=np.uint8))
    result = Image.new("RGB", (48, 64), (0, 200, 0))
    mask = box_mask((48, 64), (0, 0, 24, 64))
    sheet = compare_strip(image, result, mask, guidance=np.random.default_rng(1).random((8, 6)))
    assert sheet.height >= 256 and sheet.width == 4 * 48 * 4 + 5 * 8  # factor 4 for a 64-pixel-high image
    arr = np.asarray(sheet)
    top = 8 + 22  # gap + label height of the default font size
    panel = arr[top:top + 256, 8:8 + 192]
    assert (panel[:4, :4] == panel[0, 0]).all()  # each input pixel became a 4x4 block
    assert (panel == np.asarray(image.resize((192, 256), Image.Resampling.NEAREST))).all()
    # A given mask (no guidance map) is shown as the mask itself
    given = compare_strip(image, result, mask, guidance=None)
    assert given.size == sheet.size


def test_compare_strip_heads_the_panels_with_the_whole_edit_texts():
    """The result panel's label cut a long target with an ellipsis ("a blue circle on a gray backgrou..."); the
    texts now go above the panels, wrapped over as many lines as they need."""
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    mask = box_mask((64, 64), (0, 0, 32, 64))
    bare = compare_strip(image, image, mask)
    short = compare_strip(image, image, mask, target="a blue circle", source="a red circle")
    long = compare_strip(image, image, mask, target="a blue circle " * 30, source="a red circle")
    assert bare.width == short.width == long.width
    assert bare.height < short.height < long.height  # one line of text, then several
    assert (np.asarray(short)[: short.height - bare.height] < 100).any()  # text drawn above the panels


def test_the_examples_title_is_wrapped_to_the_sheets_width_with_nothing_cut():
    from PIL import ImageDraw

    from diffedit.figures import _font, titled_to_fit, wrapped

    title = "diffedit: the input, then one column per setting (inpaint_strength, mask_thresholding_ratio)"
    sheet = titled_to_fit(Image.new("RGB", (272, 100), "white"), title)
    font, measure = _font(14), ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = wrapped(title, lambda line: measure.textlength(line, font=font) <= 272 - 16)
    assert len(lines) == 3 and " ".join(lines) == title  # every word, whole, over three lines
    assert sheet.size == (272, 100 + 3 * 18 + 16)
    assert wrapped("abcdefgh", lambda line: len(line) <= 3) == ["abc", "def", "gh"]  # a word too long
    wide = titled_to_fit(Image.new("RGB", (2000, 100), "white"), title)
    assert wide.size == (2000, 100 + 18 + 16)  # one line

"""The shapes world: determinism from a seed, exact masks, the rendering spec, and a classifier that is perfect on
ground-truth renders."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from diffedit import shapes

torch.set_num_threads(1)


def test_same_seed_gives_same_scenes_and_pixels():
    a = shapes.sample_scenes(np.random.default_rng(7), 20)
    b = shapes.sample_scenes(np.random.default_rng(7), 20)
    assert a == b
    for sa, sb in zip(a, b):
        ia, ma = shapes.render(sa)
        ib, mb = shapes.render(sb)
        assert np.array_equal(ia, ib) and np.array_equal(ma, mb)


def test_different_seeds_give_different_scenes():
    assert shapes.sample_scenes(np.random.default_rng(1), 20) != shapes.sample_scenes(np.random.default_rng(2), 20)


def test_batch_rendering_equals_one_by_one_rendering():
    arrays = shapes.sample_arrays(np.random.default_rng(3), 40)
    images, masks = shapes.render_batch(arrays)
    assert images.dtype == torch.uint8 and images.shape == (40, 3, 64, 64) and masks.shape == (40, 64, 64)
    for i, scene in enumerate(shapes.scenes_from_arrays(arrays)):
        image, mask = shapes.render(scene)
        assert np.array_equal(images[i].permute(1, 2, 0).numpy(), image)
        assert np.array_equal(masks[i].numpy(), mask)


def test_arrays_and_scenes_round_trip():
    arrays = shapes.sample_arrays(np.random.default_rng(4), 30)
    back = shapes.arrays_from_scenes(shapes.scenes_from_arrays(arrays))
    for key, value in arrays.items():
        np.testing.assert_array_equal(back[key], value)


def test_mask_matches_render_exactly():
    """Mask pixels hold exactly the object colour; every other pixel is the scene's background."""
    for scene in shapes.sample_scenes(np.random.default_rng(5), 60):
        image, mask = shapes.render(scene)
        background = shapes.render_background(scene)
        assert (image[mask] == shapes.COLOURS[scene.colour]).all()
        assert np.array_equal(image[~mask], background[~mask])


@pytest.mark.parametrize("shape", shapes.SHAPES)
@pytest.mark.parametrize("size", [14, 21, 30])
def test_masks_have_the_shapes_area_and_extent(shape, size):
    scene = shapes.Scene("red", shape, "gray", size, 64 - size, 0)  # flush with the top-right corner
    mask = shapes.mask(scene)
    rows, cols = np.nonzero(mask)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    area = {"circle": math.pi * size**2 / 4, "square": size**2, "triangle": math.sqrt(3) / 4 * size**2}[shape]
    assert abs(mask.sum() - area) <= 1.5 * size  # at most about one boundary pixel row off
    assert width in (size, size - 1) if shape != "square" else width == size
    expected_height = size * math.sqrt(3) / 2 if shape == "triangle" else size
    assert abs(height - expected_height) < 1.5  # a triangle's tip row can hold no pixel centre
    assert cols.max() <= 63 and rows.min() >= 0  # fully inside


def test_random_scenes_keep_the_object_inside_and_valid_parameters():
    arrays = shapes.sample_arrays(np.random.default_rng(6), 2000)
    assert arrays["size"].min() == 14 and arrays["size"].max() == 30
    assert (arrays["x"] + arrays["size"] <= 64).all() and (arrays["y"] + arrays["size"] <= 64).all()
    assert (arrays["x"] >= 0).all() and (arrays["y"] >= 0).all()
    grad, stripes = arrays["style"] == 1, arrays["style"] == 2
    assert (arrays["amplitude"][grad] <= 30).all() and (arrays["amplitude"][stripes] <= 12).all()
    assert (arrays["amplitude"][arrays["style"] == 0] == 0).all()
    for key, n in (("colour", 6), ("shape", 3), ("background", 4), ("style", 3)):
        assert set(arrays[key]) == set(range(n))


def test_background_styles_have_the_specified_ranges():
    base = shapes.Scene("red", "square", "gray", 14, 0, 0)
    gradient = shapes.render_background(replace(base, style="gradient", amplitude=30.0, angle=0.7)).astype(int)
    assert gradient.max() - 128 in (29, 30) and 128 - gradient.min() in (29, 30)
    assert (gradient[..., 0] == gradient[..., 1]).all()  # a brightness offset, the same on every channel
    stripes = shapes.render_background(replace(base, style="stripes", amplitude=12.0, angle=0.0, phase=0.3))
    row = stripes[0, :, 0].astype(int)
    assert row.max() - 128 <= 12 and 128 - row.min() <= 12
    assert np.array_equal(row[:48], row[16:])  # period 16 px along the stripe normal
    assert (stripes == stripes[:1]).all()  # angle 0: constant down each column


def test_captions_follow_the_template_and_indices():
    scene = shapes.Scene("purple", "triangle", "pink", 20, 3, 4)
    assert scene.caption == "a purple triangle on a pink background"
    captions = shapes.all_captions()
    assert len(captions) == len(set(captions)) == 72
    arrays = shapes.sample_arrays(np.random.default_rng(8), 50)
    for i, s in zip(shapes.caption_indices(arrays), shapes.scenes_from_arrays(arrays)):
        assert captions[i] == s.caption


def test_invalid_scenes_are_rejected():
    with pytest.raises(ValueError):
        shapes.Scene("red", "circle", "gray", 30, 40, 0)  # sticks out of the image
    with pytest.raises(ValueError):
        shapes.Scene("teal", "circle", "gray", 20, 0, 0)
    with pytest.raises(ValueError):
        shapes.Scene("red", "circle", "gray", 13, 0, 0)


def test_edits_alternate_kinds_and_change_one_attribute():
    edits = shapes.sample_edits(np.random.default_rng(9), 20)
    assert [e.kind for e in edits] == ["colour", "shape"] * 10
    for e in edits:
        changed = {k for k in ("colour", "shape", "background", "size", "x", "y", "style")
                   if getattr(e.source, k) != getattr(e.target, k)}
        assert changed == {e.kind}
        differ = (shapes.render(e.source)[0] != shapes.render(e.target)[0]).any(-1)
        assert not (differ & ~e.region).any()  # every pixel the edit changes is in its region
        if e.kind == "colour":  # the same object in another palette colour: the region is exactly what changed
            assert np.array_equal(e.region, differ)


def test_an_edit_region_holds_the_pixels_of_either_object():
    """A 14-px circle lies inside the 14-px square at the same place: a shape edit between them, either way, has the
    square's 14 x 14 block (196 pixels) as its region, not the circle's 156; a colour edit keeps the one block."""
    circle = shapes.Scene("red", "circle", "gray", 14, 10, 20)  # x 10, y 20: rows 20-33, columns 10-23
    square = circle.replace(shape="square")
    block = np.zeros((64, 64), bool)
    block[20:34, 10:24] = True
    for source, target in ((circle, square), (square, circle)):
        assert np.array_equal(shapes.Edit("shape", source, target).region, block), (source.shape, target.shape)
    assert np.array_equal(shapes.Edit("colour", square, square.replace(colour="blue")).region, block)


def _all_combinations():
    rng = np.random.default_rng(10)
    for colour in shapes.COLOURS:
        for shape in shapes.SHAPES:
            for background in shapes.BACKGROUNDS:
                for style, amplitude in (("plain", 0.0), ("gradient", 30.0), ("stripes", 12.0)):
                    size = int(rng.choice([14, 30]))
                    x, y = (int(v) for v in rng.integers(0, 64 - size + 1, 2))
                    yield shapes.Scene(colour, shape, background, size, x, y, style, amplitude,
                                       float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0, 2 * math.pi)))


def test_classifier_is_perfect_on_every_colour_shape_background_and_style():
    for scene in _all_combinations():  # 6 x 3 x 4 x 3 = 216 scenes at the extreme sizes
        image, mask = shapes.render(scene)
        for background in (shapes.render_background(scene), None):  # given, or estimated from the border
            c = shapes.classify(image, background)
            assert (c.colour, c.shape) == (scene.colour, scene.shape), (scene, c.fill_ratio)
            assert np.array_equal(c.mask, mask)


def test_classifier_is_perfect_on_random_scenes():
    for scene in shapes.sample_scenes(np.random.default_rng(11), 150):
        c = shapes.classify(shapes.render(scene)[0], shapes.render_background(scene))
        assert (c.colour, c.shape) == (scene.colour, scene.shape)


def test_classifier_finds_nothing_on_an_empty_background():
    scene = shapes.Scene("red", "circle", "pink", 20, 10, 10, "stripes", 12.0, 1.0, 0.5)
    c = shapes.classify(shapes.render_background(scene), shapes.render_background(scene))
    assert c.colour is None and c.shape is None and not c.mask.any()


def test_classifier_ignores_specks_away_from_the_object():
    scene = shapes.Scene("blue", "triangle", "white", 24, 30, 30)
    image, _ = shapes.render(scene)
    image = image.copy()
    image[2:4, 2:4] = shapes.COLOURS["red"]  # a 2x2 speck of another palette colour
    c = shapes.classify(image, shapes.render_background(scene))
    assert (c.colour, c.shape) == ("blue", "triangle")


def test_rendering_on_another_device_matches_cpu_when_available():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    arrays = shapes.sample_arrays(np.random.default_rng(12), 64)
    cpu_images, cpu_masks = shapes.render_batch(arrays)
    gpu_images, gpu_masks = shapes.render_batch(arrays, "cuda")
    assert (gpu_masks.cpu() != cpu_masks).sum() <= 2  # float64 geometry: at most a boundary pixel or two
    assert (gpu_images.cpu().int() - cpu_images.int()).abs().le(1).float().mean() > 0.999


def _red_block(removed: int, size: int = 10) -> np.ndarray:
    """A red size x size block on white with `removed` pixels punched out of its inside (its extent unchanged)."""
    image = np.full((32, 32, 3), 255, np.uint8)
    block = np.ones((size, size), bool)
    inside = [(r, c) for r in range(1, size - 1) for c in range(1, size - 1)]
    for r, c in inside[:removed]:
        block[r, c] = False
    image[5 : 5 + size, 5 : 5 + size][block] = shapes.COLOURS["red"]
    return image


@pytest.mark.parametrize("removed, shape", [
    (0, "square"), (10, "square"),  # fill 0.90: above the square / circle midpoint (1 + pi/4) / 2 = 0.8927
    (11, "circle"),  # 0.89: below it
    (35, "circle"),  # 0.65: above the circle / triangle midpoint (pi/4 + 1/2) / 2 = 0.6427
    (36, "triangle"),  # 0.64: below it
])
def test_the_judge_cuts_fill_ratios_at_the_midpoints_between_shapes(removed, shape):
    """Hand-built objects on either side of each class boundary; the fill ratio is the object's pixels over its
    bounding box's, extents counted inclusively (a 10 x 10 box holds 100 pixels)."""
    white = np.full((32, 32, 3), 255, np.uint8)
    found = shapes.classify(_red_block(removed), white)
    assert found.fill_ratio == (100 - removed) / 100
    assert (found.shape, found.colour) == (shape, "red")


def test_four_object_pixels_are_an_object_and_three_are_none():
    white = np.full((32, 32, 3), 255, np.uint8)
    for n, expected in ((3, None), (4, "square")):
        image = white.copy()
        image[10, 10 : 10 + n] = shapes.COLOURS["red"]  # a 1 x n bar: fill 1
        assert shapes.classify(image, white).shape == expected


def test_the_background_estimate_is_the_per_channel_median_of_the_outermost_rows_and_columns():
    """A 5x5 picture built so that the median sits between two values (7 of 10, 3 of 15, 7 of 20, 3 of 30 over the
    20 border entries, corners in both their row and column): 17.5, plus 100 per channel. Any other row or column
    read in place of the border (the inner ring holds 50 and 0), or a median over the channels, moves it."""
    level = np.array([[10, 10, 10, 10, 10],
                      [30, 50, 50, 50, 15],
                      [30, 0, 0, 0, 15],
                      [30, 50, 50, 50, 15],
                      [20, 20, 20, 20, 20]])
    image = np.stack([level + 100 * c for c in range(3)], axis=-1).astype(np.uint8)  # (5, 5, 3)
    got = shapes.estimate_background(image)
    assert got.shape == (5, 5, 3)
    assert (got == np.array([17.5, 117.5, 217.5])).all()

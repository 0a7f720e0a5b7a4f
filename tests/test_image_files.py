"""Reading any image Pillow opens as the 8-bit RGB picture a person sees."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import PIL.Image
from PIL import Image

from diffedit.image_files import ImageFileError, read_image, to_rgb
from diffedit.image_tensors import load_rgb


def shape_image(size=(64, 64)):
    img = np.full((size[1], size[0], 3), 128, np.uint8)
    img[size[1] // 4: size[1] // 2, size[0] // 4: size[0] // 2] = (220, 30, 30)
    return Image.fromarray(img)


def test_every_image_mode_becomes_8_bit_rgb_with_a_note():
    base = shape_image()
    cases = {
        "RGBA": base.convert("RGBA"), "LA": base.convert("LA"), "P": base.convert("P"), "CMYK": base.convert("CMYK"),
        "L": base.convert("L"), "1": base.convert("1"), "I;16": Image.fromarray(np.full((4, 4), 65535, np.uint16)),
        "I": Image.fromarray(np.full((4, 4), 300, np.int32)), "F": Image.fromarray(np.full((4, 4), 0.5, np.float32)),
        "YCbCr": base.convert("YCbCr"), "P+transparency": base.convert("P"),
    }
    cases["P+transparency"].info["transparency"] = 0
    for mode, img in cases.items():
        report = []
        rgb = to_rgb(img, "x.png", report.append)
        assert rgb.mode == "RGB" and rgb.size == img.size, mode
        assert len(report) == 1, (mode, report)
    assert np.asarray(to_rgb(cases["I;16"], "x")).max() == 255  # 16-bit white stays white
    assert np.asarray(to_rgb(cases["F"], "x")).max() == 128  # float 0.5 is mid-grey
    report = []
    assert to_rgb(base, "x", report.append) is base and report == []


def test_wide_samples_are_read_by_their_format_s_range_and_never_clipped():
    """16-bit samples are 0-65535 whatever their largest value (one of 255 was read as 8-bit white); float samples
    must be in [0, 1] (values in [-1, 1] were clipped, larger ones divided by 65535, silently); 32-bit integers
    past 16 bits are refused."""
    i16 = Image.fromarray(np.full((2, 2), 257 * 100, np.uint16))
    assert np.asarray(to_rgb(i16, "x")).max() == 100
    dim = Image.fromarray(np.full((2, 2), 255, np.uint16))
    assert np.asarray(to_rgb(dim, "x")).max() == 1  # 255 of 65535, not white
    for samples, message in [(np.full((2, 2), -0.5, np.float32), r"values in \[-0.5, -0.5\]"),
                             (np.full((2, 2), 1020.0, np.float32), "must be in"),
                             (np.full((2, 2), np.nan, np.float32), "must be in"),
                             (np.full((2, 2), 70000, np.int32), "only 0-65535")]:
        with pytest.raises(ImageFileError, match=message):
            to_rgb(Image.fromarray(samples), "x")


def test_api_reads_transparent_and_animated_images_like_the_command_line(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert np.asarray(load_rgb(tmp_path / "clear.png")).min() == 255  # composited onto white, not black
    frames = [Image.new("RGB", (8, 8), c) for c in ((200, 0, 0), (0, 200, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    first = np.asarray(load_rgb(tmp_path / "anim.gif"))
    assert first[0, 0, 0] > 150 and first[0, 0, 1] < 50
    assert isinstance(load_rgb(PIL.Image.fromarray(rgba, "RGBA")), PIL.Image.Image)


def _png_16_bit_rgb(path: Path, width: int, height: int) -> None:
    """Pillow cannot write 16-bit RGB PNGs: the chunks by hand."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + np.full((width, 3), 40000, ">u2").tobytes()  # filter byte, then big-endian samples
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bits, colour type 2 (RGB)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * height))
                     + chunk(b"IEND", b""))


def test_16_bit_rgb_and_exif_turned_images_are_read_with_a_note(tmp_path):
    _png_16_bit_rgb(tmp_path / "rgb16.png", 6, 4)
    notes = []
    img = read_image(tmp_path / "rgb16.png", notes.append, 10**6)
    assert img.mode == "RGB" and img.size == (6, 4)
    assert notes == ["rgb16.png has 16 bits per channel: reduced to 8"]
    assert abs(int(np.asarray(img)[0, 0, 0]) - 40000 // 257) <= 1
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    shape_image((40, 24)).save(tmp_path / "turned.jpg", exif=exif.tobytes())
    notes = []
    assert read_image(tmp_path / "turned.jpg", notes.append, 10**6).size == (24, 40)
    assert notes == ["turned.jpg is turned as its EXIF orientation (6) says: 40x24 -> 24x40"]


def test_an_image_of_exactly_max_pixels_is_read_and_one_pixel_more_is_refused(tmp_path):
    import pytest

    from diffedit.image_files import ImageFileError, open_image

    path = tmp_path / "a.png"
    shape_image((50, 40)).save(path)  # 2,000 pixels
    assert open_image(path, max_pixels=2000).size == (50, 40)
    with pytest.raises(ImageFileError, match="over max_pixels 1999: downscale it"):
        open_image(path, max_pixels=1999)


def test_a_mask_with_an_exif_orientation_marks_the_region_a_viewer_shows_like_its_turned_image(tmp_path):
    """The image is turned by its EXIF orientation; a mask saved the same way (a camera's photo and the mask drawn
    over it in an editor that keeps the tag) was read unturned: a square one edited the wrong region, silently."""
    from diffedit.image_files import read_mask
    from diffedit.image_tensors import load_mask

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    stored = np.zeros((16, 16), np.uint8)
    stored[:, :8] = 255  # the left half as stored: the top half as displayed
    Image.fromarray(stored).save(tmp_path / "mask.png", exif=exif.tobytes())
    shown = np.zeros((16, 16), bool)
    shown[:8] = True
    for mask in (read_mask(tmp_path / "mask.png", (16, 16)), load_mask(tmp_path / "mask.png", (16, 16)),
                 load_mask(Image.open(tmp_path / "mask.png"), (16, 16))):
        assert np.array_equal(np.asarray(mask) > 0, shown)
    Image.fromarray(np.zeros((16, 24), np.uint8)).save(tmp_path / "wide.png", exif=exif.tobytes())
    assert read_mask(tmp_path / "wide.png", (16, 24)).size == (16, 24)  # 24x16 stored, 16x24 shown: the image's


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header says `width` x `height` (what Pillow checks before decoding), with no real pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 8))
                     + chunk(b"IEND", b""))


def test_our_pixel_limit_leaves_pillows_decompression_bomb_limit_as_it_was_and_that_limit_is_named(tmp_path,
                                                                                                     monkeypatch):
    """A read under max_pixels switched Pillow's process-wide bomb limit off for good (every later Pillow user in the
    process, the demo's server included, lost it); without max_pixels, a bomb was called "corrupt"."""
    from diffedit.image_files import open_image

    _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89478485)  # Pillow's default (another test may have changed it)
    with pytest.raises(ImageFileError, match="20000x20000 .* over --max-pixels 1000"):
        open_image(tmp_path / "bomb.png", max_pixels=1000, limit_name="--max-pixels")
    shape_image((8, 8)).save(tmp_path / "ok.png")
    open_image(tmp_path / "ok.png", max_pixels=1000)
    assert Image.MAX_IMAGE_PIXELS == 89478485
    with pytest.raises(ImageFileError, match="bomb.png is over Pillow's decompression-bomb limit of .*: downscale"):
        read_image(tmp_path / "bomb.png")
    with pytest.raises(ImageFileError, match="over Pillow's decompression-bomb limit"):
        load_rgb(tmp_path / "bomb.png")


def test_a_pil_image_that_cannot_be_decoded_is_a_value_error_naming_the_argument(tmp_path):
    """A truncated file the caller opened was Pillow's OSError, from the middle of `edit`."""
    from diffedit.image_tensors import load_mask

    noise = Image.effect_noise((64, 64), 60).convert("RGB")
    noise.save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"^image: the PIL image cannot be decoded \(image file is truncated\)"):
        load_rgb(Image.open(tmp_path / "cut.png"))
    with pytest.raises(ValueError, match=r"^mask: the PIL image cannot be decoded"):
        load_mask(Image.open(tmp_path / "cut.png"), (64, 64))
    closed = Image.open(tmp_path / "full.png")
    closed.close()
    with pytest.raises(ValueError, match=r"^image: the PIL image cannot be decoded \(Operation on closed image\)"):
        load_rgb(closed)


def test_a_colour_mask_file_is_read_by_brightness_with_a_note(tmp_path):
    """A colour picture given as the mask (arguments swapped, or a red stroke) was thresholded without a word; now
    the reader says so. A grey picture, even stored as RGB, gets no note."""
    from diffedit.image_files import read_mask

    red = Image.new("RGB", (8, 8), (0, 0, 0))
    red.paste((255, 0, 0), (0, 0, 4, 8))  # pure red: brightness 76, under 128
    red.save(tmp_path / "red.png")
    grey = Image.new("RGB", (8, 8), (0, 0, 0))
    grey.paste((200, 200, 200), (0, 0, 4, 8))
    grey.save(tmp_path / "grey.png")
    notes = []
    cells = np.asarray(read_mask(tmp_path / "red.png", (8, 8), note=notes.append))
    assert not cells.any() and len(notes) == 1 and "colour picture: read by its brightness" in notes[0]
    notes.clear()
    cells = np.asarray(read_mask(tmp_path / "grey.png", (8, 8), note=notes.append))
    assert cells[:, :4].all() and not cells[:, 4:].any() and notes == []

"""Reading any image Pillow opens as the 8-bit RGB picture a person sees."""

import numpy as np
import PIL.Image
from PIL import Image

from diffedit.images import load_rgb
from diffedit.reading import to_rgb


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


def test_api_reads_transparent_and_animated_images_like_the_command_line(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert np.asarray(load_rgb(tmp_path / "clear.png")).min() == 255  # composited onto white, not black
    frames = [Image.new("RGB", (8, 8), c) for c in ((200, 0, 0), (0, 200, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    first = np.asarray(load_rgb(tmp_path / "anim.gif"))
    assert first[0, 0, 0] > 150 and first[0, 0, 1] < 50
    assert isinstance(load_rgb(PIL.Image.fromarray(rgba, "RGBA")), PIL.Image.Image)

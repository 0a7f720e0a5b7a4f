"""`diffedit demo`: the page's work (`demo.Demo`) called directly, the Gradio API through `gradio_client` against a
server the test starts on a free localhost port, the page's own events (re-thresholding, uploads) through Gradio's
queue protocol as the page's JavaScript sends them (`Tab`), and the page itself in headless Chromium (Debian's,
driven by playwright; no browser download).

Every edit the demo returns is compared with a fresh `diffedit.edit` of the same settings, pixel for pixel, whatever
work it reused. The Gradio and browser tests skip with the reason when Gradio, gradio_client, playwright or chromium
is missing on a developer's machine; under CI (the CI environment variable set, as `.ci/run` sets it) they fail
instead, since `.ci/run` installs all of them.
"""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import re
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffedit import api, cli, demo, evaluate, shapes
from diffedit.console import BadInput
from diffedit.image_files import ImageFileError

torch.set_num_threads(1)

FAST = {"steps": 10, "num_maps": 2}
FAST_FIELDS = {"num_inference_steps": 10, "num_maps_per_mask": 2}
IMAGE, SOURCE, TARGET = demo.EXAMPLES[0]
IN_CI = bool(os.environ.get("CI"))  # as tests/test_tokenizer.py reads it
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False",
       "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}


def need(modules: tuple[str, ...], files: tuple[str, ...] = ()) -> None:
    """Skip (a developer's machine) or fail (CI) when a module or program the test needs is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None] + [f for f in files if not Path(f).exists()]
    if missing:
        reason = f"needs {', '.join(missing)} (pip install -e \".[test]\"; apt-get install chromium)"
        if IN_CI:
            pytest.fail(reason + " under CI")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def app():
    return demo.Demo.load(device="cpu", dtype="float32")


def same_picture(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def assert_fresh(app, view: demo.EditView, image=IMAGE, source=SOURCE, target=TARGET, seed=0, **fields) -> None:
    """The view's picture and mask are exactly those of a fresh one-call edit with these settings."""
    result = api.edit(image, source, target, model=app.sd, seed=seed, **fields)
    assert same_picture(view.edited, result.image)
    assert same_picture(view.mask, result.mask)


# ---------------------------------------------------------------------------------------------------------------
# The page's work, called directly


@pytest.mark.parametrize("example", range(len(demo.EXAMPLES)))
def test_each_bundled_example_at_the_models_defaults_is_the_one_call_apis_edit(app, example):
    image, source, target = demo.EXAMPLES[example]
    view = app.edit(image, source, target)
    assert_fresh(app, view, image, source, target)
    assert 0 < view.coverage < 0.5 and view.notes == ()
    assert view.overlay.size == view.heat.size == (256, 256)  # 64x64 shown 4x


def test_the_settings_default_to_the_models_stored_defaults(app):
    stored = cli.local_edit_defaults(str(demo.SHIPPED_MODEL))
    d = app.defaults()
    assert d == {"strength": stored["inpaint_strength"], "threshold_ratio": stored["mask_thresholding_ratio"],
                 "threshold_rule": "ratio", "num_maps": stored["num_maps_per_mask"],
                 "mask_strength": stored["mask_encode_strength"], "guidance": stored["guidance_scale"],
                 "mask_guidance": stored["mask_guidance_scale"], "steps": stored["num_inference_steps"], "seed": 0}


def test_a_decoding_only_change_reuses_the_map_and_the_inversion_and_equals_a_fresh_edit(app):
    app.edit(IMAGE, SOURCE, TARGET, **FAST)
    view = app.edit(IMAGE, SOURCE, TARGET, **FAST, guidance=3.0, mask_guidance=5.0)
    assert view.reused == ("difference map", "inversion")
    assert view.timings["mask"] < 0.05 and view.timings["inversion"] < 0.05
    assert "reused difference map and inversion" in view.report()
    assert_fresh(app, view, **FAST_FIELDS, guidance_scale=3.0, mask_guidance_scale=5.0)


def test_a_thresholding_only_change_reuses_the_map_and_the_inversion_and_equals_a_fresh_edit(app):
    app.edit(IMAGE, SOURCE, TARGET, **FAST)
    view = app.edit(IMAGE, SOURCE, TARGET, **FAST, threshold_ratio=2.0, threshold_rule="otsu")
    assert view.reused == ("difference map", "inversion")
    assert_fresh(app, view, **FAST_FIELDS, mask_thresholding_ratio=2.0, mask_threshold_rule="otsu")


def test_a_smaller_encoding_ratio_is_cut_from_the_deeper_inversion_exactly(app):
    app.edit(IMAGE, SOURCE, TARGET, **FAST, strength=0.9)
    view = app.edit(IMAGE, SOURCE, TARGET, **FAST, strength=0.4)
    assert view.reused == ("difference map", "inversion")
    assert_fresh(app, view, **FAST_FIELDS, inpaint_strength=0.4)


def test_a_mask_strength_change_reruns_the_map_only_and_a_new_seed_reruns_everything(app):
    app.edit(IMAGE, SOURCE, TARGET, **FAST)
    view = app.edit(IMAGE, SOURCE, TARGET, **FAST, mask_strength=0.4)
    assert view.reused == ("inversion",)  # the same draws: the generator leaves the mask step where it did
    assert_fresh(app, view, **FAST_FIELDS, mask_encode_strength=0.4)
    view = app.edit(IMAGE, SOURCE, TARGET, **FAST, seed=7)
    assert view.reused == () and "nothing reused" in view.report()
    assert_fresh(app, view, seed=7, **FAST_FIELDS)


def test_guidance_alone_sets_the_mask_and_the_decoding_as_the_command_lines_flag_does(app):
    view = app.edit(IMAGE, SOURCE, TARGET, **FAST, guidance=3.0)
    assert_fresh(app, view, **FAST_FIELDS, guidance_scale=3.0, mask_guidance_scale=3.0)


def test_the_remembered_work_is_one_images_and_bounded(app):
    cheap = {"steps": 10, "num_maps": 1}
    app.edit(IMAGE, SOURCE, TARGET, **cheap)
    other, source, target = demo.EXAMPLES[1]
    app.edit(other, source, target, **cheap)
    key = app._steps_key
    for strength in (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.8, 0.9):  # 8 more maps (0.6 is the default), one inversion
        view = app.edit(other, source, target, **cheap, mask_strength=strength)
        assert view.reused == ("inversion",)  # the most recently used: never the one forgotten
    assert app._steps_key == key and len(app.steps.done) == demo.REMEMBERED
    view = app.edit(IMAGE, SOURCE, TARGET, **cheap)  # another image: the first image's work was forgotten
    assert view.reused == () and app._steps_key != key


def test_rethresholding_cuts_the_remembered_map_without_the_model_as_an_edit_would(app, monkeypatch):
    view = app.edit(IMAGE, SOURCE, TARGET, **FAST)
    again = app.edit(IMAGE, SOURCE, TARGET, **FAST, threshold_ratio=1.5, threshold_rule="otsu")

    def no_model(*args, **kwargs):
        raise AssertionError("re-thresholding ran the model")

    monkeypatch.setattr(app.sd, "unet", no_model)
    monkeypatch.setattr(app.sd, "vae", no_model)
    overlay, heat, said = app.rethreshold(view.state, 1.5, "otsu")
    assert same_picture(overlay, again.overlay) and same_picture(heat, again.heat)
    assert "no model call" in said and "ratio 1.5, rule otsu" in said
    with pytest.raises(BadInput, match=r"^argument --threshold-ratio: expected a number > 0, got 0"):
        app.rethreshold(view.state, 0, "ratio")


def test_map_changes_names_each_input_the_remembered_map_was_not_computed_from(app):
    """Re-thresholding may cut a remembered map only for the picture, prompts, mask settings and seed it was
    computed from; the thresholding and the decoding's settings do not change the map."""
    view = app.edit(IMAGE, SOURCE, TARGET, **FAST)
    assert app.map_changes(view.state, IMAGE, SOURCE, TARGET, **FAST) == ()
    assert app.map_changes(view.state, Image.open(IMAGE), SOURCE, TARGET, **FAST) == ()  # the same pixels
    assert app.map_changes(view.state, IMAGE, SOURCE, TARGET, **FAST, threshold_ratio=3.0, threshold_rule="otsu",
                           strength=0.4, guidance=3.0, mask_guidance=app.defaults()["mask_guidance"]) == ()
    assert app.map_changes(view.state, IMAGE, SOURCE, TARGET, **FAST, guidance=3.0) == ("mask_guidance",)  # both
    other, source, target = demo.EXAMPLES[1]
    assert app.map_changes(view.state, other, SOURCE, TARGET, **FAST) == ("picture",)
    assert app.map_changes(view.state, other, source, target, **FAST) == ("picture", "source", "target")
    assert app.map_changes(view.state, IMAGE, SOURCE, TARGET, **FAST, seed=1) == ("seed",)
    assert app.map_changes(view.state, IMAGE, SOURCE, TARGET, steps=12, num_maps=2, mask_strength=0.4,
                           mask_guidance=3.0) == ("steps", "mask_strength", "mask_guidance")
    with pytest.raises(BadInput, match="^no image: upload one or pick an example$"):
        app.map_changes(view.state, None, SOURCE, TARGET, **FAST)


def test_an_upload_too_large_is_named_as_the_user_knows_it_with_a_size_to_resize_to(app, tmp_path):
    small = demo.Demo(app.sd, max_pixels=64 * 64 - 1)
    with pytest.raises(ImageFileError) as e:
        small.edit(demo.Upload(str(IMAGE), "circle.png"), SOURCE, TARGET)
    assert str(e.value) == ("the uploaded picture 'circle.png' is 64x64 (0.0 megapixels), over this server's limit of "
                            "4095 pixels: resize it to at most 63x63 pixels and upload it again")
    with pytest.raises(ImageFileError, match="^the uploaded picture is 64x64"):  # no name sent
        small.edit(demo.Upload(str(IMAGE)), SOURCE, TARGET)
    for w, h, limit, fits in ((2049, 2048, 2048 * 2048, "2048x2047"), (4000, 3000, 10**6, "1154x866"),
                              (5000, 10, 4999, "1580x3"), (3, 10**6, 10**4, "1x10000")):
        said = demo.too_large("it", w, h, limit)
        assert said.endswith(f"resize it to at most {fits} pixels and upload it again"), said
        tw, th = map(int, fits.split("x"))
        assert tw * th <= limit and tw <= w and th <= h


def test_reading_an_upload_leaves_pillows_process_wide_bomb_limit_as_it_was(app):
    """The upload probe turned Pillow's decompression-bomb limit off for the whole server process, for good."""
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    assert before is not None
    picture, _ = app.read_picture(demo.Upload(str(IMAGE), "circle.png"))
    assert picture.size == (64, 64) and Image.MAX_IMAGE_PIXELS == before


def test_a_pil_picture_is_turned_by_its_exif_orientation_as_a_file_is(app, tmp_path):
    """A PIL picture given to the demo's Python side was only converted to RGB: its EXIF orientation (and first
    frame) were not applied, unlike the same picture as a file, the command line and the API."""
    from PIL import Image

    wide = Image.new("RGB", (64, 32), (200, 30, 30))
    exif = wide.getexif()
    exif[0x0112] = 6  # turned 90 degrees: shown 32x64
    wide.save(tmp_path / "turned.jpg", exif=exif.tobytes())
    from_file, _ = app.read_picture(str(tmp_path / "turned.jpg"))
    from_pil, notes = app.read_picture(Image.open(tmp_path / "turned.jpg"))
    assert from_file.size == from_pil.size == (32, 64)
    assert any("EXIF orientation" in n for n in notes)


def test_a_numpy_array_or_torch_tensor_is_edited_as_the_one_call_api_edits_it(app):
    """`Demo.edit` promises `diffedit.edit`'s picture, which takes arrays and tensors; the demo failed on them with
    "The truth value of an array ... is ambiguous" (and a tensor with a path error)."""
    pixels = np.asarray(Image.open(IMAGE).convert("RGB")).copy()
    for image in (pixels, torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), pixels / 255):
        view = app.edit(image, SOURCE, TARGET, **FAST)
        assert_fresh(app, view, **FAST_FIELDS)
        assert app.map_changes(view.state, IMAGE, SOURCE, TARGET, **FAST) == ()
    with pytest.raises(TypeError, match="^image: expected a path, a PIL image, a numpy array or a torch tensor, got "
                                        "bytes$"):
        app.edit(IMAGE.read_bytes(), SOURCE, TARGET)
    with pytest.raises(BadInput, match=r"^the image is 64x64, over --max-pixels 4095: downscale it$"):
        demo.Demo(app.sd, max_pixels=64 * 64 - 1).edit(pixels, SOURCE, TARGET)


def test_an_upload_that_is_not_a_picture_or_corrupt_is_named_as_the_user_knows_it(app, tmp_path):
    text = tmp_path / "x1"
    text.write_text("not a picture")
    cut = tmp_path / "x2"
    cut.write_bytes(IMAGE.read_bytes()[:200])
    with pytest.raises(ImageFileError) as e:
        app.edit(demo.Upload(str(text), "notes.png"), SOURCE, TARGET)
    assert str(e.value) == ("the uploaded picture 'notes.png' is not an image (or not in a format Pillow reads): "
                            "upload the picture again, or another one (PNG, JPEG, WebP or any format Pillow reads)")
    with pytest.raises(ImageFileError) as e:
        app.edit(demo.Upload(str(cut), "cut.png"), SOURCE, TARGET)
    assert str(e.value).startswith("the uploaded picture 'cut.png' is truncated or corrupt (")
    assert str(e.value).endswith("): upload the picture again, or another one (PNG, JPEG, WebP or any format Pillow "
                                 "reads)") and str(tmp_path) not in str(e.value)


def test_edits_from_several_threads_run_one_at_a_time(app, monkeypatch):
    import threading

    from diffedit.demo import EditView

    running, most, views = [0], [0], []
    blank = Image.new("RGB", (4, 4))

    def slow_edit(*args):
        running[0] += 1
        most[0] = max(most[0], running[0])
        time.sleep(0.2)
        running[0] -= 1
        return EditView(blank, blank, blank, blank, {}, (), 0.0, (), None)

    monkeypatch.setattr(app, "_edit", slow_edit)
    threads = [threading.Thread(target=lambda: views.append(app.edit(IMAGE, SOURCE, TARGET))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and len(views) == 3  # one at a time, and every edit returned its view


def test_an_edits_notes_are_its_own_warnings_never_another_threads(app, monkeypatch):
    """The warnings machinery is the process's: a Gradio worker's pandas deprecation, raised while an edit ran,
    showed on the page as one of the edit's notes."""
    import threading
    import warnings

    from diffedit.demo import EditView

    blank = Image.new("RGB", (4, 4))

    def edit_beside_another_thread(*args):
        other = threading.Thread(target=lambda: warnings.warn("another thread's deprecation", FutureWarning))
        other.start()
        other.join()
        warnings.warn("the edit's own warning", UserWarning)
        return EditView(blank, blank, blank, blank, {}, (), 0.0, (), None)

    monkeypatch.setattr(app, "_edit", edit_beside_another_thread)
    with warnings.catch_warnings(record=True) as elsewhere:
        warnings.simplefilter("always")
        view = app.edit(IMAGE, SOURCE, TARGET)
    assert view.notes == ("the edit's own warning",)
    assert [str(w.message) for w in elsewhere] == ["another thread's deprecation"]  # shown as before, not lost


def cli_message(tmp_path, capsys, *flags: str) -> str:
    """What `diffedit edit` says about these flags (before any model work)."""
    assert cli.main(["edit", str(IMAGE), "--source", SOURCE, "--target", TARGET, "-o", str(tmp_path / "o.png"),
                     *flags]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("diffedit: error: ") and "\n" not in line
    return line.removeprefix("diffedit: error: ")


@pytest.mark.parametrize("name, value", [("strength", 1.5), ("strength", 0), ("strength", 0.01), ("steps", 0),
                                         ("steps", 2.5), ("threshold_ratio", 0), ("threshold_rule", "mean"),
                                         ("num_maps", 0), ("mask_strength", 1.01), ("guidance", -1), ("seed", -1),
                                         ("seed", 2**63)])
def test_a_bad_setting_gets_the_command_lines_message_before_any_work(app, tmp_path, capsys, monkeypatch, name,
                                                                         value):
    expected = cli_message(tmp_path, capsys, f"--{name.replace('_', '-')}={value}")
    monkeypatch.setattr(app.sd, "unet", None)  # any model work would fail otherwise
    with pytest.raises(BadInput) as e:
        app.edit(IMAGE, SOURCE, TARGET, **{name: value})
    assert str(e.value) == expected


def test_a_bad_mask_guidance_or_an_unknown_setting_is_refused_by_name(app):
    with pytest.raises(BadInput, match=r"^mask_guidance: expected a number >= 0, got -1$"):
        app.edit(IMAGE, SOURCE, TARGET, mask_guidance=-1)
    with pytest.raises(TypeError, match="unknown setting.*strenght.*valid names: strength"):
        app.edit(IMAGE, SOURCE, TARGET, strenght=0.5)
    with pytest.raises(BadInput, match="argument --strength: expected a number or a name, got list"):
        app.edit(IMAGE, SOURCE, TARGET, strength=[0.5])
    with pytest.raises(BadInput, match="^target: expected a prompt"):
        app.edit(IMAGE, SOURCE, None)


def test_images_over_max_pixels_and_bad_files_get_the_command_lines_messages(app, tmp_path, capsys):
    small = demo.Demo(app.sd, max_pixels=64 * 64 - 1)
    with pytest.raises(ImageFileError) as e:
        small.edit(IMAGE, SOURCE, TARGET)
    assert str(e.value) == cli_message(tmp_path, capsys, "--max-pixels", str(64 * 64 - 1))
    assert "over --max-pixels 4095" in str(e.value)
    assert demo.Demo(app.sd, max_pixels=64 * 64).edit(IMAGE, SOURCE, TARGET, **FAST).edited.size == (64, 64)
    with pytest.raises(BadInput, match=r"over --max-pixels 4095"):
        small.edit(Image.open(IMAGE), SOURCE, TARGET)
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(ImageFileError) as e:
        app.edit(str(text), SOURCE, TARGET)
    assert cli.main(["edit", str(text), "--source", SOURCE, "--target", TARGET, "-o", str(tmp_path / "o.png")]) == 2
    assert capsys.readouterr().err.strip() == f"diffedit: error: {e.value}"
    with pytest.raises(BadInput, match="^no image: upload one or pick an example$"):
        app.edit(None, SOURCE, TARGET)


def test_odd_but_valid_input_is_noted_as_the_command_line_notes_it(app):
    view = app.edit(IMAGE, SOURCE, SOURCE, **FAST)
    assert view.notes == (f"source and target say the same thing ({SOURCE!r}): nothing to edit, the mask is empty",)
    assert view.coverage == 0
    grey = Image.open(IMAGE).convert("L")
    view = app.edit(grey, SOURCE, TARGET, **FAST)
    assert view.notes[0] == "the image is greyscale: converted to RGB"


def test_a_held_out_shapes_edit_is_scored_against_its_ground_truth(app):
    for kind, index in (("colour", 0), ("shape", 1)):
        view = app.shapes_edit(3, kind)
        truth = evaluate.heldout_edits(2, seed=3)[index]
        assert view.edit == truth and view.edit.kind == kind
        source, region = shapes.render(truth.source)[0], truth.region
        assert np.array_equal(np.asarray(view.source), source) and np.array_equal(view.truth, region)
        result = api.edit(Image.fromarray(source), truth.source.caption, truth.target.caption, model=app.sd, seed=3)
        assert np.array_equal(view.estimated, np.asarray(result.mask) > 127)
        assert view.iou == evaluate.iou(view.estimated, region) and 0 < view.iou <= 1
        assert view.success == evaluate.judge(truth, np.asarray(result.image))[0]
        assert f"mask IoU {view.iou:.2f}" in view.report()
    with pytest.raises(BadInput, match="kind: expected colour or shape"):
        app.shapes_edit(3, "size")
    with pytest.raises(BadInput, match="edit number: expected an integer"):
        app.shapes_edit(-1)


# ---------------------------------------------------------------------------------------------------------------
# The command


def test_the_demo_command_serves_localhost_on_7860_and_never_shares_by_default():
    args = demo.parse_args([])
    assert (args.host, args.port, args.share, args.model, args.device) == ("127.0.0.1", 7860, False, None, "auto")
    assert demo.parse_args(["--share", "--port", "8000"]).share is True


@pytest.mark.parametrize("argv, message", [
    (["--port", "0"], "argument --port: expected an integer in [1, 65535], got 0"),
    (["--port", "65536"], "argument --port: expected an integer in [1, 65535], got 65536"),
    (["--max-pixels", "0"], "argument --max-pixels: expected an integer >= 1, got 0"),
    (["--model", "no/such/folder"], "model folder no/such/folder does not exist"),
    (["--device", "tpu"], "argument --device: invalid choice"),
])
def test_bad_demo_arguments_are_one_line_and_exit_2(capsys, argv, message):
    assert cli.main(["demo", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"diffedit: error: {message}") and err.count("\n") == 1


ANY_ADDRESS = "e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every network interface)"


@pytest.mark.parametrize("case", ["busy_port", "unknown_host", "not_this_machine", "empty_host"])
def test_a_busy_port_or_a_bad_host_is_refused_before_the_model_loads_and_nothing_says_serving(capsys, monkeypatch,
                                                                                            case):
    need(("gradio",))

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the address was checked")

    monkeypatch.setattr(demo.Demo, "load", no_load)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv, message = {
            "busy_port": (["--port", str(port)], rf"argument --port: port {port} on 127\.0\.0\.1 is in use \(another "
                                                 r"program listens there\): pass another --port, e\.g\. --port \d+ "
                                                 r"\(free now\)"),
            "unknown_host": (["--host", "no.such.host.invalid"], r"argument --host: 'no\.such\.host\.invalid' is not "
                             r"an address and no host of that name is known \(.+\): pass an address of this machine, "
                             + re.escape(ANY_ADDRESS)),
            "not_this_machine": (["--host", "192.0.2.1"], r"argument --host: 192\.0\.2\.1 is not an address of this "
                                 r"machine \(.+\): pass one of its addresses, " + re.escape(ANY_ADDRESS)),
            "empty_host": (["--host", ""], r"argument --host: expected an address or a host name, got '': pass one, "
                           + re.escape(ANY_ADDRESS)),
        }[case]
        assert cli.main(["demo", *argv, "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "serving" not in captured.err + captured.out
    assert re.fullmatch(f"diffedit: error: {message}\n", captured.err), captured.err


def test_serving_is_said_once_the_page_listens_and_never_when_it_failed_to_start(app, capsys, monkeypatch):
    need(("gradio",))
    import gradio

    monkeypatch.setattr(demo.Demo, "load", classmethod(lambda cls, *args: cls(app.sd)))
    port, seen = free_port(), {}

    def taken(*args, **kwargs):  # the port taken between the check and the start
        raise OSError("Cannot find empty port in range")

    with monkeypatch.context() as patch:
        patch.setattr(gradio.Blocks, "launch", taken)
        assert demo.main(["--port", str(port), "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"diffedit: error: cannot serve on 127.0.0.1:{port}: ")
    assert "serving" not in captured.err + captured.out and captured.err.count("\n") == 1

    def block_thread(page):  # where the command waits for Ctrl-C: look, then stop
        seen["said"] = capsys.readouterr().err
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # it listens
        page.close()

    monkeypatch.setattr(gradio.Blocks, "block_thread", block_thread)
    assert demo.main(["--port", str(port), "--device", "cpu"]) == 0
    assert seen["said"] == f"diffedit demo: shapes-sd on cpu, serving http://127.0.0.1:{port}/ (Ctrl-C stops it)\n"


def test_an_ipv6_host_without_brackets_is_served_not_refused_after_the_model_loaded(app, capsys, monkeypatch):
    """--host ::1 passed the address check, then Gradio put it in a URL unbracketed: "InvalidURL: Invalid port"
    once the model had loaded."""
    need(("gradio",))
    import gradio

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    monkeypatch.setattr(demo.Demo, "load", classmethod(lambda cls, *args: cls(app.sd)))
    port, seen = free_port(), {}

    def block_thread(page):
        seen["said"] = capsys.readouterr().err
        socket.create_connection(("::1", port), timeout=5).close()  # it listens
        page.close()

    monkeypatch.setattr(gradio.Blocks, "block_thread", block_thread)
    assert demo.main(["--host", "::1", "--port", str(port), "--device", "cpu"]) == 0, capsys.readouterr().err
    assert seen["said"] == f"diffedit demo: shapes-sd on cpu, serving http://[::1]:{port}/ (Ctrl-C stops it)\n"


def test_without_gradio_the_demo_says_how_to_install_it_and_exits_2(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert cli.main(["demo"]) == 2
    assert capsys.readouterr().err == f"diffedit: error: {demo.INSTALL_HINT}\n"
    assert demo.INSTALL_HINT == 'the demo needs Gradio, an optional extra: pip install -e ".[demo]"'


def test_the_readme_says_what_each_setting_does_in_the_pages_words():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert set(demo.HELP) == set(demo.SETTINGS)
    for name, said in demo.HELP.items():
        assert f"- `{name}`: {said}\n" in readme


def test_the_package_and_the_command_line_do_not_import_gradio():
    code = ("import sys, diffedit, diffedit.cli, diffedit.demo; diffedit.cli.build_parser(); "
            "assert 'gradio' not in sys.modules, 'gradio imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV)


# ---------------------------------------------------------------------------------------------------------------
# The server: the API through gradio_client, the page in Chromium


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(app):
    """The page served by this process on a free localhost port; closed afterwards."""
    need(("gradio", "gradio_client"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    page, port = demo.build_page(demo.Demo(app.sd)), free_port()
    demo.serve(page, "127.0.0.1", port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        page.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False, analytics_enabled=False)


class Tab:
    """One browser tab on the served page, speaking Gradio's queue protocol as the page's JavaScript does: an event
    (`fire`) runs each dependency bound to it with the current values of its inputs (a State's value is the
    server's, per session), and its outputs become the current values (gr.skip() leaves one as it was). Pictures are
    uploaded first, as the browser uploads them. For what the API client cannot reach: the page's private events,
    and the order in which a user triggers them."""

    def __init__(self, url: str):
        import httpx

        self.http = httpx.Client(base_url=url, timeout=300)
        self.session = uuid.uuid4().hex
        config = self.http.get("config").json()
        self.api, self.dependencies = config["api_prefix"], config["dependencies"]
        self.values = {c["id"]: c["props"].get("value") for c in config["components"]}
        self.ids = {c["props"]["elem_id"]: c["id"] for c in config["components"] if c["props"].get("elem_id")}
        self.states = {c["id"] for c in config["components"] if c["type"] == "state"}

    def upload(self, path: Path, name: str) -> dict:
        with open(path, "rb") as f:
            (server_path,) = self.http.post(f"{self.api}/upload", files={"files": (name, f)}).json()
        return {"path": server_path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}

    def set(self, elem_id: str, value, *events: str) -> str | None:
        """The user sets a value, which fires `events` (an upload: "upload", "change"); the last error or None."""
        self.values[self.ids[elem_id]] = value
        errors = [self.fire(elem_id, event) for event in events]
        return next((e for e in reversed(errors) if e is not None), None)

    def fire(self, elem_id: str, event: str) -> str | None:
        """Runs each dependency bound to elem_id's event: the error shown (a gr.Error's message, or Gradio's bare
        "Error") or None."""
        error = None
        for dep in self.dependencies:
            if [self.ids[elem_id], event] in dep["targets"]:
                error = self._run(dep) or error
        return error

    def _run(self, dep: dict) -> str | None:
        data = [None if i in self.states else self.values[i] for i in dep["inputs"]]
        joined = self.http.post(f"{self.api}/queue/join", json={
            "data": data, "fn_index": dep["id"], "session_hash": self.session, "event_data": None,
            "trigger_id": dep["targets"][0][0]})
        event_id = joined.json()["event_id"]
        with self.http.stream("GET", f"{self.api}/queue/data", params={"session_hash": self.session}) as stream:
            for line in stream.iter_lines():
                message = json.loads(line.removeprefix("data:")) if line.startswith("data:") else {}
                if message.get("event_id") != event_id or message.get("msg") != "process_completed":
                    continue
                if not message["success"]:
                    return message["output"].get("error") or "Error"
                for i, value in zip(dep["outputs"], message["output"]["data"]):
                    if i in self.states:
                        continue
                    if isinstance(value, dict) and value.get("__type__") == "update":
                        if "value" in value:
                            self.values[i] = value["value"]
                    else:
                        self.values[i] = value
                return None
        raise AssertionError(f"the event {dep['api_name']} never completed")

    def picture(self, elem_id: str) -> Image.Image | None:
        value = self.values[self.ids[elem_id]]
        return None if value is None else Image.open(value["path"]).convert("RGB")

    def text(self, elem_id: str) -> str:
        return self.values[self.ids[elem_id]] or ""


def edit_on(tab: Tab, image: Path, source: str, target: str, **settings) -> None:
    tab.set("image", tab.upload(image, image.name), "upload", "change")
    for name, value in {"source": source, "target": target, **FAST, **settings}.items():
        tab.set(name, value)
    assert tab.fire("run", "click") is None
    assert "timings" in tab.text("report")


def test_rethresholding_after_a_new_upload_never_cuts_the_old_pictures_map(app, server):
    """Edit one picture, upload another, move the thresholding: the old picture's mask is not shown for the new one;
    after an edit of the new one, the re-cut mask is the new picture's (as a fresh edit with that thresholding)."""
    tab = Tab(server)
    edit_on(tab, IMAGE, SOURCE, TARGET)
    assert tab.picture("overlay") is not None
    other, source, target = demo.EXAMPLES[1]
    tab.set("image", tab.upload(other, other.name), "upload", "change")
    assert tab.set("threshold_ratio", 2.0, "input", "change") is None
    assert tab.picture("overlay") is None and tab.picture("heat") is None and tab.picture("edited") is None
    assert tab.text("report").startswith("edit first")
    edit_on(tab, other, source, target, threshold_ratio=2.0)
    assert tab.set("threshold_ratio", 1.5, "input", "change") is None
    assert "re-thresholded the remembered map" in tab.text("report")
    expected = app.edit(other, source, target, **FAST, threshold_ratio=1.5)
    assert same_picture(tab.picture("overlay"), expected.overlay) and same_picture(tab.picture("heat"), expected.heat)


def test_resetting_the_thresholding_to_its_default_recuts_the_mask_shown(app, server):
    """The slider's reset button (↺) fires change, not input: the page kept showing the mask of the ratio moved to,
    beside a slider back at the default, with a report naming the old ratio."""
    tab = Tab(server)
    edit_on(tab, IMAGE, SOURCE, TARGET)
    edited_overlay = tab.picture("overlay")
    assert tab.set("threshold_ratio", 1.5, "input", "change") is None
    assert "(ratio 1.5, rule ratio" in tab.text("report") and not same_picture(tab.picture("overlay"), edited_overlay)
    default = app.defaults()["threshold_ratio"]
    assert tab.set("threshold_ratio", default, "change") is None  # the reset button
    assert f"(ratio {default:g}, rule ratio" in tab.text("report")
    assert same_picture(tab.picture("overlay"), edited_overlay)


def test_rethresholding_names_what_changed_since_the_edit_even_when_no_upload_event_said_so(app, server):
    """The map is checked against what the page shows, not only forgotten on an upload (one that arrives while an
    edit runs is followed by that edit's map): another picture clears the mask, another prompt or mask setting
    keeps the edit's own mask; a decoding setting changes nothing of the map, which is re-cut."""
    tab = Tab(server)
    edit_on(tab, IMAGE, SOURCE, TARGET)
    edited_overlay = tab.picture("overlay")
    tab.set("source", "a red disc on a gray background")
    tab.set("mask_strength", 0.4)
    assert tab.set("threshold_rule", "otsu", "input", "change") is None
    assert tab.text("report").startswith("**not re-thresholded**: the source, mask_strength changed since the last "
                                         "edit, whose map this would cut; press Edit")
    assert same_picture(tab.picture("overlay"), edited_overlay)  # the edit's own mask, as it was
    tab.set("source", SOURCE)
    tab.set("mask_strength", demo.Demo(app.sd).defaults()["mask_strength"])
    uploaded, other = tab.values[tab.ids["image"]], demo.EXAMPLES[1][0]
    tab.set("image", tab.upload(other, other.name))  # no event: as if it came before the edit finished
    assert tab.set("threshold_rule", "otsu", "input", "change") is None
    assert tab.text("report").startswith("**not re-thresholded**: the picture changed since the last edit")
    assert tab.picture("overlay") is None and tab.picture("heat") is None
    tab.set("image", uploaded)
    tab.set("guidance", 3.0)
    assert tab.set("threshold_rule", "otsu", "input", "change") is None
    assert "re-thresholded the remembered map" in tab.text("report")
    expected = app.edit(IMAGE, SOURCE, TARGET, **FAST, threshold_rule="otsu")
    assert same_picture(tab.picture("overlay"), expected.overlay)


def test_an_upload_that_is_not_a_picture_gets_one_line_naming_it_and_the_fix_on_the_page_and_the_api(server, client,
                                                                                                      tmp_path):
    from gradio_client import handle_file

    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    expected = ("the uploaded picture 'notes.png' is not an image (or not in a format Pillow reads): upload the "
                "picture again, or another one (PNG, JPEG, WebP or any format Pillow reads)")
    with pytest.raises(Exception) as e:
        client.predict(handle_file(str(text)), SOURCE, TARGET, api_name="/edit")
    assert str(e.value) == expected
    tab = Tab(server)
    tab.set("image", tab.upload(text, "notes.png"), "upload", "change")
    tab.set("source", SOURCE)
    tab.set("target", TARGET)
    assert tab.fire("run", "click") == expected
    cut = tmp_path / "cut.png"
    cut.write_bytes(IMAGE.read_bytes()[:200])
    with pytest.raises(Exception) as e:
        client.predict(handle_file(str(cut)), SOURCE, TARGET, api_name="/edit")
    assert str(e.value).startswith("the uploaded picture 'cut.png' is truncated or corrupt (")
    assert "/gradio" not in str(e.value) and str(e.value).endswith(", or another one (PNG, JPEG, WebP or any format "
                                                                   "Pillow reads)")


def test_a_picture_sent_inline_is_read_as_sent_and_one_that_is_not_a_picture_is_named(app, server):
    """A data: URL's picture is edited from its own bytes (as a fresh edit of the file: Gradio's own reading would
    store it as lossy WebP), and text in one gets the page's one line."""
    import base64

    tab = Tab(server)
    inline = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    tab.set("image", {"url": inline, "path": None, "orig_name": "pasted.png", "meta": {"_type": "gradio.FileData"}},
            "change")
    for name, value in {"source": SOURCE, "target": TARGET, **FAST}.items():
        tab.set(name, value)
    assert tab.fire("run", "click") is None
    assert same_picture(tab.picture("edited"), api.edit(IMAGE, SOURCE, TARGET, model=app.sd, seed=0,
                                                        **FAST_FIELDS).image)
    for url in ("data:image/png;base64," + base64.b64encode(b"not a picture").decode(), "data:image/png;base64,%%"):
        tab.set("image", {"url": url, "path": None, "orig_name": "pasted.png", "meta": {"_type": "gradio.FileData"}})
        said = tab.fire("run", "click")
        assert said.startswith("the uploaded picture 'pasted.png' is not an image ("), said
        assert said.endswith("(PNG, JPEG, WebP or any format Pillow reads)") and "/tmp" not in said


def test_an_upload_over_the_servers_limit_names_the_picture_and_a_size_to_resize_to(client, tmp_path):
    from gradio_client import handle_file

    big = tmp_path / "big.png"
    Image.new("RGB", (2049, 2048)).save(big)
    with pytest.raises(Exception) as e:
        client.predict(handle_file(str(big)), SOURCE, TARGET, api_name="/edit")
    assert str(e.value) == ("the uploaded picture 'big.png' is 2049x2048 (4.2 megapixels), over this server's limit of "
                            "4194304 pixels: resize it to at most 2048x2047 pixels and upload it again")


@pytest.mark.parametrize("seed", [1.5, "seven"])
def test_a_fractional_or_non_numeric_seed_through_the_api_is_refused_not_rounded(client, tmp_path, capsys, seed):
    from gradio_client import handle_file

    expected = cli_message(tmp_path, capsys, f"--seed={seed}")
    with pytest.raises(Exception) as e:
        client.predict(handle_file(str(IMAGE)), SOURCE, TARGET, steps=10, num_maps=2, seed=seed, api_name="/edit")
    assert str(e.value) == expected and "expected an integer" in expected
    with pytest.raises(Exception, match=r"^edit number: expected an integer in \[0, 2\*\*63\), got "):
        client.predict("colour", seed, api_name="/shapes")


def test_an_unknown_threshold_rule_through_the_api_gets_the_message_naming_the_valid_rules(client, tmp_path, capsys):
    from gradio_client import handle_file

    expected = cli_message(tmp_path, capsys, "--threshold-rule=mean")
    with pytest.raises(Exception) as e:
        client.predict(handle_file(str(IMAGE)), SOURCE, TARGET, threshold_rule="mean", api_name="/edit")
    assert str(e.value) == expected and "'ratio', 'otsu'" in expected
    with pytest.raises(Exception, match=r"^kind: expected colour or shape, got 'size'$"):
        client.predict("size", 3, api_name="/shapes")


def test_the_api_edit_endpoint_returns_the_edited_image_first_at_the_models_defaults(app, client):
    from gradio_client import handle_file

    edited, overlay, heat, report = client.predict(handle_file(str(IMAGE)), SOURCE, TARGET, api_name="/edit")
    assert not Path(demo.__file__).with_suffix(".pyi").exists()  # building the page wrote nothing into the package
    assert same_picture(Image.open(edited).convert("RGB"), api.edit(IMAGE, SOURCE, TARGET, model=app.sd,
                                                                     seed=0).image)
    assert Image.open(overlay).size == Image.open(heat).size == (256, 256) and "timings" in report


def test_the_api_takes_settings_by_name_and_says_what_it_reused(app, client):
    from gradio_client import handle_file

    client.predict(image=handle_file(str(IMAGE)), source=SOURCE, target=TARGET, steps=10, num_maps=2,
                   api_name="/edit")
    edited, _, _, report = client.predict(image=handle_file(str(IMAGE)), source=SOURCE, target=TARGET, steps=10,
                                          num_maps=2, guidance=3.0, seed=0, api_name="/edit")
    assert "reused difference map and inversion" in report
    mask_guidance = demo.Demo(app.sd).defaults()["mask_guidance"]  # the page's mask guidance slider, not given
    expected = api.edit(IMAGE, SOURCE, TARGET, model=app.sd, seed=0, **FAST_FIELDS, guidance_scale=3.0,
                        mask_guidance_scale=mask_guidance)
    assert same_picture(Image.open(edited).convert("RGB"), expected.image)


def test_a_bad_setting_through_the_api_is_the_command_lines_one_line_message(client, tmp_path, capsys):
    from gradio_client import handle_file

    expected = cli_message(tmp_path, capsys, "--strength=1.5")
    with pytest.raises(Exception) as e:  # gradio_client's AppError, carrying the page's message
        client.predict(image=handle_file(str(IMAGE)), source=SOURCE, target=TARGET, strength=1.5, api_name="/edit")
    assert str(e.value) == expected and "Traceback" not in str(e.value)


def open_page(browser, port: int):
    """A new tab on the page served at `port`, once its Edit button is there."""
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    page.goto(f"http://127.0.0.1:{port}/", wait_until="load", timeout=30_000)
    page.locator("#run").wait_for(timeout=30_000)
    return page


def test_the_page_edits_an_example_in_headless_chromium(tmp_path):
    """The command serves the page; Chromium opens it, picks the first example, presses Edit, and the edited picture
    appears (a blue circle where the red one was); the screenshot is saved and is not blank. Then a thresholding
    change re-cuts the map, a bad setting shows the command line's message, and the shapes tab runs an edit."""
    need(("gradio", "playwright"), (CHROMIUM,))
    from playwright.sync_api import sync_playwright

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "diffedit", "demo", "--port", str(port), "--device", "cpu"],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, f"the demo exited: {server.stdout.read()}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the demo did not start serving within 60 s"
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
            try:
                page = open_page(browser, port)
                page.get_by_text(TARGET).first.click()  # the first example's row
                page.wait_for_function("document.querySelector('#target textarea').value.length > 0",
                                       timeout=10_000)
                assert page.locator("#source textarea").input_value() == SOURCE
                page.locator("#run").click()
                page.locator("#report").get_by_text("timings").wait_for(timeout=30_000)
                page.locator("#edited img").wait_for(timeout=10_000)
                shot = tmp_path / "demo.png"
                page.screenshot(path=str(shot), full_page=True)
                edited = tmp_path / "edited.png"
                page.locator("#edited img").screenshot(path=str(edited))
                # A thresholding change re-cuts the remembered map at once
                page.locator("#threshold_ratio input[type=number]").fill("2")
                page.locator("#threshold_ratio input[type=number]").press("Enter")
                page.locator("#report").get_by_text("re-thresholded the remembered map").wait_for(timeout=10_000)
                # Bad input: the command line's one line in the page
                for name, value in (("strength", "0.05"), ("steps", "10")):
                    page.locator(f"#{name} input[type=number]").fill(value)
                    page.locator(f"#{name} input[type=number]").press("Enter")
                page.locator("#run").click()
                page.get_by_text("--strength 0.05 with --steps 10 runs no step").wait_for(timeout=10_000)
                assert "Traceback" not in page.content()
                # The shapes tab: a random held-out edit, its ground truth beside DiffEdit's mask
                page.get_by_role("tab", name="Shapes world: held-out edits").click()
                page.locator("#draw").click()
                page.locator("#shapes_report").get_by_text("mask IoU").wait_for(timeout=30_000)
                assert page.locator("#shapes_truth img").count() == page.locator("#shapes_estimated img").count() == 1
            finally:
                browser.close()
    finally:
        server.terminate()  # SIGTERM: SIGINT is ignored in a background job's children
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    picture = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert picture.shape[0] > 500 and picture.std() > 20 and len(np.unique(picture.reshape(-1, 3), axis=0)) > 100
    pixels = np.asarray(Image.open(edited).convert("RGB")).astype(int).reshape(-1, 3)
    blue = (pixels[:, 2] > pixels[:, 0] + 80).mean()
    red = (pixels[:, 0] > pixels[:, 2] + 80).mean()
    assert blue > 0.05 and red < 0.01, (blue, red)  # the circle turned blue


def test_an_edit_still_running_when_another_picture_is_uploaded_never_shows_in_chromium(app, tmp_path):
    """Edit, then upload another picture while the edit runs: its result (the old picture's edit, mask and report)
    arrived after the upload had cleared the page and showed beside the new picture."""
    need(("gradio", "playwright"), (CHROMIUM,))
    from playwright.sync_api import sync_playwright

    served = demo.Demo(app.sd)
    page, port = demo.build_page(served), free_port()
    demo.serve(page, "127.0.0.1", port, block=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
            try:
                tab = open_page(browser, port)
                tab.locator("#image input[type=file]").set_input_files(str(IMAGE))
                tab.locator("#source textarea").fill(SOURCE)
                tab.locator("#target textarea").fill(TARGET)
                for name, value in (("steps", "100"), ("num_maps", "20")):  # seconds of work
                    tab.locator(f"#{name} input[type=number]").fill(value)
                    tab.locator(f"#{name} input[type=number]").press("Enter")
                tab.locator("#run").click()
                deadline = time.monotonic() + 30
                while not served.lock.locked():  # the edit runs
                    assert time.monotonic() < deadline, "the edit never started"
                    time.sleep(0.02)
                tab.locator("#image input[type=file]").set_input_files(str(demo.EXAMPLES[2][0]))
                assert served.lock.acquire(timeout=60)  # the edit finished on the server
                served.lock.release()
                time.sleep(2)  # time for its result to reach the page
                tab.screenshot(path=str(tmp_path / "uploaded_while_editing.png"), full_page=True)
                assert tab.locator("#edited img").count() == tab.locator("#overlay img").count() == 0
                assert tab.locator("#report").inner_text().strip() == ""
            finally:
                browser.close()
    finally:
        page.close()

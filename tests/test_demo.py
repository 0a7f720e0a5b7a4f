"""`diffedit demo`: the page's work (`demo.Demo`) called directly, the Gradio API through `gradio_client` against a
server the test starts on a free localhost port, and the page itself in headless Chromium (Debian's, driven by
playwright; no browser download).

Every edit the demo returns is compared with a fresh `diffedit.edit` of the same settings, pixel for pixel, whatever
work it reused. The Gradio and browser tests skip with the reason when Gradio, gradio_client, playwright or chromium
is missing on a developer's machine; under CI (the CI environment variable set, as `.ci/run` sets it) they fail
instead, since `.ci/run` installs all of them.
"""

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
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
                page = browser.new_page(viewport={"width": 1280, "height": 1100})
                page.goto(f"http://127.0.0.1:{port}/", wait_until="load", timeout=30_000)
                page.locator("#run").wait_for(timeout=30_000)
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

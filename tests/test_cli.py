"""The `diffedit` command, driven in subprocesses as a user drives it: the main job (several targets, mask, compare
strip, JSON), the mask and invert steps and their reuse, odd but valid inputs (accepted with a note), and bad input
of every kind (one `diffedit: error:` line, exit status 2, no traceback, nothing written, nothing lost).

Runs are kept cheap (4 steps, 2 noise draws, 64x64 images, one thread); argument and path errors are caught before
torch is imported. A few pure helpers of the command are checked in-process at the end.
"""

import json
import os
import fcntl
import pty
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from diffedit import DiffEditParams, cli
from diffedit.image_tensors import latent_mask_from_image
from diffedit.saved_inversion import load_inversion

torch.set_num_threads(1)

FAST = ["--steps", "4", "--num-maps", "2"]
SOURCE, TARGETS = "a red circle on a gray background", ["a blue circle on a gray background", "a red square"]
# The shipped model's stored encoding ratio (diffedit.json): what `invert` uses when --strength is not given.
SHIPPED_DEFAULTS = json.loads((cli.SHIPPED_MODEL / "diffedit.json").read_text())
DEFAULT_STRENGTH = SHIPPED_DEFAULTS["inpaint_strength"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}


@pytest.fixture(scope="session")
def model_folder():
    """The model the commands run: the one that ships with the package."""
    return cli.SHIPPED_MODEL


@pytest.fixture(scope="module")
def sd(model_folder):
    from diffedit import StableDiffusion

    return StableDiffusion.from_pretrained(model_folder)


def diffedit(*args, cwd, stderr=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffedit", *map(str, args)], cwd=cwd, capture_output=False,
                          stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=300, env=ENV)


def shape_image(size=(64, 64), colour=(220, 30, 30)) -> Image.Image:
    img = Image.new("RGB", size, (128, 128, 128))
    w, h = size
    ImageDraw.Draw(img).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=colour)
    return img


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_bad_input(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, one line on stderr that starts `diffedit: error:` and holds every fragment, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("diffedit: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert result.stdout == ""
    return lines[0]


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# The main job: one run with two targets, mask, compare strip and a JSON summary


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    """The main job: no --model, so the command runs the model that ships with the package."""
    folder = tmp_path_factory.mktemp("edit")
    shape_image().save(folder / "in.png")
    (folder / "out-1.png").write_bytes(b"an older output, replaced whole")
    (folder / "masks").mkdir()
    args = ["edit", "in.png", "--source", SOURCE, "--target", TARGETS[0], "--target", TARGETS[1], "-o", "out.png",
            "--mask-out", "masks/{i}-{target}.png", "--compare-out", "cmp.png", "--json", *FAST]
    return folder, diffedit(*args, cwd=folder)


def test_edit_writes_one_output_mask_and_strip_per_target_and_a_json_summary(edited):
    folder, result = edited
    assert_ok(result)
    summary = json.loads(result.stdout)
    names = ["out-1.png", "out-2.png", "masks/1-a-blue-circle-on-a-gray-background.png", "masks/2-a-red-square.png",
             "cmp-1.png", "cmp-2.png"]
    for name in names:
        assert (folder / name).is_file(), name
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no temporary files left
    for i, entry in enumerate(summary["outputs"]):
        out, mask = Image.open(folder / entry["image"]), Image.open(folder / entry["mask"])
        assert out.size == mask.size == (64, 64) and out.mode == "RGB"
        values = np.asarray(mask)
        assert set(np.unique(values)) <= {0, 255}
        assert entry["target"] == TARGETS[i] and entry["mask_coverage"] == pytest.approx(values.mean() / 255, abs=1e-4)
        assert Image.open(folder / entry["compare"]).height >= 256  # a 64-pixel image is shown enlarged
    assert summary["parameters"]["steps"] == 4 and summary["parameters"]["num_maps"] == 2
    assert summary["parameters"]["guidance_min_timestep"] == SHIPPED_DEFAULTS["guidance_min_timestep"]
    assert summary["mode"] == "corrected" and summary["seed"] == 0 and summary["input_size"] == [64, 64]
    assert {"load_model", "mask", "invert", "decode", "write", "total"} <= set(summary["timings"])
    assert "diffedit: wrote out-1.png" in result.stderr  # the one-line summary
    assert "\r" not in result.stderr  # no progress bar when stderr is not a terminal


def test_edit_equals_the_api_with_one_inversion_for_all_targets(edited, sd):
    from diffedit import edit_targets

    folder, result = edited
    assert_ok(result)
    summary = json.loads(result.stdout)
    expected = edit_targets(folder / "in.png", SOURCE, TARGETS, model=sd, seed=0, num_inference_steps=4,
                            num_maps_per_mask=2)
    for entry, want in zip(summary["outputs"], expected):
        got = np.asarray(Image.open(folder / entry["image"]), dtype=int)
        assert np.abs(got - np.asarray(want.image, dtype=int)).max() <= 1
        assert np.array_equal(np.asarray(Image.open(folder / entry["mask"])), np.asarray(want.mask))


def test_preset_fast_runs_its_settings_under_explicit_flags_as_the_api_does(sd, tmp_path):
    from diffedit import edit

    shape_image().save(tmp_path / "in.png")
    result = diffedit("edit", "in.png", "--source", SOURCE, "--target", TARGETS[0], "-o", "out.png", "--preset",
                      "fast", "--num-maps", "2", "--json", cwd=tmp_path)
    assert_ok(result)
    summary = json.loads(result.stdout)
    assert summary["preset"] == "fast" and summary["parameters"]["steps"] == 15  # the preset over the stored 25
    assert summary["parameters"]["num_maps"] == 2  # a flag
    assert summary["parameters"]["strength"] == DEFAULT_STRENGTH  # the model's stored value, which fast keeps
    want = edit(tmp_path / "in.png", SOURCE, TARGETS[0], model=sd, seed=0, preset="fast", num_maps_per_mask=2)
    got = np.asarray(Image.open(tmp_path / "out.png"), dtype=int)
    assert np.abs(got - np.asarray(want.image, dtype=int)).max() <= 1


def test_compile_compiles_the_unet_in_the_asked_mode_before_the_edit(tmp_path, monkeypatch):
    """The wiring (a real compile: tests/test_stable_diffusion.py): --compile MODE reaches compile_unet once, a
    bare --compile means torch.compile's default mode, and none means no compiling."""
    from diffedit import StableDiffusion

    modes = []
    monkeypatch.setattr(StableDiffusion, "compile_unet", lambda self, mode: modes.append(mode))
    shape_image().save(tmp_path / "in.png")
    base = ["edit", str(tmp_path / "in.png"), "--source", SOURCE, "--target", TARGETS[0], "-o",
            str(tmp_path / "out.png"), "--quiet", "--force", *FAST]
    for flags in (["--compile", "reduce-overhead"], ["--compile"], []):
        assert cli.main([*base, *flags]) == 0
    assert modes == ["reduce-overhead", "default"]


def test_vae_tiling_and_slicing_leave_an_image_within_the_tile_unchanged(edited, tmp_path):
    """The shipped VAE's tile is 64 pixels (sample_size), the image's size: the flags change nothing."""
    folder, _ = edited
    shape_image().save(tmp_path / "in.png")
    result = diffedit("edit", "in.png", "--source", SOURCE, "--target", TARGETS[0], "--target", TARGETS[1], "-o",
                      "out.png", "--vae-tiling", "--vae-slicing", *FAST, cwd=tmp_path)
    assert_ok(result)
    for name in ("out-1.png", "out-2.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / name)), np.asarray(Image.open(folder / name)))
    assert "tiles this small" not in result.stderr  # nothing tiled, nothing to warn about


def test_vae_tiling_flag_tiles_a_larger_image_as_the_api_does(tmp_path, sd):
    from diffedit import edit

    shape_image((96, 80)).save(tmp_path / "in.png")  # 24 x 20 latents: over the 16-latent tile
    result = diffedit("edit", "in.png", "--source", SOURCE, "--target", TARGETS[0], "-o", "out.png", "--vae-tiling",
                      *FAST, cwd=tmp_path)
    assert_ok(result)
    kw = dict(model=sd, seed=0, num_inference_steps=4, num_maps_per_mask=2)
    plain = np.asarray(edit(tmp_path / "in.png", SOURCE, TARGETS[0], **kw).image, dtype=int)
    sd.enable_vae_tiling()
    try:
        tiled = np.asarray(edit(tmp_path / "in.png", SOURCE, TARGETS[0], **kw).image, dtype=int)
    finally:
        sd.disable_vae_tiling()
    got = np.asarray(Image.open(tmp_path / "out.png"), dtype=int)
    assert np.abs(got - tiled).max() <= 1 and np.abs(got - plain).max() > 1
    # the shipped model's 64-pixel tiles spoil the picture: said, not left for the user to find
    assert "--vae-tiling with this model's 64-pixel tiles: tiles this small change the picture" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# The steps alone, and their reuse


@pytest.fixture(scope="module")
def steps_run(tmp_path_factory, model_folder):
    folder = tmp_path_factory.mktemp("steps")
    shape_image().save(folder / "in.png")
    common = ["--model", model_folder, "--steps", "4"]
    mask = diffedit("mask", "in.png", "--source", SOURCE, "--target", TARGETS[0], "-o", "mask.png", "--heatmap-out",
                    "heat.png", "--num-maps", "2", "--json", *common, cwd=folder)
    invert = diffedit("invert", "in.png", "--prompt", SOURCE, "-o", "in.safetensors", "--json", *common, cwd=folder)
    reuse = diffedit("edit", "in.png", "--latents", "in.safetensors", "--mask", "mask.png", "--target", TARGETS[0],
                     "-o", "reused.png", "--mask-out", "mask-again.png", "--json", "--model", model_folder,
                     cwd=folder)
    return folder, mask, invert, reuse


def test_mask_command_writes_the_mask_the_edit_estimates(steps_run, edited):
    folder, mask, _, _ = steps_run
    assert_ok(mask)
    heat = Image.open(folder / "heat.png")
    assert heat.size == (64, 64) and heat.mode == "RGB"
    edit_folder, edit_result = edited
    first_mask = json.loads(edit_result.stdout)["outputs"][0]["mask"]
    # Same seed, same parameters, the mask is drawn first in both: the same mask
    assert np.array_equal(np.asarray(Image.open(folder / "mask.png")), np.asarray(Image.open(edit_folder / first_mask)))


def test_invert_saves_latents_with_the_metadata_that_guards_reuse(steps_run):
    from safetensors import safe_open

    folder, _, invert, _ = steps_run
    assert_ok(invert)
    with safe_open(str(folder / "in.safetensors"), framework="np") as f:
        meta = f.metadata()
        latents = f.get_tensor("latents")
    strength = DEFAULT_STRENGTH
    assert meta["format"] == "diffedit-latents" and meta["steps"] == "4" and float(meta["strength"]) == strength
    assert (meta["width"], meta["height"]) == ("64", "64") and meta["prompt"] == SOURCE and meta["model_fingerprint"]
    assert latents.shape == (int(4 * strength), 4, 16, 16)  # levels of (C, h, w); the shipped VAE's factor is 4


def test_edit_reuses_saved_latents_and_mask(steps_run, sd):
    from diffedit import method
    from diffedit.image_tensors import to_output

    folder, mask, _, reuse = steps_run
    assert_ok(reuse)
    summary = json.loads(reuse.stdout)
    assert summary["parameters"]["steps"] == 4  # taken from the latents file
    assert "timings" in summary and "invert" not in summary["timings"] and "mask" not in summary["timings"]
    given = np.asarray(Image.open(folder / "mask.png"))
    assert np.array_equal(np.asarray(Image.open(folder / "mask-again.png")), given)
    coverage = json.loads(mask.stdout)["outputs"][0]["latent_mask_coverage"]
    assert summary["outputs"][0]["latent_mask_coverage"] == coverage
    # The same numbers as decoding the file's latents under the file's mask in-process
    inversion, _ = load_inversion(folder / "in.safetensors", sd)
    latent_mask = latent_mask_from_image(Image.open(folder / "mask.png").convert("L"), (64, 64), 4)
    p = DiffEditParams.for_model(sd, num_inference_steps=4)  # the model's stored defaults, the file's step count
    text = method.encode_text(sd, [TARGETS[0]], [""])
    latents = method.decode(sd, inversion, torch.from_numpy(latent_mask).float()[None, None], text, p,
                            torch.Generator().manual_seed(0))
    want = np.asarray(to_output(method.to_pixels(sd, latents), "pil")[0], dtype=int)
    assert np.abs(np.asarray(Image.open(folder / "reused.png"), dtype=int) - want).max() <= 1


def test_latents_from_another_model_or_other_settings_are_refused(steps_run, model_folder, tmp_path):
    from tiny_checkpoints import save_checkpoint

    folder, _, invert, _ = steps_run
    assert_ok(invert)
    before = snapshot(folder)
    base = ["edit", "in.png", "--latents", "in.safetensors", "--mask", "mask.png", "--target", "x", "-o", "o.png"]
    assert_bad_input(diffedit(*base, "--model", model_folder, "--steps", "5", cwd=folder),
                     "in.safetensors was inverted with --steps 4", "--steps 5")
    assert_bad_input(diffedit(*base, "--model", model_folder, "--strength", "0.5", cwd=folder),
                     f"--strength {DEFAULT_STRENGTH:g}")
    assert_bad_input(diffedit(*base, "--model", model_folder, "--inversion-guidance", "3", cwd=folder),
                     "inverted with --inversion-guidance 1", "--inversion-guidance 3")
    assert_bad_input(diffedit(*base, "--model", model_folder, "--preset", "fast", cwd=folder),
                     "in.safetensors was inverted with --steps 4 but --preset fast asks --steps 15", "drop --preset")
    assert_ok(diffedit(*base, "--model", model_folder, "--preset", "fast", "--steps", "4", cwd=folder))  # flag wins
    (folder / "o.png").unlink()
    other = save_checkpoint("sd1", tmp_path / "other", seed=1)
    assert_bad_input(diffedit(*base, "--model", other, cwd=folder), "inverted with another model")
    shape_image((48, 64)).save(folder / "small.png")
    assert_bad_input(diffedit("edit", "small.png", *base[2:], "--model", model_folder, cwd=folder),
                     "inverted from a 64x64 image", "48x64")
    (folder / "small.png").unlink()
    assert snapshot(folder) == before


def test_latents_of_another_picture_are_refused_and_older_files_without_the_record_are_used_with_a_note(
        steps_run, model_folder):
    """invert records a digest of the picture's pixels; edit --latents with another picture of the same size is
    refused before any work. A file written before the record existed (no `image_digest`) still loads, noted."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder, _, invert, _ = steps_run
    assert_ok(invert)
    with safe_open(str(folder / "in.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert len(meta["image_digest"]) == 32
    shape_image(colour=(30, 200, 30)).save(folder / "green.png")  # the same size, another picture
    before = snapshot(folder)
    base = ["--latents", "in.safetensors", "--mask", "mask.png", "--target", "x", "--model", model_folder]
    assert_bad_input(diffedit("edit", "green.png", *base, "-o", "o.png", cwd=folder),
                     "in.safetensors was inverted from another picture; invert this one")
    assert snapshot(folder) == before
    old = {k: v for k, v in meta.items() if k != "image_digest"}
    save_file(tensors, str(folder / "old.safetensors"), metadata=old)
    result = diffedit("edit", "green.png", *base[2:], "--latents", "old.safetensors", "-o", "old.png", cwd=folder)
    assert_ok(result)
    assert "note: old.safetensors does not record which picture it inverted" in result.stderr
    for name in ("green.png", "old.safetensors", "old.png"):
        (folder / name).unlink()


def test_a_foreign_single_file_checkpoint_is_refused_in_one_short_line(bad_folder):
    """A .safetensors --model that is no checkpoint of the model names a few of its missing keys and how many,
    not a thousand characters of them."""
    line = assert_bad_input(diffedit("edit", "in.png", "--source", "a", "--target", "b", "-o", "out.png", "--model",
                                     "foreign.safetensors", cwd=bad_folder),
                            "cannot load model foreign.safetensors", "in all)")
    assert len(line) < 700, line
    assert line.count("cond_stage_model.") <= 3


def test_mask_notes_that_guidance_does_not_change_the_mask(tmp_path, capsys):
    """Both texts are guided from the same empty negative prompt, so G only scales eps_Q - eps_R and the
    mean-relative threshold divides it out: the same mask (and heat map, up to rounding) at any G, and `mask` says
    so."""
    shape_image().save(tmp_path / "in.png")
    for g in ("0", "3", "12"):
        assert cli.main(["mask", str(tmp_path / "in.png"), "--source", SOURCE, "--target", TARGETS[0], "--guidance",
                         g, "-o", str(tmp_path / f"m{g}.png"), "--heatmap-out", str(tmp_path / f"h{g}.png"),
                         *FAST]) == 0
        err = capsys.readouterr().err
        assert f"note: --guidance {g} does not change the mask" in err
    read = lambda name: np.asarray(Image.open(tmp_path / name), dtype=int)
    for g in ("3", "12"):
        assert np.array_equal(read(f"m{g}.png"), read("m0.png"))
        assert np.abs(read(f"h{g}.png") - read("h0.png")).max() <= 1  # the same map up to float rounding


# ---------------------------------------------------------------------------------------------------------------
# Odd but valid input: accepted with a note, output at the input's size


def _odd_images(folder: Path) -> dict:
    """Each distinct conversion path once (two odd properties per file where they combine), with its notes."""
    base = shape_image()
    fade = Image.fromarray(np.tile(np.linspace(0, 255, 50).astype(np.uint8), (70, 1)))  # alpha 0 .. 255
    rgba = shape_image((50, 70)).convert("RGBA")
    rgba.putalpha(fade)
    rgba.save(folder / "rgba-50x70.png")
    Image.new("LA", (64, 64), (90, 255)).save(folder / "la.png")
    frames = [base.convert("P", palette=Image.Palette.ADAPTIVE, colors=8), shape_image(colour=(30, 60, 220))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    base.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(folder / "grey16.png")
    base.convert("L").save(folder / "grey.png")
    return {
        "rgba-50x70.png": ["transparent pixels: composited onto white",
                           "50x70 is not a multiple of 4: the model works at 48x72, outputs are restored to 50x70"],
        "la.png": ["alpha channel (fully opaque): dropped"],
        "animated.gif": ["has 2 frames: using the first", "a palette image: converted to RGB"],
        "cmyk.jpg": ["CMYK: converted to RGB"],
        "grey16.png": ["16-bit greyscale (0-65535 values): converted to 8-bit RGB"],
        "grey.png": ["greyscale: converted to RGB"],
    }


ODD = ["rgba-50x70.png", "la.png", "animated.gif", "cmyk.jpg", "grey16.png", "grey.png"]


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("odd")
    return folder, _odd_images(folder)


@pytest.mark.parametrize("name", ODD)
def test_odd_input_is_accepted_with_a_note(name, odd_folder, model_folder):
    folder, notes = odd_folder
    out = f"out-{Path(name).stem}.png"
    result = diffedit("edit", name, "--source", "a shape", "--target", "a blue shape", "-o", out, "--mask-out",
                      f"mask-{out}", "--model", model_folder, "--steps", "2", "--num-maps", "1", cwd=folder)
    assert_ok(result)
    lines = [line for line in result.stderr.splitlines() if line.startswith("diffedit: note: ")]
    for note in notes[name]:
        assert any(note in line for line in lines), (note, result.stderr)
    size = Image.open(folder / name).size
    assert Image.open(folder / out).size == size and Image.open(folder / f"mask-{out}").size == size




# ---------------------------------------------------------------------------------------------------------------
# Warnings, --force, --quiet, progress bars, --debug


def test_same_empty_and_overlong_prompts_warn_and_quiet_keeps_only_warnings(tmp_path, model_folder):
    shape_image().save(tmp_path / "in.png")
    before = (tmp_path / "in.png").read_bytes()
    long = " ".join(["a red circle"] * 40)  # 120 tokens with any CLIP vocabulary that spells the world's words
    result = diffedit("edit", "in.png", "--source", "A Red  Circle", "--target", "a red circle", "--target", "",
                      "--target", long, "-o", "out-{i}.png", "--quiet", "--json", "--model", model_folder, *FAST,
                      cwd=tmp_path)
    assert_ok(result)
    assert json.loads(result.stdout)["outputs"][0]["mask_coverage"] == 0  # the same text: an empty mask
    err = result.stderr
    assert "diffedit: warning: --source and --target say the same thing" in err and "nothing to edit" in err
    assert "diffedit: warning: --target 2 is empty" in err
    assert "diffedit: warning: --target 3 has 120 tokens but the text encoder reads 75: the last 45 are dropped" in err
    assert "note:" not in err and "wrote" not in err  # --quiet keeps warnings only
    assert all(line.startswith("diffedit: warning:") for line in err.strip().splitlines())
    assert (tmp_path / "in.png").read_bytes() == before


def test_reference_behaviour_gives_diffusers_full_mask_for_the_same_text(tmp_path, model_folder):
    shape_image().save(tmp_path / "in.png")
    result = diffedit("mask", "in.png", "--source", SOURCE, "--target", SOURCE, "-o", "mask.png", "--json",
                      "--reference-behaviour", "--model", model_folder, *FAST, cwd=tmp_path)
    assert_ok(result)
    summary = json.loads(result.stdout)
    assert summary["mode"] == "reference" and summary["outputs"][0]["mask_coverage"] == 1.0  # 0/0 -> NaN -> 1 (D3)
    assert "the mask is full instead" in result.stderr
    assert (np.asarray(Image.open(tmp_path / "mask.png")) == 255).all()


def test_reference_behaviour_sets_aside_the_models_guidance_interval_and_refuses_settings_diffusers_lacks(
        tmp_path, model_folder):
    """diffusers guides every decoding step: the shipped model's stored guidance_min_timestep (300) is not applied
    under --reference-behaviour (it was, so the numbers were not diffusers'), and flags diffusers has no argument
    for are refused. The picture is the API's with every correction off and every step guided."""
    from diffedit import edit
    from diffedit.params import CORRECTIONS

    assert SHIPPED_DEFAULTS["guidance_min_timestep"] == 300
    shape_image().save(tmp_path / "in.png")
    result = diffedit("edit", "in.png", "--source", SOURCE, "--target", TARGETS[0], "-o", "out.png", "--json",
                      "--reference-behaviour", "--model", model_folder, *FAST, cwd=tmp_path)
    assert_ok(result)
    assert json.loads(result.stdout)["parameters"]["guidance_min_timestep"] == 0
    off = {name: False for name in CORRECTIONS.values()}
    kw = dict(seed=0, num_inference_steps=4, num_maps_per_mask=2, **off)
    every_step = edit(tmp_path / "in.png", SOURCE, TARGETS[0], model_folder, guidance_min_timestep=0, **kw)
    interval = edit(tmp_path / "in.png", SOURCE, TARGETS[0], model_folder, **kw)
    ours = np.asarray(Image.open(tmp_path / "out.png"))
    assert np.array_equal(ours, np.asarray(every_step.image))
    assert not np.array_equal(ours, np.asarray(interval.image))  # the interval changes this edit's pixels
    for flags, message in [(["--guidance-min-timestep", "300"], "--guidance-min-timestep 300 has no counterpart"),
                           (["--sampler", "dpmsolver++"], "--sampler dpmsolver++ has no counterpart"),
                           (["--threshold-rule", "otsu"], "--threshold-rule otsu has no counterpart")]:
        assert_bad_input(diffedit("edit", "in.png", "--source", SOURCE, "--target", TARGETS[0], "-o", "x.png",
                                  "--reference-behaviour", "--model", model_folder, *FAST, *flags, cwd=tmp_path),
                         message)
    assert not (tmp_path / "x.png").exists()


def test_reference_behaviour_with_a_dpm_inversion_file_names_the_file_not_a_flag_never_given(tmp_path, model_folder):
    """The sampler came from the --latents file, so the refusal says the file was made with it (it said
    "--sampler dpmsolver++ has no counterpart ... drop one of the two", a flag the user never gave)."""
    shape_image().save(tmp_path / "in.png")
    assert_ok(diffedit("invert", "in.png", "--prompt", SOURCE, "-o", "inv.safetensors", "--sampler", "dpmsolver++",
                       "--model", model_folder, "--steps", "4", cwd=tmp_path))
    assert_bad_input(diffedit("edit", "in.png", "--source", SOURCE, "--target", TARGETS[0], "-o", "x.png",
                              "--latents", "inv.safetensors", "--reference-behaviour", "--model", model_folder,
                              cwd=tmp_path),
                     "inv.safetensors was inverted with --sampler dpmsolver++, which has no counterpart in diffusers")
    assert not (tmp_path / "x.png").exists()


def test_progress_bars_show_on_a_terminal_and_force_overwrites_the_input(tmp_path, model_folder):
    shape_image().save(tmp_path / "in.png")
    before = (tmp_path / "in.png").read_bytes()
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty has 0 columns
    proc = subprocess.Popen([sys.executable, "-m", "diffedit", "edit", "in.png", "--source", SOURCE, "--target",
                             TARGETS[0], "-o", "in.png", "--force", "--model", str(model_folder), *FAST],
                            cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=slave, env=ENV)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the other end closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=300) == 0
    err = b"".join(chunks).decode(errors="replace")
    assert "decoding 1/1" in err and "step" in err and "\r" in err
    assert "diffedit: wrote in.png" in err
    assert (tmp_path / "in.png").read_bytes() != before and Image.open(tmp_path / "in.png").size == (64, 64)


def test_debug_shows_the_traceback_of_a_bad_input(tmp_path):
    result = diffedit("edit", "missing.png", "--source", "a", "--target", "b", "-o", "o.png", "--debug",
                      cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and result.stderr.strip().endswith(
        "diffedit: error: input image missing.png does not exist")


# ---------------------------------------------------------------------------------------------------------------
# Bad input: caught before the model is loaded (fast), nothing written


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    shape_image().save(folder / "in.png")
    data = (folder / "in.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    corrupt = bytearray(data)
    idat = data.index(b"IDAT")
    corrupt[idat + 8: idat + 40] = bytes(range(32))
    (folder / "corrupt.png").write_bytes(bytes(corrupt))
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "a-folder").mkdir()
    shape_image((100, 100)).save(folder / "big.png")
    Image.new("L", (32, 32), 255).save(folder / "small-mask.png")
    Image.new("L", (64, 64), 255).save(folder / "mask.png")
    (folder / "existing.png").write_bytes(b"precious")
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2, np.float32)}, str(folder / "foreign.safetensors"))
    return folder


BAD_ARGS = [
    # (arguments after IMAGE, fragments of the error line)
    (["in.png", "--strength", "1.5"], ["--strength", "in (0, 1]", "1.5"]),
    (["in.png", "--strength", "0"], ["--strength", "in (0, 1]"]),
    (["in.png", "--steps", "0"], ["--steps", ">= 1"]),
    (["in.png", "--steps", "ten"], ["--steps", "expected an integer", "'ten'"]),
    (["in.png", "--num-maps", "0"], ["--num-maps", "in [1, 1000]"]),
    (["in.png", "--num-maps", "1001"], ["--num-maps", "in [1, 1000]", "got 1001"]),
    (["in.png", "--mask-strength", "nan"], ["--mask-strength", "in (0, 1]"]),
    (["in.png", "--threshold-ratio", "-1"], ["--threshold-ratio", "> 0"]),
    (["in.png", "--guidance", "x"], ["--guidance", "a number"]),
    (["in.png", "--guidance-min-timestep", "-5"], ["--guidance-min-timestep", ">= 0"]),
    (["in.png", "--guidance-min-timestep", "1001"], ["--guidance-min-timestep 1001", "1000"]),
    (["in.png", "--seed", "-3"], ["--seed"]),
    (["in.png", "--strength", "0.1"], ["--strength 0.1 with --steps 4 runs no step", "--strength >= 0.25"]),
    (["in.png", "--strength", "1e-9"], ["--strength 1e-09 is too small for any allowed step count",
                                        "schedule has 1000", "--strength >= 0.25"]),
    (["in.png", "--strength", "1e-300"], ["only from --steps 1e+300,"]),  # was the 301-digit integer
    (["in.png", "--mask-strength", "1e-320"], ["--mask-strength 9.99989e-321 is too small for any allowed step "
                                               "count: the model's schedule has 1000"]),  # 1 / x overflows
    (["in.png", "--lora-scale", "0.5"], ["--lora-scale needs --lora"]),
    (["in.png", "--mask", "mask.png", "--num-maps", "3"], ["--num-maps sets how the mask is estimated",
                                                           "--mask mask.png gives the mask", "drop --num-maps"]),
    (["in.png", "--mask", "mask.png", "--mask-strength", "0.5", "--threshold-ratio", "2", "--threshold-rule",
      "otsu"], ["--mask-strength and --threshold-ratio and --threshold-rule set how the mask is estimated"]),
    (["in.png", "--lora", "foreign.safetensors:abc"], ["bad LoRA weight 'abc'", "finite number"]),
    (["in.png", "--lora", "foreign.safetensors:"], ["bad LoRA weight ''", "finite number"]),
    (["in.png", "-o", ""], ["-o is empty: give a file name"]),
    (["in.png", "--mask-out", ""], ["--mask-out is empty: give a file name"]),
    (["in.png", "--embedding", ""], ["--embedding is empty: give a file name"]),  # blamed -o: "write into ."
    (["in.png", "--embedding", ":tok"], ["--embedding is empty: give a file name"]),
    (["in.png", "--lora", ""], ["argument --lora: empty: give a LoRA .safetensors file name"]),
    (["in.png", "--model", ""], ["--model is empty: give a model folder, file or repo id"]),  # was the cwd
    (["in.png", "--target", "b", "-o", "{target}.png"], ["--target 1 ('b') and --target 2 ('b') would both be "
                                                          "written to b.png (-o {target}.png)"]),
    (["in.png", "--device", "tpu"], ["--device", "invalid choice"]),
    (["in.png", "--preset", "slow"], ["--preset", "invalid choice: 'slow'", "fast"]),
    (["in.png", "--compile", "fastest"], ["--compile", "invalid choice: 'fastest'", "reduce-overhead"]),
    (["--compile", "in.png"], ["--compile: invalid choice: 'in.png'", "--compile took the next argument as its MODE",
                               "put --compile after 'in.png'"]),
    (["missing.png"], ["input image missing.png does not exist"]),
    (["a-folder"], ["a-folder is a folder"]),
    (["notes.txt"], ["notes.txt is not an image"]),
    (["truncated.png"], ["truncated.png is truncated or corrupt"]),
    (["corrupt.png"], ["corrupt.png is truncated or corrupt"]),
    (["big.png", "--max-pixels", "5000"], ["100x100", "--max-pixels 5000", "downscale it (to 70x70 or less)",
                                           "--max-pixels 10000"]),
    (["in.png", "-o", "no-such-folder/out.png"], ["output folder no-such-folder does not exist"]),
    (["in.png", "-o", "in.png"], ["output in.png is the input image; pass --force"]),
    (["in.png", "-o", "out.xyz"], ["unknown image extension '.xyz'"]),
    (["in.png", "-o", "a-folder"], ["a-folder is a folder"]),
    (["in.png", "--mask-out", "out.png"], ["output and --mask-out would both be written to out.png"]),
    (["in.png", "--mask", "small-mask.png"], ["mask small-mask.png is 32x32 but the image is 64x64"]),
    (["in.png", "--latents", "foreign.safetensors"], ["foreign.safetensors is not a latents file"]),
    (["in.png", "--latents", "notes.txt"], ["notes.txt is not a safetensors file"]),
    (["in.png", "--model", "no/such/folder"], ["model folder no/such/folder does not exist"]),
]


@pytest.mark.parametrize("args, fragments", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, fragments, bad_folder, model_folder):
    before = snapshot(bad_folder)
    output = [] if "-o" in args else ["-o", "out.png"]
    model = [] if "--model" in args else ["--model", model_folder]
    result = diffedit("edit", *args, "--source", "a", "--target", "b", *output, *model, "--steps", "4",
                      cwd=bad_folder)
    assert_bad_input(result, *fragments)
    assert snapshot(bad_folder) == before


@pytest.mark.parametrize("steps, strength", [(3, 0.2), (7, 0.1), (10, 1 / 49), (4, 0.1)])
def test_the_strength_and_steps_a_refusal_suggests_each_run_a_step(tmp_path, capsys, steps, strength):
    """The hints must themselves work: 1 / 3 shown as 0.333333 does not (int(3 x 0.333333) = 0), nor 49 steps at
    strength 1 / 49 (int(49 x (1 / 49)) = 0, so ceil(1 / strength) is a step short)."""
    import re

    assert cli.main(["edit", str(cli.EXAMPLE_IMAGE), "--source", "a", "--target", "b", "-o", str(tmp_path / "o.png"),
                     "--steps", str(steps), "--strength", repr(strength)]) == 2
    said = capsys.readouterr().err
    found = re.search(r"use --strength >= ([0-9.e-]+) or --steps >= (\d+)", said)
    assert found, said
    least, more = float(found[1]), int(found[2])
    assert int(steps * least) >= 1 and least <= 1.001 / steps
    assert int(more * strength) >= 1 and int((more - 1) * strength) == 0
    assert not (tmp_path / "o.png").exists()


def test_other_commands_and_missing_arguments_are_bad_input(bad_folder, model_folder):
    before = snapshot(bad_folder)
    assert_bad_input(diffedit("invert", "in.png", "--prompt", "a", "-o", "lat.pt", "--model", model_folder,
                              cwd=bad_folder), ".safetensors")
    assert_bad_input(diffedit("edit", "in.png", "--target", "b", "-o", "o.png", cwd=bad_folder), "needs --source")
    assert_bad_input(diffedit("edit", "in.png", "--source", "a", "-o", "o.png", cwd=bad_folder), "--target")
    assert_bad_input(diffedit("mask", "in.png", "--source", "a", "--target", "b", "-o", "m.png", "--num-maps",
                              "0", cwd=bad_folder), "--num-maps")
    assert_bad_input(diffedit("mask", "in.png", "--source", "a", "--target", "b", "-o", "m.png", "--latents", "x",
                              cwd=bad_folder), "unrecognized arguments: --latents x", "see `diffedit mask --help`")
    assert_bad_input(diffedit(cwd=bad_folder), "give a command: edit, mask, invert,", "experiment", "demo")
    assert_bad_input(diffedit("frobnicate", cwd=bad_folder), "invalid choice")
    assert snapshot(bad_folder) == before


# ---------------------------------------------------------------------------------------------------------------
# Bad models: the file or field named, an existing output untouched


def _broken_model(folder: Path, source: Path, how: str) -> str:
    shutil.copytree(source, folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if how == "missing":
        (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
        return "vae/diffusion_pytorch_model.safetensors"
    if how == "truncated":
        unet.write_bytes(unet.read_bytes()[: unet.stat().st_size // 2])
        return "unet/diffusion_pytorch_model.safetensors"
    if how == "corrupt":
        data = bytearray(unet.read_bytes())
        data[:16] = b"\xff" * 16
        unet.write_bytes(bytes(data))
        return "unet/diffusion_pytorch_model.safetensors"
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["act_fn"] = "gelu"
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    return "act_fn"


@pytest.mark.parametrize("how", ["missing", "truncated", "corrupt", "config"])
def test_broken_model_is_named_and_the_existing_output_kept(how, tmp_path, model_folder):
    named = _broken_model(tmp_path / "model", model_folder, how)
    shape_image().save(tmp_path / "in.png")
    (tmp_path / "out.png").write_bytes(b"precious")
    result = diffedit("edit", "in.png", "--source", "a", "--target", "b", "-o", "out.png", "--model",
                      tmp_path / "model", *FAST, cwd=tmp_path)
    line = assert_bad_input(result, "cannot load model", named)
    assert (tmp_path / "out.png").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "model", "out.png"], line


# ---------------------------------------------------------------------------------------------------------------
# Entry points and help


def test_version_help_and_both_entry_points(tmp_path):
    version = diffedit("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"diffedit {cli.__version__}"
    helps = diffedit("--help", cwd=tmp_path)
    assert helps.returncode == 0 and "examples:" in helps.stdout and "diffedit edit" in helps.stdout
    edit_help = diffedit("edit", "--help", cwd=tmp_path).stdout
    for text in ("{i}", "{target}", "out-1.png", "--reference-behaviour", "--mask-out", "--latents", "example:"):
        assert text in edit_help, text
    script = shutil.which("diffedit")
    if script is None:
        pytest.skip("the `diffedit` console script is not installed")
    same = subprocess.run([script, "--version"], capture_output=True, text=True, env=ENV)
    assert same.stdout == version.stdout


def test_every_example_in_the_help_runs_as_written(tmp_path):
    """The examples of `diffedit --help` (and each subcommand's) name the bundled picture and run in order: the
    invert and mask examples make the files the reuse example reads."""
    import shlex

    texts = [diffedit(*cmd, "--help", cwd=tmp_path).stdout for cmd in ([], ["edit"], ["mask"], ["invert"])]
    commands = []
    for text in texts:
        lines = text[text.index("example"):].replace("\\\n", " ").splitlines()[1:]
        commands += [shlex.split(line) for line in lines if line.strip().startswith("diffedit ")]
    assert len(commands) == 10 and all(str(cli.EXAMPLE_IMAGE) in c for c in commands)
    for command in commands:
        assert_ok(diffedit(*command[1:], "--steps", "4", "--quiet", cwd=tmp_path))
    assert {"blue.png", "out-1.png", "out-2.png", "mask.png", "heat.png", "circle.safetensors", "square.png",
            "compare.png"} <= {p.name for p in tmp_path.iterdir()}


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers, in-process


def test_guidance_flags_set_the_steps_they_name():
    """`edit --guidance` is the mask's and the decoding's scale, never the inversion's (so giving the model's own
    decoding default, 7.5, does not switch on guided inversion); `invert --guidance` is the inversion's."""
    parse = cli.build_parser().parse_args
    edit = ["edit", "in.png", "--source", "a", "--target", "b", "-o", "o.png"]
    assert cli.explicit_params(parse([*edit, "--guidance", "7.5"])) == {"guidance_scale": 7.5,
                                                                         "mask_guidance_scale": 7.5}
    assert cli.explicit_params(parse([*edit, "--inversion-guidance", "2"])) == {"inversion_guidance_scale": 2.0}
    invert = ["invert", "in.png", "--prompt", "a", "-o", "l.safetensors", "--guidance", "3"]
    assert cli.explicit_params(parse(invert)) == {"inversion_guidance_scale": 3.0}
    mask = ["mask", "in.png", "--source", "a", "--target", "b", "-o", "m.png", "--guidance", "4"]
    assert cli.explicit_params(parse(mask))["mask_guidance_scale"] == 4.0


def test_threshold_flags_set_the_ratio_and_the_rule_and_nothing_else():
    parse = cli.build_parser().parse_args
    mask = ["mask", "in.png", "--source", "a", "--target", "b", "-o", "m.png"]
    assert cli.explicit_params(parse([*mask, "--threshold-rule", "otsu", "--threshold-ratio", "2"])) == {
        "mask_threshold_rule": "otsu", "mask_thresholding_ratio": 2.0}
    assert cli.explicit_params(parse(mask)) == {}  # not given: the model's or the paper's
    with pytest.raises(cli.BadInput, match="invalid choice: 'mean'"):
        parse([*mask, "--threshold-rule", "mean"])


def test_a_failing_last_write_leaves_every_earlier_output_as_it_was(tmp_path, capsys, monkeypatch):
    """edit writes the picture, the mask and the comparison strip all or none: the strip's write fails (after the
    picture and the mask were written to their temporary files), and the existing picture and mask keep their
    bytes, with no temporary file left behind."""
    shape_image().save(tmp_path / "in.png")
    for name in ("out.png", "mask.png", "compare.png"):
        Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / name)
    before = snapshot(tmp_path)
    save = Image.Image.save

    def fails_for_the_strip(self, fp, *args, **kwargs):
        if ".compare.png." in str(fp):
            raise OSError("No space left on device")
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", fails_for_the_strip)
    code = cli.main(["edit", str(tmp_path / "in.png"), "--source", SOURCE, "--target", TARGETS[0], *FAST, "-o",
                     str(tmp_path / "out.png"), "--mask-out", str(tmp_path / "mask.png"), "--compare-out",
                     str(tmp_path / "compare.png"), "--force", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_the_sampler_flag_runs_dpm_solver_and_a_saved_inversion_keeps_its_sampler(tmp_path, capsys):
    shape_image().save(tmp_path / "in.png")
    common = ["--steps", "10", "--quiet"]
    assert cli.main(["invert", str(tmp_path / "in.png"), "--prompt", SOURCE, "--sampler", "dpmsolver++", "-o",
                     str(tmp_path / "lat.safetensors"), *common]) == 0
    common += ["--num-maps", "2"]
    from diffedit import read_inversion_metadata

    assert read_inversion_metadata(tmp_path / "lat.safetensors")["sampler"] == "dpmsolver++"
    # reused without --sampler: the file's sampler runs
    assert cli.main(["edit", str(tmp_path / "in.png"), "--source", SOURCE, "--target", TARGETS[0], "--latents",
                     str(tmp_path / "lat.safetensors"), "-o", str(tmp_path / "out.png"), "--json", *common]) == 0
    assert '"sampler": "dpmsolver++"' in capsys.readouterr().out
    code = cli.main(["edit", str(tmp_path / "in.png"), "--source", SOURCE, "--target", TARGETS[0], "--latents",
                     str(tmp_path / "lat.safetensors"), "--sampler", "ddim", "-o", str(tmp_path / "o2.png"), *common])
    err = capsys.readouterr().err
    assert code == 2 and "inverted with --sampler dpmsolver++ but this run asks --sampler ddim" in err
    assert not (tmp_path / "o2.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# --lora FILE[:WEIGHT]


def test_no_output_overwrites_the_model_or_a_lora_file_even_with_force(tmp_path, sd, model_folder):
    """`invert -o` on the model's UNet weights replaced them with a 13 KB latents file (exit 0): the model, its
    files, and LoRA files are inputs no output may overwrite, --force or not; nothing is written."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(model_folder, model)
    shape_image().save(tmp_path / "in.png")
    lora = _shipped_lora(sd, tmp_path / "style.safetensors")
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    before = {p: p.read_bytes() for p in (weights, lora, model / "diffedit.json")}
    common = ["--model", str(model), "--steps", "4", "--force"]
    cases = [
        (["invert", "in.png", "--prompt", SOURCE, "-o", str(weights), *common],
         f"output {weights} would write into the model {model}"),
        (["invert", "in.png", "--prompt", SOURCE, "-o", lora.name, "--lora", lora.name, *common],
         f"output {lora.name} would overwrite the --lora file {lora.name}"),
        (["edit", "in.png", "--source", SOURCE, "--target", TARGETS[0], "-o", str(model / "diffedit.json.png"),
          "--num-maps", "2", *common], "would write into the model"),
        (["mask", "in.png", "--source", SOURCE, "--target", TARGETS[0], "-o", "out.png", "--heatmap-out",
          str(model / "unet" / "heat.png"), *common], "--heatmap-out"),
    ]
    for argv, message in cases:
        assert_bad_input(diffedit(*argv, cwd=tmp_path), message)
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in (model / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert not (tmp_path / "out.png").exists()


def _shipped_lora(sd, path: Path, width: int | None = None) -> Path:
    """A kohya LoRA (rank 2, alpha 1) with random non-zero pairs on the shipped UNet's cross-attention keys and the
    text encoder's first query projection; `width` makes A's input width wrong (a LoRA for another model)."""
    from safetensors.torch import save_file

    g, tensors = torch.Generator().manual_seed(0), {}
    chosen = [("lora_unet_", n, m) for n, m in sd.unet.named_modules() if n.endswith("attn2.to_k")]
    chosen.append(("lora_te_text_model_", "encoder.layers.0.self_attn.q_proj",
                   sd.text_encoder.encoder.layers[0].self_attn.q_proj))
    for prefix, name, layer in chosen:
        out_width, in_width = layer.weight.shape
        flat = prefix + name.replace(".", "_")
        tensors[f"{flat}.lora_down.weight"] = torch.randn(2, width or in_width, generator=g)
        tensors[f"{flat}.lora_up.weight"] = torch.randn(out_width, 2, generator=g)
        tensors[f"{flat}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path))
    return path


def test_lora_inversion_records_its_files_and_is_not_reused_without_them(tmp_path, sd, model_folder):
    from safetensors import safe_open

    from diffedit.models.lora import file_digest

    shape_image().save(tmp_path / "in.png")
    lora = _shipped_lora(sd, tmp_path / "style.safetensors")
    common = ["--model", model_folder, "--steps", "4"]
    inverted = diffedit("invert", "in.png", "--prompt", SOURCE, "-o", "lora.safetensors", "--lora",
                        f"{lora.name}:0.5", "--json", *common, cwd=tmp_path)
    assert_ok(inverted)
    assert json.loads(inverted.stdout)["lora"] == [{"file": lora.name, "weight": 0.5}]
    assert_ok(diffedit("invert", "in.png", "--prompt", SOURCE, "-o", "plain.safetensors", *common, cwd=tmp_path))
    with safe_open(str(tmp_path / "lora.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["lora"]) == [[file_digest(lora), 0.5]]
        with_lora = f.get_tensor("latents")
    with safe_open(str(tmp_path / "plain.safetensors"), framework="pt") as f:
        assert f.metadata()["lora"] == "[]"
        assert (with_lora - f.get_tensor("latents")).abs().max() > 1e-3  # the LoRA moved the inversion
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    base = ["edit", "in.png", "--latents", "lora.safetensors", "--mask", "mask.png", "--target", "x", "--model",
            model_folder]
    assert_bad_input(diffedit(*base, "-o", "a.png", cwd=tmp_path), "inverted with LoRA adapters", "--lora")
    assert_bad_input(diffedit(*base, "-o", "b.png", "--lora", lora.name, cwd=tmp_path), "inverted with LoRA")
    assert_ok(diffedit(*base, "-o", "c.png", "--lora", f"{lora.name}:0.5", cwd=tmp_path))


def test_bad_lora_files_are_one_line_exit_2(tmp_path, sd, model_folder):
    shape_image().save(tmp_path / "in.png")
    (tmp_path / "old.bin").write_bytes(b"pickle")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 20)
    _shipped_lora(sd, tmp_path / "wide.safetensors", width=1024)
    run = lambda spec: diffedit("invert", "in.png", "--prompt", "x", "-o", "o.safetensors", "--model", model_folder,
                                "--steps", "4", "--lora", spec, cwd=tmp_path)
    assert_bad_input(run("old.bin"), "not a .safetensors file")
    assert_bad_input(run("none.safetensors:0.5"), "none.safetensors does not exist")
    assert_bad_input(run("junk.safetensors"), "corrupt")
    assert_bad_input(run("wide.safetensors:nan"), "finite")
    assert_bad_input(run("wide.safetensors"), "--lora wide.safetensors", "another base model")
    assert not (tmp_path / "o.safetensors").exists()


def test_lora_spec_splits_the_weight_from_the_path(tmp_path):
    (tmp_path / "a:b.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    assert cli.lora_spec(str(tmp_path / "a:b.safetensors")) == (tmp_path / "a:b.safetensors", 1.0)
    assert cli.lora_spec(str(tmp_path / "a:b.safetensors") + ":-0.25") == (tmp_path / "a:b.safetensors", -0.25)


def test_lora_scale_scales_every_adapter_in_all_steps(tmp_path, sd, model_folder):
    """--lora-scale S multiplies each branch as a weight does (S x weight 1 gives weight S's latents, bit for bit),
    0 gives the model without the LoRA; it is recorded with the inversion; a non-number is refused."""
    from safetensors import safe_open

    shape_image().save(tmp_path / "in.png")
    lora = _shipped_lora(sd, tmp_path / "style.safetensors")
    common = ["invert", "in.png", "--prompt", SOURCE, "--model", model_folder, "--steps", "4"]
    runs = {"plain": [], "zero": ["--lora", lora.name, "--lora-scale", "0"],
            "scaled": ["--lora", lora.name, "--lora-scale", "0.5"], "weighted": ["--lora", f"{lora.name}:0.5"]}
    latents, meta = {}, {}
    for name, flags in runs.items():
        assert_ok(diffedit(*common, "-o", f"{name}.safetensors", *flags, cwd=tmp_path))
        with safe_open(str(tmp_path / f"{name}.safetensors"), framework="pt") as f:
            latents[name], meta[name] = f.get_tensor("latents"), f.metadata()
    assert torch.equal(latents["zero"], latents["plain"])
    assert torch.equal(latents["scaled"], latents["weighted"])
    assert (latents["scaled"] - latents["plain"]).abs().max() > 1e-3
    assert meta["scaled"]["lora_scale"] == "0.5" and meta["weighted"]["lora_scale"] == "1.0"
    assert_bad_input(diffedit(*common, "-o", "x.safetensors", "--lora-scale", "nan", cwd=tmp_path),
                     "--lora-scale", "finite number")


def test_latents_inverted_at_another_lora_scale_are_refused_and_the_files_scale_is_used(tmp_path, sd, model_folder):
    shape_image().save(tmp_path / "in.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    lora = _shipped_lora(sd, tmp_path / "style.safetensors")
    assert_ok(diffedit("invert", "in.png", "--prompt", SOURCE, "-o", "lat.safetensors", "--lora", lora.name,
                       "--lora-scale", "0.5", "--model", model_folder, "--steps", "4", cwd=tmp_path))
    base = ["edit", "in.png", "--latents", "lat.safetensors", "--mask", "mask.png", "--target", "x", "--model",
            model_folder, "--lora", lora.name]
    assert_bad_input(diffedit(*base, "--lora-scale", "1", "-o", "a.png", cwd=tmp_path),
                     "lat.safetensors was inverted with --lora-scale 0.5 but this run asks --lora-scale 1")
    assert_bad_input(diffedit(*base, "--lora-scale", "0.50000001", "-o", "a.png", cwd=tmp_path),  # not "0.5 vs 0.5"
                     "with --lora-scale 0.5 but this run asks --lora-scale 0.50000001")
    assert not (tmp_path / "a.png").exists()
    result = diffedit(*base, "-o", "b.png", "--json", cwd=tmp_path)
    assert_ok(result)
    assert json.loads(result.stdout)["parameters"]["lora_scale"] == 0.5


def test_the_same_lora_file_twice_is_refused_as_its_effect_would_double(tmp_path, sd):
    shape_image().save(tmp_path / "in.png")
    lora = _shipped_lora(sd, tmp_path / "style.safetensors")
    result = diffedit("invert", "in.png", "--prompt", "x", "-o", "o.safetensors", "--lora", lora.name, "--lora",
                      f"./{lora.name}:0.5", cwd=tmp_path)
    assert_bad_input(result, f"--lora {lora.name} is given twice", "would add up")
    assert not (tmp_path / "o.safetensors").exists()


def test_json_summary_is_strict_json_with_non_finite_numbers_as_null():
    """Python's json writes NaN and Infinity, which other JSON parsers refuse: the summary never holds them."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    text = cli.strict_json({"a": float("nan"), "b": [1.5, float("inf"), {"c": -float("inf")}], "d": "nan"})
    assert json.loads(text, parse_constant=refuse) == {"a": None, "b": [1.5, None, {"c": None}], "d": "nan"}


def test_json_summary_is_one_write_so_a_reader_that_leaves_after_it_sees_no_broken_pipe(tmp_path, monkeypatch):
    """Unbuffered (PYTHONUNBUFFERED, python -u), print wrote the JSON and its newline apart: `| head -1` could leave
    between the two and turn a finished run into exit 141."""
    writes = []

    class Stdout:
        def write(self, text):
            writes.append(text)
            return len(text)

        def flush(self):
            pass

    monkeypatch.setattr("sys.stdout", Stdout())
    assert cli.main(["mask", str(cli.EXAMPLE_IMAGE), "--source", SOURCE, "--target", TARGETS[0], "-o",
                     str(tmp_path / "m.png"), "--json", "--quiet", *FAST]) == 0
    assert len(writes) == 1 and writes[0].endswith("}\n") and json.loads(writes[0])["command"] == "mask"


def test_a_config_that_is_a_file_or_missing_is_refused_naming_the_config_flag(tmp_path):
    import argparse

    checkpoint, picture = tmp_path / "model.safetensors", tmp_path / "in.png"
    checkpoint.write_bytes(b"x")
    picture.write_bytes(b"x")
    for config, message in [(picture, r"--config .*in\.png is a file; give the diffusers model folder"),
                            (tmp_path / "no" / "folder", r"--config .*folder: model folder .* does not exist")]:
        with pytest.raises(cli.BadInput, match=message):
            cli.model_config(argparse.Namespace(config=str(config)), str(checkpoint))


def test_a_colour_picture_given_as_the_mask_gets_a_note(tmp_path, capsys):
    """`--mask photo.png` (the image and mask swapped, or a mask painted red) reads the picture by brightness; the
    command now says so, where it edited a region nobody drew without a word."""
    picture = cli.EXAMPLE_IMAGE
    assert cli.main(["edit", str(picture), "--source", "a", "--target", "b", "--mask", str(picture), "-o",
                     str(tmp_path / "o.png"), "--steps", "4"]) == 0
    assert "is a colour picture: read by its brightness" in capsys.readouterr().err


def test_an_inversion_decoded_in_another_dtype_gets_a_note(tmp_path, capsys):
    """A float32 inversion decoded under --dtype bfloat16 ran without a word; the file records its dtype."""
    image, lat = str(cli.EXAMPLE_IMAGE), str(tmp_path / "inv.safetensors")
    assert cli.main(["invert", image, "--prompt", "a", "-o", lat, "--steps", "4"]) == 0
    capsys.readouterr()
    flags = ["edit", image, "--source", "a", "--target", "b", "--latents", lat, "--num-maps", "2"]
    assert cli.main([*flags, "-o", str(tmp_path / "x.png"), "--dtype", "bfloat16"]) == 0
    assert "was made in float32; this run decodes it in bfloat16" in capsys.readouterr().err
    assert cli.main([*flags, "-o", str(tmp_path / "y.png")]) == 0
    assert "was made in" not in capsys.readouterr().err

"""`diffedit bench`: ours and diffusers' pipeline on the same weights in one process, per-stage times and ratios,
agreement of the outputs, and bad input refused in one line."""

import json
from pathlib import Path

import pytest
import torch

from diffedit import bench, cli

torch.set_num_threads(1)


def test_bench_times_both_sides_and_their_outputs_agree(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--runs", "2", "--steps", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert set(report["sides"]) == {"ours", "diffusers"} and report["diffusers"] == "0.42.1"
    for side in report["sides"].values():
        stages = side["stages"]
        assert set(stages) == {"mask", "invert", "decode", "total"}
        assert all(0 < s["min_s"] <= s["median_s"] <= s["max_s"] for s in stages.values())
        assert side["edit_tflop"] > 0 and side["achieved_tflops"] > 0
    # ours computes the mask step's shared unconditional rows once: fewer FLOPs for the same edit
    assert report["sides"]["ours"]["edit_tflop"] < report["sides"]["diffusers"]["edit_tflop"]
    assert set(report["ratio"]) == {"mask", "invert", "decode", "total"} and report["agreement"]["agree"]
    assert report["agreement"]["mask_agreement"] == 1.0 and report["agreement"]["latent_relative_error"] < 1e-5
    assert "ours / diffusers" in printed and "outputs agree" in printed


def test_bench_without_the_reference_times_ours_only(capsys):
    report = bench.run_bench(None, runs=1, settings=bench.Settings(num_inference_steps=3), reference=False)
    assert set(report["sides"]) == {"ours"} and "ratio" not in report and "agreement" not in report
    assert "no reference" in bench.render(report)


@pytest.mark.parametrize("args, message", [
    (["--runs", "0"], "--runs"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--dtype", "float64"], "cuda"
     if not torch.cuda.is_available() else "--dtype"),
    (["--model", "/no/such/folder"], "/no/such/folder"),
    (["--steps", "1"], "--steps 1: mask_encode_strength=0.5 with num_inference_steps=1 runs no step"),
    (["--steps", "2000"], "--steps 2000: num_inference_steps=2000 does not fit the model's schedule"),
])
def test_bad_bench_input_is_one_line_and_exit_2(args, message, capsys):
    assert cli.main(["bench", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_a_json_path_that_is_a_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("work started"))
    assert cli.main(["bench", "--json", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_random_weights_in_a_preset_shape_are_measured_on_both_sides_in_batches(tmp_path):
    out = tmp_path / "tiny.json"
    assert cli.main(["bench", "--config", "tiny", "--runs", "1", "--steps", "3", "--batch-size", "2",
                     "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model"] == "random weights, tiny shapes" and report["settings"]["batch_size"] == 2
    ours = report["sides"]["ours"]
    assert ours["seconds_per_edit"] == pytest.approx(ours["stages"]["total"]["median_s"] / 2)
    assert report["agreement"]["agree"]
    # FLOPs per edit are per edit: a batch of 2 counts what one edit alone counts (it reported the batch's)
    assert cli.main(["bench", "--config", "tiny", "--runs", "1", "--steps", "3", "--no-reference", "--json",
                     str(tmp_path / "one.json")]) == 0
    one = json.loads((tmp_path / "one.json").read_text())["sides"]["ours"]
    assert ours["edit_tflop"] == pytest.approx(one["edit_tflop"], rel=1e-3)


def test_model_and_config_together_are_refused(capsys):
    assert cli.main(["bench", "--model", "x", "--config", "tiny"]) == 2
    assert "give one" in capsys.readouterr().err


def test_random_model_folders_load_with_the_presets_shapes(tmp_path):
    from diffedit import StableDiffusion, random_models

    for name in ("tiny", "shapes"):
        sd = StableDiffusion.from_pretrained(random_models.write_random_model(name, tmp_path / name))
        preset = random_models.PRESETS[name]
        assert sd.unet.config.block_out_channels == tuple(preset.unet["block_out_channels"])
        assert sd.scheduler.config.prediction_type == preset.prediction_type
    assert random_models.PRESETS["sd21"].prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="unknown model config"):
        random_models.write_random_model("sd3", tmp_path / "x")


def test_compile_wraps_both_sides_unets_in_the_asked_mode_before_the_warm_up(monkeypatch):
    """The wiring only (compiling takes minutes on a CPU; the real run: README, Speed): ours compiles as users do
    (`StableDiffusion.compile_unet`), diffusers' UNet through torch.compile, before any timed work, both in
    --compile's mode."""
    from diffedit import StableDiffusion

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, mode: compiled.append((type(module), mode)) or module)
    monkeypatch.setattr(StableDiffusion, "compile_unet", lambda self, mode: compiled.append(("ours", mode)))
    monkeypatch.setattr(bench, "render", lambda report: "")
    assert cli.main(["bench", "--config", "tiny", "--runs", "1", "--steps", "3", "--compile", "reduce-overhead"]) == 0
    assert [mode for _, mode in compiled] == ["reduce-overhead"] * 2 and compiled[0][0] == "ours"
    assert compiled[1][0].__module__.startswith("diffusers")
    compiled.clear()
    report = bench.run_bench(config="tiny", runs=1, settings=bench.Settings(num_inference_steps=3),
                             compile_unet=True)
    assert report["compiled"] and report["compile_mode"] == "default" and [m for _, m in compiled] == ["default"] * 2


def test_a_larger_picture_with_vae_tiling_is_measured_on_both_sides_and_agrees(tmp_path, monkeypatch):
    """--size past the VAE's tile (64 px for the tiny preset) with --vae-tiling: both sides tile, outputs agree."""
    from diffusers import AutoencoderKL

    from diffedit.facade import StableDiffusionDiffEdit

    switched = []
    for cls, name in ((StableDiffusionDiffEdit, "enable_vae_tiling"), (AutoencoderKL, "enable_tiling")):
        original = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, _f=original, _c=cls: switched.append(_c) or _f(self))
    out = tmp_path / "tiled.json"
    assert cli.main(["bench", "--config", "tiny", "--runs", "1", "--steps", "3", "--size", "96", "--vae-tiling",
                     "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["size"] == 96 and report["vae_tiling"] and report["agreement"]["agree"]
    assert switched == [StableDiffusionDiffEdit, AutoencoderKL]


def test_a_size_off_the_vae_grid_is_refused_before_any_timed_work(monkeypatch, capsys):
    monkeypatch.setattr(bench, "one_edit", lambda *a, **k: pytest.fail("work started"))
    assert cli.main(["bench", "--config", "tiny", "--size", "100"]) == 2
    assert "--size 100: the picture's side must be a multiple of the VAE's factor 8, e.g. --size 96" in \
        capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--size", "7"], "--size 7: the picture's side must be a multiple of the VAE's factor 8, e.g. --size 8"),
    (["--size", "400000"], "--size 400000: at most 8192 pixels a side"),
    (["--steps", "5000"], "--steps 5000: the model's schedule has 1000 timesteps"),
])
def test_sizes_and_step_counts_a_preset_cannot_run_are_refused_before_its_weights_are_written(args, message,
                                                                                              monkeypatch, capsys):
    """--config sd15 wrote 6 GB of random weights (28 s) before refusing --size 7; --size 400000 was killed."""
    from diffedit import random_models

    monkeypatch.setattr(random_models, "write_random_model", lambda *a, **k: pytest.fail("model written"))
    assert cli.main(["bench", "--config", "sd15", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_the_json_report_never_overwrites_the_models_files(tmp_path, monkeypatch, capsys):
    """`--json m/unet/config.json` replaced the UNet's config with the report (exit 0, the model unloadable)."""
    import shutil

    from diffedit.locations import SHIPPED_MODEL

    shutil.copytree(SHIPPED_MODEL, tmp_path / "m")
    before = (tmp_path / "m" / "unet" / "config.json").read_bytes()
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("work started"))
    assert cli.main(["bench", "--model", str(tmp_path / "m"), "--json", str(tmp_path / "m" / "unet" /
                                                                           "config.json")]) == 2
    assert "would write into the model" in capsys.readouterr().err
    assert (tmp_path / "m" / "unet" / "config.json").read_bytes() == before


def test_a_single_file_model_and_absurd_thread_counts_are_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert cli.main(["bench", "--model", str(tmp_path / "model.safetensors")]) == 2
    assert "is a single-file checkpoint; bench measures a diffusers model folder" in capsys.readouterr().err
    assert cli.main(["bench", "--threads", "20000"]) == 2  # libgomp failed at 20000; 50000 was a segfault
    assert "--threads" in capsys.readouterr().err


def test_a_missing_gpu_is_refused_before_a_random_model_is_written(monkeypatch, capsys):
    """--config sd15 writes gigabytes: the device is checked first."""
    from diffedit import random_models

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA: the refusal is what is tested")
    monkeypatch.setattr(random_models, "write_random_model", lambda *a, **k: pytest.fail("model written"))
    assert cli.main(["bench", "--config", "sd15", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def device_script_commands() -> list[list[str]]:
    """The commands .ci/device runs (continuation lines joined), as argument lists with its variables filled in."""
    import shlex

    text = (Path(__file__).parents[1] / ".ci" / "device").read_text().replace("\\\n", " ")
    text = text.replace('"${common[@]}"', "--device cuda --dtype float16").replace('"$OUT', '"/out')
    return [shlex.split(line.split(" step ", 1)[-1].split(" ;;")[0]) for line in text.splitlines()
            if line.strip().startswith("step ")]


def test_the_device_scripts_bench_commands_parse_and_its_test_selection_is_the_cuda_tests():
    """.ci/device runs only where a GPU is lent (minutes that cannot be wasted on a typo): every bench command in it
    parses with bench's own parser, and its pytest selection collects exactly the tests that skip without CUDA."""
    import subprocess
    import sys

    commands = device_script_commands()
    benches = [c[c.index("bench") + 1:] for c in commands if c[3:6] == ["-m", "diffedit", "bench"]]
    assert len(benches) == 5
    for argv in benches:
        args = bench.parse_args(argv)
        assert args.device == "cuda" and args.json.startswith("/out/")
    assert {bench.parse_args(a).compile for a in benches} == {None, "reduce-overhead"}
    (tests,) = [c for c in commands if "pytest" in c]
    files = [a for a in tests if a.startswith("tests/")]
    selection = tests[tests.index("-k") + 1]
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                *files, "-k", selection], capture_output=True, text=True, timeout=300,
                               cwd=Path(__file__).parents[1])
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    assert len(ids) == 7, collected.stdout  # the seven CUDA-only tests (README: 7 skipped here)
    assert all("cuda" in i or "gpu" in i or "another_device" in i for i in ids)

"""`diffedit experiment`: rows that equal the one-call API's edits scored independently, resumable to the same
records, every bad configuration refused before work, manifests of the user's own pictures, and the metrics'
arithmetic on hand-built inputs."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffedit import cli, evaluate, experiment
from diffedit.console import BadInput

torch.set_num_threads(1)

SMALL = ["--n", "2", "--param", "num_inference_steps=8", "--param", "num_maps_per_mask=2", "--quiet"]


def records(folder) -> list[dict]:
    with open(folder / "records.csv", newline="") as f:
        return list(csv.DictReader(f))


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "run"
    code = cli.main(["experiment", "--out", str(out), "--methods", "diffedit,diffedit-gt-mask,encode-decode,sdedit",
                     "--sweep", "inpaint_strength=0.4,0.6", "--seeds", "0,3", *SMALL])
    assert code == 0
    return out


def test_a_grid_writes_one_row_per_edit_method_setting_and_seed(grid_run):
    rows = records(grid_run)
    assert len(rows) == 2 * 4 * 2 * 2
    assert list(rows[0]) == ["edit", "kind", "method", "seed", "inpaint_strength", *experiment.METRICS]
    config = json.loads((grid_run / "config.json").read_text())
    assert config["methods"] == list(experiment.METHOD_NAMES) and config["model_fingerprint"]
    by_method = {m: [r for r in rows if r["method"] == m] for m in experiment.METHOD_NAMES}
    assert all(r["mask_iou"] == "" for r in by_method["encode-decode"] + by_method["sdedit"])  # no mask
    assert all(0 <= float(r["mask_iou"]) <= 1 and 0 <= float(r["map_auroc"]) <= 1 for r in by_method["diffedit"])
    assert {r["guided_steps"] for r in rows if r["inpaint_strength"] == "0.6"} == {"1"}  # t=376 only, of 376..1
    summary = (grid_run / "summary.md").read_text()
    assert summary.count("| diffedit |") == 2 and "± " in summary


def test_a_diffedit_row_holds_the_scores_of_the_one_call_apis_edit(grid_run):
    row = next(r for r in records(grid_run) if r["method"] == "diffedit" and r["seed"] == "3"
               and r["inpaint_strength"] == "0.6" and r["edit"] == "shapes-0-1")
    edit = evaluate.heldout_edits(2, 0)[1]
    source, _ = __import__("diffedit").shapes.render(edit.source)
    from diffedit import edit as diffedit_edit

    result = diffedit_edit(Image.fromarray(source), edit.source.caption, edit.target.caption, seed=3 + 1,
                           num_inference_steps=8, num_maps_per_mask=2, inpaint_strength=0.6)
    pred = np.asarray(result.mask) > 127
    assert float(row["mask_iou"]) == pytest.approx(evaluate.iou(pred, edit.region), abs=1e-6)
    assert float(row["background_psnr_db"]) == pytest.approx(
        evaluate.background_psnr(np.asarray(result.image), source, edit.region), abs=1e-4)
    assert row["edit_success"] == str(int(evaluate.judge(edit, np.asarray(result.image))[0]))


def test_an_interrupted_run_resumes_to_the_same_records(grid_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = ["experiment", "--out", str(out), "--methods", "diffedit,diffedit-gt-mask,encode-decode,sdedit",
            "--sweep", "inpaint_strength=0.4,0.6", "--seeds", "0,3", *SMALL]
    run_job, calls = experiment.run_job, [0]

    def dies_at_the_third(*args):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return run_job(*args)

    monkeypatch.setattr(experiment, "run_job", dies_at_the_third)
    assert cli.main(argv) == 130 and len(records(out)) == 4  # two jobs of one edit and two settings
    with open(out / "records.csv", "a") as f:
        f.write("shapes-0-0,colour,sdedit,0,0.4,0.5")  # a row cut mid-line
    monkeypatch.setattr(experiment, "run_job", run_job)
    assert cli.main(argv) == 2  # not without --resume
    assert cli.main([*argv, "--resume"]) == 0
    assert without_seconds(records(out)) == without_seconds(records(grid_run))


@pytest.mark.parametrize("extra, message", [
    (["--sweep", "strenght=0.4,0.6"], "unknown DiffEdit parameter"),
    (["--sweep", "inpaint_strength=0.4,1.5"], "inpaint_strength: expected a number in [0, 1]"),
    (["--param", "num_inference_steps=1001"], "does not fit the model's schedule"),
    (["--methods", "diffedit,magic"], "--methods: unknown magic"),
    (["--sweep", "inpaint_strength"], "expected FIELD=V1,V2"),
    (["--seeds", "0,x"], "--seeds 0,x"),
    (["--edits", "nope.jsonl"], "nope.jsonl"),
    (["--sweep", "eta=0,0.5", "--sweep", "eta=1"], "eta given twice"),
    (["--sweep", "eta=0,0.5", "--param", "eta=1"], "eta given twice"),
    (["--preset", "slow"], "invalid choice: 'slow'"),
])
def test_bad_configurations_are_refused_before_any_work(extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(experiment, "run_job", lambda *a: pytest.fail("work started"))
    code = cli.main(["experiment", "--out", str(tmp_path / "run"), *SMALL, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run" / "records.csv").exists()


def test_a_manifest_runs_the_users_own_pictures_and_needs_masks_for_the_ground_truth_method(tmp_path, capsys):
    from diffedit import shapes

    edit = evaluate.heldout_edits(1, 5)[0]
    source, _ = shapes.render(edit.source)
    Image.fromarray(source).save(tmp_path / "a.png")
    Image.fromarray(edit.region.astype(np.uint8) * 255).save(tmp_path / "a-mask.png")
    lines = [{"image": "a.png", "source": edit.source.caption, "target": edit.target.caption, "mask": "a-mask.png",
              "id": "mine"},
             {"image": "a.png", "source": edit.source.caption, "target": edit.target.caption}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    argv = ["experiment", "--out", str(tmp_path / "run"), "--edits", str(tmp_path / "m.jsonl"), *SMALL]
    assert cli.main([*argv, "--methods", "diffedit-gt-mask"]) == 2
    assert "needs a ground-truth mask for every edit" in capsys.readouterr().err
    assert cli.main([*argv, "--methods", "diffedit"]) == 0
    mine, second = records(tmp_path / "run")
    assert mine["edit"] == "mine" and mine["mask_iou"] != "" and second["edit"] == "line-2"
    assert second["mask_iou"] == "" and second["edit_success"] == "" and second["psnr_db"] != ""  # no truth, no judge


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 1: not JSON"), ('{"image": "a.png"}', "expected an object with image, source and target"),
    ('{"image": "missing.png", "source": "a", "target": "b"}', "missing.png does not exist"),
    ('{"image": "a.png", "source": "a", "target": "b", "colour": "red"}', "unknown fields ['colour']"),
])
def test_a_bad_manifest_line_is_named(line, message, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(line + "\n")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        experiment.manifest_cases(tmp_path / "m.jsonl")


def test_metrics_on_hand_built_maps():
    truth = np.array([[True, True, False, False]])
    assert experiment.auroc(np.array([[0.9, 0.8, 0.1, 0.2]]), truth) == 1.0  # every region pixel above
    assert experiment.auroc(np.array([[0.1, 0.2, 0.9, 0.8]]), truth) == 0.0
    assert experiment.auroc(np.array([[0.5, 0.5, 0.5, 0.5]]), truth) == 0.5  # ties count half
    assert experiment.auroc(np.array([[0.9, 0.1, 0.5, 0.2]]), truth) == 0.5  # pairs won: 2 of 4
    assert np.isnan(experiment.auroc(np.zeros((1, 4)), np.zeros((1, 4), bool)))  # no region: undefined
    # thresholds 0.1, 0.2, 0.5, 0.9 give IoU 2/4, 1/4, 1/3, 1/2: the best is 0.5, a tie of the lowest and highest
    assert experiment.best_threshold_iou(np.array([[0.9, 0.1, 0.5, 0.2]]), truth) == 0.5
    mean, half, n = experiment.mean_ci([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3) and half == pytest.approx(1.96 * 1.0 / 3**0.5)


def test_plots_show_the_tradeoff_and_the_mask_ablation_and_are_optional(grid_run, tmp_path, capsys, monkeypatch):
    assert (grid_run / "plots" / "tradeoff.png").is_file()  # inpaint_strength was swept
    for method in experiment.METHOD_NAMES:  # a row per edit (2), the input and one column per setting (2)
        sheet = Image.open(grid_run / f"examples_{method}.png")
        assert sheet.width > 3 * 128 and sheet.height > 2 * 128
    out = tmp_path / "thr"
    argv = ["experiment", "--out", str(out), "--sweep", "mask_thresholding_ratio=2,4",
            "--sweep", "mask_threshold_rule=ratio,otsu", *SMALL]
    assert cli.main(argv) == 0
    picture = Image.open(out / "plots" / "mask_iou_vs_mask_thresholding_ratio.png")
    assert picture.size == (768, 576) and len(picture.getcolors(2**20)) > 50  # drawn, not blank
    from diffedit import plots

    monkeypatch.setattr(plots, "available", lambda: False)
    assert cli.main(["experiment", "--out", str(tmp_path / "bare"), *SMALL]) == 0
    assert 'no plots: matplotlib is not installed (pip install -e ".[plots]")' in capsys.readouterr().err
    assert not (tmp_path / "bare" / "plots").exists() and (tmp_path / "bare" / "summary.md").is_file()


def test_the_same_run_from_python(grid_run, tmp_path):
    import diffedit

    path = diffedit.run_experiment(tmp_path / "py", n=2, methods=["diffedit", "diffedit-gt-mask", "encode-decode",
                                                                  "sdedit"],
                                   sweep=[("inpaint_strength", [0.4, 0.6])], seeds=(0, 3),
                                   param={"num_inference_steps": 8, "num_maps_per_mask": 2})
    assert without_seconds(records(path.parent)) == without_seconds(records(grid_run))
    with pytest.raises(ValueError, match="--methods: unknown magic"):
        diffedit.run_experiment(tmp_path / "bad", methods=["magic"])
    with pytest.raises(ValueError, match="seeds are ints >= 0"):
        diffedit.run_experiment(tmp_path / "bad", seeds=[-1])


def test_torchrun_shards_the_rows_and_rank_0_merges_what_one_process_writes(grid_run, tmp_path):
    """Two CPU processes under torch's own launcher (gloo); the merged records equal the single-process run's."""
    import os
    import subprocess
    import sys

    out = tmp_path / "dist"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "diffedit",
               "experiment", "--out", str(out), "--methods", "diffedit,diffedit-gt-mask,encode-decode,sdedit",
               "--sweep", "inpaint_strength=0.4,0.6", "--seeds", "0,3", *[a if a != "--n" else "--num-edits"
                                                                             for a in SMALL]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    # a rank's own last words (a C++ abort's message) come before the launcher's summary: keep both
    assert done.returncode == 0, done.stderr[:4000] + "\n...\n" + done.stderr[-1500:]
    assert without_seconds(records(out)) == without_seconds(records(grid_run))
    assert not (out / "shards").exists() and (out / "summary.md").is_file()


def test_a_batched_run_gives_the_one_at_a_time_records_within_tolerance(grid_run, tmp_path):
    """--batch-size 2: both edits through the three steps together. Masks, verdicts and guided steps are equal;
    the pictures move by the batch's arithmetic (~1e-5 in the latents), so PSNR and SSIM agree to a tolerance."""
    out = tmp_path / "batched"
    assert cli.main(["experiment", "--out", str(out), "--methods", "diffedit,diffedit-gt-mask,encode-decode,sdedit",
                     "--sweep", "inpaint_strength=0.4,0.6", "--seeds", "0,3", "--batch-size", "2", *SMALL]) == 0
    one, batched = records(grid_run), records(out)
    assert [(r["edit"], r["method"], r["seed"], r["inpaint_strength"]) for r in batched] == \
        [(r["edit"], r["method"], r["seed"], r["inpaint_strength"]) for r in one]
    for a, b in zip(one, batched):
        for name in ("mask_iou", "mask_precision", "mask_recall", "mask_coverage", "best_threshold_iou",
                     "edit_success", "guided_steps"):
            assert a[name] == b[name], (name, a, b)
        assert float(b["background_psnr_db"]) == pytest.approx(float(a["background_psnr_db"]), abs=0.05)
        assert float(b["psnr_db"]) == pytest.approx(float(a["psnr_db"]), abs=0.05)
        assert float(b["background_ssim"]) == pytest.approx(float(a["background_ssim"]), abs=1e-3)


def test_each_rank_gets_a_share_of_every_method_and_all_jobs_are_dealt_once():
    cases = experiment.shapes_cases(5, 0)
    methods = list(experiment.METHOD_NAMES)
    jobs = experiment.plan_jobs(cases, methods, [0], 2)  # 3 batches (2, 2, 1) x 4 methods
    assert [len(job.cases) for job in jobs[::4]] == [2, 2, 1]
    shares = [experiment.shard(jobs, methods, rank, 2) for rank in range(2)]
    assert sorted(map(id, shares[0] + shares[1])) == sorted(map(id, jobs))
    for share in shares:
        assert {job.method for job in share} == set(methods)
    one_batch = experiment.plan_jobs(cases[:2], methods, [0], 2)  # one job per method: two methods each
    assert [len(experiment.shard(one_batch, methods, rank, 2)) for rank in range(2)] == [2, 2]


def test_batches_hold_consecutive_edits_of_one_size():
    sizes = [(64, 64), (64, 64), (48, 64), (64, 64), (64, 64), (64, 64)]
    cases = [experiment.Case(f"c{i}", Image.new("RGB", size), "a", "b") for i, size in enumerate(sizes)]
    jobs = experiment.plan_jobs(cases, ["diffedit"], [0], 2)
    assert [[i for i, _ in job.cases] for job in jobs] == [[0, 1], [2], [3, 4], [5]]
    jobs = experiment.plan_jobs(cases, ["diffedit", "sdedit"], [0, 7], 16)
    assert [(len(job.cases), job.seed, job.method) for job in jobs][:4] == [
        (2, 0, "diffedit"), (2, 0, "sdedit"), (2, 7, "diffedit"), (2, 7, "sdedit")]


def test_the_summary_pair_is_written_whole_or_not_at_all(grid_run, tmp_path, monkeypatch):
    """The second of the two summary files fails to write: the first keeps its previous contents."""
    import shutil

    from diffedit import outputs

    out = tmp_path / "copy"
    shutil.copytree(grid_run, out)
    before = {name: (out / name).read_text() for name in ("summary.csv", "summary.md")}
    rows = records(out)
    for r in rows:
        r["mask_iou"] = "0.123"  # a different summary, if it were written
    real = outputs.Path.write_text

    def fails_for_md(self, *args, **kwargs):
        if ".summary.md." in self.name:
            raise OSError("disk full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(outputs.Path, "write_text", fails_for_md)
    with pytest.raises(OSError, match="disk full"):
        experiment.write_summary(rows, ["inpaint_strength"], out)
    monkeypatch.undo()
    assert {name: (out / name).read_text() for name in before} == before
    assert not list(out.glob(".summary*"))  # no temporary file left behind
    experiment.write_summary(rows, ["inpaint_strength"], out)
    assert "0.123" in (out / "summary.csv").read_text()


def test_the_sampler_is_a_sweepable_setting(tmp_path):
    path = experiment.run_experiment(tmp_path / "s", n=1, methods=["diffedit"], sweep=[("sampler", ["ddim",
                                     "dpmsolver++"])], param={"num_inference_steps": 10, "num_maps_per_mask": 2})
    rows = records(path.parent)
    assert [r["sampler"] for r in rows] == ["ddim", "dpmsolver++"]
    # each sampler's own decoding timesteps at r = 0.6, guided at t >= 300: DDIM 501, 401, 301 (of 501 .. 1);
    # DPM-Solver++ 541, 451, 361 (of 541 .. 91)
    assert rows[0]["guided_steps"] == rows[1]["guided_steps"] == "3"
    assert rows[0]["mask_iou"] != rows[1]["mask_iou"] or rows[0]["psnr_db"] != rows[1]["psnr_db"]


def test_a_preset_fixes_its_fields_under_param_and_sweep_and_is_recorded(tmp_path):
    """fast's step count is fixed with --param's fields; a sweep over it is the sweep's (no field passed twice)."""
    path = experiment.run_experiment(tmp_path / "p", n=1, methods=["diffedit"], preset="fast",
                                     param={"num_maps_per_mask": 2})
    config = json.loads((path.parent / "config.json").read_text())
    assert config["preset"] == "fast" and config["param"] == {"num_inference_steps": 15, "num_maps_per_mask": 2}
    path = experiment.run_experiment(tmp_path / "s", n=1, methods=["diffedit"], preset="fast",
                                     sweep=[("num_inference_steps", [4, 6])], param={"num_maps_per_mask": 2})
    assert json.loads((path.parent / "config.json").read_text())["param"] == {"num_maps_per_mask": 2}
    assert [r["num_inference_steps"] for r in records(path.parent)] == ["4", "6"]
    with pytest.raises(BadInput, match="--preset 'slow': choose from fast"):
        experiment.run_experiment(tmp_path / "q", n=1, preset="slow")


def test_compile_compiles_the_unet_before_the_rows_and_is_recorded(tmp_path, monkeypatch):
    from diffedit import StableDiffusion

    modes = []
    monkeypatch.setattr(StableDiffusion, "compile_unet", lambda self, mode: modes.append(mode))
    path = experiment.run_experiment(tmp_path / "c", n=1, compile_mode="max-autotune",
                                     param={"num_inference_steps": 4, "num_maps_per_mask": 2})
    assert modes == ["max-autotune"] and json.loads((path.parent / "config.json").read_text())["compile"] == \
        "max-autotune"

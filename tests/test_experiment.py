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

SMALL_PARAMS = ("num_inference_steps=8", "num_maps_per_mask=2")
SMALL = ["--n", "2", *(arg for value in SMALL_PARAMS for arg in ("--param", value)), "--quiet"]


def small_with(extra: list[str]) -> list[str]:
    """SMALL, then `extra`, without SMALL's --param of a field that `extra` fixes itself (a field is fixed once)."""
    own = {value.split("=")[0] for flag, value in zip(extra, extra[1:]) if flag == "--param"}
    params = [arg for value in SMALL_PARAMS if value.split("=")[0] not in own for arg in ("--param", value)]
    return ["--n", "2", *params, "--quiet", *extra]


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


def test_an_interrupted_run_says_what_it_kept_and_resumes_to_the_same_records(grid_run, tmp_path, monkeypatch,
                                                                                 capsys):
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
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing was written" not in err[0], err  # config.json and four rows were
    assert f"kept {out / 'config.json'} and the 4 rows finished so far" in err[0] and "--resume to continue" in err[0]
    with open(out / "records.csv", "a") as f:
        f.write("shapes-0-0,colour,sdedit,0,0.4,0.5")  # a row cut mid-line
    monkeypatch.setattr(experiment, "run_job", run_job)
    assert cli.main(argv) == 2  # not without --resume
    assert cli.main([*argv, "--resume"]) == 0
    assert without_seconds(records(out)) == without_seconds(records(grid_run))


def test_an_interrupt_before_anything_is_written_says_so(tmp_path, monkeypatch, capsys):
    from diffedit import StableDiffusion

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(StableDiffusion, "from_pretrained", interrupted)
    assert cli.main(["experiment", "--out", str(tmp_path / "run"), *SMALL]) == 130
    assert "interrupted; nothing was written" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_one_process_resumes_an_interrupted_torchrun_run_from_its_shards(grid_run, tmp_path, monkeypatch):
    """Rank 1 of two finished its jobs into shards/records-1.csv, rank 0 none: a one-process --resume computes only
    rank 0's jobs and merges both into the uninterrupted run's records."""
    import shutil

    out = tmp_path / "run"
    (out / "shards").mkdir(parents=True)
    shutil.copy(grid_run / "config.json", out)
    methods = list(experiment.METHOD_NAMES)
    jobs = experiment.plan_jobs(experiment.shapes_cases(2, 0), methods, [0, 3], 1)
    rank_1 = {(case.id, job.method, str(job.seed)) for job in experiment.shard(jobs, methods, 1, 2)
              for _, case in job.cases}
    kept = [r for r in records(grid_run) if (r["edit"], r["method"], r["seed"]) in rank_1]
    with open(out / "shards" / "records-1.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(kept[0]))
        writer.writeheader()
        writer.writerows(kept)
    run_job, calls = experiment.run_job, []
    monkeypatch.setattr(experiment, "run_job", lambda *args: calls.append(args[1]) or run_job(*args))
    assert cli.main(["experiment", "--out", str(out), "--methods", ",".join(methods), "--sweep",
                     "inpaint_strength=0.4,0.6", "--seeds", "0,3", *SMALL, "--resume"]) == 0
    rows_of = lambda job_list: [([i for i, _ in job.cases], job.method, job.seed) for job in job_list]
    assert rows_of(calls) == rows_of(experiment.shard(jobs, methods, 0, 2)) and 0 < len(kept) < len(records(grid_run))
    assert without_seconds(records(out)) == without_seconds(records(grid_run)) and not (out / "shards").exists()


def test_a_swept_null_is_written_as_null_and_resume_keeps_its_rows(tmp_path, monkeypatch):
    argv = ["experiment", "--out", str(tmp_path / "run"), "--sweep", "clip_skip=null,1", *small_with(["--n", "1"])]
    assert cli.main(argv) == 0
    rows = records(tmp_path / "run")
    assert [r["clip_skip"] for r in rows] == ["null", "1"]
    monkeypatch.setattr(experiment, "run_job", lambda *a: pytest.fail("a finished row was computed again"))
    assert cli.main([*argv, "--resume"]) == 0 and records(tmp_path / "run") == rows


@pytest.mark.parametrize("resume", [False, True])
def test_a_folder_with_a_runs_files_but_no_config_is_refused_and_left_as_it_was(resume, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "records.csv").write_text("edit,kind\nx,colour\n")
    code = cli.main(["experiment", "--out", str(out), *SMALL, *(["--resume"] if resume else [])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "holds part of a run (records.csv) but no config.json" in err[0], err
    assert sorted(p.name for p in out.iterdir()) == ["records.csv"]
    assert (out / "records.csv").read_text() == "edit,kind\nx,colour\n"


def test_the_largest_seed_runs_as_far_as_its_last_edits_generator(tmp_path):
    path = experiment.run_experiment(tmp_path / "s", n=2, methods=["sdedit"], seeds=[2**63 - 1],
                                     param={"num_inference_steps": 4})
    assert [r["seed"] for r in records(path.parent)] == [str(2**63 - 1)] * 2


def change_manifest(folder, model):
    lines = (folder / "m.jsonl").read_text().replace("into", "to")
    (folder / "m.jsonl").write_text(lines)


def change_stored_defaults(folder, model):
    defaults = json.loads((model / "diffedit.json").read_text())
    (model / "diffedit.json").write_text(json.dumps({**defaults, "mask_thresholding_ratio": 2.5}))


def change_weights(folder, model):
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the last weight's lowest bits: the file still loads
    weights.write_bytes(bytes(data))


@pytest.mark.parametrize("change, message", [
    (change_manifest, "edits_digest \"[0-9a-f]+\" -> \"[0-9a-f]+\" \\(the edits' pictures, texts or ids changed\\)"),
    (change_stored_defaults, "model_edit_defaults .*\"mask_thresholding_ratio\": 4.0.* -> .*"
                             "\"mask_thresholding_ratio\": 2.5.*diffedit.json changed"),
    (change_weights, "model_fingerprint \"[0-9a-f]+\" -> \"[0-9a-f]+\" \\(the model's weights or configs changed\\)"),
    # both at once: both named (the model was compared only after the edits matched, so one went unnamed)
    (lambda folder, model: change_manifest(folder, model) or change_weights(folder, model),
     "edits_digest .*pictures, texts or ids changed\\); model_fingerprint .*weights or configs changed\\)"),
])
def test_resume_refuses_other_inputs_naming_what_changed_and_keeps_the_run(change, message, tmp_path, capsys):
    import re
    import shutil

    from diffedit import shapes
    from diffedit.locations import SHIPPED_MODEL

    model = tmp_path / "model"
    shutil.copytree(SHIPPED_MODEL, model)
    edit = evaluate.heldout_edits(1, 5)[0]
    Image.fromarray(shapes.render(edit.source)[0]).save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "source": edit.source.caption,
                                                  "target": f"turn it into {edit.target.caption}"}) + "\n")
    argv = ["experiment", "--out", str(tmp_path / "run"), "--edits", str(tmp_path / "m.jsonl"), "--model",
            str(model), "--param", "num_inference_steps=4", "--param", "num_maps_per_mask=2", "--quiet"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    change(tmp_path, model)
    assert cli.main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before


def test_resume_with_other_settings_names_each_one_old_and_new(grid_run, tmp_path, capsys):
    import shutil

    shutil.copytree(grid_run, tmp_path / "run")
    code = cli.main(["experiment", "--out", str(tmp_path / "run"), "--methods", "diffedit", "--sweep",
                     "inpaint_strength=0.4,0.6", "--seeds", "0,4", *SMALL, "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert 'methods ["diffedit", "diffedit-gt-mask", "encode-decode", "sdedit"] -> ["diffedit"]; seeds [0, 3] -> ' \
        '[0, 4]; resume it with its own settings' in err[0], err


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
    (["--sweep", "inpaint_strength=0.4,0.4"], "--sweep inpaint_strength: 0.4 given twice"),
    (["--sweep", "inpaint_strength=0.4,0.40"], "--sweep inpaint_strength: 0.4 given twice"),  # one number
    (["--seeds", "0,3,0"], "--seeds 0,3,0: 0 given twice"),
    (["--methods", "diffedit,sdedit,diffedit"], "--methods: diffedit given twice"),
    (["--param", "eta=0", "--param", "eta=1"], "--param: eta given twice"),
    (["--seeds", "99999999999999999999"], "seeds are ints in [0, 9223372036854775807]"),
    (["--seeds", "0,18446744073709551615"], "seeds are ints in [0, 9223372036854775807]"),  # + the edit's index
    (["--out", ""], "--out is empty"),
    (["--out", "  "], "--out is empty"),
    (["--param", "=3"], "'=3' has no parameter name before '='"),
    (["--sweep", "=3,4"], "'=3,4' has no field name before '='"),
    (["--param", "lora_scale=0.5"], "--param lora_scale: diffedit experiment loads no LoRA"),
    (["--sweep", "lora_scale=0.5,1"], "--sweep lora_scale: diffedit experiment loads no LoRA"),
])
def test_bad_configurations_are_refused_before_any_work(extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(experiment, "run_job", lambda *a: pytest.fail("work started"))
    monkeypatch.chdir(tmp_path)  # --out "" would be the current folder
    code = cli.main(["experiment", "--out", str(tmp_path / "run"), *small_with(extra)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []  # nothing written, anywhere


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
    ('{"image": "missing.png", "source": "a", "target": "b"}', "line 1: input image"),
    ('{"image": "missing.png", "source": "a", "target": "b"}', "missing.png does not exist"),
    ('{"image": "a.png", "source": "a", "target": "b", "mask": "gone.png"}', "line 1: mask"),
    ('{"image": "a.png", "source": "a", "target": "b", "colour": "red"}', "unknown fields ['colour']"),
])
def test_a_bad_manifest_line_is_named(line, message, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(line + "\n")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        experiment.manifest_cases(tmp_path / "m.jsonl")


@pytest.mark.parametrize("case_id", ["../../ESCAPED", "/tmp/abs", "", ".", "..", "a/b", "a\\b", "a\u0000b"])
def test_an_id_that_is_not_a_plain_file_name_is_refused_with_its_line_and_nothing_is_written(case_id, tmp_path,
                                                                                            capsys):
    """ids name folders under examples/: one that would leave --out (or name no folder) is refused before work."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = {"image": "a.png", "source": "a", "target": "b"}
    (tmp_path / "m.jsonl").write_text(f"{json.dumps(good)}\n{json.dumps({**good, 'id': case_id})}\n")
    with pytest.raises(experiment.ManifestError, match="line 2: id .* is not a plain file name"):
        experiment.manifest_cases(tmp_path / "m.jsonl")
    work = tmp_path / "deep" / "er"
    work.mkdir(parents=True)
    code = cli.main(["experiment", "--out", str(work / "run"), "--edits", str(tmp_path / "m.jsonl"), *SMALL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "line 2: id" in err[0], err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.png", "deep", "er", "m.jsonl"]


def test_manifest_lines_are_numbered_as_in_the_file_blank_lines_counting(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = json.dumps({"image": "a.png", "source": "a", "target": "b"})
    (tmp_path / "m.jsonl").write_text(f"\n{good}\n   \n{good}\n")
    assert [c.id for c in experiment.manifest_cases(tmp_path / "m.jsonl")] == ["line-2", "line-4"]
    (tmp_path / "m.jsonl").write_text(f"{good}\n\n\n{{not json\n")
    with pytest.raises(experiment.ManifestError, match="line 4: not JSON"):
        experiment.manifest_cases(tmp_path / "m.jsonl")


def test_a_manifest_must_be_utf8_and_may_begin_with_a_byte_order_mark(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = json.dumps({"image": "a.png", "source": "a caf\u00e9", "target": "b"}, ensure_ascii=False)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\n")
    assert [c.source for c in experiment.manifest_cases(tmp_path / "bom.jsonl")] == ["a caf\u00e9"]
    (tmp_path / "latin1.jsonl").write_bytes(good.encode() + b"\n" + good.encode("latin-1") + b"\n")
    with pytest.raises(experiment.ManifestError, match=r"line 2: not UTF-8 text \(byte 0xe9\); save the manifest"):
        experiment.manifest_cases(tmp_path / "latin1.jsonl")
    code = cli.main(["experiment", "--out", str(tmp_path / "run"), "--edits", str(tmp_path / "latin1.jsonl"), *SMALL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not UTF-8 text" in err[0], err


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
    assert (mean, n) == (2.0, 3) and half == pytest.approx(4.302652730 * 1.0 / 3**0.5)  # Student's t, 2 df


def test_the_95_percent_interval_takes_students_t_so_few_rows_are_not_overconfident():
    """The interval of a mean over n rows is t(n - 1) s / sqrt(n): the normal 1.96 covers far less than 95% of
    small samples (6.5 times too narrow at n = 2). Quantiles from published tables (scipy.stats.t.ppf(0.975, df))."""
    table = {1: 12.706204736, 2: 4.302652730, 4: 2.776445105, 10: 2.228138852, 30: 2.042272456, 39: 2.022690920,
             199: 1.971956544, 200: 1.971896224, 1000: 1.962339081, 100000: 1.959987708}
    for df, t in table.items():
        assert experiment.t_975(df) == pytest.approx(t, abs=1e-8), df
    mean, half, n = experiment.mean_ci([0.0, 1.0])
    assert (mean, n) == (0.5, 2) and half == pytest.approx(12.706204736 * 0.5**0.5 / 2**0.5)
    assert np.isnan(experiment.mean_ci([4.0])[1])  # one row: no interval


def test_the_best_threshold_may_select_nothing_so_it_is_never_below_an_empty_masks_iou():
    """A threshold above the map's maximum selects no pixel: against an empty ground-truth region (a manifest's
    blank mask) that is IoU 1, as `iou` scores an empty mask there, so the best threshold's IoU is 1, not 0."""
    empty = np.zeros((1, 4), bool)
    assert experiment.best_threshold_iou(np.array([[0.9, 0.1, 0.5, 0.2]]), empty) == 1.0
    assert experiment.best_threshold_iou(np.full((1, 4), 0.3), empty) == 1.0  # a flat map too


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


def test_plots_a_manifest_cannot_give_are_named_on_stderr_with_the_reason(tmp_path, capsys):
    """A manifest without masks: no judge and no ground truth, so neither the trade-off nor the mask plot can be
    drawn; each is named with why, and no empty plots/ is left."""
    Image.new("RGB", (32, 32), "pink").save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "source": "a", "target": "b"}) + "\n")
    assert cli.main(["experiment", "--out", str(tmp_path / "run"), "--edits", str(tmp_path / "m.jsonl"),
                     "--sweep", "inpaint_strength=0.4,0.6", "--sweep", "mask_thresholding_ratio=3", *SMALL]) == 0
    err = capsys.readouterr().err
    assert "note: no plots/tradeoff.png: no row has both an edit success and a background PSNR" in err
    assert "note: no plots/mask_iou_vs_mask_thresholding_ratio.png: no diffedit row has a mask IoU" in err
    assert not (tmp_path / "run" / "plots").exists()


def test_the_same_run_from_python(grid_run, tmp_path):
    import diffedit

    path = diffedit.run_experiment(tmp_path / "py", n=2, methods=["diffedit", "diffedit-gt-mask", "encode-decode",
                                                                  "sdedit"],
                                   sweep=[("inpaint_strength", [0.4, 0.6])], seeds=(0, 3),
                                   param={"num_inference_steps": 8, "num_maps_per_mask": 2})
    assert without_seconds(records(path.parent)) == without_seconds(records(grid_run))
    with pytest.raises(ValueError, match="--methods: unknown magic"):
        diffedit.run_experiment(tmp_path / "bad", methods=["magic"])
    with pytest.raises(ValueError, match="seeds are ints in"):
        diffedit.run_experiment(tmp_path / "bad", seeds=[-1])
    with pytest.raises(ValueError, match="--out is empty"):
        diffedit.run_experiment("")


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


def test_the_summary_counts_the_rows_behind_each_metric_when_some_cells_are_empty(tmp_path):
    """A metric's empty cells (an AUROC or background PSNR a region cannot give) are left out of its mean; the
    summary says how many rows it is over, so a mean of 1 row is not read as one of the group's 3."""
    base = {m: "0.5" for m in experiment.METRICS}
    rows = [{"edit": f"e{i}", "kind": "", "method": "diffedit", "seed": "0", **base} for i in range(3)]
    rows[0].update(map_auroc="", background_psnr_db="")
    rows[1].update(map_auroc="")
    experiment.write_summary(rows, [], tmp_path)
    with open(tmp_path / "summary.csv", newline="") as f:
        (summary,) = list(csv.DictReader(f))
    assert summary["n"] == "3" and summary["map_auroc_n"] == "1" and summary["background_psnr_db_n"] == "2"
    assert summary["mask_iou_n"] == "3" and summary["map_auroc_ci95"] == ""  # one row: no interval
    line = (tmp_path / "summary.md").read_text().splitlines()[-1]
    assert line == "| diffedit | 3 | 0.5 ± 0 | 0.5 ± 0 | 0.5 ± 0 (n=2) | 0.5 ± 0 | 0.5 ± 0 | 0.5 ± 0 |", line


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


QUICK = {"n": 1, "methods": ["sdedit"], "param": {"num_inference_steps": 4, "num_maps_per_mask": 2}}


@pytest.mark.parametrize("change, error, message", [
    ({"n": 0}, ValueError, "--n: expected an integer in \\[1, 100000\\], got 0"),
    ({"n": -1}, ValueError, "--n: expected an integer in \\[1, 100000\\], got -1"),
    ({"n": True}, ValueError, "--n: expected an integer in \\[1, 100000\\], got True"),
    ({"n": "2"}, ValueError, "--n: expected an integer in \\[1, 100000\\], got '2'"),
    ({"n": 2.0}, ValueError, "--n: expected an integer in \\[1, 100000\\], got 2.0"),
    ({"n": 10**15}, ValueError, "--n: expected an integer in \\[1, 100000\\], got 1000000000000000"),
    ({"edit_seed": 2**70}, ValueError, rf"--edit-seed: expected an integer in \[0, {2**63 - 1}\], got {2**70}"),
    ({"edit_seed": -1}, ValueError, "--edit-seed: expected an integer in .* got -1"),
    ({"methods": "diffedit"}, TypeError, "methods: expected a list of method names such as \\[\"diffedit\"\\], got "
                                         "str 'diffedit'"),
    ({"methods": [3]}, TypeError, "methods: expected a list of method names"),
    ({"seeds": 5}, TypeError, "seeds: expected a list of seeds \\(ints\\) such as \\[0, 1\\], got int"),
    ({"seeds": "0"}, TypeError, "seeds: expected a list of seeds"),
    ({"sweep": [("eta", 0.5)]}, TypeError, "sweep: eta's values must be a list"),
    ({"sweep": ["eta"]}, TypeError, r"sweep: expected \[\(field, \[values\]\), ...\] or \{field: \[values\]\}; 'eta' "
                                    "is not a"),
    ({"param": [("eta", 1)]}, TypeError, "param: expected None or a dict"),
    ({"compile_mode": "bogus"}, ValueError, "--compile bogus: expected one of default, reduce-overhead, max-autotune"),
    ({"compile_mode": 1}, TypeError, "compile_mode: expected None or a mode name"),
    ({"device": "gpu"}, ValueError, "--device: expected one of auto, cpu, cuda, mps, got 'gpu'"),
    ({"resume": "no"}, TypeError, "resume: expected True or False"),
    ({"model": 3}, TypeError, "model: expected None \\(the shipped model\\), a folder or hub repo id, or a loaded "
                              "StableDiffusion"),
    ({"edits": 3}, TypeError, "edits: expected \"shapes\" or a manifest's path"),
    ({"param": {"num_inference_steps": 4, "lora_scale": 0.5}}, ValueError, "--param lora_scale: diffedit experiment "
                                                                         "loads no LoRA"),
])
def test_the_python_api_refuses_what_the_flags_refuse_and_wrong_types_before_any_work(change, error, message, tmp_path,
                                                                                      monkeypatch):
    """run_experiment(n=0) used to write an empty run, n=True ran one edit, edit_seed=2**70 ran, and the rest failed
    with Python's or torch's own words (after loading the model, for compile_mode): now the flags' messages (a
    ValueError) or a TypeError naming the argument, and nothing written."""
    from diffedit import StableDiffusion

    monkeypatch.setattr(StableDiffusion, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(experiment, "shapes_cases", lambda *a: pytest.fail("the edits were drawn"))
    with pytest.raises(error, match=message):
        experiment.run_experiment(tmp_path / "run", **{**QUICK, **change})
    assert list(tmp_path.iterdir()) == []


def test_out_none_is_refused_rather_than_a_folder_named_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError, match="out: expected the run's folder"):
        experiment.run_experiment(None, **QUICK)
    assert list(tmp_path.iterdir()) == []


def test_an_edit_count_past_the_cap_is_refused_before_the_edits_are_drawn(tmp_path, monkeypatch):
    """A row's generator takes seed + the edit's index up to 2**64 - 1 (the largest seed runs two edits: above);
    with at most MAX_EDITS edits no seed in range reaches past it, and a larger count (2**64 would have) is
    refused before the edits are drawn."""
    monkeypatch.setattr(experiment, "shapes_cases", lambda *a: pytest.fail("the edits were drawn"))
    assert 2**63 - 1 + experiment.MAX_EDITS - 1 <= experiment.GENERATOR_SEED_MAX
    with pytest.raises(ValueError, match=f"--n: expected an integer in \\[1, 100000\\], got {2**64}"):
        experiment.run_experiment(tmp_path / "run", n=2**64, seeds=[0, 2**63 - 1])
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_dict_numpy_ints_and_a_loaded_model_give_the_runs_records(tmp_path):
    """{field: [values]} is the sweep's pairs; numpy ints are ints (config.json holds plain ints); a loaded
    StableDiffusion runs as the folder it came from would (the same fingerprint, so either resumes the other)."""
    from diffedit import StableDiffusion
    from diffedit.locations import SHIPPED_MODEL

    listed = experiment.run_experiment(tmp_path / "listed", **QUICK, sweep=[("inpaint_strength", [0.4, 0.6])],
                                       seeds=[1], batch_size=1)
    given = experiment.run_experiment(tmp_path / "given", **QUICK, sweep={"inpaint_strength": [0.4, 0.6]},
                                      seeds=[np.int64(1)], batch_size=np.int64(1),
                                      model=StableDiffusion.from_pretrained(SHIPPED_MODEL))
    assert without_seconds(records(given.parent)) == without_seconds(records(listed.parent))
    one, other = (json.loads((p.parent / "config.json").read_text()) for p in (listed, given))
    assert other["seeds"] == [1] and other["batch_size"] == 1 and other["sweep"] == one["sweep"]
    assert other["model_fingerprint"] == one["model_fingerprint"] and other["model"] == one["model"]
    experiment.run_experiment(tmp_path / "given", **QUICK, sweep=[("inpaint_strength", [0.4, 0.6])], seeds=[1],
                              resume=True)


def test_a_loaded_model_on_another_device_is_refused(tmp_path):
    from diffedit import StableDiffusion
    from diffedit.locations import SHIPPED_MODEL

    sd = StableDiffusion.from_pretrained(SHIPPED_MODEL)
    with pytest.raises(ValueError, match="--device (cuda|mps)"):
        experiment.run_experiment(tmp_path / "run", **QUICK, model=sd, device="mps" if torch.cuda.is_available()
                                  else "cuda")
    assert list(tmp_path.iterdir()) == []


def test_lora_scale_acts_on_a_loaded_model_with_an_adapter_and_the_adapter_is_in_the_fingerprint(tmp_path):
    from safetensors.torch import save_file

    from diffedit import StableDiffusion
    from diffedit.locations import SHIPPED_MODEL

    sd = StableDiffusion.from_pretrained(SHIPPED_MODEL)
    name, layer = next((n, m) for n, m in sd.unet.named_modules() if n.endswith("attn2.to_v"))
    flat, draw = "lora_unet_" + name.replace(".", "_"), torch.Generator().manual_seed(0)
    save_file({f"{flat}.lora_down.weight": torch.randn(1, layer.in_features, generator=draw),
               f"{flat}.lora_up.weight": torch.randn(layer.out_features, 1, generator=draw)},
              str(tmp_path / "style.safetensors"))
    plain = experiment.run_experiment(tmp_path / "plain", **QUICK)
    sd.load_lora_weights(tmp_path / "style.safetensors", adapter_name="style")
    path = experiment.run_experiment(tmp_path / "lora", **QUICK, model=sd, sweep={"lora_scale": [0.0, 1.0]})
    rows = records(path.parent)
    assert [r["lora_scale"] for r in rows] == ["0.0", "1.0"] and rows[0]["psnr_db"] != rows[1]["psnr_db"]
    configs = [json.loads((p.parent / "config.json").read_text()) for p in (plain, path)]
    assert configs[1]["model_fingerprint"].startswith(configs[0]["model_fingerprint"] + "+")
    sd.set_adapters("style", 0.5)  # the same file at another weight: another model
    with pytest.raises(ValueError, match="model_fingerprint .*the model's weights or configs changed"):
        experiment.run_experiment(tmp_path / "lora", **QUICK, model=sd, sweep={"lora_scale": [0.0, 1.0]}, resume=True)
    sd.unload_lora_weights()
    with pytest.raises(ValueError, match="--sweep lora_scale: diffedit experiment loads no LoRA"):
        experiment.run_experiment(tmp_path / "lora", **QUICK, model=sd, sweep={"lora_scale": [0.0, 1.0]}, resume=True)


@pytest.mark.parametrize("where, message", [
    (lambda model, tmp: model, "--out {out} is the model's folder {model}"),
    (lambda model, tmp: model / "run", "--out {out} is inside the model's folder {model}"),
    (lambda model, tmp: model / "unet", "--out {out} is inside the model's folder {model}"),
    (lambda model, tmp: tmp / "link" / "run", "--out {out} is inside the model's folder {model}"),
])
def test_a_run_folder_that_is_or_is_inside_the_models_folder_is_refused_before_any_work(where, message, tmp_path,
                                                                                         capsys):
    import shutil

    from diffedit.locations import SHIPPED_MODEL

    model = shutil.copytree(SHIPPED_MODEL, tmp_path / "m3")
    (tmp_path / "link").symlink_to(model)
    out = where(model, tmp_path)
    before = {p: p.read_bytes() for p in sorted(model.rglob("*")) if p.is_file()}
    code = cli.main(["experiment", "--out", str(out), "--model", str(model), *SMALL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message.format(out=out, model=model) in err[0], err
    assert {p: p.read_bytes() for p in sorted(model.rglob("*")) if p.is_file()} == before


def test_a_model_or_manifest_where_the_run_writes_its_files_is_refused(tmp_path, capsys):
    import shutil

    from diffedit.locations import SHIPPED_MODEL

    model = shutil.copytree(SHIPPED_MODEL, tmp_path / "run" / "examples" / "m")
    code = cli.main(["experiment", "--out", str(tmp_path / "run"), "--model", str(model), *SMALL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "the run writes examples there, which would overwrite the model" in err[0]
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "records.csv").write_text(json.dumps({"image": "a.png", "source": "a", "target": "b"}) + "\n")
    code = cli.main(["experiment", "--out", str(tmp_path), "--edits", str(tmp_path / "records.csv"), *SMALL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "the run writes records.csv there, which would overwrite the --edits manifest" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "records.csv", "run"]


def test_invalid_stored_defaults_are_named_by_their_file(tmp_path, capsys):
    import shutil

    from diffedit.locations import SHIPPED_MODEL

    model = shutil.copytree(SHIPPED_MODEL, tmp_path / "m4")
    (model / "diffedit.json").write_text('{"guidance_scale": -1}')
    code = cli.main(["experiment", "--out", str(tmp_path / "run"), "--model", str(model), *SMALL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"diffedit: error: {model / 'diffedit.json'}: the model's stored edit defaults are "
                             "invalid") and "setting" not in err[0]


@pytest.mark.parametrize("line, message", [
    ('{"image": "a.png", "source": "a", "target": "b", "target": "c"}', "line 1: target given twice; give each"),
    ('{"image": "a.png", "source": "a", "target": 3}', "line 1: target must be a string, got 3"),
    ('{"image": "a.png", "source": "a", "target": "b", "mask": null}', "mask must be a string, got null: leave mask"),
    ('{"image": "a.png", "source": "a"}', "line 1: target missing"),
    ('{"image": " ", "source": "a", "target": "b"}', "line 1: image is empty: give the picture's path"),
    ('["a.png", "a", "b"]', 'got an array: write {"image"'),
    ('# my edits', "line 1: not JSON .*no comments"),
    ('{"image": "a.png", "source": "a", "target": "b", "colour": "red"}', "the fields are image, source, target"),
])
def test_a_manifest_line_with_a_field_twice_or_of_a_wrong_type_is_refused_naming_the_field_and_the_fix(line, message,
                                                                                                       tmp_path):
    """A field given twice ran with the last value, silently; a wrong type or a missing field named no field."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(line + "\n")
    with pytest.raises(experiment.ManifestError, match=message.replace("[", r"\[").replace("]", r"\]")):
        experiment.manifest_cases(tmp_path / "m.jsonl")


def test_ids_that_differ_only_in_case_are_refused_as_one_folder_on_macos_and_windows(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = {"image": "a.png", "source": "a", "target": "b"}
    (tmp_path / "m.jsonl").write_text(f"{json.dumps({**good, 'id': 'Cat'})}\n{json.dumps({**good, 'id': 'cat'})}\n")
    with pytest.raises(experiment.ManifestError, match="line 2: id 'cat' is used twice \\(line 1 has 'Cat'"):
        experiment.manifest_cases(tmp_path / "m.jsonl")


def test_a_manifest_picture_over_max_pixels_is_refused_by_its_line_before_it_is_decoded(tmp_path, capsys):
    """Manifest pictures had no size limit (`diffedit edit` has --max-pixels): a 40-megapixel photo was decoded
    and run through the VAE at full size, after the run had begun writing."""
    Image.new("L", (2049, 2048)).save(tmp_path / "big.png")  # one column past the default 2048x2048
    Image.new("RGB", (40, 40)).save(tmp_path / "small.png")
    good = {"source": "a", "target": "b"}
    (tmp_path / "m.jsonl").write_text(f"{json.dumps({**good, 'image': 'small.png'})}\n"
                                      f"{json.dumps({**good, 'image': 'big.png'})}\n")
    argv = ["experiment", "--out", str(tmp_path / "run"), "--edits", str(tmp_path / "m.jsonl"), *SMALL]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 2: input image" in err[0] and "2049x2048" in err[0], err
    assert "over --max-pixels 4194304: downscale it (to 2048x2047 or less) or pass --max-pixels 4196352" in err[0]
    (tmp_path / "m.jsonl").write_text(json.dumps({**good, "image": "small.png", "mask": "small.png"}) + "\n")
    assert cli.main([*argv, "--max-pixels", "1000"]) == 2
    assert "line 1: input image" in capsys.readouterr().err and not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="line 1: input image .* over --max-pixels 1599"):
        experiment.run_experiment(tmp_path / "run", edits=tmp_path / "m.jsonl", max_pixels=1599)
    with pytest.raises(ValueError, match="--max-pixels 0: expected an int >= 1"):
        experiment.run_experiment(tmp_path / "run", edits=tmp_path / "m.jsonl", max_pixels=0)
    assert [c.image.size for c in experiment.manifest_cases(tmp_path / "m.jsonl", max_pixels=1600)] == [(40, 40)]


def test_the_examples_sheet_heads_each_edit_with_its_source_and_target_texts(tmp_path):
    """A row of pictures said only its id; it now carries the edit's two texts, wrapped to the sheet's width."""
    grid = [{"inpaint_strength": 0.5}]
    for name in ("with", "without"):
        folder = tmp_path / name / "examples" / "e1"
        folder.mkdir(parents=True)
        Image.new("RGB", (64, 64), "pink").save(folder / "input.png")
        Image.new("RGB", (64, 64), "blue").save(folder / f"{experiment.example_name('diffedit', grid[0])}.png")
    long_target = "a blue circle on a pink background with many more words than one line can hold"
    [with_texts] = experiment.example_grids(tmp_path / "with", ["diffedit"], grid, {"e1": ("a red circle",
                                                                                        long_target)})
    [bare] = experiment.example_grids(tmp_path / "without", ["diffedit"], grid)
    a, b = Image.open(with_texts), Image.open(bare)
    assert a.width == b.width and a.height >= b.height + 2 * 16  # the texts took at least two more lines


def test_a_sampler_sweep_on_a_config_dpm_cannot_run_is_refused_before_any_row(sd1_folder, tmp_path, capsys):
    """check_params_for_model builds each setting's schedule: a scheduler config with solver_order 3 (DDIM ignores
    it, DPM-Solver++ refuses it) used to run the ddim rows and then fail on the first dpmsolver++ row."""
    import shutil

    folder = tmp_path / "third-order"
    shutil.copytree(sd1_folder, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "solver_order": 3}))
    out = tmp_path / "run"
    code = cli.main(["experiment", "--model", str(folder), "--out", str(out), "--methods", "encode-decode",
                     "--sweep", "sampler=ddim,dpmsolver++", *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and "solver_order=3 is not supported" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()

"""The evaluation: a fixed held-out edit set, metrics that are exact on ground truth, and the command's report."""

import json

import numpy as np
import pytest
import torch

from diffedit import evaluate, shapes, shipped_model, train

torch.set_num_threads(1)


def test_heldout_set_is_fixed_balanced_and_apart_from_training_data():
    a, b = evaluate.heldout_edits(100, seed=0), evaluate.heldout_edits(100, seed=0)
    assert a == b and a != evaluate.heldout_edits(100, seed=1)
    assert sum(e.kind == "colour" for e in a) == sum(e.kind == "shape" for e in a) == 50
    training = {s for step in range(20) for s in shapes.scenes_from_arrays(
        shapes.sample_arrays(train.step_rng(0, "unet", step), 32))}
    assert not training & {e.source for e in a if e.source.style != "plain"}


def test_heldout_stream_is_prefix_stable():
    long = evaluate.heldout_edits(60, seed=2)
    for k in (0, 1, 2, 7, 40, 60):
        assert evaluate.heldout_edits(k, seed=2) == long[:k]
    assert len(set(long)) == 60 and evaluate.heldout_edits(60, seed=3)[0] != long[0]


def test_ground_truth_targets_succeed_and_untouched_sources_fail():
    for e in evaluate.heldout_edits(40, seed=3):
        target, _ = shapes.render(e.target)
        source, _ = shapes.render(e.source)
        assert evaluate.judge(e, target)[0], e
        assert not evaluate.judge(e, source)[0], e


def test_iou_and_dilation():
    a = np.zeros((8, 8), bool)
    a[2:4, 2:4] = True
    b = np.zeros((8, 8), bool)
    b[3:5, 2:4] = True
    assert evaluate.iou(a, b) == pytest.approx(2 / 6)
    assert evaluate.iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0
    point = np.zeros((11, 11), bool)
    point[5, 5] = True
    assert evaluate.dilate(point, 3).sum() == 29  # lattice points of a radius-3 disk
    assert np.array_equal(evaluate.dilate(point, 0), point)


def disk_dilation(region: np.ndarray, radius: int) -> np.ndarray:
    """The oracle for `evaluate.dilate`: SciPy's binary dilation by scikit-image's disk (x^2 + y^2 <= radius^2)."""
    from scipy.ndimage import binary_dilation
    from skimage.morphology import disk

    return binary_dilation(region, structure=disk(radius))


def test_background_psnr_ignores_the_ring_around_the_region():
    e = evaluate.heldout_edits(2, seed=0)[0]
    source, _ = shapes.render(e.source)
    target, _ = shapes.render(e.target)
    assert evaluate.background_psnr(target, source, e.region) == 100.0  # changes only inside the region
    ring = disk_dilation(e.region, 3) & ~e.region
    damaged = target.copy()
    damaged[ring] = 0
    assert evaluate.background_psnr(damaged, source, e.region) == 100.0
    far = np.argwhere(~disk_dilation(e.region, 3))[0]
    damaged[tuple(far)] = source[tuple(far)] ^ 0xFF
    assert evaluate.background_psnr(damaged, source, e.region) < 100.0


def test_latent_mask_ceiling():
    aligned = np.zeros((64, 64), bool)
    aligned[8:24, 12:32] = True
    assert evaluate.latent_mask_ceiling(aligned, 4) == 1.0
    e = evaluate.heldout_edits(1, seed=0)[0]
    assert 0.5 < evaluate.latent_mask_ceiling(e.region, 4) < 1.0


def test_command_prints_each_goal_and_writes_a_report(tmp_path, capsys):
    torch.manual_seed(0)
    vae, _ = shipped_model.build_vae()
    vocab_size = len(shipped_model.small_clip_vocab()[0])
    text = shipped_model.build_text_encoder(vocab_size).eval()
    folder = shipped_model.export(tmp_path / "model", shipped_model.with_scaling_factor(vae, 1.0).eval(),
                                  shipped_model.build_unet().eval(), text, {"note": "untrained"})
    code = evaluate.main(["--model", str(folder), "--n", "2", "--json", str(tmp_path / "r.json"),
                          "--grid", str(tmp_path / "g.png"), "--quiet", "--param", "num_inference_steps=5",
                          "--param", "num_maps_per_mask=2"])
    out = capsys.readouterr().out
    for goal in evaluate.GOALS:
        assert goal.metric in out
    assert "FAIL" in out and code == 1  # an untrained model meets no quality goal
    table = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in
             {g.metric for g in evaluate.GOALS}]
    assert [row[-1] for row in table if row[0] == "seconds_per_edit"] in (["PASS"], ["FAIL"])  # CPU, one thread
    fails = sum(row[-1] == "FAIL" for row in table)
    assert out.splitlines()[-1] == f"{fails} goal(s) not met" and fails >= 3
    evaluate.main(["--model", str(folder), "--n", "1", "--quiet", "--threads", "2", "--param",
                   "num_inference_steps=5", "--param", "num_maps_per_mask=2"])
    two_threads = capsys.readouterr().out
    assert [line.split()[-1] for line in two_threads.splitlines() if line.startswith("seconds_per_edit")] == ["n/a"]
    assert torch.get_num_threads() == 1  # the caller's thread count is back (later tests' numbers depend on it)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["params"]["num_inference_steps"] == 5 and len(report["edits"]) == 2
    assert {g["metric"] for g in report["goals"]} >= {g.metric for g in evaluate.GOALS}
    assert 0 <= report["summary"]["mask_iou"] <= 1 and (tmp_path / "g.png").is_file()


def test_param_parsing():
    assert evaluate.parse_param("guidance_scale=4") == ("guidance_scale", 4)
    assert evaluate.parse_param("clip_skip=null") == ("clip_skip", None)
    with pytest.raises(Exception):
        evaluate.parse_param("guidance_scale")


# The shipped model on these 20 held-out edits (10 colour, 10 shape) at its defaults: mask IoU 0.575, colour 0.90,
# shape 0.80, background 50.2 dB. Two judged fill ratios lie within 0.006 of the classifier's boundaries (shape edits
# 9 and 19), so a rounding difference could flip them: shape success stays within 0.70-0.90, at or above its goal;
# every colour verdict is at least 0.029 from a boundary. The colour goal (0.95) is a rate over many edits (0.96
# over 1,000, README), and ten colour edits can only show 0.90 or 1.00: one failure (edit 10, a square judged a
# circle) is within it, so these 20 get a floor of 0.90 for colour instead of the goal.
COLOUR_FLOOR_ON_20 = 0.90


def test_shipped_model_meets_the_goals_on_20_heldout_edits_with_a_colour_floor():
    """The timing goal (3 s on one core) is shown by `diffedit evaluate`, not asserted here."""
    from diffedit import StableDiffusion
    from diffedit.locations import SHIPPED_MODEL

    model = StableDiffusion.from_pretrained(SHIPPED_MODEL)
    assert model.vae_scale_factor == 4 and model.edit_defaults
    records = evaluate.score_edits(model, evaluate.heldout_edits(20, seed=0), seed=0, params={}, progress=False)
    summary = evaluate.summarize(records)
    for goal in evaluate.GOALS:
        if goal.metric == "colour_edit_success":
            assert summary["colour_edit_success"] >= COLOUR_FLOOR_ON_20, summary
        elif goal.metric != "seconds_per_edit":
            assert goal.passed(summary[goal.metric]), (goal, summary)


@pytest.mark.parametrize("shape", [(37, 50, 3), (11, 13, 3), (64, 64, 1)])
def test_ssim_map_equals_scikit_images_gaussian_ssim(shape):
    """The oracle: skimage's SSIM with Wang et al.'s settings (Gaussian sigma 1.5, population covariance), whose
    full map we average over channels; down to the smallest picture it takes, the window's 11 px."""
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(sum(shape))
    a = rng.integers(0, 256, shape).astype(np.uint8)
    b = np.clip(a + rng.normal(0, 25, shape), 0, 255).astype(np.uint8)
    _, full = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=255, channel_axis=2, full=True)
    assert np.abs(evaluate.ssim_map(a, b) - full.mean(2)).max() < 1e-12
    assert np.all(evaluate.ssim_map(a, a) == 1.0)


def test_background_ssim_averages_the_map_outside_the_ring_only():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(1)
    source = rng.integers(0, 256, (40, 40, 3)).astype(np.uint8)
    result = np.clip(source + rng.normal(0, 30, source.shape), 0, 255).astype(np.uint8)
    region = np.zeros((40, 40), bool)
    region[10:20, 12:25] = True
    _, full = structural_similarity(result, source, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=255, channel_axis=2, full=True)
    keep = ~disk_dilation(region, 3)
    assert evaluate.background_ssim(result, source, region) == pytest.approx(full.mean(2)[keep].mean(), abs=1e-12)
    inside = source.copy()
    inside[region] = 255 - inside[region]  # changed only inside the region: pixels > 3 + 5 px away stay at 1
    far = ~disk_dilation(region, 3 + 5)
    assert np.all(evaluate.ssim_map(inside, source)[far] == 1.0)
    assert evaluate.background_ssim(inside, source, region) < 1.0  # the 4-8 px band sees the change


def test_mask_agreement_counts_on_hand_built_masks():
    truth = np.array([[True, True, True, False]])
    pred = np.array([[True, False, False, True]])
    assert evaluate.mask_agreement(pred, truth) == pytest.approx({"iou": 1 / 4, "recall": 1 / 3, "precision": 1 / 2})
    none = np.zeros((1, 4), bool)
    assert evaluate.mask_agreement(none, truth) == {"iou": 0.0, "recall": 0.0, "precision": 0.0}  # found nothing
    assert evaluate.mask_agreement(pred, none) == {"iou": 0.0, "recall": 0.0, "precision": 0.0}  # nothing to find
    assert evaluate.mask_agreement(none, none)["iou"] == 1.0  # both empty: they agree


def test_goals_pass_at_exactly_their_value():
    at_least = evaluate.Goal("mask_iou", ">=", 0.55)
    at_most = evaluate.Goal("seconds_per_edit", "<=", 3.0)
    assert at_least.passed(0.55) and not at_least.passed(np.nextafter(0.55, 0))
    assert at_most.passed(3.0) and not at_most.passed(np.nextafter(3.0, 4))


def test_psnr_on_hand_computed_errors():
    from skimage.metrics import peak_signal_noise_ratio

    a = np.zeros((2, 2, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 12  # squared error 144 over 12 values: mse 12; 10 log10(65025 / 12) = 10 log10(5418.75) = 37.34 dB
    assert evaluate.psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=1e-12)
    assert evaluate.psnr(a, b) == pytest.approx(37.339, abs=1e-3)
    assert evaluate.psnr(a, np.full_like(a, 255)) == 0.0  # the largest error: 0 dB
    assert evaluate.psnr(a, a) == 100.0  # equal pictures: the cap


def test_the_background_ring_reaches_exactly_its_radius():
    """Pixels at distance exactly 3 from the region are in the ring (not scored); at sqrt(10) > 3 they are scored."""
    region = np.zeros((9, 9), bool)
    region[4, 4] = True
    ring = evaluate.dilate(region, 3)
    assert ring[4, 7] and ring[1, 4] and ring[6, 6]  # distances 3, 3, sqrt(8)
    assert not ring[5, 7] and not ring[7, 7]  # sqrt(10), sqrt(18)


def test_each_edit_is_scored_at_seed_plus_its_index_and_reproducibly():
    """Edit i runs at seed + i: the second edit of a run at seed 5 is the first edit of a run at seed 6, number for
    number; at seed 5 it differs (the mask step's noise moved). Records are numbered by their edit."""
    from diffedit import StableDiffusion
    from diffedit.locations import SHIPPED_MODEL

    model = StableDiffusion.from_pretrained(SHIPPED_MODEL)
    edits, params = evaluate.heldout_edits(2, seed=0), {"num_inference_steps": 5, "num_maps_per_mask": 2}
    scores = lambda r: (r["iou"], r["background_psnr_db"], r["fill_ratio"], r["_images"][3].tobytes())
    pair = evaluate.score_edits(model, edits, seed=5, params=params, progress=False)
    assert [r["index"] for r in pair] == [0, 1]
    alone = evaluate.score_edits(model, edits[1:], seed=6, params=params, progress=False)[0]
    assert scores(pair[1]) == scores(alone)
    other_seed = evaluate.score_edits(model, edits[1:], seed=5, params=params, progress=False)[0]
    assert scores(other_seed) != scores(alone)


def test_background_ssim_is_nan_when_the_ring_covers_the_whole_picture():
    """No pixel outside the region's ring: no background to compare, NaN (and quietly: no empty-mean warning)."""
    import warnings

    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (12, 12, 3)).astype(np.uint8) for _ in range(2))
    region = np.zeros((12, 12), bool)
    region[1:11, 1:11] = True  # every pixel of the 12x12 picture is within 3 px of it (the corners at sqrt(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(evaluate.background_ssim(a, b, region))
    region[:] = False
    region[0, 0] = True
    assert 0 < evaluate.background_ssim(a, a, region) == pytest.approx(1.0)


@pytest.mark.parametrize("timing_applies", [True, False])
def test_the_report_gives_each_goal_its_verdict_at_and_around_its_bound(timing_applies):
    """Hand-made summary: IoU exactly at its floor passes (>=), colour one step under fails, seconds exactly at the
    ceiling passes (<=) when timing applies and is "n/a" otherwise; the extra metrics are "info" rows."""
    summary = {"mask_iou": 0.55, "colour_edit_success": 0.949, "shape_edit_success": 0.7,
               "background_psnr_db": 35.25, "seconds_per_edit": 3.0, "mask_recall": 0.5, "mask_precision": 0.25,
               "mask_iou_ceiling": 0.875, "background_psnr_db_min": 30.0}
    assert evaluate.report_lines(summary, timing_applies) == [
        ("mask_iou", "0.550", ">= 0.55 (aim 0.65)", "PASS"),
        ("colour_edit_success", "0.949", ">= 0.95", "FAIL"),
        ("shape_edit_success", "0.700", ">= 0.7", "PASS"),
        ("background_psnr_db", "35.250", ">= 35", "PASS"),
        ("seconds_per_edit", "3.000", "<= 3", "PASS" if timing_applies else "n/a"),
        ("mask_recall", "0.500", "", "info"), ("mask_precision", "0.250", "", "info"),
        ("mask_iou_ceiling", "0.875", "", "info"), ("background_psnr_db_min", "30.000", "", "info")]
    slow = evaluate.report_lines({**summary, "seconds_per_edit": 3.001}, timing_applies)
    assert slow[4][3] == ("FAIL" if timing_applies else "n/a")


def test_summary_means_each_kind_over_its_own_edits_and_drops_the_first_time():
    """Hand-made records: colour success is the colour edit's (1 of 1), shape success the shape edits' (1 of 2), the
    time is the median without the first (warm-up) edit: median(1, 3) = 2; a single edit keeps its time."""
    base = {"iou": 0.5, "recall": 0.5, "precision": 0.5, "ceiling": 0.75, "background_psnr_db": 40.0}
    records = [{**base, "kind": "colour", "success": True, "seconds": 9.0},
               {**base, "kind": "shape", "success": False, "seconds": 1.0, "background_psnr_db": 30.0},
               {**base, "kind": "shape", "success": True, "seconds": 3.0}]
    s = evaluate.summarize(records)
    assert s["n"] == 3 and s["colour_edit_success"] == 1.0 and s["shape_edit_success"] == 0.5
    assert s["seconds_per_edit"] == 2.0 and s["background_psnr_db_min"] == 30.0
    assert s["background_psnr_db"] == pytest.approx(110 / 3)
    assert evaluate.summarize(records[:2])["seconds_per_edit"] == 1.0  # two edits: the second's
    assert evaluate.summarize(records[:1])["seconds_per_edit"] == 9.0
    assert np.isnan(evaluate.summarize(records[:1])["shape_edit_success"])


def test_preset_fast_is_recorded_and_runs_under_param_overrides(tmp_path, capsys):
    code = evaluate.main(["--n", "1", "--quiet", "--preset", "fast", "--param", "num_maps_per_mask=2",
                          "--json", str(tmp_path / "r.json")])
    assert code in (0, 1) and "preset fast" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["preset"] == "fast" and report["params"]["num_inference_steps"] == 15
    assert report["params"]["num_maps_per_mask"] == 2
    assert evaluate.main(["--n", "1", "--preset", "slow"]) == 2
    assert "invalid choice: 'slow'" in capsys.readouterr().err


def test_compile_compiles_the_unet_once_before_the_edits(tmp_path, monkeypatch, capsys):
    from diffedit import StableDiffusion

    modes = []
    monkeypatch.setattr(StableDiffusion, "compile_unet", lambda self, mode: modes.append(mode))
    assert evaluate.main(["--n", "1", "--quiet", "--compile", "--param", "num_inference_steps=4"]) in (0, 1)
    assert modes == ["default"]


def test_a_goal_with_no_edits_of_its_kind_is_neither_passed_nor_failed():
    """One edit (a colour edit): shape success has nothing to measure (NaN); it is shown as such, not as a FAIL."""
    summary = {"mask_iou": 0.6, "colour_edit_success": 1.0, "shape_edit_success": float("nan"),
               "background_psnr_db": 40.0, "seconds_per_edit": 1.0, "mask_recall": 0.5, "mask_precision": 0.25,
               "mask_iou_ceiling": 0.875, "background_psnr_db_min": 30.0}
    rows = evaluate.report_lines(summary, True)
    assert rows[2] == ("shape_edit_success", "-", ">= 0.7", "no edits of this kind")
    assert [r[3] for r in rows[:5]] == ["PASS", "PASS", "no edits of this kind", "PASS", "PASS"]


def test_one_edit_reports_shape_success_as_no_edits_and_writes_valid_json(tmp_path, capsys):
    def no_nan(text):
        raise ValueError(f"{text} is not JSON")

    evaluate.main(["--n", "1", "--quiet", "--param", "num_inference_steps=5", "--param", "num_maps_per_mask=2",
                   "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    shape = next(line for line in out.splitlines() if line.startswith("shape_edit_success"))
    assert shape.endswith("no edits of this kind") and "FAIL" not in shape
    report = json.loads((tmp_path / "r.json").read_text(), parse_constant=no_nan)  # NaN / Infinity refused
    assert report["summary"]["shape_edit_success"] is None
    assert next(g for g in report["goals"] if g["metric"] == "shape_edit_success") == {
        "metric": "shape_edit_success", "value": None, "goal": ">= 0.7", "verdict": "no edits of this kind"}


def test_a_param_given_twice_is_refused(capsys):
    assert evaluate.main(["--n", "1", "--param", "eta=0", "--param", "eta=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--param: eta given twice" in err[0], err


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory):
    """A copy of the shipped model that a test may find overwritten (it must not be)."""
    import shutil

    from diffedit.locations import SHIPPED_MODEL

    return shutil.copytree(SHIPPED_MODEL, tmp_path_factory.mktemp("models") / "m3")


def folder_bytes(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("flag, where", [("--json", "diffedit.json"), ("--json", "unet/config.json"),
                                         ("--grid", "unet/diffusion_pytorch_model.png"), ("--json", "new.json"),
                                         ("--json", "training.json")])
def test_an_output_over_or_inside_the_model_folder_is_refused_before_any_work(model_copy, tmp_path, monkeypatch,
                                                                             capsys, flag, where):
    """`--json m3/diffedit.json` used to replace the model's stored defaults with the report: every output is checked
    against the model (its folder, a symlink to it too) before the model loads, and nothing in it changes."""
    from diffedit import StableDiffusion

    monkeypatch.setattr(StableDiffusion, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    before = folder_bytes(model_copy)
    link = tmp_path / "link"
    link.symlink_to(model_copy)
    for model in (model_copy, link):
        code = evaluate.main(["--model", str(model), "--n", "1", flag, str(model_copy / where), "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and f"{flag} {model_copy / where} would write into" in err[0], err
        assert f"the model {model}" in err[0]
    assert folder_bytes(model_copy) == before


def test_an_output_inside_the_shipped_model_is_refused_when_no_model_is_named(capsys, monkeypatch):
    from diffedit import StableDiffusion
    from diffedit.locations import SHIPPED_MODEL

    monkeypatch.setattr(StableDiffusion, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    before = (SHIPPED_MODEL / "diffedit.json").read_bytes()
    assert evaluate.main(["--n", "1", "--json", str(SHIPPED_MODEL / "diffedit.json")]) == 2
    assert "would write into the model" in capsys.readouterr().err
    assert (SHIPPED_MODEL / "diffedit.json").read_bytes() == before


def test_a_hub_models_cache_folder_is_checked_once_it_is_fetched(model_copy, tmp_path, monkeypatch, capsys):
    """A repo id's files are known only once fetched: an output among them is refused then, before any edit."""
    from diffedit import StableDiffusion

    loaded = StableDiffusion.from_pretrained(model_copy)
    monkeypatch.setattr(StableDiffusion, "from_pretrained", lambda *a, **k: loaded)
    monkeypatch.setattr(evaluate, "score_edits", lambda *a, **k: pytest.fail("an edit ran"))
    before = folder_bytes(model_copy)
    assert evaluate.main(["--model", "someone/shapes", "--n", "1", "--json", str(model_copy / "diffedit.json")]) == 2
    assert f"--json {model_copy / 'diffedit.json'} would write into" in capsys.readouterr().err
    assert folder_bytes(model_copy) == before


def test_a_seed_whose_last_edit_would_pass_the_largest_seed_is_refused_before_any_work(capsys):
    """Edit i runs at seed + i through `diffedit.edit`, whose seeds end at 2**63 - 1: the last edit's seed used to
    fail after the first edit had run."""
    top = 2**63 - 1
    assert evaluate.parse_args(["--seed", str(top - 1), "--n", "2"]).seed == top - 1  # the last edit runs at top
    assert evaluate.main(["--seed", str(top), "--n", "2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--seed {top} with --n 2: edit i runs at seed + i" in err[0], err
    assert f"give --seed at most {top - 1} or a smaller --n" in err[0]


def test_lora_scale_is_refused_since_evaluate_loads_no_lora(capsys):
    assert evaluate.main(["--n", "1", "--param", "lora_scale=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--param lora_scale: diffedit evaluate loads no LoRA" in err[0], err


def test_device_auto_is_a_choice_so_the_advice_for_a_missing_gpu_names_only_choices(capsys):
    assert evaluate.parse_args(["--device", "auto"]).device == "auto"
    if not torch.cuda.is_available():
        assert evaluate.main(["--n", "1", "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "(use cpu or auto)" in err
        assert evaluate.main(["--n", "1", "--device", "auto", "--param", "num_inference_steps=4", "--param",
                              "num_maps_per_mask=2", "--quiet"]) in (0, 1)
        assert [line.split()[-1] for line in capsys.readouterr().out.splitlines()
                if line.startswith("seconds_per_edit")] in (["PASS"], ["FAIL"])  # auto is the CPU here: timed


def test_invalid_stored_defaults_are_named_by_their_file_not_as_param(model_copy, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(model_copy, tmp_path / "m4")
    (folder / "diffedit.json").write_text('{"guidance_scale": -1}')
    assert evaluate.main(["--model", str(folder), "--n", "1", "--param", "num_inference_steps=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"diffedit: error: {folder / 'diffedit.json'}: the model's stored "
                                               "edit defaults are invalid"), err
    assert "--param" not in err[0] and "guidance_scale" in err[0]


def test_a_param_with_an_empty_name_is_refused_saying_so(capsys):
    assert evaluate.main(["--n", "1", "--param", "=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'=3' has no parameter name before '='" in err[0], err
    with pytest.raises(Exception, match="no parameter name"):
        evaluate.parse_param(" =3")


@pytest.mark.parametrize("argv, message", [
    (["--n", str(10**15)], "--n: expected an integer in [1, 100000]"),  # hung building the edit list
    (["--threads", "20000"], "--threads: expected an integer in [1, 1024]"),  # libgomp failed; 50000 segfaulted
])
def test_counts_past_what_a_run_can_do_are_refused_in_one_line(argv, message, capsys):
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_the_grid_labels_every_panel_and_heads_each_row_with_the_edits_texts(tmp_path):
    """The grid was four unlabelled columns; each row now has its texts above it and a label over each panel
    (input, true region, mask with its IoU, result with the judge's verdict)."""
    source = np.zeros((64, 64, 3), np.uint8)
    region = np.zeros((64, 64), bool)
    region[8:24, 8:24] = True
    record = dict(index=3, kind="shape", source="a red circle", target="a blue square", iou=0.5, success=False,
                  _images=(source, region, region, source))
    from PIL import Image

    path = tmp_path / "g.png"
    evaluate.save_grid([record, {**record, "index": 4}], path)
    sheet = Image.open(path).convert("RGB")
    assert sheet.width >= 4 * 128 and sheet.height > 2 * (128 + 2 * 16)  # two rows, each with text over it
    top = np.asarray(sheet)[:40]
    assert (top < 128).any()  # dark text on the white head of the first row

"""Training the shapes model: a smoke run of both stages into a folder that loads (ours and the reference
libraries), resuming equal to not stopping, the wall-clock budget and each stage's clock."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from diffedit import DiffEditParams, shipped_model, train
from diffedit.outputs import OutputPathError

torch.set_num_threads(1)

# A few steps at batch 2, no scored preview: the code paths of a real run in seconds.
SMOKE = replace(train.CPU_DEFAULTS, vae_steps=2, unet_steps=2, vae_batch_size=2, batch_size=2, log_every=1,
                time_budget_s=None, preview_n=2, scale_samples=8, threads=1)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_run")
    code = train.main(["--out", str(out), "--vae-steps", "2", "--unet-steps", "2", "--batch-size", "2",
                         "--vae-batch-size", "2", "--log-every", "1", "--preview-n", "2", "--scale-samples", "8",
                         "--time-budget-s", "0", "--threads", "1"])
    assert code == 0
    return out


def test_smoke_run_writes_a_diffusers_folder_within_size(smoke_run):
    folder = smoke_run / "shapes-sd"
    for name in ("model_index.json", "diffedit.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
                 "tokenizer/merges.txt", "unet/config.json", "vae/config.json", "text_encoder/config.json"):
        assert (folder / name).is_file(), name
    for weights in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                    "text_encoder/model.safetensors"):
        with safe_open(str(folder / weights), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, weights
    assert shipped_model.folder_size_mb(folder) <= 30
    assert json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"] > 0
    assert (smoke_run / "samples.png").is_file() and (smoke_run / "vae_reconstructions.png").is_file()


def test_smoke_run_logs_losses_with_elapsed_time(smoke_run):
    records = [json.loads(line) for line in (smoke_run / "log.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    assert {r["stage"] for r in losses} == {"vae", "unet"}
    assert all(np.isfinite(r["loss"]) and r["elapsed_s"] >= 0 for r in losses)
    assert [r["step"] for r in losses if r["stage"] == "unet"] == [1, 2]
    assert records[-1]["event"] == "exported"


def test_smoke_folder_loads_through_from_pretrained(smoke_run):
    from diffedit import StableDiffusion

    sd = StableDiffusion.from_pretrained(smoke_run / "shapes-sd")
    assert sd.vae_scale_factor == 4 and sd.dtype == torch.float32
    params = DiffEditParams.for_model(sd)  # the stored edit defaults are valid DiffEditParams fields
    assert params.num_inference_steps == shipped_model.EDIT_DEFAULTS["num_inference_steps"]
    ids = sd.tokenizer(["a red circle on a white background"])
    with torch.no_grad():
        context = sd.text_encoder(ids)
        latents = sd.vae.encode(torch.zeros(1, 3, 64, 64)).mean
        eps = sd.unet(latents, 500, context)
    assert context.shape == (1, 77, 128) and latents.shape == (1, 4, 16, 16) and eps.shape == latents.shape


def test_smoke_folder_loads_in_diffusers_with_the_same_numbers(smoke_run):
    """The reference libraries read our config.json files and weights, and compute what ours compute."""
    from diffusers import StableDiffusionPipeline

    from diffedit import StableDiffusion

    folder = smoke_run / "shapes-sd"
    ref = StableDiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32, safety_checker=None)
    ours = StableDiffusion.from_pretrained(folder)
    prompts = ["a green square on a pink background", ""]
    ids = ours.tokenizer(prompts)
    assert torch.equal(ids, ref.tokenizer(prompts, padding="max_length", max_length=77,
                                          return_tensors="pt").input_ids)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([10, 700])
    with torch.no_grad():
        ctx_ref = ref.text_encoder(ids).last_hidden_state
        ctx = ours.text_encoder(ids)
        torch.testing.assert_close(ctx, ctx_ref, rtol=1e-4, atol=1e-4)
        eps_ref = ref.unet(x, t, ctx_ref).sample
        torch.testing.assert_close(ours.unet(x, t, ctx), eps_ref, rtol=1e-4, atol=1e-4 * eps_ref.abs().max())
        image = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
        torch.testing.assert_close(ours.vae.decode(ours.vae.encode(image).mean),
                                   ref.vae.decode(ref.vae.encode(image).latent_dist.mean).sample,
                                   rtol=1e-4, atol=1e-4)
    assert ref.vae.config.scaling_factor == ours.vae.scaling_factor
    assert ref.scheduler.config.steps_offset == 1 and not ref.scheduler.config.set_alpha_to_one


def test_existing_checkpoints_need_resume(smoke_run):
    with pytest.raises(OutputPathError, match="--resume"):
        train.train(SMOKE, smoke_run)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {name: load_file(str(folder / name)) for name in
            ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/model.safetensors")}


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    # A schedule that does not depend on the total step count (warm-up only), so that stopping at step 1 and
    # resuming to step 3 must reproduce the straight run to step 3 exactly.
    s = replace(SMOKE, unet_steps=3, warmup_steps=1000, min_lr_ratio=1.0, preview_n=0)
    straight = train.train(s, tmp_path / "straight")
    train.train(replace(s, unet_steps=1), tmp_path / "stopped")
    resumed = train.train(s, tmp_path / "stopped", resume=True)
    a, b = _weights(straight), _weights(resumed)
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
    steps = json.loads((resumed / "training.json").read_text())
    assert steps["unet_steps"] == 3 and steps["vae_steps"] == 2


def test_ctrl_c_during_training_says_which_files_it_kept_and_exits_130(tmp_path, monkeypatch, capsys):
    """It said "nothing was written" while the log and the VAE checkpoint stayed on disk."""
    def stop(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_unet", stop)  # after the VAE stage saved its checkpoint
    code = train.main(["--out", str(tmp_path / "run"), "--vae-steps", "1", "--unet-steps", "1", "--vae-batch-size",
                       "2", "--scale-samples", "8", "--time-budget-s", "0", "--threads", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    ckpt = tmp_path / "run" / "checkpoints"
    assert code == 130 and err[-1:] == [f"diffedit: interrupted; kept {tmp_path / 'run' / 'log.jsonl'} and the "
                                   f"checkpoints vae.safetensors in {ckpt}: continue with the same command and "
                                   "--resume"]
    assert (ckpt / "vae.safetensors").is_file() and (tmp_path / "run" / "log.jsonl").stat().st_size


def test_time_budget_stops_both_stages_and_still_exports(tmp_path):
    s = replace(SMOKE, vae_steps=10**6, unet_steps=10**6, time_budget_s=3.0, preview_n=0)
    folder = train.train(s, tmp_path)
    info = json.loads((folder / "training.json").read_text())
    assert info["vae_steps"] < 10**6 and info["unet_steps"] < 10**6
    assert (tmp_path / "checkpoints" / "vae.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "unet.safetensors").is_file()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["stopped_by"] for r in records if r.get("event") == "done"] == ["time budget", "time budget"]


def test_training_data_is_a_function_of_seed_and_step():
    a, ca = train.scene_batch(train.step_rng(0, "unet", 5), 4, torch.device("cpu"))
    b, cb = train.scene_batch(train.step_rng(0, "unet", 5), 4, torch.device("cpu"))
    c, _ = train.scene_batch(train.step_rng(0, "unet", 6), 4, torch.device("cpu"))
    assert torch.equal(a, b) and np.array_equal(ca, cb) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    s = train.CPU_DEFAULTS
    assert train.lr_factor(0, 0.0, s) == pytest.approx(1 / s.warmup_steps)
    assert train.lr_factor(s.warmup_steps, 0.0, s) == pytest.approx(1.0)
    assert train.lr_factor(10**6, 1.0, s) == pytest.approx(s.min_lr_ratio)
    # Between the ends, by hand with min_lr_ratio 0.1: a cosine, not a line (a linear decay also gives 0.55 at 0.5,
    # but 0.775 at 0.25): 0.1 + 0.9 * (1 + cos(pi / 4)) / 2 = 0.868198, and half the warm-up halves it.
    assert s.min_lr_ratio == 0.1
    assert train.lr_factor(10**6, 0.5, s) == pytest.approx(0.55)
    assert train.lr_factor(10**6, 0.25, s) == pytest.approx(0.868198, abs=1e-6)
    assert train.lr_factor(s.warmup_steps // 2 - 1, 0.25, s) == pytest.approx(
        0.868198 * (s.warmup_steps // 2) / s.warmup_steps, abs=1e-6)


def test_checkpoints_are_safetensors_with_json_metadata_not_pickles(smoke_run):
    files = sorted(p.name for p in (smoke_run / "checkpoints").iterdir())
    assert files == ["unet.safetensors", "vae.safetensors"]
    for name in files:
        with safe_open(str(smoke_run / "checkpoints" / name), "pt") as f:
            meta = json.loads(f.metadata()["state"])
            assert meta["step"] == 2 and meta["settings"]["seed"] == 0
            assert any(k.startswith("opt.") for k in f.keys())


def test_fine_tune_keeps_the_base_vae_and_starts_from_its_unet_and_text_encoder(smoke_run, tmp_path):
    base = smoke_run / "shapes-sd"
    s = replace(SMOKE, init_from=str(base), vae_steps=10**6, preview_n=0)
    unchanged = _weights(train.train(replace(s, unet_steps=0), tmp_path / "zero"))
    for name, tensors in _weights(base).items():  # no step: the export is the base, bit for bit
        assert all(torch.equal(tensors[k], unchanged[name][k]) for k in tensors), name
    tuned_folder = train.train(s, tmp_path / "two")
    tuned, before = _weights(tuned_folder), _weights(base)
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert all(torch.equal(before[vae][k], tuned[vae][k]) for k in before[vae])
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert any(not torch.equal(before[unet][k], tuned[unet][k]) for k in before[unet])
    info = json.loads((tuned_folder / "training.json").read_text())
    assert info["init_from"] == str(base) and info["base_training"]["vae_steps"] == 2
    assert info["unet_steps"] == 2 and "vae_steps" not in info


def test_edit_timestep_share_draws_that_share_below_the_edit_level():
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    cpu, s = torch.device("cpu"), replace(SMOKE, batch_size=4000)
    uniform = train.draw_timesteps(s, 1000, gen(), cpu)
    assert torch.equal(uniform, torch.randint(0, 1000, (4000,), generator=gen()))  # share 0: the old draw
    assert train.draw_timesteps(replace(s, edit_t_share=1.0), 1000, gen(), cpu).max() < 600
    half = train.draw_timesteps(replace(s, edit_t_share=0.5, edit_t_max=300), 1000, gen(), cpu)
    # half below 300 for sure, plus 30% of the uniform half: 65% expected
    assert 0.62 < (half < 300).float().mean() < 0.68 and half.max() >= 900


def test_stage_clock_stops_at_the_step_count_or_the_deadline_and_saves_when_due(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(train.time, "time", lambda: now[0])
    clock = train.StageClock(steps=10, deadline=1100.0, save_every_s=30.0, prior_elapsed_s=5.0)
    assert clock.running(9) and not clock.running(10)  # the step count is a bound: step 10 of 10 does not run
    assert clock.stopped_by(10) == "steps" and clock.stopped_by(9) == "time budget"
    assert clock.fraction_done(5) == 0.5  # by steps, while the clock has not moved
    now[0] = 1075.0
    assert clock.fraction_done(1) == 0.75 and clock.elapsed_s() == 80.0  # by time (75 of 100 s); resumed seconds count
    saves = []
    clock.save_if_due(lambda: saves.append(now[0]))  # 75 s since the start > 30: saves
    now[0] = 1105.0
    clock.save_if_due(lambda: saves.append(now[0]))  # exactly 30 s later: not yet (strictly more is due)
    now[0] = 1105.5
    clock.save_if_due(lambda: saves.append(now[0]))
    assert saves == [1075.0, 1105.5]
    assert not clock.running(0)  # past the deadline (1100)
    now[0] = 1100.0
    assert not clock.running(0)  # at the deadline: stopped


def test_resuming_a_run_its_time_budget_ended_exports_it_again_without_training_more(tmp_path):
    """`--resume --install` after a budgeted run (README) trained the UNet for a whole new budget, its learning rate
    back near the peak: a finished stage is now loaded, and the export is the same model."""
    s = replace(SMOKE, vae_steps=10**6, unet_steps=10**6, time_budget_s=2.0, preview_n=0)
    first = _weights(train.train(s, tmp_path))
    again = _weights(train.train(s, tmp_path, resume=True))
    for name in first:
        assert all(torch.equal(first[name][k], again[name][k]) for k in first[name]), name
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    resumed = records[[r.get("event") for r in records].index("exported") + 1:]
    assert [(r["stage"], r["event"]) for r in resumed if r.get("stage")] == [("vae", "loaded"), ("unet", "loaded")]


def test_resume_refuses_a_checkpoint_written_with_other_settings_before_any_work(tmp_path, capsys):
    """A checkpoint of another seed or batch size (or of a CUDA run resumed with the CPU defaults) was continued
    with the new settings: a run that is neither. Now one line, exit 2, the log untouched."""
    train.train(replace(SMOKE, unet_steps=1, preview_n=0), tmp_path)
    log = (tmp_path / "log.jsonl").read_bytes()
    capsys.readouterr()
    code = train.main(["--out", str(tmp_path), "--resume", "--vae-steps", "2", "--unet-steps", "3", "--batch-size",
                       "4", "--vae-batch-size", "2", "--scale-samples", "8", "--time-budget-s", "0", "--seed", "1",
                       "--threads", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"diffedit: error: --resume: {tmp_path / 'checkpoints'}")
    assert "seed 0, batch_size 2, but this run has seed 1, batch_size 4" in err[0]
    assert (tmp_path / "log.jsonl").read_bytes() == log


def test_a_folder_holding_another_runs_log_needs_resume(tmp_path):
    """Its log.jsonl was appended to (and its model overwritten) when its checkpoints were elsewhere or not yet
    written."""
    (tmp_path / "log.jsonl").write_text('{"event": "settings"}\n')
    with pytest.raises(OutputPathError, match="already holds a run .*--resume"):
        train.train(SMOKE, tmp_path)
    assert (tmp_path / "log.jsonl").read_text() == '{"event": "settings"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]


def test_an_init_from_that_is_no_shapes_model_is_refused_before_the_run_folder_is_made(tmp_path, sd1_folder,
                                                                                      capsys):
    """A folder that is no model, or a model of another architecture, failed after the run folder, its log and
    tokenizer were written (the latter with a RuntimeError from load_state_dict, exit 1); a retry with the right
    model then found a run there."""
    from diffedit.locations import EXAMPLE_IMAGE

    for base, message in ((sd1_folder, "its UNet is not the shapes model's"), (EXAMPLE_IMAGE.parent,
                                                                            "model_index.json")):
        code = train.main(["--out", str(tmp_path / "run"), "--init-from", str(base), "--unet-steps", "1",
                           "--time-budget-s", "0", "--threads", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "run").exists()


def test_the_unet_stage_checks_its_caption_ids_once_not_every_step(tmp_path, monkeypatch):
    """The text encoder's id check waits for the device (`bool(valid.all())`): called through `text(...)` in the
    training loop it stalled every step. The stage checks its caption ids once; 1 and 4 steps check alike."""
    from diffedit.models.clip_text import CLIPTextEmbeddings

    calls = []
    check = CLIPTextEmbeddings.check_ids
    monkeypatch.setattr(CLIPTextEmbeddings, "check_ids", lambda self, ids: calls.append(1) or check(self, ids))
    counts = []
    for steps in (1, 4):
        calls.clear()
        assert train.main(["--out", str(tmp_path / f"run{steps}"), "--vae-steps", "1", "--unet-steps", str(steps),
                           "--batch-size", "2", "--vae-batch-size", "2", "--preview-n", "2", "--scale-samples", "8",
                           "--time-budget-s", "0", "--threads", "1"]) == 0
        counts.append(len(calls))
    assert counts[0] == counts[1] > 0, counts

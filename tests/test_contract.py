"""The contract every entry point keeps (docs/design.md §5), tested on generated input rather than a list of cases:
bad input is exit 2 and one line `diffedit: error: ...`, a failure inside is exit 1 and one line, never a traceback,
never a partial or overwritten file; odd but valid input succeeds. Commands run in-process (`cli.main`), so each
example costs milliseconds when it is refused and about a second when it runs (the shipped model, 4 steps).

Generated: argument vectors for every command, image files (modes, sizes, truncation, corruption, odd extensions),
model folders (missing pieces, truncated or NaN or mis-shaped weights, broken configs) and saved inversions
(tampered metadata, wrong shapes, NaN).
"""

import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

import diffedit
from diffedit import cli

FAST = ["--steps", "4", "--num-maps", "2", "--quiet"]
EXAMPLE = str(diffedit.EXAMPLE_IMAGE)
RED, BLUE = "a red circle on a gray background", "a blue circle on a gray background"
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run(argv: list[str], capsys) -> tuple[int, list[str], str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, [line for line in err.splitlines() if line], out


def assert_refused(code: int, lines: list[str], before: dict, folder: Path, status: int = 2) -> None:
    """Exit `status`, one error line (warnings and notes may precede it), no traceback, nothing written."""
    errors = [line for line in lines if line.startswith("diffedit: error: ")]
    assert code == status, lines
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert not any("Traceback" in line for line in lines), lines
    assert snapshot(folder) == before, "a refused run wrote, changed or left a file"


# ---------------------------------------------------------------------------------------------------------------
# Argument vectors: a valid command line with one or more of its values made bad

BAD_NUMBERS = ["0", "-1", "nan", "inf", "-inf", "1e400", "ten", "", "0x10", "1.5.2"]
# Numeric flags, and which of BAD_NUMBERS each of them accepts (the rest it must refuse)
NUMERIC_FLAGS = {"--steps": set(), "--strength": set(), "--guidance": {"0"}, "--mask-strength": set(),
                 "--num-maps": set(), "--threshold-ratio": set(), "--seed": {"0"}, "--guidance-min-timestep": {"0"},
                 "--max-pixels": set(), "--inversion-guidance": {"0"}}
COMMANDS = {
    "edit": [EXAMPLE, "--source", RED, "--target", BLUE, "-o", "out.png"],
    "mask": [EXAMPLE, "--source", RED, "--target", BLUE, "-o", "mask.png"],
    "invert": [EXAMPLE, "--prompt", RED, "-o", "inv.safetensors"],
    "evaluate": ["--json", "report.json"],
    "train": ["--out", "run"],
}
TRAIN_FLAGS = {"--vae-steps": {"0"}, "--unet-steps": {"0"}, "--batch-size": set(), "--vae-batch-size": set(),
               "--vae-lr": set(), "--unet-lr": set(), "--warmup-steps": {"0"}, "--ema-decay": {"0"},
               "--vae-budget-fraction": set(), "--threads": set(), "--log-every": set(), "--save-every-s": set(),
               "--preview-n": {"0"}, "--scale-samples": set(), "--edit-t-share": {"0"}, "--edit-t-max": set(),
               "--seed": {"0"}}
ACCEPTS = {"edit": NUMERIC_FLAGS, "invert": {f: NUMERIC_FLAGS[f] for f in ("--steps", "--strength", "--seed",
                                                                           "--max-pixels")},
           "mask": {f: v for f, v in NUMERIC_FLAGS.items()
                    if f not in ("--strength", "--inversion-guidance", "--guidance-min-timestep")},
           "evaluate": {"--n": set(), "--seed": {"0"}, "--threads": set()}, "train": TRAIN_FLAGS}
# Outputs each command must refuse ("INPUT": the input image itself, without --force)
BAD_OUTPUTS = {"edit": ("-o", ["out.xbm", "out.txt", "nope/out.png", "out", ".", "/dev/null", "INPUT"]),
               "invert": ("-o", ["inv.png", "inv.txt", "nope/inv.safetensors", "inv", ".", "/dev/null", "INPUT"]),
               "evaluate": ("--json", ["nope/r.json", ".", "/dev/null"]),
               "train": ("--out", ["INPUT", "/dev/null"])}
BAD_OUTPUTS["mask"] = BAD_OUTPUTS["edit"]


@st.composite
def bad_argument_vectors(draw):
    """A command line of any command (on the picture `in.png` where it takes one), with one to four bad parts:
    numeric values out of range or unparsable, an output that cannot be written, an unknown flag. Never a valid
    one: every command would start real work (training, for one)."""
    command = draw(st.sampled_from(sorted(COMMANDS)))
    argv = [command, *COMMANDS[command]]
    if command in ("edit", "mask", "invert"):
        argv[1] = "in.png"
    bad = []
    flags = ACCEPTS[command]
    for flag in draw(st.lists(st.sampled_from(sorted(flags)), max_size=3, unique=True)):
        bad += [flag, draw(st.sampled_from([v for v in BAD_NUMBERS if v not in flags[flag]]))]
    if not bad or draw(st.booleans()):
        option, outputs = BAD_OUTPUTS[command]
        output = draw(st.sampled_from(outputs + ["--no-such-flag"]))
        if output == "--no-such-flag":
            bad.append(output)
        else:
            argv[argv.index(option) + 1] = "in.png" if output == "INPUT" else output
    return argv + bad


@settings(SETTINGS, max_examples=150)  # refused in milliseconds each
@given(argv=bad_argument_vectors())
def test_bad_arguments_are_refused_before_any_work_in_one_line(argv, capsys, monkeypatch):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        monkeypatch.chdir(folder)
        shutil.copy(EXAMPLE, folder / "in.png")
        before = snapshot(folder)
        code, lines, out = run(argv, capsys)
        assert_refused(code, lines, before, folder)
        assert out == ""


@pytest.mark.parametrize("argv", [
    ["evaluate", "--n", "0"], ["evaluate", "--n", "-3"], ["evaluate", "--threads", "0"], ["evaluate", "--seed", "x"],
    ["evaluate", "--json", "nope/r.json"], ["evaluate", "--grid", "g.xbm"], ["evaluate", "--param", "foo=1"],
    ["evaluate", "--param", "num_inference_steps=0"], ["evaluate", "--param", "x"], ["evaluate", "--model", "nope/a/b"],
    ["evaluate", "--param", "num_inference_steps=1001"], ["evaluate", "--json", "."],
    ["train", "--out", "run", "--vae-steps", "-1"], ["train", "--out", "run", "--batch-size", "0"],
    ["train", "--out", "run", "--device", "tpu"], ["train", "--out", "run", "--init-from", "nope/a/b"],
    ["train", "--out", "run", "--edit-t-share", "1.5"], ["train", "--out", "run", "--unet-lr", "nan"],
    ["train", "--out", "file.txt"], ["train"], ["nonsense"], [],
    ["experiment", "--out", "run", "--n", "0"], ["experiment", "--out", "file.txt"], ["experiment"],
    ["experiment", "--out", "run", "--methods", "x"], ["experiment", "--out", "run", "--edits", "file.txt"],
    ["experiment", "--out", "run", "--sweep", "eta=-1"], ["experiment", "--out", "run", "--seeds", "-1"],
])
def test_evaluate_and_train_refuse_bad_arguments_the_same_way(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    before = snapshot(tmp_path)
    code, lines, _ = run(argv, capsys)
    assert_refused(code, lines, before, tmp_path)


def test_writing_to_a_closed_pipe_ends_quietly(tmp_path):
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "diffedit", "mask", EXAMPLE, "--source", RED, "--target", BLUE,
                          "-o", str(tmp_path / "m.png"), "--json", *FAST], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the command prints
    err = p.stderr.read().decode()
    assert (p.wait(), err) == (141, "")  # 128 + SIGPIPE, and not a word (a failure shows what was said)
    assert (tmp_path / "m.png").is_file()  # the outputs were written before the summary


@pytest.mark.parametrize("json_flag, status", [([], 0), (["--json"], 141)])
def test_a_closed_stdout_file_descriptor_is_no_failure(tmp_path, json_flag, status):
    import os
    import subprocess
    import sys

    # `diffedit ... >&-`: Python starts with sys.stdout None; the flush at the end raised AttributeError (exit 1)
    p = subprocess.run([sys.executable, "-m", "diffedit", "mask", EXAMPLE, "--source", RED, "--target", BLUE,
                        "-o", str(tmp_path / "m.png"), *json_flag, *FAST], stderr=subprocess.PIPE, text=True,
                       preexec_fn=lambda: os.close(1))
    assert (p.returncode, p.stderr) == (status, "")  # --json: as a reader gone before the summary, quietly
    assert (tmp_path / "m.png").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Image files

@st.composite
def image_files(draw):
    """(file name, bytes, whether a reader should accept it)."""
    mode = draw(st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "CMYK", "F"]))
    size = (draw(st.integers(1, 96)), draw(st.integers(1, 96)))
    fmt, ext = draw(st.sampled_from([("PNG", ".png"), ("JPEG", ".jpg"), ("BMP", ".bmp"), ("TIFF", ".tif"),
                                     ("GIF", ".gif"), ("WEBP", ".webp")]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    picture = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    try:
        picture.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError):
        picture.convert("RGB").save(buffer, format=fmt)
    data, ok = buffer.getvalue(), True
    damage = draw(st.sampled_from(["none", "truncate", "flip", "garbage", "empty", "extension"]))
    if damage == "truncate":
        data, ok = data[: draw(st.integers(0, max(0, len(data) - 1)))], None  # may still decode (trailing data)
    elif damage == "flip":
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= 0xFF
        data, ok = bytes(data), None  # a flipped pixel byte is still an image
    elif damage == "garbage":
        data, ok = bytes(rng.integers(0, 256, draw(st.integers(0, 300)), dtype=np.uint8)), False
    elif damage == "empty":
        data, ok = b"", False
    elif damage == "extension":
        ext = draw(st.sampled_from([".txt", ".png", ".jpeg", ""]))  # the content decides, not the name
    return f"input{ext}", data, ok


@SETTINGS
@given(case=image_files())
def test_any_image_file_is_edited_or_refused_in_one_line(case, capsys, monkeypatch):
    name, data, ok = case
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        monkeypatch.chdir(folder)
        (folder / name).write_bytes(data)
        before = snapshot(folder)
        code, lines, _ = run(["mask", name, "--source", RED, "--target", BLUE, "-o", "mask.png", *FAST], capsys)
        if code == 0:
            assert ok is not False, "a file that is no image was accepted"
            assert Image.open(folder / "mask.png").size == Image.open(folder / name).size
            assert not any("error" in line for line in lines)
        else:
            assert ok is not True, lines
            assert_refused(code, lines, before, folder)


# ---------------------------------------------------------------------------------------------------------------
# Model folders

MUTATIONS = ["missing index", "missing component", "missing weights", "truncated weights", "nan weights",
             "inf weights", "mis-shaped weights", "extra key", "config not json", "config unknown field",
             "config bad value", "scheduler bad value", "tokenizer missing vocab", "edit defaults not json",
             "edit defaults unknown field"]


def mutate(folder: Path, mutation: str, component: str) -> None:
    weights = next((folder / component).glob("*.safetensors"))
    if mutation == "missing index":
        (folder / "model_index.json").unlink()
    elif mutation == "missing component":
        shutil.rmtree(folder / component)
    elif mutation == "missing weights":
        weights.unlink()
    elif mutation == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    elif mutation in ("nan weights", "inf weights", "mis-shaped weights", "extra key"):
        state = load_file(weights)
        key = sorted(k for k, v in state.items() if v.is_floating_point())[0]
        if mutation == "mis-shaped weights":
            state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1, dtype=state[key].dtype)
        elif mutation == "extra key":
            state["made.up"] = torch.zeros(1)
        else:
            state[key] = state[key].clone()
            state[key].view(-1)[0] = float("nan") if mutation == "nan weights" else float("inf")
        save_file(state, str(weights))
    elif mutation.startswith("config"):
        config = folder / component / "config.json"
        raw = json.loads(config.read_text())
        if mutation == "config not json":
            config.write_text("{not json")
            return
        raw.update({"made_up_field": 1} if mutation == "config unknown field" else
                   {"act_fn": "gelu_tanh"} if component != "text_encoder" else {"hidden_act": "swish"})
        config.write_text(json.dumps(raw))
    elif mutation == "scheduler bad value":
        path = folder / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "flow"}))
    elif mutation == "tokenizer missing vocab":
        (folder / "tokenizer" / "vocab.json").unlink()
    elif mutation == "edit defaults not json":
        (folder / "diffedit.json").write_text("[1, 2")
    elif mutation == "edit defaults unknown field":
        (folder / "diffedit.json").write_text(json.dumps({"encoding_ratio": 0.5}))


@SETTINGS
@given(mutation=st.sampled_from(MUTATIONS), component=st.sampled_from(["unet", "vae", "text_encoder"]),
       command=st.sampled_from(["edit", "mask", "invert"]))
def test_a_broken_model_folder_is_refused_in_one_line_before_any_work(mutation, component, command, capsys,
                                                                     monkeypatch):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        monkeypatch.chdir(folder)
        model = Path(shutil.copytree(diffedit.SHIPPED_MODEL, folder / "model"))
        mutate(model, mutation, component)
        before = snapshot(folder)
        argv = [command, *COMMANDS[command], "--model", "model", *FAST]
        if command == "invert":
            argv = [a for a in argv if a not in ("--num-maps", "2")]
        code, lines, _ = run(argv, capsys)
        assert_refused(code, lines, before, folder)


# ---------------------------------------------------------------------------------------------------------------
# Saved inversions

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An inversion and a mask of the bundled picture, written by the commands."""
    folder = tmp_path_factory.mktemp("saved")
    assert cli.main(["invert", EXAMPLE, "--prompt", RED, "-o", str(folder / "inv.safetensors"), "--steps", "4",
                     "--quiet"]) == 0
    assert cli.main(["mask", EXAMPLE, "--source", RED, "--target", BLUE, "-o", str(folder / "mask.png"),
                     *FAST]) == 0
    return folder


TAMPER = st.one_of(
    st.tuples(st.just("meta"), st.sampled_from(["format", "version", "steps", "strength", "width", "height",
                                                 "guidance", "model_fingerprint", "model", "prompt", "seed", "mode"]),
              st.sampled_from(["", "x", "0", "-1", "nan", "2", "99999", "1.5"])),
    st.tuples(st.just("tensor"), st.sampled_from(["latents", "timesteps", "clean"]),
              st.sampled_from(["nan", "inf", "drop", "shape", "dtype"])))


@SETTINGS
@given(tamper=TAMPER)
def test_a_tampered_saved_inversion_is_refused_or_decodes_to_a_real_picture(tamper, saved, capsys, monkeypatch):
    from safetensors import safe_open

    kind, key, how = tamper
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        monkeypatch.chdir(folder)
        shutil.copy(saved / "mask.png", folder / "mask.png")
        with safe_open(str(saved / "inv.safetensors"), "pt") as f:
            meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
        if kind == "meta":
            meta[key] = how
        elif how == "drop":
            del tensors[key]
        elif how == "shape":
            tensors[key] = tensors[key][..., :1] if tensors[key].ndim > 1 else tensors[key][:1]
        elif how == "dtype":
            tensors[key] = tensors[key].to(torch.int32 if key != "timesteps" else torch.float32)
        else:
            t = tensors[key].clone().float() if key != "timesteps" else tensors[key].clone()
            if key != "timesteps":
                t.view(-1)[0] = float(how)
            tensors[key] = t
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "inv.safetensors"), metadata=meta)
        before = snapshot(folder)
        code, lines, _ = run(["edit", EXAMPLE, "--latents", "inv.safetensors", "--mask", "mask.png", "--target",
                              BLUE, "-o", "out.png", "--quiet"], capsys)
        if code == 0:  # an informational field (prompt, seed, mode, model name) or a harmless value
            picture = np.asarray(Image.open(folder / "out.png"))
            assert picture.std() > 0, "a constant picture was written"
        else:
            assert_refused(code, lines, before, folder)


def test_every_entry_point_runs_with_the_oracles_unimportable(tmp_path):
    """diffusers, transformers and peft are test-only oracles: with imports of them failing, the command line's
    edit / mask / invert / edit --latents, the API, the facade's three calls, LoRA save and load and a single-file
    round trip all run (a stray import anywhere on these paths fails here, not on a user's machine)."""
    import subprocess
    import sys

    code = f"""
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("diffusers", "transformers", "peft"):
            raise ImportError(f"{{name}} is a test-only oracle")
sys.meta_path.insert(0, Blocked())
import os, torch
torch.set_num_threads(1)
os.chdir({str(tmp_path)!r})
import diffedit
from diffedit import cli
fast = {FAST!r}
for argv in (["edit", {EXAMPLE!r}, "--source", {RED!r}, "--target", {BLUE!r}, "-o", "e.png", *fast],
             ["mask", {EXAMPLE!r}, "--source", {RED!r}, "--target", {BLUE!r}, "-o", "m.png", *fast],
             ["invert", {EXAMPLE!r}, "--prompt", {RED!r}, "-o", "i.safetensors", "--steps", "4", "--quiet"],
             ["edit", {EXAMPLE!r}, "--source", {RED!r}, "--target", {BLUE!r}, "--latents", "i.safetensors",
              "--mask", "m.png", "-o", "l.png", "--quiet"]):
    assert cli.main(argv) == 0, argv
result = diffedit.edit({EXAMPLE!r}, {RED!r}, {BLUE!r}, num_inference_steps=4, num_maps_per_mask=2)
pipe = diffedit.StableDiffusionDiffEdit.from_pretrained(diffedit.SHIPPED_MODEL)
pipe.set_progress_bar_config(disable=True)
from PIL import Image
image = Image.open({EXAMPLE!r})
mask = pipe.generate_mask(image=image, source_prompt={RED!r}, target_prompt={BLUE!r}, num_maps_per_mask=2)
inv = pipe.invert(prompt={RED!r}, image=image, num_inference_steps=4)
pipe(prompt={BLUE!r}, mask_image=mask, image_latents=inv, num_inference_steps=4)
sd = pipe.model
unet_lora = {{"unet." + name + ".lora_" + ab + ".weight": torch.zeros(shape) for name, m in
             sd.unet.named_modules() if name.endswith("attn1.to_q")
             for ab, shape in (("A", (2, m.in_features)), ("B", (m.out_features, 2)))}}
sd.load_lora_weights(unet_lora, adapter_name="z")
sd.load_lora_weights(sd.save_lora_weights("lora"), adapter_name="again")
diffedit.save_single_file(sd, "one.safetensors")
diffedit.StableDiffusion.from_single_file("one.safetensors", config=diffedit.SHIPPED_MODEL)
assert not {{"diffusers", "transformers", "peft"}} & set(sys.modules), "an oracle was imported"
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

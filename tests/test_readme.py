"""The README is the front door: its Python examples run as written, in order, on the shipped model and the
picture that ships beside it (no placeholders, no downloads)."""

import re
import subprocess
import sys
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_every_python_example_in_the_readme_runs_as_written(tmp_path, monkeypatch):
    one_call, step_by_step, saved, drop_in, single_file, components = python_blocks()  # exactly these six
    monkeypatch.chdir(tmp_path)
    ns: dict = {}

    def run(block: str) -> None:
        exec(compile(block, str(README), "exec"), ns)  # noqa: S102 - our own README

    run(one_call)
    assert ns["result"].image.size == ns["result"].mask.size == (64, 64)
    run(step_by_step)
    assert ns["edited"].size == (64, 64) and ns["pixels"].shape == (1, 3, 64, 64)
    decoded = ns["out"]
    run(saved)
    assert (tmp_path / "circle.safetensors").is_file() and ns["meta"]["steps"] == 25
    again = ns["method"].decode(ns["sd"], ns["inv"], ns["m"].mask[:, None].float(), ns["tgt"], ns["params"], None)
    assert torch.equal(again, decoded)  # the reloaded inversion decodes to the same latents
    run(drop_in)
    assert ns["out"].size == (64, 64)
    run(single_file)
    assert torch.equal(ns["sd"].unet.conv_in.weight, ns["pipe"].model.unet.conv_in.weight)
    run(components)
    assert ns["eps"].shape == ns["latents"].shape == (1, 4, 16, 16)


def test_the_dotted_names_the_readme_uses_work_after_a_bare_import():
    """`diffedit.baselines.METHODS`, `diffedit.reuse.SharedSteps` and every other `diffedit.X.Y` the README writes
    resolve after `import diffedit` alone, in a fresh process where nothing imported the submodules first; that
    import itself stays free of torch, and a name of a submodule loads that submodule only."""
    names = sorted({name for name in re.findall(r"(?<![\w/.-])(diffedit(?:\.[A-Za-z_]\w*)+)", README.read_text())
                    if not name.endswith(".json")})
    assert "diffedit.baselines.METHODS" in names and "diffedit.reuse.SharedSteps" in names
    script = "\n".join([
        "import functools, sys",
        "import diffedit",
        "assert 'torch' not in sys.modules, 'import diffedit imported torch'",
        *[f"functools.reduce(getattr, {name.split('.')[1:]!r}, diffedit)  # {name}" for name in names],
        "diffedit.demo, diffedit.plots",
        "assert 'gradio' not in sys.modules and 'matplotlib' not in sys.modules",
    ])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_every_module_of_the_package_is_an_attribute_of_it():
    import diffedit

    files = {p.stem for p in Path(diffedit.__file__).parent.glob("*.py")} - {"__init__", "__main__"}
    assert files | {"models", "schedulers"} == set(diffedit._SUBMODULES)

"""DiffEdit (Couairon et al., ICLR 2023) and the Stable Diffusion parts it runs on, written from scratch in PyTorch.

Public names and submodules are imported on first use, so that `import diffedit` and `import diffedit.models` stay
light: `diffedit.edit`, `diffedit.baselines.METHODS` or `diffedit.reuse.SharedSteps` work after a bare
`import diffedit`, and only then load what they need.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "StableDiffusion": "stable_diffusion",
    "ModelNotFoundError": "locations",
    "SHIPPED_MODEL": "locations",
    "EXAMPLE_IMAGE": "locations",
    "DiffEditParams": "params",
    "StableDiffusionDiffEdit": "facade",
    "edit": "api",
    "edit_targets": "api",
    "EditResult": "api",
    "estimate_mask": "method",
    "invert": "method",
    "decode": "method",
    "save_inversion": "saved_inversion",
    "load_inversion": "saved_inversion",
    "read_inversion_metadata": "saved_inversion",
    "run_experiment": "experiment",
    "save_single_file": "checkpoint_file",
}


# The public submodules, reachable as attributes (`diffedit.baselines`) as well as by import. `__main__` is left
# out (it is `python -m diffedit`, not an API); `demo` and `plots` import Gradio and matplotlib only when used.
_SUBMODULES = frozenset({
    "api", "baselines", "bench", "checkpoint_file", "cli", "console", "demo", "evaluate", "experiment", "facade",
    "figures", "image_files", "image_tensors", "locations", "memory", "method", "models", "official_configs",
    "outputs", "params", "plots", "random_models", "reuse", "safety", "saved_inversion", "schedulers", "shapes",
    "shipped_model", "stable_diffusion", "timing", "train", "validation",
})


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # also binds it here: later lookups skip this
    raise AttributeError(f"module 'diffedit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)

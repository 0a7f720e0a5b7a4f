"""DiffEdit (Couairon et al., ICLR 2023) and the Stable Diffusion parts it runs on, written from scratch in PyTorch.

Public names are imported on first use, so that `import diffedit.models` stays light.
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


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'diffedit' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))

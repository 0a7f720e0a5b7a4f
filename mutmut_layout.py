"""Pytest plugin for mutation-testing runs only; `[tool.mutmut] pytest_add_cli_args` loads it as `-p mutmut_layout`.

mutmut copies this file into mutants/ (`also_copy`) and runs pytest there with mutants/ first on sys.path, so
`diffedit` (mutants/diffedit) is the mutated copy. Two things still go wrong with this project's package-dir layout
(models/ -> diffedit.models, schedulers/ -> diffedit.schedulers):

1. diffedit.models and diffedit.schedulers are not folders inside diffedit/, so the import system falls through to the
   editable install's finder, which maps them to the ORIGINAL tree: the tests would never see a mutant.
2. mutmut names a mutant after the file's path (schedulers/ddim.py -> `schedulers.ddim.x_ddim_step__mutmut_3`), and its
   trampoline switches a mutant on only where the function's `__module__` equals that prefix (`schedulers.ddim`), while
   the tests import the module as `diffedit.schedulers.ddim`.

So this finder, first on sys.meta_path, loads `diffedit.models[.*]` / `diffedit.schedulers[.*]` from mutants/models and
mutants/schedulers, and runs each such module's code with `__name__` set to the path-derived name (`schedulers.ddim`),
restored afterwards: functions and classes get `__module__ == "schedulers.ddim"`, as mutmut expects, while the module
keeps its package name and `__package__` for relative imports (`from ..validation import ...`). The module is also
registered under the path-derived name, so lookups by `__module__` (dataclasses, pickle, typing) find it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent  # .../mutants
MAPPED = {"diffedit.models": "models", "diffedit.schedulers": "schedulers"}  # pyproject's package-dir, less diffedit


class _RenamingLoader(importlib.abc.Loader):
    def __init__(self, fullname: str, path: Path, alias: str):
        self._inner = importlib.machinery.SourceFileLoader(fullname, str(path))
        self._alias = alias

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        code = self._inner.get_code(module.__name__)
        real = module.__name__
        sys.modules[self._alias] = module
        module.__name__ = self._alias
        try:
            exec(code, module.__dict__)
        finally:
            module.__name__ = real


class _MutantsLayoutFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        for package, folder in MAPPED.items():
            if fullname != package and not fullname.startswith(package + "."):
                continue
            rest = fullname[len(package) + 1:].split(".") if fullname != package else []
            base = ROOT.joinpath(folder, *rest)
            alias = ".".join([folder, *rest])
            if (base / "__init__.py").is_file():
                file, locations = base / "__init__.py", [str(base)]
            elif base.with_suffix(".py").is_file():
                file, locations = base.with_suffix(".py"), None
            else:
                return None
            return importlib.util.spec_from_file_location(
                fullname, file, loader=_RenamingLoader(fullname, file, alias), submodule_search_locations=locations)
        return None


def _install() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as the run command sets it; tests pin torch to one thread too
    if ROOT.name != "mutants":
        raise RuntimeError(f"mutmut_layout is meant to run from mutmut's mutants/ folder, not {ROOT}")
    stale = [name for name, mod in sys.modules.items()
             if (name == "diffedit" or name.startswith("diffedit."))
             and getattr(mod, "__file__", None) and ROOT not in Path(mod.__file__).resolve().parents]
    if stale:
        raise RuntimeError(f"imported from outside {ROOT} before mutmut_layout could act: {stale}")
    if not any(isinstance(f, _MutantsLayoutFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MutantsLayoutFinder())
    # Each mutant is tried once: make the property tests (hypothesis) replay the same examples every time, and keep
    # them from saving failing examples of one mutant for the next.
    try:
        from hypothesis import settings
    except ImportError:
        return
    settings.register_profile("mutmut", derandomize=True, database=None)
    settings.load_profile("mutmut")


_install()


def pytest_sessionstart(session):
    import diffedit
    import diffedit.schedulers

    for module in (diffedit, diffedit.schedulers):
        if ROOT not in Path(module.__file__).resolve().parents:
            raise RuntimeError(f"{module.__name__} comes from {module.__file__}, not from {ROOT}")

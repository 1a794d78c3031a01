"""Lazy package exports (PEP 562), so that light users, above all the command-line parser behind
``pretrain_gpt_sv.py --help``, can import one submodule without importing torch and megatron.core
through the package's ``__init__``."""

from __future__ import annotations

import importlib
from typing import Callable, Dict


def lazy_exports(package: str, exports: Dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` that imports ``exports[name]`` (a submodule of ``package``) on first use."""

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    return __getattr__

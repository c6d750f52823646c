"""Lazy package exports: `import qwen2vl` stays cheap, and each name imports only its module."""
from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """A module `__getattr__` that resolves `exports` (name -> module path) on first use."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__

"""Lazy re-exports: a package names what it offers without importing torch or ray."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(table: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that imports each name of `table` (name -> module) on first use."""

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(name)
        return getattr(importlib.import_module(table[name]), name)

    return __getattr__

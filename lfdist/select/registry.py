"""Strategies register by name, one file each (lfdist/select/<name>.py)."""

from __future__ import annotations

from collections.abc import Callable

from lfdist.errors import UserError

_STRATEGIES: dict[str, Callable] = {}


def register_strategy(name: str) -> Callable[[Callable], Callable]:
    def wrap(fn: Callable) -> Callable:
        if name in _STRATEGIES:
            raise ValueError(f"strategy {name!r} registered twice")
        _STRATEGIES[name] = fn
        return fn

    return wrap


def get_strategy(name: str) -> Callable:
    import lfdist.select  # noqa: F401  (importing the package registers every strategy)

    if name not in _STRATEGIES:
        raise UserError(
            f"unknown strategy {name!r}; choose one of: {', '.join(sorted(_STRATEGIES))}"
        )
    return _STRATEGIES[name]


def strategy_names() -> list[str]:
    import lfdist.select  # noqa: F401

    return sorted(_STRATEGIES)

"""Benchmark registry: name -> benchmark class, so configs and the CLI pick benchmarks by name.

Every evaluation in visrl (the per-iteration eval of the training pipeline, VisRL §4, and
``python run.py stage=eval``) goes through a :class:`Benchmark`: an object with a ``name``, a ``version``
(bumped whenever the protocol changes, so stored numbers stay comparable) and
``evaluate(policy, templates, out_dir) -> dict[str, float]`` that writes ``out_dir/predictions.jsonl`` and
``out_dir/metrics.json``.

Classes register themselves with ``@register_benchmark("name")``. The built-in modules (synthetic, viscot,
vstar) are imported lazily by :func:`load_builtin_benchmarks` — the first call of :func:`get_benchmark` or
:func:`list_benchmarks` — so importing the registry stays cheap and free of import cycles.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from visrl.data.prompts import PromptTemplates

__all__ = [
    "BUILTIN_MODULES",
    "Benchmark",
    "UnknownBenchmarkError",
    "get_benchmark",
    "list_benchmarks",
    "load_builtin_benchmarks",
    "register_benchmark",
]

# Modules whose import registers the built-in benchmarks (imported by load_builtin_benchmarks).
BUILTIN_MODULES: tuple[str, ...] = (
    "visrl.benchmarks.synthetic",
    "visrl.benchmarks.viscot",
    "visrl.benchmarks.vstar",
)


@runtime_checkable
class Benchmark(Protocol):
    """What every benchmark provides (docs/design.md, "Benchmarks")."""

    name: str
    version: str

    def evaluate(self, policy: Any, templates: PromptTemplates, out_dir: Path) -> dict[str, float]:
        """Run the protocol with ``policy`` (a ``VLMPolicy``), write predictions and metrics, return metrics."""
        ...


class UnknownBenchmarkError(KeyError, ValueError):
    """An unregistered benchmark name; the message lists the valid names and the closest match."""

    def __str__(self) -> str:  # KeyError would repr() the message (quotes, escaped newlines)
        return str(self.args[0]) if self.args else ""


_REGISTRY: dict[str, type] = {}
_T = TypeVar("_T", bound=type)


def register_benchmark(name: str) -> Callable[[_T], _T]:
    """Class decorator: register ``cls`` under ``name`` (sets ``cls.name`` when the class has none).

    Registering a second, different class under a taken name is an error; re-registering the same class
    (a module imported twice, e.g. by ``importlib.reload``) replaces the entry.
    """
    if not name or "/" in name:
        raise ValueError(f"register_benchmark: invalid name {name!r} (non-empty, no '/')")

    def decorator(cls: _T) -> _T:
        old = _REGISTRY.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(
                f"register_benchmark: {name!r} is already registered to "
                f"{old.__module__}.{old.__qualname__}; cannot register {cls.__module__}.{cls.__qualname__}"
            )
        if not getattr(cls, "version", None):
            raise TypeError(f"register_benchmark: {cls.__qualname__} needs a class attribute `version`")
        if getattr(cls, "name", None) is None:
            cls.name = name
        elif cls.name != name:
            raise ValueError(
                f"register_benchmark: {cls.__qualname__}.name={cls.name!r} but registered as {name!r}"
            )
        _REGISTRY[name] = cls
        return cls

    return decorator


def load_builtin_benchmarks() -> None:
    """Import the built-in benchmark modules so they register; a module that does not exist is skipped.

    Only a *missing* module is skipped (a checkout without it); an error raised while importing a module
    that exists propagates, so a broken benchmark is never silently dropped from the list.
    """
    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def list_benchmarks() -> list[str]:
    """Sorted names of all registered benchmarks (built-ins included)."""
    load_builtin_benchmarks()
    return sorted(_REGISTRY)


def get_benchmark(name: str, **kwargs: Any) -> Benchmark:
    """Instantiate the benchmark registered as ``name`` with ``kwargs`` (its constructor arguments).

    Raises :class:`UnknownBenchmarkError` (a ``KeyError`` and ``ValueError``) naming the valid benchmarks
    and the closest registered name when ``name`` is unknown.
    """
    load_builtin_benchmarks()
    cls = _REGISTRY.get(name)
    if cls is None:
        valid = sorted(_REGISTRY)
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownBenchmarkError(
            f"unknown benchmark {name!r}; valid names: {', '.join(valid) or '(none)'}.{hint}"
        )
    return cls(**kwargs)

"""Backend registry: ``get_backend("cpu" | "inductor" | "cuda")``.

An accelerator SDK backend subclasses :class:`Backend` and calls :func:`register_backend`.
"""

from __future__ import annotations

import difflib
from typing import Any

from .base import Backend, BackendUnavailableError
from .reference import CpuBackend, CudaBackend, InductorBackend

_REGISTRY: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Register a backend class under ``cls.name`` (usable as a decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def get_backend(name: str, **options: Any) -> Backend:
    """An instance of backend ``name``; clear errors for unknown or unavailable backends."""
    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise ValueError(f"unknown backend '{name}'; {hint}available: {', '.join(backend_names())}")
    cls = _REGISTRY[name]
    ok, reason = cls.is_available()
    if not ok:
        raise BackendUnavailableError(f"backend '{name}' is unavailable: {reason}")
    return cls(**options)


for _cls in (CpuBackend, InductorBackend, CudaBackend):
    register_backend(_cls)

__all__ = ["Backend", "BackendUnavailableError", "backend_names", "get_backend", "register_backend"]

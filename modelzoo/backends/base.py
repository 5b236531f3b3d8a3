"""The backend interface: what an execution target must provide.

A backend turns a (patched) model into something that runs on its device, for a compile plan.
The reference backends here are the eager CPU path, ``torch.compile`` (inductor) and CUDA; an
accelerator SDK backend implements the same three methods (compile the graph for the plan's
layout, run it), and registers itself with :func:`modelzoo.backends.register_backend`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine; the message says why and what to use."""


class Backend(ABC):
    """One execution target.

    Subclasses set ``name`` and implement :meth:`is_available`, :meth:`device` and :meth:`compile`.
    """

    name: str = ""

    def __init__(self, **options: Any) -> None:
        self.options = options

    @classmethod
    @abstractmethod
    def is_available(cls) -> tuple[bool, str]:
        """``(available, reason)``: reason says why not, and is empty when available."""

    @abstractmethod
    def device(self) -> torch.device:
        """Where inputs and parameters must live."""

    @abstractmethod
    def compile(self, model: nn.Module, plan: Mapping[str, Any] | None = None) -> nn.Module:
        """Return a module that runs ``model`` on this backend.

        Args:
            model: a built (typically patched) model; it may be moved to :meth:`device`.
            plan: the compile plan (parallel layout, static shapes, precision) for backends that
                specialise on it; the reference backends read only what they need.
        """

    def compile_block(self, module: nn.Module) -> None:  # noqa: B027 (optional: eager backends keep blocks as they are)
        """Compile one repeated block (a decoder layer) in place, keeping its parameters and
        state-dict keys; training compiles block by block after TP and recompute, before FSDP.
        Eager backends leave it as it is."""

    def to_device(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Move a dict of input tensors to :meth:`device`."""
        return {k: v.to(self.device()) for k, v in batch.items()}

    def synchronize(self) -> None:  # noqa: B027 (optional hook: a no-op on synchronous devices)
        """Wait for queued work (for timing); a no-op on synchronous devices."""

"""Measured memory: the live tensor bytes of a training step, per rank, to hold the plan against.

On CUDA the allocator keeps count (``torch.cuda.max_memory_allocated``). On CPU nothing does (the
process RSS mixes in the allocator's caching, the Python heap and the libraries), so
:class:`LiveTensorBytes` counts like a device allocator would: a ``TorchDispatchMode`` sees every
aten op (under DTensor, the local ops), notes each new output storage once, and a finalizer takes
it off when the storage is freed. ``peak`` is the high-water mark of those bytes. Fragmentation,
allocator rounding and storages resized in place (FSDP's unsharded parameters on CUDA) are not
seen; on CPU eager none of them happen.

:func:`measure_train_step` gives one rank's peak of one optimizer step: the bytes resident before
it (parameters, buffers, optimizer state: each storage once, the local shard of a DTensor) plus
the step's own peak (forward, backward, clipping, optimizer step). Run it after a first step, so
the optimizer state exists as it does for the rest of a run.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensorBytes", "measure_train_step", "resident_bytes", "resident_tensors"]


def _storage(t: torch.Tensor):
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type == "meta":
        return None  # wrapper subclasses: their inner tensors come through the mode themselves
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the context and still alive; ``peak`` is the
    most there were at once (see the module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self.origin: dict[int, str] = {}  # storage -> the op that made it (for debugging a peak)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)
        self.origin.pop(key, None)

    def track(self, tensors) -> None:
        """Count tensors that exist already (parameters, optimizer state) from now on, so that one
        freed and replaced inside the context is not counted twice."""
        for t in tensors:
            self._note(_local(t), "existing")

    def _note(self, t: torch.Tensor, origin: str = "") -> None:
        storage = _storage(t)
        if storage is None:
            return
        key = storage._cdata
        if key in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.origin[key] = origin
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._note(t, str(func))
        return out


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank holds between steps: parameters (+ buffers), gradients still allocated and
    optimizer state, each storage counted once."""
    seen: set[int] = set()

    def total(tensors) -> int:
        n = 0
        for t in tensors:
            local = _local(t)
            storage = local.untyped_storage()
            if storage._cdata not in seen:
                seen.add(storage._cdata)
                n += storage.nbytes()
        return n

    params = list(model.parameters())
    out = {"weights": total([*params, *model.buffers()]),
           "grads": total([p.grad for p in params if p.grad is not None])}
    state = [] if optimizer is None else [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    out["optimizer"] = total(state)
    return out


def resident_tensors(model, optimizer) -> list[torch.Tensor]:
    """What a rank keeps between steps: parameters, buffers, gradients still allocated, optimizer state."""
    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return [*params, *model.buffers(), *[p.grad for p in params if p.grad is not None], *state]


def measure_train_step(trainer) -> dict[str, Any]:
    """One more optimizer step of ``trainer`` (a :class:`~modelzoo.training.trainer.Trainer` that
    has taken at least one), measured in bytes: ``resident`` (by kind, before the step),
    ``peak`` (the most alive at once during it, resident included) and ``step_peak`` (peak -
    resident)."""
    gc.collect()
    resident = resident_bytes(trainer.model, trainer.optimizer)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
        torch.cuda.reset_peak_memory_stats(trainer.device)
        trainer.train_step()
        torch.cuda.synchronize(trainer.device)
        peak = torch.cuda.max_memory_allocated(trainer.device)
    else:
        with LiveTensorBytes() as tracker:
            tracker.track(resident_tensors(trainer.model, trainer.optimizer))
            trainer.train_step()
        peak = tracker.peak
    return {"resident": resident, "peak": peak, "step_peak": peak - sum(resident.values())}

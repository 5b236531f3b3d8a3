"""Streaming load of Hugging Face weight files into a model built on the meta device.

Tensors are read one at a time (safetensors by :class:`SafetensorsReader`; ``.bin`` with
``weights_only=True`` and ``mmap=True``) and assigned straight into the model, so peak memory is the model plus one tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError
from .json_file import read_json
from .safetensors_io import BIN_INDEX, BIN_SINGLE, SAFE_INDEX, SAFE_SINGLE, SafetensorsReader

__all__ = ["IGNORED_SUFFIXES", "CheckpointError", "TensorMatch", "iter_tensors", "load_weights_", "weight_files"]

#: Keys some older checkpoints carry that are recomputed at load time.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def weight_files(ckpt_dir: str | Path) -> list[Path]:
    """The weight files of an HF checkpoint dir, in load order; errors name what is missing."""
    ckpt_dir = Path(ckpt_dir)
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index_path = ckpt_dir / index_name
        if index_path.is_file():
            weight_map = read_json(index_path, fix="re-save the checkpoint").get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: not a valid weight index (no weight_map object); "
                                      "re-save the checkpoint")
            files = [ckpt_dir / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(
                    f"{ckpt_dir}: shard(s) {', '.join(missing)} listed in {index_name} are missing; "
                    "copy the complete checkpoint directory"
                )
            return files
    for single in (SAFE_SINGLE, BIN_SINGLE):
        if (ckpt_dir / single).is_file():
            return [ckpt_dir / single]
    raise CheckpointError(
        f"{ckpt_dir}: no weights found (expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX})"
    )


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from one weight file, one tensor at a time."""
    if path.suffix == ".safetensors":
        yield from SafetensorsReader(path).items()
        return
    from .torch_io import load_weights_only

    yield from load_weights_only(path).items()


def _listed(names: list[str]) -> str:
    return f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"


class TensorMatch:
    """The tensors a checkpoint's files hold, matched against the ``{name: shape}`` expected; errors
    are one line naming the file, the tensor and what config.json implies."""

    def __init__(self, ckpt_dir: str | Path, expected: dict[str, tuple[int, ...]], skip: tuple[str, ...] = ()) -> None:
        self.ckpt_dir, self.expected, self.skip = Path(ckpt_dir), expected, skip
        self.found: set[str] = set()
        self.unexpected: list[str] = []

    def take(self, path: Path, name: str, shape: tuple[int, ...]) -> bool:
        """Whether tensor ``name`` of file ``path`` is one expected (a wrong shape raises)."""
        if name.endswith(IGNORED_SUFFIXES) or name in self.skip:
            return False
        if name not in self.expected:
            self.unexpected.append(f"{name} ({path.name})")
            return False
        if tuple(shape) != tuple(self.expected[name]):
            raise CheckpointError(f"{path}: tensor '{name}' has shape {list(shape)} but config.json implies "
                                  f"{list(self.expected[name])}; the weights do not match config.json")
        self.found.add(name)
        return True

    def check(self) -> None:
        """Raise for unexpected tensors, then for expected ones no file held."""
        if self.unexpected:
            raise CheckpointError(f"{self.ckpt_dir}: unexpected tensor(s) {_listed(self.unexpected)}; the checkpoint "
                                  "does not match config.json (not a Llama checkpoint of this architecture)")
        missing = [name for name in self.expected if name not in self.found]
        if missing:
            raise CheckpointError(f"{self.ckpt_dir}: missing tensor(s) {_listed(missing)}; the checkpoint is "
                                  "incomplete or does not match config.json")


def load_weights_(model: nn.Module, ckpt_dir: str | Path, *, device: torch.device | str = "cpu",
                  dtype: torch.dtype | None = None, tied: dict[str, str] | None = None) -> None:
    """Materialize ``model``'s parameters and persistent buffers from ``ckpt_dir``, in place.

    Args:
        model: built on the meta device (or anywhere; tensors are replaced, not copied into).
        dtype: floating-point dtype to cast to; None keeps the checkpoint's dtype.
        tied: ``{target: source}`` parameter names that share storage (e.g. a tied LM head); the
            target may be absent from the files.
    Raises:
        CheckpointError: missing shards/tensors, unexpected tensors, shape mismatches, corrupt files.
    """
    tied = tied or {}
    expected = dict(model.named_parameters(remove_duplicate=False))
    expected.update((n, b) for n, b in model.named_buffers() if _is_persistent(model, n))
    match = TensorMatch(ckpt_dir, {name: tuple(t.shape) for name, t in expected.items()})
    for path in weight_files(ckpt_dir):
        for name, tensor in iter_tensors(path):
            if match.take(path, name, tuple(tensor.shape)):
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                _assign(model, name, tensor.to(device))
    for target, source in tied.items():
        if source in match.found:
            _assign(model, target, _get(model, source), share=True)
            match.found.add(target)
    match.check()


def _is_persistent(model: nn.Module, name: str) -> bool:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return attr not in module._non_persistent_buffers_set


def _get(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, share: bool = False) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = tensor if share else nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = tensor

"""Streaming load of Hugging Face weight files into a model built on the meta device.

Tensors are read one at a time (safetensors memory-mapped; ``.bin`` with ``weights_only=True`` and
``mmap=True``) and assigned straight into the model, so peak memory is the model plus one tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
#: Keys some older checkpoints carry that are recomputed at load time.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be loaded; the message names the file and the fix."""


def weight_files(ckpt_dir: str | Path) -> list[Path]:
    """The weight files of an HF checkpoint dir, in load order; errors name what is missing."""
    ckpt_dir = Path(ckpt_dir)
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index_path = ckpt_dir / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(
                    f"{index_path}: not a valid weight index ({err}); re-save the checkpoint"
                ) from err
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
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, handle.get_tensor(name)
        except SafetensorError as err:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors file ({err}); re-download or re-convert it"
            ) from err
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # pickle errors have many types; the message is what matters
        raise CheckpointError(
            f"{path}: cannot be read as a weights-only torch file ({err}); convert it to safetensors"
        ) from err
    yield from state.items()


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
    loaded: set[str] = set()
    unexpected: list[str] = []
    for path in weight_files(ckpt_dir):
        for name, tensor in iter_tensors(path):
            if name.endswith(IGNORED_SUFFIXES):
                continue
            if name not in expected:
                unexpected.append(f"{name} ({path.name})")
                continue
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise CheckpointError(
                    f"{path}: tensor '{name}' has shape {tuple(tensor.shape)} but the model expects "
                    f"{tuple(expected[name].shape)}; the checkpoint does not match config.json"
                )
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            _assign(model, name, tensor.to(device))
            loaded.add(name)
    if unexpected:
        raise CheckpointError(
            f"{ckpt_dir}: unexpected tensor(s) {', '.join(unexpected[:5])}"
            f"{' ...' if len(unexpected) > 5 else ''}; the checkpoint does not match config.json"
        )
    for target, source in tied.items():
        if source in loaded:
            _assign(model, target, _get(model, source), share=True)
            loaded.add(target)
    missing = sorted(set(expected) - loaded)
    if missing:
        raise CheckpointError(
            f"{ckpt_dir}: missing tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
            "the checkpoint is incomplete or does not match config.json"
        )


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

"""Write HF model directories: streamed, sharded safetensors with an index, tokenizer files.

The directory opens with ``transformers.AutoModelForCausalLM.from_pretrained`` unchanged; it is
written into a scratch dir that :mod:`modelzoo.checkpoint.atomic` publishes.
The tensors (a training state, in memory) are cut into shards in order at ``max_shard_bytes``
(:func:`~modelzoo.checkpoint.safetensors_io.shard_groups`) and each is written by ``save_file``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from .hf_files import add_v4_config_fields
from .safetensors_io import nbytes_of, shard_groups, shard_names, write_index

DEFAULT_SHARD_BYTES = 2 * 1024**3


def write_safetensors_shards(out_dir: Path, tensors: Iterable[tuple[str, torch.Tensor]],
                             max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Write ``tensors`` into ``out_dir`` as ``model.safetensors`` or numbered shards + index."""
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors}
    groups = shard_groups([(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()], max_shard_bytes)
    names = shard_names(len(groups))
    for file, group in zip(names, groups, strict=True):
        save_file({spec[0]: tensors[spec[0]] for spec in group}, out_dir / file, metadata={"format": "pt"})
    if len(names) > 1:
        weight_map = {spec[0]: file for file, group in zip(names, groups, strict=True) for spec in group}
        write_index(out_dir, dict(sorted(weight_map.items())), sum(nbytes_of(*spec[1:]) for g in groups for spec in g))
    return names


def write_hf_dir(out_dir: str | Path, config, tensors: Iterable[tuple[str, torch.Tensor]], *,
                 generation_config=None, tokenizer_files: dict[str, bytes] | None = None,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write an HF model dir into the existing (scratch) dir ``out_dir``; the caller publishes it.

    Args:
        config: a ``PretrainedConfig``; saved as ``config.json`` with ``architectures`` set (llama.cpp's
            converter, vLLM and other loaders need it) and the transformers 4.x fields
            (:func:`~modelzoo.checkpoint.hf_files.add_v4_config_fields`).
        tensors: ``(name, tensor)`` in HF naming; tied duplicates must already be left out.
        tokenizer_files: ``{name: bytes}`` from :func:`~modelzoo.checkpoint.hf_files.read_tokenizer_files`.
    """
    out_dir = Path(out_dir)
    config.save_pretrained(out_dir)
    add_v4_config_fields(out_dir / "config.json")  # also ``architectures`` when the config has none
    if generation_config is not None:
        generation_config.save_pretrained(out_dir)
    write_safetensors_shards(out_dir, tensors, max_shard_bytes)
    for name, data in (tokenizer_files or {}).items():
        (out_dir / name).write_bytes(data)
    return out_dir

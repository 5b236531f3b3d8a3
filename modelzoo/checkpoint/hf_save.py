"""Write HF model directories: streamed, sharded safetensors with an index, tokenizer files.

The directory opens with ``transformers.AutoModelForCausalLM.from_pretrained`` unchanged; it is
written into a scratch dir that :mod:`modelzoo.checkpoint.atomic` publishes.
Shards are filled in iteration order up to ``max_shard_bytes``; one tensor is held at a time
beyond the shard being filled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from .hf_files import add_v4_config_fields
from .hf_weights import SAFE_INDEX, SAFE_SINGLE

DEFAULT_SHARD_BYTES = 2 * 1024**3


def write_safetensors_shards(out_dir: Path, tensors: Iterable[tuple[str, torch.Tensor]],
                             max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Write ``tensors`` into ``out_dir`` as ``model.safetensors`` or numbered shards + index."""
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total = 0
    written: list[tuple[str, list[str]]] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f".shard-{len(written) + 1:05d}.safetensors"
            save_file(shard, out_dir / name, metadata={"format": "pt"})
            written.append((name, list(shard)))
            shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[name] = tensor.detach().contiguous().cpu()
        shard_bytes += size
        total += size
    flush()
    if len(written) == 1:
        os.replace(out_dir / written[0][0], out_dir / SAFE_SINGLE)
        return [SAFE_SINGLE]
    weight_map, names = {}, []
    for i, (tmp_name, keys) in enumerate(written, start=1):
        final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        os.replace(out_dir / tmp_name, out_dir / final)
        weight_map.update(dict.fromkeys(keys, final))
        names.append(final)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
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

"""Write HF model directories: streamed, sharded safetensors with an index, written atomically.

The directory opens with ``transformers.AutoModelForCausalLM.from_pretrained`` unchanged.
Shards are filled in iteration order up to ``max_shard_bytes``; one tensor is held at a time
beyond the shard being filled.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

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


def save_hf_dir(out_dir: str | Path, config, tensors: Iterable[tuple[str, torch.Tensor]], *,
                generation_config=None, tokenizer_dir: str | Path | None = None,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES, extra_files: dict[str, str] | None = None) -> Path:
    """Write a complete HF model dir at ``out_dir`` atomically (temp dir, then rename).

    Args:
        config: a ``PretrainedConfig``; saved as ``config.json``.
        tensors: ``(name, tensor)`` in HF naming; tied duplicates must already be left out.
        tokenizer_dir: a dir whose tokenizer files are copied in (``save_pretrained`` output).
        extra_files: ``{relative name: text}`` written alongside.
    An existing ``out_dir`` is replaced only after the new one is complete.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".tmp-{out_dir.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    if generation_config is not None:
        generation_config.save_pretrained(tmp)
    write_safetensors_shards(tmp, tensors, max_shard_bytes)
    if tokenizer_dir is not None:
        for item in Path(tokenizer_dir).iterdir():
            if item.is_file() and item.name not in ("config.json", "generation_config.json"):
                shutil.copy2(item, tmp / item.name)
    for rel, text in (extra_files or {}).items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text)
    replace_dir(tmp, out_dir)
    return out_dir


def replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is moved aside first and removed after."""
    old = target.parent / f".old-{target.name}"
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(new, target)
    if old.exists():
        shutil.rmtree(old)

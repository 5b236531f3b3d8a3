"""``quantize --int8``: write a float checkpoint in the int8 layout of ``modelzoo.checkpoint.int8``.

Every linear that :func:`~modelzoo.checkpoint.int8.quantizable_linears` names becomes
``<module>.weight`` int8 ``[out, in]`` + ``<module>.weight_scale`` float32 ``[out]`` (per output
channel absmax, :func:`~modelzoo.checkpoint.int8.quantize_weight`), computed a row block at a time
(the scheme is per row, so blocks give the same bits as the whole matrix); embeddings and norms
keep their dtype. ``config.json`` gets ``modelzoo_quantization``: what the generation CLI reads.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from modelzoo.checkpoint.int8 import (
    METHOD,
    QUANT_KEY,
    SCALE_SUFFIX,
    SCHEME,
    quantizable_linears,
    quantize_weight,
)

from .hf_dir import write_hf_metadata
from .safetensors_io import ShardedSafetensorsWriter
from .view import CheckpointView, rechunk_rows

#: fp32 bytes per quantization block (quantize_weight makes a few fp32 temporaries of a block)
QUANT_BLOCK_BYTES = 16 * 2**20


def int8_modules(view: CheckpointView, include_lm_head: bool = True) -> list[str]:
    with torch.device("meta"):
        model = LlamaForCausalLM(view.config)
    return quantizable_linears(model, include_lm_head=include_lm_head)


def write_int8(view: CheckpointView, out_dir: Path, max_shard_bytes: int, progress,
               include_lm_head: bool = True) -> list[str]:
    """Write ``view`` quantized into ``out_dir``; returns the quantized module names."""
    modules = int8_modules(view, include_lm_head)
    weights = {f"{m}.weight" for m in modules}
    specs = []
    for src in view.sources.values():
        if src.name in weights:
            specs += [(src.name, torch.int8, src.shape), (f"{src.name}{SCALE_SUFFIX}", torch.float32, src.shape[:1])]
        else:
            specs.append((src.name, src.dtype, src.shape))
    writer = ShardedSafetensorsWriter(out_dir, specs, max_shard_bytes)
    progress.total = writer.total_size
    try:
        for src in view.sources.values():
            progress.set_postfix_str(src.name, refresh=False)
            if src.name not in weights:
                progress.update(writer.write(src.name, src.chunks()))
                continue
            scales: list[torch.Tensor] = []

            def quantized(src=src, scales=scales):
                block = QUANT_BLOCK_BYTES * src.dtype.itemsize // 4
                for rows in rechunk_rows(src.chunks(), block):
                    q, scale = quantize_weight(rows)
                    scales.append(scale)
                    yield q

            progress.update(writer.write(src.name, quantized()))
            progress.update(writer.write(f"{src.name}{SCALE_SUFFIX}", [torch.cat(scales)]))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    config = copy.deepcopy(view.config)
    setattr(config, QUANT_KEY, {"method": METHOD, "scheme": SCHEME, "modules": modules})
    write_hf_metadata(view, out_dir, config=config)
    return modules

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

from .hf_dir import Entry, write_hf_metadata, write_weights
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
    entries: list[Entry] = []
    for src in view.sources.values():
        if src.name not in weights:
            entries.append((src.name, src.dtype, src.shape, src.chunks))
            continue
        scales: list[torch.Tensor] = []

        def quantized(src=src, scales=scales):
            block = QUANT_BLOCK_BYTES * src.dtype.itemsize // 4
            for rows in rechunk_rows(src.chunks(), block):
                q, scale = quantize_weight(rows)
                scales.append(scale)
                yield q

        entries.append((src.name, torch.int8, src.shape, quantized))
        # written right after the weight, whose quantization fills ``scales``
        entries.append((f"{src.name}{SCALE_SUFFIX}", torch.float32, src.shape[:1], lambda s=scales: [torch.cat(s)]))
    write_weights(out_dir, entries, max_shard_bytes, progress)
    config = copy.deepcopy(view.config)
    setattr(config, QUANT_KEY, {"method": METHOD, "scheme": SCHEME, "modules": modules})
    write_hf_metadata(view, out_dir, config=config)
    return modules

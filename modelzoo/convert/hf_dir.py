"""HF checkpoint directories (float or int8), read as a view and written from any view.

Written: ``config.json`` (with ``dtype`` = the stored dtype), ``generation_config.json``, tokenizer
files, and the weights as ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` +
``model.safetensors.index.json`` (cut at ``--max-shard-size``). ``transformers`` opens it unchanged.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig

from modelzoo.checkpoint.hf_files import add_v4_config_fields
from modelzoo.checkpoint.hf_weights import CheckpointError, TensorMatch, weight_files
from modelzoo.checkpoint.int8 import QUANT_KEY, SCALE_SUFFIX, dequantize_weight
from modelzoo.checkpoint.json_file import read_json
from modelzoo.checkpoint.safetensors_io import SafetensorsReader, ShardedSafetensorsWriter
from modelzoo.checkpoint.torch_io import TorchFile
from modelzoo.models.llama.loading import load_llama_config

from .tokenizer import TokenizerSource
from .view import CheckpointView, TensorSource, hf_specs, mapped_rows, rechunk_rows


def _file_source(name: str, reader: SafetensorsReader | TorchFile, dtype: torch.dtype,
                 shape: tuple[int, ...]) -> TensorSource:
    def produce():
        yield from mapped_rows(lambda rows: reader.get(name, rows), shape, dtype)
    return TensorSource(name, dtype, shape, produce, where=str(reader.path), whole=lambda: reader.get(name))


def _dequant_source(name: str, q: TensorSource, scale: TensorSource) -> TensorSource:
    def produce():
        scales = scale.materialize().float()
        start = 0
        for block in rechunk_rows(q.chunks(), 16 * 2**20):
            yield dequantize_weight(block, scales[start:start + block.shape[0]])
            start += block.shape[0]
    return TensorSource(name, torch.float32, q.shape, produce, where=q.where)


def open_hf(path: str | Path, allow_int8: bool = False) -> CheckpointView:
    """Read an HF dir's config and tensor headers; errors name the file, tensor and fix."""
    path = Path(path)
    config = load_llama_config(str(path))
    quant = getattr(config, QUANT_KEY, None)
    if quant and not allow_int8:
        raise CheckpointError(f"{path}: is an int8 checkpoint ({QUANT_KEY} in config.json); convert the float "
                              "checkpoint it was made from instead")
    modules = list(quant["modules"]) if quant else []
    expected = hf_specs(config)
    for module in modules:
        expected[f"{module}.weight{SCALE_SUFFIX}"] = (expected[f"{module}.weight"][0],)
    found: dict[str, tuple[SafetensorsReader | TorchFile, torch.dtype, tuple[int, ...]]] = {}
    match = TensorMatch(path, expected, skip=("lm_head.weight",) if config.tie_word_embeddings else ())
    for file in weight_files(path):
        reader = SafetensorsReader(file) if file.suffix == ".safetensors" else TorchFile(file)
        for name, (dtype, shape) in reader.tensors.items():
            if match.take(file, name, shape):
                found[name] = (reader, dtype, tuple(shape))
    match.check()
    sources = {}
    for name in expected:
        reader, dtype, shape = found[name]
        sources[name] = _file_source(name, reader, dtype, shape)
    view_sources = {}
    for name in hf_specs(config):
        module = name.rsplit(".", 1)[0]
        if module in modules:
            view_sources[name] = _dequant_source(name, sources[name], sources[f"{name}{SCALE_SUFFIX}"])
        else:
            view_sources[name] = sources[name]
    gen_file = path / "generation_config.json"
    generation = read_json(gen_file) if gen_file.is_file() else None
    notes = [f"int8 weights of {len(modules)} linears dequantized to float32 for comparison"] if modules else []
    return CheckpointView(path, "int8" if modules else "hf", config, view_sources, generation,
                          TokenizerSource.from_hf_dir(path), notes, native_tensors=len(sources),
                          quantized_modules=modules)


def stored_dtype(view: CheckpointView) -> torch.dtype:
    """The dtype most of the weights are stored in (what ``config.json``'s ``dtype`` should say)."""
    counts: dict[torch.dtype, int] = {}
    for src in view.sources.values():
        if src.dtype.is_floating_point:
            counts[src.dtype] = counts.get(src.dtype, 0) + src.numel
    return max(counts, key=counts.get) if counts else torch.float32


def generation_config_for(view: CheckpointView) -> dict[str, Any]:
    if view.generation_config:
        return dict(view.generation_config)
    config = view.config
    return {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}


def write_hf_metadata(view: CheckpointView, out_dir: Path, config: LlamaConfig | None = None,
                      dtype: torch.dtype | None = None, instruct: bool = False) -> None:
    """``config.json``, ``generation_config.json`` and tokenizer files of ``view`` into ``out_dir``.

    ``config.json`` always names ``architectures: ["LlamaForCausalLM"]`` (what the weights are,
    whatever the input said; llama.cpp's converter and serving stacks dispatch on it) and carries
    the transformers 4.x fields (:func:`add_v4_config_fields`); ``tokenizer_config.json`` names a class
    transformers 4.x and 5.x both load.
    """
    config = copy.deepcopy(config or view.config)
    config.dtype = dtype or stored_dtype(view)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out_dir)
    add_v4_config_fields(out_dir / "config.json")
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config_for(view), indent=2) + "\n")
    if view.tokenizer is not None:
        view.tokenizer.write_hf(out_dir, instruct=instruct)


#: one output tensor: name, dtype, shape, and a callable giving its row-major chunks when its turn comes
Entry = tuple[str, torch.dtype, tuple[int, ...], Callable[[], Iterable[torch.Tensor]]]


def write_weights(out_dir: Path, entries: list[Entry], max_shard_bytes: int, progress) -> None:
    """Stream ``entries``, in order, into ``out_dir``'s HF weight files (shards + index)."""
    writer = ShardedSafetensorsWriter(out_dir, [entry[:3] for entry in entries], max_shard_bytes)
    progress.total = writer.total_size
    try:
        for name, _, _, chunks in entries:
            progress.set_postfix_str(name, refresh=False)
            progress.update(writer.write(name, chunks()))
        writer.close()
    except BaseException:
        writer.abort()
        raise


def write_hf(view: CheckpointView, out_dir: Path, max_shard_bytes: int, progress, instruct: bool = False) -> None:
    """Write ``view`` as an HF checkpoint dir into (the temp dir) ``out_dir``, one tensor at a time."""
    write_weights(out_dir, [(s.name, s.dtype, s.shape, s.chunks) for s in view.sources.values()], max_shard_bytes,
                  progress)
    write_hf_metadata(view, out_dir, instruct=instruct)

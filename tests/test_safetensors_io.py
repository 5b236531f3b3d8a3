"""The safetensors I/O layer: both writers give the HF sharded layout transformers reads, the
index says exactly what each shard holds, and the reader returns the rows asked for."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import stock_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from modelzoo.checkpoint.errors import CheckpointError
from modelzoo.checkpoint.hf_save import write_safetensors_shards
from modelzoo.checkpoint.safetensors_io import (
    SAFE_INDEX,
    SAFE_SINGLE,
    SafetensorsReader,
    ShardedSafetensorsWriter,
    nbytes_of,
)


def _state():
    torch.manual_seed(0)
    return {"a.weight": torch.randn(40, 8), "b.bias": torch.randn(8).to(torch.bfloat16),
            "c.weight": torch.randint(-5, 5, (16, 8), dtype=torch.int8), "d.weight": torch.randn(30, 8)}


def _write_streaming(out, state, max_bytes):
    writer = ShardedSafetensorsWriter(out, [(n, t.dtype, tuple(t.shape)) for n, t in state.items()], max_bytes)
    for name, tensor in state.items():
        writer.write(name, list(tensor.split(7)) if tensor.dim() == 2 else [tensor])  # row blocks
    writer.close()


def _write_in_memory(out, state, max_bytes):
    out.mkdir(exist_ok=True)
    write_safetensors_shards(out, state.items(), max_bytes)


@pytest.mark.parametrize("write", [_write_streaming, _write_in_memory], ids=["streaming", "in-memory"])
def test_sharded_index_lists_exactly_what_each_shard_holds(tmp_path, write):
    state = _state()
    write(tmp_path, state, max_bytes=1000)  # [a] (bigger than the cut), [b, c], [d]
    index = json.loads((tmp_path / SAFE_INDEX).read_text())
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) == 3 and files == sorted(set(index["weight_map"].values()))
    assert all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    assert index["metadata"]["total_size"] == sum(nbytes_of(t.dtype, t.shape) for t in state.values())
    held = {}
    for file in files:
        with safe_open(str(tmp_path / file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118
                held[name] = file
                assert torch.equal(handle.get_tensor(name), state[name])
    assert held == index["weight_map"]
    assert not (tmp_path / SAFE_SINGLE).exists()


@pytest.mark.parametrize("write", [_write_streaming, _write_in_memory], ids=["streaming", "in-memory"])
def test_one_shard_is_model_safetensors_without_index(tmp_path, write):
    write(tmp_path, _state(), max_bytes=10**9)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SAFE_SINGLE]


def test_streamed_sharded_dir_opens_in_transformers(tmp_path):
    model = stock_model("llama3_tiny")
    model.config.save_pretrained(tmp_path)
    state = {n: t for n, t in model.state_dict().items() if n != "lm_head.weight" or not model.config.tie_word_embeddings}
    _write_streaming(tmp_path, state, max_bytes=20_000)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_reader_returns_rows_and_names_a_truncated_file(tmp_path):
    state = _state()
    _write_streaming(tmp_path, state, max_bytes=10**9)
    reader = SafetensorsReader(tmp_path / SAFE_SINGLE)
    assert reader.tensors["b.bias"] == (torch.bfloat16, (8,))
    assert torch.equal(reader.get("a.weight", (5, 17)), state["a.weight"][5:17])
    assert torch.equal(reader.get("c.weight"), state["c.weight"])
    size = (tmp_path / SAFE_SINGLE).stat().st_size
    with open(tmp_path / SAFE_SINGLE, "r+b") as handle:
        handle.truncate(size - 8)
    with pytest.raises(CheckpointError, match=rf"{SAFE_SINGLE}: truncated .*re-download or re-convert it"):
        SafetensorsReader(tmp_path / SAFE_SINGLE)

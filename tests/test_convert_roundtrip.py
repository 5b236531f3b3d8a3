"""Round trips (HF -> Meta -> HF, HF -> TP shards -> HF) are bit-identical; shards equal the training
TP plan's ``shard_tensor``; ``quantize --int8`` writes exactly ``quantize_state``'s layout."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import stock_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from modelzoo.checkpoint.hf_weights import iter_tensors, weight_files
from modelzoo.checkpoint.int8 import (
    QUANT_KEY,
    dequantize_state,
    quantizable_linears,
    quantize_model_,
    quantize_state,
)
from modelzoo.cli.convert import main
from modelzoo.generation.loading import load_prequantized
from modelzoo.models.llama.parallelize import shard_tensor, tp_layout


def tensor_hashes(ckpt_dir: Path) -> dict[str, str]:
    """sha256 of (dtype, shape, bytes) per tensor of an HF dir."""
    out = {}
    for file in weight_files(ckpt_dir):
        for name, tensor in iter_tensors(file):
            digest = hashlib.sha256(f"{tensor.dtype}{list(tensor.shape)}".encode())
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            out[name] = digest.hexdigest()
    return out


def save_hf(tmp_path: Path, preset: str, dtype=torch.float32, **overrides) -> Path:
    model = stock_model(preset, **overrides).to(dtype)
    path = tmp_path / "hf"
    model.save_pretrained(path)
    return path


def run(*argv: str) -> None:
    assert main([*argv, "--quiet"]) == 0


@pytest.mark.parametrize(("preset", "n_mp", "dtype"), [
    ("llama2_tiny", 1, torch.float32),
    ("llama2_tiny", 2, torch.bfloat16),   # Llama-2: embedding split along dim
    ("llama3_tiny", 2, torch.float32),    # Llama-3: embedding split along vocab
    ("llama3_tiny", 4, torch.bfloat16),   # KV heads duplicated over files
    ("llama3_2_tiny", 1, torch.bfloat16),  # tied
])
def test_hf_to_meta_to_hf_is_bit_identical(tmp_path, preset, n_mp, dtype):
    src = save_hf(tmp_path, preset, dtype)
    run("hf-to-meta", "--input", str(src), "--output", str(tmp_path / "meta"), "--model-parallel", str(n_mp))
    meta_files = sorted(p.name for p in (tmp_path / "meta").iterdir())
    assert meta_files == sorted([".modelzoo-output.json", "params.json"] +
                                [f"consolidated.{i:02d}.pth" for i in range(n_mp)])
    shard0 = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True, mmap=True)
    assert all(t.dtype == dtype for t in shard0.values())
    run("meta-to-hf", "--input", str(tmp_path / "meta"), "--output", str(tmp_path / "back"), "--model-size", preset)
    assert tensor_hashes(tmp_path / "back") == tensor_hashes(src)
    before, after = (json.loads((p / "config.json").read_text()) for p in (src, tmp_path / "back"))
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "tie_word_embeddings", "rope_parameters", "rms_norm_eps", "max_position_embeddings", "dtype"):
        assert after[key] == before[key], key


def test_meta_writer_matches_torch_save(tmp_path):
    """hf-to-meta's streaming .pth writer produces what torch.save of the same dict produces."""
    from modelzoo.checkpoint.torch_io import TorchPthWriter

    state = {"a": torch.randn(3, 4), "b": torch.randn(5).bfloat16(), "c": torch.arange(6, dtype=torch.int8)}
    writer = TorchPthWriter(tmp_path / "mine.pth", [(k, v.dtype, tuple(v.shape)) for k, v in state.items()])
    for name, tensor in state.items():
        writer.write(name, tensor)
    writer.close()
    torch.save(state, tmp_path / "ref.pth")
    import zipfile

    mine, ref = zipfile.ZipFile(tmp_path / "mine.pth"), zipfile.ZipFile(tmp_path / "ref.pth")
    assert mine.read("mine/data.pkl") == ref.read("ref/data.pkl")
    loaded = torch.load(tmp_path / "mine.pth", weights_only=True, mmap=True)
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in state.items())


@pytest.mark.parametrize(("preset", "n_chips", "vocab"), [
    ("llama2_tiny", 4, 1023),    # odd vocab: lm_head shards zero-padded to 1024, trimmed back
    ("llama3_tiny", 4, 1024),    # 2 KV heads over 4 chips: replicated
    ("llama3_2_tiny", 2, 1024),  # tied embedding: replicated
])
def test_shard_matches_tp_plan_and_unshard_is_bit_identical(tmp_path, preset, n_chips, vocab):
    src = save_hf(tmp_path, preset, vocab_size=vocab)
    run("shard", "--input", str(src), "--output", str(tmp_path / "tp"), "--n-chips", str(n_chips),
        "--max-shard-size", "50KB")
    manifest = json.loads((tmp_path / "tp" / "tp_shards.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(src)
    layout = tp_layout(model.config, n_chips)
    assert (manifest["n_chips"], manifest["kv_mode"], manifest["padded_vocab"]) == \
        (n_chips, layout.kv_mode, layout.padded_vocab)
    state = {k: v for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    for rank in range(n_chips):
        rank_dir = tmp_path / "tp" / f"rank_{rank:02d}"
        assert (rank_dir / "model.safetensors.index.json").is_file()
        got = {}
        for file in weight_files(rank_dir):
            got.update(load_file(file))
        assert got.keys() == state.keys()
        for name, full in state.items():
            assert torch.equal(got[name], shard_tensor(name, full, layout, rank, model.config.head_dim)), (rank, name)
    run("unshard", "--input", str(tmp_path / "tp"), "--output", str(tmp_path / "back"))
    assert tensor_hashes(tmp_path / "back") == tensor_hashes(src)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["vocab_size"] == vocab


def test_shard_reads_meta_directly_and_verify_reads_shards(tmp_path, capsys):
    src = save_hf(tmp_path, "llama3_tiny")
    run("hf-to-meta", "--input", str(src), "--output", str(tmp_path / "meta"), "--model-parallel", "2")
    run("shard", "--input", str(tmp_path / "meta"), "--output", str(tmp_path / "tp"), "--n-chips", "2")
    assert main(["verify", str(tmp_path / "tp"), str(src), "--logits", "never"]) == 0
    assert "PASS  weights" in capsys.readouterr().out


def test_quantize_int8_writes_the_int8_module_layout(tmp_path):
    src = save_hf(tmp_path, "llama3_tiny", torch.bfloat16)
    run("quantize", "--int8", "--input", str(src), "--output", str(tmp_path / "q"), "--max-shard-size", "100KB")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    modules = quantizable_linears(model)
    assert config[QUANT_KEY] == {"method": "int8_weight_only", "scheme": "per_output_channel_absmax",
                                 "modules": modules}
    written = {}
    for file in weight_files(tmp_path / "q"):
        written.update(load_file(file))
    want = quantize_state(model.state_dict(), modules)
    assert written.keys() == want.keys()
    for name, tensor in want.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name
    assert written["model.embed_tokens.weight"].dtype == torch.bfloat16  # not a linear: dtype kept
    # what the generation side does: Int8Linear modules loaded from the files = quantizing in memory
    assert quantize_model_(model) == modules
    loaded = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    quantize_model_(loaded)
    loaded.load_state_dict(written, strict=True)
    ids = torch.randint(0, 1024, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert set(dequantize_state(written)) == {k for k in want if not k.endswith("_scale")}


def test_torch_reader_maps_views_and_falls_back_for_strided_tensors(tmp_path):
    from modelzoo.checkpoint.torch_io import TorchFile

    base = torch.randn(6, 4)
    state = {"view": base[2:5], "strided": base.t(), "plain": torch.arange(12, dtype=torch.int8).reshape(3, 4)}
    torch.save(state, tmp_path / "x.pth")
    reader = TorchFile(tmp_path / "x.pth")
    for name, tensor in state.items():
        assert torch.equal(reader.get(name), tensor), name
    assert torch.equal(reader.get("view", (1, 3)), base[3:5])
    assert torch.equal(reader.get("strided", (1, 2)), base.t()[1:2])


def test_generation_loader_reads_the_int8_dir(tmp_path):
    """The generation side's pre-quantized loader opens what ``quantize --int8`` writes."""
    src = save_hf(tmp_path, "llama3_2_tiny")
    run("quantize", "--int8", "--input", str(src), "--output", str(tmp_path / "q"))
    model = AutoModelForCausalLM.from_pretrained(src)
    quantize_model_(model)
    loaded = load_prequantized(tmp_path / "q")
    ids = torch.randint(0, 1024, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)

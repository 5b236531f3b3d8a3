"""from_pretrained: presets (lazy, meta) and HF dirs (streamed) against transformers' own loader."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, stock_model
from safetensors.torch import save_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from modelzoo.checkpoint.hf_weights import CheckpointError
from modelzoo.models.llama import from_pretrained, is_patched


def _ids(vocab, seq=24):
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("preset", FAMILIES)
def test_hf_dir_loads_like_transformers(tmp_path, preset):
    stock_model(preset).save_pretrained(tmp_path)
    ours = from_pretrained(str(tmp_path))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert is_patched(ours)
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)
    if ours.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_sharded_checkpoint_and_dtype(tmp_path):
    model = stock_model("llama3_tiny")
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = from_pretrained(str(tmp_path), dtype="bfloat16")
    assert ours.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert ours.model.rotary_emb.inv_freq.dtype == torch.float32
    assert_close(ours.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight.bfloat16())


def test_preset_on_meta_materializes_nothing():
    model = from_pretrained("llama2_70b", device="meta", dtype="bfloat16")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 68e9


def test_preset_seed_is_reproducible_and_overrides_apply():
    a = from_pretrained("llama3_tiny", seed=3, overrides={"num_hidden_layers": 1})
    b = from_pretrained("llama3_tiny", seed=3, overrides={"num_hidden_layers": 1})
    assert len(a.model.layers) == 1
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    assert a.model.layers[0].self_attn.q_proj.weight.std() > 0


def test_missing_shard_is_named(tmp_path):
    stock_model("llama3_tiny").save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / victim).unlink()
    with pytest.raises(CheckpointError, match=f"{victim}.*missing"):
        from_pretrained(str(tmp_path))


def test_truncated_safetensors_is_named(tmp_path):
    stock_model("llama2_tiny").save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated \(.*re-download or re-convert it"):
        from_pretrained(str(tmp_path))


def test_missing_and_mismatched_tensors(tmp_path):
    model = stock_model("llama2_tiny")
    model.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensor.*layers.1.mlp.up_proj.weight"):
        from_pretrained(str(tmp_path))
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"up_proj.weight' has shape \[3, 3\] but config.json implies"):
        from_pretrained(str(tmp_path))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        from_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match="neither a preset nor a directory.*llama2_7b"):
        from_pretrained("llama2_7bb")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type is 'gpt2'"):
        from_pretrained(str(tmp_path))


def test_pickle_weights_load_weights_only(tmp_path):
    model = stock_model("llama2_tiny")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    ours = from_pretrained(str(tmp_path))
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        assert_close(ours(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    torch.save({"x": object()}, tmp_path / "pytorch_model.bin")  # not weights-only
    with pytest.raises(CheckpointError, match="weights-only"):
        from_pretrained(str(tmp_path))

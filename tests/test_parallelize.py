"""Llama TP plan: TP=k logits equal TP=1 (gloo, CPU processes); shard files round-trip exactly."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import stock_model
from helpers.spawn_batch import Case, register
from torch.testing import assert_close

from modelzoo.config import ConfigError
from modelzoo.models.llama import patch_llama
from modelzoo.models.llama.parallelize import (
    REPLICATE,
    ROWWISE,
    VOCAB,
    parallelize_llama,
    shard_tensor,
    style_of,
    tp_layout,
    unshard_tensors,
)


def _inputs(vocab: int):
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(5))
    types = torch.ones_like(ids)
    types[:, :4] = 0
    types[:, 11] = 3
    return ids, types


def _tp_worker(rank, world_size, out_dir, preset):
    from torch.distributed.device_mesh import init_device_mesh

    model = patch_llama(stock_model(preset))
    mesh = init_device_mesh("cpu", (world_size,))
    layout = parallelize_llama(model, mesh)
    ids, types = _inputs(model.config.vocab_size)
    with torch.no_grad():
        out = model(ids, token_type_ids=types)
    torch.save({"logits": out.logits, "loss": out.loss, "kv_mode": layout.kv_mode}, f"{out_dir}/rank{rank}.pt")


TP_CASES = [
    ("llama2_tiny", 2, "shard"),
    ("llama2_tiny", 4, "shard"),
    ("llama3_tiny", 4, "replicate"),   # 2 KV heads over 4 chips
    ("llama3_2_tiny", 2, "shard"),     # tied embeddings stay replicated
]


# the TP runs are spawned with the session's other runs of as many processes (helpers/spawn_batch.py)
register(__name__, lambda inputs: {
    f"{preset}-tp{n_chips}": Case(n_chips, _tp_worker, (preset,), tests=("test_tp_matches_single_process",))
    for preset, n_chips, _ in TP_CASES})


@pytest.fixture(scope="module")
def spawned(spawn_batch):
    return functools.partial(spawn_batch, __name__)


@pytest.mark.parametrize(("preset", "n_chips", "kv_mode"), TP_CASES)
def test_tp_matches_single_process(spawned, preset, n_chips, kv_mode):
    reference = patch_llama(stock_model(preset))
    ids, types = _inputs(reference.config.vocab_size)
    with torch.no_grad():
        want = reference(ids, token_type_ids=types)
    out = spawned(f"{preset}-tp{n_chips}")
    for rank in range(n_chips):
        got = torch.load(out / f"rank{rank}.pt", weights_only=True)
        assert got["kv_mode"] == kv_mode
        assert_close(got["logits"], want.logits, atol=1e-5, rtol=0)
        assert_close(got["loss"], want.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("preset", "n_chips"), [("llama2_tiny", 4), ("llama3_tiny", 4), ("llama3_2_tiny", 2)])
def test_shard_unshard_is_bit_identical(preset, n_chips):
    model = stock_model(preset, vocab_size=1023)  # odd vocab: lm_head shards are padded
    layout = tp_layout(model.config, n_chips)
    head_dim = model.config.head_dim
    for name, tensor in model.state_dict().items():
        shards = [shard_tensor(name, tensor, layout, r, head_dim) for r in range(n_chips)]
        assert torch.equal(unshard_tensors(name, shards, layout, model.config.vocab_size), tensor), name
    assert style_of("model.layers.1.self_attn.o_proj.weight", layout) == ROWWISE
    assert style_of("model.norm.weight", layout) == REPLICATE
    assert style_of("lm_head.weight", layout) == (REPLICATE if model.config.tie_word_embeddings else VOCAB)


def test_impossible_layout_is_refused():
    config = stock_model("llama2_tiny").config
    with pytest.raises(ConfigError, match="n_chips=3 does not divide num_attention_heads=4"):
        tp_layout(config, 3)

"""Greedy generation equals ``transformers`` ``generate`` token for token: Llama-2 and Llama-3 styles,
batch 1 and 4 with prompts of different lengths, 64 new tokens, on cpu, inductor and 2-way tensor
parallel; EOS ends each sequence on its own; the repetition penalty matches too."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, stock_model
from helpers.generation_fixtures import STYLES, hf_greedy, random_prompts

from modelzoo.generation import Generator, SamplingParams

NEW_TOKENS = 64


def _ours(model, prompts, backend="cpu", batch_size=None, eos=(), **kwargs):
    gen = Generator(model, backend=backend, batch_size=batch_size or len(prompts), eos_token_ids=list(eos))
    return gen.generate_ids(prompts, NEW_TOKENS, **kwargs), gen


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("preset", FAMILIES)
def test_greedy_equals_transformers_on_cpu(preset, batch):
    model = stock_model(preset)
    prompts = random_prompts(model.config.vocab_size)[:batch]
    want = hf_greedy(model, prompts, NEW_TOKENS)
    got, gen = _ours(model, prompts)
    assert [c.token_ids for c in got] == want
    assert all(len(c.token_ids) == NEW_TOKENS and c.finish_reason == "length" for c in got)
    assert gen.telemetry.summary()["new_tokens"] == batch * NEW_TOKENS


# Each case compiles a prefill and a decode graph (~10 s of C++ compile on 2 cores). llama2_tiny at
# batch 4 runs 5 prompts: a full batch, then one prompt plus finished filler rows.
INDUCTOR_CASES = [("llama2_tiny", 1, 1), ("llama2_tiny", 4, 5), ("llama3_2_tiny", 1, 1), ("llama3_2_tiny", 4, 4)]


@pytest.mark.parametrize(("preset", "batch", "n_prompts"), INDUCTOR_CASES)
def test_greedy_equals_transformers_on_inductor(preset, batch, n_prompts):
    model = stock_model(preset)
    prompts = random_prompts(model.config.vocab_size, lengths=(5, 11, 3, 8, 6))[:n_prompts]
    want = [ids for start in range(0, n_prompts, batch)
            for ids in hf_greedy(model, prompts[start:start + batch], NEW_TOKENS)]
    got, gen = _ours(model, prompts, backend="inductor", batch_size=batch)
    assert gen.decoder.compiled
    assert [c.token_ids for c in got] == want


def test_batch_larger_than_batch_size_and_short_last_batch():
    """5 prompts in batches of 2 (2 + 2 + 1) give what each batch gives on its own in transformers."""
    model = stock_model("llama3_tiny")
    prompts = random_prompts(model.config.vocab_size, lengths=(4, 9, 2, 7, 5))
    want = [ids for start in range(0, 5, 2) for ids in hf_greedy(model, prompts[start:start + 2], NEW_TOKENS)]
    got, _ = _ours(model, prompts, batch_size=2)
    assert [c.token_ids for c in got] == want
    assert [c.index for c in got] == list(range(5))


def test_eos_ends_each_sequence_independently():
    model = stock_model("llama2_tiny")
    prompts = random_prompts(model.config.vocab_size)
    free = hf_greedy(model, prompts, NEW_TOKENS)
    eos = free[1][10]  # a token row 1 emits mid-way; other rows may or may not emit it
    want = hf_greedy(model, prompts, NEW_TOKENS, eos=eos)
    got, _ = _ours(model, prompts, eos=[eos])
    assert [c.token_ids for c in got] == want
    assert got[1].finish_reason == "eos" and len(got[1].token_ids) <= 10
    assert {c.finish_reason for c in got} <= {"eos", "length"}
    assert any(len(c.token_ids) == NEW_TOKENS for c in got)  # the batch ran on after row 1 ended


def test_repetition_penalty_equals_transformers():
    model = stock_model("llama3_tiny")
    prompts = random_prompts(model.config.vocab_size)[:1]
    want = hf_greedy(model, prompts, NEW_TOKENS, repetition_penalty=1.3)
    got, _ = _ours(model, prompts, sampling=SamplingParams(repetition_penalty=1.3))
    assert [c.token_ids for c in got] == want
    assert want != hf_greedy(model, prompts, NEW_TOKENS)  # the penalty changed something


def _tp_worker(rank, world_size, preset, prompts, out_dir):
    from torch.distributed.device_mesh import init_device_mesh

    from modelzoo.models.llama.parallelize import parallelize_llama

    model = stock_model(preset)
    parallelize_llama(model, init_device_mesh("cpu", (world_size,)))
    got, _ = _ours(model, prompts)
    torch.save([c.token_ids for c in got], f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("preset", ["llama3_tiny"])
def test_tensor_parallel_greedy_equals_transformers(tmp_path, preset):
    """2 gloo processes, KV heads sharded; the CLI path (--n-chips 2) is tested in test_generation_cli."""
    from modelzoo.parallel.mesh import spawn_cpu

    model = stock_model(preset)
    prompts = random_prompts(model.config.vocab_size)
    want = hf_greedy(model, prompts, NEW_TOKENS)
    spawn_cpu(_tp_worker, 2, preset, prompts, str(tmp_path))
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) == want


def test_static_cache_shapes_are_constant_across_decode_steps():
    """The decode step sees the same tensor shapes at every step (what a graph compiler specializes on)."""
    model = stock_model(STYLES[1])
    gen = Generator(model, batch_size=2, eos_token_ids=[])
    shapes = []
    step = gen.step

    def spy(tokens, positions, rows, cache_k, cache_v, keys):
        shapes.append((tuple(tokens.shape), tuple(positions.shape), rows is None, tuple(cache_k[0].shape)))
        return step(tokens, positions, rows, cache_k, cache_v, keys)

    gen.step = spy
    gen.generate_ids(random_prompts(model.config.vocab_size)[:2], 8)
    prefills, decode = shapes[:2], shapes[2:]  # each prompt prefilled into its own row, then 7 steps for both
    assert [p[2] for p in prefills] == [False, False] and all(p[0][0] == 1 for p in prefills)
    assert len(decode) == 7 and len(set(decode)) == 1 and decode[0][:3] == ((2, 1), (2, 1), True)
    assert prefills[0][3] == decode[0][3]  # one cache, allocated once, for prefill and decode

"""The continuous-batching engine in process: greedy output equals ``transformers`` whatever else is
in flight, chunked prefill, slots reused, seeded sampling independent of load, cancellation, one
failing request, the bounded queue, min_tokens / ignore_eos / logprobs."""

from __future__ import annotations

import pytest
import torch
from conftest import stock_model
from helpers.generation_fixtures import hf_greedy, random_prompts

from modelzoo.generation import EngineRequest, QueueFull, SamplingParams, SlotEngine
from modelzoo.generation.scheduler import FINISH_ABORT, FINISH_ERROR

NEW = 24


@pytest.fixture(scope="module")
def model():
    return stock_model("llama3_2_tiny")


def _run(engine: SlotEngine, requests: list[EngineRequest]):
    handles = [engine.submit(r) for r in requests]
    engine.run_until_idle()
    return [h.result for h in handles]


@pytest.mark.parametrize("backend", ["cpu", "inductor"])
def test_greedy_equals_transformers_with_slots_reused_and_chunked_prefill(model, backend):
    """10 prompts (one longer than the prefill chunk) through 3 slots equal HF generate run alone."""
    lengths = (5, 40, 3, 17, 9, 2, 33, 8, 12, 6)
    prompts = random_prompts(model.config.vocab_size, lengths=lengths, seed=3)
    engine = SlotEngine(model, backend=backend, max_batch=3, max_model_len=128, prefill_chunk=16, eos_token_ids=[])
    from torch._dynamo.utils import counters

    assert engine.warmup() == (4 if backend == "inductor" else 0)  # decode widths 1, 2, 3; prefill bucket 16
    graphs = counters["stats"]["unique_graphs"]
    results = _run(engine, [EngineRequest(p, NEW, tag=i) for i, p in enumerate(prompts)])
    assert counters["stats"]["unique_graphs"] == graphs  # warmed up: no request waited for a compilation
    want = [hf_greedy(model, [p], NEW)[0] for p in prompts]
    assert [r.token_ids for r in results] == want
    assert all(r.finish_reason == "length" and r.ttft_s is not None for r in results)


def test_a_requests_greedy_tokens_do_not_depend_on_the_others(model):
    """The same prompt alone, and submitted among others that start and end at other steps."""
    prompts = random_prompts(model.config.vocab_size, lengths=(7, 3, 11, 5, 9), seed=5)
    alone = _run(SlotEngine(model, max_batch=4, max_model_len=96, eos_token_ids=[]), [EngineRequest(prompts[0], NEW)])
    crowd = [EngineRequest(p, NEW - 3 * i, tag=i) for i, p in enumerate(prompts[1:])]
    engine = SlotEngine(model, max_batch=4, max_model_len=96, eos_token_ids=[])
    for request in crowd[:2]:
        engine.submit(request)
    engine.step()
    engine.step()  # the target joins mid-way
    target = engine.submit(EngineRequest(prompts[0], NEW))
    for request in crowd[2:]:
        engine.submit(request)
    engine.run_until_idle()
    assert target.result.token_ids == alone[0].token_ids


def test_seeded_sampling_is_the_same_alone_and_under_load(model):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=11)
    prompt = random_prompts(model.config.vocab_size, lengths=(6,), seed=7)[0]
    alone = _run(SlotEngine(model, max_batch=4, max_model_len=64, eos_token_ids=[]),
                 [EngineRequest(prompt, NEW, params)])[0]
    others = [EngineRequest(p, NEW, SamplingParams(temperature=1.0, seed=i)) for i, p in
              enumerate(random_prompts(model.config.vocab_size, lengths=(4, 9, 5), seed=8))]
    loaded = _run(SlotEngine(model, max_batch=4, max_model_len=64, eos_token_ids=[]),
                  others[:2] + [EngineRequest(prompt, NEW, params)] + others[2:])[2]
    assert loaded.token_ids == alone.token_ids
    other_seed = _run(SlotEngine(model, max_batch=1, max_model_len=64, eos_token_ids=[]),
                      [EngineRequest(prompt, NEW, SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=12))])[0]
    assert other_seed.token_ids != alone.token_ids  # the seed matters, so the equality above is not trivial


def test_cancel_frees_the_slot_for_the_next_request(model):
    prompts = random_prompts(model.config.vocab_size, lengths=(4, 6), seed=9)
    engine = SlotEngine(model, max_batch=1, max_model_len=64, eos_token_ids=[])
    first = engine.submit(EngineRequest(prompts[0], 50))
    second = engine.submit(EngineRequest(prompts[1], 5))
    engine.step()
    engine.step()
    first.cancel("client disconnected")
    engine.step()
    assert first.result.finish_reason == FINISH_ABORT and 0 < len(first.result.token_ids) < 50
    engine.run_until_idle()
    assert second.result.token_ids == hf_greedy(model, [prompts[1]], 5)[0]


def test_a_failing_request_fails_alone(model):
    prompts = random_prompts(model.config.vocab_size, lengths=(4, 6), seed=10)
    engine = SlotEngine(model, max_batch=2, max_model_len=64, eos_token_ids=[])

    def explode(event):
        raise RuntimeError("callback broke")

    bad, good = _run(engine, [EngineRequest(prompts[0], 8, on_token=explode), EngineRequest(prompts[1], 8)])
    assert bad.finish_reason == FINISH_ERROR and "callback broke" in bad.error
    assert good.token_ids == hf_greedy(model, [prompts[1]], 8)[0]


def test_queue_bound_and_invalid_requests(model):
    engine = SlotEngine(model, max_batch=1, max_model_len=32, max_queue=2, eos_token_ids=[])
    engine.submit(EngineRequest([5, 6], 4))
    engine.submit(EngineRequest([5, 6], 4))
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit(EngineRequest([5, 6], 4))
    with pytest.raises(ValueError, match="needs 40 positions but the limit is 32"):
        engine.submit(EngineRequest([5] * 30, 10))
    with pytest.raises(ValueError, match="vocab_size"):
        engine.submit(EngineRequest([model.config.vocab_size], 4))


def test_min_tokens_ignore_eos_and_logprobs(model):
    prompt = random_prompts(model.config.vocab_size, lengths=(5,), seed=2)[0]
    free = hf_greedy(model, [prompt], NEW)[0]
    eos = free[3]  # make the 4th greedy token the EOS
    first = free.index(eos)
    stopped = _run(SlotEngine(model, max_batch=1, max_model_len=64, eos_token_ids=[eos]), [EngineRequest(prompt, NEW)])
    assert stopped[0].finish_reason == "eos" and stopped[0].token_ids == free[:first]
    ignored = _run(SlotEngine(model, max_batch=1, max_model_len=64, eos_token_ids=[eos]),
                   [EngineRequest(prompt, NEW, ignore_eos=True)])
    assert ignored[0].token_ids == free
    held = _run(SlotEngine(model, max_batch=1, max_model_len=64, eos_token_ids=[eos]),
                [EngineRequest(prompt, NEW, min_tokens=first + 2, logprobs=3)])[0]
    assert len(held.token_ids) >= first + 2 and eos not in held.token_ids[:first + 2]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + held.token_ids])).logits[0, len(prompt) - 1:].float()
    logp = torch.log_softmax(logits, dim=-1)
    for step, (token, value, top) in enumerate(zip(held.token_ids, held.token_logprobs, held.top_logprobs, strict=True)):
        assert value == pytest.approx(float(logp[step, token]), abs=1e-4)
        assert [t for t, _ in top] == torch.topk(logp[step], 3).indices.tolist()

"""Sampling: top-k / top-p / repetition penalty against ``transformers``' processors and a plain
reference; seeded sampling is reproducible; stop strings, streaming and telemetry."""

from __future__ import annotations

import pytest
import torch
from conftest import stock_model
from helpers.generation_fixtures import random_prompts
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from modelzoo.generation import ByteTokenizer, Generator, SamplingParams, StopChecker, choose_next
from modelzoo.generation.sampling import apply_repetition_penalty, top_k_filter, top_p_filter
from modelzoo.generation.stopping import SequenceState


def _logits(rows=6, vocab=50, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _kept(filtered: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row > float("-inf")).flatten().tolist()) for row in filtered]


def _reference_top_k(logits, k):
    out = []
    for row in logits.tolist():
        kth = sorted(row, reverse=True)[k - 1]
        out.append({i for i, v in enumerate(row) if v >= kth})
    return out


def _reference_top_p(logits, p):
    out = []
    for row in logits.double():
        probs = row.softmax(-1).tolist()
        order = sorted(range(len(probs)), key=lambda i: -probs[i])
        kept, mass = set(), 0.0
        for i in order:  # add tokens, most likely first, until their mass reaches p
            kept.add(i)
            mass += probs[i]
            if mass >= p:
                break
        out.append(kept)
    return out


@pytest.mark.parametrize("k", [1, 5, 50, 80])
def test_top_k_matches_reference_and_transformers(k):
    logits = _logits()
    got = top_k_filter(logits, k)
    assert _kept(got) == _reference_top_k(logits, min(k, 50))
    assert torch.equal(got, TopKLogitsWarper(top_k=k)(None, logits))
    assert torch.equal(got[got > float("-inf")], logits[got > float("-inf")])  # survivors unchanged


@pytest.mark.parametrize("p", [0.05, 0.3, 0.75, 0.95, 1.0])
def test_top_p_matches_reference_and_transformers(p):
    logits = _logits(rows=8, seed=int(p * 100))
    got = top_p_filter(logits, p)
    assert _kept(got) == _reference_top_p(logits, p)
    assert torch.equal(got, TopPLogitsWarper(top_p=p)(None, logits))


def test_repetition_penalty_matches_transformers():
    logits = _logits(rows=3)
    ids = torch.tensor([[1, 4, 4, 9], [0, 2, 3, 49], [7, 7, 7, 7]])
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, ids, True)
    want = RepetitionPenaltyLogitsProcessor(penalty=1.7)(ids, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.7), want)


def test_greedy_and_top_k_1_pick_the_argmax():
    logits = _logits()
    assert torch.equal(choose_next(logits, SamplingParams()), logits.argmax(-1))
    gens = [torch.Generator().manual_seed(i) for i in range(logits.shape[0])]
    assert torch.equal(choose_next(logits, SamplingParams(temperature=1.5, top_k=1), generators=gens),
                       logits.argmax(-1))


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    params = SamplingParams(temperature=0.7, top_k=4, top_p=0.9)
    gen = [torch.Generator().manual_seed(0)]
    draws = torch.cat([choose_next(logits, params, generators=gen) for _ in range(4000)])
    want = top_p_filter(top_k_filter(logits / 0.7, 4), 0.9).softmax(-1)[0]
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert (freq - want).abs().max() < 0.03
    assert freq[want == 0].sum() == 0


def test_seeded_sampling_is_reproducible():
    model = stock_model("llama3_tiny")
    prompts = random_prompts(model.config.vocab_size)
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=7)

    def run(p, batch_size=4):
        gen = Generator(model, batch_size=batch_size, eos_token_ids=[])
        return [c.token_ids for c in gen.generate_ids(prompts, 24, sampling=p)]

    first = run(params)
    assert run(params) == first
    assert run(SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=8)) != first
    assert first != [c.token_ids for c in Generator(model, batch_size=4, eos_token_ids=[]).generate_ids(prompts, 24)]


def test_bad_sampling_params_are_refused():
    for kwargs in ({"temperature": -1}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}, {"repetition_penalty": 0}):
        with pytest.raises(ValueError):
            SamplingParams(**kwargs)


# ------------------------------------------------------------------------------- stop strings


def test_stop_string_across_tokens_is_cut_and_held_back_from_the_stream():
    tok = ByteTokenizer()
    checker = StopChecker(tok.decode, eos_token_ids=[2], stop_strings=["END"], max_new_tokens=50)
    state = SequenceState(index=0, prompt_tokens=1)
    pieces = [checker.update(state, t, need_text=True) for t in tok.encode("abcENxEND tail", add_special_tokens=False)]
    assert state.finish_reason == "stop" and state.text == "abcENx"
    assert "".join(pieces) == "abcENx"
    assert pieces[3:5] == ["", ""]  # "E", "EN" could start "END": held back until "x" disproves it


def test_eos_and_length_finish_reasons():
    tok = ByteTokenizer()
    checker = StopChecker(tok.decode, eos_token_ids=[2], max_new_tokens=3)
    eos, length = SequenceState(0, 1), SequenceState(1, 1)
    for t in (10, 11, 2, 12):
        checker.update(eos, t, need_text=False)
    for t in (10, 11, 12, 13):
        checker.update(length, t, need_text=False)
    assert (eos.finish_reason, eos.token_ids) == ("eos", [10, 11])
    assert (length.finish_reason, length.token_ids) == ("length", [10, 11, 12])


def test_streamed_pieces_add_up_to_the_completions_and_stops_end_rows_independently():
    model = stock_model("llama2_tiny", vocab_size=259)  # every id decodes with the byte tokenizer
    tok = ByteTokenizer()
    prompts = ["hello", "a much longer prompt", "hi"]
    plain = Generator(model, tok, batch_size=3, eos_token_ids=[]).generate(prompts, 40)
    stop = plain[1].text[5:8]  # a string row 1 produces
    streamed: dict[int, str] = {}
    finished = []

    def on_text(index, piece, done):
        streamed[index] = streamed.get(index, "") + piece
        if done:
            finished.append(index)

    gen = Generator(model, tok, batch_size=3, eos_token_ids=[])
    got = gen.generate(prompts, 40, stop=[stop], on_text=on_text)
    assert got[1].finish_reason == "stop" and got[1].text == plain[1].text[: plain[1].text.find(stop)]
    for c, p in zip(got, plain, strict=True):
        assert streamed[c.index] == c.text
        assert p.text.startswith(c.text)
        assert c.finish_reason == ("stop" if stop in p.text else "length")
    assert sorted(finished) == [0, 1, 2]
    summary = gen.telemetry.summary()
    assert summary["new_tokens"] == sum(len(c.token_ids) for c in got)
    assert summary["time_to_first_token_ms"] > 0 and summary["tokens_per_s"] > 0
    assert summary["per_token_latency_ms"]["p50"] > 0
    assert "time to first token" in gen.telemetry.line()

"""The generation loop: batching, prefill + decode over the static cache, sampling, stops, streaming.

    generator = Generator(model, tokenizer, backend="cpu", batch_size=4)
    completions = generator.generate(["Hello", "The capital of France is"], max_new_tokens=64)
    generator.telemetry.line()

Requests are taken in order, ``batch_size`` at a time; each batch is left-padded to its longest
prompt and decoded until every row has ended (EOS, stop string or ``max_new_tokens``). On a compiled
backend every batch has the same shapes: short batches are filled with finished dummy rows, prompts
are padded to a power-of-two bucket (long prompts to a multiple of ``prefill_chunk`` and prefilled
chunk by chunk), and the cache length is rounded up, so few graphs are compiled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import LlamaForCausalLM

from modelzoo.backends import Backend, get_backend

from .decoder import LlamaDecoder, StaticKVCache
from .sampling import SamplingParams, choose_next, row_generators
from .stopping import SequenceState, StopChecker
from .telemetry import BatchTimes, Telemetry

#: ``on_text(index, piece, done)``: streamed text of request ``index``; ``done`` on its last piece.
TextCallback = Callable[[int, str, bool], None]

CACHE_ROUND = 64  # compiled backends round the cache length up to this multiple
MIN_BUCKET = 16
RECOMPILE_LIMIT = 64


class GenerationError(ValueError):
    """A request that cannot be served as given; the message says which and how to fix it."""


@dataclass
class Completion:
    """One finished request. ``token_ids``: generated ids without the closing EOS; ``text``: their
    text, cut before a stop string; ``finish_reason``: ``eos``, ``stop`` or ``length``."""

    index: int
    prompt: str | None
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str

    def to_dict(self) -> dict:
        return {"index": self.index, "prompt": self.prompt, "completion": self.text,
                "finish_reason": self.finish_reason, "prompt_tokens": self.prompt_tokens,
                "new_tokens": len(self.token_ids), "token_ids": self.token_ids}


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def eos_ids(model: LlamaForCausalLM, tokenizer=None) -> list[int]:
    """EOS ids from the model's generation config and the tokenizer (union, in that order)."""
    ids: list[int] = []
    for value in (getattr(model.generation_config, "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return ids


def encode_prompts(tokenizer, prompts: Sequence[str], chat: bool = False) -> list[list[int]]:
    """Token ids of each prompt; with ``chat``, of the prompt as a user turn of the chat template."""
    if chat and not getattr(tokenizer, "chat_template", None):
        raise GenerationError("--chat: the tokenizer has no chat_template (tokenizer_config.json); "
                              "drop --chat or use an instruct checkpoint's tokenizer")
    out = []
    for prompt in prompts:
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                 add_generation_prompt=True, tokenize=False)
            out.append(list(tokenizer.encode(text, add_special_tokens=False)))
        else:
            out.append(list(tokenizer.encode(prompt)))
    return out


def validate_requests(prompts: Sequence[Sequence[int]], max_new_tokens: int, vocab_size: int, context: int) -> None:
    """Raise :class:`GenerationError` for an empty prompt, an id outside the vocabulary, or a request
    longer than the model's context (``max_position_embeddings``)."""
    if max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise GenerationError(f"prompt {index} is empty (no tokens); give some text")
        if max(prompt) >= vocab_size or min(prompt) < 0:
            raise GenerationError(
                f"prompt {index} has token id {max(prompt)} but the model's vocab_size is {vocab_size}; "
                "the tokenizer does not belong to this checkpoint")
        if len(prompt) + max_new_tokens > context:
            raise GenerationError(
                f"prompt {index} has {len(prompt)} tokens; with --max-new-tokens {max_new_tokens} it needs "
                f"{len(prompt) + max_new_tokens} positions but the model's context (max_position_embeddings) "
                f"is {context}; shorten the prompt or lower --max-new-tokens")


class Generator:
    """Generates from a ``LlamaForCausalLM`` (plain, int8, or tensor-parallel) with a static KV cache.

    Args:
        model: the HF model; its weights are used in place.
        tokenizer: HF tokenizer (or :class:`~modelzoo.generation.tokenizer.ByteTokenizer`); only
            needed for text in/out, stop strings and streaming.
        backend: ``cpu`` (eager), ``inductor`` (compiled decode and prefill graphs) or ``cuda``,
            or a :class:`~modelzoo.backends.Backend`.
        batch_size: requests decoded together.
        max_length: static cache slots (padded prompt + new tokens); None sizes it per batch.
        eos_token_ids: None takes them from the model's generation config and the tokenizer.
        prefill_chunk: longest prompt piece one compiled prefill graph takes.
    """

    def __init__(self, model: LlamaForCausalLM, tokenizer=None, *, backend: str | Backend = "cpu",
                 batch_size: int = 1, max_length: int | None = None, eos_token_ids: Sequence[int] | None = None,
                 prefill_chunk: int = 512) -> None:
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        self.decoder = LlamaDecoder(model.eval())
        self.step = self.backend.compile(self.decoder)
        self.decoder.compiled = self.step is not self.decoder
        if self.decoder.compiled:
            # Graphs are cached per code object (LlamaDecoder.forward), shared by every Generator in the
            # process: each decoder instance, batch size and prompt bucket adds entries. Past the limit
            # torch falls back to eager without failing, so make room rather than silently lose speed.
            import torch._dynamo

            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length, self.prefill_chunk = batch_size, max_length, prefill_chunk
        self.eos_token_ids = list(eos_ids(model, tokenizer) if eos_token_ids is None else eos_token_ids)
        self.context = int(model.config.max_position_embeddings)
        self.vocab_size = int(model.config.vocab_size)
        self.telemetry = Telemetry()
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    # -------------------------------------------------------------------------------- text level

    def encode(self, prompts: Sequence[str], chat: bool = False) -> list[list[int]]:
        """Token ids of each prompt (through the tokenizer's chat template when ``chat``)."""
        if self.tokenizer is None:
            raise GenerationError("text prompts need a tokenizer; pass token ids or load a tokenizer")
        return encode_prompts(self.tokenizer, prompts, chat)

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64, sampling: SamplingParams | None = None,
                 stop: Sequence[str] = (), chat: bool = False, on_text: TextCallback | None = None) -> list[Completion]:
        """Completions of text ``prompts`` (in order)."""
        ids = self.encode(prompts, chat)
        completions = self.generate_ids(ids, max_new_tokens, sampling, stop, on_text)
        for completion, prompt in zip(completions, prompts, strict=True):
            completion.prompt = prompt
        return completions

    # ------------------------------------------------------------------------------- token level

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
                     sampling: SamplingParams | None = None, stop: Sequence[str] = (),
                     on_text: TextCallback | None = None) -> list[Completion]:
        """Completions of tokenized ``prompts`` (in order), ``batch_size`` at a time."""
        sampling = sampling or SamplingParams()
        if stop and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer to decode the generated text")
        self.check_requests(prompts, max_new_tokens)
        decode = (lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)) if self.tokenizer else str
        checker = StopChecker(decode, self.eos_token_ids, stop, max_new_tokens)
        completions: list[Completion] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = [list(p) for p in prompts[start:start + self.batch_size]]
            states = self._generate_batch(batch, list(range(start, start + len(batch))), max_new_tokens,
                                          sampling, checker, on_text)
            for state in states:
                checker.finish(state)
                completions.append(Completion(state.index, None, state.prompt_tokens, state.token_ids,
                                              state.text, state.finish_reason))
        return completions

    def check_requests(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        """:func:`validate_requests`, plus the configured cache length (``max_length``)."""
        validate_requests(prompts, max_new_tokens, self.vocab_size, self.context)
        for index, prompt in enumerate(prompts):
            if self.max_length is not None and self._padded_length(len(prompt)) + max_new_tokens > self.max_length:
                raise GenerationError(
                    f"prompt {index} has {len(prompt)} tokens; padded prompt + --max-new-tokens {max_new_tokens} "
                    f"exceeds the static cache generation.max_length={self.max_length}; raise "
                    "generation.max_length (--max-length) or lower --max-new-tokens")

    # ---------------------------------------------------------------------------------- internals

    def _padded_length(self, longest: int) -> int:
        if not self.decoder.compiled:
            return longest
        if longest <= self.prefill_chunk:
            return min(max(_next_pow2(longest), MIN_BUCKET), self.prefill_chunk)
        return _round_up(longest, self.prefill_chunk)

    def _cache_length(self, padded: int, max_new_tokens: int) -> int:
        if self.max_length is not None:
            return self.max_length
        need = padded + max_new_tokens
        return _round_up(need, CACHE_ROUND) if self.decoder.compiled else need

    def _prefill(self, batch: list[list[int]], cache: StaticKVCache, padded: int) -> torch.Tensor:
        device = self.decoder.device
        rows = [[0] * (padded - len(p)) + p for p in batch]
        tokens = torch.tensor(rows, dtype=torch.long, device=device)
        chunk = padded if not self.decoder.compiled else min(padded, self.prefill_chunk)
        logits = None
        for begin in range(0, padded, chunk):
            slots = torch.arange(begin, begin + chunk, device=device)
            kv_len = cache.max_length if self.decoder.compiled else begin + chunk
            logits = self.step(tokens[:, begin:begin + chunk], slots, cache.k, cache.v, cache.pad, kv_len)
        cache.filled = padded
        return logits

    def _decode(self, tokens: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        slot = cache.filled
        kv_len = cache.max_length if self.decoder.compiled else slot + 1
        slots = torch.tensor([slot], dtype=torch.long, device=self.decoder.device)
        logits = self.step(tokens[:, None], slots, cache.k, cache.v, cache.pad, kv_len)
        cache.filled += 1
        return logits

    def _choose(self, logits, sampling, seen, generators) -> torch.Tensor:
        tokens = choose_next(logits, sampling, seen, generators)
        if self.distributed:  # every rank must continue with rank 0's tokens
            dist.broadcast(tokens, src=0)
        return tokens

    @torch.no_grad()
    def _generate_batch(self, batch: list[list[int]], indices: list[int], max_new_tokens: int,
                        sampling: SamplingParams, checker: StopChecker,
                        on_text: TextCallback | None) -> list[SequenceState]:
        states = [SequenceState(index, len(p)) for index, p in zip(indices, batch, strict=True)]
        real = len(batch)
        if self.decoder.compiled and real < self.batch_size:  # constant batch shape: finished dummy rows
            batch = batch + [batch[0]] * (self.batch_size - real)
        device = self.decoder.device
        padded = self._padded_length(max(map(len, batch)))
        pad = torch.tensor([padded - len(p) for p in batch], dtype=torch.long)
        cache = self.decoder.new_cache(len(batch), self._cache_length(padded, max_new_tokens), pad)
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen = torch.zeros(len(batch), self.vocab_size, dtype=torch.bool, device=device)
            for row, prompt in enumerate(batch):
                seen[row, torch.tensor(prompt, device=device)] = True
        generators = None
        if not sampling.greedy:
            generators = row_generators(sampling.seed, indices + [-1] * (len(batch) - real), device)
        times = BatchTimes(batch_size=real, prompt_tokens=sum(len(p) for p in batch[:real]))
        self.telemetry.batches.append(times)

        start = time.perf_counter()
        tokens = self._choose(self._prefill(batch, cache, padded), sampling, seen, generators)
        self._record(states, tokens, checker, on_text)
        times.ttft_s = time.perf_counter() - start
        times.new_tokens = sum(1 for s in states if s.token_ids)
        for _ in range(max_new_tokens - 1):
            if all(s.done for s in states):
                break
            if seen is not None:
                seen[torch.arange(len(batch), device=device), tokens] = True
            begin = time.perf_counter()
            tokens = self._choose(self._decode(tokens, cache), sampling, seen, generators)
            kept = self._record(states, tokens, checker, on_text)
            times.step_s.append(time.perf_counter() - begin)
            times.new_tokens += kept
            times.decode_tokens += kept
        return states

    @staticmethod
    def _record(states: list[SequenceState], tokens: torch.Tensor, checker: StopChecker,
                on_text: TextCallback | None) -> int:
        """Feed each running sequence its token; stream text; return how many tokens were kept."""
        kept = 0
        for state, token in zip(states, tokens.tolist(), strict=False):  # dummy rows come last
            if state.done:
                continue
            before = len(state.token_ids)
            piece = checker.update(state, token, need_text=on_text is not None)
            kept += len(state.token_ids) - before
            if on_text is not None and (piece or state.done):
                on_text(state.index, piece, state.done)
        return kept

"""Batch generation: a list of prompts in, completions out, through the continuous-batching engine.

    generator = Generator(model, tokenizer, backend="cpu", batch_size=4)
    completions = generator.generate(["Hello", "The capital of France is"], max_new_tokens=64)
    generator.telemetry.line()

:class:`Generator` is a client of :class:`~modelzoo.generation.scheduler.SlotEngine` (the same
engine the HTTP server drives): all prompts are submitted at once, ``batch_size`` of them run in the
cache's slots, and a slot freed by a finished prompt takes the next one at the next step. On a
compiled backend every step has the same shapes (see the scheduler), so few graphs are compiled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transformers import LlamaForCausalLM

from modelzoo.backends import Backend

from .sampling import SamplingParams
from .scheduler import (
    FINISH_ABORT,
    FINISH_ERROR,
    EngineRequest,
    GenerationError,
    RequestResult,
    SlotEngine,
    TokenEvent,
    eos_ids,
)
from .telemetry import BatchTimes, Telemetry

#: ``on_text(index, piece, done)``: streamed text of request ``index``; ``done`` on its last piece.
TextCallback = Callable[[int, str, bool], None]

__all__ = ["Completion", "GenerationError", "Generator", "TextCallback", "encode_prompts", "eos_ids",
           "validate_requests"]


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
        batch_size: requests decoded together (the engine's slots).
        max_length: positions per slot (prompt + new tokens); None sizes the cache per call.
        eos_token_ids: None takes them from the model's generation config and the tokenizer.
        prefill_chunk: longest prompt piece one prefill forward takes.
    """

    def __init__(self, model: LlamaForCausalLM, tokenizer=None, *, backend: str | Backend = "cpu",
                 batch_size: int = 1, max_length: int | None = None, eos_token_ids: Sequence[int] | None = None,
                 prefill_chunk: int = 512) -> None:
        self.engine = SlotEngine(model, tokenizer, backend=backend, max_batch=batch_size,
                                 max_model_len=max_length, prefill_chunk=prefill_chunk,
                                 eos_token_ids=eos_token_ids, cache_length=max_length or 1)
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.decoder, self.backend = self.engine.decoder, self.engine.backend
        self.eos_token_ids = self.engine.eos_token_ids
        self.context, self.vocab_size = self.engine.context, self.engine.vocab_size
        self.telemetry = Telemetry()

    @property
    def step(self):
        """The (compiled) decoder call every forward goes through."""
        return self.engine.step_fn

    @step.setter
    def step(self, fn) -> None:
        self.engine.step_fn = fn

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
        """Completions of tokenized ``prompts`` (in order); ``batch_size`` run at a time, a freed
        slot taking the next prompt at the next step."""
        sampling = sampling or SamplingParams()
        if stop and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer to decode the generated text")
        self.check_requests(prompts, max_new_tokens)
        engine = self.engine
        engine.reserve(max(map(len, prompts)) + max_new_tokens)
        results: dict[int, RequestResult] = {}

        def on_token(event: TokenEvent) -> None:
            if event.text:
                on_text(event.tag, event.text, False)

        def on_finish(result: RequestResult) -> None:
            results[result.tag] = result
            if on_text is not None and result.finish_reason not in (FINISH_ABORT, FINISH_ERROR):
                on_text(result.tag, "", True)

        for index, prompt in enumerate(prompts):
            engine.submit(EngineRequest(list(prompt), max_new_tokens, sampling, tuple(stop),
                                        stream_text=on_text is not None, seed_index=index, tag=index,
                                        on_token=on_token if on_text is not None else None, on_finish=on_finish))
        times = BatchTimes(batch_size=min(self.batch_size, len(prompts)), prompt_tokens=sum(map(len, prompts)))
        self.telemetry.batches.append(times)
        start = time.perf_counter()
        while engine.has_work():  # the first step(s) up to a first token count as time to first token
            begin = time.perf_counter()
            stats = engine.step()
            produced = sum(len(r.token_ids) for r in results.values()) + sum(
                len(s.state.token_ids) for s in engine.slots if s is not None)
            if times.new_tokens == 0:
                times.ttft_s = time.perf_counter() - start
            else:
                times.step_s.append(time.perf_counter() - begin)
                times.decode_tokens += stats.decode_tokens
            times.new_tokens = produced
        completions = []
        for index in range(len(prompts)):
            result = results[index]
            if result.finish_reason in (FINISH_ABORT, FINISH_ERROR):
                raise GenerationError(f"prompt {index} failed: {result.error}")
            completions.append(Completion(index, None, result.prompt_tokens, result.token_ids, result.text,
                                          result.finish_reason))
        return completions

    def check_requests(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        """:func:`validate_requests`, plus the configured cache length (``max_length``)."""
        validate_requests(prompts, max_new_tokens, self.vocab_size, self.context)
        for index, prompt in enumerate(prompts):
            if self.max_length is not None and len(prompt) + max_new_tokens > self.max_length:
                raise GenerationError(
                    f"prompt {index} has {len(prompt)} tokens; prompt + --max-new-tokens {max_new_tokens} "
                    f"exceeds the static cache generation.max_length={self.max_length}; raise "
                    "generation.max_length (--max-length) or lower --max-new-tokens")

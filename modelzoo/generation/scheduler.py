"""Continuous batching over one static KV cache: requests come and go between fixed-shape steps.

    engine = SlotEngine(model, tokenizer, backend="inductor", max_batch=8, max_model_len=2048)
    handle = engine.submit(EngineRequest(prompt_ids, max_new_tokens=64, on_token=..., on_finish=...))
    while engine.has_work():
        engine.step()

The cache has ``max_batch`` rows (slots). A request waits in a bounded FIFO queue until a slot is
free, is prefilled into it (a long prompt in chunks of ``prefill_chunk`` tokens, one chunk budget per
step, so decoding of the other slots goes on between the chunks), then decodes one token per step
together with every other running slot. A finished, cancelled or failed request frees its slot at
the end of the step, and the next queued request is prefilled into it at the next.

What keeps shapes few, so compiled graphs are reused:

- a decode step runs the rows ``0 .. W-1``, ``W`` the power of two (at most ``max_batch``) that
  covers the highest occupied row; a new request takes the lowest free row, so ``W`` follows the
  load (an idle row inside it decodes a dummy token into the scratch slot); it attends to the
  slots up to the highest position in the step, a length that is a dynamic dimension when
  compiled (:meth:`~modelzoo.generation.decoder.StaticKVCache.keys`), so there is one decode graph
  per ``W`` and no step reads more of the cache than its longest row holds;
- a prefill chunk runs one row (``[1, S]``); compiled, ``S`` is padded up to a power-of-two bucket
  (at least 16, at most ``prefill_chunk``), the padding written to the scratch slot;
- every request samples from its own ``torch.Generator`` (seeded from its ``seed`` and
  ``seed_index``), so seeded sampling is reproducible under any load.

Rows never mix: what else is in flight reaches a request's numbers only through ``W`` and (eager)
the attention length, i.e. through the kernels' summation order, within fp32 rounding (about 3e-6
on ``llama_60m`` logits); greedy tokens equal ``transformers``' alone and under load (tests).

Tensor parallelism, two ways. In lockstep (the batch CLI), every rank gets the same requests and
runs the same schedule; the sharded forward returns the same (replicated) logits everywhere, so
every rank chooses the same tokens. As a leader (``leader=True``, the server: requests reach rank 0
only), rank 0 runs the scheduler and broadcasts every forward it makes (a small header and the
token/position tensors); the other ranks run :meth:`SlotEngine.follow` and make the same forward
(their shard of it) until rank 0 calls :meth:`SlotEngine.release_followers`.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from transformers import LlamaForCausalLM

from modelzoo.backends import Backend, get_backend

from .decoder import LlamaDecoder
from .kernels import has_int8_linears, note_eager_int8
from .sampling import SamplingParams, choose_next, row_generators
from .stopping import SequenceState, StopChecker

FINISH_ABORT = "abort"  # cancelled (client gone, timeout, shutdown)
FINISH_ERROR = "error"  # this request raised; the others go on

CACHE_ROUND = 64  # the cache grows (reserve) in multiples of this
MIN_BUCKET = 16
RECOMPILE_LIMIT = 64


class GenerationError(ValueError):
    """A request that cannot be served as given; the message says which and how to fix it."""


class QueueFull(GenerationError):
    """The waiting queue is at its bound; try again later."""


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def eos_ids(model: LlamaForCausalLM, tokenizer=None) -> list[int]:
    """EOS ids from the model's generation config and the tokenizer (union, in that order)."""
    ids: list[int] = []
    for value in (getattr(model.generation_config, "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return ids


@dataclass
class TokenEvent:
    """One generated token of a request. ``text``: the newly streamable text (``""`` while held
    back, e.g. a possible stop string); ``logprob``/``top_logprobs``: of the model's distribution
    (log-softmax of the raw logits), when the request asked for them."""

    tag: Any
    token_id: int | None  # None: no token kept (the EOS that ended it), only held text flushed
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class RequestResult:
    """A request's outcome. ``token_ids`` without a closing EOS; ``text`` cut before a stop string;
    ``finish_reason``: ``eos``, ``stop``, ``length``, ``abort`` or ``error`` (``error`` says why)."""

    tag: Any
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    error: str | None = None
    ttft_s: float | None = None
    latency_s: float = 0.0


@dataclass
class EngineRequest:
    """What to generate for one prompt.

    ``logprobs``: None for none, ``k >= 0`` for the chosen token's log-probability and the ``k``
    most likely alternatives at each step. ``min_tokens``: EOS and stop strings are ignored before
    this many tokens. ``stream_text``: hand out text pieces as tokens come (else only the final
    text is decoded). ``on_token`` / ``on_finish`` are called from the thread that runs
    :meth:`SlotEngine.step`; an exception they raise fails this request alone.
    """

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    stream_text: bool = False
    seed_index: int = 0
    tag: Any = None
    on_token: Callable[[TokenEvent], None] | None = None
    on_finish: Callable[[RequestResult], None] | None = None


class RequestHandle:
    """A submitted request: :meth:`cancel` frees its slot at the next step; :meth:`wait` blocks
    until its :class:`RequestResult` is ready."""

    def __init__(self, request: EngineRequest) -> None:
        self.request = request
        self.result: RequestResult | None = None
        self.cancel_reason: str | None = None
        self.submitted = time.perf_counter()
        self._done = threading.Event()

    def cancel(self, reason: str = "cancelled") -> None:
        self.cancel_reason = reason

    @property
    def cancelled(self) -> bool:
        return self.cancel_reason is not None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> RequestResult | None:
        self._done.wait(timeout)
        return self.result


@dataclass
class _Slot:
    """A request in a cache row: prefill progress, decode position, its own stop/sampling state."""

    handle: RequestHandle
    state: SequenceState
    checker: StopChecker
    generator: torch.Generator | None
    seen: torch.Tensor | None
    prefilled: int = 0  # prompt tokens written to the cache
    last_token: int = 0
    started: float = 0.0
    first_token: float | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def request(self) -> EngineRequest:
        return self.handle.request

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.request.prompt_ids)

    @property
    def position(self) -> int:
        """Cache slot of the next token written (= tokens already in the cache)."""
        return len(self.request.prompt_ids) + len(self.state.token_ids) - 1


@dataclass
class StepStats:
    """What one :meth:`SlotEngine.step` did (for telemetry and metrics)."""

    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_rows: int = 0
    decode_tokens: int = 0
    decode_s: float = 0.0
    finished: int = 0


class SlotEngine:
    """Continuous-batching generation over a static KV cache of ``max_batch`` rows.

    Args:
        model: ``LlamaForCausalLM`` (plain, int8 or tensor-parallel); its weights are used in place.
        tokenizer: needed for text (stop strings, streamed pieces); token ids work without one.
        backend: ``cpu`` (eager), ``inductor`` or ``cuda``, or a :class:`~modelzoo.backends.Backend`.
        max_batch: cache rows = requests decoded together.
        max_model_len: positions per row (prompt + generated); default the model's context.
        prefill_chunk: longest prompt piece one prefill forward takes; also the prompt tokens
            prefilled per step.
        max_queue: waiting requests beyond the running ones; :meth:`submit` raises
            :class:`QueueFull` past it (None: unbounded).
        cache_length: positions allocated now (default ``max_model_len``); :meth:`reserve` grows it.
        leader: in a process group, rank 0 broadcasts its forwards to followers (see above).
    """

    def __init__(self, model: LlamaForCausalLM, tokenizer=None, *, backend: str | Backend = "cpu",
                 max_batch: int = 4, max_model_len: int | None = None, prefill_chunk: int = 512,
                 eos_token_ids: Sequence[int] | None = None, max_queue: int | None = None,
                 cache_length: int | None = None, leader: bool = False) -> None:
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        self.decoder = LlamaDecoder(model.eval())
        self.step_fn = self.backend.compile(self.decoder)
        self.decoder.compiled = self.step_fn is not self.decoder
        if self.decoder.compiled:
            # Graphs are cached per code object (LlamaDecoder.forward), shared by every engine in the
            # process; past the limit torch falls back to eager without failing.
            import torch._dynamo

            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        if (not self.decoder.compiled and self.decoder.device.type == "cpu"
                and has_int8_linears(model)):
            note_eager_int8()
        self.model, self.tokenizer = model, tokenizer
        self.context = int(model.config.max_position_embeddings)
        self.vocab_size = int(model.config.vocab_size)
        self.max_batch, self.prefill_chunk, self.max_queue = max_batch, prefill_chunk, max_queue
        self.max_model_len = min(max_model_len or self.context, self.context)
        self.eos_token_ids = list(eos_ids(model, tokenizer) if eos_token_ids is None else eos_token_ids)
        self.cache = self.decoder.new_cache(max_batch, min(cache_length or self.max_model_len, self.max_model_len))
        self.slots: list[_Slot | None] = [None] * max_batch
        self.queue: collections.deque[RequestHandle] = collections.deque()
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)
        self.leader = leader and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self._decode_text = ((lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
                             if tokenizer is not None else None)

    # ------------------------------------------------------------------------------ requests

    def validate(self, request: EngineRequest) -> None:
        """Raise :class:`GenerationError` for a request this engine cannot serve (empty prompt, id
        outside the vocabulary, prompt + new tokens beyond ``max_model_len``, text features without
        a tokenizer)."""
        prompt, new = request.prompt_ids, request.max_new_tokens
        if new < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {new}")
        if not prompt:
            raise GenerationError("the prompt is empty (no tokens); give some text")
        if max(prompt) >= self.vocab_size or min(prompt) < 0:
            bad = max(prompt) if max(prompt) >= self.vocab_size else min(prompt)
            raise GenerationError(f"the prompt has token id {bad} but the model's vocab_size is {self.vocab_size}")
        if len(prompt) + new > min(self.max_model_len, self.cache.max_length):
            raise GenerationError(
                f"the prompt has {len(prompt)} tokens; with {new} new tokens it needs {len(prompt) + new} positions "
                f"but the limit is {min(self.max_model_len, self.cache.max_length)} (max_model_len); shorten the "
                "prompt or ask for fewer tokens")
        if (request.stop or request.stream_text) and self.tokenizer is None:
            raise GenerationError("stop strings and streamed text need a tokenizer")
        if request.logprobs is not None and not 0 <= request.logprobs <= self.vocab_size:
            raise GenerationError(f"logprobs must be in [0, {self.vocab_size}], got {request.logprobs}")

    def submit(self, request: EngineRequest) -> RequestHandle:
        """Queue ``request`` (thread-safe). Raises :class:`GenerationError` for a bad request and
        :class:`QueueFull` when the queue is at ``max_queue``."""
        self.validate(request)
        handle = RequestHandle(request)
        with self.work:
            if self.max_queue is not None and len(self.queue) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            self.queue.append(handle)
            self.work.notify_all()
        return handle

    def reserve(self, length: int) -> None:
        """Grow the cache to hold ``length`` positions per row (rounded up to 64, at most
        ``max_model_len``); only while idle."""
        if length <= self.cache.max_length:
            return
        if self.has_work():
            raise RuntimeError("the cache can only grow while the engine is idle")
        rounded = min(-(-length // CACHE_ROUND) * CACHE_ROUND, self.max_model_len)
        self.cache = self.decoder.new_cache(self.max_batch, max(rounded, length))

    def has_work(self) -> bool:
        with self.lock:
            return bool(self.queue) or any(s is not None for s in self.slots)

    @property
    def running(self) -> int:
        return sum(s is not None for s in self.slots)

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def abort_all(self, reason: str = "shutdown") -> None:
        """Cancel every queued and running request (they finish with ``abort`` at the next step)."""
        with self.lock:
            for handle in self.queue:
                handle.cancel(reason)
            for slot in self.slots:
                if slot is not None:
                    slot.handle.cancel(reason)

    # ---------------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self) -> StepStats:
        """One scheduling step: drop cancelled requests, fill free slots from the queue, prefill up to
        ``prefill_chunk`` prompt tokens, then one decode step for every decoding slot."""
        stats = StepStats()
        self._admit()
        for row, slot in enumerate(self.slots):
            if slot is not None and slot.handle.cancelled:
                self._finish(row, FINISH_ABORT, error=slot.handle.cancel_reason)
                stats.finished += 1
        budget = self.prefill_chunk
        for row, slot in enumerate(self.slots):
            if budget <= 0:
                break
            if slot is None or slot.decoding:
                continue
            begin = time.perf_counter()
            done = self._prefill_chunk(row, slot, budget)
            budget -= done
            stats.prefill_tokens += done
            stats.prefill_s += time.perf_counter() - begin
        decoding = [row for row, slot in enumerate(self.slots)
                    if slot is not None and slot.decoding and not slot.state.done]
        if decoding:
            begin = time.perf_counter()
            stats.decode_tokens = self._decode(decoding)
            stats.decode_rows = len(decoding)
            stats.decode_s = time.perf_counter() - begin
        for row, slot in enumerate(self.slots):
            if slot is not None and slot.state.done:
                self._finish(row, slot.state.finish_reason)
                stats.finished += 1
        return stats

    def _decode_width(self, rows: int) -> int:
        """Rows a decode step runs when rows ``0..rows-1`` may be occupied: a power-of-two bucket."""
        return min(_next_pow2(rows), self.max_batch)

    def _prefill_bucket(self, length: int) -> int:
        """Tokens a compiled prefill of ``length`` prompt tokens runs (padded to a bucket)."""
        return min(max(_next_pow2(length), MIN_BUCKET), self.prefill_chunk)

    def warmup_shapes(self) -> tuple[list[int], list[int]]:
        """The step shapes a compiled engine meets: every decode width and prefill bucket."""
        widths = sorted({self._decode_width(n) for n in range(1, self.max_batch + 1)})
        return widths, sorted({self._prefill_bucket(n) for n in range(1, self.prefill_chunk + 1)})

    @torch.no_grad()
    def warmup(self) -> int:
        """Run (compile) every step shape of :meth:`warmup_shapes` once, so that no request waits for
        a compilation; only the scratch slot is written. A no-op when not compiled; returns the
        number of shapes run. Only while idle."""
        if not self.decoder.compiled:
            return 0
        if self.has_work():
            raise RuntimeError("warm up the engine before submitting requests")
        scratch = self.cache.scratch  # attending to 2 slots: the length is dynamic, one graph serves all
        widths, buckets = self.warmup_shapes()
        for width in widths:
            self._forward([[0]] * width, [[scratch]] * width, None, 2)
        for bucket in buckets:
            self._forward([[0] * bucket], [[scratch] * bucket], [0], 2)
        return len(widths) + len(buckets)

    def run_until_idle(self) -> None:
        """Step until nothing is queued or running."""
        while self.has_work():
            self.step()

    # ----------------------------------------------------------------------------- internals

    def _admit(self) -> None:
        with self.lock:
            for row in range(self.max_batch):
                while self.slots[row] is None and self.queue:
                    handle = self.queue.popleft()
                    if handle.cancelled:
                        self._deliver(handle, self._result(handle, None, FINISH_ABORT, handle.cancel_reason))
                        continue
                    self.slots[row] = self._new_slot(handle)

    def _new_slot(self, handle: RequestHandle) -> _Slot:
        request = handle.request
        params = request.sampling
        eos = () if request.ignore_eos else self.eos_token_ids
        checker = StopChecker(self._decode_text or str, eos, request.stop, request.max_new_tokens)
        generator = None
        if not params.greedy:
            generator = row_generators(params.seed, [request.seed_index], self.decoder.device)[0]
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.decoder.device)
            seen[torch.tensor(request.prompt_ids, device=self.decoder.device)] = True
        return _Slot(handle, SequenceState(request.tag, len(request.prompt_ids)), checker, generator, seen,
                     started=time.perf_counter())

    def _forward(self, tokens: list[list[int]], positions: list[list[int]], rows: list[int] | None,
                 kv_len: int) -> torch.Tensor:
        """The decoder on ``tokens`` at ``positions`` of cache ``rows`` (None: the first
        ``len(tokens)`` rows, as views of the cache)."""
        device = self.decoder.device
        tokens_t = torch.tensor(tokens, dtype=torch.long, device=device)
        positions_t = torch.tensor(positions, dtype=torch.long, device=device)
        rows_t = None if rows is None else torch.tensor(rows, dtype=torch.long, device=device)
        if self.leader:
            self._broadcast_call(tokens_t, positions_t, rows_t, kv_len)
        cache_k, cache_v = self._cache_views(len(tokens), rows is None)
        return self.step_fn(tokens_t, positions_t, rows_t, cache_k, cache_v,
                            self.cache.keys(kv_len, dynamic=self.decoder.compiled))

    def _cache_views(self, batch: int, leading: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if not leading or batch == self.max_batch:
            return self.cache.k, self.cache.v
        return [t[:batch] for t in self.cache.k], [t[:batch] for t in self.cache.v]

    def _prefill_chunk(self, row: int, slot: _Slot, budget: int) -> int:
        """Prefill the next piece of ``slot``'s prompt (at most ``budget`` tokens, at most
        ``prefill_chunk``); returns the tokens prefilled. Chooses the first token when done."""
        prompt = slot.request.prompt_ids
        begin = slot.prefilled
        length = min(len(prompt) - begin, self.prefill_chunk, max(budget, 1))
        tokens = prompt[begin:begin + length]
        positions = list(range(begin, begin + length))
        if self.decoder.compiled:  # a fixed bucket: padding first, written to the scratch slot
            bucket = self._prefill_bucket(length)
            pad = bucket - length
            tokens, positions = [0] * pad + tokens, [self.cache.scratch] * pad + positions
        try:
            logits = self._forward([tokens], [positions], [row], begin + length)
        except Exception as err:  # a forward of one row: fail this request alone
            slot.state.finish_reason = FINISH_ERROR
            slot.handle.cancel(f"{type(err).__name__}: {err}")
            return length
        slot.prefilled = begin + length
        if slot.decoding:
            slot.first_token = time.perf_counter()
            self._take(row, slot, logits[0])
        return length

    def _decode(self, rows: list[int]) -> int:
        width = self._decode_width(max(rows) + 1)  # rows 0..width-1
        tokens = [[0] for _ in range(width)]
        positions = [[self.cache.scratch] for _ in range(width)]
        for row in rows:
            slot = self.slots[row]
            tokens[row][0], positions[row][0] = slot.last_token, slot.position
        try:
            logits = self._forward(tokens, positions, None, max(positions[row][0] for row in rows) + 1)
        except Exception as err:  # the whole batch's forward: these requests fail, the engine goes on
            for row in rows:
                self.slots[row].state.finish_reason = FINISH_ERROR
                self.slots[row].handle.cancel(f"{type(err).__name__}: {err}")
            return 0
        # plain greedy rows (the common case) take their argmax in one op for the whole step
        plain = [row for row in rows if self._plain_greedy(self.slots[row])]
        picked = dict(zip(plain, logits[plain].argmax(dim=-1).tolist(), strict=True)) if plain else {}
        kept = 0
        for row in rows:
            before = len(self.slots[row].state.token_ids)
            self._take(row, self.slots[row], logits[row], picked.get(row))
            kept += len(self.slots[row].state.token_ids) - before
        return kept

    @staticmethod
    def _plain_greedy(slot: _Slot) -> bool:
        """The next token is the argmax of the raw logits (no logprobs, penalty or EOS ban)."""
        request = slot.request
        return (request.sampling.greedy and request.logprobs is None and slot.seen is None
                and not (len(slot.state.token_ids) < request.min_tokens and slot.checker.eos))

    def _take(self, row: int, slot: _Slot, logits: torch.Tensor, token: int | None = None) -> None:
        """Choose ``slot``'s next token from its logits ``[V]`` (``token``: already chosen, see
        :meth:`_plain_greedy`), update its stop state, stream it."""
        request = slot.request
        try:
            logprob, top = None, None
            if token is None:
                token, logprob, top = self._choose(slot, logits)
            if request.logprobs is not None:
                slot.logprobs.append(logprob)
                slot.top_logprobs.append(top or [])
            if slot.seen is not None:
                slot.seen[token] = True
            stops = slot.checker.stops
            if len(slot.state.token_ids) + 1 < request.min_tokens:
                slot.checker.stops = []  # stop strings count from min_tokens on
            before = len(slot.state.token_ids)
            try:
                piece = slot.checker.update(slot.state, token, need_text=request.stream_text)
            finally:
                slot.checker.stops = stops
            slot.last_token = token
            kept = len(slot.state.token_ids) > before
            if request.on_token is not None and (kept or piece):
                request.on_token(TokenEvent(request.tag, token if kept else None, piece,
                                            logprob if kept else None, top if kept else None))
        except Exception as err:  # this request's own handling (sampling, decoding, its callback)
            slot.state.finish_reason = FINISH_ERROR
            slot.handle.cancel(f"{type(err).__name__}: {err}")

    @staticmethod
    def _choose(slot: _Slot, logits: torch.Tensor) -> tuple[int, float | None, list[tuple[int, float]] | None]:
        """``slot``'s next token from its logits ``[V]``, with its log-probability and the top
        alternatives when the request asked for them."""
        request = slot.request
        logits = logits.float()[None]
        logp = torch.log_softmax(logits[0], dim=-1) if request.logprobs is not None else None  # raw model
        if len(slot.state.token_ids) < request.min_tokens and slot.checker.eos:
            logits = logits.clone()
            logits[0, list(slot.checker.eos)] = float("-inf")
        seen = slot.seen[None] if slot.seen is not None else None
        generators = [slot.generator] if slot.generator is not None else None
        token = int(choose_next(logits, request.sampling, seen, generators)[0])
        if logp is None:
            return token, None, None
        top = None
        if request.logprobs > 0:
            values, ids = torch.topk(logp, request.logprobs)
            top = list(zip(ids.tolist(), values.tolist(), strict=True))
        return token, float(logp[token]), top

    def _result(self, handle: RequestHandle, slot: _Slot | None, reason: str, error: str | None) -> RequestResult:
        request = handle.request
        if slot is None:
            return RequestResult(request.tag, len(request.prompt_ids), [], "", reason, error=error,
                                 latency_s=time.perf_counter() - handle.submitted)
        if not slot.state.text and slot.state.token_ids and self._decode_text is not None:
            slot.checker.finish(slot.state)
        return RequestResult(
            request.tag, len(request.prompt_ids), list(slot.state.token_ids), slot.state.text, reason,
            slot.logprobs[:len(slot.state.token_ids)], slot.top_logprobs[:len(slot.state.token_ids)], error,
            None if slot.first_token is None else slot.first_token - handle.submitted,
            time.perf_counter() - handle.submitted)

    def _finish(self, row: int, reason: str, error: str | None = None) -> None:
        slot = self.slots[row]
        self.slots[row] = None
        if reason == FINISH_ERROR:
            error = slot.handle.cancel_reason
        elif reason != FINISH_ABORT:
            error = None
        self._deliver(slot.handle, self._result(slot.handle, slot, reason, error))

    @staticmethod
    def _deliver(handle: RequestHandle, result: RequestResult) -> None:
        handle.result = result
        try:
            if handle.request.on_finish is not None:
                handle.request.on_finish(result)
        finally:
            handle._done.set()

    # ---------------------------------------------------------------------- tensor parallel

    _HEADER = 5  # op, batch, seq, has_rows, kv_len
    _OP_FORWARD, _OP_RELEASE = 1, 0

    def _broadcast_call(self, tokens, positions, rows, kv_len: int) -> None:
        batch, seq = tokens.shape
        header = torch.tensor([self._OP_FORWARD, batch, seq, rows is not None, kv_len], dtype=torch.long)
        dist.broadcast(header, src=0)
        dist.broadcast(tokens.cpu().contiguous(), src=0)
        dist.broadcast(positions.cpu().contiguous(), src=0)
        if rows is not None:
            dist.broadcast(rows.cpu().contiguous(), src=0)

    def release_followers(self) -> None:
        """Rank 0: tell the other ranks' :meth:`follow` loops to return."""
        if self.leader:
            dist.broadcast(torch.tensor([self._OP_RELEASE, 0, 0, 0, 0], dtype=torch.long), src=0)

    @torch.no_grad()
    def follow(self) -> None:
        """Ranks > 0: make rank 0's forwards (this rank's shard) until it releases them."""
        device = self.decoder.device
        while True:
            header = torch.zeros(self._HEADER, dtype=torch.long)
            dist.broadcast(header, src=0)
            op, batch, seq, has_rows, kv_len = header.tolist()
            if op == self._OP_RELEASE:
                return
            tokens = torch.zeros(batch, seq, dtype=torch.long)
            positions = torch.zeros(batch, seq, dtype=torch.long)
            dist.broadcast(tokens, src=0)
            dist.broadcast(positions, src=0)
            rows = None
            if has_rows:
                rows = torch.zeros(batch, dtype=torch.long)
                dist.broadcast(rows, src=0)
                rows = rows.to(device)
            cache_k, cache_v = self._cache_views(batch, rows is None)
            self.step_fn(tokens.to(device), positions.to(device), rows, cache_k, cache_v,
                         self.cache.keys(kv_len, dynamic=self.decoder.compiled))


class EngineThread:
    """Runs :meth:`SlotEngine.step` while there is work (the serving loop): in a background thread
    (:meth:`start`), or in the calling thread (:meth:`run`, blocking until :meth:`stop`).

    Prefer :meth:`run` from the main thread for speed: torch's CPU kernels called from another
    thread ran about 20-30% slower here (llama_60m decode step: 16 ms on the main thread, 19-20 ms on
    a second one, the same ops), so the server steps the engine on its main thread and serves HTTP
    from a thread of its own.

    ``stop(drain=True)`` lets running and queued requests finish first (bounded by ``timeout``;
    what is left is aborted); ``stop(drain=False)`` aborts them at the next step.
    """

    def __init__(self, engine: SlotEngine) -> None:
        self.engine = engine
        self._stopping = False
        self._running = threading.Event()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> EngineThread:
        """Step the engine in a background thread."""
        self._thread = threading.Thread(target=self.run, name="modelzoo-engine", daemon=True)
        self._thread.start()
        self._running.wait(5.0)
        return self

    def submit(self, request: EngineRequest) -> RequestHandle:
        if self._stopping:
            raise QueueFull("the server is shutting down")
        return self.engine.submit(request)

    def run(self) -> None:
        """Step the engine in this thread until :meth:`stop`."""
        engine = self.engine
        self._running.set()
        try:
            while True:
                with engine.work:
                    while not self._stopping and not (engine.queue or any(s is not None for s in engine.slots)):
                        engine.work.wait(timeout=0.5)
                    if self._stopping and not (engine.queue or any(s is not None for s in engine.slots)):
                        break
                engine.step()
        except BaseException as err:  # noqa: BLE001 - reported by stop() and the health check
            self.error = err
            engine.abort_all(f"engine failed: {type(err).__name__}: {err}")
            raise
        finally:
            self._running.clear()
            self._finished.set()
            engine.release_followers()

    @property
    def alive(self) -> bool:
        return self._running.is_set()

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        engine = self.engine
        deadline = time.monotonic() + timeout
        if drain:
            while engine.has_work() and time.monotonic() < deadline and self.alive:
                time.sleep(0.01)
        engine.abort_all("shutdown")
        with engine.work:
            self._stopping = True
            engine.work.notify_all()
        if self._thread is not None:
            self._thread.join(max(deadline - time.monotonic(), 5.0))

"""Serving throughput and latency: the HTTP server (continuous batching) under a closed-loop load vs
static batches and ``transformers`` ``generate``, one run.

Model: ``--model`` (``llama_60m``, random weights, seed 0), saved once to a temporary HF dir that
every server loads by path, with a word-level tokenizer of the whole vocabulary (id ``i`` is ``ti``;
the server wants tokenizer files, and so every token streams as text). Requests: random prompt ids
in [3, vocab) (``--prompt-len`` tokens, sent as token ids), greedy, ``ignore_eos`` so that every request generates exactly
``--new-tokens`` tokens, streamed (server-sent events, usage in the last chunk).

Rows, per level (concurrency / batch C, ``--concurrency``):

- ``server``: ``python -m modelzoo.cli.serve`` as a subprocess, one per (backend, dtype) case
  (``--backends``, ``--dtypes``), ``--max-batch`` slots, on 127.0.0.1. C clients
  (``httpx.AsyncClient``, one process, loopback) send requests back to back until max(3C, 4)
  requests are done (closed loop). Client ``i`` starts ``i x L / C`` late (``L``: the median
  latency at C=1), so the steady state is measured rather than lockstep waves of C equal requests
  arriving together (``--no-stagger``: all at once; every one of a wave then waits for the wave's
  prompts to be prefilled, a compute-bound ~C x the single TTFT on a CPU). Not timed: one warm-up
  request per level and, on a compiled backend, a warm-up wave of C requests (compilation). Per
  request: TTFT = send to the first chunk carrying a token, latency = send to the end of the
  stream, TPOT = (latency - TTFT) / (completion tokens - 1). ``tok/s`` is the steady state: tokens
  streamed while all C clients had a request in flight, over that window (the whole run's rate,
  ramp-up and -down included, follows in brackets); TTFT and TPOT p50/p99 (nearest rank);
  ``ok n/N``: requests that ended with exactly ``--new-tokens`` tokens (the others are printed);
- ``static``: :class:`modelzoo.generation.Generator` (``batch_size=C``, EOS off) over the level's
  prompts, same backend, same weights (int8: a copy through
  :func:`~modelzoo.generation.quantize_for_generation_`); ``tok/s`` = tokens / wall time of
  ``generate_ids``; TTFT from its telemetry (start to the first batch's first tokens), TPOT p50/p99
  = its decode step times;
- ``hf``: ``transformers`` ``generate`` (greedy, dynamic cache, left-padded batches of C), fp32
  only; TTFT = ``generate`` of one token for one batch, TPOT = (batch time - TTFT) / (tokens - 1).

The baselines run in this process (``--threads`` torch threads; the servers get the same through
``OMP_NUM_THREADS``) while no server runs. ``x`` columns: server tok/s over hf at batch C and over
static (same backend and dtype) at batch C.

Targets, per server case: at C=8, server tok/s >= 2x hf generate at batch 8 and >= the static path
at batch 8; TTFT p99 at C=8 < 4x TTFT p50 at C=1.

    python benchmarks/bench_serving.py [--concurrency 1 8 32] [--dtypes fp32 int8] [--backends cpu inductor]
    python benchmarks/bench_serving.py --quick   # smoke test: C requests per level, C in 1 8, fp32 cpu
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from modelzoo.cli.help_format import DefaultsHelpFormatter

COMPILED_BACKENDS = ("inductor",)


@dataclass
class RequestResult:
    """One streamed request. ``ttft_s``: send to the first chunk carrying a token; ``tokens``:
    completion tokens from the usage chunk; ``error``: why it does not count as ok (None: ok)."""

    latency_s: float
    ttft_s: float | None = None
    tokens: int | None = None
    error: str | None = None
    start: float = 0.0  # perf_counter at the send
    token_times: list[float] = field(default_factory=list)  # perf_counter of each chunk carrying text

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or not self.tokens or self.tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.tokens - 1)


@dataclass
class Row:
    """One line of the table."""

    kind: str  # server / static / hf
    backend: str
    dtype: str
    level: int
    tok_s: float
    ttft_ms: list[float] = field(default_factory=list)
    tpot_ms: list[float] = field(default_factory=list)
    ok: int = 0
    total: int = 0
    failures: list[str] = field(default_factory=list)
    overall_tok_s: float | None = None  # server rows: tokens / whole wall time, ramp-up and -down included


class ServerError(RuntimeError):
    """The server did not start, or died."""


def percentile(values: list[float], q: float) -> float | None:
    """Nearest rank, as :mod:`modelzoo.generation.telemetry`."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def machine_line(threads: int) -> str:
    import torch
    import transformers

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"machine: {cpu}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
            f"torch {torch.__version__}, transformers {transformers.__version__}, {threads} threads, "
            f"python {platform.python_version()}, {load_line()}")


def load_line() -> str:
    """The 1-minute load average: other processes on the machine skew every row."""
    return f"load average {os.getloadavg()[0]:.1f}"


def save_id_tokenizer(out: Path, vocab_size: int) -> None:
    """A word-level tokenizer covering every id (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, then ``t3``, ``t4``,
    ...), saved beside the weights: the server needs tokenizer files with a checkpoint dir, and with
    it every generated token streams as text (the byte-level stand-in decodes most ids to nothing)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<unk>").save_pretrained(str(out))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no output)"
    return "\n".join("    | " + line for line in lines[-n:]) or "    | (empty)"


# ----------------------------------------------------------------------------------------- server


class Server:
    """``python -m MODULE --checkpoint DIR ...`` on a free loopback port; stopped by :meth:`stop`."""

    def __init__(self, module: str, checkpoint: Path, backend: str, dtype: str, max_batch: int,
                 max_model_len: int, threads: int, log_dir: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.out = log_dir / f"server-{backend}-{dtype}.out"
        self.err = log_dir / f"server-{backend}-{dtype}.err"
        self.cmd = [sys.executable, "-m", module, "--checkpoint", str(checkpoint), "--backend", backend,
                    "--quantize", "int8" if dtype == "int8" else "none", "--max-batch", str(max_batch),
                    "--max-model-len", str(max_model_len), "--host", "127.0.0.1", "--port", str(self.port)]
        self.threads = threads
        self.proc: subprocess.Popen | None = None
        self.model_name: str | None = None

    def start(self, timeout_s: float) -> float:
        """Start and wait for ``GET /health`` = 200; returns the start-up seconds."""
        import httpx

        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "PYTHONUNBUFFERED": "1"}
        start = time.perf_counter()
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        with httpx.Client(trust_env=False, timeout=5) as client:
            while True:
                if self.proc.poll() is not None:
                    raise ServerError(f"server exited with status {self.proc.returncode} before it was ready; "
                                      f"{' '.join(self.cmd)}\n  stderr ({self.err}):\n{tail(self.err)}")
                if time.perf_counter() - start > timeout_s:
                    raise ServerError(f"server not ready (GET /health != 200) after {timeout_s:.0f} s; "
                                      f"{' '.join(self.cmd)}\n  stderr ({self.err}):\n{tail(self.err)}")
                try:
                    if client.get(self.base + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            try:
                data = client.get(self.base + "/v1/models").json().get("data") or []
                self.model_name = data[0]["id"] if data else None
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                self.model_name = None
        return time.perf_counter() - start

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerError(f"server died (status {self.proc.returncode}); stderr ({self.err}):\n{tail(self.err)}")

    def stop(self) -> str:
        """SIGTERM, then SIGKILL after 30 s; returns how it went."""
        if self.proc is None:
            return "not started"
        if self.proc.poll() is not None:
            return f"had exited with status {self.proc.returncode}"
        start = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return f"still running 30 s after SIGTERM: killed (stderr {self.err})"
        return f"stopped by SIGTERM in {time.perf_counter() - start:.1f} s, exit status {self.proc.returncode}"


# ------------------------------------------------------------------------------------------ client


async def stream_completion(client, url: str, model: str | None, prompt: list[int], new_tokens: int
                            ) -> RequestResult:
    """``POST /v1/completions`` (stream, usage included), timed from the send."""
    import httpx

    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if model is not None:
        body["model"] = model
    start = time.perf_counter()
    ttft = usage = None
    done = False
    token_times: list[float] = []
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                return RequestResult(time.perf_counter() - start,
                                     error=f"HTTP {resp.status_code}: {' '.join(text.split())[:300]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return RequestResult(time.perf_counter() - start, ttft,
                                         error=f"error chunk: {json.dumps(chunk['error'])[:300]}")
                if ttft is None and any(c.get("text") or c.get("finish_reason") is None
                                        for c in chunk.get("choices") or []):
                    ttft = time.perf_counter() - start
                if any(c.get("text") for c in chunk.get("choices") or []):
                    token_times.append(time.perf_counter())
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except (httpx.HTTPError, ValueError) as err:
        return RequestResult(time.perf_counter() - start, ttft, error=f"{type(err).__name__}: {err}")
    result = RequestResult(time.perf_counter() - start, ttft, start=start, token_times=token_times)
    if usage is not None:
        result.tokens = usage.get("completion_tokens")
    if not done:
        result.error = "stream ended without data: [DONE]"
    elif usage is None:
        result.error = "no usage chunk (stream_options.include_usage)"
    elif result.tokens != new_tokens:
        result.error = f"completion_tokens {result.tokens} != {new_tokens} (ignore_eos)"
    elif ttft is None:
        result.error = "no streamed chunk carried a token before the end"
    return result


async def closed_loop(base: str, model: str | None, prompts: list[list[int]], concurrency: int,
                      new_tokens: int, timeout_s: float, stagger_s: float = 0.0
                      ) -> tuple[list[RequestResult], float, float | None]:
    """``concurrency`` clients sending ``prompts`` back to back; returns the results (in prompt order),
    the wall time from the first send to the last end, and the steady-state output tokens/s: tokens
    streamed while every client had a request in flight (from the last client's first send to the
    first client's last end; None when that window is empty). Client ``i`` starts ``i * stagger_s``
    late, so equal-length requests do not arrive (and finish) in lockstep waves."""
    import httpx

    results: list[RequestResult | None] = [None] * len(prompts)
    order = iter(range(len(prompts)))  # shared: each client takes the next prompt when it is free
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(timeout_s, connect=10)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        url = base + "/v1/completions"

        spans: list[tuple[float, float]] = []

        async def user(number: int) -> None:
            await asyncio.sleep(number * stagger_s)
            first = None
            for index in order:
                results[index] = await stream_completion(client, url, model, prompts[index], new_tokens)
                first = results[index].start if first is None else first
            if first is not None:
                spans.append((first, time.perf_counter()))

        start = time.perf_counter()
        await asyncio.gather(*(user(number) for number in range(concurrency)))
        wall = time.perf_counter() - start
    steady = None
    if len(spans) == concurrency:
        begin, end = max(s for s, _ in spans), min(e for _, e in spans)
        if end > begin:
            tokens = sum(begin <= t <= end for r in results for t in r.token_times)
            steady = tokens / (end - begin)
    return results, wall, steady


def server_rows(server: Server, backend: str, dtype: str, levels: dict[int, list[list[int]]],
                warmup: dict[int, list[list[int]]], new_tokens: int, timeout_s: float,
                stagger_clients: bool = True) -> list[Row]:
    rows, single_latency = [], 0.0
    for level, prompts in levels.items():
        warm = warmup[level][:1] if backend not in COMPILED_BACKENDS else warmup[level]
        for batch in ([warm[:1], warm] if len(warm) > 1 else [warm]):
            results, wall, _ = asyncio.run(closed_loop(server.base, server.model_name, batch, len(batch),
                                                       new_tokens, timeout_s))
            bad = [r.error for r in results if r.error]
            if bad:
                print(f"  (warm-up for c={level}, {len(batch)} request(s): {len(bad)} failed, first: {bad[0]})",
                      flush=True)
            if wall > 20:
                print(f"  (warm-up of server {backend} {dtype} for c={level}, {len(batch)} request(s) at once: "
                      f"{wall:.0f} s)", flush=True)
        server.check_alive()
        stagger = single_latency / level if stagger_clients else 0.0
        results, wall, steady = asyncio.run(closed_loop(server.base, server.model_name, prompts, level,
                                                        new_tokens, timeout_s, stagger))
        server.check_alive()
        if level == 1:
            single_latency = statistics.median(r.latency_s for r in results)
        overall = sum(r.tokens or 0 for r in results) / wall
        row = Row("server", backend, dtype, level, steady or overall, total=len(results), overall_tok_s=overall)
        for index, r in enumerate(results):
            if r.error is None:
                row.ok += 1
                row.ttft_ms.append(1e3 * r.ttft_s)
                if r.tpot_s is not None:
                    row.tpot_ms.append(1e3 * r.tpot_s)
            else:
                row.failures.append(f"request {index}: {r.error} (after {r.latency_s:.2f} s)")
        rows.append(row)
        print(f"  server {backend} {dtype} c={level}: {len(prompts)} requests in {wall:.1f} s"
              + (f" (clients started {1e3 * stagger:.0f} ms apart)" if stagger else ""), flush=True)
    return rows


# --------------------------------------------------------------------------------------- baselines


def static_rows(model, backend: str, dtype: str, levels: dict[int, list[list[int]]],
                warmup: dict[int, list[list[int]]], prompt_len: int, new_tokens: int) -> list[Row]:
    from modelzoo.generation import Generator

    rows = []
    max_length = -(-(prompt_len + new_tokens) // 64) * 64
    for level, prompts in levels.items():
        gen = Generator(model, backend=backend, batch_size=level, max_length=max_length, eos_token_ids=[])
        start = time.perf_counter()  # warm-up: compiles, allocations
        gen.generate_ids(warmup[level], new_tokens if backend in COMPILED_BACKENDS else min(new_tokens, 8))
        if time.perf_counter() - start > 20:
            print(f"  (warm-up of static {backend} {dtype} b={level}: {time.perf_counter() - start:.0f} s)",
                  flush=True)
        gen.telemetry.batches.clear()
        start = time.perf_counter()
        done = gen.generate_ids(prompts, new_tokens)
        wall = time.perf_counter() - start
        times = gen.telemetry.batches[0]
        row = Row("static", backend, dtype, level, sum(len(c.token_ids) for c in done) / wall,
                  ttft_ms=[1e3 * times.ttft_s], tpot_ms=[1e3 * s for s in times.step_s], total=len(done))
        for c in done:
            if len(c.token_ids) == new_tokens:
                row.ok += 1
            else:
                row.failures.append(f"prompt {c.index}: {len(c.token_ids)} tokens != {new_tokens}")
        rows.append(row)
        print(f"  static {backend} {dtype} b={level}: {len(prompts)} prompts in {wall:.1f} s", flush=True)
        del gen
    return rows


def hf_rows(model, levels: dict[int, list[list[int]]], new_tokens: int) -> list[Row]:
    import torch

    def generate(batch: list[list[int]], n: int) -> torch.Tensor:
        longest = max(map(len, batch))  # left padding, as tests/helpers/generation_fixtures.hf_greedy
        ids = torch.tensor([[0] * (longest - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0, disable_compile=True)
        return out[:, longest:]

    rows = []
    for level, prompts in levels.items():
        batches = [prompts[i:i + level] for i in range(0, len(prompts), level)]
        generate(batches[0], 4)  # warm-up
        start = time.perf_counter()
        generate(batches[0], 1)
        ttft = time.perf_counter() - start
        tokens, walls = 0, []
        for batch in batches:
            start = time.perf_counter()
            out = generate(batch, new_tokens)
            walls.append(time.perf_counter() - start)
            tokens += out.numel()
        tpot = [(w - ttft) / (new_tokens - 1) for w in walls] if new_tokens > 1 else []
        rows.append(Row("hf", "generate", "fp32", level, tokens / sum(walls), ttft_ms=[1e3 * ttft],
                        tpot_ms=[1e3 * t for t in tpot], ok=len(prompts), total=len(prompts)))
        print(f"  hf generate b={level}: {len(prompts)} prompts in {sum(walls):.1f} s", flush=True)
    return rows


# ------------------------------------------------------------------------------------------ report


def fmt_ms(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.{1 if value < 100 else 0}f}"


def fmt_row(row: Row, hf: Row | None, static: Row | None) -> str:
    tag = "c" if row.kind == "server" else "b"
    ttft = row.ttft_ms
    line = (f"  {row.kind:<7} {row.backend:<8} {row.dtype:<5} {tag}={row.level:<4} {row.tok_s:8.1f} tok/s  "
            f"TTFT p50 {fmt_ms(percentile(ttft, 0.5), 5)} ms p99 {fmt_ms(percentile(ttft, 0.99), 5)} ms  "
            f"TPOT p50 {fmt_ms(percentile(row.tpot_ms, 0.5), 5)} ms p99 {fmt_ms(percentile(row.tpot_ms, 0.99), 5)} ms")
    if row.kind == "server":
        if hf is not None:
            line += f"  x{row.tok_s / hf.tok_s:5.2f} vs hf generate b={row.level}"
        if static is not None:
            line += f"  x{row.tok_s / static.tok_s:5.2f} vs static b={row.level}"
    if row.kind != "hf":
        line += f"  ok {row.ok}/{row.total}"
    if row.overall_tok_s is not None:
        line += f"  (whole run {row.overall_tok_s:.1f} tok/s)"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--model", default="llama_60m", help="preset (random weights, seed 0)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=None,
                        help="client concurrency levels (= baseline batch sizes); default 1 8 32 (--quick: 1 8)")
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "int8"], default=None,
                        help="default fp32 int8 (--quick: fp32)")
    parser.add_argument("--backends", nargs="+", choices=["cpu", "inductor"], default=None,
                        help="default cpu inductor (--quick: cpu)")
    parser.add_argument("--max-batch", type=int, default=32, help="server slots (--max-batch), all levels")
    parser.add_argument("--max-model-len", type=int, default=512, help="server --max-model-len")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: C requests per level instead of max(3C, 4); levels 1 8, fp32, cpu")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false",
                        help="server rows only (no static / hf rows, no x columns or throughput targets)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads here and OMP_NUM_THREADS of the servers")
    parser.add_argument("--startup-timeout", type=float, default=900, help="seconds for GET /health to answer 200")
    parser.add_argument("--request-timeout", type=float, default=600, help="seconds per request")
    parser.add_argument("--no-stagger", dest="stagger", action="store_false",
                        help="start all C clients at once (a burst of C prompts to prefill) instead of spreading "
                             "their starts over one single-request latency (the c=1 median)")
    parser.add_argument("--server-module", default="modelzoo.cli.serve", help="run as python -m MODULE")
    args = parser.parse_args()
    levels_c = args.concurrency or ([1, 8] if args.quick else [1, 8, 32])
    dtypes = args.dtypes or (["fp32"] if args.quick else ["fp32", "int8"])
    backends = args.backends or (["cpu"] if args.quick else ["cpu", "inductor"])
    if args.prompt_len + args.new_tokens > args.max_model_len:
        parser.error(f"--prompt-len + --new-tokens ({args.prompt_len + args.new_tokens}) > --max-model-len "
                     f"{args.max_model_len}")
    if max(levels_c) > args.max_batch:
        print(f"note: concurrency {max(levels_c)} > --max-batch {args.max_batch}: requests queue in the server")

    import torch
    from transformers.utils import logging as hf_logging

    from modelzoo.generation import quantize_for_generation_
    from modelzoo.models.llama import from_pretrained

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    print(machine_line(args.threads))
    fp32 = from_pretrained(args.model, patch=False, seed=0)
    fp32.generation_config.eos_token_id = 2
    vocab = fp32.config.vocab_size
    n_params = sum(p.numel() for p in fp32.parameters())
    print(f"bench_serving: {args.model} ({n_params / 1e6:.1f}M params, random weights), prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy, ignore_eos, server --max-batch {args.max_batch}, "
          f"{'C' if args.quick else 'max(3C, 4)'} requests per level", flush=True)

    def prompts(n: int, seed: int) -> list[list[int]]:
        return torch.randint(3, vocab, (n, args.prompt_len), generator=torch.Generator().manual_seed(seed)).tolist()

    levels = {c: prompts(c if args.quick else max(3 * c, 4), c) for c in levels_c}
    warmup = {c: prompts(c, 10_000 + c) for c in levels_c}
    cases = [(backend, dtype) for backend in backends for dtype in dtypes]
    rows: list[Row] = []
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench_serving_") as tmp:
        checkpoint = Path(tmp) / "model"
        fp32.save_pretrained(str(checkpoint))
        save_id_tokenizer(checkpoint, vocab)
        if args.baselines:
            rows += hf_rows(fp32, levels, args.new_tokens)
        for backend, dtype in cases:
            if args.baselines:
                model = fp32
                if dtype == "int8":
                    model = copy.deepcopy(fp32)
                    quantize_for_generation_(model)
                rows += static_rows(model, backend, dtype, levels, warmup, args.prompt_len, args.new_tokens)
                del model
            server = Server(args.server_module, checkpoint, backend, dtype, args.max_batch, args.max_model_len,
                            args.threads, Path(tmp))
            try:
                ready = server.start(args.startup_timeout)
                print(f"  server {backend} {dtype}: ready in {ready:.1f} s on port {server.port}"
                      f" (model {server.model_name!r})", flush=True)
                rows += server_rows(server, backend, dtype, levels, warmup, args.new_tokens, args.request_timeout,
                                    args.stagger)
            except ServerError as err:
                errors.append(f"server {backend} {dtype}: {err}")
                print(f"  server {backend} {dtype}: FAILED: {err}", flush=True)
            finally:
                print(f"  server {backend} {dtype}: {server.stop()}", flush=True)

    def find(kind: str, level: int, backend: str | None = None, dtype: str | None = None) -> Row | None:
        return next((r for r in rows if r.kind == kind and r.level == level
                     and (backend is None or r.backend == backend) and (dtype is None or r.dtype == dtype)), None)

    print("results (server: c = concurrent clients; static / hf: b = batch size):")
    for level in levels_c:
        hf = find("hf", level)
        if hf is not None:
            print(fmt_row(hf, None, None))
        for backend, dtype in cases:
            static = find("static", level, backend, dtype)
            for row in (static, find("server", level, backend, dtype)):
                if row is not None:
                    print(fmt_row(row, hf, static))
    failed = [r for r in rows if r.failures]
    for row in failed:
        print(f"failures: {row.kind} {row.backend} {row.dtype} level {row.level}: {len(row.failures)}")
        for failure in row.failures[:10]:
            print(f"    {failure}")
        if len(row.failures) > 10:
            print(f"    ... {len(row.failures) - 10} more")
    for error in errors:
        print(f"error: {error}")

    print(f"end: {load_line()} (the run's own processes included)")
    print("targets:")
    for backend, dtype in cases:
        s8, s1 = find("server", 8, backend, dtype), find("server", 1, backend, dtype)
        name = f"server {backend} {dtype}"
        if s8 is None:
            print(f"  {name}: no c=8 result")
            continue
        note = f" ({s8.total - s8.ok} of {s8.total} requests failed)" if s8.ok < s8.total else ""
        hf8, static8 = find("hf", 8), find("static", 8, backend, dtype)
        if hf8 is not None:
            ratio = s8.tok_s / hf8.tok_s
            print(f"  {name} c=8 >= 2x hf generate b=8: x{ratio:.2f} ({s8.tok_s:.1f} vs {hf8.tok_s:.1f} tok/s) "
                  f"{'PASS' if ratio >= 2 else 'FAIL'}{note}")
        if static8 is not None:
            ratio = s8.tok_s / static8.tok_s
            print(f"  {name} c=8 >= static b=8: x{ratio:.2f} ({s8.tok_s:.1f} vs {static8.tok_s:.1f} tok/s) "
                  f"{'PASS' if ratio >= 1 else 'FAIL'}{note}")
        p99, p50 = percentile(s8.ttft_ms, 0.99), percentile(s1.ttft_ms, 0.5) if s1 is not None else None
        if p99 is None or p50 is None:
            print(f"  {name} TTFT p99 c=8 < 4x TTFT p50 c=1: no {'c=1' if p50 is None else 'c=8'} TTFT")
        else:
            print(f"  {name} TTFT p99 c=8 < 4x TTFT p50 c=1: {p99:.1f} ms vs 4 x {p50:.1f} = {4 * p50:.1f} ms "
                  f"{'PASS' if p99 < 4 * p50 else 'FAIL'}{note}")
    if errors or failed:
        sys.exit(1)


if __name__ == "__main__":
    main()

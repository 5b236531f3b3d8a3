"""``modelzoo-serve`` / ``run_server.py``: an OpenAI-compatible HTTP server with continuous batching.

examples:
  modelzoo-serve --checkpoint runs/llama_tiny                        # the run's newest checkpoint
  modelzoo-serve --checkpoint DIR --backend inductor --max-batch 16 --port 8080
  modelzoo-serve --checkpoint DIR --quantize int8 --backend inductor
  modelzoo-serve --checkpoint DIR --n-chips 2                        # tensor parallel, 2 processes
  modelzoo-serve --checkpoint BASE --adapter ADAPTER                 # LoRA/DoRA adapter, unmerged
  modelzoo-serve --checkpoint DIR --api-key secret                   # clients send 'Authorization: Bearer secret'

then:
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}'

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models (OpenAI v1, streaming
as server-sent events), PUT /api (Megatron-LM's text-generation server), GET /health, GET /metrics
(Prometheus). The server binds 127.0.0.1 unless --host says otherwise. SIGTERM or Ctrl-C stops
taking requests, lets running ones finish (up to --shutdown-timeout), then exits.
Exit status: 0 after a clean shutdown, 2 bad input (one 'error:' line), 1 the server failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from modelzoo.cli.errors import UsageError
from modelzoo.cli.model_options import add_model_options


def _parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(prog="modelzoo-serve", description=doc[0], epilog=doc[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p, backend_help="cpu: eager; inductor: torch.compile",
                      n_chips_help="tensor-parallel degree: processes on this machine, rank 0 serves HTTP")
    p.add_argument("--served-model-name", help="the model id clients send (default: the checkpoint dir's name)")
    p.add_argument("--max-batch", type=int, default=8, help="KV-cache slots = requests decoded together "
                   "(default: %(default)s)")
    p.add_argument("--max-model-len", type=int, default=2048, help="positions per slot, prompt + generated; "
                   "capped at the model's context (default: %(default)s)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens prefilled per engine step "
                   "(default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot; beyond it: 503 "
                   "with Retry-After (default: %(default)s)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds from arrival to the last token; "
                   "beyond it: 504 (default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request bodies above it: 413 "
                   "(default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("MODELZOO_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 and /api (default: $MODELZOO_API_KEY, or none)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds running requests get to finish "
                   "after SIGTERM (default: %(default)s)")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="warning",
                   help="uvicorn's log level; info logs every request (default: %(default)s)")
    return p


@dataclass
class ServeJob:
    """What every rank needs to build the same model and engine (picklable)."""

    source: str
    adapter: str | None
    tokenizer_dir: str | None
    dtype: str
    quantize: str
    backend: str
    n_chips: int
    max_batch: int
    max_model_len: int
    prefill_chunk: int
    max_queue: int


def _check_args(args: argparse.Namespace) -> None:
    for flag in ("n_chips", "max_batch", "max_model_len", "prefill_chunk", "max_queue", "max_body_bytes"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.request_timeout <= 0:
        raise UsageError(f"--request-timeout must be > 0, got {args.request_timeout}")
    if args.n_chips > 1 and args.backend != "cpu":
        raise UsageError(f"--n-chips {args.n_chips} runs on --backend cpu (gloo processes); got --backend {args.backend}")


def resolve_job(args: argparse.Namespace) -> ServeJob:
    """The weights source, adapter and tokenizer behind the flags; every user error is raised here,
    before weights load or processes start."""
    from modelzoo.generation.source import resolve_model_source

    found, config = resolve_model_source(args.checkpoint, args.adapter, args.tokenizer, n_chips=args.n_chips,
                                         quantize=args.quantize)
    return ServeJob(found.source, found.adapter, found.tokenizer_dir, args.dtype, args.quantize, args.backend,
                    args.n_chips, args.max_batch, min(args.max_model_len, int(config.max_position_embeddings)),
                    args.prefill_chunk, args.max_queue)


def load_serving_tokenizer(job: ServeJob):
    from modelzoo.generation.source import ModelSource, load_source_tokenizer

    return load_source_tokenizer(ModelSource(job.source, job.adapter, job.tokenizer_dir))


def build_engine(job: ServeJob, world_size: int = 1, leader: bool = False):
    """Load the model (sharded over the process group when ``world_size > 1``) and its engine."""
    from modelzoo.generation import SlotEngine, load_for_generation

    model = load_for_generation(job.source, dtype=job.dtype, quantize=job.quantize, adapter=job.adapter)
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh

        from modelzoo.models.llama.parallelize import parallelize_llama

        parallelize_llama(model, init_device_mesh("cpu", (world_size,)))
    tokenizer = load_serving_tokenizer(job)[0] if leader or world_size == 1 else None
    return SlotEngine(model, tokenizer, backend=job.backend, max_batch=job.max_batch,
                      max_model_len=job.max_model_len, prefill_chunk=job.prefill_chunk, max_queue=job.max_queue,
                      leader=leader)


def _follower(rank: int, world_size: int, store: str, job: ServeJob, parent: int) -> None:
    """Ranks > 0: make rank 0's forwards until it releases them; die with the server process."""
    import signal

    import torch
    import torch.distributed as dist

    from modelzoo.parallel.launch import PARENT_ENV, loopback_env, watch_parent
    from modelzoo.parallel.mesh import shutdown_distributed

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when to stop (it releases us)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ.update(loopback_env(), RANK=str(rank), WORLD_SIZE=str(world_size), **{PARENT_ENV: str(parent)})
    watch_parent()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    build_engine(job, world_size).follow()
    shutdown_distributed()


def serve(args: argparse.Namespace, job: ServeJob) -> int:
    import multiprocessing as mp
    import tempfile

    processes, rdzv = [], None
    if job.n_chips > 1:
        import torch
        import torch.distributed as dist

        from modelzoo.parallel.launch import loopback_env

        rdzv = tempfile.TemporaryDirectory(prefix="modelzoo-serve-")
        store = os.path.join(rdzv.name, "store")
        context = mp.get_context("spawn")
        processes = [context.Process(target=_follower, args=(rank, job.n_chips, store, job, os.getpid()), daemon=True)
                     for rank in range(1, job.n_chips)]
        for process in processes:
            process.start()
        os.environ.update(loopback_env())
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=job.n_chips)
    print(f"modelzoo-serve: loading {job.source}" + (f" + adapter {job.adapter}" if job.adapter else "")
          + f" ({job.dtype}, {job.quantize}, backend {job.backend}, {job.n_chips} chip(s))", file=sys.stderr, flush=True)
    try:
        return _run_server(args, job)
    finally:
        if job.n_chips > 1:
            from modelzoo.parallel.mesh import shutdown_distributed

            shutdown_distributed()
            for process in processes:
                process.join(timeout=30)
            rdzv.cleanup()


def _run_server(args: argparse.Namespace, job: ServeJob) -> int:
    import time

    import uvicorn

    from modelzoo.serving import Server, ServerSettings, create_app

    engine = build_engine(job, job.n_chips, leader=True)
    if engine.decoder.compiled:
        widths, buckets = engine.warmup_shapes()
        print(f"modelzoo-serve: compiling {len(widths) + len(buckets)} step shapes before taking requests (decode "
              f"batch {', '.join(map(str, widths))}; prefill {', '.join(map(str, buckets))} tokens)",
              file=sys.stderr, flush=True)
        begin = time.perf_counter()
        engine.warmup()
        print(f"modelzoo-serve: compiled in {time.perf_counter() - begin:.0f} s", file=sys.stderr, flush=True)
    name = args.served_model_name or Path(job.source).name
    settings = ServerSettings(model_name=name, api_key=args.api_key, request_timeout=args.request_timeout,
                              max_body_bytes=args.max_body_bytes)
    server = Server(engine, engine.tokenizer, settings, own_thread=False)
    config = uvicorn.Config(create_app(server), host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout, access_log=args.log_level in ("info", "debug"))
    print(f"modelzoo-serve: serving '{name}' at http://{args.host}:{args.port}/v1 ({job.max_batch} slots x "
          f"{engine.cache.max_length} positions; Ctrl-C or SIGTERM stops)", file=sys.stderr, flush=True)
    http = uvicorn.Server(config)
    run_http_beside_engine(http, server.thread)
    if server.thread.error is not None:
        print(f"error: the engine failed: {server.thread.error!r}", file=sys.stderr)
        return 1
    if not http.started:
        return 1
    print("modelzoo-serve: stopped", file=sys.stderr, flush=True)
    return 0


def run_http_beside_engine(http, engine_loop) -> None:
    """uvicorn in a thread, the engine stepped on this (main) thread (see ``EngineThread``).
    SIGTERM/SIGINT ask uvicorn to shut down gracefully (a second SIGINT forces it); when its thread
    ends (after the app's shutdown stopped the engine loop), this returns."""
    import signal
    import threading

    def ask_exit(signum, frame):
        if http.should_exit and signum == signal.SIGINT:
            http.force_exit = True
        http.should_exit = True

    originals = {sig: signal.signal(sig, ask_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http.run, name="modelzoo-http", daemon=True)
    watcher = threading.Thread(target=lambda: (thread.join(), engine_loop.stop(drain=False)), daemon=True)
    try:
        thread.start()
        watcher.start()
        engine_loop.run()
        thread.join()
    finally:
        for sig, handler in originals.items():
            signal.signal(sig, handler)


def _run(args: argparse.Namespace) -> int:
    return serve(args, resolve_job(args))


def main(argv: list[str] | None = None) -> int:
    """Console entry point; a user error prints one ``error:`` line and returns 2. ``--help`` and
    flag errors answer before torch is imported."""
    args = _parser().parse_args(argv)
    try:
        _check_args(args)
        import importlib.util

        missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
        if missing:
            raise UsageError(f"modelzoo-serve needs {', '.join(missing)}: pip install 'modelzoo[serve]'")
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from modelzoo.cli.errors import run_reporting_errors

    return run_reporting_errors(_run, args)


if __name__ == "__main__":
    raise SystemExit(main())

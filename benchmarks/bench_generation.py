"""Generation throughput: modelzoo's static-cache decoder vs ``transformers`` ``generate``, one run.

Same model (``llama_60m``, random weights, fp32), same prompts (random ids, ``--prompt-len`` tokens),
greedy, ``--new-tokens`` tokens per prompt (EOS off), batch 1 and 8, one process. Rows:

- ``hf dynamic``: ``model.generate`` with its default dynamic cache (the baseline);
- ``hf static``: ``cache_implementation="static"`` (eager on CPU);
- ``hf static+compile``: the same with ``torch.compile`` forced on CPU (``--hf-compile``);
- ``ours cpu`` / ``ours inductor``: :class:`modelzoo.generation.Generator`, eager and compiled, in
  fp32 and int8 (weight-only, per output channel; the embedding table int8 per row too).

Timing: every configuration runs once per round, rounds alternate the order, the median is kept, so
that load from other processes on a shared machine hits all rows alike. ``e2e tok/s`` = generated
tokens / wall time (prefill included); ``ms/step`` = decode time per step, from (time for N tokens -
time for 1 token) / (N - 1) for ``transformers`` and from our telemetry for ours.

Roofline: a decode step must read every weight once (``weights/step``: all parameters but the
embedding table, of which only B rows are read; int8: 1 byte per weight + fp32 scales). The
achieved bandwidth is ``weights/step / ms/step``; it is compared with the copy bandwidth measured
here (``dst.copy_(src)`` of 256 MiB, bytes read + written, the STREAM convention).

The first lines name the CPU's vector extensions, the instruction set compiled kernels are generated
for, and the kernels each of our rows runs. On a CPU with AVX-512, ``ATEN_CPU_CAPABILITY=avx2``
makes inductor generate AVX2 code (what a CPU without AVX-512 runs).

    python benchmarks/bench_generation.py [--batch-sizes 1 8] [--rounds 3] [--no-hf-compile]
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_generation.py
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from modelzoo.generation import Generator, quantize_for_generation_
from modelzoo.generation.kernels import cpu_line, kernel_line
from modelzoo.models.llama import from_pretrained


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 7) -> float:
    """Bytes/s of ``dst.copy_(src)`` (read + write counted), best of ``repeats``."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def weights_per_step(model) -> int:
    """Bytes a decode step reads: every weight (and int8 scale) except the embedding table, of which
    only the looked-up rows are read (a tied LM head reads the whole table, so it counts then)."""
    head = {id(t) for t in list(model.lm_head.parameters()) + list(model.lm_head.buffers())}
    embed = {id(t) for t in list(model.model.embed_tokens.parameters()) + list(model.model.embed_tokens.buffers())}
    rotary = {id(t) for t in model.model.rotary_emb.buffers()}
    total, seen = 0, set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or id(t) in rotary or (id(t) in embed and id(t) not in head):
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def hf_runner(model, ids, new_tokens: int, mode: str):
    """A callable running ``generate`` (greedy, EOS off) and returning the generated ids."""
    from transformers import CompileConfig

    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
              "pad_token_id": 0, "attention_mask": torch.ones_like(ids)}
    if mode in ("static", "static+compile"):
        kwargs["cache_implementation"] = "static"
    if mode == "static+compile":
        config = CompileConfig(fullgraph=False, dynamic=False, mode=None)
        config._compile_all_devices = True
        kwargs["compile_config"] = config
    else:
        kwargs["disable_compile"] = True

    def run(n=new_tokens):
        with torch.no_grad():
            out = model.generate(ids, **{**kwargs, "max_new_tokens": n, "min_new_tokens": n})
        return out[:, ids.shape[1]:]

    return run


def ours_runner(model, ids, new_tokens: int, backend: str):
    batch, prompt_len = ids.shape
    max_length = -(-(prompt_len + new_tokens) // 64) * 64
    gen = Generator(model, backend=backend, batch_size=batch, max_length=max_length, eos_token_ids=[])
    prompts = ids.tolist()

    def run(n=new_tokens):
        gen.telemetry.batches.clear()
        done = gen.generate_ids(prompts, n)
        return torch.tensor([c.token_ids for c in done])

    return run, gen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama_60m")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-hf-compile", dest="hf_compile", action="store_false",
                        help="skip the transformers static-cache + torch.compile row (its compile is slow)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    fp32 = from_pretrained(args.model, patch=False, seed=0)
    int8 = copy.deepcopy(fp32)
    quantize_for_generation_(int8)
    bw = copy_bandwidth()
    bytes_fp32, bytes_int8 = weights_per_step(fp32), weights_per_step(int8)
    n_params = sum(p.numel() for p in fp32.parameters())
    print(f"bench_generation: {args.model} ({n_params / 1e6:.1f}M params), prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(cpu_line())
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s (read+write); weights read per decode step: "
          f"fp32 {bytes_fp32 / 1e6:.1f} MB, int8 {bytes_int8 / 1e6:.1f} MB")
    for backend, compiled in (("cpu", False), ("inductor", True)):
        for dtype, model in (("fp32", fp32), ("int8", int8)):
            print(f"kernels of ours {backend:<8} {dtype}: {kernel_line(model, compiled)}")
    summary = {}
    for batch in args.batch_sizes:
        ids = torch.randint(3, fp32.config.vocab_size, (batch, args.prompt_len),
                            generator=torch.Generator().manual_seed(batch))
        hf_model = copy.deepcopy(fp32)
        rows: dict[str, tuple] = {  # name -> (runner, weight bytes, our generator or None)
            "hf dynamic        fp32": (hf_runner(hf_model, ids, args.new_tokens, "dynamic"), bytes_fp32, None),
            "hf static         fp32": (hf_runner(hf_model, ids, args.new_tokens, "static"), bytes_fp32, None),
        }
        if args.hf_compile:
            compiled_model = copy.deepcopy(fp32)
            rows["hf static+compile fp32"] = (hf_runner(compiled_model, ids, args.new_tokens, "static+compile"),
                                              bytes_fp32, None)
        for backend in ("cpu", "inductor"):
            for dtype, model, nbytes in (("fp32", fp32, bytes_fp32), ("int8", int8, bytes_int8)):
                run, gen = ours_runner(model, ids, args.new_tokens, backend)
                rows[f"ours {backend:<13}{dtype}"] = (run, nbytes, gen)
        tokens, one_token, full = {}, {}, {}
        for name, (run, _, _) in rows.items():  # warm-up: compiles, allocations
            start = time.perf_counter()
            tokens[name] = run()
            warm = time.perf_counter() - start
            if warm > 20:
                print(f"  (warm-up of {name.strip()}: {warm:.0f} s, compile included)")
        for r in range(args.rounds):
            names = list(rows) if r % 2 == 0 else list(reversed(rows))
            for name in names:
                run, _, gen = rows[name]
                if gen is None:
                    start = time.perf_counter()
                    run(1)
                    one_token.setdefault(name, []).append(time.perf_counter() - start)
                start = time.perf_counter()
                run()
                full.setdefault(name, []).append(time.perf_counter() - start)
                if gen is not None:
                    one_token.setdefault(name, []).append(gen.telemetry.batches[0].ttft_s)
        print(f"batch {batch}:")
        base_name = "hf dynamic        fp32"
        results = {}
        for name, (_, nbytes, _) in rows.items():
            wall = statistics.median(full[name])
            step = (wall - statistics.median(one_token[name])) / (args.new_tokens - 1)
            e2e = batch * args.new_tokens / wall
            roof = nbytes / step / bw
            results[name] = (e2e, step, roof)
        base = results[base_name][0]
        for name, (e2e, step, roof) in results.items():
            same = (tokens[name] == tokens[base_name]).float().mean().item()
            print(f"  {name}  {e2e:8.1f} tok/s  {1e3 * step:7.2f} ms/step  {100 * roof:5.1f}% of roofline  "
                  f"x{e2e / base:5.2f} vs hf dynamic  tokens = hf: {100 * same:5.1f}%")
        summary[batch] = results
    print("targets:")
    if 1 in summary:
        r = summary[1]
        best = max((n for n in r if n.startswith("ours") and n.endswith("fp32")), key=lambda n: r[n][2])
        print(f"  batch 1 fp32 >= 50% of roofline: {100 * r[best][2]:.0f}% ({best.split()[1]}) "
              f"{'PASS' if r[best][2] >= 0.5 else 'FAIL'}")
        best8 = max((n for n in r if n.startswith("ours") and n.endswith("int8")), key=lambda n: r[n][0])
        ratio = r[best8][0] / r["hf dynamic        fp32"][0]
        print(f"  batch 1 int8 >= 2x hf fp32: x{ratio:.2f} ({best8.split()[1]}) {'PASS' if ratio >= 2 else 'FAIL'}")
    for batch, r in summary.items():
        if batch == 1:
            continue
        best = max((n for n in r if n.startswith("ours") and n.endswith("fp32")), key=lambda n: r[n][0])
        ratio = r[best][0] / r["hf dynamic        fp32"][0]
        print(f"  batch {batch} fp32 >= hf: x{ratio:.2f} ({best.split()[1]}) {'PASS' if ratio >= 1 else 'FAIL'}")


if __name__ == "__main__":
    main()

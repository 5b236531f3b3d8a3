"""Checkpoint conversion at scale: peak memory vs the largest tensor, and MB/s vs a plain file copy.

Generates a synthetic Meta-native checkpoint (Llama-2-7B shapes, bf16, MP=2, random values, enough
layers for >= 4 GiB) in a temp dir, then runs, each in a fresh child process:

    meta-to-hf -> shard --n-chips 4 -> unshard -> hf-to-meta -> quantize --int8 -> verify (weights)

and, in the same run, a plain copy (+ fsync) of the same input bytes as the throughput baseline.
Peak RSS is the child's ``ru_maxrss`` (resident memory, file-backed mapped pages included). The
bound checked is ``2 x largest tensor + fixed overhead``, where the fixed overhead is the RSS of a
child that only imports the converter (interpreter + torch + transformers; measured in this run)
plus 256 MiB for block buffers and mapping slack. Prints one result line per step, then removes
everything it wrote (``--keep`` leaves it).

    python benchmarks/bench_convert.py [--gib 4.2] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DIM, FFN, HEADS, VOCAB = 4096, 11008, 32, 32000  # Llama-2 7B
DTYPE = torch.bfloat16
MP = 2
SLACK_MIB = 256
MiB = 2**20


def layer_bytes() -> int:
    return (4 * DIM * DIM + 3 * FFN * DIM + 2 * DIM) * 2


def generate(path: Path, n_layers: int) -> int:
    """Write params.json + consolidated.00/01.pth with random bf16 pieces; returns total bytes."""
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float32) * 0.02).to(DTYPE)

    norms = {f"layers.{i}.{n}.weight": torch.ones(DIM, dtype=DTYPE) for i in range(n_layers)
             for n in ("attention_norm", "ffn_norm")}
    norms["norm.weight"] = torch.ones(DIM, dtype=DTYPE)
    total = 0
    for rank in range(MP):
        state = {"tok_embeddings.weight": rand(VOCAB, DIM // MP)}  # Llama-2: embedding split along dim
        for i in range(n_layers):
            for w in ("wq", "wk", "wv"):
                state[f"layers.{i}.attention.{w}.weight"] = rand(DIM // MP, DIM)
            state[f"layers.{i}.attention.wo.weight"] = rand(DIM, DIM // MP)
            state[f"layers.{i}.feed_forward.w1.weight"] = rand(FFN // MP, DIM)
            state[f"layers.{i}.feed_forward.w2.weight"] = rand(DIM, FFN // MP)
            state[f"layers.{i}.feed_forward.w3.weight"] = rand(FFN // MP, DIM)
            state[f"layers.{i}.attention_norm.weight"] = norms[f"layers.{i}.attention_norm.weight"]
            state[f"layers.{i}.ffn_norm.weight"] = norms[f"layers.{i}.ffn_norm.weight"]
        state["norm.weight"] = norms["norm.weight"]
        state["output.weight"] = rand(VOCAB // MP, DIM)
        torch.save(state, path / f"consolidated.{rank:02d}.pth")
        total += sum(t.numel() * t.element_size() for t in state.values())
        del state
    (path / "params.json").write_text(json.dumps(
        {"dim": DIM, "multiple_of": 256, "n_heads": HEADS, "n_layers": n_layers, "norm_eps": 1e-05, "vocab_size": -1}))
    return total


_RUNNER = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    if sys.argv[0] == "-c":
        exec(sys.argv[1])
    else:
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
finally:
    status = open("/proc/self/status").read()
    sys.stderr.write("VmHWM_KIB " + status.split("VmHWM:")[1].split()[0] + "\\n")
"""


def run_measured(module_argv: list[str]) -> tuple[float, int, str]:
    """Run ``python -m module args`` (or ``-c code``) in a fresh child; returns (wall seconds, peak RSS bytes, stdout).

    The peak is the child's own ``VmHWM`` (read at its exit; ``ru_maxrss`` of a forked child would
    include the parent's memory at fork time). A failing child stops the benchmark."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RUNNER, *module_argv], capture_output=True, text=True)
    wall = time.perf_counter() - start
    match = re.search(r"VmHWM_KIB (\d+)", proc.stderr)
    if proc.returncode or not match:
        raise SystemExit(f"child {' '.join(module_argv)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, int(match.group(1)) * 1024, proc.stdout


def copy_baseline(src: Path, dst: Path) -> tuple[int, float]:
    dst.mkdir()
    start = time.perf_counter()
    total = 0
    for file in sorted(src.glob("consolidated.*.pth")):
        shutil.copyfile(file, dst / file.name)
        fd = os.open(dst / file.name, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        total += file.stat().st_size
    return total, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=4.2, help="minimum checkpoint size in GiB (default 4.2)")
    parser.add_argument("--dir", default=None, help="where to make the temp dir (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()

    emb_bytes = VOCAB * DIM * 2
    n_layers = max(1, math.ceil((args.gib * 2**30 - 2 * emb_bytes) / layer_bytes()))
    largest = emb_bytes  # tok_embeddings / output: 32000 x 4096 bf16
    root = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.dir))
    try:
        t0 = time.perf_counter()
        total = generate(root / "meta", n_layers)
        print(f"checkpoint  synthetic Meta MP={MP}, Llama-2-7B shapes x {n_layers} layers, bf16: "
              f"{total / 2**30:.2f} GiB, largest tensor {largest / MiB:.0f} MiB (generated in "
              f"{time.perf_counter() - t0:.0f} s)")
        _, base_rss, _ = run_measured(["-c", "import modelzoo.cli.convert, modelzoo.convert.meta, "
                                             "modelzoo.convert.tp_shards, modelzoo.convert.quantize, "
                                             "modelzoo.convert.verify"])
        overhead = base_rss + SLACK_MIB * MiB
        bound = 2 * largest + overhead
        print(f"bound       peak RSS < 2 x {largest / MiB:.0f} MiB + fixed overhead {overhead / MiB:.0f} MiB "
              f"(import baseline {base_rss / MiB:.0f} MiB + {SLACK_MIB} MiB) = {bound / MiB:.0f} MiB")
        copied, seconds = copy_baseline(root / "meta", root / "copy")
        copy_rate = copied / 1e6 / seconds
        print(f"copy        {copied / 1e9:.2f} GB in {seconds:.1f} s = {copy_rate:.0f} MB/s (shutil.copyfile + fsync; "
              "baseline)")
        shutil.rmtree(root / "copy")

        cli = ["modelzoo.cli.convert"]
        steps = [
            ("meta-to-hf", [*cli, "meta-to-hf", "--input", f"{root}/meta", "--output", f"{root}/hf",
                            "--max-shard-size", "2GB", "--quiet"], None),
            ("shard", [*cli, "shard", "--input", f"{root}/hf", "--output", f"{root}/tp", "--n-chips", "4",
                       "--max-shard-size", "2GB", "--quiet"], None),
            ("unshard", [*cli, "unshard", "--input", f"{root}/tp", "--output", f"{root}/hf2", "--quiet"], "tp"),
            ("hf-to-meta", [*cli, "hf-to-meta", "--input", f"{root}/hf2", "--output", f"{root}/meta2",
                            "--quiet"], "hf2"),
            ("quantize", [*cli, "quantize", "--int8", "--input", f"{root}/hf", "--output", f"{root}/int8",
                          "--quiet"], "int8"),
            ("verify", [*cli, "verify", f"{root}/meta2", f"{root}/hf", "--logits", "never"], "meta2"),
        ]
        all_ok = True
        for name, argv, remove in steps:
            wall, rss, out = run_measured(argv)
            ok = rss < bound
            if name == "verify":
                ok = ok and "verify: PASS" in out
                rate = f"read {2 * total / 1e9:.2f} GB at {2 * total / 1e6 / wall:5.0f} MB/s (incl. startup)"
            else:
                match = re.search(r"([\d,.]+) MB in ([\d.]+) s", out)
                written, seconds = float(match.group(1).replace(",", "")), float(match.group(2))
                rate = f"wrote {written / 1e3:.2f} GB at {written / seconds:5.0f} MB/s = {written / seconds / copy_rate:.2f}x copy"
            all_ok &= ok
            print(f"{name:<11} {rate}  wall {wall:5.1f} s  peak RSS {rss / MiB:5.0f} MiB = baseline + "
                  f"{(rss - base_rss) / MiB:4.0f} MiB ({(rss - base_rss) / largest:.2f} x largest)  "
                  f"{'<' if rss < bound else '>='} bound {bound / MiB:.0f} MiB  {'OK' if ok else 'FAIL'}")
            if remove:
                shutil.rmtree(root / remove, ignore_errors=True)
        print(f"result      {'all steps within the memory bound' if all_ok else 'FAILED'}")
        return 0 if all_ok else 1
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

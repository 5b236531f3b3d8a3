"""Per-rank peak memory of a training step: the compile plan's prediction against a measurement.

``llama_60m`` (random init), batch 4 x 512, fp32, AdamW, the trainer's own step; TP in {1, 2} (gloo
processes on CPU) x ``training.recompute`` in {none, full}. For each case: the plan's predicted
per-chip peak (``modelzoo.compile.plan.memory_per_chip``), the measured peak of rank 0
(``modelzoo.training.memory.measure_train_step``: live tensor bytes on CPU, the allocator's peak on
CUDA), their ratio, and tokens/s over a few timed steps, with the throughput cost of recompute.
The data is pretraining-style text (every target carries loss), the plan's assumption.

    python benchmarks/bench_memory.py [--steps 3] [--tp 1 2] [--recompute none full]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

GLOBAL_ROWS = 32


def _args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (after the measured one)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel degrees")
    parser.add_argument("--recompute", nargs="+", default=["none", "full"], choices=["none", "selective", "full"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    return parser.parse_args(argv)


def write_text_dataset(root: Path, seq: int, vocab: int, rows: int = GLOBAL_ROWS) -> Path:
    """A dataset dir of random token rows, every token a completion token (one article a row)."""
    import h5py
    import numpy as np
    import yaml

    from modelzoo.data.dataset_layout import write_manifest

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "train_1_of_1.hdf5", "w") as f:
        f.create_dataset("input_ids", data=rng.integers(3, vocab, (rows, seq), dtype=np.int32))
        f.create_dataset("token_type_ids", data=np.ones((rows, seq), dtype=np.int32))
    meta = {"max_seq_length": seq, "token_type_ids": True, "vocab_size": vocab, "tokenizer_model_type": "synthetic",
            "number_of_training_files": 1, "number_of_dev_files": 0, "number_of_test_files": 0,
            "max_batch_size_train": rows, "max_batch_size_dev": 0}
    (root / "metadata.yaml").write_text(yaml.safe_dump(meta))
    write_manifest(root)
    return root


def _overrides(work: Path, data: Path, n_chips: int, recompute: str, batch: int, seq: int, steps: int) -> list[str]:
    values = {
        "model.name_or_path": "llama_60m", "training.dataset_dir": data, "training.max_seq_length": seq,
        "training.batch_size": batch, "training.max_steps": steps + 2, "training.warmup_steps": 1,
        "training.recompute": recompute, "checkpoint.save_dir": work / "ck", "checkpoint.save_every": 0,
        "training.output_dir": work / "out", "samba_compile.output_folder": work / "plan",
        "samba_compile.tensor_parallel": "weight" if n_chips > 1 else "none", "samba_compile.n_chips": n_chips,
    }
    return [f"{k}={v}" for k, v in values.items()]


def _case(rank: int, world: int, overrides: list[str], steps: int, out: str) -> None:
    import statistics
    import time

    from modelzoo.config import load_config
    from modelzoo.training.memory import measure_train_step
    from modelzoo.training.trainer import Trainer

    trainer = Trainer(load_config("llama_tiny", overrides), quiet=True)
    trainer.train_step()  # the optimizer state exists from here on
    measured = measure_train_step(trainer)
    rates = []
    for _ in range(steps):
        start = time.perf_counter()
        tokens = trainer.train_step()["tokens"]
        rates.append(tokens / (time.perf_counter() - start))
    if rank == 0:  # the median step: one slow step (page faults of a first large allocation) is ignored
        Path(out).write_text(json.dumps({**measured, "tokens_per_s": statistics.median(rates)}))


def main(argv=None) -> int:
    args = _args(argv)
    from modelzoo.compile.plan import memory_per_chip
    from modelzoo.config import load_config
    from modelzoo.models.llama import get_preset
    from modelzoo.parallel.mesh import spawn_cpu

    mib = 2**20
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_memory-") as tmp:
        tmp = Path(tmp)
        data = write_text_dataset(tmp / "data", args.seq, get_preset("llama_60m").vocab_size,
                                  rows=max(GLOBAL_ROWS, args.batch * (args.steps + 2)))
        for n_chips in args.tp:
            for recompute in args.recompute:
                work = tmp / f"tp{n_chips}-{recompute}"
                overrides = _overrides(work, data, n_chips, recompute, args.batch, args.seq, args.steps)
                predicted = memory_per_chip(load_config("llama_tiny", overrides))
                out = str(work / "measured.json")
                work.mkdir(parents=True)
                if n_chips == 1:
                    _case(0, 1, overrides, args.steps, out)
                else:
                    spawn_cpu(_case, n_chips, overrides, args.steps, out)
                got = json.loads(Path(out).read_text())
                ratio = predicted["total"] / got["peak"]
                rows.append((n_chips, recompute, ratio, got["tokens_per_s"]))
                print(f"llama_60m {args.batch}x{args.seq} fp32 TP={n_chips} recompute={recompute:<5}  predicted "
                      f"{predicted['total'] / mib:7.0f} MiB  measured {got['peak'] / mib:7.0f} MiB per rank  "
                      f"ratio {ratio:.3f}  (measured resident {sum(got['resident'].values()) / mib:.0f} + step "
                      f"{got['step_peak'] / mib:.0f}; predicted activations {predicted['activations'] / mib:.0f} + "
                      f"temporaries {predicted['temporaries'] / mib:.0f})  {got['tokens_per_s']:,.0f} tokens/s",
                      flush=True)
    for n_chips in args.tp:
        speeds = {rc: tps for tp, rc, _, tps in rows if tp == n_chips}
        if "none" in speeds and "full" in speeds:
            print(f"TP={n_chips}: recompute=full runs at {speeds['full'] / speeds['none']:.2f}x the tokens/s of "
                  f"recompute=none ({speeds['none'] / speeds['full'] - 1:+.0%} time per token; the FLOPs of the "
                  "decoder blocks grow by 1/3: one more forward per forward + backward)")
    worst = max(rows, key=lambda r: abs(r[2] - 1))
    print(f"worst prediction: TP={worst[0]} recompute={worst[1]} ratio {worst[2]:.3f} "
          f"({'within' if abs(worst[2] - 1) <= 0.15 else 'OUTSIDE'} the 15% target)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

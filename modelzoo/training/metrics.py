"""Training metrics: FLOPs per token, MFU, a measured matmul peak, peak memory, JSONL log.

FLOPs per trained token (forward + backward = 3x forward), following Kaplan et al. 2020 / the
PaLM appendix:

    6 * N_nonembed                  matmuls of the decoder layers (2 FLOPs per MAC, x3 for fwd+bwd)
  + 12 * L * Q * S                  attention scores and weighted values (QK^T and AV), causal
                                    masking not discounted
  + 6 * H * V                       the LM head

where N_nonembed excludes the embedding and LM-head matrices, L = layers, H = hidden size,
Q = heads x head_dim (the query width; H unless head_dim is set apart), S = sequence length,
V = vocab size.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch


def flops_per_token(config: Any, seq_len: int) -> float:
    """Training FLOPs per token of a Llama ``config`` at sequence length ``seq_len`` (see module doc)."""
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q_out = config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    per_layer = h * q_out + 2 * h * kv_out + q_out * h + 3 * h * config.intermediate_size
    n_nonembed = layers * per_layer
    return 6 * n_nonembed + 12 * layers * q_out * seq_len + 6 * h * vocab  # attention: QK^T and AV, q width


def measure_matmul_peak(dtype: torch.dtype = torch.float32, device: str = "cpu", size: int = 2048,
                        seconds: float = 0.5, trials: int = 5) -> float:
    """Best achieved FLOP/s of a square matmul on this device over ``trials`` short windows: the
    'peak' MFU is measured against (the best window, so a busy moment does not lower it).

    The matrix grows from 128 up to ``size`` only while one product stays well inside a window: a
    dtype without native kernels (bf16 on many CPUs, ~1 GFLOP/s) would otherwise spend minutes
    on a few 2048-wide products before training starts."""
    gen = torch.Generator(device=device).manual_seed(0)  # its own: the run's RNG state stays untouched
    window = seconds / trials
    n = 128
    while True:
        a = torch.randn(n, n, dtype=dtype, device=device, generator=gen)
        b = torch.randn(n, n, dtype=dtype, device=device, generator=gen)
        a @ b  # the first product also warms up kernels and threads
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if n >= size or time.perf_counter() - start > window / 8:
            break
        n *= 2
    best = 0.0
    for _ in range(trials):
        _sync(device)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < window:
            a @ b
            count += 1
        _sync(device)
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start))
    return best


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_bytes(device: str = "cpu") -> int:
    """Peak memory of this process: CUDA allocator peak, or the CPU resident-set high-water mark."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class MetricsLog:
    """One JSON object per line in ``path`` (rank 0 only); ``history`` holds this process's records.

    A fresh run starts the file anew. A resumed run (``resumed_at``) keeps the records up to that
    step and drops the later ones (the steps after the checkpoint are trained, and logged, again),
    so the file reads as one uninterrupted run.
    """

    def __init__(self, path: str | Path | None, resumed_at: int | None = None) -> None:
        self.path = Path(path) if path else None
        self.history: list[dict[str, Any]] = []
        if not self.path:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in self.records() if resumed_at is not None and r.get("step", 0) <= resumed_at]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def records(self) -> list[dict[str, Any]]:
        """Every record in the file (a torn last line from a killed run is skipped)."""
        if not self.path or not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def write(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.path:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")


def plot_loss_curve(history: list[dict[str, Any]], path: str | Path) -> bool:
    """Write a loss-curve PNG (train and eval loss vs step); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="dev loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (weighted cross-entropy)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True

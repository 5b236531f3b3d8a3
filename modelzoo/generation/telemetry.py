"""Generation telemetry, as the accelerator reports it: time to first token, per-token latency, tokens/s.

One :class:`BatchTimes` per batch (prefill, then one entry per decode step); :class:`Telemetry`
aggregates them for the JSON output and the one-line stderr summary. Times are wall-clock seconds
taken after the device has finished the step (the tokens are on the host by then).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BatchTimes:
    """Timings of one batch. ``ttft_s``: start of prefill to first tokens chosen; ``step_s``: each
    decode step (one new token per running sequence); ``new_tokens``: tokens kept (EOS excluded), of
    which ``decode_tokens`` came from decode steps."""

    batch_size: int
    prompt_tokens: int
    ttft_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    new_tokens: int = 0
    decode_tokens: int = 0

    @property
    def total_s(self) -> float:
        return self.ttft_s + sum(self.step_s)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


@dataclass
class Telemetry:
    """Aggregate over the batches of a run."""

    batches: list[BatchTimes] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Numbers for ``--output-json`` (milliseconds and tokens/s)."""
        steps = [s for b in self.batches for s in b.step_s]
        total = sum(b.total_s for b in self.batches)
        new = sum(b.new_tokens for b in self.batches)
        decode_time = sum(steps)
        decode_tokens = sum(b.decode_tokens for b in self.batches)
        return {
            "batches": len(self.batches),
            "prompt_tokens": sum(b.prompt_tokens for b in self.batches),
            "new_tokens": new,
            "time_to_first_token_ms": 1e3 * statistics.fmean(b.ttft_s for b in self.batches) if self.batches else None,
            "per_token_latency_ms": {
                "mean": 1e3 * statistics.fmean(steps) if steps else None,
                "p50": 1e3 * _percentile(steps, 0.5) if steps else None,
                "p90": 1e3 * _percentile(steps, 0.9) if steps else None,
            },
            "tokens_per_s": new / total if total > 0 else None,
            "decode_tokens_per_s": decode_tokens / decode_time if decode_time > 0 else None,
            "total_s": total,
        }

    def line(self) -> str:
        """One human-readable line for stderr."""
        s = self.summary()
        if not self.batches:
            return "telemetry: nothing generated"
        lat = s["per_token_latency_ms"]
        per_token = (f"per-token {lat['mean']:.2f} ms (p50 {lat['p50']:.2f}, p90 {lat['p90']:.2f})"
                     if lat["mean"] is not None else "per-token n/a")
        return (f"telemetry: time to first token {s['time_to_first_token_ms']:.1f} ms | {per_token} | "
                f"{s['tokens_per_s']:.1f} tokens/s | {s['new_tokens']} new tokens from {s['prompt_tokens']} "
                f"prompt tokens in {s['total_s']:.2f} s")

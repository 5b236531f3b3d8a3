"""The options every command that runs a model shares (``modelzoo-serve``, ``modelzoo-eval``; the
choices for ``modelzoo-generate``): which weights, adapter and tokenizer, how they run."""

from __future__ import annotations

import argparse

BACKENDS = ("cpu", "inductor", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE = ("none", "int8")


def add_model_options(p: argparse.ArgumentParser, *, backend_help: str, n_chips_help: str) -> None:
    """``--checkpoint --adapter --tokenizer --backend --dtype --quantize --n-chips`` (resolved by
    :func:`modelzoo.generation.source.resolve_model_source`)."""
    p.add_argument("--checkpoint", required=True,
                   help="HF checkpoint dir (float or pre-quantized int8), a training run's dir (its newest "
                        "checkpoint; a LoRA run's: its base + adapter), or a preset name (random weights)")
    p.add_argument("--adapter", metavar="DIR", help="peft LoRA/DoRA adapter dir to run on the base, unmerged")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer dir (default: the adapter's, else the checkpoint's)")
    p.add_argument("--backend", choices=BACKENDS, default="cpu", help=f"{backend_help} (default: %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and compute (default: %(default)s)")
    p.add_argument("--quantize", choices=QUANTIZE, default="none", help="int8: weight-only, per output channel "
                   "(default: %(default)s)")
    p.add_argument("--n-chips", type=int, default=1, help=f"{n_chips_help} (default: %(default)s)")

"""Training-step throughput: modelzoo (patched, packed-article batches) vs stock transformers.

Same model (``llama_60m``, ~60M parameters), same weights, same batch (4 x 512 tokens), AdamW,
same dtype, one process, one run. Prints tokens/s for both, the ratio, and MFU against a matmul
peak measured in the same run. FLOPs per token: see ``modelzoo.training.metrics.flops_per_token``
(6*N_nonembed + 12*L*H*S + 6*H*V).

    python benchmarks/bench_training.py [--steps 6] [--warmup 1] [--dtypes float32 bfloat16] [--inductor]
                                        [--prompt-loss-weight 0.0]

MFU counts the formula's FLOPs for every token (model FLOPs), for both sides, so the LM-head work
ours skips at weight-0 targets shows up as a higher MFU.

"ours" is the step the trainer runs: packed-article attention, per-article positions, the weighted
loss of the data contract, with the LM head and cross-entropy only at targets of nonzero weight
(prompt targets have weight 0 by default; ~1/4 of the targets in these batches). "stock" is
``model(input_ids, labels=input_ids)``: plain causal attention, loss on every target.

"bfloat16" runs both models under ``torch.autocast(bfloat16)`` with fp32 master weights.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import LlamaForCausalLM

from modelzoo.models.llama import from_pretrained, get_preset, patch_llama
from modelzoo.training.metrics import flops_per_token, measure_matmul_peak


def packed_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows of packed articles (~100 tokens each: 1/4 prompt, completion, separator)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    types = torch.ones_like(ids)
    for row in range(batch):
        pos = 0
        while pos < seq:
            n = int(torch.randint(60, 140, (1,), generator=gen))
            end = min(pos + n, seq)
            types[row, pos:pos + n // 4] = 0
            types[row, end - 1] = 3
            pos = end
    return {"input_ids": ids, "token_type_ids": types}


def time_interleaved(steps: dict, rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of each callable, measured in alternating order round by round, so
    that load from other processes on a shared machine hits both sides alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def make_step(model, batch, autocast_dtype, ours: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step():
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if ours:
                loss = model(**batch, return_logits=False).loss  # the trainer's call
            else:
                loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--inductor", action="store_true",
                        help="also time the patched model under torch.compile (backend=inductor)")
    parser.add_argument("--prompt-loss-weight", type=float, default=0.0,
                        help="weight of prompt targets (training.prompt_loss_weight); > 0 makes ours "
                             "run the LM head at every target, like stock")
    args = parser.parse_args()
    settings = {"prompt_loss_weight": args.prompt_loss_weight}

    config = get_preset("llama_60m")
    torch.manual_seed(0)
    base = from_pretrained("llama_60m", seed=0, patch=False)
    n_params = sum(p.numel() for p in base.parameters())
    batch = packed_batch(args.batch, args.seq, config.vocab_size)
    tokens = args.batch * args.seq
    fpt = flops_per_token(config, args.seq)
    print(f"model llama_60m: {n_params / 1e6:.1f}M params; batch {args.batch}x{args.seq}; "
          f"{fpt / 1e6:.0f} MFLOP/token; prompt_loss_weight {args.prompt_loss_weight}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for dtype_name in args.dtypes:
        autocast = None if dtype_name == "float32" else getattr(torch, dtype_name)
        peak = measure_matmul_peak(autocast or torch.float32, seconds=1.0)
        stock: LlamaForCausalLM = copy.deepcopy(base).train()
        ours = patch_llama(copy.deepcopy(base), settings).train()
        steps = {"stock": make_step(stock, batch, autocast, ours=False),
                 "ours": make_step(ours, batch, autocast, ours=True)}
        if args.inductor:
            compiled = patch_llama(copy.deepcopy(base), settings).train()
            compiled.model.compile(dynamic=False)  # as the trainer does for backend=inductor
            steps["ours+inductor"] = make_step(compiled, batch, autocast, ours=True)
        timed = time_interleaved(steps, args.steps, args.warmup)
        tps = {name: tokens / t for name, t in timed.items()}
        cells = " | ".join(f"{name} {v:,.0f} tok/s (MFU {v * fpt / peak:.1%})" for name, v in tps.items())
        ratios = " | ".join(f"ratio {name}/HF {v / tps['stock']:.3f}" for name, v in tps.items() if name != "stock")
        print(f"{dtype_name:>8}: matmul peak {peak / 1e9:.1f} GFLOP/s | {cells} | {ratios}")


if __name__ == "__main__":
    main()

"""LoRA fine-tuning step: modelzoo's adapter vs stock transformers + peft, and vs our full fine-tune.

Same model (``llama_60m``, ~60M parameters), same base weights, same batch (4 x 512 tokens of packed
articles, ``bench_training.packed_batch``), AdamW on the trainable parameters, one process, one run.
Three sides, timed in alternating order (``bench_training.time_interleaved``, median step):

- ``hf+peft lora``: stock ``transformers.LlamaForCausalLM`` wrapped by ``peft.get_peft_model`` with
  ``LoraConfig(r=16, lora_alpha=32, lora_dropout=0)`` on the seven projections, called as
  ``model(input_ids=ids, labels=ids)``: causal attention, loss on every target;
- ``ours lora``: ``modelzoo.models.llama.from_pretrained`` (the patched model) with
  ``modelzoo.peft.add_adapter`` of the same adapter (``peft.method: lora, r: 16, alpha: 32``),
  called as the trainer does, ``model(**batch, return_logits=False)``: packed-article attention,
  the weighted loss, the LM head only at targets of nonzero weight (prompt targets weigh 0: ~1/4);
- ``ours full``: the same patched model with every weight trained (what ``peft.method: none`` runs).

Both adapters are peft's own LoRA layers (ours injects them with ``peft.inject_adapter_in_model``);
the differences are the model around them and the loss path.

``float32``: every weight in fp32. ``bfloat16``: the frozen base in bf16 (what ``model.dtype:
bfloat16`` trains), no autocast, and on both sides a float32 adapter: ``get_peft_model`` upcasts it
by default (``autocast_adapter_dtype=True``), ``add_adapter`` does the same; peft then casts each
adapted projection's input to float32. On a CPU without native bf16 matmuls (AVX512-BF16/AMX)
bf16 runs far slower than fp32; use a small ``--batch``/``--seq`` there.

Peak memory: on CPU nothing counts device memory, so it is the peak of live tensor bytes during one
optimizer step (``modelzoo.training.memory.LiveTensorBytes``: every storage the step's aten ops
create, plus the resident parameters, gradients and optimizer state: ``resident_tensors``), taken
on the second step, when the optimizer state exists; the same count ``measure_train_step`` makes
of the trainer's step.

    python benchmarks/bench_peft.py [--steps 3] [--warmup 0] [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import gc
import warnings

import torch
from bench_training import packed_batch, time_interleaved

from modelzoo.config import LORA_TARGETS, PeftConfig
from modelzoo.models.llama import from_pretrained
from modelzoo.peft import add_adapter, lora_config
from modelzoo.training.memory import LiveTensorBytes, resident_tensors

MIB = 2**20


def make_step(model, batch, ours: bool):
    """One optimizer step of ``model`` (AdamW over its trainable parameters) and that optimizer."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.1)

    def step():
        if ours:
            loss = model(**batch, return_logits=False, use_cache=False).loss  # the trainer's call
        else:
            loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, opt


def peak_bytes(step, model, opt) -> int:
    """Peak live tensor bytes of one step (resident parameters, gradients and optimizer state included),
    after one unmeasured step that creates the optimizer state."""
    step()
    gc.collect()
    with LiveTensorBytes() as tracker:
        tracker.track(resident_tensors(model, opt))
        step()
    return tracker.peak


def build_sides(model_name: str, dtype: str, r: int, alpha: float):
    from peft import LoraConfig, get_peft_model

    stock = from_pretrained(model_name, seed=0, dtype=dtype, patch=False).train()
    hf = get_peft_model(stock, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                                          task_type="CAUSAL_LM"))
    ours = from_pretrained(model_name, seed=0, dtype=dtype).train()
    add_adapter(ours, lora_config(PeftConfig(method="lora", r=r, alpha=alpha), None), seed=0)
    full = from_pretrained(model_name, seed=0, dtype=dtype).train()
    base_weight = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(stock.get_parameter(base_weight.replace("q_proj.", "q_proj.base_layer.")),
                       full.get_parameter(base_weight)), "the sides must start from the same base weights"
    return {"hf+peft lora": (hf, False), "ours lora": (ours, True), "ours full": (full, True)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (median)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="untimed steps per side before timing (the two memory steps run first anyway)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--model", default="llama_60m", help="preset (tests use llama_tiny)")
    args = parser.parse_args(argv)
    import peft

    # stock peft still reads a deprecated transformers attribute in get_peft_model: only that is silenced
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

    probe = from_pretrained(args.model, seed=0, device="meta", patch=False)
    batch = packed_batch(args.batch, args.seq, probe.config.vocab_size)
    tokens = args.batch * args.seq
    print(f"model {args.model}: {sum(p.numel() for p in probe.parameters()) / 1e6:.1f}M params; LoRA r={args.r} "
          f"alpha={args.alpha:g} on {len(LORA_TARGETS)} projections; batch {args.batch}x{args.seq}; AdamW; "
          f"torch {torch.__version__}, peft {peft.__version__}, {torch.get_num_threads()} threads", flush=True)
    for dtype in args.dtypes:
        sides = build_sides(args.model, dtype, args.r, args.alpha)
        steps, peaks, trainable = {}, {}, {}
        for name, (model, ours) in sides.items():
            step, opt = make_step(model, batch, ours)
            peaks[name] = peak_bytes(step, model, opt)
            steps[name] = step
            trainable[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable["hf+peft lora"] == trainable["ours lora"], trainable
        adapter_dtypes = {name: {p.dtype for n, p in model.named_parameters() if ".lora_" in n}
                          for name, (model, _) in sides.items() if "lora" in name}
        assert adapter_dtypes["hf+peft lora"] == adapter_dtypes["ours lora"] == {torch.float32}, adapter_dtypes
        tps = {name: tokens / t for name, t in time_interleaved(steps, args.steps, args.warmup).items()}
        hf, ours, full = "hf+peft lora", "ours lora", "ours full"
        print(f"{dtype:<8} {hf}: {tps[hf]:,.0f} tok/s, peak {peaks[hf] / MIB:,.0f} MiB | "
              f"{ours}: {tps[ours]:,.0f} tok/s, peak {peaks[ours] / MIB:,.0f} MiB "
              f"({tps[ours] / tps[hf]:.2f}x tok/s, {peaks[ours] / peaks[hf]:.2f}x memory) | "
              f"{full}: {tps[full]:,.0f} tok/s, peak {peaks[full] / MIB:,.0f} MiB "
              f"(lora/full memory {peaks[ours] / peaks[full]:.2f}x, tok/s {tps[ours] / tps[full]:.2f}x)", flush=True)
        del sides, steps
        gc.collect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

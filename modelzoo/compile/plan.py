"""The compile plan: parallel layout and per-chip memory estimate, written at compile, read at run.

``command=compile`` builds the model on the meta device (nothing is allocated), applies the TP
layout to every parameter's shape, estimates per-chip bytes and writes ``compile_plan.json`` to
``samba_compile.output_folder``. ``command=run`` reads it back and refuses to run when a setting
that changes the compiled graph differs (``recompile_settings``).

Memory model (bytes per chip), for the trainer's eager step (``modelzoo.training``); each term
was counted from what the ops keep for backward and is held against a measured peak by
``benchmarks/bench_memory.py`` (``modelzoo.training.memory``) and ``tests/test_memory_plan.py``:

- weights: parameters on the chip x dtype size (with ``training.fsdp`` divided by
  ``data_parallel.world_size``, plus one block's parameters all-gathered at a time);
- grads: same as weights (alive from the first backward to the optimizer step);
- optimizer: AdamW's two moments (8 B/param in fp32; 4 more for an fp32 master copy when the model
  dtype is not fp32); with ``training.fsdp`` divided by ``data_parallel.world_size``;
- activations saved for backward, with ``T = batch_size * max_seq_length`` tokens, ``d`` the dtype
  size, ``t`` = n_chips, ``I`` the FFN width, ``kv`` the KV width:
  a decoder block keeps ``T*d*(7*h/t' + (2*h + 2*kv + 4*I)/t)`` (``t' = t`` with
  ``samba_compile.sequence_parallel``, else 1: norms' inputs and outputs and the residual stream
  are replicated, the attention and MLP intermediates sharded); a recomputed block
  (``training.recompute``: all blocks for ``full``, every second for ``selective``) keeps only its
  input ``T*h*d/t'``; outside the blocks the embedding output and final norm ``3*T*h*d`` and the
  fp32 logits of the loss targets ``N*V*4`` (``N = batch_size * (max_seq_length - 1)``: the plan
  assumes every target carries loss, as in pretraining text; prompt targets at weight 0 skip the
  LM head, so SFT data needs less);
- temporaries: the step's peak is the largest of (a) the saved activations plus the loss
  backward's two fp32 ``N x V`` buffers (the logits' gradient and softmax), plus the gradients
  already accumulated when ``grad_accum_steps > 1``; (b) during backward, with recompute, the kept
  block inputs, the gradients and two blocks' activations (one recomputed, one being
  differentiated); (c) the gradients alone (the optimizer step). ``temporaries`` is that peak
  minus the saved activations (so it holds the gradients alive at the peak);
  ``total = weights + optimizer + activations + temporaries`` (``grads`` is shown on its own but
  counted inside the peak, since gradients and saved activations do not peak together).

With ``peft.method`` lora or dora (a frozen base plus low-rank adapters, ``modelzoo.peft``) only
the adapter and ``peft.modules_to_save`` train (:func:`adapter_params`):

- weights: the frozen base as above, plus the adapter (``A``: r x in, ``B``: out x r per adapted
  projection, DoRA's magnitude: out) in float32 whatever the model dtype (``add_adapter`` upcasts
  it on a bf16/fp16 base, as peft's PeftModel does: :data:`ADAPTER_BYTES`); with
  ``peft.quantize_base=int8`` the adapted projections' frozen weights take 1 byte each plus a
  float32 scale per output row (buffers: not divided under FSDP). Under TP the adapter is split by
  ``LORA_TP_PLAN`` (``models/llama/parallelize.py``): on a column-parallel projection
  (q, k, v, gate, up) ``B`` is split over the chips and ``A`` replicated; on a row-parallel one
  (o, down) ``A`` is split and ``B`` replicated;
- grads and optimizer: of the trainable parameters only, divided by ``data_parallel.world_size``
  under ``training.fsdp``: the adapter's in float32 (4 B/param, AdamW's moments 8 B/param) and
  those of ``modules_to_save`` as for full fine-tuning;
- activations: full fine-tuning's, less what autograd keeps only for the gradient of a frozen
  weight, plus what the adapter path keeps, per token and decoder block on a chip: less the
  normalized inputs of the two RMSNorms (``2*h/t'``); less the input of a projection group that no
  adapter reads (``h/t'`` for q/k/v, ``h/t'`` for gate/up, ``I/t`` for down; the attention output,
  o_proj's input, stays saved by attention's own backward); plus ``r`` per adapted projection
  (``A``'s output, ``B``'s input); with ``peft.dropout > 0`` each adapter reads its own dropped-out
  copy of the input, kept with its mask (``2 * in`` values: eager CPU dropout keeps a mask of the
  input's dtype), and the shared input itself is no longer kept; so does a float32 adapter on a
  bf16 base, whose input peft casts to float32 per projection (``in`` float32 values); DoRA keeps two ``out``-wide
  tensors more (the base output and ``B A x``, both inputs of the magnitude's product; the
  weight-shaped temporaries of its norm are not counted). Outside the blocks the final norm's
  normalized input and the LM head's input go too (unless ``modules_to_save`` trains them). An
  int8 base is dequantized into the activation dtype inside each matmul and autograd keeps that
  float copy for the input's gradient, so a block that is not recomputed keeps its adapted
  projections' float weights (``int8`` saves memory between steps and in recomputed blocks,
  not in the saved activations of the others). With
  recompute the backward of a block peaks at that block's saved activations plus two FFN-wide
  gradient temporaries (measured) instead of two blocks. Measured against the trainer's step
  (``tests/test_peft_plan.py``; ``llama2_tiny`` / ``llama3_tiny`` / ``llama3_2_tiny``, hidden 64
  and 256, fp32 and bf16, LoRA / DoRA / dropout / int8 base / subsets of targets / modules_to_save
  / recompute none, selective, full) the prediction is within 8% of the measured peak. The adapter's own term is small: at r=16 its
  ``7 * r = 112`` values per token are 0.15% of the 74K a Llama-2 70B block keeps per token at
  n_chips=8, less than freezing the base saves (``2*h`` = 16K).

Per-chip capacity assumptions (``samba_compile.chip_memory_gib`` overrides them):
:data:`ARCH_MEMORY_GIB`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from modelzoo.checkpoint.atomic import replace_file
from modelzoo.checkpoint.json_file import read_json
from modelzoo.config import RunConfig, config_to_dict

PLAN_FILE = "compile_plan.json"
PLAN_VERSION = 1
GIB = 1024**3
#: Memory a plan may budget per chip, by arch (assumption: all tiers the runtime can place
#: weights and state in). SN30: 1 TiB DDR per RDU. SN40L: 64 GiB HBM + 1.5 TiB DDR per RDU.
ARCH_MEMORY_GIB = {"sn30": 1024.0, "sn40l": 64.0 + 1536.0}
#: Fast-tier (HBM) capacity, reported for information: weights that fit there stream fastest.
ARCH_HBM_GIB = {"sn30": 0.0, "sn40l": 64.0}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: an adapter is float32 on any base (``modelzoo.peft.add_adapter`` upcasts it on a bf16/fp16 base,
#: as peft's PeftModel does), and so are its gradients and AdamW moments
ADAPTER_BYTES = 4


class PlanError(RuntimeError):
    """A plan that cannot fit or does not match the run; the message says which knob to turn."""


def recompile_settings(cfg: RunConfig, arch_fields: dict[str, Any]) -> dict[str, Any]:
    """Everything that changes the compiled graph: a run with other values needs a new compile."""
    model = cfg.model
    settings = {
        "architecture": arch_fields,
        "dtype": model.dtype,
        "patches": model.patches,
        "precision": {k: getattr(model, k) for k in ("fp32_ln", "fp32_logits", "fp32_skip_add", "mixedp_attn")},
        "article_attention": model.article_attention,
        "batch_size": cfg.training.batch_size,
        "max_seq_length": cfg.training.max_seq_length,
        "samba_compile": {k: v for k, v in config_to_dict(cfg.samba_compile).items() if k != "output_folder"},
        "fsdp": cfg.training.fsdp,
        "recompute": cfg.training.recompute,
        "mixed_precision": cfg.training.mixed_precision,
    }
    if cfg.peft.method != "none":  # the adapter's ops and the trainable set are in the graph
        settings["peft"] = config_to_dict(cfg.peft)
    return settings


def _arch_fields(config) -> dict[str, Any]:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps")
    fields = {k: getattr(config, k) for k in keys}
    fields["rope_parameters"] = dict(config.rope_parameters or {})
    return fields


def _memory(cfg: RunConfig, config, n_chips: int, per_chip_params: int, block_params: int,
            adapter: dict[str, int] | None = None) -> dict[str, int]:
    """Per-chip bytes by kind (the model in the module doc); ``total`` is the step's peak. With
    ``adapter`` (:func:`adapter_params`) only the adapter trains; None is full fine-tuning."""
    from modelzoo.models.llama.parallelize import recomputed_blocks

    d = DTYPE_BYTES[cfg.model.dtype]
    t = n_chips
    world = cfg.data_parallel.world_size
    fsdp = cfg.training.fsdp and world > 1
    state_divisor = world if fsdp else 1
    optimizer_per_param = 8 + (0 if cfg.model.dtype == "float32" else 4)
    b, s = cfg.training.batch_size, cfg.training.max_seq_length
    h, inter, layers, vocab = (config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                               config.vocab_size)
    kv = config.num_key_value_heads * config.head_dim
    tokens, targets = b * s, b * (s - 1)
    t_seq = t if cfg.samba_compile.sequence_parallel else 1
    block = tokens * d * (7 * h / t_seq + (2 * h + 2 * kv + 4 * inter) / t)
    outside = 3 * tokens * h * d
    block_input = tokens * h * d / t_seq
    recomputed = len(recomputed_blocks(layers, cfg.training.recompute))
    logits = targets * vocab * 4
    if adapter is None:
        weights = per_chip_params * d // state_divisor + (block_params * d if fsdp else 0)
        grads = per_chip_params * d // state_divisor
        optimizer = per_chip_params * optimizer_per_param // state_divisor
        backward = 2 * block  # (b): one block recomputed, one being differentiated
    else:
        a = ADAPTER_BYTES
        block_delta, outside_delta = _adapter_activations(cfg, config, t, t_seq)
        # int8 base weights are dequantized into the activation dtype inside each matmul, and
        # autograd keeps that float copy for the input's gradient: a block keeps its projections'
        # float weights (the int8 base saves memory between steps and in recomputed blocks only)
        block += tokens * block_delta + adapter["int8_block_per_chip"] * d
        outside += tokens * outside_delta
        added, int8 = adapter["added_per_chip"], adapter["int8_per_chip"]
        full_trained = adapter["trainable_per_chip"] - added  # modules_to_save, in the model dtype
        gathered = (block_params - adapter["int8_block_per_chip"]) * d + adapter["added_block_per_chip"] * a
        # int8 weights are buffers, which FSDP does not shard
        weights = (((per_chip_params - int8) * d + added * a) // state_divisor + int8
                   + adapter["int8_scales_per_chip"] * 4 + (gathered if fsdp else 0))
        grads = (added * a + full_trained * d) // state_divisor
        optimizer = (added * 8 + full_trained * optimizer_per_param) // state_divisor  # fp32 moments
        # (b): the backward of a recomputed adapted block peaks about two FFN-wide float tensors
        # above that block's saved activations (measured: the gradients of B's scaled outputs on
        # gate and up), its weight gradients being tiny
        backward = block + 2 * tokens * inter * a / t
    saved = (layers - recomputed) * block + recomputed * block_input + outside + logits
    accumulated = grads if cfg.training.grad_accum_steps > 1 else 0
    peak = max(saved + 2 * logits + accumulated,
               recomputed * block_input + grads + backward if recomputed else 0,
               grads)
    return {
        "weights": int(weights), "grads": int(grads), "optimizer": int(optimizer),
        "activations": int(saved), "temporaries": int(peak - saved), "total": int(weights + optimizer + peak),
    }


def _adapter_activations(cfg: RunConfig, config, t: int, t_seq: int) -> tuple[float, float]:
    """Bytes per token by which an adapter run's saved activations differ from full fine-tuning's
    on a chip: ``(per decoder block, outside the blocks)`` (the module doc's list)."""
    peft = cfg.peft
    d, a = DTYPE_BYTES[cfg.model.dtype], ADAPTER_BYTES
    cast = a != d  # peft casts each adapted projection's input to the adapter's dtype: its own copy
    h, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * config.head_dim
    targets, save = set(peft.target_modules), set(peft.modules_to_save)
    # per projection: (input group, width of A's input on a chip, width of the output on a chip)
    projections = {"q_proj": ("attn", h, h / t), "k_proj": ("attn", h, kv / t), "v_proj": ("attn", h, kv / t),
                   "o_proj": ("o", h / t, h), "gate_proj": ("mlp", h, inter / t), "up_proj": ("mlp", h, inter / t),
                   "down_proj": ("down", inter / t, h)}
    # inputs that full fine-tuning keeps only for the weight gradients of their projections (the
    # attention output stays saved by attention's own backward)
    group_input = {"attn": h / t_seq, "mlp": h / t_seq, "down": inter / t}
    block = -2 * h / t_seq * d  # the two RMSNorm weights are frozen: their normalized inputs go
    for group, width in group_input.items():
        adapted = [p for p, (g, _, _) in projections.items() if g == group and p in targets]
        if not adapted or peft.dropout > 0 or cast:  # no adapter reads it, or each reads its own copy
            block -= width * d
    for name, (_, a_in, out) in projections.items():
        if name not in targets:
            continue
        block += peft.r * a  # A's output, B's input
        if peft.dropout > 0:
            block += 2 * a_in * a  # the dropped-out input (A's input) and the mask (a float mask on CPU)
        elif cast:
            block += a_in * a  # the input cast to the adapter's dtype (A's input)
        if peft.method == "dora":
            block += 2 * out * a  # the base output and B A x, both kept for the magnitude's gradient
    outside = 0.0
    if "norm" not in save:
        outside -= h * d  # the final norm's normalized input (for its weight)
    if "lm_head" not in save and not (config.tie_word_embeddings and "embed_tokens" in save):
        outside -= h * d  # the LM head's input (for its weight)
    return block, outside


def _split_like_weight(style: str, factor: str) -> bool:
    """Whether LORA_TP_PLAN splits adapter factor ``lora_A`` / ``lora_B`` of a ``style`` projection
    along the dimension its weight is split on (else the factor is replicated)."""
    import fnmatch

    from modelzoo.models.llama.parallelize import LORA_TP_PLAN, REPLICATE

    return any(fnmatch.fnmatchcase(f"{factor}.default", pattern) and part_style != REPLICATE
               for pattern, part_style in LORA_TP_PLAN.get(style, {}).items())


def adapter_params(cfg: RunConfig, model, layout) -> dict[str, int]:
    """Parameter counts of ``cfg.peft``'s adapter on ``model`` (built on the meta device, unpatched,
    no adapter yet), in full and on chip 0 of ``layout``.

    The same parameters ``modelzoo.peft.add_adapter`` adds and leaves trainable, counted from the
    projections' shapes: per adapted ``[out, in]`` projection ``A`` r x in and ``B`` out x r (DoRA:
    a magnitude of size out), and every parameter of the ``peft.modules_to_save`` modules.
    """
    from modelzoo.models.llama.parallelize import shard_tensor, style_of

    peft = cfg.peft
    r, targets, save = peft.r, set(peft.target_modules), set(peft.modules_to_save)
    head_dim = model.config.head_dim
    int8 = peft.quantize_base == "int8"
    out = {"params": 0, "trainable_params": 0, "added_per_chip": 0, "trainable_per_chip": 0,
           "added_block_per_chip": 0, "int8_per_chip": 0, "int8_block_per_chip": 0, "int8_scales_per_chip": 0}
    for name, param in model.named_parameters():
        module = name.rsplit(".", 1)[0].split(".")[-1]
        local = shard_tensor(name, param, layout, rank=0, head_dim=head_dim)
        if module in save:  # trained in full, in place (its weight is already the base's)
            out["trainable_params"] += param.numel()
            out["trainable_per_chip"] += local.numel()
        if module not in targets or not name.endswith(".weight") or param.dim() != 2:
            continue
        (full_out, full_in), (local_out, local_in) = param.shape, local.shape
        style = style_of(name, layout)
        a_in = local_in if _split_like_weight(style, "lora_A") else full_in
        b_out = local_out if _split_like_weight(style, "lora_B") else full_out
        magnitude = b_out if peft.method == "dora" else 0  # one per output row, split like B
        full_count = r * (full_in + full_out) + (full_out if peft.method == "dora" else 0)
        chip_count = r * (a_in + b_out) + magnitude
        out["params"] += full_count
        out["trainable_params"] += full_count
        out["added_per_chip"] += chip_count
        out["trainable_per_chip"] += chip_count
        if int8:  # the frozen projection held int8, one float32 scale per output row
            out["int8_per_chip"] += local.numel()
            out["int8_scales_per_chip"] += local_out
        if name.startswith("model.layers.0."):
            out["added_block_per_chip"] += chip_count
            out["int8_block_per_chip"] += local.numel() if int8 else 0
    return out


def memory_per_chip(cfg: RunConfig) -> dict[str, int]:
    """Per-chip bytes of ``cfg``'s plan by kind (never raises PlanError; see :func:`build_plan`).
    With ``peft.method`` lora/dora these are the adapter run's; :func:`full_memory_per_chip` gives
    full fine-tuning's for the same chips."""
    return _analyse(cfg)["memory"]


def full_memory_per_chip(cfg: RunConfig) -> dict[str, int]:
    """Per-chip bytes of full fine-tuning (``peft.method=none``) at ``cfg``'s other settings."""
    return _analyse(cfg)["full_memory"]


def _analyse(cfg: RunConfig) -> dict[str, Any]:
    from modelzoo.models.llama import from_pretrained
    from modelzoo.models.llama.parallelize import REPLICATE, shard_tensor, style_of, tp_layout

    model = from_pretrained(cfg.model.name_or_path, device="meta", overrides=cfg.model.overrides,
                            dtype=cfg.model.dtype, patch=False)
    config = model.config
    n_chips = cfg.samba_compile.n_chips
    layout = tp_layout(config, n_chips)
    shard_shapes: dict[str, dict[str, Any]] = {}
    per_chip_params = total_params = embedding_params = block_params = 0
    for name, param in model.named_parameters():  # tied weights appear once
        local = shard_tensor(name, param, layout, rank=0, head_dim=config.head_dim)
        total_params += param.numel()
        per_chip_params += local.numel()
        if name.startswith("model.layers.0."):
            block_params += local.numel()
        if "embed_tokens" in name or name.startswith("lm_head"):
            embedding_params += param.numel()
        pattern = re.sub(r"\.\d+\.", ".*.", name)
        shard_shapes.setdefault(pattern, {"full": list(param.shape), "per_chip": list(local.shape),
                                          "style": style_of(name, layout) if local.shape != param.shape
                                          else REPLICATE})
    full = _memory(cfg, config, n_chips, per_chip_params, block_params)
    adapter = adapter_params(cfg, model, layout) if cfg.peft.method != "none" else None
    memory = full if adapter is None else _memory(cfg, config, n_chips, per_chip_params, block_params, adapter)
    return {"config": config, "layout": layout, "shard_shapes": shard_shapes, "total_params": total_params,
            "embedding_params": embedding_params, "per_chip_params": per_chip_params, "adapter": adapter,
            "memory": memory, "full_memory": full}


def _gib(memory: dict[str, int]) -> dict[str, float]:
    return {k: round(v / GIB, 3) for k, v in memory.items()}


def _budget_gib(cfg: RunConfig) -> float:
    return cfg.samba_compile.chip_memory_gib or ARCH_MEMORY_GIB[cfg.samba_compile.arch]


def _budget_source(cfg: RunConfig) -> str:
    """Where the per-chip budget comes from, in words."""
    if cfg.samba_compile.chip_memory_gib:
        return f"samba_compile.chip_memory_gib={cfg.samba_compile.chip_memory_gib:g}"
    arch = cfg.samba_compile.arch
    hbm = ARCH_HBM_GIB[arch]
    tiers = f"{hbm:g} GiB HBM + {ARCH_MEMORY_GIB[arch] - hbm:g} GiB DDR" if hbm else f"{ARCH_MEMORY_GIB[arch]:g} GiB DDR"
    return f"samba_compile.arch={arch}: {tiers}"


def _budget_knob(cfg: RunConfig) -> str:
    return "chip_memory_gib" if cfg.samba_compile.chip_memory_gib else "arch"


def peft_note(cfg: RunConfig, memory: dict[str, int], full: dict[str, int]) -> str:
    """One line comparing an adapter run's per-chip peak with full fine-tuning's on the same chips."""
    budget = _budget_gib(cfg) * GIB
    n = cfg.samba_compile.n_chips
    method = f"peft.method={cfg.peft.method}"
    lora = f"{method} needs {memory['total'] / GIB:.1f} GiB and {'fits' if memory['total'] <= budget else 'does not fit'}"
    if full["total"] > budget:
        return (f"full fine-tuning needs {full['total'] / GIB:.1f} GiB > {budget / GIB:.0f} GiB per chip at "
                f"n_chips={n}; {lora}")
    return f"full fine-tuning needs {full['total'] / GIB:.1f} GiB <= {budget / GIB:.0f} GiB per chip at n_chips={n} " \
           f"and fits too; {lora}"


def build_plan(cfg: RunConfig) -> dict[str, Any]:
    """The compile plan for ``cfg`` (a dict, JSON-ready); raises PlanError when it cannot fit."""
    info = _analyse(cfg)
    config, layout, memory, full = info["config"], info["layout"], info["memory"], info["full_memory"]
    world = cfg.data_parallel.world_size
    total_params, per_chip_params = info["total_params"], info["per_chip_params"]
    budget_gib = _budget_gib(cfg)
    adapter = info["adapter"]
    plan = {
        "version": PLAN_VERSION,
        "model": {"name_or_path": cfg.model.name_or_path, "total_params": total_params,
                  "non_embedding_params": total_params - info["embedding_params"], **_arch_fields(config)},
        "layout": {**asdict(layout), "world_size": world, "processes": layout.n_chips * world,
                   "lm_head_style": layout.lm_head_style},
        "per_chip": {"params": per_chip_params, "bytes": memory, "gib": _gib(memory),
                     "budget_gib": budget_gib, "fits": memory["total"] <= budget_gib * GIB,
                     "budget_source": _budget_source(cfg),
                     "weights_fit_hbm": memory["weights"] <= ARCH_HBM_GIB[cfg.samba_compile.arch] * GIB},
        "shard_shapes": info["shard_shapes"],
        "recompile_settings": recompile_settings(cfg, _arch_fields(config)),
    }
    if adapter is not None:
        plan["peft"] = {
            "method": cfg.peft.method, "r": cfg.peft.r, "target_modules": list(cfg.peft.target_modules),
            "modules_to_save": list(cfg.peft.modules_to_save), "quantize_base": cfg.peft.quantize_base,
            "adapter_params": adapter["params"], "trainable_params": adapter["trainable_params"],
            "trainable_params_per_chip": adapter["trainable_per_chip"],
            "full_finetune": {"bytes": full, "gib": _gib(full), "fits": full["total"] <= budget_gib * GIB},
            "note": peft_note(cfg, memory, full),
        }
    if not plan["per_chip"]["fits"]:
        gib = plan["per_chip"]["gib"]
        what = f"the {cfg.peft.method} plan" if adapter is not None else "the plan"
        raise PlanError(
            f"{what} needs {gib['total']:.1f} GiB per chip (weights {gib['weights']:.1f}, optimizer "
            f"{gib['optimizer']:.1f}, activations {gib['activations']:.1f}, temporaries incl. grads "
            f"{gib['temporaries']:.1f}) but samba_compile.{_budget_knob(cfg)} allows {budget_gib:.0f} GiB; "
            f"{_advice(cfg, memory, layout)}")
    return plan


def _advice(cfg: RunConfig, memory: dict[str, int], layout) -> str:
    """Which knob helps most, given where the bytes go."""
    tips = []
    state = memory["weights"] + memory["grads"] + memory["optimizer"]
    if state >= memory["activations"] + memory["temporaries"] - memory["grads"]:
        tips.append(f"raise samba_compile.n_chips (now {layout.n_chips}) to shard the weights further")
        if not cfg.training.fsdp and cfg.data_parallel.world_size > 1:
            tips.append("set training.fsdp=true to shard grads and optimizer state over data parallel")
    else:
        if cfg.training.recompute != "full":
            tips.append("set training.recompute=full to recompute activations in the backward")
        tips.append(f"lower training.batch_size (now {cfg.training.batch_size}) and raise "
                    "training.grad_accum_steps, or shorten training.max_seq_length")
        tips.append(f"raise samba_compile.n_chips (now {layout.n_chips})")
    if cfg.peft.method == "none" and not cfg.samba_compile.sequence_parallel:
        lora = _with_peft(cfg, "lora")
        need = memory_per_chip(lora)["total"]
        if need <= _budget_gib(cfg) * GIB:
            tips.append(f"train a LoRA adapter instead (peft.method=lora, r={lora.peft.r}): it needs "
                        f"{need / GIB:.1f} GiB per chip and fits")
    return "; or ".join(tips)


def _with_peft(cfg: RunConfig, method: str) -> RunConfig:
    """``cfg`` with another ``peft.method`` (its other peft settings kept)."""
    from dataclasses import replace

    return replace(cfg, peft=replace(cfg.peft, method=method))


def plan_path(cfg: RunConfig) -> Path:
    return Path(cfg.samba_compile.output_folder) / PLAN_FILE


def write_plan(plan: dict[str, Any], folder: str | Path) -> Path:
    """Write ``compile_plan.json`` atomically (temp file + rename)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path, tmp = folder / PLAN_FILE, folder / f".{PLAN_FILE}.tmp"
    tmp.write_text(json.dumps(plan, indent=2) + "\n")
    replace_file(tmp, path)
    return path


def check_plan_for_run(cfg: RunConfig) -> dict[str, Any]:
    """Read the plan of ``cfg``'s output_folder and check it matches ``cfg``; returns the plan."""
    path = plan_path(cfg)
    if not path.is_file():
        raise PlanError(f"no compile plan at {path}; run the same config with command=compile first")
    plan = read_json(path, fix="the compile plan is corrupt: re-run with command=compile", error=PlanError)
    from modelzoo.models.llama import load_llama_config

    config = load_llama_config(cfg.model.name_or_path, cfg.model.overrides)
    want = _leaves(json.loads(json.dumps(recompile_settings(cfg, _arch_fields(config)))))
    have = _leaves(plan.get("recompile_settings", {}))
    diffs = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if diffs:
        details = ", ".join(f"{k}: plan {_short(have.get(k))} vs run {_short(want.get(k))}" for k in diffs[:3])
        more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
        raise PlanError(f"{path}: the run differs from the compiled plan in {details}{more}; "
                        "re-run with command=compile, or restore the compiled settings")
    return plan


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for every non-dict value of a nested dict (so a diff names one field)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def summarize(plan: dict[str, Any]) -> str:
    """A few human-readable lines about a plan."""
    m, lay, chip = plan["model"], plan["layout"], plan["per_chip"]
    gib = chip["gib"]
    return "\n".join([
        f"model      {m['name_or_path']}: {m['total_params'] / 1e9:.2f}B params "
        f"({m['non_embedding_params'] / 1e9:.2f}B non-embedding)",
        f"layout     n_chips={lay['n_chips']} x world_size={lay['world_size']} = {lay['processes']} processes; "
        f"{lay['heads_per_chip']} heads + {lay['kv_heads_per_chip']} KV heads per chip (KV {lay['kv_mode']})",
        f"per chip   {chip['params'] / 1e9:.3f}B params; weights {gib['weights']:.2f} GiB, grads {gib['grads']:.2f}, "
        f"optimizer {gib['optimizer']:.2f}, activations {gib['activations']:.2f}, temporaries "
        f"{gib['temporaries']:.2f} = {gib['total']:.2f} GiB peak "
        f"of {chip['budget_gib']:.0f} GiB",
        _fit_line(chip),
        *([f"peft       {plan['peft']['method']} r={plan['peft']['r']}: "
           f"{plan['peft']['trainable_params_per_chip'] / 1e6:.2f}M trainable params per chip "
           f"({plan['peft']['trainable_params'] / 1e6:.2f}M in all); {plan['peft']['note']}"]
          if "peft" in plan else []),
    ])


def _fit_line(chip: dict[str, Any]) -> str:
    """Whether the step fits the budget, the headroom, where the budget comes from, and the largest part."""
    gib, budget = chip["gib"], chip["budget_gib"]
    parts = {k: gib[k] for k in ("weights", "optimizer", "activations", "temporaries")}
    largest = max(parts, key=parts.get)
    headroom = budget - gib["total"]
    source = chip.get("budget_source", f"{budget:.0f} GiB")
    return (f"fits       {'yes' if chip['fits'] else 'NO'}: headroom {headroom:.2f} GiB "
            f"({100 * headroom / budget:.0f}% of the {budget:.0f} GiB budget of {source}); largest part: "
            f"{largest} {parts[largest]:.2f} GiB ({100 * parts[largest] / gib['total']:.0f}% of the peak)"
            + ("" if chip.get("weights_fit_hbm", True) else "; the weights do not fit HBM (they stream from DDR)"))


def memory_table_markdown() -> str:
    """The model card's per-chip memory table: every shipped training config at its shipped
    settings, from :func:`memory_per_chip` (``tests/test_memory_plan.py`` holds the card to it)."""
    from modelzoo.config import load_config, shipped_configs

    lines = ["| config | model | n_chips x DP | batch x seq | recompute | weights | grads | optimizer | "
             "activations | temporaries | peak per chip (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in shipped_configs("training"):
        cfg = load_config(name)
        gib = {k: v / GIB for k, v in memory_per_chip(cfg).items()}
        t = cfg.training
        lines.append(
            f"| `{name}` | {cfg.model.name_or_path} | {cfg.samba_compile.n_chips} x {cfg.data_parallel.world_size}"
            f"{' FSDP' if t.fsdp else ''} | {t.batch_size} x {t.max_seq_length} | {t.recompute} | "
            + " | ".join(f"{gib[k]:.2f}" for k in ("weights", "grads", "optimizer", "activations", "temporaries"))
            + f" | **{gib['total']:.2f}** |")
    return "\n".join(lines) + "\n"


#: r and alpha of the LoRA column for a shipped full fine-tuning config (the shipped LoRA configs')
TABLE_LORA = {"r": 16, "alpha": 32.0}


def lora_memory_table_markdown() -> str:
    """The LoRA-vs-full table of the model card and the training README: every shipped training
    config at its shipped settings, its per-chip peak with full fine-tuning and with LoRA (a LoRA
    config's own ``peft`` section; for a full config LoRA r=16, alpha 32 on the seven projections)."""
    from dataclasses import replace

    from modelzoo.config import load_config, shipped_configs

    lines = ["| config | n_chips x DP | batch x seq | recompute | budget | full: grads + optimizer | full: peak | "
             "LoRA | LoRA: trainable per chip | LoRA: grads + optimizer | LoRA: peak |",
             "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for name in shipped_configs("training"):
        cfg = load_config(name)
        if cfg.peft.method == "none":
            cfg = replace(cfg, peft=replace(cfg.peft, method="lora", **TABLE_LORA))
        info = _analyse(cfg)
        budget = _budget_gib(cfg)
        full, lora, t = info["full_memory"], info["memory"], cfg.training
        lines.append(
            f"| `{name}` | {cfg.samba_compile.n_chips} x {cfg.data_parallel.world_size}{' FSDP' if t.fsdp else ''} | "
            f"{t.batch_size} x {t.max_seq_length} | {t.recompute} | {budget:.0f} | "
            f"{(full['grads'] + full['optimizer']) / GIB:.2f} | {_peak_cell(full, budget)} | "
            f"{cfg.peft.method} r={cfg.peft.r} | {info['adapter']['trainable_per_chip'] / 1e6:.2f}M | "
            f"{(lora['grads'] + lora['optimizer']) / GIB:.2f} | {_peak_cell(lora, budget)} |")
    return "\n".join(lines) + "\n"


def _peak_cell(memory: dict[str, int], budget_gib: float) -> str:
    fits = "fits" if memory["total"] <= budget_gib * GIB else "**does not fit**"
    return f"{memory['total'] / GIB:.2f} ({fits})"


#: generated blocks: marker name -> the function that writes its content
CARD_BLOCKS = {"memory-table": memory_table_markdown, "lora-memory-table": lora_memory_table_markdown}
#: the files holding generated blocks (``--card`` with no path fills all of them)
CARD_FILES = ("models/llama/README.md", "examples/training/README.md")


def card_block(text: str, marker: str) -> str | None:
    """The content of ``<!-- MARKER:start -->`` ... ``<!-- MARKER:end -->`` in ``text`` (None: absent)."""
    match = re.search(rf"<!-- {marker}:start -->\n(.*?)<!-- {marker}:end -->", text, re.S)
    return match.group(1) if match else None


def _write_card(path: Path) -> None:
    text = path.read_text()
    filled = []
    for marker, make in CARD_BLOCKS.items():
        start, end = f"<!-- {marker}:start -->\n", f"<!-- {marker}:end -->"
        if start not in text or end not in text:
            continue
        head, rest = text.split(start, 1)
        text = head + start + make() + end + rest.split(end, 1)[1]
        filled.append(marker)
    if not filled:
        raise SystemExit(f"{path}: no generated block ('<!-- NAME:start -->' ... '<!-- NAME:end -->' with NAME "
                         f"one of {', '.join(CARD_BLOCKS)}) to fill")
    path.write_text(text)
    print(f"wrote {', '.join(filled)} into {path.resolve()}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Compile-plan tools.")
    parser.add_argument("--card", nargs="*", metavar="PATH",
                        help="regenerate the memory tables in these files (none given: "
                             f"{', '.join(CARD_FILES)})")
    args = parser.parse_args()
    if args.card is not None:
        root = Path(__file__).resolve().parents[2]  # the repository (an editable install)
        for card in args.card or [root / f for f in CARD_FILES]:
            _write_card(Path(card))
    else:
        parser.print_help()

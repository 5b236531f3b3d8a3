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


class PlanError(RuntimeError):
    """A plan that cannot fit or does not match the run; the message says which knob to turn."""


def recompile_settings(cfg: RunConfig, arch_fields: dict[str, Any]) -> dict[str, Any]:
    """Everything that changes the compiled graph: a run with other values needs a new compile."""
    model = cfg.model
    return {
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


def _arch_fields(config) -> dict[str, Any]:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps")
    fields = {k: getattr(config, k) for k in keys}
    fields["rope_parameters"] = dict(config.rope_parameters or {})
    return fields


def _memory(cfg: RunConfig, config, n_chips: int, per_chip_params: int, block_params: int) -> dict[str, int]:
    """Per-chip bytes by kind (the model in the module doc); ``total`` is the step's peak."""
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
    block_input = tokens * h * d / t_seq
    recomputed = len(recomputed_blocks(layers, cfg.training.recompute))
    logits = targets * vocab * 4
    saved = (layers - recomputed) * block + recomputed * block_input + 3 * tokens * h * d + logits
    weights = per_chip_params * d // state_divisor + (block_params * d if fsdp else 0)
    grads = per_chip_params * d // state_divisor
    optimizer = per_chip_params * optimizer_per_param // state_divisor
    accumulated = grads if cfg.training.grad_accum_steps > 1 else 0
    peak = max(saved + 2 * logits + accumulated,
               recomputed * block_input + grads + 2 * block if recomputed else 0,
               grads)
    return {
        "weights": int(weights), "grads": int(grads), "optimizer": int(optimizer),
        "activations": int(saved), "temporaries": int(peak - saved), "total": int(weights + optimizer + peak),
    }


def memory_per_chip(cfg: RunConfig) -> dict[str, int]:
    """Per-chip bytes of ``cfg``'s plan by kind (never raises PlanError; see :func:`build_plan`)."""
    return _analyse(cfg)["memory"]


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
    return {"config": config, "layout": layout, "shard_shapes": shard_shapes, "total_params": total_params,
            "embedding_params": embedding_params, "per_chip_params": per_chip_params,
            "memory": _memory(cfg, config, n_chips, per_chip_params, block_params)}


def build_plan(cfg: RunConfig) -> dict[str, Any]:
    """The compile plan for ``cfg`` (a dict, JSON-ready); raises PlanError when it cannot fit."""
    info = _analyse(cfg)
    config, layout, memory = info["config"], info["layout"], info["memory"]
    world = cfg.data_parallel.world_size
    total_params, per_chip_params = info["total_params"], info["per_chip_params"]
    budget_gib = cfg.samba_compile.chip_memory_gib or ARCH_MEMORY_GIB[cfg.samba_compile.arch]
    plan = {
        "version": PLAN_VERSION,
        "model": {"name_or_path": cfg.model.name_or_path, "total_params": total_params,
                  "non_embedding_params": total_params - info["embedding_params"], **_arch_fields(config)},
        "layout": {**asdict(layout), "world_size": world, "processes": layout.n_chips * world,
                   "lm_head_style": layout.lm_head_style},
        "per_chip": {"params": per_chip_params, "bytes": memory,
                     "gib": {k: round(v / GIB, 3) for k, v in memory.items()},
                     "budget_gib": budget_gib, "fits": memory["total"] <= budget_gib * GIB,
                     "weights_fit_hbm": memory["weights"] <= ARCH_HBM_GIB[cfg.samba_compile.arch] * GIB},
        "shard_shapes": info["shard_shapes"],
        "recompile_settings": recompile_settings(cfg, _arch_fields(config)),
    }
    if not plan["per_chip"]["fits"]:
        gib = plan["per_chip"]["gib"]
        raise PlanError(
            f"the plan needs {gib['total']:.1f} GiB per chip (weights {gib['weights']:.1f}, optimizer "
            f"{gib['optimizer']:.1f}, activations {gib['activations']:.1f}, temporaries incl. grads "
            f"{gib['temporaries']:.1f}) but samba_compile."
            f"{'chip_memory_gib' if cfg.samba_compile.chip_memory_gib else 'arch'} allows {budget_gib:.0f} GiB; "
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
    return "; or ".join(tips)


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
    ])


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


def _write_card(path: Path) -> None:
    text = path.read_text()
    start, end = "<!-- memory-table:start -->\n", "<!-- memory-table:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{path}: no '{start.strip()}' ... '{end}' block to fill")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(head + start + memory_table_markdown() + end + tail)
    print(f"wrote the memory table into {path.resolve()}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Compile-plan tools.")
    parser.add_argument("--card", nargs="?", const="models/llama/README.md", metavar="PATH",
                        help="regenerate the per-chip memory table in the model card (default: %(const)s)")
    args = parser.parse_args()
    if args.card:
        _write_card(Path(args.card))
    else:
        parser.print_help()

"""The Llama tensor-parallel (TP) plan, written as data, and the small functions that apply it.

Plan (Megatron-style; ``n_chips`` = TP degree):

- ``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj``, ``up_proj``: column-parallel (output features,
  i.e. heads / MLP width, split across chips);
- ``o_proj``, ``down_proj``: row-parallel (input features split; partial sums all-reduced);
- ``lm_head``: column-parallel over the vocabulary with the logits gathered, when untied; tied
  to the embedding (Llama-3.2) it stays replicated with it;
- embeddings and RMSNorm weights: replicated.

KV heads: when ``n_chips`` divides ``num_key_value_heads`` they are split like the query heads;
when ``n_chips`` is a multiple of them, every KV head is first replicated ``n_chips / kv`` times
(which leaves the function unchanged) so each chip holds exactly the one KV head its query heads
use. The rule and its error messages are :func:`check_tensor_parallel` (the config check calls it;
it lives in the torch-free ``tp_rule`` and is re-exported here).

The same plan drives both the live model (:func:`parallelize_llama`, DTensor on a device mesh) and
per-chip checkpoint shards (:func:`shard_tensor` / :func:`unshard_tensors`), so the two agree.
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig

from .tp_rule import _tp_problem, check_tensor_parallel, valid_n_chips  # noqa: F401 (re-exported)

COLWISE = "colwise"
ROWWISE = "rowwise"
VOCAB = "colwise_vocab"  # column-parallel over the vocabulary, output gathered
REPLICATE = "replicate"

#: Module-name pattern -> parallel style. Modules not named here are replicated.
LLAMA_TP_PLAN: dict[str, str] = {
    "model.layers.*.self_attn.q_proj": COLWISE,
    "model.layers.*.self_attn.k_proj": COLWISE,
    "model.layers.*.self_attn.v_proj": COLWISE,
    "model.layers.*.self_attn.o_proj": ROWWISE,
    "model.layers.*.mlp.gate_proj": COLWISE,
    "model.layers.*.mlp.up_proj": COLWISE,
    "model.layers.*.mlp.down_proj": ROWWISE,
    "lm_head": VOCAB,
}
#: How a low-rank adapter on a split projection is split (peft's LoRA layer: ``base_layer`` is the
#: frozen ``nn.Linear``, ``lora_A.*`` is r x in, ``lora_B.*`` is out x r). Column-parallel W (its
#: output features split): B's rows are those output features, so B is split like W; A reads the
#: full (replicated) input and stays replicated, its gradient summed over the chips by B's input
#: all-reduce in backward. Row-parallel W (its input features split): A's columns are those input
#: features, so A is split like W and its r-dim output all-reduced; B stays replicated.
LORA_TP_PLAN: dict[str, dict[str, str]] = {
    COLWISE: {"base_layer": COLWISE, "lora_B.*": COLWISE, "lora_A.*": REPLICATE},
    ROWWISE: {"base_layer": ROWWISE, "lora_A.*": ROWWISE, "lora_B.*": REPLICATE},
}
#: dimension of the *weight* that a style splits (nn.Linear weight is [out, in])
_SPLIT_DIM = {COLWISE: 0, ROWWISE: 1, VOCAB: 0}


@dataclass(frozen=True)
class TPLayout:
    """How ``n_chips``-way TP lays a model out. Shapes are per chip."""

    n_chips: int
    kv_mode: str  # "shard" or "replicate"
    heads_per_chip: int
    kv_heads_per_chip: int
    kv_replicas: int  # chips sharing one KV head (1 when sharded)
    tied_embeddings: bool
    padded_vocab: int  # vocab rounded up to a multiple of n_chips for lm_head shard files

    @property
    def lm_head_style(self) -> str:
        return REPLICATE if self.tied_embeddings else VOCAB


def tp_layout(config: LlamaConfig, n_chips: int) -> TPLayout:
    """The layout for ``config`` at ``n_chips``; raises ``ConfigError`` for an impossible degree."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    kv_mode = check_tensor_parallel(heads, kv, n_chips, getattr(config, "name_or_path", "") or "llama",
                                    config.intermediate_size)
    replicas = 1 if kv_mode == "shard" else n_chips // kv
    return TPLayout(
        n_chips=n_chips,
        kv_mode=kv_mode,
        heads_per_chip=heads // n_chips,
        kv_heads_per_chip=kv // n_chips if kv_mode == "shard" else 1,
        kv_replicas=replicas,
        tied_embeddings=bool(config.tie_word_embeddings),
        padded_vocab=-(-config.vocab_size // n_chips) * n_chips,
    )


def style_of(param_name: str, layout: TPLayout) -> str:
    """The parallel style of a parameter (``model.layers.0.mlp.up_proj.weight`` -> ``colwise``)."""
    module_name = param_name.rsplit(".", 1)[0]
    for pattern, style in LLAMA_TP_PLAN.items():
        if fnmatch.fnmatchcase(module_name, pattern):
            return layout.lm_head_style if style == VOCAB else style
    return REPLICATE


def _is_kv(name: str) -> bool:
    return name.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias"))


def shard_tensor(name: str, tensor: torch.Tensor, layout: TPLayout, rank: int,
                 head_dim: int | None = None) -> torch.Tensor:
    """Chip ``rank``'s shard of full HF tensor ``name`` (a contiguous copy).

    Replicated KV heads: chip ``rank`` holds KV head ``rank // kv_replicas`` (needs ``head_dim``).
    The vocab-parallel ``lm_head`` is zero-padded to ``layout.padded_vocab`` rows first.
    """
    style = style_of(name, layout)
    if style == REPLICATE:
        return tensor.clone()
    if _is_kv(name) and layout.kv_mode == "replicate":
        if head_dim is None:
            raise ValueError("shard_tensor needs head_dim for replicated KV heads")
        head = rank // layout.kv_replicas
        return tensor[head * head_dim:(head + 1) * head_dim].clone()
    if style == VOCAB and tensor.shape[0] != layout.padded_vocab:
        pad = tensor.new_zeros((layout.padded_vocab - tensor.shape[0], *tensor.shape[1:]))
        tensor = torch.cat([tensor, pad])
    dim = _SPLIT_DIM[style] if tensor.dim() > 1 or style != ROWWISE else None
    if dim is None:  # a row-parallel bias is not split (added once after the all-reduce)
        return tensor.clone()
    return tensor.chunk(layout.n_chips, dim=dim)[rank].contiguous()


def unshard_tensors(name: str, shards: list[torch.Tensor], layout: TPLayout, vocab_size: int) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`: the full HF tensor from all chips' shards (in rank order)."""
    style = style_of(name, layout)
    if style == REPLICATE:
        return shards[0].clone()
    if _is_kv(name) and layout.kv_mode == "replicate":
        return torch.cat(shards[:: layout.kv_replicas])
    if style == ROWWISE and shards[0].dim() == 1:
        return shards[0].clone()
    full = torch.cat(shards, dim=_SPLIT_DIM[style])
    return full[:vocab_size].clone() if style == VOCAB else full


def replicate_kv_heads_(model: nn.Module, n_chips: int) -> None:
    """Give every attention layer ``n_chips`` KV heads by repeating each of its KV heads.

    The function is unchanged (each query head still reads the same keys/values); afterwards the KV
    projections split evenly over ``n_chips``. Only for ``n_chips`` a multiple of the KV heads.
    """
    config = model.config
    kv = config.num_key_value_heads
    if n_chips % kv:
        raise ValueError(f"n_chips={n_chips} is not a multiple of num_key_value_heads={kv}")
    repeats = n_chips // kv
    for layer in model.model.layers:
        attn = layer.self_attn
        for adapted in (attn.k_proj, attn.v_proj):
            # an adapter's B rows are the projection's output features: repeated with them
            parts = [adapted.base_layer, *adapted.lora_B.values()] if hasattr(adapted, "base_layer") else [adapted]
            if hasattr(adapted, "lora_magnitude_vector") and len(adapted.lora_magnitude_vector):
                raise ValueError("DoRA adapters cannot be split over more chips than KV heads; "
                                 f"use n_chips <= {kv} or merge the adapter (modelzoo-convert merge-lora)")
            for proj in parts:
                _repeat_rows(proj, kv, attn.head_dim, repeats, n_chips)
            adapted.out_features = parts[0].out_features
        attn.num_key_value_groups = config.num_attention_heads // n_chips
    config.num_key_value_heads = n_chips


def _repeat_rows(proj: nn.Linear, kv: int, head_dim: int, repeats: int, n_chips: int) -> None:
    """Repeat each KV head's block of output rows of ``proj`` ``repeats`` times, in place."""
    weight = proj.weight.data.view(kv, head_dim, -1)
    proj.weight = nn.Parameter(weight.repeat_interleave(repeats, dim=0).reshape(n_chips * head_dim, -1),
                               requires_grad=proj.weight.requires_grad)
    proj.out_features = proj.weight.shape[0]
    if proj.bias is not None:
        bias = proj.bias.data.view(kv, head_dim).repeat_interleave(repeats, dim=0).reshape(-1)
        proj.bias = nn.Parameter(bias, requires_grad=proj.bias.requires_grad)


def adapted_projections(model: nn.Module) -> frozenset[str]:
    """Names (``q_proj``, ...) of the projections that carry a low-rank adapter (peft's layers)."""
    return frozenset(name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if hasattr(module, "lora_A") and hasattr(module, "base_layer"))


def _tp_plan(layout: TPLayout, sequence_parallel: bool, adapted: frozenset[str] = frozenset()) -> dict:
    """The ``parallelize_module`` plan (module-name pattern -> ParallelStyle) for ``layout``.

    Without sequence parallelism the residual stream is replicated on every chip. With it
    (Megatron-LM's sequence parallelism, Korthikanti et al. 2022), the residual stream between the
    attention and MLP blocks is a DTensor sharded on the sequence dimension (``Shard(1)``): the
    RMSNorms run on ``S / n_chips`` positions per chip, each block all-gathers its normed input
    (``PrepareModuleInput``: Shard(1) -> Replicate) and its row-parallel output projection
    reduce-scatters onto the sequence shards instead of all-reducing. The embedding output is cut
    into sequence shards (a local slice, no communication); the final norm gathers the sequence
    back, so the LM head and loss see full, plain tensors as without SP.

    An adapted projection (a name in ``adapted``) is split by :data:`LORA_TP_PLAN` instead.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
    )

    row_out = {"output_layouts": Shard(1), "use_local_output": False} if sequence_parallel else {}
    styles = {COLWISE: ColwiseParallel, ROWWISE: lambda: RowwiseParallel(**row_out)}
    plan: dict = {}
    if sequence_parallel:
        plan["model.embed_tokens"] = PrepareModuleOutput(
            output_layouts=Replicate(), desired_output_layouts=Shard(1), use_local_output=False)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            plan[f"model.layers.*.{norm}"] = SequenceParallel()
        plan["model.layers.*.self_attn"] = PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": Shard(1)},
            desired_input_kwarg_layouts={"hidden_states": Replicate()})
        plan["model.layers.*.mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        plan["model.norm"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                                use_local_output=True)
    for pattern, style in LLAMA_TP_PLAN.items():
        if style == VOCAB:
            if layout.lm_head_style == VOCAB:
                plan[pattern] = ColwiseParallel(output_layouts=Replicate())
        elif pattern.rsplit(".", 1)[-1] in adapted:
            for part, part_style in LORA_TP_PLAN[style].items():
                if part_style != REPLICATE:
                    plan[f"{pattern}.{part}"] = styles[part_style]()
        else:
            plan[pattern] = styles[style]()
    return plan


def parallelize_llama(model: nn.Module, tp_mesh, *, training: bool = False,
                      sequence_parallel: bool = False) -> TPLayout:
    """Apply the TP plan to a built (CPU/CUDA) model in place, on a 1-D device mesh (``apply_tp``).

    Every rank must hold the same full weights before the call (same seed or same checkpoint);
    afterwards each holds its shards as DTensors. Returns the layout used.

    ``training=True`` refuses KV-head replication: replicated KV copies would each receive only
    their own chips' gradient and drift apart. ``sequence_parallel`` see :func:`_tp_plan`.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    n_chips = tp_mesh.size()
    layout = tp_layout(model.config, n_chips)
    if n_chips == 1:
        return layout
    if layout.kv_mode == "replicate":
        if training:
            kv = model.config.num_key_value_heads
            raise ValueError(
                f"samba_compile.n_chips={n_chips} exceeds num_key_value_heads={kv}: KV heads would be "
                f"replicated, which is supported for inference only; train with n_chips <= {kv}")
        replicate_kv_heads_(model, n_chips)
    adapted = adapted_projections(model)
    if adapted and sequence_parallel:
        raise ValueError("sequence parallelism with adapters is not supported: drop samba_compile.sequence_parallel")
    parallelize_module(model, tp_mesh, _tp_plan(layout, sequence_parallel, adapted))
    return layout


apply_tp = parallelize_llama

# ----------------------------------------------------------------------------------------------
# activation recompute, compile, data parallelism: the rest of the training sequence
# ----------------------------------------------------------------------------------------------

RECOMPUTE_MODES = ("none", "selective", "full")
#: ``recompute: selective`` checkpoints every SELECTIVE_EVERY-th decoder block (blocks 0, 2, 4, ...).
SELECTIVE_EVERY = 2


def recomputed_blocks(num_layers: int, mode: str) -> list[int]:
    """Indices of the decoder blocks whose activations are recomputed in backward under ``mode``."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"training.recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {mode!r}")
    step = {"none": 0, "selective": SELECTIVE_EVERY, "full": 1}[mode]
    return list(range(0, num_layers, step)) if step else []


def _checkpointed(forward):
    """``forward`` run under non-reentrant ``torch.utils.checkpoint`` (only the block's input and
    its non-tensor arguments are kept; everything inside is recomputed in backward)."""
    from torch.utils.checkpoint import checkpoint

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)

    return run


def apply_ac(model: nn.Module, mode: str) -> list[int]:
    """Activation recompute per decoder block (``training.recompute``), in place; returns the
    recomputed block indices.

    ``full`` recomputes every block: a block keeps only its input (``B x S x H``) between forward
    and backward, and one block's activations live at a time during backward. ``selective``
    recomputes every :data:`SELECTIVE_EVERY`-th block (0, 2, ...), halving activation memory for
    half the extra compute. The block's own ``forward`` is wrapped (module names, hence state-dict
    keys and checkpoint files, are unchanged); apply it after TP and before compile and FSDP, so
    FSDP's all-gather hooks stay outside the recomputed region.
    """
    blocks = recomputed_blocks(len(model.model.layers), mode)
    for index in blocks:
        layer = model.model.layers[index]
        layer.forward = _checkpointed(layer.forward)
    return blocks


def apply_compile(model: nn.Module, backend) -> None:
    """Compile each decoder block in place with the backend (per block, as torchtitan does: the
    blocks are identical, so one compiled graph serves all of them). The LM head and loss stay
    eager: they run only at targets of nonzero weight, a data-dependent count."""
    for layer in model.model.layers:
        backend.compile_block(layer)


def _mp_policy(mixed_precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision == "none":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=getattr(torch, mixed_precision), reduce_dtype=torch.float32)


def apply_fsdp(model: nn.Module, dp_mesh, *, mixed_precision: str = "none") -> None:
    """FSDP2: parameters, gradients and optimizer state sharded over ``dp_mesh``, per decoder block
    and the root (embedding, final norm, LM head). Under TP the parameters are already DTensors on
    the TP mesh; FSDP shards them further on the DP dimension of the same 2-D mesh.
    ``mixed_precision="bfloat16"`` computes with bf16 copies of the parameters and reduces
    gradients in fp32 (the sharded parameters stay in the model dtype)."""
    from torch.distributed.fsdp import fully_shard

    policy = _mp_policy(mixed_precision)
    for layer in model.model.layers:
        fully_shard(layer, mesh=dp_mesh, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)


def apply_replicate(model: nn.Module, dp_mesh, *, mixed_precision: str = "none") -> None:
    """Data parallelism with replicated parameters (DDP semantics: gradients all-reduced over
    ``dp_mesh`` in backward), through torch's composable ``replicate``, per block and the root."""
    from torch.distributed._composable.replicate_with_fsdp import replicate

    policy = _mp_policy(mixed_precision)
    for layer in model.model.layers:
        replicate(layer, mesh=dp_mesh, mp_policy=policy)
    replicate(model, mesh=dp_mesh, mp_policy=policy)


@dataclass(frozen=True)
class TrainingParallelism:
    """What :func:`parallelize_for_training` applies (from ``samba_compile`` and ``training``)."""

    sequence_parallel: bool = False
    recompute: str = "none"
    fsdp: bool = False
    mixed_precision: str = "none"


def parallelize_for_training(model: nn.Module, mesh, settings: TrainingParallelism, backend=None) -> dict:
    """The whole sequence, in torchtitan's order, on a built model in place: TP (with sequence
    parallelism) -> activation recompute -> per-block compile -> FSDP2 or replicate (DDP).

    ``mesh``: a 2-D ``("dp", "tp")`` DeviceMesh, or None for one process. Returns what was applied.
    """
    tp = mesh["tp"].size() if mesh is not None else 1
    dp = mesh["dp"].size() if mesh is not None else 1
    applied: dict = {"tp": tp, "dp": dp}
    if tp > 1:
        parallelize_llama(model, mesh["tp"], training=True, sequence_parallel=settings.sequence_parallel)
        applied["sequence_parallel"] = settings.sequence_parallel
    applied["recompute"] = apply_ac(model, settings.recompute)
    if backend is not None:
        apply_compile(model, backend)
    if dp > 1:
        if settings.fsdp:
            apply_fsdp(model, mesh["dp"], mixed_precision=settings.mixed_precision)
        else:
            apply_replicate(model, mesh["dp"], mixed_precision=settings.mixed_precision)
        applied["data_parallel"] = "fsdp" if settings.fsdp else "replicate"
    return applied

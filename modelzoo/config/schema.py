"""Typed schemas: one dataclass per YAML section, two top-level run configs.

Each component receives only its own section (``cfg.training``, ``cfg.samba_compile``, ...).
Field metadata carries value bounds (``ge``/``gt``/``le``) and closed string sets (``choices``);
:mod:`modelzoo.config.build` enforces both, so a bound lives next to the field it constrains.

A relative path in a config (``training.dataset_dir``, ``training.output_dir``,
``checkpoint.save_dir`` / ``load_path``, ``samba_compile.output_folder``) is relative to the
current working directory of the command, not to the config file nor to ``training.output_dir``;
``modelzoo-train`` prints the absolute output paths at start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

KNOWN_ARCHS: tuple[str, ...] = ("sn30", "sn40l")
"""Accelerator generations ``samba_compile.arch`` may name (SN30: 64 GiB DDR per chip; SN40L: 3-tier memory)."""


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    """A dataclass field whose value (when not None) must satisfy the given bounds."""
    bounds = {name: value for name, value in (("ge", ge), ("gt", gt), ("le", le)) if value is not None}
    return field(default=default, metadata=bounds)


Backend = Literal["cpu", "inductor", "cuda"]
"""Execution backends (see ``modelzoo.backends``)."""

STRUCTURAL_PATCHES: tuple[str, ...] = ("static_attention", "article_attention", "weighted_loss")
"""Llama patches on by default (``modelzoo.models.llama.patch_llama`` implements every patch)."""
PRECISION_PATCHES: tuple[str, ...] = ("fp32_ln", "fp32_logits", "fp32_skip_add", "mixedp_attn")
"""Llama patches switched on by the flags of the same name."""
PATCH_NAMES: tuple[str, ...] = STRUCTURAL_PATCHES + PRECISION_PATCHES


@dataclass
class ModelConfig:
    """Which model to build and how its numerics are patched: also the settings ``patch_llama`` takes."""

    name_or_path: str = "llama_tiny"
    """A preset name (see ``modelzoo.models.llama.presets``) or an HF checkpoint directory."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter and activation dtype."""
    patches: list[str] | None = None
    """Allow-list of Llama patches (``PATCH_NAMES``); [] runs stock HF (generation only: training needs
    ``weighted_loss``). None applies the structural patches plus the precision patches switched on
    by the flags below."""
    fp32_ln: bool = False
    """Compute RMSNorm in float32 under a low-precision dtype."""
    fp32_logits: bool = False
    """Compute the LM head and loss in float32."""
    fp32_skip_add: bool = False
    """Accumulate residual (skip) additions in float32."""
    mixedp_attn: bool = False
    """Mixed-precision attention: low-precision matmuls, float32 softmax."""
    article_attention: bool = True
    """Tokens attend only within their own article of a packed sequence (positions restart per article)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Architecture fields replacing the preset's (``config.json`` names, e.g. ``num_hidden_layers``)."""


@dataclass
class CheckpointConfig:
    """Where weights come from and where training state goes."""

    load_path: str | None = None
    """HF checkpoint directory to load the starting weights from (fine-tuning); ``resume`` reads
    ``save_dir`` instead."""
    save_dir: str = "runs/checkpoints"
    """Directory receiving one sub-directory per saved checkpoint."""
    save_every: int = bounded(0, ge=0)
    """Save every this many optimizer steps; 0 saves only at the end."""
    keep_last: int = bounded(2, ge=0)
    """Number of most recent checkpoints kept on disk; 0 keeps all."""
    resume: bool = False
    """Continue the run in ``save_dir``: weights, optimizer, schedule, RNG and data position from its
    ``latest`` checkpoint."""
    overwrite: bool = False
    """A fresh run into a ``save_dir`` that holds checkpoints of an earlier run deletes them first
    (only checkpoints modelzoo wrote); without it such a run is refused."""


@dataclass
class TrainingConfig:
    """Data, optimizer, schedule and loop settings of a training run."""

    dataset_dir: str | None = None
    """HDF5 dataset directory written by ``data_prep`` (required to train)."""
    batch_size: int = bounded(8, ge=1)
    """Sequences per micro-batch per data-parallel rank."""
    max_seq_length: int = bounded(512, ge=1)
    """Tokens per sequence; must match the dataset's ``max_seq_length``."""
    allow_long_sequences: bool = False
    """Allow ``max_seq_length`` above the model's ``max_position_embeddings`` (positions it never saw)."""
    verify_checksums: bool = True
    """Re-hash every dataset file against its sha256 manifest before training (reads every byte once;
    set false for very large datasets: file names and sizes are still checked)."""
    max_steps: int = bounded(100, ge=1)
    """Optimizer steps to run."""
    num_epochs: int | None = bounded(None, ge=1)
    """Passes over the training data; when set it takes precedence over ``max_steps``."""
    learning_rate: float = bounded(3e-4, ge=0)
    """Peak learning rate (reached after warmup)."""
    min_learning_rate: float = bounded(0.0, ge=0)
    """Learning rate at the end of the decay; at most ``learning_rate``."""
    weight_decay: float = bounded(0.1, ge=0)
    """AdamW decoupled weight decay."""
    adam_beta1: float = bounded(0.9, ge=0, le=1)
    adam_beta2: float = bounded(0.95, ge=0, le=1)
    adam_eps: float = bounded(1e-8, gt=0)
    warmup_steps: int = bounded(10, ge=0)
    """Linear warmup steps from 0 to ``learning_rate``."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup, from ``learning_rate`` to ``min_learning_rate``."""
    grad_accum_steps: int = bounded(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    clip_grad_norm: float | None = bounded(1.0, gt=0)
    """Global gradient-norm clip; None disables clipping."""
    prompt_loss_weight: float = bounded(0.0, ge=0, le=1)
    """Loss weight of prompt tokens (completion and separator tokens weigh 1)."""
    seed: int = 42
    eval_every: int = bounded(0, ge=0)
    """Evaluate on the dev split every this many steps; 0 never."""
    log_every: int = bounded(1, ge=1)
    """Log metrics (and synchronize the device) every this many steps."""
    deterministic: bool = False
    """Use deterministic kernels (slower; bitwise-reproducible runs)."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state across data-parallel ranks (FSDP2; with
    ``samba_compile.n_chips > 1`` on the 2-D (dp, tp) mesh) instead of replicating them (DDP)."""
    mixed_precision: Literal["none", "bfloat16"] = "none"
    """With ``fsdp``: compute with bf16 copies of the parameters and reduce gradients in fp32 (the
    sharded parameters and optimizer state stay in ``model.dtype``)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute per decoder block in backward: ``full`` every block (keeps only each
    block's input; ~1/3 more compute), ``selective`` every second block (half of both)."""
    output_dir: str = "runs"
    """Directory of the run's logs: ``metrics.jsonl``, ``loss_curve.png``, the TensorBoard event files
    (``tensorboard/``) and the Weights & Biases run dir (``wandb/``). Relative to the working
    directory, like every path in a config; checkpoints go to ``checkpoint.save_dir`` and the
    compile plan to ``samba_compile.output_folder``, each set on its own."""
    loggers: list[Literal["jsonl", "tensorboard", "wandb"]] = field(default_factory=lambda: ["jsonl"])
    """Where rank 0 logs the scalars of every log and eval step (loss, lr, grad_norm, tokens_per_s,
    mfu, peak_memory_gib, epoch, eval_loss, eval_ppl; the step is the global step): ``jsonl``
    ``output_dir/metrics.jsonl``; ``tensorboard`` event files in ``output_dir/tensorboard`` (tag =
    the metrics.jsonl key; needs ``pip install tensorboard``); ``wandb`` a Weights & Biases run in
    ``output_dir/wandb`` (needs ``pip install wandb``; mode from ``wandb_mode``). A requested logger
    whose package is missing is refused before training starts."""
    wandb_mode: Literal["offline", "online", "disabled"] | None = None
    """Mode of the ``wandb`` logger; None takes ``WANDB_MODE`` from the environment, else ``offline``
    (nothing leaves the machine: ``wandb sync output_dir/wandb/offline-run-*`` uploads it later)."""
    wandb_project: str = "modelzoo"
    """Weights & Biases project of the ``wandb`` logger (the run is named after ``output_dir``)."""


LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The seven projections of a Llama decoder block: the default ``peft.target_modules``."""


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning: low-rank adapters on a frozen base (``peft`` LoRA/DoRA).

    The adapter is ``W x + (alpha / r) B A x`` per target projection (A: r x in, B: out x r); DoRA
    also learns a per-output magnitude of the adapted weight. Checkpoints hold only the adapter, in
    the format ``peft`` writes (``adapter_config.json`` + ``adapter_model.safetensors``).
    """

    method: Literal["none", "lora", "dora"] = "none"
    """``none`` trains every weight; ``lora`` / ``dora`` train only the adapter (and ``modules_to_save``)."""
    r: int = bounded(8, ge=1)
    """Adapter rank."""
    alpha: float = bounded(16.0, gt=0)
    """Scale numerator: the adapter's output is multiplied by ``alpha / r``."""
    dropout: float = bounded(0.0, ge=0, le=0.9)
    """Dropout on the adapter's input (training only)."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Module names (last component, e.g. ``q_proj``) that get an adapter."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter (``embed_tokens``, ``lm_head``, ``norm``)."""
    init: Literal["default", "gaussian"] = "default"
    """Adapter init: ``default`` is peft's (A Kaiming-uniform, B zero), ``gaussian`` draws A from
    N(0, 1/r); B starts at zero either way, so step 0 is the base model."""
    quantize_base: Literal["none", "int8"] = "none"
    """``int8`` holds the frozen adapted projections int8 weight-only (per-output-channel absmax, the
    int8 conversion's scheme; 1 byte per weight, QLoRA-style) while the adapter trains in float.
    One chip per replica (``n_chips: 1``), ``method: lora``."""


@dataclass
class GenerationConfig:
    """Decoding settings of a generation run."""

    max_new_tokens: int = bounded(64, ge=1)
    temperature: float = bounded(0.0, ge=0)
    """0 decodes greedily."""
    top_k: int | None = bounded(None, ge=1)
    """Sample only among the k most likely tokens; None disables."""
    top_p: float | None = bounded(None, gt=0, le=1)
    """Nucleus sampling mass; None disables."""
    repetition_penalty: float = bounded(1.0, gt=0)
    """Divides the logits of already generated tokens (1.0 disables)."""
    seed: int = 0
    batch_size: int = bounded(1, ge=1)
    """Prompts decoded together."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a completion (besides EOS)."""
    chat: bool = False
    """Wrap prompts with the tokenizer's chat template."""
    stream: bool = False
    """Print tokens as they are generated."""
    quantize: Literal["none", "int8"] = "none"
    """Weight-only quantization of the linear layers."""
    max_length: int | None = bounded(None, ge=1)
    """Static KV-cache length (prompt + new tokens); None sizes it from the longest request."""


@dataclass
class SambaCompileConfig:
    """Compile-time layout on the accelerator; ``n_chips`` is the tensor-parallel degree."""

    arch: str = field(default="sn40l", metadata={"choices": KNOWN_ARCHS})
    """Accelerator generation, one of ``KNOWN_ARCHS``."""
    tensor_parallel: Literal["none", "weight"] = "none"
    """``weight`` shards weights over ``n_chips`` chips; ``none`` requires ``n_chips: 1``."""
    n_chips: int = bounded(1, ge=1)
    """Tensor-parallel degree (chips per model replica)."""
    num_tiles: int = bounded(4, ge=1)
    """Tiles per chip the compiler may use."""
    early_tp: bool = False
    """Apply the tensor-parallel split before graph optimization."""
    sequence_parallel: bool = False
    """With ``n_chips > 1``: shard the residual stream and the RMSNorms on the sequence dimension
    between the tensor-parallel blocks (activation memory outside the blocks / n_chips; all-gather
    + reduce-scatter instead of all-reduce). Training only."""
    output_folder: str = "runs/compile"
    """Where the compile plan is written (and read back at run time)."""
    chip_memory_gib: float | None = bounded(None, gt=0)
    """Per-chip memory budget for the plan's estimate; None uses the arch's capacity."""


@dataclass
class DataParallelConfig:
    """Data-parallel layout; processes = ``samba_compile.n_chips`` x ``world_size``."""

    world_size: int = bounded(1, ge=1)
    """Data-parallel degree (model replicas)."""


@dataclass
class RunConfig:
    """A training (or compile) run: what ``run_training`` reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    samba_compile: SambaCompileConfig = field(default_factory=SambaCompileConfig)
    data_parallel: DataParallelConfig = field(default_factory=DataParallelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    command: Literal["compile", "run"] = "run"
    """``compile`` writes the compile plan and stops; ``run`` trains."""
    backend: Backend = "cpu"


@dataclass
class GenerationRunConfig:
    """A generation run: what ``run_generation`` reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    samba_compile: SambaCompileConfig = field(default_factory=SambaCompileConfig)
    backend: Backend = "cpu"


CONFIG_KINDS: dict[str, type] = {"training": RunConfig, "generation": GenerationRunConfig}
"""Top-level schema per config kind; the kind also names the ``configs/<kind>/`` directory."""

"""Cross-field checks that need only the config: rules over several keys.

Rules that need the model's architecture (the tensor-parallel degree vs. its heads, a preset's
overrides) live with the model, in :mod:`modelzoo.models.llama.checks`; :func:`load_config` runs
them when its caller passes them as ``check``.
"""

from __future__ import annotations

from .errors import ConfigError, nearest
from .schema import LORA_TARGETS, PATCH_NAMES, GenerationRunConfig, PeftConfig, RunConfig

#: modules ``peft.modules_to_save`` may name (trained in full beside the adapter)
SAVABLE_MODULES: tuple[str, ...] = ("embed_tokens", "lm_head", "norm")


def check_config(cfg: RunConfig | GenerationRunConfig) -> None:
    """Raise ConfigError for the first rule a (type-checked) run config breaks."""
    samba = cfg.samba_compile
    if samba.tensor_parallel == "none" and samba.n_chips > 1:
        raise ConfigError(
            f"samba_compile.n_chips={samba.n_chips} needs tensor parallelism but samba_compile.tensor_parallel "
            "is 'none'; set samba_compile.tensor_parallel=weight or samba_compile.n_chips=1",
            key="samba_compile.n_chips")
    _check_patch_names(cfg.model.patches)
    if isinstance(cfg, RunConfig):
        if cfg.data_parallel.world_size < 1:
            raise ConfigError(f"data_parallel.world_size must be >= 1, got {cfg.data_parallel.world_size}",
                              key="data_parallel.world_size")
        if samba.sequence_parallel and samba.n_chips == 1:
            raise ConfigError("samba_compile.sequence_parallel=true shards the sequence over the tensor-parallel "
                              "chips, but samba_compile.n_chips is 1; raise n_chips or drop sequence_parallel",
                              key="samba_compile.sequence_parallel")
        training = cfg.training
        if training.min_learning_rate > training.learning_rate:
            raise ConfigError(f"training.min_learning_rate={training.min_learning_rate} exceeds "
                              f"training.learning_rate={training.learning_rate}", key="training.min_learning_rate")
        if training.mixed_precision != "none" and not (training.fsdp and cfg.data_parallel.world_size > 1):
            raise ConfigError(f"training.mixed_precision={training.mixed_precision} is FSDP's mixed-precision "
                              "policy; set training.fsdp=true (with data_parallel.world_size > 1), or "
                              "model.dtype for one precision throughout", key="training.mixed_precision")
        _check_peft(cfg.peft, cfg)
        patches = cfg.model.patches
        if cfg.command == "run" and patches is not None and "weighted_loss" not in patches:
            raise ConfigError(
                f"model.patches={list(patches)} leaves out 'weighted_loss', the training loss (token-type "
                "weights: no loss on padding, prompts or across articles); add it, or drop model.patches "
                "to apply the defaults", key="model.patches")


def _check_patch_names(patches: list[str] | None) -> None:
    for name in patches or []:
        if name not in PATCH_NAMES:
            near = nearest(name, PATCH_NAMES, n=1)
            hint = f"did you mean '{near[0]}'?" if near else f"valid: {', '.join(PATCH_NAMES)}"
            raise ConfigError(f"unknown patch '{name}' in model.patches; {hint}", key="model.patches")


def _check_names(names: list[str], valid: tuple[str, ...], key: str, what: str) -> None:
    for name in names:
        if name not in valid:
            near = nearest(name, valid, n=1)
            hint = f"did you mean '{near[0]}'?" if near else f"valid: {', '.join(valid)}"
            raise ConfigError(f"{key} names '{name}', which is not {what} of a Llama model; {hint}", key=key)


def _check_peft(peft: PeftConfig, cfg: RunConfig) -> None:
    if peft.method == "none":
        return
    if not peft.target_modules:
        raise ConfigError(f"peft.target_modules is empty: peft.method={peft.method} needs at least one "
                          f"projection to adapt (default: {', '.join(LORA_TARGETS)})", key="peft.target_modules")
    _check_names(peft.target_modules, LORA_TARGETS, "peft.target_modules", "a projection")
    _check_names(peft.modules_to_save, SAVABLE_MODULES, "peft.modules_to_save", "a module that can be trained in full")
    if peft.method == "dora" and cfg.samba_compile.n_chips > 1:
        raise ConfigError(f"peft.method=dora with samba_compile.n_chips={cfg.samba_compile.n_chips}: DoRA's weight "
                          "norm spans the tensor-parallel split and is supported on one chip per replica only; "
                          "use peft.method=lora, or n_chips=1 with data_parallel.world_size for scale",
                          key="peft.method")
    if peft.quantize_base == "int8" and (peft.method == "dora" or cfg.samba_compile.n_chips > 1):
        why = ("DoRA reads the float base weight every step" if peft.method == "dora"
               else f"int8 weights are not split by the tensor-parallel plan (samba_compile.n_chips={cfg.samba_compile.n_chips})")
        raise ConfigError(f"peft.quantize_base=int8 is not supported here: {why}; use peft.method=lora with "
                          "samba_compile.n_chips=1 (scale out with data_parallel.world_size), or "
                          "peft.quantize_base=none", key="peft.quantize_base")
    if cfg.samba_compile.sequence_parallel:
        raise ConfigError(f"samba_compile.sequence_parallel=true with peft.method={peft.method} is not supported "
                          "(the adapter path is not in the sequence-parallel plan); drop sequence_parallel",
                          key="samba_compile.sequence_parallel")

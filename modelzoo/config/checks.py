"""Cross-field checks: rules that need several keys or the model's architecture.

``check_tensor_parallel`` and ``valid_n_chips`` are pure functions; the model card and the Llama TP
plan use them too, so the rule is stated once, here.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError, nearest
from .schema import GenerationRunConfig, ModelConfig, RunConfig


def check_tensor_parallel(num_attention_heads: int, num_key_value_heads: int, n_chips: int,
                          model_name: str, intermediate_size: int | None = None) -> str:
    """How ``n_chips``-way tensor parallelism splits attention: ``"shard"`` or ``"replicate"``.

    The rule: query heads are always sharded, so ``num_attention_heads % n_chips == 0`` is required.
    KV heads are sharded too when ``num_key_value_heads % n_chips == 0`` (each chip holds
    ``num_key_value_heads / n_chips`` of them): ``"shard"``. Otherwise, when
    ``n_chips % num_key_value_heads == 0``, each KV head is replicated on ``n_chips /
    num_key_value_heads`` chips (each chip holds one KV head, serving its query heads):
    ``"replicate"``. The MLP is sharded along its hidden width, so ``intermediate_size % n_chips == 0``
    is required too (when given): uneven shards are refused rather than padded. Any other
    ``n_chips`` raises ConfigError listing the valid values.
    """
    if n_chips < 1:
        raise ConfigError(f"samba_compile.n_chips must be >= 1, got {n_chips}", key="samba_compile.n_chips")
    valid = ", ".join(map(str, valid_n_chips(num_attention_heads, num_key_value_heads,
                                             intermediate_size=intermediate_size)))
    if num_attention_heads % n_chips:
        raise ConfigError(
            f"samba_compile.n_chips={n_chips} does not divide num_attention_heads={num_attention_heads} "
            f"of model '{model_name}'; valid n_chips: {valid}", key="samba_compile.n_chips")
    if intermediate_size is not None and intermediate_size % n_chips:
        raise ConfigError(
            f"samba_compile.n_chips={n_chips} does not divide intermediate_size={intermediate_size} "
            f"of model '{model_name}' (the MLP would shard unevenly); valid n_chips: {valid}",
            key="samba_compile.n_chips")
    if num_key_value_heads % n_chips == 0:
        return "shard"
    if n_chips % num_key_value_heads == 0:
        return "replicate"
    raise ConfigError(
        f"samba_compile.n_chips={n_chips} neither divides nor is a multiple of "
        f"num_key_value_heads={num_key_value_heads} of model '{model_name}'; valid n_chips: {valid}",
        key="samba_compile.n_chips")


def valid_n_chips(heads: int, kv_heads: int, limit: int = 128, intermediate_size: int | None = None) -> list[int]:
    """Every tensor-parallel degree up to ``limit`` that ``check_tensor_parallel`` accepts."""
    return [n for n in range(1, limit + 1)
            if heads % n == 0 and (kv_heads % n == 0 or n % kv_heads == 0)
            and (intermediate_size is None or intermediate_size % n == 0)]


def model_heads(model: ModelConfig) -> tuple[int, int, int | None] | None:
    """``(num_attention_heads, num_key_value_heads, intermediate_size)`` of the configured model, or
    None when unknown (``intermediate_size`` is None when a config.json lacks it).

    A preset is built with ``model.overrides``; an HF directory is read from its ``config.json``.
    A path that does not exist yet (it contains a ``/``) gives None: the checks needing it are skipped.
    """
    name = model.name_or_path
    from modelzoo.models.llama import presets  # imports transformers: only when a config is checked

    if presets.is_preset(name):
        arch = _preset_arch(presets, name, model.overrides)
        return arch.num_attention_heads, arch.num_key_value_heads, arch.intermediate_size
    path = Path(name)
    if path.is_dir():
        values = {**_read_config_json(path), **model.overrides}
        try:
            heads = int(values["num_attention_heads"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{path / 'config.json'} has no integer num_attention_heads; "
                              "is it a Llama checkpoint?", key="model.name_or_path") from None
        intermediate = values.get("intermediate_size")
        return heads, int(values.get("num_key_value_heads") or heads), intermediate and int(intermediate)
    if path.exists():
        raise ConfigError(f"model.name_or_path '{name}' is a file; give a preset name or an HF checkpoint "
                          "directory", key="model.name_or_path")
    if "/" not in name and os.sep not in name:
        near = nearest(name, presets.preset_names())
        hint = f"did you mean {', '.join(near)}?" if near else f"presets: {', '.join(presets.preset_names())}"
        raise ConfigError(f"model.name_or_path '{name}' is neither a preset nor an existing directory; {hint}",
                          key="model.name_or_path")
    return None


def check_run_config(cfg: RunConfig | GenerationRunConfig) -> None:
    """Raise ConfigError for the first rule a (type-checked) run config breaks."""
    samba = cfg.samba_compile
    if samba.tensor_parallel == "none" and samba.n_chips > 1:
        raise ConfigError(
            f"samba_compile.n_chips={samba.n_chips} needs tensor parallelism but samba_compile.tensor_parallel "
            "is 'none'; set samba_compile.tensor_parallel=weight or samba_compile.n_chips=1",
            key="samba_compile.n_chips")
    if isinstance(cfg, RunConfig):
        if cfg.data_parallel.world_size < 1:
            raise ConfigError(f"data_parallel.world_size must be >= 1, got {cfg.data_parallel.world_size}",
                              key="data_parallel.world_size")
        training = cfg.training
        if training.min_learning_rate > training.learning_rate:
            raise ConfigError(f"training.min_learning_rate={training.min_learning_rate} exceeds "
                              f"training.learning_rate={training.learning_rate}", key="training.min_learning_rate")
    _check_patch_names(cfg.model.patches)
    arch = model_heads(cfg.model)
    if arch is not None:
        heads, kv_heads, intermediate = arch
        check_tensor_parallel(heads, kv_heads, samba.n_chips, cfg.model.name_or_path, intermediate)


def _check_patch_names(patches: list[str] | None) -> None:
    from modelzoo.models.llama.patch_llama import PATCH_NAMES

    for name in patches or []:
        if name not in PATCH_NAMES:
            near = nearest(name, PATCH_NAMES, n=1)
            hint = f"did you mean '{near[0]}'?" if near else f"valid: {', '.join(PATCH_NAMES)}"
            raise ConfigError(f"unknown patch '{name}' in model.patches; {hint}", key="model.patches")


def _preset_arch(presets: Any, name: str, overrides: dict[str, Any]) -> Any:
    """``get_preset(name, **overrides)``, with override keys checked against LlamaConfig's fields."""
    known = set(inspect.signature(presets.LlamaConfig.__init__).parameters) - {"self", "kwargs"}
    known |= {key for values in presets.PRESETS.values() for key in values}  # config.json names (rope_theta)
    for key in overrides:
        if key not in known:
            near = nearest(key, sorted(known), n=1)
            hint = f"; did you mean 'model.overrides.{near[0]}'?" if near else ""
            raise ConfigError(f"unknown architecture field 'model.overrides.{key}'{hint}", key=f"model.overrides.{key}")
    try:
        return presets.get_preset(name, **overrides)
    except Exception as err:  # LlamaConfig's validators raise assorted types (ValueError, StrictDataclassError)
        raise ConfigError(f"model.overrides do not give a valid architecture for preset '{name}': {err}",
                          key="model.overrides") from None


def _read_config_json(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        raise ConfigError(f"model.name_or_path '{path}' is a directory without config.json; give an HF "
                          "checkpoint directory (convert Meta checkpoints first) or a preset name",
                          key="model.name_or_path")
    try:
        values = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read {file}: {err}", key="model.name_or_path") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{file} does not hold a JSON object", key="model.name_or_path")
    return values

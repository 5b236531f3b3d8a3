"""The run-config rules that need the Llama architecture, and loading a config checked by them.

:func:`check_run_config` is what :func:`modelzoo.config.load_config` runs as ``check`` (so its
errors are located at the YAML line or override that set the key): the configured preset's
``model.overrides`` must give a valid ``LlamaConfig``, and ``samba_compile.n_chips`` must split
the model by :func:`~modelzoo.models.llama.parallelize.check_tensor_parallel`.

Torch-free: a preset without ``model.overrides`` is read from its dict; only overrides (which
``transformers.LlamaConfig`` validates) import ``transformers``.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Literal

from modelzoo.checkpoint.json_file import read_json
from modelzoo.config import ConfigError, GenerationRunConfig, ModelConfig, RunConfig, load_config
from modelzoo.config.errors import nearest

from . import presets
from .tp_rule import check_tensor_parallel


def load_run_config(name_or_path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (),
                    kind: Literal["training", "generation"] = "training") -> RunConfig | GenerationRunConfig:
    """:func:`modelzoo.config.load_config` with the architecture rules of :func:`check_run_config`."""
    return load_config(name_or_path, overrides, kind, check=check_run_config)


def check_run_config(cfg: RunConfig | GenerationRunConfig) -> None:
    """Raise ConfigError when the configured model cannot run as configured (TP degree, overrides)."""
    arch = model_heads(cfg.model)
    if arch is not None:
        heads, kv_heads, intermediate = arch
        check_tensor_parallel(heads, kv_heads, cfg.samba_compile.n_chips, cfg.model.name_or_path, intermediate)


def model_heads(model: ModelConfig) -> tuple[int, int, int | None] | None:
    """``(num_attention_heads, num_key_value_heads, intermediate_size)`` of the configured model, or
    None when unknown (``intermediate_size`` is None when a config.json lacks it).

    A preset is built with ``model.overrides``; an HF directory is read from its ``config.json``.
    A path that does not exist yet (it contains a ``/``) gives None: the checks needing it are skipped.
    """
    name = model.name_or_path
    if presets.is_preset(name):
        return _preset_arch(name, model.overrides)
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


def _preset_arch(name: str, overrides: dict[str, Any]) -> tuple[int, int, int | None]:
    """The heads, KV heads and MLP width of ``get_preset(name, **overrides)``, with override keys
    checked against LlamaConfig's fields; without overrides, read from the preset's dict."""
    if not overrides:
        values = presets.preset_dict(name)
        heads = values["num_attention_heads"]
        return heads, values.get("num_key_value_heads") or heads, values.get("intermediate_size")
    from transformers import LlamaConfig

    known = set(inspect.signature(LlamaConfig.__init__).parameters) - {"self", "kwargs"}
    known |= {key for values in presets.PRESETS.values() for key in values}  # config.json names (rope_theta)
    for key in overrides:
        if key not in known:
            near = nearest(key, sorted(known), n=1)
            hint = f"; did you mean 'model.overrides.{near[0]}'?" if near else ""
            raise ConfigError(f"unknown architecture field 'model.overrides.{key}'{hint}", key=f"model.overrides.{key}")
    try:
        arch = presets.get_preset(name, **overrides)
    except Exception as err:  # LlamaConfig's validators raise assorted types (ValueError, StrictDataclassError)
        raise ConfigError(f"model.overrides do not give a valid architecture for preset '{name}': {err}",
                          key="model.overrides") from None
    return arch.num_attention_heads, arch.num_key_value_heads, arch.intermediate_size


def _read_config_json(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        raise ConfigError(f"model.name_or_path '{path}' is a directory without config.json; give an HF "
                          "checkpoint directory (convert Meta checkpoints first) or a preset name",
                          key="model.name_or_path")
    return read_json(file, error=lambda message: ConfigError(message, key="model.name_or_path"))

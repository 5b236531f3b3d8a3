"""Build Llama models: from a preset or an HF checkpoint dir, lazily, and patched.

Models are built on the meta device first; an HF checkpoint then streams its tensors straight into
place (nothing is allocated twice), a preset is materialized and randomly initialised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from modelzoo.checkpoint.hf_weights import CheckpointError, load_weights_
from modelzoo.checkpoint.json_file import read_json
from modelzoo.config import ModelConfig

from .patch_llama import patch_llama
from .presets import get_preset, is_preset, preset_names

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_llama_config(path_or_preset: str, overrides: dict[str, Any] | None = None) -> LlamaConfig:
    """The ``LlamaConfig`` of a preset name or an HF checkpoint dir (``config.json``)."""
    overrides = overrides or {}
    if is_preset(path_or_preset):
        return get_preset(path_or_preset, **overrides)
    path = Path(path_or_preset)
    config_file = path / "config.json"
    if not config_file.is_file():
        what = "has no config.json" if path.is_dir() else "is neither a preset nor a directory"
        raise CheckpointError(
            f"'{path_or_preset}' {what}; pass an HF checkpoint dir or a preset ({', '.join(preset_names())})"
        )
    raw = read_json(config_file)
    if raw.get("model_type") != "llama":
        raise CheckpointError(
            f"{config_file}: model_type is {raw.get('model_type')!r}, not 'llama'; modelzoo.models.llama "
            "loads Llama-family checkpoints only"
        )
    config = LlamaConfig.from_pretrained(path)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _build_on_meta(config: LlamaConfig, dtype: torch.dtype | None) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    if dtype is not None:
        model.to(dtype)
    return model


def _reset_rotary(model: LlamaForCausalLM, device: torch.device | str) -> None:
    """Recompute the non-persistent rotary buffers (inv_freq) in fp32 on ``device``."""
    with torch.device(device):
        model.model.rotary_emb = LlamaRotaryEmbedding(config=model.config)


def _tied_params(config: LlamaConfig) -> dict[str, str]:
    return {"lm_head.weight": "model.embed_tokens.weight"} if config.tie_word_embeddings else {}


def build_llama(config: LlamaConfig, *, dtype: str | torch.dtype | None = "float32",
                device: str | torch.device = "cpu", checkpoint_dir: str | Path | None = None,
                seed: int | None = None) -> LlamaForCausalLM:
    """An unpatched ``LlamaForCausalLM`` for ``config``.

    ``device="meta"`` returns it unmaterialized (shapes only). Otherwise weights stream from
    ``checkpoint_dir`` when given (``dtype=None`` keeps the checkpoint's dtype), or are randomly
    initialised (seeded by ``seed``) with ``transformers``' own init.
    """
    dtype = resolve_dtype(dtype)
    model = _build_on_meta(config, dtype)
    if torch.device(device).type == "meta":
        return model
    if checkpoint_dir is not None:
        load_weights_(model, checkpoint_dir, device=device, dtype=dtype, tied=_tied_params(config))
        model.tie_weights()
    else:
        if seed is not None:
            torch.manual_seed(seed)
        model.to_empty(device=device)
        for module in model.modules():
            module._is_hf_initialized = False
        model.initialize_weights()
        model.tie_weights()
    _reset_rotary(model, device)
    return model


def from_pretrained(path_or_preset: str, *, dtype: str | torch.dtype | None = "float32",
                    device: str | torch.device = "cpu", overrides: dict[str, Any] | None = None,
                    seed: int | None = None, patch: bool = True,
                    settings: ModelConfig | None = None, prompt_loss_weight: float = 0.0,
                    **model_settings: Any) -> LlamaForCausalLM:
    """A patched Llama model from an HF checkpoint dir or a preset name.

    Args:
        path_or_preset: HF dir (``config.json`` + safetensors) or a preset (``llama2_7b``, ...).
        dtype: parameter dtype; None keeps an HF checkpoint's stored dtype.
        device: ``cpu``, ``cuda``, or ``meta`` (build shapes only, nothing materialized).
        overrides: ``LlamaConfig`` fields to replace (e.g. ``num_hidden_layers`` for a preset).
        seed: random-init seed for presets.
        patch: False returns the stock HF model.
        settings / model_settings: the patch settings, a :class:`~modelzoo.config.ModelConfig` (the
            config's ``model`` section) or its fields as keywords (``fp32_ln=True``, ``patches=[...]``).
        prompt_loss_weight: weight of prompt targets in the patched loss.
    """
    config = load_llama_config(path_or_preset, overrides)
    checkpoint_dir = None if is_preset(path_or_preset) else Path(path_or_preset)
    if checkpoint_dir is not None and dtype is None:
        dtype = None  # keep the stored dtype
    model = build_llama(config, dtype=dtype, device=device, checkpoint_dir=checkpoint_dir, seed=seed)
    if checkpoint_dir is not None and (checkpoint_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(checkpoint_dir)
    model.eval()
    if not patch:
        return model
    if settings is None:
        settings = model_settings
    elif model_settings:
        raise TypeError("pass either settings=... or patch keywords, not both")
    return patch_llama(model, settings, prompt_loss_weight=prompt_loss_weight)

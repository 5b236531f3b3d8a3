"""Architecture presets for the Llama family.

Every big preset carries the values of the official Hugging Face ``config.json`` of that checkpoint
(written in the ``config.json`` vocabulary: ``rope_theta``/``rope_scaling``), so a model built from a
preset has exactly the shapes of the published weights. Tiny presets exist for tests and demos; they
keep each family's distinguishing features (MHA vs GQA, llama3 rope scaling, tied embeddings).
The presets are plain dicts (no ``transformers`` import until :func:`get_preset` builds a config).
"""

from __future__ import annotations

import copy
import difflib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlamaConfig

_LLAMA2_COMMON: dict[str, Any] = {
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}

_LLAMA3_COMMON: dict[str, Any] = {
    "vocab_size": 128256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}


def _llama3_scaling(factor: float) -> dict[str, Any]:
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


PRESETS: dict[str, dict[str, Any]] = {
    # ---- Llama-2 (MHA, except 70B which uses GQA with 8 KV heads) ----
    "llama2_7b": {**_LLAMA2_COMMON, "hidden_size": 4096, "intermediate_size": 11008,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama2_13b": {**_LLAMA2_COMMON, "hidden_size": 5120, "intermediate_size": 13824,
                   "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40},
    "llama2_70b": {**_LLAMA2_COMMON, "hidden_size": 8192, "intermediate_size": 28672,
                   "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8},
    # ---- Llama-3 / 3.1 (GQA, 128K vocab; 3.1 adds llama3 rope scaling and 128K context) ----
    "llama3_8b": {**_LLAMA3_COMMON, "hidden_size": 4096, "intermediate_size": 14336,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "max_position_embeddings": 8192},
    "llama3_1_8b": {**_LLAMA3_COMMON, "hidden_size": 4096, "intermediate_size": 14336,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                    "max_position_embeddings": 131072, "rope_scaling": _llama3_scaling(8.0)},
    "llama3_1_70b": {**_LLAMA3_COMMON, "hidden_size": 8192, "intermediate_size": 28672,
                     "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                     "max_position_embeddings": 131072, "rope_scaling": _llama3_scaling(8.0)},
    "llama3_1_405b": {**_LLAMA3_COMMON, "hidden_size": 16384, "intermediate_size": 53248,
                      "num_hidden_layers": 126, "num_attention_heads": 128, "num_key_value_heads": 8,
                      "max_position_embeddings": 131072, "rope_scaling": _llama3_scaling(8.0)},
    # ---- Llama-3.2 (small, tied embeddings, rope scaling factor 32) ----
    "llama3_2_1b": {**_LLAMA3_COMMON, "hidden_size": 2048, "intermediate_size": 8192,
                    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                    "head_dim": 64, "max_position_embeddings": 131072,
                    "rope_scaling": _llama3_scaling(32.0), "tie_word_embeddings": True},
    "llama3_2_3b": {**_LLAMA3_COMMON, "hidden_size": 3072, "intermediate_size": 8192,
                    "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
                    "head_dim": 128, "max_position_embeddings": 131072,
                    "rope_scaling": _llama3_scaling(32.0), "tie_word_embeddings": True},
    # ---- Tiny presets for tests and demos (random weights, seconds on a CPU) ----
    # Llama-2 style: MHA, rope_theta 1e4, untied.
    "llama2_tiny": {**_LLAMA2_COMMON, "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 176,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                    "max_position_embeddings": 1024},
    # Llama-3.1 style: GQA (4 query heads share 2 KV heads), llama3 rope scaling, untied.
    "llama3_tiny": {**_LLAMA3_COMMON, "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 192,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "max_position_embeddings": 16384, "rope_scaling": _llama3_scaling(8.0),
                    "bos_token_id": 1, "eos_token_id": 2},
    # Llama-3.2 style: GQA, llama3 rope scaling (factor 32), tied embeddings.
    "llama3_2_tiny": {**_LLAMA3_COMMON, "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 192,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                      "max_position_embeddings": 16384, "rope_scaling": _llama3_scaling(32.0),
                      "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2},
}
# Benchmark model: Llama-2 architecture at ~60M parameters (33M of them in the embedding and LM
# head), small enough for a 2-core CPU, big enough that matmuls dominate.
PRESETS["llama_60m"] = {**_LLAMA2_COMMON, "hidden_size": 512, "intermediate_size": 1536,
                        "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
                        "max_position_embeddings": 2048}
# Alias: the bundled default model is the Llama-2-style tiny preset.
PRESETS["llama_tiny"] = PRESETS["llama2_tiny"]

TINY_PRESETS = ("llama2_tiny", "llama3_tiny", "llama3_2_tiny", "llama_tiny")
#: Presets of our own (not mirroring a published checkpoint): the tiny ones and the benchmark model.
SYNTHETIC_PRESETS = TINY_PRESETS + ("llama_60m",)


class UnknownPresetError(ValueError):
    """Raised for a preset name that does not exist; the message lists the nearest names."""


def preset_names() -> list[str]:
    return sorted(PRESETS)


def is_preset(name: str) -> bool:
    return name in PRESETS


def preset_dict(name: str) -> dict[str, Any]:
    """The preset's values in ``config.json`` vocabulary (a copy; safe to modify)."""
    if name not in PRESETS:
        near = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(near)}?" if near else f"known presets: {', '.join(preset_names())}"
        raise UnknownPresetError(f"unknown Llama preset '{name}': {hint}")
    return copy.deepcopy(PRESETS[name])


def get_preset(name: str, **overrides: Any) -> LlamaConfig:
    """Build a ``transformers.LlamaConfig`` for preset ``name``; ``overrides`` replace single fields."""
    from transformers import LlamaConfig

    values = preset_dict(name)
    values.update(overrides)
    return LlamaConfig(**values)

"""Llama family: presets, the compiler-backend patches, and model loading.

Public API::

    from modelzoo.models.llama import from_pretrained, patch_llama
    model = from_pretrained("llama3_tiny")            # patched, random weights
    model = from_pretrained("/path/to/hf_dir", dtype="bfloat16", fp32_logits=True)
    patch_llama(hf_model, {"fp32_ln": True})           # patch an existing HF model in place
"""

from .checks import load_run_config
from .loading import build_llama, from_pretrained, load_llama_config, resolve_dtype
from .patch_llama import (
    PATCH_NAMES,
    UnsupportedTransformersError,
    check_transformers_version,
    enabled_patches,
    is_patched,
    patch_llama,
    unpatch_llama,
)
from .presets import get_preset, is_preset, preset_names

__all__ = [
    "PATCH_NAMES",
    "UnsupportedTransformersError",
    "build_llama",
    "check_transformers_version",
    "enabled_patches",
    "from_pretrained",
    "get_preset",
    "is_patched",
    "is_preset",
    "load_llama_config",
    "load_run_config",
    "patch_llama",
    "preset_names",
    "resolve_dtype",
    "unpatch_llama",
]

"""Llama family: presets, the compiler-backend patches, and model loading.

Public API::

    from modelzoo.models.llama import from_pretrained, patch_llama
    model = from_pretrained("llama3_tiny")            # patched, random weights
    model = from_pretrained("/path/to/hf_dir", dtype="bfloat16", fp32_logits=True)
    patch_llama(hf_model, {"fp32_ln": True})           # patch an existing HF model in place

The names are imported from their submodule on first use (PEP 562), so importing this package, or
its torch-free submodules (``checks``, ``presets``, ``tp_rule``), does not import torch or
transformers: a CLI can validate a config in a fraction of a second.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

#: public name -> the submodule defining it
_EXPORTS = {
    "load_run_config": "checks",
    "build_llama": "loading",
    "from_pretrained": "loading",
    "load_llama_config": "loading",
    "resolve_dtype": "loading",
    "PATCH_NAMES": "patch_llama",
    "UnsupportedTransformersError": "patch_llama",
    "check_transformers_version": "patch_llama",
    "enabled_patches": "patch_llama",
    "is_patched": "patch_llama",
    "patch_llama": "patch_llama",
    "unpatch_llama": "patch_llama",
    "get_preset": "presets",
    "is_preset": "presets",
    "preset_names": "presets",
}

__all__ = [  # the keys of _EXPORTS, spelled out for linters and type checkers
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

if TYPE_CHECKING:
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


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """Keeps ``patch_llama`` the function: importing the submodule of that name binds the module
    as this package's attribute, which an eager ``from .patch_llama import patch_llama`` used to
    overwrite; here the binding of an exported name to its own submodule takes the name from it."""

    def __setattr__(self, name: str, value) -> None:
        if (name in _EXPORTS and isinstance(value, types.ModuleType)
                and value.__name__ == f"{__name__}.{_EXPORTS[name]}"):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

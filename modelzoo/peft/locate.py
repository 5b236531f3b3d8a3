"""Where an adapter and its base are: what the generation CLI and ``merge-lora`` accept as paths.

A user may name an adapter by the dir ``peft`` wrote, or by what a LoRA training run leaves: one
``step_NNNNNNNN/`` checkpoint (adapter + tokenizer + training state, no model weights), the run's
``checkpoint.save_dir`` or its ``latest`` pointer (the newest checkpoint). The base is whatever
``adapter_config.json``'s ``base_model_name_or_path`` names (an absolute dir for modelzoo runs), unless
the user passes one.
"""

from __future__ import annotations

from pathlib import Path

from .adapters import ADAPTER_CONFIG, AdapterError, is_adapter_dir, read_adapter_config

BASE_KEY = "base_model_name_or_path"


def resolve_adapter_dir(path: str | Path) -> Path:
    """The checkpoint a LoRA run's save_dir, run dir or ``latest`` file means (its newest); any
    other path as it is (checked when it is read)."""
    from modelzoo.checkpoint.manager import resolve_model_dir

    return Path(resolve_model_dir(path))


def holds_adapter(path: str | Path) -> bool:
    """Whether ``path`` (after :func:`resolve_adapter_dir`) is an adapter dir and no model dir."""
    path = Path(path)
    return is_adapter_dir(path) and not (path / "config.json").is_file()


def adapter_base(adapter_dir: str | Path, fix: str) -> Path:
    """The base model dir ``adapter_config.json`` names; ``fix`` says how to pass one instead
    (e.g. ``"pass --base DIR"``). Raises :class:`AdapterError` naming the file and key."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    base = config.base_model_name_or_path
    file = adapter_dir / ADAPTER_CONFIG
    if not base:
        raise AdapterError(f"{file}: key '{BASE_KEY}' is not set, so the adapter does not say which base model "
                           f"it was trained on; {fix}")
    if not Path(base).is_dir():
        raise AdapterError(f"{file}: key '{BASE_KEY}' names '{base}', which is not a directory here (moved, "
                           f"deleted, or a Hub name: modelzoo reads local model dirs); {fix}")
    return Path(base)

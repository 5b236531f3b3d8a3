"""Which format a checkpoint directory is in, and opening it as a view."""

from __future__ import annotations

from pathlib import Path

from modelzoo.checkpoint.hf_weights import CheckpointError

from .view import CheckpointView

FORMATS = ("hf", "meta", "tp-shards", "int8")


def detect_format(path: str | Path) -> str:
    """``hf``, ``int8``, ``meta`` or ``tp-shards``; raises naming what a directory lacks."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory")
    from .tp_shards import MANIFEST

    if (path / MANIFEST).is_file():
        return "tp-shards"
    if (path / "params.json").is_file() or any(path.glob("consolidated.*.pth")):
        return "meta"
    config = path / "config.json"
    if config.is_file():
        from modelzoo.checkpoint.int8 import QUANT_KEY
        from modelzoo.checkpoint.json_file import read_json

        raw = read_json(config)
        return "int8" if QUANT_KEY in raw else "hf"
    raise CheckpointError(f"{path}: not a checkpoint (no config.json, params.json + consolidated.NN.pth, "
                          "or tp_shards.json)")


def open_checkpoint(path: str | Path, *, allow_int8: bool = False, **meta_options) -> CheckpointView:
    """Open any supported format as an HF view (``meta_options`` go to the Meta reader)."""
    kind = detect_format(path)
    if kind == "meta":
        from .meta import open_meta

        return open_meta(path, **meta_options)
    if kind == "tp-shards":
        from .tp_shards import open_tp_shards

        return open_tp_shards(path)
    from .hf_dir import open_hf

    return open_hf(path, allow_int8=allow_int8)

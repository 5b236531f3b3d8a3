"""Checkpoint conversion: Meta-native <-> HF <-> per-chip TP shards, int8, and verification.

Every format is read as a :class:`~modelzoo.convert.view.CheckpointView` (HF tensor names, each
produced on demand as row blocks) and written from one, so all conversions stream: memory stays
near the largest tensor, whatever the checkpoint size. ``modelzoo-convert`` (``modelzoo.cli.convert``)
is the command line.
"""

from .formats import FORMATS, detect_format, open_checkpoint
from .view import CheckpointView, TensorSource

__all__ = ["FORMATS", "CheckpointView", "TensorSource", "detect_format", "open_checkpoint"]

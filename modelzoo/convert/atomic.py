"""Atomic output directories: build in a hidden temp dir beside the target, rename when complete.

A failure (or Ctrl-C) removes the temp dir; a hard kill leaves only ``.NAME.partial-XXXX``, which
never looks like a finished checkpoint. An existing target is replaced only with ``overwrite``, and
only after the new one is complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from modelzoo.checkpoint.hf_weights import CheckpointError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output(output: str | Path, inputs: list[str | Path], overwrite: bool) -> Path:
    """Refuse an output that exists (without ``overwrite``) or that is, contains or lies in an input."""
    out = Path(output).resolve()
    for item in inputs:
        src = Path(item).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise CheckpointError(f"--output {output} overlaps the input {item}; write to a separate directory")
    if out.exists() and not overwrite:
        raise CheckpointError(f"--output {output} already exists; pass --overwrite to replace it, or pick a new path")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--output {output} exists and is not a directory")
    return out


@contextmanager
def atomic_output_dir(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir; on success it becomes ``output`` (fsynced), on any exception it is removed."""
    final = Path(output)
    if final.exists() and not overwrite:
        raise CheckpointError(f"--output {output} already exists; pass --overwrite to replace it, or pick a new path")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        _fsync_dir(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.rename(final, old / final.name)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

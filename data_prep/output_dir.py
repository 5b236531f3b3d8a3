"""Atomic output: build in a hidden temp dir (or file) beside the target, rename into place at the end.

A run that fails or is interrupted leaves the target as it was (a hard kill can leave a hidden
``.NAME.tmp-*`` sibling, never a dataset at the target path). ``--overwrite_output_path`` replaces
an existing target only after the new one is complete, and only when the target looks like a
dataset (or is empty): nothing outside the output path is ever deleted.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from modelzoo.data_prep.errors import DataPrepError

_DATASET_MARKERS = ("metadata.yaml", "sha256")


def _check_protected(target: Path, protected: list[Path]) -> None:
    resolved = target.resolve()
    for p in protected:
        p = p.resolve()
        if p == resolved or resolved in p.parents:
            raise DataPrepError(
                f"--output_path {target} is or contains the input {p}; choose another output path"
            )


def _check_replaceable(target: Path) -> None:
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if (
        resolved == Path(resolved.anchor)
        or resolved == Path.home().resolve()
        or resolved == cwd
        or resolved in cwd.parents
    ):
        raise DataPrepError(f"--output_path {target}: refusing to replace a root, home or working directory")
    if target.is_dir() and any(target.iterdir()):
        names = {p.name for p in target.iterdir()}
        looks_like_dataset = any(m in names for m in _DATASET_MARKERS) or any(
            n.endswith(".hdf5") for n in names
        )
        if not looks_like_dataset:
            raise DataPrepError(
                f"--output_path {target} exists and does not look like a dataset (no metadata.yaml, sha256/ or "
                ".hdf5 files); refusing to delete it -- remove it yourself or choose another path"
            )


class AtomicOutput:
    """``path`` is where the result goes; build it at ``tmp`` (a dir, or a file path when not
    ``is_dir``), keep scratch files in ``work_dir``, then ``commit()``; ``abort()`` on failure.
    """

    def __init__(self, path: str, overwrite: bool, is_dir: bool, protected: list[Path] = ()):
        self.path = Path(path)
        self.is_dir = is_dir
        if self.path.exists() or self.path.is_symlink():
            if not overwrite:
                raise DataPrepError(
                    f"--output_path {self.path} already exists; pass --overwrite_output_path to replace it, "
                    "or choose another path"
                )
            if is_dir and not self.path.is_dir():
                raise DataPrepError(
                    f"--output_path {self.path} exists and is not a directory; choose another path"
                )
            if not is_dir and self.path.is_dir():
                raise DataPrepError(
                    f"--output_path {self.path} is a directory; data_prep writes one .hdf5 file"
                )
            _check_protected(self.path, list(protected))
            if is_dir:
                _check_replaceable(self.path)
        parent = self.path.absolute().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataPrepError(
                f"--output_path {self.path}: cannot create its parent directory ({err})"
            ) from err
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.work_dir = parent / f".{self.path.name}.work-{tag}"  # scratch: row files, shuffle buckets
        self.work_dir.mkdir()
        self.tmp = parent / f".{self.path.name}.tmp-{tag}"  # the result, renamed to ``path`` by commit
        if is_dir:
            self.tmp.mkdir()

    def commit(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)
        if self.path.exists() and self.is_dir:
            old = self.path.absolute().parent / f".{self.path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(self.path, old)
            os.rename(self.tmp, self.path)
            shutil.rmtree(old)
        else:
            os.replace(self.tmp, self.path)

    def abort(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)
        if self.is_dir:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            self.tmp.unlink(missing_ok=True)

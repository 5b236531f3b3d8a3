"""Atomic output on top of ``modelzoo.checkpoint.atomic``: build in hidden scratch beside the target,
rename into place at the end.

A run that fails, is interrupted or is killed leaves ``--output-path`` as it was (a kill leaves at most
hidden ``.NAME.tmp-*`` / ``.NAME.work-*`` scratch, which carries an owner file; the next run removes
it once its process is gone and says so). What ``--overwrite-output-path`` may replace, and nothing
else is ever deleted:

* a directory (``pipeline``): an empty one, or a dataset this tool or generative_data_prep wrote,
  proven by its sha256 manifest ``sha256/files_metadata.json`` listing exactly the files present
  (no file more, none missing, no directory that holds no listed file). A stray ``.hdf5`` or a
  ``metadata.yaml`` proves nothing.
* a file (``data_prep``): an HDF5 file (the HDF5 signature), replaced in one ``os.replace``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from modelzoo.checkpoint import atomic
from modelzoo.data.dataset_layout import BOOKKEEPING_FILES, MANIFEST_FILE, flat_name
from modelzoo.data_prep.errors import DataPrepError
from modelzoo.data_prep.tokenize_pack import log

WHAT, FLAG = "--output-path", "--overwrite-output-path"


@dataclass(frozen=True)
class Output:
    """Where a run builds its result: ``tmp`` (the dataset dir, or the path of the one file) and
    ``work_dir`` (row files, shuffle buckets); both inside owned scratch beside the target."""

    tmp: Path
    work_dir: Path


def manifest_proof(directory: Path) -> str | None:
    """None when ``directory``'s sha256 manifest lists exactly the files in it (a dataset we may
    replace); else why not. The manifest flattens paths, so present files are compared flattened."""
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"it has no {MANIFEST_FILE} (not a dataset written by data prep)"
    except (OSError, ValueError) as err:
        return f"its {MANIFEST_FILE} is unreadable ({err})"
    if not isinstance(manifest, dict) or not manifest:
        return f"its {MANIFEST_FILE} lists no files"
    files, _ = atomic.tree(directory)
    present = {flat_name(rel): rel for rel in files}
    listed = {present.get(name, name) for name in manifest} | {MANIFEST_FILE}
    return atomic.exactly_listed(directory, listed, ignore=set(BOOKKEEPING_FILES))


@contextmanager
def atomic_output(
    path: str | Path, overwrite: bool, is_dir: bool, inputs: list[Path] = ()
) -> Iterator[Output]:
    """Yield an ``Output``; its ``tmp`` becomes ``path`` when the block succeeds (see module doc)."""
    target = Path(path)
    if not is_dir:
        with _atomic_file(target, overwrite, list(inputs)) as out:
            yield out
        return
    with atomic.atomic_dir(
        target, kind=None, overwrite=overwrite, inputs=list(inputs), proof=manifest_proof, what=WHAT,
        overwrite_flag=FLAG, error=DataPrepError, say=log,
    ) as tmp:
        work = atomic.make_scratch(target, "work")
        try:
            yield Output(tmp, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)


@contextmanager
def _atomic_file(target: Path, overwrite: bool, inputs: list[Path]) -> Iterator[Output]:
    """The one-file job: write into owned work scratch, then ``os.replace`` onto ``target``."""
    atomic.check_no_overlap(target, inputs, what=WHAT, error=DataPrepError)
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise DataPrepError(
                f"{WHAT} {target} already exists; pass {FLAG} to replace it, or choose another path"
            )
        if target.is_dir() and not target.is_symlink():
            raise DataPrepError(f"{WHAT} {target} is a directory; data_prep writes one .hdf5 file")
        if target.is_symlink() or not target.is_file() or not _is_hdf5(target):
            raise DataPrepError(f"{WHAT} {target} exists and is not an HDF5 file; refusing to replace it -- "
                                "remove it yourself or choose another path")
    try:
        removed = atomic.clean_debris(atomic.scratch_of(target))
        work = atomic.make_scratch(target, "work")
    except OSError as err:
        raise DataPrepError(f"{WHAT} {target}: cannot write beside it ({err})") from err
    if removed:
        log(atomic.debris_note(removed))
    try:
        out = Output(work / target.name, work)
        yield out
        atomic.replace_file(out.tmp, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _is_hdf5(path: Path) -> bool:
    import h5py

    try:
        return bool(h5py.is_hdf5(path))
    except OSError:
        return False

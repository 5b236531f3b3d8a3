"""``verify``: re-check a dataset dir against the contract and its own metadata and manifest.

Checks: metadata keys and file counts (as the reader does); the sha256 manifest (every file listed,
sizes and hashes); each HDF5 file's datasets (int32, ``[n, max_seq_length]``, equal shapes); token
types in {0,1,2,3}, padding only as a suffix, no all-padding row, ids below ``vocab_size``,
separators are EOS and padding is the pad id (when the metadata names them); files balanced to
within one sequence; ``max_batch_size_*`` and per-split sequence/token counts equal to the files';
the number of test files. Manifest problems (a changed sha256) come first; an HDF5 file h5py
cannot open or read (truncated, overwritten) is one problem naming it, never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from modelzoo.data.dataset_layout import DATASET_NAMES, TEST_DIR, check_manifest
from modelzoo.data.hdf5_reader import H5_ERRORS, DatasetError, HDF5DatasetDir, damaged_file

BLOCK_ROWS = 4096


@dataclass
class VerifyReport:
    path: Path
    problems: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        if self.ok:
            return "\n".join([f"OK: {self.path}"] + [f"  {s}" for s in self.summary])
        return "\n".join(
            [f"FAILED: {self.path} ({len(self.problems)} problem(s))"] + [f"  {p}" for p in self.problems]
        )


def verify_dataset(path, checksums: bool = True) -> VerifyReport:
    from modelzoo.data.token_types import COMPLETION, PADDING, PROMPT, SEPARATOR

    report = VerifyReport(Path(path))
    try:
        ds = HDF5DatasetDir(path, check_manifest_sizes=False)
    except DatasetError as err:
        report.problems.append(str(err))
        return report
    report.problems += check_manifest(path, checksums=checksums)
    meta, L = ds.metadata, ds.max_seq_length
    eos, pad = meta.get("eos_token_id"), meta.get("pad_token_id")
    vocab = int(meta["vocab_size"])
    for split in ("train", "dev"):
        rows, counts = [], np.zeros(4, dtype=np.int64)
        for file in ds.files(split):
            n = _check_file(
                file, L, vocab, eos, pad, counts, report.problems, (PROMPT, COMPLETION, PADDING, SEPARATOR)
            )
            if n is not None:
                rows.append(n)
        if not rows:
            continue
        if max(rows) - min(rows) > 1:
            report.problems.append(
                f"{split}: files are not balanced: {min(rows)}..{max(rows)} sequences per file"
            )
        want = meta.get(f"max_batch_size_{split}")
        if want != min(rows):
            report.problems.append(
                f"metadata.yaml max_batch_size_{split}={want} but the smallest {split} file has {min(rows)}"
            )
        expected = {
            f"{split}_sequences": sum(rows),
            f"{split}_prompt_tokens": int(counts[0]),
            f"{split}_completion_tokens": int(counts[1] + counts[3]),
            f"{split}_padding_tokens": int(counts[2]),
            f"{split}_total_tokens": sum(rows) * L,
        }
        for key, value in expected.items():
            if key in meta and meta[key] != value:
                report.problems.append(f"metadata.yaml {key}={meta[key]} but the {split} files hold {value}")
        report.summary.append(
            f"{split}: {len(rows)} files, {sum(rows)} sequences of {L} "
            f"(prompt {counts[0]}, completion {counts[1] + counts[3]}, padding {counts[2]} tokens)"
        )
    test_dir = Path(path) / TEST_DIR
    n_test = len([p for p in test_dir.iterdir() if p.is_file()]) if test_dir.is_dir() else 0
    if n_test != int(meta.get("number_of_test_files") or 0):
        report.problems.append(
            f"metadata.yaml number_of_test_files={meta.get('number_of_test_files')} but {TEST_DIR}/ holds {n_test}"
        )
    report.summary.append(f"test: {n_test} files; manifest {'and sha256 ' if checksums else ''}checked")
    return report


def _check_file(file: Path, L: int, vocab: int, eos, pad, counts, problems: list[str], types) -> int | None:
    """Check one HDF5 file (rows read a block at a time); its row count, or None when it is unusable."""
    import h5py

    try:
        with h5py.File(file, "r") as f:
            return _check_rows(file, f, L, vocab, eos, pad, counts, problems, types)
    except H5_ERRORS as err:
        problems.append(str(damaged_file(file, err)))
        return None


def _check_rows(
    file: Path, f, L: int, vocab: int, eos, pad, counts, problems: list[str], types
) -> int | None:
    prompt, completion, padding, separator = types
    for name in DATASET_NAMES:
        if name not in f:
            problems.append(f"{file}: no '{name}' dataset")
            return None
        ds = f[name]
        if ds.dtype != np.int32 or ds.ndim != 2 or ds.shape[1] != L:
            problems.append(f"{file}: '{name}' is {ds.dtype} {ds.shape}; expected int32 [n, {L}]")
            return None
    ids_ds, types_ds = f["input_ids"], f["token_type_ids"]
    if ids_ds.shape != types_ds.shape:
        problems.append(f"{file}: input_ids {ids_ds.shape} and token_type_ids {types_ds.shape} differ")
        return None
    if "category_ids" in f and f["category_ids"].shape != ids_ds.shape:
        problems.append(
            f"{file}: category_ids {f['category_ids'].shape} differs from input_ids {ids_ds.shape}"
        )
    n = ids_ds.shape[0]
    for a in range(0, n, BLOCK_ROWS):
        ids, tt = ids_ds[a : a + BLOCK_ROWS], types_ds[a : a + BLOCK_ROWS]
        where = f"{file} rows {a}..{a + len(ids) - 1}"
        if not np.isin(tt, types).all():
            problems.append(
                f"{where}: token_type_ids outside {{0,1,2,3}}: {sorted(set(np.unique(tt)) - set(types))}"
            )
            continue
        counts += np.bincount(tt.reshape(-1), minlength=4)[:4]
        is_pad = tt == padding
        if (is_pad[:, :-1] & ~is_pad[:, 1:]).any():
            problems.append(f"{where}: padding followed by a non-padding token (padding must end a row)")
        if is_pad.all(axis=1).any():
            problems.append(f"{where}: a row of padding only")
        if (ids < 0).any() or (ids >= vocab).any():
            problems.append(f"{where}: input_ids outside [0, vocab_size={vocab})")
        if eos is not None and (ids[tt == separator] != eos).any():
            problems.append(f"{where}: a separator (type 3) that is not the EOS id {eos}")
        if pad is not None and (ids[is_pad] != pad).any():
            problems.append(f"{where}: a padding token that is not the pad id {pad}")
    return n

"""The HDF5 dataset directory contract (ARCHITECTURE.md, Contracts), shared by the writer (data_prep) and the reader.

Layout, compatible with SambaNova's generative_data_prep::

    train_{i}_of_{N}.hdf5, dev_{i}_of_{M}.hdf5   i counts from 1; datasets input_ids, token_type_ids,
                                                int32 [num_sequences, max_seq_length]
    test_files/test_{i}_of_{T}.jsonl            raw test lines
    tokenizer/                                  save_pretrained output
    metadata.yaml                               REQUIRED_METADATA_KEYS + per-split counts
    sha256/files_metadata.json                  {flat_name: {sha256, size, modified_time}}

The manifest names a file by its path relative to the dataset dir with ``/`` replaced by ``_``
(``tokenizer/tokenizer.json`` -> ``tokenizer_tokenizer.json``), as generative_data_prep does. It
never lists the bookkeeping files of modelzoo's atomic writes (``.modelzoo-scratch.json``,
``.modelzoo-output.json``): a kill at the wrong instant may leave one in a finished dataset, which is
still whole. Nothing here imports torch, so data-prep worker processes stay light.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from modelzoo.checkpoint.atomic import OUTPUT_MARKER, SCRATCH_OWNER

REQUIRED_METADATA_KEYS = (
    "max_seq_length",
    "token_type_ids",
    "vocab_size",
    "tokenizer_model_type",
    "number_of_training_files",
    "number_of_dev_files",
    "number_of_test_files",
    "max_batch_size_train",
    "max_batch_size_dev",
)
METADATA_FILE = "metadata.yaml"
MANIFEST_DIR = "sha256"
MANIFEST_FILE = "sha256/files_metadata.json"
TOKENIZER_DIR = "tokenizer"
TEST_DIR = "test_files"
DATASET_NAMES = ("input_ids", "token_type_ids")
SPLIT_FILE_RE = re.compile(r"^(train|dev)_(\d+)_of_(\d+)\.hdf5$")
BOOKKEEPING_FILES = (SCRATCH_OWNER, OUTPUT_MARKER)  # top level only; never part of a dataset


def split_file_name(split: str, index: int, count: int) -> str:
    """``train_3_of_8.hdf5`` for split 'train', index 3 (counting from 1), count 8."""
    return f"{split}_{index}_of_{count}.hdf5"


def split_files(dataset_dir: str | os.PathLike, split: str) -> list[Path]:
    """The ``{split}_{i}_of_{N}.hdf5`` files of a dataset dir, ordered by i."""
    found = []
    for path in Path(dataset_dir).iterdir():
        match = SPLIT_FILE_RE.match(path.name)
        if match and match.group(1) == split:
            found.append((int(match.group(2)), path))
    return [path for _, path in sorted(found)]


def sha256_of(path: str | os.PathLike, block_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(block_size), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_entries(dataset_dir: str | os.PathLike) -> dict[str, Path]:
    """``{flat_name: path}`` of every file in the dataset dir except the manifest dir itself and the
    top-level ``BOOKKEEPING_FILES``."""
    root = Path(dataset_dir)
    entries = {}
    for folder, dirnames, filenames in os.walk(root):
        rel_folder = Path(folder).relative_to(root)
        if rel_folder.parts[:1] == (MANIFEST_DIR,):
            dirnames[:] = []
            continue
        dirnames.sort()
        for name in sorted(filenames):
            if rel_folder == Path(".") and name in BOOKKEEPING_FILES:
                continue
            rel = (rel_folder / name).as_posix()
            entries[flat_name(rel)] = Path(folder) / name
    return entries


def flat_name(relative_path: str) -> str:
    """The manifest's name of a file: ``tokenizer/tokenizer.json`` -> ``tokenizer_tokenizer.json``."""
    return relative_path.replace("/", "_")


def write_manifest(dataset_dir: str | os.PathLike) -> Path:
    """Hash every file of the dataset dir into ``sha256/files_metadata.json``; returns its path."""
    root = Path(dataset_dir)
    (root / MANIFEST_DIR).mkdir(exist_ok=True)
    manifest = {
        name: {"sha256": sha256_of(path), "size": path.stat().st_size, "modified_time": path.stat().st_mtime}
        for name, path in manifest_entries(root).items()
    }
    out = root / MANIFEST_FILE
    out.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return out


def check_manifest(dataset_dir: str | os.PathLike, checksums: bool = True) -> list[str]:
    """Problems found comparing the dataset dir with its manifest (empty list: all good).

    Checks that every file is listed, every listed file exists with the listed size and, with
    ``checksums``, the listed sha256. ``modified_time`` is informational only.
    """
    root = Path(dataset_dir)
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        return [f"{manifest_path}: missing sha256 manifest (rebuild the dataset with modelzoo-data-prep)"]
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return [f"{manifest_path}: unreadable manifest ({err})"]
    problems = []
    entries = manifest_entries(root)
    for name in sorted(set(manifest) - set(entries)):
        problems.append(f"{manifest_path}: lists '{name}', which is missing from {root}")
    for name in sorted(set(entries) - set(manifest)):
        problems.append(
            f"{entries[name]}: not listed in {manifest_path} (a file added after the dataset was made)"
        )
    for name in sorted(set(entries) & set(manifest)):
        record, path = manifest[name], entries[name]
        if not isinstance(record, dict) or "size" not in record or "sha256" not in record:
            problems.append(f"{manifest_path}: entry '{name}' lacks size/sha256")
            continue
        size = path.stat().st_size
        if size != record["size"]:
            problems.append(
                f"{path}: size {size} differs from the manifest's {record['size']} (file changed)"
            )
        elif checksums and sha256_of(path) != record["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (file changed or corrupt)")
    return problems

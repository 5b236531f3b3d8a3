"""Write small HDF5 datasets in the data-prep layout, for training tests (no tokenizer needed).

Each article is a prompt of random tokens followed by a completion that repeats the prompt
(a learnable copy task), then a separator; articles are packed greedily into rows and padded.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import yaml

from modelzoo.data.dataset_layout import write_manifest


def _rows(n_rows: int, seq_len: int, vocab: int, rng: np.random.Generator):
    ids = np.zeros((n_rows, seq_len), dtype=np.int32)
    types = np.full((n_rows, seq_len), 2, dtype=np.int32)
    for r in range(n_rows):
        pos = 0
        while True:
            k = int(rng.integers(3, 8))
            need = 2 * k + 1
            if pos + need > seq_len:
                break
            prompt = rng.integers(3, vocab, size=k)
            ids[r, pos:pos + k], types[r, pos:pos + k] = prompt, 0
            ids[r, pos + k:pos + 2 * k], types[r, pos + k:pos + 2 * k] = prompt, 1
            ids[r, pos + 2 * k], types[r, pos + 2 * k] = 2, 3  # EOS closes the article
            pos += need
        ids[r, pos:] = 2  # pad with EOS id, type 2
    return ids, types


SAMPLE_TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "sample" / "tokenizer"


def write_dataset(root: Path, *, n_train_files: int = 2, rows_per_file: int = 16, n_dev: int = 8,
                  seq_len: int = 32, vocab: int = 64, seed: int = 0, tokenizer: Path | None = None) -> Path:
    """A dataset dir; ``tokenizer`` (e.g. :data:`SAMPLE_TOKENIZER`) is copied to ``tokenizer/`` as data
    prep does, so training copies its files into every checkpoint."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        shutil.copytree(tokenizer, root / "tokenizer")
    for i in range(1, n_train_files + 1):
        ids, types = _rows(rows_per_file, seq_len, vocab, rng)
        with h5py.File(root / f"train_{i}_of_{n_train_files}.hdf5", "w") as f:
            f.create_dataset("input_ids", data=ids)
            f.create_dataset("token_type_ids", data=types)
    if n_dev:
        ids, types = _rows(n_dev, seq_len, vocab, rng)
        with h5py.File(root / "dev_1_of_1.hdf5", "w") as f:
            f.create_dataset("input_ids", data=ids)
            f.create_dataset("token_type_ids", data=types)
    meta = {"max_seq_length": seq_len, "token_type_ids": True, "vocab_size": vocab,
            "tokenizer_model_type": "synthetic", "number_of_training_files": n_train_files,
            "number_of_dev_files": 1 if n_dev else 0, "number_of_test_files": 0,
            "max_batch_size_train": rows_per_file * n_train_files, "max_batch_size_dev": n_dev}
    (root / "metadata.yaml").write_text(yaml.safe_dump(meta))
    write_manifest(root)
    return root

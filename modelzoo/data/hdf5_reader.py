"""Read a packed HDF5 dataset dir (the contract in ARCHITECTURE.md) for training.

    ds = HDF5DatasetDir("data/sample_hdf5", max_seq_length=256)   # validates metadata + manifest
    train = ds.dataset("train")                                     # map-style: train[i] -> dict of int64 [L]
    sampler = ShardedSampler(len(train), rank=r, world_size=w, seed=0)
    loader = torch.utils.data.DataLoader(train, batch_size=8, sampler=sampler, drop_last=True)
    state = sampler.state_dict(); ...; sampler.load_state_dict(state)   # resume mid-epoch

Datasets made by modelzoo-data-prep and by SambaNova's generative_data_prep both load: int32
``input_ids`` / ``token_type_ids`` of shape ``[num_sequences, max_seq_length]`` in
``train_{i}_of_{N}.hdf5`` / ``dev_{i}_of_{M}.hdf5``, with ``metadata.yaml``. ``ds.reader(split)``
reads rows lazily (what training uses); ``ds.load(split)`` / ``ds.dataset(split)`` read the split
whole into memory (int32 numpy), files in index order; both go through the same file checks.
A damaged file (truncated, overwritten) is a one-line ``DatasetError`` naming it, on open or on any
later read; ``checksums=True`` finds damage h5py cannot see (the sha256 manifest).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from modelzoo.data.dataset_layout import (
    DATASET_NAMES,
    MANIFEST_FILE,
    METADATA_FILE,
    REQUIRED_METADATA_KEYS,
    TOKENIZER_DIR,
    check_manifest,
    split_files,
)

_SPLITS = {"train": "number_of_training_files", "dev": "number_of_dev_files"}
H5_ERRORS = (OSError, RuntimeError, KeyError)  # what h5py raises on a damaged file


class DatasetError(ValueError):
    """A dataset dir that breaks the contract; the message names the file or key and the fix."""


def damaged_file(path: Path, err: Exception, doing: str = "read") -> DatasetError:
    """The one-line error for an HDF5 file h5py failed to open or read (its reason: first line)."""
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return DatasetError(f"{path}: not a readable dataset file (cannot {doing} it: {reason}); the file is "
                        "damaged or not HDF5 -- restore it or re-run data prep")


@dataclass
class SplitArrays:
    """A whole split: input_ids, token_type_ids int32 ``[N, L]``."""

    input_ids: np.ndarray
    token_type_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


class HDF5DatasetDir:
    """An opened, validated dataset directory.

    Checks on open: metadata.yaml has every required key; ``max_seq_length`` matches the caller's;
    the train/dev files are exactly ``{split}_1..N_of_N.hdf5`` with N from the metadata; the sha256
    manifest lists exactly the files present with their sizes (``checksums=True`` also re-hashes,
    which reads every byte; ``modelzoo-data-prep verify`` does that and more).
    """

    def __init__(
        self,
        path,
        max_seq_length: int | None = None,
        check_manifest_sizes: bool = True,
        checksums: bool = False,
    ):
        self.path = Path(path)
        if not self.path.is_dir():
            raise DatasetError(
                f"dataset dir {self.path} does not exist (build it with modelzoo-data-prep pipeline)"
            )
        self.metadata = _read_metadata(self.path / METADATA_FILE)
        self.max_seq_length = int(self.metadata["max_seq_length"])
        if max_seq_length is not None and max_seq_length != self.max_seq_length:
            raise DatasetError(
                f"{self.path / METADATA_FILE}: max_seq_length is {self.max_seq_length} but {max_seq_length} was asked "
                f"for; set training.max_seq_length={self.max_seq_length} or rebuild with --max-seq-length {max_seq_length}"
            )
        self._files = {split: self._check_files(split, key) for split, key in _SPLITS.items()}
        if check_manifest_sizes or checksums:
            if (self.path / MANIFEST_FILE).is_file():
                problems = check_manifest(self.path, checksums=checksums)
                if problems:
                    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                    raise DatasetError(f"{problems[0]}{more}; rebuild the dataset or restore the file")
            else:
                warnings.warn(f"{self.path}: no {MANIFEST_FILE}; file integrity not checked", stacklevel=2)

    def _check_files(self, split: str, key: str) -> list[Path]:
        expected = int(self.metadata.get(key) or 0)
        files = split_files(self.path, split)
        names = [p.name for p in files]
        want = [f"{split}_{i}_of_{expected}.hdf5" for i in range(1, expected + 1)]
        if names != want:
            raise DatasetError(
                f"{self.path}: metadata.yaml {key}={expected} but the {split} files are {names or 'none'} "
                f"(expected {want[:3]}{'...' if len(want) > 3 else ''}); the dataset is incomplete or mixed"
            )
        return files

    @property
    def tokenizer_dir(self) -> Path | None:
        path = self.path / TOKENIZER_DIR
        return path if path.is_dir() else None

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse token ids a model of ``vocab_size`` has no embedding for (the metadata's tokenizer is larger)."""
        if int(self.metadata["vocab_size"]) > vocab_size:
            raise DatasetError(f"{self.path / METADATA_FILE}: tokenizer vocab_size {self.metadata['vocab_size']} exceeds "
                               f"the model's vocab_size {vocab_size}; use the model's tokenizer for data prep")

    def files(self, split: str) -> list[Path]:
        if split not in self._files:
            raise DatasetError(f"unknown split '{split}'; one of: {', '.join(self._files)}")
        return list(self._files[split])

    def reader(self, split: str = "train") -> SplitReader:
        """Lazy row access to the split (files in index order), every file checked on open."""
        return SplitReader(self.files(split), self.max_seq_length)

    def load(self, split: str = "train") -> SplitArrays:
        """The split's sequences, files concatenated in index order: int32 ``[N, L]`` each."""
        with self.reader(split) as reader:
            return reader.read_all()

    def dataset(self, split: str = "train") -> PackedSequenceDataset:
        arrays = self.load(split)
        return PackedSequenceDataset(arrays.input_ids, arrays.token_type_ids)


class SplitReader:
    """Random row access across the ``{split}_{i}_of_{N}.hdf5`` files of one split, read lazily
    (memory does not grow with the data). Each file is checked on open: both datasets present,
    integer, equal 2-D shapes, ``max_seq_length`` wide (when given; else the files must agree)."""

    def __init__(self, files: list[Path], max_seq_length: int | None = None) -> None:
        import h5py

        self.files = list(files)
        self.handles, sizes, widths = [], [], set()
        try:
            for path in self.files:
                try:
                    handle = h5py.File(path, "r")
                except H5_ERRORS as err:
                    raise damaged_file(path, err, "open") from err
                self.handles.append(handle)
                try:
                    shape = _check_datasets(path, handle, max_seq_length)
                except H5_ERRORS as err:
                    raise damaged_file(path, err) from err
                sizes.append(shape[0])
                widths.add(shape[1])
            if len(widths) > 1:
                raise DatasetError(f"{self.files[0].parent}: files disagree on max_seq_length ({sorted(widths)}); "
                                   "re-run data prep")
        except DatasetError:
            self.close()
            raise
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.seq_len = widths.pop() if widths else (max_seq_length or 0)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __enter__(self) -> SplitReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self.handles:
            handle.close()
        self.handles = []

    def rows(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """Rows ``indices`` (any order) as int64 ``[len(indices), seq_len]`` tensors; a damaged file
        is a DatasetError naming it."""
        indices = np.asarray(indices, dtype=np.int64)
        out_ids = np.empty((len(indices), self.seq_len), dtype=np.int64)
        out_types = np.empty_like(out_ids)
        file_of = np.searchsorted(self.offsets, indices, side="right") - 1
        for f in np.unique(file_of):
            sel = np.nonzero(file_of == f)[0]
            rows, where = np.unique(indices[sel] - self.offsets[f], return_inverse=True)  # h5py: increasing
            handle = self.handles[f]
            try:
                out_ids[sel] = handle["input_ids"][rows][where]
                out_types[sel] = handle["token_type_ids"][rows][where]
            except H5_ERRORS as err:
                raise damaged_file(self.files[f], err) from err
        return {"input_ids": torch.from_numpy(out_ids), "token_type_ids": torch.from_numpy(out_types)}

    def read_all(self) -> SplitArrays:
        """Every row, files concatenated in order, as int32 arrays."""
        if not self.handles:
            empty = np.zeros((0, self.seq_len), dtype=np.int32)
            return SplitArrays(empty, empty.copy())
        parts = {name: [] for name in DATASET_NAMES}
        for path, handle in zip(self.files, self.handles, strict=True):
            try:
                for name in DATASET_NAMES:
                    parts[name].append(np.asarray(handle[name][...], dtype=np.int32))
            except H5_ERRORS as err:
                raise damaged_file(path, err) from err
        return SplitArrays(*(np.concatenate(parts[name]) for name in DATASET_NAMES))


def _check_datasets(path: Path, handle, max_seq_length: int | None) -> tuple[int, int]:
    """The ``[num_sequences, width]`` shape both datasets of one data file share, or a DatasetError."""
    shapes = set()
    for name in DATASET_NAMES:
        if name not in handle:
            raise DatasetError(f"{path}: no '{name}' dataset (not a packed data-prep file); re-run data prep")
        ds = handle[name]
        width = max_seq_length if max_seq_length is not None else (ds.shape[1] if ds.ndim == 2 else None)
        if ds.ndim != 2 or ds.shape[1] != width or not np.issubdtype(ds.dtype, np.integer):
            raise DatasetError(
                f"{path}: '{name}' is {ds.dtype} {ds.shape}; expected int32 [num_sequences, {width or 'L'}] "
                "(max_seq_length of metadata.yaml); re-run data prep")
        shapes.add(ds.shape)
    if len(shapes) != 1:
        raise DatasetError(f"{path}: input_ids and token_type_ids differ in shape: {sorted(shapes)}; re-run data prep")
    return shapes.pop()


def _read_metadata(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path} is missing; a dataset dir needs the metadata.yaml written by data prep")
    try:
        metadata = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise DatasetError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(metadata, dict):
        raise DatasetError(f"{path}: expected a mapping of keys, got {type(metadata).__name__}")
    missing = [k for k in REQUIRED_METADATA_KEYS if k not in metadata]
    if missing:
        raise DatasetError(
            f"{path}: missing key(s) {', '.join(missing)}; rebuild the dataset with modelzoo-data-prep"
        )
    return metadata


class PackedSequenceDataset(torch.utils.data.Dataset):
    """Map-style dataset over packed rows: ``ds[i]`` -> {"input_ids", "token_type_ids"}: int64 ``[L]``."""

    def __init__(self, input_ids: np.ndarray, token_type_ids: np.ndarray):
        if input_ids.shape != token_type_ids.shape or input_ids.ndim != 2:
            raise ValueError(
                f"input_ids {input_ids.shape} and token_type_ids {token_type_ids.shape} must be equal [N, L]"
            )
        self.input_ids = input_ids
        self.token_type_ids = token_type_ids

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.from_numpy(self.input_ids[index].astype(np.int64)),
            "token_type_ids": torch.from_numpy(self.token_type_ids[index].astype(np.int64)),
        }


class ShardedSampler(torch.utils.data.Sampler):
    """Indices of one data-parallel rank, in a seeded per-epoch order, resumable mid-epoch.

    Epoch e: a permutation of ``range(num_samples)`` from ``np.random.default_rng([seed, e])``
    (identity with ``shuffle=False``), cut to a multiple of ``world_size`` (``drop_last``; else
    wrapped around to fill), and rank r takes positions r, r + world_size, ... . The ranks' index
    sets are disjoint and together cover the (cut) epoch.

    ``state_dict()`` records how many indices this rank has yielded in the current epoch; iteration
    after ``load_state_dict`` continues right after them. Exhausting an iterator moves to the next
    epoch. With a DataLoader, the count is exact when ``num_workers=0`` (indices are drawn one batch
    at a time); with prefetching workers, save the consumed count yourself via ``position``.
    """

    def __init__(
        self,
        num_samples: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        if num_samples < world_size and drop_last:
            raise ValueError(
                f"{num_samples} sequences cannot give each of {world_size} ranks one; use fewer ranks or more data"
            )
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0
        self.position = 0

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's indices for ``epoch``: int64 ``[len(self)]``."""
        n, w = self.num_samples, self.world_size
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            order = np.arange(n)
        total = (n // w) * w if self.drop_last else -(-n // w) * w
        order = np.resize(order, total)  # cut, or wrap around to fill
        return order[self.rank :: w]

    def __len__(self) -> int:
        n, w = self.num_samples, self.world_size
        return n // w if self.drop_last else -(-n // w)

    def __iter__(self):
        indices = self.epoch_indices(self.epoch)
        while self.position < len(indices):
            index = int(indices[self.position])
            self.position += 1
            yield index
        self.epoch += 1
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_samples": self.num_samples,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "world_size", "num_samples", "shuffle", "drop_last"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"cannot resume: the saved sampler has {key}={state.get(key)} but this one {key}={getattr(self, key)} "
                    "(same dataset, seed and data-parallel size are needed to continue the same order)"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

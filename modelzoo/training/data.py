"""Training batches from an HDF5 dataset dir: DP-sharded, seeded per-epoch order, resumable.

Order: epoch ``e`` visits the split's sequences in ``randperm(N, seed + e)``. Each micro-step takes
the next ``batch_size * dp_world`` of them (an incomplete tail is dropped) and DP rank ``r`` gets
slice ``[r * batch_size, (r + 1) * batch_size)``; so DP=k over batch B sees exactly the rows a
single process sees with batch k*B. The position (epoch, micro-step) is the resumable state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch


class DatasetError(RuntimeError):
    """The dataset dir is missing, corrupt, or does not match the run config (message names the fix)."""


class SplitReader:
    """Random row access across the ``{split}_{i}_of_{N}.hdf5`` files of one split."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.handles, sizes = [], []
        for path in files:
            try:
                handle = h5py.File(path, "r")
                ids, types = handle["input_ids"], handle["token_type_ids"]
            except (OSError, KeyError) as err:
                raise DatasetError(f"{path}: not a readable dataset file ({err}); re-run data prep") from err
            if ids.shape != types.shape or ids.ndim != 2:
                raise DatasetError(f"{path}: input_ids {ids.shape} and token_type_ids {types.shape} must be "
                                   "equal 2-D shapes [num_sequences, max_seq_length]; re-run data prep")
            self.handles.append(handle)
            sizes.append(ids.shape[0])
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        widths = {h["input_ids"].shape[1] for h in self.handles}
        if len(widths) > 1:
            raise DatasetError(f"{files[0].parent}: files disagree on max_seq_length ({sorted(widths)})")
        self.seq_len = widths.pop() if widths else 0

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def rows(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """Rows ``indices`` (any order) as int64 ``[len(indices), seq_len]`` tensors."""
        out_ids = np.empty((len(indices), self.seq_len), dtype=np.int64)
        out_types = np.empty_like(out_ids)
        file_of = np.searchsorted(self.offsets, indices, side="right") - 1
        for f in np.unique(file_of):
            sel = np.nonzero(file_of == f)[0]
            local = indices[sel] - self.offsets[f]
            order = np.argsort(local)
            rows = local[order]  # h5py reads increasing indices
            handle = self.handles[f]
            out_ids[sel[order]] = handle["input_ids"][rows]
            out_types[sel[order]] = handle["token_type_ids"][rows]
        return {"input_ids": torch.from_numpy(out_ids), "token_type_ids": torch.from_numpy(out_types)}


@dataclass
class LoaderState:
    epoch: int = 0
    micro_step: int = 0  # micro-steps taken in this epoch


class ShardedLoader:
    """Micro-batches for one DP rank (see module doc)."""

    def __init__(self, reader: SplitReader, batch_size: int, dp_rank: int, dp_world: int, seed: int,
                 shuffle: bool = True) -> None:
        self.reader, self.batch_size = reader, batch_size
        self.dp_rank, self.dp_world, self.seed, self.shuffle = dp_rank, dp_world, seed, shuffle
        self.state = LoaderState()
        if self.steps_per_epoch == 0:
            raise DatasetError(f"the split has {len(reader)} sequences, fewer than one global batch "
                               f"(training.batch_size {batch_size} x data_parallel.world_size {dp_world}); "
                               "lower the batch size or prepare more data")

    @property
    def steps_per_epoch(self) -> int:
        return len(self.reader) // (self.batch_size * self.dp_world)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.reader))
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.reader), generator=gen).numpy()

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.state.micro_step >= self.steps_per_epoch:
            self.state = LoaderState(self.state.epoch + 1, 0)
        global_batch = self.batch_size * self.dp_world
        start = self.state.micro_step * global_batch + self.dp_rank * self.batch_size
        indices = self._order(self.state.epoch)[start:start + self.batch_size]
        self.state.micro_step += 1
        return self.reader.rows(indices)

    def epoch_batches(self):
        """All micro-batches of one pass in order, without touching the resumable state (for eval)."""
        order = self._order(0)
        global_batch = self.batch_size * self.dp_world
        for step in range(self.steps_per_epoch):
            start = step * global_batch + self.dp_rank * self.batch_size
            yield self.reader.rows(order[start:start + self.batch_size])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.state.epoch, "micro_step": self.state.micro_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = LoaderState(int(state["epoch"]), int(state["micro_step"]))


def split_files(dataset_dir: Path, split: str) -> list[Path]:
    """``{split}_{i}_of_{N}.hdf5`` files in index order; checks that all N are present."""
    files = sorted(dataset_dir.glob(f"{split}_*_of_*.hdf5"), key=lambda p: int(p.stem.split("_")[1]))
    if files:
        total = int(files[0].stem.rsplit("_", 1)[1])
        missing = sorted(set(range(1, total + 1)) - {int(p.stem.split("_")[1]) for p in files})
        if missing:
            raise DatasetError(f"{dataset_dir}: {split} file(s) {', '.join(f'{split}_{i}_of_{total}.hdf5' for i in missing)} "
                               "missing; copy the complete dataset dir or re-run data prep")
    return files


def read_metadata(dataset_dir: Path) -> dict:
    """``metadata.yaml`` as a dict ({} when the dir has none, e.g. a hand-made dataset)."""
    import yaml

    path = dataset_dir / "metadata.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise DatasetError(f"{path}: invalid YAML ({err}); re-run data prep") from err
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a mapping of metadata keys; re-run data prep")
    return data


def open_training_data(dataset_dir: str | None, max_seq_length: int, vocab_size: int,
                       dp_world: int) -> tuple[SplitReader, SplitReader | None, dict]:
    """Train (and dev, if any) readers for a run, after checking the dataset against the config."""
    if not dataset_dir:
        raise DatasetError("training.dataset_dir is not set; point it at a dataset dir made by modelzoo-data-prep")
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DatasetError(f"training.dataset_dir '{root}' does not exist; build it with modelzoo-data-prep "
                           "or fix the path")
    meta = read_metadata(root)
    train_files = split_files(root, "train")
    if not train_files:
        raise DatasetError(f"{root}: no train_*_of_*.hdf5 files; is this a modelzoo-data-prep output dir?")
    if "max_seq_length" in meta and int(meta["max_seq_length"]) != max_seq_length:
        raise DatasetError(f"{root / 'metadata.yaml'}: max_seq_length {meta['max_seq_length']} != "
                           f"training.max_seq_length {max_seq_length}; set training.max_seq_length="
                           f"{meta['max_seq_length']} or re-run data prep")
    if "vocab_size" in meta and int(meta["vocab_size"]) > vocab_size:
        raise DatasetError(f"{root / 'metadata.yaml'}: tokenizer vocab_size {meta['vocab_size']} exceeds the "
                           f"model's vocab_size {vocab_size}; use the model's tokenizer for data prep")
    if dp_world > len(train_files):
        raise DatasetError(f"data_parallel.world_size={dp_world} exceeds the {len(train_files)} training files "
                           f"of {root}; re-run data prep with --num_training_splits >= {dp_world} "
                           "or lower data_parallel.world_size")
    train = SplitReader(train_files)
    if train.seq_len != max_seq_length:
        raise DatasetError(f"{train_files[0]}: sequences are {train.seq_len} tokens but training.max_seq_length "
                           f"is {max_seq_length}; set training.max_seq_length={train.seq_len}")
    dev_files = split_files(root, "dev")
    return train, (SplitReader(dev_files) if dev_files else None), meta

"""Training batches from an HDF5 dataset dir: DP-sharded, seeded per-epoch order, resumable.

The dataset dir is validated by ``modelzoo.data.hdf5_reader.HDF5DatasetDir`` (metadata, file set,
manifest) and its ``SplitReader`` (each file); rows are read lazily, so memory does not grow with
the data.
Order: ``ShardedSampler.epoch_indices`` (seeded permutation per epoch, rank r takes positions
r, r + dp_world, ...); micro-step k takes the rank's next ``batch_size`` indices, so the union over
DP ranks is exactly the k-th batch of ``batch_size * dp_world`` a single process would take.
The position (epoch, micro-step) is the resumable state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from modelzoo.data.hdf5_reader import DatasetError, HDF5DatasetDir, ShardedSampler, SplitReader

__all__ = ["DatasetError", "ShardedLoader", "SplitReader", "check_sequence_length", "open_training_data"]


@dataclass
class LoaderState:
    epoch: int = 0
    micro_step: int = 0  # micro-steps taken in this epoch


class ShardedLoader:
    """Micro-batches for one DP rank (see module doc)."""

    def __init__(self, reader: SplitReader, batch_size: int, dp_rank: int, dp_world: int, seed: int,
                 shuffle: bool = True) -> None:
        self.reader, self.batch_size = reader, batch_size
        self.sampler = ShardedSampler(len(reader), rank=dp_rank, world_size=dp_world, seed=seed, shuffle=shuffle)
        self.state = LoaderState()
        if self.steps_per_epoch == 0:
            raise DatasetError(f"the split has {len(reader)} sequences, fewer than one global batch "
                               f"(training.batch_size {batch_size} x data_parallel.world_size {dp_world}); "
                               "lower the batch size or prepare more data")

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler) // self.batch_size

    def _batch(self, epoch: int, micro_step: int) -> dict[str, torch.Tensor]:
        start = micro_step * self.batch_size
        return self.reader.rows(self.sampler.epoch_indices(epoch)[start:start + self.batch_size])

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.state.micro_step >= self.steps_per_epoch:
            self.state = LoaderState(self.state.epoch + 1, 0)
        batch = self._batch(self.state.epoch, self.state.micro_step)
        self.state.micro_step += 1
        return batch

    def epoch_batches(self):
        """All micro-batches of epoch 0 in order, without touching the resumable state (for eval)."""
        for step in range(self.steps_per_epoch):
            yield self._batch(0, step)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.state.epoch, "micro_step": self.state.micro_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = LoaderState(int(state["epoch"]), int(state["micro_step"]))


def check_sequence_length(max_seq_length: int, config, allow_long: bool, source: str) -> None:
    """Refuse a ``training.max_seq_length`` beyond the positions the model was built for."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit and max_seq_length > limit and not allow_long:
        raise DatasetError(f"training.max_seq_length={max_seq_length} exceeds max_position_embeddings={limit} of "
                           f"the model '{source}'; use training.max_seq_length<={limit} (and data prep with "
                           "--max-seq-length to match), or set training.allow_long_sequences=true to train on "
                           "positions the model never saw")


def open_training_data(dataset_dir: str | None, max_seq_length: int, vocab_size: int,
                       dp_world: int, checksums: bool = False) -> tuple[SplitReader, SplitReader | None, dict]:
    """Train (and dev, if any) readers for a run, after checking the dataset against the config;
    ``checksums`` re-hashes every file against the sha256 manifest."""
    if not dataset_dir:
        raise DatasetError("training.dataset_dir is not set; point it at a dataset dir made by modelzoo-data-prep")
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DatasetError(f"training.dataset_dir '{root}' does not exist; build it with modelzoo-data-prep "
                           "or fix the path")
    dataset = HDF5DatasetDir(root, max_seq_length=max_seq_length, checksums=checksums)
    meta = dataset.metadata
    dataset.check_vocab(vocab_size)
    train_files = dataset.files("train")
    if not train_files:
        raise DatasetError(f"{root}: no training files (number_of_training_files is 0); re-run data prep")
    if dp_world > len(train_files):
        raise DatasetError(f"data_parallel.world_size={dp_world} exceeds the {len(train_files)} training files "
                           f"of {root}; re-run data prep with --num-training-splits >= {dp_world} "
                           "or lower data_parallel.world_size")
    train = dataset.reader("train")  # files narrower or wider than max_seq_length are refused here
    return train, (dataset.reader("dev") if dataset.files("dev") else None), meta

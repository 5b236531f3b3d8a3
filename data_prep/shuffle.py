"""Seeded line order: as read (``False``), permuted in RAM (``on_RAM``), or an external shuffle
(``large_file``) whose RAM use is bounded by a budget, not by the input size."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from modelzoo.data_prep.errors import DataPrepError
from modelzoo.data_prep.input_files import InputFile, LineBlock, LineLimit, read_line_blocks

OUT_BLOCK_LINES = 16384
MAX_BUCKETS = 4096


def shuffled_lines(
    files: list[InputFile], mode: str, seed: int, ram_budget_bytes: int, work_dir: Path,
    limit: LineLimit | None = None,
) -> Iterator[LineBlock]:
    """Every non-blank input line (within ``limit``) once, in the order ``mode`` gives (deterministic
    for a seed)."""
    if mode == "False":
        return read_line_blocks(files, limit=limit)
    if mode == "on_RAM":
        return _shuffle_in_ram(files, seed, limit)
    return ExternalShuffle(files, seed, ram_budget_bytes, work_dir, limit)


def _available_ram() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _shuffle_in_ram(files: list[InputFile], seed: int, limit: LineLimit | None) -> Iterator[LineBlock]:
    total = sum(f.size for f in files)
    available = _available_ram()
    needed = 2 * total + (256 << 20)  # the lines plus their Python objects, roughly
    if available is not None and needed > available:
        raise DataPrepError(
            f"--shuffle on_RAM needs about {needed >> 20} MB of RAM for {total >> 20} MB of input, but only "
            f"{available >> 20} MB is available; use --shuffle large_file (bounded by --shuffle-ram-mb)"
        )
    lines: list[bytes] = []
    file_idx, line_no = [], []
    for block in read_line_blocks(files, limit=limit):
        lines.extend(block.lines)
        file_idx.append(block.file_idx)
        line_no.append(block.line_no)
    if not lines:
        return
    everything = LineBlock(lines, np.concatenate(file_idx), np.concatenate(line_no))
    perm = np.random.default_rng(seed).permutation(len(lines))
    for start in range(0, len(perm), OUT_BLOCK_LINES):
        yield everything.take(perm[start : start + OUT_BLOCK_LINES])


class ExternalShuffle:
    """A uniform random permutation of the input lines in bounded RAM.

    Pass 1 streams the input and sends each line to one of ``K = ceil(1.25 * input_bytes / budget)``
    bucket files, chosen uniformly at random (seeded); pass 2 loads one bucket at a time, permutes it
    and emits it. Random bucket + random order inside each bucket is a uniform permutation of the
    whole, and only one bucket (about budget / 1.25 bytes) is in RAM at a time.
    ``buckets`` and ``max_bucket_bytes`` report what happened.
    """

    def __init__(self, files: list[InputFile], seed: int, ram_budget_bytes: int, work_dir: Path,
                 limit: LineLimit | None = None):
        self.files = files
        self.limit = limit
        self.seed = seed
        total = sum(f.size for f in files)
        self.buckets = max(1, min(MAX_BUCKETS, math.ceil(1.25 * total / max(1, ram_budget_bytes))))
        self.max_bucket_bytes = 0
        self.work_dir = Path(work_dir) / "shuffle_buckets"

    def __iter__(self) -> Iterator[LineBlock]:
        rng = np.random.default_rng(self.seed)
        self.work_dir.mkdir(parents=True, exist_ok=False)
        try:
            self._scatter(rng)
            yield from self._gather(rng)
        finally:
            for path in self.work_dir.glob("bucket_*"):
                path.unlink()
            self.work_dir.rmdir()

    def _paths(self, bucket: int) -> tuple[Path, Path]:
        return self.work_dir / f"bucket_{bucket}.lines", self.work_dir / f"bucket_{bucket}.where"

    def _scatter(self, rng: np.random.Generator) -> None:
        k = self.buckets
        buffering = max(4096, min(1 << 20, (64 << 20) // k))
        lines_out = [open(self._paths(b)[0], "wb", buffering=buffering) for b in range(k)]
        where_out = [open(self._paths(b)[1], "wb", buffering=buffering) for b in range(k)]
        try:
            for block in read_line_blocks(self.files, limit=self.limit):
                bucket = rng.integers(0, k, size=len(block))
                order = np.argsort(bucket, kind="stable")
                bounds = np.searchsorted(bucket[order], np.arange(k + 1))
                where = np.stack([block.file_idx.astype(np.int64), block.line_no], axis=1)
                for b in range(k):
                    index = order[bounds[b] : bounds[b + 1]]
                    if len(index):
                        lines_out[b].write(b"\n".join([block.lines[i] for i in index]) + b"\n")
                        where_out[b].write(where[index].tobytes())
        finally:
            for f in lines_out + where_out:
                f.close()

    def _gather(self, rng: np.random.Generator) -> Iterator[LineBlock]:
        for b in range(self.buckets):
            lines_path, where_path = self._paths(b)
            data = lines_path.read_bytes()
            self.max_bucket_bytes = max(self.max_bucket_bytes, len(data))
            lines = data.split(b"\n")[:-1]
            del data
            where = np.fromfile(where_path, dtype=np.int64).reshape(-1, 2)
            lines_path.unlink()
            where_path.unlink()
            bucket = LineBlock(lines, where[:, 0].astype(np.int32), where[:, 1].copy())
            perm = rng.permutation(len(lines))
            for start in range(0, len(perm), OUT_BLOCK_LINES):
                yield bucket.take(perm[start : start + OUT_BLOCK_LINES])

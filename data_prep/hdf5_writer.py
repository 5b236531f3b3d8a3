"""Packed rows -> temporary row files -> balanced ``{split}_{i}_of_{N}.hdf5`` files.

Rows of a split are appended to two raw files while tokenizing (``*.ids.bin`` int32 ``[R, L]``,
``*.types.bin`` uint8 ``[R, L]``), so memory stays flat and the number of files can be chosen
once the row count is known. Each HDF5 file is then written from a contiguous row range.
Files are reproducible byte for byte: no timestamps (``track_times=False``), fixed chunking,
deterministic compression.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelzoo.data_prep.packing import PackedRows

WRITE_BLOCK_BYTES = 16 << 20
CHUNK_BYTES = 1 << 20


class SplitSink:
    """Appends a split's packed rows to ``{work_dir}/{name}.ids.bin`` / ``.types.bin``.

    ``rows`` counts them; ``type_counts[t]`` counts tokens of type t over all rows.
    """

    def __init__(self, work_dir: Path, name: str, max_seq_length: int):
        self.ids_path = Path(work_dir) / f"{name}.ids.bin"
        self.types_path = Path(work_dir) / f"{name}.types.bin"
        self.L = max_seq_length
        self.rows = 0
        self.type_counts = np.zeros(256, dtype=np.int64)
        self._ids = open(self.ids_path, "wb")
        self._types = open(self.types_path, "wb")

    def append(self, rows: PackedRows) -> None:
        if not len(rows):
            return
        self._ids.write(np.ascontiguousarray(rows.ids, dtype=np.int32).tobytes())
        self._types.write(np.ascontiguousarray(rows.types, dtype=np.uint8).tobytes())
        self.type_counts += np.bincount(rows.types.reshape(-1), minlength=256)
        self.rows += len(rows)

    def close(self) -> None:
        self._ids.close()
        self._types.close()

    def remove(self) -> None:
        self.close()
        self.ids_path.unlink(missing_ok=True)
        self.types_path.unlink(missing_ok=True)


@dataclass(frozen=True)
class FileJob:
    """Write rows ``[start, stop)`` of a sink's row files to ``out_path``."""

    ids_path: str
    types_path: str
    max_seq_length: int
    start: int
    stop: int
    out_path: str
    compression: str

    def __str__(self) -> str:
        return Path(self.out_path).name


def compression_options(compression: str) -> dict:
    if compression == "gzip":  # byte-shuffle + zlib level 1: small files, fast to write
        return {"compression": "gzip", "compression_opts": 1, "shuffle": True}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    return {}


def write_hdf5_file(job: FileJob) -> str:
    """Write one HDF5 file: ``input_ids`` and ``token_type_ids``, int32 ``[stop - start, L]``.

    Rows are read from the row files a block at a time (plain reads, not a memory map, so the
    memory in use stays at one block however large the file is).
    """
    import h5py

    n, L = job.stop - job.start, job.max_seq_length
    chunk_rows = max(1, min(n, CHUNK_BYTES // (4 * L)))
    block_rows = max(chunk_rows, (WRITE_BLOCK_BYTES // (4 * L)) // chunk_rows * chunk_rows)
    sources = {"input_ids": (job.ids_path, np.int32), "token_type_ids": (job.types_path, np.uint8)}
    with h5py.File(job.out_path, "w") as f:
        for name, (path, dtype) in sources.items():
            ds = f.create_dataset(
                name,
                shape=(n, L),
                dtype="i4",
                chunks=(chunk_rows, L),
                track_times=False,
                **compression_options(job.compression),
            )
            itemsize = np.dtype(dtype).itemsize
            for a in range(0, n, block_rows):
                b = min(n, a + block_rows)
                offset = (job.start + a) * L * itemsize
                block = np.fromfile(path, dtype=dtype, count=(b - a) * L, offset=offset)
                ds[a:b] = block.reshape(b - a, L).astype(np.int32, copy=False)
    return job.out_path

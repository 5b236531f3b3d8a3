"""Streaming safetensors I/O: one tensor mapped (read) or written at a time.

Reading parses the header ourselves and memory-maps only the byte range of the tensor asked for, so
the mapping (and the pages it brought into this process) goes away with the tensor: a checkpoint of
any size is read with memory bounded by its largest tensor. Writing plans every output file (names,
dtypes, shapes -> byte offsets) up front, writes each header first, then each tensor's bytes at
its offset as they are produced (``os.pwrite``), so no file is ever held in memory.

File format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N
bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``, then
the data; offsets are relative to the end of the header and cover the data without holes.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from modelzoo.checkpoint.hf_weights import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
_WRITE_CHUNK = 1 << 30  # pwrite at most this many bytes per call (Linux caps a call near 2 GiB)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    nbytes: int


def nbytes_of(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel * torch.empty((), dtype=dtype).element_size()


class SafetensorsFile:
    """Header of one ``.safetensors`` file; :meth:`get` maps one tensor's bytes (read-only, private).

    Raises :class:`CheckpointError` naming the file (and tensor) for a truncated or corrupt file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as handle:
                head = handle.read(8)
                if len(head) < 8:
                    raise self._error("file is shorter than a safetensors header")
                (length,) = struct.unpack("<Q", head)
                if length > min(MAX_HEADER, size - 8):
                    raise self._error(f"header length {length} exceeds the file ({size} bytes)")
                header = json.loads(handle.read(length))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise self._error(f"unreadable header ({err})") from err
        data_start = 8 + length
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise self._error(f"tensor '{name}' has a malformed header entry ({err})") from err
            if end - begin != nbytes_of(dtype, shape):
                raise self._error(f"tensor '{name}' has {end - begin} bytes for shape {list(shape)} {entry['dtype']}")
            if data_start + end > size:
                raise self._error(f"truncated: tensor '{name}' ends at byte {data_start + end} but the file has "
                                  f"{size} bytes")
            self.tensors[name] = TensorInfo(name, dtype, shape, data_start + begin, end - begin)

    def _error(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}; re-download or re-convert this file")

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor (or rows ``[a, b)`` of a 2-D one), backed by a private mapping of just those bytes."""
        info = self.tensors[name]
        return map_range(self.path, info.begin, info.dtype, info.shape, rows)


def map_range(path: Path, begin: int, dtype: torch.dtype, shape: tuple[int, ...],
              rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Memory-map the tensor stored row-major at byte ``begin`` of ``path`` (or only rows ``[a, b)``).

    The mapping covers just those bytes and is released with the tensor, so the pages it brings
    in never outlive the block being processed (copy-on-write: the file is never modified).
    """
    shape = tuple(shape)
    if rows is not None:
        row_bytes = nbytes_of(dtype, shape[1:])
        begin, shape = begin + rows[0] * row_bytes, (rows[1] - rows[0], *shape[1:])
    nbytes = nbytes_of(dtype, shape)
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    start = begin - begin % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as handle:
        mapping = mmap.mmap(handle.fileno(), begin + nbytes - start, offset=start, access=mmap.ACCESS_COPY)
    flat = torch.frombuffer(mapping, dtype=torch.uint8, offset=begin - start, count=nbytes)
    if (begin - start) % torch.empty((), dtype=dtype).element_size():
        flat = flat.clone()  # misaligned for the dtype (not written by safetensors): copy
    return flat.view(dtype).reshape(shape)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (contiguous copy only if it is not contiguous)."""
    flat = tensor.contiguous().reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:done + _WRITE_CHUNK], offset + done)


@dataclass
class _Planned:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute
    nbytes: int
    written: int = 0
    done: bool = False


def parse_size(text: str | int) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"100KB"`` / ``"1234"`` -> bytes (decimal units, as HF uses)."""
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit) and upper[: -len(unit)].strip():
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


class ShardedSafetensorsWriter:
    """Write planned tensors into ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index.

    ``specs``: ``(name, dtype, shape)`` in the order they will be produced. Files are cut at
    ``max_shard_bytes`` (a tensor larger than that gets a file of its own). Within a file, tensors
    are laid out by element size (largest first) so every tensor stays aligned. Call :meth:`write`
    once per tensor with its bytes in row-major chunks, then :meth:`close` (checks completeness,
    writes the index, fsyncs).
    """

    def __init__(self, out_dir: str | Path, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int = 5 * 10**9, metadata: dict[str, str] | None = None) -> None:
        self.out_dir = Path(out_dir)
        specs = list(specs)
        groups: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for spec in specs:
            nbytes = nbytes_of(spec[1], spec[2])
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(spec)
            size += nbytes
        n_files = len(groups)
        self.files = [SAFE_SINGLE] if n_files == 1 else \
            [f"model-{i + 1:05d}-of-{n_files:05d}.safetensors" for i in range(n_files)]
        self.plan: dict[str, _Planned] = {}
        self.total_size = 0
        self._fds: dict[str, int] = {}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        meta = {"format": "pt", **(metadata or {})}
        for file, group in zip(self.files, groups, strict=True):
            ordered = sorted(group, key=lambda s: -torch.empty((), dtype=s[1]).element_size())  # stable
            header: dict[str, object] = {"__metadata__": meta}
            offset = 0
            for name, dtype, shape in ordered:
                nbytes = nbytes_of(dtype, shape)
                header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            data_start = 8 + len(raw)
            for name, dtype, shape in ordered:
                begin, end = header[name]["data_offsets"]  # type: ignore[index]
                self.plan[name] = _Planned(file, dtype, tuple(shape), data_start + begin, end - begin)
            fd = os.open(self.out_dir / file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[file] = fd
            pwrite_all(fd, memoryview(struct.pack("<Q", len(raw)) + raw), 0)
            os.ftruncate(fd, data_start + offset)
            self.total_size += offset

    def write(self, name: str, chunks: Iterable[torch.Tensor]) -> int:
        """Write tensor ``name`` from its row-major chunks; returns the bytes written."""
        entry = self.plan[name]
        if entry.done or entry.written:
            raise RuntimeError(f"tensor '{name}' written twice")
        fd = self._fds[entry.file]
        for chunk in chunks:
            if chunk.dtype != entry.dtype:
                raise RuntimeError(f"tensor '{name}': chunk dtype {chunk.dtype}, planned {entry.dtype}")
            data = tensor_bytes(chunk)
            if entry.written + len(data) > entry.nbytes:
                raise RuntimeError(f"tensor '{name}': more bytes than its planned shape {list(entry.shape)}")
            pwrite_all(fd, data, entry.offset + entry.written)
            entry.written += len(data)
            del data
        if entry.written != entry.nbytes:
            raise RuntimeError(f"tensor '{name}': {entry.written} of {entry.nbytes} bytes produced")
        entry.done = True
        return entry.nbytes

    def close(self) -> None:
        missing = [name for name, entry in self.plan.items() if not entry.done]
        if missing:
            raise RuntimeError(f"tensors never written: {', '.join(missing[:5])}")
        for fd in self._fds.values():
            os.fsync(fd)
            os.close(fd)
        self._fds.clear()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {name: entry.file for name, entry in self.plan.items()}}
            (self.out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

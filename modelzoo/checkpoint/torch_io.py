"""PyTorch ``.pth``/``.bin`` files, read and written one tensor at a time.

Reading never executes a pickle beyond tensors and plain containers (``weights_only=True``; anything
else is refused with an error naming the file). The file is first loaded onto the meta device, which
gives each tensor's dtype, shape and byte offset in the zip archive without touching its data; a
tensor (or a block of its rows) is then mapped on its own at that offset and released with it, so
resident memory stays near one block however large the file. Tensors that are not a contiguous
byte range of their storage fall back to ``torch.load(mmap=True)``. (Why not ``torch.load(mmap=True)``
for every read: one load kept open keeps every page it touched mapped, so resident memory grows to
the file; a load per read re-parses the pickle, 27 ms for a 288-tensor file, paid per 16 MiB block.)

Writing: :class:`TorchPthWriter` produces the file ``torch.save(state_dict)`` would (same zip
records, same pickle bytes), but from a plan of names, dtypes and shapes, writing each tensor's
record as it is produced instead of holding the whole state dict. It uses torch's own zip writer
(``torch._C.PyTorchFileWriter``) and pickles tensors as ``torch.save`` does, private names both;
``tests/test_convert_roundtrip.py`` checks the bytes equal ``torch.save``'s, so a torch release
that changes them fails there. It stays because ``torch.save`` needs the whole state dict in
memory: ``benchmarks/bench_writers.py``, writing a 1 GiB file, measured peak RSS +91 MiB for this
writer against +1,123 MiB for ``torch.save`` (its time 1.18x).
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import sys
from pathlib import Path

import torch
from torch.serialization import _get_storage_alignment, get_crc32_options
from torch.storage import _dtype_to_storage_type_map

from .atomic import fsync_path
from .errors import CheckpointError
from .safetensors_io import TensorInfo, nbytes_of


def _unsafe_global(message: str) -> str:
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message) or re.search(r"GLOBAL ([\w.]+)", message)
    return f"it references {match.group(1)}" if match else message.strip().splitlines()[0][:200]


def load_weights_only(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """``torch.load(path, weights_only=True)`` (``mmap=True`` on CPU) as a flat ``{name: tensor}``."""
    try:
        if device == "meta":
            state = torch.load(path, map_location="meta", weights_only=True)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused: not a weights-only PyTorch file ({_unsafe_global(str(err))}); unpickling it could "
            "run code. Re-save just the state dict (torch.save(model.state_dict(), ...)) where you trust the "
            "file, or convert it to safetensors") from err
    except Exception as err:  # zip/record errors come as RuntimeError, ValueError, EOFError, ...
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: cannot be read as a PyTorch checkpoint ({first}); the file is truncated or corrupt "
            "(re-download it), or was saved in the legacy non-zip format (re-save it with torch.save)") from err
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path}: expected a flat state dict {{name: tensor}}, got {type(state).__name__}; "
                              "save model.state_dict() instead")
    return state


class TorchFile:
    """A ``.pth``/``.bin`` state dict; :meth:`get` maps one tensor (or rows of it) on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        self.tensors: dict[str, TensorInfo] = {}
        self._begin: dict[str, int | None] = {}
        for name, t in load_weights_only(self.path, device="meta").items():
            self.tensors[name] = TensorInfo(t.dtype, tuple(t.shape))
            offset = getattr(t.untyped_storage(), "_checkpoint_offset", None)
            begin = None if offset is None or not t.is_contiguous() else offset + t.storage_offset() * t.element_size()
            if begin is not None and begin + nbytes_of(t.dtype, tuple(t.shape)) > size:
                raise CheckpointError(f"{self.path}: truncated: tensor '{name}' lies beyond the end of the file; "
                                      "re-download it")
            self._begin[name] = begin

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        dtype, shape = self.tensors[name]
        begin = self._begin[name]
        if begin is not None:
            return read_range(self.path, begin, dtype, shape, rows)
        tensor = load_weights_only(self.path)[name]  # not a plain byte range: let torch map the file
        return (tensor if rows is None else tensor[rows[0]:rows[1]]).contiguous()


def read_range(path: Path, begin: int, dtype: torch.dtype, shape: tuple[int, ...],
               rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The tensor stored row-major at byte ``begin`` of ``path`` (or only its rows ``[a, b)``): a view
    of a private mapping of the file, released with the tensor, so only those bytes' pages are read."""
    shape = tuple(shape)
    if rows is not None:
        begin, shape = begin + rows[0] * nbytes_of(dtype, shape[1:]), (rows[1] - rows[0], *shape[1:])
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=Path(path).stat().st_size)
    if begin % dtype.itemsize:  # misaligned for the dtype (torch.save aligns records): copy the bytes
        raw = torch.empty(0, dtype=torch.uint8).set_(storage, begin, (nbytes_of(dtype, shape),))
        return raw.clone().view(dtype).reshape(shape)
    return torch.empty(0, dtype=dtype).set_(storage, begin // dtype.itemsize, shape)


class _StorageRef:
    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorStub:
    """Pickles exactly like a contiguous CPU tensor that owns its storage (``torch._utils._rebuild_tensor_v2``)."""

    def __init__(self, ref: _StorageRef, shape: tuple[int, ...]) -> None:
        self.ref, self.shape = ref, tuple(shape)

    def __reduce_ex__(self, protocol):  # noqa: ARG002 (pickle protocol hook)
        stride, acc = [], 1
        for size in reversed(self.shape):
            stride.append(acc)
            acc *= size
        return (torch._utils._rebuild_tensor_v2,
                (self.ref, 0, self.shape, tuple(reversed(stride)), False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            storage_type = getattr(torch, _dtype_to_storage_type_map()[obj.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None


class TorchPthWriter:
    """Write ``{name: tensor}`` as ``torch.save`` would, one tensor at a time, in the planned order."""

    def __init__(self, path: str | Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        self.path = Path(path)
        self.specs = list(specs)
        stubs = {}
        for i, (name, dtype, shape) in enumerate(self.specs):
            numel = 1
            for size in shape:
                numel *= size
            stubs[name] = _TensorStub(_StorageRef(str(i), dtype, numel), tuple(shape))
        buffer = io.BytesIO()
        _Pickler(buffer, protocol=2).dump(stubs)
        self._file = None
        try:
            str(self.path).encode("ascii")
            self._writer = torch._C.PyTorchFileWriter(str(self.path), get_crc32_options(), _get_storage_alignment())
        except UnicodeEncodeError:
            self._file = open(self.path, "wb")  # noqa: SIM115 (closed in close())
            self._writer = torch._C.PyTorchFileWriter(self._file, get_crc32_options(), _get_storage_alignment())
        data = buffer.getvalue()
        self._writer.write_record("data.pkl", data, len(data))
        self._writer.write_record(".format_version", "1", 1)
        alignment = str(_get_storage_alignment())
        self._writer.write_record(".storage_alignment", alignment, len(alignment))
        self._writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Write the next planned tensor (whole); returns its byte count."""
        if self._next >= len(self.specs) or self.specs[self._next][0] != name:
            want = self.specs[self._next][0] if self._next < len(self.specs) else "nothing"
            raise RuntimeError(f"{self.path.name}: got tensor '{name}', expected {want} next")
        _, dtype, shape = self.specs[self._next]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"{self.path.name}: tensor '{name}' is {tensor.dtype} {list(tensor.shape)}, "
                               f"planned {dtype} {list(shape)}")
        tensor = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        start = tensor.storage_offset() * tensor.element_size()
        # a byte-range view of the storage: a mapped input tensor is written without a copy
        record = tensor.untyped_storage()[start:start + nbytes] if nbytes else b""
        self._writer.write_record(f"data/{self._next}", record, nbytes)
        self._next += 1
        return nbytes

    def close(self) -> None:
        if self._next != len(self.specs):
            raise RuntimeError(f"{self.path.name}: {len(self.specs) - self._next} planned tensors never written")
        self._writer.write_end_of_file()
        del self._writer
        if self._file is not None:
            self._file.close()
        fsync_path(self.path)

"""Find the input files and stream their lines as raw bytes, with file and line numbers for errors."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelzoo.data_prep.errors import DataPrepError

INPUT_SUFFIXES = (".jsonl", ".txt")
READ_BLOCK_BYTES = 8 << 20


@dataclass(frozen=True)
class InputFile:
    path: Path
    is_jsonl: bool  # else .txt: one document per line, all completion
    size: int


@dataclass
class LineBlock:
    """Consecutive non-blank input lines (after shuffling: any order).

    lines: raw bytes without the trailing newline, ``[n]``; file_idx: int32 ``[n]`` index into the
    input file list; line_no: int64 ``[n]``, 1-based line number in that file.
    """

    lines: list[bytes]
    file_idx: np.ndarray
    line_no: np.ndarray

    def __len__(self) -> int:
        return len(self.lines)

    def take(self, index: np.ndarray) -> LineBlock:
        return LineBlock([self.lines[i] for i in index], self.file_idx[index], self.line_no[index])


def resolve_inputs(input_path: str) -> list[InputFile]:
    """The ``.jsonl``/``.txt`` files named by ``--input_path`` (a file, or a dir: its top-level
    files, sorted by name). Raises DataPrepError when there is nothing to read."""
    path = Path(input_path)
    if not path.exists():
        raise DataPrepError(f"--input_path {input_path} does not exist")
    if path.is_dir():
        paths = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in INPUT_SUFFIXES)
        if not paths:
            raise DataPrepError(f"--input_path {input_path}: the directory holds no .jsonl or .txt files")
    else:
        if path.suffix not in INPUT_SUFFIXES:
            raise DataPrepError(
                f"--input_path {input_path}: expected a .jsonl or .txt file (or a directory of them); "
                "rename the file if its content is jsonl or one document per line"
            )
        paths = [path]
    files = [InputFile(p, p.suffix == ".jsonl", p.stat().st_size) for p in paths]
    if sum(f.size for f in files) == 0:
        raise DataPrepError(f"--input_path {input_path} is empty: there are no lines to tokenize")
    return files


def read_line_blocks(files: list[InputFile], block_bytes: int = READ_BLOCK_BYTES) -> Iterator[LineBlock]:
    """Non-blank lines of every file in order, a block at a time (memory: about ``block_bytes``)."""
    for file_idx, f in enumerate(files):
        with open(f.path, "rb") as fh:
            carry = b""
            first_line_no = 1
            while True:
                data = fh.read(block_bytes)
                if not data:
                    break
                parts = (carry + data).split(b"\n")
                carry = parts.pop()
                if parts:
                    yield _block(parts, file_idx, first_line_no)
                first_line_no += len(parts)
            if carry:
                yield _block([carry], file_idx, first_line_no)


def _block(parts: list[bytes], file_idx: int, first_line_no: int) -> LineBlock:
    keep = [i for i, line in enumerate(parts) if line.strip()]
    index = np.asarray(keep, dtype=np.int64)
    return LineBlock(
        [parts[i] for i in keep], np.full(len(keep), file_idx, dtype=np.int32), index + first_line_no
    )

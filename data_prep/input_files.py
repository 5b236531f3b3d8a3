"""Find the input files and stream their lines as raw bytes, with file and line numbers for errors.

Line length is bounded (``--max-line-bytes``, default MAX_LINE_BYTES = 16 MiB): a longer line is
never held whole -- the reader keeps at most the limit plus one read block, reports the line
(``LineLimit.report``: a format error naming file:line, or a skipped line with
``--ignore-input-format-error``) and skips to the next newline. Why a limit: tokenizing one line
takes memory 100-200 times its size in a worker (a 50 MB line took 10 GB), so one huge line can take
a machine down. Why 16 MiB: that is about 4M tokens, four times the largest ``--max-seq-length``
allowed without ``--allow-long-sequences``; real articles (whole books included) are far below it,
and it costs at most about 3 GB in one worker. Raise the flag for longer lines if the memory is there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelzoo.data_prep.errors import DataPrepError

INPUT_SUFFIXES = (".jsonl", ".txt")
READ_BLOCK_BYTES = 8 << 20
MAX_LINE_BYTES = 16 << 20


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
    """The ``.jsonl``/``.txt`` files named by ``--input-path`` (a file, or a dir: its top-level
    files, sorted by name). Raises DataPrepError when there is nothing to read."""
    path = Path(input_path)
    if not path.exists():
        raise DataPrepError(f"--input-path {input_path} does not exist")
    if path.is_dir():
        paths = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in INPUT_SUFFIXES)
        if not paths:
            raise DataPrepError(f"--input-path {input_path}: the directory holds no .jsonl or .txt files")
    else:
        if path.suffix not in INPUT_SUFFIXES:
            raise DataPrepError(
                f"--input-path {input_path}: expected a .jsonl or .txt file (or a directory of them); "
                "rename the file if its content is jsonl or one document per line"
            )
        paths = [path]
    files = [InputFile(p, p.suffix == ".jsonl", p.stat().st_size) for p in paths]
    if sum(f.size for f in files) == 0:
        raise DataPrepError(f"--input-path {input_path} is empty: there are no lines to tokenize")
    return files


@dataclass(frozen=True)
class LineLimit:
    """Lines over ``max_bytes`` are dropped unread; ``report(path, line_no, at_least_bytes)`` hears of
    each (it raises to stop the run, or logs the line as skipped)."""

    max_bytes: int
    report: Callable[[Path, int, int], None]


def read_line_blocks(
    files: list[InputFile], block_bytes: int = READ_BLOCK_BYTES, limit: LineLimit | None = None
) -> Iterator[LineBlock]:
    """Non-blank lines of every file in order, a block at a time (memory: about ``block_bytes``,
    plus ``limit.max_bytes`` for a line spanning blocks)."""
    for file_idx, f in enumerate(files):
        with open(f.path, "rb") as fh:
            carry, line_no, skipping = b"", 1, False
            while data := fh.read(block_bytes):
                if skipping:  # inside a line already reported as too long: drop up to its newline
                    cut = data.find(b"\n")
                    if cut < 0:
                        continue
                    data, skipping, line_no = data[cut + 1 :], False, line_no + 1
                parts = (carry + data).split(b"\n")
                carry = parts.pop()
                if parts:
                    yield _block(parts, file_idx, line_no, f.path, limit)
                line_no += len(parts)
                if limit is not None and len(carry) > limit.max_bytes:
                    limit.report(f.path, line_no, len(carry))
                    carry, skipping = b"", True
            if carry:
                yield _block([carry], file_idx, line_no, f.path, limit)


def _block(
    parts: list[bytes], file_idx: int, first_line_no: int, path: Path, limit: LineLimit | None
) -> LineBlock:
    if limit is not None:
        for i, line in enumerate(parts):
            if len(line) > limit.max_bytes:
                limit.report(path, first_line_no + i, len(line))
                parts[i] = b""  # dropped like a blank line
    keep = [i for i, line in enumerate(parts) if line.strip()]
    index = np.asarray(keep, dtype=np.int64)
    return LineBlock(
        [parts[i] for i in keep], np.full(len(keep), file_idx, dtype=np.int32), index + first_line_no
    )

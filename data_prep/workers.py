"""Worker processes: tokenize chunks in parallel, results back in submission order, bounded memory.

At most ``max_in_flight`` chunks are queued or running at once, so memory does not grow with the
input. A worker that dies (killed by the OS, out of memory) fails the run with a DataPrepError via
``BrokenProcessPool``, never a hang; a DataPrepError raised in a worker (bad line) reaches the caller
as is. ``num_workers=0`` runs everything in this process (same results, byte for byte).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from modelzoo.data_prep.articles import ArticleSettings, Chunk, ChunkTokenizer, TokenizedChunk
from modelzoo.data_prep.errors import DataPrepError

_tokenizer: ChunkTokenizer | None = None


def _init_worker(settings: ArticleSettings) -> None:
    # One tokenizer thread per process: the processes are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    global _tokenizer
    _tokenizer = ChunkTokenizer(settings)


def _tokenize(chunk: Chunk) -> TokenizedChunk:
    return _tokenizer(chunk)


def _describe(chunk: Chunk, file_names: tuple[str, ...]) -> str:
    if not chunk.lines:
        return f"chunk {chunk.index}"
    return f"chunk {chunk.index} (from {file_names[int(chunk.file_idx[0])]}:{int(chunk.line_no[0])})"


class TokenizerPool:
    """Worker processes (``spawn``: a program that calls this must guard its entry with
    ``if __name__ == "__main__"``, as multiprocessing requires). The tokenizer reaches the workers
    as a file in ``work_dir``, so starting a worker never blocks on a large pipe write."""

    def __init__(
        self, settings: ArticleSettings, num_workers: int, work_dir: Path, max_in_flight: int | None = None
    ):
        self.settings = settings
        self.num_workers = num_workers
        self.max_in_flight = max_in_flight or 2 * num_workers + 1
        self._executor = None
        self._local = None
        if num_workers == 0:
            self._local = ChunkTokenizer(settings)
        else:
            tokenizer_file = Path(work_dir) / "worker_tokenizer.json"
            tokenizer_file.write_text(settings.tokenizer.tokenizer_json, encoding="utf-8")
            spec = dataclasses.replace(
                settings.tokenizer, tokenizer_json="", tokenizer_file=str(tokenizer_file)
            )
            self._executor = ProcessPoolExecutor(
                num_workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(dataclasses.replace(settings, tokenizer=spec),),
            )

    def imap(self, chunks: Iterable[Chunk]) -> Iterator[TokenizedChunk]:
        """Tokenized chunks in the order given; reads ``chunks`` only as fast as results are taken."""
        if self._executor is None:
            for chunk in chunks:
                yield self._local(chunk)
            return
        pending: deque[tuple[str, Future]] = deque()
        for chunk in chunks:
            pending.append(
                (_describe(chunk, self.settings.file_names), self._executor.submit(_tokenize, chunk))
            )
            if len(pending) >= self.max_in_flight:
                yield self._result(*pending.popleft())
        while pending:
            yield self._result(*pending.popleft())

    def map(self, fn: Callable, args: list) -> list:
        """``[fn(a) for a in args]``, spread over the workers."""
        if self._executor is None:
            return [fn(a) for a in args]
        futures = [(f"{fn.__name__}({a})", self._executor.submit(fn, a)) for a in args]
        return [self._result(what, fut) for what, fut in futures]

    def _result(self, what: str, future: Future):
        try:
            return future.result()
        except BrokenProcessPool as err:
            raise DataPrepError(
                f"a data-prep worker process died while working on {what} (killed by the system, often for "
                "lack of memory); rerun with fewer --num-workers, or --num-workers 0 to work in one process"
            ) from err

    def close(self, cancel: bool = False) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=not cancel, cancel_futures=cancel)
            self._executor = None

    def __enter__(self) -> TokenizerPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(cancel=exc_type is not None)

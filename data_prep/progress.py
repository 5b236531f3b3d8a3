"""Progress of a data-prep run on stderr: tokens, tokens/s and an ETA while tokenizing and packing.

One bar in the main process, fed as each chunk's result comes back from the worker processes, so
it counts all workers together. The token count of the input is not known before it is tokenized:
the bar's percentage is how far into the input the finished chunks reach (in bytes), and the ETA
extrapolates the token rate over the input left. On a terminal tqdm redraws the bar in place; when
stderr is a file or a pipe (a batch job's log) each update is a line of its own, one every
``LOG_INTERVAL_S`` at most. Nothing is ever written to stdout (the metrics table) or to output files.
"""

from __future__ import annotations

import sys
from typing import TextIO

LOG_INTERVAL_S = 10.0
TOKENS_FORMAT = "{l_bar}{bar}| {n_fmt} tok [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _Lines:
    """A stream for tqdm that writes each redraw (``"\\r" + text + padding``) as one plain line."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self._stream.write(line + "\n")

    def flush(self) -> None:
        self._stream.flush()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _stderr() -> TextIO:
    return sys.stderr


class TokenProgress:
    """``update(tokens, input_pos)`` per finished chunk; ``close()`` at the end (a context manager).

    ``enabled``: True always shows it, False never, None only when ``stream`` is a terminal.
    ``total_bytes``: the size of the input, against which ``input_pos`` (bytes of input up to the
    chunk's last line) gives the percentage and the ETA.
    """

    def __init__(self, total_bytes: int, enabled: bool | None = True, stream: TextIO | None = None,
                 desc: str = "tokenizing"):
        from tqdm import tqdm

        stream = stream if stream is not None else _stderr()
        tty = _isatty(stream)
        self.total_bytes = max(1, int(total_bytes))
        self.enabled = tty if enabled is None else bool(enabled)
        self._bar = tqdm(
            desc=desc,
            unit="tok",
            unit_scale=True,
            bar_format=TOKENS_FORMAT,
            file=stream if tty else _Lines(stream),
            disable=not self.enabled,
            dynamic_ncols=tty,
            mininterval=0.1 if tty else LOG_INTERVAL_S,
            ascii=None if tty else True,
        )

    @property
    def tokens(self) -> int:
        return int(self._bar.n)

    def update(self, tokens: int, input_pos: int) -> None:
        """A chunk of ``tokens`` tokens is done; the input is done up to byte ``input_pos``."""
        n = self._bar.n + tokens
        done = min(max(int(input_pos), 1), self.total_bytes)
        # Expected tokens of the whole input at the rate so far (never below what is counted).
        self._bar.total = max(n, round(n * self.total_bytes / done))
        self._bar.update(tokens)

    def close(self) -> None:
        if self._bar.total is not None:
            self._bar.total = self._bar.n  # done: 100%, no more estimate
        self._bar.close()

    def __enter__(self) -> TokenProgress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._bar.close()  # stop where it stopped, not at 100%
        else:
            self.close()

"""Byte progress of a conversion: always counted, shown as a tqdm bar unless quiet (or not a TTY)."""

from __future__ import annotations

import sys


class Progress:
    """What the writers report to: ``total`` (bytes to write), :meth:`update`, :meth:`set_postfix_str`."""

    def __init__(self, desc: str, show: bool = True) -> None:
        self.n = 0
        self._total = 0
        self._bar = None
        if show:
            from tqdm import tqdm

            self._bar = tqdm(total=0, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                             disable=None, leave=False, dynamic_ncols=True)

    @property
    def total(self) -> int:
        return self._total

    @total.setter
    def total(self, value: int) -> None:
        self._total = value
        if self._bar is not None:
            self._bar.total = value
            self._bar.refresh()

    def update(self, nbytes: int) -> None:
        self.n += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=refresh)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

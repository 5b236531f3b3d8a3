"""The one error type a user's config can cause, and the nearest-name helper for "did you mean"."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A config mistake, rendered as one line: ``<source>:<line>: <message>``.

    ``key`` is the dotted key at fault (or None), ``source`` the YAML file or ``override 'k=v'``
    it came from (None when unknown), ``line`` the 1-based line in that file (None for overrides).
    """

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None,
                 line: int | None = None) -> None:
        self.message = " ".join(message.split())
        self.key = key
        self.source = source
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.source is None:
            return self.message
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.message}"

    def located(self, source: str | None, line: int | None) -> ConfigError:
        """The same error, attributed to ``source`` (and ``line``)."""
        return ConfigError(self.message, key=self.key, source=source, line=line)


def nearest(word: str, options: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` options closest to ``word``, best first."""
    return difflib.get_close_matches(word, list(options), n=n, cutoff=0.6)


"""Reading the small JSON files of checkpoints, plans and manifests, and JSON-lines inputs, with
errors that name file:line."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import CheckpointError


def read_json(path: str | Path, *, fix: str = "", error: Callable[[str], Exception] = CheckpointError) -> dict[str, Any]:
    """The JSON object in ``path``.

    An unreadable file, invalid JSON (``path:line: invalid JSON (...)``) or a value that is not an
    object raises ``error(message)``, one line naming the file, with ``; fix`` appended when given.
    """
    tail = f"; {fix}" if fix else ""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{path}: cannot be read ({getattr(err, 'strerror', None) or err}){tail}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{path}:{err.lineno}: invalid JSON ({err.msg}){tail}") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, found {type(value).__name__}{tail}")
    return value


def json_lines(path: str | Path, *, fix: str, error: Callable[[str], Exception]) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of the JSON-lines file ``path``; invalid JSON
    raises ``error("path:line: invalid JSON (...); fix")``."""
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{path}:{number}: invalid JSON ({err.msg}); {fix}") from None

"""Where a conversion writes: one :func:`modelzoo.checkpoint.atomic.atomic_dir` per run.

The output is built in owned scratch beside ``--output`` and renamed into place only when complete,
carrying a ``.modelzoo-output.json`` marker of its kind (:data:`KINDS`, one per output format) that
lists exactly its files. An existing ``--output`` is replaced (``--overwrite``) only when it is
empty or a finished output of *any* conversion kind: re-running with another subcommand into the
same dir is fine, while a training checkpoint, a data set or a directory modelzoo did not write (or
one changed since: a file added, removed, an extra directory) is never deleted. Scratch left by a
killed run into the same path is removed by the next one, which prints one ``note:`` line saying so.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from modelzoo.checkpoint.atomic import atomic_dir, marker_proof
from modelzoo.checkpoint.hf_weights import CheckpointError

#: subcommand -> the kind its output's marker names
KINDS = {"meta-to-hf": "hf-model", "unshard": "hf-model", "merge-lora": "hf-model", "hf-to-meta": "meta",
         "shard": "tp-shards", "quantize": "int8-model"}
#: any conversion output may be replaced by any conversion
REPLACEABLE = marker_proof(*sorted(set(KINDS.values())))


@contextmanager
def conversion_output(command: str, output: str | Path, inputs: list[str | Path], overwrite: bool) -> Iterator[Path]:
    """Yield the scratch dir to write ``command``'s output into; it becomes ``output`` on success.

    Raises :class:`CheckpointError` (one line naming the path and the fix) for an output that
    overlaps an input, exists without ``overwrite``, or is not replaceable (see module doc).
    """
    with atomic_dir(output, kind=KINDS[command], overwrite=overwrite, inputs=inputs, proof=REPLACEABLE,
                    error=CheckpointError, say=lambda note: print(f"note: {note}")) as scratch:
        yield scratch

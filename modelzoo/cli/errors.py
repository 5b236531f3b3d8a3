"""The errors a user can cause, and how every console entry point reports them.

Each of these carries a one-line message that names the file/key/flag and the fix; the entry
point prints ``error: <message>`` to stderr (no traceback) and exits with status 2.

This module imports neither torch nor transformers, so an entry point can use it before it
parses its arguments. The user errors are ``ValueError`` (``ConfigError``, ``DatasetError``,
``UsageError``, ...), :class:`~modelzoo.checkpoint.errors.CheckpointError`, and the
``RuntimeError`` classes of :data:`LAZY_USER_ERRORS`, which live in modules that import torch:
those are looked up in ``sys.modules`` when an error is being reported (a class whose module was
never imported cannot have been raised).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from modelzoo.checkpoint.errors import CheckpointError


class UsageError(ValueError):
    """A bad command line; one line (reported by :func:`run_reporting_errors`)."""


#: (module, class name) of the user errors that are neither ValueError nor CheckpointError
LAZY_USER_ERRORS = (
    ("modelzoo.compile.plan", "PlanError"),
    ("modelzoo.backends.base", "BackendUnavailableError"),
    ("modelzoo.models.llama.patch_llama", "UnsupportedTransformersError"),
)
EXIT_USER_ERROR = 2


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes reported as one line (those of :data:`LAZY_USER_ERRORS` once imported)."""
    loaded = (getattr(sys.modules.get(module), name, None) for module, name in LAZY_USER_ERRORS)
    return (ValueError, CheckpointError, *(cls for cls in loaded if isinstance(cls, type)))


def run_reporting_errors(fn: Callable[..., int], *args) -> int:
    """``fn(*args)``; a user error becomes one ``error:`` line on stderr and exit status 2."""
    try:
        return fn(*args)
    except Exception as err:
        if not isinstance(err, user_errors()):
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


EXIT_WORKER_FAILED = 1


def spawn_reporting_errors(worker: Callable[..., None], nprocs: int, *args) -> int:
    """``worker(rank, nprocs, *args)`` in ``nprocs`` local gloo processes (tensor parallel); a failed
    rank becomes one ``error:`` line with its last message and exit status 1."""
    from torch.multiprocessing import ProcessRaisedException

    from modelzoo.parallel.mesh import spawn_cpu

    try:
        spawn_cpu(worker, nprocs, *args)
    except ProcessRaisedException as error:
        last = str(error).strip().splitlines()[-1]
        print(f"error: a tensor-parallel worker failed: {last}", file=sys.stderr)
        return EXIT_WORKER_FAILED
    return 0

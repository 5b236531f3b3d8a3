"""The errors a user can cause, and how every console entry point reports them.

Each of these carries a one-line message that names the file/key/flag and the fix; the entry
point prints ``error: <message>`` to stderr (no traceback) and exits with status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from modelzoo.backends import BackendUnavailableError
from modelzoo.checkpoint.hf_weights import CheckpointError
from modelzoo.compile.plan import PlanError
from modelzoo.config import ConfigError
from modelzoo.data.hdf5_reader import DatasetError
from modelzoo.models.llama.patch_llama import UnsupportedTransformersError

USER_ERRORS = (ConfigError, DatasetError, CheckpointError, PlanError, BackendUnavailableError,
               UnsupportedTransformersError, ValueError)
EXIT_USER_ERROR = 2


def run_reporting_errors(fn: Callable[..., int], *args) -> int:
    """``fn(*args)``; a user error becomes one ``error:`` line on stderr and exit status 2."""
    try:
        return fn(*args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR

"""Run ``modelzoo-convert`` in a process that SIGKILLs itself at the N-th call of one I/O step.

    subprocess.run(command("pwrite", 7, ["shard", "--input", IN, "--output", OUT]), env=env())

is ``modelzoo-convert shard ...`` (through :mod:`helpers.kill_points`) with one step of
:data:`STEPS` (the calls that put a conversion's bytes on disk and publish them) patched to die just
before its N-th call, or just after it returns (``after``): no cleanup, no ``finally``, no atexit. If the step never comes N times the
conversion runs to its end. :func:`counting` records the same calls in this process, so a test can
pick N inside a real run. The product has no hooks for this: the patch is applied here, from outside.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from helpers import kill_points

CONVERT_MAIN = "modelzoo.cli.convert:main"
#: step -> (module, attribute) as its callers look it up at call time
STEPS = {"pwrite": ("os", "pwrite"), "fsync": ("os", "fsync"), "rename": ("os", "rename"),
         "exchange": ("modelzoo.checkpoint.atomic", "_exchange"), "rmtree": ("shutil", "rmtree")}


def _wrap(step: str, around: Callable[[Callable, tuple, dict], object]) -> Callable[[], None]:
    """Replace ``step``'s function by ``around(original, args, kwargs)``; returns the undo."""
    module, name = STEPS[step]
    owner = importlib.import_module(module)
    original = getattr(owner, name)
    setattr(owner, name, functools.wraps(original)(lambda *a, **k: around(original, a, k)))
    return lambda: setattr(owner, name, original)


@contextmanager
def counting() -> Iterator[list[str]]:
    """The steps called inside the block (in this process), in call order."""
    calls: list[str] = []

    def recorder(step):
        def around(original, args, kwargs):
            calls.append(step)
            return original(*args, **kwargs)
        return around

    undo = [_wrap(step, recorder(step)) for step in STEPS]
    try:
        yield calls
    finally:
        for restore in undo:
            restore()


def arm(step: str, nth: int, after: bool = False) -> None:
    """Make this process SIGKILL itself at ``step``'s ``nth`` call (before it, or ``after`` it)."""
    kill_points.arm(":".join(STEPS[step]), nth, after)


def point(calls: list[str], index: int) -> tuple[str, int]:
    """``(step, nth)`` of the ``index``-th recorded call (0-based), for :func:`command`."""
    return calls[index], calls[: index + 1].count(calls[index])


def command(step: str, nth: int, argv: list, after: bool = False) -> list[str]:
    """The command line of ``modelzoo-convert argv`` armed to die at ``step``'s ``nth`` call (run it
    with :func:`env`)."""
    return kill_points.command(":".join(STEPS[step]), nth, list(argv), after=after, main=CONVERT_MAIN)


env = kill_points.env

"""Run a console entry point and SIGKILL it at the N-th call of any named function (fault tests).

One case, one process (``site_env``: every process, worker processes too, armed by
``kill_site/sitecustomize.py``)::

    python -m helpers.kill_points --at modelzoo.data_prep.pipeline:write_manifest --nth 1 [--after] \\
        [--main modelzoo.data_prep.cli:main] -- pipeline --input-path ...

Many cases, one interpreter start-up (``run_cases``): a driver imports the entry point and ``preload``
once, then forks one child per case; each child arms its kill point and runs ``main(argv)``. The
children are real processes killed by a real SIGKILL; forking only saves the seconds that importing
transformers/torch costs each fresh interpreter.

``at`` is ``module:attr`` or ``module:Class.attr`` (``h5py:Dataset.__setitem__``); name the attribute
where the caller looks it up (a ``from x import f`` caller: patch ``caller_module:f``). The process
kills itself (no cleanup, no atexit, no finally) just before the N-th call, or just after it returns
with ``after``; if the call never comes N times, the entry point runs to its end (so a test that
expects ``-9`` fails). The product has no hooks for this: the patch is applied from outside, here.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import signal
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]
DATA_PREP_MAIN = "modelzoo.data_prep.cli:main"
# What a data-prep run imports (torch comes in with transformers' configuration_utils): once, in the driver.
DATA_PREP_PRELOAD = ("modelzoo.data_prep.pipeline", "h5py", "psutil", "numpy.random",
                     "transformers.configuration_utils", "transformers.models.auto.tokenization_auto",
                     "transformers:PreTrainedTokenizerFast")


@dataclass
class Case:
    """One kill: ``main(argv)`` dies at call ``nth`` of ``at``; its stdout/stderr go to ``log``."""

    at: str
    nth: int
    argv: list[str]
    log: str
    after: bool = False


def _resolve(spec: str):
    """``(owner, name)`` of ``module:attr`` / ``module:Class.attr``."""
    module, _, attr = spec.partition(":")
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def arm(at: str, nth: int, after: bool = False) -> None:
    """Patch ``at`` in this process so that the process dies on its call ``nth`` (see module doc)."""
    owner, name = _resolve(at)
    original = getattr(owner, name)
    calls = 0

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == nth and not after:
            _die()
        result = original(*args, **kwargs)
        if calls == nth and after:
            _die()
        return result

    setattr(owner, name, wrapper)


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def env(**extra: str) -> dict[str, str]:
    """``os.environ`` with ``tests/`` on PYTHONPATH (so ``-m helpers.kill_points`` resolves)."""
    paths = [str(TESTS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), **extra)


def site_env(at: str, nth: int = 1, after: bool = False) -> dict[str, str]:
    """An environment in which every Python process (a CLI and the worker processes it spawns) is
    armed at start-up by ``kill_site/sitecustomize.py``: each dies at its own ``nth`` call of ``at``."""
    spec = json.dumps({"at": at, "nth": nth, "after": after})
    base = env()
    base["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).with_name("kill_site")), base["PYTHONPATH"]])
    return dict(base, KILL_POINTS_ARM=spec)


def command(
    at: str, nth: int, argv: list[str], *, after: bool = False, main: str = DATA_PREP_MAIN
) -> list[str]:
    """The command line that runs ``main(argv)`` armed to die at ``at``'s ``nth`` call (run it with
    ``env()``; expect ``returncode == -9``)."""
    return [sys.executable, "-m", "helpers.kill_points", "--at", at, "--nth", str(nth),
            *(["--after"] if after else []), "--main", main, "--", *map(str, argv)]


def run_cases(cases: list[Case], spec_path: Path, *, main: str = DATA_PREP_MAIN,
              preload: tuple[str, ...] = DATA_PREP_PRELOAD, timeout: float = 120) -> list[int]:
    """Run every case (forked from one driver process, concurrently); their exit statuses, as
    ``Popen.returncode`` gives them (``-9``: killed at the point)."""
    spec = {"main": main, "preload": list(preload), "cases": [asdict(c) for c in cases]}
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "helpers.kill_points", "--cases", str(spec_path)]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"kill_points driver failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def _entry(main: str):
    owner, name = _resolve(main)
    return getattr(owner, name)


def _drive(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    entry = _entry(spec["main"])
    for item in spec["preload"]:
        _resolve(item) if ":" in item else importlib.import_module(item)
    children = []
    for case in map(lambda c: Case(**c), spec["cases"]):
        pid = os.fork()
        if pid == 0:  # the child: never returns into the driver's code
            code = 1
            try:
                fd = os.open(case.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                arm(case.at, case.nth, case.after)
                code = entry(case.argv) or 0
            except SystemExit as err:
                code = err.code if isinstance(err.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children.append(pid)
    statuses = []
    for pid in children:
        _, status = os.waitpid(pid, 0)
        statuses.append(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
    print(json.dumps(statuses))
    return 0


def _main() -> int:
    parser = argparse.ArgumentParser(prog="kill_points")
    parser.add_argument("--cases", help="a run_cases spec (JSON); the other flags are for one case")
    parser.add_argument("--at")
    parser.add_argument("--nth", type=int, default=1)
    parser.add_argument("--after", action="store_true")
    parser.add_argument("--main", default=DATA_PREP_MAIN)
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.cases:
        return _drive(args.cases)
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    arm(args.at, args.nth, args.after)
    return _entry(args.main)(argv)


if __name__ == "__main__":
    sys.exit(_main())

"""Spawned gloo cases grouped by process count: one ``spawn_cpu`` per group, not one per case.

Starting CPU ranks with ``spawn_cpu`` (a fresh interpreter per rank that imports torch, transformers
and modelzoo: ~5 s of CPU each) costs far more on a small machine than the tiny runs the tests give
them. So each test module declares its spawned cases once (:func:`register`, :class:`Case`) and the
session's :class:`SpawnBatch` (the ``spawn_batch`` fixture, conftest.py) runs every declared case
that needs the same number of processes in one ``spawn_cpu`` call, one case after another, each into
its own output dir. A case is the same worker function with the same arguments as when it had a
spawn of its own (``spawn_cpu``'s worker: gloo over a FileStore, loopback, one thread per rank); all
ranks meet at a barrier after each case, and only then is its dir marked done.

A test asks for its case's dir; the first request for a process count runs the group: the cases of
every module with tests selected in this session whose ``tests`` are selected, the requesting
module's first. A case that did not finish (it failed, or one before it in the group did) is run
again in a spawn of its own when its test asks for it, so one failing case fails only its own tests,
with its traceback.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DONE = ".case-done"


@dataclass(frozen=True)
class Case:
    """``fn(rank, world_size, out_dir, *args)`` on ``nprocs`` ranks (``fn`` at module level, as for
    ``spawn_cpu``). ``tests`` names the test functions that read its dir (for test selection)."""

    nprocs: int
    fn: Callable[..., Any]
    args: tuple = ()
    tests: tuple[str, ...] = ()


#: module name -> its cases, built from the session's shared inputs (see :class:`SpawnBatch`)
_MODULES: dict[str, Callable[[dict[str, Any]], dict[str, Case]]] = {}


def register(module: str, cases: Callable[[dict[str, Any]], dict[str, Case]]) -> None:
    """Declare ``module``'s spawned cases (at import): ``cases(inputs)`` builds them by name."""
    _MODULES[module] = cases


def _run_cases(rank: int, world_size: int, cases: list[tuple[str, Callable, str, tuple]]) -> None:
    import torch.distributed as dist

    for name, fn, out, args in cases:
        Path(out).mkdir(parents=True, exist_ok=True)
        try:
            fn(rank, world_size, out, *args)
        except BaseException as exc:
            raise RuntimeError(f"spawned case {name!r} failed on rank {rank}") from exc
        dist.barrier()  # every rank is done with this case before the next one starts
        if rank == 0:
            Path(out, DONE).write_text(name)


class SpawnBatch:
    """The session's spawned cases, run by process count into ``root/<module>/<case>``.

    ``inputs`` are what the modules' case builders may use (e.g. a dataset dir shared with the
    module's own fixtures); ``session`` gives the selected tests.
    """

    def __init__(self, root: Path, session, inputs: dict[str, Any]) -> None:
        self.root, self.inputs = Path(root), inputs
        self.selected: dict[str, set[str]] = {}
        for item in session.items:
            module = getattr(item, "module", None)
            if module is not None:
                self.selected.setdefault(module.__name__, set()).add(getattr(item, "originalname", item.name))
        self._cases: dict[str, dict[str, Case]] = {}
        self._tried: dict[tuple[str, str], BaseException | None] = {}  # -> how its group's spawn failed
        self._alone: set[tuple[str, str]] = set()

    def cases(self, module: str) -> dict[str, Case]:
        if module not in self._cases:
            self._cases[module] = _MODULES[module](self.inputs)
        return self._cases[module]

    def _spawn(self, nprocs: int, keys: list[tuple[str, str]]) -> BaseException | None:
        from modelzoo.parallel.mesh import spawn_cpu

        jobs = [(f"{m}:{n}", self.cases(m)[n].fn, str(self.root / m / n), self.cases(m)[n].args) for m, n in keys]
        try:
            spawn_cpu(_run_cases, nprocs, jobs)
        except Exception as exc:  # noqa: BLE001 - raised for the cases it stopped, when they are asked for
            return exc
        return None

    def __call__(self, module: str, name: str) -> Path:
        """The output dir of ``module``'s case ``name``, once it ran to the end on every rank."""
        key, nprocs = (module, name), self.cases(module)[name].nprocs
        if key not in self._tried:
            group = [key]
            for other in [module, *sorted(set(self.selected) - {module})]:
                if other not in _MODULES:
                    continue
                group += [(other, n) for n, case in self.cases(other).items()
                          if case.nprocs == nprocs and (other, n) not in self._tried and (other, n) != key
                          and self.selected.get(other, set()) & set(case.tests)]
            self._tried.update(dict.fromkeys(group, self._spawn(nprocs, group)))
        out = self.root / module / name
        if not (out / DONE).is_file() and key not in self._alone:  # stopped by another case, or by itself
            self._alone.add(key)
            shutil.rmtree(out, ignore_errors=True)  # a fresh start: no checkpoints of the stopped run
            self._tried[key] = self._spawn(nprocs, [key])
        if not (out / DONE).is_file():
            raise RuntimeError(f"spawned case {module}:{name} failed ({nprocs} processes)") from self._tried[key]
        return out

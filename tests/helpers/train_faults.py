"""Kill -9 training at chosen points, resume, and keep what each run left (driver for the fault tests).

    python tests/helpers/train_faults.py SPEC.json

SPEC: ``{"world": 1|2, "chains": [{"overrides": [...], "snapshots": DIR, "runs": [RUN, ...]}]}``;
each RUN is ``{"resume": bool, "kill": null | {"at": POINT, "nth": N, "rank": R}}`` and is started
after the previous one ended (``resume`` is dropped while there is no checkpoint yet). POINTs (see
:data:`POINTS`) are functions of the trainer and the checkpoint manager: the process of rank R sends
itself SIGKILL on the N-th call, before it (``:before``) or after it returns (``:after``);
``eval_batch`` dies after the N-th dev batch. When one rank of a multi-rank run dies, its siblings
are stopped, as the launcher does.

This process imports everything once and forks each run from it, so a run costs its training time,
not an interpreter start-up; it runs no torch op itself (what it forks stays fork-safe). After each
run, ``snapshots/run_{i}/`` gets a copy of the checkpoint dir and ``outcome.json`` (exit status or
signal), for the test to compare with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import modelzoo.models.llama.parallelize  # noqa: F401 (imported once here, not in every forked run)
from modelzoo.checkpoint import manager
from modelzoo.config import load_config
from modelzoo.parallel.launch import INIT_FILE_ENV, PARENT_ENV, loopback_env
from modelzoo.training import trainer as trainer_mod
from modelzoo.training.data import ShardedLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: run as a script
from helpers import kill_points  # noqa: E402

#: Kill points: where each patch goes (``module:attr``, as the caller looks it up; helpers.kill_points).
POINTS = {
    "train_step": "modelzoo.training.trainer:Trainer.train_step",  # between saves / before the first save
    "evaluate": "modelzoo.training.trainer:Trainer.evaluate",
    "hf_shard": "modelzoo.checkpoint.hf_save:save_file",  # the weights, inside the scratch dir
    "write_hf_dir": "modelzoo.training.trainer:write_hf_dir",
    "training_state": "modelzoo.checkpoint.manager:write_training_state",
    "marker": "modelzoo.checkpoint.atomic:write_output_marker",
    "publish": "modelzoo.checkpoint.atomic:publish",
    "latest": "modelzoo.checkpoint.manager:replace_file",  # moves ``latest`` (after it: before pruning)
    "prune": "modelzoo.checkpoint.manager:remove_tree",
}


def _arm(kill: dict | None, rank: int) -> None:
    if not kill or kill.get("rank", 0) != rank:
        return
    name, when = kill["at"].split(":")
    if name != "eval_batch":
        kill_points.arm(POINTS[name], kill["nth"], after=when == "after")
        return
    original, calls = ShardedLoader.epoch_batches, {"n": 0}

    def batches(*args, **kwargs):  # mid-eval: dies when asked for the batch after the N-th
        for batch in original(*args, **kwargs):
            calls["n"] += 1
            yield batch
            if calls["n"] == kill["nth"]:
                os.kill(os.getpid(), signal.SIGKILL)

    ShardedLoader.epoch_batches = batches


def _train(overrides: list[str], resume: bool, kill: dict | None, rank: int) -> None:
    _arm(kill, rank)
    resume = resume and manager.latest_checkpoint(_value(overrides, "checkpoint.save_dir")) is not None  # killed before any save: fresh
    cfg = load_config("llama_tiny", overrides + [f"checkpoint.resume={str(resume).lower()}"])
    trainer_mod.Trainer(cfg, quiet=True).fit()


def _run(spec: dict, run: dict) -> int:
    """One run in forked processes; returns the exit status (negative: killed by that signal)."""
    world = spec["world"]
    pid = os.fork()
    if pid:
        return _wait(pid)
    try:  # the run's launcher
        if world == 1:
            _train(spec["overrides"], run["resume"], run["kill"], 0)
            os._exit(0)
        rdzv = tempfile.mkdtemp(prefix="modelzoo-rdzv-")
        env = {**loopback_env(), INIT_FILE_ENV: os.path.join(rdzv, "store"), PARENT_ENV: str(os.getpid()),
               "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
        ranks = []
        for rank in range(world):
            child = os.fork()
            if child == 0:
                try:
                    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
                    _train(spec["overrides"], run["resume"], run["kill"], rank)
                    os._exit(0)
                except BaseException:
                    import traceback

                    traceback.print_exc()
                    os._exit(1)
            ranks.append(child)
        status = 0
        pending = set(ranks)
        while pending:
            done, code = os.waitpid(-1, 0)
            pending.discard(done)
            code = os.waitstatus_to_exitcode(code)
            if code != 0 and status == 0:
                status = code
                for other in pending:  # one rank died: stop the rest, as the launcher does
                    os.kill(other, signal.SIGKILL)
        shutil.rmtree(rdzv, ignore_errors=True)
        os._exit(status & 0xFF if status >= 0 else 128 - status)
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(1)


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return -(code - 128) if code > 128 else code


def main(path: str) -> int:
    spec = json.loads(Path(path).read_text())
    for chain in spec["chains"]:
        _chain({**chain, "world": spec["world"]})
    return 0


def _chain(spec: dict) -> None:
    snapshots = Path(spec["snapshots"])
    save_dir = Path(_value(spec["overrides"], "checkpoint.save_dir"))
    output_dir = Path(_value(spec["overrides"], "training.output_dir"))
    for i, run in enumerate(spec["runs"]):
        start = time.perf_counter()
        status = _run(spec, run)
        out = snapshots / f"run_{i}"
        if save_dir.is_dir():
            shutil.copytree(save_dir, out / "ck", symlinks=True)
        out.mkdir(parents=True, exist_ok=True)
        if (output_dir / "metrics.jsonl").is_file():
            shutil.copy2(output_dir / "metrics.jsonl", out / "metrics.jsonl")
        (out / "outcome.json").write_text(json.dumps({"status": status, "run": run,
                                                      "seconds": time.perf_counter() - start}))


def _value(overrides: list[str], key: str) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}="))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))

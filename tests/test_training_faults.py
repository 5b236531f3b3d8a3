"""Fault injection: kill -9 training at seeded points (single process, TP=2, DP=2), resume, compare.

Each layout runs once uninterrupted (keeping every checkpoint) and once as a chain of runs, each
killed at a point drawn by ``random.Random(seed)`` from every phase (before the first save, between
saves, inside each step of a save, during eval) and resumed by the next. After every run, each
checkpoint on disk must equal the uninterrupted run's checkpoint of the same step, file by file
(weights bit for bit, optimizer and RNG state tensor for tensor), ``latest`` must name a complete
one, and anything else left must be scratch that the next run removes. At the end the chain's
losses equal the uninterrupted run's exactly.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from synthetic_data import SAMPLE_TOKENIZER, write_dataset

HELPER = Path(__file__).parent / "helpers" / "train_faults.py"
SAVE_EVERY, EVAL_EVERY = 2, 3
#: A killed run gets at most this far past its last checkpoint (the next eval, save or prune).
MOST_STEPS_PER_KILL = 3
#: Points inside one save, in the order a save reaches them (see tests/helpers/train_faults.py).
SAVE_POINTS = ["hf_shard:before", "write_hf_dir:after", "training_state:after", "marker:after", "publish:before",
               "publish:after", "latest:after", "prune:before", "prune:after"]
#: layout -> (processes, overrides, how many save points its chain kills at)
LAYOUTS = {
    "single": (1, {}, len(SAVE_POINTS)),
    "tp2": (2, {"samba_compile.tensor_parallel": "weight", "samba_compile.n_chips": 2}, 2),
    "dp2": (2, {"data_parallel.world_size": 2, "training.batch_size": 2}, 2),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("faults") / "data", n_train_files=2, rows_per_file=16,
                         tokenizer=SAMPLE_TOKENIZER)


def _overrides(root: Path, data: Path, extra: dict, keep_last: int, max_steps: int) -> list[str]:
    base = {"model.name_or_path": "llama2_tiny", "training.dataset_dir": str(data), "training.max_seq_length": 32,
            "training.batch_size": 4, "training.max_steps": max_steps, "training.warmup_steps": 2,
            "training.learning_rate": 1e-3, "training.log_every": 1, "training.seed": 3,
            "training.eval_every": EVAL_EVERY, "training.deterministic": True,
            "checkpoint.save_every": SAVE_EVERY, "checkpoint.keep_last": keep_last,
            "checkpoint.save_dir": str(root / "ck"), "training.output_dir": str(root / "out"),
            "samba_compile.output_folder": str(root / "plan"), **extra}
    return [f"{k}={v}" for k, v in base.items()]


def kill_plan(seed: int, world: int, save_points: list[str], full: bool) -> list[dict]:
    """Kill points over every phase: before the first save, each of ``save_points`` inside a save,
    during eval and (``full``) between saves and right after an eval. Their order, which call and
    which rank are drawn from ``seed``."""
    rng = random.Random(seed)
    middle = [{"at": point, "nth": 1} for point in save_points]
    middle.append({"at": "eval_batch:after", "nth": rng.randint(1, 2)})  # mid-eval
    if full:
        middle += [{"at": "train_step:after", "nth": rng.randint(1, SAVE_EVERY)}, {"at": "evaluate:after", "nth": 1}]
    rng.shuffle(middle)
    plan = [{"at": "train_step:after", "nth": 1}] + middle  # the first: before the first save (step 2)
    for kill in plan:  # rank 0 alone writes the HF dir and publishes; every rank trains and writes its state
        everywhere = kill["at"].split(":")[0] in ("train_step", "training_state", "eval_batch", "evaluate")
        kill["rank"] = rng.randrange(world) if everywhere else 0
    return plan


def _drive(tmp: Path, data: Path, world: int, extra: dict, max_steps: int, runs: list[dict]) -> list[dict]:
    """The uninterrupted run (every checkpoint kept) into ``tmp/ref``, then ``runs`` into ``tmp/chain``
    (keep_last 2), by one driver process; returns the chain's outcomes."""
    chains = [{"overrides": _overrides(tmp / name, data, extra, keep, max_steps),
               "snapshots": str(tmp / name / "snapshots"), "runs": chain_runs}
              for name, keep, chain_runs in (("ref", 0, [{"resume": False, "kill": None}]), ("chain", 2, runs))]
    (tmp / "spec.json").write_text(json.dumps({"world": world, "chains": chains}))
    proc = subprocess.run([sys.executable, str(HELPER), str(tmp / "spec.json")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads((tmp / "ref" / "snapshots" / "run_0" / "outcome.json").read_text())
    assert outcome["status"] == 0, proc.stderr[-3000:]
    return [json.loads((tmp / "chain" / "snapshots" / f"run_{i}" / "outcome.json").read_text())
            for i in range(len(runs))]


IGNORED = {"training_state/config.yaml", ".modelzoo-scratch.json"}  # run paths; an owner file mid-replace


def _dcp_contents(folder: Path, scratch: Path) -> dict:
    """Everything a DCP checkpoint holds, as one state dict (via a temporary torch.save file)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, scratch)
    try:
        return torch.load(scratch, weights_only=True)
    finally:
        scratch.unlink()


def _same(a, b) -> bool:
    """Equal nested state (dicts, lists, tensors bit for bit, plain values)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def _assert_same_checkpoint(got: Path, want: Path) -> None:
    files = {p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file()} - IGNORED
    expected = {p.relative_to(want).as_posix() for p in want.rglob("*") if p.is_file()} - IGNORED
    assert files == expected, f"{got}: files differ from the uninterrupted run's"
    for rel in sorted(files):
        if rel.startswith("training_state/dcp/"):  # .metadata pickles run paths: compare the contents
            if rel.endswith(".metadata"):
                a, b = (_dcp_contents(root / "training_state" / "dcp", got / f"{name}.pt")
                        for root, name in ((got, ".got-dcp"), (want, ".want-dcp")))
                assert _same(a, b), f"{got / 'training_state' / 'dcp'} differs"
        elif rel.endswith(".pt"):  # torch.save embeds a random serialization id: compare the contents
            a = torch.load(got / rel, weights_only=True)
            b = torch.load(want / rel, weights_only=True)
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, rel=rel: f"{got / rel}: {m}")
        else:
            assert (got / rel).read_bytes() == (want / rel).read_bytes(), f"{got / rel} differs"


def _check_snapshot(ck: Path, reference: Path) -> set[str]:
    """Every checkpoint complete and equal to the reference; returns the names of the scratch left."""
    if not ck.is_dir():
        return set()
    steps = sorted(p for p in ck.iterdir() if p.name.startswith("step_"))
    for step in steps:
        _assert_same_checkpoint(step, reference / step.name)
    if (ck / "latest").exists():
        assert (ck / (ck / "latest").read_text().strip()) in steps
    debris = {p.name for p in ck.iterdir() if p.name.startswith(".") and p.name != ".latest.tmp"}
    assert all(".tmp-" in name or ".old-" in name for name in debris), debris
    return debris


def _losses(metrics: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_kill_anywhere_then_resume_equals_uninterrupted(tmp_path, data, layout):
    world, extra, count = LAYOUTS[layout]
    seed = sum(map(ord, layout))
    points = SAVE_POINTS if count == len(SAVE_POINTS) else random.Random(seed).sample(SAVE_POINTS, count)
    plan = kill_plan(seed, world, points, full=world == 1)
    max_steps = SAVE_EVERY * (MOST_STEPS_PER_KILL * len(plan) // SAVE_EVERY + 1)  # room for every kill

    runs = [{"resume": i > 0, "kill": kill} for i, kill in enumerate(plan)] + [{"resume": True, "kill": None}]
    outcomes = _drive(tmp_path, data, world, extra, max_steps, runs)
    reference = tmp_path / "ref" / "snapshots" / "run_0" / "ck"
    assert len(list(reference.glob("step_*"))) == max_steps // SAVE_EVERY
    hit = [o["status"] == -9 for o in outcomes[:-1]]
    assert all(hit), [(o["run"]["kill"], o["status"]) for o in outcomes]
    assert outcomes[-1]["status"] == 0

    snapshots = tmp_path / "chain" / "snapshots"
    previous: set[str] = set()
    for i in range(len(runs)):
        debris = _check_snapshot(snapshots / f"run_{i}" / "ck", reference)
        assert not (previous & debris), f"run {i} did not remove the scratch a killed run left: {previous & debris}"
        previous = debris
    final = snapshots / f"run_{len(runs) - 1}"
    assert not previous, f"scratch left after the last run: {previous}"
    last_two = [f"step_{s:08d}" for s in (max_steps - SAVE_EVERY, max_steps)]
    assert sorted(p.name for p in (final / "ck").glob("step_*")) == last_two
    got, want = _losses(final / "metrics.jsonl"), _losses(reference.parent / "metrics.jsonl")
    assert [s for s, _ in got] == list(range(1, max_steps + 1))  # no step logged twice
    assert got == want

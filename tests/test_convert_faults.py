"""kill -9 of a real ``modelzoo-convert`` subprocess at seeded points mid-write.

Each case runs the conversion once in this process (recording its I/O steps, and giving the
reference output), picks a kill point from ``random.Random(seed)``, and runs it again as
``python -m modelzoo.cli.convert`` (via :mod:`helpers.convert_kill`) that SIGKILLs itself there.
After the kill the output path holds nothing, the previous complete output or the new complete
one (byte for byte; ``verify`` passes), never a partial; every scratch dir left beside it is
provably ours. A re-run removes that debris, says so in one line, and writes exactly the
uninterrupted run's files. All kills run at once (most of their time is importing torch).
"""

from __future__ import annotations

import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import stock_model
from helpers import convert_kill
from test_convert_meta import write_meta_dir
from test_convert_output import snapshot

from modelzoo.checkpoint.atomic import SCRATCH_OWNER, is_abandoned
from modelzoo.cli.convert import main

SEED = 1234
SHARD_SIZE = ["--max-shard-size", "60KB"]  # a 2-layer, hidden-64 model: several files per output


@dataclass
class Case:
    """One conversion to kill: ``argv`` (without --output), an earlier output it replaces, where it dies."""

    name: str
    argv: list[str]
    previous: list[str] | None = None  # argv of the earlier output the run replaces (with --overwrite)
    step: str | None = None  # kill at a seeded call of this step; None: at any seeded step
    after: bool = False


def cases(hf: Path, meta: Path) -> list[Case]:
    return [
        Case("shard-mid-tensor-data", ["shard", "--input", hf, "--n-chips", "2", *SHARD_SIZE], step="pwrite"),
        Case("meta-to-hf-fsync", ["meta-to-hf", "--input", meta, *SHARD_SIZE], step="fsync"),
        Case("unshard-after-publish", ["unshard", "--input", hf.parent / "tp", *SHARD_SIZE], step="rename",
             after=True),  # published, owner file not yet removed from it
        Case("quantize-replace-after-swap", ["quantize", "--int8", "--input", hf, *SHARD_SIZE, "--overwrite"],
             previous=["quantize", "--int8", "--skip-lm-head", "--input", hf], step="exchange", after=True),
        Case("shard-replace-any-step", ["shard", "--input", hf, "--n-chips", "4", *SHARD_SIZE, "--overwrite"],
             previous=["shard", "--input", hf, "--n-chips", "2"]),
    ]


def run(argv: list, out: Path) -> None:
    assert main([*map(str, argv), "--output", str(out), "--quiet"]) == 0


def scratch_of(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def state(out: Path) -> dict[str, str] | None:
    """The output's files (the owner file a kill after publishing may leave aside), None if absent."""
    return None if not out.exists() else {k: v for k, v in snapshot(out).items() if k != SCRATCH_OWNER}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    stock_model("llama3_tiny").save_pretrained(root / "hf")
    write_meta_dir(root / "meta", "llama3_tiny", 2)
    run(["shard", "--input", root / "hf", "--n-chips", "2"], root / "tp")
    return root


def test_kill_9_mid_conversion_leaves_no_partial_and_a_rerun_cleans_up(inputs, capsys):
    plans = []
    for case in cases(inputs / "hf", inputs / "meta"):
        work = inputs / case.name
        ref, out = work / "ref" / "out", work / "out"
        previous = None
        if case.previous:
            for target in (work / "prev" / "out", ref, out):
                run(case.previous, target)
            previous = snapshot(out)
        with convert_kill.counting() as calls:
            run(case.argv, ref)
        rng = random.Random(f"{SEED}-{case.name}")
        picks = [i for i, step in enumerate(calls) if case.step in (None, step)]
        step, nth = convert_kill.point(calls, rng.choice(picks))
        command = convert_kill.command(step, nth, [*case.argv, "--output", out, "--quiet"], after=case.after)
        proc = subprocess.Popen(command, env=convert_kill.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        plans.append((case, out, snapshot(ref), previous, f"{step} #{nth}{' (after)' if case.after else ''}", proc))

    for case, out, reference, previous, where, proc in plans:
        log = proc.communicate(timeout=120)[0].decode()
        assert proc.returncode == -9, f"{case.name}: not killed at {where} (rc {proc.returncode}): {log}"
        assert state(out) in (None, previous, reference), f"{case.name}: partial output after a kill at {where}"
        if out.exists():  # it opens as a checkpoint and verifies against an untouched copy
            same = out.parent / ("ref" if state(out) == reference else "prev") / "out"
            assert main(["verify", str(out), str(same), "--logits", "never"]) == 0
        debris = scratch_of(out)  # none only when the new output was published whole
        assert debris or state(out) == reference, f"{case.name}: no scratch left by a kill at {where}"
        assert all(is_abandoned(p) for p in debris), f"{case.name}: {debris} after a kill at {where}"

        capsys.readouterr()
        run([*case.argv, *([] if "--overwrite" in case.argv else ["--overwrite"])], out)
        printed = [line for line in capsys.readouterr().out.splitlines() if "scratch" in line]
        assert len(printed) == bool(debris) and all(p.name in printed[0] for p in debris), (case.name, printed)
        if debris:
            assert printed[0].startswith(f"note: removed {len(debris)} scratch dir(s) left by an interrupted run")
        assert not scratch_of(out)
        assert snapshot(out) == reference, f"{case.name}: re-run after a kill at {where} differs"

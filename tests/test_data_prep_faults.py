"""Data prep off the happy path: what --overwrite-output-path may delete, debris of killed runs,
kill -9 at seeded points (the output is nothing or the previous whole dataset, and the next run
cleans up and gives the same bytes), and damaged HDF5 files in verify."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from helpers import kill_points
from helpers.data_prep_fixtures import leftovers, prep_args, write_jsonl
from synthetic_data import write_dataset

from modelzoo.checkpoint.atomic import SCRATCH_OWNER, make_scratch
from modelzoo.data.dataset_layout import MANIFEST_FILE
from modelzoo.data_prep.cli import main
from modelzoo.data_prep.verify import verify_dataset

OLD_SEED, NEW_SEED = 1, 2


def args(inp, out, tok, seed: int = NEW_SEED, *extra: str) -> list[str]:
    """A small pipeline run: 3 train files + 1 dev file, shuffled with ``seed``, in one process."""
    return prep_args(inp, out, tok, "--shuffle", "on_RAM", "--seed", str(seed), "--dev-ratio", "0.2",
                     "--num-training-splits", "3", *extra)


def replace_flag(replacing: bool) -> list[str]:
    return ["--overwrite-output-path"] if replacing else []


def hdf5_digests(out) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.hdf5"))}


def snapshot(root) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a dir): to prove nothing changed."""
    return {p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in root.rglob("*")}


def hidden(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def built(tmp_path_factory, llama_like_tok):
    """The shared input, a dataset made with OLD_SEED and the uninterrupted reference with NEW_SEED."""
    root = tmp_path_factory.mktemp("faults")
    rows = [{"prompt": f"q{i} alpha beta", "completion": f"a{i} gamma delta river"} for i in range(300)]
    inp = write_jsonl(root / "in.jsonl", rows)
    for seed, name in ((OLD_SEED, "old"), (NEW_SEED, "ref")):
        assert main(args(inp, root / name, llama_like_tok, seed)) == 0
    return {"inp": inp, "tok": llama_like_tok, "old": root / "old", "ref": root / "ref"}


# -- what --overwrite-output-path may delete ------------------------------------------------------
def _dirs_and_hdf5(d, ds):
    for name in "abc":
        (d / name).mkdir(parents=True)
        (d / name / "run.log").write_text("mine")
    (d / "results.hdf5").write_bytes(b"")


def _metadata_only(d, ds):
    d.mkdir()
    (d / "metadata.yaml").write_text("max_seq_length: 32\n")
    (d / "notes.txt").write_text("mine")


def _manifest_lists_fewer(d, ds):
    shutil.copytree(ds, d)
    manifest = json.loads((d / MANIFEST_FILE).read_text())
    del manifest["metadata.yaml"]  # the file stays: the manifest no longer vouches for it
    (d / MANIFEST_FILE).write_text(json.dumps(manifest))


def _extra_file(d, ds):
    shutil.copytree(ds, d)
    (d / "notes.txt").write_text("mine")


def _extra_file_in_subdir(d, ds):
    shutil.copytree(ds, d)
    (d / "tokenizer" / "my_notes.txt").write_text("mine")


def _flattened_twin(d, ds):
    """A top-level file whose flattened name equals a listed one (tokenizer/tokenizer.json)."""
    shutil.copytree(ds, d)
    (d / "tokenizer_tokenizer.json").write_text("mine")


def _extra_empty_dir(d, ds):
    shutil.copytree(ds, d)
    (d / "checkpoints").mkdir()


def _listed_file_missing(d, ds):
    shutil.copytree(ds, d)
    (d / "dev_1_of_1.hdf5").unlink()


DECOYS = [_dirs_and_hdf5, _metadata_only, _manifest_lists_fewer, _extra_file, _extra_file_in_subdir,
          _flattened_twin, _extra_empty_dir, _listed_file_missing]


@pytest.mark.parametrize("decoy", DECOYS, ids=[d.__name__.strip("_") for d in DECOYS])
def test_overwrite_refuses_what_is_not_exactly_a_dataset(capsys, tmp_path, built, decoy):
    out = tmp_path / "out"
    decoy(out, built["old"])
    before = snapshot(out)
    assert main(args(built["inp"], out, built["tok"], NEW_SEED, "--overwrite-output-path")) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output-path {out} exists and ") and "refusing to delete it" in err, err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(out) == before and hidden(tmp_path) == []


def _real_dataset_with_stale_owner_file(d, ds):
    """What a kill just before the final swap leaves: the old dataset plus our owner file."""
    shutil.copytree(ds, d)
    (d / SCRATCH_OWNER).write_text(json.dumps({"pid": 1, "create_time": 0.0, "host": "elsewhere"}))


REPLACEABLE = {
    "empty_dir": lambda d, ds: d.mkdir(),
    "our_dataset": lambda d, ds: shutil.copytree(ds, d),
    "other_writer_dataset": lambda d, ds: write_dataset(d),  # manifest written as generative_data_prep
    "after_a_kill_before_the_swap": _real_dataset_with_stale_owner_file,
}


@pytest.mark.parametrize("make", REPLACEABLE.values(), ids=REPLACEABLE.keys())
def test_overwrite_replaces_an_empty_dir_or_a_dataset(capsys, tmp_path, built, make):
    out = tmp_path / "out"
    make(out, built["old"])
    assert main(args(built["inp"], out, built["tok"], NEW_SEED, "--overwrite-output-path")) == 0
    assert hdf5_digests(out) == hdf5_digests(built["ref"]) and verify_dataset(out).ok
    assert not (out / SCRATCH_OWNER).exists() and hidden(tmp_path) == []


def test_data_prep_replaces_only_an_hdf5_file(capsys, tmp_path, built):
    out = tmp_path / "one.hdf5"
    out.write_text("my notes, named .hdf5 by mistake")
    one = prep_args(built["inp"], out, built["tok"], "--overwrite-output-path", command="data_prep")
    assert main(one) == 1
    assert "is not an HDF5 file; refusing to replace it" in capsys.readouterr().err
    assert out.read_text() == "my notes, named .hdf5 by mistake"
    with h5py.File(out, "w") as f:
        f["x"] = [1]
    assert main(one) == 0
    with h5py.File(out) as f:
        assert "input_ids" in f
    assert hidden(tmp_path) == []


# -- debris -----------------------------------------------------------------------------------------
def _dead_scratch(target, tag: str) -> str:
    """The name of scratch of ``target`` made by a process that has exited (a killed run's leftover)."""
    code = ("import sys; from pathlib import Path; from modelzoo.checkpoint.atomic import make_scratch; "
            "d = make_scratch(Path(sys.argv[1]), sys.argv[2]); (d / 'rows.bin').write_bytes(b'x'); print(d)")
    done = subprocess.run([sys.executable, "-c", code, str(target), tag], capture_output=True, text=True,
                          check=True)
    return Path(done.stdout.strip()).name


@pytest.mark.parametrize("command", ["pipeline", "data_prep"])
def test_next_run_removes_only_debris_it_owns(capsys, tmp_path, built, command):
    out = tmp_path / ("out" if command == "pipeline" else "one.hdf5")
    dead = [_dead_scratch(out, "work"), _dead_scratch(out, "tmp")]
    live = make_scratch(out, "work")  # this process is alive: a concurrent run's scratch
    look_alike = tmp_path / f".{out.name}.tmp-1-deadbeef"  # right name, no owner file
    look_alike.mkdir()
    assert main(prep_args(built["inp"], out, built["tok"], command=command)) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if "left by an interrupted run" in x]
    assert len(lines) == 1 and lines[0].startswith("[data_prep] removed 2 scratch dir(s)")
    assert all(name in lines[0] for name in dead)
    assert hidden(tmp_path) == sorted([live.name, look_alike.name])


# -- kill -9 at seeded points -------------------------------------------------------------------------
# (name, function, its calls in an uninterrupted run, replacing an old dataset?, after the call? None: seeded)
KILLS = [
    ("tokenizing", "modelzoo.data_prep.packing:Packer.add", 2, False, None),
    ("hdf5_write", "h5py:Dataset.__setitem__", 8, False, None),
    ("hdf5_write_replacing", "h5py:Dataset.__setitem__", 8, True, None),
    ("manifest", "modelzoo.data_prep.pipeline:write_manifest", 1, False, None),
    ("before_swap", "modelzoo.checkpoint.atomic:_exchange", 1, True, False),
    ("after_swap", "modelzoo.checkpoint.atomic:_exchange", 1, True, True),
]


@pytest.fixture(scope="module")
def killed(tmp_path_factory, built):
    """Every kill case, run once: ``{name: (exit status, case dir, replacing?, log text)}``."""
    cases, dirs = [], []
    for seed, (name, at, calls, replacing, after) in enumerate(KILLS):
        rng = random.Random(seed)
        nth, late = rng.randint(1, calls), rng.random() < 0.5
        case = tmp_path_factory.mktemp(f"kill_{name}")
        if replacing:
            shutil.copytree(built["old"], case / "out")
        argv = args(built["inp"], case / "out", built["tok"], NEW_SEED, *replace_flag(replacing))
        log = str(case.with_suffix(".log"))
        cases.append(kill_points.Case(at, nth, argv, log, after=late if after is None else after))
        dirs.append((name, case, replacing))
    statuses = kill_points.run_cases(cases, tmp_path_factory.mktemp("kill_spec") / "cases.json")
    return {name: (status, case, replacing, Path(c.log).read_text())
            for (name, case, replacing), status, c in zip(dirs, statuses, cases, strict=True)}


@pytest.mark.parametrize("name", [k[0] for k in KILLS])
def test_kill_leaves_nothing_or_a_whole_dataset_and_the_rerun_cleans_up(capsys, built, killed, name):
    status, case, replacing, log = killed[name]
    assert status == -signal.SIGKILL, log
    out = case / "out"
    assert hidden(case), "a killed run leaves its scratch"
    assert [p.name for p in case.iterdir() if not p.name.startswith(".")] == (["out"] if replacing else [])
    if replacing:  # the previous dataset, or (killed after the swap) the new one: whole either way
        assert verify_dataset(out).ok
        assert hdf5_digests(out) in (hdf5_digests(built["old"]), hdf5_digests(built["ref"]))
    capsys.readouterr()
    assert main(args(built["inp"], out, built["tok"], NEW_SEED, *replace_flag(replacing))) == 0
    removed = [x for x in capsys.readouterr().err.splitlines() if "left by an interrupted run" in x]
    assert len(removed) == 1 and removed[0].startswith("[data_prep] removed ")
    assert hidden(case) == [] and leftovers(case) == []
    assert verify_dataset(out).ok and hdf5_digests(out) == hdf5_digests(built["ref"])
    assert not (out / SCRATCH_OWNER).exists()


# -- damaged HDF5 files -----------------------------------------------------------------------------
def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _overwrite_middle(path):
    """Same size, 400 bytes in the middle flipped."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2 - 200)
        block = f.read(400)
        f.seek(-len(block), 1)
        f.write(bytes(b ^ 0xFF for b in block))


@pytest.mark.parametrize("damage, first", [(_truncate, "differs from the manifest"),
                                           (_overwrite_middle, "sha256 differs from the manifest")],
                         ids=["truncated", "overwritten"])
def test_verify_reports_a_damaged_file_in_one_line(capsys, tmp_path, built, damage, first):
    ds = tmp_path / "ds"
    shutil.copytree(built["ref"], ds)
    bad = ds / "train_2_of_3.hdf5"
    damage(bad)
    assert main(["verify", str(ds)]) == 1
    text = capsys.readouterr().out
    problems = text.splitlines()[1:]
    assert problems[0].strip().startswith(str(bad)) and first in problems[0], text
    damaged = [p for p in problems if "not a readable dataset file" in p]
    assert len(damaged) == 1 and damaged[0].strip().startswith(f"{bad}: not a readable dataset file (cannot "), text
    assert "restore it or re-run data prep" in damaged[0] and "Traceback" not in text
    assert main(["verify", str(ds), "--skip-checksums"]) == 1  # h5py's own check, without the manifest
    assert f"{bad}: not a readable dataset file" in capsys.readouterr().out

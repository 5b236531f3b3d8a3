"""Where conversions write: ``--overwrite`` replaces only an empty dir or an earlier conversion's output
(its ``.modelzoo-output.json`` lists exactly the files present), never anything else; scratch left
by a killed run is removed by the next one (it says so), look-alikes are left alone; the marker and
scratch files of an input are never copied into an output."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import stock_model

from modelzoo.checkpoint.atomic import OUTPUT_MARKER, SCRATCH_OWNER, claim_scratch, marker_proof
from modelzoo.cli.convert import main

KINDS = ("hf-model", "tp-shards", "meta", "int8-model")


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file, and -> "dir" of every directory, under ``root``."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def scratch_of(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "hf"
    stock_model("llama3_tiny").save_pretrained(path)
    return path


def convert(src: Path, out: Path, command: str = "shard", *extra: str) -> int:
    argv = {"shard": ["shard", "--n-chips", "2"], "quantize": ["quantize", "--int8"],
            "hf-to-meta": ["hf-to-meta"]}[command]
    return main([*argv, "--input", str(src), "--output", str(out), "--quiet", *extra])


def test_an_earlier_conversion_output_is_replaced_by_any_conversion(tmp_path, src, capsys):
    out = tmp_path / "out"
    assert convert(src, out, "shard") == 0
    assert json.loads((out / OUTPUT_MARKER).read_text())["kind"] == "tp-shards"
    assert convert(src, out, "quantize") == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    for command, kind in (("quantize", "int8-model"), ("hf-to-meta", "meta"), ("shard", "tp-shards")):
        assert convert(src, out, command, "--overwrite") == 0
        marker = json.loads((out / OUTPUT_MARKER).read_text())
        assert marker["kind"] == kind and marker_proof(*KINDS)(out) is None
        assert not scratch_of(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert(src, empty, "quantize", "--overwrite") == 0


def _no_marker(out: Path, src: Path) -> None:
    stock_model("llama3_tiny").save_pretrained(out)  # config.json + safetensors: looks like a model


def _extra_file(out: Path, src: Path) -> None:
    assert convert(src, out) == 0
    (out / "notes.txt").write_text("mine")


def _extra_dir(out: Path, src: Path) -> None:
    assert convert(src, out) == 0
    (out / "keep").mkdir()


def _file_missing(out: Path, src: Path) -> None:
    assert convert(src, out) == 0
    (out / "rank_01" / "model.safetensors").unlink()


def _training_checkpoint(out: Path, src: Path) -> None:
    assert convert(src, out) == 0
    marker = json.loads((out / OUTPUT_MARKER).read_text())
    (out / OUTPUT_MARKER).write_text(json.dumps({**marker, "kind": "training-checkpoint"}))


@pytest.mark.parametrize(("make", "expect"), [
    (_no_marker, f"has no {OUTPUT_MARKER}"),
    (_extra_file, "holds 1 file(s) not written by modelzoo (e.g. notes.txt)"),
    (_extra_dir, "holds a directory not written by modelzoo (keep)"),
    (_file_missing, "missing (e.g. rank_01/model.safetensors)"),
    (_training_checkpoint, "names a 'training-checkpoint' output"),
])
def test_an_output_that_almost_qualifies_is_refused_and_left_intact(tmp_path, src, capsys, make, expect):
    out = tmp_path / "out"
    make(out, src)
    before = snapshot(out)
    capsys.readouterr()
    assert convert(src, out, "quantize", "--overwrite") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: --output {out} exists and "), err
    assert expect in err and "refusing to delete it" in err
    assert snapshot(out) == before
    assert not scratch_of(out)


def test_a_file_at_the_output_path_is_refused(tmp_path, src, capsys):
    out = tmp_path / "out"
    out.write_text("not a dir")
    assert convert(src, out, "quantize", "--overwrite") == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert out.read_text() == "not a dir"


def _owned(path: Path, pid: int, host: str | None = None) -> Path:
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"half written")
    (path / SCRATCH_OWNER).write_text(json.dumps({"pid": pid, "create_time": None,
                                                  "host": host or socket.gethostname()}))
    return path


def test_debris_of_a_dead_run_is_removed_and_look_alikes_are_kept(tmp_path, src, capsys):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    debris = _owned(tmp_path / f".out.tmp-{dead.pid}-0123abcd", dead.pid)
    aside = _owned(tmp_path / f".out.old-{dead.pid}-4567cdef", dead.pid)  # an old output moved aside
    keep = [tmp_path / f".out.tmp-{dead.pid}-89abcdef"]  # no owner file
    keep[0].mkdir()
    keep.append(_owned(tmp_path / f".out.tmp-{os.getpid()}-00000000", os.getpid()))  # owner alive
    claim_scratch(keep[-1])
    keep.append(_owned(tmp_path / f".out.tmp-{dead.pid}-11111111", dead.pid, host="elsewhere"))
    keep.append(_owned(tmp_path / f".other.tmp-{dead.pid}-22222222", dead.pid))  # another output's
    keep.append(_owned(tmp_path / f".out.partial-{dead.pid}", dead.pid))  # not our naming
    capsys.readouterr()
    assert convert(src, out) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "scratch" in line]
    prefix = "note: removed 2 scratch dir(s) left by an interrupted run: "
    assert len(lines) == 1 and lines[0].startswith(prefix), lines
    assert sorted(lines[0][len(prefix):].split(", ")) == sorted([debris.name, aside.name])
    assert not debris.exists() and not aside.exists()
    assert all(path.is_dir() for path in keep)


def test_markers_of_an_input_are_never_copied(tmp_path, src):
    """Chained conversions read outputs of ours: the output's marker is its own, listing its files."""
    hf = tmp_path / "hf"
    assert convert(src, tmp_path / "tp") == 0
    (tmp_path / "tp" / SCRATCH_OWNER).write_text("{}")  # as a kill after publishing may leave
    assert main(["unshard", "--input", str(tmp_path / "tp"), "--output", str(hf), "--quiet"]) == 0
    assert convert(hf, tmp_path / "tp2") == 0
    for out, kind in ((hf, "hf-model"), (tmp_path / "tp2", "tp-shards")):
        marker = json.loads((out / OUTPUT_MARKER).read_text())
        files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
        assert marker["kind"] == kind and set(marker["files"]) == files - {OUTPUT_MARKER}
        assert not any(SCRATCH_OWNER in f or f.endswith(f"/{OUTPUT_MARKER}") for f in files)

"""Bad input, bad flags, bad paths, a crashing worker: one clear ``error:`` line naming the file/line
or flag and the fix, a non-zero exit, and nothing left at (or beside) the output path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from helpers import kill_points
from helpers.data_prep_fixtures import (
    _train_bpe,
    leftovers,
    prep_args,
    read_split,
    write_jsonl,
)

from modelzoo.data_prep.cli import main

GOOD = [{"prompt": f"q{i} alpha", "completion": f"a{i} beta"} for i in range(20)]


def run_failing(capsys, tmp_path, args) -> str:
    """Run, expect exit 1 and no output; return the error line."""
    out = tmp_path / "out"
    assert main(args) == 1
    err = capsys.readouterr().err
    assert not out.exists(), "a failed run must not leave an output"
    assert leftovers(tmp_path) == []
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def lines_file(tmp_path, lines: list[bytes], name="in.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_malformed_json_names_line_and_snippet(capsys, tmp_path, llama_like_tok):
    good = [json.dumps(r).encode() for r in GOOD]
    inp = lines_file(tmp_path, good[:3] + [b'{"prompt": "q", "completion": oops}'] + good[3:])
    err = run_failing(capsys, tmp_path, prep_args(inp, tmp_path / "out", llama_like_tok))
    assert f"{inp}:4: malformed JSON" in err and "oops" in err and "--ignore-input-format-error" in err


def test_ignore_input_format_error_skips_and_logs(capsys, tmp_path, llama_like_tok):
    good = [json.dumps(r).encode() for r in GOOD]
    bad = [b'{"prompt": "q", "completion": oops}', b'{"prompt": "no completion key"}', b"\xff\xfe bad bytes"]
    inp = lines_file(tmp_path, good[:5] + bad + good[5:])
    out = tmp_path / "out"
    assert (
        main(
            prep_args(
                inp,
                out,
                llama_like_tok,
                "--ignore-input-format-error",
                "--input-packing-config",
                "single::drop",
            )
        )
        == 0
    )
    log = (out / "json_load_failed_lines.log").read_text().splitlines()
    assert [line.split(": ")[0] for line in log] == [f"{inp}:6", f"{inp}:7", f"{inp}:8"]
    captured = capsys.readouterr()
    assert "skipped 3 bad input lines" in captured.err and "Bad lines skipped  3" in captured.out
    assert len(read_split(out)[0]) == len(GOOD)


def test_missing_completion_key(capsys, tmp_path, llama_like_tok):
    inp = write_jsonl(tmp_path / "in.jsonl", GOOD[:2] + [{"prompt": "p", "answer": "x"}])
    err = run_failing(capsys, tmp_path, prep_args(inp, tmp_path / "out", llama_like_tok))
    assert f"{inp}:3: missing 'completion' key" in err and "--completion-keyword" in err


def test_completion_must_be_a_string(capsys, tmp_path, llama_like_tok):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "completion": 5}])
    err = run_failing(capsys, tmp_path, prep_args(inp, tmp_path / "out", llama_like_tok))
    assert f"{inp}:1: 'completion' must be a string, got int" in err


def test_non_utf8_bytes(capsys, tmp_path, llama_like_tok):
    inp = lines_file(tmp_path, [json.dumps(GOOD[0]).encode(), b'{"prompt": "caf\xe9", "completion": "x"}'])
    err = run_failing(capsys, tmp_path, prep_args(inp, tmp_path / "out", llama_like_tok))
    assert f"{inp}:2: not valid UTF-8" in err


@pytest.mark.parametrize("content", [b"", b"\n \n\n"], ids=["empty", "blank"])
def test_empty_input(capsys, tmp_path, llama_like_tok, content):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(content)
    err = run_failing(capsys, tmp_path, prep_args(inp, tmp_path / "out", llama_like_tok))
    assert str(inp) in err and ("is empty" in err or "no usable lines" in err)


def test_empty_directory_and_wrong_suffix(capsys, tmp_path, llama_like_tok):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert "holds no .jsonl or .txt files" in run_failing(
        capsys, tmp_path, prep_args(empty, tmp_path / "out", llama_like_tok)
    )
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    assert "expected a .jsonl or .txt file" in run_failing(
        capsys, tmp_path, prep_args(csv, tmp_path / "out", llama_like_tok)
    )


def test_every_article_longer_than_a_sequence(capsys, tmp_path, llama_like_tok):
    long = [{"prompt": "alpha beta " * 30, "completion": "gamma delta " * 30} for _ in range(5)]
    inp = write_jsonl(tmp_path / "in.jsonl", long)
    args = prep_args(inp, tmp_path / "out", llama_like_tok, "--input-packing-config", "greedy::drop")
    err = run_failing(capsys, tmp_path, args)
    assert "longer than --max-seq-length 32" in err and "greedy::drop" in err and "truncate" in err


def test_some_articles_longer_than_a_sequence_warn_and_count(capsys, tmp_path, llama_like_tok):
    rows = GOOD + [{"prompt": "alpha beta " * 30, "completion": "gamma delta " * 30}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    assert main(prep_args(inp, out, llama_like_tok, "--input-packing-config", "single::drop")) == 0
    captured = capsys.readouterr()
    assert "warning: train:" in captured.err and "longer than --max-seq-length 32" in captured.err
    assert len(read_split(out)[0]) == len(GOOD)


def test_existing_output_is_refused_then_replaced(capsys, tmp_path, llama_like_tok):
    inp = write_jsonl(tmp_path / "in.jsonl", GOOD)
    out = tmp_path / "out"
    assert main(prep_args(inp, out, llama_like_tok)) == 0
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert main(prep_args(inp, out, llama_like_tok)) == 1
    assert "already exists; pass --overwrite-output-path" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
    (tmp_path / "neighbour.txt").write_text("keep me")
    assert (
        main(
            prep_args(
                inp, out, llama_like_tok, "--overwrite-output-path", "--input-packing-config", "single::drop"
            )
        )
        == 0
    )
    assert len(read_split(out)[0]) == len(GOOD)
    assert (tmp_path / "neighbour.txt").read_text() == "keep me" and leftovers(tmp_path) == []


def test_overwrite_refuses_to_delete_a_non_dataset_dir(capsys, tmp_path, llama_like_tok):
    inp = write_jsonl(tmp_path / "in.jsonl", GOOD)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    assert main(prep_args(inp, precious, llama_like_tok, "--overwrite-output-path")) == 1
    assert "has no sha256/files_metadata.json" in capsys.readouterr().err
    assert (precious / "thesis.tex").read_text() == "years of work" and leftovers(tmp_path) == []


def test_output_that_contains_the_input_is_refused(capsys, tmp_path, llama_like_tok):
    data = tmp_path / "data"
    data.mkdir()
    inp = write_jsonl(data / "in.jsonl", GOOD)
    (data / "metadata.yaml").write_text("x: 1\n")  # looks like a dataset, but holds the input
    assert main(prep_args(inp, data, llama_like_tok, "--overwrite-output-path")) == 1
    assert "overlaps the input" in capsys.readouterr().err and inp.exists()


def test_tokenizer_without_eos(capsys, tmp_path, tmp_path_factory):
    tok = _train_bpe(tmp_path_factory.mktemp("noeos") / "tok", bos=True, eos=False, pad=True, eos_token=False)
    inp = write_jsonl(tmp_path / "in.jsonl", GOOD)
    err = run_failing(capsys, tmp_path, prep_args(inp, tmp_path / "out", tok))
    assert "has no eos_token" in err and "save_pretrained" in err


def test_missing_tokenizer(capsys, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", GOOD)
    err = run_failing(capsys, tmp_path, prep_args(inp, tmp_path / "out", tmp_path / "nope"))
    assert "--pretrained-tokenizer" in err and "not a tokenizer directory" in err


def test_bad_flag_values(capsys, tmp_path, llama_like_tok):
    inp = write_jsonl(tmp_path / "in.jsonl", GOOD)
    err = run_failing(
        capsys,
        tmp_path,
        prep_args(inp, tmp_path / "out", llama_like_tok, "--dev-ratio", "0.7", "--test-ratio", "0.5"),
    )
    assert "--dev-ratio + --test-ratio must be below 1" in err
    err = run_failing(
        capsys, tmp_path, prep_args(inp, tmp_path / "out", llama_like_tok, "--num-dev-splits", "2")
    )
    assert "give all three" in err
    with pytest.raises(SystemExit) as exit_info:
        main(prep_args(inp, tmp_path / "out", llama_like_tok, "--input-packing-config", "greedy::squash"))
    assert exit_info.value.code == 2 and "greedy::squash" in capsys.readouterr().err


def test_interrupted_run_leaves_nothing(capsys, tmp_path, llama_like_tok, monkeypatch):
    from modelzoo.data_prep import packing

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(packing.Packer, "add", interrupt)
    inp = write_jsonl(tmp_path / "in.jsonl", GOOD)
    assert main(prep_args(inp, tmp_path / "out", llama_like_tok)) == 130
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_worker_crash_fails_cleanly_without_hanging(tmp_path, llama_like_tok):
    rows = [{"prompt": f"q{i} " + "alpha " * 40, "completion": "beta " * 40} for i in range(600)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    env = kill_points.site_env("modelzoo.data_prep.workers:_tokenize")  # SIGKILL in a worker process
    cmd = [sys.executable, "-m", "modelzoo.data_prep", *prep_args(inp, out, llama_like_tok, workers=2)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 1, done.stderr
    assert "error: a data-prep worker process died" in done.stderr and "--num-workers" in done.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_data_prep_never_overwrites_its_input(capsys, tmp_path, llama_like_tok):
    inp = write_jsonl(tmp_path / "in.jsonl", GOOD)
    before = inp.read_bytes()
    args = [
        "data_prep",
        "--input-path",
        str(inp),
        "--output-path",
        str(inp),
        "--pretrained-tokenizer",
        str(llama_like_tok),
        "--num-workers",
        "0",
        "--overwrite-output-path",
    ]
    assert main(args) == 1
    assert "overlaps the input" in capsys.readouterr().err
    assert inp.read_bytes() == before and leftovers(tmp_path) == []


def test_data_prep_bad_lines_log_beside_the_file(capsys, tmp_path, llama_like_tok):
    inp = lines_file(tmp_path, [json.dumps(r).encode() for r in GOOD] + [b"{broken"])
    out = tmp_path / "one.hdf5"
    args = prep_args(inp, out, llama_like_tok, "--ignore-input-format-error", L=32, command="data_prep")
    assert main(args) == 0
    log = (tmp_path / "one.hdf5.json_load_failed_lines.log").read_text()
    assert log.startswith(f"{inp}:21: malformed JSON") and out.is_file() and leftovers(tmp_path) == []


# -- bounds: --max-seq-length against the tokenizer/model, --max-line-bytes ------------------------
def _tokenizer_with_limits(src, dst, model_max_length=None, max_position_embeddings=None):
    """A copy of the tokenizer dir ``src`` stating a model_max_length and/or beside a model config.json."""
    shutil.copytree(src, dst)
    if model_max_length is not None:
        config = json.loads((dst / "tokenizer_config.json").read_text())
        config["model_max_length"] = model_max_length
        (dst / "tokenizer_config.json").write_text(json.dumps(config))
    if max_position_embeddings is not None:
        model = {"model_type": "llama", "max_position_embeddings": max_position_embeddings}
        (dst / "config.json").write_text(json.dumps(model))
    return dst


def test_max_seq_length_above_model_max_length(capsys, tmp_path, llama_like_tok):
    tok = _tokenizer_with_limits(llama_like_tok, tmp_path / "tok", model_max_length=64)
    inp = write_jsonl(tmp_path / "in.jsonl", GOOD)
    err = run_failing(capsys, tmp_path, prep_args(inp, tmp_path / "out", tok, L=128))
    assert f"--max-seq-length 128 is above 64, the model_max_length of the tokenizer {tok}" in err
    assert "--allow-long-sequences" in err
    assert main(prep_args(inp, tmp_path / "out", tok, "--allow-long-sequences", L=128)) == 0


def test_max_seq_length_above_max_position_embeddings(capsys, tmp_path, llama_like_tok):
    tok = _tokenizer_with_limits(llama_like_tok, tmp_path / "tok", max_position_embeddings=48)
    inp = write_jsonl(tmp_path / "in.jsonl", GOOD)
    err = run_failing(capsys, tmp_path, prep_args(inp, tmp_path / "out", tok, L=64, command="data_prep"))
    assert f"above 48, the max_position_embeddings of {tok / 'config.json'}" in err
    assert main(prep_args(inp, tmp_path / "out", tok, L=48)) == 0


def test_huge_max_seq_length_is_refused_before_any_tokenizing(capsys, tmp_path, llama_like_tok, monkeypatch):
    from modelzoo.data_prep import pipeline

    def never(*args, **kwargs):
        raise AssertionError("tokenizing started")

    monkeypatch.setattr(pipeline, "TokenizePack", never)
    inp = write_jsonl(tmp_path / "in.jsonl", GOOD)  # the tokenizer states no model_max_length
    err = run_failing(capsys, tmp_path, prep_args(inp, tmp_path / "out", llama_like_tok, L=1_000_000_000))
    assert "--max-seq-length 1000000000 is above 1,048,576, the hard cap" in err and "--allow-long-sequences" in err


def test_line_over_max_line_bytes(capsys, tmp_path, llama_like_tok):
    good = [json.dumps(r).encode() for r in GOOD]
    long = json.dumps({"prompt": "p", "completion": "alpha " * 1000}).encode()
    inp = lines_file(tmp_path, good[:2] + [long] + good[2:])
    err = run_failing(capsys, tmp_path, prep_args(inp, tmp_path / "out", llama_like_tok, "--max-line-bytes", "1000"))
    assert f"{inp}:3: line longer than --max-line-bytes 1000" in err and "--ignore-input-format-error" in err
    out = tmp_path / "out"
    args = prep_args(inp, out, llama_like_tok, "--max-line-bytes", "1000", "--ignore-input-format-error",
                     "--input-packing-config", "single::drop")
    assert main(args) == 0
    log = (out / "json_load_failed_lines.log").read_text().splitlines()
    assert len(log) == 1 and log[0].startswith(f"{inp}:3: line longer than --max-line-bytes 1000")
    assert len(read_split(out)[0]) == len(GOOD)

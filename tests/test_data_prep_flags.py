"""One flag style: every option is kebab-case (``--input-path``) and still answers to its
generative_data_prep snake_case spelling (``--input_path``) with the same result; ``--help`` shows the
kebab-case names, every choice and default; the progress bar counts tokens (tokens/s, ETA) on stderr."""

from __future__ import annotations

import argparse
import hashlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers.data_prep_fixtures import read_split, write_jsonl
from tqdm import tqdm

from modelzoo.data_prep import progress as progress_mod
from modelzoo.data_prep.cli import build_parser, main
from modelzoo.data_prep.options import PrepOptions
from modelzoo.data_prep.progress import TokenProgress


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def optional_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def snake(argv: list[str]) -> list[str]:
    """generative_data_prep's spelling of every flag in ``argv`` (values untouched)."""
    return ["--" + a[2:].replace("-", "_") if a.startswith("--") else a for a in argv]


def articles(n: int) -> list:
    rows = [{"q": f"question {i} alpha", "a": f"answer {i} beta gamma"} for i in range(n)]
    rows[3] = [{"q": "first turn", "a": "one"}, {"q": "second turn", "a": "two three"}]
    rows[5] = {"q": "a prompt with no answer", "a": ""}
    return rows


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in (".hdf5", ".jsonl")
    }


# -- every option has both spellings -----------------------------------------------------------
# A value for every option of every subcommand; a new option without one here fails the test below.
SAMPLE_VALUES = {
    "input_path": "in.jsonl",
    "output_path": "out",
    "pretrained_tokenizer": "tok",
    "max_seq_length": "64",
    "max_line_bytes": "4096",
    "input_packing_config": "single::truncate_left",
    "packing_boundary": "prompt_completion_pair",
    "attention_boundary": "prompt_completion_pair",
    "prompt_keyword": "q",
    "completion_keyword": "a",
    "prompt_prefix": "Q:",
    "prompt_postfix": "A:",
    "num_workers": "0",
    "compression": "lzf",
    "shuffle": "large_file",
    "seed": "7",
    "shuffle_ram_mb": "12.5",
    "num_training_splits": "4",
    "dev_ratio": "0.25",
    "test_ratio": "0.125",
    "num_dev_splits": "2",
    "num_test_splits": "1",
}


def full_argv(command: str, parser: argparse.ArgumentParser) -> list[str]:
    argv = [command]
    for action in optional_actions(parser):
        argv.append(action.option_strings[0])
        if action.nargs != 0:
            argv.append(SAMPLE_VALUES[action.dest])
    return argv + (["ds"] if command == "verify" else [])


@pytest.mark.parametrize("command", ["pipeline", "data_prep", "verify"])
def test_every_option_is_kebab_case_with_its_snake_case_alias(command):
    parser = subparsers(build_parser())[command]
    for action in optional_actions(parser):
        kebab = action.option_strings[0]
        assert "_" not in kebab, f"{kebab}: the first (shown) spelling must be kebab-case"
        if "-" in kebab[2:]:
            assert action.option_strings == [kebab, "--" + kebab[2:].replace("-", "_")], action.option_strings
        else:
            assert action.option_strings == [kebab]
    argv = full_argv(command, parser)
    new, old = build_parser().parse_args(argv), build_parser().parse_args(snake(argv))
    assert vars(new) == vars(old)
    defaults = vars(build_parser().parse_args([command, *(["ds"] if command == "verify" else [
        "--input-path", "i", "--output-path", "o", "--pretrained-tokenizer", "t"])]))
    changed = {k for k, v in vars(new).items() if v != defaults[k]}
    # every option (but the required ones, given in both) took its value
    assert changed >= {a.dest for a in optional_actions(parser) if not a.required}


def test_abbreviations_stay_unambiguous_and_shuffle_false_is_off():
    base = ["pipeline", "--input-path", "i", "--output-path", "o", "--pretrained-tokenizer", "t"]
    assert build_parser().parse_args([*base, "--overwrite"]).overwrite_output_path is True
    assert build_parser().parse_args([*base, "--overwrite_out"]).overwrite_output_path is True
    for value in ("False", "off"):
        assert build_parser().parse_args([*base, "--shuffle", value]).shuffle == "False"
    assert build_parser().parse_args(base).shuffle == "False"
    assert PrepOptions("i", "o", "t", shuffle="off").shuffle == "False"


def test_bad_choice_names_the_choices(capsys):
    base = ["pipeline", "--input-path", "i", "--output-path", "o", "--pretrained-tokenizer", "t"]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--shuffle", "sometimes"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--shuffle" in err and "off, on_RAM, large_file" in err


# -- both spellings, the real pipeline: the same dataset ---------------------------------------
def test_both_spellings_build_the_same_dataset(tmp_path, llama_like_tok, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", articles(120))
    (tmp_path / "in.jsonl").write_text(inp.read_text() + "not json\n", encoding="utf-8")

    def argv(out: Path) -> list[str]:
        return [
            "pipeline",
            "--input-path", str(inp),
            "--output-path", str(out),
            "--pretrained-tokenizer", str(llama_like_tok),
            "--max-seq-length", "24",
            "--input-packing-config", "greedy::truncate_right",
            "--packing-boundary", "prompt_completion_pair",
            "--attention-boundary", "prompt_completion_pair",
            "--prompt-keyword", "q",
            "--completion-keyword", "a",
            "--prompt-prefix", "Q:",
            "--prompt-postfix", " ->",
            "--disable-space-separator",
            "--keep-prompt-only-sequences",
            "--ignore-input-format-error",
            "--shuffle", "large_file",
            "--shuffle-ram-mb", "0.004",
            "--seed", "3",
            "--dev-ratio", "0.2",
            "--test-ratio", "0.1",
            "--num-workers", "0",
            "--max-line-bytes", "100000",
            "--compression", "lzf",
            "--allow-long-sequences",
            "--overwrite-output-path",
            "--no-progress",
        ]  # fmt: skip

    new, old = tmp_path / "kebab", tmp_path / "snake"
    assert main(argv(new)) == 0
    old_argv = snake(argv(old))
    assert "--input_path" in old_argv and "--max_seq_length" in old_argv and "--no_progress" in old_argv
    assert main(old_argv) == 0
    assert "tokenizing" not in capsys.readouterr().err  # --no-progress, in both spellings
    for split in ("train", "dev"):
        (ids_a, types_a), (ids_b, types_b) = read_split(new, split), read_split(old, split)
        assert ids_a.shape[1] == 24 and len(ids_a) > 0
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(types_a, types_b)
    assert digests(new) == digests(old) and any(k.startswith("test_files/") for k in digests(new))
    meta = yaml.safe_load((new / "metadata.yaml").read_text())
    assert meta == yaml.safe_load((old / "metadata.yaml").read_text())
    assert meta["shuffle"] == "large_file" and meta["input_packing_config"] == "greedy::truncate_right"


def test_data_prep_subcommand_both_spellings(tmp_path, llama_like_tok):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}", "completion": f"c{i} d"} for i in range(40)])

    def argv(out: Path) -> list[str]:
        return ["data_prep", "--input-path", str(inp), "--output-path", str(out), "--pretrained-tokenizer",
                str(llama_like_tok), "--max-seq-length", "64", "--input-packing-config", "single::drop",
                "--apply-chat-template", "--num-workers", "0", "--no-progress"]

    assert main(argv(tmp_path / "a.hdf5")) == 0
    assert main(snake(argv(tmp_path / "b.hdf5"))) == 0
    assert (tmp_path / "a.hdf5").read_bytes() == (tmp_path / "b.hdf5").read_bytes()


# -- --help ------------------------------------------------------------------------------------
def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def option_blocks(text: str) -> dict[str, str]:
    """``--flag`` -> its lines in the options list."""
    blocks, current = {}, None
    for line in text.splitlines():
        m = re.match(r"  (--[a-z-]+)", line)
        if m:
            current = m.group(1)
            blocks[current] = line
        elif current and line.startswith("      "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


@pytest.mark.parametrize("command", ["pipeline", "data_prep", "verify"])
def test_help_shows_kebab_names_choices_and_defaults(capsys, command):
    text = help_text(capsys, command)
    parser = subparsers(build_parser())[command]
    blocks = option_blocks(text)
    for action in optional_actions(parser):
        kebab = action.option_strings[0]
        assert kebab in blocks, kebab
        if action.choices:
            assert "{" + ",".join(action.choices) + "}" in blocks[kebab], kebab
        if action.nargs != 0:
            assert "default" in blocks[kebab].lower() or action.required, f"{kebab}: no default in --help"
    # snake_case names only in the sentence that says they are accepted
    assert set(re.findall(r"--[a-z]+(?:_[a-z]+)+", text)) <= {"--input_path", "--max_seq_length", "--skip_checksums"}
    assert re.search(r"generative_data_prep('s)? spelling", " ".join(text.split()))
    assert "``" not in text and "{False" not in text and "PackingConfig" not in text
    assert "-\n" not in text.replace(" -\n", "")  # no flag name broken across lines
    if command == "pipeline":
        assert "--shuffle {off,on_RAM,large_file}" in text and "greedy::truncate_left" in text
        flat = " ".join(text.split())
        assert "False is accepted" in flat and "Default: off" in flat


def test_help_of_the_installed_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "modelzoo.data_prep", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "{pipeline,data_prep,verify}" in done.stdout and "with underscores" in done.stdout


# -- progress ------------------------------------------------------------------------------------
BAR_LINE = re.compile(r"tokenizing:\s+(\d+)%\|[# \d]*\| [\d.]+k? tok \[\d\d:\d\d<(\d\d:\d\d|\?), [\d.]+k?tok/s\]")


def test_progress_counts_tokens_with_rate_and_eta(monkeypatch):
    monkeypatch.setattr(progress_mod, "LOG_INTERVAL_S", 0.0)
    stream = io.StringIO()  # not a terminal: one plain line per update
    clock = iter(range(1000))
    monkeypatch.setattr("tqdm.std.time", lambda: float(next(clock)))
    with TokenProgress(1000, True, stream) as bar:
        bar.update(400, 250)  # a quarter of the input gave 400 tokens
        bar.update(400, 500)
        assert bar.tokens == 800
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    matches = [BAR_LINE.search(line) for line in lines]
    assert all(matches[1:]), lines
    percents = [int(m.group(1)) for m in matches[1:]]
    assert percents[:2] == [25, 50] and percents[-1] == 100
    assert matches[2].group(2) not in ("?", "00:00")  # an ETA: half the input left at the rate so far


def test_progress_off_or_not_a_terminal(monkeypatch):
    stream = io.StringIO()
    for enabled in (False, None):  # None: only on a terminal
        with TokenProgress(10, enabled, stream) as bar:
            bar.update(5, 10)
    assert stream.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    with TokenProgress(10, None, tty) as bar:
        bar.update(5, 10)
    assert "\r" in tty.getvalue() and "tok/s" in tty.getvalue()


def test_cli_progress_goes_to_stderr_only(tmp_path, llama_like_tok, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}", "completion": f"c{i} d"} for i in range(200)])
    args = ["pipeline", "--input-path", str(inp), "--output-path", str(tmp_path / "ds"), "--pretrained-tokenizer",
            str(llama_like_tok), "--max-seq-length", "16", "--num-workers", "0"]
    assert main(args) == 0
    captured = capsys.readouterr()
    final = [m for m in map(BAR_LINE.search, captured.err.splitlines()) if m]
    assert final and final[-1].group(1) == "100", captured.err
    assert "tokenizing" not in captured.out and "Tokens in (tokenized)" in captured.out
    tokens = yaml.safe_load((tmp_path / "ds" / "metadata.yaml").read_text())["train_input_tokens"]
    assert f" {tqdm.format_sizeof(tokens)} tok [" in final[-1].group(0)


# -- the docs ------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "examples/training/README.md"]


def documented_commands(text: str) -> list[list[str]]:
    """Every ``modelzoo-data-prep ...`` command of the doc's code blocks, as argv (after the program)."""
    text = text.replace("\\\n", " ")
    commands = []
    for match in re.finditer(r"modelzoo-data-prep ([^\n`]*)", text):
        line = re.split(r"\s(?:&&|#)\s", match.group(1))[0]
        commands.append(shlex.split(line))
    return commands


@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_use_kebab_flags_and_parse(doc):
    commands = [c for c in documented_commands((REPO / doc).read_text(encoding="utf-8")) if c and c[0] != "--help"]
    assert commands, f"{doc}: no modelzoo-data-prep command"
    for argv in commands:
        assert not [a for a in argv if a.startswith("--") and "_" in a], argv
        build_parser().parse_args(argv)  # exits 2 on a flag the command does not know

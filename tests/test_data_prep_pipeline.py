"""The pipeline as a whole: layout, metadata, manifest, splits and balance, reproducibility,
shuffles, worker processes, the data_prep subcommand, verify, --help, the bundled sample."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from helpers.data_prep_fixtures import (
    hf_tokenizer,
    leftovers,
    prep_args,
    read_split,
    write_jsonl,
)

from modelzoo.data.dataset_layout import REQUIRED_METADATA_KEYS
from modelzoo.data_prep.cli import main
from modelzoo.data_prep.options import PrepOptions, SplitOptions
from modelzoo.data_prep.pipeline import run_pipeline
from modelzoo.data_prep.verify import verify_dataset

REPO = Path(__file__).resolve().parents[1]


def numbered_articles(n: int) -> list[dict]:
    return [{"prompt": f"q{i} alpha", "completion": f"a{i} beta"} for i in range(n)]


def hdf5_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.hdf5"))}


def article_numbers(tok, ids, types) -> list[int]:
    """The i of each 'q{i}' article, in row order (single packing: one article per row)."""
    out = []
    for row, t in zip(ids, types, strict=True):
        text = tok.decode(row[t == 0].tolist(), skip_special_tokens=True)
        out.append(int(text.split()[0][1:]))
    return out


def test_layout_metadata_manifest_and_verify(tmp_path, llama_like_tok):
    inp = write_jsonl(tmp_path / "in.jsonl", numbered_articles(1000))
    out = tmp_path / "ds"
    args = [
        "--input-packing-config",
        "single::drop",
        "--dev-ratio",
        "0.1",
        "--test-ratio",
        "0.05",
        "--shuffle",
        "on_RAM",
    ]
    assert main(prep_args(inp, out, llama_like_tok, *args, L=16)) == 0
    names = sorted(p.name for p in out.iterdir())
    meta = yaml.safe_load((out / "metadata.yaml").read_text())
    assert set(REQUIRED_METADATA_KEYS) <= set(meta)
    n_train, n_dev = meta["number_of_training_files"], meta["number_of_dev_files"]
    assert names == sorted(
        [f"train_{i}_of_{n_train}.hdf5" for i in range(1, n_train + 1)]
        + [f"dev_{i}_of_{n_dev}.hdf5" for i in range(1, n_dev + 1)]
        + ["metadata.yaml", "sha256", "test_files", "tokenizer"]
    )
    # single packing: one article per row, so the counts are exact
    assert meta["test_lines"] == 50 and meta["dev_sequences"] == 100 and meta["train_sequences"] == 850
    assert n_train == 16 and n_dev == 2  # 850 // 32 >= 16 ... the power-of-two rule
    assert meta["max_batch_size_train"] == 850 // 16 and meta["max_batch_size_dev"] == 50
    test_lines = (out / "test_files" / "test_1_of_1.jsonl").read_text().splitlines()
    assert len(test_lines) == 50 and all(json.loads(line)["prompt"].startswith("q") for line in test_lines)
    ids, types = read_split(out, "train")
    dev_ids, dev_types = read_split(out, "dev")
    tok = hf_tokenizer(out / "tokenizer")
    seen = article_numbers(tok, ids, types) + article_numbers(tok, dev_ids, dev_types)
    seen += [int(json.loads(line)["prompt"].split()[0][1:]) for line in test_lines]
    assert sorted(seen) == list(range(1000))  # every article exactly once across the splits
    manifest = json.loads((out / "sha256" / "files_metadata.json").read_text())
    assert {
        "metadata.yaml",
        "tokenizer_tokenizer.json",
        "test_files_test_1_of_1.jsonl",
        f"train_1_of_{n_train}.hdf5",
    } <= set(manifest)
    assert (
        manifest["metadata.yaml"]["sha256"]
        == hashlib.sha256((out / "metadata.yaml").read_bytes()).hexdigest()
    )
    report = verify_dataset(out)
    assert report.ok, report.text()
    assert main(["verify", str(out)]) == 0


def test_files_balanced_within_one(tmp_path, llama_like_tok):
    inp = write_jsonl(tmp_path / "in.jsonl", numbered_articles(103))
    out = tmp_path / "ds"
    assert (
        main(
            prep_args(
                inp,
                out,
                llama_like_tok,
                "--input-packing-config",
                "single::drop",
                "--num-training-splits",
                "8",
                L=16,
            )
        )
        == 0
    )
    sizes = []
    for i in range(1, 9):
        with h5py.File(out / f"train_{i}_of_8.hdf5") as f:
            sizes.append(f["input_ids"].shape[0])
            assert f["input_ids"].shape == f["token_type_ids"].shape == (sizes[-1], 16)
    assert sum(sizes) == 103 and max(sizes) - min(sizes) == 1
    assert yaml.safe_load((out / "metadata.yaml").read_text())["max_batch_size_train"] == min(sizes)


def test_split_by_counts(tmp_path, llama_like_tok):
    inp = write_jsonl(tmp_path / "in.jsonl", numbered_articles(140))
    out = tmp_path / "ds"
    args = [
        "--input-packing-config",
        "single::drop",
        "--num-training-splits",
        "4",
        "--num-dev-splits",
        "2",
        "--num-test-splits",
        "1",
    ]
    assert main(prep_args(inp, out, llama_like_tok, *args, L=16)) == 0
    meta = yaml.safe_load((out / "metadata.yaml").read_text())
    assert (meta["number_of_training_files"], meta["number_of_dev_files"], meta["number_of_test_files"]) == (
        4,
        2,
        1,
    )
    assert (meta["train_sequences"], meta["dev_sequences"], meta["test_lines"]) == (80, 40, 20)


def _run(tmp_path, tok, name, *extra, inp=None, L=16):
    inp = inp or write_jsonl(tmp_path / "in.jsonl", numbered_articles(300))
    out = tmp_path / name
    assert main(prep_args(inp, out, tok, "--input-packing-config", "single::drop", *extra, L=L)) == 0
    return out


@pytest.mark.parametrize("shuffle", ["on_RAM", "large_file"])
def test_same_seed_same_bytes_other_seed_differs(tmp_path, llama_like_tok, shuffle):
    extra = ["--shuffle", shuffle, "--dev-ratio", "0.1", "--shuffle-ram-mb", "0.004"]
    a = _run(tmp_path, llama_like_tok, "a", *extra, "--seed", "7")
    b = _run(tmp_path, llama_like_tok, "b", *extra, "--seed", "7")
    c = _run(tmp_path, llama_like_tok, "c", *extra, "--seed", "8")
    assert hdf5_digests(a) == hdf5_digests(b) and len(hdf5_digests(a)) >= 2
    assert hdf5_digests(a) != hdf5_digests(c)
    tok = hf_tokenizer(llama_like_tok)
    order_a = article_numbers(tok, *read_split(a))
    assert order_a != sorted(order_a)  # shuffled
    assert (a / "tokenizer" / "tokenizer.json").read_bytes() == (
        b / "tokenizer" / "tokenizer.json"
    ).read_bytes()


def test_large_file_shuffle_through_buckets(tmp_path, llama_like_tok):
    inp = write_jsonl(tmp_path / "in.jsonl", numbered_articles(2000))
    budget_mb = inp.stat().st_size / 6 / (1 << 20)
    opts = PrepOptions(
        input_path=str(inp),
        output_path=str(tmp_path / "ds"),
        pretrained_tokenizer=str(llama_like_tok),
        max_seq_length=16,
        shuffle="large_file",
        shuffle_ram_mb=budget_mb,
        num_workers=0,
        splits=SplitOptions(dev_ratio=0.05),
    )
    from modelzoo.data_prep.options import PackingConfig

    opts.packing = PackingConfig("single", "drop")
    result = run_pipeline(opts)
    assert result.shuffle_buckets >= 6 and result.max_bucket_bytes <= budget_mb * (1 << 20)
    tok = hf_tokenizer(llama_like_tok)
    numbers = article_numbers(tok, *read_split(tmp_path / "ds")) + article_numbers(
        tok, *read_split(tmp_path / "ds", "dev")
    )
    assert sorted(numbers) == list(range(2000)) and numbers[:50] != list(range(50))


def test_worker_processes_give_the_same_bytes(tmp_path, llama_like_tok):
    """2 spawned workers and in-process tokenizing write byte-identical files (chunk boundaries and
    result order do not depend on the workers)."""
    inp = write_jsonl(tmp_path / "in.jsonl", numbered_articles(3000))
    extra = ["--shuffle", "on_RAM", "--dev-ratio", "0.1"]
    one = tmp_path / "one"
    two = tmp_path / "two"
    assert (
        main(
            prep_args(
                inp, one, llama_like_tok, "--input-packing-config", "greedy::drop", *extra, L=64, workers=0
            )
        )
        == 0
    )
    assert (
        main(
            prep_args(
                inp, two, llama_like_tok, "--input-packing-config", "greedy::drop", *extra, L=64, workers=2
            )
        )
        == 0
    )
    assert hdf5_digests(one) == hdf5_digests(two)


def test_data_prep_subcommand_writes_one_file(tmp_path, llama_like_tok):
    inp = write_jsonl(tmp_path / "in.jsonl", numbered_articles(50))
    ds = _run(tmp_path, llama_like_tok, "ds", "--num-training-splits", "1", inp=inp)
    out = tmp_path / "one.hdf5"
    args = prep_args(inp, out, llama_like_tok, "--input-packing-config", "single::drop", L=16, command="data_prep")
    assert main(args) == 0
    with h5py.File(out) as f:
        ids, types = f["input_ids"][...], f["token_type_ids"][...]
    want_ids, want_types = read_split(ds)
    assert (ids == want_ids).all() and (types == want_types).all() and ids.dtype == np.int32
    assert leftovers(tmp_path) == []


def test_verify_finds_tampering(tmp_path, llama_like_tok):
    out = _run(tmp_path, llama_like_tok, "ds", "--num-training-splits", "2")
    with h5py.File(out / "train_1_of_2.hdf5", "r+") as f:
        t = f["token_type_ids"][...]
        t[0, -1] = 1  # a completion token after padding
        t[1, 0] = 7  # not a token type
        f["token_type_ids"][...] = t
    report = verify_dataset(out)
    text = report.text()
    assert not report.ok
    assert "sha256 differs" in text or "size" in text
    assert "outside {0,1,2,3}" in text
    assert main(["verify", str(out)]) == 1
    meta = yaml.safe_load((out / "metadata.yaml").read_text())
    meta["max_batch_size_train"] += 1
    (out / "metadata.yaml").write_text(yaml.safe_dump(meta))
    assert "max_batch_size_train" in verify_dataset(out, checksums=False).text()


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pipeline", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    flags = [
        "--input-path",
        "--output-path",
        "--pretrained-tokenizer",
        "--max-seq-length",
        "--input-packing-config",
        "--packing-boundary",
        "--attention-boundary",
        "--prompt-keyword",
        "--completion-keyword",
        "--prompt-prefix",
        "--prompt-postfix",
        "--apply-chat-template",
        "--keep-prompt-only-sequences",
        "--shuffle",
        "--seed",
        "--num-training-splits",
        "--dev-ratio",
        "--test-ratio",
        "--num-dev-splits",
        "--num-test-splits",
        "--num-workers",
        "--overwrite-output-path",
        "--ignore-input-format-error",
        "--shuffle-ram-mb",
        "--allow-long-sequences",
        "--max-line-bytes",
        "--no-progress",
    ]
    for flag in flags:
        assert flag in text, flag
    assert "greedy::truncate_left" in text and "large_file" in text


def test_python_dash_m_entry_point(tmp_path, llama_like_tok):
    inp = write_jsonl(tmp_path / "in.jsonl", numbered_articles(20))
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "modelzoo.data_prep", *prep_args(inp, out, llama_like_tok, L=16)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Tokens in (tokenized)" in done.stdout and "Padding tokens" in done.stdout
    assert verify_dataset(out).ok


def test_bundled_sample_builds_for_llama_tiny(tmp_path):
    """The README command: data/sample -> a dataset with max_seq_length 256 and vocab <= 1024."""
    sample = REPO / "data" / "sample"
    regenerated = tmp_path / "sample.jsonl"
    sys.path.insert(0, str(sample))
    try:
        import make_sample
    finally:
        sys.path.remove(str(sample))
    make_sample.main(regenerated)
    assert regenerated.read_bytes() == (sample / "sample.jsonl").read_bytes()
    out = tmp_path / "sample_hdf5"
    args = [
        "pipeline",
        "--input-path",
        str(sample / "sample.jsonl"),
        "--pretrained-tokenizer",
        str(sample / "tokenizer"),
        "--output-path",
        str(out),
        "--max-seq-length",
        "256",
        "--input-packing-config",
        "greedy::drop",
        "--shuffle",
        "on_RAM",
        "--seed",
        "0",
        "--dev-ratio",
        "0.1",
        "--num-workers",
        "0",
    ]
    assert main(args) == 0
    meta = yaml.safe_load((out / "metadata.yaml").read_text())
    assert meta["max_seq_length"] == 256 and meta["vocab_size"] <= 1024
    assert meta["train_sequences"] >= 100 and meta["number_of_dev_files"] >= 1
    assert verify_dataset(out).ok

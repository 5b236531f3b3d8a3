"""Bad input: one ``error:`` line naming the file (and tensor) and the fix, exit 2, and no output dir
(nor anything that looks like one) left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import stock_model
from test_convert_meta import write_meta_dir

from modelzoo.cli.convert import main


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def convert_fails(tmp_path: Path, capsys, *argv: str) -> str:
    out = tmp_path / "out"
    capsys.readouterr()  # drop what setting up printed
    code = main([*argv, "--output", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no partial dir left
    return lines[0]


def _meta(tmp_path, preset="llama3_tiny", n_mp=2):
    write_meta_dir(tmp_path / "meta", preset, n_mp)
    return tmp_path / "meta"


def test_missing_shard(tmp_path, capsys):
    meta = _meta(tmp_path)
    (meta / "consolidated.01.pth").unlink()
    err = convert_fails(tmp_path, capsys, "meta-to-hf", "--input", str(meta))
    assert "consolidated.01.pth" in err and "imply 2 model-parallel files" in err


def test_missing_first_shard_is_a_gap(tmp_path, capsys):
    meta = _meta(tmp_path)
    (meta / "consolidated.00.pth").unlink()
    err = convert_fails(tmp_path, capsys, "meta-to-hf", "--input", str(meta))
    assert "consolidated.00.pth missing" in err


def test_mismatched_shard_shapes(tmp_path, capsys):
    meta = _meta(tmp_path)
    state = torch.load(meta / "consolidated.01.pth", weights_only=True)
    state["layers.1.feed_forward.w2.weight"] = state["layers.1.feed_forward.w2.weight"][:, :-8].clone()
    torch.save(state, meta / "consolidated.01.pth")
    err = convert_fails(tmp_path, capsys, "meta-to-hf", "--input", str(meta))
    assert "consolidated.01.pth" in err and "layers.1.feed_forward.w2.weight" in err and "[64, 88]" in err


@pytest.mark.parametrize(("change", "expect"), [
    ({"dim": None}, "required field(s) dim missing"),
    ({"n_kv_heads": 3}, "n_heads=4 is not a multiple of n_kv_heads=3"),
    ({"vocab_size": 1000}, "vocab_size=1000 but the embedding has 1024 rows"),
    ({"multiple_of": 256}, "feed_forward.w1.weight"),
    ({"n_layers": 3}, "'layers.2.attention.wq.weight' missing"),
    ({"use_scaled_rope": "yes"}, "field 'use_scaled_rope' is 'yes'"),
])
def test_bad_params_json(tmp_path, capsys, change, expect):
    meta = _meta(tmp_path)
    params = json.loads((meta / "params.json").read_text())
    for key, value in change.items():
        if value is None:
            del params[key]
        else:
            params[key] = value
    (meta / "params.json").write_text(json.dumps(params))
    err = convert_fails(tmp_path, capsys, "meta-to-hf", "--input", str(meta))
    assert "params.json" in err or "consolidated" in err
    assert expect in err


def test_model_size_contradicting_params(tmp_path, capsys):
    meta = _meta(tmp_path)
    err = convert_fails(tmp_path, capsys, "meta-to-hf", "--input", str(meta), "--model-size", "llama2_tiny")
    assert "params.json" in err and "--model-size llama2_tiny" in err


def test_truncated_safetensors(tmp_path, capsys):
    src = tmp_path / "hf"
    stock_model("llama3_tiny").save_pretrained(src)
    weights = src / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 1000)
    err = convert_fails(tmp_path, capsys, "hf-to-meta", "--input", str(src))
    assert str(weights) in err and "truncated (" in err and "re-download or re-convert it" in err


def test_pickle_that_is_not_weights_only(tmp_path, capsys):
    meta = _meta(tmp_path, n_mp=1)
    state = torch.load(meta / "consolidated.00.pth", weights_only=True)
    state["payload"] = Evil()
    torch.save(state, meta / "consolidated.00.pth")
    err = convert_fails(tmp_path, capsys, "meta-to-hf", "--input", str(meta))
    assert "consolidated.00.pth" in err and "not a weights-only" in err and "system" in err


def test_corrupt_torch_file(tmp_path, capsys):
    meta = _meta(tmp_path)
    shard = meta / "consolidated.01.pth"
    os.truncate(shard, shard.stat().st_size // 2)
    err = convert_fails(tmp_path, capsys, "meta-to-hf", "--input", str(meta))
    assert "consolidated.01.pth" in err and "truncated or corrupt" in err


def test_failure_while_writing_removes_the_partial_output(tmp_path, capsys):
    """Replicated norms that differ between MP files are only seen mid-write: still nothing left."""
    meta = _meta(tmp_path)
    state = torch.load(meta / "consolidated.01.pth", weights_only=True)
    state["norm.weight"] = state["norm.weight"] + 1
    torch.save(state, meta / "consolidated.01.pth")
    err = convert_fails(tmp_path, capsys, "meta-to-hf", "--input", str(meta))
    assert "consolidated.01.pth" in err and "'norm.weight' differs" in err


def test_existing_output_and_wrong_format_are_refused(tmp_path, capsys):
    meta = _meta(tmp_path)
    err = convert_fails(tmp_path, capsys, "hf-to-meta", "--input", str(meta))
    assert "is in meta format; hf-to-meta reads hf or tp-shards checkpoints" in err
    (tmp_path / "out").mkdir()
    assert main(["meta-to-hf", "--input", str(meta), "--output", str(tmp_path / "out"), "--quiet"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["meta-to-hf", "--input", str(meta), "--output", str(tmp_path / "out"), "--quiet",
                 "--overwrite"]) == 0
    assert (tmp_path / "out" / "config.json").is_file()


def test_impossible_tp_degree(tmp_path, capsys):
    src = tmp_path / "hf"
    stock_model("llama2_tiny").save_pretrained(src)
    err = convert_fails(tmp_path, capsys, "shard", "--input", str(src), "--n-chips", "3")
    assert "--n-chips 3:" in err and "n_chips=3 does not divide num_attention_heads=4" in err


def test_missing_or_broken_params_and_tokenizer(tmp_path, capsys):
    meta = _meta(tmp_path)
    (meta / "params.json").write_text('{"dim": 64,\n "n_layers": }')
    err = convert_fails(tmp_path, capsys, "meta-to-hf", "--input", str(meta))
    assert "params.json:2: invalid JSON" in err
    (meta / "params.json").unlink()
    (meta / "tokenizer.model").write_bytes(b"\x00not a tokenizer")
    err = convert_fails(tmp_path, capsys, "meta-to-hf", "--input", str(meta))
    assert "no params.json" in err


def test_unsupported_tokenizer_model(tmp_path, capsys):
    import io

    import sentencepiece as spm

    meta = _meta(tmp_path)
    (meta / "tokenizer.model").write_bytes(b"\x00not a tokenizer")
    err = convert_fails(tmp_path, capsys, "meta-to-hf", "--input", str(meta))
    assert "tokenizer.model: neither a sentencepiece model nor a tiktoken rank file" in err
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world foo bar baz"] * 50), model_writer=buf,
                                   vocab_size=30, model_type="unigram", minloglevel=2, hard_vocab_limit=False)
    (meta / "tokenizer.model").write_bytes(buf.getvalue())
    err = convert_fails(tmp_path, capsys, "meta-to-hf", "--input", str(meta))
    assert "unigram sentencepiece model" in err


def test_incomplete_shard_dir_and_int8_input(tmp_path, capsys):
    src = tmp_path / "hf"
    stock_model("llama3_tiny").save_pretrained(src)
    assert main(["shard", "--input", str(src), "--output", str(tmp_path / "tp"), "--n-chips", "2", "--quiet"]) == 0
    import shutil

    shutil.rmtree(tmp_path / "tp" / "rank_01")
    err = convert_fails(tmp_path, capsys, "unshard", "--input", str(tmp_path / "tp"))
    assert "rank_01: chip 1's shard directory is missing" in err
    assert main(["quantize", "--int8", "--input", str(src), "--output", str(tmp_path / "q"), "--quiet"]) == 0
    err = convert_fails(tmp_path, capsys, "hf-to-meta", "--input", str(tmp_path / "q"))
    assert "is in int8 format; hf-to-meta reads hf or tp-shards checkpoints" in err

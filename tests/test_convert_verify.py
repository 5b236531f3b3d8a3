"""``verify`` across formats, its failure modes, and the command line itself."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import stock_model
from safetensors.torch import load_file, save_file
from test_convert_meta import write_meta_dir

from modelzoo.cli.convert import main


@pytest.fixture()
def hf_and_meta(tmp_path):
    write_meta_dir(tmp_path / "meta", "llama3_tiny", 2)
    assert main(["meta-to-hf", "--input", str(tmp_path / "meta"), "--output", str(tmp_path / "hf"),
                 "--model-size", "llama3_tiny", "--quiet"]) == 0
    return tmp_path / "hf", tmp_path / "meta"


def test_verify_meta_against_hf_passes_with_logits_beyond_8192(hf_and_meta, capsys):
    hf, meta = hf_and_meta
    capsys.readouterr()
    assert main(["verify", str(meta), str(hf), "--model-size", "llama3_tiny"]) == 0
    out = capsys.readouterr().out
    for check in ("config", "structure", "parameter count", "finite", "weights", "logits @0..15",
                  "logits @8184..8199", "logits @16368..16383"):
        assert f"PASS  {check}" in out, out
    assert "verify: PASS" in out and "229,696 parameters" in out


def test_verify_fails_on_a_changed_weight_and_names_it(hf_and_meta, capsys, tmp_path):
    hf, _ = hf_and_meta
    other = tmp_path / "other"
    assert main(["hf-to-meta", "--input", str(hf), "--output", str(tmp_path / "m2"), "--quiet"]) == 0
    assert main(["meta-to-hf", "--input", str(tmp_path / "m2"), "--output", str(other), "--quiet",
                 "--model-size", "llama3_tiny"]) == 0
    state = load_file(other / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 5] += 1e-3
    save_file(state, other / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["verify", str(hf), str(other)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  weights" in out and "model.layers.1.mlp.up_proj.weight" in out and "FAIL  logits" in out
    assert "verify: FAIL" in out
    assert main(["verify", str(hf), str(other), "--atol", "2e-3", "--logits-atol", "1e-2"]) == 0


def test_verify_reports_nan_and_structure(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    stock_model("llama2_tiny").save_pretrained(a)
    model = stock_model("llama2_tiny")
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(b)
    capsys.readouterr()
    assert main(["verify", str(a), str(b), "--logits", "never"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  finite" in out and "model.norm.weight (0 in A, 1 in B)" in out
    c = tmp_path / "c"
    stock_model("llama2_tiny", intermediate_size=160).save_pretrained(c)
    assert main(["verify", str(a), str(c), "--logits", "never"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  config" in out and "FAIL  structure" in out and "shape [176, 64] vs [160, 64]" in out


def test_verify_int8_against_float(tmp_path, capsys):
    src = tmp_path / "hf"
    stock_model("llama3_2_tiny").save_pretrained(src)
    assert main(["quantize", "--int8", "--input", str(src), "--output", str(tmp_path / "q"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "q"), str(src), "--logits", "never"]) == 1  # bitwise: not equal
    assert main(["verify", str(tmp_path / "q"), str(src), "--atol", "1e-3", "--logits-atol", "0.05",
                 "--min-top1", "0.8"]) == 0
    assert "dequantized" in capsys.readouterr().out


def test_help_explains_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("meta-to-hf", "hf-to-meta", "shard", "unshard", "quantize", "verify"):
        assert command in text
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "usage: modelzoo-convert " + command in capsys.readouterr().out


def test_python_dash_m_works():
    result = subprocess.run([sys.executable, "-m", "modelzoo.cli.convert", "verify", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--logits-atol" in result.stdout


def nudge(file, name: str, index: int = 3) -> None:
    """Move element ``index`` of tensor ``name`` in the safetensors ``file`` up by one ulp."""
    state = load_file(file)
    flat = state[name].view(-1)
    flat[index] = torch.nextafter(flat[index], torch.tensor(float("inf")))
    save_file(state, file, metadata={"format": "pt"})


@pytest.mark.parametrize(("n_chips", "tensor", "rank", "first"), [
    (2, "model.norm.weight", 1, 0),                        # replicated on every chip
    (4, "model.layers.1.post_attention_layernorm.weight", 3, 0),
    (4, "model.layers.1.self_attn.v_proj.weight", 1, 0),   # 2 KV heads on 4 chips: chip 1 repeats chip 0's
    (4, "model.layers.0.self_attn.k_proj.weight", 3, 2),
    (2, "model.layers.0.mlp.up_proj.weight", 1, None),     # sharded: caught before too
])
def test_verify_compares_every_chips_copy(tmp_path, capsys, n_chips, tensor, rank, first):
    src, tp = tmp_path / "hf", tmp_path / "tp"
    stock_model("llama3_tiny").save_pretrained(src)
    assert main(["shard", "--input", str(src), "--output", str(tp), "--n-chips", str(n_chips), "--quiet"]) == 0
    kv_mode = json.loads((tp / "tp_shards.json").read_text())["kv_mode"]
    assert kv_mode == ("replicate" if n_chips == 4 else "shard")
    assert main(["verify", str(src), str(tp), "--logits", "never"]) == 0
    nudge(tp / f"rank_{rank:02d}" / "model.safetensors", tensor)
    capsys.readouterr()
    assert main(["verify", str(src), str(tp), "--logits", "never"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  chip copies (B)" in out and f"1 chip copies differ: chip {rank} {tensor} (differs from A" in out
    assert f"rank_{rank:02d}/model.safetensors" in out
    if first is not None:  # with a tolerance the replicas must still be bitwise equal to each other
        assert main(["verify", str(src), str(tp), "--logits", "never", "--atol", "1e-3"]) == 1
        assert f"chip {rank} {tensor} (differs from chip {first}'s copy)" in capsys.readouterr().out
        assert main(["verify", str(tp), str(tp), "--logits", "never"]) == 1  # a shard dir against itself

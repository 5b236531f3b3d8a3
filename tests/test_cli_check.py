"""modelzoo-check: the parity demo the README runs, and its exit codes on bad input."""

from __future__ import annotations

import subprocess
import sys

from modelzoo.cli.check import main


def test_default_config_passes(capsys):
    assert main(["--seq-len", "32"]) == 0
    out = capsys.readouterr().out
    assert "patched vs stock transformers" in out and "2 passed, 0 failed" in out


def test_precision_patches_and_gqa_model_pass(capsys):
    argv = ["model.name_or_path=llama3_2_tiny", "model.fp32_ln=true", "model.fp32_skip_add=true"]
    assert main(argv) == 0
    assert "fp32_ln" in capsys.readouterr().out


def _run(*args):
    return subprocess.run([sys.executable, "-m", "modelzoo.cli.check", *args],
                          capture_output=True, text=True, timeout=300)


def test_bad_config_exits_nonzero_with_one_line():
    proc = _run("training.lerning_rate=3")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: override 'training.lerning_rate=3': unknown key 'training.lerning_rate'; "
                     "did you mean 'training.learning_rate'?"]


def test_n_chips_incompatible_with_heads_exits_nonzero(capsys):
    # llama_tiny has 4 heads: 3 chips cannot split them
    assert main(["samba_compile.tensor_parallel=weight", "samba_compile.n_chips=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "samba_compile.n_chips=3" in err and "valid n_chips: 1, 2, 4" in err
    assert len(err.splitlines()) == 1


def test_huge_model_is_refused_with_the_knob(capsys):
    assert main(["--config", "llama2_70b"]) == 2
    assert "model.overrides.num_hidden_layers" in capsys.readouterr().err

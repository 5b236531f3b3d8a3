"""README (a) in miniature prints no FutureWarning or DeprecationWarning: data prep of the bundled
sample, a short training run, generation from its checkpoint and the parity check, each a real
process started with ``-W error::FutureWarning -W error::DeprecationWarning`` (a warning anywhere,
ours or a library's, fails the command)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STRICT = ["-W", "error::FutureWarning", "-W", "error::DeprecationWarning"]


def _run(*args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, *STRICT, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stderr[-3000:]}"
    for stream in (proc.stdout, proc.stderr):
        assert "Warning" not in stream, f"{args[0]} printed a warning:\n{stream[-3000:]}"
    return proc.stdout + proc.stderr


def test_readme_a_runs_without_deprecation_warnings(tmp_path):
    data = tmp_path / "hdf5"
    _run("modelzoo.data_prep", "pipeline", "--input-path", str(REPO / "data/sample/sample.jsonl"),
         "--pretrained-tokenizer", str(REPO / "data/sample/tokenizer"), "--output-path", str(data),
         "--max-seq-length", "256", "--input-packing-config", "greedy::drop", "--shuffle", "on_RAM",
         "--seed", "0", "--dev-ratio", "0.1", cwd=tmp_path)
    run = tmp_path / "run"
    log = _run("modelzoo.cli.train", "--config", "llama_tiny", f"training.dataset_dir={data}",
               "training.max_steps=2", "training.eval_every=2", f"training.output_dir={run}",
               f"checkpoint.save_dir={run / 'ck'}", f"samba_compile.output_folder={run / 'plan'}", cwd=tmp_path)
    assert "dev loss" in log
    _run("modelzoo.cli.generate", "--checkpoint", str(run / "ck"), "--prompt", "The capital of France is",
         "--max-new-tokens", "4", cwd=tmp_path)
    _run("modelzoo.cli.check", "--seq-len", "16", cwd=tmp_path)

"""training.loggers: TensorBoard and W&B get metrics.jsonl's scalars under training.output_dir, a
missing package is one line before training; progress lines on screen (dev loss, what it is doing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from modelzoo.cli.train import main as train_main
from modelzoo.config import ConfigError, load_config
from modelzoo.training.trainer import Trainer

SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "eval_loss", "eval_ppl")


def _overrides(tmp: Path, data: Path, **extra) -> list[str]:
    base = {
        "model.name_or_path": "llama2_tiny", "training.dataset_dir": str(data), "training.max_seq_length": 32,
        "training.batch_size": 4, "training.max_steps": 4, "training.warmup_steps": 2, "training.log_every": 1,
        "training.eval_every": 2, "training.seed": 7, "training.deterministic": True,
        "checkpoint.save_dir": str(tmp / "ck"), "training.output_dir": str(tmp / "out"),
        "samba_compile.output_folder": str(tmp / "plan"),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _cfg(tmp, data, **extra):
    return load_config("llama_tiny", _overrides(tmp, data, **extra))


def _jsonl(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _events(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _assert_same_scalars(records: list[dict], events: dict[str, list[tuple[int, float]]]) -> None:
    for key in SCALARS:
        want = [(r["step"], r[key]) for r in records if key in r]
        assert want, key
        assert [s for s, _ in events[key]] == [s for s, _ in want], key
        assert [v for _, v in events[key]] == [pytest.approx(v, rel=1e-6) for _, v in want], key


@pytest.fixture(scope="module")
def data(train_data):
    return train_data  # (conftest: write_dataset, shared with the other training tests)


def test_tensorboard_events_hold_the_metrics_jsonl_scalars(tmp_path, data, capsys):
    pytest.importorskip("tensorboard")
    Trainer(_cfg(tmp_path, data, **{"training.loggers": "[jsonl,tensorboard]"}), quiet=True).fit()
    records = _jsonl(tmp_path / "out")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    _assert_same_scalars(records, _events(tmp_path / "out"))
    assert "dev loss" not in capsys.readouterr().err  # quiet prints nothing


def test_a_resumed_run_reads_as_one_run_in_tensorboard(tmp_path, data):
    """The killed run logged step 3 past its checkpoint at 2; the resumed run trains (and logs) step
    3 again: TensorBoard shows each step once, as metrics.jsonl does."""
    pytest.importorskip("tensorboard")
    extra = {"training.loggers": "[jsonl,tensorboard]", "checkpoint.save_every": 2}
    Trainer(_cfg(tmp_path, data, **extra), stop_after=3, quiet=True).fit()
    assert [s for s, _ in _events(tmp_path / "out")["loss"]] == [1, 2, 3]
    Trainer(_cfg(tmp_path, data, **extra, **{"checkpoint.resume": True}), quiet=True).fit()
    records = _jsonl(tmp_path / "out")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    _assert_same_scalars(records, _events(tmp_path / "out"))


def test_wandb_offline_run_dir_is_under_the_output_dir(tmp_path, data, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.chdir(tmp_path)
    Trainer(_cfg(tmp_path, data, **{"training.loggers": "[wandb]"}), quiet=True).fit()
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert not (tmp_path / "wandb").exists()  # nothing in the working directory
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # jsonl was not requested


def test_missing_logger_package_is_one_line_before_training(tmp_path, data, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    overrides = _overrides(tmp_path, data, **{"training.loggers": "[jsonl,tensorboard]"})
    with pytest.raises(ConfigError) as err:
        Trainer(load_config("llama_tiny", overrides), quiet=True)
    message = str(err.value)
    assert "\n" not in message and err.value.key == "training.loggers"
    assert "training.loggers names 'tensorboard'" in message and "pip install tensorboard" in message
    assert not (tmp_path / "out").exists()
    assert train_main(["--config", "llama_tiny", *overrides]) == 2  # the command: before it writes anything
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "pip install tensorboard" in lines[0]
    assert not (tmp_path / "plan").exists() and not (tmp_path / "out").exists()


def test_unknown_logger_name_is_refused_with_the_nearest(tmp_path, data):
    with pytest.raises(ConfigError, match="did you mean 'tensorboard'"):
        _cfg(tmp_path, data, **{"training.loggers": "[tensorbord]"})


def test_dev_loss_and_progress_lines_on_screen(tmp_path, data, capsys):
    pytest.importorskip("tensorboard")
    Trainer(_cfg(tmp_path, data, **{"training.loggers": "[tensorboard]"}), quiet=False).fit()
    err = capsys.readouterr().err
    assert "building model llama2_tiny (preset, random weights" in err
    evals = _events(tmp_path / "out")["eval_loss"]
    ppl = _events(tmp_path / "out")["eval_ppl"]
    for (step, loss), (_, p) in zip(evals, ppl, strict=True):
        assert f"step {step}: dev loss {loss:.4f}, ppl {p:.2f}" in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # jsonl was not requested


def test_command_prints_absolute_outputs_resolved_from_the_working_directory(tmp_path, data, monkeypatch, capsys):
    """Relative paths in a config are relative to the current directory; the command says where."""
    monkeypatch.chdir(tmp_path)
    relative = {"checkpoint.save_dir": "runs/x/ck", "training.output_dir": "runs/x",
                "samba_compile.output_folder": "runs/x/compile", "training.max_steps": 2}
    assert train_main(["--config", "llama_tiny", *_overrides(Path("."), data, **relative)]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "modelzoo-train: training of llama2_tiny (config llama_tiny); loading torch and transformers ..."
    run = tmp_path / "runs" / "x"
    assert (f"outputs: logs {run} (jsonl), checkpoints {run / 'ck'}, compile plan "
            f"{run / 'compile' / 'compile_plan.json'}") in lines
    assert (run / "metrics.jsonl").is_file() and (run / "ck" / "latest").is_file()
    assert (run / "compile" / "compile_plan.json").is_file()
    assert any(line.startswith("step 2: dev loss ") for line in lines)


def test_the_command_module_loads_without_torch():
    """The first line is on screen before torch and transformers load (seconds of silence otherwise)."""
    code = "import sys, modelzoo.cli.train; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0

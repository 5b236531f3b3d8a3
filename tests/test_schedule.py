"""Learning-rate schedules (``modelzoo.training.optim.lr_at``) and the run length of ``num_epochs``.

The schedule is checked against a formula written here from its documented definition, for every
``training.lr_schedule`` the config schema allows: linear warmup over ``warmup_steps`` from
``lr / warmup_steps`` (step 0) to ``lr`` (step ``warmup_steps - 1``), then decay from ``lr`` at step
``warmup_steps`` to ``min_learning_rate`` at step ``total_steps`` (held there beyond), cosine or
linear; ``constant`` holds ``lr`` after warmup. Steps are 0-based optimizer steps.

``num_epochs = k`` means k passes over the training split: every training sequence is trained on
exactly k times, in ``k * N / (batch_size * grad_accum_steps)`` optimizer steps when that divides
(one process), whatever ``max_steps`` says.
"""

from __future__ import annotations

import math
import typing
from collections import Counter
from pathlib import Path

import h5py
import pytest
from synthetic_data import write_dataset

from modelzoo.config import TrainingConfig, load_config
from modelzoo.training.optim import lr_at
from modelzoo.training.trainer import Trainer

SCHEDULES = typing.get_args(typing.get_type_hints(TrainingConfig)["lr_schedule"])


def reference_lr(step: int, *, peak: float, floor: float, warmup: int, total: int, schedule: str) -> float:
    """The schedule from its definition (module doc), independent of modelzoo's code."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = min((step - warmup) / (total - warmup), 1.0)
    shape = {
        "linear": 1.0 - progress,
        "cosine": 0.5 * (1.0 + math.cos(math.pi * progress)),
    }[schedule]  # a schedule added to the schema without a definition here fails the tests
    return floor + (peak - floor) * shape


def _cfg(schedule: str, warmup: int, peak: float = 3e-4, floor: float = 3e-5) -> TrainingConfig:
    return TrainingConfig(learning_rate=peak, min_learning_rate=floor, warmup_steps=warmup,
                          lr_schedule=schedule)


def test_schema_offers_the_documented_schedules():
    assert set(SCHEDULES) >= {"cosine", "linear", "constant"}


@pytest.mark.parametrize("floor", [0.0, 3e-5])
@pytest.mark.parametrize(("warmup", "total"), [(0, 50), (1, 50), (10, 100), (7, 33), (20, 20), (5, 6)])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_lr_at_equals_the_definition_at_every_step(schedule, warmup, total, floor):
    cfg = _cfg(schedule, warmup, floor=floor)
    # past the end too, unless the whole run is warmup (then the decay's end is never defined)
    for step in range(total + 10 if total > warmup else total):
        want = reference_lr(step, peak=cfg.learning_rate, floor=floor, warmup=warmup, total=total,
                            schedule=schedule)
        assert lr_at(step, cfg, total) == pytest.approx(want, rel=1e-12, abs=1e-18), f"step {step}"


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_lr_at_landmarks(schedule):
    """Warmup start and end, the decay's midpoint, the final step and beyond, stated directly."""
    peak, floor, warmup, total = 3e-4, 3e-5, 10, 110
    cfg = _cfg(schedule, warmup, peak, floor)
    lr = [lr_at(step, cfg, total) for step in range(total + 20)]
    assert lr[0] == pytest.approx(peak / warmup)  # warmup start: not 0 (no wasted step)
    assert lr[warmup - 1] == pytest.approx(peak)  # warmup end reaches the peak...
    assert lr[warmup] == pytest.approx(peak)  # ...and decay starts from it
    assert all(a < b for a, b in zip(lr[:warmup], lr[1:warmup], strict=False))  # strictly rising
    assert all(a >= b for a, b in zip(lr[warmup:], lr[warmup + 1:], strict=False))  # never rises again
    middle = warmup + (total - warmup) // 2
    if schedule == "constant":
        assert lr[middle] == lr[total - 1] == lr[total + 19] == pytest.approx(peak)
    else:
        assert lr[middle] == pytest.approx((peak + floor) / 2)  # both decays pass the midpoint halfway
        assert floor < lr[total - 1] < lr[total - 2]  # the final step is still above the floor
        assert lr[total] == pytest.approx(floor)  # the floor is reached at total_steps
        assert all(value == pytest.approx(floor) for value in lr[total:])  # and held beyond


# ----------------------------------------------------------------------------- num_epochs


N_FILES, ROWS_PER_FILE = 2, 6  # N = 12 training sequences


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ds") / "data", n_train_files=N_FILES,
                         rows_per_file=ROWS_PER_FILE, n_dev=0, seq_len=16)


def _train_rows(data: Path) -> list[tuple[int, ...]]:
    rows = []
    for file in sorted(data.glob("train_*.hdf5")):
        with h5py.File(file, "r") as f:
            rows += [tuple(r) for r in f["input_ids"][:].tolist()]
    return rows


def _trainer(tmp: Path, data: Path, **training) -> Trainer:
    values = {"dataset_dir": data, "max_seq_length": 16, "batch_size": 3, "max_steps": 1000,
              "warmup_steps": 2, "learning_rate": 1e-3, "min_learning_rate": 1e-4, "log_every": 1, "seed": 3,
              **training}
    overrides = [f"training.{k}={v}" for k, v in values.items()] + [
        "model.name_or_path=llama2_tiny", "model.overrides={num_hidden_layers: 1}",
        f"checkpoint.save_dir={tmp / 'ck'}", f"training.output_dir={tmp / 'out'}"]
    return Trainer(load_config("llama_tiny", overrides), quiet=True)


@pytest.mark.parametrize(("epochs", "accum"), [(2, 1), (3, 2)])
def test_num_epochs_trains_each_sequence_epochs_times(tmp_path, data, monkeypatch, epochs, accum):
    monkeypatch.setattr("modelzoo.training.trainer.measure_matmul_peak", lambda *a, **k: 1e12)
    trainer = _trainer(tmp_path, data, num_epochs=epochs, grad_accum_steps=accum)
    seen: list[tuple[int, ...]] = []
    next_batch = trainer.loader.next_batch

    def recording():
        batch = next_batch()
        seen.extend(tuple(r) for r in batch["input_ids"].tolist())
        return batch

    trainer.loader.next_batch = recording
    result = trainer.fit()

    rows = _train_rows(data)
    n, batch = len(rows), 3
    assert len(set(rows)) == n  # distinct rows, so counting them counts sequences
    assert n % (batch * accum) == 0  # so the definition's step count is exact
    want_steps = epochs * n // (batch * accum)
    assert want_steps != 1000  # max_steps must not be what decides the length
    assert trainer.total_steps == want_steps
    assert result["step"] == want_steps
    losses = [r for r in result["history"] if "loss" in r]
    assert [r["step"] for r in losses] == list(range(1, want_steps + 1))
    assert Counter(seen) == Counter({row: epochs for row in rows})  # every sequence exactly k times
    # the schedule runs over the epoch-derived length: it ends at the floor, not part-way to it
    for record in losses:
        want = reference_lr(record["step"] - 1, peak=1e-3, floor=1e-4, warmup=2, total=want_steps,
                            schedule=trainer.t.lr_schedule)
        assert record["lr"] == pytest.approx(want)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(losses[-1]["lr"])

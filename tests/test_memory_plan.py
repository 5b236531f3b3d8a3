"""Activation recompute and the memory plan, measured: equal numbers in every recompute mode,
activation memory falling none > selective > full, and the plan's per-chip peak held to the
measured one (``modelzoo.training.memory``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from modelzoo.compile.plan import card_block, memory_per_chip, memory_table_markdown
from modelzoo.config import load_config
from modelzoo.training.memory import LiveTensorBytes, measure_train_step, resident_tensors
from modelzoo.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_memory import write_text_dataset  # noqa: E402

SEQ = 128
CARD = Path(__file__).resolve().parents[1] / "models" / "llama" / "README.md"


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    return write_text_dataset(tmp_path_factory.mktemp("text") / "data", SEQ, 1024, rows=16)


def _cfg(tmp: Path, data: Path, model: str = "llama2_tiny", **extra):
    values = {"model.name_or_path": model, "model.overrides": "{num_hidden_layers: 4}",
              "training.dataset_dir": data, "training.max_seq_length": SEQ, "training.batch_size": 4,
              "training.max_steps": 3, "training.warmup_steps": 1, "training.seed": 3,
              "checkpoint.save_dir": tmp / "ck", "checkpoint.save_every": 0, "training.output_dir": tmp / "out",
              "samba_compile.output_folder": tmp / "plan", "training.deterministic": True, **extra}
    return load_config("llama_tiny", [f"{k}={v}" for k, v in values.items()])


def _loss_grads_and_activation_peak(trainer: Trainer):
    batch = trainer.loader.next_batch()
    with LiveTensorBytes() as tracker:
        tracker.track(resident_tensors(trainer.model, trainer.optimizer))
        start = tracker.live
        out = trainer.forward(**batch, return_logits=False, use_cache=False)
        loss = (out.token_loss * out.loss_weight).sum() / out.loss_weight.sum()
        loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
    return loss.detach(), grads, tracker.peak - start


def test_recompute_modes_give_the_same_numbers_with_less_activation_memory(tmp_path, text_data):
    results = {}
    for mode in ("none", "selective", "full"):
        trainer = Trainer(_cfg(tmp_path / mode, text_data, **{"training.recompute": mode}), quiet=True)
        results[mode] = _loss_grads_and_activation_peak(trainer)
    loss, grads, _ = results["none"]
    for mode in ("selective", "full"):
        other_loss, other_grads, _ = results[mode]
        torch.testing.assert_close(other_loss, loss, atol=1e-6, rtol=0)
        assert other_grads.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(other_grads[name], grads[name], atol=1e-6, rtol=0, msg=f"{mode}: {name}")
    peaks = {mode: r[2] for mode, r in results.items()}
    print("peak activation MiB (forward + backward, beyond weights/state):",
          {mode: round(v / 2**20, 2) for mode, v in peaks.items()})
    assert peaks["none"] > peaks["selective"] > peaks["full"]


@pytest.mark.parametrize(("model", "recompute"), [("llama2_tiny", "none"), ("llama2_tiny", "full"),
                                                  ("llama3_tiny", "selective")])
def test_plan_predicts_the_measured_peak(tmp_path, text_data, model, recompute):
    cfg = _cfg(tmp_path, text_data, model=model, **{"training.recompute": recompute})
    trainer = Trainer(cfg, quiet=True)
    trainer.train_step()
    measured = measure_train_step(trainer)
    predicted = memory_per_chip(cfg)
    assert sum(measured["resident"].values()) == pytest.approx(predicted["weights"] + predicted["optimizer"], rel=0.02)
    print(f"{model} recompute={recompute}: predicted {predicted['total'] / 2**20:.2f} MiB, "
          f"measured {measured['peak'] / 2**20:.2f} MiB")
    assert predicted["total"] == pytest.approx(measured["peak"], rel=0.15)


def test_model_card_memory_table_is_the_plans():
    block = card_block(CARD.read_text(), "memory-table")
    assert block is not None, f"{CARD} has no generated memory table"
    assert block == memory_table_markdown(), (
        "the model card's memory table is stale: regenerate it with python -m modelzoo.compile.plan --card")

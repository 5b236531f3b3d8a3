"""The compile plan of a LoRA / DoRA run: the trainable-parameter count the plan budgets equals what
``add_adapter`` leaves trainable (on one chip, and per chip under TP by the TP plan's data and by a
real TP=2 layout), LoRA's per-chip peak is below full fine-tuning's and matches a measured step, and
the shipped LoRA configs fit where full fine-tuning does not."""

from __future__ import annotations

import fnmatch
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers.spawn_batch import Case, register

from modelzoo.compile.plan import (
    ADAPTER_BYTES,
    PlanError,
    build_plan,
    check_plan_for_run,
    memory_per_chip,
    write_plan,
)
from modelzoo.config import load_config, shipped_configs
from modelzoo.models.llama import from_pretrained
from modelzoo.models.llama.parallelize import (
    LLAMA_TP_PLAN,
    LORA_TP_PLAN,
    REPLICATE,
    ROWWISE,
    VOCAB,
    parallelize_llama,
)
from modelzoo.peft.adapters import add_adapter, lora_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_memory import write_text_dataset  # noqa: E402

SEQ = 128


def _cfg(model: str = "llama2_tiny", n_chips: int = 1, **peft):
    overrides = {"model.name_or_path": model, "peft.method": "lora", **{f"peft.{k}": v for k, v in peft.items()}}
    if n_chips > 1:
        overrides.update({"samba_compile.tensor_parallel": "weight", "samba_compile.n_chips": n_chips})
    return load_config("llama_tiny", [f"{k}={v}" for k, v in overrides.items()])


def _adapted_model(cfg):
    model = from_pretrained(cfg.model.name_or_path, seed=0, patch=False)
    add_adapter(model, lora_config(cfg.peft, None), seed=0)
    return model


def _chip_numel(name: str, param: torch.Tensor, n_chips: int) -> int:
    """Elements of trainable parameter ``name`` on one chip, from the TP plan's data alone: the
    projection's style from LLAMA_TP_PLAN, the adapter factor's from LORA_TP_PLAN (a factor split
    "like W" is cut along the dimension W is: output rows for colwise, input columns for rowwise)."""
    module = name.rsplit(".", 1)[0]
    for pattern, style in LLAMA_TP_PLAN.items():
        if fnmatch.fnmatchcase(module, pattern):  # a module trained in full (lm_head)
            return param.numel() // n_chips if style == VOCAB else param.numel()
        for part, part_style in LORA_TP_PLAN.get(style, {}).items():
            if fnmatch.fnmatchcase(module, f"{pattern}.{part}"):
                return param.numel() if part_style == REPLICATE else param.numel() // n_chips
        if fnmatch.fnmatchcase(module, f"{pattern}.lora_magnitude_vector.*"):  # one per output row
            return param.numel() if style == ROWWISE else param.numel() // n_chips
    return param.numel()  # embeddings, norms: replicated


CASES = [
    ("llama2_tiny", {}),
    ("llama3_tiny", {"r": 4, "modules_to_save": "[lm_head,norm]"}),
    ("llama3_2_tiny", {"method": "dora", "r": 2, "modules_to_save": "[embed_tokens]"}),  # tied embeddings
    ("llama2_tiny", {"target_modules": "[q_proj,v_proj,down_proj]", "dropout": 0.1}),
]


@pytest.mark.parametrize(("model", "peft"), CASES)
def test_plan_counts_the_parameters_add_adapter_leaves_trainable(model, peft):
    cfg = _cfg(model, **peft)
    adapted = _adapted_model(cfg)
    trainable = {name: p for name, p in adapted.named_parameters() if p.requires_grad}
    plan = build_plan(cfg)["peft"]
    assert plan["trainable_params"] == plan["trainable_params_per_chip"] == sum(p.numel() for p in trainable.values())
    assert plan["adapter_params"] == sum(p.numel() for n, p in trainable.items() if ".lora_" in n)
    # the frozen base and the adapter both sit in the weights
    base = sum(p.numel() for p in from_pretrained(model, device="meta", patch=False).parameters())
    assert memory_per_chip(cfg)["weights"] == (base + plan["adapter_params"]) * 4


@pytest.mark.parametrize(("model", "peft"), [CASES[0], CASES[1], ("llama2_tiny", {"r": 3})])
def test_plan_counts_per_chip_by_the_tp_plan(model, peft):
    cfg = _cfg(model, n_chips=2, **peft)
    trainable = [(n, p) for n, p in _adapted_model(cfg).named_parameters() if p.requires_grad]
    want = sum(_chip_numel(n, p, 2) for n, p in trainable)
    assert build_plan(cfg)["peft"]["trainable_params_per_chip"] == want
    assert want < sum(p.numel() for _, p in trainable)


def _tp_worker(rank, world_size, out, model, peft):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    cfg = _cfg(model, n_chips=world_size, **peft)
    adapted = _adapted_model(cfg)
    parallelize_llama(adapted, init_device_mesh("cpu", (world_size,)), training=True)
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel()
                for p in adapted.parameters() if p.requires_grad)
    Path(out, f"rank{rank}").write_text(str(local))


TP2_MODEL, TP2_PEFT = "llama3_tiny", {"r": 4, "modules_to_save": "[lm_head]"}
# spawned with the session's other 2-process runs (helpers/spawn_batch.py)
register(__name__, lambda inputs: {"tp2": Case(2, _tp_worker, (TP2_MODEL, TP2_PEFT),
                                               tests=("test_plan_per_chip_count_matches_a_real_tp2_layout",))})


def test_plan_per_chip_count_matches_a_real_tp2_layout(spawn_batch):
    out = spawn_batch(__name__, "tp2")
    want = build_plan(_cfg(TP2_MODEL, n_chips=2, **TP2_PEFT))["peft"]["trainable_params_per_chip"]
    assert [int((out / f"rank{r}").read_text()) for r in range(2)] == [want, want]


# the full fine-tuning configs of real models (at hidden 64 a rank-16 adapter's activations outweigh
# the optimizer state it saves: llama_tiny is left out)
FULL_CONFIGS = [n for n in shipped_configs("training") if load_config(n).peft.method == "none" and "tiny" not in n]


@pytest.mark.parametrize("name", FULL_CONFIGS)
def test_lora_needs_less_memory_than_full_fine_tuning(name):
    # with recompute (the shipped LoRA configs'): without it, on a bf16 base at high TP, the float32
    # input copies of the adapters outweigh the optimizer state saved (the table in the model card)
    # without FSDP (the 405B config's): its division of the state over DP is tested on its own
    full_cfg = load_config(name, ["training.recompute=full", "training.fsdp=false"])
    lora_cfg = replace(full_cfg, peft=replace(full_cfg.peft, method="lora", r=16))
    plan = build_plan(lora_cfg)
    trainable = plan["peft"]["trainable_params_per_chip"]  # no modules_to_save: the adapter alone
    full, lora = memory_per_chip(full_cfg), memory_per_chip(lora_cfg)
    assert plan["peft"]["full_finetune"]["bytes"] == full
    assert lora["total"] < full["total"]
    # grads and AdamW moments of the (float32) adapter only; the frozen base stays, the adapter joins it
    assert (lora["grads"], lora["optimizer"]) == (trainable * ADAPTER_BYTES, trainable * 8)
    assert lora["weights"] == full["weights"] + trainable * ADAPTER_BYTES
    # (activations can exceed full fine-tuning's: on a bf16 base each adapted projection keeps its
    # input cast to float32; test_plan_predicts_the_measured_adapter_peak holds that term to a measurement)


def test_llama2_70b_lora_fits_where_full_fine_tuning_does_not(tmp_path):
    cfg = load_config("llama2_70b_lora", [f"samba_compile.output_folder={tmp_path}"])
    plan = build_plan(cfg)
    assert plan["per_chip"]["fits"] and not plan["peft"]["full_finetune"]["fits"]
    assert plan["peft"]["trainable_params"] == 207_093_760  # r=16 on the seven projections of 80 layers
    note = plan["peft"]["note"]
    assert note.startswith("full fine-tuning needs") and "> 64 GiB per chip at n_chips=8" in note
    assert "peft.method=lora needs" in note and note.endswith("fits")
    with pytest.raises(PlanError, match=r"allows 64 GiB.*peft\.method=lora, r=16\): it needs [\d.]+ GiB per chip and fits"):
        build_plan(replace(cfg, peft=replace(cfg.peft, method="none")))


def test_a_changed_adapter_needs_a_new_compile(tmp_path):
    cfg = load_config("llama2_70b_lora", [f"samba_compile.output_folder={tmp_path}"])
    write_plan(build_plan(cfg), tmp_path)
    check_plan_for_run(cfg)
    with pytest.raises(PlanError, match=r"peft\.r: plan 16 vs run 8"):
        check_plan_for_run(replace(cfg, peft=replace(cfg.peft, r=8)))


# ---------------------------------------------------------------- measured


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    return write_text_dataset(tmp_path_factory.mktemp("text") / "data", SEQ, 1024, rows=16)


WIDER = "{num_hidden_layers: 4, hidden_size: 256, intermediate_size: 704}"  # blocks outweigh the logits


@pytest.mark.parametrize("extra", [
    {"peft.method": "lora"},
    {"peft.method": "dora"},
    {"peft.method": "lora", "peft.dropout": 0.1, "training.recompute": "full", "model.overrides": WIDER},
    {"peft.method": "lora", "model.name_or_path": "llama3_2_tiny", "peft.target_modules": "[q_proj,v_proj]",
     "peft.modules_to_save": "[embed_tokens]"},
    {"peft.method": "lora", "model.dtype": "bfloat16", "model.overrides": WIDER},  # a float32 adapter on bf16
    {"peft.method": "lora", "peft.quantize_base": "int8", "model.overrides": WIDER},
])
def test_plan_predicts_the_measured_adapter_peak(tmp_path, text_data, extra):
    from modelzoo.training.memory import measure_train_step
    from modelzoo.training.trainer import Trainer

    values = {"model.name_or_path": "llama2_tiny", "model.overrides": "{num_hidden_layers: 4}",
              "training.dataset_dir": text_data, "training.max_seq_length": SEQ, "training.batch_size": 4,
              "training.max_steps": 3, "training.warmup_steps": 1, "checkpoint.save_dir": tmp_path / "ck",
              "checkpoint.save_every": 0, "training.output_dir": tmp_path / "out",
              "samba_compile.output_folder": tmp_path / "plan", **extra}
    cfg = load_config("llama_tiny", [f"{k}={v}" for k, v in values.items()])
    trainer = Trainer(cfg, quiet=True)
    trainer.train_step()
    measured = measure_train_step(trainer)
    predicted = memory_per_chip(cfg)
    assert sum(measured["resident"].values()) == pytest.approx(predicted["weights"] + predicted["optimizer"], rel=0.02)
    print(f"{extra}: predicted {predicted['total'] / 2**20:.2f} MiB, measured {measured['peak'] / 2**20:.2f} MiB")
    assert predicted["total"] == pytest.approx(measured["peak"], rel=0.1)


def test_bench_peft_runs(capsys):
    from bench_peft import main

    assert main(["--model", "llama_tiny", "--batch", "2", "--seq", "32", "--steps", "1", "--dtypes", "float32"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("float32  hf+peft lora:") and "| ours lora:" in line and "| ours full:" in line
    assert "x tok/s" in line and "lora/full memory" in line

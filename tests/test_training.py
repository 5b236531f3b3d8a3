"""Training: TP and DP against one process, kill-and-resume, fine-tuning, compile plans, bad input."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import h5py
import pytest
import torch
from conftest import stock_model
from helpers.spawn_batch import Case, register
from synthetic_data import SAMPLE_TOKENIZER, write_dataset
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from modelzoo.checkpoint import hf_weights as ckpt_errors
from modelzoo.cli.train import main as train_main
from modelzoo.compile.plan import PlanError, build_plan, check_plan_for_run, write_plan
from modelzoo.config import ConfigError, load_config, shipped_configs
from modelzoo.data.dataset_layout import write_manifest
from modelzoo.data.hdf5_reader import DatasetError
from modelzoo.training.data import open_training_data
from modelzoo.training.trainer import Trainer


def _overrides(tmp: Path, data: Path, **extra) -> list[str]:
    base = {
        "model.name_or_path": "llama2_tiny", "training.dataset_dir": str(data), "training.max_seq_length": 32,
        "training.batch_size": 4, "training.max_steps": 5, "training.warmup_steps": 2,
        "training.learning_rate": 1e-3, "training.log_every": 1, "training.seed": 7,
        "checkpoint.save_dir": str(tmp / "ck"), "training.output_dir": str(tmp / "out"),
        "samba_compile.output_folder": str(tmp / "plan"), "training.deterministic": True,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _cfg(tmp, data, **extra):
    return load_config("llama_tiny", _overrides(tmp, data, **extra))


def _losses(history):
    return [r["loss"] for r in history if "loss" in r]


@pytest.fixture(scope="module")
def data(train_data):
    return train_data  # (conftest: shared with this module's spawned cases)


def _load_hf(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


# ---------------------------------------------------------------- single process


def test_loss_falls_and_checkpoint_opens_in_transformers(tmp_path, data):
    cfg = _cfg(tmp_path, data, **{"training.max_steps": 40, "training.eval_every": 20})
    result = Trainer(cfg, quiet=True).fit()
    losses = _losses(result["history"])
    assert losses[-1] < losses[0] - 1.0
    ckpt = tmp_path / "ck" / "step_00000040"
    assert (tmp_path / "ck" / "latest").read_text().strip() == ckpt.name
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.config._attn_implementation != "modelzoo_static"
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_memory_gib"} <= set(records[0])
    assert any("eval_loss" in r for r in records)


def test_inductor_backend_trains_like_eager(tmp_path, data):
    """backend=inductor (each decoder block compiled, eager loss) gives the eager losses and weights."""
    steps = {"training.max_steps": 3, "checkpoint.save_every": 3}
    eager = Trainer(_cfg(tmp_path / "a", data, **steps), quiet=True).fit()
    trainer = Trainer(_cfg(tmp_path / "b", data, backend="inductor", **steps), quiet=True)
    compiled = trainer.fit()
    assert all(layer._compiled_call_impl is not None for layer in trainer.model.model.layers)  # per block
    assert_close(_losses(compiled["history"]), _losses(eager["history"]), atol=1e-4, rtol=0)
    a = _load_hf(tmp_path / "a" / "ck" / "step_00000003")
    b = _load_hf(tmp_path / "b" / "ck" / "step_00000003")
    assert a.keys() == b.keys()
    for name in a:
        assert_close(b[name], a[name], atol=1e-4, rtol=1e-4, msg=name)


def test_kill_and_resume_is_bit_identical(tmp_path, data):
    full = Trainer(_cfg(tmp_path / "a", data, **{"training.max_steps": 6}), quiet=True).fit()
    part = _cfg(tmp_path / "b", data, **{"training.max_steps": 6, "checkpoint.save_every": 3})
    crashed = Trainer(part, stop_after=4, quiet=True).fit()  # dies after step 4; last save at 3
    assert crashed["step"] == 4
    resumed = Trainer(_cfg(tmp_path / "b", data, **{"training.max_steps": 6, "checkpoint.save_every": 3,
                                                   "checkpoint.resume": True}), quiet=True).fit()
    assert resumed["history"][0]["step"] == 4
    assert _losses(resumed["history"]) == _losses(full["history"])[3:]
    a = _load_hf(tmp_path / "a" / "ck" / "step_00000006")
    b = _load_hf(tmp_path / "b" / "ck" / "step_00000006")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fine_tune_from_transformers_dir(tmp_path, data):
    stock_model("llama2_tiny").save_pretrained(tmp_path / "hf")
    cfg = _cfg(tmp_path, data, **{"checkpoint.load_path": str(tmp_path / "hf"), "training.max_steps": 3})
    Trainer(cfg, quiet=True).fit()
    before, after = _load_hf(tmp_path / "hf"), _load_hf(tmp_path / "ck" / "step_00000003")
    assert set(before) == set(after)
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])


# ---------------------------------------------------------------- distributed (gloo)
#
# Every spawned run of this module is a Case registered with the session's SpawnBatch
# (helpers/spawn_batch.py): the runs that need the same number of processes share one spawn_cpu
# call, and each test reads its case's dir. The one-process references are Trainer runs shared
# through ``reference`` (computed once per settings). The runs, their settings and every comparison
# are those each test made with a spawn and a reference run of its own.


class References:
    """One-process runs, each trained once per module and shared by the tests that compare to it:
    ``refs(**extra)`` -> (run dir, losses as float64) of ``Trainer(_cfg(dir, data, **extra)).fit()``."""

    def __init__(self, root: Path, data: Path) -> None:
        self.root, self.data, self.runs = root, data, {}

    def __call__(self, **extra) -> tuple[Path, torch.Tensor]:
        key = tuple(sorted((k, repr(v)) for k, v in extra.items()))
        if key not in self.runs:
            run_dir = self.root / f"run{len(self.runs)}"
            result = Trainer(_cfg(run_dir, self.data, **extra), quiet=True).fit()
            self.runs[key] = run_dir, torch.tensor(_losses(result["history"]), dtype=torch.float64)
        return self.runs[key]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    return References(tmp_path_factory.mktemp("one"), data)


def _dist_worker(rank, world_size, tmp, data, extra):
    cfg = _cfg(Path(tmp), Path(data), **extra)
    result = Trainer(cfg, quiet=True).fit()
    if rank == 0:
        torch.save({"losses": torch.tensor(_losses(result["history"]), dtype=torch.float64)}, f"{tmp}/losses.pt")


def _resume_worker(rank, world_size, tmp, data, extra):
    cfg = _cfg(Path(tmp), Path(data), **extra)
    result = Trainer(cfg, quiet=True).fit()
    if rank == 0:
        steps = [r["step"] for r in result["history"] if "loss" in r]
        torch.save({"losses": torch.tensor(_losses(result["history"]), dtype=torch.float64),
                    "steps": torch.tensor(steps)}, f"{tmp}/losses.pt")


def _spawned_losses(run_dir: Path) -> torch.Tensor:
    """Rank 0's losses of a spawned ``_dist_worker`` run."""
    return torch.load(Path(run_dir) / "losses.pt", weights_only=True)["losses"]


def _checkpoint_at(src: Path, dst: Path, step: int) -> None:
    """A copy of run ``src``'s checkpoints as they stood after ``step`` (``latest`` -> step)."""
    import shutil

    shutil.copytree(src / "ck", dst / "ck")
    for later in (dst / "ck").glob("step_*"):
        if int(later.name.split("_")[1]) > step:
            shutil.rmtree(later)
    (dst / "ck" / "latest").write_text(f"step_{step:08d}\n")


LAYOUTS = {"tp2dp2": (2, 2, 4), "tp1dp4": (1, 4, 2), "tp4dp1": (4, 1, 8)}  # n_chips, world_size, batch


def _layout_extra(name, **more):
    n_chips, world, batch = LAYOUTS[name]
    return {"samba_compile.tensor_parallel": "weight", "samba_compile.n_chips": n_chips,
            "data_parallel.world_size": world, "training.batch_size": batch, "training.max_steps": 4,
            "checkpoint.save_every": 2, "checkpoint.keep_last": 0, **more}


def _layout_change_worker(rank, world_size, tmp, data):
    """The TP2 x DP2 run into ``tmp/full``, then (each from a copy of its checkpoints at step 2, made
    by rank 0 while the others wait) the resumes at TP1 x DP4 and TP4 x DP1 into ``tmp/<layout>``."""
    import torch.distributed as dist

    tmp = Path(tmp)
    _resume_worker(rank, world_size, str(tmp / "full"), data, _layout_extra("tp2dp2"))
    for name in ("tp1dp4", "tp4dp1"):
        if rank == 0:
            _checkpoint_at(tmp / "full", tmp / name, 2)
        dist.barrier()
        _resume_worker(rank, world_size, str(tmp / name), data, _layout_extra(name, **{"checkpoint.resume": True}))


TP_CASES = [(2, False), (4, False), (2, True), (4, True)]  # n_chips, sequence_parallel
DP_CASES = [(False, 1), (True, 1), (False, 2), (True, 2)]  # fsdp, n_chips
ACCUM_CASES = [(1, 1), (1, 2), (2, 1)]  # n_chips, world_size
FSDP_MP = {"training.batch_size": 4, "data_parallel.world_size": 2, "training.fsdp": True,
           "training.max_steps": 3, "checkpoint.save_every": 3}


def _tp_extra(n_chips: int) -> dict:
    return {"samba_compile.tensor_parallel": "weight", "samba_compile.n_chips": n_chips}


def _accum_extra(n_chips: int, world_size: int) -> dict:
    extra = {"training.batch_size": 8 // (4 * world_size), "training.grad_accum_steps": 4,
             "data_parallel.world_size": world_size}
    return {**extra, **_tp_extra(n_chips)} if n_chips > 1 else extra


def _spawned_cases(data: Path) -> dict[str, Case]:
    data = str(data)
    cases = {}
    for n_chips, sp in TP_CASES:
        cases[f"tp{n_chips}-sp{sp}"] = Case(n_chips, _dist_worker, (data, {
            **_tp_extra(n_chips), "samba_compile.sequence_parallel": sp}),
            tests=("test_tensor_parallel_matches_single_process",))
    for fsdp, n_chips in DP_CASES:
        cases[f"dp2-fsdp{fsdp}-tp{n_chips}"] = Case(2 * n_chips, _dist_worker, (data, {
            "training.batch_size": 4, "data_parallel.world_size": 2, "training.fsdp": fsdp,
            **(_tp_extra(n_chips) if n_chips > 1 else {})}), tests=("test_data_parallel_equals_combined_batch",))
    for name, extra in (("fsdp-fp32", FSDP_MP), ("fsdp-bf16", {**FSDP_MP, "training.mixed_precision": "bfloat16"})):
        cases[name] = Case(2, _dist_worker, (data, extra), tests=("test_fsdp_bfloat16_mixed_precision_tracks_fp32",))
    cases["layouts"] = Case(4, _layout_change_worker, (data,), tests=("test_dcp_checkpoint_resumes_at_another_layout",))
    for n_chips, world_size in ACCUM_CASES:
        if n_chips * world_size > 1:
            cases[f"accum-tp{n_chips}-dp{world_size}"] = Case(n_chips * world_size, _dist_worker, (
                data, _accum_extra(n_chips, world_size)), tests=("test_gradient_accumulation_equals_the_combined_batch",))
    return cases


register(__name__, lambda inputs: _spawned_cases(inputs["train_data"]))


@pytest.fixture(scope="module")
def spawned(spawn_batch):
    return functools.partial(spawn_batch, __name__)


@pytest.mark.parametrize(("n_chips", "sequence_parallel"), TP_CASES)
def test_tensor_parallel_matches_single_process(reference, spawned, n_chips, sequence_parallel):
    """TP=2/4, with and without sequence parallelism (norms and residual stream sharded on the
    sequence dimension), gives the one-process losses (1e-5 at step 1, 1e-4 after 5) and weights."""
    one, single = reference()
    run = spawned(f"tp{n_chips}-sp{sequence_parallel}")
    tp = _spawned_losses(run)
    assert_close(tp[0], single[0], atol=1e-5, rtol=0)
    assert_close(tp, single, atol=1e-4, rtol=0)
    ref, got = _load_hf(one / "ck" / "step_00000005"), _load_hf(run / "ck" / "step_00000005")
    for key in ref:
        assert_close(got[key], ref[key], atol=1e-4, rtol=0)


@pytest.mark.parametrize(("fsdp", "n_chips"), DP_CASES)
def test_data_parallel_equals_combined_batch(reference, spawned, fsdp, n_chips):
    """DP=2 (replicate or FSDP2), alone and on a 2-D mesh with TP=2 (FSDP2 x TP: 4 processes),
    equals one process on the combined batch of 8; the saved HF dirs hold the same weights."""
    one, single = reference(**{"training.batch_size": 8})
    run = spawned(f"dp2-fsdp{fsdp}-tp{n_chips}")
    assert_close(_spawned_losses(run), single, atol=1e-5, rtol=0)
    ref, got = _load_hf(one / "ck" / "step_00000005"), _load_hf(run / "ck" / "step_00000005")
    for key in ref:
        assert_close(got[key], ref[key], atol=1e-5, rtol=0)


def test_fsdp_bfloat16_mixed_precision_tracks_fp32(spawned):
    """training.mixed_precision=bfloat16 (bf16 compute copies, fp32 reduce, fp32 master weights)
    follows the fp32 losses to bf16 precision and leaves fp32 weights in the HF dir."""
    fp32 = _spawned_losses(spawned("fsdp-fp32"))
    bf16_run = spawned("fsdp-bf16")
    bf16 = _spawned_losses(bf16_run)
    assert not torch.equal(bf16, fp32)  # the policy took effect
    assert_close(bf16, fp32, atol=3e-2, rtol=0)
    weights = _load_hf(bf16_run / "ck" / "step_00000003")
    assert all(t.dtype == torch.float32 for t in weights.values())


def test_dcp_checkpoint_resumes_at_another_layout(tmp_path, data, spawned):
    """Saved at TP2 x DP2 after 2 steps, resumed at TP1 x DP4 and at TP4 x DP1 (the same global batch
    of 8): steps 3-4 give the losses of the uninterrupted TP2 x DP2 run, and the optimizer state and
    data position carried over (a fresh optimizer or a restarted epoch would change them)."""
    runs = spawned("layouts")
    full = torch.load(runs / "full" / "losses.pt", weights_only=True)
    state = json.loads((runs / "full" / "ck" / "step_00000002" / "training_state" / "trainer_state.json").read_text())
    assert state["data"] == {"epoch": 0, "samples_in_epoch": 16, "global_micro_batch": 8}
    assert (runs / "full" / "ck" / "step_00000002" / "training_state" / "dcp" / ".metadata").is_file()
    for name in ("tp1dp4", "tp4dp1"):
        resumed = torch.load(runs / name / "losses.pt", weights_only=True)
        assert resumed["steps"].tolist() == [3, 4]
        assert_close(resumed["losses"], full["losses"][2:], atol=1e-5, rtol=0, msg=name)
        ref, got = _load_hf(runs / "full" / "ck" / "step_00000004"), _load_hf(runs / name / "ck" / "step_00000004")
        for key in ref:
            assert_close(got[key], ref[key], atol=1e-5, rtol=0, msg=f"{name}: {key}")
    # a layout whose micro-batch does not divide the saved position is refused, naming both
    _checkpoint_at(runs / "full", tmp_path / "odd", 2)
    cfg = _cfg(tmp_path / "odd", data, **{"training.batch_size": 5, "checkpoint.resume": True, "training.max_steps": 4})
    with pytest.raises(ckpt_errors.CheckpointError, match=r"16 samples into epoch 0.*batch_size 5.*saved one \(8\)"):
        Trainer(cfg, quiet=True)


def test_old_per_rank_checkpoint_is_refused_with_the_way_out(tmp_path, data):
    """A checkpoint in the per-rank format of earlier versions (training_state/rank_*.pt) is refused
    on resume, naming the format and the way on (its HF dir as checkpoint.load_path)."""
    import shutil

    Trainer(_cfg(tmp_path, data, **{"training.max_steps": 2, "checkpoint.save_every": 2}), quiet=True).fit()
    state_dir = tmp_path / "ck" / "step_00000002" / "training_state"
    shutil.rmtree(state_dir / "dcp")
    torch.save({"optimizer": {}}, state_dir / "rank_00000.pt")
    cfg = _cfg(tmp_path, data, **{"training.max_steps": 4, "checkpoint.resume": True})
    with pytest.raises(ckpt_errors.CheckpointError, match=r"per-rank training state \(rank_00000.pt.*"
                       r"checkpoint.load_path=.*step_00000002"):
        Trainer(cfg, quiet=True)


@pytest.mark.parametrize(("n_chips", "world_size"), ACCUM_CASES)
def test_gradient_accumulation_equals_the_combined_batch(tmp_path, data, reference, spawned, n_chips, world_size):
    """grad_accum_steps=4 over micro-batches of 8/(4*DP) equals one step on batch 8 (the trainer's
    documented invariant: the loss is normalised by the weight sum of the whole optimizer step),
    in one process, under DP=2 and under TP=2."""
    one, want = reference(**{"training.batch_size": 8})
    if n_chips * world_size == 1:
        acc = tmp_path / "acc"
        accum = torch.tensor(_losses(Trainer(_cfg(acc, data, **_accum_extra(n_chips, world_size)),
                                             quiet=True).fit()["history"]), dtype=torch.float64)
    else:
        acc = spawned(f"accum-tp{n_chips}-dp{world_size}")
        accum = _spawned_losses(acc)
    assert len(accum) == len(want) == 5
    assert_close(accum, want, atol=1e-6 if n_chips == 1 else 1e-5, rtol=0)
    ref, got = _load_hf(one / "ck" / "step_00000005"), _load_hf(acc / "ck" / "step_00000005")
    for key in ref:  # 5 Adam steps turn 1e-7 gradient rounding into ~1e-6 weight differences
        assert_close(got[key], ref[key], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- compile plans


@pytest.mark.parametrize("name", shipped_configs("training"))
def test_every_shipped_config_compiles(tmp_path, name, capsys):
    assert train_main(["--config", name, "command=compile", f"samba_compile.output_folder={tmp_path}"]) == 0
    plan = json.loads((tmp_path / "compile_plan.json").read_text())
    assert plan["per_chip"]["fits"]
    shown = capsys.readouterr().out  # fits, headroom, the budget's source, the largest part
    budget, total = plan["per_chip"]["budget_gib"], plan["per_chip"]["gib"]["total"]
    assert f"fits       yes: headroom {budget - total:.2f} GiB" in shown
    assert plan["per_chip"]["budget_source"].split("=")[0] in shown and "largest part: " in shown
    layout = plan["layout"]
    assert layout["processes"] == layout["n_chips"] * layout["world_size"]
    # per-chip parameters: the sharded shapes summed, consistent with the layout
    assert plan["per_chip"]["params"] < plan["model"]["total_params"] or layout["n_chips"] == 1


def test_plan_that_cannot_fit_names_the_knob(tmp_path):
    cfg = load_config("llama2_70b", ["samba_compile.chip_memory_gib=64", f"samba_compile.output_folder={tmp_path}"])
    with pytest.raises(PlanError, match=r"per chip.*allows 64 GiB.*(n_chips|batch_size|recompute)"):
        build_plan(cfg)


def test_run_refuses_a_plan_with_other_settings(tmp_path):
    cfg = load_config("llama2_7b", [f"samba_compile.output_folder={tmp_path}"])
    write_plan(build_plan(cfg), tmp_path)
    check_plan_for_run(cfg)
    changed = load_config("llama2_7b", [f"samba_compile.output_folder={tmp_path}", "samba_compile.num_tiles=2"])
    with pytest.raises(PlanError, match="samba_compile.*re-run with command=compile"):
        check_plan_for_run(changed)


# ---------------------------------------------------------------- bad input


def _run_cli(tmp_path, data, capsys, **extra):
    code = train_main(["--config", "llama_tiny", *_overrides(tmp_path, data, **extra)])
    return code, capsys.readouterr().err.strip()


def _one_error_line(err: str) -> bool:
    """The mistake is one ``error:`` line, the last on screen; the progress lines of the stages that
    passed (outputs, dataset check, model build) may stand before it. A config mistake is the only line."""
    lines = err.splitlines()
    return sum(line.startswith("error:") for line in lines) == 1 and lines[-1].startswith("error:")


def test_missing_dataset(tmp_path, capsys):
    code, err = _run_cli(tmp_path, tmp_path / "nope", capsys)
    assert code == 2 and "training.dataset_dir" in err and "does not exist" in err


def test_metadata_mismatch(tmp_path, data, capsys):
    code, err = _run_cli(tmp_path, data, capsys, **{"training.max_seq_length": 64})
    assert code == 2 and "max_seq_length is 32" in err and "set training.max_seq_length=32" in err


def test_corrupt_hdf5(tmp_path, capsys):
    bad = write_dataset(tmp_path / "bad", n_train_files=2)
    (bad / "train_2_of_2.hdf5").write_bytes(b"not an hdf5 file")
    code, err = _run_cli(tmp_path, bad, capsys)  # caught by the manifest's size check
    assert code == 2 and "train_2_of_2.hdf5" in err and "rebuild the dataset" in err
    write_manifest(bad)  # a manifest that agrees: the HDF5 reader itself must refuse the file
    code, err = _run_cli(tmp_path, bad, capsys)
    assert code == 2 and "train_2_of_2.hdf5: not a readable dataset file" in err and "re-run data prep" in err


def test_tp_incompatible_with_heads(tmp_path, data, capsys):
    code, err = _run_cli(tmp_path, data, capsys, **{"samba_compile.tensor_parallel": "weight",
                                                    "samba_compile.n_chips": 3})
    assert code == 2 and "samba_compile.n_chips=3" in err


def test_training_without_the_weighted_loss_patch_is_refused(tmp_path, data, capsys, monkeypatch):
    """``model.patches=[]`` and ``MODELZOO_PATCHES=none`` each stop a training run with one line
    naming the fix (stock HF's loss ignores token types); before, training crashed on ``token_loss``."""
    code, err = _run_cli(tmp_path, data, capsys, **{"model.patches": "[]"})
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "model.patches=[]" in err and "'weighted_loss'" in err
    monkeypatch.setenv("MODELZOO_PATCHES", "none")
    code, err = _run_cli(tmp_path, data, capsys)
    assert code == 2 and _one_error_line(err), err
    assert "MODELZOO_PATCHES='none'" in err and "weighted_loss" in err
    assert not list((tmp_path / "ck").glob("step_*"))
    monkeypatch.delenv("MODELZOO_PATCHES")
    cfg = _cfg(tmp_path, data)
    cfg.model.patches = ["static_attention"]  # built in code, past load_config's check: the trainer refuses it
    with pytest.raises(ConfigError, match=r"model.patches=\['static_attention'\] leaves out the 'weighted_loss'"):
        Trainer(cfg, quiet=True)


def test_dp_larger_than_training_files(tmp_path, data, capsys):
    code, err = _run_cli(tmp_path, data, capsys, **{"data_parallel.world_size": 8})
    assert code == 2 and "world_size=8 exceeds the 4 training files" in err


def test_truncated_rows_are_refused(tmp_path, capsys):
    bad = write_dataset(tmp_path / "bad", n_train_files=1)
    with h5py.File(bad / "train_1_of_1.hdf5", "a") as f:
        del f["token_type_ids"]
    write_manifest(bad)
    code, err = _run_cli(tmp_path, bad, capsys)
    assert code == 2 and "train_1_of_1.hdf5" in err


# ---------------------------------------------------------------- off the happy path (issue 11)


@pytest.fixture(scope="module")
def data_with_tokenizer(tmp_path_factory):
    """A dataset with ``tokenizer/``, as data prep writes it: its files go into every checkpoint."""
    return write_dataset(tmp_path_factory.mktemp("dstok") / "data", n_train_files=2, rows_per_file=16,
                         tokenizer=SAMPLE_TOKENIZER)


def test_resume_saves_what_it_trained_even_after_pruning_its_source(tmp_path, data_with_tokenizer):
    """Every checkpoint a resumed run writes holds its own weights (not the ones it resumed from),
    and pruning the checkpoint it resumed from breaks nothing (three saves after the resume, keep 2)."""
    steps = {"training.max_steps": 8, "checkpoint.save_every": 2, "checkpoint.keep_last": 2}
    Trainer(_cfg(tmp_path / "a", data_with_tokenizer, **{**steps, "checkpoint.keep_last": 0}), quiet=True).fit()
    Trainer(_cfg(tmp_path / "b", data_with_tokenizer, **steps), stop_after=3, quiet=True).fit()
    Trainer(_cfg(tmp_path / "b", data_with_tokenizer, **steps, **{"checkpoint.resume": True}), quiet=True).fit()
    kept = sorted(p.name for p in (tmp_path / "b" / "ck").iterdir())
    assert kept == ["latest", "step_00000006", "step_00000008"]  # the step-2 source is gone
    for step in ("step_00000006", "step_00000008"):
        a, b = _load_hf(tmp_path / "a" / "ck" / step), _load_hf(tmp_path / "b" / "ck" / step)
        assert all(torch.equal(a[k], b[k]) for k in a), step
    a4 = _load_hf(tmp_path / "a" / "ck" / "step_00000004")
    b8 = _load_hf(tmp_path / "b" / "ck" / "step_00000008")
    assert not all(torch.equal(a4[k], b8[k]) for k in a4)
    steps_logged = [json.loads(line)["step"] for line in (tmp_path / "b" / "out" / "metrics.jsonl").read_text().splitlines()
                    if "loss" in json.loads(line)]
    assert steps_logged == list(range(1, 9))  # the steps after the checkpoint are not logged twice


def test_checkpoint_opens_in_older_tools(tmp_path, data_with_tokenizer):
    """config.json names its architecture; the tokenizer class is one transformers 4.x knows too."""
    from transformers import AutoConfig, AutoTokenizer

    Trainer(_cfg(tmp_path, data_with_tokenizer, **{"training.max_steps": 1}), quiet=True).fit()
    ckpt = tmp_path / "ck" / "step_00000001"
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert json.loads((ckpt / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert AutoConfig.from_pretrained(ckpt).architectures == ["LlamaForCausalLM"]
    ours = AutoTokenizer.from_pretrained(ckpt)
    source = AutoTokenizer.from_pretrained(SAMPLE_TOKENIZER)
    text = "The capital of France is Paris."
    assert ours(text).input_ids == source(text).input_ids
    assert (ours.eos_token, ours.pad_token) == (source.eos_token, source.pad_token)


def test_fresh_run_never_deletes_earlier_checkpoints(tmp_path, data, capsys):
    """A fresh run into a save_dir with checkpoints is refused; checkpoint.overwrite replaces only ours."""
    code, _ = _run_cli(tmp_path, data, capsys, **{"training.max_steps": 2})
    assert code == 0
    code, err = _run_cli(tmp_path, data, capsys, **{"training.max_steps": 2})
    assert code == 2 and "already holds checkpoints" in err and "checkpoint.resume=true" in err
    decoy = tmp_path / "ck" / "step_00000001"  # looks like a checkpoint, but is not one we wrote
    decoy.mkdir()
    (decoy / "notes.txt").write_text("mine")
    code, err = _run_cli(tmp_path, data, capsys, **{"training.max_steps": 2, "checkpoint.overwrite": True})
    assert code == 2 and "step_00000001" in err and "refusing to delete" in err
    assert (decoy / "notes.txt").read_text() == "mine"
    decoy.joinpath("notes.txt").unlink()
    decoy.rmdir()
    ours = tmp_path / "ck" / "step_00000002"
    (ours / "extra.txt").write_text("added by hand")  # a checkpoint of ours with a file added: not ours now
    code, err = _run_cli(tmp_path, data, capsys, **{"training.max_steps": 2, "checkpoint.overwrite": True})
    assert code == 2 and "extra.txt" in err and (ours / "extra.txt").is_file()
    (ours / "extra.txt").unlink()
    code, err = _run_cli(tmp_path, data, capsys, **{"training.max_steps": 2, "checkpoint.overwrite": True})
    assert code == 0 and "removed 1 checkpoint(s)" in err


def test_preflight_checks_dataset_checksums(tmp_path, capsys):
    """A same-size corrupt file is caught before training (and training.verify_checksums=false skips the
    re-hash, checking names and sizes only)."""
    bad = write_dataset(tmp_path / "bad", n_train_files=2)
    path = bad / "train_2_of_2.hdf5"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 400] = bytes(400)
    path.write_bytes(bytes(raw))
    code, err = _run_cli(tmp_path, bad, capsys)
    assert code == 2 and "train_2_of_2.hdf5: sha256 differs" in err and _one_error_line(err)
    open_training_data(str(bad), 32, 1024, 1, checksums=False)  # sizes agree: only the re-hash sees it
    with pytest.raises(DatasetError, match="sha256"):
        open_training_data(str(bad), 32, 1024, 1, checksums=True)


def test_sequence_length_beyond_the_model_is_refused(tmp_path, data, capsys):
    code, err = _run_cli(tmp_path, data, capsys, **{"model.overrides": "{max_position_embeddings: 16}"})
    assert code == 2 and "max_position_embeddings=16" in err and "training.allow_long_sequences=true" in err
    cfg = _cfg(tmp_path, data, **{"model.overrides": "{max_position_embeddings: 16}",
                                  "training.allow_long_sequences": True, "training.max_steps": 1})
    assert Trainer(cfg, quiet=True).fit()["step"] == 1


def test_stale_plan_names_the_changed_field_briefly(tmp_path):
    cfg = load_config("llama2_7b", [f"samba_compile.output_folder={tmp_path}"])
    write_plan(build_plan(cfg), tmp_path)
    changed = load_config("llama2_7b", [f"samba_compile.output_folder={tmp_path}", "model.overrides={vocab_size: 32001}"])
    with pytest.raises(PlanError) as err:
        check_plan_for_run(changed)
    assert "architecture.vocab_size: plan 32000 vs run 32001" in str(err.value)
    assert len(str(err.value)) < 300


def _tree(pid: int):
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def test_launcher_listens_on_loopback_only_and_workers_die_with_it(tmp_path, data):
    """A DP=2 run: every listening socket of the launcher and its workers is on 127.0.0.1; kill -9
    of the launcher takes the workers with it."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    args = _overrides(tmp_path, data, **{"data_parallel.world_size": 2, "training.max_steps": 100000,
                                         "training.deterministic": False, "checkpoint.save_every": 0})
    proc = subprocess.Popen([sys.executable, "-m", "modelzoo.cli.train", "--config", "llama_tiny", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    seen = []
    try:
        deadline, listening = time.monotonic() + 120, []
        while time.monotonic() < deadline and proc.poll() is None:
            procs = _tree(proc.pid)
            seen += procs
            workers = [p for p in procs[1:] if "modelzoo.cli.train" in p.cmdline()
                       and "torch.distributed.run" not in p.cmdline()]  # (not an elastic agent)
            listening = [(p.pid, c.laddr) for p in procs for c in p.net_connections("inet")
                         if c.status == psutil.CONN_LISTEN]
            if len(workers) == 2 and {w.pid for w in workers} <= {pid for pid, _ in listening}:  # joined gloo
                break
            time.sleep(0.5)
        assert proc.poll() is None and len(workers) == 2, "the DP=2 run did not start"
        assert listening and all(addr.ip == "127.0.0.1" for _, addr in listening), listening
        os.kill(proc.pid, signal.SIGKILL)
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"workers outlived their launcher: {[p.pid for p in alive]}"
    finally:  # whatever happened, leave no process of this run behind
        for p in [*seen, psutil.Process(proc.pid)] if proc.poll() is None else seen:
            with contextlib.suppress(psutil.Error):
                p.kill()
        proc.wait()

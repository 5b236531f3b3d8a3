"""LoRA / DoRA training: adapters in peft's format both ways, frozen base, TP and DP parity, resume.

Stock ``peft`` is the oracle: an adapter our run saves must load with ``PeftModel.from_pretrained``
on stock ``LlamaForCausalLM`` and give our logits; an adapter ``peft`` makes must load in modelzoo.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import stock_model
from helpers.spawn_batch import Case, register
from safetensors.torch import load_file, save_file
from test_training import References, _cfg, _dist_worker, _losses, _spawned_losses
from torch.testing import assert_close
from transformers import LlamaForCausalLM

from modelzoo.cli.train import main as train_main
from modelzoo.models.llama import from_pretrained
from modelzoo.peft import AdapterError, load_adapter
from modelzoo.training.trainer import Trainer

# stock peft (the oracle, not our code) trips a transformers deprecation inside get_peft_model
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

LORA = {"peft.method": "lora", "peft.r": 4, "peft.alpha": 8, "training.learning_rate": 1e-2}


@pytest.fixture(scope="module")
def data(train_data):
    return train_data  # (conftest: shared with this module's spawned cases)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "hf"
    stock_model("llama2_tiny", seed=3).save_pretrained(path)
    return path


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(0))


def _stock_peft(base: Path, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter).eval()


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_run_trains_only_the_adapter_and_stock_peft_opens_it(tmp_path, data, base, method):
    """Base weights bit-identical after training, optimizer state only for adapter parameters, the
    checkpoint holds just peft's two files (plus training state) and stock peft on stock
    transformers reproduces our base+adapter logits (1e-5)."""
    cfg = _cfg(tmp_path, data, **{**LORA, "peft.method": method, "checkpoint.load_path": str(base),
                                  "training.max_steps": 4})
    trainer = Trainer(cfg, quiet=True)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    result = trainer.fit()
    losses = _losses(result["history"])
    assert losses[-1] < losses[0]
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable and all(".lora_" in name for name in trainable)
    state_params = {id(p) for p in trainer.optimizer.state}
    assert state_params == {id(p) for p in trainer.model.parameters() if p.requires_grad}

    step = tmp_path / "ck" / "step_00000004"
    files = {p.name for p in step.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "training_state"} <= files
    assert not any(name.startswith("model") or name == "config.json" for name in files)  # base not copied
    saved = json.loads((step / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(base.absolute())
    assert saved["use_dora"] is (method == "dora") and saved["r"] == 4

    ids = _ids(trainer.model.config.vocab_size)
    trainer.model.eval()
    with torch.no_grad():
        ours = trainer.model(input_ids=ids).logits
        ref = _stock_peft(base, step)(input_ids=ids).logits
    assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapter_made_by_peft_loads_in_modelzoo(tmp_path, base, use_dora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(base),
                                LoraConfig(r=4, lora_alpha=16, use_dora=use_dora, task_type="CAUSAL_LM",
                                           target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)  # B starts at zero: make the adapter matter
    peft_model.save_pretrained(tmp_path / "adapter")
    ours = from_pretrained(str(base))
    load_adapter(ours, tmp_path / "adapter")
    assert not any(p.requires_grad for p in ours.parameters())
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        assert_close(ours(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_preset_base_is_written_once_and_kill_and_resume_is_bit_identical(tmp_path, data):
    """On a preset (no model dir) the base is written to save_dir/base and the adapters name it;
    a run killed after step 4 (last save at 3) and resumed gives the uninterrupted losses bit for
    bit and the same adapter."""
    steps = {**LORA, "training.max_steps": 6, "checkpoint.save_every": 3}
    full = Trainer(_cfg(tmp_path / "a", data, **steps), quiet=True).fit()
    crashed = Trainer(_cfg(tmp_path / "b", data, **steps), stop_after=4, quiet=True).fit()
    assert crashed["step"] == 4
    resumed = Trainer(_cfg(tmp_path / "b", data, **steps, **{"checkpoint.resume": True}), quiet=True).fit()
    assert resumed["history"][0]["step"] == 4
    assert _losses(resumed["history"]) == _losses(full["history"])[3:]
    a = load_file(tmp_path / "a" / "ck" / "step_00000006" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "ck" / "step_00000006" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "b" / "ck" / "step_00000006" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "b" / "ck" / "base").absolute())
    assert (tmp_path / "b" / "ck" / "base" / "config.json").is_file()


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "ck" / "step_00000005" / "adapter_model.safetensors")


# The spawned runs share one spawn_cpu per process count and the one-process references are trained
# once per settings (helpers/spawn_batch.py, test_training.References); the comparisons are unchanged.
TP_CHIPS = [2, 4]
DP_CASES = [(False, 1), (True, 2)]  # fsdp, n_chips


def _spawned_cases(data: Path) -> dict[str, Case]:
    cases = {f"tp{n}": Case(n, _dist_worker, (str(data), {
        **LORA, "samba_compile.tensor_parallel": "weight", "samba_compile.n_chips": n}),
        tests=("test_lora_tensor_parallel_matches_one_process",)) for n in TP_CHIPS}
    for fsdp, n_chips in DP_CASES:
        cases[f"dp2-fsdp{fsdp}-tp{n_chips}"] = Case(2 * n_chips, _dist_worker, (str(data), {
            **LORA, "data_parallel.world_size": 2, "training.fsdp": fsdp,
            "samba_compile.tensor_parallel": "weight" if n_chips > 1 else "none", "samba_compile.n_chips": n_chips}),
            tests=("test_lora_data_parallel_equals_combined_batch",))
    return cases


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    return References(tmp_path_factory.mktemp("one"), data)


register(__name__, lambda inputs: _spawned_cases(inputs["train_data"]))


@pytest.fixture(scope="module")
def spawned(spawn_batch):
    return functools.partial(spawn_batch, __name__)


@pytest.mark.parametrize("n_chips", TP_CHIPS)
def test_lora_tensor_parallel_matches_one_process(reference, spawned, n_chips):
    """LoRA under TP=2/4 (A/B split by the TP plan's LORA_TP_PLAN) gives the one-process losses
    (1e-5 at step 1, 1e-4 after 5) and saves the same adapter."""
    one, single = reference(**LORA)
    run = spawned(f"tp{n_chips}")
    tp = _spawned_losses(run)
    assert_close(tp[0], single[0], atol=1e-5, rtol=0)
    assert_close(tp, single, atol=1e-4, rtol=0)
    ref, got = _adapter(one), _adapter(run)
    assert ref.keys() == got.keys()
    for key in ref:
        assert_close(got[key], ref[key], atol=1e-4, rtol=0, msg=key)


@pytest.mark.parametrize(("fsdp", "n_chips"), DP_CASES)
def test_lora_data_parallel_equals_combined_batch(reference, spawned, fsdp, n_chips):
    """DP=2 (replicate; and FSDP2 x TP2 on the 2-D mesh) equals one process on the combined batch."""
    one, single = reference(**LORA, **{"training.batch_size": 8})
    run = spawned(f"dp2-fsdp{fsdp}-tp{n_chips}")
    assert_close(_spawned_losses(run), single, atol=1e-4, rtol=0)
    ref, got = _adapter(one), _adapter(run)
    for key in ref:
        assert_close(got[key], ref[key], atol=1e-4, rtol=0, msg=key)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(("override", "needle"), [
    ("peft.rank=4", "unknown key 'peft.rank'; valid keys in 'peft': method, r, alpha"),
    ("peft.r=0", "'peft.r' must be >= 1"),
    ("peft.target_modules=[q_proj,qkv_proj]", "peft.target_modules names 'qkv_proj'"),
    ("peft.method=qlora", "'peft.method' expects one of"),
    ("peft.quantize_base=int8 samba_compile.tensor_parallel=weight samba_compile.n_chips=2",
     "peft.quantize_base=int8 is not supported here"),
])
def test_bad_peft_config_is_one_line(tmp_path, data, capsys, override, needle):
    args = ["--config", "llama_tiny", f"training.dataset_dir={data}", f"checkpoint.save_dir={tmp_path}/ck",
            "peft.method=lora", *override.split()]
    assert train_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_dora_under_tensor_parallelism_is_refused(tmp_path, data, capsys):
    assert train_main(["--config", "llama_tiny", f"training.dataset_dir={data}", "peft.method=dora",
                       "samba_compile.tensor_parallel=weight", "samba_compile.n_chips=2"]) == 2
    assert "peft.method=dora with samba_compile.n_chips=2" in capsys.readouterr().err


def _saved_adapter(tmp_path: Path, base: Path) -> Path:
    model = from_pretrained(str(base))
    from modelzoo.config import PeftConfig
    from modelzoo.peft import adapter_state, add_adapter, lora_config, write_adapter

    config = lora_config(PeftConfig(method="lora", r=4), str(base))
    add_adapter(model, config, seed=0)
    out = tmp_path / "adapter"
    out.mkdir()
    write_adapter(out, config, adapter_state(model))
    return out


def test_adapter_for_another_base_missing_files_and_unsupported_options(tmp_path, base):
    adapter = _saved_adapter(tmp_path, base)
    wider = tmp_path / "wider"
    stock_model("llama2_tiny", hidden_size=128).save_pretrained(wider)
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: tensor '.*' has shape .* another base model"):
        load_adapter(from_pretrained(str(wider)), adapter)

    broken = tmp_path / "no_weights"
    shutil.copytree(adapter, broken)
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"no_weights/adapter_model.safetensors is missing"):
        load_adapter(from_pretrained(str(base)), broken)
    with pytest.raises(AdapterError, match=r"nowhere does not exist"):
        load_adapter(from_pretrained(str(base)), tmp_path / "nowhere")

    odd = tmp_path / "odd"
    shutil.copytree(adapter, odd)
    config = json.loads((odd / "adapter_config.json").read_text())
    (odd / "adapter_config.json").write_text(json.dumps({**config, "bias": "all"}))
    with pytest.raises(AdapterError, match=r"odd/adapter_config.json: key 'bias' = 'all' is not supported"):
        load_adapter(from_pretrained(str(base)), odd)

    partial = tmp_path / "partial"
    shutil.copytree(adapter, partial)
    tensors = load_file(partial / "adapter_model.safetensors")
    save_file(dict(list(tensors.items())[1:]), partial / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"lacks 1 adapter tensor"):
        load_adapter(from_pretrained(str(base)), partial)


def test_lora_compiled_with_gradient_accumulation_trains_like_eager(tmp_path, data):
    """backend=inductor (peft's layers inside each compiled block) on 2 micro-batches of 2 gives the
    eager losses and adapter of one batch of 4."""
    steps = {**LORA, "training.max_steps": 3}
    eager = Trainer(_cfg(tmp_path / "a", data, **steps), quiet=True).fit()
    compiled = Trainer(_cfg(tmp_path / "b", data, backend="inductor", **steps,
                            **{"training.batch_size": 2, "training.grad_accum_steps": 2}), quiet=True).fit()
    assert_close(_losses(compiled["history"]), _losses(eager["history"]), atol=1e-4, rtol=0)
    a = load_file(tmp_path / "a" / "ck" / "step_00000003" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "ck" / "step_00000003" / "adapter_model.safetensors")
    for key in a:
        assert_close(b[key], a[key], atol=1e-4, rtol=1e-4, msg=key)


def test_lora_on_a_bfloat16_base_keeps_the_adapter_in_float32(tmp_path, data, base):
    """model.dtype=bfloat16: the frozen base is held in bf16, the adapter (and its optimizer state)
    in fp32, and the saved adapter is fp32 as peft saves an autocast adapter."""
    trainer = Trainer(_cfg(tmp_path, data, **LORA, **{"model.dtype": "bfloat16", "checkpoint.load_path": str(base),
                                                     "training.max_steps": 3}), quiet=True)
    losses = _losses(trainer.fit()["history"])
    assert all(torch.isfinite(torch.tensor(losses)))
    dtypes = {p.dtype for name, p in trainer.model.named_parameters() if ".lora_" in name}
    frozen = {p.dtype for name, p in trainer.model.named_parameters() if ".lora_" not in name}
    assert dtypes == {torch.float32} and frozen == {torch.bfloat16}
    saved = load_file(tmp_path / "ck" / "step_00000003" / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}


def test_lora_on_an_int8_base_tracks_the_float_base(tmp_path, data, base):
    """peft.quantize_base=int8 (QLoRA-style): the adapted projections' frozen weights are int8
    buffers (1 byte each), the adapter trains in float and its losses stay near the float-base run."""
    steps = {**LORA, "checkpoint.load_path": str(base), "training.max_steps": 4}
    float_run = _losses(Trainer(_cfg(tmp_path / "f", data, **steps), quiet=True).fit()["history"])
    trainer = Trainer(_cfg(tmp_path / "q", data, **steps, **{"peft.quantize_base": "int8"}), quiet=True)
    int8_run = _losses(trainer.fit()["history"])
    layer = trainer.model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.int8 and layer.lora_A["default"].weight.dtype == torch.float32
    assert_close(torch.tensor(int8_run), torch.tensor(float_run), atol=2e-2, rtol=0)
    assert int8_run[-1] < int8_run[0]
    # the saved adapter is an ordinary peft adapter on the float base
    assert json.loads((tmp_path / "q" / "ck" / "step_00000004" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(base.absolute())

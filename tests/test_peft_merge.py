"""``modelzoo-convert merge-lora``: equal to stock peft's ``merge_and_unload`` (LoRA and DoRA), opens
with transformers, takes a LoRA run's dirs, is proved by ``verify --adapter`` (which fails on a
wrong merge), and refuses adapters that do not fit their base in one line, leaving nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.peft_fixtures import STOCK_PEFT_WARNING, lora_run, save_base, save_stock_adapter, set_base_path
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from modelzoo.checkpoint.atomic import OUTPUT_MARKER
from modelzoo.cli.convert import main

pytestmark = pytest.mark.filterwarnings(STOCK_PEFT_WARNING)

CASES = {  # name: (preset, adapter options)
    "lora": ("llama2_tiny", {"modules_to_save": ["lm_head"]}),
    "dora": ("llama2_tiny", {"dora": True, "targets": ["q_proj", "v_proj", "o_proj", "down_proj"]}),
    "lora-gqa-tied": ("llama3_2_tiny", {"targets": ["k_proj", "v_proj", "gate_proj"]}),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {preset: save_base(root / preset, preset) for preset in ("llama2_tiny", "llama3_2_tiny")}


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: save_stock_adapter(bases[preset], root / name, **options) for name, (preset, options) in CASES.items()}


def merge(out: Path, *args) -> int:
    return main(["merge-lora", *map(str, args), "--output", str(out), "--quiet"])


def peft_merged_state(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter))
    return model.merge_and_unload().state_dict()


@pytest.mark.parametrize("case", list(CASES))
def test_merge_equals_peft_merge_and_unload(case, bases, adapters, tmp_path, capsys):
    base, adapter = bases[CASES[case][0]], adapters[case]
    out = tmp_path / "merged"
    assert merge(out, "--base", base, "--adapter", adapter) == 0
    stdout = capsys.readouterr().out
    assert f"wrote {out.absolute()} (merge-lora)" in stdout and "note: merged" in stdout
    want = peft_merged_state(base, adapter)
    got = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    assert sorted(got) == sorted(want)
    base_state = AutoModelForCausalLM.from_pretrained(str(base)).state_dict()
    changed = [name for name in want if not torch.equal(want[name], base_state[name])]
    assert changed  # the adapter does something, so equality below is not trivial
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)
    assert (out / "tokenizer.json").is_file() and (out / OUTPUT_MARKER).is_file()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


@pytest.fixture(scope="module")
def merged(bases, adapters, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "lora"
    assert merge(out, "--base", bases["llama2_tiny"], "--adapter", adapters["lora"]) == 0
    return out


def test_verify_proves_the_merge_and_fails_on_a_wrong_one(bases, adapters, merged, tmp_path, capsys):
    base, adapter = bases["llama2_tiny"], adapters["lora"]
    capsys.readouterr()
    assert main(["verify", str(base), str(merged), "--adapter", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "PASS  weights" in out and "PASS  logits @0..15" in out and "unmerged" in out
    # stock peft's own merge passes too: the logits come from the unmerged adapter, not our merge
    from peft import PeftModel

    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter)).merge_and_unload()
    stock.save_pretrained(str(tmp_path / "stock"))
    capsys.readouterr()
    assert main(["verify", str(base), str(tmp_path / "stock"), "--adapter", str(adapter), "--atol", "1e-6"]) == 0
    # a merge that left one projection unmerged
    wrong = tmp_path / "wrong"
    shutil.copytree(merged, wrong)
    state = load_file(wrong / "model.safetensors")
    name = "model.layers.1.self_attn.v_proj.weight"
    state[name] = load_file(base / "model.safetensors")[name]
    save_file(state, wrong / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["verify", str(base), str(wrong), "--adapter", str(adapter)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  weights" in out and name in out and "FAIL  logits" in out and "verify: FAIL" in out
    # the base alone is not the merged model either
    assert main(["verify", str(base), str(merged), "--logits", "never"]) == 1


def test_lora_run_dirs_resolve_and_name_their_base(bases, adapters, merged, tmp_path, capsys):
    base = bases["llama2_tiny"]
    first = save_stock_adapter(base, tmp_path / "first", modules_to_save=["lm_head"], seed=7, base_path=str(base))
    newest = tmp_path / "newest"
    shutil.copytree(adapters["lora"], newest)
    set_base_path(newest, str(base.absolute()))
    save_dir = lora_run(tmp_path / "run", [first, newest], tokenizer_from=base)
    want = load_file(merged / "model.safetensors")
    for i, path in enumerate((save_dir, tmp_path / "run", save_dir / "latest", save_dir / "step_00000002")):
        out = tmp_path / f"out{i}"
        assert merge(out, "--adapter", path) == 0, capsys.readouterr().err  # no --base: the adapter names it
        got = load_file(out / "model.safetensors")
        assert all(torch.equal(got[k], want[k]) for k in want), path
    capsys.readouterr()
    assert main(["verify", str(base), str(tmp_path / "out0"), "--adapter", str(save_dir)]) == 0


def merge_fails(tmp_path: Path, capsys, *args) -> str:
    """merge-lora exits 2 with one ``error:`` line and leaves no output (nor scratch) behind."""
    out = tmp_path / "out"
    capsys.readouterr()
    code = merge(out, *args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not out.exists() and not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return lines[0]


def _edit_adapter(adapter: Path, dest: Path, edit) -> Path:
    shutil.copytree(adapter, dest)
    state = load_file(dest / "adapter_model.safetensors")
    edit(state)
    save_file(state, dest / "adapter_model.safetensors", metadata={"format": "pt"})
    return dest


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def test_adapter_for_another_base_is_refused(bases, adapters, tmp_path, capsys):
    other = save_base(tmp_path / "other", "llama2_tiny", tokenizer=False, intermediate_size=160)
    err = merge_fails(tmp_path, capsys, "--base", other, "--adapter", adapters["lora"])
    assert "adapter_model.safetensors: tensor 'base_model.model.model.layers.0.mlp.down_proj.lora_A.weight'" in err
    assert "has shape [4, 176]" in err and "needs [4, 160]" in err and "base_model_name_or_path" in err
    err = merge_fails(tmp_path, capsys, "--base", bases["llama3_2_tiny"], "--adapter", adapters["lora"])
    assert "has shape" in err and "trained for another base model" in err


def test_keys_that_adapt_nothing_or_lack_a_factor_are_refused(bases, adapters, tmp_path, capsys):
    base, adapter = bases["llama2_tiny"], adapters["lora"]

    def extra_layer(state):
        state[f"{Q0.replace('layers.0', 'layers.9')}.lora_A.weight"] = state[f"{Q0}.lora_A.weight"].clone()

    err = merge_fails(tmp_path, capsys, "--base", base, "--adapter", _edit_adapter(adapter, tmp_path / "a", extra_layer))
    assert "tensor 'base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight' adapts " \
           "'model.layers.9.self_attn.q_proj', which base" in err
    err = merge_fails(tmp_path, capsys, "--base", base, "--adapter", _edit_adapter(
        adapter, tmp_path / "b", lambda state: state.update({"base_model.model.model.nope.weight": torch.ones(3)})))
    assert "tensor 'base_model.model.model.nope.weight' (modules_to_save) replaces 'model.nope.weight'" in err
    err = merge_fails(tmp_path, capsys, "--base", base, "--adapter", _edit_adapter(
        adapter, tmp_path / "c", lambda state: state.pop(f"{Q0}.lora_B.weight")))
    assert f"lacks tensor '{Q0}.lora_B.weight'" in err
    err = merge_fails(tmp_path, capsys, "--base", base, "--adapter", _edit_adapter(
        adapter, tmp_path / "d", lambda state: [state.pop(k) for k in list(state) if k.startswith(Q0)]))
    assert f"lacks tensor '{Q0}.lora_A.weight'" in err and "target_modules names 'q_proj'" in err
    err = merge_fails(tmp_path, capsys, "--base", base, "--adapter", _edit_adapter(
        adapter, tmp_path / "e", lambda state: state.update({"model.layers.0.x": torch.ones(3)})))
    assert "tensor 'model.layers.0.x' is not a peft adapter key" in err


def test_missing_files_and_base_keys_are_refused(bases, adapters, tmp_path, capsys):
    base, adapter = bases["llama2_tiny"], adapters["lora"]
    err = merge_fails(tmp_path, capsys, "--base", base, "--adapter", tmp_path / "no-such-adapter")
    assert "no-such-adapter does not exist" in err
    no_weights = tmp_path / "no-weights"
    shutil.copytree(adapter, no_weights)
    (no_weights / "adapter_model.safetensors").unlink()
    err = merge_fails(tmp_path, capsys, "--base", base, "--adapter", no_weights)
    assert "no-weights/adapter_model.safetensors is missing" in err
    err = merge_fails(tmp_path, capsys, "--base", tmp_path / "no-such-base", "--adapter", adapter)
    assert "no-such-base" in err
    unnamed = tmp_path / "unnamed"
    shutil.copytree(adapter, unnamed)
    set_base_path(unnamed, None)
    err = merge_fails(tmp_path, capsys, "--adapter", unnamed)
    assert "adapter_config.json: key 'base_model_name_or_path' is not set" in err and "--base DIR" in err
    set_base_path(unnamed, str(tmp_path / "moved-base"))
    err = merge_fails(tmp_path, capsys, "--adapter", unnamed)
    assert f"key 'base_model_name_or_path' names '{tmp_path / 'moved-base'}', which is not a directory" in err


def test_output_rules_are_those_of_every_conversion(bases, adapters, merged, tmp_path, capsys):
    base, adapter = bases["llama2_tiny"], adapters["lora"]
    out = tmp_path / "out"
    assert merge(out, "--base", base, "--adapter", adapter) == 0
    capsys.readouterr()
    assert merge(out, "--base", base, "--adapter", adapter) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert merge(out, "--base", base, "--adapter", adapter, "--overwrite") == 0
    assert merge(base, "--base", base, "--adapter", adapter, "--overwrite") == 2  # never onto an input
    assert (base / "model.safetensors").is_file()

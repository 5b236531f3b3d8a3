"""``modelzoo-generate --adapter``: greedy output with the adapter unmerged equals the merged model's
(made by merge-lora) and stock peft's, token for token; a LoRA run's dirs as --checkpoint mean base +
adapter; tensor parallel equals one chip; what cannot run is refused in one line with exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers.generation_fixtures import hf_greedy
from helpers.peft_fixtures import STOCK_PEFT_WARNING, lora_run, save_base, save_stock_adapter, set_base_path
from transformers import AutoModelForCausalLM, AutoTokenizer

from modelzoo.cli.convert import main as convert
from modelzoo.cli.generate import main

pytestmark = pytest.mark.filterwarnings(STOCK_PEFT_WARNING)

PROMPTS = ["the river runs", "seven green apple light over the stone"]
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft_generate")
    base = save_base(root / "base")
    found = {"base": base}
    for name, dora in (("lora", False), ("dora", True)):
        found[name] = save_stock_adapter(base, root / name, dora=dora, base_path=str(base.absolute()))
        found[f"{name}_merged"] = root / f"{name}_merged"
        assert convert(["merge-lora", "--adapter", str(found[name]), "--output", str(found[f"{name}_merged"]),
                        "--quiet"]) == 0
    return found


def _generate(capsys, out_json: Path, *argv) -> list[list[int]]:
    args = [*map(str, argv), "--max-new-tokens", str(NEW_TOKENS), "--batch-size", "2", "--output-json", str(out_json)]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 0, err
    return [c["token_ids"] for c in json.loads(out_json.read_text())["completions"]]


@pytest.fixture(scope="module")
def generated() -> dict:
    """Outputs of :func:`_generate` by argv, shared by the module's tests: the same greedy command gives
    the same tokens, so base + lora (and the base alone) are generated once for all that compare to them."""
    return {}


def _generate_once(generated: dict, capsys, out_json: Path, *argv) -> tuple[list[list[int]], Path]:
    """:func:`_generate`, run the first time these argv are asked for; returns the token ids and the
    --output-json file that run wrote."""
    key = tuple(map(str, argv))
    if key not in generated:
        generated[key] = _generate(capsys, out_json, *argv), out_json
    return generated[key]


def _stock_peft_greedy(base: Path, adapter: Path) -> list[list[int]]:
    from peft import PeftModel

    tok = AutoTokenizer.from_pretrained(str(base))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter)).eval()
    return hf_greedy(model, [tok.encode(p) for p in PROMPTS], NEW_TOKENS, eos=2)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_equals_merged_and_stock_peft(method, dirs, generated, tmp_path, capsys):
    with_adapter, out_json = _generate_once(generated, capsys, tmp_path / "a.json", "--checkpoint", dirs["base"],
                                            "--adapter", dirs[method])
    assert json.loads(out_json.read_text())["adapter"] == str(dirs[method])
    merged = _generate(capsys, tmp_path / "m.json", "--checkpoint", dirs[f"{method}_merged"])
    base, _ = _generate_once(generated, capsys, tmp_path / "b.json", "--checkpoint", dirs["base"])
    assert with_adapter == merged
    assert with_adapter == _stock_peft_greedy(dirs["base"], dirs[method])
    assert with_adapter != base  # the adapter changes the output, so the equalities above say something


def test_lora_run_dirs_as_checkpoint_mean_base_plus_adapter(dirs, generated, tmp_path, capsys):
    first = save_stock_adapter(dirs["base"], tmp_path / "first", seed=5, base_path=str(dirs["base"]))
    save_dir = lora_run(tmp_path / "run", [first, dirs["lora"]], tokenizer_from=dirs["base"])
    want, _ = _generate_once(generated, capsys, tmp_path / "want.json", "--checkpoint", dirs["base"],
                             "--adapter", dirs["lora"])
    for i, path in enumerate((tmp_path / "run", save_dir, save_dir / "latest", save_dir / "step_00000002")):
        assert _generate(capsys, tmp_path / f"{i}.json", "--checkpoint", path) == want, path
    assert _generate(capsys, tmp_path / "flag.json", "--checkpoint", dirs["base"], "--adapter", save_dir) == want


def test_tensor_parallel_with_adapter_equals_one_chip(dirs, generated, tmp_path, capsys):
    one, _ = _generate_once(generated, capsys, tmp_path / "tp1.json", "--checkpoint", dirs["base"],
                            "--adapter", dirs["lora"])
    two = _generate(capsys, tmp_path / "tp2.json", "--checkpoint", dirs["base"], "--adapter", dirs["lora"],
                    "--n-chips", "2")
    assert json.loads((tmp_path / "tp2.json").read_text())["tensor_parallel"] == 2
    assert two == one


def _fails(capsys, *argv) -> str:
    code = main([*map(str, argv), "--prompt", "hi", "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_what_cannot_run_is_refused_in_one_line(dirs, tmp_path, capsys):
    base = dirs["base"]
    err = _fails(capsys, "--checkpoint", base, "--adapter", tmp_path / "no-such-adapter")
    assert f"adapter directory {tmp_path / 'no-such-adapter'} does not exist" in err
    err = _fails(capsys, "--checkpoint", base, "--adapter", base)
    assert "adapter_config.json is missing" in err
    err = _fails(capsys, "--checkpoint", base, "--adapter", dirs["lora"], "--quantize", "int8")
    assert "with int8 weights is not supported" in err and "merge-lora" in err
    err = _fails(capsys, "--checkpoint", base, "--adapter", dirs["dora"], "--n-chips", "2")
    assert "is a DoRA adapter, which runs on one chip only" in err
    err = _fails(capsys, "--checkpoint", dirs["lora"], "--adapter", dirs["dora"])
    assert "is an adapter" in err and "give the base model as --checkpoint" in err
    other = save_base(tmp_path / "other", tokenizer=False, intermediate_size=160)
    capsys.readouterr()  # drop save_pretrained's progress bar
    err = _fails(capsys, "--checkpoint", other, "--adapter", dirs["lora"])
    assert "has shape [4, 176] but the base model needs [4, 160]" in err
    orphan = tmp_path / "orphan"
    shutil.copytree(dirs["lora"], orphan)
    set_base_path(orphan, str(tmp_path / "deleted-base"))
    err = _fails(capsys, "--checkpoint", orphan)
    assert "key 'base_model_name_or_path' names" in err and "--checkpoint BASE --adapter" in err


def test_help_explains_adapter(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "--adapter DIR" in out and "LoRA/DoRA adapter" in out and "merge-lora" in out

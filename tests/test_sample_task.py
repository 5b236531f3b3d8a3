"""The README's main job: data prep on the bundled sample, then llama_tiny training, learns the task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modelzoo.config import load_config
from modelzoo.data_prep.cli import main as data_prep_main
from modelzoo.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"


def _capital_questions() -> list[tuple[str, str]]:
    pairs = {}
    for line in (SAMPLE / "sample.jsonl").read_text().splitlines():
        for item in (lambda x: x if isinstance(x, list) else [x])(json.loads(line)):
            if item["prompt"].startswith("The capital of"):
                pairs[item["prompt"]] = item["completion"]
    return sorted(pairs.items())


def _accuracy(model_dir: Path, tokenizer, questions, adapter: Path | None = None) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    right = 0
    for prompt, answer in questions:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        right += tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == answer
    return right / len(questions)


@pytest.fixture(scope="module")
def sample_hdf5(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "sample_hdf5"
    code = data_prep_main(["pipeline", "--input-path", str(SAMPLE / "sample.jsonl"), "--pretrained-tokenizer",
                           str(SAMPLE / "tokenizer"), "--output-path", str(out), "--max-seq-length", "256",
                           "--input-packing-config", "greedy::drop", "--shuffle", "on_RAM", "--seed", "0",
                           "--dev-ratio", "0.1", "--num-workers", "0"])
    assert code == 0
    return out


def test_llama_tiny_learns_the_sample_task(tmp_path, sample_hdf5):
    cfg = load_config("llama_tiny", [f"training.dataset_dir={sample_hdf5}", f"checkpoint.save_dir={tmp_path / 'ck'}",
                                     f"training.output_dir={tmp_path / 'out'}", "checkpoint.save_every=0",
                                     "checkpoint.keep_last=0", "training.eval_every=0"])
    trainer = Trainer(cfg, quiet=True)
    trainer.save()  # the untrained model, step 0
    result = trainer.fit()
    losses = [r["loss"] for r in result["history"] if "loss" in r]
    assert losses[-1] < 0.4 * losses[0]
    assert result["eval_loss"] < 2.0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ck" / "step_00000200")
    questions = _capital_questions()
    before = _accuracy(tmp_path / "ck" / "step_00000000", tokenizer, questions)
    after = _accuracy(tmp_path / "ck" / "step_00000200", tokenizer, questions)
    assert before == 0.0
    assert after >= 0.5, f"only {after:.0%} of {len(questions)} capitals right after training"


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # inside stock peft
def test_llama_tiny_lora_learns_the_sample_task_on_a_frozen_base(tmp_path, sample_hdf5):
    """llama_tiny_lora.yaml: the frozen random base gets no capital right; with the adapter stock
    peft (on stock transformers) gets most of them."""
    cfg = load_config("llama_tiny_lora", [f"training.dataset_dir={sample_hdf5}", f"checkpoint.save_dir={tmp_path / 'ck'}",
                                          f"training.output_dir={tmp_path / 'out'}", "checkpoint.save_every=0",
                                          "training.eval_every=0"])
    result = Trainer(cfg, quiet=True).fit()
    losses = [r["loss"] for r in result["history"] if "loss" in r]
    assert losses[-1] < losses[0] - 0.5
    adapter = tmp_path / "ck" / "step_00000200"
    base = Path(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert base == (tmp_path / "ck" / "base").absolute()
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    questions = _capital_questions()
    assert _accuracy(base, tokenizer, questions) == 0.0
    after = _accuracy(base, tokenizer, questions, adapter=adapter)
    assert after >= 0.5, f"only {after:.0%} of {len(questions)} capitals right with the adapter"

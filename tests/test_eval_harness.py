"""The "modelzoo" lm-evaluation-harness backend against the harness's own hf backend, on local tasks
(a multiple-choice task, a rolling-loglikelihood perplexity task, a generate_until task)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from helpers.generation_fixtures import WORDS, corpus, save_checkpoint
from transformers import AutoTokenizer

from modelzoo.cli.eval import main as eval_main

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'modelzoo[eval]')")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TASKS = ["tiny_mc", "tiny_ppl", "tiny_gen"]
MAX_GEN = 6


def _greedy_text(model, tok, prompt: str) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_GEN, do_sample=False, pad_token_id=0)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split(".")[0]


def _write_tasks(root, model, tok) -> None:
    lines = corpus(24, seed=11)
    mc = [{"question": line.rsplit(" ", 2)[0], "choices": [f" {WORDS[i % 16]}", f" {WORDS[(i + 3) % 16]} stone",
                                                             f" {WORDS[(i + 7) % 16]}"], "label": i % 3}
          for i, line in enumerate(lines[:12])]
    ppl = [{"text": " ".join(lines[i:i + 4])} for i in range(0, 12, 2)]
    gen = []
    for i, line in enumerate(lines[12:]):
        prompt = " ".join(line.split()[:4])
        gen.append({"prompt": prompt, "answer": _greedy_text(model, tok, prompt) if i % 2 == 0 else "nine"})
    common = {"dataset_path": "json", "test_split": "test"}
    specs = {
        "tiny_mc": (mc, {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "choices",
                         "doc_to_target": "label",
                         "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                         {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}),
        "tiny_ppl": (ppl, {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                           "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                                           {"metric": "bits_per_byte"}]}),
        "tiny_gen": (gen, {"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
                           "generation_kwargs": {"until": ["."], "max_gen_toks": MAX_GEN, "do_sample": False},
                           "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}),
    }
    for name, (docs, spec) in specs.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        task = {"task": name, **common, "dataset_kwargs": {"data_files": {"test": str(data)}}, **spec}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    path = root / "tiny-llama"
    model = save_checkpoint(path, "llama2_tiny").eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    tasks = root / "tasks"
    tasks.mkdir()
    _write_tasks(tasks, model, tok)
    return path, tasks, root


def _metrics(results: dict) -> dict:
    return {task: {k: v for k, v in values.items() if k != "alias" and "stderr" not in k}
            for task, values in results["results"].items()}


def test_modelzoo_backend_equals_the_hf_backend(setup, capsys):
    from lm_eval.tasks import TaskManager

    path, tasks, root = setup
    manager = TaskManager(include_path=str(tasks))
    reference = _metrics(lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={path},dtype=float32",
                                                 tasks=TASKS, batch_size=1, device="cpu", task_manager=manager))
    import modelzoo.eval  # noqa: F401  (registers "modelzoo")

    ours = _metrics(lm_eval.simple_evaluate(model="modelzoo", model_args=f"checkpoint={path},progress=false",
                                            tasks=TASKS, batch_size=4, task_manager=manager))
    assert set(ours) == set(reference) == set(TASKS)
    assert 0 < reference["tiny_gen"]["exact_match,none"] < 1  # half the answers are the model's own
    for task in TASKS:
        assert set(ours[task]) == set(reference[task])
        for metric, value in reference[task].items():
            if metric.startswith(("acc", "exact_match")) or not isinstance(value, float):
                assert ours[task][metric] == value, (task, metric)
            else:
                assert ours[task][metric] == pytest.approx(value, rel=1e-4, abs=1e-4), (task, metric)
    # the command line: the same numbers, in its JSON
    out = root / "cli.json"
    code = eval_main(["lm-eval", "--checkpoint", str(path), "--tasks", ",".join(TASKS), "--include-path", str(tasks),
                      "--batch-size", "3", "--no-progress", "--output-json", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out.read_text())
    for task in TASKS:
        for metric, value in reference[task].items():
            if isinstance(value, float):
                assert report["metrics"][task][metric] == pytest.approx(value, rel=1e-4, abs=1e-4), (task, metric)
    assert stdout.startswith("lm-eval tiny_") and "acc" in stdout


def test_unknown_task_is_one_line(setup, capsys):
    path, tasks, _ = setup
    code = eval_main(["lm-eval", "--checkpoint", str(path), "--tasks", "tiny_mcc", "--include-path", str(tasks)])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip() and line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "tiny_mcc" in lines[0] and "tiny_mc" in lines[0], err

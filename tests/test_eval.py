"""modelzoo-eval: ppl = the trainer's dev loss, wikitext/lambada = stock transformers on the same windows,
lm-eval through the "modelzoo" backend = lm-eval's own hf backend, TP = one chip, int8 its own
numbers, and bad input as one-line errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.generation_fixtures import WORDS, corpus, save_checkpoint
from synthetic_data import write_dataset
from transformers import AutoTokenizer

from modelzoo.cli.eval import main as eval_main
from modelzoo.eval import rolling_windows

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "tiny-llama"
    model = save_checkpoint(path, "llama2_tiny")
    return path, model.eval(), AutoTokenizer.from_pretrained(str(path))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = eval_main(["--no-progress" if a == "--quiet" else a for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _report(capsys, tmp_path: Path, *argv: str) -> dict:
    out_json = tmp_path / f"report-{len(list(tmp_path.glob('report-*')))}.json"
    code, out, err = _run(capsys, *argv, "--no-progress", "--output-json", str(out_json))
    assert code == 0, err
    report = json.loads(out_json.read_text())
    report["stdout"] = out
    return report


# ------------------------------------------------------------------------------------- windows


@pytest.mark.parametrize("n, seq, stride", [(50, 8, 8), (50, 8, 3), (9, 8, 5), (2, 8, 1), (33, 16, 16)])
def test_rolling_windows_score_every_token_once_with_enough_context(n, seq, stride):
    tokens = list(range(100, 100 + n))
    windows = rolling_windows(tokens, seq, stride)
    scored = []
    for number, w in enumerate(windows):
        assert len(w.tokens) - 1 <= seq
        targets = list(w.tokens[len(w.tokens) - w.n_scored:])
        scored += targets
        context = len(w.tokens) - 1 - w.n_scored  # inputs before the first scored target's input
        if number:
            assert context >= seq - stride
    assert scored == tokens[1:]


# ------------------------------------------------------------------------------------------ ppl


def test_ppl_equals_the_trainers_dev_loss(tmp_path, capsys):
    from modelzoo.config import load_config
    from modelzoo.training.trainer import Trainer

    data = write_dataset(tmp_path / "data", n_train_files=1, rows_per_file=8, n_dev=8)
    overrides = {"model.name_or_path": "llama2_tiny", "training.dataset_dir": str(data),
                 "training.max_seq_length": 32, "training.batch_size": 4, "training.max_steps": 2,
                 "training.eval_every": 2, "training.prompt_loss_weight": 0.25,
                 "training.learning_rate": 1e-3, "training.seed": 3, "checkpoint.save_dir": str(tmp_path / "ck"),
                 "training.output_dir": str(tmp_path / "out"), "samba_compile.output_folder": str(tmp_path / "plan")}
    cfg = load_config("llama_tiny", [f"{k}={v}" for k, v in overrides.items()])
    trainer = Trainer(cfg, quiet=True)
    trainer.fit()
    expected = trainer.evaluate()["eval_loss"]
    report = _report(capsys, tmp_path, "ppl", "--checkpoint", str(tmp_path / "ck"), "--dataset-dir", str(data),
                     "--batch-size", "4")
    assert report["prompt_loss_weight"] == 0.25  # from the checkpoint's training config
    assert report["metrics"]["loss"] == pytest.approx(expected, rel=1e-6)
    assert report["metrics"]["ppl"] == pytest.approx(math.exp(expected), rel=1e-6)
    assert report["metrics"]["sequences"] == 8
    assert "ppl (dev)" in report["stdout"]
    # the prompt weight changes the number (the flag overrides the config's)
    other = _report(capsys, tmp_path, "ppl", "--checkpoint", str(tmp_path / "ck"), "--dataset-dir", str(data),
                    "--prompt-loss-weight", "1")
    assert other["metrics"]["loss"] != pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------------------------------- wikitext


def _text(n: int = 60) -> str:
    return " ".join(corpus(n, seed=5))


def _hf_window_losses(model, tokens: list[int], seq: int, stride: int) -> tuple[float, int]:
    """Summed NLL with stock transformers: window k starts at k * stride, holds up to seq inputs, and
    scores the targets after the last one scored so far (written independently of rolling_windows)."""
    total, count, done, start = 0.0, 0, 0, 0
    last = len(tokens) - 1
    while done < last:
        window = tokens[start:min(start + seq, last) + 1]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([window[:-1]])).logits[0].float(), -1)
        for pos in range(len(window) - 1):
            target_index = start + pos + 1
            if target_index > done:
                total -= float(logp[pos, window[pos + 1]])
                count += 1
        done = start + len(window) - 1
        start += stride
    return total, count


@pytest.mark.parametrize("stride", [5, 16])
def test_wikitext_equals_transformers_on_the_same_windows(checkpoint, tmp_path, capsys, stride):
    path, model, tok = checkpoint
    text = _text()
    (tmp_path / "wiki.txt").write_text(text)
    report = _report(capsys, tmp_path, "wikitext", "--checkpoint", str(path), "--input", str(tmp_path / "wiki.txt"),
                     "--seq-length", "16", "--stride", str(stride), "--batch-size", "3")
    tokens = tok.encode(text, add_special_tokens=False)
    total, count = _hf_window_losses(model, tokens, 16, stride)
    m = report["metrics"]
    assert m["scored_tokens"] == count == len(tokens) - 1
    assert m["token_loss"] == pytest.approx(total / count, abs=1e-5)
    words = len(text.split())
    assert m["words"] == words
    assert m["word_ppl"] == pytest.approx(math.exp(total / (words - 1)), rel=1e-5)
    assert m["token_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert report["checkpoint"]["files"] and all(len(f["sha256"]) == 64 for f in report["checkpoint"]["files"].values())
    assert {"torch", "transformers"} <= set(report["versions"]) and report["timings"]["eval_s"] > 0


# -------------------------------------------------------------------------------------- lambada


def _lambada_examples(model, tok) -> list[str]:
    """Texts whose last word is the model's own greedy next token (so some are right), texts with a
    random last word, and texts whose last word takes several tokens."""
    texts = []
    for number, line in enumerate(corpus(80, seed=9)):
        context = line.rsplit(" ", 1)[0]
        ids = tok.encode(context)
        with torch.no_grad():
            greedy = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        piece = tok.decode([greedy])
        if piece.startswith(" ") and piece.strip().isalpha() and len(texts) < 8:
            texts.append(context + piece)
        elif number % 6 == 0:
            texts.append(f"{context} {WORDS[number % len(WORDS)]}")
        elif number % 6 == 1:
            texts.append(f"{context} riverstones")
    return texts


def _hf_lambada(model, tok, texts: list[str], strict: bool) -> tuple[int, list[int]]:
    correct, target_lengths = 0, []
    for text in texts:
        whole = tok.encode(text)
        if strict:
            last = text.split()[-1]
            n_target = len(whole) - len(tok.encode(text[:text.rfind(last)].rstrip()))
        else:
            n_target = 1
        with torch.no_grad():
            logits = model(torch.tensor([whole[:-1]])).logits[0]
        predicted = logits[len(whole) - 1 - n_target:].argmax(-1).tolist()
        correct += predicted == whole[len(whole) - n_target:]
        target_lengths.append(n_target)
    return correct, target_lengths


@pytest.mark.parametrize("strict", [False, True])
def test_lambada_equals_transformers(checkpoint, tmp_path, capsys, strict):
    path, model, tok = checkpoint
    texts = _lambada_examples(model, tok)
    (tmp_path / "lambada.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    flags = ["--strict"] if strict else []
    report = _report(capsys, tmp_path, "lambada", "--checkpoint", str(path), "--input", str(tmp_path / "lambada.jsonl"),
                     "--batch-size", "5", *flags)
    correct, lengths = _hf_lambada(model, tok, texts, strict)
    assert 0 < correct < len(texts)  # the test can tell right from wrong
    if strict:
        assert max(lengths) > 1  # last words of several tokens
    assert report["metrics"]["correct"] == correct
    assert report["metrics"]["examples"] == len(texts)
    assert report["metrics"]["accuracy"] == pytest.approx(correct / len(texts))
    assert report["metrics"]["target_tokens"] == sum(lengths)


# --------------------------------------------------------------------------- tensor parallel, int8


def test_two_chips_equal_one_and_int8_says_so(checkpoint, tmp_path, capsys):
    path, _, _ = checkpoint
    (tmp_path / "wiki.txt").write_text(_text(30))
    base = ["wikitext", "--checkpoint", str(path), "--input", str(tmp_path / "wiki.txt"), "--seq-length", "16",
            "--stride", "8"]
    one = _report(capsys, tmp_path, *base)
    two_json = tmp_path / "two.json"
    proc = subprocess.run([sys.executable, "-m", "modelzoo.cli.eval", *base, "--n-chips", "2", "--no-progress",
                           "--output-json", str(two_json)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    two = json.loads(two_json.read_text())
    assert two["tensor_parallel"] == 2
    assert two["metrics"]["token_loss"] == pytest.approx(one["metrics"]["token_loss"], abs=1e-5)
    assert two["metrics"]["scored_tokens"] == one["metrics"]["scored_tokens"]
    int8 = _report(capsys, tmp_path, *base, "--quantize", "int8")
    assert int8["int8"] is True and "int8" in int8["stdout"] and "int8" not in one["stdout"]
    assert int8["metrics"]["token_loss"] != one["metrics"]["token_loss"]
    assert int8["metrics"]["token_loss"] == pytest.approx(one["metrics"]["token_loss"], rel=0.05)


# ------------------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_nonzero(checkpoint, tmp_path, capsys):
    path, _, _ = checkpoint
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the river runs"}\n{"text": oops}\n')
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    (broken / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:1000])
    cases = [
        (["lambada", "--checkpoint", str(path), "--input", str(bad)], f"{bad}:2"),
        (["lambada", "--checkpoint", str(path), "--input", str(tmp_path / "missing.jsonl")], "no such file"),
        (["wikitext", "--checkpoint", str(path), "--input", str(empty)], "empty"),
        (["wikitext", "--checkpoint", str(broken), "--input", str(bad), "--tokenizer", str(path)], "model.safetensors"),
        (["wikitext", "--checkpoint", str(tmp_path / "nope"), "--input", str(bad)], "no such directory"),
        (["wikitext", "--checkpoint", str(path), "--input", str(bad), "--seq-length", "8", "--stride", "9"], "--stride"),
        (["ppl", "--checkpoint", str(path), "--dataset-dir", str(tmp_path / "nodata")], "--dataset-dir"),
    ]
    for argv, words in cases:
        code, out, err = _run(capsys, *argv, "--no-progress")
        assert code == 2, (argv, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], (argv, err)
        assert out == ""


def test_the_eval_command_answers_help_without_torch():
    code = ("import sys, modelzoo.cli.eval as e; assert 'torch' not in sys.modules, 'torch imported'; "
            "e.main(['--help'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "wikitext" in proc.stdout and "lm-eval" in proc.stdout


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_an_adapter_is_evaluated_as_stock_peft_runs_it(tmp_path, capsys):
    from helpers.peft_fixtures import save_base, save_stock_adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = save_base(tmp_path / "base")
    adapter = save_stock_adapter(base, tmp_path / "adapter", base_path=str(base))
    text = _text(20)
    (tmp_path / "wiki.txt").write_text(text)
    flags = ["wikitext", "--input", str(tmp_path / "wiki.txt"), "--seq-length", "16"]
    with_adapter = _report(capsys, tmp_path, *flags, "--checkpoint", str(base), "--adapter", str(adapter))
    alone = _report(capsys, tmp_path, *flags, "--checkpoint", str(base))
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter)).eval()
    tokens = AutoTokenizer.from_pretrained(str(base)).encode(text, add_special_tokens=False)
    total, count = _hf_window_losses(reference, tokens, 16, 16)
    assert with_adapter["metrics"]["token_loss"] == pytest.approx(total / count, abs=1e-5)
    assert alone["metrics"]["token_loss"] != pytest.approx(total / count, abs=1e-3)
    assert with_adapter["checkpoint"]["adapter"] == str(adapter)

"""modelzoo-generate: output equal to ``transformers``, streaming, interactive mode, config + flags,
chat, int8, tensor parallel, and one-line errors with exit status 2 for everything a user can get wrong."""

from __future__ import annotations

import io
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.generation_fixtures import hf_greedy, save_checkpoint, train_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from modelzoo.cli.generate import main

PROMPTS = ["the river runs", "seven green apple light over the stone"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(path, "llama2_tiny")
    return path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _hf_reference(ckpt: Path, prompts: list[str], new_tokens: int) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    return hf_greedy(model, [tok.encode(p) for p in prompts], new_tokens, eos=2)


def test_greedy_output_equals_transformers(ckpt, tmp_path, capsys):
    out_json = tmp_path / "out.json"
    args = ["--checkpoint", ckpt, "--max-new-tokens", 64, "--batch-size", 2, "--output-json", out_json]
    code, out, err = _run(capsys, *args, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1])
    assert code == 0, err
    result = _json(out_json)
    assert [c["token_ids"] for c in result["completions"]] == _hf_reference(ckpt, PROMPTS, 64)
    for c, prompt in zip(result["completions"], PROMPTS, strict=True):
        assert c["prompt"] == prompt and f"{prompt}{c['completion']}" in out
    telemetry = result["telemetry"]
    assert telemetry["time_to_first_token_ms"] > 0 and telemetry["tokens_per_s"] > 0
    assert telemetry["per_token_latency_ms"]["mean"] > 0
    assert "telemetry: time to first token" in err
    assert result["config"]["generation"]["batch_size"] == 2


def test_stream_and_interactive_print_the_same_text(ckpt, tmp_path, capsys, monkeypatch):
    base = ["--checkpoint", ckpt, "--max-new-tokens", 24]
    code, plain, _ = _run(capsys, *base, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1])
    assert code == 0
    code, streamed, _ = _run(capsys, *base, "--stream", "--batch-size", 2, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1])
    assert code == 0 and streamed == plain
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{PROMPTS[0]}\n{PROMPTS[1]}\n\n"))
    code, interactive, err = _run(capsys, *base, "--output-json", tmp_path / "i.json")
    assert code == 0 and "interactive" in err
    completions = [c["completion"] for c in _json(tmp_path / "i.json")["completions"]]
    assert interactive == "".join(f"{c}\n" for c in completions)
    assert plain == "".join(f"{p}{c}\n" for p, c in zip(PROMPTS, completions, strict=True))


def test_prompts_file_config_overrides_and_flags(ckpt, tmp_path, capsys):
    config = tmp_path / "gen.yaml"
    config.write_text("generation:\n  max_new_tokens: 3\n  top_k: 5\n  temperature: 0.7\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the river"}\n\n"a light"\n{"prompt": "seven"}\n')
    out_json = tmp_path / "out.json"
    code, _, err = _run(capsys, "--config", config, "--checkpoint", ckpt, "--prompts-file", prompts, "--batch-size", 2,
                        "--max-new-tokens", 6, "--seed", 3, "--output-json", out_json, "generation.top_p=0.9")
    assert code == 0, err
    result = _json(out_json)
    gen = result["config"]["generation"]
    assert (gen["max_new_tokens"], gen["top_k"], gen["top_p"], gen["temperature"], gen["seed"]) == (6, 5, 0.9, 0.7, 3)
    assert [c["prompt"] for c in result["completions"]] == ["the river", "a light", "seven"]
    assert all(c["new_tokens"] <= 6 for c in result["completions"])
    # sampling with a fixed seed is reproducible through the CLI too
    code, _, _ = _run(capsys, "--config", config, "--checkpoint", ckpt, "--prompts-file", prompts, "--batch-size", 2,
                      "--max-new-tokens", 6, "--seed", 3, "--output-json", tmp_path / "again.json", "generation.top_p=0.9")
    assert code == 0 and _json(tmp_path / "again.json")["completions"] == result["completions"]


def test_chat_template_and_stop_string(ckpt, tmp_path, capsys):
    code, _, err = _run(capsys, "--checkpoint", ckpt, "--chat", "--max-new-tokens", 8, "--prompt", "hello",
                        "--output-json", tmp_path / "chat.json")
    assert code == 0, err
    chat = _json(tmp_path / "chat.json")["completions"][0]
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert chat["prompt_tokens"] == len(tok.encode("<s>[user] hello\n[assistant]", add_special_tokens=False))
    code, _, _ = _run(capsys, "--checkpoint", ckpt, "--max-new-tokens", 40, "--prompt", PROMPTS[0],
                      "--output-json", tmp_path / "free.json")
    text = _json(tmp_path / "free.json")["completions"][0]["completion"]
    if len(text) > 6:
        stop = text[3:6]
        code, _, _ = _run(capsys, "--checkpoint", ckpt, "--max-new-tokens", 40, "--prompt", PROMPTS[0], "--stop", stop,
                          "--output-json", tmp_path / "stop.json")
        stopped = _json(tmp_path / "stop.json")["completions"][0]
        assert code == 0 and stopped["finish_reason"] == "stop" and stopped["completion"] == text[: text.find(stop)]


def test_int8_quantize_flag_and_prequantized_dir_agree(ckpt, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from modelzoo.checkpoint.int8 import QUANT_KEY, quantize_state
    from modelzoo.generation import load_for_generation

    quant_names = list(getattr(load_for_generation(str(ckpt), quantize="int8").config, QUANT_KEY)["modules"])
    qdir = tmp_path / "int8"
    qdir.mkdir()
    for f in ckpt.iterdir():
        (qdir / f.name).write_bytes(f.read_bytes())
    save_file(quantize_state(load_file(ckpt / "model.safetensors"), quant_names), qdir / "model.safetensors")
    config = json.loads((qdir / "config.json").read_text())
    config[QUANT_KEY] = {"method": "int8_weight_only", "scheme": "per_output_channel_absmax", "modules": quant_names}
    (qdir / "config.json").write_text(json.dumps(config))
    args = ["--max-new-tokens", 16, "--prompt", PROMPTS[1]]
    assert _run(capsys, "--checkpoint", ckpt, "--quantize", "int8", *args, "--output-json", tmp_path / "a.json")[0] == 0
    assert _run(capsys, "--checkpoint", qdir, *args, "--output-json", tmp_path / "b.json")[0] == 0
    assert _json(tmp_path / "a.json")["completions"] == _json(tmp_path / "b.json")["completions"]


def test_tensor_parallel_flag_equals_transformers(ckpt, tmp_path, capsys):
    out_json = tmp_path / "tp.json"
    code, out, err = _run(capsys, "--checkpoint", ckpt, "--n-chips", 2, "--max-new-tokens", 64, "--batch-size", 2,
                          "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--output-json", out_json)
    assert code == 0, err
    result = _json(out_json)
    assert result["tensor_parallel"] == 2
    assert [c["token_ids"] for c in result["completions"]] == _hf_reference(ckpt, PROMPTS, 64)


def test_preset_smoke_run_and_help(capsys, monkeypatch):
    code, out, _ = _run(capsys, "--checkpoint", "llama3_2_tiny", "--max-new-tokens", 4, "--prompt", "hi")
    assert code == 0 and out.startswith("hi")
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--repetition-penalty" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["run_generation.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "examples/text_generation/run_generation.py"), run_name="__main__")
    assert exit_info.value.code == 0


# ------------------------------------------------------------------------------------ errors


def _broken_dirs(tmp_path: Path, ckpt: Path) -> dict[str, Path]:
    def copy_of(name):
        path = tmp_path / name
        path.mkdir()
        for f in ckpt.iterdir():
            (path / f.name).write_bytes(f.read_bytes())
        return path

    truncated = copy_of("truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    bad_json = copy_of("bad_json")
    (bad_json / "config.json").write_text('{"model_type": "llama",\n "hidden_size": }')
    (tmp_path / "empty").mkdir()
    small_vocab = tmp_path / "small_vocab"
    save_checkpoint(small_vocab, "llama2_tiny", tokenizer=False, vocab_size=256)
    train_tokenizer(small_vocab, vocab_size=300)
    short_context = tmp_path / "short_context"
    save_checkpoint(short_context, "llama2_tiny", max_position_embeddings=32)
    no_chat = tmp_path / "no_chat"
    save_checkpoint(no_chat, "llama2_tiny", tokenizer=False)
    train_tokenizer(no_chat, chat=False)
    bad_prompts = tmp_path / "prompts.jsonl"
    bad_prompts.write_text('{"prompt": "ok"}\n{"prompt": \n')
    return {"truncated": truncated, "bad_json": bad_json, "empty": tmp_path / "empty", "small_vocab": small_vocab,
            "short_context": short_context, "no_chat": no_chat, "bad_prompts": bad_prompts}


ERROR_CASES = {
    "missing checkpoint": (["--checkpoint", "/no/such/ckpt"], "'/no/such/ckpt' is neither a preset nor a directory"),
    "no config.json": (["--checkpoint", "{empty}"], "is a directory without config.json"),
    "corrupt config.json": (["--checkpoint", "{bad_json}"], "config.json:2: invalid JSON (Expecting value)"),
    "truncated weights": (["--checkpoint", "{truncated}"], "model.safetensors: truncated ("),
    "vocab mismatch": (["--checkpoint", "{small_vocab}"], "has 300 tokens but model"),
    "prompt longer than context": (["--checkpoint", "{short_context}", "--max-new-tokens", "8"],
                                   "the model's context (max_position_embeddings) is 32"),
    "chat without template": (["--checkpoint", "{no_chat}", "--chat"], "no chat_template"),
    "unknown flag": (["--tmperature", "0.5"], "unknown option(s) --tmperature ('--tmperature': did you mean --temperature?)"),
    "bad flag value": (["--top-p", "2"], "--top-p: 'generation.top_p' must be <= 1"),
    "bad override": (["generation.top_kk=3"], "did you mean 'generation.top_k'?"),
    "bad prompts file": (["--prompts-file", "{bad_prompts}"], "prompts.jsonl:2: invalid JSON"),
    "impossible n_chips": (["--n-chips", "3"], "--n-chips: samba_compile.n_chips=3 does not divide"),
    "output dir missing": (["--output-json", "/no/such/dir/out.json"], "--output-json /no/such/dir/out.json"),
}


def test_bad_input_gives_one_error_line_and_exit_2(ckpt, tmp_path, capsys):
    dirs = _broken_dirs(tmp_path, ckpt)
    capsys.readouterr()  # drop save_pretrained's progress bars
    failures = []
    for name, (argv, expected) in ERROR_CASES.items():
        argv = [a.format(**dirs) for a in argv]
        if "--checkpoint" not in argv:
            argv += ["--checkpoint", str(ckpt)]
        prompt = ["--prompt", "the river " * 20] if name == "prompt longer than context" else ["--prompt", "hi"]
        code, _, err = _run(capsys, *argv, *([] if "--prompts-file" in argv else prompt))
        lines = err.strip().splitlines()
        if not (code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]):
            failures.append((name, code, err))
    assert not failures


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_unavailable_backend_and_real_process_exit_code(ckpt):
    proc = subprocess.run([sys.executable, "-m", "modelzoo.cli.generate", "--checkpoint", str(ckpt), "--backend", "cuda",
                           "--prompt", "hi"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: backend 'cuda' is unavailable")


def test_training_run_dir_resolves_to_its_latest_checkpoint(ckpt, tmp_path, capsys):
    """--checkpoint accepts what training writes: the run dir, its checkpoints dir or ``latest``."""
    import shutil

    from modelzoo.checkpoint.manager import LATEST, STATE_DIR, TRAINER_STATE, step_dir_name

    save_dir = tmp_path / "run" / "checkpoints"
    for step in (1, 2):
        shutil.copytree(ckpt, save_dir / step_dir_name(step))
        (save_dir / step_dir_name(step) / STATE_DIR).mkdir()
        (save_dir / step_dir_name(step) / STATE_DIR / TRAINER_STATE).write_text("{}")
    (save_dir / step_dir_name(1) / "model.safetensors").write_bytes(b"not weights")  # only step 2 loads
    (save_dir / LATEST).write_text(step_dir_name(2))
    args = ["--max-new-tokens", 8, "--prompt", PROMPTS[0]]
    want = _run(capsys, "--checkpoint", ckpt, *args)
    assert want[0] == 0, want[2]
    for path in (tmp_path / "run", save_dir, save_dir / LATEST):
        code, out, err = _run(capsys, "--checkpoint", path, *args)
        assert code == 0, err
        assert out == want[1]
    (save_dir / LATEST).write_text(step_dir_name(1))
    code, _, err = _run(capsys, "--checkpoint", save_dir, *args)
    assert code == 2 and "model.safetensors" in err

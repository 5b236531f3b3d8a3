"""What conversion writes opens in other tools, transformers 4.x included (pinned by llama.cpp's
converter and many serving stacks): every ``config.json`` names ``LlamaForCausalLM`` and carries the
4.x rope/dtype fields, every ``tokenizer_config.json`` names a class 4.x knows. Checked as the JSON
fields 4.x reads and by loading with stock ``AutoConfig`` / ``AutoTokenizer`` (no ``trust_remote_code``)."""

from __future__ import annotations

import base64
import json

import pytest
from test_convert_meta import write_meta_dir
from test_convert_tokenizer import corpus, spm_model, train_byte_bpe  # noqa: F401 (spm_model: a fixture)
from transformers import AutoConfig, AutoTokenizer, LlamaConfig

from modelzoo.cli.convert import main

TEXT = "hello world, the quick brown fox"
#: config.json fields transformers 4.x reads (5.x writes rope_parameters and dtype instead)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def run(*argv) -> None:
    assert main([*map(str, argv), "--quiet"]) == 0


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """meta-to-hf of a Llama-3 Meta dir (tiktoken tokenizer), then shard / quantize / unshard of an HF
    input whose config.json names another architecture and whose tokenizer_config.json names
    transformers 5's ``TokenizersBackend``."""
    root = tmp_path_factory.mktemp("interop")
    ranks = train_byte_bpe(corpus(), 60)
    tokenizer = root / "tokenizer.model"
    tokenizer.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    write_meta_dir(root / "meta", "llama3_tiny", 2, tokenizer=tokenizer)
    run("meta-to-hf", "--input", root / "meta", "--output", root / "meta-to-hf", "--model-size", "llama3_tiny")
    src = root / "src"
    run("meta-to-hf", "--input", root / "meta", "--output", src, "--model-size", "llama3_tiny")
    for name, key, value in (("config.json", "architectures", ["LlamaModel"]),
                             ("tokenizer_config.json", "tokenizer_class", "TokenizersBackend")):
        data = json.loads((src / name).read_text())
        data[key] = value
        (src / name).write_text(json.dumps(data))
    run("shard", "--input", src, "--output", root / "shard", "--n-chips", "2")
    run("quantize", "--int8", "--input", src, "--output", root / "quantize")
    run("unshard", "--input", root / "shard", "--output", root / "unshard")
    return root


@pytest.mark.parametrize("command", ["meta-to-hf", "shard", "quantize", "unshard"])
def test_written_config_and_tokenizer_are_what_transformers_4_reads(outputs, command):
    out = outputs / command
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["rope_theta"] == 500000.0 and config["rope_scaling"] == LLAMA3_ROPE
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    loaded = AutoConfig.from_pretrained(out)
    assert isinstance(loaded, LlamaConfig) and loaded.rope_parameters == {**LLAMA3_ROPE, "rope_theta": 500000.0}
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.encode(TEXT) == AutoTokenizer.from_pretrained(outputs / "meta-to-hf").encode(TEXT)
    assert tok.eos_token == "<|end_of_text|>"


def test_llama2_sentencepiece_output_is_what_transformers_4_reads(tmp_path, spm_model):  # noqa: F811
    write_meta_dir(tmp_path / "meta", "llama2_tiny", 1, tokenizer=spm_model)
    run("meta-to-hf", "--input", tmp_path / "meta", "--output", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_theta"] == 10000.0 and config["rope_scaling"] is None
    tok_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode("hello world")[0] == 1  # <s>

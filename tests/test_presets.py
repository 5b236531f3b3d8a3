"""Tests for the Llama architecture presets (``modelzoo.models.llama.presets``) and modelzoo's builder.

Big presets are built by modelzoo on the meta device only (no memory, no weights); their parameter
counts are checked against the published sizes, and their distinguishing fields against the
published ``config.json`` files. Tiny presets are materialized by modelzoo's builder on the CPU and
checked against a stock ``transformers`` model of the same config (initialisation, buffers, tying).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from modelzoo.models.llama import from_pretrained
from modelzoo.models.llama.presets import (
    PRESETS,
    SYNTHETIC_PRESETS,
    TINY_PRESETS,
    UnknownPresetError,
    get_preset,
    preset_dict,
    preset_names,
)

# Published parameter counts (model cards / papers), tied weights counted once.
PUBLISHED_PARAMS = {
    "llama2_7b": 6.74e9,
    "llama2_13b": 13.02e9,
    "llama2_70b": 68.98e9,
    "llama3_8b": 8.03e9,
    "llama3_1_8b": 8.03e9,
    "llama3_1_70b": 70.55e9,
    "llama3_1_405b": 405.85e9,
    "llama3_2_1b": 1.24e9,
    "llama3_2_3b": 3.21e9,
}
BIG_PRESETS = tuple(PUBLISHED_PARAMS)

# Expected values, copied from the published Hugging Face config.json of each checkpoint
# (meta-llama/Llama-2-{7,13,70}b-hf, Meta-Llama-3-8B, Llama-3.1-{8,70,405}B, Llama-3.2-{1,3}B).
# rope: None = plain RoPE (no "rope_scaling" in config.json); a number = "llama3" scaling with that
# factor (low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 8192).
# head_dim: None where config.json leaves it out (then it is hidden_size / num_attention_heads).
# fmt: off
_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rope_theta",
           "rope", "tie_word_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id")
_PUBLISHED_CONFIGS = {
    #                hidden inter  layers heads kv  head_dim vocab   ctx     theta     rope  tied   eps   bos     eos
    "llama2_7b":     (4096, 11008,  32,    32,  32, None,    32000,  4096,   10000.0,  None, False, 1e-5, 1,      2),
    "llama2_13b":    (5120, 13824,  40,    40,  40, None,    32000,  4096,   10000.0,  None, False, 1e-5, 1,      2),
    "llama2_70b":    (8192, 28672,  80,    64,   8, None,    32000,  4096,   10000.0,  None, False, 1e-5, 1,      2),
    "llama3_8b":     (4096, 14336,  32,    32,   8, None,   128256,  8192,  500000.0,  None, False, 1e-5, 128000, 128001),
    "llama3_1_8b":   (4096, 14336,  32,    32,   8, None,   128256, 131072, 500000.0,   8.0, False, 1e-5, 128000, 128001),
    "llama3_1_70b":  (8192, 28672,  80,    64,   8, None,   128256, 131072, 500000.0,   8.0, False, 1e-5, 128000, 128001),
    "llama3_1_405b": (16384, 53248, 126,  128,   8, None,   128256, 131072, 500000.0,   8.0, False, 1e-5, 128000, 128001),
    "llama3_2_1b":   (2048,  8192,  16,    32,   8, 64,     128256, 131072, 500000.0,  32.0, True,  1e-5, 128000, 128001),
    "llama3_2_3b":   (3072,  8192,  28,    24,   8, 128,    128256, 131072, 500000.0,  32.0, True,  1e-5, 128000, 128001),
}
# fmt: on
PUBLISHED_CONFIGS = {name: dict(zip(_FIELDS, row, strict=True)) for name, row in _PUBLISHED_CONFIGS.items()}


def build_on_meta(name: str, **overrides) -> transformers.LlamaForCausalLM:
    """modelzoo's builder, shapes only (``device="meta"``), unpatched."""
    return from_pretrained(name, device="meta", overrides=overrides or None, patch=False)


def param_count(model: torch.nn.Module) -> int:
    """Parameter count with tied weights counted once (``parameters()`` deduplicates)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- big presets (meta)


@pytest.mark.parametrize("name", BIG_PRESETS)
def test_param_count_matches_published_size(name):
    count = param_count(build_on_meta(name))
    published = PUBLISHED_PARAMS[name]
    assert abs(count - published) / published < 0.005, f"{name}: {count:,} params vs published {published:.4g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", BIG_PRESETS)
def test_meta_build_materializes_nothing(name, dtype):
    model = from_pretrained(name, device="meta", dtype=dtype, patch=False)
    assert all(p.is_meta and p.dtype == dtype for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())


@pytest.mark.parametrize("name", BIG_PRESETS)
def test_fields_match_published_config_json(name):
    expected = PUBLISHED_CONFIGS[name]
    config = get_preset(name)
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "max_position_embeddings",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(config, field) == expected[field], f"{name}.{field}"
    assert config.rms_norm_eps == pytest.approx(expected["rms_norm_eps"])

    head_dim = expected["head_dim"] or expected["hidden_size"] // expected["num_attention_heads"]
    assert config.head_dim == head_dim

    rope = config.rope_parameters
    assert rope["rope_theta"] == expected["rope_theta"]
    if expected["rope"] is None:
        assert rope["rope_type"] == "default"
        assert "factor" not in rope
    else:
        assert rope["rope_type"] == "llama3"
        assert rope["factor"] == expected["rope"]
        assert rope["low_freq_factor"] == 1.0
        assert rope["high_freq_factor"] == 4.0
        assert rope["original_max_position_embeddings"] == 8192


@pytest.mark.parametrize("name", ["llama3_2_1b", "llama3_2_3b"])
def test_tied_presets_share_embedding_and_lm_head(name):
    model = build_on_meta(name)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_every_big_preset_is_checked():
    ours = set(SYNTHETIC_PRESETS)
    assert {n for n in preset_names() if n not in ours} == set(BIG_PRESETS)


def test_benchmark_preset_is_about_60m():
    assert 55e6 < param_count(build_on_meta("llama_60m")) < 65e6


# ------------------------------------------------------------------------- lookup and overrides


def test_unknown_preset_suggests_close_match():
    with pytest.raises(UnknownPresetError, match="llama2_7b"):
        get_preset("llama2_7")
    with pytest.raises(UnknownPresetError, match="llama3_1_70b"):
        preset_dict("llama3.1_70b")


def test_unknown_preset_is_a_value_error():
    with pytest.raises(ValueError, match="unknown Llama preset 'no_such_model'"):
        get_preset("no_such_model")


def test_overrides_replace_single_fields():
    base = get_preset("llama2_70b")
    config = get_preset("llama2_70b", num_hidden_layers=1, max_position_embeddings=2048)
    assert config.num_hidden_layers == 1
    assert config.max_position_embeddings == 2048
    assert config.num_key_value_heads == base.num_key_value_heads
    assert config.hidden_size == base.hidden_size
    model = build_on_meta("llama2_70b", num_hidden_layers=1, max_position_embeddings=2048)  # via the builder
    assert len(model.model.layers) == 1
    assert model.config.max_position_embeddings == 2048
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (8 * 128, 8192)  # GQA kept


def test_overrides_and_preset_dict_do_not_mutate_presets():
    before = {name: dict(values) for name, values in PRESETS.items()}
    get_preset("llama3_1_8b", num_hidden_layers=1, rope_theta=1.0)
    values = preset_dict("llama3_1_8b")
    values["rope_scaling"]["factor"] = 1.0
    values["num_hidden_layers"] = 2
    assert PRESETS == before
    assert get_preset("llama3_1_8b").rope_parameters["factor"] == 8.0


# -------------------------------------------------------------------------------- tiny presets


def test_tiny_presets_keep_family_features():
    llama2, llama3, llama3_2 = (get_preset(n) for n in ("llama2_tiny", "llama3_tiny", "llama3_2_tiny"))
    assert llama2.num_key_value_heads == llama2.num_attention_heads  # MHA
    assert llama2.rope_parameters["rope_type"] == "default"
    assert not llama2.tie_word_embeddings
    for config, factor, tied in ((llama3, 8.0, False), (llama3_2, 32.0, True)):
        assert config.num_key_value_heads < config.num_attention_heads  # GQA
        assert config.rope_parameters["rope_type"] == "llama3"
        assert config.rope_parameters["factor"] == factor
        assert config.tie_word_embeddings is tied
    assert preset_dict("llama_tiny") == preset_dict("llama2_tiny")


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_tiny_preset_materializes_with_transformers_init(name):
    """modelzoo builds on the meta device, then materializes and initialises: every tensor must end up
    real, on the CPU, and initialised as stock ``transformers`` initialises the same config (no
    uninitialised memory left by ``to_empty``; fp32 rotary buffers; tied weights still tied)."""
    model = from_pretrained(name, seed=0, patch=False)
    torch.manual_seed(0)
    stock = transformers.LlamaForCausalLM(get_preset(name))
    stock_params = dict(stock.named_parameters())
    assert [n for n, _ in model.named_parameters()] == list(stock_params)
    for pname, param in model.named_parameters():
        want = stock_params[pname]
        assert param.device.type == "cpu" and not param.is_meta, pname
        assert param.shape == want.shape and param.dtype == want.dtype, pname
        if param.dim() == 1:  # RMSNorm weights: ones
            assert torch.equal(param, want), pname
        else:  # normal(0, initializer_range): sampling error of the std is under 2% at these sizes
            std = want.std().item()
            assert param.std().item() == pytest.approx(std, rel=0.1), pname
            assert abs(param.mean().item()) < 0.1 * std, pname
    stock_buffers = dict(stock.named_buffers())
    for bname, buffer in model.named_buffers():
        assert torch.equal(buffer, stock_buffers[bname]), bname
    tied = get_preset(name).tie_word_embeddings
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_tiny_preset_seed_decides_the_weights(name):
    a, b, c = (from_pretrained(name, seed=s, patch=False) for s in (3, 3, 4))
    for (pname, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), pname
        if pa.dim() == 2:
            assert not torch.equal(pa, pc), pname


@pytest.mark.parametrize("name", ["llama2_tiny", "llama3_tiny", "llama3_2_tiny"])
def test_bf16_build_keeps_fp32_rotary_frequencies(name):
    """A bf16 model's rope frequencies stay those of the preset's rope settings in fp32 (rounding them
    to bf16 would shift every position's angle, more the longer the context)."""
    model = from_pretrained(name, dtype="bfloat16", seed=0, patch=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    want = LlamaRotaryEmbedding(config=get_preset(name))
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.rotary_emb.inv_freq, want.inv_freq)
    assert model.model.rotary_emb.rope_type == get_preset(name).rope_parameters["rope_type"]


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_tiny_preset_runs_forward(name):
    model = from_pretrained(name, seed=0, patch=False)
    config = model.config
    input_ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    assert logits.shape == (2, 16, config.vocab_size)
    assert torch.isfinite(logits).all()

"""Meta-native -> HF conversion: the mapping, checked against a Meta-style reference forward, and
``meta-to-hf`` on synthesized Meta checkpoints (MP=1/2/4, MHA/GQA, Llama-2/3.1/3.2 params.json).

The synthesizer here is written independently of ``meta_format`` (explicit per-head permutation and
per-tensor MP split as Meta's ColumnParallel/RowParallel/(Vocab)ParallelEmbedding do), and the
Meta-layout state it makes is checked against a re-implementation of Meta's reference model
(complex-number rotary on interleaved pairs, ``apply_scaling``), so the oracle is not the converter.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import stock_model
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from modelzoo.cli.convert import main
from modelzoo.models.llama import get_preset
from modelzoo.models.llama import meta_format as mf

# Meta params.json per family, as Meta writes them (Llama-2: no n_kv_heads, vocab_size -1).
PARAMS = {
    "llama2_tiny": {"dim": 64, "multiple_of": 16, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-05, "vocab_size": -1},
    "llama3_tiny": {"dim": 64, "ffn_dim_multiplier": 1.0, "multiple_of": 64, "n_heads": 4, "n_kv_heads": 2,
                    "n_layers": 2, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
                    "vocab_size": 1024},
    "llama3_2_tiny": {"dim": 64, "ffn_dim_multiplier": 1.0, "multiple_of": 64, "n_heads": 4, "n_kv_heads": 2,
                      "n_layers": 2, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
                      "vocab_size": 1024},
}
ROPE_FACTOR = {"llama2_tiny": None, "llama3_tiny": 8.0, "llama3_2_tiny": 32.0}
_HF_OF = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
          "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj",
          "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_SUB = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
        "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}


# ------------------------------------------------------------------------------------- synthesizer


def sharp_model(preset: str, seed: int = 0):
    """``stock_model`` with q/k scaled up 8x: random init leaves attention almost uniform, which would
    hide rotary mistakes (a wrong rope factor moves logits by ~1e-6); sharpened, it moves them ~1e-4."""
    model = stock_model(preset, seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


def meta_state(model) -> dict[str, torch.Tensor]:
    """Meta-layout single-rank state of an HF model: q/k rows back to interleaved pairs per head."""
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    sd = model.state_dict()

    def interleave(w, heads):  # HF row (h, half, j) -> Meta row (h, j, half)
        return w.reshape(heads, 2, hd // 2, -1).transpose(1, 2).reshape(w.shape).clone()

    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"].clone()}
    for i in range(cfg.num_hidden_layers):
        for short, hf in _HF_OF.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if short == "wq":
                w = interleave(w, cfg.num_attention_heads)
            elif short == "wk":
                w = interleave(w, cfg.num_key_value_heads)
            key = f"layers.{i}.{_SUB[short]}.{short}.weight" if short in _SUB else f"layers.{i}.{short}.weight"
            out[key] = w.clone()
    out["norm.weight"] = sd["model.norm.weight"].clone()
    out["output.weight"] = sd["lm_head.weight"].clone()  # = the embedding when tied (Meta has no tying)
    return out


def split_mp(state: dict[str, torch.Tensor], n_mp: int, n_kv: int, head_dim: int, llama2: bool):
    """Split a Meta state into ``n_mp`` rank states as Meta's parallel layers do."""
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(n_mp)]
    for name, tensor in state.items():
        short = name.split(".")[-2]
        if name == "tok_embeddings.weight":
            dim = 1 if llama2 else 0          # ParallelEmbedding vs VocabParallelEmbedding
        elif short in ("wq", "wk", "wv", "w1", "w3", "output"):
            dim = 0                           # ColumnParallelLinear
        elif short in ("wo", "w2"):
            dim = 1                           # RowParallelLinear
        else:
            dim = None                        # norms, rope.freqs: every rank
        for rank in range(n_mp):
            if dim is None:
                piece = tensor
            elif short in ("wk", "wv") and n_mp > n_kv:  # each KV head duplicated on n_mp/n_kv ranks
                head = rank // (n_mp // n_kv)
                piece = tensor[head * head_dim:(head + 1) * head_dim]
            else:
                piece = tensor.chunk(n_mp, dim=dim)[rank]
            ranks[rank][name] = piece.clone()
    return ranks


def write_meta_dir(path: Path, preset: str, n_mp: int = 1, dtype=torch.float32, seed: int = 0,
                   drop_output: bool = False, tokenizer: Path | None = None):
    """A Meta-layout checkpoint dir of ``stock_model(preset)``; returns the stock model (the reference)."""
    model = sharp_model(preset, seed).to(dtype)
    cfg = model.config
    state = meta_state(model)
    if preset == "llama2_tiny":
        hd = cfg.hidden_size // cfg.num_attention_heads
        state["rope.freqs"] = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))  # Llama-2 files carry it
    if drop_output:
        del state["output.weight"]
    path.mkdir(parents=True)
    for rank, rank_state in enumerate(split_mp(state, n_mp, cfg.num_key_value_heads,
                                               cfg.hidden_size // cfg.num_attention_heads, preset == "llama2_tiny")):
        torch.save(rank_state, path / f"consolidated.{rank:02d}.pth")
    (path / "params.json").write_text(json.dumps(PARAMS[preset]))
    if tokenizer is not None:
        (path / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return model


# ------------------------------------------------------------------ Meta reference forward (oracle)


def _apply_scaling(freqs, factor, low=1.0, high=4.0, old_context=8192):
    low_wavelen, high_wavelen = old_context / low, old_context / high
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(freq)
        elif wavelen > low_wavelen:
            out.append(freq / factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return torch.tensor(out, dtype=freqs.dtype)


def meta_forward(state, params, tokens, start_pos, rope_factor):
    """Logits ``[L, vocab]`` of Meta's reference Llama (no KV cache) for one sequence at ``start_pos``."""
    p = {"n_kv_heads": None, "rope_theta": 10000.0, "use_scaled_rope": False, **params}
    dim, n_heads = p["dim"], p["n_heads"]
    n_kv, hd, eps = p["n_kv_heads"] or n_heads, dim // n_heads, p["norm_eps"]
    length = tokens.shape[0]
    freqs = 1.0 / (p["rope_theta"] ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    if p["use_scaled_rope"]:
        freqs = _apply_scaling(freqs, rope_factor)
    angles = torch.outer(torch.arange(start_pos + length, dtype=torch.float32), freqs)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)[start_pos:]

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rotary(x):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[:, None, :]).flatten(2)

    h = state["tok_embeddings.weight"][tokens]
    mask = torch.full((length, length), float("-inf")).triu(1)
    for i in range(p["n_layers"]):
        def w(name, i=i):
            return state[f"layers.{i}.{name}.weight"]
        x = norm(h, w("attention_norm"))
        q = rotary((x @ w("attention.wq").T).view(length, n_heads, hd))
        k = rotary((x @ w("attention.wk").T).view(length, n_kv, hd)).repeat_interleave(n_heads // n_kv, dim=1)
        v = (x @ w("attention.wv").T).view(length, n_kv, hd).repeat_interleave(n_heads // n_kv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + mask
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(length, dim)
        h = h + attn @ w("attention.wo").T
        x = norm(h, w("ffn_norm"))
        h = h + (torch.nn.functional.silu(x @ w("feed_forward.w1").T) * (x @ w("feed_forward.w3").T)) @ \
            w("feed_forward.w2").T
    return norm(h, state["norm.weight"]) @ state["output.weight"].T


def hf_logits(model, tokens, start):
    with torch.no_grad():
        return model(tokens[None], position_ids=torch.arange(start, start + tokens.shape[0])[None]).logits[0]


STARTS = [0, 8184, 12000]  # 8184..8199 crosses llama3's original 8192 context


# ---------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("preset", ["llama2_tiny", "llama3_tiny", "llama3_2_tiny"])
def test_synthesized_meta_state_is_the_same_model(preset):
    """The oracle for everything below: Meta's forward on the synthesized state equals stock HF."""
    model = sharp_model(preset)
    state = meta_state(model)
    tokens = torch.randint(0, 1024, (16,), generator=torch.Generator().manual_seed(0))
    for start in STARTS if preset != "llama2_tiny" else [0, 1000]:
        want = hf_logits(model, tokens, start)
        assert_close(meta_forward(state, PARAMS[preset], tokens, start, ROPE_FACTOR[preset]), want, atol=1e-5, rtol=0)
    if preset == "llama3_2_tiny":  # the check can see the rope factor (32 for 3.2, not 3.1's 8)
        assert (meta_forward(state, PARAMS[preset], tokens, 0, 8.0) - want).abs().max() > 1e-5


@pytest.mark.parametrize(("preset", "n_mp"), [("llama2_tiny", 2), ("llama3_tiny", 1), ("llama3_2_tiny", 2)])
def test_hf_to_meta_writes_what_the_independent_synthesizer_writes(tmp_path, preset, n_mp):
    """hf-to-meta's files hold, rank by rank and bit for bit, what this file's synthesizer (the layout
    the Meta forward above runs) gives; params.json reads back to the model's config."""
    model = stock_model(preset)
    model.save_pretrained(tmp_path / "hf")
    split = "dim" if preset == "llama2_tiny" else "vocab"
    assert main(["hf-to-meta", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "meta"), "--quiet",
                 "--model-parallel", str(n_mp), "--embedding-split", split]) == 0
    cfg = model.config
    want = split_mp(meta_state(model), n_mp, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                    split == "dim")
    for rank, rank_state in enumerate(want):
        got = torch.load(tmp_path / "meta" / f"consolidated.{rank:02d}.pth", weights_only=True)
        assert got.keys() == rank_state.keys()
        assert all(torch.equal(got[name], rank_state[name]) for name in rank_state), rank
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    back = mf.config_to_hf(params, vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_word_embeddings,
                           preset=get_preset(preset))
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "rms_norm_eps", "max_position_embeddings", "rope_parameters"):
        assert getattr(back, key) == getattr(cfg, key), key


def test_params_json_mapping_matches_presets():
    """params.json <-> LlamaConfig for the published shapes (FFN rule, GQA, llama3 rope, tying)."""
    for preset in ("llama2_7b", "llama2_70b", "llama3_8b", "llama3_1_8b", "llama3_1_405b", "llama3_2_1b", "llama3_2_3b"):
        config = get_preset(preset)
        params = mf.config_from_hf(config)
        back = mf.config_to_hf(params, vocab_size=config.vocab_size, tie_word_embeddings=config.tie_word_embeddings)
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "rope_parameters",
                    "bos_token_id", "eos_token_id"):
            assert getattr(back, key) == getattr(config, key), (preset, key)
    assert mf.config_from_hf(get_preset("llama3_1_8b"))["ffn_dim_multiplier"] == 1.3
    assert mf.config_from_hf(get_preset("llama3_2_1b"))["ffn_dim_multiplier"] == 1.5
    assert "use_scaled_rope" not in mf.config_from_hf(get_preset("llama2_7b"))
    odd = get_preset("llama3_tiny", rope_scaling={**get_preset("llama3_tiny").rope_parameters, "factor": 16.0})
    params = mf.config_from_hf(odd)
    assert params["rope_scaling_factor"] == 16.0  # not the family default: written explicitly
    back = mf.config_to_hf(params, vocab_size=1024, tie_word_embeddings=False)
    assert back.rope_parameters["factor"] == 16.0


def _convert(tmp_path, src, *extra):
    out = tmp_path / "hf"
    assert main(["meta-to-hf", "--input", str(src), "--output", str(out), "--quiet", *extra]) == 0
    return out


@pytest.mark.parametrize(("preset", "n_mp"), [
    ("llama2_tiny", 1), ("llama2_tiny", 2),      # MHA, embedding split along dim, rope.freqs ignored
    ("llama3_tiny", 1), ("llama3_tiny", 2),      # GQA, vocab-parallel embedding, use_scaled_rope x8
    ("llama3_tiny", 4),                          # 2 KV heads over 4 files: each duplicated, read once
    ("llama3_2_tiny", 2),                        # tied: output.weight equals the embedding
])
def test_meta_to_hf_matches_reference(tmp_path, preset, n_mp):
    reference = write_meta_dir(tmp_path / "meta", preset, n_mp)
    out = _convert(tmp_path, tmp_path / "meta", "--model-size", preset)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # transformers, unchanged
    cfg, ref_cfg = loaded.config, reference.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "rms_norm_eps", "rope_parameters",
                "max_position_embeddings", "head_dim"):
        assert getattr(cfg, key) == getattr(ref_cfg, key), key
    ref_state = reference.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, ref_state[name]), name
    tokens = torch.randint(0, 1024, (16,), generator=torch.Generator().manual_seed(1))
    for start in STARTS if preset != "llama2_tiny" else [0, 1000]:
        assert_close(hf_logits(loaded, tokens, start), hf_logits(reference, tokens, start), atol=1e-5, rtol=0)


def test_meta_to_hf_without_model_size_reads_params_only(tmp_path):
    """No preset: every field from params.json; Llama-3.2 tying from a missing output.weight, factor 32."""
    write_meta_dir(tmp_path / "meta", "llama3_2_tiny", 1, drop_output=True)
    out = _convert(tmp_path, tmp_path / "meta")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["rope_parameters"]["rope_type"] == "llama3" and config["rope_parameters"]["factor"] == 32.0
    assert config["max_position_embeddings"] == 131072 and config["intermediate_size"] == 192
    assert config["num_key_value_heads"] == 2 and config["rope_parameters"]["rope_theta"] == 500000.0
    assert "lm_head.weight" not in load_file(out / "model.safetensors")  # tied: stored once


def test_bf16_stays_bf16_and_large_checkpoints_get_an_index(tmp_path):
    reference = write_meta_dir(tmp_path / "meta", "llama3_tiny", 2, dtype=torch.bfloat16)
    out = _convert(tmp_path, tmp_path / "meta", "--model-size", "llama3_tiny", "--max-shard-size", "100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    ref = reference.state_dict()
    assert all(torch.equal(t, ref[n]) for n, t in loaded.state_dict().items())


def test_column_block_refuses_pieces_that_do_not_cover_the_block():
    from modelzoo.checkpoint.errors import CheckpointError
    from modelzoo.convert.view import column_block

    a, b = torch.arange(6.0).reshape(2, 3), torch.arange(6.0, 10.0).reshape(2, 2)
    got = column_block(2, 4, torch.float32, [(lambda: a, 1, 2), (lambda: b, 0, 2)])
    assert torch.equal(got, torch.cat([a[:, 1:], b], dim=1))
    with pytest.raises(CheckpointError, match="cover 3 of 4 columns"):
        column_block(2, 4, torch.float32, [(lambda: a, 0, 3)])

"""Meta-native Llama checkpoints <-> Hugging Face ``LlamaForCausalLM``: the one mapping.

Meta layout (the ``llama`` / ``llama-models`` reference code): a directory with ``params.json`` and
``consolidated.00.pth`` ... ``consolidated.{K-1}.pth``, one ``torch.save``'d state dict per
model-parallel (MP) rank, plus ``tokenizer.model``. This module holds everything about that format
that is not file I/O (``modelzoo.convert.meta`` streams the files):

- tensor names (:data:`LAYER_NAMES`, :data:`GLOBAL_NAMES`, :func:`hf_name`);
- the rotary permutation: Meta rotates interleaved pairs ``(x0, x1), (x2, x3), ...`` of every head,
  HF rotates halves ``(x0, x_{d/2}), ...``; q and k rows are permuted within each head
  (:func:`permute_to_hf` / :func:`permute_to_meta`; k uses the KV head count under GQA);
- how MP ranks split each tensor (:data:`MP_SPLIT`): column-parallel (q/k/v/w1/w3/output) along the
  output dim 0, row-parallel (wo/w2) along the input dim 1, norms replicated, the embedding along
  dim 1 in Llama-2 (``ParallelEmbedding``) and along the vocabulary, dim 0, in Llama-3
  (``VocabParallelEmbedding``);
- ``params.json`` <-> ``LlamaConfig`` (:func:`config_to_hf` / :func:`config_from_hf`), including the
  FFN width rule and llama3 rope scaling.

Fields Meta's ``params.json`` does not hold are filled as documented in :func:`config_to_hf`.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import LlamaConfig

from modelzoo.checkpoint.hf_weights import CheckpointError

#: Meta name inside ``layers.{i}.`` -> HF name inside ``model.layers.{i}.``
LAYER_NAMES: dict[str, str] = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
GLOBAL_NAMES: dict[str, str] = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
#: Tensors some Meta checkpoints carry that the model recomputes (Llama-2's rotary frequencies).
IGNORED_META_NAMES = ("rope.freqs",)

EMBEDDING = "embedding"  # split dim read from the shapes: 1 in Llama-2, 0 (vocab) in Llama-3
#: Meta suffix -> the dim along which model-parallel ranks split it (None: replicated on every rank).
MP_SPLIT: dict[str, int | str | None] = {
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
    "norm.weight": None,
    "output.weight": 0,
    "tok_embeddings.weight": EMBEDDING,
}
#: Official (multiple_of, ffn_dim_multiplier) by (dim, FFN width), so hf-to-meta writes Meta's own values.
KNOWN_FFN_PARAMS: dict[tuple[int, int], tuple[int, float | None]] = {
    (4096, 11008): (256, None),     # Llama-2 7B
    (5120, 13824): (256, None),     # Llama-2 13B
    (8192, 28672): (4096, 1.3),     # Llama-2 70B, Llama-3/3.1 70B
    (4096, 14336): (1024, 1.3),     # Llama-3/3.1 8B
    (16384, 53248): (4096, 1.2),    # Llama-3.1 405B
    (2048, 8192): (256, 1.5),       # Llama-3.2 1B
    (3072, 8192): (256, 1.0),       # Llama-3.2 3B
}
LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


class MetaFormatError(CheckpointError):
    """A Meta checkpoint or ``params.json`` that cannot be converted; the message names file and fix."""


# ---------------------------------------------------------------------------------------------- names


def hf_name(meta: str) -> str:
    """``layers.3.attention.wq.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    if meta in GLOBAL_NAMES:
        return GLOBAL_NAMES[meta]
    match = _LAYER_RE.match(meta)
    if match and match.group(2) in LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{LAYER_NAMES[match.group(2)]}"
    raise KeyError(f"'{meta}' is not a Meta Llama tensor name")


def suffix(meta: str) -> str:
    """The layer-independent part of a Meta name (``layers.3.attention.wq.weight`` -> ``attention.wq.weight``)."""
    match = _LAYER_RE.match(meta)
    return match.group(2) if match else meta


def mp_split_dim(meta: str) -> int | str | None:
    return MP_SPLIT[suffix(meta)]


def rotary_heads(meta: str, config: LlamaConfig) -> int | None:
    """How many heads a q/k weight holds (the permutation works per head); None for other tensors."""
    end = suffix(meta)
    if end == "attention.wq.weight":
        return config.num_attention_heads
    if end == "attention.wk.weight":
        return config.num_key_value_heads
    return None


def meta_names(n_layers: int) -> list[str]:
    """Every Meta tensor name, in the reference model's ``state_dict`` order."""
    names = ["tok_embeddings.weight"]
    for i in range(n_layers):
        names += [f"layers.{i}.{end}" for end in LAYER_NAMES]
    return names + ["norm.weight", "output.weight"]


# -------------------------------------------------------------------------------- rotary permutation


def permute_to_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta q/k rows -> HF rows: ``[n_heads * head_dim, in]``, per head interleaved pairs -> halves.

    Works on any whole-head slice too (an MP shard with its own head count).
    """
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_to_meta(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`permute_to_hf`."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# ------------------------------------------------------------------------------------------- config


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU width of Meta's ``FeedForward``: 2/3 of 4*dim, times the multiplier, rounded up."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_params(dim: int, hidden: int) -> tuple[int, float | None]:
    """``(multiple_of, ffn_dim_multiplier)`` that reproduce FFN width ``hidden`` (Meta's own when known)."""
    known = KNOWN_FFN_PARAMS.get((dim, hidden))
    if known and ffn_hidden_dim(dim, *known) == hidden:
        return known
    for multiplier in (None, 1.0, 1.3, 1.5, 1.2):
        for multiple_of in (4096, 2048, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1):
            if ffn_hidden_dim(dim, multiple_of, multiplier) == hidden:
                return multiple_of, multiplier
    base = int(2 * (4 * dim) / 3)
    for step in range(64):  # a free multiplier; nudge it until int(m * base) lands exactly
        multiplier = hidden / base + step * 1e-12
        if ffn_hidden_dim(dim, 1, multiplier) == hidden:
            return 1, multiplier
    raise MetaFormatError(f"intermediate_size={hidden} cannot be written as Meta's FFN rule for dim={dim}")


def default_rope_factor(tie_word_embeddings: bool) -> float:
    """Meta's ``use_scaled_rope`` scale factor: 32 for Llama-3.2 1B/3B (the tied models), else 8 (3.1)."""
    return 32.0 if tie_word_embeddings else 8.0


def default_max_positions(rope_theta: float, use_scaled_rope: bool) -> int:
    """Context length by family, for ``params.json`` files that do not give ``max_seq_len``."""
    if use_scaled_rope:
        return 131072      # Llama-3.1 / 3.2
    if rope_theta == 500000:
        return 8192        # Llama-3
    if rope_theta == 1000000:
        return 16384       # Code Llama
    return 4096            # Llama-2


_PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "dim": (int,), "n_layers": (int,), "n_heads": (int,), "n_kv_heads": (int, type(None)),
    "vocab_size": (int,), "multiple_of": (int,), "ffn_dim_multiplier": (int, float, type(None)),
    "norm_eps": (int, float), "rope_theta": (int, float), "use_scaled_rope": (bool,),
    "max_seq_len": (int,), "rope_scaling_factor": (int, float, type(None)),
    "rope_high_freq_factor": (int, float, type(None)),
}
REQUIRED_PARAMS = ("dim", "n_layers", "n_heads")


def read_params(params: dict[str, Any], source: str = "params.json") -> dict[str, Any]:
    """Validate a ``params.json`` dict and fill Meta's defaults. Raises :class:`MetaFormatError`."""
    missing = [key for key in REQUIRED_PARAMS if key not in params]
    if missing:
        raise MetaFormatError(f"{source}: required field(s) {', '.join(missing)} missing; "
                              "copy params.json from the original Meta download")
    for key, value in params.items():
        types = _PARAM_TYPES.get(key)
        if types and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
            raise MetaFormatError(f"{source}: field '{key}' is {value!r}; expected "
                                  f"{' or '.join('null' if t is type(None) else t.__name__ for t in types)}")
    p = {"n_kv_heads": None, "vocab_size": -1, "multiple_of": 256, "ffn_dim_multiplier": None, "norm_eps": 1e-5,
         "rope_theta": 10000.0, "use_scaled_rope": False, **params}
    p["n_kv_heads"] = p["n_kv_heads"] or p["n_heads"]
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of"):
        if p[key] < 1:
            raise MetaFormatError(f"{source}: {key}={p[key]} must be positive")
    if p["dim"] % p["n_heads"] or (p["dim"] // p["n_heads"]) % 2:
        raise MetaFormatError(f"{source}: dim={p['dim']} is not n_heads={p['n_heads']} times an even head size; "
                              "the fields contradict each other")
    if p["n_heads"] % p["n_kv_heads"]:
        raise MetaFormatError(f"{source}: n_heads={p['n_heads']} is not a multiple of n_kv_heads={p['n_kv_heads']}; "
                              "the fields contradict each other")
    return p


def config_to_hf(params: dict[str, Any], *, vocab_size: int, tie_word_embeddings: bool,
                 preset: LlamaConfig | None = None, bos_token_id: int | None = None,
                 eos_token_id: int | list[int] | None = None, source: str = "params.json") -> LlamaConfig:
    """``params.json`` -> ``LlamaConfig``.

    ``vocab_size`` comes from the embedding (Llama-2's ``params.json`` says -1); a positive
    ``params['vocab_size']`` must agree with it. Fields Meta does not store come from ``preset`` when
    given (its architecture must agree), else: context length from ``max_seq_len`` or the family
    (:func:`default_max_positions`); the llama3 rope factor from ``rope_scaling_factor`` or
    :func:`default_rope_factor` (low/high frequency factors 1/4, original context 8192, as Meta's
    ``apply_scaling``); bos/eos as given (from the tokenizer) or the family's.
    """
    p = read_params(params, source)
    if p["vocab_size"] > 0 and p["vocab_size"] != vocab_size:
        raise MetaFormatError(f"{source}: vocab_size={p['vocab_size']} but the embedding has {vocab_size} rows; "
                              "fix vocab_size in params.json (or use -1)")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(p["rope_theta"])}
    if p["use_scaled_rope"]:
        factor = p.get("rope_scaling_factor") or default_rope_factor(tie_word_embeddings)
        rope = {"rope_type": "llama3", "factor": float(factor), **LLAMA3_ROPE_DEFAULTS,
                "rope_theta": float(p["rope_theta"])}
        if p.get("rope_high_freq_factor"):
            rope["high_freq_factor"] = float(p["rope_high_freq_factor"])
    llama3 = vocab_size >= 128000
    values: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": p["dim"],
        "intermediate_size": ffn_hidden_dim(p["dim"], p["multiple_of"], p["ffn_dim_multiplier"]),
        "num_hidden_layers": p["n_layers"],
        "num_attention_heads": p["n_heads"],
        "num_key_value_heads": p["n_kv_heads"],
        "head_dim": p["dim"] // p["n_heads"],
        "rms_norm_eps": float(p["norm_eps"]),
        "rope_parameters": rope,
        "max_position_embeddings": p.get("max_seq_len") or default_max_positions(p["rope_theta"], p["use_scaled_rope"]),
        "tie_word_embeddings": tie_word_embeddings,
        "hidden_act": "silu",
        "bos_token_id": 128000 if llama3 else 1,
        "eos_token_id": 128001 if llama3 else 2,
    }
    if preset is not None:
        _check_against_preset(values, preset, source)
        values["max_position_embeddings"] = preset.max_position_embeddings
        values["bos_token_id"], values["eos_token_id"] = preset.bos_token_id, preset.eos_token_id
        if p["use_scaled_rope"] and not p.get("rope_scaling_factor"):
            values["rope_parameters"] = dict(preset.rope_parameters)
    if bos_token_id is not None:
        values["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        values["eos_token_id"] = eos_token_id
    return LlamaConfig(**values)


_ARCH_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings")


def _check_against_preset(values: dict[str, Any], preset: LlamaConfig, source: str) -> None:
    for key in _ARCH_FIELDS:
        if values[key] != getattr(preset, key):
            raise MetaFormatError(
                f"{source}: gives {key}={values[key]} but --model-size {preset.name_or_path or 'preset'} has "
                f"{getattr(preset, key)}; the checkpoint is not that model (drop --model-size or pick the right one)")
    scaled = values["rope_parameters"]["rope_type"] == "llama3"
    if scaled != (preset.rope_parameters.get("rope_type") == "llama3"):
        raise MetaFormatError(f"{source}: use_scaled_rope={scaled} contradicts --model-size "
                              f"{preset.name_or_path or 'preset'}")


def rope_of(config: LlamaConfig) -> dict[str, Any]:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope.setdefault("rope_type", "default")
    return rope


def config_from_hf(config: LlamaConfig) -> dict[str, Any]:
    """``LlamaConfig`` -> ``params.json`` dict; raises for what Meta's format cannot express."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    problems = []
    if head_dim * heads != config.hidden_size:
        problems.append(f"head_dim={head_dim} x num_attention_heads={heads} != hidden_size={config.hidden_size}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("attention_bias/mlp_bias")
    if config.hidden_act != "silu":
        problems.append(f"hidden_act={config.hidden_act}")
    rope = rope_of(config)
    if rope["rope_type"] not in ("default", "llama3"):
        problems.append(f"rope_type={rope['rope_type']}")
    if rope["rope_type"] == "llama3":
        extra = {k: rope.get(k) for k, v in LLAMA3_ROPE_DEFAULTS.items() if k != "high_freq_factor" and rope.get(k) != v}
        if extra:
            problems.append(f"llama3 rope {extra}")
    if problems:
        raise MetaFormatError(f"config.json: {', '.join(problems)} cannot be written in Meta's params.json format")
    multiple_of, multiplier = ffn_params(config.hidden_size, config.intermediate_size)
    params: dict[str, Any] = {
        "dim": config.hidden_size,
        "n_layers": config.num_hidden_layers,
        "n_heads": heads,
        "n_kv_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
        "multiple_of": multiple_of,
    }
    if multiplier is not None:
        params["ffn_dim_multiplier"] = multiplier
    params["norm_eps"] = config.rms_norm_eps
    if rope["rope_theta"] != 10000.0:  # Llama-2's reference ModelArgs has no rope_theta field
        params["rope_theta"] = rope["rope_theta"]
    if rope["rope_type"] == "llama3":
        params["use_scaled_rope"] = True
        if rope["factor"] != default_rope_factor(bool(config.tie_word_embeddings)):
            params["rope_scaling_factor"] = rope["factor"]
        if rope.get("high_freq_factor", 4.0) != 4.0:
            params["rope_high_freq_factor"] = rope["high_freq_factor"]
    return params


def embedding_split_dim(config: LlamaConfig) -> int:
    """MP split of ``tok_embeddings`` when writing: vocab (0) for Llama-3 (rope_theta >= 5e5), dim (1) before."""
    return 0 if rope_of(config)["rope_theta"] >= 500000 else 1


# ------------------------------------------------------------------------------------- whole states


def head_dim_of(config: LlamaConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

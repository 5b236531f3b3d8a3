"""The tensor-parallel divisibility rule: which ``n_chips`` can split a Llama model.

Torch-free, so the config check (``checks.py``) and every CLI validating a config stay fast;
:mod:`modelzoo.models.llama.parallelize` re-exports it next to the TP plan it guards.
"""

from __future__ import annotations

from modelzoo.config import ConfigError


def _tp_problem(heads: int, kv_heads: int, n_chips: int, intermediate_size: int | None) -> str | None:
    """Why ``n_chips``-way TP cannot split this model (None: it can). The one statement of the rule."""
    if heads % n_chips:
        return f"does not divide num_attention_heads={heads}"
    if intermediate_size is not None and intermediate_size % n_chips:
        return f"does not divide intermediate_size={intermediate_size} (the MLP would shard unevenly)"
    if kv_heads % n_chips and n_chips % kv_heads:
        return f"neither divides nor is a multiple of num_key_value_heads={kv_heads}"
    return None


def valid_n_chips(heads: int, kv_heads: int, limit: int = 128, intermediate_size: int | None = None) -> list[int]:
    """Every tensor-parallel degree up to ``limit`` that :func:`check_tensor_parallel` accepts."""
    return [n for n in range(1, limit + 1) if _tp_problem(heads, kv_heads, n, intermediate_size) is None]


def check_tensor_parallel(num_attention_heads: int, num_key_value_heads: int, n_chips: int,
                          model_name: str, intermediate_size: int | None = None) -> str:
    """How ``n_chips``-way tensor parallelism splits attention: ``"shard"`` or ``"replicate"``.

    Query heads are always sharded, so ``num_attention_heads % n_chips == 0`` is required; the MLP
    is sharded along its width, so ``intermediate_size % n_chips == 0`` too (when given: uneven
    shards are refused, not padded). KV heads are sharded when ``num_key_value_heads % n_chips ==
    0`` (``"shard"``), else, when ``n_chips % num_key_value_heads == 0``, each KV head is replicated
    on ``n_chips / num_key_value_heads`` chips (``"replicate"``). Anything else raises
    :class:`~modelzoo.config.ConfigError` (key ``samba_compile.n_chips``) listing the valid values.
    """
    if n_chips < 1:
        raise ConfigError(f"samba_compile.n_chips must be >= 1, got {n_chips}", key="samba_compile.n_chips")
    problem = _tp_problem(num_attention_heads, num_key_value_heads, n_chips, intermediate_size)
    if problem is not None:
        valid = ", ".join(map(str, valid_n_chips(num_attention_heads, num_key_value_heads,
                                                 intermediate_size=intermediate_size)))
        raise ConfigError(f"samba_compile.n_chips={n_chips} {problem} of model '{model_name}'; valid n_chips: {valid}",
                          key="samba_compile.n_chips")
    return "shard" if num_key_value_heads % n_chips == 0 else "replicate"

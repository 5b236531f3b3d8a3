"""Static-shape Llama forward for generation: prompt prefill and one-token decode over a static KV cache.

:class:`LlamaDecoder` runs the weights of a ``transformers.LlamaForCausalLM`` (its modules, not
copies) with the same operations as the HF forward (HF's RMSNorm modules, rotary module and
``apply_rotary_pos_emb``), but:

- keys/values go to a preallocated :class:`StaticKVCache` (``[B, H_kv, L, D]`` per layer), one row
  per request slot. Each row holds its sequence from slot 0: the token at position ``p`` is written
  at slot ``p`` (an indexed write with per-row position tensors, so a step has the same shapes whatever
  the rows' lengths), and a query at position ``p`` sees slots ``0 .. p``. Rows are independent: a
  row's numbers never depend on what the other rows hold;
- the last slot (``L - 1``) is scratch: padding tokens (a compiled prefill chunk filled up to its
  bucket, an idle row's decode input) are written there and no real query ever sees it, because
  real positions stay below ``L - 1``;
- only the last position's logits are computed;
- linears go through :mod:`modelzoo.generation.kernels` (see there for why).

Attention reads only the slots in use: the caller passes ``keys``, the slot indices ``0 .. n-1``
(``n`` past the last position any row of the step holds). Compiled, ``n`` is a dynamic dimension
(the engine marks it), so one graph per step shape still serves every length, and a decode step
at position ``p`` reads ``p + 1`` slots of keys/values rather than the whole cache (at batch 8 with
a 512-slot cache and sequences of 256, reading the whole cache made the llama_60m step 40% slower).
A compiled single-token step writes attention out explicitly so inductor fuses it with the rest of
the step; otherwise it is ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .kernels import apply_linear, realized


@dataclass
class StaticKVCache:
    """Preallocated keys and values: ``k[l]``, ``v[l]`` are ``[B, H_kv, L, D]`` for layer ``l``.

    Slot ``L - 1`` is scratch (padding writes go there); :attr:`max_length` is the number of real
    positions, ``L - 1``.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    _index: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def keys(self, length: int, dynamic: bool = False) -> torch.Tensor:
        """The slots a step attends to, ``arange(max(length, 2))`` (a view of one cached range).

        ``dynamic``: marks the length as a dynamic dimension for ``torch.compile``, so that one graph
        serves every length (at least 2: the compiler specializes sizes 0 and 1; the extra slot is
        masked out).
        """
        if self._index is None:
            self._index = torch.arange(self.slots, device=self.k[0].device)
        keys = self._index[:max(length, 2)]
        if dynamic:
            torch._dynamo.maybe_mark_dynamic(keys, 0)
        return keys

    @property
    def slots(self) -> int:
        return self.k[0].shape[2]

    @property
    def max_length(self) -> int:
        return self.slots - 1

    @property
    def scratch(self) -> int:
        return self.slots - 1

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def _local_out_features(linear: nn.Module) -> int:
    """Output features this process holds (a tensor-parallel shard holds a slice)."""
    weight = linear.weight
    if hasattr(weight, "to_local"):
        return weight.to_local().shape[0]
    return weight.shape[0]


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
               explicit: bool) -> torch.Tensor:
    """Attention of ``q`` ``[B, H, S, D]`` over ``k``/``v`` ``[B, H_kv, L, D]`` (GQA: H = r * H_kv).

    ``explicit``: written out (scores, masked softmax, weighted sum) for compiled single-token
    steps, where inductor fuses it into two small reductions; the CPU SDPA kernel costs about 1 ms
    per call at batch 8 for this much work. Otherwise ``F.scaled_dot_product_attention``.
    """
    if not explicit:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    batch, heads, seq, dim = q.shape
    kv_heads = k.shape[1]
    q = realized(q.reshape(batch, kv_heads, heads // kv_heads * seq, dim))          # [B, H_kv, r*S, D]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale                          # [B, H_kv, r*S, L]
    probs = realized(scores.masked_fill(~mask, float("-inf")).softmax(dim=-1))
    return torch.matmul(probs, v).reshape(batch, heads, seq, dim)


class LlamaDecoder(nn.Module):
    """Prefill + decode for a ``LlamaForCausalLM`` (optionally tensor-parallel or int8).

    ``forward(tokens [B, S], positions [B, S], rows [B] | None, cache, keys [n]) -> logits [B, V]``
    (last position): writes the keys/values of ``tokens`` at their ``positions`` in cache ``rows``
    (None: rows ``0..B-1``, the whole cache) and attends to slots ``keys`` = ``0 .. n-1``.
    """

    def __init__(self, model: LlamaForCausalLM) -> None:
        super().__init__()
        self.model = model
        config = model.config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        attn = model.model.layers[0].self_attn
        self.kv_heads = _local_out_features(attn.k_proj) // self.head_dim
        self.compiled = False

    @property
    def device(self) -> torch.device:
        return self.model.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.norm.weight.dtype

    def new_cache(self, batch_size: int, max_length: int) -> StaticKVCache:
        """A zeroed cache for ``batch_size`` rows of ``max_length`` positions (plus the scratch slot)."""
        shape = (batch_size, self.kv_heads, max_length + 1, self.head_dim)
        layers = len(self.model.model.layers)
        make = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(2 * layers)]
        return StaticKVCache(k=make[:layers], v=make[layers:])

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None,
                cache_k: list[torch.Tensor], cache_v: list[torch.Tensor], keys: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` of the last of ``tokens`` ``[B, S]`` at ``positions`` ``[B, S]`` of cache
        ``rows`` ``[B]`` (None: all rows, ``B`` = the cache's batch), attending to the cache slots
        ``keys`` (``arange(n)``, :meth:`StaticKVCache.keys`)."""
        compiled = self.compiled
        inner = self.model.model
        batch, seq = tokens.shape
        kv_len = keys.shape[0]
        index = rows if rows is not None else torch.arange(batch, device=tokens.device)
        mask = (keys[None, None, :] <= positions[:, :, None])[:, None]                # [B, 1, S, kv_len]

        hidden = inner.embed_tokens(tokens)
        cos, sin = inner.rotary_emb(hidden, positions)
        for number, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            residual = hidden
            x = layer.input_layernorm(hidden)
            q = apply_linear(attn.q_proj, x, compiled).view(batch, seq, -1, self.head_dim).transpose(1, 2)
            k = apply_linear(attn.k_proj, x, compiled).view(batch, seq, -1, self.head_dim).transpose(1, 2)
            v = apply_linear(attn.v_proj, x, compiled).view(batch, seq, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            layer_k, layer_v = cache_k[number], cache_v[number]
            layer_k[index[:, None], :, positions] = k.transpose(1, 2)  # [B, S, H_kv, D] at (row, position)
            layer_v[index[:, None], :, positions] = v.transpose(1, 2)
            if rows is not None:  # a few rows (prefill): gather them
                layer_k, layer_v = layer_k[rows], layer_v[rows]
            out = _attention(q, layer_k[:, :, :kv_len], layer_v[:, :, :kv_len], mask, attn.scaling,
                             compiled and seq == 1)
            out = out.transpose(1, 2).reshape(batch, seq, -1)
            hidden = residual + apply_linear(attn.o_proj, out, compiled)
            residual = hidden
            x = layer.post_attention_layernorm(hidden)
            gate = apply_linear(mlp.gate_proj, x, compiled)
            up = apply_linear(mlp.up_proj, x, compiled)
            hidden = residual + apply_linear(mlp.down_proj, mlp.act_fn(gate) * up, compiled)
        hidden = inner.norm(hidden[:, -1:])
        return apply_linear(self.model.lm_head, hidden, compiled)[:, 0]

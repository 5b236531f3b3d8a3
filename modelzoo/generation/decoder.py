"""Static-shape Llama forward for generation: prompt prefill and one-token decode over a static KV cache.

:class:`LlamaDecoder` runs the weights of a ``transformers.LlamaForCausalLM`` (its modules, not
copies) with the same operations as the HF forward (HF's RMSNorm modules, rotary module and
``apply_rotary_pos_emb``), but:

- keys/values go to a preallocated :class:`StaticKVCache` (``[B, H_kv, L, D]`` per layer): slot
  writes are ``index_copy_`` with a slot tensor, so a decode step has the same shapes at every step;
- prompts of different lengths are left-padded: row ``b`` holds its prompt at slots
  ``[pad[b], P)`` and generated tokens from ``P`` on; position = slot - pad[b]; the boolean mask
  ``[B, 1, S, kv_len]`` lets a query at slot ``s`` see slots ``pad[b] .. s`` (a pad query sees only
  itself, so no row is fully masked);
- only the last position's logits are computed;
- linears go through :mod:`modelzoo.generation.kernels` (see there for why).

Eager (``compiled=False``) attention reads the slots filled so far (``F.scaled_dot_product_attention``);
compiled, it reads all ``L`` slots (masked), so one decode graph serves every step, and a
single-token step writes attention out explicitly so inductor fuses it with the rest of the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .kernels import apply_linear, realized


@dataclass
class StaticKVCache:
    """Preallocated keys and values: ``k[l]``, ``v[l]`` are ``[B, H_kv, L, D]`` for layer ``l``.

    ``pad`` ``[B]`` (long): left-padding slots of each row; ``filled``: slots written so far (all rows
    advance together).
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    pad: torch.Tensor
    filled: int = 0

    @property
    def max_length(self) -> int:
        return self.k[0].shape[2]

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

    ``forward(tokens [B, S], slots [S], cache, kv_len) -> logits [B, V]`` (float, last position):
    writes the keys/values of ``tokens`` at cache ``slots`` and attends to slots ``< kv_len``.
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

    def new_cache(self, batch_size: int, max_length: int, pad: torch.Tensor) -> StaticKVCache:
        """A zeroed cache for ``batch_size`` rows of ``max_length`` slots; ``pad`` [B] left padding."""
        shape = (batch_size, self.kv_heads, max_length, self.head_dim)
        layers = len(self.model.model.layers)
        make = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(2 * layers)]
        return StaticKVCache(k=make[:layers], v=make[layers:], pad=pad.to(self.device))

    def forward(self, tokens: torch.Tensor, slots: torch.Tensor, cache_k: list[torch.Tensor],
                cache_v: list[torch.Tensor], pad: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Logits ``[B, V]`` of the last of ``tokens`` ``[B, S]`` written at ``slots`` ``[S]``."""
        compiled = self.compiled
        inner = self.model.model
        batch, seq = tokens.shape
        positions = (slots[None, :] - pad[:, None]).clamp(min=0)                      # [B, S]
        keys = torch.arange(kv_len, device=tokens.device)
        visible = (keys[None, None, :] >= pad[:, None, None]) & (keys[None, None, :] <= slots[None, :, None])
        mask = (visible | (keys[None, :] == slots[:, None])[None])[:, None]            # [B, 1, S, kv_len]

        hidden = inner.embed_tokens(tokens)
        cos, sin = inner.rotary_emb(hidden, positions)
        for index, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            residual = hidden
            x = layer.input_layernorm(hidden)
            q = apply_linear(attn.q_proj, x, compiled).view(batch, seq, -1, self.head_dim).transpose(1, 2)
            k = apply_linear(attn.k_proj, x, compiled).view(batch, seq, -1, self.head_dim).transpose(1, 2)
            v = apply_linear(attn.v_proj, x, compiled).view(batch, seq, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            cache_k[index].index_copy_(2, slots, k)
            cache_v[index].index_copy_(2, slots, v)
            out = _attention(q, cache_k[index][:, :, :kv_len], cache_v[index][:, :, :kv_len], mask, attn.scaling,
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

"""Int8 weight-only quantization: exactness of the scheme, model-level error and size."""

from __future__ import annotations

import copy

import torch
from conftest import stock_model

from modelzoo.checkpoint.int8 import (
    Int8Linear,
    dequantize_state,
    dequantize_weight,
    quantize_model_,
    quantize_state,
    quantize_weight,
)


def test_quantize_weight_is_per_row_absmax():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    w[3] = 0
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (8,)
    assert q.abs().amax(dim=1)[[0, 1, 2, 4]].eq(127).all()  # the row's absmax maps to ±127
    assert torch.equal(dequantize_weight(q, scale)[3], torch.zeros(32))
    # round-to-nearest: error at most half a step per element
    err = (dequantize_weight(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()


def test_int8_linear_matches_dequantized_float():
    lin = torch.nn.Linear(32, 16, bias=False)
    q8 = Int8Linear.from_linear(lin)
    x = torch.randn(4, 32)
    want = x @ dequantize_weight(q8.weight, q8.weight_scale).T
    torch.testing.assert_close(q8(x), want, atol=1e-5, rtol=1e-5)


def test_quantized_model_is_close_and_smaller():
    model = stock_model("llama3_tiny")
    quant = copy.deepcopy(model)
    names = quantize_model_(quant)
    assert "lm_head" in names and "model.layers.0.mlp.down_proj" in names
    assert quant.config.modelzoo_quantization["modules"] == names
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = model(ids).logits, quant(ids).logits
    # 8-bit weights: relative logit error of order 2**-8 per weight, averaged over the dot products
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9

    def linear_bytes(m):
        return sum(t.numel() * t.element_size() for n, t in m.state_dict().items()
                   if n.rsplit(".", 2)[-2].endswith("proj") or n.startswith("lm_head"))

    assert linear_bytes(model) / linear_bytes(quant) > 3.5  # fp32 -> int8 + one fp32 scale per row


def test_state_roundtrip_layout():
    model = stock_model("llama2_tiny")
    state = model.state_dict()
    names = ["model.layers.0.self_attn.q_proj", "lm_head"]
    qstate = quantize_state(state, names)
    assert qstate["lm_head.weight"].dtype == torch.int8 and "lm_head.weight_scale" in qstate
    back = dequantize_state(qstate)
    assert set(back) == set(state)
    assert torch.equal(back["model.norm.weight"], state["model.norm.weight"])
    assert (back["lm_head.weight"] - state["lm_head.weight"]).abs().max() <= qstate["lm_head.weight_scale"].max()

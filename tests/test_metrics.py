"""Training FLOPs per token and MFU (``modelzoo.training.metrics``, the trainer's metrics records).

The reference is the standard count (Kaplan et al. 2020; PaLM, appendix B), derived here from a
model's actual parameters rather than from its config: every weight matrix of the decoder layers
and the LM head costs 2 FLOPs per parameter per token forward, 6 with the backward (N counts those
matrices: not the embedding table, a lookup, nor norm vectors); causal self-attention adds
``QK^T`` and ``AV``, 2 * 2 * S * d_attn FLOPs per token per layer forward, 12 * L * S * d_attn with
the backward (masking not discounted), where d_attn = query heads x head dim is the width of the
query projection. MFU is achieved FLOP/s (tokens/s x FLOPs per token) over the peak FLOP/s.
"""

from __future__ import annotations

import pytest
import torch
from synthetic_data import write_dataset
from torch import nn

from modelzoo.config import load_config
from modelzoo.models.llama import from_pretrained, get_preset
from modelzoo.training.metrics import flops_per_token
from modelzoo.training.trainer import Trainer

SEQ_LENS = (1, 128, 4096)


def reference_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """FLOPs per trained token from the model's modules and parameter shapes (module doc)."""
    layers = model.model.layers
    matmul_params = sum(p.numel() for layer in layers for _, p in layer.named_parameters() if p.dim() == 2)
    matmul_params += model.get_output_embeddings().weight.numel()  # a tied head still multiplies
    d_attn = layers[0].self_attn.q_proj.weight.shape[0]
    return 6 * matmul_params + 12 * len(layers) * seq_len * d_attn


def _meta(name: str, **overrides):
    return from_pretrained(name, device="meta", overrides=overrides or None, patch=False)


@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("name", ["llama2_tiny", "llama3_tiny", "llama3_2_tiny", "llama2_7b", "llama3_8b",
                                  "llama3_2_3b"])
def test_flops_per_token_equals_the_parameter_count_formula(name, seq_len):
    model = _meta(name)
    got, want = flops_per_token(model.config, seq_len), reference_flops_per_token(model, seq_len)
    assert got == want


def test_flops_use_the_query_width_when_it_differs_from_hidden():
    """head_dim x heads != hidden_size (LlamaConfig allows it; Llama-3.2 sets head_dim explicitly):
    QK^T and AV are as wide as the query projection, so the attention term must follow it."""
    model = _meta("llama3_tiny", head_dim=32)  # 4 heads x 32 = 128, hidden 64
    assert model.model.layers[0].self_attn.q_proj.weight.shape[0] != model.config.hidden_size
    got, want = flops_per_token(model.config, 128), reference_flops_per_token(model, 128)
    assert got == want


def test_llama2_7b_flops_agree_with_its_published_size():
    """Sanity check against the published 6.74B parameters of Llama-2-7B: at seq_len 1 (no attention
    term to speak of) the FLOPs are 6 x the parameters that multiply, which is the published count
    less the 32000 x 4096 embedding table (2% of it)."""
    published = 6.74e9
    embedding = get_preset("llama2_7b").vocab_size * get_preset("llama2_7b").hidden_size
    multiplying = flops_per_token(get_preset("llama2_7b"), 1) / 6
    assert multiplying == pytest.approx(published - embedding, rel=0.005)
    # at the model's 4096-token context, attention adds 12 * 32 layers * 4096 * 4096 = 16% on top
    config = get_preset("llama2_7b")
    attention = flops_per_token(config, 4096) - flops_per_token(config, 0)
    assert attention == pytest.approx(12 * 32 * 4096 * 4096)


# ---------------------------------------------------------------------------------------------- MFU

PEAK = 3.5e12  # the "measured" peak the run is told (the real measurement is replaced)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ds") / "data", n_train_files=1, rows_per_file=8, n_dev=0,
                         seq_len=16)


def test_logged_mfu_is_achieved_flops_over_peak(tmp_path, data, monkeypatch):
    peaks = []

    def fake_peak(dtype=torch.float32, device="cpu", **kwargs):
        peaks.append((dtype, device))
        return PEAK

    monkeypatch.setattr("modelzoo.training.trainer.measure_matmul_peak", fake_peak)
    overrides = [f"training.dataset_dir={data}", "training.max_seq_length=16", "training.batch_size=4",
                 "training.max_steps=3", "training.log_every=1", "model.name_or_path=llama3_tiny",
                 f"checkpoint.save_dir={tmp_path / 'ck'}", f"training.output_dir={tmp_path / 'out'}"]
    trainer = Trainer(load_config("llama_tiny", overrides), quiet=True)
    records = [r for r in trainer.fit()["history"] if "loss" in r]
    assert peaks == [(torch.float32, "cpu")]  # measured once, in the run's dtype, on its device
    assert len(records) == 3
    flops = reference_flops_per_token(trainer.model, 16)
    for record in records:
        assert record["tokens_per_s"] > 0
        assert record["mfu"] == pytest.approx(record["tokens_per_s"] * flops / PEAK, rel=1e-9)

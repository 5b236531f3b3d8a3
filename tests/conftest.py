"""Shared fixtures: tiny random Llama models of each family, built by the tests themselves."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from modelzoo.models.llama import get_preset, patch_llama

# One tiny preset per family feature: Llama-2 MHA; Llama-3.1 GQA + llama3 rope scaling;
# Llama-3.2 GQA + rope scaling + tied embeddings.
FAMILIES = ["llama2_tiny", "llama3_tiny", "llama3_2_tiny"]


def stock_model(preset: str, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A stock HF model with random weights; norm weights are randomised too (HF inits them to 1,
    which would hide any mistake in how a norm weight is applied)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(get_preset(preset, **overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.2)
    return model


def stock_and_patched(preset: str, settings=None, seed: int = 0, **overrides):
    """A stock model and a patched deep copy with identical weights."""
    stock = stock_model(preset, seed, **overrides)
    patched = patch_llama(copy.deepcopy(stock), settings)
    return stock, patched


@pytest.fixture(scope="session")
def llama_like_tok(tmp_path_factory):
    """A tiny Llama-style tokenizer trained by the data-prep test fixtures (shared by the session)."""
    from helpers.data_prep_fixtures import tokenizer_path

    return tokenizer_path(tmp_path_factory, "llama")


@pytest.fixture(autouse=True)
def _no_patch_env(monkeypatch):
    """Tests choose patches explicitly; a developer's MODELZOO_PATCHES must not leak in."""
    monkeypatch.delenv("MODELZOO_PATCHES", raising=False)

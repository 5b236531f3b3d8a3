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


@pytest.fixture(scope="session")
def train_data(tmp_path_factory):
    """The synthetic training dataset (4 files of 16 rows) of the training and LoRA tests and of
    their spawned runs."""
    from synthetic_data import write_dataset

    return write_dataset(tmp_path_factory.mktemp("ds") / "data", n_train_files=4, rows_per_file=16)


@pytest.fixture(scope="session")
def spawn_batch(request, tmp_path_factory, train_data):
    """The session's spawned gloo cases, one ``spawn_cpu`` per process count (helpers/spawn_batch.py);
    a module's ``spawned`` fixture is ``functools.partial(spawn_batch, __name__)``."""
    from helpers.spawn_batch import SpawnBatch

    return SpawnBatch(tmp_path_factory.mktemp("spawned"), request.session, {"train_data": train_data})


@pytest.fixture(autouse=True)
def _no_patch_env(monkeypatch):
    """Tests choose patches explicitly; a developer's MODELZOO_PATCHES must not leak in."""
    monkeypatch.delenv("MODELZOO_PATCHES", raising=False)

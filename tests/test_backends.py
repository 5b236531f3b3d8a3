"""Backend registry and the inductor (torch.compile) path against the eager CPU reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from modelzoo.backends import Backend, BackendUnavailableError, backend_names, get_backend, register_backend
from modelzoo.models.llama import from_pretrained


def test_registry_names_and_errors():
    assert {"cpu", "inductor", "cuda"} <= set(backend_names())
    with pytest.raises(ValueError, match="did you mean 'inductor'"):
        get_backend("inductr")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="no CUDA device"):
            get_backend("cuda")


def test_a_new_backend_plugs_in():
    class Recording(Backend):
        name = "recording"
        compiled_with = None

        @classmethod
        def is_available(cls):
            return True, ""

        def device(self):
            return torch.device("cpu")

        def compile(self, model, plan=None):
            type(self).compiled_with = plan
            return model

    register_backend(Recording)
    backend = get_backend("recording")
    model = torch.nn.Linear(2, 2)
    assert backend.compile(model, {"n_chips": 1}) is model
    assert Recording.compiled_with == {"n_chips": 1}


def test_inductor_matches_cpu_reference():
    model = from_pretrained("llama3_tiny", seed=0)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    types = torch.ones_like(ids)
    types[:, 15] = 3
    types[:, :4] = 0
    with torch.no_grad():
        reference = get_backend("cpu").compile(model)(ids, token_type_ids=types)
        compiled = get_backend("inductor", device="cpu").compile(copy.deepcopy(model))
        out = compiled(ids, token_type_ids=types)
    assert_close(out.logits, reference.logits, atol=1e-4, rtol=0)
    assert_close(out.loss, reference.loss, atol=1e-4, rtol=0)

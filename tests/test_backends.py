"""Backend registry (built-in and plugged-in backends, as the generator uses them) and the inductor
(torch.compile) path against the eager CPU reference."""

from __future__ import annotations

import copy
import os

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


class _Wrapped(torch.nn.Module):
    """What a plugged-in backend returns from ``compile``: the model behind a call counter."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


class Recording(Backend):
    name = "recording"
    available = (True, "")
    compiled: list = []

    @classmethod
    def is_available(cls):
        return cls.available

    def device(self):
        return torch.device("cpu")

    def compile(self, model, plan=None):
        wrapped = _Wrapped(model)
        type(self).compiled.append((wrapped, plan, dict(self.options)))
        return wrapped


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the backend registry, so a test's plug-ins do not leak into other tests."""
    import modelzoo.backends as backends

    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    monkeypatch.setattr(Recording, "available", (True, ""))
    monkeypatch.setattr(Recording, "compiled", [])
    return backends


def test_a_registered_backend_is_found_by_name_with_its_options(registry):
    assert register_backend(Recording) is Recording  # usable as a decorator
    assert "recording" in backend_names()
    backend = get_backend("recording", index=3, mode="fast")
    assert type(backend) is Recording
    assert backend.options == {"index": 3, "mode": "fast"}
    batch = backend.to_device({"input_ids": torch.ones(2, 3, dtype=torch.long)})
    assert batch["input_ids"].device == backend.device()
    with pytest.raises(ValueError, match="did you mean 'recording'"):
        get_backend("recordin")


def test_an_unavailable_backend_raises_with_its_reason(registry):
    register_backend(Recording)
    Recording.available = (False, "the SDK runtime is not installed")
    with pytest.raises(BackendUnavailableError, match="'recording' is unavailable: the SDK runtime is not"):
        get_backend("recording")


def test_a_backend_without_a_name_is_refused(registry):
    class Nameless(Recording):
        name = ""

    with pytest.raises(ValueError, match="Nameless has no name"):
        register_backend(Nameless)
    assert "" not in backend_names()


def test_generation_runs_through_a_plugged_in_backend(registry):
    """The generator compiles its decoder with the named backend and runs every step through what the
    backend returned; the tokens are those of the eager CPU path."""
    from modelzoo.generation import Generator

    register_backend(Recording)
    model = from_pretrained("llama3_tiny", seed=0)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    eager = Generator(model, backend="cpu", batch_size=2, eos_token_ids=[])
    want = [c.token_ids for c in eager.generate_ids(prompts, 8)]
    gen = Generator(model, backend="recording", batch_size=2, eos_token_ids=[])
    got = [c.token_ids for c in gen.generate_ids(prompts, 8)]
    [(wrapped, _, _)] = Recording.compiled
    assert wrapped.inner is gen.decoder and gen.step is wrapped
    assert wrapped.calls == 9  # a prefill per prompt and 7 decode steps, all through the backend's module
    assert got == want


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


def test_inductor_cache_is_kept_apart_per_forced_instruction_set(monkeypatch, tmp_path):
    """``ATEN_CPU_CAPABILITY=avx2`` on an AVX-512 CPU loaded kernels cached for AVX-512 and generated
    wrong tokens; the inductor backend gives each forced instruction set a cache directory of its own."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    from modelzoo.backends.reference import isa_keyed_cache_dir

    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert isa_keyed_cache_dir() is None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the default cache dir lives under the temp dir
    monkeypatch.setattr("tempfile.tempdir", None)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    keyed = isa_keyed_cache_dir()
    assert keyed == default_cache_dir() + "_avx2" and keyed.startswith(str(tmp_path))
    assert cache_dir() == keyed  # what inductor reads
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's choice stands
    assert isa_keyed_cache_dir() == str(tmp_path / "mine")

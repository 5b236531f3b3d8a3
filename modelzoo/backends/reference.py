"""Reference backends: eager CPU, torch.compile (inductor), CUDA."""

from __future__ import annotations

import os

import torch
from torch import nn

from .base import Backend


class CpuBackend(Backend):
    """Eager PyTorch on the CPU: the numerical reference path."""

    name = "cpu"

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        return True, ""

    def device(self) -> torch.device:
        return torch.device("cpu")

    def compile(self, model: nn.Module, plan=None) -> nn.Module:
        return model.to(self.device())


def isa_keyed_cache_dir() -> str | None:
    """With ``ATEN_CPU_CAPABILITY`` set, point inductor's on-disk cache at a directory of its own
    (``<default>_<capability>``) unless ``TORCHINDUCTOR_CACHE_DIR`` names another one; returns it.

    Inductor's cache does not keep kernels compiled for one vector instruction set apart from
    another's: after a run with the CPU's own (AVX-512), a run with ``ATEN_CPU_CAPABILITY=avx2``
    loaded the cached kernels and generated wrong tokens (none equal to ``transformers``'), which a
    fresh cache does not.
    """
    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    if not capability:
        return None
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # a private module: without it, leave the cache as torch sets it
        return None
    default = os.path.abspath(default_cache_dir())
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == default:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default}_{capability}"
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


class InductorBackend(Backend):
    """``torch.compile`` with the inductor compiler: the stand-in for the accelerator's graph
    compiler. Shapes are static (``dynamic=False``) as on the accelerator; runs on CUDA when
    available (or ``device=`` option), else on the CPU.

    Options: ``device`` ("cpu"/"cuda"), ``mode`` (torch.compile mode), ``fullgraph`` (bool).
    """

    name = "inductor"

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        return True, ""

    def device(self) -> torch.device:
        default = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(self.options.get("device", default))

    def compile(self, model: nn.Module, plan=None) -> nn.Module:
        model = model.to(self.device())
        isa_keyed_cache_dir()
        return torch.compile(
            model, backend="inductor", dynamic=False,
            mode=self.options.get("mode"), fullgraph=self.options.get("fullgraph", False),
        )

    def compile_block(self, module: nn.Module) -> None:
        isa_keyed_cache_dir()
        module.compile(backend="inductor", dynamic=False, mode=self.options.get("mode"),
                       fullgraph=self.options.get("fullgraph", False))


class CudaBackend(Backend):
    """Eager PyTorch on a CUDA GPU (option ``compile=True`` adds torch.compile)."""

    name = "cuda"

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        if torch.cuda.is_available():
            return True, ""
        return False, "no CUDA device is visible to torch; use backend=cpu or backend=inductor"

    def device(self) -> torch.device:
        return torch.device("cuda", self.options.get("index", 0))

    def compile(self, model: nn.Module, plan=None) -> nn.Module:
        model = model.to(self.device())
        if self.options.get("compile", False):
            return torch.compile(model, dynamic=False)
        return model

    def compile_block(self, module: nn.Module) -> None:
        if self.options.get("compile", False):
            module.compile(dynamic=False)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device())

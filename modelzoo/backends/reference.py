"""Reference backends: eager CPU, torch.compile (inductor), CUDA."""

from __future__ import annotations

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
        return torch.compile(
            model, backend="inductor", dynamic=False,
            mode=self.options.get("mode"), fullgraph=self.options.get("fullgraph", False),
        )

    def compile_block(self, module: nn.Module) -> None:
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

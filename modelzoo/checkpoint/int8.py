"""Int8 weight-only quantization: per-output-channel absmax scales for linear layers.

On disk (a "pre-quantized dir", written by ``modelzoo-convert quantize --int8`` and read by the
generation CLI) it is an HF-layout checkpoint whose quantized linears store

- ``<module>.weight``: int8 ``[out_features, in_features]``
- ``<module>.weight_scale``: float32 ``[out_features]`` (``weight ≈ int8 * scale[:, None]``)

and whose ``config.json`` carries ``"modelzoo_quantization": {"method": "int8_weight_only",
"scheme": "per_output_channel_absmax", "modules": [...]}``. The key is ours on purpose: stock
``transformers`` does not know this format, and an unknown key keeps it from misreading the weights
as float. Dequantize (``dequantize_state``) to get a plain HF checkpoint back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANT_KEY = "modelzoo_quantization"
METHOD = "int8_weight_only"
SCHEME = "per_output_channel_absmax"
SCALE_SUFFIX = "_scale"


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` float weight -> (int8 ``[out, in]``, float32 scale ``[out]``).

    ``scale = max|row| / 127``; values round to nearest and lie in [-127, 127]. An all-zero row gets
    scale 1 (it dequantizes to zeros exactly).
    """
    w = weight.detach().float()
    if w.data_ptr() == weight.data_ptr():
        w = w.clone()  # fp32 input: divided in place below, so work on a copy
    absmax = torch.maximum(w.amax(dim=1), -w.amin(dim=1))  # no |w| temporary (peak memory of quantize)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = w.div_(scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


class Int8Linear(nn.Module):
    """``y = (x @ W_int8^T) * scale`` with W stored as int8 (1 byte per weight).

    The int8 matrix is converted to the activation dtype inside the matmul call; the per-channel
    scale is applied to the (much smaller) output.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device)
        module.weight, module.weight_scale = quantize_weight(linear.weight)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantizable_linears(model: nn.Module, include_lm_head: bool = True) -> list[str]:
    """Names of the nn.Linear modules to quantize: every decoder projection, and the LM head unless
    it is tied to the embedding (or ``include_lm_head`` is False)."""
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if name.endswith("lm_head") and (tied or not include_lm_head):
                continue
            names.append(name)
    return names


def quantize_model_(model: nn.Module, modules: list[str] | None = None) -> list[str]:
    """Replace the named (default: :func:`quantizable_linears`) Linear modules by :class:`Int8Linear`
    in place; returns the names. Sets ``model.config.modelzoo_quantization``."""
    names = quantizable_linears(model) if modules is None else modules
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int8Linear.from_linear(getattr(parent, attr)))
    if hasattr(model, "config"):
        setattr(model.config, QUANT_KEY, {"method": METHOD, "scheme": SCHEME, "modules": names})
    return names


def quantize_state(state: dict[str, torch.Tensor], modules: list[str]) -> dict[str, torch.Tensor]:
    """A float HF state dict -> the on-disk int8 layout (only ``modules``' weights change)."""
    out = dict(state)
    for name in modules:
        q, scale = quantize_weight(state[f"{name}.weight"])
        out[f"{name}.weight"], out[f"{name}.weight{SCALE_SUFFIX}"] = q, scale
    return out


def dequantize_state(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The int8 on-disk layout -> a float state dict with the original keys."""
    out = {}
    for key, tensor in state.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        scale = state.get(f"{key}{SCALE_SUFFIX}")
        out[key] = dequantize_weight(tensor, scale, dtype) if scale is not None else tensor
    return out

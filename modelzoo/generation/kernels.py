"""Linear and embedding kernels for generation, picked per module and per step shape.

Why these exist (profiled on the benchmark model, ``benchmarks/bench_generation.py``): a decode step
is a chain of matrix-vector products, bound by reading the weights from memory. ``F.linear`` on CPU
goes to the BLAS gemv, which here reads fp32 weights at about a third of the copy bandwidth; the
oneDNN linear that inductor's CPU freezing path uses (``torch.ops.mkldnn._linear_pointwise``) reads
them at about twice that rate. Under ``torch.compile`` a small-row product written as a reduction
(``(W * x_row).sum(-1)`` per row) becomes one vectorized C++ loop that reads each weight row once
for all input rows and fuses with its neighbours (norms, rotary, SiLU),
and with int8 weights it reads 1 byte per weight and converts in registers: that is what makes int8
decode fast. (Measured on llama_60m's 33 matrices, 2 cores: fp32 batch 1 ``F.linear`` 10 GB/s,
oneDNN 20-22 GB/s, compiled reduction 23-25 GB/s; int8 compiled 15-17 GB/s of int8 = 6x fewer
seconds than ``F.linear`` fp32; ``torch._weight_int8pack_mm`` about 2 GB/s here.)

Per instruction set (``benchmarks/bench_generation.py``, llama_60m, 256 tokens, 2 cores of an AMD
EPYC with AVX-512 + VNNI; AVX2 forced with ``ATEN_CPU_CAPABILITY=avx2``; ms per decode step, % of the
copy-bandwidth roofline): AVX-512 batch 1 fp32 6.2 (84%), int8 2.75 (48%, 2.3x fp32); batch 8 fp32
17.1 (31%: besides the weights, read once, the step reads the rows' keys/values and does 8x the
arithmetic). AVX2 batch 1 fp32 6.9 (75%), int8 3.3 (40%, 2.1x; 25.5 ms before the ``int32x4`` form,
:data:`INT8_KERNELS`), batch 8 fp32 16.8. Eager int8 (``_weight_int8pack_mm`` / dequantize per call)
is slower than eager fp32 (45 vs 83 tok/s at batch 1), hence :func:`note_eager_int8`.
:func:`cpu_line` and :func:`kernel_line` say what ran.

Every path computes ``x @ W.T (* scale) (+ bias)``; they differ only in summation order (fp32
rounding), which the greedy-parity tests against ``transformers`` cover.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modelzoo.checkpoint.int8 import Int8Linear, quantize_weight

#: Up to this many rows (batch x new tokens: decode steps), a compiled linear is written as
#: reductions; above it (prefill), a compiled linear is a GEMM.
SMALL_ROWS = 8
#: Smaller weights stay on ``F.linear``: the oneDNN call always forks its threads, which costs more
#: than it saves on a tiny matrix (and stalls badly when the cores are shared).
ONEDNN_MIN_WEIGHT = 1 << 16


@functools.cache
def onednn_linear_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether ``torch.ops.mkldnn._linear_pointwise`` runs here (a private op: probe, don't assume)."""
    try:
        x, w = torch.ones(2, 8, dtype=dtype), torch.ones(4, 8, dtype=dtype)
        out = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        return bool(torch.equal(out, F.linear(x, w)))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


#: The vector extensions worth naming when a kernel choice is reported (x86, then ARM).
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
                "amx_tile", "amx_int8", "asimd", "sve", "sve2")


@functools.cache
def cpu_flags() -> tuple[str, ...]:
    """The vector extensions of :data:`VECTOR_FLAGS` this CPU reports (``/proc/cpuinfo``; empty
    where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            found = set(line.split(":", 1)[1].split())
            return tuple(flag for flag in VECTOR_FLAGS if flag in found)
    return ()


@functools.cache
def vector_isa() -> str:
    """The instruction set compiled CPU kernels are generated for: inductor's choice (the best the
    CPU has, capped by ``ATEN_CPU_CAPABILITY``), or ATen's dispatch level without inductor."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        isa = pick_vec_isa()
        return str(isa) if isa else "scalar"
    except Exception:  # noqa: BLE001 - a private module: fall back to the public capability
        return torch.backends.cpu.get_cpu_capability().lower()


def cpu_line() -> str:
    """One line naming the CPU's vector extensions and the instruction set kernels run with."""
    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    forced = f", ATEN_CPU_CAPABILITY={capability}" if capability else ""
    return (f"cpu flags: {' '.join(cpu_flags()) or 'none found'}; compiled kernels: {vector_isa()}; "
            f"aten: {torch.backends.cpu.get_cpu_capability().lower()}{forced}")


def has_int8_linears(model: nn.Module) -> bool:
    """Whether ``model`` holds :class:`Int8Linear` layers (int8 weight-only)."""
    return any(isinstance(m, Int8Linear) for m in model.modules())


def kernel_line(model: nn.Module, compiled: bool) -> str:
    """Which linear kernels a decode step of ``model`` runs (for benchmarks and notes)."""
    int8 = has_int8_linears(model)
    if compiled:
        return (f"compiled {vector_isa()}: up to {SMALL_ROWS} rows as fused reductions "
                f"({f'int8 read as {int8_kernel()}, converted in registers' if int8 else 'fp32'}), more rows as GEMMs"
                + (" of the dequantized weight" if int8 else ""))
    if int8:
        return "eager: 1 row torch._weight_int8pack_mm, more rows F.linear of the dequantized weight"
    return "eager: oneDNN linear" + ("" if onednn_linear_available() else " (unavailable here: F.linear)")


@functools.cache
def note_eager_int8() -> str:
    """The one-time advice for int8 weights on an eager CPU backend, logged (once per process) by the
    engine that meets them."""
    message = ("note: int8 weights on the eager cpu backend dequantize each matrix per product (one-row "
               "products use PyTorch's int8 kernel), which is slower than fp32 eager; --backend inductor "
               "runs int8 products as compiled kernels that read 1 byte per weight (several times fp32)")
    logging.getLogger("modelzoo.generation").warning(message)
    return message


def _is_plain(weight: torch.Tensor) -> bool:
    return type(weight) in (torch.Tensor, nn.Parameter)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def realized(x: torch.Tensor) -> torch.Tensor:
    """``x``, stored to memory before it is used (under inductor; a no-op value-wise).

    Inductor otherwise inlines the pointwise ops that produce a reduction's input (RMSNorm, SiLU *
    up, rotary) into the reduction loop, recomputing them for every output feature: at batch 8
    that made the LM head compute-bound (13 ms instead of 2). The input is a few KB.
    """
    try:
        import torch._inductor.inductor_prims  # noqa: F401 (registers the op)

        force = torch.ops.prims.inductor_force_stride_order
    except (ImportError, AttributeError):  # an internal op: without it, correct but slower at batch > 1
        return x
    return force(x, x.stride())


def _reduction_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [..., K] @ weight[N, K].T`` as one reduction per input row (for inductor, few rows).

    Inductor fuses the per-row reductions into one loop over the weight rows, so each weight row is
    read once for all input rows, and an int8 weight is converted in registers. The input rows are
    stored first (:func:`realized`). (Written as a single broadcast ``[N, M, K]`` reduction instead,
    inductor vectorizes along the short M axis and forks threads inside the loop over N: 50x slower
    at M = 8.)
    """
    return _per_row(x, weight.shape[0], lambda row: (weight * row).sum(-1, dtype=x.dtype))


def _per_row(x: torch.Tensor, out_features: int, product) -> torch.Tensor:
    """``product(row) -> [N]`` for each row of ``x [..., K]`` (stored first, :func:`realized`),
    stacked to ``[..., N]``."""
    rows = realized(x.reshape(-1, x.shape[-1]))
    out = torch.stack([product(row) for row in rows.unbind(0)])  # [M, N]
    return out.reshape(*x.shape[:-1], out_features)


#: How a compiled small-row int8 product reads its weight: ``"int8"`` (one int8 element at a time,
#: converted in registers) or ``"int32x4"`` (the int8 matrix viewed as int32 words, each word's four
#: bytes unpacked by shifts). Inductor vectorizes the int8 -> float conversion with AVX-512 but not
#: with AVX2, where the int8 loop ran scalar (1.8 GB/s on a 1536 x 512 x 8 matrix, 2 cores) and the
#: word form runs at 26 GB/s (AVX-512: int8 32 GB/s, words 24 GB/s). ``auto``: ``int8`` when compiled
#: kernels use AVX-512, else ``int32x4``. Set ``MODELZOO_INT8_KERNEL`` to force one.
INT8_KERNELS = ("int8", "int32x4")


@torch.compiler.assume_constant_result  # traced code takes the answer as a constant
def int8_kernel() -> str:
    """The int8 reduction form compiled decode steps use on this CPU (see :data:`INT8_KERNELS`)."""
    return _int8_kernel()


@functools.cache
def _int8_kernel() -> str:
    forced = os.environ.get("MODELZOO_INT8_KERNEL", "auto")
    if forced in INT8_KERNELS:
        return forced
    if forced != "auto":
        raise ValueError(f"MODELZOO_INT8_KERNEL={forced!r}: choose one of auto, {', '.join(INT8_KERNELS)}")
    return "int8" if vector_isa().startswith("avx512") or sys.byteorder != "little" else "int32x4"


def _int32x4_reduction_linear(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``x [..., K] @ q[N, K].T`` for int8 ``q`` read as int32 words ``[N, K/4]`` (little-endian:
    byte ``b`` of word ``k`` is column ``4k + b``; a left shift then an arithmetic right shift by 24
    sign-extends it). One fused loop per input row reads each word once; the four products are summed
    per word, then over the words."""
    words = q.view(torch.int32)

    def product(row: torch.Tensor) -> torch.Tensor:
        columns = realized(row.view(-1, 4).T.contiguous())  # [4, K/4]: column 4k + b at [b, k]
        total = None
        for b in range(4):
            term = torch.bitwise_right_shift(torch.bitwise_left_shift(words, 24 - 8 * b), 24).to(x.dtype) * columns[b]
            total = term if total is None else total + term
        return total.sum(-1, dtype=x.dtype)

    return _per_row(x, q.shape[0], product)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, compiled: bool) -> torch.Tensor:
    """``x [..., K] @ weight[N, K].T (+ bias)`` with the fastest kernel for the mode and shape."""
    if compiled:
        if _rows(x) <= SMALL_ROWS:
            out = _reduction_linear(x, weight)
            return out if bias is None else out + bias
        return F.linear(x, weight, bias)
    if (x.device.type == "cpu" and weight.numel() >= ONEDNN_MIN_WEIGHT and x.dtype == weight.dtype
            and onednn_linear_available(x.dtype)):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                compiled: bool) -> torch.Tensor:
    """``x [..., K] @ (q[N, K] * scale[N, None]).T (+ bias)``, q int8, scale fp32.

    Compiled small-row products read the int8 matrix once and convert in registers. Eager: PyTorch's
    int8 weight-only kernel for a single row, otherwise the weight is dequantized for the call.
    """
    scale = scale.to(x.dtype)
    if compiled and _rows(x) <= SMALL_ROWS:
        if int8_kernel() == "int32x4" and q.shape[-1] % 4 == 0 and q.is_contiguous():
            out = _int32x4_reduction_linear(x, q) * scale
        else:
            out = _reduction_linear(x, q) * scale
    elif not compiled and _rows(x) == 1 and x.device.type == "cpu":
        out = torch._weight_int8pack_mm(x.reshape(1, -1), q, scale).reshape(*x.shape[:-1], -1)
    else:
        out = dense_linear(x, q.to(x.dtype), None, compiled) * scale
    return out if bias is None else out + bias.to(x.dtype)


def apply_linear(module: nn.Module, x: torch.Tensor, compiled: bool) -> torch.Tensor:
    """Run a linear module of the model on ``x``.

    Plain ``nn.Linear`` and :class:`Int8Linear` use the kernels above; anything else (tensor-parallel
    DTensor weights with their hooks, patched precision subclasses) runs its own ``forward``.
    """
    if type(module) is nn.Linear and _is_plain(module.weight):
        return dense_linear(x, module.weight, module.bias, compiled)
    if isinstance(module, Int8Linear):
        return int8_linear(x, module.weight, module.weight_scale, module.bias, compiled)
    return module(x)


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with one fp32 absmax scale per row (per token).

    Same on-disk layout as :class:`Int8Linear` (``weight`` int8 ``[V, H]``, ``weight_scale`` fp32
    ``[V]``), so a tied LM head can share the table. Only the looked-up rows are dequantized.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.float32,
                 padding_idx: int | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.out_dtype = dtype
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, dtype=torch.float32, device=device))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        module = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.weight.dtype,
                     embedding.padding_idx, embedding.weight.device)
        module.weight, module.weight_scale = quantize_weight(embedding.weight)
        return module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight).to(torch.float32) * F.embedding(ids, self.weight_scale[:, None])
        return rows.to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"


def tied_int8_head(embedding: Int8Embedding) -> Int8Linear:
    """An :class:`Int8Linear` LM head that shares the int8 table and scales of a tied embedding."""
    head = Int8Linear(embedding.embedding_dim, embedding.num_embeddings, device="meta")
    head.weight, head.weight_scale = embedding.weight, embedding.weight_scale
    return head

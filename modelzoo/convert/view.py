"""A checkpoint in any format, seen as the HF tensors it stands for, each produced on demand.

Every reader (HF dir, Meta dir, TP-shard dir, int8 dir) returns a :class:`CheckpointView`: the
``LlamaConfig`` plus one :class:`TensorSource` per HF tensor, in HF ``state_dict`` order. A source
knows its name, dtype and shape without reading data, and yields the tensor as row-major chunks
(a 2-D tensor as row blocks ``[k, cols]``, anything else as one chunk), so writers stream and
:func:`aligned_rows` can compare two sources block by block. Nothing is read until asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modelzoo.checkpoint.hf_weights import CheckpointError

#: Row-block size in which tensors are mapped, copied (permute, concatenate) and written: the memory
#: a stream holds beyond its current tensor.
BLOCK_BYTES = 16 * 2**20


@dataclass
class TensorSource:
    """One HF tensor: metadata now, data as row-major chunks from :meth:`chunks` later."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], Iterator[torch.Tensor]]
    where: str = ""  # file(s) the tensor comes from, for messages
    whole: Callable[[], torch.Tensor] | None = None  # the tensor in one piece without a copy, if possible

    @property
    def numel(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def chunks(self) -> Iterator[torch.Tensor]:
        """The tensor's chunks; checks they add up to exactly the announced dtype and shape."""
        rows = 0
        for chunk in self.produce():
            whole = len(self.shape) != 2
            if chunk.dtype != self.dtype or (whole and tuple(chunk.shape) != self.shape) or \
                    (not whole and (chunk.dim() != 2 or chunk.shape[1] != self.shape[1])):
                raise CheckpointError(f"{self.where}: tensor '{self.name}' gives {chunk.dtype} {list(chunk.shape)}, "
                                      f"expected {self.dtype} {list(self.shape)}; the checkpoint is inconsistent")
            rows += chunk.shape[0] if not whole else (self.shape[0] if self.shape else 1)
            yield chunk
            del chunk  # do not hold this block while the next one is produced
        if rows != (self.shape[0] if self.shape else 1):
            raise CheckpointError(f"{self.where}: tensor '{self.name}' gives {rows} rows, expected {self.shape[0]}")

    def materialize(self) -> torch.Tensor:
        """The whole tensor (no copy when it is stored in one piece: then it is a file mapping)."""
        if self.whole is not None:
            tensor = self.whole()
            if tensor.dtype != self.dtype or tuple(tensor.shape) != self.shape:
                raise CheckpointError(f"{self.where}: tensor '{self.name}' is {tensor.dtype} {list(tensor.shape)}, "
                                      f"expected {self.dtype} {list(self.shape)}")
            return tensor
        parts = list(self.chunks())
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass
class CheckpointView:
    """A checkpoint as HF tensors. ``kind``: ``hf``, ``meta``, ``tp-shards`` or ``int8``."""

    path: Path
    kind: str
    config: LlamaConfig
    sources: dict[str, TensorSource]
    generation_config: dict[str, Any] | None = None
    tokenizer: Any = None  # modelzoo.convert.tokenizer.TokenizerSource or None
    notes: list[str] = field(default_factory=list)
    native_tensors: int = 0  # tensors as stored (Meta: per MP file; shards: per chip)
    quantized_modules: list[str] = field(default_factory=list)
    chips: Any = None  # tp-shards: modelzoo.convert.tp_shards.ChipCopies (every chip's stored copy)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.sources.values())

    @property
    def n_params(self) -> int:
        return sum(s.numel for s in self.sources.values())


def row_ranges(shape: tuple[int, ...], itemsize: int, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges of about ``block_bytes`` covering a 2-D tensor of ``shape``."""
    step = max(block_bytes // max(shape[1] * itemsize, 1), 1)
    for start in range(0, shape[0], step):
        yield start, min(start + step, shape[0])


def mapped_rows(get: Callable[[tuple[int, int] | None], torch.Tensor], shape: tuple[int, ...],
                dtype: torch.dtype, block_bytes: int = BLOCK_BYTES) -> Iterator[torch.Tensor]:
    """Chunks of a stored tensor, each block of rows fetched (mapped) on its own by ``get(rows)``."""
    if len(shape) != 2 or shape[0] == 0:
        yield get(None)
        return
    for rows in row_ranges(shape, dtype.itemsize, block_bytes):
        yield get(rows)


def row_blocks(tensor: torch.Tensor, block_bytes: int = BLOCK_BYTES) -> Iterator[torch.Tensor]:
    """Row blocks (views) of a 2-D tensor of about ``block_bytes`` each; other ranks whole."""
    if tensor.dim() != 2 or tensor.shape[0] == 0:
        yield tensor
        return
    row_bytes = max(tensor.shape[1] * tensor.element_size(), 1)
    step = max(block_bytes // row_bytes, 1)
    for start in range(0, tensor.shape[0], step):
        yield tensor[start:start + step]


def column_block(rows: int, width: int, dtype: torch.dtype,
                 pieces: Iterable[tuple[Callable[[], torch.Tensor], int, int]]) -> torch.Tensor:
    """One ``[rows, width]`` block from column pieces ``(fetch, start, length)``, in order: columns
    ``[start, start + length)`` of the stored block ``fetch()``. One fetched block lives at a time
    beside the result (a ``torch.cat`` of the pieces would hold them all)."""
    out = torch.empty((rows, width), dtype=dtype)
    col = 0
    for fetch, start, length in pieces:
        out[:, col:col + length] = fetch()[:, start:start + length]
        col += length
    if col != width:  # uncovered columns would be uninitialized memory
        raise CheckpointError(f"column pieces cover {col} of {width} columns; the checkpoint is inconsistent")
    return out


def rechunk_rows(chunks: Iterator[torch.Tensor], block_bytes: int = BLOCK_BYTES) -> Iterator[torch.Tensor]:
    """Split every chunk into row blocks of at most about ``block_bytes``."""
    for chunk in chunks:
        yield from row_blocks(chunk, block_bytes)
        del chunk


def aligned_rows(a: TensorSource, b: TensorSource, block_bytes: int = BLOCK_BYTES
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs of equally sized row blocks of two same-shape sources (whole tensors if not 2-D)."""
    if len(a.shape) != 2:
        yield a.materialize(), b.materialize()
        return
    it_a, it_b = rechunk_rows(a.chunks(), block_bytes), rechunk_rows(b.chunks(), block_bytes)
    left = right = None
    while True:
        if left is None:
            left = next(it_a, None)
        if right is None:
            right = next(it_b, None)
        if left is None or right is None:
            return
        n = min(left.shape[0], right.shape[0])
        yield left[:n], right[:n]
        # an exhausted block is dropped before the next is fetched, so at most one block per side lives
        left = left[n:] if left.shape[0] > n else None
        right = right[n:] if right.shape[0] > n else None


def hf_specs(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor names -> shapes of ``LlamaForCausalLM(config)`` in ``state_dict`` order (a tied LM
    head omitted: it is the embedding). Built on the meta device: nothing is allocated."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    specs = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        specs.pop("lm_head.weight", None)
    return specs


def build_model(view: CheckpointView, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A stock HF model holding the view's weights in ``dtype`` (materializes the whole model)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device("meta"):
        model = LlamaForCausalLM(view.config)
    state = {name: src.materialize().to(dtype) for name, src in view.sources.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if view.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = LlamaRotaryEmbedding(config=model.config)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"{view.path}: no weights for {', '.join(left[:5])}")
    return model.eval()

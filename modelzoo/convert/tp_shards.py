"""Per-chip tensor-parallel (TP) shard dirs, written from any view and read back as an HF view.

Layout (``shard --n-chips K``)::

    OUT/tp_shards.json            {"format": "modelzoo-tp-shards", "version": 1, "n_chips": K, "kv_mode",
                                   "kv_replicas", "vocab_size", "padded_vocab", "tied_embeddings",
                                   "ranks": ["rank_00", ...], "tensors": {hf_name: {"style", "shape", "dtype"}}}
    OUT/config.json, generation_config.json, tokenizer files   (the full model's, unchanged)
    OUT/rank_00/model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
    ...
    OUT/rank_{K-1}/...

Chip ``r``'s tensors keep their HF names and hold exactly ``parallelize.shard_tensor(name, full, layout,
r)`` (the training TP plan: column-parallel q/k/v/gate/up and the vocab-padded ``lm_head``,
row-parallel o/down, KV heads replicated when K exceeds them, the rest replicated). To stream,
the *placement* is computed by running ``shard_tensor`` / ``unshard_tensors`` themselves on index
tensors (one int64 per row or column, not per element); the data then moves as row blocks of
the memory-mapped input, so memory stays near one tensor. Tests check the result equals
``shard_tensor`` on real tensors bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig

from modelzoo.checkpoint.hf_weights import CheckpointError, weight_files
from modelzoo.checkpoint.json_file import read_json
from modelzoo.checkpoint.safetensors_io import (
    DTYPE_NAMES,
    DTYPES,
    SafetensorsReader,
    ShardedSafetensorsWriter,
)
from modelzoo.config import ConfigError
from modelzoo.models.llama.loading import load_llama_config
from modelzoo.models.llama.meta_format import head_dim_of
from modelzoo.models.llama.parallelize import (
    ROWWISE,
    TPLayout,
    shard_tensor,
    style_of,
    tp_layout,
    unshard_tensors,
)

from .hf_dir import generation_config_for, write_hf_metadata
from .tokenizer import TokenizerSource
from .view import BLOCK_BYTES, CheckpointView, TensorSource, column_block, hf_specs, row_blocks, row_ranges

MANIFEST = "tp_shards.json"
FORMAT = "modelzoo-tp-shards"
VERSION = 1


def rank_dir(rank: int) -> str:
    return f"rank_{rank:02d}"


def _split_dim(name: str, layout: TPLayout) -> int:
    """The weight dim whose rows/columns the plan moves around: columns for row-parallel, else rows."""
    return 1 if style_of(name, layout) == ROWWISE else 0


def _runs(index: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, length)]`` of consecutive source positions in a 1-based index (0 = padding -> start -1)."""
    runs: list[tuple[int, int]] = []
    for value in index.tolist():
        start = value - 1
        if runs and ((start < 0 and runs[-1][0] < 0) or
                     (start >= 0 and runs[-1][0] >= 0 and runs[-1][0] + runs[-1][1] == start)):
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((start, 1))
    return runs


def shard_runs(name: str, shape: tuple[int, ...], layout: TPLayout, rank: int, head_dim: int) -> list[tuple[int, int]]:
    """Which rows (or columns, row-parallel) of the full tensor chip ``rank`` gets, as runs (-1 = zero pad)."""
    dim = _split_dim(name, layout)
    proxy = torch.arange(1, shape[dim] + 1, dtype=torch.int64)
    proxy = proxy[:, None] if dim == 0 else proxy[None, :]
    return _runs(shard_tensor(name, proxy, layout, rank, head_dim).reshape(-1))


def shard_shape(name: str, shape: tuple[int, ...], dtype: torch.dtype, layout: TPLayout, rank: int,
                head_dim: int) -> tuple[int, ...]:
    full = torch.empty(shape, dtype=dtype, device="meta")
    return tuple(shard_tensor(name, full, layout, rank, head_dim).shape)


def _gather(full: torch.Tensor, runs: list[tuple[int, int]], dim: int):
    """Row blocks of ``full`` restricted to ``runs`` along ``dim`` (views for rows, copies for columns)."""
    if dim == 0:
        for start, length in runs:
            block = full.new_zeros((length, full.shape[1])) if start < 0 else full[start:start + length]
            yield from row_blocks(block)
        return
    width = sum(length for _, length in runs)
    step = max(1, BLOCK_BYTES // max(1, width * full.element_size()))
    for row in range(0, full.shape[0], step):
        rows = full[row:row + step]
        parts = [rows.new_zeros((rows.shape[0], length)) if start < 0 else rows[:, start:start + length]
                 for start, length in runs]
        yield parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=1)


def write_shards(view: CheckpointView, out_dir: Path, n_chips: int, max_shard_bytes: int, progress) -> None:
    """Write ``view`` as ``n_chips`` per-chip shard dirs (see module doc), one input tensor at a time."""
    config = view.config
    try:
        layout = tp_layout(config, n_chips)
    except ConfigError as err:
        raise CheckpointError(f"--n-chips {n_chips}: {err}") from err
    head_dim = head_dim_of(config)
    sources = list(view.sources.values())
    per_rank = [[(s.name, s.dtype, shard_shape(s.name, s.shape, s.dtype, layout, r, head_dim)) for s in sources]
                for r in range(n_chips)]
    writers = [ShardedSafetensorsWriter(out_dir / rank_dir(r), specs, max_shard_bytes)
               for r, specs in enumerate(per_rank)]
    progress.total = sum(w.total_size for w in writers)
    try:
        for src in sources:
            progress.set_postfix_str(src.name, refresh=False)
            full = src.materialize()
            for rank, writer in enumerate(writers):
                if full.dim() == 2:
                    runs = shard_runs(src.name, src.shape, layout, rank, head_dim)
                    chunks = _gather(full, runs, _split_dim(src.name, layout))
                else:
                    chunks = [shard_tensor(src.name, full, layout, rank, head_dim)]
                progress.update(writer.write(src.name, chunks))
            del full
        for writer in writers:
            writer.close()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    manifest = {
        "format": FORMAT, "version": VERSION, "n_chips": n_chips, "kv_mode": layout.kv_mode,
        "kv_replicas": layout.kv_replicas, "vocab_size": config.vocab_size, "padded_vocab": layout.padded_vocab,
        "tied_embeddings": layout.tied_embeddings, "ranks": [rank_dir(r) for r in range(n_chips)],
        "tensors": {s.name: {"style": style_of(s.name, layout), "shape": list(s.shape), "dtype": DTYPE_NAMES[s.dtype]}
                    for s in sources},
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    write_hf_metadata(view, out_dir)


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    manifest = read_json(file, fix="re-run modelzoo-convert shard")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{file}: not a {FORMAT} v{VERSION} manifest; re-run modelzoo-convert shard")
    return manifest


def _unshard_source(name: str, shape: tuple[int, ...], dtype: torch.dtype, readers: list[SafetensorsReader],
                    layout: TPLayout, config: LlamaConfig) -> TensorSource:
    vocab = config.vocab_size

    def produce():
        if len(shape) != 2:
            yield unshard_tensors(name, [r.get(name) for r in readers], layout, vocab)
            return
        dim = _split_dim(name, layout)
        sizes = [r.tensors[name].shape[dim] for r in readers]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        proxies = [torch.arange(o + 1, o + n + 1, dtype=torch.int64) for o, n in zip(offsets, sizes, strict=True)]
        proxies = [p[:, None] if dim == 0 else p[None, :] for p in proxies]
        index = unshard_tensors(name, proxies, layout, vocab).reshape(-1)
        pieces = []  # (rank, local start, length) in output order
        for start, length in _runs(index):
            while length:
                rank = max(i for i, o in enumerate(offsets) if o <= start)
                take = min(length, offsets[rank] + sizes[rank] - start)
                pieces.append((rank, start - offsets[rank], take))
                start, length = start + take, length - take
        if dim == 0:
            for rank, start, length in pieces:
                for a, b in row_ranges((length, shape[1]), dtype.itemsize):
                    yield readers[rank].get(name, (start + a, start + b))
            return
        for rows in row_ranges(shape, dtype.itemsize):
            yield column_block(rows[1] - rows[0], shape[1], dtype,
                               [(lambda r=rank, rows=rows: readers[r].get(name, rows), start, length)
                                for rank, start, length in pieces])

    return TensorSource(name, dtype, shape, produce, where=f"{readers[0].path.parent.parent}/rank_*")


@dataclass
class ChipCopies:
    """Every chip's stored copy of each tensor of a shard dir, and what the plan says it must hold.

    ``unshard`` reads each replicated row (norms, a tied embedding, KV heads replicated over chips)
    from its first holder only; :meth:`expected` lets ``verify`` check all the others too.
    """

    layout: TPLayout
    head_dim: int
    readers: dict[str, list[SafetensorsReader]]  # HF name -> the file holding it, per chip

    @property
    def n_chips(self) -> int:
        return self.layout.n_chips

    def stored(self, name: str, rank: int) -> torch.Tensor:
        """Chip ``rank``'s copy of ``name`` as stored (a mapping of the file, not read yet)."""
        return self.readers[name][rank].get(name)

    def where(self, name: str, rank: int) -> Path:
        return self.readers[name][rank].path

    def expected(self, name: str, full: torch.Tensor, rank: int):
        """Row blocks of what chip ``rank`` must hold of ``name`` when the full tensor is ``full``."""
        if full.dim() != 2:
            yield shard_tensor(name, full, self.layout, rank, self.head_dim)
            return
        runs = shard_runs(name, tuple(full.shape), self.layout, rank, self.head_dim)
        yield from _gather(full, runs, _split_dim(name, self.layout))

    def held(self, name: str, shape: tuple[int, ...], rank: int) -> set[int]:
        """Which rows (columns of a row-parallel weight; elements of a 1-D tensor) chip ``rank`` holds."""
        if len(shape) == 2:
            runs = shard_runs(name, shape, self.layout, rank, self.head_dim)
            return {i for start, length in runs if start >= 0 for i in range(start, start + length)}
        index = torch.arange(shape[0] if shape else 1).reshape(shape)
        return set(shard_tensor(name, index, self.layout, rank, self.head_dim).reshape(-1).tolist())

    def first_holder(self, name: str, shape: tuple[int, ...], rank: int) -> int | None:
        """The lowest chip that holds part of what chip ``rank`` holds of ``name`` (None: no other)."""
        mine = self.held(name, shape, rank)
        return next((other for other in range(rank) if mine & self.held(name, shape, other)), None)


def open_tp_shards(path: str | Path) -> CheckpointView:
    """Read a shard dir: manifest, config, every chip's tensor headers (all checked against the plan)."""
    path = Path(path)
    manifest = _read_manifest(path)
    config = load_llama_config(str(path))
    n_chips = manifest["n_chips"]
    layout = tp_layout(config, n_chips)
    if (layout.kv_mode, layout.padded_vocab) != (manifest["kv_mode"], manifest["padded_vocab"]):
        raise CheckpointError(f"{path / MANIFEST}: kv_mode/padded_vocab disagree with config.json at n_chips={n_chips}; "
                              "the manifest and config do not belong together")
    head_dim = head_dim_of(config)
    readers: list[dict[str, SafetensorsReader]] = []
    for rank, sub in enumerate(manifest["ranks"]):
        if not (path / sub).is_dir():
            raise CheckpointError(f"{path / sub}: chip {rank}'s shard directory is missing; copy the complete shard dir")
        names: dict[str, SafetensorsReader] = {}
        for file in weight_files(path / sub):
            if file.suffix != ".safetensors":
                raise CheckpointError(f"{file}: shard dirs hold safetensors only")
            reader = SafetensorsReader(file)
            names.update((n, reader) for n in reader.keys())
        readers.append(names)
    expected = hf_specs(config)
    listed = {n: tuple(e["shape"]) for n, e in manifest["tensors"].items()}
    if listed != expected:
        bad = sorted(set(listed) ^ set(expected)) or [n for n in expected if listed[n] != expected[n]]
        raise CheckpointError(f"{path / MANIFEST}: tensor list disagrees with config.json (first: '{bad[0]}'); "
                              "the manifest and config do not belong together")
    sources, chip_files = {}, {}
    for name, entry in manifest["tensors"].items():
        shape, dtype = tuple(entry["shape"]), DTYPES[entry["dtype"]]
        chip_readers = []
        for rank, names in enumerate(readers):
            if name not in names:
                raise CheckpointError(f"{path / manifest['ranks'][rank]}: tensor '{name}' missing from chip {rank}'s shard")
            info = names[name].tensors[name]
            want = shard_shape(name, shape, dtype, layout, rank, head_dim)
            if info.shape != want or info.dtype != dtype:
                raise CheckpointError(f"{names[name].path}: tensor '{name}' is {info.dtype} {list(info.shape)}, "
                                      f"the TP plan gives chip {rank} {dtype} {list(want)}")
            chip_readers.append(names[name])
        sources[name] = _unshard_source(name, shape, dtype, chip_readers, layout, config)
        chip_files[name] = chip_readers
    gen_file = path / "generation_config.json"
    view = CheckpointView(path, "tp-shards", config, sources,
                          read_json(gen_file) if gen_file.is_file() else None,
                          TokenizerSource.from_hf_dir(path), native_tensors=sum(len(r) for r in readers),
                          chips=ChipCopies(layout, head_dim, chip_files))
    view.generation_config = view.generation_config or generation_config_for(view)
    return view

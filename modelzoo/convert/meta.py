"""Meta-native checkpoint dirs (``params.json`` + ``consolidated.NN.pth``), read as a view and written.

Reading merges the model-parallel (MP) files tensor by tensor as :mod:`modelzoo.models.llama.meta_format`
says: dim-0 pieces (q/k/v/w1/w3/output, the Llama-3 embedding) are yielded one after the other
(q/k permuted per piece, each piece holding whole heads), dim-1 pieces (wo/w2, the Llama-2
embedding) are concatenated a row block at a time, replicated norms are taken once and checked
equal. KV heads duplicated across files (MP > n_kv_heads, e.g. Llama-3.1-405B MP16) are detected,
checked identical and taken once. Every shape is checked against ``params.json`` before anything
is written, so a bad checkpoint fails fast with the file and tensor named.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import LlamaConfig

from modelzoo.checkpoint.hf_weights import CheckpointError
from modelzoo.checkpoint.json_file import read_json
from modelzoo.checkpoint.safetensors_io import nbytes_of
from modelzoo.checkpoint.torch_io import TorchFile, TorchPthWriter
from modelzoo.models.llama import meta_format as mf
from modelzoo.models.llama.presets import get_preset

from .tokenizer import TokenizerSource
from .view import (
    CheckpointView,
    TensorSource,
    aligned_rows,
    column_block,
    mapped_rows,
    row_blocks,
    row_ranges,
)

_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")


def meta_files(path: Path) -> list[Path]:
    """``consolidated.00.pth`` ... in rank order; errors name missing ranks."""
    found = {int(m.group(1)): path / m.group(0) for p in path.iterdir() if (m := _SHARD_RE.match(p.name))}
    if not found:
        raise CheckpointError(f"{path}: no consolidated.NN.pth files; point --input at the Meta download directory")
    missing = [f"consolidated.{i:02d}.pth" for i in range(max(found) + 1) if i not in found]
    if missing:
        raise CheckpointError(f"{path}: model-parallel shard(s) {', '.join(missing)} missing (found "
                              f"{len(found)} of {max(found) + 1}); copy the complete download")
    return [found[i] for i in sorted(found)]


def read_params_file(path: Path) -> dict:
    file = path / "params.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: no params.json; copy it from the Meta download (it holds the architecture)")
    return read_json(file)


class _Layout:
    """How ``n_files`` MP ranks split each tensor of ``config`` (per-rank shapes, KV duplication)."""

    def __init__(self, config: LlamaConfig, n_files: int, emb_dim: int) -> None:
        self.config, self.k, self.emb_dim = config, n_files, emb_dim
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = mf.head_dim_of(config)
        self.kv_dup = 1
        problems = [f"n_heads={heads}"] if heads % n_files else []
        if config.intermediate_size % n_files:
            problems.append(f"FFN width {config.intermediate_size}")
        if kv % n_files:
            if n_files % kv:
                problems.append(f"n_kv_heads={kv}")
            else:
                self.kv_dup = n_files // kv  # each KV head on kv_dup consecutive files
        split = config.vocab_size if emb_dim == 0 else config.hidden_size
        if split % n_files:
            problems.append(f"{'vocab' if emb_dim == 0 else 'dim'} {split} of the embedding")
        if problems:
            raise CheckpointError(f"{', '.join(problems)} cannot be split over {n_files} model-parallel files")

    def split_dim(self, name: str) -> int | None:
        dim = mf.mp_split_dim(name)
        return self.emb_dim if dim == mf.EMBEDDING else dim

    def kv_dup_of(self, name: str) -> int:
        return self.kv_dup if mf.suffix(name) in ("attention.wk.weight", "attention.wv.weight") else 1

    def full_shape(self, name: str) -> tuple[int, ...]:
        # written out, not read from hf_specs: building the model on the meta device costs ~3 MiB of
        # peak RSS that bench_convert's meta-to-hf shows
        c = self.config
        q, kv = c.num_attention_heads * self.head_dim, c.num_key_value_heads * self.head_dim
        return {
            "tok_embeddings.weight": (c.vocab_size, c.hidden_size), "output.weight": (c.vocab_size, c.hidden_size),
            "norm.weight": (c.hidden_size,), "attention_norm.weight": (c.hidden_size,),
            "ffn_norm.weight": (c.hidden_size,), "attention.wq.weight": (q, c.hidden_size),
            "attention.wk.weight": (kv, c.hidden_size), "attention.wv.weight": (kv, c.hidden_size),
            "attention.wo.weight": (c.hidden_size, q), "feed_forward.w1.weight": (c.intermediate_size, c.hidden_size),
            "feed_forward.w3.weight": (c.intermediate_size, c.hidden_size),
            "feed_forward.w2.weight": (c.hidden_size, c.intermediate_size),
        }[mf.suffix(name)]

    def shard_shape(self, name: str) -> tuple[int, ...]:
        shape = list(self.full_shape(name))
        dim = self.split_dim(name)
        if dim is not None:
            shape[dim] = shape[dim] * self.kv_dup_of(name) // self.k
        return tuple(shape)

    def heads_per_shard(self, name: str) -> int | None:
        heads = mf.rotary_heads(name, self.config)
        return None if heads is None else heads * self.kv_dup_of(name) // self.k


def _merged_source(name: str, files: list[Path], readers: list[TorchFile], layout: _Layout,
                   dtype: torch.dtype, hf: str) -> TensorSource:
    dim, dup = layout.split_dim(name), layout.kv_dup_of(name)
    heads = layout.heads_per_shard(name)
    shape = layout.full_shape(name)

    def check_same(first: int, others: range, tensor: torch.Tensor, why: str) -> None:
        for i in others:
            if not torch.equal(readers[i].get(name), tensor):
                raise CheckpointError(f"{files[i]}: tensor '{name}' differs from consolidated.{first:02d}.pth; {why} "
                                      "must be identical in every file (the download is inconsistent)")

    def produce():
        if dim is None:
            tensor = readers[0].get(name)
            check_same(0, range(1, len(readers)), tensor, "replicated tensors")
            yield tensor
        elif dim == 0:
            for first in range(0, len(readers), dup):
                if dup > 1:
                    piece = readers[first].get(name)
                    check_same(first, range(first + 1, first + dup), piece, "KV heads duplicated across files")
                if heads is not None:  # whole heads per piece: permute the piece, then stream it
                    yield from row_blocks(mf.permute_to_hf(readers[first].get(name), heads))
                else:
                    piece_shape = readers[first].tensors[name][1]
                    yield from mapped_rows(lambda rows, r=readers[first]: r.get(name, rows), piece_shape, dtype)
        else:
            for rows in row_ranges(shape, dtype.itemsize):
                yield column_block(rows[1] - rows[0], shape[1], dtype,
                                   [(lambda r=reader, rows=rows: r.get(name, rows), 0, reader.tensors[name].shape[1])
                                    for reader in readers])

    where = f"{files[0].parent}/consolidated.*.pth"
    return TensorSource(hf, dtype, shape, produce, where=where)


def _check_names(files: list[Path], readers: list[TorchFile], n_layers: int) -> bool:
    """Every file holds exactly the names ``params.json`` implies; returns whether ``output.weight`` exists."""
    wanted = mf.meta_names(n_layers)
    for file, reader in zip(files, readers, strict=True):
        names = {n for n in reader.keys() if n not in mf.IGNORED_META_NAMES}
        missing = [n for n in wanted if n not in names and n != "output.weight"]
        extra = sorted(names - set(wanted))
        if missing:
            raise CheckpointError(f"{file}: tensor '{missing[0]}' missing"
                                  f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                                  f"params.json says n_layers={n_layers}: the file is incomplete or params.json is wrong")
        if extra:
            raise CheckpointError(f"{file}: unexpected tensor '{extra[0]}'; params.json says n_layers={n_layers} "
                                  "(fix params.json, or this is not a Llama checkpoint)")
    has_output = ["output.weight" in r.tensors for r in readers]
    if any(has_output) and not all(has_output):
        raise CheckpointError(f"{files[has_output.index(False)]}: tensor 'output.weight' missing while other files "
                              "have it; the download is inconsistent")
    return has_output[0]


def _mp_and_vocab(path: Path, files: list[Path], readers: list[TorchFile], params: dict) -> tuple[int, int]:
    """(embedding split dim, vocab size) from the shard shapes; errors name missing files."""
    head_dim = params["dim"] // params["n_heads"]
    q_rows = readers[0].tensors["layers.0.attention.wq.weight"][1][0]
    if q_rows == 0 or (params["n_heads"] * head_dim) % q_rows:
        raise CheckpointError(f"{files[0]}: tensor 'layers.0.attention.wq.weight' has {q_rows} rows, which does not "
                              f"divide n_heads*head_dim={params['n_heads'] * head_dim} from params.json")
    n_mp = params["n_heads"] * head_dim // q_rows
    if n_mp != len(files):
        more = [f"consolidated.{i:02d}.pth" for i in range(len(files), n_mp)]
        what = f"missing {', '.join(more[:4])}{' ...' if len(more) > 4 else ''}" if more else "too many files"
        raise CheckpointError(f"{path}: shard shapes imply {n_mp} model-parallel files but {len(files)} found ({what}); "
                              "copy the complete download")
    emb = readers[0].tensors["tok_embeddings.weight"][1]
    if len(emb) == 2 and (len(files) == 1 or emb[1] == params["dim"]):
        return 0, emb[0] * len(files)  # Llama-3: vocab-parallel
    if len(emb) == 2 and emb[1] * len(files) == params["dim"]:
        return 1, emb[0]  # Llama-2: split along dim
    raise CheckpointError(f"{files[0]}: tensor 'tok_embeddings.weight' has shape {list(emb)}, which fits neither "
                          f"dim={params['dim']} nor dim/{len(files)}; params.json and the weights disagree")


def _check_shapes(files: list[Path], readers: list[TorchFile], layout: _Layout) -> None:
    for file, reader in zip(files, readers, strict=True):
        for name, (dtype, shape) in reader.tensors.items():
            if name in mf.IGNORED_META_NAMES:
                continue
            want = layout.shard_shape(name)
            if tuple(shape) != want:
                raise CheckpointError(f"{file}: tensor '{name}' has shape {list(shape)}, expected {list(want)} for "
                                      f"params.json with {len(files)} model-parallel file(s); the file does not "
                                      "belong to this checkpoint, or params.json is wrong")
            if dtype != readers[0].tensors[name][0]:
                raise CheckpointError(f"{file}: tensor '{name}' is {dtype}, but {files[0].name} has "
                                      f"{readers[0].tensors[name][0]}")


def open_meta(path: str | Path, model_size: str | None = None, tie: str = "auto",
              instruct: bool = False) -> CheckpointView:
    """Read a Meta dir: params, MP layout and every shard's tensor headers, all checked up front.

    ``tie``: ``auto`` ties the LM head when ``output.weight`` is absent or equals the embedding
    (Llama-3.2), ``yes``/``no`` force it. ``model_size``: a preset checked against ``params.json``
    that supplies what Meta does not store (context length, rope factor, bos/eos).
    """
    path = Path(path)
    params_raw = read_params_file(path)
    params = mf.read_params(params_raw, str(path / "params.json"))
    files = meta_files(path)
    readers = [TorchFile(f) for f in files]
    has_output = _check_names(files, readers, params["n_layers"])
    emb_dim, vocab = _mp_and_vocab(path, files, readers, params)

    tokenizer_file = path / "tokenizer.model"
    tokenizer = TokenizerSource([], tokenizer_file) if tokenizer_file.is_file() else None
    special = tokenizer.special_ids(instruct) if tokenizer else {}
    if special and special["size"] > vocab:
        raise CheckpointError(f"{tokenizer_file}: {special['size']} tokens but the embedding has {vocab} rows; "
                              "this tokenizer belongs to another model")
    preset = None
    if model_size:
        preset = get_preset(model_size)
        preset.name_or_path = model_size

    def make_config(tied: bool, preset: LlamaConfig | None = preset) -> LlamaConfig:
        return mf.config_to_hf(params_raw, vocab_size=vocab, tie_word_embeddings=tied, preset=preset,
                               bos_token_id=special.get("bos_token_id"), eos_token_id=special.get("eos_token_id"),
                               source=str(path / "params.json"))

    try:
        layout = _Layout(make_config(False, preset=None), len(files), emb_dim)  # shapes do not depend on tying
    except CheckpointError as err:
        raise CheckpointError(f"{path / 'params.json'}: {err}") from err
    _check_shapes(files, readers, layout)

    def source_of(name: str, hf: str) -> TensorSource:
        return _merged_source(name, files, readers, layout, readers[0].tensors[name][0], hf)

    notes = []
    if tie == "auto":
        tied = not has_output or _equal(source_of("tok_embeddings.weight", "emb"), source_of("output.weight", "out"))
        if tied:
            notes.append("tied embeddings: " + ("no output.weight" if not has_output else
                                                "output.weight equals tok_embeddings.weight"))
    else:
        tied = tie == "yes"
        if not tied and not has_output:
            raise CheckpointError(f"{files[0]}: no output.weight, so the LM head must be tied; drop "
                                  "--tie-word-embeddings no")
    layout.config = config = make_config(tied)
    if layout.kv_dup > 1:
        notes.append(f"KV heads duplicated over {layout.kv_dup} files each: read once")
    sources = {mf.hf_name(name): source_of(name, mf.hf_name(name)) for name in mf.meta_names(params["n_layers"])
               if not (name == "output.weight" and tied)}
    native = sum(len(r.tensors) for r in readers)
    return CheckpointView(path, "meta", config, sources, None, tokenizer, notes, native_tensors=native)


def _equal(a: TensorSource, b: TensorSource) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return all(torch.equal(x, y) for x, y in aligned_rows(a, b))


def write_meta(view: CheckpointView, out_dir: Path, progress, n_mp: int = 1, embedding_split: str = "auto") -> None:
    """Write ``view`` as ``params.json`` + ``consolidated.NN.pth`` (``n_mp`` files) + ``tokenizer.model``.

    Each output tensor is built whole (``torch.save`` records are written in one piece), from one
    input tensor at a time.
    """
    config = view.config
    params = mf.config_from_hf(config)
    emb_dim = mf.embedding_split_dim(config) if embedding_split == "auto" else {"vocab": 0, "dim": 1}[embedding_split]
    layout = _Layout(config, n_mp, emb_dim)
    names = mf.meta_names(config.num_hidden_layers)
    dtypes = {name: view.sources[_hf_for(name, config)].dtype for name in names}
    specs = [(n, dtypes[n], layout.shard_shape(n)) for n in names]
    progress.total = n_mp * sum(nbytes_of(*spec[1:]) for spec in specs)
    writers = [TorchPthWriter(out_dir / f"consolidated.{r:02d}.pth", specs) for r in range(n_mp)]
    for name in names:
        src = view.sources[_hf_for(name, config)]
        progress.set_postfix_str(name, refresh=False)
        full = src.materialize()
        dim, dup, heads = layout.split_dim(name), layout.kv_dup_of(name), layout.heads_per_shard(name)
        for rank, writer in enumerate(writers):
            piece = full
            if dim is not None and n_mp > 1:
                size = full.shape[dim] * dup // n_mp
                start = (rank // dup) * size
                piece = full.narrow(dim, start, size)
            if heads is not None:
                piece = mf.permute_to_meta(piece, heads)
            progress.update(writer.write(name, piece))
            del piece
        del full
    for writer in writers:
        writer.close()
    (out_dir / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    if view.tokenizer is None or not view.tokenizer.write_meta(out_dir):
        view.notes.append("no tokenizer.model written (the input has none Meta's format can hold)")


def _hf_for(meta: str, config: LlamaConfig) -> str:
    if meta == "output.weight" and config.tie_word_embeddings:
        return "model.embed_tokens.weight"
    return mf.hf_name(meta)

"""``merge-lora``: a base checkpoint with a LoRA/DoRA adapter folded into its weights.

Every adapted projection ``W`` [out, in] with factors ``A`` [r, in], ``B`` [out, r] (and for DoRA
the magnitude ``m`` [out]) becomes :func:`~modelzoo.peft.merged_weight` ``(W, A, B, scaling, m)``:
what ``PeftModel.merge_and_unload`` computes, in fp32, stored in ``W``'s dtype. Both merges act on
each output row on its own (DoRA's norm is taken per row), so ``W`` streams a row block at a time and
memory stays near one block, whatever the model size. A tensor trained in full
(``modules_to_save``) replaces the base tensor; every other tensor is the base's, unchanged. The
result is a :class:`~modelzoo.convert.view.CheckpointView`, so ``write_hf`` writes it like any
conversion and ``verify --adapter`` compares a merged dir with it.

Before anything is written, the adapter is checked against the base: every key must adapt a base
tensor, with the shapes that tensor implies, and every projection ``target_modules`` names must have
both factors (and a magnitude for DoRA). Errors name the file and the key.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelzoo.peft.adapters import (
    ADAPTER_WEIGHTS,
    KEY_PARTS,
    PEFT_PREFIX,
    AdapterError,
    adapter_scaling,
    merged_weight,
    read_adapter,
    split_key,
)

from .tokenizer import TokenizerSource
from .view import BLOCK_BYTES, CheckpointView, TensorSource, rechunk_rows

_FIX = "the adapter was trained for another base model; use its base (adapter_config.json's base_model_name_or_path)"


@dataclass
class _Adapted:
    """The adapter tensors of one projection, with the file keys they came from (for messages)."""

    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)


def _group(state: dict[str, torch.Tensor], file: Path) -> tuple[dict[str, _Adapted], dict[str, tuple[str, torch.Tensor]]]:
    """``({module: its factors}, {base tensor name: (key, tensor)})`` of an adapter file."""
    adapted: dict[str, _Adapted] = {}
    full: dict[str, tuple[str, torch.Tensor]] = {}
    for key in sorted(state):
        name, part = split_key(key, file)
        if part == "full":
            full[name] = (key, state[key])
        else:
            entry = adapted.setdefault(name, _Adapted())
            entry.parts[part], entry.keys[part] = state[key], key
    return adapted, full


def _shape_error(file: Path, key: str, got: torch.Tensor, want: tuple[int, ...], base: CheckpointView,
                 name: str) -> AdapterError:
    return AdapterError(f"{file}: tensor '{key}' has shape {list(got.shape)} but base {base.path} tensor '{name}' "
                        f"is {list(base.sources[name].shape)}, which needs {list(want)}: {_FIX}")


def _check_projection(module: str, entry: _Adapted, base: CheckpointView, config, file: Path) -> None:
    """Both factors (and DoRA's magnitude) present, with the shapes ``module.weight`` implies."""
    name = f"{module}.weight"
    some_key = next(iter(entry.keys.values()))
    if name not in base.sources:
        raise AdapterError(f"{file}: tensor '{some_key}' adapts '{module}', which base {base.path} does not have "
                           f"(no tensor '{name}'): {_FIX}")
    wanted = ("lora_A", "lora_B", "magnitude") if config.use_dora else ("lora_A", "lora_B")
    suffix = {part: end for end, part in KEY_PARTS.items()}
    for part in wanted:
        if part not in entry.parts:
            what = "DoRA (use_dora) needs a magnitude per projection" if part == "magnitude" else "LoRA needs both factors"
            raise AdapterError(f"{file} lacks tensor '{PEFT_PREFIX}{module}{suffix[part]}' ({what}; the file has "
                               f"'{some_key}'): it is incomplete or its adapter_config.json does not match it; "
                               "re-save the adapter")
    if "magnitude" in entry.parts and not config.use_dora:
        raise AdapterError(f"{file}: tensor '{entry.keys['magnitude']}' is a DoRA magnitude but adapter_config.json "
                           "has use_dora false; re-save the adapter")
    out_features, in_features = base.sources[name].shape
    want = {"lora_A": (config.r, in_features), "lora_B": (out_features, config.r), "magnitude": (out_features,)}
    for part, tensor in entry.parts.items():
        if tuple(tensor.shape) != want[part]:
            raise _shape_error(file, entry.keys[part], tensor, want[part], base, name)


def _check_coverage(adapted: dict[str, _Adapted], base: CheckpointView, config, file: Path) -> None:
    """Every base projection ``target_modules`` names has an adapter (peft adapts all of them)."""
    targets = set(config.target_modules)
    for name in base.sources:
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in targets and module not in adapted:
            raise AdapterError(f"{file} lacks tensor '{PEFT_PREFIX}{module}.lora_A.weight': adapter_config.json's "
                               f"target_modules names '{module.rsplit('.', 1)[-1]}', but the file has no adapter for "
                               f"'{module}'; the file is incomplete or belongs to another base model")


def _merged_source(src: TensorSource, entry: _Adapted, scaling: float) -> TensorSource:
    """``src`` with the adapter merged, a row block at a time (rows sized for the fp32 temporaries)."""
    lora_a, lora_b = entry.parts["lora_A"], entry.parts["lora_B"]
    magnitude = entry.parts.get("magnitude")

    def produce() -> Iterator[torch.Tensor]:
        start = 0
        block = BLOCK_BYTES * src.dtype.itemsize // 4
        for rows in rechunk_rows(src.chunks(), block):
            stop = start + rows.shape[0]
            yield merged_weight(rows, lora_a, lora_b[start:stop], scaling,
                                None if magnitude is None else magnitude[start:stop])
            start = stop

    return TensorSource(src.name, src.dtype, src.shape, produce, where=f"{src.where} + {entry.keys['lora_A']}")


def _full_source(name: str, key: str, tensor: torch.Tensor, base: CheckpointView, file: Path) -> TensorSource:
    """A ``modules_to_save`` tensor in place of the base's (in the base's dtype)."""
    if name not in base.sources:
        tied = name == "lm_head.weight" and base.config.tie_word_embeddings
        why = (f"base {base.path} ties lm_head to embed_tokens (tie_word_embeddings), so it has no separate "
               "lm_head to replace; merge it with peft" if tied else f"base {base.path} has no tensor '{name}': {_FIX}")
        raise AdapterError(f"{file}: tensor '{key}' (modules_to_save) replaces '{name}', but {why}")
    src = base.sources[name]
    if tuple(tensor.shape) != src.shape:
        raise _shape_error(file, key, tensor, src.shape, base, name)
    value = tensor.to(src.dtype)
    return TensorSource(name, src.dtype, src.shape, lambda: iter([value]), where=f"{file}:{key}", whole=lambda: value)


def merged_view(base: CheckpointView, adapter_dir: str | Path) -> CheckpointView:
    """``base`` as it is with the adapter in ``adapter_dir`` merged; checks everything first (see
    module doc) and reads no base weight until a writer asks for it."""
    adapter_dir = Path(adapter_dir)
    config, state = read_adapter(adapter_dir)
    file = adapter_dir / ADAPTER_WEIGHTS
    adapted, full = _group(state, file)
    for module, entry in adapted.items():
        _check_projection(module, entry, base, config, file)
    _check_coverage(adapted, base, config, file)
    replaced = {name: _full_source(name, key, tensor, base, file) for name, (key, tensor) in full.items()}
    scaling = adapter_scaling(config)
    sources = {}
    for name, src in base.sources.items():
        module = name.removesuffix(".weight")
        if name in replaced:
            sources[name] = replaced[name]
        elif name.endswith(".weight") and module in adapted:
            sources[name] = _merged_source(src, adapted[module], scaling)
        else:
            sources[name] = src
    method = "DoRA" if config.use_dora else "LoRA"
    note = (f"merged {method} adapter {adapter_dir} (r={config.r}, scaling {scaling:g}) into {len(adapted)} "
            f"projections" + (f"; {len(replaced)} tensor(s) replaced (modules_to_save)" if replaced else ""))
    tokenizer = TokenizerSource.from_hf_dir(adapter_dir) or base.tokenizer  # the one the adapter was trained with
    return CheckpointView(base.path, base.kind, base.config, sources, base.generation_config, tokenizer,
                          [*base.notes, note], native_tensors=base.native_tensors)


def base_with_adapter(base: CheckpointView, adapter_dir: str | Path) -> torch.nn.Module:
    """The base as a stock HF model in fp32 running the adapter *unmerged* (peft's LoRA layers):
    the independent side ``verify --adapter`` compares a merged checkpoint's logits with."""
    from modelzoo.peft import load_adapter

    from .view import build_model

    model = build_model(base)
    load_adapter(model, adapter_dir)
    return model.eval()

"""Load a model for generation: float, int8 quantized at start-up, or a pre-quantized int8 directory,
optionally with a LoRA/DoRA adapter.

A pre-quantized directory (written by the conversion tool, format in
:mod:`modelzoo.checkpoint.int8`) is built on the meta device, its listed modules are swapped for
int8 modules (``Int8Linear``, or :class:`~modelzoo.generation.kernels.Int8Embedding` for an
embedding), and its tensors stream straight into place: the float weights never exist.

An adapter (a ``peft`` dir) is added to the float base unmerged, as peft's own LoRA layers
(:func:`modelzoo.peft.load_adapter`), so the base stays shared and exact and tensor parallelism
splits the factors with their projections. It is refused with int8 weights: peft's layers need a
float base weight (DoRA reads it every step), and merging first (``modelzoo-convert merge-lora``),
then quantizing the merged model, quantizes the function that is actually run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from modelzoo.checkpoint.hf_weights import CheckpointError, load_weights_
from modelzoo.checkpoint.int8 import METHOD, QUANT_KEY, Int8Linear, quantizable_linears
from modelzoo.models.llama import (
    build_llama,
    from_pretrained,
    is_preset,
    load_llama_config,
    patch_llama,
    resolve_dtype,
)

from .kernels import Int8Embedding, tied_int8_head

#: Precision patches that act through module forwards, which the generation decoder calls.
GENERATION_PATCHES = ("fp32_ln", "fp32_logits")


def is_prequantized(path_or_preset: str) -> bool:
    config = Path(path_or_preset) / "config.json"
    return not is_preset(path_or_preset) and config.is_file() and QUANT_KEY in config.read_text()


def quantize_for_generation_(model: LlamaForCausalLM, embeddings: bool = True) -> list[str]:
    """Int8 weight-only, in place: every linear (per output channel) and, with ``embeddings``, the
    token embedding (per row; a tied LM head then shares it). Returns the quantized module names."""
    tied = bool(model.config.tie_word_embeddings)
    names = []
    for name in quantizable_linears(model):
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr,
                Int8Linear.from_linear(model.get_submodule(name)))
        names.append(name)
    if embeddings:
        model.model.embed_tokens = Int8Embedding.from_embedding(model.model.embed_tokens)
        names.append("model.embed_tokens")
        if tied:
            model.lm_head = tied_int8_head(model.model.embed_tokens)
    setattr(model.config, QUANT_KEY, {"method": METHOD, "scheme": "per_output_channel_absmax", "modules": names})
    return names


def _swap_to_int8(model: LlamaForCausalLM, modules: list[str], source: Path) -> None:
    for name in modules:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{source / 'config.json'}: {QUANT_KEY}.modules names '{name}', which this "
                                  "Llama model does not have; re-run the int8 conversion") from None
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if isinstance(module, nn.Linear):
            new = Int8Linear(module.in_features, module.out_features, module.bias is not None, device="meta")
        elif isinstance(module, nn.Embedding):
            new = Int8Embedding(module.num_embeddings, module.embedding_dim, module.weight.dtype,
                                module.padding_idx, device="meta")
        else:
            raise CheckpointError(f"{source / 'config.json'}: {QUANT_KEY}.modules names '{name}', a "
                                  f"{type(module).__name__}; only Linear and Embedding modules can be int8")
        setattr(owner, attr, new)


def load_prequantized(path: str | Path, dtype: str | torch.dtype = "float32",
                      device: str | torch.device = "cpu") -> LlamaForCausalLM:
    """A model from a pre-quantized int8 directory (int8 weights + fp32 scales, rest in ``dtype``)."""
    path = Path(path)
    config = load_llama_config(str(path))
    spec: Any = getattr(config, QUANT_KEY, None)
    if not isinstance(spec, dict) or spec.get("method") != METHOD or not isinstance(spec.get("modules"), list):
        raise CheckpointError(f"{path / 'config.json'}: {QUANT_KEY} must be {{\"method\": \"{METHOD}\", "
                              f"\"modules\": [...]}}, got {spec!r}; re-run the int8 conversion")
    dtype = resolve_dtype(dtype)
    model = build_llama(config, dtype=dtype, device="meta")
    modules = list(spec["modules"])
    tied = bool(config.tie_word_embeddings)
    _swap_to_int8(model, modules, path)
    embed_int8 = isinstance(model.model.embed_tokens, Int8Embedding)
    if tied and embed_int8:
        model.lm_head = tied_int8_head(model.model.embed_tokens)
    tied_map = {"lm_head.weight": "model.embed_tokens.weight"} if tied and not embed_int8 else {}
    load_weights_(model, path, device=device, dtype=None, tied=tied_map)  # keep int8 and fp32 scales as stored
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if dtype is not None and param.is_floating_point() and param.dtype != dtype:
                setattr(module, name, nn.Parameter(param.to(dtype), requires_grad=False))
    if tied and embed_int8:
        model.lm_head = tied_int8_head(model.model.embed_tokens)
    elif tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    if isinstance(model.model.embed_tokens, Int8Embedding) and dtype is not None:
        model.model.embed_tokens.out_dtype = dtype
    with torch.device(device):
        model.model.rotary_emb = LlamaRotaryEmbedding(config=model.config)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def _refuse_int8(adapter: str | Path, source: str, quantize: str) -> None:
    if quantize == "int8" or is_prequantized(source):
        raise CheckpointError(f"--adapter {adapter} with int8 weights is not supported (peft's adapter layers need "
                              "the float base); merge it first (modelzoo-convert merge-lora --adapter ADAPTER "
                              "--output DIR), then generate from DIR with --quantize int8")


def check_adapter(adapter: str | Path, source: str, quantize: str = "none",
                  overrides: dict[str, Any] | None = None):
    """Everything :func:`load_for_generation` would refuse about ``adapter`` on ``source``, without
    loading weights: int8, and the adapter's files, options and shapes against the base's config
    (applied to the base built on the meta device). Raises one-line errors naming file and key;
    returns the adapter's ``LoraConfig``."""
    from modelzoo.peft import load_adapter

    _refuse_int8(adapter, source, quantize)
    config = load_llama_config(source, overrides)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return load_adapter(model, adapter)


def load_for_generation(source: str, *, dtype: str = "float32", device: str | torch.device = "cpu",
                        quantize: str = "none", seed: int = 0, overrides: dict[str, Any] | None = None,
                        precision: dict[str, bool] | None = None, adapter: str | Path | None = None
                        ) -> LlamaForCausalLM:
    """The model to generate with.

    Args:
        source: HF checkpoint dir (float or pre-quantized int8) or a preset (random weights, ``seed``).
        quantize: ``none`` or ``int8`` (quantize a float checkpoint at start-up; a pre-quantized dir
            is int8 either way).
        overrides: architecture fields for a preset.
        precision: ``{"fp32_ln": bool, "fp32_logits": bool}`` patches (they matter in bf16).
        adapter: a ``peft`` LoRA/DoRA adapter dir added to the float base, unmerged and frozen.
    """
    if quantize not in ("none", "int8"):
        raise ValueError(f"unknown quantization '{quantize}'; use none or int8")
    if adapter is not None:
        _refuse_int8(adapter, source, quantize)
    if is_prequantized(source):
        model = load_prequantized(source, dtype, device)
    else:
        model = from_pretrained(source, dtype=dtype, device=device, overrides=overrides, seed=seed, patch=False)
        if adapter is not None:
            from modelzoo.peft import load_adapter

            load_adapter(model, adapter)
        if quantize == "int8":
            quantize_for_generation_(model)
    enabled = [name for name in GENERATION_PATCHES if (precision or {}).get(name)]
    if enabled:
        patch_llama(model, {"patches": enabled})
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def model_nbytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = (tensor.data_ptr(), tensor.dtype, tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total

"""Which weights, adapter and tokenizer a ``--checkpoint`` / ``--adapter`` / ``--tokenizer`` trio
means, for the commands that run a model (``modelzoo-serve``, ``modelzoo-eval``).

``--checkpoint`` is an HF dir (float or pre-quantized int8), a training run's dir or checkpoints dir
(its newest checkpoint), a LoRA run's (its base + its newest adapter), or a preset name (random
weights). Every user error is raised here as :class:`ModelSourceError` (one line), before weights
load or processes start.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class ModelSourceError(ValueError):
    """A ``--checkpoint`` / ``--adapter`` that cannot be used; one line naming it and the fix."""


@dataclass
class ModelSource:
    """The resolved weights (``source``: a dir or a preset), adapter dir and tokenizer dir."""

    source: str
    adapter: str | None = None
    tokenizer_dir: str | None = None


def resolve_model_source(checkpoint: str, adapter: str | None, tokenizer_dir: str | None, *,
                         n_chips: int = 1, quantize: str = "none", tokenizer: bool = True):
    """The :class:`ModelSource` behind the flags and the model's ``LlamaConfig``; checks the
    tensor-parallel split, the adapter against the base and (``tokenizer``) the tokenizer's
    vocabulary."""
    from modelzoo.checkpoint.manager import resolve_model_dir
    from modelzoo.generation.loading import check_adapter, is_prequantized
    from modelzoo.generation.tokenizer import check_vocab
    from modelzoo.models.llama import is_preset, load_llama_config
    from modelzoo.models.llama.parallelize import check_tensor_parallel
    from modelzoo.peft.locate import adapter_base, holds_adapter, resolve_adapter_dir

    source = checkpoint
    if not is_preset(source):
        if not Path(source).exists():
            raise ModelSourceError(f"--checkpoint {source}: no such directory (and not a preset name)")
        source = str(resolve_model_dir(source))
    adapter = str(resolve_adapter_dir(adapter)) if adapter else None
    if holds_adapter(source):
        if adapter:
            raise ModelSourceError(f"--checkpoint {source} is an adapter and --adapter {adapter} another; give the base "
                             "model as --checkpoint")
        adapter, source = source, str(adapter_base(source, f"give the base as --checkpoint BASE --adapter {source}"))
    if n_chips > 1 and (quantize != "none" or is_prequantized(source)):
        raise ModelSourceError(f"--n-chips {n_chips} with int8 weights is not supported; use a float checkpoint and no "
                         "--quantize, or --n-chips 1")
    config = load_llama_config(source)
    if n_chips > 1:
        check_tensor_parallel(config.num_attention_heads, config.num_key_value_heads, n_chips, source,
                              config.intermediate_size)
    if adapter:
        check_adapter(adapter, source, quantize)
    resolved = ModelSource(source, adapter, tokenizer_dir)
    if tokenizer:
        loaded, where = load_source_tokenizer(resolved)
        check_vocab(loaded, config.vocab_size, where, source)
    return resolved, config


def load_source_tokenizer(source: ModelSource):
    """``(tokenizer, where it came from)``: ``--tokenizer``, else the adapter's, else the checkpoint's;
    a preset without one gets a byte-level stand-in."""
    from modelzoo.generation import ByteTokenizer, load_tokenizer
    from modelzoo.generation.tokenizer import has_tokenizer
    from modelzoo.models.llama import is_preset

    if source.tokenizer_dir:
        return load_tokenizer(source.tokenizer_dir), source.tokenizer_dir
    if source.adapter and has_tokenizer(source.adapter):
        return load_tokenizer(source.adapter), source.adapter
    if is_preset(source.source) and not has_tokenizer(source.source):
        return ByteTokenizer(), "byte-level stand-in"
    return load_tokenizer(source.source), source.source

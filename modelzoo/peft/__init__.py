"""Low-rank adapters (LoRA, DoRA) on a frozen Llama base, exchanged in the ``peft`` format.

The adapter layers are ``peft``'s own (:func:`peft.inject_adapter_in_model`), so the forward and
merge semantics are exactly peft's; this package adds what a training run needs around them:
freezing, the ``peft`` file format read and written without a ``PeftModel`` wrapper (the model
keeps its HF parameter names plus ``lora_A``/``lora_B``), clear errors for adapters that do not fit
their base, and the merge used by ``modelzoo-convert merge-lora``. How the adapter factors split
under tensor parallelism is part of the Llama TP plan (``models/llama/parallelize.py``).
"""

from .adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterError,
    adapter_scaling,
    adapter_state,
    add_adapter,
    is_adapter_dir,
    load_adapter,
    lora_config,
    merged_weight,
    peft_key,
    read_adapter,
    read_adapter_config,
    set_adapter_weights,
    write_adapter,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterError",
    "adapter_scaling",
    "adapter_state",
    "add_adapter",
    "is_adapter_dir",
    "load_adapter",
    "lora_config",
    "merged_weight",
    "peft_key",
    "read_adapter",
    "read_adapter_config",
    "set_adapter_weights",
    "write_adapter",
]

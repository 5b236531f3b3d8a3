"""Adapters on a built Llama model: add, freeze, save and load in ``peft``'s format, merge.

Names. In the model an adapted projection ``model.layers.0.self_attn.q_proj`` becomes peft's
LoRA layer holding ``base_layer`` (the frozen ``nn.Linear``), ``lora_A.default`` (r x in),
``lora_B.default`` (out x r) and, for DoRA, ``lora_magnitude_vector.default`` (out). In the file
(``adapter_model.safetensors``) the keys are the ones ``PeftModel.save_pretrained`` writes:
``base_model.model.<module>.lora_A.weight``, ``...lora_B.weight``, ``...lora_magnitude_vector``,
and ``base_model.model.<module>.weight`` for a module trained in full (``modules_to_save``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelzoo.checkpoint.errors import CheckpointError
from modelzoo.config import LORA_TARGETS, PeftConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"
PEFT_PREFIX = "base_model.model."
_FACTORS = ("lora_A", "lora_B")
_MAGNITUDE = "lora_magnitude_vector"

#: adapter_config.json fields modelzoo reads only unset (these values, or null/empty): set, they
#: change the adapter's shape or math in ways its merge and tensor-parallel plan do not cover
SUPPORTED_ONLY = {
    "bias": "none", "fan_in_fan_out": False, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {},
    "layers_to_transform": None, "layer_replication": None, "target_parameters": None,
    "trainable_token_indices": None, "use_qalora": False, "exclude_modules": None,
}


class AdapterError(CheckpointError):
    """An adapter directory that cannot be used with this base; the message names the file and key."""


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def lora_config(peft: PeftConfig, base_model: str | None):
    """The ``peft.LoraConfig`` of a config's ``peft`` section (``method`` lora or dora)."""
    from peft import LoraConfig

    return LoraConfig(
        r=peft.r, lora_alpha=peft.alpha, lora_dropout=peft.dropout, target_modules=list(peft.target_modules),
        modules_to_save=list(peft.modules_to_save) or None, use_dora=peft.method == "dora",
        init_lora_weights=True if peft.init == "default" else "gaussian", bias="none", task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def adapter_scaling(config) -> float:
    """The factor on ``B A``: ``alpha / r`` (``alpha / sqrt(r)`` with rank-stabilised LoRA)."""
    return config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)


def _targets(config) -> list[str]:
    targets = config.target_modules
    return sorted([targets] if isinstance(targets, str) else targets)


def add_adapter(model: nn.Module, config, *, seed: int | None = None) -> list[str]:
    """Put peft's adapter layers on ``config.target_modules`` of ``model`` (in place), freeze every
    other weight and unfreeze ``config.modules_to_save``. Returns the adapted module names.

    ``seed`` makes the adapter init independent of the RNG's state before the call, so every
    layout (TP, DP) starts from the same adapter.
    """
    from peft import inject_adapter_in_model

    missing = [t for t in _targets(config) if t not in LORA_TARGETS]
    if missing:
        raise AdapterError(f"target_modules {missing} name no projection of a Llama model "
                           f"(valid: {', '.join(LORA_TARGETS)})")
    save = list(config.modules_to_save or [])
    inject = config.__class__(**{**config.to_dict(), "modules_to_save": None})  # handled below, unwrapped
    inject.inference_mode = False
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        inject_adapter_in_model(inject, model, adapter_name=ADAPTER_NAME)
    names = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    for name, param in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        param.requires_grad = ".lora_" in name or any(module.split(".")[-1] == s for s in save)
        if ".lora_" in name and param.dtype in (torch.bfloat16, torch.float16):
            # a low-precision base keeps a float32 adapter (and optimizer state), as peft's
            # PeftModel autocasts it: the adapter's updates are small against its weights
            param.data = param.data.float()
    if not names:
        raise AdapterError(f"no module of the model matches target_modules {_targets(config)}")
    return names


def peft_key(name: str) -> str:
    """Our parameter name -> the key ``PeftModel.save_pretrained`` writes for it."""
    for part in (*_FACTORS, _MAGNITUDE):
        tag = f".{part}.{ADAPTER_NAME}.weight"
        if name.endswith(tag):
            module = name[: -len(tag)]
            return f"{PEFT_PREFIX}{module}.{part}" + ("" if part == _MAGNITUDE else ".weight")
    return PEFT_PREFIX + name


#: file-key suffix -> the adapter part it holds (a key with none of them is a ``modules_to_save`` tensor)
KEY_PARTS = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", f".{_MAGNITUDE}": "magnitude"}
_IN_MODEL = {"lora_A": "lora_A", "lora_B": "lora_B", "magnitude": _MAGNITUDE}


def split_key(key: str, file: str | Path) -> tuple[str, str]:
    """A peft file key -> ``(name, part)``: the module and ``lora_A`` / ``lora_B`` / ``magnitude``
    for an adapter tensor, or the base tensor's name and ``full`` for a ``modules_to_save`` tensor.
    Raises :class:`AdapterError` naming ``file`` for a key peft does not write."""
    if not key.startswith(PEFT_PREFIX):
        raise AdapterError(f"{file}: tensor '{key}' is not a peft adapter key (they start with '{PEFT_PREFIX}'); "
                           "re-save the adapter with peft")
    rest = key[len(PEFT_PREFIX):]
    for suffix, part in KEY_PARTS.items():
        if rest.endswith(suffix):
            return rest[: -len(suffix)], part
    if ".lora_" in rest:
        raise AdapterError(f"{file}: tensor '{key}' is a kind of adapter tensor modelzoo does not apply (only "
                           "lora_A, lora_B, lora_magnitude_vector and modules_to_save weights); use peft for it")
    return rest, "full"


def _our_name(key: str, file: str | Path) -> str:
    """Inverse of :func:`peft_key`."""
    name, part = split_key(key, file)
    return name if part == "full" else f"{name}.{_IN_MODEL[part]}.{ADAPTER_NAME}.weight"


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (adapter) parameters as full CPU tensors under peft's file keys. A collective
    under tensor or fully-sharded data parallelism: every rank must call it."""
    from torch.distributed.tensor import DTensor

    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            tensor = param.full_tensor() if isinstance(param, DTensor) else param
            state[peft_key(name)] = tensor.detach().cpu().contiguous()
    return state


def write_adapter(out_dir: str | Path, config, state: dict[str, torch.Tensor]) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors`` into the (scratch) dir ``out_dir``,
    as ``PeftModel.save_pretrained`` writes them."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    saved = config.__class__(**config.to_dict())
    saved.inference_mode = True
    saved.save_pretrained(str(out_dir))
    save_file(dict(sorted(state.items())), out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def _unset(value: Any) -> bool:
    return value is None or value is False or value == "none" or value == {} or value == []


def read_adapter_config(adapter_dir: str | Path):
    """The ``LoraConfig`` of an adapter dir, refusing what modelzoo cannot apply exactly."""
    from peft import LoraConfig

    adapter_dir = Path(adapter_dir)
    file = adapter_dir / ADAPTER_CONFIG
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter directory {adapter_dir} does not exist; pass the dir holding "
                           f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (a LoRA run's checkpoint or a peft save)")
    if not file.is_file():
        raise AdapterError(f"{file} is missing: {adapter_dir} is not a peft adapter dir (it needs "
                           f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"{file} is not valid JSON ({err}); re-save the adapter") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{file} holds {type(raw).__name__}, not a JSON object; re-save the adapter")
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"{file}: key 'peft_type' is {raw.get('peft_type')!r}; modelzoo applies LoRA and DoRA "
                           "adapters (peft_type 'LORA') only")
    for key, value in SUPPORTED_ONLY.items():
        if key in raw and not _unset(raw[key]):
            raise AdapterError(f"{file}: key '{key}' = {raw[key]!r} is not supported (modelzoo needs {value!r}); "
                               "retrain or re-save the adapter without it, or merge it with peft itself")
    targets = raw.get("target_modules")
    if not isinstance(targets, list) or not targets or any(t not in LORA_TARGETS for t in targets):
        raise AdapterError(f"{file}: key 'target_modules' = {targets!r} is not supported: modelzoo needs a list of "
                           f"projection names out of {', '.join(LORA_TARGETS)}")
    config = LoraConfig.from_pretrained(str(adapter_dir))
    return config


def read_adapter(adapter_dir: str | Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(LoraConfig, {file key: tensor})`` of an adapter dir, with one-line errors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_adapter_config(adapter_dir)
    file = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not file.is_file():
        raise AdapterError(f"{file} is missing: the adapter dir has {ADAPTER_CONFIG} but no weights; copy the "
                           f"whole adapter dir (or re-save it: modelzoo reads {ADAPTER_WEIGHTS}, not .bin)")
    try:
        state = load_file(file)
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{file} cannot be read ({err}): the file is truncated or corrupt; copy it again") from None
    return config, state


def set_adapter_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy adapter tensors (file keys) into a model that :func:`add_adapter` prepared (plain tensors:
    before any parallelization). Every adapter tensor of the model must be in ``state`` with its shape."""
    params = dict(model.named_parameters())
    wanted = set(trainable_names(model))
    seen = set()
    for key, tensor in state.items():
        name = _our_name(key, source)
        if name not in params:
            raise AdapterError(f"{source}: tensor '{key}' adapts '{name}', which the base model does not have: the "
                               "adapter was made for another model (or another target_modules); use its base")
        param = params[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise AdapterError(f"{source}: tensor '{key}' has shape {list(tensor.shape)} but the base model needs "
                               f"{list(param.shape)}: the adapter was trained for another base model; use its base "
                               "(adapter_config.json's base_model_name_or_path)")
        with torch.no_grad():
            param.copy_(tensor.to(param.dtype))
        seen.add(name)
    missing = sorted(wanted - seen)
    if missing:
        raise AdapterError(f"{source} lacks {len(missing)} adapter tensor(s), e.g. '{peft_key(missing[0])}': the file "
                           "is incomplete or its adapter_config.json does not match it; re-save the adapter")


def load_adapter(model: nn.Module, adapter_dir: str | Path, *, trainable: bool = False):
    """Add the adapter saved in ``adapter_dir`` to ``model`` (in place; unmerged) and return its
    ``LoraConfig``. ``trainable=False`` freezes the adapter too (inference)."""
    config, state = read_adapter(adapter_dir)
    add_adapter(model, config)
    set_adapter_weights(model, state, Path(adapter_dir) / ADAPTER_WEIGHTS)
    if not trainable:
        for param in model.parameters():
            param.requires_grad = False
    return config


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                  magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """``W + scaling * B A`` (LoRA), or for DoRA ``m / ||W + scaling * B A||_row * (W + scaling * B A)``
    (the norm of each output row over the input features), computed in fp32, in ``weight``'s dtype."""
    full = weight.float() + scaling * (lora_b.float() @ lora_a.float())
    if magnitude is not None:
        full = (magnitude.float() / torch.linalg.vector_norm(full, dim=1)).unsqueeze(1) * full
    return full.to(weight.dtype)

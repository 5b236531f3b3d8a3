"""Shared helpers for the adapter tests (no tests here): tiny base dirs, adapters made by stock
``peft`` (made non-trivial: B, DoRA magnitudes and ``modules_to_save`` copies perturbed), and a
LoRA training run's checkpoint layout around an adapter.

Stock ``get_peft_model`` / ``PeftModel.from_pretrained`` emit a transformers FutureWarning; tests
that call them carry :data:`STOCK_PEFT_WARNING` as a ``filterwarnings`` mark.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from helpers.generation_fixtures import train_tokenizer
from modelzoo.models.llama import from_pretrained

STOCK_PEFT_WARNING = "ignore:.*is_gradient_checkpointing:FutureWarning"
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_base(out: Path, preset: str = "llama2_tiny", tokenizer: bool = True, **overrides) -> Path:
    """A tiny random HF base dir (config, generation config with eos 2, safetensors, tokenizer)."""
    model = from_pretrained(preset, seed=0, patch=False, overrides=overrides or None)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(str(out))
    if tokenizer:
        train_tokenizer(out)
    return out


def save_stock_adapter(base: Path, out: Path, *, dora: bool = False, targets: list[str] | None = None,
                       modules_to_save: list[str] | None = None, seed: int = 1, base_path: str | None = None) -> Path:
    """An adapter made and saved by stock peft on ``base``, its trainable tensors perturbed so that
    merging it changes every adapted weight. ``base_path`` is written as base_model_name_or_path."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets or ALL_TARGETS, use_dora=dora,
                        modules_to_save=modules_to_save, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "lora_B" in name:
                param.copy_(0.2 * noise)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * noise)
            elif "modules_to_save" in name:
                param.add_(0.05 * noise)
    peft_model.save_pretrained(str(out))
    set_base_path(out, base_path)
    return out


def set_base_path(adapter: Path, base_path: str | None) -> None:
    """Set (or clear) adapter_config.json's base_model_name_or_path."""
    file = adapter / "adapter_config.json"
    raw = json.loads(file.read_text())
    raw["base_model_name_or_path"] = base_path
    file.write_text(json.dumps(raw, indent=2))


def lora_run(run_dir: Path, adapters: list[Path], tokenizer_from: Path | None = None) -> Path:
    """A LoRA training run's ``checkpoints/`` (its save_dir) as the trainer leaves it: one step dir per
    adapter (adapter files, tokenizer files, training_state/), ``latest`` naming the last. Returns
    the save_dir."""
    from modelzoo.checkpoint.manager import LATEST, STATE_DIR, TRAINER_STATE, step_dir_name

    save_dir = run_dir / "checkpoints"
    for step, adapter in enumerate(adapters, start=1):
        step_dir = save_dir / step_dir_name(step)
        shutil.copytree(adapter, step_dir)
        if tokenizer_from is not None:
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (tokenizer_from / name).is_file():
                    shutil.copyfile(tokenizer_from / name, step_dir / name)
        (step_dir / STATE_DIR).mkdir()
        (step_dir / STATE_DIR / TRAINER_STATE).write_text(json.dumps({"step": step}))
    (save_dir / LATEST).write_text(step_dir_name(len(adapters)) + "\n")
    return save_dir

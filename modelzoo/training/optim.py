"""AdamW with decoupled weight decay, and warmup + cosine/linear/constant learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from modelzoo.config import TrainingConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices decay; vectors (norm weights, biases) do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainingConfig, *, foreach: bool | None = None) -> torch.optim.AdamW:
    """AdamW from the training section; ``foreach=False`` when parameters mix DTensor and Tensor."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, foreach=foreach,
    )


def lr_at(step: int, cfg: TrainingConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warmup over ``warmup_steps`` from lr/warmup to lr, then decay to ``min_learning_rate``
    at ``total_steps``: cosine, linear, or none (constant).
    """
    peak, floor = cfg.learning_rate, cfg.min_learning_rate
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return peak
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    if cfg.lr_schedule == "linear":
        return floor + (peak - floor) * (1 - progress)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

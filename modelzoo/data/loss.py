"""Weighted next-token cross-entropy: the loss of the contract in ARCHITECTURE.md, shared by the model and the trainer."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy and its weighted mean.

    Args:
        logits: ``[B, S, V]`` scores (any float dtype; computed in fp32). Position t predicts
            ``targets[:, t]``; when ``targets`` has one column less (next-token targets), the last
            logit column is ignored without slicing (and copying) the logits.
        targets: ``[B, T]`` target token ids, ``T`` = S or S-1; weight-0 positions may hold any id.
        weights: ``[B, T]`` float weights.
    Returns:
        ``(loss, token_loss)``: the scalar ``sum(w * ce) / sum(w)`` (0 when all weights are 0) and the
        unweighted per-token loss ``[B, T]`` float32 (0 where the weight is 0).
    """
    n_targets = targets.shape[-1]
    if n_targets == logits.shape[-2] - 1:  # pad instead of slicing the [B, S, V] logits
        targets = F.pad(targets, (0, 1))
        weights = F.pad(weights, (0, 1))
    safe_targets = torch.where(weights > 0, targets, torch.zeros_like(targets))
    logits = logits.float()
    token_loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), safe_targets.reshape(-1),
                                 reduction="none").view_as(weights)
    token_loss = torch.where(weights > 0, token_loss, torch.zeros_like(token_loss))
    total_weight = weights.sum()
    loss = (token_loss * weights).sum() / total_weight.clamp_min(torch.finfo(torch.float32).tiny)
    return loss, token_loss[..., :n_targets]

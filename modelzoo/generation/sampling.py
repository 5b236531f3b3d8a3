"""Next-token choice: repetition penalty, temperature, top-k, top-p, seeded sampling.

The order is the one ``transformers`` uses: repetition penalty on the raw logits, then temperature,
top-k, top-p, softmax, sample. ``temperature == 0`` is greedy (argmax; the penalty still applies).
Every row draws from its own ``torch.Generator`` seeded from ``(seed, request index)``, so a
request's samples do not depend on which other requests share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen (``GenerationConfig`` fields of the same names)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalize tokens already in the sequence (prompt and generated), each once.

    Args:
        logits: ``[B, V]`` float.
        seen: ``[B, V]`` bool, True where the token occurred.
    A seen token's logit is divided by ``penalty`` when positive and multiplied when negative.
    """
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties with the k-th are kept)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches ``p``; -inf the rest.

    Tokens are ranked by logit; a token is dropped when the mass of the tokens ranked strictly above
    it already reaches ``p`` (so the most likely token is always kept).
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def row_generators(seed: int, indices: list[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per request: seeded from ``seed`` and the request's index in the run."""
    return [torch.Generator(device=device).manual_seed(seed * 1_000_003 + index) for index in indices]


def choose_next(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
                generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """The next token of each row: ``[B]`` long, from logits ``[B, V]``.

    Args:
        seen: ``[B, V]`` bool of tokens already in each sequence (for the repetition penalty).
        generators: one per row; required when sampling.
    """
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k is not None:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p is not None:
        logits = top_p_filter(logits, params.top_p)
    probs = logits.softmax(dim=-1)
    if generators is None or len(generators) != probs.shape[0]:
        raise ValueError("sampling needs one torch.Generator per row")
    return torch.cat([torch.multinomial(row, 1, generator=gen) for row, gen in zip(probs, generators, strict=True)])

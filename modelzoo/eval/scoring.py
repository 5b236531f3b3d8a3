"""Scoring token sequences with a causal LM: the log-probability of chosen targets, and whether each
was the greedy (argmax) choice.

Every evaluation in :mod:`modelzoo.eval` reduces to :class:`ScoreRequest` s: a token window whose
inputs are ``tokens[:-1]`` and targets ``tokens[1:]``, of which the last ``n_scored`` are scored.
:class:`Scorer` runs them in batches (longest first, so a batch holds windows of similar lengths;
right padding, which a causal model never attends to from a real position) and runs the LM head
only at the scored positions, in slices, instead of over every position of every window: the
``[batch, length, vocab]`` logits the usual recipe materialises are the biggest tensor of an
evaluation and mostly unused.

The numbers are those of one stock ``transformers`` forward per window (the tests compare against
it and against lm-evaluation-harness's ``hf`` backend): the decoder is the model's own
``model.model`` forward, the head its ``lm_head``, the log-softmax in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

#: Scored positions per LM-head slice (bounds the ``[rows, vocab]`` float32 logits in memory).
HEAD_ROWS = 512


@dataclass(frozen=True)
class ScoreRequest:
    """``tokens``: a window; inputs ``tokens[:-1]``, targets ``tokens[1:]``. The last ``n_scored``
    targets are scored (``1 <= n_scored <= len(tokens) - 1``)."""

    tokens: Sequence[int]
    n_scored: int

    def __post_init__(self) -> None:
        if len(self.tokens) < 2 or not 1 <= self.n_scored <= len(self.tokens) - 1:
            raise ValueError(f"a scored window needs >= 2 tokens and 1 <= n_scored <= {len(self.tokens) - 1}, "
                             f"got {len(self.tokens)} tokens and n_scored={self.n_scored}")


@dataclass
class Score:
    """``logprob``: sum of the scored targets' log-probabilities; ``greedy``: every scored target was
    the argmax; ``token_logprobs``: one per scored target, in order."""

    logprob: float
    greedy: bool
    token_logprobs: list[float]

    @property
    def count(self) -> int:
        return len(self.token_logprobs)


class Scorer:
    """Scores :class:`ScoreRequest` s with ``model`` (a ``LlamaForCausalLM``: float, int8,
    tensor-parallel or with an adapter), ``batch_size`` windows per forward.

    ``progress(n)`` is called after each batch with the number of windows it scored.
    """

    def __init__(self, model: nn.Module, batch_size: int = 8) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.batch_size = model, batch_size
        self.device = next(model.parameters()).device
        self.tokens_scored = 0
        self.tokens_run = 0

    @torch.no_grad()
    def score(self, requests: Sequence[ScoreRequest], progress: Callable[[int], None] | None = None) -> list[Score]:
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].tokens))
        results: list[Score | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for index, result in zip(chunk, self._batch([requests[i] for i in chunk]), strict=True):
                results[index] = result
            if progress is not None:
                progress(len(chunk))
        return results  # type: ignore[return-value]

    def _batch(self, batch: list[ScoreRequest]) -> list[Score]:
        width = max(len(r.tokens) for r in batch) - 1
        inputs = torch.zeros((len(batch), width), dtype=torch.long)  # right padding: never attended
        rows, cols, targets = [], [], []
        for row, request in enumerate(batch):
            length = len(request.tokens) - 1
            inputs[row, :length] = torch.tensor(request.tokens[:-1], dtype=torch.long)
            rows += [row] * request.n_scored
            cols += range(length - request.n_scored, length)
            targets += request.tokens[len(request.tokens) - request.n_scored:]
            self.tokens_run += length
        hidden = self.model.model(input_ids=inputs.to(self.device)).last_hidden_state
        picked = hidden[torch.tensor(rows, device=hidden.device), torch.tensor(cols, device=hidden.device)]
        target_t = torch.tensor(targets, dtype=torch.long, device=hidden.device)
        logprobs, greedy = [], []
        for begin in range(0, len(targets), HEAD_ROWS):
            logits = self.model.lm_head(picked[begin:begin + HEAD_ROWS]).float()
            logp = torch.log_softmax(logits, dim=-1)
            chosen = target_t[begin:begin + HEAD_ROWS]
            logprobs.append(logp.gather(1, chosen[:, None])[:, 0])
            greedy.append(logp.argmax(dim=-1) == chosen)
        token_logprobs = torch.cat(logprobs).tolist()
        token_greedy = torch.cat(greedy).tolist()
        self.tokens_scored += len(targets)
        out, at = [], 0
        for request in batch:
            lp = token_logprobs[at:at + request.n_scored]
            out.append(Score(float(sum(lp)), all(token_greedy[at:at + request.n_scored]), lp))
            at += request.n_scored
        return out

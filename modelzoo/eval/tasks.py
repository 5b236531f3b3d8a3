"""The built-in evaluations: WikiText-style perplexity of a text stream, LAMBADA-style cloze
accuracy, and loss/perplexity on a prepared HDF5 dataset.

WikiText (Megatron-LM's method). The file is tokenized as one stream ``t_0 .. t_{N-1}`` (no special
tokens). Windows of ``seq_length`` inputs start at ``0, stride, 2 * stride, ...``; the first window
scores all its targets, each later one only the targets no earlier window scored (the last
``stride`` of a full window), so every target ``t_1 .. t_{N-1}`` is scored exactly once, with at
least ``seq_length - stride`` tokens of context after the first window. With ``L`` the summed
negative log-likelihood (nats) of those ``N - 1`` targets and ``W`` the number of whitespace-separated
words of the file::

    token_loss = L / (N - 1)           token_ppl = exp(token_loss)
    word_ppl   = exp(L / (W - 1))      (the tokenizer-adjusted perplexity)

``word_ppl`` divides the same total loss by the number of word-level predictions instead of
token-level ones (``- 1`` on both sides: the first unit has no context), so models with different
tokenizers are compared on the same units. ``stride = seq_length`` gives disjoint windows (the
cheapest, least context); a smaller stride costs ``seq_length / stride`` times the compute.

LAMBADA (Megatron-LM's two variants). Each line ``{"text": "..."}``; the target is the last
whitespace-separated word. Strict: the context is the text before the last word, the target all the
tokens of ``" " + last word`` as they are tokenized inside the whole text (the whole text's tokens
after the context's), correct when every one of them is the greedy choice. Non-strict: the target is
only the last token of the whole text. Accuracy is the fraction correct; the summed log-likelihood
of the targets is reported too.

Dataset loss (``ppl``): ``sum(w * ce) / sum(w)`` over every target of the split, ``w`` the token-type
weights of the training contract (completion 1, prompt ``prompt_loss_weight``, padding and
article-crossing targets 0): the trainer's dev loss, with the same patched model forward.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modelzoo.checkpoint.json_file import json_lines

from .scoring import Score, Scorer, ScoreRequest


class EvalInputError(ValueError):
    """Bad evaluation input; the message names the file (and line) and the fix."""


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


# ------------------------------------------------------------------------------------ wikitext


def rolling_windows(tokens: list[int], seq_length: int, stride: int) -> list[ScoreRequest]:
    """Windows over ``tokens`` scoring each of ``tokens[1:]`` exactly once (see the module doc)."""
    if not 1 <= stride <= seq_length:
        raise ValueError(f"stride must be in 1..seq_length ({seq_length}), got {stride}")
    last = len(tokens) - 1  # index of the last target
    if last < 1:
        raise ValueError(f"a stream of {len(tokens)} token(s) has nothing to score; it needs at least 2")
    windows, scored_upto, begin = [], 0, 0
    while scored_upto < last:
        end = min(begin + seq_length, last)  # this window's last target
        windows.append(ScoreRequest(tokens[begin:end + 1], end - scored_upto))
        scored_upto = end
        begin += stride
    return windows


@dataclass
class WikitextResult:
    token_loss: float
    token_ppl: float
    word_ppl: float
    total_nll: float
    scored_tokens: int
    words: int
    windows: int
    seq_length: int
    stride: int

    def line(self) -> str:
        return (f"wikitext: token ppl {self.token_ppl:.4f} (loss {self.token_loss:.6f} over {self.scored_tokens} tokens), "
                f"word ppl {self.word_ppl:.4f} ({self.words} words); {self.windows} windows of {self.seq_length}, "
                f"stride {self.stride}")


def read_text(path: str | Path) -> str:
    file = Path(path)
    if not file.is_file():
        raise EvalInputError(f"--input {path}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise EvalInputError(f"{path}: not UTF-8 text (byte {err.start}); convert it to UTF-8") from None
    if not text.strip():
        raise EvalInputError(f"{path}: empty (no text to score)")
    return text


def wikitext_windows(tokenizer, text: str, seq_length: int, stride: int) -> tuple[list[ScoreRequest], int]:
    """The scoring windows of ``text`` and its word count."""
    tokens = list(tokenizer.encode(text, add_special_tokens=False))
    words = len(text.split())
    if len(tokens) < 2 or words < 2:
        raise EvalInputError(f"the text has {len(tokens)} tokens and {words} words; word-level perplexity needs "
                             "at least 2 of each")
    return rolling_windows(tokens, seq_length, stride), words


def wikitext(scorer: Scorer, windows: list[ScoreRequest], words: int, seq_length: int, stride: int,
             progress: Callable[[int], None] | None = None) -> WikitextResult:
    scores = scorer.score(windows, progress)
    total = -sum(s.logprob for s in scores)
    scored = sum(s.count for s in scores)
    return WikitextResult(total / scored, _exp(total / scored), _exp(total / (words - 1)), total, scored, words,
                          len(windows), seq_length, stride)


# ------------------------------------------------------------------------------------- lambada


def read_lambada(path: str | Path) -> list[str]:
    """The ``text`` of each JSON line (blank lines skipped); errors name the line."""
    file = Path(path)
    if not file.is_file():
        raise EvalInputError(f"--input {path}: no such file")
    texts = []
    for number, item in json_lines(path, fix='write one {"text": "..."} object per line', error=EvalInputError):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise EvalInputError(f"{path}:{number}: expected {{\"text\": \"...\"}}, got {json.dumps(item)[:60]}")
        if len(item["text"].split()) < 2:
            raise EvalInputError(f"{path}:{number}: the text needs at least two words (a context and the last word)")
        texts.append(item["text"])
    if not texts:
        raise EvalInputError(f"{path}: no examples in it")
    return texts


def lambada_request(tokenizer, text: str, strict: bool) -> ScoreRequest:
    """The window and targets of one example (see the module doc)."""
    whole = list(tokenizer.encode(text))
    if not strict:
        return ScoreRequest(whole, 1)
    last_word = text.split()[-1]
    context = text[:text.rfind(last_word)].rstrip()
    n_context = len(tokenizer.encode(context))
    n_target = len(whole) - n_context
    if n_target < 1 or n_context < 1:
        raise EvalInputError(f"the text {text[:60]!r}... tokenizes so that its last word has no tokens of its own "
                             "after the context's; use non-strict mode")
    return ScoreRequest(whole, n_target)


@dataclass
class LambadaResult:
    accuracy: float
    correct: int
    examples: int
    total_logprob: float
    target_tokens: int
    strict: bool

    def line(self) -> str:
        mode = "strict" if self.strict else "non-strict"
        return (f"lambada ({mode}): accuracy {self.accuracy:.4f} ({self.correct}/{self.examples}), "
                f"target log-likelihood {self.total_logprob:.4f} over {self.target_tokens} tokens")


def lambada(scorer: Scorer, tokenizer, texts: list[str], strict: bool,
            progress: Callable[[int], None] | None = None) -> tuple[LambadaResult, list[Score]]:
    scores = scorer.score([lambada_request(tokenizer, t, strict) for t in texts], progress)
    correct = sum(s.greedy for s in scores)
    return LambadaResult(correct / len(scores), correct, len(scores), sum(s.logprob for s in scores),
                         sum(s.count for s in scores), strict), scores


# ----------------------------------------------------------------------------------------- ppl


@dataclass
class DatasetLossResult:
    loss: float
    ppl: float
    weight_sum: float
    sequences: int
    split: str

    def line(self) -> str:
        return (f"ppl ({self.split}): loss {self.loss:.6f}, perplexity {self.ppl:.4f} over {self.sequences} sequences "
                f"(target weight {self.weight_sum:g})")


def dataset_loss(model, reader, batch_size: int, split: str,
                 progress: Callable[[int], None] | None = None) -> DatasetLossResult:
    """Loss over every sequence of ``reader`` (a :class:`~modelzoo.data.hdf5_reader.SplitReader`) with
    the weighted-loss patched ``model``, accumulated as the trainer's eval does."""
    import numpy as np
    import torch

    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    weight_sum = torch.zeros((), device=device)
    with torch.no_grad():
        for start in range(0, len(reader), batch_size):
            batch = reader.rows(np.arange(start, min(start + batch_size, len(reader))))
            out = model(**{k: v.to(device) for k, v in batch.items()}, return_logits=False, use_cache=False)
            loss_sum += (out.token_loss * out.loss_weight).sum()
            weight_sum += out.loss_weight.sum()
            if progress is not None:
                progress(len(batch["input_ids"]))
    if float(weight_sum) == 0:
        raise EvalInputError(f"the {split} split has no scored targets (every token weight is 0: only padding, or only "
                             "prompts with prompt_loss_weight 0); use another split or --prompt-loss-weight")
    loss = float(loss_sum / weight_sum)
    return DatasetLossResult(loss, _exp(loss), float(weight_sum), len(reader), split)

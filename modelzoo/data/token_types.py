"""Token types, article boundaries and loss weights (the contract in ARCHITECTURE.md).

``token_type_ids`` (from data prep, ``[batch, seq]``): 0 prompt, 1 completion, 2 padding,
3 separator (the EOS that ends an article). An article is the run of tokens up to and including
its separator; padding after the last separator forms its own trailing segment.

Everything here is shape-static (cumsum/cummax, no data-dependent shapes), so it traces and
compiles into one graph.
"""

from __future__ import annotations

import torch

PROMPT = 0
COMPLETION = 1
PADDING = 2
SEPARATOR = 3


def article_ids_from_token_types(token_type_ids: torch.Tensor) -> torch.Tensor:
    """Article index of every token: ``[B, S]`` int64, counting from 0 in each row.

    A separator belongs to the article it closes; the next token starts a new article.
    """
    is_sep = (token_type_ids == SEPARATOR).to(torch.int64)
    return torch.cumsum(is_sep, dim=-1) - is_sep


def positions_from_article_ids(article_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 at the first token of every article: ``[B, S]`` int64."""
    seq_len = article_ids.shape[-1]
    index = torch.arange(seq_len, device=article_ids.device).expand_as(article_ids)
    starts = torch.ones_like(article_ids, dtype=torch.bool)
    starts[..., 1:] = article_ids[..., 1:] != article_ids[..., :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index))
    return index - torch.cummax(start_index, dim=-1).values


def article_causal_mask(article_ids: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask ``[B, 1, S, S]``: True where query i may attend key j.

    Block-diagonal causal: j <= i and both tokens in the same article.
    """
    seq_len = article_ids.shape[-1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=article_ids.device).tril()
    same = article_ids[:, :, None] == article_ids[:, None, :]
    return (same & causal)[:, None, :, :]


def loss_weights_from_token_types(
    token_type_ids: torch.Tensor, prompt_loss_weight: float = 0.0, article_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Weight of each next-token target: ``[B, S-1]`` float32.

    Target t is token t+1 (labels are ``input_ids`` shifted by one). Its weight is 1 for completion
    and separator tokens, ``prompt_loss_weight`` for prompt tokens, 0 for padding, and 0 when the
    target crosses an article boundary (token t closes one article, token t+1 opens the next).
    """
    if article_ids is None:
        article_ids = article_ids_from_token_types(token_type_ids)
    target_types = token_type_ids[:, 1:]
    weights = torch.zeros(target_types.shape, dtype=torch.float32, device=token_type_ids.device)
    weights = torch.where((target_types == COMPLETION) | (target_types == SEPARATOR), 1.0, weights)
    weights = torch.where(target_types == PROMPT, float(prompt_loss_weight), weights)
    same_article = article_ids[:, 1:] == article_ids[:, :-1]
    return weights * same_article

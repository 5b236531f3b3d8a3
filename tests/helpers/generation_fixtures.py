"""Shared helpers for the generation tests (no tests here): a tiny BPE tokenizer trained here, tiny
HF checkpoint dirs written with ``save_pretrained``, and the ``transformers`` greedy oracle."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import torch
from conftest import stock_model
from transformers import LlamaForCausalLM

# Llama-2 style (MHA) and Llama-3 style (GQA, llama3 rope scaling, tied embeddings).
STYLES = ["llama2_tiny", "llama3_2_tiny"]
WORDS = "the a river stone cloud apple green light train paper seven nine runs over under blue".split()
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")
PROMPT_LENGTHS = (5, 11, 3, 8)


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + f" {i}." for i in range(n)]


def train_tokenizer(out: Path, vocab_size: int = 300, chat: bool = True):
    """Byte-level BPE with ``<unk>``=0, ``<s>``=1 (prepended), ``</s>``=2, as Llama configs expect."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from modelzoo.data_prep.tokenizer_io import train_byte_level_bpe

    tk = train_byte_level_bpe(corpus(), vocab_size, ["<unk>", "<s>", "</s>"])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat:
        hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out))
    return hf


def save_checkpoint(out: Path, preset: str = "llama2_tiny", tokenizer: bool = True, seed: int = 0,
                    **overrides) -> LlamaForCausalLM:
    """An HF checkpoint dir (config, generation config, safetensors, tokenizer); returns the model."""
    model = stock_model(preset, seed, **overrides)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(str(out))
    if tokenizer:
        train_tokenizer(out)
    return model


def random_prompts(vocab: int, lengths=PROMPT_LENGTHS, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def hf_greedy(model: LlamaForCausalLM, prompts: list[list[int]], max_new_tokens: int,
              eos: int | None = None, **kwargs) -> list[list[int]]:
    """``transformers`` ``generate`` (greedy, left-padded batch) -> generated ids per prompt, cut before
    the first ``eos``."""
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    saved = model.generation_config
    model.generation_config = copy.deepcopy(saved)
    model.generation_config.eos_token_id = None  # else generate() falls back to the model's EOS
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=0, **kwargs)
    finally:
        model.generation_config = saved
    rows = out[:, longest:].tolist()
    return [row[: row.index(eos)] if eos is not None and eos in row else row for row in rows]

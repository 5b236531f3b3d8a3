"""Tokenizers for generation: the checkpoint's own (``AutoTokenizer``), or a byte-level stand-in for
random-weight presets, and the check that a tokenizer fits the model's vocabulary."""

from __future__ import annotations

from pathlib import Path

from modelzoo.checkpoint.hf_weights import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class ByteTokenizer:
    """UTF-8 bytes as tokens, for smoke runs of presets (random weights, no tokenizer files).

    Ids: 0 ``<unk>``/pad, 1 ``<s>`` (added in front), 2 ``</s>``, byte ``b`` -> ``3 + b``. Ids the
    model may emit beyond the 259 used ones decode to nothing.
    """

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    chat_template = None
    OFFSET = 3

    def __len__(self) -> int:
        return self.OFFSET + 256

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.OFFSET + b for b in text.encode("utf-8")]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        data = bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < self.OFFSET + 256)
        return data.decode("utf-8", errors="replace")


def has_tokenizer(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: str | Path):
    """``AutoTokenizer.from_pretrained(path)`` (no remote code); errors name the directory and the fix."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not has_tokenizer(path):
        raise CheckpointError(
            f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the tokenizer with the checkpoint "
            "or pass --tokenizer DIR")
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as err:  # tokenizers/sentencepiece raise assorted types for broken files
        message = " ".join(str(err).split())[:300]
        raise CheckpointError(f"{path}: the tokenizer cannot be loaded ({type(err).__name__}: {message}); "
                              "re-save it with save_pretrained") from err


def check_vocab(tokenizer, vocab_size: int, tokenizer_source: str, model_source: str) -> None:
    """Refuse a tokenizer that can produce ids the model has no embedding for."""
    size = len(tokenizer)
    if size > vocab_size:
        raise CheckpointError(
            f"tokenizer {tokenizer_source} has {size} tokens but model {model_source} has vocab_size "
            f"{vocab_size} (config.json); use the tokenizer saved with this checkpoint")

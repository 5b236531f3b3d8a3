"""Load the user's tokenizer (HF dir or sentencepiece ``.model``) and derive what tokenizing needs."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from modelzoo.data_prep.errors import DataPrepError

_PROBE = "a b"


@dataclass(frozen=True)
class TokenizerSpec:
    """What worker processes need to tokenize exactly like the HF tokenizer (picklable, no transformers).

    ``start_ids`` are the ids the tokenizer puts before a text on its own (BOS for Llama); an EOS it
    appends on its own is never kept (the contract appends one EOS per pair itself).
    """

    tokenizer_json: str  # the tokenizers JSON; "" when ``tokenizer_file`` holds it
    eos_id: int
    pad_id: int
    start_ids: tuple[int, ...]
    vocab_size: int
    chat_template: str | None
    special_tokens: dict
    tokenizer_file: str | None = None

    def build(self):
        """The ``tokenizers.Tokenizer`` this spec describes."""
        from tokenizers import Tokenizer

        return (
            Tokenizer.from_file(self.tokenizer_file)
            if self.tokenizer_file
            else Tokenizer.from_str(self.tokenizer_json)
        )


def load_tokenizer(path: str):
    """The HF (fast) tokenizer at ``path``: a local ``save_pretrained`` dir, or a sentencepiece
    ``.model`` file (loaded as a Llama tokenizer). Nothing is downloaded."""
    from transformers import AutoTokenizer, LlamaTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    p = Path(path)
    try:
        if p.is_file() and p.suffix == ".model":
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copyfile(p, Path(tmp) / "tokenizer.model")
                tok = LlamaTokenizer.from_pretrained(tmp, local_files_only=True)
        elif p.is_dir():
            tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
        else:
            raise DataPrepError(
                f"--pretrained-tokenizer {path}: not a tokenizer directory or a sentencepiece .model file "
                "(nothing is downloaded; pass a local dir written by save_pretrained)"
            )
    except DataPrepError:
        raise
    except ImportError as err:
        raise DataPrepError(
            f"--pretrained-tokenizer {path}: {err} (a sentencepiece .model needs: pip install protobuf)"
        ) from err
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise DataPrepError(f"--pretrained-tokenizer {path}: could not load a tokenizer: {err}") from err
    if getattr(tok, "backend_tokenizer", None) is None:
        raise DataPrepError(
            f"--pretrained-tokenizer {path}: {type(tok).__name__} has no fast (tokenizers) backend; "
            "save a fast tokenizer (tokenizer.json) with save_pretrained"
        )
    if tok.eos_token_id is None:
        raise DataPrepError(
            f"--pretrained-tokenizer {path}: the tokenizer has no eos_token, which ends every article; "
            "set one (tokenizer.eos_token = '</s>'; tokenizer.save_pretrained(dir)) and pass that dir"
        )
    return tok


# --max-seq-length with neither a tokenizer model_max_length nor a model config.json to check it
# against: 1M tokens, beyond every Llama context (3.1: 128k); a row of 1e9 tokens took minutes and GBs.
MAX_SEQ_LENGTH_CAP = 1 << 20
_UNSET_MAX_LENGTH = 10**20  # transformers' "no limit" sentinel is int(1e30): ignore anything that big


def sequence_limits(tok, path: str) -> list[tuple[int, str]]:
    """``[(limit, where it comes from)]`` for ``--max-seq-length``: the tokenizer's ``model_max_length``
    and the ``max_position_embeddings`` of a model ``config.json`` in the tokenizer dir, when known;
    else the hard cap MAX_SEQ_LENGTH_CAP."""
    limits = []
    model_max = getattr(tok, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < _UNSET_MAX_LENGTH:
        limits.append((model_max, f"model_max_length of the tokenizer {path}"))
    config = Path(path) / "config.json"
    if config.is_file():
        try:
            positions = json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
        except (OSError, ValueError, AttributeError):
            positions = None
        if isinstance(positions, int) and positions > 0:
            limits.append((positions, f"max_position_embeddings of {config}"))
    fallback = (MAX_SEQ_LENGTH_CAP, "hard cap for a tokenizer without model_max_length or config.json")
    return limits or [fallback]


def check_max_seq_length(tok, path: str, max_seq_length: int) -> None:
    """Refuse a ``--max-seq-length`` above any of ``sequence_limits`` (before any tokenizing)."""
    for limit, source in sorted(sequence_limits(tok, path)):
        if max_seq_length > limit:
            raise DataPrepError(
                f"--max-seq-length {max_seq_length} is above {limit:,}, the {source}; pass --max-seq-length "
                f"{limit} or less, or --allow-long-sequences to build longer rows anyway"
            )


def tokenizer_spec(tok, need_chat_template: bool = False) -> TokenizerSpec:
    """The picklable description of ``tok`` that worker processes tokenize with."""
    backend = tok.backend_tokenizer
    with_special = backend.encode(_PROBE, add_special_tokens=True).ids
    plain = backend.encode(_PROBE, add_special_tokens=False).ids
    start = 0
    while start < len(with_special) and with_special[start : start + len(plain)] != plain:
        start += 1
    start_ids = tuple(with_special[:start]) if start < len(with_special) else ()
    chat_template = getattr(tok, "chat_template", None)
    if need_chat_template and not chat_template:
        raise DataPrepError(
            f"--apply-chat-template: the tokenizer {tok.name_or_path} has no chat_template; "
            "drop the flag or use a tokenizer that defines one"
        )
    if isinstance(chat_template, dict):  # named templates: use the default one
        chat_template = chat_template.get("default")
    special = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
    return TokenizerSpec(
        tokenizer_json=backend.to_str(),
        eos_id=int(tok.eos_token_id),
        pad_id=int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id),
        start_ids=tuple(int(i) for i in start_ids),
        vocab_size=vocab_size(tok),
        chat_template=chat_template,
        special_tokens=special,
    )


def vocab_size(tok) -> int:
    """Ids run below this: the tokenizer's length including added tokens."""
    ids = [i for i in tok.all_special_ids if i is not None]
    return max([len(tok)] + [i + 1 for i in ids])


LLAMA_CONFIG_TYPE = "<class 'transformers.models.llama.configuration_llama.LlamaConfig'>"


def model_type_string(path: str) -> str:
    """``tokenizer_model_type`` as generative_data_prep writes it, ``str(type(model_config))``: from
    the ``model_type`` of a config.json beside the tokenizer, else Llama's (this zoo's family).
    Built from transformers' name tables, without importing the config class (that costs seconds)."""
    p = Path(path)
    config = p / "config.json" if p.is_dir() else None
    if config is not None and config.is_file():
        try:
            from transformers.models.auto.configuration_auto import (
                CONFIG_MAPPING_NAMES,
                model_type_to_module_name,
            )

            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
            if model_type in CONFIG_MAPPING_NAMES:
                module = model_type_to_module_name(model_type)
                return f"<class 'transformers.models.{module}.configuration_{module}.{CONFIG_MAPPING_NAMES[model_type]}'>"
        except (OSError, ValueError, ImportError):
            pass
    return LLAMA_CONFIG_TYPE


def train_byte_level_bpe(texts, vocab_size: int, special_tokens: list[str]):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts`` (an iterable of strings).

    ``special_tokens`` take ids 0, 1, ... in order, then the 256 byte symbols, then the merges.
    No post-processor is set: the caller decides whether BOS/EOS are added. Used for the bundled
    sample tokenizer, the benchmarks and the tests (nothing is downloaded).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok

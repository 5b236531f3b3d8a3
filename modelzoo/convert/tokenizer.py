"""Tokenizer files between Meta and HF layouts.

Meta ships one ``tokenizer.model``:

- Llama-2: a sentencepiece BPE model (byte fallback). Converted to an HF ``tokenizer.json`` with the
  pipeline of the official ``*-hf`` repos (prepend "▁", spaces -> "▁", BPE with byte fallback,
  ``<s>`` added in front), which encodes exactly like sentencepiece. It is saved with
  ``tokenizer_class: PreTrainedTokenizerFast`` (never ``LlamaTokenizer``: transformers 5's rebuilds
  its own pipeline and then differs from sentencepiece on leading whitespace; never 5's
  ``TokenizersBackend``: 4.x does not know it). ``tokenizer.model`` is
  copied beside it.
- Llama-3.x: a tiktoken rank file (``base64(token_bytes) rank`` per line). Parsed here (no
  ``tiktoken`` package needed) into a byte-level BPE ``tokenizer.json`` (merges recovered from the
  ranks, the Llama-3 split regex, ``ignore_merges`` as tiktoken does) plus the 256 special tokens
  (``<|begin_of_text|>`` = first id after the ranks, Llama-3.1 names).

HF -> Meta copies ``tokenizer.model`` (or ``original/tokenizer.model``) when the HF dir has one,
else writes the tiktoken rank file back from a byte-level BPE ``tokenizer.json``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from modelzoo.checkpoint.hf_files import TOKENIZER_FILES, make_tokenizer_portable
from modelzoo.checkpoint.hf_weights import CheckpointError

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_SPECIAL = 256
_TIKTOKEN_LINE = re.compile(rb"^([A-Za-z0-9+/]+=*) (\d+)$")


def llama3_special_tokens(n: int = NUM_SPECIAL) -> list[str]:
    """Llama-3.1's special tokens, in id order after the BPE ranks."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
             "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    return named + [f"<|reserved_special_token_{3 + i}|>" for i in range(n - len(named))]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def kind_of(path: Path) -> str:
    """``tiktoken`` or ``sentencepiece``, from the file's first line."""
    with open(path, "rb") as handle:
        first = handle.readline(4096).rstrip(b"\r\n")
    return "tiktoken" if _TIKTOKEN_LINE.match(first) else "sentencepiece"


def read_tiktoken(path: Path) -> dict[bytes, int]:
    """A tiktoken rank file -> ``{token_bytes: rank}``; ranks must be 0..n-1."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as handle:
        for lineno, line in enumerate(handle, 1):
            line = line.rstrip(b"\r\n")
            if not line:
                continue
            match = _TIKTOKEN_LINE.match(line)
            try:
                token = base64.b64decode(match.group(1), validate=True) if match else None
            except binascii.Error:
                token = None
            if token is None:
                raise CheckpointError(f"{path}:{lineno}: not a tiktoken line 'BASE64 RANK'; the tokenizer file is corrupt")
            ranks[token] = int(match.group(2))
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps or repeats")
    return ranks


def tiktoken_vocab_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocab and merges equivalent to tiktoken's rank-ordered merging."""
    encode = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(encode[b] for b in token)

    vocab, merges = {}, []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        vocab[text(token)] = rank
        local = [(token[:i], token[i:], rank) for i in range(1, len(token))
                 if token[:i] in ranks and token[i:] in ranks]
        merges.extend(sorted(local, key=lambda m: (ranks[m[0]], ranks[m[1]])))
    merges.sort(key=lambda m: m[2])
    return vocab, [(text(a), text(b)) for a, b, _ in merges]


def tiktoken_to_hf(path: Path, out_dir: Path, instruct: bool = False) -> dict[str, int | list[int]]:
    """Write ``tokenizer.json`` + config for a Llama-3 tiktoken file; returns the bos/eos ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    ranks = read_tiktoken(path)
    n_base = len(ranks)
    vocab, merges = tiktoken_vocab_merges(ranks)
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = llama3_special_tokens()
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    bos = specials[0]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                      special_tokens=[(bos, n_base)])])
    eos = "<|eot_id|>" if instruct else "<|end_of_text|>"
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                 clean_up_tokenization_spaces=True, model_max_length=131072)
    hf.save_pretrained(out_dir)
    eos_ids = [n_base + specials.index(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    return {"bos_token_id": n_base, "eos_token_id": eos_ids if instruct else n_base + 1, "size": n_base + NUM_SPECIAL}


def bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges of a BPE vocabulary whose ids are merge ranks: every split of a piece into two pieces,
    ordered by the merged piece's id, then by the parts' ids (as transformers' converters do)."""
    merges = []
    for piece, rank in vocab.items():
        local = [(piece[:i], piece[i:], rank) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])))
    return [(left, right) for left, right, _ in merges]


def _load_sentencepiece(path: Path):
    from sentencepiece import SentencePieceProcessor

    try:
        return SentencePieceProcessor(model_file=str(path))
    except Exception as err:  # sentencepiece raises RuntimeError/OSError
        raise CheckpointError(f"{path}: neither a sentencepiece model nor a tiktoken rank file "
                              f"({str(err).strip()[:200]}); copy tokenizer.model from the Meta download") from err


def sentencepiece_to_hf(path: Path, out_dir: Path) -> dict[str, int | list[int]]:
    """Write ``tokenizer.json`` + config (+ copy ``tokenizer.model``) for a Llama-2 sentencepiece model.

    Read through sentencepiece's own API (no protobuf needed). A BPE model's piece scores are
    minus the merge rank (whole numbers); a unigram model's are log-probabilities and are refused.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    sp = _load_sentencepiece(path)
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    normal = [i for i in range(n) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))]
    if any(sp.get_score(i) != int(sp.get_score(i)) for i in normal):
        raise CheckpointError(f"{path}: a unigram sentencepiece model; only Llama-2's BPE tokenizer.model is supported")
    unk, bos, eos = (sp.id_to_piece(i) for i in (sp.unk_id(), sp.bos_id(), sp.eos_id()))
    tok = Tokenizer(BPE(vocab=vocab, merges=bpe_merges(vocab), unk_token=unk, fuse_unk=True,
                        byte_fallback=any(sp.is_byte(i) for i in range(n))))
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), normalized=False, special=True) for i in special])
    dummy_prefix = sp.encode("a", out_type=str)[0].startswith("▁")
    prefix = [normalizers.Prepend("▁")] if dummy_prefix else []
    tok.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     *([decoders.Strip(" ", 1, 0)] if prefix else [])])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                                       special_tokens=[(bos, sp.bos_id())])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk,
                                 clean_up_tokenization_spaces=False, legacy=True)
    hf.save_pretrained(out_dir)
    shutil.copyfile(path, out_dir / "tokenizer.model")
    return {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "size": n}


def hf_to_tiktoken(tokenizer_json: Path, out_path: Path) -> bool:
    """Write the tiktoken rank file of a byte-level BPE ``tokenizer.json``; False if it is not one."""
    data = json.loads(tokenizer_json.read_text())
    model = data.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(data.get("pre_tokenizer")):
        return False
    decode = {c: b for b, c in bytes_to_unicode().items()}
    vocab = model["vocab"]
    try:
        lines = [f"{base64.b64encode(bytes(decode[c] for c in token)).decode()} {rank}"
                 for token, rank in sorted(vocab.items(), key=lambda item: item[1])]
    except KeyError:
        return False
    out_path.write_text("\n".join(lines) + "\n")
    return True


@dataclass
class TokenizerSource:
    """Where a checkpoint's tokenizer lives: HF files to copy and/or Meta's ``tokenizer.model``."""

    hf_files: list[Path]
    meta_model: Path | None = None

    @classmethod
    def from_hf_dir(cls, path: Path) -> TokenizerSource | None:
        files = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
        model = next((p for p in (path / "tokenizer.model", path / "original" / "tokenizer.model") if p.is_file()), None)
        return cls(files, model) if files or model else None

    def special_ids(self, instruct: bool = False) -> dict[str, int | list[int]]:
        """bos/eos ids and tokenizer size of Meta's ``tokenizer.model`` (without writing anything)."""
        if self.meta_model is None:
            return {}
        if kind_of(self.meta_model) == "tiktoken":
            n = len(read_tiktoken(self.meta_model))
            eos = [n + 1, n + 8, n + 9] if instruct else n + 1
            return {"bos_token_id": n, "eos_token_id": eos, "size": n + NUM_SPECIAL}
        sp = _load_sentencepiece(self.meta_model)
        return {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "size": sp.vocab_size()}

    def write_hf(self, out_dir: Path, instruct: bool = False) -> None:
        """HF tokenizer files into ``out_dir``: the input's copied (only :data:`TOKENIZER_FILES`, never
        a marker or other file of the input), or converted from ``tokenizer.model``."""
        if self.hf_files:
            for file in self.hf_files:
                shutil.copyfile(file, out_dir / file.name)
        elif self.meta_model is not None:
            if kind_of(self.meta_model) == "tiktoken":
                tiktoken_to_hf(self.meta_model, out_dir, instruct)
            else:
                sentencepiece_to_hf(self.meta_model, out_dir)
        make_tokenizer_portable(out_dir)

    def write_meta(self, out_dir: Path) -> bool:
        if self.meta_model is not None:
            shutil.copyfile(self.meta_model, out_dir / "tokenizer.model")
            return True
        json_file = next((f for f in self.hf_files if f.name == "tokenizer.json"), None)
        return bool(json_file) and hf_to_tiktoken(json_file, out_dir / "tokenizer.model")

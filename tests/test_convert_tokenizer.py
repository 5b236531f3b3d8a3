"""Meta ``tokenizer.model`` -> HF tokenizer files: sentencepiece (Llama-2) and tiktoken ranks (Llama-3).

Both tokenizers are made here (a tiny sentencepiece BPE; a tiny byte-level BPE rank file); the oracles
are sentencepiece itself and a direct implementation of tiktoken's rank-ordered pair merging.
"""

from __future__ import annotations

import base64
import io
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import regex
import sentencepiece as spm
from test_convert_meta import write_meta_dir
from transformers import AutoTokenizer

from modelzoo.cli.convert import main
from modelzoo.convert.tokenizer import LLAMA3_PATTERN

WORDS = ["hello", "world", "llama", "model", "zoo", "convert", "tensor", "shard", "the", "a", "of", "and",
         "quick", "brown", "fox", "jumps", "über", "café", "数据", "🙂", "it's", "2024", "x=1;"]
SAMPLES = ["hello world über 🙂 zzz  x", " leading space", "new\nline  two\n\n", "数据 café", "",
           "  ", "It's 12345 tensors; the fox's shard!", "tabs\tand\r\nCRLF"]


def corpus(n_lines: int = 300) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(n_lines)]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=300, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


def train_byte_bpe(texts: list[str], n_merges: int) -> dict[bytes, int]:
    """A tiny tiktoken-style rank table: 256 bytes, then greedy most-frequent pair merges."""
    pattern = regex.compile(LLAMA3_PATTERN)
    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([b]) for b in piece.encode()] for text in texts for piece in pattern.findall(text)]
    while len(ranks) < 256 + n_merges:
        pairs = Counter((w[i], w[i + 1]) for w in words for i in range(len(w) - 1))
        if not pairs:
            break
        (left, right), _ = pairs.most_common(1)[0]
        ranks[left + right] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == left and w[i + 1] == right:
                    w[i:i + 2] = [left + right]
                i += 1
    return ranks


def tiktoken_encode(ranks: dict[bytes, int], text: str) -> list[int]:
    """tiktoken's algorithm: split by the regex, then merge the lowest-ranked adjacent pair until none."""
    ids = []
    for piece in regex.findall(LLAMA3_PATTERN, text):
        parts = [bytes([b]) for b in piece.encode()]
        while len(parts) > 1:
            best = min((ranks.get(parts[i] + parts[i + 1], 1 << 60), i) for i in range(len(parts) - 1))
            if best[0] == 1 << 60:
                break
            parts[best[1]:best[1] + 2] = [parts[best[1]] + parts[best[1] + 1]]
        ids += [ranks[p] for p in parts]
    return ids


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory) -> tuple[Path, dict[bytes, int]]:
    ranks = train_byte_bpe(corpus(), 300)
    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path, ranks


def test_sentencepiece_tokenizer_converts_exactly(tmp_path, spm_model):
    write_meta_dir(tmp_path / "meta", "llama2_tiny", 1, tokenizer=spm_model)
    assert main(["meta-to-hf", "--input", str(tmp_path / "meta"), "--output", str(tmp_path / "hf"), "--quiet"]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == [sp.bos_id()] + sp.encode(text), text
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(sp.encode(text)), text
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (sp.bos_id(), sp.eos_id())
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == spm_model.read_bytes()


def test_tiktoken_tokenizer_converts_exactly_and_round_trips(tmp_path, tiktoken_file):
    path, ranks = tiktoken_file
    n_base = len(ranks)
    write_meta_dir(tmp_path / "meta", "llama3_tiny", 2, tokenizer=path)
    assert main(["meta-to-hf", "--input", str(tmp_path / "meta"), "--output", str(tmp_path / "hf"), "--quiet"]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in SAMPLES:
        assert tok.encode(text, add_special_tokens=False) == tiktoken_encode(ranks, text), text
        assert tok.encode(text)[0] == n_base  # <|begin_of_text|>
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert tok.encode("hi<|eot_id|>", add_special_tokens=False)[-1] == n_base + 9
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (n_base, n_base + 1)
    # and back: hf-to-meta writes the same rank file
    assert main(["hf-to-meta", "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "meta2"), "--quiet"]) == 0
    assert (tmp_path / "meta2" / "tokenizer.model").read_bytes() == path.read_bytes()


def test_instruct_sets_llama3_chat_eos(tmp_path, tiktoken_file):
    path, ranks = tiktoken_file
    write_meta_dir(tmp_path / "meta", "llama3_tiny", 1, tokenizer=path)
    assert main(["meta-to-hf", "--input", str(tmp_path / "meta"), "--output", str(tmp_path / "hf"), "--quiet",
                 "--instruct"]) == 0
    n = len(ranks)
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == [n + 1, n + 8, n + 9]
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").eos_token == "<|eot_id|>"

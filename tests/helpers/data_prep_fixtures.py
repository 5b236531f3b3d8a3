"""Shared helpers for the data-prep tests (no tests here): tiny tokenizers the tests train themselves,
a plain reference of the tokenization/packing contract, and small I/O helpers.

The tokenizers are trained once per session in a temp dir (byte-level BPE with the ``tokenizers``
trainer, and a sentencepiece model with the ``sentencepiece`` trainer); nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import h5py
import numpy as np

WORDS = (
    "alpha beta gamma delta river stone cloud apple green light train paper seven nine plus equals".split()
)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
_CACHE: dict[str, Path] = {}


def corpus_lines(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        lines.append(f"{words} {rng.randint(0, 999)}, q{i} a{i}. Éé ünï 😀?")
    return lines


def _train_bpe(
    out: Path, *, bos: bool, eos: bool, pad: bool, eos_token: bool = True, chat: bool = True
) -> Path:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from modelzoo.data_prep.tokenizer_io import train_byte_level_bpe

    tk = train_byte_level_bpe(corpus_lines(), 360, ["<pad>", "<s>", "</s>"])
    single = ("<s> " if bos else "") + "$A" + (" </s>" if eos else "")
    tk.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 1), ("</s>", 2)])
    kwargs = {"bos_token": "<s>"}
    if eos_token:
        kwargs["eos_token"] = "</s>"
    if pad:
        kwargs["pad_token"] = "<pad>"
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs)
    if chat:
        hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out))
    return out


def _train_spm(out_dir: Path) -> Path:
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    text = out_dir / "corpus.txt"
    text.write_text("\n".join(corpus_lines()) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(out_dir / "tiny"),
        vocab_size=300,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    return out_dir / "tiny.model"


def cached_tokenizer(factory, name: str, kind: str) -> Path:
    """Build each tokenizer once per session (shared by every test module)."""
    if name not in _CACHE:
        root = factory.mktemp(f"tok_{name}")
        if kind == "spm":
            _CACHE[name] = _train_spm(root)
        else:
            flags = {
                "llama": dict(bos=True, eos=False, pad=True),
                "bos_eos": dict(bos=True, eos=True, pad=False),
                "plain": dict(bos=False, eos=False, pad=True, chat=False),
                "no_eos": dict(bos=True, eos=False, pad=True, eos_token=False),
            }[kind]
            _CACHE[name] = _train_bpe(root / "tok", **flags)
    return _CACHE[name]


def tokenizer_path(factory, kind: str) -> Path:
    """A session-cached tiny tokenizer. kinds: "llama" (BOS before every text, no EOS appended,
    <pad>, a chat template), "bos_eos" (appends EOS on its own, no pad token), "plain" (no special
    tokens added), "spm" (a sentencepiece .model file)."""
    return cached_tokenizer(factory, kind, "spm" if kind == "spm" else kind)


# -- small I/O helpers ---------------------------------------------------------------------------
def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def read_split(dataset_dir: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """All rows of a split, files in index order: (input_ids, token_type_ids) int32 [N, L]."""
    files = sorted(Path(dataset_dir).glob(f"{split}_*_of_*.hdf5"), key=lambda p: int(p.name.split("_")[1]))
    ids, types = [], []
    for f in files:
        with h5py.File(f, "r") as h:
            assert h["input_ids"].dtype == np.int32 and h["token_type_ids"].dtype == np.int32
            ids.append(h["input_ids"][...])
            types.append(h["token_type_ids"][...])
    return np.concatenate(ids), np.concatenate(types)


def prep_args(inp: Path, out: Path, tok: Path, *extra: str, L: int = 32, workers: int = 0,
              command: str = "pipeline") -> list[str]:
    return [
        command,
        "--input-path",
        str(inp),
        "--output-path",
        str(out),
        "--pretrained-tokenizer",
        str(tok),
        "--max-seq-length",
        str(L),
        "--num-workers",
        str(workers),
        *extra,
    ]


def leftovers(parent: Path) -> list[str]:
    """Hidden temp/scratch dirs a run left beside its output."""
    return [
        p.name
        for p in parent.iterdir()
        if p.name.startswith(".") and (".tmp-" in p.name or ".work-" in p.name)
    ]


# -- the contract, written plainly (the oracle for the e2e tests) --------------------------------
def _encode(tok, text: str) -> list[int]:
    """``tok(text)`` minus an EOS the tokenizer appended on its own."""
    ids = tok(text)["input_ids"]
    plain = tok(text, add_special_tokens=False)["input_ids"]
    if ids and ids[-1] == tok.eos_token_id and (not plain or plain[-1] != tok.eos_token_id):
        ids = ids[:-1]
    return ids


def reference_units(tok, article, *, pair_units=False, pair_seps=False, keep_prompt_only=False, space=True):
    """Packing units of one input article: list of (ids, types)."""
    eos = tok.eos_token_id
    if isinstance(article, dict) and "completion" not in article:
        ids = _encode(tok, article["text"]) + [eos]
        return [(ids, [1] * (len(ids) - 1) + [3])]
    pairs = article if isinstance(article, list) else [article]
    kept = [p for p in pairs if p["completion"] or (keep_prompt_only and p.get("prompt"))]
    units, ids, types = [], [], []
    for j, p in enumerate(kept):
        prompt, completion = p.get("prompt") or "", p["completion"]
        if space:
            prompt = prompt.rstrip(" ")
            completion = " " + completion.lstrip(" ") if completion else completion
        if prompt:
            x = _encode(tok, prompt)
            ids, types = ids + x, types + [0] * len(x)
        if completion:
            y = _encode(tok, completion)
            if prompt and tok.bos_token_id is not None and y[:1] == [tok.bos_token_id]:
                y = y[1:]
            ids, types = ids + y, types + [1] * len(y)
        ids, types = ids + [eos], types + [3 if (j == len(kept) - 1 or pair_seps) else 1]
        if pair_units:
            units.append((ids, types))
            ids, types = [], []
    if ids:
        units.append((ids, types))
    return units


def reference_pack(units, style: str, overflow: str | None, L: int, pad: int, keep_prompt_only=False):
    """Rows as generative_data_prep's SequencePacker makes them (minus its empty rows)."""
    rows, cur_ids, cur_types = [], [], []

    def close():
        nonlocal cur_ids, cur_types
        if cur_ids:
            rows.append((cur_ids + [pad] * (L - len(cur_ids)), cur_types + [2] * (L - len(cur_types))))
        cur_ids, cur_types = [], []

    def fit(ids, types):
        if len(ids) <= L:
            return ids, types
        if overflow == "drop":
            return [], []
        if overflow == "truncate_left":
            return ids[-L:], types[-L:]
        return ids[:L], types[:L]

    for ids, types in units:
        if style == "full":
            cur_ids, cur_types = cur_ids + ids, cur_types + types
            while len(cur_ids) >= L:
                rows.append((cur_ids[:L], cur_types[:L]))
                cur_ids, cur_types = cur_ids[L:], cur_types[L:]
        elif style == "single":
            cur_ids, cur_types = fit(ids, types)
            close()
        else:
            if len(cur_ids) + len(ids) <= L:
                cur_ids, cur_types = cur_ids + ids, cur_types + types
            else:
                close()
                cur_ids, cur_types = fit(ids, types)
    close()
    if not keep_prompt_only:
        rows = [r for r in rows if 1 in r[1]]
    return rows

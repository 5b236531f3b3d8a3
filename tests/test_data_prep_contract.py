"""End to end: every packing style x both boundaries produce exactly the rows the contract says,
checked token by token against a plain reference (HF tokenizer calls + gdp-style packing) and by
decoded text and token types."""

from __future__ import annotations

import pytest
from helpers.data_prep_fixtures import (
    hf_tokenizer,
    prep_args,
    read_split,
    reference_pack,
    reference_units,
    tokenizer_path,
    write_jsonl,
)

from modelzoo.data_prep.cli import main
from modelzoo.data_prep.options import packing_choices


@pytest.fixture(scope="session")
def bos_eos_tok(tmp_path_factory):
    return tokenizer_path(tmp_path_factory, "bos_eos")


@pytest.fixture(scope="session")
def plain_tok(tmp_path_factory):
    return tokenizer_path(tmp_path_factory, "plain")


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory):
    return tokenizer_path(tmp_path_factory, "spm")


L = 32
BOUNDARIES = [
    ("jsonl", "jsonl"),
    ("prompt_completion_pair", "prompt_completion_pair"),
    ("prompt_completion_pair", "jsonl"),
    ("jsonl", "prompt_completion_pair"),
]


def articles() -> list:
    """A mix: single pairs (with spaces to strip), multi-turn lists, text, over-long articles,
    a pair without completion, a pair without prompt, non-ASCII text."""
    out = []
    for i in range(48):
        kind = i % 6
        if kind == 0:
            out.append({"prompt": f"q{i} alpha beta  ", "completion": f"  a{i} gamma"})
        elif kind == 1:
            out.append(
                [
                    {"prompt": f"q{i} river", "completion": f"a{i} stone"},
                    {"prompt": f"r{i} cloud", "completion": f"b{i} rain"},
                ]
            )
        elif kind == 2:
            out.append({"text": f"t{i} green light train paper Éé ünï 😀"})
        elif kind == 3:
            long = " ".join(["seven nine plus equals"] * (4 + i % 5))
            out.append({"prompt": f"q{i} {long}", "completion": f"a{i} {long}"})
        elif kind == 4:
            out.append(
                [
                    {"prompt": f"q{i} orphan", "completion": ""},
                    {"prompt": f"q{i} kept", "completion": f"a{i} yes"},
                ]
            )
        else:
            out.append({"prompt": "", "completion": f"c{i} only completion"})
    return out


def expected_rows(tok, arts, packing: str, pb: str, ab: str, keep_prompt_only=False, length: int = L):
    style, _, overflow = packing.partition("::")
    units = []
    for a in arts:
        units += reference_units(
            tok,
            a,
            pair_units=pb == "prompt_completion_pair",
            pair_seps=ab == "prompt_completion_pair",
            keep_prompt_only=keep_prompt_only,
        )
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return reference_pack(units, style, overflow or None, length, pad, keep_prompt_only)


@pytest.mark.parametrize("boundaries", BOUNDARIES, ids=["jsonl", "pair", "pairpack", "pairattn"])
@pytest.mark.parametrize("packing", packing_choices())
def test_rows_equal_the_contract(tmp_path, llama_like_tok, packing, boundaries):
    pb, ab = boundaries
    inp = write_jsonl(tmp_path / "in.jsonl", articles())
    out = tmp_path / "out"
    args = [
        "--input-packing-config",
        packing,
        "--packing-boundary",
        pb,
        "--attention-boundary",
        ab,
        "--num-training-splits",
        "1",
    ]
    assert main(prep_args(inp, out, llama_like_tok, *args, L=L)) == 0
    ids, types = read_split(out)
    want = expected_rows(hf_tokenizer(llama_like_tok), articles(), packing, pb, ab)
    assert len(want) > 0
    assert [r.tolist() for r in ids] == [w[0] for w in want]
    assert [r.tolist() for r in types] == [w[1] for w in want]


@pytest.mark.parametrize("packing", ["greedy::truncate_right", "full"])
def test_keep_prompt_only_sequences(tmp_path, llama_like_tok, packing):
    inp = write_jsonl(tmp_path / "in.jsonl", articles())
    out = tmp_path / "out"
    args = ["--input-packing-config", packing, "--keep-prompt-only-sequences", "--num-training-splits", "1"]
    assert main(prep_args(inp, out, llama_like_tok, *args, L=L)) == 0
    ids, types = read_split(out)
    want = expected_rows(
        hf_tokenizer(llama_like_tok), articles(), packing, "jsonl", "jsonl", keep_prompt_only=True
    )
    assert [r.tolist() for r in ids] == [w[0] for w in want]
    assert [r.tolist() for r in types] == [w[1] for w in want]
    tok = hf_tokenizer(llama_like_tok)
    assert "orphan" in tok.decode(ids[types != 2].tolist())  # the pair without completion was kept
    if packing.startswith("greedy"):
        assert any(1 not in t for t in types.tolist())  # and rows without completion tokens


def _run_single(tmp_path, tok_path, rows, *extra):
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    args = ["--input-packing-config", "single::drop", "--num-training-splits", "1", *extra]
    assert main(prep_args(inp, out, tok_path, *args, L=64)) == 0
    return read_split(out)


def _parts(tok, ids_row, types_row):
    """(decoded text, type) runs of a row, padding excluded."""
    runs, start = [], 0
    for i in range(1, len(ids_row) + 1):
        if i == len(ids_row) or types_row[i] != types_row[start]:
            if types_row[start] != 2:
                runs.append((tok.decode(ids_row[start:i].tolist()), int(types_row[start])))
            start = i
    return runs


def test_decoded_text_and_types(tmp_path, llama_like_tok):
    tok = hf_tokenizer(llama_like_tok)
    rows = [
        {"prompt": "q0 alpha  ", "completion": "  a0 beta"},
        [{"prompt": "q1 river", "completion": "a1 stone"}, {"prompt": "r1 cloud", "completion": "b1 rain"}],
        {"text": "t2 green light Éé 😀"},
        {"prompt": "", "completion": "c3 only"},
    ]
    ids, types = _run_single(tmp_path, llama_like_tok, rows)
    got = [_parts(tok, i, t) for i, t in zip(ids, types, strict=True)]
    assert got == [
        [("<s>q0 alpha", 0), (" a0 beta", 1), ("</s>", 3)],
        [("<s>q1 river", 0), (" a1 stone</s>", 1), ("<s>r1 cloud", 0), (" b1 rain", 1), ("</s>", 3)],
        [("<s>t2 green light Éé 😀", 1), ("</s>", 3)],
        [("<s> c3 only", 1), ("</s>", 3)],
    ]
    assert (ids[types == 2] == tok.pad_token_id).all()


def test_pair_attention_boundary_makes_every_pair_eos_a_separator(tmp_path, llama_like_tok):
    tok = hf_tokenizer(llama_like_tok)
    rows = [
        [{"prompt": "q1 river", "completion": "a1 stone"}, {"prompt": "r1 cloud", "completion": "b1 rain"}]
    ]
    ids, types = _run_single(tmp_path, llama_like_tok, rows, "--attention-boundary", "prompt_completion_pair")
    assert _parts(tok, ids[0], types[0]) == [
        ("<s>q1 river", 0),
        (" a1 stone", 1),
        ("</s>", 3),
        ("<s>r1 cloud", 0),
        (" b1 rain", 1),
        ("</s>", 3),
    ]


def test_prefix_postfix_and_no_space_separator(tmp_path, llama_like_tok):
    tok = hf_tokenizer(llama_like_tok)
    rows = [{"prompt": "q0 alpha ", "completion": "a0 beta"}]
    ids, types = _run_single(
        tmp_path,
        llama_like_tok,
        rows,
        "--prompt-prefix",
        "[P] ",
        "--prompt-postfix",
        " =>",
        "--disable-space-separator",
    )
    assert _parts(tok, ids[0], types[0]) == [("<s>[P] q0 alpha  =>", 0), ("a0 beta", 1), ("</s>", 3)]


def test_tokenizer_appending_eos_and_without_pad(tmp_path, bos_eos_tok):
    """An EOS the tokenizer appends is removed, BOS is dropped from a completion after a prompt, and
    padding uses EOS when there is no pad token."""
    tok = hf_tokenizer(bos_eos_tok)
    assert tok("x")["input_ids"][-1] == tok.eos_token_id and tok.pad_token_id is None
    rows = [{"prompt": "q0 alpha", "completion": "a0 beta"}]
    ids, types = _run_single(tmp_path, bos_eos_tok, rows)
    assert _parts(tok, ids[0], types[0]) == [("<s>q0 alpha", 0), (" a0 beta", 1), ("</s>", 3)]
    assert (ids[types == 2] == tok.eos_token_id).all() and (types == 2).any()


def test_tokenizer_without_special_tokens(tmp_path, plain_tok):
    tok = hf_tokenizer(plain_tok)
    ids, types = _run_single(tmp_path, plain_tok, [{"prompt": "q0 alpha", "completion": "a0 beta"}])
    assert _parts(tok, ids[0], types[0]) == [("q0 alpha", 0), (" a0 beta", 1), ("</s>", 3)]


def test_chat_template(tmp_path, llama_like_tok):
    tok = hf_tokenizer(llama_like_tok)
    rows = [{"prompt": "q0 alpha", "completion": "a0 beta"}]
    ids, types = _run_single(tmp_path, llama_like_tok, rows, "--apply-chat-template")
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "q0 alpha"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<s>[user] q0 alpha\n[assistant]"
    assert _parts(tok, ids[0], types[0]) == [(rendered, 0), ("a0 beta", 1), ("</s>", 3)]
    assert ids[0][0] == tok.bos_token_id and ids[0][1] != tok.bos_token_id  # one BOS: the template's


def test_sentencepiece_model(tmp_path, spm_model):
    """A sentencepiece .model is accepted, tokenizes like the Llama tokenizer made from it, and its
    tokenizer dir is saved with the dataset."""
    from transformers import AutoTokenizer

    rows = [{"prompt": "q0 alpha beta", "completion": "a0 gamma"}, {"text": "t1 river stone"}]
    ids, types = _run_single(tmp_path, spm_model, rows)
    saved = AutoTokenizer.from_pretrained(str(tmp_path / "out" / "tokenizer"))
    want = expected_rows(saved, rows, "single::drop", "jsonl", "jsonl", length=64)
    assert [r.tolist() for r in ids] == [w[0] for w in want]
    assert [r.tolist() for r in types] == [w[1] for w in want]
    text = saved.decode(ids[0][types[0] != 2].tolist(), skip_special_tokens=True)
    assert "q0 alpha beta" in text and "a0 gamma" in text


def test_saved_tokenizer_names_a_class_older_transformers_know(tmp_path, llama_like_tok):
    """transformers 5 saves ``TokenizersBackend``; the dataset's tokenizer/ names ``PreTrainedTokenizerFast``
    (the same class in 5.x, and one 4.x knows), and loads to the same tokenizer."""
    import json

    from transformers import AutoTokenizer

    _run_single(tmp_path, llama_like_tok, [{"prompt": "q0 alpha beta", "completion": "a0 gamma"}])
    saved = tmp_path / "out" / "tokenizer"
    assert json.loads((saved / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    text = "q0 alpha beta a0 gamma"
    assert AutoTokenizer.from_pretrained(saved)(text).input_ids == hf_tokenizer(llama_like_tok)(text).input_ids

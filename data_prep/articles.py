"""Lines -> token ids and token types, a chunk of lines at a time (runs in worker processes).

The contract (ARCHITECTURE.md, Contracts), per prompt/completion pair: the prompt is right-stripped of spaces and the
completion gets exactly one leading space (unless ``--disable-space-separator``); ``--prompt-prefix``
/ ``--prompt-postfix`` wrap a non-empty prompt. Each text is encoded without the tokenizer's own
special tokens; its start tokens (BOS) are put before the prompt, or before the completion when the
pair has no prompt; an EOS the tokenizer would append is never added; one EOS closes every pair.
Types: prompt 0, completion 1, the closing EOS 1, except 3 (separator) for the last pair of an
article and, with ``--attention-boundary prompt_completion_pair``, for every pair.
A ``{"text": ...}`` line or a .txt line is one article of completion tokens (with start tokens, no
added space). Pairs with an empty completion are skipped unless ``--keep-prompt-only-sequences``.
With ``--apply-chat-template`` the (prefixed) prompt becomes the template's user turn plus its
generation prompt, encoded as is (the template holds its own BOS), and the completion is left as is.

Packing units: a whole article (``--packing-boundary jsonl``) or each pair (``prompt_completion_pair``).
Only numpy, json and ``tokenizers`` are imported, so worker processes start fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import chain

import numpy as np

from modelzoo.data_prep.errors import DataPrepError
from modelzoo.data_prep.tokenizer_io import TokenizerSpec

_SNIPPET = 80


@dataclass(frozen=True)
class ArticleSettings:
    """Everything needed to turn lines into tokens (picklable; sent once to each worker)."""

    tokenizer: TokenizerSpec
    file_names: tuple[str, ...]
    file_is_jsonl: tuple[bool, ...]
    prompt_keyword: str
    completion_keyword: str
    prompt_prefix: str | None
    prompt_postfix: str | None
    disable_space_separator: bool
    apply_chat_template: bool
    keep_prompt_only_sequences: bool
    ignore_input_format_error: bool
    pair_packing_units: bool
    pair_separators: bool
    prompt_type: int
    completion_type: int
    separator_type: int


@dataclass
class Chunk:
    """Lines of one split, in order. lines ``[n]`` raw bytes; file_idx int32 ``[n]``; line_no int64 ``[n]``."""

    index: int
    split: int
    lines: list[bytes]
    file_idx: np.ndarray
    line_no: np.ndarray


@dataclass
class TokenizedChunk:
    """A chunk's packing units, concatenated in order.

    ids int32 ``[T]``, types uint8 ``[T]``; unit_lengths int64 ``[U]`` with ``sum == T``.
    bad_lines: ``file:line: reason`` of lines skipped by ``--ignore-input-format-error``.
    """

    index: int
    split: int
    ids: np.ndarray
    types: np.ndarray
    unit_lengths: np.ndarray
    articles: int
    pairs_skipped: int
    bad_lines: list[str]


class BadLine(Exception):
    """A line that is not valid input (message: the reason)."""


class ChunkTokenizer:
    """Callable: Chunk -> TokenizedChunk, with the fast tokenizer built from ``settings``."""

    def __init__(self, settings: ArticleSettings):
        self.s = settings
        self.tokenizer = settings.tokenizer.build()
        self._encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        self._render = None
        if settings.apply_chat_template:
            from transformers.utils.chat_template_utils import render_jinja_template

            self._render = render_jinja_template

    # -- parsing -------------------------------------------------------------------------------
    def _pairs(self, raw: bytes, is_jsonl: bool) -> list[tuple[str | None, str, bool]]:
        """``[(prompt or None, completion, is_text)]`` of one line; raises BadLine."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadLine(f"not valid UTF-8 (byte {err.start}: {raw[err.start : err.start + 4]!r})") from None
        if not is_jsonl:
            return [(None, text.rstrip("\r"), True)]
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise BadLine(f"malformed JSON ({err.msg}, column {err.colno})") from None
        if isinstance(obj, dict):
            ck = self.s.completion_keyword
            if ck not in obj and "text" in obj:
                return [(None, _as_str(obj["text"], "text"), True)]
            items = [obj]
        elif isinstance(obj, list):
            items = obj
        else:
            raise BadLine(f"expected a JSON object or a list of objects, got {type(obj).__name__}")
        pairs = []
        for item in items:
            if not isinstance(item, dict):
                raise BadLine(f"a list article must hold JSON objects, got {type(item).__name__}")
            if self.s.completion_keyword not in item:
                keys = ", ".join(list(item)[:6])
                raise BadLine(
                    f"missing '{self.s.completion_keyword}' key (keys: {keys}); name the key with "
                    '--completion-keyword, or use {"text": ...} for plain text'
                )
            prompt = _as_str(item.get(self.s.prompt_keyword), self.s.prompt_keyword)
            completion = _as_str(item[self.s.completion_keyword], self.s.completion_keyword)
            pairs.append((prompt, completion, False))
        return pairs

    def _prompt_completion(self, prompt: str, completion: str) -> tuple[str, str]:
        s = self.s
        if s.apply_chat_template:
            return (s.prompt_prefix or "") + prompt + (s.prompt_postfix or ""), completion
        if not s.disable_space_separator:
            prompt = prompt.rstrip(" ")
            if completion:
                completion = " " + completion.lstrip(" ")
        if prompt:
            prompt = (s.prompt_prefix or "") + prompt + (s.prompt_postfix or "")
        return prompt, completion

    # -- tokenizing ----------------------------------------------------------------------------
    def __call__(self, chunk: Chunk) -> TokenizedChunk:
        s = self.s
        texts: list[str] = []
        seg_type: list[int] = []
        seg_start: list[bool] = []
        seg_eos: list[int] = []  # -1: no EOS after this segment, else the EOS's type
        seg_unit: list[int] = []
        chat_prompts: list[int] = []  # segment indices whose text is a chat user turn
        bad_lines: list[str] = []
        articles = pairs_skipped = 0
        unit = -1
        for i, raw in enumerate(chunk.lines):
            file_idx = int(chunk.file_idx[i])
            try:
                pairs = self._pairs(raw, s.file_is_jsonl[file_idx])
            except BadLine as err:
                where = f"{s.file_names[file_idx]}:{int(chunk.line_no[i])}"
                snippet = raw[:_SNIPPET].decode("utf-8", "replace")
                message = f"{where}: {err}: {snippet!r}"
                if not s.ignore_input_format_error:
                    raise DataPrepError(
                        f"{message} -- fix the line, or pass --ignore-input-format-error to skip bad lines"
                    ) from None
                bad_lines.append(message)
                continue
            kept = [p for p in pairs if p[1] or (s.keep_prompt_only_sequences and p[0])]
            pairs_skipped += len(pairs) - len(kept)
            if not kept:
                continue
            articles += 1
            if not s.pair_packing_units:
                unit += 1
            for j, (prompt, completion, is_text) in enumerate(kept):
                if s.pair_packing_units:
                    unit += 1
                eos_type = (
                    s.separator_type if (j == len(kept) - 1 or s.pair_separators) else s.completion_type
                )
                if is_text:
                    texts.append(completion)
                    seg_type.append(s.completion_type)
                    seg_start.append(True)
                    seg_eos.append(eos_type)
                    seg_unit.append(unit)
                    continue
                prompt, completion = self._prompt_completion(prompt or "", completion)
                has_prompt = bool(prompt) or s.apply_chat_template
                if has_prompt:
                    if s.apply_chat_template:
                        chat_prompts.append(len(texts))
                    texts.append(prompt)
                    seg_type.append(s.prompt_type)
                    seg_start.append(not s.apply_chat_template)
                    seg_eos.append(-1 if completion else eos_type)
                    seg_unit.append(unit)
                if completion:
                    texts.append(completion)
                    seg_type.append(s.completion_type)
                    seg_start.append(not has_prompt)
                    seg_eos.append(eos_type)
                    seg_unit.append(unit)
        if chat_prompts:
            self._apply_chat_template(texts, chat_prompts)
        ids, types, unit_lengths = self._assemble(texts, seg_type, seg_start, seg_eos, seg_unit, unit + 1)
        return TokenizedChunk(
            chunk.index, chunk.split, ids, types, unit_lengths, articles, pairs_skipped, bad_lines
        )

    def _apply_chat_template(self, texts: list[str], which: list[int]) -> None:
        s = self.s
        conversations = [[{"role": "user", "content": texts[i]}] for i in which]
        rendered, _ = self._render(
            conversations=conversations,
            chat_template=s.tokenizer.chat_template,
            add_generation_prompt=True,
            **s.tokenizer.special_tokens,
        )
        for i, text in zip(which, rendered, strict=True):
            texts[i] = text

    def _assemble(self, texts, seg_type, seg_start, seg_eos, seg_unit, num_units):
        """Encode every segment in one batch and lay out ``[start ids] + ids + [EOS]`` per segment."""
        spec = self.s.tokenizer
        if not texts:
            empty = np.zeros(0, dtype=np.int64)
            return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.uint8), empty
        encodings = self._encode(texts, add_special_tokens=False)
        lens = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(texts))
        flat = np.fromiter(
            chain.from_iterable([e.ids for e in encodings]), dtype=np.int32, count=int(lens.sum())
        )
        start = np.asarray(seg_start, dtype=bool)
        eos_type = np.asarray(seg_eos, dtype=np.int64)
        has_eos = eos_type >= 0
        n_start = start.astype(np.int64) * len(spec.start_ids)
        out_len = n_start + lens + has_eos
        out_off = np.cumsum(out_len) - out_len
        ids = np.empty(int(out_len.sum()), dtype=np.int32)
        types = np.repeat(np.asarray(seg_type, dtype=np.uint8), out_len)
        src_off = np.cumsum(lens) - lens
        ids[np.repeat(out_off + n_start - src_off, lens) + np.arange(len(flat))] = flat
        for k, token in enumerate(spec.start_ids):
            ids[out_off[start] + k] = token
        eos_at = (out_off + n_start + lens)[has_eos]
        ids[eos_at] = spec.eos_id
        types[eos_at] = eos_type[has_eos]
        unit_lengths = np.bincount(np.asarray(seg_unit, dtype=np.int64), weights=out_len, minlength=num_units)
        return ids, types, unit_lengths.astype(np.int64)


def _as_str(value, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadLine(f"'{key}' must be a string, got {type(value).__name__}")
    return value

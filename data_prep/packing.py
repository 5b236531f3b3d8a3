"""Packing units (articles or pairs) into fixed-length rows, vectorized with numpy.

full: the token stream is cut every L tokens (a unit may span rows; the last row is padded).
greedy: next-fit; a unit that does not fit the open row closes it (padded) and opens a new one.
single: one unit per row.
A unit longer than L (greedy/single) is dropped, or keeps its last L (truncate_left) or first L
(truncate_right) tokens. Rows without a completion token are dropped unless keep_prompt_only.
The open row (full/greedy) carries over between ``add`` calls, so packing a stream chunk by chunk
gives the same rows as packing it whole; ``finish`` pads and returns it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modelzoo.data_prep.options import PackingConfig


@dataclass
class PackedRows:
    """ids int32 ``[R, L]``; types uint8 ``[R, L]``."""

    ids: np.ndarray
    types: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class PackStats:
    input_tokens: int = 0
    tokens_dropped_from_packing: int = 0
    tokens_dropped_from_all_prompt: int = 0
    sequences_dropped_prompt_only: int = 0


class Packer:
    def __init__(
        self,
        config: PackingConfig,
        max_seq_length: int,
        pad_id: int,
        padding_type: int,
        completion_type: int,
        keep_prompt_only: bool = False,
    ):
        self.config = config
        self.L = max_seq_length
        self.pad_id = pad_id
        self.padding_type = padding_type
        self.completion_type = completion_type
        self.keep_prompt_only = keep_prompt_only
        self.stats = PackStats()
        self._open_ids = np.zeros(0, dtype=np.int32)  # the open row's tokens, length < L (== L: full)
        self._open_types = np.zeros(0, dtype=np.uint8)

    def add(self, ids: np.ndarray, types: np.ndarray, unit_lengths: np.ndarray) -> PackedRows:
        """Rows completed by these units (ids int32 ``[T]``, types uint8 ``[T]``, unit_lengths ``[U]``)."""
        self.stats.input_tokens += len(ids)
        if self.config.style == "full":
            rows = self._full(ids, types)
        elif self.config.style == "single":
            rows = self._single(ids, types, unit_lengths)
        else:
            rows = self._greedy(ids, types, unit_lengths)
        return self._drop_prompt_only(rows)

    def finish(self) -> PackedRows:
        """The padded open row, if it holds any token."""
        n = len(self._open_ids)
        rows = self._empty_rows(1 if n else 0)
        if n:
            rows.ids[0, :n] = self._open_ids
            rows.types[0, :n] = self._open_types
        self._open_ids, self._open_types = self._open_ids[:0], self._open_types[:0]
        return self._drop_prompt_only(rows)

    # -- styles --------------------------------------------------------------------------------
    def _full(self, ids: np.ndarray, types: np.ndarray) -> PackedRows:
        if len(self._open_ids):
            ids = np.concatenate([self._open_ids, ids])
            types = np.concatenate([self._open_types, types])
        n = len(ids) // self.L
        cut = n * self.L
        self._open_ids, self._open_types = ids[cut:].copy(), types[cut:].copy()
        return PackedRows(ids[:cut].reshape(n, self.L), types[:cut].reshape(n, self.L))

    def _overflow(self, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first kept token, kept count) of each unit when it starts a row: ``[U]`` each."""
        long = lengths > self.L
        over = self.config.overflow
        take = np.where(long, 0 if over == "drop" else self.L, lengths)
        first = np.where(long & (over == "truncate_left"), lengths - self.L, 0)
        self.stats.tokens_dropped_from_packing += int((lengths - take).sum())
        return first, take

    def _single(self, ids, types, lengths) -> PackedRows:
        first, take = self._overflow(lengths)
        kept = take > 0
        row = np.cumsum(kept) - 1
        rows = self._empty_rows(int(kept.sum()))
        self._scatter(rows, ids, types, lengths, first, take, row, np.zeros_like(row))
        return rows

    def _greedy(self, ids, types, lengths) -> PackedRows:
        L, fill, r = self.L, len(self._open_ids), 0
        first, take = self._overflow(lengths)  # a unit longer than L never fits, so starts a row
        row = np.empty(len(lengths), dtype=np.int64)
        offset = np.empty(len(lengths), dtype=np.int64)
        for u, (n, t) in enumerate(zip(lengths.tolist(), take.tolist(), strict=True)):
            if fill + n <= L:  # fits the open row
                row[u], offset[u] = r, fill
                fill += n
                continue
            if fill:  # close the open row, start the unit on a new one
                r, fill = r + 1, 0
            row[u], offset[u] = r, 0
            fill = t
        rows = self._empty_rows(r + 1)
        n_open = len(self._open_ids)
        rows.ids[0, :n_open] = self._open_ids
        rows.types[0, :n_open] = self._open_types
        self._scatter(rows, ids, types, lengths, first, take, row, offset)
        self._open_ids = rows.ids[r, :fill].copy()
        self._open_types = rows.types[r, :fill].copy()
        return PackedRows(rows.ids[:r], rows.types[:r])

    # -- helpers -------------------------------------------------------------------------------
    def _empty_rows(self, n: int) -> PackedRows:
        return PackedRows(
            np.full((n, self.L), self.pad_id, dtype=np.int32),
            np.full((n, self.L), self.padding_type, dtype=np.uint8),
        )

    def _scatter(self, rows, ids, types, lengths, first, take, row, offset) -> None:
        """Copy ``take[u]`` tokens of unit u, from its token ``first[u]``, to ``rows[row[u], offset[u]:]``."""
        unit_start = np.cumsum(lengths) - lengths
        total = int(take.sum())
        if total == 0:
            return
        rel = np.arange(total) - np.repeat(np.cumsum(take) - take, take)
        src = np.repeat(unit_start + first, take) + rel
        dst = np.repeat(row * self.L + offset, take) + rel
        rows.ids.reshape(-1)[dst] = ids[src]
        rows.types.reshape(-1)[dst] = types[src]

    def _drop_prompt_only(self, rows: PackedRows) -> PackedRows:
        if self.keep_prompt_only or not len(rows):
            return rows
        has_completion = (rows.types == self.completion_type).any(axis=1)
        if has_completion.all():
            return rows
        dropped = ~has_completion
        self.stats.sequences_dropped_prompt_only += int(dropped.sum())
        self.stats.tokens_dropped_from_all_prompt += int((rows.types[dropped] != self.padding_type).sum())
        return PackedRows(rows.ids[has_completion], rows.types[has_completion])

"""Train/dev lines -> chunks -> tokenized in worker processes -> packed -> row files, with counts.

``TokenizePack.tokenize_and_pack`` streams: lines are assigned to splits in order (test lines are
written raw as they pass), train/dev lines are grouped into chunks of about CHUNK_BYTES whose
boundaries depend only on the line order (so the output does not depend on ``--num-workers``),
results come back in order and each split's packer appends its rows to the split's row files.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from modelzoo.data_prep.articles import ArticleSettings, Chunk
from modelzoo.data_prep.errors import DataPrepError
from modelzoo.data_prep.hdf5_writer import SplitSink
from modelzoo.data_prep.input_files import InputFile, LineBlock, LineLimit
from modelzoo.data_prep.metrics import SplitMetrics
from modelzoo.data_prep.options import PrepOptions, SplitOptions
from modelzoo.data_prep.packing import Packer
from modelzoo.data_prep.progress import TokenProgress
from modelzoo.data_prep.splits import DEV, SPLIT_NAMES, TEST, TRAIN, SplitAssigner
from modelzoo.data_prep.tokenizer_io import TokenizerSpec
from modelzoo.data_prep.workers import TokenizerPool

CHUNK_BYTES = 1 << 20
CHUNK_LINES = 16384
BAD_LINES_LOG = "json_load_failed_lines.log"


def log(message: str) -> None:
    print(f"[data_prep] {message}", file=sys.stderr, flush=True)


class PendingChunk:
    """Lines waiting to become a chunk."""

    def __init__(self):
        self.lines, self.file_idx, self.line_no, self.bytes = [], [], [], 0

    def add(self, line: bytes, file_idx: int, line_no: int) -> None:
        self.lines.append(line)
        self.file_idx.append(file_idx)
        self.line_no.append(line_no)
        self.bytes += len(line)

    def take(self, index: int, split: int) -> Chunk:
        chunk = Chunk(
            index,
            split,
            self.lines,
            np.asarray(self.file_idx, dtype=np.int32),
            np.asarray(self.line_no, dtype=np.int64),
        )
        self.__init__()
        return chunk


class TokenizePack:
    """Tokenize + pack the train/dev lines of one run into row files; raw test lines to test files."""

    def __init__(
        self,
        opts: PrepOptions,
        files: list[InputFile],
        spec: TokenizerSpec,
        work_dir: Path,
        bad_log_dir: Path,
    ):
        from modelzoo.data.token_types import COMPLETION, PADDING, PROMPT, SEPARATOR

        self.opts, self.files, self.spec = opts, files, spec
        self.types = {"prompt": PROMPT, "completion": COMPLETION, "padding": PADDING, "separator": SEPARATOR}
        self.settings = ArticleSettings(
            tokenizer=spec,
            file_names=tuple(str(f.path) for f in files),
            file_is_jsonl=tuple(f.is_jsonl for f in files),
            prompt_keyword=opts.prompt_keyword,
            completion_keyword=opts.completion_keyword,
            prompt_prefix=opts.prompt_prefix,
            prompt_postfix=opts.prompt_postfix,
            disable_space_separator=opts.disable_space_separator,
            apply_chat_template=opts.apply_chat_template,
            keep_prompt_only_sequences=opts.keep_prompt_only_sequences,
            ignore_input_format_error=opts.ignore_input_format_error,
            pair_packing_units=opts.packing_boundary == "prompt_completion_pair",
            pair_separators=opts.attention_boundary == "prompt_completion_pair",
            prompt_type=PROMPT,
            completion_type=COMPLETION,
            separator_type=SEPARATOR,
        )
        L = opts.max_seq_length
        self.packers = {
            s: Packer(opts.packing, L, spec.pad_id, PADDING, COMPLETION, opts.keep_prompt_only_sequences)
            for s in (TRAIN, DEV)
        }
        self.sinks = {s: SplitSink(work_dir, SPLIT_NAMES[s], L) for s in (TRAIN, DEV)}
        self.metrics = {s: SplitMetrics() for s in (TRAIN, DEV)}
        self.bad_lines = 0
        self.test_lines = 0
        self.lines_by_split = {TRAIN: 0, DEV: 0, TEST: 0}
        self.bad_log_path = Path(bad_log_dir) / BAD_LINES_LOG
        self._bad_log = None
        self._read_bytes = 0
        self._chunk_ends: dict[int, int] = {}  # chunk index -> input bytes read when it was cut

    def chunks(
        self, source: Iterator[LineBlock], assigner: SplitAssigner, test_out: list | None
    ) -> Iterator[Chunk]:
        """Train/dev lines in chunks of about CHUNK_BYTES (at most CHUNK_LINES); test lines written raw.

        Chunk boundaries depend only on the line order, so results do not depend on --num-workers.
        """
        pending = {TRAIN: PendingChunk(), DEV: PendingChunk()}
        index = 0
        for block in source:
            codes, test_file = assigner.assign(len(block))
            file_idx, line_no = block.file_idx.tolist(), block.line_no.tolist()
            for i, (line, code) in enumerate(zip(block.lines, codes.tolist(), strict=True)):
                self._read_bytes += len(line) + 1
                self.lines_by_split[code] += 1
                if code == TEST:
                    test_out[test_file[i]].write(line + b"\n")
                    self.test_lines += 1
                    continue
                p = pending[code]
                p.add(line, file_idx[i], line_no[i])
                if p.bytes >= CHUNK_BYTES or len(p.lines) >= CHUNK_LINES:
                    self._chunk_ends[index] = self._read_bytes
                    yield p.take(index, code)
                    index += 1
        for split in (TRAIN, DEV):
            if pending[split].lines:
                self._chunk_ends[index] = self._read_bytes
                yield pending[split].take(index, split)
                index += 1

    def tokenize_and_pack(
        self, pool: TokenizerPool, source, test_out, assigner: SplitAssigner | None = None
    ) -> None:
        assigner = assigner or SplitAssigner(SplitOptions())
        total_bytes = sum(f.size for f in self.files)
        with TokenProgress(total_bytes, self.opts.progress) as bar:
            for res in pool.imap(self.chunks(source, assigner, test_out)):
                m = self.metrics[res.split]
                m.articles += res.articles
                m.pairs_dropped_no_completion += res.pairs_skipped
                if res.bad_lines:
                    self._log_bad_lines(res.bad_lines)
                self.sinks[res.split].append(
                    self.packers[res.split].add(res.ids, res.types, res.unit_lengths)
                )
                bar.update(len(res.ids), self._chunk_ends.pop(res.index))
        for split in (TRAIN, DEV):
            self.sinks[split].append(self.packers[split].finish())
            self.sinks[split].close()
            self._fill_metrics(split)
        if self._bad_log is not None:
            self._bad_log.close()

    def line_limit(self) -> LineLimit:
        """``--max-line-bytes`` for the line reader: a longer line stops the run, or is skipped and
        logged with ``--ignore-input-format-error`` (checked before the line is read whole)."""

        def report(path: Path, line_no: int, size: int) -> None:
            message = (f"{path}:{line_no}: line longer than --max-line-bytes {self.opts.max_line_bytes} "
                       f"(at least {size} bytes)")
            if not self.opts.ignore_input_format_error:
                raise DataPrepError(
                    f"{message} -- split the text over several lines, raise --max-line-bytes (tokenizing"
                    " takes 100-200x the line's size in memory), or pass --ignore-input-format-error"
                    " to skip it"
                )
            self._log_bad_lines([message])

        return LineLimit(self.opts.max_line_bytes, report)

    def _log_bad_lines(self, lines: list[str]) -> None:
        if self._bad_log is None:
            self._bad_log = open(self.bad_log_path, "w", encoding="utf-8")
        self._bad_log.write("\n".join(lines) + "\n")
        self.bad_lines += len(lines)

    def _fill_metrics(self, split: int) -> None:
        m, sink, stats = self.metrics[split], self.sinks[split], self.packers[split].stats
        t = self.types
        m.input_tokens = stats.input_tokens
        m.sequences = sink.rows
        m.total_tokens = sink.rows * self.opts.max_seq_length
        m.prompt_tokens = int(sink.type_counts[t["prompt"]])
        m.completion_tokens = int(sink.type_counts[t["completion"]] + sink.type_counts[t["separator"]])
        m.padding_tokens = int(sink.type_counts[t["padding"]])
        m.tokens_dropped_from_packing = stats.tokens_dropped_from_packing
        m.tokens_dropped_from_all_prompt = stats.tokens_dropped_from_all_prompt

    def why_empty(self, split: int) -> str:
        name, m = SPLIT_NAMES[split], self.metrics[split]
        lines = self.lines_by_split[split]
        if lines == 0:
            return f"the {name} split got no input lines; add data or change --dev-ratio/--test-ratio/--num_*_splits"
        reasons = []
        if self.bad_lines:
            reasons.append(f"{self.bad_lines} bad lines were skipped (see {BAD_LINES_LOG})")
        if m.pairs_dropped_no_completion:
            reasons.append(
                f"{m.pairs_dropped_no_completion} pairs had an empty completion (--keep-prompt-only-sequences keeps them)"
            )
        if m.tokens_dropped_from_packing:
            reasons.append(
                f"{m.tokens_dropped_from_packing} tokens of articles longer than --max-seq-length "
                f"{self.opts.max_seq_length} were dropped by --input-packing-config {self.opts.packing} "
                "(use a truncate_* overflow, full packing, or a larger --max-seq-length)"
            )
        if m.tokens_dropped_from_all_prompt:
            reasons.append(
                f"{m.tokens_dropped_from_all_prompt} tokens were in rows without a completion token "
                "(--keep-prompt-only-sequences keeps them)"
            )
        detail = "; ".join(reasons) or "the lines held no text to tokenize"
        return f"no {name} sequences were produced from {lines} {name} lines: {detail}"

    def report_drops(self, bad_log_where: str) -> None:
        for split in (TRAIN, DEV):
            m, name = self.metrics[split], SPLIT_NAMES[split]
            if m.tokens_dropped_from_packing:
                share = 100 * m.tokens_dropped_from_packing / max(1, m.input_tokens)
                log(
                    f"warning: {name}: {m.tokens_dropped_from_packing:,} tokens ({share:.1f}%) of articles longer than "
                    f"--max-seq-length {self.opts.max_seq_length} were dropped/truncated by {self.opts.packing}"
                )
            if m.tokens_dropped_from_all_prompt:
                log(
                    f"warning: {name}: {m.tokens_dropped_from_all_prompt:,} tokens dropped in rows with no completion token"
                )
        if self.bad_lines:
            log(
                f"warning: skipped {self.bad_lines:,} bad input lines (--ignore-input-format-error); listed in {bad_log_where}"
            )

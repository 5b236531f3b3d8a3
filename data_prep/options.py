"""Parsed and validated options of a data-prep run.

Errors name the command-line flags in their kebab-case spelling (``--max-seq-length``); the CLI also
accepts generative_data_prep's snake_case spelling of each (``--max_seq_length``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from modelzoo.data_prep.errors import DataPrepError
from modelzoo.data_prep.input_files import MAX_LINE_BYTES

PACKING_STYLES = ("full", "greedy", "single")
OVERFLOW_TYPES = ("drop", "truncate_left", "truncate_right")
BOUNDARIES = ("jsonl", "prompt_completion_pair")
SHUFFLE_MODES = ("False", "on_RAM", "large_file")  # as generative_data_prep names them (and metadata.yaml)
SHUFFLE_CHOICES = ("off", "on_RAM", "large_file")  # what --help shows: "off" is "False"
_SHUFFLE_OFF = ("off", "False", "false")


def shuffle_mode(text: str) -> str:
    """A ``--shuffle`` value as stored (``off``/``false`` -> ``False``); anything unknown is kept, for
    ``PrepOptions.validate`` to refuse."""
    return "False" if text in _SHUFFLE_OFF else text


@dataclass(frozen=True)
class PackingConfig:
    """``full`` | ``{greedy,single}::{drop,truncate_left,truncate_right}``.

    full: concatenate every article and cut every ``max_seq_length`` tokens (articles may span rows).
    greedy: next-fit; an article that does not fit the open row starts a new row.
    single: one article per row.
    Overflow (greedy/single, an article longer than a row): drop it, keep its last L tokens
    (truncate_left) or its first L (truncate_right).
    """

    style: str
    overflow: str | None = None

    @classmethod
    def parse(cls, text: str) -> PackingConfig:
        parts = text.split("::")
        if parts == ["full"]:
            return cls("full")
        if len(parts) == 2 and parts[0] in ("greedy", "single") and parts[1] in OVERFLOW_TYPES:
            return cls(parts[0], parts[1])
        raise DataPrepError(f"--input-packing-config '{text}' is not one of: {', '.join(packing_choices())}")

    def __str__(self) -> str:
        return self.style if self.overflow is None else f"{self.style}::{self.overflow}"


def packing_choices() -> list[str]:
    return ["full"] + [f"{s}::{o}" for s in ("greedy", "single") for o in OVERFLOW_TYPES]


@dataclass
class SplitOptions:
    """How lines are divided into train/dev/test and how many files each split gets."""

    dev_ratio: float | None = None
    test_ratio: float | None = None
    num_training_splits: int | None = None
    num_dev_splits: int | None = None
    num_test_splits: int | None = None

    def validate(self) -> None:
        counts = (self.num_dev_splits, self.num_test_splits)
        if any(c is not None for c in counts):
            if self.num_training_splits is None or any(c is None for c in counts):
                raise DataPrepError(
                    "--num-dev-splits and --num-test-splits go together with --num-training-splits: "
                    "give all three (or use --dev-ratio/--test-ratio)"
                )
            if self.dev_ratio is not None or self.test_ratio is not None:
                raise DataPrepError(
                    "give either --dev-ratio/--test-ratio or --num-dev-splits/--num-test-splits, not both"
                )
        for flag, value in (("--dev-ratio", self.dev_ratio), ("--test-ratio", self.test_ratio)):
            if value is not None and not 0.0 <= value < 1.0:
                raise DataPrepError(f"{flag} {value} must be in [0, 1)")
        if (self.dev_ratio or 0.0) + (self.test_ratio or 0.0) >= 1.0:
            raise DataPrepError(
                "--dev-ratio + --test-ratio must be below 1 (no data would be left for training)"
            )
        for flag, value, low in (
            ("--num-training-splits", self.num_training_splits, 1),
            ("--num-dev-splits", self.num_dev_splits, 0),
            ("--num-test-splits", self.num_test_splits, 0),
        ):
            if value is not None and value < low:
                raise DataPrepError(f"{flag} {value} must be >= {low}")


@dataclass
class PrepOptions:
    """Everything a ``pipeline`` / ``data_prep`` run needs, already parsed."""

    input_path: str
    output_path: str
    pretrained_tokenizer: str
    max_seq_length: int = 2048
    packing: PackingConfig = field(default_factory=lambda: PackingConfig("full"))
    packing_boundary: str = "jsonl"
    attention_boundary: str = "jsonl"
    prompt_keyword: str = "prompt"
    completion_keyword: str = "completion"
    prompt_prefix: str | None = None
    prompt_postfix: str | None = None
    disable_space_separator: bool = False
    apply_chat_template: bool = False
    keep_prompt_only_sequences: bool = False
    shuffle: str = "False"
    seed: int = 42
    shuffle_ram_mb: float = 2048.0
    splits: SplitOptions = field(default_factory=SplitOptions)
    num_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    overwrite_output_path: bool = False
    ignore_input_format_error: bool = False
    compression: str = "gzip"
    allow_long_sequences: bool = False  # skip the --max-seq-length check against the tokenizer/model
    max_line_bytes: int = MAX_LINE_BYTES  # longer input lines are format errors (see input_files)
    # tokens/s + ETA on stderr: True always (plain lines when not a terminal), False never, None on a terminal
    progress: bool | None = None

    def __post_init__(self) -> None:
        self.shuffle = shuffle_mode(self.shuffle)

    def validate(self) -> None:
        if self.max_seq_length < 2:
            raise DataPrepError(f"--max-seq-length {self.max_seq_length} must be >= 2")
        for flag, value in (
            ("--packing-boundary", self.packing_boundary),
            ("--attention-boundary", self.attention_boundary),
        ):
            if value not in BOUNDARIES:
                raise DataPrepError(f"{flag} '{value}' is not one of: {', '.join(BOUNDARIES)}")
        if self.shuffle not in SHUFFLE_MODES:
            raise DataPrepError(
                f"--shuffle '{self.shuffle}' is not one of: {', '.join(SHUFFLE_CHOICES)} (off may be given as False)"
            )
        if self.max_line_bytes < 1:
            raise DataPrepError(f"--max-line-bytes {self.max_line_bytes} must be >= 1")
        if self.num_workers < 0:
            raise DataPrepError(
                f"--num-workers {self.num_workers} must be >= 0 (0 tokenizes in the main process)"
            )
        if self.shuffle_ram_mb <= 0:
            raise DataPrepError(f"--shuffle-ram-mb {self.shuffle_ram_mb} must be > 0")
        if self.compression not in ("gzip", "lzf", "none"):
            raise DataPrepError(f"--compression '{self.compression}' is not one of: gzip, lzf, none")
        if self.prompt_keyword == self.completion_keyword:
            raise DataPrepError("--prompt-keyword and --completion-keyword must differ")
        self.splits.validate()

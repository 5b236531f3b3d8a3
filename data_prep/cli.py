"""``modelzoo-data-prep {pipeline,data_prep,verify}``: parse flags, run, print the metrics table, exit code.

Flags are kebab-case (``--input-path``); each also accepts SambaNova generative_data_prep's
snake_case spelling (``--input_path``), so its scripts run unchanged. While tokenizing, a progress
bar on stderr shows tokens, tokens/s and an ETA (``--no-progress`` turns it off); stdout holds only
the metrics table. Exit status: 0 done, 1 a problem with the input, flags or output path (one
``error:`` line says what and how to fix it), 2 bad command line, 130 interrupted. Nothing is left
at ``--output-path`` unless the run completed.
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import sys
import textwrap

from modelzoo.data_prep.errors import DataPrepError
from modelzoo.data_prep.input_files import MAX_LINE_BYTES
from modelzoo.data_prep.options import (
    BOUNDARIES,
    OVERFLOW_TYPES,
    SHUFFLE_CHOICES,
    SHUFFLE_MODES,
    PackingConfig,
    PrepOptions,
    SplitOptions,
    packing_choices,
    shuffle_mode,
)
from modelzoo.data_prep.progress import LOG_INTERVAL_S
from modelzoo.data_prep.tokenizer_io import MAX_SEQ_LENGTH_CAP

ALIASES_NOTE = (
    "Each option also accepts its generative_data_prep spelling with underscores (--input_path for "
    "--input-path, --max_seq_length for --max-seq-length, ...), so existing scripts run unchanged; "
    "--shuffle False is the same as --shuffle off."
)
_FORMATS_NOTE = (
    'Input lines: {"prompt": ..., "completion": ...}, a list of such objects (a multi-turn article), '
    'or {"text": ...}; .txt files hold one document per line (all completion). '
    "Output: the HDF5 dataset contract of ARCHITECTURE.md (generative_data_prep layout)."
)


def _paragraphs(*texts: str) -> str:
    return "\n\n".join(textwrap.fill(t, 88, break_on_hyphens=False) for t in texts)


_EPILOG = _paragraphs(_FORMATS_NOTE, ALIASES_NOTE)


class _Parser(argparse.ArgumentParser):
    """An abbreviation that matches an option and its snake_case alias (``--overwrite``) names one
    option, not two: it stays as unambiguous as before the aliases."""

    def _get_option_tuples(self, option_string):
        seen, unique = set(), []
        for match in super()._get_option_tuples(option_string):
            if id(match[0]) not in seen:
                seen.add(id(match[0]))
                unique.append(match)
        return unique


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option under its kebab-case name only (the snake_case aliases are one sentence of the
    epilog), the default of every option that takes a value, and no line broken inside a flag name.
    Descriptions and epilogs are wrapped beforehand (``_paragraphs``)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        kebab = [s for s in action.option_strings if "_" not in s.lstrip("-")]
        if kebab and len(kebab) < len(action.option_strings):
            action = copy.copy(action)
            action.option_strings = kebab
        return super()._format_action_invocation(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or action.nargs == 0
            or action.required
            or action.default in (None, argparse.SUPPRESS)
            or "default" in text.lower()
        ):
            return text
        if text.endswith("."):
            return f"{text[:-1]} (default: %(default)s)."
        return f"{text} (default: %(default)s)"

    def _split_lines(self, text: str, width: int) -> list[str]:
        # Never break inside a flag name (--max-seq-length) or a hyphenated word.
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _flag(p: argparse.ArgumentParser, name: str, **kwargs) -> argparse.Action:
    """``--name-with-dashes``, with ``--name_with_underscores`` (generative_data_prep's) as an alias."""
    kebab = "--" + name.replace("_", "-")
    names = [kebab] if "_" not in name else [kebab, "--" + name]
    return p.add_argument(*names, dest=kwargs.pop("dest", name.replace("-", "_")), **kwargs)


def _packing(text: str) -> PackingConfig:
    try:
        return PackingConfig.parse(text)
    except DataPrepError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _shuffle(text: str) -> str:
    mode = shuffle_mode(text)
    if mode not in SHUFFLE_MODES:
        raise argparse.ArgumentTypeError(
            f"invalid choice: '{text}' (choose from {', '.join(SHUFFLE_CHOICES)}; off may be given as False)"
        )
    return mode


def _choices(values) -> str:
    return "{" + ",".join(values) + "}"


def _add_tokenize_flags(p: argparse.ArgumentParser) -> None:
    _flag(
        p,
        "input_path",
        required=True,
        metavar="PATH",
        help="A .jsonl or .txt file, or a directory of them (top level, sorted by name). Required.",
    )
    _flag(
        p,
        "pretrained_tokenizer",
        required=True,
        metavar="PATH",
        help="A local HF tokenizer directory (save_pretrained output) or a sentencepiece .model file. "
        "Must define an EOS token. Nothing is downloaded. Required.",
    )
    _flag(
        p,
        "max_seq_length",
        type=int,
        default=2048,
        metavar="N",
        help="Tokens per packed sequence (default: %(default)s). Must not exceed the tokenizer's "
        "model_max_length, nor the max_position_embeddings of a config.json beside it; with neither "
        f"known, at most {MAX_SEQ_LENGTH_CAP:,}.",
    )
    _flag(
        p,
        "allow_long_sequences",
        action="store_true",
        help="Accept a --max-seq-length above those limits (rows the model was not built for).",
    )
    _flag(
        p,
        "max_line_bytes",
        type=int,
        default=MAX_LINE_BYTES,
        metavar="N",
        help="Longest input line, in bytes (default: %(default)s = 16 MiB): a longer line is an input "
        "format error (skipped with --ignore-input-format-error) and is never read whole, as tokenizing "
        "a line takes 100-200x its size in memory.",
    )
    _flag(
        p,
        "input_packing_config",
        type=_packing,
        default="full",
        metavar=_choices(["full", "greedy::OVERFLOW", "single::OVERFLOW"]),
        help="full: concatenate everything and cut every --max-seq-length tokens; greedy: next-fit, an "
        "article that does not fit starts a new sequence; single: one article per sequence. OVERFLOW, "
        f"one of {', '.join(OVERFLOW_TYPES)}, is what happens to an article longer than a sequence: "
        "dropped, or it keeps its last (truncate_left) or first (truncate_right) --max-seq-length tokens. "
        f"Choices: {', '.join(packing_choices())}. Default: %(default)s.",
    )
    _flag(
        p,
        "packing_boundary",
        choices=BOUNDARIES,
        default="jsonl",
        help="The unit greedy/single packing keeps whole: a jsonl line (article) or each "
        "prompt/completion pair.",
    )
    _flag(
        p,
        "attention_boundary",
        choices=BOUNDARIES,
        default="jsonl",
        help="Which EOS tokens become separators (token type 3, where article attention restarts): the "
        "last EOS of each line, or the EOS closing every pair.",
    )
    _flag(p, "prompt_keyword", default="prompt", metavar="KEY", help="The jsonl key of the prompt.")
    _flag(p, "completion_keyword", default="completion", metavar="KEY", help="The jsonl key of the completion.")
    _flag(p, "prompt_prefix", default=None, metavar="TEXT",
          help="Text put before every non-empty prompt (default: none).")
    _flag(p, "prompt_postfix", default=None, metavar="TEXT",
          help="Text put after every non-empty prompt (default: none).")
    _flag(
        p,
        "disable_space_separator",
        action="store_true",
        help="Do not right-strip prompts and give completions one leading space.",
    )
    _flag(
        p,
        "apply_chat_template",
        action="store_true",
        help="Render each prompt as the user turn of the tokenizer's chat template, with its generation prompt.",
    )
    _flag(
        p,
        "keep_prompt_only_sequences",
        action="store_true",
        help="Keep pairs with an empty completion and sequences with no completion token (dropped by default).",
    )
    _flag(
        p,
        "num_workers",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="Tokenizer worker processes (default: the CPU count, %(default)s); 0 works in this process.",
    )
    _flag(
        p,
        "overwrite_output_path",
        action="store_true",
        help="Replace an existing --output-path once the new output is complete: only an empty directory, "
        "a dataset whose sha256/files_metadata.json lists exactly the files present, or (data_prep) an "
        "HDF5 file. Nothing else is deleted.",
    )
    _flag(
        p,
        "ignore_input_format_error",
        action="store_true",
        help="Skip malformed lines (bad JSON, missing keys, non-UTF-8, over --max-line-bytes) and list "
        "them in json_load_failed_lines.log instead of stopping at the first.",
    )
    _flag(
        p,
        "compression",
        choices=("gzip", "lzf", "none"),
        default="gzip",
        help="HDF5 compression (default: gzip, level 1 with byte shuffle; readable by any HDF5 reader).",
    )
    _flag(
        p,
        "no_progress",
        dest="progress",
        action="store_false",
        help="No progress bar. By default stderr shows one while tokenizing: tokens, tokens/s and an ETA "
        f"(redrawn on a terminal; otherwise a line every {LOG_INTERVAL_S:g} s).",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="modelzoo-data-prep",
        description=_paragraphs("Tokenize, pack, split and balance jsonl/txt into HDF5 for training."),
        epilog=_EPILOG,
        formatter_class=_HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    pipe = sub.add_parser(
        "pipeline",
        help="input file/dir -> dataset dir (train/dev/test splits, metadata, manifest)",
        description=_paragraphs(
            "Input file/dir -> dataset directory: train_{i}_of_{N}.hdf5, dev_{i}_of_{M}.hdf5, "
            "test_files/, tokenizer/, metadata.yaml, sha256/files_metadata.json."
        ),
        epilog=_EPILOG,
        formatter_class=_HelpFormatter,
    )
    _flag(pipe, "output_path", required=True, metavar="DIR", help="The dataset directory to create. Required.")
    _add_tokenize_flags(pipe)
    _flag(
        pipe,
        "shuffle",
        type=_shuffle,
        default="off",
        metavar=_choices(SHUFFLE_CHOICES),
        help="Shuffle lines before splitting: off (keep order; False is accepted too), on_RAM (in memory), "
        "large_file (external shuffle through bucket files, RAM bounded by --shuffle-ram-mb). "
        "Default: %(default)s.",
    )
    _flag(
        pipe,
        "seed",
        type=int,
        default=42,
        metavar="N",
        help="Seed of the shuffle: the same seed gives byte-identical HDF5.",
    )
    _flag(
        pipe,
        "shuffle_ram_mb",
        type=float,
        default=2048.0,
        metavar="MB",
        help="RAM budget of --shuffle large_file, in MB.",
    )
    _flag(
        pipe,
        "num_training_splits",
        type=int,
        default=None,
        metavar="N",
        help="Training files. Default: a power of two, 32 (128 from 10 GiB of input, 256 from 100 GiB), "
        "halved while a file would hold fewer than 32 sequences.",
    )
    _flag(
        pipe,
        "dev_ratio",
        type=float,
        default=None,
        metavar="R",
        help="Share of lines for the dev split, in [0, 1) (default: 0).",
    )
    _flag(
        pipe,
        "test_ratio",
        type=float,
        default=None,
        metavar="R",
        help="Share of lines for the test split, kept as raw text, in [0, 1) (default: 0).",
    )
    _flag(
        pipe,
        "num_dev_splits",
        type=int,
        default=None,
        metavar="N",
        help="Dev files; with --num-training-splits and --num-test-splits, lines are dealt to files by "
        "count (default: none, the ratios decide).",
    )
    _flag(
        pipe,
        "num_test_splits",
        type=int,
        default=None,
        metavar="N",
        help="Test files; with --num-training-splits and --num-dev-splits, instead of the ratios "
        "(default: none).",
    )

    one = sub.add_parser(
        "data_prep",
        help="one input file -> one .hdf5 file (no splitting or shuffling)",
        description=_paragraphs("One input file -> one .hdf5 file with input_ids and token_type_ids."),
        epilog=_EPILOG,
        formatter_class=_HelpFormatter,
    )
    _flag(one, "output_path", required=True, metavar="FILE", help="The .hdf5 file to create. Required.")
    _add_tokenize_flags(one)

    ver = sub.add_parser(
        "verify",
        help="re-check a dataset dir: manifest, shapes, dtypes, token types, metadata counts",
        description=_paragraphs("Re-check a dataset directory; exit 1 and list the problems if any."),
        epilog=_paragraphs("--skip_checksums, generative_data_prep's spelling, is accepted too."),
        formatter_class=_HelpFormatter,
    )
    ver.add_argument("dataset_path", help="The dataset directory.")
    _flag(ver, "skip_checksums", action="store_true", help="Check manifest sizes but not sha256 (faster).")
    return parser


def options_from_args(args: argparse.Namespace) -> PrepOptions:
    pipeline = args.command == "pipeline"
    return PrepOptions(
        input_path=args.input_path,
        output_path=args.output_path,
        pretrained_tokenizer=args.pretrained_tokenizer,
        max_seq_length=args.max_seq_length,
        packing=args.input_packing_config,
        packing_boundary=args.packing_boundary,
        attention_boundary=args.attention_boundary,
        prompt_keyword=args.prompt_keyword,
        completion_keyword=args.completion_keyword,
        prompt_prefix=args.prompt_prefix,
        prompt_postfix=args.prompt_postfix,
        disable_space_separator=args.disable_space_separator,
        apply_chat_template=args.apply_chat_template,
        keep_prompt_only_sequences=args.keep_prompt_only_sequences,
        shuffle=args.shuffle if pipeline else "False",
        seed=args.seed if pipeline else 0,
        shuffle_ram_mb=args.shuffle_ram_mb if pipeline else 2048.0,
        splits=SplitOptions(
            args.dev_ratio,
            args.test_ratio,
            args.num_training_splits,
            args.num_dev_splits,
            args.num_test_splits,
        )
        if pipeline
        else SplitOptions(),
        num_workers=args.num_workers,
        overwrite_output_path=args.overwrite_output_path,
        ignore_input_format_error=args.ignore_input_format_error,
        compression=args.compression,
        allow_long_sequences=args.allow_long_sequences,
        max_line_bytes=args.max_line_bytes,
        progress=args.progress,
    )


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    try:
        if args.command == "verify":
            from modelzoo.data_prep.verify import verify_dataset

            report = verify_dataset(args.dataset_path, checksums=not args.skip_checksums)
            print(report.text())
            return 0 if report.ok else 1
        from modelzoo.data_prep.pipeline import run_data_prep, run_pipeline

        opts = options_from_args(args)
        result = run_pipeline(opts) if args.command == "pipeline" else run_data_prep(opts)
        print(result.table())
        return 0
    except DataPrepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: --output-path was left as it was", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()

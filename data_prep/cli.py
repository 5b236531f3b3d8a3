"""``modelzoo-data-prep {pipeline,data_prep,verify}``: parse flags, run, print the metrics table, exit code.

Flag names follow SambaNova's generative_data_prep. Exit status: 0 done, 1 a problem with the
input, flags or output path (one ``error:`` line says what and how to fix it), 2 bad command line,
130 interrupted. Nothing is left at ``--output_path`` unless the run completed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from modelzoo.data_prep.errors import DataPrepError
from modelzoo.data_prep.input_files import MAX_LINE_BYTES
from modelzoo.data_prep.options import (
    BOUNDARIES,
    SHUFFLE_MODES,
    PackingConfig,
    PrepOptions,
    SplitOptions,
    packing_choices,
)
from modelzoo.data_prep.tokenizer_io import MAX_SEQ_LENGTH_CAP

_EPILOG = (
    'Input lines: {"prompt": ..., "completion": ...}, a list of such objects (a multi-turn article), '
    'or {"text": ...}; .txt files hold one document per line (all completion). '
    "Output: the HDF5 dataset contract of ARCHITECTURE.md (generative_data_prep layout)."
)


def _packing(text: str) -> PackingConfig:
    try:
        return PackingConfig.parse(text)
    except DataPrepError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_tokenize_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input_path",
        required=True,
        help="A .jsonl or .txt file, or a directory of them (top level, sorted by name).",
    )
    p.add_argument(
        "--pretrained_tokenizer",
        required=True,
        help="A local HF tokenizer directory (save_pretrained output) or a sentencepiece .model file. "
        "Must define an EOS token. Nothing is downloaded.",
    )
    p.add_argument(
        "--max_seq_length",
        type=int,
        default=2048,
        help="Tokens per packed sequence (default: %(default)s). Must not exceed the tokenizer's "
        "model_max_length, nor the max_position_embeddings of a config.json beside it; with neither "
        f"known, at most {MAX_SEQ_LENGTH_CAP:,}.",
    )
    p.add_argument(
        "--allow_long_sequences",
        action="store_true",
        help="Accept a --max_seq_length above those limits (rows the model was not built for).",
    )
    p.add_argument(
        "--max_line_bytes",
        type=int,
        default=MAX_LINE_BYTES,
        help="Longest input line, in bytes (default %(default)s = 16 MiB): a longer line is an input "
        "format error (skipped with --ignore_input_format_error) and is never read whole, as tokenizing "
        "a line takes 100-200x its size in memory.",
    )
    p.add_argument(
        "--input_packing_config",
        type=_packing,
        default=PackingConfig("full"),
        metavar="{" + ",".join(packing_choices()) + "}",
        help="full: concatenate everything and cut every max_seq_length tokens; greedy: next-fit, an "
        "article that does not fit starts a new sequence; single: one article per sequence. Articles "
        "longer than a sequence are dropped, or keep their last (truncate_left) or first "
        "(truncate_right) max_seq_length tokens. Default: full.",
    )
    p.add_argument(
        "--packing_boundary",
        choices=BOUNDARIES,
        default="jsonl",
        help="The unit greedy/single packing keeps whole: a jsonl line (article) or each prompt/completion pair.",
    )
    p.add_argument(
        "--attention_boundary",
        choices=BOUNDARIES,
        default="jsonl",
        help="Which EOS tokens become separators (token type 3, where article attention restarts): the "
        "last EOS of each line, or the EOS closing every pair.",
    )
    p.add_argument(
        "--prompt_keyword", default="prompt", help="The jsonl key of the prompt (default: %(default)s)."
    )
    p.add_argument(
        "--completion_keyword",
        default="completion",
        help="The jsonl key of the completion (default: %(default)s).",
    )
    p.add_argument("--prompt_prefix", default=None, help="Text put before every non-empty prompt.")
    p.add_argument("--prompt_postfix", default=None, help="Text put after every non-empty prompt.")
    p.add_argument(
        "--disable_space_separator",
        action="store_true",
        help="Do not right-strip prompts and give completions one leading space.",
    )
    p.add_argument(
        "--apply_chat_template",
        action="store_true",
        help="Render each prompt as the user turn of the tokenizer's chat template, with its generation prompt.",
    )
    p.add_argument(
        "--keep_prompt_only_sequences",
        action="store_true",
        help="Keep pairs with an empty completion and sequences with no completion token (dropped by default).",
    )
    p.add_argument(
        "--num_workers",
        type=int,
        default=os.cpu_count() or 1,
        help="Tokenizer worker processes (default: the CPU count, %(default)s); 0 works in this process.",
    )
    p.add_argument(
        "--overwrite_output_path",
        action="store_true",
        help="Replace an existing --output_path once the new output is complete: only an empty directory, "
        "a dataset whose sha256/files_metadata.json lists exactly the files present, or (data_prep) an "
        "HDF5 file. Nothing else is deleted.",
    )
    p.add_argument(
        "--ignore_input_format_error",
        action="store_true",
        help="Skip malformed lines (bad JSON, missing keys, non-UTF-8, over --max_line_bytes) and list "
        "them in json_load_failed_lines.log instead of stopping at the first.",
    )
    p.add_argument(
        "--compression",
        choices=("gzip", "lzf", "none"),
        default="gzip",
        help="HDF5 compression (default gzip: level 1 with byte shuffle; readable by any HDF5 reader).",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelzoo-data-prep",
        description="Tokenize, pack, split and balance jsonl/txt into HDF5 for training.",
        epilog=_EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    pipe = sub.add_parser(
        "pipeline",
        help="input file/dir -> dataset dir (train/dev/test splits, metadata, manifest)",
        description="Input file/dir -> dataset directory: train_{i}_of_{N}.hdf5, dev_{i}_of_{M}.hdf5, "
        "test_files/, tokenizer/, metadata.yaml, sha256/files_metadata.json.",
        epilog=_EPILOG,
    )
    pipe.add_argument("--output_path", required=True, help="The dataset directory to create.")
    _add_tokenize_flags(pipe)
    pipe.add_argument(
        "--shuffle",
        choices=SHUFFLE_MODES,
        default="False",
        help="Shuffle lines before splitting: False (keep order), on_RAM (in memory), large_file (external "
        "shuffle through bucket files, RAM bounded by --shuffle_ram_mb). Default: False.",
    )
    pipe.add_argument(
        "--seed", type=int, default=42, help="Seed of the shuffle: the same seed gives byte-identical HDF5."
    )
    pipe.add_argument(
        "--shuffle_ram_mb",
        type=float,
        default=2048.0,
        help="RAM budget of --shuffle large_file, in MB (default: %(default)s).",
    )
    pipe.add_argument(
        "--num_training_splits",
        type=int,
        default=None,
        help="Training files. Default: a power of two, 32 (128 from 10 GiB of input, 256 from 100 GiB), "
        "halved while a file would hold fewer than 32 sequences.",
    )
    pipe.add_argument(
        "--dev_ratio", type=float, default=None, help="Share of lines for the dev split (default 0)."
    )
    pipe.add_argument(
        "--test_ratio",
        type=float,
        default=None,
        help="Share of lines for the test split, kept as raw text (default 0).",
    )
    pipe.add_argument(
        "--num_dev_splits",
        type=int,
        default=None,
        help="Dev files; with --num_training_splits and --num_test_splits, lines are dealt to files by count.",
    )
    pipe.add_argument(
        "--num_test_splits",
        type=int,
        default=None,
        help="Test files; with --num_training_splits and --num_dev_splits (instead of the ratios).",
    )

    one = sub.add_parser(
        "data_prep",
        help="one input file -> one .hdf5 file (no splitting or shuffling)",
        description="One input file -> one .hdf5 file with input_ids and token_type_ids.",
        epilog=_EPILOG,
    )
    one.add_argument("--output_path", required=True, help="The .hdf5 file to create.")
    _add_tokenize_flags(one)

    ver = sub.add_parser(
        "verify",
        help="re-check a dataset dir: manifest, shapes, dtypes, token types, metadata counts",
        description="Re-check a dataset directory; exit 1 and list the problems if any.",
    )
    ver.add_argument("dataset_path", help="The dataset directory.")
    ver.add_argument(
        "--skip_checksums", action="store_true", help="Check manifest sizes but not sha256 (faster)."
    )
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
        print("interrupted: --output_path was left as it was", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()

"""The two jobs: ``pipeline`` (input -> dataset dir with splits) and ``data_prep`` (one file -> one .hdf5).

Flow (one pass over the input, memory bounded by chunk sizes, not by input size):
read/shuffle lines -> assign train/dev/test -> test lines to ``test_files/`` raw -> train/dev lines in
chunks to worker processes (tokenize) -> results in order -> pack -> row files -> balanced HDF5
files (written by the workers) -> tokenizer/, metadata.yaml, sha256 manifest -> rename into place
(``output_dir``: scratch beside the target, replaced only when proven ours).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from modelzoo.checkpoint.hf_files import make_tokenizer_portable
from modelzoo.data.dataset_layout import (
    METADATA_FILE,
    TEST_DIR,
    TOKENIZER_DIR,
    split_file_name,
    write_manifest,
)
from modelzoo.data_prep.errors import DataPrepError
from modelzoo.data_prep.hdf5_writer import FileJob, write_hdf5_file
from modelzoo.data_prep.input_files import resolve_inputs
from modelzoo.data_prep.metrics import SplitMetrics, metrics_table
from modelzoo.data_prep.options import PrepOptions
from modelzoo.data_prep.output_dir import Output, atomic_output
from modelzoo.data_prep.shuffle import ExternalShuffle, shuffled_lines
from modelzoo.data_prep.splits import (
    DEV,
    SPLIT_NAMES,
    TRAIN,
    SplitAssigner,
    balanced_ranges,
    choose_num_files,
    default_file_cap,
)
from modelzoo.data_prep.tokenize_pack import BAD_LINES_LOG, TokenizePack
from modelzoo.data_prep.tokenizer_io import (
    check_max_seq_length,
    load_tokenizer,
    model_type_string,
    tokenizer_spec,
)
from modelzoo.data_prep.workers import TokenizerPool


@dataclass
class RunResult:
    output_path: Path
    metrics: dict[str, SplitMetrics]
    metadata: dict | None
    elapsed_s: float
    bad_lines: int = 0
    test_lines: int = 0
    shuffle_buckets: int | None = None
    max_bucket_bytes: int | None = None
    files: list[str] = field(default_factory=list)

    def table(self) -> str:
        tokens = sum(m.input_tokens for m in self.metrics.values())
        footer = [
            ("Bad lines skipped", f"{self.bad_lines:,}"),
            ("Test lines (raw)", f"{self.test_lines:,}"),
            ("Wall time", f"{self.elapsed_s:.2f} s"),
            ("Throughput", f"{tokens / max(self.elapsed_s, 1e-9):,.0f} tokens/s"),
            ("Output", str(self.output_path)),
        ]
        return metrics_table(self.metrics, footer)


# -- the two jobs ------------------------------------------------------------------------------
def _open_tokenizer(opts: PrepOptions):
    """The tokenizer and its spec; ``--max-seq-length`` is checked against it here, before any work."""
    tok = load_tokenizer(opts.pretrained_tokenizer)
    if not opts.allow_long_sequences:
        check_max_seq_length(tok, opts.pretrained_tokenizer, opts.max_seq_length)
    return tok, tokenizer_spec(tok, opts.apply_chat_template)


def _output(opts: PrepOptions, is_dir: bool):
    """The job's atomic output (never the input or the tokenizer)."""
    inputs = [Path(opts.input_path), Path(opts.pretrained_tokenizer)]
    return atomic_output(opts.output_path, opts.overwrite_output_path, is_dir=is_dir, inputs=inputs)


def run_pipeline(opts: PrepOptions) -> RunResult:
    """Input file/dir -> dataset dir (train/dev HDF5, test jsonl, tokenizer, metadata, manifest)."""
    start = time.perf_counter()
    opts.validate()
    files = resolve_inputs(opts.input_path)
    tok, spec = _open_tokenizer(opts)
    with _output(opts, is_dir=True) as out:
        return _build_dataset(opts, files, tok, spec, out, start)


def run_data_prep(opts: PrepOptions) -> RunResult:
    """One input file -> one .hdf5 file at ``--output-path`` (no shuffling, splitting or metadata)."""
    start = time.perf_counter()
    opts.validate()
    files = resolve_inputs(opts.input_path)
    if len(files) != 1 or Path(opts.input_path).is_dir():
        raise DataPrepError(
            f"data_prep takes one input file, got the directory {opts.input_path}; use pipeline"
        )
    _, spec = _open_tokenizer(opts)
    bad_log = Path(f"{opts.output_path}.{BAD_LINES_LOG}")  # beside the file: data_prep has no dir
    with _output(opts, is_dir=False) as out:
        run = TokenizePack(opts, files, spec, out.work_dir, bad_log_dir=out.work_dir)
        lines = shuffled_lines(files, "False", opts.seed, 0, out.work_dir, run.line_limit())
        with TokenizerPool(run.settings, opts.num_workers, out.work_dir) as pool:
            run.tokenize_and_pack(pool, lines, None)
            train = run.sinks[TRAIN]
            if train.rows == 0:
                raise DataPrepError(run.why_empty(TRAIN))
            job = FileJob(
                str(train.ids_path),
                str(train.types_path),
                opts.max_seq_length,
                0,
                train.rows,
                str(out.tmp),
                opts.compression,
            )
            pool.map(write_hdf5_file, [job])
        run.report_drops(str(bad_log))
        if run.bad_lines:
            os.replace(run.bad_log_path, bad_log)
    metrics = {"train": run.metrics[TRAIN]}
    return RunResult(
        Path(opts.output_path),
        metrics,
        None,
        time.perf_counter() - start,
        run.bad_lines,
        files=[str(opts.output_path)],
    )


def _build_dataset(opts: PrepOptions, files, tok, spec, out: Output, start: float) -> RunResult:
    run = TokenizePack(opts, files, spec, out.work_dir, bad_log_dir=out.tmp)
    assigner = SplitAssigner(opts.splits)
    test_out = _open_test_files(out.tmp, assigner.num_test_files, files)
    budget = int(opts.shuffle_ram_mb * (1 << 20))
    source = shuffled_lines(files, opts.shuffle, opts.seed, budget, out.work_dir, run.line_limit())
    try:
        with TokenizerPool(run.settings, opts.num_workers, out.work_dir) as pool:
            run.tokenize_and_pack(pool, source, test_out, assigner)
            _check_not_empty(run, opts, assigner)
            counts = _file_counts(run, opts, assigner, sum(f.size for f in files))
            jobs = _file_jobs(run, counts, out.tmp, opts)
            pool.map(write_hdf5_file, jobs)
    finally:
        for f in test_out:
            f.close()
    for sink in run.sinks.values():
        sink.remove()
    run.report_drops(str(Path(opts.output_path) / BAD_LINES_LOG))
    tok.save_pretrained(str(out.tmp / TOKENIZER_DIR))
    make_tokenizer_portable(out.tmp / TOKENIZER_DIR)  # a class name transformers 4.x knows too
    metrics = {"train": run.metrics[TRAIN]}
    if counts[DEV]:
        metrics["dev"] = run.metrics[DEV]
    metadata = _metadata(opts, spec, run, counts, assigner.num_test_files, metrics)
    with open(out.tmp / METADATA_FILE, "w", encoding="utf-8") as f:
        yaml.safe_dump(metadata, f, sort_keys=False)
    write_manifest(out.tmp)
    elapsed = time.perf_counter() - start
    result = RunResult(Path(opts.output_path), metrics, metadata, elapsed, run.bad_lines, run.test_lines)
    result.files = [Path(j.out_path).name for j in jobs]
    if isinstance(source, ExternalShuffle):
        result.shuffle_buckets, result.max_bucket_bytes = source.buckets, source.max_bucket_bytes
    return result


def _open_test_files(root: Path, n: int, files) -> list:
    """``test_files/test_{i}_of_{n}.jsonl`` (``.txt`` when every input is .txt), open for raw lines."""
    if not n:
        return []
    ext = ".txt" if all(not f.is_jsonl for f in files) else ".jsonl"
    (root / TEST_DIR).mkdir()
    return [open(root / TEST_DIR / f"test_{i + 1}_of_{n}{ext}", "wb") for i in range(n)]


def _check_not_empty(run: TokenizePack, opts: PrepOptions, assigner: SplitAssigner) -> None:
    if run.metrics[TRAIN].articles + run.metrics[DEV].articles + run.test_lines == 0:
        detail = (
            f"{run.bad_lines} bad lines skipped, see the log"
            if run.bad_lines
            else "only blank lines or empty texts"
        )
        raise DataPrepError(f"--input-path {opts.input_path}: no usable lines ({detail})")
    for split in (TRAIN, DEV):
        if (split == TRAIN or assigner.wants_dev) and run.sinks[split].rows == 0:
            raise DataPrepError(run.why_empty(split))


def _file_counts(run: TokenizePack, opts: PrepOptions, assigner: SplitAssigner, input_bytes: int) -> dict:
    cap = default_file_cap(input_bytes)
    s = opts.splits
    counts = {
        TRAIN: choose_num_files(run.sinks[TRAIN].rows, s.num_training_splits, cap, "--num-training-splits")
    }
    counts[DEV] = (
        choose_num_files(run.sinks[DEV].rows, s.num_dev_splits, cap, "--num-dev-splits")
        if assigner.wants_dev
        else 0
    )
    return counts


def _file_jobs(run: TokenizePack, counts: dict, root: Path, opts: PrepOptions) -> list[FileJob]:
    """One job per HDF5 file: contiguous row ranges, sizes within one of each other."""
    jobs = []
    for split, n in counts.items():
        sink = run.sinks[split]
        for i, (a, b) in enumerate(balanced_ranges(sink.rows, n) if n else []):
            out_path = root / split_file_name(SPLIT_NAMES[split], i + 1, n)
            jobs.append(
                FileJob(
                    str(sink.ids_path),
                    str(sink.types_path),
                    opts.max_seq_length,
                    a,
                    b,
                    str(out_path),
                    opts.compression,
                )
            )
    return jobs


def _metadata(opts: PrepOptions, spec, run: TokenizePack, counts: dict, n_test: int, metrics: dict) -> dict:
    """metadata.yaml: generative_data_prep's keys first, then per-split counts and how it was made."""
    metadata = {
        "max_seq_length": opts.max_seq_length,
        "token_type_ids": True,
        "vocab_size": spec.vocab_size,
        "tokenizer_model_type": model_type_string(opts.pretrained_tokenizer),
        "number_of_training_files": counts[TRAIN],
        "number_of_dev_files": counts[DEV],
        "number_of_test_files": n_test,
        "max_batch_size_train": run.sinks[TRAIN].rows // counts[TRAIN],
        "max_batch_size_dev": run.sinks[DEV].rows // counts[DEV] if counts[DEV] else None,
    }
    for name, m in metrics.items():
        metadata.update(m.as_metadata(name))
    metadata.update(
        {
            "test_lines": run.test_lines,
            "eos_token_id": spec.eos_id,
            "pad_token_id": spec.pad_id,
            "input_packing_config": str(opts.packing),
            "packing_boundary": opts.packing_boundary,
            "attention_boundary": opts.attention_boundary,
            "shuffle": opts.shuffle,
            "seed": opts.seed,
            "made_by": "modelzoo-data-prep",
        }
    )
    return metadata

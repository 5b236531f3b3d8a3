"""``modelzoo-eval``: evaluate a checkpoint: dataset loss/perplexity, WikiText-style perplexity,
LAMBADA-style cloze accuracy, or lm-evaluation-harness tasks.

examples:
  modelzoo-eval ppl --checkpoint runs/llama_tiny --dataset-dir data/tiny_hdf5        # the dev split
  modelzoo-eval wikitext --checkpoint DIR --input wiki.test.raw --seq-length 1024 --stride 512
  modelzoo-eval lambada --checkpoint DIR --input lambada_test.jsonl --strict
  modelzoo-eval lm-eval --checkpoint DIR --tasks my_task --include-path tasks/ --num-fewshot 0
  modelzoo-eval wikitext --checkpoint DIR --input wiki.txt --quantize int8             # int8 weights
  modelzoo-eval lambada --checkpoint DIR --input l.jsonl --n-chips 2                   # tensor parallel
  modelzoo-eval wikitext --checkpoint BASE --adapter ADAPTER --input wiki.txt          # LoRA/DoRA adapter

What each number means:
  ppl       loss = sum(w * ce) / sum(w) over every target of the split, w the token-type weights of
            the training contract (completion 1, prompt --prompt-loss-weight, padding 0): the
            trainer's dev loss; perplexity = exp(loss).
  wikitext  the file as one token stream, windows of --seq-length inputs every --stride tokens, each
            token scored once (after the first window with >= seq-length - stride tokens of
            context). token ppl = exp(L / (N - 1)) for the summed loss L over the N - 1 predicted
            tokens; word ppl = exp(L / (W - 1)) for the W whitespace-separated words of the file
            (the tokenizer-adjusted perplexity of Megatron-LM's WikiText evaluation).
  lambada   accuracy of predicting the last word of each {"text": ...} line greedily: non-strict,
            its last token; --strict, all its tokens.
  lm-eval   the harness's own metrics for each task (accuracy, perplexity, exact match, ...), with
            modelzoo as the model backend ("modelzoo"; the same request semantics as --model hf).

Checkpoints: anything modelzoo-generate takes (an HF dir, float or int8; a training run's dir; a LoRA
run's, meaning its base + adapter; a preset name: random weights). --n-chips K runs K processes in
lockstep with the model split across them. The summary is one line on stdout; --output-json adds
the config, the checkpoint files' sha256, versions and timings.
Offline lm-eval tasks: point --include-path at a dir of task YAMLs whose dataset_path is a local
loader ("json", "csv", "text", "parquet") with dataset_kwargs: {data_files: {test: /path/file}}; a
stock task runs offline the same way from a copy of it with dataset_path/dataset_kwargs changed so.
Exit status: 0 done, 2 bad input (one 'error:' line says what and how to fix it), 1 a worker failed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelzoo.cli.errors import UsageError
from modelzoo.cli.model_options import add_model_options

if TYPE_CHECKING:  # torch comes with modelzoo.generation: imported after parsing
    from modelzoo.generation.source import ModelSource

SPLITS = ("dev", "train")
EXIT_OK = 0


def _common(p: argparse.ArgumentParser) -> None:
    add_model_options(p, backend_help="device: cpu or cuda; inductor also compiles the generation engine (lm-eval "
                      "generate_until); scoring forwards run eager",
                      n_chips_help="tensor-parallel degree: processes on this machine")
    p.add_argument("--batch-size", type=int, default=8, help="windows / requests per forward (default: %(default)s)")
    p.add_argument("--output-json", metavar="FILE", help="write metrics, config, checkpoint hashes, versions and "
                   "timings to FILE")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(prog="modelzoo-eval", description=doc[0], epilog=doc[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task", required=True, metavar="{ppl,wikitext,lambada,lm-eval}")
    from modelzoo.cli.help_format import DefaultsHelpFormatter as fmt

    ppl = sub.add_parser("ppl", help="loss and perplexity on a prepared HDF5 dataset (the trainer's dev loss)",
                         formatter_class=fmt)
    _common(ppl)
    ppl.add_argument("--dataset-dir", "--dataset_dir", dest="dataset_dir", required=True,
                     help="dataset dir made by modelzoo-data-prep")
    ppl.add_argument("--split", choices=SPLITS, default="dev", help="which split to score")
    ppl.add_argument("--prompt-loss-weight", type=float, default=None,
                     help="weight of prompt targets (default: the checkpoint's training.prompt_loss_weight, else 0)")

    wiki = sub.add_parser("wikitext", help="WikiText-style token- and word-level perplexity of a text file",
                          formatter_class=fmt)
    _common(wiki)
    wiki.add_argument("--input", required=True, metavar="FILE.txt", help="UTF-8 text, scored as one stream")
    wiki.add_argument("--seq-length", type=int, default=None, help="window length (default: min(1024, the "
                      "model's context))")
    wiki.add_argument("--stride", type=int, default=None, help="tokens between window starts; each window scores "
                      "its last `stride` tokens (default: --seq-length, disjoint windows)")

    lam = sub.add_parser("lambada", help="LAMBADA-style last-word cloze accuracy", formatter_class=fmt)
    _common(lam)
    lam.add_argument("--input", required=True, metavar="FILE.jsonl", help='one {"text": "..."} per line')
    lam.add_argument("--strict", action="store_true", help="the whole last word (all its tokens) must be predicted")

    lm = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks with modelzoo as the model backend",
                        formatter_class=fmt)
    _common(lm)
    lm.add_argument("--tasks", required=True, help="task names, comma-separated (the harness's names, or those "
                    "of --include-path)")
    lm.add_argument("--include-path", "--include_path", dest="include_path", metavar="DIR",
                    help="extra task YAMLs (local datasets; see the epilog)")
    lm.add_argument("--num-fewshot", "--num_fewshot", dest="num_fewshot", type=int, default=None,
                    help="few-shot examples per prompt (default: each task's own)")
    lm.add_argument("--limit", type=float, default=None, help="first N examples per task (< 1: that fraction)")
    lm.add_argument("--max-length", type=int, default=None, help="context the harness may use (default: the "
                    "model's)")
    lm.add_argument("--max-gen-toks", type=int, default=256, help="new tokens per generate_until request unless "
                    "the task says")
    lm.add_argument("--gen-kwargs", "--gen_kwargs", dest="gen_kwargs", default=None,
                    help="generation arguments for generate_until tasks, e.g. temperature=0,max_gen_toks=32")
    lm.add_argument("--apply-chat-template", "--apply_chat_template", dest="apply_chat_template",
                    action="store_true", help="wrap prompts in the tokenizer's chat template")
    lm.add_argument("--log-samples", "--log_samples", dest="log_samples", action="store_true",
                    help="keep every sample's inputs and outputs in --output-json")
    lm.add_argument("--seed", type=int, default=0, help="seed of few-shot sampling and of the harness's RNGs")
    return p


def _check_args(args: argparse.Namespace) -> None:
    for flag in ("batch_size", "n_chips"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.n_chips > 1 and args.backend != "cpu":
        raise UsageError(f"--n-chips {args.n_chips} runs on --backend cpu (gloo processes); got --backend {args.backend}")
    if args.output_json and not Path(args.output_json).resolve().parent.is_dir():
        raise UsageError(f"--output-json {args.output_json}: directory {Path(args.output_json).parent} does not exist")
    if args.task == "wikitext":
        for flag in ("seq_length", "stride"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.task in ("wikitext", "lambada") and not Path(args.input).is_file():
        raise UsageError(f"--input {args.input}: no such file")
    if args.task == "ppl" and args.prompt_loss_weight is not None and not 0 <= args.prompt_loss_weight <= 1:
        raise UsageError(f"--prompt-loss-weight must be in [0, 1], got {args.prompt_loss_weight}")
    if args.task == "lm-eval":
        if args.include_path and not Path(args.include_path).is_dir():
            raise UsageError(f"--include-path {args.include_path}: no such directory")
        if args.limit is not None and args.limit <= 0:
            raise UsageError(f"--limit must be > 0, got {args.limit}")
        if not task_names(args.tasks):
            raise UsageError("--tasks is empty; name at least one task")


# --------------------------------------------------------------------------------------- job


@dataclass
class EvalJob:
    """Everything a (tensor-parallel) worker needs; picklable."""

    args: argparse.Namespace
    model: ModelSource
    context: int
    patch_settings: dict[str, Any] = field(default_factory=dict)
    prompt_loss_weight: float = 0.0
    resolve_s: float = 0.0


def _training_settings(source: str) -> tuple[dict[str, Any], float | None]:
    """The model section and ``training.prompt_loss_weight`` of the run that wrote checkpoint
    ``source`` (its ``training_state/config.yaml``), or ``({}, None)``."""
    import yaml

    from modelzoo.checkpoint.manager import STATE_DIR

    path = Path(source) / STATE_DIR / "config.yaml"
    if not path.is_file():
        return {}, None
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"{path}: unreadable training config ({err}); pass --prompt-loss-weight and fix or "
                         "remove the file") from None
    weight = (data.get("training") or {}).get("prompt_loss_weight")
    return data.get("model") or {}, None if weight is None else float(weight)  # the model section: patch settings


def resolve_job(args: argparse.Namespace) -> EvalJob:
    """Every check that needs no weights: the checkpoint, adapter, tokenizer, TP split and the
    task's input, so bad input fails before weights load or processes start."""
    from modelzoo.generation.source import resolve_model_source

    begin = time.perf_counter()
    found, config = resolve_model_source(args.checkpoint, args.adapter, args.tokenizer, n_chips=args.n_chips,
                                         quantize=args.quantize, tokenizer=args.task != "ppl")
    job = EvalJob(argparse.Namespace(**vars(args)), found, int(config.max_position_embeddings))
    if args.task == "ppl":
        _check_dataset(args, config)
        job.patch_settings, weight = _training_settings(found.source)
        job.prompt_loss_weight = args.prompt_loss_weight if args.prompt_loss_weight is not None else (weight or 0.0)
    elif args.task == "wikitext":
        seq = args.seq_length or min(1024, job.context)
        if seq > job.context:
            raise UsageError(f"--seq-length {seq} exceeds the model's context ({job.context}, max_position_embeddings)")
        job.args.seq_length, job.args.stride = seq, args.stride or seq
        if job.args.stride > seq:
            raise UsageError(f"--stride {job.args.stride} exceeds --seq-length {seq}; windows would skip tokens "
                             "(use a stride <= seq-length)")
        from modelzoo.eval.tasks import read_text

        read_text(args.input)
    elif args.task == "lambada":
        from modelzoo.eval.tasks import read_lambada

        read_lambada(args.input)
    else:
        _check_tasks(args)
    job.resolve_s = time.perf_counter() - begin
    return job


def _check_dataset(args: argparse.Namespace, config) -> None:
    from modelzoo.data.hdf5_reader import DatasetError, HDF5DatasetDir

    root = Path(args.dataset_dir)
    if not root.is_dir():
        raise UsageError(f"--dataset-dir {root}: no such directory; build one with modelzoo-data-prep")
    dataset = HDF5DatasetDir(root)
    dataset.check_vocab(int(config.vocab_size))
    if not dataset.files(args.split):
        raise DatasetError(f"{root}: no {args.split} files; use --split "
                           f"{'train' if args.split == 'dev' else 'dev'} or re-run data prep with a {args.split} split")


def _check_tasks(args: argparse.Namespace) -> None:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError("modelzoo-eval lm-eval needs lm-evaluation-harness: pip install 'modelzoo[eval]'")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=args.include_path)
    names = task_names(args.tasks)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        import difflib

        hints = [f"'{t}' (did you mean {near[0]}?)" if (near := difflib.get_close_matches(t, manager.all_tasks, n=1))
                 else f"'{t}'" for t in unknown]
        where = f" or in --include-path {args.include_path}" if args.include_path else " (local tasks: --include-path DIR)"
        raise UsageError(f"unknown lm-eval task(s) {', '.join(hints)}: not a task of the harness{where}")


# ----------------------------------------------------------------------------------- running


def _load_model(job: EvalJob, world_size: int):
    from modelzoo.generation import load_for_generation

    a = job.args
    model = load_for_generation(job.model.source, dtype=a.dtype, quantize=a.quantize, adapter=job.model.adapter)
    if a.task == "ppl":
        from modelzoo.models.llama import patch_llama

        patch_llama(model, job.patch_settings or None, prompt_loss_weight=job.prompt_loss_weight)
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh

        from modelzoo.models.llama.parallelize import parallelize_llama

        parallelize_llama(model, init_device_mesh("cpu", (world_size,)))
    if a.backend == "cuda" or (a.backend == "inductor" and _cuda()):
        model.to("cuda")
    return model


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def task_names(tasks: str) -> list[str]:
    """The names of a comma-separated ``--tasks``."""
    return [t.strip() for t in tasks.split(",") if t.strip()]


def _builtin_task(a: argparse.Namespace, model, tokenizer, progress: bool):
    """``(result, tokens run)`` of ``ppl``, ``wikitext`` or ``lambada``, with a bar on stderr."""
    from tqdm import tqdm

    from modelzoo.eval import tasks
    from modelzoo.eval.scoring import Scorer

    scorer = Scorer(model, a.batch_size)

    def bar(total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="seq", disable=not progress, file=sys.stderr, dynamic_ncols=True)

    if a.task == "ppl":
        from modelzoo.data.hdf5_reader import HDF5DatasetDir

        reader = HDF5DatasetDir(Path(a.dataset_dir)).reader(a.split)
        with bar(len(reader), f"ppl {a.split}") as b:
            return tasks.dataset_loss(model, reader, a.batch_size, a.split, b.update), len(reader) * reader.seq_len
    if a.task == "wikitext":
        windows, words = tasks.wikitext_windows(tokenizer, tasks.read_text(a.input), a.seq_length, a.stride)
        with bar(len(windows), "wikitext windows") as b:
            result = tasks.wikitext(scorer, windows, words, a.seq_length, a.stride, b.update)
    else:
        texts = tasks.read_lambada(a.input)
        with bar(len(texts), "lambada") as b:
            result = tasks.lambada(scorer, tokenizer, texts, a.strict, b.update)[0]
    return result, scorer.tokens_run


def evaluate(job: EvalJob, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Load, evaluate, and (rank 0) print the summary and write the JSON; returns the report."""
    from modelzoo.generation.source import load_source_tokenizer

    a, main_rank = job.args, rank == 0
    progress = a.progress and main_rank
    begin = time.perf_counter()
    tokenizer = load_source_tokenizer(job.model)[0] if a.task != "ppl" else None  # ppl reads token ids
    model = _load_model(job, world_size)
    loaded = time.perf_counter()
    samples = None
    if a.task == "lm-eval":
        metrics, line, tokens, samples = _lm_eval(job, model, tokenizer, progress)
    else:
        result, tokens = _builtin_task(a, model, tokenizer, progress)
        metrics, line = asdict(result), result.line()
    done = time.perf_counter()
    int8 = _is_int8(job, model)
    if int8:
        line += " [int8 weights]"
    report = {
        "task": a.task, "metrics": metrics, "int8": int8,
        "config": {k: v for k, v in vars(a).items() if k != "progress"},
        "tensor_parallel": world_size, "prompt_loss_weight": job.prompt_loss_weight if a.task == "ppl" else None,
        "checkpoint": {"source": job.model.source, "adapter": job.model.adapter},
        "versions": _versions(),
        "timings": {"resolve_s": round(job.resolve_s, 3), "load_s": round(loaded - begin, 3),
                    "eval_s": round(done - loaded, 3),
                    "tokens_per_s": round(tokens / (done - loaded), 1) if done > loaded else None},
    }
    if main_rank:
        print(line, flush=True)
        if a.output_json:
            report["checkpoint"]["files"] = checkpoint_hashes(job.model)
            if a.task == "lm-eval" and a.log_samples:
                report["samples"] = samples
            Path(a.output_json).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
            print(f"wrote {Path(a.output_json).resolve()}", file=sys.stderr)
    return report


def _lm_eval(job: EvalJob, model, tokenizer, progress: bool):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from modelzoo.eval.harness import ModelzooLM

    a = job.args
    lm = ModelzooLM(model=model, tokenizer=tokenizer, backend=a.backend, batch_size=a.batch_size,
                    max_length=a.max_length, max_gen_toks=a.max_gen_toks, progress=progress)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=task_names(a.tasks), num_fewshot=a.num_fewshot,
        limit=a.limit, task_manager=TaskManager(include_path=a.include_path), gen_kwargs=a.gen_kwargs,
        apply_chat_template=a.apply_chat_template, log_samples=a.log_samples, random_seed=a.seed,
        numpy_random_seed=a.seed, torch_random_seed=a.seed, fewshot_random_seed=a.seed)
    metrics = {task: {k: v for k, v in values.items() if k != "alias"} for task, values in results["results"].items()}
    parts = []
    for task, values in metrics.items():
        shown = [f"{k.split(',')[0]} {v:.4f}" for k, v in values.items()
                 if isinstance(v, float) and "stderr" not in k and k != "sample_len"]
        parts.append(f"{task} ({values.get('sample_len', '?')} docs): {', '.join(shown)}")
    tokens = lm.scorer.tokens_run + lm.generated_tokens
    return metrics, "lm-eval " + "; ".join(parts), tokens, results.get("samples")


def _is_int8(job: EvalJob, model) -> bool:
    from modelzoo.checkpoint.int8 import QUANT_KEY

    return job.args.quantize == "int8" or getattr(model.config, QUANT_KEY, None) is not None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for package in ("modelzoo", "torch", "transformers", "peft", "lm_eval"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


def checkpoint_hashes(model: ModelSource) -> dict[str, dict[str, Any]]:
    """sha256 and size of the checkpoint's (and adapter's) config, weights and tokenizer files."""
    from modelzoo.data.dataset_layout import sha256_of

    out = {}
    for root in (model.source, model.adapter):
        if root is None or not Path(root).is_dir():
            continue
        for path in sorted(Path(root).iterdir()):
            if path.is_file() and path.suffix in (".json", ".safetensors", ".model", ".bin"):
                out[str(path)] = {"sha256": sha256_of(path), "size": path.stat().st_size}
    return out


def _tp_worker(rank: int, world_size: int, job: EvalJob) -> None:
    evaluate(job, rank, world_size)


def _run(args: argparse.Namespace) -> int:
    _check_args(args)
    job = resolve_job(args)
    if args.n_chips == 1:
        evaluate(job)
        return EXIT_OK
    from modelzoo.cli.errors import spawn_reporting_errors

    return spawn_reporting_errors(_tp_worker, args.n_chips, job)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; a user error prints one ``error:`` line and returns 2. ``--help`` and flag
    errors answer before torch is imported."""
    from modelzoo.cli.errors import run_reporting_errors  # light: no torch

    return run_reporting_errors(_run, _parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

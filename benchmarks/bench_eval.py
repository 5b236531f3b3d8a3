"""Evaluation throughput: modelzoo's scoring vs lm-evaluation-harness's own ``hf`` backend, one run.

Same model (``llama_60m``, random weights, fp32, saved as an HF dir with a word-level tokenizer),
same local tasks, same batch size, one process, CPU. Rows (tokens/s = tokens run through the model
/ wall time of the evaluation, model loading excluded; both backends run the same windows):

- ``lm-eval loglikelihood``: a multiple-choice task (4 choices per document) through
  ``lm_eval.simple_evaluate``, ``--model hf`` vs ``--model modelzoo``;
- ``lm-eval loglikelihood_rolling``: a perplexity task over long documents (``max_length`` windows);
- ``ppl``: ``modelzoo-eval ppl``'s loss over an HDF5 split (the weighted-loss forward, LM head only
  at scored targets) vs stock ``transformers`` ``model(input_ids, labels=...)`` on the same rows.

Each configuration runs ``--rounds`` times, alternating which backend goes first; the best time is
kept (other processes on a shared machine only ever slow a run down). The metrics of the two
backends are printed side by side: they must agree (1e-4).

    python benchmarks/bench_eval.py [--batch-size 8] [--rounds 2] [--docs 40]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _words(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(f"t{rng.randrange(3, vocab)}" for _ in range(n))


def write_tasks(root: Path, vocab: int, docs: int, context: int, doc_tokens: int) -> None:
    import yaml

    rng = random.Random(0)
    mc = [{"question": _words(rng, context, vocab), "choices": [" " + _words(rng, 4, vocab) for _ in range(4)],
           "label": i % 4} for i in range(docs)]
    rolling = [{"text": _words(rng, doc_tokens, vocab)} for _ in range(max(docs // 5, 2))]
    specs = {
        "bench_mc": (mc, {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "choices",
                          "doc_to_target": "label", "metric_list": [{"metric": "acc"}]}),
        "bench_rolling": (rolling, {"output_type": "loglikelihood_rolling", "doc_to_text": "",
                                    "doc_to_target": "{{text}}", "metric_list": [{"metric": "word_perplexity"}]}),
    }
    for name, (rows, spec) in specs.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", **spec}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))


def write_split(root: Path, rows: int, seq: int, vocab: int) -> Path:
    import h5py
    import numpy as np
    import yaml

    from modelzoo.data.dataset_layout import write_manifest

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    ids = rng.integers(3, vocab, size=(rows, seq), dtype=np.int64)
    types = np.ones_like(ids)
    for name in ("train_1_of_1.hdf5", "dev_1_of_1.hdf5"):
        with h5py.File(root / name, "w") as f:
            f.create_dataset("input_ids", data=ids)
            f.create_dataset("token_type_ids", data=types)
    meta = {"max_seq_length": seq, "token_type_ids": True, "vocab_size": vocab, "tokenizer_model_type": "synthetic",
            "number_of_training_files": 1, "number_of_dev_files": 1, "number_of_test_files": 0,
            "max_batch_size_train": rows, "max_batch_size_dev": rows}
    (root / "metadata.yaml").write_text(yaml.safe_dump(meta))
    write_manifest(root)
    return root


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="llama_60m", help="preset (random weights, seed 0)")
    p.add_argument("--batch-size", type=int, default=8, help="the same for both backends")
    p.add_argument("--rounds", type=int, default=2, help="runs per configuration (best kept)")
    p.add_argument("--docs", type=int, default=40, help="multiple-choice documents (rolling: docs / 5)")
    p.add_argument("--context", type=int, default=96, help="multiple-choice context words (= tokens)")
    p.add_argument("--doc-tokens", type=int, default=1800, help="tokens per rolling document")
    p.add_argument("--max-length", type=int, default=512, help="the harness's max_length (rolling windows)")
    p.add_argument("--ppl-rows", type=int, default=32, help="HDF5 rows of --max-length tokens for ppl")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    args = p.parse_args()

    import lm_eval
    import numpy as np
    import torch
    from bench_serving import machine_line, save_id_tokenizer
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from modelzoo.data.hdf5_reader import HDF5DatasetDir
    from modelzoo.eval.harness import ModelzooLM
    from modelzoo.eval.tasks import dataset_loss
    from modelzoo.generation import load_for_generation
    from modelzoo.models.llama import from_pretrained, patch_llama

    torch.set_num_threads(args.threads)
    print(machine_line(args.threads))
    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    checkpoint = tmp / args.model
    model = from_pretrained(args.model, seed=0, patch=False)
    model.save_pretrained(str(checkpoint))
    vocab = int(model.config.vocab_size)
    save_id_tokenizer(checkpoint, vocab)
    del model
    (tmp / "tasks").mkdir()
    write_tasks(tmp / "tasks", vocab, args.docs, args.context, args.doc_tokens)
    manager = TaskManager(include_path=str(tmp / "tasks"))
    common = {"batch_size": args.batch_size, "max_length": args.max_length}
    hf = HFLM(pretrained=str(checkpoint), dtype="float32", device="cpu", **common)
    ours = ModelzooLM(checkpoint=str(checkpoint), progress=False, **common)
    print(f"bench_eval: {args.model} ({sum(t.numel() for t in ours.model.parameters()) / 1e6:.1f}M params, random "
          f"weights), fp32, batch {args.batch_size}, max_length {args.max_length}, {args.threads} threads, "
          f"best of {args.rounds}")

    rows = []
    for task in ("bench_mc", "bench_rolling"):
        best, metrics, tokens = {}, {}, 0
        for round_ in range(args.rounds):
            order = [("hf", hf), ("modelzoo", ours)]
            for name, lm in (order if round_ % 2 == 0 else order[::-1]):
                before = ours.scorer.tokens_run
                results, seconds = timed(lambda lm=lm, task=task: lm_eval.simple_evaluate(
                    model=lm, tasks=[task], task_manager=manager, verbosity="ERROR"))
                if name == "modelzoo":
                    tokens = ours.scorer.tokens_run - before
                best[name] = min(best.get(name, seconds), seconds)
                metrics[name] = {k: v for k, v in results["results"][task].items()
                                 if isinstance(v, float) and "stderr" not in k}
        kind = "loglikelihood" if task == "bench_mc" else "loglikelihood_rolling"
        rows.append((f"lm-eval {kind}", tokens, best["hf"], best["modelzoo"], "hf backend", metrics))

    reader = HDF5DatasetDir(write_split(tmp / "data", args.ppl_rows, args.max_length, vocab)).reader("dev")
    patched = patch_llama(load_for_generation(str(checkpoint)), None)
    stock = load_for_generation(str(checkpoint))
    best, metrics = {}, {}

    def hf_loss() -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(reader), args.batch_size):
                ids = reader.rows(np.arange(start, min(start + args.batch_size, len(reader))))["input_ids"]
                out = stock(input_ids=ids, labels=ids)
                n = ids[:, 1:].numel()
                total, count = total + float(out.loss) * n, count + n
        return total / count

    for round_ in range(args.rounds):
        runs = [("hf", hf_loss), ("modelzoo", lambda: dataset_loss(patched, reader, args.batch_size, "dev").loss)]
        for name, fn in (runs if round_ % 2 == 0 else runs[::-1]):
            loss, seconds = timed(fn)
            best[name] = min(best.get(name, seconds), seconds)
            metrics[name] = {"loss": loss}
    rows.append(("ppl (HDF5 split)", len(reader) * reader.seq_len, best["hf"], best["modelzoo"],
                 "transformers forward+labels", metrics))

    print("results (tokens/s: tokens through the model / wall time, best run):")
    for label, tokens, hf_s, ours_s, baseline, metrics in rows:
        agree = all(abs(metrics["hf"][k] - metrics["modelzoo"][k]) <= 1e-4 * max(1.0, abs(metrics["hf"][k]))
                    for k in metrics["hf"])
        shown = ", ".join(f"{k.split(',')[0]} {metrics['modelzoo'][k]:.6g} vs {metrics['hf'][k]:.6g}"
                          for k in metrics["hf"])
        print(f"  {label:<32} {tokens:>7} tokens  {baseline}: {tokens / hf_s:8.0f} tok/s ({hf_s:6.2f} s)  "
              f"modelzoo: {tokens / ours_s:8.0f} tok/s ({ours_s:6.2f} s)  x{hf_s / ours_s:.2f}  "
              f"[{shown}; {'agree' if agree else 'DIFFER'}]")


if __name__ == "__main__":
    main()

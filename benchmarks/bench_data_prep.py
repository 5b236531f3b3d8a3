"""Data-prep throughput: our pipeline vs a generative_data_prep-style baseline vs the tokenizer ceiling.

    python benchmarks/bench_data_prep.py               # 60 MB corpus, 2 workers (about 3 minutes)
    python benchmarks/bench_data_prep.py --mb 50 --workers 2 --workdir /tmp/bench

One run, same machine, same tokenizer (a byte-level BPE with 8k ids trained here on the corpus),
same generated jsonl corpus of prompt/completion pairs (10% multi-turn lists):

- ceiling:  bare ``tokenizer(batch)`` (HF fast tokenizer, batches of 1000, its own threads) over the
            prompt/completion texts, already in memory -- tokenizing alone, the physical limit;
- baseline: the way generative_data_prep works -- ``--workers`` processes, each reads its share of
            lines, ``json.loads`` + ``tokenizer.encode`` per text, a Python object per token,
            greedy packing in Python lists, gzip HDF5 writes;
- ours:     ``modelzoo-data-prep pipeline`` end to end (read, tokenize in ``--workers`` processes,
            pack, write, balance, metadata, manifest), greedy::drop at 2048.

Each runs in its own fresh process, timed from "tokenizer loaded" to "output written"; ceiling and
ours run ``--repeat`` times, interleaved, and the best run of each counts (the baseline, several
times slower, runs once). Tokens/s
count the tokens each one tokenized. Peak RSS (the process and its children, sampled every 20 ms)
of ours is shown at two input sizes (1x and 2x) to show it does not grow with the input. The
machine may be shared: compare the ratios, which come from one run, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

L = 2048


# -- corpus and tokenizer ------------------------------------------------------------------------
def make_corpus(path: Path, megabytes: float, seed: int = 0) -> None:
    """Jsonl of prompt/completion pairs of Zipf-distributed pseudo-words, 10% multi-turn lists."""
    vocab_rng, rng = np.random.default_rng(0), np.random.default_rng(seed)  # same words for every size
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = sorted(
        {"".join(vocab_rng.choice(letters, size=int(vocab_rng.integers(2, 10)))) for _ in range(30000)}
    )
    words = np.array(vocab)
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    target, size = megabytes * 1e6, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            lens = rng.integers(10, 200, size=1024)
            toks = words[rng.choice(len(words), size=int(lens.sum()), p=p)]
            cuts = np.cumsum(lens)[:-1]
            texts = [" ".join(chunk) for chunk in np.split(toks, cuts)]
            for i in range(0, len(texts) - 3, 4):
                pair = {"prompt": texts[i].capitalize() + "?", "completion": texts[i + 1].capitalize() + "."}
                if i % 40 == 0:
                    article = [pair, {"prompt": texts[i + 2] + "?", "completion": texts[i + 3] + "."}]
                else:
                    article = pair
                line = json.dumps(article) + "\n"
                f.write(line)
                size += len(line)


def make_tokenizer(corpus: Path, out: Path, vocab_size: int = 8192, sample_bytes: int = 5_000_000) -> None:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from modelzoo.data_prep.tokenizer_io import train_byte_level_bpe

    texts, n = [], 0
    for prompt, completion in iter_texts(corpus):
        texts += [prompt, completion]
        n += len(prompt) + len(completion)
        if n > sample_bytes:
            break
    tk = train_byte_level_bpe(texts, vocab_size, ["<pad>", "<s>", "</s>"])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    ).save_pretrained(str(out))


def iter_texts(corpus: Path):
    """(prompt, completion) texts as the contract prepares them (prompt right-stripped, one space)."""
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            article = json.loads(line)
            for pair in article if isinstance(article, list) else [article]:
                yield pair["prompt"].rstrip(" "), " " + pair["completion"].lstrip(" ")


# -- the three contenders, each run in its own process -------------------------------------------
def run_ceiling(corpus: Path, tok_dir: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    texts = [t for pair in iter_texts(corpus) for t in pair]
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), 1000):
        tokens += sum(map(len, tok(texts[i : i + 1000])["input_ids"]))
    return {"tokens": tokens, "seconds": time.perf_counter() - start}


class Token:
    """A token object, as generative_data_prep's tokenized_line.Token."""

    def __init__(self, token_id: int, token_type_id: int):
        self.token_id = token_id
        self.token_type_id = token_type_id


def _baseline_worker(job: tuple[str, int, int, str, str]) -> int:
    """One generative_data_prep-style process: its byte range of the corpus -> one HDF5 file."""
    import h5py
    from transformers import AutoTokenizer

    corpus, begin, end, tok_dir, out = job
    tok = AutoTokenizer.from_pretrained(tok_dir)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    rows, sequence, tokens = [], [], 0

    def flush(f, rows):
        ids = [[t.token_id for t in r] for r in rows]
        types = [[t.token_type_id for t in r] for r in rows]
        for name, data in (("input_ids", ids), ("token_type_ids", types)):
            if name not in f:
                f.create_dataset(name, data=data, dtype="i4", compression="gzip", maxshape=(None, L))
            else:
                ds = f[name]
                ds.resize((ds.shape[0] + len(data), L))
                ds[-len(data) :] = data

    with open(corpus, "rb") as fin, h5py.File(out, "w") as f:
        fin.seek(begin)
        while fin.tell() < end:
            line = fin.readline()
            if not line:
                break
            article = json.loads(line)
            article_tokens = []
            for pair in article if isinstance(article, list) else [article]:
                prompt = pair["prompt"].rstrip(" ")
                completion = " " + pair["completion"].lstrip(" ")
                article_tokens += [Token(t, 0) for t in tok.encode(prompt)]
                article_tokens += [Token(t, 1) for t in tok.encode(completion)[1:]]
                article_tokens.append(Token(eos, 1))
            article_tokens[-1].token_type_id = 3
            tokens += len(article_tokens)
            if len(sequence) + len(article_tokens) > L:  # greedy::drop
                if sequence:
                    rows.append(sequence + [Token(pad, 2) for _ in range(L - len(sequence))])
                sequence = []
                if len(article_tokens) > L:
                    continue
            sequence += article_tokens
            if len(rows) >= 64:
                flush(f, rows)
                rows = []
        if sequence:
            rows.append(sequence + [Token(pad, 2) for _ in range(L - len(sequence))])
        if rows:
            flush(f, rows)
    return tokens


def run_baseline(corpus: Path, tok_dir: Path, workers: int, out_dir: Path) -> dict:
    import multiprocessing

    size = corpus.stat().st_size
    bounds = [0]
    with open(corpus, "rb") as f:
        for k in range(1, workers):
            f.seek(size * k // workers)
            f.readline()
            bounds.append(f.tell())
    bounds.append(size)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [
        (str(corpus), bounds[k], bounds[k + 1], str(tok_dir), str(out_dir / f"part_{k}.hdf5"))
        for k in range(workers)
    ]
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        tokens = sum(pool.map(_baseline_worker, jobs))
    return {"tokens": tokens, "seconds": time.perf_counter() - start}


def run_ours(corpus: Path, tok_dir: Path, workers: int, out_dir: Path) -> dict:
    from modelzoo.data_prep.options import PackingConfig, PrepOptions
    from modelzoo.data_prep.pipeline import run_pipeline
    from modelzoo.data_prep.tokenizer_io import load_tokenizer

    load_tokenizer(str(tok_dir))  # imports done before the clock starts, as for the others
    opts = PrepOptions(
        input_path=str(corpus),
        output_path=str(out_dir),
        pretrained_tokenizer=str(tok_dir),
        max_seq_length=L,
        packing=PackingConfig("greedy", "drop"),
        num_workers=workers,
        progress=False,
    )
    start = time.perf_counter()
    result = run_pipeline(opts)
    seconds = time.perf_counter() - start
    tokens = sum(m.input_tokens for m in result.metrics.values())
    return {"tokens": tokens, "seconds": seconds, "sequences": result.metrics["train"].sequences}


# -- driver ----------------------------------------------------------------------------------------
def measure(role: str, *args: str) -> dict:
    """Run one contender in a fresh process; return its result and peak RSS of its process tree."""
    import psutil

    cmd = [sys.executable, __file__, "--role", role, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = peak_main = peak_child = 0
    while proc.poll() is None:
        try:
            main_rss = ps.memory_info().rss
            children = [p.memory_info().rss for p in ps.children(recursive=True)]
            peak = max(peak, main_rss + sum(children))
            peak_main, peak_child = max(peak_main, main_rss), max([peak_child] + children)
        except psutil.Error:
            pass
        time.sleep(0.02)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"{role} failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = peak / 2**20
    result["peak_main_mb"], result["peak_child_mb"] = peak_main / 2**20, peak_child / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--mb", type=float, default=60.0, help="corpus size in MB (>= 50 for the headline numbers)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--workdir", default=None, help="where to put corpora and outputs (default: a temp dir)"
    )
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs of ceiling and ours, interleaved; the best counts"
    )
    parser.add_argument("--role", default=None, help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.role:  # a contender, in its own process
        corpus, tok_dir = Path(a.args[0]), Path(a.args[1])
        if a.role == "ceiling":
            result = run_ceiling(corpus, tok_dir)
        elif a.role == "baseline":
            result = run_baseline(corpus, tok_dir, int(a.args[2]), Path(a.args[3]))
        else:
            result = run_ours(corpus, tok_dir, int(a.args[2]), Path(a.args[3]))
        print(json.dumps(result))
        return

    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_data_prep_"))
    work.mkdir(parents=True, exist_ok=True)
    small, large, tok_dir = work / "corpus_1x.jsonl", work / "corpus_2x.jsonl", work / "tokenizer"
    if not small.exists():
        make_corpus(small, a.mb, seed=0)
    if not large.exists():
        make_corpus(large, 2 * a.mb, seed=1)
    if not tok_dir.exists():
        make_tokenizer(small, tok_dir)
    w = str(a.workers)
    for d in ("out_baseline", "out_ours_1x", "out_ours_2x"):
        subprocess.run(["rm", "-rf", str(work / d)], check=True)
    print(
        f"corpus {small.stat().st_size / 1e6:.1f} MB (and {large.stat().st_size / 1e6:.1f} MB for RSS), "
        f"{os.cpu_count()} CPUs, {a.workers} workers, greedy::drop L={L}",
        flush=True,
    )

    def rate(r):
        return r["tokens"] / r["seconds"]

    ceilings, ours_runs = [], []
    baseline = measure("baseline", str(small), str(tok_dir), w, str(work / "out_baseline"))
    for _ in range(a.repeat):  # interleaved, so a burst of load from elsewhere hits both alike
        ceilings.append(measure("ceiling", str(small), str(tok_dir)))
        subprocess.run(["rm", "-rf", str(work / "out_ours_1x")], check=True)
        ours_runs.append(measure("ours", str(small), str(tok_dir), w, str(work / "out_ours_1x")))
    ours_2x = measure("ours", str(large), str(tok_dir), w, str(work / "out_ours_2x"))
    ceiling, ours = max(ceilings, key=rate), max(ours_runs, key=rate)
    for key in ("peak_rss_mb", "peak_main_mb", "peak_child_mb"):
        ours[key] = max(r[key] for r in ours_runs)
    print(
        "runs (Mtok/s): ceiling "
        + " ".join(f"{rate(r) / 1e6:.3f}" for r in ceilings)
        + "; ours "
        + " ".join(f"{rate(r) / 1e6:.3f}" for r in ours_runs)
        + f"; best of {a.repeat} counts"
    )

    rows = [("ceiling tokenizer(batch)", ceiling), ("baseline gdp-style", baseline), ("ours pipeline", ours)]
    for name, r in rows:
        print(
            f"RESULT {name:26s} {r['tokens']:>11,} tokens  {r['seconds']:7.2f} s  {rate(r) / 1e6:6.3f} Mtok/s"
        )
    print(f"RESULT ours / baseline        = {rate(ours) / rate(baseline):5.2f}x")
    print(f"RESULT ours / ceiling         = {100 * rate(ours) / rate(ceiling):5.1f}%  (target >= 60%)")
    print(f"RESULT baseline / ceiling     = {100 * rate(baseline) / rate(ceiling):5.1f}%")
    for label, r, corpus in (("1x", ours, small), ("2x", ours_2x, large)):
        print(
            f"RESULT ours peak RSS {label}      = {r['peak_rss_mb']:6.0f} MB total (main {r['peak_main_mb']:.0f} MB, "
            f"largest worker {r['peak_child_mb']:.0f} MB) at {corpus.stat().st_size / 1e6:.0f} MB input, "
            f"{r['tokens']:,} tokens, {rate(r) / 1e6:.3f} Mtok/s"
        )
    print(f"RESULT ours peak RSS 2x / 1x  = {ours_2x['peak_rss_mb'] / ours['peak_rss_mb']:.2f}")
    print(
        f"RESULT baseline peak RSS      = {baseline['peak_rss_mb']:7.0f} MB; ceiling peak RSS {ceiling['peak_rss_mb']:.0f} MB "
        "(texts held in memory)"
    )
    print(f"workdir: {work}")


if __name__ == "__main__":
    main()

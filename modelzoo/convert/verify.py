"""``verify A B``: are two checkpoints (any format) the same model?

Both are read as HF views (Meta merged, TP shards unsharded, int8 dequantized), then compared:

1. config: the architecture fields that change the function (sizes, heads, vocab, rope, tying, eps);
2. structure: tensor names, shapes, dtypes, parameter count;
3. finite: NaN/Inf in either;
4. weights: bitwise (default) or ``max|a-b| <= atol`` in fp32, streamed a row block at a time;
5. logits on fixed random tokens at several positions: ``0..L-1``, across the original context
   (e.g. 8192) when llama3 rope scaling applies, and at the end of the context; max/mean abs diff
   and top-1 agreement. Needs both models in fp32 in memory; ``auto`` skips it (saying so) when
   that does not fit in half the available RAM.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .view import CheckpointView, aligned_rows, build_model

ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "hidden_act")
#: Differences reported as notes: they do not change the function (Meta's params.json cannot hold them).
INFO_FIELDS = ("max_position_embeddings", "bos_token_id", "eos_token_id")


def _rope(config) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    return {k: rope[k] for k in sorted(rope)}


def config_diff(a, b) -> list[str]:
    diffs = [f"{k}: {getattr(a, k, None)} vs {getattr(b, k, None)}" for k in ARCH_FIELDS
             if getattr(a, k, None) != getattr(b, k, None)]
    if _rope(a) != _rope(b):
        diffs.append(f"rope: {_rope(a)} vs {_rope(b)}")
    return diffs


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def logit_windows(config, seq_len: int, max_pos: int | None = None) -> list[int]:
    """Start positions of the logit windows (see module doc)."""
    max_pos = max_pos or config.max_position_embeddings
    starts = [0]
    rope = getattr(config, "rope_parameters", None) or {}
    original = rope.get("original_max_position_embeddings")
    if rope.get("rope_type") == "llama3" and original and original < max_pos:
        starts.append(original - seq_len // 2)
    starts.append(max_pos - seq_len)
    return sorted({max(0, s) for s in starts})


class _Report:
    def __init__(self, out: Callable[[str], None]) -> None:
        self.out, self.failed, self.count = out, [], 0

    def row(self, name: str, ok: bool, detail: str) -> None:
        self.count += 1
        if not ok:
            self.failed.append(name)
        self.out(f"  {'PASS' if ok else 'FAIL'}  {name:<28} {detail}")


def verify(a: CheckpointView, b: CheckpointView, *, atol: float = 0.0, logits: str = "auto",
           logits_atol: float = 1e-5, min_top1: float = 1.0, seq_len: int = 16, seed: int = 0,
           out: Callable[[str], None] = print) -> bool:
    """Compare two views; prints one line per check and returns whether all passed."""
    for tag, view in (("A", a), ("B", b)):
        out(f"{tag}  {view.kind:<9} {view.path}: {view.n_params:,} parameters, {len(view.sources)} HF tensors "
            f"({view.native_tensors} stored)")
        for note in view.notes:
            out(f"   note: {note}")
    report = _Report(out)
    diffs = config_diff(a.config, b.config)
    report.row("config", not diffs, "; ".join(diffs[:3]) if diffs else f"{len(ARCH_FIELDS) + 1} architecture fields equal")
    for key in INFO_FIELDS:
        if getattr(a.config, key, None) != getattr(b.config, key, None):
            out(f"   note: {key} {getattr(a.config, key, None)} vs {getattr(b.config, key, None)} "
                "(not part of the function; Meta's params.json does not store it, see --model-size)")

    names_a, names_b = list(a.sources), list(b.sources)
    only_a, only_b = [n for n in names_a if n not in b.sources], [n for n in names_b if n not in a.sources]
    common = [n for n in names_a if n in b.sources]
    shape_bad = [n for n in common if a.sources[n].shape != b.sources[n].shape]
    dtype_bad = [n for n in common if a.sources[n].dtype != b.sources[n].dtype]
    problems = ([f"only in A: {', '.join(only_a[:3])}"] if only_a else []) + \
        ([f"only in B: {', '.join(only_b[:3])}"] if only_b else []) + \
        [f"{n}: shape {list(a.sources[n].shape)} vs {list(b.sources[n].shape)}" for n in shape_bad[:3]]
    dtypes_a = sorted({str(s.dtype).replace("torch.", "") for s in a.sources.values()})
    dtypes_b = sorted({str(s.dtype).replace("torch.", "") for s in b.sources.values()})
    dtype_msg = f"dtypes {'/'.join(dtypes_a)}" + ("" if dtypes_a == dtypes_b else f" vs {'/'.join(dtypes_b)}")
    if dtype_bad and atol == 0:
        problems.append(f"{len(dtype_bad)} dtype difference(s), e.g. {dtype_bad[0]} (compare with --atol)")
    report.row("structure", not problems,
               "; ".join(problems) if problems else f"{len(common)} tensors, names and shapes equal, {dtype_msg}")
    report.row("parameter count", a.n_params == b.n_params, f"{a.n_params:,} vs {b.n_params:,}")

    comparable = [n for n in common if n not in shape_bad]
    nonfinite, differing, worst = [], [], (0.0, "")
    for name in comparable:
        sa, sb = a.sources[name], b.sources[name]
        same_bits = sa.dtype == sb.dtype
        max_diff, bad_a, bad_b = 0.0, 0, 0
        for xa, xb in aligned_rows(sa, sb):
            equal = same_bits and torch.equal(_raw(xa), _raw(xb))  # bitwise: a NaN equals the same NaN
            count_a = int((~torch.isfinite(xa)).sum()) if xa.is_floating_point() else 0
            bad_a += count_a
            if equal:
                bad_b += count_a
                continue
            if xb.is_floating_point():
                bad_b += int((~torch.isfinite(xb)).sum())
            same_bits = False
            diff = (xa.float() - xb.float()).abs()
            max_diff = max(max_diff, float(diff.nan_to_num(float("inf")).max()) if diff.numel() else 0.0)
        if bad_a or bad_b:
            nonfinite.append(f"{name} ({bad_a} in A, {bad_b} in B)")
        if not same_bits and (atol == 0 or max_diff > atol):
            differing.append(name)
        if max_diff > worst[0]:
            worst = (max_diff, name)
    report.row("finite", not nonfinite, f"NaN/Inf in {', '.join(nonfinite[:3])}" if nonfinite else "no NaN/Inf")
    mode = "bitwise" if atol == 0 else f"atol {atol:g}"
    detail = f"{len(comparable) - len(differing)}/{len(comparable)} tensors equal ({mode})"
    if worst[0] > 0:
        detail += f"; max|diff| {worst[0]:.3e} in {worst[1]}"
    report.row("weights", not differing, detail)

    if logits != "never" and not (only_a or only_b or shape_bad):
        need = 4 * (a.n_params + b.n_params)
        avail = _mem_available()
        if logits == "auto" and avail and need > avail // 2:
            out(f"  SKIP  logits                       both models in fp32 need {need / 2**30:.1f} GiB, "
                f"{avail / 2**30:.1f} GiB available; --logits always forces it")
        else:
            _check_logits(a, b, report, logits_atol, min_top1, seq_len, seed)
    ok = not report.failed
    out(f"verify: {'PASS' if ok else 'FAIL'} ({report.count - len(report.failed)} of {report.count} checks passed"
        f"{'; failed: ' + ', '.join(report.failed) if report.failed else ''})")
    return ok


def _check_logits(a: CheckpointView, b: CheckpointView, report: _Report, logits_atol: float, min_top1: float,
                  seq_len: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    vocab = min(a.config.vocab_size, b.config.vocab_size)
    starts = logit_windows(a.config, seq_len, min(a.config.max_position_embeddings,
                                                  b.config.max_position_embeddings))
    ids = torch.randint(0, vocab, (len(starts), seq_len), generator=gen)
    results = {}
    for tag, view in (("a", a), ("b", b)):
        model = build_model(view)
        with torch.no_grad():
            results[tag] = [model(ids[i:i + 1], position_ids=torch.arange(s, s + seq_len)[None]).logits[0]
                            for i, s in enumerate(starts)]
        del model
    for i, start in enumerate(starts):
        la, lb = results["a"][i], results["b"][i]
        diff = (la - lb).abs()
        top1 = float((la.argmax(-1) == lb.argmax(-1)).float().mean())
        ok = float(diff.max()) <= logits_atol and top1 >= min_top1
        report.row(f"logits @{start}..{start + seq_len - 1}", ok,
                   f"max|diff| {float(diff.max()):.2e} mean {float(diff.mean()):.2e} top-1 {100 * top1:.1f}% "
                   f"(tol {logits_atol:g}, top-1 >= {100 * min_top1:.0f}%)")

"""``verify A B``: are two checkpoints (any format) the same model?

Both are read as HF views (Meta merged, TP shards unsharded, int8 dequantized), then compared:

1. config: the architecture fields that change the function (sizes, heads, vocab, rope, tying, eps);
2. structure: tensor names, shapes, dtypes, parameter count;
3. finite: NaN/Inf in either;
4. weights: bitwise (default) or ``max|a-b| <= atol`` in fp32, streamed a row block at a time;
   for a TP shard dir, every chip's copy of every tensor too (``unshard`` reads a replicated row
   from its first holder only): each must be what the TP plan gives that chip of the other side's
   tensor (bitwise, or within ``atol``), and replicas must be bitwise equal to each other; a
   failure names the chip, the tensor and what it differs from;
5. logits on fixed random tokens at several positions: ``0..L-1``, across the original context
   (e.g. 8192) when llama3 rope scaling applies, and at the end of the context; max/mean abs diff
   and top-1 agreement. Needs both models in fp32 in memory; ``auto`` skips it (saying so) when
   that does not fit in half the available RAM.

A base with a LoRA/DoRA adapter (``verify BASE MERGED --adapter DIR``) is side A twice over: its
weights are the merge of base and adapter (:func:`~modelzoo.convert.merge_lora.merged_view`), and its
logits come from the base running the adapter *unmerged* through peft's own LoRA layers (``build_a``),
so a merged checkpoint is checked against the adapter's forward, not against the merge code alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

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


def _max_abs_diff(xa: torch.Tensor, xb: torch.Tensor) -> float:
    """max |xa - xb| in fp32, NaN counting as infinite (0.0 for empty tensors)."""
    diff = (xa.float() - xb.float()).abs()
    return float(diff.nan_to_num(float("inf")).max()) if diff.numel() else 0.0


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
           out: Callable[[str], None] = print, build_a: Callable[[], nn.Module] | None = None) -> bool:
    """Compare two views; prints one line per check and returns whether all passed. ``build_a``
    makes A's model for the logit check (default: a stock HF model of A's tensors)."""
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
            max_diff = max(max_diff, _max_abs_diff(xa, xb))
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
    for tag, view, other_tag, other in (("A", a, "B", b), ("B", b, "A", a)):
        if view.chips is not None:
            _check_chips(tag, view, other_tag, other, comparable, report, atol)

    if logits != "never" and not (only_a or only_b or shape_bad):
        need = 4 * (a.n_params + b.n_params)
        avail = _mem_available()
        if logits == "auto" and avail and need > avail // 2:
            out(f"  SKIP  logits                       both models in fp32 need {need / 2**30:.1f} GiB, "
                f"{avail / 2**30:.1f} GiB available; --logits always forces it")
        else:
            _check_logits(a, b, report, logits_atol, min_top1, seq_len, seed, build_a)
    ok = not report.failed
    out(f"verify: {'PASS' if ok else 'FAIL'} ({report.count - len(report.failed)} of {report.count} checks passed"
        f"{'; failed: ' + ', '.join(report.failed) if report.failed else ''})")
    return ok


def _check_logits(a: CheckpointView, b: CheckpointView, report: _Report, logits_atol: float, min_top1: float,
                  seq_len: int, seed: int, build_a: Callable[[], nn.Module] | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    vocab = min(a.config.vocab_size, b.config.vocab_size)
    starts = logit_windows(a.config, seq_len, min(a.config.max_position_embeddings,
                                                  b.config.max_position_embeddings))
    ids = torch.randint(0, vocab, (len(starts), seq_len), generator=gen)
    results = {}
    builders = {"a": build_a or (lambda: build_model(a)), "b": lambda: build_model(b)}
    for tag in ("a", "b"):
        model = builders[tag]()
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


def _chip_diff(chips, name: str, full: torch.Tensor, rank: int, atol: float) -> float | None:
    """None when chip ``rank``'s stored copy of ``name`` is what the TP plan gives it of ``full``
    (bitwise; within ``atol`` when that is > 0); else the max |diff|."""
    stored = chips.stored(name, rank)
    offset, worst, equal = 0, 0.0, True
    for block in chips.expected(name, full, rank):
        part = stored[offset:offset + block.shape[0]] if stored.dim() == 2 else stored
        offset += block.shape[0] if stored.dim() == 2 else 0
        if part.dtype == block.dtype and torch.equal(_raw(part), _raw(block)):
            continue
        equal = False
        worst = max(worst, _max_abs_diff(part, block))
    return None if equal or (atol > 0 and worst <= atol) else worst


def _check_chips(tag: str, view: CheckpointView, other_tag: str, other: CheckpointView, names: list[str],
                 report: _Report, atol: float) -> None:
    """The "chip copies" row of a TP shard dir ``view``: every chip's copy of every tensor against
    ``other``'s tensor as the plan shards it, and (where that is not already bitwise) against the
    first holder's copy, bitwise. One tensor of each side in memory at a time."""
    chips, bad = view.chips, []
    self_checked = False
    for name in names:
        mine = view.sources[name]
        ref_ok = atol > 0 or mine.dtype == other.sources[name].dtype  # else the weights row reports it
        ref = other.sources[name].materialize() if ref_ok else None
        own = None
        if not (ref_ok and atol == 0):  # no bitwise check against the other side: compare the replicas
            own, self_checked = mine.materialize(), True
        for rank in range(chips.n_chips):
            reasons = []
            diff = _chip_diff(chips, name, ref, rank, atol) if ref is not None else None
            if diff is not None:
                reasons.append(f"differs from {other_tag}, max|diff| {diff:.3e}")
            if own is not None and _chip_diff(chips, name, own, rank, 0.0) is not None:
                first = chips.first_holder(name, mine.shape, rank)
                reasons.append("its padding is not zero" if first is None else f"differs from chip {first}'s copy")
            if reasons:
                bad.append(f"chip {rank} {name} ({'; '.join(reasons)}) in {chips.where(name, rank)}")
        del ref, own
    if bad:
        more = f" ... {len(bad) - 3} more" if len(bad) > 3 else ""
        detail = f"{len(bad)} chip copies differ: {', '.join(bad[:3])}{more}"
    else:
        mode = "bitwise" if atol == 0 else f"atol {atol:g}"
        detail = (f"{chips.n_chips} chips x {len(names)} tensors equal {other_tag} ({mode})"
                  + ("; replicas bitwise equal" if self_checked else ""))
    report.row(f"chip copies ({tag})", not bad, detail)

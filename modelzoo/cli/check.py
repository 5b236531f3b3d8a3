"""``modelzoo-check``: prove the patched model equals stock ``transformers`` on this machine.

Builds the configured model twice with the same weights (stock HF and patched), then checks
(1) fp32 logits parity, (2) packed-article attention (a packed row equals its articles run
alone), (3) the configured backend against the eager CPU reference, and prints the parallel
layout the config asks for. Exit code 0 when every check passes, 1 on a mismatch, 2 on bad input.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import TYPE_CHECKING

from .errors import run_reporting_errors

if TYPE_CHECKING:
    import torch

#: Materializing more than this (twice, in fp32) is not a quick check; shrink the model instead.
MAX_CHECK_PARAMS = 1.5e9
LOGITS_ATOL = 1e-5
BACKEND_ATOL = 1e-4


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelzoo-check",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: modelzoo-check --config llama_tiny backend=inductor model.name_or_path=llama3_tiny",
    )
    parser.add_argument("--config", default="llama_tiny",
                        help="training config: a YAML path or a bare name from configs/training/ (default: llama_tiny)")
    parser.add_argument("--batch-size", type=int, default=2, help="rows of random tokens (default: 2)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per row (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights (presets) and inputs (default: 0)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. model.name_or_path=llama3_2_tiny backend=inductor")
    return parser


def _row(name: str, diff: float, tol: float, seconds: float) -> bool:
    ok = diff <= tol
    print(f"  {'PASS' if ok else 'FAIL'}  {name:<44} max|diff| {diff:.2e}  (tol {tol:.0e})  {seconds:6.2f}s")
    return ok


def _packed_inputs(vocab: int, seq_len: int, gen: torch.Generator):
    """One row of two articles (prompt, completion, separator), and the articles alone."""
    import torch

    cut = max(seq_len // 3, 3)
    ids = torch.randint(3, vocab, (1, seq_len), generator=gen)
    types = torch.ones_like(ids)
    types[0, : cut // 2] = 0
    types[0, cut - 1] = 3
    types[0, cut : cut + (seq_len - cut) // 3] = 0
    types[0, -1] = 3
    return ids, types, cut


def run_checks(args: argparse.Namespace) -> int:
    from modelzoo.models.llama.checks import load_run_config

    cfg = load_run_config(args.config, args.overrides, kind="training")
    # the config is valid: now the model (torch, transformers)
    import torch

    from modelzoo.backends import get_backend
    from modelzoo.models.llama import from_pretrained, patch_llama
    from modelzoo.models.llama.parallelize import check_tensor_parallel

    mcfg = cfg.model
    meta = from_pretrained(mcfg.name_or_path, device="meta", overrides=mcfg.overrides, patch=False)
    n_params = sum(p.numel() for p in meta.parameters())
    arch = meta.config
    layout = check_tensor_parallel(arch.num_attention_heads, arch.num_key_value_heads,
                                   cfg.samba_compile.n_chips, mcfg.name_or_path, arch.intermediate_size)
    print(f"model     {mcfg.name_or_path}: {n_params / 1e6:.2f}M parameters, {arch.num_hidden_layers} layers, "
          f"{arch.num_attention_heads} heads / {arch.num_key_value_heads} KV heads")
    print(f"parallel  n_chips={cfg.samba_compile.n_chips} (KV heads: {layout}) x "
          f"data_parallel.world_size={cfg.data_parallel.world_size}")
    if n_params > MAX_CHECK_PARAMS:
        print(f"error: {mcfg.name_or_path} has {n_params / 1e9:.1f}B parameters; the check builds it twice in "
              "fp32. Shrink it, e.g. model.overrides.num_hidden_layers=1, or use a tiny preset", file=sys.stderr)
        return 2

    stock = from_pretrained(mcfg.name_or_path, overrides=mcfg.overrides, patch=False, seed=args.seed)
    patched = patch_llama(copy.deepcopy(stock), mcfg)
    print(f"patches   {', '.join(patched._modelzoo_patches) or '(none: stock)'}")
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, arch.vocab_size, (args.batch_size, args.seq_len), generator=gen)
    results = []
    with torch.no_grad():
        start = time.perf_counter()
        diff = (patched(ids).logits - stock(ids).logits).abs().max().item()
        results.append(_row("patched vs stock transformers (fp32 logits)", diff, LOGITS_ATOL,
                            time.perf_counter() - start))

        if "article_attention" in patched._modelzoo_patches:
            start = time.perf_counter()
            row, types, cut = _packed_inputs(arch.vocab_size, args.seq_len, gen)
            packed = patched(row, token_type_ids=types).logits[0]
            first = patched(row[:, :cut], token_type_ids=types[:, :cut]).logits[0]
            second = patched(row[:, cut:], token_type_ids=types[:, cut:]).logits[0]
            diff = max((packed[:cut] - first).abs().max().item(), (packed[cut:] - second).abs().max().item())
            results.append(_row("packed articles vs articles alone", diff, LOGITS_ATOL,
                                time.perf_counter() - start))

        if cfg.backend != "cpu":
            start = time.perf_counter()
            backend = get_backend(cfg.backend)
            compiled = backend.compile(copy.deepcopy(patched))
            out = compiled(**backend.to_device({"input_ids": ids})).logits.cpu()
            diff = (out - patched(ids).logits).abs().max().item()
            results.append(_row(f"backend {cfg.backend} vs cpu reference", diff, BACKEND_ATOL,
                                time.perf_counter() - start))
    ok = all(results)
    print(f"{sum(results)} passed, {len(results) - sum(results)} failed")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    return run_reporting_errors(run_checks, _parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

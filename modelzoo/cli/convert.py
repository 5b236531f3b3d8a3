"""``modelzoo-convert``: Llama checkpoints between Meta-native, HF, per-chip TP shards and int8;
LoRA/DoRA adapters merged into their base.

Every subcommand streams: each tensor (or block of rows) is memory-mapped from its file on its own,
torch files are only ever unpickled with weights_only=True, one output tensor is built and written at
a time, the stored dtype is kept, safetensors are sharded with an index, and the output is built in a
hidden scratch dir that is renamed into place only when complete. An existing --output is replaced
(--overwrite) only when it is empty or an earlier conversion's output (its .modelzoo-output.json lists
exactly the files present); scratch left by a killed run is removed by the next run (it says so).
Exit code 0 on success, 1 when `verify` finds a mismatch, 2 on bad input (one line: `error: ...`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from modelzoo.checkpoint.errors import CheckpointError
from modelzoo.config import ConfigError

EPILOG = """examples:
  modelzoo-convert meta-to-hf --input Llama-3.1-8B/original --output llama31-8b-hf
  modelzoo-convert hf-to-meta --input llama31-8b-hf --output llama31-8b-meta --model-parallel 1
  modelzoo-convert shard --input llama2-70b-hf --output llama2-70b-tp8 --n-chips 8
  modelzoo-convert unshard --input llama2-70b-tp8 --output llama2-70b-hf-again
  modelzoo-convert quantize --int8 --input llama31-8b-hf --output llama31-8b-int8
  modelzoo-convert merge-lora --adapter runs/lora/checkpoints --output llama31-8b-lora-merged
  modelzoo-convert verify Llama-3.1-8B/original llama31-8b-hf
  modelzoo-convert verify llama31-8b-hf llama31-8b-lora-merged --adapter runs/lora/checkpoints
"""

ACCEPTS = {"meta-to-hf": ("meta",), "hf-to-meta": ("hf", "tp-shards"), "shard": ("hf", "meta"),
           "unshard": ("tp-shards",), "quantize": ("hf", "meta", "tp-shards"), "merge-lora": ("hf", "meta", "tp-shards")}
ADAPTER_HELP = "peft adapter dir, or a LoRA training run's checkpoint, checkpoints dir or run dir (its newest checkpoint)"


def _io_args(parser: argparse.ArgumentParser, weights: bool = True, input_dir: bool = True) -> None:
    if input_dir:
        parser.add_argument("--input", required=True, metavar="DIR", help="checkpoint directory to read")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="directory to create (built in a hidden scratch dir beside it, renamed when complete)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --output if it is empty or an earlier conversion's output (after success)")
    if weights:
        parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                            help="cut safetensors files at this size, e.g. 5GB, 500MB (default: 5GB)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _meta_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-size", metavar="PRESET",
                        help="preset the Meta checkpoint is (e.g. llama3_1_8b, llama2_70b): checked against "
                             "params.json, and supplies context length, rope factor and bos/eos")
    parser.add_argument("--tie-word-embeddings", choices=("auto", "yes", "no"), default="auto",
                        help="auto: tied when output.weight is absent or equals tok_embeddings (Llama-3.2)")
    parser.add_argument("--instruct", action="store_true",
                        help="Llama-3 instruct model: tokenizer eos <|eot_id|>, generation eos [end_of_text, eom, eot]")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelzoo-convert", description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("meta-to-hf", help="Meta-native dir (params.json + consolidated.NN.pth) -> HF dir",
                       description="Merge Meta's model-parallel files into an HF checkpoint: every architecture "
                                   "field from params.json, q/k rotary permutation (GQA-aware), llama3 rope "
                                   "scaling, tied embeddings (3.2), duplicated KV shards read once, and "
                                   "tokenizer.model (sentencepiece or tiktoken) converted to HF tokenizer files.")
    _io_args(p)
    _meta_args(p)

    p = sub.add_parser("hf-to-meta", help="HF dir -> Meta-native dir (exact inverse of meta-to-hf)",
                       description="Write params.json, consolidated.NN.pth (torch.save format) and tokenizer.model. "
                                   "meta-to-hf of the result gives back the same tensors bit for bit.")
    _io_args(p, weights=False)
    p.add_argument("--model-parallel", type=int, default=1, metavar="N",
                   help="number of consolidated.NN.pth files (Meta's MP degree; default 1)")
    p.add_argument("--embedding-split", choices=("auto", "vocab", "dim"), default="auto",
                   help="how MP files split tok_embeddings: vocab (Llama-3) or dim (Llama-2); auto by rope_theta")

    p = sub.add_parser("shard", help="HF (or Meta) dir -> per-chip tensor-parallel shards",
                       description="Split a checkpoint into --n-chips per-chip dirs (rank_00/ ...) exactly as the "
                                   "training TP plan (modelzoo.models.llama.parallelize) lays the model out; "
                                   "lm_head is vocab-padded to a multiple of n_chips, KV heads replicated when "
                                   "n_chips exceeds them. tp_shards.json records the layout.")
    _io_args(p)
    p.add_argument("--n-chips", type=int, required=True, metavar="K", help="tensor-parallel degree")

    p = sub.add_parser("unshard", help="per-chip TP shards -> HF dir (vocab padding trimmed)",
                       description="Reassemble a shard dir into an HF checkpoint; shard then unshard is bit-identical.")
    _io_args(p)

    p = sub.add_parser("quantize", help="float checkpoint -> int8 weight-only checkpoint",
                       description="Per-output-channel absmax int8 weights + float32 scales for every linear "
                                   "(modelzoo.checkpoint.int8 layout, read by the generation CLI); embeddings and "
                                   "norms keep their dtype.")
    _io_args(p)
    p.add_argument("--int8", action="store_true", required=True, help="int8 weight-only (the only method)")
    p.add_argument("--skip-lm-head", action="store_true", help="keep lm_head in float")

    p = sub.add_parser("merge-lora", help="base HF (or Meta, TP-shard) dir + LoRA/DoRA adapter -> HF dir, merged",
                       description="Fold a peft LoRA or DoRA adapter into its base: each adapted projection becomes "
                                   "W + (alpha/r) B A (DoRA: rescaled per output row by its magnitude), computed in "
                                   "fp32 a row block at a time and stored in W's dtype, as peft's merge_and_unload "
                                   "computes it; modules_to_save tensors replace the base's. Checked against the base "
                                   "before anything is written. Prove it with: verify BASE OUTPUT --adapter ADAPTER.")
    p.add_argument("--base", metavar="DIR",
                   help="base model the adapter was trained on (default: adapter_config.json's base_model_name_or_path)")
    p.add_argument("--adapter", required=True, metavar="DIR", help=ADAPTER_HELP)
    _io_args(p, input_dir=False)

    p = sub.add_parser("verify", help="compare two checkpoints in any of these formats",
                       description="Compare config, structure (names, shapes, dtypes, parameter count, NaN/Inf), "
                                   "weights (bitwise, or --atol; for a TP shard dir every chip's copy of every "
                                   "tensor, replicas included, naming the chip and tensor that differ) and logits "
                                   "at several positions (incl. beyond the original context when llama3 rope "
                                   "scaling applies). With --adapter, A is the base running that "
                                   "adapter: B's weights are compared with the merge of the two, B's logits with A "
                                   "running the adapter unmerged (peft's LoRA layers), which proves a merge-lora "
                                   "output. Exit 1 on a mismatch.")
    p.add_argument("a", metavar="A", help="checkpoint dir (hf, meta, tp-shards or int8)")
    p.add_argument("b", metavar="B", help="checkpoint dir to compare with A")
    p.add_argument("--adapter", metavar="DIR", help=f"apply this adapter to A ({ADAPTER_HELP})")
    p.add_argument("--atol", type=float, default=0.0, help="weight tolerance; 0 = bitwise, dtypes must match (default)")
    p.add_argument("--logits", choices=("auto", "always", "never"), default="auto",
                   help="logit check (needs both models in fp32; auto skips it when they do not fit in RAM)")
    p.add_argument("--logits-atol", type=float, default=1e-5, help="max |logit diff| allowed (default 1e-5)")
    p.add_argument("--min-top1", type=float, default=1.0, help="min top-1 agreement, 0..1 (default 1.0)")
    p.add_argument("--seq-len", type=int, default=16, help="tokens per logit window (default 16)")
    _meta_args(p)
    return parser


def _resolve_adapter(args: argparse.Namespace, base_flag: str) -> None:
    """``args.adapter`` -> the adapter dir it means; for merge-lora a missing ``--base`` -> the
    adapter's own base (``args.base``)."""
    from modelzoo.peft.locate import adapter_base, resolve_adapter_dir

    args.adapter = str(resolve_adapter_dir(args.adapter))
    if base_flag and getattr(args, "base", None) is None:
        args.base = str(adapter_base(args.adapter, f"pass the base model dir with {base_flag} DIR"))


def _input_paths(args: argparse.Namespace) -> list[str]:
    """The dirs a conversion reads (the output must overlap none of them)."""
    if args.command != "merge-lora":
        return [args.input]
    _resolve_adapter(args, "--base")
    args.input = args.base
    return [args.base, args.adapter]


def _open_input(args: argparse.Namespace):
    from modelzoo.convert.formats import detect_format, open_checkpoint

    flag = "--base" if args.command == "merge-lora" else "--input"
    kind = detect_format(args.input)
    if kind not in ACCEPTS[args.command]:
        raise CheckpointError(f"{flag} {args.input} is in {kind} format; {args.command} reads "
                              f"{' or '.join(ACCEPTS[args.command])} checkpoints")
    options = {}
    if kind == "meta":
        options = {"model_size": getattr(args, "model_size", None),
                   "tie": getattr(args, "tie_word_embeddings", "auto"), "instruct": getattr(args, "instruct", False)}
    view = open_checkpoint(args.input, **options)
    if args.command == "merge-lora":
        from modelzoo.convert.merge_lora import merged_view

        view = merged_view(view, args.adapter)
    return view


def _convert(args: argparse.Namespace) -> int:
    from modelzoo.checkpoint.safetensors_io import parse_size
    from modelzoo.convert.output import conversion_output
    from modelzoo.convert.progress import Progress

    max_shard = parse_size(getattr(args, "max_shard_size", "5GB"))
    inputs = _input_paths(args)
    bar = Progress(args.command, show=not args.quiet)
    try:
        with conversion_output(args.command, args.output, inputs, args.overwrite) as tmp:
            view = _open_input(args)
            for note in view.notes:
                print(f"note: {note}")
            n_notes = len(view.notes)
            start = time.perf_counter()
            if args.command in ("meta-to-hf", "unshard", "merge-lora"):
                from modelzoo.convert.hf_dir import write_hf

                write_hf(view, tmp, max_shard, bar, instruct=getattr(args, "instruct", False))
            elif args.command == "hf-to-meta":
                from modelzoo.convert.meta import write_meta

                write_meta(view, tmp, bar, args.model_parallel, args.embedding_split)
            elif args.command == "shard":
                from modelzoo.convert.tp_shards import write_shards

                write_shards(view, tmp, args.n_chips, max_shard, bar)
            elif args.command == "quantize":
                from modelzoo.convert.quantize import write_int8

                write_int8(view, tmp, max_shard, bar, include_lm_head=not args.skip_lm_head)
            written = bar.n
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    for note in view.notes[n_notes:]:
        print(f"note: {note}")
    print(f"wrote {Path(args.output).absolute()} ({args.command}): {view.n_params:,} parameters, {written / 1e6:,.1f} MB in "
          f"{seconds:.1f} s ({written / 1e6 / max(seconds, 1e-9):,.0f} MB/s)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from modelzoo.convert.formats import detect_format, open_checkpoint
    from modelzoo.convert.verify import verify

    meta = {"model_size": args.model_size, "tie": args.tie_word_embeddings, "instruct": args.instruct}
    views = []
    for path in (args.a, args.b):
        views.append(open_checkpoint(path, allow_int8=True, **(meta if detect_format(path) == "meta" else {})))
    build_a = None
    if args.adapter:
        from functools import partial

        from modelzoo.convert.merge_lora import base_with_adapter, merged_view

        _resolve_adapter(args, "")
        base = views[0]
        views[0] = merged_view(base, args.adapter)
        views[0].notes.append("weights: the merge of A + adapter; logits: A running the adapter unmerged")
        build_a = partial(base_with_adapter, base, args.adapter)
    ok = verify(*views, atol=args.atol, logits=args.logits, logits_atol=args.logits_atol, min_top1=args.min_top1,
                seq_len=args.seq_len, build_a=build_a)
    return 0 if ok else 1


def _return_freed_blocks_to_the_os() -> None:
    """glibc raises its mmap threshold as large blocks are freed, then keeps later ones of up to 32 MiB
    on the heap, where fragmentation holds hundreds of MiB across a long conversion. A fixed 1 MiB
    threshold (``MALLOC_MMAP_THRESHOLD_``) gives every block-sized temporary back on free."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _return_freed_blocks_to_the_os()
    try:
        return _verify(args) if args.command == "verify" else _convert(args)
    except (CheckpointError, ConfigError, OSError, ValueError) as err:
        message = " ".join(str(err).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written to the output path", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

"""``modelzoo-train`` / ``run_training.py``: compile a plan or train, from one YAML config.

    modelzoo-train --config llama2_70b command=compile          # plan only: seconds, no weights
    modelzoo-train --config llama_tiny                          # train on the bundled sample
    modelzoo-train --config my.yaml training.max_steps=500 data_parallel.world_size=2

A config asking for n_chips x world_size > 1 processes starts them on this machine (gloo on CPU,
nccl on CUDA; reachable from 127.0.0.1 only; they stop when this command stops). For several
machines, start it with torchrun yourself (--rdzv-endpoint HOST:PORT): it joins that group.

Relative paths in the config are relative to the current directory; the absolute output paths
are printed at start.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Nothing here imports torch at module level: the first line is on screen before torch and
# transformers load (seconds), see main().


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelzoo-train", description=__doc__.split("\n\n")[0].replace("``", "'"),
                                     epilog=__doc__.split("\n\n", 1)[1].replace("``", "'"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama_tiny",
                        help="YAML path or bare name from configs/training/ (default: llama_tiny)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides (hydra syntax), e.g. training.max_steps=50 command=compile")
    return parser


def _relaunch(nprocs: int, argv: list[str]) -> int:
    """Run this command as ``nprocs`` local ranks; returns the exit status."""
    from modelzoo.parallel.launch import launch_local

    cmd = [sys.executable, "-m", "modelzoo.cli.train", *argv]
    print(f"launching {nprocs} processes: {' '.join(cmd[1:])}", file=sys.stderr)
    return launch_local(nprocs, cmd)


def _says() -> bool:
    """Whether this process prints progress lines: rank 0, and not a rank this command launched
    itself (the launching process has printed them)."""
    from modelzoo.parallel.launch import PARENT_ENV

    return int(os.environ.get("RANK", "0")) == 0 and PARENT_ENV not in os.environ


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _outputs(cfg) -> str:
    from modelzoo.compile.plan import plan_path

    t = cfg.training
    return (f"outputs: logs {Path(t.output_dir).absolute()} ({', '.join(t.loggers) or 'no loggers'}), "
            f"checkpoints {Path(cfg.checkpoint.save_dir).absolute()}, compile plan {plan_path(cfg).absolute()}")


def _preflight(cfg) -> None:
    """Check the loggers' packages, the compile plan, the checkpoint dir and the dataset (its
    checksums unless ``training.verify_checksums=false``) against the config; no weights are loaded."""
    from modelzoo.checkpoint.manager import prepare_save_dir
    from modelzoo.compile.plan import build_plan, check_plan_for_run, plan_path, write_plan
    from modelzoo.models.llama import load_llama_config
    from modelzoo.training.data import check_sequence_length, open_training_data
    from modelzoo.training.loggers import check_loggers

    check_loggers(cfg.training.loggers)
    if plan_path(cfg).is_file():
        check_plan_for_run(cfg)
    else:
        write_plan(build_plan(cfg), cfg.samba_compile.output_folder)
    ck, t = cfg.checkpoint, cfg.training
    prepare_save_dir(ck.save_dir, resume=ck.resume, overwrite=ck.overwrite, dry_run=True)
    source = ck.load_path or cfg.model.name_or_path
    config = load_llama_config(source, cfg.model.overrides if source == cfg.model.name_or_path else None)
    check_sequence_length(t.max_seq_length, config, t.allow_long_sequences, source)
    if _says():
        how = "sha256 of every file" if t.verify_checksums else "names and sizes"
        _say(f"checking dataset {Path(t.dataset_dir).absolute() if t.dataset_dir else None} ({how}) ...")
    open_training_data(t.dataset_dir, t.max_seq_length, config.vocab_size, cfg.data_parallel.world_size,
                       checksums=t.verify_checksums)


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from modelzoo.compile.plan import build_plan, summarize, write_plan
    from modelzoo.models.llama.checks import load_run_config

    cfg = load_run_config(args.config, args.overrides, kind="training")
    if cfg.command == "compile":
        plan = build_plan(cfg)
        path = write_plan(plan, cfg.samba_compile.output_folder)
        print(summarize(plan))
        print(f"compile plan written to {path.absolute()}")
        return 0
    if _says():
        _say(_outputs(cfg))
    nprocs = cfg.samba_compile.n_chips * cfg.data_parallel.world_size
    under_launcher = "WORLD_SIZE" in os.environ
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:  # fail once, here, before any process is launched
        _preflight(cfg)
    if nprocs > 1 and not under_launcher:
        return _relaunch(nprocs, argv)

    from modelzoo.parallel.mesh import shutdown_distributed
    from modelzoo.training.trainer import Trainer

    result = Trainer(cfg).fit()
    shutdown_distributed()
    if is_main:
        history = result["history"]
        first = next((r["loss"] for r in history if "loss" in r), float("nan"))
        print(f"done: {result['step']} steps, loss {first:.4f} -> {result.get('loss', float('nan')):.4f}"
              + (f", dev loss {result['eval_loss']:.4f} (ppl {result['eval_ppl']:.2f})" if "eval_loss" in result else "")
              + f"; checkpoints in {Path(cfg.checkpoint.save_dir).absolute()}, "
              f"logs in {Path(cfg.training.output_dir).absolute()}")
    return 0


def _first_line(args) -> str | None:
    """What the command is about to do, from the config alone (a fraction of a second, no torch);
    None when the config has a mistake: :func:`run` reports it as the one line on screen."""
    from modelzoo.config import ConfigError
    from modelzoo.models.llama.checks import load_run_config  # torch-free: the rules that need the model too

    try:
        cfg = load_run_config(args.config, args.overrides, kind="training")
    except ConfigError:
        return None
    what = "compile plan" if cfg.command == "compile" else "training"
    model = cfg.checkpoint.load_path or cfg.model.name_or_path
    return f"modelzoo-train: {what} of {model} (config {args.config}); loading torch and transformers ..."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)  # --help and usage errors before anything heavy loads
    line = _first_line(args) if _says() else None
    if line:
        _say(line)
    from .errors import run_reporting_errors

    return run_reporting_errors(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())

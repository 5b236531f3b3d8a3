"""Validate a run config and print it fully resolved.

    python -m modelzoo.cli.config_check llama2_70b samba_compile.n_chips=4
    modelzoo-config-check --config llama2_70b samba_compile.n_chips=4      # the same
"""

from __future__ import annotations

import argparse
import sys

from modelzoo.config import ConfigError, dump_yaml, shipped_configs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelzoo-config-check",
        description="Load a YAML run config, apply key=value overrides, validate it against the typed "
                    "schema (keys, types, ranges, tensor-parallel degree vs. attention heads) and print "
                    "the resolved config as YAML. Exits 2 with a one-line 'error: file:line: ...' on a "
                    "bad config.",
        epilog="shipped configs: " + "; ".join(f"{kind}: {', '.join(shipped_configs(kind))}"
                                               for kind in ("training", "generation")),
    )
    parser.add_argument("--config", dest="config_flag", metavar="NAME",
                        help="a YAML file, or the name of a shipped config (e.g. llama2_70b)")
    parser.add_argument("config", nargs="?", help="the same as --config (give one of the two)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="hydra-style overrides, e.g. training.learning_rate=1e-4 model.fp32_ln=true")
    parser.add_argument("--kind", choices=("training", "generation"), default="training",
                        help="config schema, and the shipped folder bare names resolve from (default: training)")
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    if args.config_flag is not None:
        if args.config is not None and "=" in args.config:  # with --config, the first word is an override
            args.overrides.insert(0, args.config)
        elif args.config is not None and args.config != args.config_flag:
            parser.error(f"two configs given: --config {args.config_flag} and {args.config}; give one")
        args.config = args.config_flag
    elif args.config is None:
        parser.error("no config given: --config NAME (or NAME as the first argument), e.g. --config llama2_70b")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        from modelzoo.models.llama.checks import load_run_config

        cfg = load_run_config(args.config, args.overrides, kind=args.kind)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(dump_yaml(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

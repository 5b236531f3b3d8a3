"""Train or fine-tune a Llama model from a YAML config (same as the ``modelzoo-train`` command).

    python examples/training/run_training.py --config llama2_70b.yaml [key=value ...]
"""

from modelzoo.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())

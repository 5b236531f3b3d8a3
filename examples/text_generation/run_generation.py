#!/usr/bin/env python3
"""Generate text from an HF checkpoint (or a preset): the ``modelzoo-generate`` command.

    python examples/text_generation/run_generation.py --checkpoint DIR --prompt "Once upon a time"
    python examples/text_generation/run_generation.py --config llama_tiny generation.max_new_tokens=16

See ``--help`` and examples/text_generation/README.md.
"""

from modelzoo.cli.generate import main

if __name__ == "__main__":
    raise SystemExit(main())

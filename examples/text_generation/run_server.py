#!/usr/bin/env python3
"""Serve a checkpoint over an OpenAI-compatible HTTP API: the ``modelzoo-serve`` command.

    python examples/text_generation/run_server.py --checkpoint DIR --port 8000
    python examples/text_generation/run_server.py --checkpoint DIR --backend inductor --max-batch 16

See ``--help`` and examples/text_generation/README.md ("Serving over HTTP").
"""

from modelzoo.cli.serve import main

if __name__ == "__main__":
    raise SystemExit(main())

"""HTTP serving over the continuous-batching generation engine: OpenAI v1 completions / chat
completions / models, Megatron's ``PUT /api``, health and Prometheus metrics.

    from modelzoo.serving import Server, ServerSettings, create_app
    app = create_app(Server(engine, tokenizer, ServerSettings(model_name="llama")))

The command line is ``modelzoo-serve`` (:mod:`modelzoo.cli.serve`).
"""

from .app import Server, ServerSettings, create_app
from .protocol import APIError

__all__ = ["APIError", "Server", "ServerSettings", "create_app"]

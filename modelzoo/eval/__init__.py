"""Evaluation: perplexity on a prepared dataset, WikiText-style perplexity, LAMBADA-style cloze
accuracy (:mod:`modelzoo.eval.tasks`), and lm-evaluation-harness tasks through the ``modelzoo``
model backend (:mod:`modelzoo.eval.harness`), which importing this package registers with the
harness when ``lm-eval`` is installed (``pip install 'modelzoo[eval]'``).

The command line is ``modelzoo-eval`` (:mod:`modelzoo.cli.eval`).
"""

import importlib.util

from .scoring import Score, Scorer, ScoreRequest
from .tasks import EvalInputError, rolling_windows

#: Whether lm-evaluation-harness is installed (then the ``modelzoo`` backend is registered).
HARNESS_AVAILABLE = importlib.util.find_spec("lm_eval") is not None
if HARNESS_AVAILABLE:
    from .harness import ModelzooLM  # registers "modelzoo" with lm_eval's model registry
else:
    ModelzooLM = None

__all__ = ["HARNESS_AVAILABLE", "EvalInputError", "ModelzooLM", "Score", "ScoreRequest", "Scorer", "rolling_windows"]

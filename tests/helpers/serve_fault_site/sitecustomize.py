"""Fault injection for the serving tests: in a server started with this dir on PYTHONPATH and
``SERVE_FAULT_SEED`` set, choosing a token for a request sampled with that seed raises (as a bug in
one request's handling would), so the test can check that the request fails alone."""

import os

if os.environ.get("SERVE_FAULT_SEED"):
    from modelzoo.generation import scheduler

    _choose_next = scheduler.choose_next
    _seed = int(os.environ["SERVE_FAULT_SEED"])

    def choose_next(logits, params, seen=None, generators=None):
        if params.seed == _seed and not params.greedy:
            raise RuntimeError("injected fault")
        return _choose_next(logits, params, seen, generators)

    scheduler.choose_next = choose_next

"""The ``--help`` layout of the console scripts: defaults shown, examples kept as written."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` to every option's help, except on-off switches (a ``--no-x`` flag's
    default ``True`` says nothing a reader wants), required options and options without a default,
    and options whose help already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if switch or action.required or action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)

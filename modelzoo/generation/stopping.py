"""Per-sequence end of generation: EOS tokens, stop strings, and the text that is safe to stream.

Each sequence of a batch has its own :class:`SequenceState`: it ends on its own (an EOS token, a
stop string in its text, or the token budget) while the others go on. Text is re-decoded from all
generated ids (byte-level BPE and sentencepiece merge across tokens), and streamed text is held back
while it could still turn into a stop string or ends in an incomplete UTF-8 character.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

FINISH_EOS = "eos"
FINISH_STOP = "stop"
FINISH_LENGTH = "length"


def _held_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


@dataclass
class SequenceState:
    """The generated part of one sequence.

    ``token_ids`` excludes the EOS that ended it; ``text`` is cut before a matched stop string.
    """

    index: int
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    streamed: int = 0  # characters of ``text`` already handed to the stream

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class StopChecker:
    """Applies EOS ids, stop strings and the token budget to every sequence after each step."""

    def __init__(self, decode: Callable[[list[int]], str], eos_token_ids: Sequence[int] = (),
                 stop_strings: Sequence[str] = (), max_new_tokens: int = 64) -> None:
        self.decode = decode
        self.eos = set(int(t) for t in eos_token_ids)
        self.stops = [s for s in stop_strings if s]
        self.max_new_tokens = max_new_tokens

    def update(self, state: SequenceState, token: int, need_text: bool) -> str:
        """Add ``token`` to ``state``; return the newly streamable text (``""`` when none)."""
        if state.done:
            return ""
        if token in self.eos:
            state.finish_reason = FINISH_EOS
            return self._flush(state) if need_text else ""
        state.token_ids.append(token)
        if self.stops or need_text:
            state.text = self.decode(state.token_ids)
            for stop in self.stops:
                cut = state.text.find(stop)
                if cut >= 0:
                    state.text = state.text[:cut]
                    state.finish_reason = FINISH_STOP
        if state.finish_reason is None and len(state.token_ids) >= self.max_new_tokens:
            state.finish_reason = FINISH_LENGTH
        if not need_text:
            return ""
        if state.done:
            return self._flush(state)
        safe = len(state.text) - _held_suffix(state.text, self.stops)
        while safe > state.streamed and state.text[safe - 1] == "\ufffd":  # incomplete UTF-8 so far
            safe -= 1
        piece = state.text[state.streamed:safe]
        state.streamed = max(state.streamed, safe)
        return piece

    def finish(self, state: SequenceState) -> None:
        """Final text of a sequence (its text is only decoded lazily when nothing needed it)."""
        if not state.text and state.token_ids:
            state.text = self.decode(state.token_ids)

    @staticmethod
    def _flush(state: SequenceState) -> str:
        piece = state.text[state.streamed:]
        state.streamed = len(state.text)
        return piece

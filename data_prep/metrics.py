"""Counts of a run, per split: what went in, what was written, what was dropped; the final table."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class SplitMetrics:
    """Names as generative_data_prep's metrics (written to metadata.yaml as ``{split}_{name}``).

    input_tokens: tokens made by tokenizing (incl. start tokens and EOS); total_tokens: tokens in
    the HDF5 rows (sequences * max_seq_length); completion_tokens include separators.
    """

    articles: int = 0
    input_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    padding_tokens: int = 0
    sequences: int = 0
    tokens_dropped_from_packing: int = 0
    tokens_dropped_from_all_prompt: int = 0
    pairs_dropped_no_completion: int = 0

    @property
    def sequence_utilization(self) -> float:
        """Share of HDF5 tokens that are not padding."""
        return (self.prompt_tokens + self.completion_tokens) / self.total_tokens if self.total_tokens else 0.0

    @property
    def completion_utilization(self) -> float:
        return self.completion_tokens / self.total_tokens if self.total_tokens else 0.0

    def as_metadata(self, split: str) -> dict:
        return {f"{split}_{k}": v for k, v in asdict(self).items()}


_ROWS = (
    ("articles", "Articles"),
    ("sequences", "Sequences"),
    ("input_tokens", "Tokens in (tokenized)"),
    ("total_tokens", "Tokens out (in HDF5)"),
    ("prompt_tokens", "Prompt tokens"),
    ("completion_tokens", "Completion tokens (incl. EOS)"),
    ("padding_tokens", "Padding tokens"),
    ("tokens_dropped_from_packing", "Tokens dropped by packing"),
    ("tokens_dropped_from_all_prompt", "Tokens dropped, prompt-only rows"),
    ("pairs_dropped_no_completion", "Pairs dropped, no completion"),
)


def metrics_table(splits: dict[str, SplitMetrics], footer: list[tuple[str, str]]) -> str:
    """A plain-text table: one column per split, then ``footer`` (label, value) lines."""
    names = list(splits)
    cells = [[label] + [f"{getattr(splits[n], key):,}" for n in names] for key, label in _ROWS]
    cells.append(["Sequence utilization"] + [f"{100 * splits[n].sequence_utilization:.2f}%" for n in names])
    cells.append(
        ["Completion utilization"] + [f"{100 * splits[n].completion_utilization:.2f}%" for n in names]
    )
    header = ["metric"] + names
    widths = [max(len(row[i]) for row in cells + [header]) for i in range(len(header))]

    def line(row):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    rule = "-" * len(line(header))
    out = [rule, line(header), rule] + [line(r) for r in cells] + [rule]
    width = max(len(label) for label, _ in footer) if footer else 0
    out += [f"{label.ljust(width)}  {value}" for label, value in footer]
    return "\n".join(out)

"""Train/dev/test assignment of lines, the number of files per split, and balanced file ranges.

Lines are assigned in (shuffled) order, before tokenizing:
- by ratio (``--dev-ratio``/``--test-ratio``): line k goes to test when frac(k * phi) < test_ratio,
  to dev when it is below test_ratio + dev_ratio, else to train (phi = golden ratio: a
  low-discrepancy sequence, so the shares are exact to a few lines and evenly interleaved);
- by count (``--num-training-splits N --num-dev-splits M --num-test-splits T``), as
  generative_data_prep: line k goes to slot k mod (N+T+M); slots 0..N-1 train, then test, then dev.

Number of training files (``--num-training-splits`` unset): a power of two, so that every
power-of-two data-parallel degree up to it divides it: 32 (128 from 10 GiB of input, 256 from
100 GiB, as generative_data_prep), halved while a file would hold fewer than
MIN_SEQUENCES_PER_FILE sequences (so small data gets fewer files, down to 1). Dev files follow the
same rule. Test files: ``--num-test-splits``, else 1 when there is a test split.
Sequences are dealt to files in contiguous ranges whose sizes differ by at most one.
"""

from __future__ import annotations

import numpy as np

from modelzoo.data_prep.errors import DataPrepError
from modelzoo.data_prep.options import SplitOptions

TRAIN, DEV, TEST = 0, 1, 2
SPLIT_NAMES = {TRAIN: "train", DEV: "dev", TEST: "test"}
MIN_SEQUENCES_PER_FILE = 32
_PHI = 0.6180339887498949


class SplitAssigner:
    """Maps consecutive lines to split codes; call ``assign`` with each block's length in order."""

    def __init__(self, opts: SplitOptions):
        self.by_count = opts.num_dev_splits is not None
        if self.by_count:
            self.counts = (opts.num_training_splits, opts.num_test_splits, opts.num_dev_splits)
            self.num_test_files = opts.num_test_splits
        else:
            self.test_ratio = opts.test_ratio or 0.0
            self.dev_ratio = opts.dev_ratio or 0.0
            self.num_test_files = 1 if self.test_ratio > 0 else 0
        self.wants_dev = (opts.num_dev_splits or 0) > 0 if self.by_count else self.dev_ratio > 0
        self.lines_seen = 0
        self.test_seen = 0

    def assign(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Split codes int8 ``[n]`` (TRAIN/DEV/TEST) and test file index int32 ``[n]`` (-1: not test)."""
        k = np.arange(self.lines_seen, self.lines_seen + n, dtype=np.int64)
        self.lines_seen += n
        if self.by_count:
            n_train, n_test, _ = self.counts
            slot = k % sum(self.counts)
            codes = np.where(slot < n_train, TRAIN, np.where(slot < n_train + n_test, TEST, DEV)).astype(
                np.int8
            )
            test_file = np.where(codes == TEST, slot - n_train, -1).astype(np.int32)
            return codes, test_file
        u = np.mod(k.astype(np.float64) * _PHI, 1.0)
        codes = np.where(
            u < self.test_ratio, TEST, np.where(u < self.test_ratio + self.dev_ratio, DEV, TRAIN)
        )
        codes = codes.astype(np.int8)
        is_test = codes == TEST
        order = self.test_seen + np.cumsum(is_test) - 1
        self.test_seen += int(is_test.sum())
        test_file = np.where(is_test, order % max(1, self.num_test_files), -1).astype(np.int32)
        return codes, test_file


def default_file_cap(input_bytes: int) -> int:
    gib = input_bytes / (1 << 30)
    return 32 if gib < 10 else 128 if gib < 100 else 256


def choose_num_files(num_sequences: int, requested: int | None, cap: int, flag: str) -> int:
    """Files for a split of ``num_sequences`` (see the module docstring for the rule)."""
    if requested is not None:
        if requested > num_sequences:
            raise DataPrepError(
                f"{flag} {requested} asks for more files than there are sequences ({num_sequences}); "
                f"lower {flag} or add data"
            )
        return requested
    n = cap
    while n > 1 and num_sequences // n < MIN_SEQUENCES_PER_FILE:
        n //= 2
    return n


def balanced_ranges(total: int, n: int) -> list[tuple[int, int]]:
    """``n`` contiguous ``[start, stop)`` ranges covering ``total`` rows, sizes differing by <= 1."""
    base, extra = divmod(total, n)
    ranges, start = [], 0
    for i in range(n):
        stop = start + base + (1 if i < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges

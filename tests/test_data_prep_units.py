"""Unit tests of the data-prep stages: packing (vs the plain reference, chunked vs whole), split
assignment and file counts, the shuffles, the line reader."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.data_prep_fixtures import reference_pack

from modelzoo.data_prep.errors import DataPrepError
from modelzoo.data_prep.input_files import READ_BLOCK_BYTES, LineLimit, read_line_blocks, resolve_inputs
from modelzoo.data_prep.options import PackingConfig, SplitOptions, packing_choices
from modelzoo.data_prep.packing import Packer
from modelzoo.data_prep.shuffle import ExternalShuffle, shuffled_lines
from modelzoo.data_prep.splits import DEV, TEST, TRAIN, SplitAssigner, balanced_ranges, choose_num_files


def random_units(rng, n=300, max_len=40):
    """Units of random length; token ids count up so every token is unique; types: prompt then
    completion, last token a separator; a few units are prompt-only."""
    units, next_id = [], 10
    for u in range(n):
        length = int(rng.integers(1, max_len))
        ids = list(range(next_id, next_id + length))
        next_id += length
        n_prompt = int(rng.integers(0, length))
        types = [0] * n_prompt + [1] * (length - n_prompt)
        if u % 7 == 0:
            types = [0] * length
        else:
            types[-1] = 3
        units.append((ids, types))
    return units


def pack_all(config: str, units, L, chunks: list[int]):
    packer = Packer(PackingConfig.parse(config), L, pad_id=0, padding_type=2, completion_type=1)
    rows_ids, rows_types = [], []
    start = 0
    for size in chunks + [len(units)]:
        part = units[start : start + size]
        start += len(part)
        if not part:
            continue
        ids = np.array([t for u in part for t in u[0]], dtype=np.int32)
        types = np.array([t for u in part for t in u[1]], dtype=np.uint8)
        lengths = np.array([len(u[0]) for u in part], dtype=np.int64)
        rows = packer.add(ids, types, lengths)
        rows_ids += rows.ids.tolist()
        rows_types += rows.types.tolist()
    rows = packer.finish()
    return rows_ids + rows.ids.tolist(), rows_types + rows.types.tolist(), packer.stats


@pytest.mark.parametrize("config", packing_choices())
def test_packer_matches_reference_whole_and_chunked(config):
    rng = np.random.default_rng(0)
    units = random_units(rng)
    L = 24
    style, _, overflow = config.partition("::")
    want = reference_pack(units, style, overflow or None, L, pad=0)
    whole_ids, whole_types, stats = pack_all(config, units, L, [])
    assert whole_ids == [w[0] for w in want] and whole_types == [w[1] for w in want]
    chunk_sizes = [int(x) for x in rng.integers(0, 30, size=40)]
    chunked_ids, chunked_types, _ = pack_all(config, units, L, chunk_sizes)
    assert chunked_ids == whole_ids and chunked_types == whole_types
    assert stats.input_tokens == sum(len(u[0]) for u in units)
    kept = sum(1 for row in whole_types for t in row if t != 2)
    assert (
        kept + stats.tokens_dropped_from_packing + stats.tokens_dropped_from_all_prompt == stats.input_tokens
    )


def test_split_assigner_ratio_is_exact_and_interleaved():
    assigner = SplitAssigner(SplitOptions(dev_ratio=0.1, test_ratio=0.05))
    codes = np.concatenate([assigner.assign(n)[0] for n in (7, 1000, 993)])
    assert abs((codes == DEV).sum() - 200) <= 2 and abs((codes == TEST).sum() - 100) <= 2
    assert (codes[:100] == DEV).sum() >= 8  # spread out, not all at the end
    again = SplitAssigner(SplitOptions(dev_ratio=0.1, test_ratio=0.05)).assign(2000)[0]
    assert (again == codes).all()  # independent of block boundaries


def test_split_assigner_by_count_is_round_robin_like_gdp():
    assigner = SplitAssigner(SplitOptions(num_training_splits=4, num_dev_splits=1, num_test_splits=2))
    codes, test_file = assigner.assign(14)
    assert codes.tolist() == [TRAIN] * 4 + [TEST] * 2 + [DEV] + [TRAIN] * 4 + [TEST] * 2 + [DEV]
    assert test_file[codes == TEST].tolist() == [0, 1, 0, 1]


def test_file_count_rule_and_balance():
    assert choose_num_files(10_000, None, 32, "--x") == 32
    assert choose_num_files(200, None, 32, "--x") == 4  # 200 // 8 < 32
    assert choose_num_files(5, None, 32, "--x") == 1
    assert choose_num_files(7, 3, 32, "--x") == 3
    with pytest.raises(
        DataPrepError, match="--num-training-splits 9 asks for more files than there are sequences"
    ):
        choose_num_files(8, 9, 32, "--num-training-splits")
    ranges = balanced_ranges(103, 8)
    sizes = [b - a for a, b in ranges]
    assert sum(sizes) == 103 and max(sizes) - min(sizes) <= 1 and ranges[0][0] == 0 and ranges[-1][1] == 103


@pytest.mark.parametrize("ratios", [(0.6, 0.5), (1.0, 0.0), (-0.1, 0.0)])
def test_bad_ratios_are_refused(ratios):
    with pytest.raises(DataPrepError, match="ratio"):
        SplitOptions(dev_ratio=ratios[0], test_ratio=ratios[1]).validate()


def _lines_file(tmp_path, n=3000):
    path = tmp_path / "in.txt"
    path.write_bytes(b"".join(b"line %05d " % i + b"x" * (i % 50) + b"\n" for i in range(n)))
    return path


def test_reader_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"a\n\n  \nb\r\nc")
    blocks = list(read_line_blocks(resolve_inputs(str(path)), block_bytes=2))
    lines = [line for b in blocks for line in b.lines]
    numbers = [int(n) for b in blocks for n in b.line_no]
    assert lines == [b"a", b"b\r", b"c"] and numbers == [1, 4, 5]


@pytest.mark.parametrize("mode", ["False", "on_RAM", "large_file"])
def test_reader_drops_lines_over_the_limit_in_bounded_memory(tmp_path, mode):
    """A 40 MiB line is reported (file, line number) and skipped while at most the limit plus a few read
    blocks are held; the lines around it keep their numbers, in every read mode."""
    import tracemalloc

    path = tmp_path / "in.txt"
    with open(path, "wb") as f:
        f.write(b"a\n" + b"x" * (40 << 20) + b"\nb\n" + b"y" * (3 << 20))  # the last line has no newline
    reported = []
    limit = LineLimit(1 << 20, lambda file, line, size: reported.append((file, line, size > 1 << 20)))
    tracemalloc.start()
    try:
        if mode == "False":
            blocks = list(read_line_blocks(resolve_inputs(str(path)), block_bytes=1 << 20, limit=limit))
        else:
            blocks = list(shuffled_lines(resolve_inputs(str(path)), mode, 0, 64 << 20, tmp_path, limit))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    kept = sorted((int(n), line) for block in blocks for n, line in zip(block.line_no, block.lines, strict=True))
    assert kept == [(1, b"a"), (3, b"b")]
    assert reported == [(path, 2, True), (path, 4, True)]
    assert peak < (1 << 20) + 3 * READ_BLOCK_BYTES, f"peak {peak >> 20} MiB while reading"


@pytest.mark.parametrize("mode", ["on_RAM", "large_file"])
def test_shuffles_are_seeded_permutations(tmp_path, mode):
    path = _lines_file(tmp_path)
    files = resolve_inputs(str(path))
    original = path.read_bytes().split(b"\n")[:-1]

    def order(seed):
        work = tmp_path / f"w{seed}{mode}"
        work.mkdir(exist_ok=True)
        source = shuffled_lines(files, mode, seed, 20_000, work)
        return [line for block in source for line in block.lines]

    a, b, c = order(1), order(1), order(2)
    assert sorted(a) == sorted(original) and a != original
    assert a == b and a != c


def test_large_file_shuffle_is_bounded_by_the_budget(tmp_path):
    """An input 8x the RAM budget is shuffled through buckets; no bucket (the most held in RAM at
    once) exceeds the budget, and line numbers follow their lines."""
    path = _lines_file(tmp_path, n=6000)
    size = path.stat().st_size
    budget = size // 8
    shuffle = ExternalShuffle(resolve_inputs(str(path)), 0, budget, tmp_path)
    seen = {}
    for block in shuffle:
        for line, no in zip(block.lines, block.line_no.tolist(), strict=True):
            seen[no] = line
    assert shuffle.buckets >= 8
    assert 0 < shuffle.max_bucket_bytes <= budget
    assert seen == {i + 1: line for i, line in enumerate(path.read_bytes().split(b"\n")[:-1])}
    assert not (tmp_path / "shuffle_buckets").exists()

"""The model card's tables must say what the code does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from modelzoo.compile.plan import CARD_FILES, card_block, lora_memory_table_markdown
from modelzoo.models.llama import get_preset
from modelzoo.models.llama.parallelize import valid_n_chips

ROOT = Path(__file__).resolve().parents[1]
CARD = ROOT / "models" / "llama" / "README.md"


def _parallel_rows():
    """Rows of the parallelism table: preset names -> (sharded, replicated) n_chips lists."""
    rows = {}
    pattern = re.compile(r"^\| (`[^|]+`) \| (\d+) / (\d+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$")
    for line in CARD.read_text().splitlines():
        match = pattern.match(line)
        if match:
            names = re.findall(r"`([a-z0-9_]+)`", match.group(1))
            as_list = lambda cell: [int(x) for x in re.findall(r"\b\d+\b", cell.split("(")[0])]  # noqa: E731
            for name in names:
                rows[name] = (as_list(match.group(4)), as_list(match.group(5)))
    return rows


ROWS = _parallel_rows()


def test_card_has_a_parallelism_row_per_big_preset():
    assert {"llama2_7b", "llama2_13b", "llama2_70b", "llama3_8b", "llama3_1_8b"} <= set(ROWS)


@pytest.mark.parametrize("preset", sorted(ROWS))
def test_parallelism_table_matches_tp_rule(preset):
    config = get_preset(preset)
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    valid = valid_n_chips(heads, kv, limit=heads, intermediate_size=config.intermediate_size)
    sharded, replicated = ROWS[preset]
    assert sharded == [n for n in valid if kv % n == 0]
    assert replicated == [n for n in valid if kv % n != 0]


@pytest.fixture(scope="module")
def lora_table():
    return lora_memory_table_markdown()


@pytest.mark.parametrize("doc", CARD_FILES)
def test_lora_memory_table_is_the_plans(doc, lora_table):
    block = card_block((ROOT / doc).read_text(), "lora-memory-table")
    assert block is not None, f"{doc} has no generated LoRA memory table"
    assert block == lora_table, (
        f"the LoRA memory table in {doc} is stale: regenerate it with python -m modelzoo.compile.plan --card")


def test_lora_memory_table_shows_the_shipped_lora_configs_fitting_where_full_does_not(lora_table):
    rows = {line.split("|")[1].strip(" `"): line for line in lora_table.splitlines()[2:]}
    for name in ("llama2_70b_lora", "llama3_1_8b_lora"):
        full, lora = rows[name].split("|")[7], rows[name].split("|")[11]
        assert "does not fit" in full and "(fits)" in lora, rows[name]

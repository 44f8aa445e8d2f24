"""The demo's printed table: 100 columns wide, every column explained, no training line for the zero-shot row."""

from __future__ import annotations

from rich.console import Console

from sbmoe.commands.demo import COLUMNS, DENSE, EVAL, HEADS, SBMOE, TABLE_WIDTH, ZERO_SHOT, results_table


def record(ndcg: float) -> dict:
    return {"eval": {spec: {"metrics": {"nDCG@10": ndcg, "MRR@10": ndcg - 0.05}} for spec in EVAL}}


def test_results_table_fits_100_columns_and_every_column_is_explained() -> None:
    records = {ZERO_SHOT: record(0.6451), DENSE: record(0.7022), SBMOE: record(0.7212)}
    console = Console(width=TABLE_WIDTH, record=True)
    console.print(results_table(records, {DENSE: 0.912, SBMOE: 0.987}))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "0.7212 (+7.6)" in text and "0.987" in text
    header = [line for line in text.splitlines() if "model" in line][0]
    for column in ("model", "test nDCG@10", "test MRR@10", "unseen nDCG@10", "unseen MRR@10", "query cos"):
        assert column in header, column  # on one line: no header wraps
    for words in ("model:", "test:", "unseen:", "nDCG@10 and MRR@10", "in points", "query cos:"):
        assert words in COLUMNS, words
    assert list(HEADS) == [ZERO_SHOT, DENSE, SBMOE]

"""bench/speculate.py: the real-pair command on tiny models (its JSON and table), reading tokens per pass back from
its JSON (and from the older one-tree records), and the GPU projection's arithmetic over exactly measured times."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import compute.int4_linear
from bench.speculate import format_passes, main, pair_tokens_per_pass, project, to_measure

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def test_pair_reports_tokens_per_pass_for_each_mode(tiny_q, tmp_path, monkeypatch):
    # --dequantize-once swaps compute.int4_linear's matmul for this process: let pytest put it back afterwards
    monkeypatch.setattr(compute.int4_linear, "int4_matmul", compute.int4_linear.int4_matmul)
    out = tmp_path / "pair.json"
    args = ["pair", "--target", str(tiny_q), "--draft", str(tiny_q), "-n", "8", "--draft-shape", "tree",
            "--draft-shape", "chain", "--draft-tokens", "3,6", "--prompts", "1", "--ngram", "--dequantize-once",
            "--json", str(out)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    modes = {m["mode"]: m for m in record["runs"][0]["modes"]}
    assert set(modes) == {"plain", "tree-3", "tree-6", "chain-3", "chain-6", "ngram"}
    assert modes["plain"]["tokens_per_pass"] == 1.0 and modes["plain"]["speculation"] is None
    for label in ("tree-6", "chain-6"):
        drafted = modes[label]
        assert drafted["decode_tokens"] == 7 and drafted["target_passes"] == drafted["speculation"]["target_passes"]
        assert drafted["tokens_per_pass"] == drafted["decode_tokens"] / drafted["target_passes"]
        assert isinstance(drafted["same_text_as_plain"], bool) and drafted["draft_tokens"] == 6
    assert modes["chain-3"]["speculation"]["drafter"] == "draft-chain" and modes["chain-3"]["shape"] == "chain"
    assert "| all | chain-6 |" in result.output
    tpp = pair_tokens_per_pass(record)
    assert set(tpp) == {("tree", 3), ("tree", 6), ("chain", 3), ("chain", 6)}
    assert tpp[("chain", 6)] == modes["chain-6"]["tokens_per_pass"]


def test_tokens_per_pass_of_a_record_made_before_chains_is_its_trees():
    record = json.loads((RESULTS / "2026-12-06-cpu-speculate-pair.json").read_text())
    assert pair_tokens_per_pass(record) == {("tree", 128): pytest.approx(188 / 30)}


def test_passes_measures_exactly_what_the_projection_needs():
    rows, trees, chains = to_measure((1, 2, 4), (16,), (4,), {("tree", 128): 6.3, ("chain", 16): 5.0})
    assert rows == (1, 2, 4, 17, 129) and trees == (16, 128) and chains == (4, 16)


def test_projection_divides_measured_tokens_per_pass_by_pass_and_draft_time():
    record = {"budget": "8GiB", "resident_units": 18, "streamed_units": 47, "decode_mode": "piecewise",
              "one_token_decode_tokens_per_s": 4.3, "pass_seconds": {1: 0.233, 17: 0.250, 129: 0.280},
              "draft_seconds": {128: 0.040}, "chain_seconds": {16: 0.020}}  # fmt: skip
    tpp = {("tree", 128): 6.4, ("chain", 16): 5.0}
    projected = project(record, tpp)
    assert projected == {"tree-128": 6.4 / (0.280 + 0.040), "chain-16": 5.0 / (0.250 + 0.020)}
    record["projected_tokens_per_s"] = projected
    table = format_passes([record], tpp)
    assert "PROJECTED chain-16" in table and "| 129 | 280.0 | 40.0 |  |" in table and "| 17 | 250.0 |  | 20.0 |" in table
    with pytest.raises(ValueError, match="33 rows"):  # a pass never measured is not guessed
        project(record, {("chain", 32): 7.0})

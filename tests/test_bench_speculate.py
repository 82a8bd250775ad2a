"""bench/speculate.py: the real-pair command on tiny models (its JSON and table), and the GPU projection's arithmetic."""

from __future__ import annotations

import json

from click.testing import CliRunner

import compute.int4_linear
from bench.speculate import format_passes, main, project


def test_pair_reports_tokens_per_pass_for_each_mode(tiny_q, tmp_path, monkeypatch):
    # --dequantize-once swaps compute.int4_linear's matmul for this process: let pytest put it back afterwards
    monkeypatch.setattr(compute.int4_linear, "int4_matmul", compute.int4_linear.int4_matmul)
    out = tmp_path / "pair.json"
    args = ["pair", "--target", str(tiny_q), "--draft", str(tiny_q), "-n", "8", "--draft-tokens", "6", "--prompts", "1",
            "--ngram", "--dequantize-once", "--json", str(out)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    modes = {m["mode"]: m for m in record["runs"][0]["modes"]}
    assert set(modes) == {"plain", "draft-model", "ngram"}
    assert modes["plain"]["tokens_per_pass"] == 1.0 and modes["plain"]["speculation"] is None
    drafted = modes["draft-model"]
    assert drafted["decode_tokens"] == 7 and drafted["target_passes"] == drafted["speculation"]["target_passes"]
    assert drafted["tokens_per_pass"] == drafted["decode_tokens"] / drafted["target_passes"]
    assert isinstance(drafted["same_text_as_plain"], bool)
    assert "| all | draft-model |" in result.output


def test_projection_divides_measured_tokens_per_pass_by_pass_and_draft_time():
    record = {"budget": "8GiB", "resident_units": 18, "streamed_units": 47, "decode_mode": "piecewise",
              "one_token_decode_tokens_per_s": 4.3, "pass_seconds": {1: 0.233, 129: 0.280},
              "draft_seconds": {128: 0.040}}  # fmt: skip
    projected = project(record, {128: 6.4})
    assert projected == {128: 6.4 / (0.280 + 0.040)}
    record["projected_tokens_per_s"] = projected
    table = format_passes([record], {128: 6.4})
    assert "PROJECTED" in table and "| 129 | 280.0 | 40.0 |" in table

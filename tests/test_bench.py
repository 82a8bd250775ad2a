"""The benchmark's CPU-side behaviour: a clear refusal without a GPU, and its table from measured records."""

import dataclasses

import pytest
import torch
from click.testing import CliRunner

from bench.pipeline import BudgetResult, Ceilings, bench, format_table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_refuses_without_a_gpu(tmp_path):
    result = CliRunner().invoke(bench, ["--checkpoint", str(tmp_path / "ckpt")])
    assert result.exit_code == 1
    assert "needs a CUDA device" in result.output
    assert not (tmp_path / "ckpt").exists()  # nothing synthesized before the refusal


def test_speculation_options_are_checked_before_anything_runs(tmp_path):
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--speculate", "ngram", "--draft-model", str(tmp_path)]
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 2 and "choose one" in result.output
    assert not (tmp_path / "ckpt").exists()


def test_the_speculative_decode_run_reports_prompt_lookups_statistics(tiny_q):
    from test_engine import make_engine

    from bench.pipeline import _speculative_decode
    from compute.sampling import SamplingParams

    engine = make_engine(tiny_q)
    engine.eos_token_ids = frozenset()
    prompt = [5, 9, 12, 40, 7] * 3  # repeats, so prompt lookup finds something to propose
    report = _speculative_decode(engine, None, prompt, SamplingParams(temperature=0.0, max_new_tokens=1), 16)
    assert report["drafter"] == "ngram" and report["emitted_tokens"] == 16 and report["decode_tokens_per_s"] > 0
    assert report["target_passes"] <= 16 and engine.drafter is None  # the engine is left as it was


def test_table_sets_each_figure_beside_its_ceiling():
    gib = 2**30
    result = BudgetResult(
        budget="12GiB", policy="hybrid", resident_units=30, streamed_units=35, ring_slots=2, loader_ready_s=9.5,
        engine_ready_s=14.25, prefill_tokens=2048, prefill_tokens_per_s=5123.4, decode_tokens=64, decode_context=129,
        decode_tokens_per_s=6.1, decode_mode="piecewise (2 graphs, 35 eager units)", resident_bytes_per_token=8 * 10**9,
        streamed_bytes_per_token=8.4e9, roofline_tokens_per_s=6.4, fraction_of_roofline=6.1 / 6.4,
        compute_wait_s_per_token=0.12, peak_device_bytes={"loader": 8 * gib, "compute": 3 * gib, "total": 11 * gib},
        compute_reserved_peak_bytes=gib,
    )  # fmt: skip
    table = format_table(Ceilings(h2d_gbps=53.1, d2d_gbps=4263.0), [result])
    assert "pinned host->device 53.1 GB/s, device->device 4263 GB/s" in table
    row = table.splitlines()[-1]
    for cell in ("12GiB", "30/35 (K=2)", "14.2", "5123", "6.1", "6.4", "95%", "8.40", "120.0", "8.00 + 3.00 = 11.00"):
        assert cell in row, (cell, row)
    spec = {"drafter": "ngram", "decode_tokens_per_s": 7.5, "tokens_per_pass": 1.25, "draft_time_share": 0.01}
    table = format_table(Ceilings(h2d_gbps=53.1, d2d_gbps=4263.0), [dataclasses.replace(result, speculative=spec)])
    assert table.splitlines()[-1].startswith("12GiB with ngram drafts") and "7.5 tok/s, 1.25 tok/pass" in table


def test_sass_counts_the_one_row_gemv_loop_without_a_gpu():
    """bench.sass compiles the one-row GEMV for sm_90 here and finds its loop: eight tensor-core mmas a tile and
    group, the weights and x in 16-byte loads, no layout conversion (no shared memory or shuffle), under 4.5
    instructions per weight byte, and a register count that lets an SM hold many warps."""
    from bench.sass import compile_gemv, describe_loop, disassemble
    from compute.kernels.gemv_configs import MmaConfig

    for cfg in (MmaConfig(tiles=1, groups=2), MmaConfig(tiles=2, warps=2, groups=1)):
        loop = describe_loop(cfg, 5120)
        opcodes = dict(loop["opcodes"])
        assert opcodes.get("HMMA.16816.F32.BF16") == 8 * cfg.tiles * cfg.groups, opcodes
        assert opcodes.get("LDG.E.128") == (2 * cfg.tiles + 4) * cfg.groups, opcodes  # 2 of words a tile, 4 of x
        assert not any(op.startswith(("STS", "LDS", "SHFL", "BAR")) for op in opcodes), opcodes
        assert loop["per_byte"] < 4.5 and loop["registers"] <= 128, loop
    # an fp16 row (the magic 1024 + u): fp16 mmas
    sass = disassemble(compile_gemv(MmaConfig(), 5120, dtype="fp16"))
    assert "HMMA.16816.F32 " in sass and "BF16" not in sass
    # 16 rows: two mmas a tile and k-step (two n-tiles), x in 8 loads of 16 bytes a lane, still no conversion
    for cfg in (MmaConfig(tiles=1, groups=2), MmaConfig(tiles=2, warps=2, groups=1)):
        loop = describe_loop(cfg, 5120, rows=16)
        opcodes = dict(loop["opcodes"])
        assert opcodes.get("HMMA.16816.F32.BF16") == 16 * cfg.tiles * cfg.groups, opcodes
        assert opcodes.get("LDG.E.128") == (2 * cfg.tiles + 8) * cfg.groups, opcodes
        assert not any(op.startswith(("STS", "LDS", "SHFL", "BAR")) for op in opcodes), opcodes
        assert loop["registers"] <= 168, loop


def test_sass_reports_the_attention_kernels_shared_memory_without_a_gpu():
    """bench.sass --attention compiles one decode row's attention kernels for sm_90 here: the paged split kernel's
    block loop, pipelined in two stages, holds about twice the shared memory of its one-stage form and of the static
    cache's split kernel (whose loop is not pipelined); the combines hold almost none."""
    from bench.sass import attention_footprints

    shared = {name.split(" (")[0]: nbytes for name, nbytes, _ in attention_footprints()}
    assert shared["paged split, 2 stages"] > 1.5 * max(shared["paged split, 1 stage"], shared["static split"]), shared
    assert max(shared["static combine"], shared["paged combine"]) <= 1024, shared


def test_decode_timeline_averages_the_trailing_repeated_steps():
    from bench.decode import decode_timeline, format_timeline

    kernels, t = [("prefill", 0.0, 50.0)], 60.0
    for step in range(3):  # a step: norm, gemv, gemv (starting 1 us early), lm_head
        for name, duration, gap in (("norm", 2.0, 3.0), ("gemv", 5.0, 2.0 + step), ("gemv", 4.0, -1.0), ("lm", 9.0, 2.0)):
            t += gap
            kernels.append((name, t, t + duration))
            t += duration
    steps, step_us, rows = decode_timeline(list(reversed(kernels)))  # any order
    assert steps == 3 and [r.name for r in rows] == ["norm", "gemv", "gemv", "lm"]
    assert [r.duration_us for r in rows] == [2.0, 5.0, 4.0, 9.0]
    assert [r.gap_us for r in rows] == [0.0, 3.0, -1.0, 2.0]
    assert step_us == 2.0 + 3.0 + 5.0 - 1.0 + 4.0 + 2.0 + 9.0
    assert "3 steps of 4 kernels" in format_timeline((steps, step_us, rows))
    assert decode_timeline([("a", 0.0, 1.0), ("b", 2.0, 3.0)]) == (0, 0.0, [])


def test_the_concurrency_benchmark_serves_every_level_through_a_real_loader(tiny_q):
    from bench.concurrency import format_concurrency_table, run_concurrency

    result = run_concurrency(
        tiny_q, "1GiB", levels=[1, 3, 5], policy="stream", max_batch=3, max_context=64, prompt_tokens=6,
        new_tokens=4, device="cpu",
    )  # fmt: skip
    assert (result.max_batch, result.kv_tokens, result.streamed_units) == (3, 64, 3)
    assert result.pass_tokens >= 64  # the plan's prefill chunk
    assert [lv.concurrency for lv in result.levels] == [1, 3, 5]
    one, three, five = result.levels
    # one request: a prefill pass and three decode passes; requests submitted together share passes (the engine
    # thread may start the first before the others arrive), five at a batch of three need more
    assert one.passes == 4 and three.passes < 3 * 4 and 4 < five.passes < 5 * 4
    assert one.passes_ahead == 2  # the third and fourth passes went ahead of the tokens before them (greedy)
    assert three.tokens_per_pass == (3 * 4 + 3 * 6 - 3) / three.passes
    for lv in result.levels:
        assert 0 < lv.ttft_p50_s <= lv.ttft_p99_s <= lv.wall_s and 0 < lv.itl_p50_s <= lv.itl_p99_s
        assert lv.decode_tokens_per_s > 0 and lv.total_tokens_per_s > 0
    rows = format_concurrency_table([result], {"1GiB": one.decode_tokens_per_s}).splitlines()[2:]
    assert len(rows) == 3 and "| 1.0 |" in rows[0]
    assert rows[0].startswith(f"| 1GiB | stream | 0/3 | 3 | 64 | {result.pass_tokens} | 1 |")
    assert "| 2/4 |" in rows[0]


def test_a_levels_rates_count_the_span_and_the_window_where_every_request_streams():
    from bench.concurrency import LevelResult

    # request A arrives first and streams alone for a while (its first token 0.4 s before B's), then both stream
    a = (0.0, [0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.1], 7)
    b = (0.05, [0.5, 0.7, 0.9, 1.1, 1.3], 5)
    level = LevelResult.measure([a, b], prompt_tokens=3, new_tokens=7, started=0.0, passes=9)
    assert level.decode_tokens_per_s == pytest.approx((12 - 2) / (1.3 - 0.1))
    # together from 0.5 (B's first token) to 1.1 (A's last): A's 0.7, 0.9, 1.1 and B's 0.7, 0.9, 1.1
    assert level.all_streaming_tokens_per_s == pytest.approx(6 / 0.6)
    queued = LevelResult.measure([a, (1.2, [1.5, 1.6], 2)], prompt_tokens=3, new_tokens=7, started=0.0, passes=9)
    assert queued.all_streaming_tokens_per_s != queued.all_streaming_tokens_per_s  # never all at once: nan


def test_concurrency_levels_are_checked_before_anything_runs(tmp_path):
    from bench.concurrency import parse_levels, percentile

    assert parse_levels("1, 4,16,64") == [1, 4, 16, 64]
    result = CliRunner().invoke(bench, ["--checkpoint", str(tmp_path / "ckpt"), "--concurrency", "1,x"])
    assert result.exit_code == 2 and "'x' is not a whole number of requests" in result.output
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5 and percentile([5.0], 99) == 5.0


def test_the_http_concurrency_benchmark_streams_every_level_from_a_live_server(tiny_q):
    from bench.http_concurrency import run_http_concurrency

    result = run_http_concurrency(
        tiny_q, "300MiB", levels=[1, 4], policy="resident", max_batch=4, max_context=64, prompt_tokens=6,
        new_tokens=5, device="cpu",
    )  # fmt: skip
    assert [lv.concurrency for lv in result.levels] == [1, 4] and result.kv_tokens == 64
    one, four = result.levels
    assert 0 < one.passes <= 5 and 0 < four.passes < 4 * 5  # requests that arrive together share passes
    assert 0 < one.passes_ahead < one.passes  # counted by the server (GET /health)
    for lv in result.levels:
        assert 0 < lv.ttft_p50_s <= lv.ttft_p99_s <= lv.wall_s and lv.itl_p50_s <= lv.itl_p99_s
        assert lv.decode_tokens_per_s > 0

"""The benchmark's reading of the engine's own timings (benchmarks/bench_streaming.py)."""

from __future__ import annotations

import sys

from tutorial.common import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import bench_streaming  # noqa: E402


def test_engine_breakdown_means_per_request_call_and_step():
    before = dict.fromkeys(
        ["steps", "rows", "prefills", "prefill_calls", "prefill_chunks", "cancelled"], 10
    )
    before.update(queue_us=500, first_token_us=900, prefill_us=700, step_us=800, emit_us=100)
    # 4 requests, prefilled in 2 calls; 40 steps of 3.5 rows; 2 s of wall time
    delta = dict(steps=40, rows=140, prefills=4, prefill_calls=2, prefill_chunks=0, cancelled=0)
    delta.update(
        queue_us=80_000,
        first_token_us=200_000,
        prefill_us=60_000,
        step_us=1_200_000,
        emit_us=36_000,
    )
    after = {k: before[k] + delta[k] for k in before}
    b = bench_streaming.engine_breakdown(before, after, wall_s=2.0)
    assert b["requests"] == 4
    assert b["first_token_ms"] == 50.0 and b["queue_ms"] == 20.0
    assert b["prefill_call_ms"] == 30.0 and b["rows_per_prefill_call"] == 2.0
    assert b["step_ms"] == 30.0 and b["rows_per_step"] == 3.5
    assert b["emit_ms_per_token"] == 36 / 144  # 140 decode tokens and 4 first tokens
    assert b["busy"] == (0.06 + 1.2 + 0.036) / 2.0
    row = {"clients": 4, "ttft_mean_ms": 61.0, "engine": b}
    assert bench_streaming.breakdown_table([row]).splitlines()[-1] == (
        "| 4 | 61.0 | 50.0 | 20.0 | 30.0 (2.0) | 0 | 30.0 (3.5) | 0.25 | 65% |"
    )


def test_prefills_in_a_decode_steps_call_are_not_prefill_calls():
    """Prompts prefilled in a decode step's call (shared_step) and chunks run in one are timed
    with the step: the prefill columns mean the calls of their own."""
    keys = ["steps", "rows", "prefills", "prefill_calls", "prefill_chunks", "cancelled"]
    keys += ["chunk_steps", "step_prefill_calls", "step_prefills"]
    before = dict.fromkeys(keys, 0)
    before.update(queue_us=0, first_token_us=0, prefill_us=0, step_us=0, emit_us=0)
    # 7 short prompts: 4 in 2 calls of their own, 3 in one decode step's call; a long prompt's
    # 5 chunks, 3 of them in decode steps' calls (its completion counts as a prefill too)
    delta = dict(steps=40, rows=140, prefills=8, prefill_calls=3, prefill_chunks=5, cancelled=0)
    delta.update(chunk_steps=3, step_prefill_calls=1, step_prefills=3)
    delta.update(queue_us=1, first_token_us=1, prefill_us=80_000, step_us=1_200_000, emit_us=1)
    after = {k: before[k] + delta[k] for k in before}
    b = bench_streaming.engine_breakdown(before, after, wall_s=2.0)
    assert b["prefill_call_ms"] == 20.0  # 2 calls of short prompts and 2 chunks of their own
    assert b["rows_per_prefill_call"] == (8 - 3) / 4 and b["prefills_in_steps"] == 3


def test_an_engine_that_does_not_time_itself_gives_no_breakdown():
    counts = {"steps": 3, "rows": 3, "prefills": 1, "prefill_calls": 1, "prefill_chunks": 0}
    assert bench_streaming.engine_breakdown({}, counts, wall_s=1.0) is None
    assert bench_streaming.breakdown_table([{"clients": 1, "engine": None}]) == ""

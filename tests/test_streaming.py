"""The streaming latency figures (tutorial/streaming.py) computed from known event times, and
token times taken as the events arrive from a real server."""

from __future__ import annotations

import pytest


def run(sent: float, *times: float) -> dict:
    return {"sent": sent, "times": list(times), "tokens": list(range(len(times)))}


def test_ttft_itl_tpot_and_throughput_from_event_times():
    from tutorial.streaming import latency_metrics

    m = latency_metrics([run(0.0, 0.10, 0.12, 0.14, 0.20), run(0.05, 0.25, 0.35)])
    assert m["requests"] == 2 and m["tokens"] == 6
    assert m["ttft_ms"]["p50"] == pytest.approx(150.0)  # 100 and 200 ms
    # gaps: 20, 20, 60 (first request) and 100 ms (second)
    assert m["itl_ms"]["p50"] == pytest.approx(40.0)
    assert m["itl_ms"]["p99"] == pytest.approx(98.8)  # numpy's linear interpolation
    assert m["itl_ms"]["max"] == pytest.approx(100.0)  # the longest gap: a stall shows here
    # TPOT per request: (200 - 100) / 3 and (350 - 250) / 1
    assert m["tpot_ms"]["p50"] == pytest.approx((100 / 3 + 100) / 2)
    assert m["tokens_per_s"] == pytest.approx(6 / 0.35)


def test_a_request_without_tokens_is_left_out_and_none_at_all_is_an_error():
    from tutorial.streaming import latency_metrics

    m = latency_metrics([run(0.0, 0.1), run(0.0)])
    assert m["requests"] == 1 and m["itl_ms"]["p50"] is None and m["tpot_ms"]["p50"] is None
    with pytest.raises(ValueError, match="no request produced a token"):
        latency_metrics([run(0.0)])


def test_run_clients_runs_every_call_and_reports_a_failure():
    from tutorial.streaming import run_clients

    calls = run_clients(lambda c, i: {"client": c, "i": i}, clients=3, requests_per_client=2)
    assert sorted((r["client"], r["i"]) for r in calls) == [
        (c, i) for c in range(3) for i in range(2)
    ]

    def fails(c, i):
        if c == 1:
            raise OSError("connection refused")
        return {}

    with pytest.raises(RuntimeError, match=r"1 of the calls failed; the first: OSError"):
        run_clients(fails, clients=3, requests_per_client=1)


def test_each_event_is_yielded_before_the_next_chunk_is_read():
    """Triton sends each server-sent event as one HTTP chunk; a token's time is taken when its
    event is yielded, so the reader must not wait for more bytes first (``iter_lines`` waited
    for 512 bytes: several events, so token times came in bursts)."""
    from tutorial.client import _event_lines

    read: list[int] = []

    class Raw:
        def read_chunked(self, decode_content=True):
            chunks = [b'data: {"a": 1}\n\n', b'data: {"a"', b": 2}\n\n", b'data: {"a": 3}']
            for i, chunk in enumerate(chunks):
                read.append(i)
                yield chunk

    class Response:
        headers = {"Transfer-Encoding": "chunked"}
        raw = Raw()

    lines = _event_lines(Response())
    assert next(lines) == 'data: {"a": 1}' and read == [0]  # before chunk 1 was asked for
    assert next(lines) == 'data: {"a": 2}' and read == [0, 1, 2]  # an event split in two
    assert list(lines) == ['data: {"a": 3}']  # the last one, without its blank line

"""Streaming latency as LLM servers are compared: time to first token (TTFT), inter-token
latency (ITL) and tokens per second, through ``generate_stream``.

Definitions, per request, from the time the request is sent:

- **TTFT**: until the first token's event arrives;
- **ITL**, two ways, both reported: every gap between consecutive token events (vLLM's
  ``benchmark_serving.py`` reports the distribution of these gaps as ITL), and per request
  ``(latency - TTFT) / (tokens - 1)``, which NVIDIA's GenAI-Perf and AIPerf call inter-token
  latency and vLLM calls TPOT;
- **tokens/s**: all tokens of all requests over the wall time from the first send to the last
  event.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def timed_stream(url: str, text: str, max_new_tokens: int, timeout: float = 600.0) -> dict:
    """One ``generate_stream`` request: when it was sent and when each token event came
    (``time.perf_counter`` seconds), and the token ids."""
    from tutorial.client import stream_generate

    sent, times, tokens = time.perf_counter(), [], []
    for _, ids in stream_generate(url, text, max_new_tokens, timeout=timeout):
        if ids:
            times.append(time.perf_counter())
            tokens += ids
    return {"sent": sent, "times": times, "tokens": tokens}


def latency_metrics(runs: list[dict]) -> dict[str, Any]:
    """TTFT, ITL (gaps), TPOT (per request) in ms as p50/p95/p99, and tokens/s, from
    :func:`timed_stream` results."""
    runs = [r for r in runs if r["times"]]
    if not runs:
        raise ValueError("no request produced a token")
    ttft = [1000 * (r["times"][0] - r["sent"]) for r in runs]
    gaps = [1000 * g for r in runs for g in np.diff(r["times"])]
    tpot = [
        1000 * (r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1)
        for r in runs
        if len(r["times"]) > 1
    ]
    wall = max(r["times"][-1] for r in runs) - min(r["sent"] for r in runs)

    def pct(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {"p50": None, "p95": None, "p99": None, "max": None}
        out = {f"p{q}": float(np.percentile(values, q)) for q in (50, 95, 99)}
        return {**out, "max": float(max(values))}

    return {
        "requests": len(runs),
        "tokens": sum(len(r["times"]) for r in runs),
        "ttft_ms": pct(ttft),
        "itl_ms": pct(gaps),
        "tpot_ms": pct(tpot),
        "tokens_per_s": sum(len(r["times"]) for r in runs) / wall if wall > 0 else None,
    }


def run_clients(
    call: Callable[[int, int], dict], clients: int, requests_per_client: int
) -> list[dict]:
    """``clients`` threads, each making ``requests_per_client`` calls one after another
    (``call(client, i)``); the results of every call. A failed call fails the run."""
    results: list[dict] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for i in range(requests_per_client):
            try:
                out = call(c, i)
            except BaseException as exc:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(exc)
                return
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of the calls failed; the first: {errors[0]!r}")
    return results


def stream_rows(
    runs: list[dict],
    *,
    target: str,
    model_variant: str,
    device_name: str | None,
    shape: str,
    prompt_tokens: int,
    concurrency: int,
    sweep: str = "concurrency",
) -> list[dict[str, Any]]:
    """Rows for :func:`tutorial.results.write_results` from :func:`timed_stream` results, in
    the order they were sent: per request one ``generate_stream`` row (sent to the last token
    event, with its token count) and one ``ttft`` row, and one ``itl`` row per gap between
    token events. A request without a token gives no row."""
    clock = time.time() - time.perf_counter()  # perf_counter seconds -> epoch seconds
    rows: list[dict[str, Any]] = []
    for i, run in enumerate(sorted((r for r in runs if r["times"]), key=lambda r: r["sent"])):
        common = {
            "target": target,
            "model_variant": model_variant,
            "device_name": device_name,
            "shape": shape,
            "sweep": sweep,
            "prompt_tokens": prompt_tokens,
            "concurrency": concurrency,
            "iteration": i,
        }
        sent, times = run["sent"], run["times"]
        rows.append(
            dict(common, method="generate_stream", new_tokens=len(run["tokens"]),
                 started_at=clock + sent, latency_ms=1000 * (times[-1] - sent),
                 notes="generate_stream over HTTP: from sending to the last token event")
        )  # fmt: skip
        rows.append(
            dict(common, method="ttft", new_tokens=1, latency_ms=1000 * (times[0] - sent),
                 notes="time to first token: from sending to the first token event")
        )  # fmt: skip
        rows += [
            dict(common, method="itl", new_tokens=1, latency_ms=1000 * float(gap),
                 notes="inter-token latency: the gap between two token events")
            for gap in np.diff(times)
        ]  # fmt: skip
    return rows

"""Measuring latency: Triton's statistics, decode derivation, the real local Triton, the
in-process model, signed OCI-style requests through the loopback stand-in, and notebook 07."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest

from tutorial.common import TutorialError
from tutorial.measure import (
    CallResult,
    MeasurementPlan,
    PromptMaker,
    Series,
    cuda_status,
    decode_rows,
    inprocess_target,
    measure_concurrency,
    measure_series,
    measure_streaming,
    measure_target,
    oci_target,
    parse_model_stats,
    server_split_ms,
    stats_delta,
    triton_target,
)
from tutorial.results import RESULT_COLUMNS, read_results, streaming_summary, write_results

ROOT = Path(__file__).resolve().parent.parent
ENSEMBLE_PARTS = {"encoder", "gpt2", "decoder"}


def stats_payload(counts: dict[str, tuple[int, int, int]]) -> dict:
    """A /v2/models/stats answer: per model (requests, queue ns, compute_infer ns)."""
    return {
        "model_stats": [
            {
                "name": name,
                "version": "1",
                "inference_count": n,
                "execution_count": n,
                "inference_stats": {
                    "success": {"count": n, "ns": queue + infer + 3000 * n},
                    "fail": {"count": 0, "ns": 0},
                    "queue": {"count": n, "ns": queue},
                    "compute_input": {"count": n, "ns": 1000 * n},
                    "compute_infer": {"count": n, "ns": infer},
                    "compute_output": {"count": n, "ns": 2000 * n},
                },
            }
            for name, (n, queue, infer) in counts.items()
        ]
    }


def test_statistics_delta_and_server_split():
    before = parse_model_stats(
        stats_payload({"ensemble_model": (1, 10, 900), "encoder": (1, 5, 100), "gpt2": (1, 5, 700)})
    )
    after = parse_model_stats(
        stats_payload(
            {
                "ensemble_model": (3, 30, 9_000_900),
                "encoder": (3, 2_000_005, 1_000_100),
                "gpt2": (3, 4_000_005, 6_000_700),
            }
        )
    )
    delta = stats_delta(before, after)
    assert delta["ensemble_model"]["success_count"] == 2
    assert delta["gpt2"]["queue_ns"] == 4_000_000
    # the ensemble's own counters: 20 ns queue, (2000 + 9_000_000 + 4000) ns compute over 2
    assert server_split_ms(delta, "ensemble_model") == pytest.approx((0.00001, 4.503))
    # with its steps: queue (20 + 2e6 + 4e6) / 2; compute (9_006_000 - 6e6) / 2
    assert server_split_ms(delta, "ensemble_model", ["encoder", "gpt2"]) == pytest.approx(
        (3.00001, 1.503)
    )
    assert server_split_ms(stats_delta(after, after), "gpt2") == (None, None)


def _series(latencies: list[float], new_tokens: int, steps=None, compute=None) -> Series:
    rows, results = [], []
    for i, latency in enumerate(latencies):
        rows.append(
            {
                "target": "local-cpu",
                "method": "generate",
                "model_variant": "fp32",
                "device_name": None,
                "shape": "local",
                "sweep": "reference",
                "prompt_tokens": 10,
                "new_tokens": new_tokens,
                "concurrency": 1,
                "iteration": i,
                "started_at": 1000.0 + i,
                "latency_ms": latency,
                "server_queue_ms": 0.1,
                "server_compute_ms": None if compute is None else compute[i],
                "notes": "",
            }
        )
        results.append(
            CallResult(1000.0 + i, latency, new_tokens, step_ms=steps[i] if steps else [])
        )
    return Series("local-cpu", "generate", 10, new_tokens, 1, rows, len(rows), results)


def test_decode_time_derived_from_generate_n_and_1():
    one = _series([10.0, 12.0, 30.0], 1, compute=[8.0, 9.0, 10.0])
    many = _series([110.0, 500.0, 11.0], 11, compute=[59.0, 100.0, 5.0])
    rows = decode_rows(one, many)
    # median of generate 1 is 12 ms: (110 - 12) / 10, (500 - 12) / 10; 11 ms gives no row
    assert [r["latency_ms"] for r in rows] == pytest.approx([9.8, 48.8])
    assert [r["server_compute_ms"] for r in rows] == pytest.approx([5.0, 9.1])
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(r["method"] == "decode_token" and r["new_tokens"] == 1 for r in rows)
    assert all(r["started_at"] is None and r["server_queue_ms"] is None for r in rows)
    assert rows[0]["tokens_per_s"] == pytest.approx(1000 / 9.8)
    assert rows[0]["notes"] == "derived: (generate 11 tokens - median generate 1 token) / 10"


def test_decode_time_measured_in_process():
    one = _series([5.0], 1)
    many = _series([14.0], 4, steps=[[5.0, 3.0, 3.0, 3.0]])
    (row,) = decode_rows(one, many)
    assert row["latency_ms"] == pytest.approx(3.0)
    assert row["notes"] == "measured: mean of the 3 decode steps of one call"


def test_plan_and_targets_refuse_bad_settings():
    with pytest.raises(TutorialError, match="new_tokens must be >= 2"):
        MeasurementPlan(new_tokens=1)
    with pytest.raises(TutorialError, match="concurrency levels must be >= 1"):
        MeasurementPlan(concurrency_levels=(0, 1))
    with pytest.raises(TutorialError, match=r"is not a deployment's predict URL"):
        oci_target("https://example.invalid/md/infer", auth=None, shape="VM.GPU.A10.1")


def test_local_gpu_is_not_measured_without_cuda():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has onnxruntime's CUDA provider: local-gpu is measurable")
    available, why = cuda_status()
    assert available is False
    assert "no CUDAExecutionProvider" in why
    with pytest.raises(TutorialError, match=r"^local-gpu cannot be measured: onnxruntime"):
        inprocess_target(gpu=True)


def test_prompts_have_exact_token_counts(tmp_path):
    from tutorial.model_source import load_tokenizer, save_offline_vocab

    save_offline_vocab(tmp_path)
    prompts = PromptMaker(load_tokenizer(tmp_path))
    for n in (1, 10, 33, 128, 700):
        prompt = prompts(n)
        assert prompt.tokens == n
        assert prompt.ids == list(prompts.tokenizer.encode(prompt.text))
    assert prompts(12).text == "My dog is cute, but he barks a lot."  # the seed's sentence


class _FakeGenerate:
    """A target whose ``generate`` takes no time and returns ``max_new_tokens`` tokens."""

    has_ensemble = True
    name = "local-cpu-unbatched"
    model_variant = "fp32"
    device_name = None
    shape = "local"

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def generate(self, prompt, max_new_tokens):
        self.calls.append(("generate", max_new_tokens))
        return CallResult(1000.0, 1.0, max_new_tokens, token_ids=[0] * max_new_tokens)

    def next_token(self, prompt):
        self.calls.append(("ensemble_next_token", 1))
        return CallResult(1000.0, 1.0, 1)

    def stats(self):
        return None


def test_measure_concurrency_runs_only_the_concurrency_sweep(tmp_path):
    from tutorial.model_source import load_tokenizer, save_offline_vocab

    save_offline_vocab(tmp_path)
    prompts = PromptMaker(load_tokenizer(tmp_path))
    plan = MeasurementPlan(
        warmup=1, iterations=5, new_tokens=3, prompt_lengths=(8, 32), concurrency_levels=(1, 2, 4),
        concurrency_iterations=2, progress=False,
    )  # fmt: skip
    target = _FakeGenerate()
    run = measure_concurrency(target, plan, prompts)
    # one warm-up, then 2 calls per worker at each level; no reference or prompt-length series
    assert target.calls == [("generate", 3)] * (1 + 2 * (1 + 2 + 4))
    assert [(s.concurrency, s.sent) for s in run.series] == [(1, 2), (2, 4), (4, 8)]
    assert {r["sweep"] for r in run.rows} == {"concurrency"}
    assert {r["target"] for r in run.rows} == {"local-cpu-unbatched"}
    assert {r["prompt_tokens"] for r in run.rows} == {plan.prompt_tokens}
    assert run.skipped == []
    # measure_target still measures everything on the same target
    full = measure_target(_FakeGenerate(), plan, prompts)
    assert {r["sweep"] for r in full.rows} == {"reference", "prompt_length", "concurrency"}
    assert [(s.concurrency, s.sent) for s in full.series[-3:]] == [(1, 2), (2, 4), (4, 8)]


# ---------------------------------------------------------------------------------------------
# against the real local Triton (tiny model)


def test_measure_streaming_records_every_level_and_refuses_other_tokens(tmp_path, monkeypatch):
    import tutorial.streaming
    from tutorial.model_source import load_tokenizer, save_offline_vocab

    save_offline_vocab(tmp_path)
    prompts = PromptMaker(load_tokenizer(tmp_path))
    plan = MeasurementPlan(
        warmup=1, new_tokens=3, concurrency_levels=(1, 2, 4), concurrency_iterations=2,
        progress=False,
    )  # fmt: skip
    sent: list[tuple[str, str, int]] = []
    tokens = [5, 6, 7]

    def fake_stream(url, text, max_new_tokens, timeout=600.0):
        sent.append((url, text, max_new_tokens))
        now = time.perf_counter()
        return {"sent": now, "times": [now + 0.01, now + 0.02, now + 0.03], "tokens": list(tokens)}

    monkeypatch.setattr(tutorial.streaming, "timed_stream", fake_stream)
    target = triton_target("http://127.0.0.1:9", model_variant="int8")
    run = measure_streaming(target, plan, prompts)
    # one stream alone and one warm-up (unrecorded), then 1x2, 2x2 and 4x2 recorded streams
    assert len(sent) == 2 + 14
    assert set(sent) == {("http://127.0.0.1:9", prompts(10).text, 3)}
    whole = [r for r in run.rows if r["method"] == "generate_stream"]
    assert [r["concurrency"] for r in whole] == [1] * 2 + [2] * 4 + [4] * 8
    assert sum(r["method"] == "ttft" for r in run.rows) == 14
    assert sum(r["method"] == "itl" for r in run.rows) == 14 * 2
    assert {(r["target"], r["model_variant"], r["prompt_tokens"]) for r in run.rows} == {
        ("local-cpu", "int8", 10)
    }
    assert run.skipped == []

    tokens = [5, 6, 8]  # the streams now differ from the one alone
    calls = iter(range(100))
    monkeypatch.setattr(
        tutorial.streaming,
        "timed_stream",
        lambda *a, **k: dict(fake_stream(*a, **k), tokens=[5, 6, 7] if next(calls) < 2 else tokens),
    )
    with pytest.raises(TutorialError, match=r"^local-cpu: 2 of 2 streams at 1 clients gave other"):
        measure_streaming(target, plan, prompts)
    oci = oci_target("https://example.invalid/predict", None, name="oci-cpu", shape="VM.X")
    with pytest.raises(TutorialError, match=r"^oci-cpu: streaming needs a Triton URL"):
        measure_streaming(oci, plan, prompts)


@pytest.fixture(scope="module")
def prompts(tiny_workdir) -> PromptMaker:
    return PromptMaker.from_workdir()


@pytest.mark.slow
def test_series_rows_and_triton_statistics(triton_server, prompts, tmp_path):
    target = triton_target(triton_server.url)
    assert set(target.parts("ensemble_model")) == ENSEMBLE_PARTS
    prompt = prompts(10)

    series = measure_series(target, "ensemble_next_token", prompt, count=3, warmup=1)
    assert series.sent == len(series.rows) == 3
    assert series.model == "ensemble_model"
    for model in ("ensemble_model", *ENSEMBLE_PARTS):
        assert series.stats_delta[model]["success_count"] == 3, model
        assert series.stats_delta[model]["fail_count"] == 0, model
    for row in series.rows:
        assert row["latency_ms"] > 0 and row["new_tokens"] == 1
        assert row["server_compute_ms"] > 0 and row["server_queue_ms"] >= 0
    # each row holds exactly its own call's share: the rows add up to the series' delta
    queue, compute = server_split_ms(series.stats_delta, "ensemble_model", list(ENSEMBLE_PARTS))
    assert sum(r["server_queue_ms"] for r in series.rows) == pytest.approx(3 * queue)
    assert sum(r["server_compute_ms"] for r in series.rows) == pytest.approx(3 * compute)

    generate = measure_series(target, "generate", prompt, new_tokens=4, count=2)
    assert generate.stats_delta["generate"]["success_count"] == 2
    for row, result in zip(generate.rows, generate.results, strict=True):
        assert row["new_tokens"] == len(result.token_ids) and 1 <= row["new_tokens"] <= 4

    overlapped = measure_series(target, "generate", prompt, new_tokens=4, count=5, concurrency=2)
    assert overlapped.sent == 5 and overlapped.stats_delta["generate"]["success_count"] == 5
    assert {r["notes"] for r in overlapped.rows} == {"server split: mean over the series"}
    assert len({r["server_compute_ms"] for r in overlapped.rows}) == 1

    path = write_results(series.rows + generate.rows + overlapped.rows, tmp_path / "r.csv")
    back = read_results(path)
    assert list(back[0]) == list(RESULT_COLUMNS)
    assert len(back) == 10
    assert {r["target"] for r in back} == {"local-cpu"}
    assert {r["weights"] for r in back} == {"random-offline"}
    assert {r["model"] for r in back} == {"tiny test model (n_layer=2, n_head=2, n_embd=64)"}
    assert all(r["latency_ms"] > 0 and r["tokens_per_s"] > 0 for r in back)


@pytest.mark.slow
def test_measure_target_on_local_triton(triton_server, prompts, tmp_path):
    plan = MeasurementPlan(
        warmup=1,
        iterations=3,
        prompt_tokens=10,
        new_tokens=6,
        prompt_lengths=(8,),
        concurrency_levels=(1, 2),
        concurrency_iterations=2,
        progress=False,
    )
    run = measure_target(triton_target(triton_server.url), plan, prompts)
    checks = run.statistics_check()
    assert len(checks) == 2 * 3 + 2  # per prompt: next token, generate 1, generate N; 2 levels
    assert all(sent == counted for _, sent, counted in checks), checks
    assert [sent for _, sent, _ in checks][-2:] == [2, 4]

    back = read_results(write_results(run.rows, tmp_path / "r.csv"))
    measured = [r for r in back if r["method"] != "decode_token"]
    assert len(measured) == 2 * 3 * 3 + 2 + 4
    assert {(r["method"], r["prompt_tokens"]) for r in measured} == {
        (m, p) for m in ("ensemble_next_token", "generate") for p in (8, 10)
    }
    assert {r["concurrency"] for r in back} == {1, 2}
    assert {r["sweep"] for r in back} == {"reference", "prompt_length", "concurrency"}
    assert all(r["latency_ms"] > 0 for r in back)
    # decode rows: recomputed here from the generate rows they were derived from
    for prompt_tokens in (8, 10):
        ones = [
            r["latency_ms"]
            for r in measured
            if r["prompt_tokens"] == prompt_tokens
            and r["new_tokens"] == 1
            and r["method"] == "generate"
        ]
        many = [
            r
            for r in measured
            if r["prompt_tokens"] == prompt_tokens
            and r["method"] == "generate"
            and r["new_tokens"] > 1
            and r["sweep"] != "concurrency"
        ]
        expected = [
            (r["latency_ms"] - statistics.median(ones)) / (r["new_tokens"] - 1) for r in many
        ]
        decoded = [
            r["latency_ms"]
            for r in back
            if r["method"] == "decode_token" and r["prompt_tokens"] == prompt_tokens
        ]
        assert decoded == pytest.approx([e for e in expected if e > 0], abs=2e-4)
        dropped = len([e for e in expected if e <= 0])
        assert any(f"prompt={prompt_tokens}: {dropped} of" in s for s in run.skipped) == bool(
            dropped
        )


@pytest.mark.slow
def test_in_process_model_is_the_served_model(triton_server, prompts, tmp_path):
    prompt = prompts(10)
    served = triton_target(triton_server.url).generate(prompt, 8)
    local = inprocess_target().generate(prompt, 8)
    if 50256 in served.token_ids:  # the server stops at end-of-text, in-process never does
        served.token_ids = served.token_ids[: served.token_ids.index(50256) + 1]
        local.token_ids = local.token_ids[: len(served.token_ids)]
    assert local.token_ids == served.token_ids
    assert len(local.step_ms) == 8 and local.latency_ms >= sum(local.step_ms)

    plan = MeasurementPlan(
        warmup=0, iterations=2, new_tokens=4, prompt_lengths=(), concurrency_levels=(2,),
        concurrency_iterations=1, progress=False,
    )  # fmt: skip
    run = measure_target(inprocess_target(), plan, prompts)
    assert run.statistics_check() == []  # no server, no statistics
    back = read_results(write_results(run.rows, tmp_path / "r.csv"))
    assert {r["target"] for r in back} == {"inprocess-cpu"}
    assert {r["method"] for r in back} == {"generate", "decode_token"}
    decode = [r for r in back if r["method"] == "decode_token"]
    assert len(decode) == 2
    assert all(r["notes"] == "measured: mean of the 3 decode steps of one call" for r in decode)
    assert all(r["server_compute_ms"] is None for r in back)


@pytest.mark.slow
def test_oci_target_sends_signed_requests(triton_server, prompts, tmp_path):
    import oci
    from oci_standin import OciStandIn, make_test_credentials

    creds = make_test_credentials(tmp_path / "creds")
    signer = oci.signer.Signer.from_config(oci.config.from_file(str(creds.config_file)))
    deployment_id = "ocid1.datasciencemodeldeployment.oc1.iad.latencytest"
    with OciStandIn(creds, triton_url=triton_server.url) as standin:
        standin.deployments[deployment_id] = oci.data_science.models.ModelDeployment(
            id=deployment_id, lifecycle_state="ACTIVE"
        )
        url = f"{standin.url}/{deployment_id}/predict"
        target = oci_target(url, signer, name="oci-gpu", shape="VM.GPU.A10.1")
        assert target.stats() is None
        prompt = prompts(10)
        next_token = measure_series(target, "ensemble_next_token", prompt, count=2)
        generate = measure_series(target, "generate", prompt, new_tokens=3, count=1)
        assert next_token.stats_delta is None and next_token.model is None
        assert [f["model_name"] for f in standin.forwarded] == ["ensemble_model"] * 2 + ["generate"]
        assert standin.unhandled == []

        unsigned = oci_target(url, None, name="oci-gpu", shape="VM.GPU.A10.1")
        with pytest.raises(TutorialError, match=r"^oci-gpu: HTTP 401 from .*predict \(generate\)"):
            unsigned.generate(prompt, 3)

    back = read_results(write_results(next_token.rows + generate.rows, tmp_path / "r.csv"))
    assert {r["device_name"] for r in back} == {"OCI VM.GPU.A10.1"}
    assert {r["shape"] for r in back} == {"VM.GPU.A10.1"}
    assert all(r["server_queue_ms"] is None and r["server_compute_ms"] is None for r in back)
    assert back[-1]["new_tokens"] == len(generate.results[0].token_ids)


@pytest.mark.slow
def test_notebook_07_writes_and_shows_the_plots(tiny_workdir, tmp_path):
    import nbformat
    import onnxruntime

    from tests.conftest import run_notebook

    out = run_notebook(
        "07_latency_cpu_gpu",
        tmp_path,
        WARMUP=1,
        ITERATIONS=2,
        NEW_TOKENS=4,
        PROMPT_LENGTHS=[8],
        CONCURRENCY_LEVELS=[1, 2],
        CONCURRENCY_ITERATIONS=1,
        MAX_SECONDS_PER_SERIES=60,
    )
    plots_dir = tiny_workdir / "results" / "plots"
    names = (
        "latency_p50_p95_by_target.png",
        "latency_vs_prompt_length.png",
        "latency_cdf.png",
        "throughput_vs_concurrency.png",
        "ttft_itl_vs_concurrency.png",
    )
    for name in names:
        assert (plots_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    rows = read_results(str(tiny_workdir / "results" / "latency_*.csv"))
    targets = {r["target"] for r in rows}
    assert {"local-cpu", "local-cpu-unbatched", "inprocess-cpu"} <= targets
    unbatched = [r for r in rows if r["target"] == "local-cpu-unbatched"]
    assert {(r["sweep"], r["method"]) for r in unbatched} == {
        ("concurrency", m) for m in ("generate", "generate_stream", "ttft", "itl")
    }
    generated = [r for r in unbatched if r["method"] == "generate"]
    assert sorted(r["concurrency"] for r in generated) == [1, 2, 2]
    # the streaming pass on both servers: per level, every request's TTFT, its gaps and its
    # whole stream (4 tokens each, as one stream alone gave)
    streamed = [r for r in rows if r["method"] in ("generate_stream", "ttft", "itl")]
    assert {r["target"] for r in streamed} == {"local-cpu", "local-cpu-unbatched"}
    assert {r["sweep"] for r in streamed} == {"concurrency"}
    whole = [r for r in streamed if r["method"] == "generate_stream"]
    assert sorted(r["concurrency"] for r in whole) == [1, 1, 2, 2, 2, 2]
    assert {r["new_tokens"] for r in whole} == {4}
    assert sum(r["method"] == "itl" for r in streamed) == 6 * 3
    summary = streaming_summary(rows)
    assert [(s["target"], s["concurrency"], s["requests"]) for s in summary] == [
        (t, c, n) for t in ("local-cpu", "local-cpu-unbatched") for c, n in ((1, 1), (2, 2))
    ]
    for s in summary:
        for metric in ("ttft_ms", "itl_ms"):
            p = s[metric]
            assert 0 < p["p50"] <= p["p95"] <= p["p99"], (metric, s)
        assert s["ttft_ms"]["p50"] < max(r["latency_ms"] for r in whole)
        assert s["tokens_per_s"] > 0
    executed = nbformat.read(out, as_version=4)
    shown = [
        o
        for c in executed.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    ]
    assert len(shown) == 5
    text = "".join(
        o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "3 rows with batching off" in text
    assert "TTFT p50/p95/p99 ms" in text and "ITL p50/p95/p99 ms" in text  # the table
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert "local-gpu" not in targets
        assert "drawn as 'not measured': ['local-gpu', 'oci-cpu', 'oci-gpu']" in text

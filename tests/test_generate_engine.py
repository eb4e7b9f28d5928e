"""generate's in-flight batching engine, outside Triton, on a step model that makes padding
mistakes visible: each row's next token depends on every real token in its cache, and on
nothing else, so a row that saw another row's tokens, a padding column, or lost a column of
its own would make different tokens in a batch than alone.

The real thing (transformers' tokens from a batch served by Triton) is tested in
tests/test_triton.py; this checks the bookkeeping (joins, leaves, padding, trimming, errors)
on many more mixes than a server test can afford.
"""

from __future__ import annotations

import threading
import types

import numpy as np
import pytest

from tutorial.common import REPO_ROOT
from tutorial.engine_local import load_engine_module

VOCAB = 97
EOS = 3


def load_model_module():
    return load_engine_module("generate_engine_under_test")


class MixingRunner:
    """A fake step model with the real one's shapes: the cache holds the token ids themselves
    ([1, 2, batch, 1, length, 1]); a row's next token is a hash of its real tokens, in order,
    and the mask (0 on padding) decides which columns are real. Like the real one it answers
    from the last position: a row whose last column is padding gets token 0."""

    uses_shm = False

    def __init__(self, fail_at_step=None):
        self.steps = 0
        self.rows_per_step = []
        self.fail_at_step = fail_at_step

    def numpy(self, cache):
        return cache

    def run(self, ids, mask, past):
        self.steps += 1
        if self.fail_at_step == self.steps:
            raise RuntimeError("step failed on purpose")
        batch, new = ids.shape
        assert past.shape[2] == batch and past.shape[4] + new == mask.shape[1]
        present = np.concatenate(
            [past, np.broadcast_to(ids[None, None, :, None, :, None], (1, 2, batch, 1, new, 1))],
            axis=4,
        ).astype(np.float32)
        logits = np.zeros((batch, VOCAB), dtype=np.float32)
        for row in range(batch):
            if mask[row, -1] == 0:  # the logits are the last position's: here a padding's
                logits[row, 0] = 1.0
                continue
            real = present[0, 0, row, 0, mask[row] == 1, 0].astype(np.int64)
            assert (present[0, 0, row, 0, mask[row] == 0, 0] == 0).all(), "padding is not zero"
            weights = np.arange(1, len(real) + 1)
            logits[row, int((real * weights).sum() + 7 * len(real)) % VOCAB] = 1.0
        self.rows_per_step.append(batch)
        return logits, present


class SlowRunner(MixingRunner):
    """MixingRunner whose calls signal ``started`` and then wait for ``release``."""

    def __init__(self, started, release):
        super().__init__()
        self.started, self.release = started, release

    def run(self, ids, mask, past):
        self.started.set()
        self.release.wait(timeout=30)
        return super().run(ids, mask, past)


def run_jobs(module, runner, jobs, max_batch, context=64, fits=lambda rows, tokens: True, chunk=0):
    """Submit every job at once; return each job's tokens (or its error) once all finish."""
    engine = module.Engine(
        runner, [1, 2, 1, 1, 0, 1], EOS, context, max_batch, 0.0, fits, prefill_chunk=chunk
    )
    return run_engine(module, engine, jobs)


def run_engine(module, engine, jobs):
    """``jobs`` (prompt, max_new) submitted to ``engine`` before it starts; each job's tokens
    (or its error) once all finish, and the engine stopped."""
    done = threading.Event()
    results = {}

    def make(i, prompt, max_new):
        tokens = []

        def finish(error):
            assert i not in results, "finished twice"
            results[i] = error if error is not None else tokens
            if len(results) == len(jobs):
                done.set()

        return module.Job(prompt, max_new, tokens.append, finish)

    for i, (prompt, max_new) in enumerate(jobs):
        engine.submit(make(i, prompt, max_new))  # all queued before the first step
    engine.start()
    try:
        assert done.wait(timeout=30), f"{len(jobs) - len(results)} jobs never finished"
    finally:
        engine.stop()
    assert not engine.thread.is_alive()
    return [results[i] for i in range(len(jobs))]


def mixed_jobs(seed, count=12, context=64):
    rng = np.random.default_rng(seed)
    jobs = []
    for _ in range(count):
        prompt = [int(t) for t in rng.integers(4, VOCAB, int(rng.integers(1, 40)))]
        jobs.append((prompt, int(rng.integers(1, 40))))
    jobs.append(([5] * (context - 3), 20))  # the context ends it after 4 tokens
    return jobs


@pytest.fixture(scope="module")
def module():
    return load_model_module()


@pytest.mark.parametrize("seed", range(6))
def test_each_row_of_a_batch_gets_what_it_gets_alone(module, seed):
    jobs = mixed_jobs(seed)
    alone = run_jobs(module, MixingRunner(), jobs, max_batch=1)
    runner = MixingRunner()
    batched = run_jobs(module, runner, jobs, max_batch=4)
    assert batched == alone
    assert max(runner.rows_per_step) == 4  # it did batch, and never beyond max_batch
    for (prompt, max_new), tokens in zip(jobs, alone):
        stop = next((i + 1 for i, t in enumerate(tokens) if t == EOS), None)
        assert len(tokens) == stop or len(tokens) == min(max_new, 64 - len(prompt) + 1)


def test_batching_off_runs_one_request_at_a_time(module):
    runner = MixingRunner()
    run_jobs(module, runner, mixed_jobs(1), max_batch=1)
    assert set(runner.rows_per_step) == {1}


def test_a_joiner_that_does_not_fit_waits_for_rows_to_leave(module):
    jobs = mixed_jobs(2)
    runner = MixingRunner()
    got = run_jobs(module, runner, jobs, max_batch=8, fits=lambda rows, tokens: rows <= 2)
    assert max(runner.rows_per_step) == 2
    assert got == run_jobs(module, MixingRunner(), jobs, max_batch=1)


def test_a_failed_step_fails_its_rows_and_the_engine_goes_on(module):
    jobs = [([10, 11, 12], 30), ([20, 21], 30), ([30], 30)]
    got = run_jobs(module, MixingRunner(fail_at_step=5), jobs, max_batch=4)
    assert all(isinstance(g, RuntimeError) and "on purpose" in str(g) for g in got)
    alone = run_jobs(module, MixingRunner(), jobs, max_batch=1)
    assert run_jobs(module, MixingRunner(), jobs, max_batch=4) == alone


def test_the_counters_count_steps_rows_and_mixed_steps(module):
    """A streaming and a non-streaming request in flight together: the steps they share are
    counted as mixed, and each still gets what it gets alone."""
    runner = MixingRunner()
    engine = module.Engine(runner, [1, 2, 1, 1, 0, 1], EOS, 64, 8, 0.0, lambda r, t: True)
    results, done = {}, threading.Event()

    def job(name, prompt, max_new, stream):
        tokens = []

        def finish(error):
            results[name] = error or tokens
            if len(results) == 2:
                done.set()

        return module.Job(prompt, max_new, tokens.append, finish, stream=stream)

    engine.submit(job("stream", [5, 6, 7], 30, True))
    engine.submit(job("once", [4, 5], 10, False))
    engine.start()
    try:
        assert done.wait(timeout=30)
    finally:
        engine.stop()
    alone = run_jobs(module, MixingRunner(), [([5, 6, 7], 30), ([4, 5], 10)], max_batch=1)
    assert [results["stream"], results["once"]] == alone
    assert [len(t) for t in alone] == [30, 10]  # no end-of-text before the limits
    times = {k: v for k, v in engine.counters.items() if k.endswith("_us")}
    assert {k: v for k, v in engine.counters.items() if k not in times} == {
        "requests": 2,
        "steps": 29,  # the longer request's decode steps; the other joined 9 of them
        "rows": 29 + 9,
        "mixed_steps": 9,
        "prefills": 2,
        "prefill_calls": 2,  # prefill_chunk 0 (off): each prompt alone
        "prefill_chunks": 0,
        "chunk_steps": 0,
        "step_prefill_calls": 0,
        "step_prefills": 0,
        "cancelled": 0,
    }
    assert runner.rows_per_step == [1, 1] + [2] * 9 + [1] * 20  # 2 prefills, then decode steps
    # Where the time went: every part was timed, and a request's first token comes after its
    # admission and after the prefill that made it.
    assert set(times) == {"queue_us", "first_token_us", "prefill_us", "step_us", "emit_us"}
    assert times["step_us"] > 0 and times["prefill_us"] > 0 and times["emit_us"] > 0
    assert times["first_token_us"] >= times["queue_us"] + times["prefill_us"]


def test_a_cancelled_request_leaves_at_the_next_step(module):
    """Cancelled after its 5th token: no 6th, an error that says so, and the other rows keep
    their tokens."""
    engine = module.Engine(MixingRunner(), [1, 2, 1, 1, 0, 1], EOS, 64, 8, 0.0, lambda r, t: True)
    results, done = {}, threading.Event()
    tokens = {"gone": [], "stays": []}

    def finish(name):
        def f(error):
            results[name] = error
            if len(results) == 2:
                done.set()

        return f

    gone = module.Job([10, 11], 40, tokens["gone"].append, finish("gone"))
    gone.cancelled = lambda: len(tokens["gone"]) >= 5
    engine.submit(gone)
    engine.submit(module.Job([20, 21, 22], 30, tokens["stays"].append, finish("stays")))
    engine.start()
    try:
        assert done.wait(timeout=30)
    finally:
        engine.stop()
    assert len(tokens["gone"]) == 5
    assert isinstance(results["gone"], module.Cancelled)
    assert results["stays"] is None
    alone = run_jobs(module, MixingRunner(), [([10, 11], 40), ([20, 21, 22], 30)], max_batch=1)
    assert tokens["gone"] == alone[0][:5] and tokens["stays"] == alone[1]
    assert engine.counters["cancelled"] == 1


def test_stopping_answers_every_request_in_flight_or_queued(module):
    """Unloading: the requests in the batch, those waiting for a row and those still queued
    each get an error; none is left without an answer, and a late one is refused at once."""

    started, release = threading.Event(), threading.Event()
    engine = module.Engine(
        SlowRunner(started, release), [1, 2, 1, 1, 0, 1], EOS, 64, 2, 0.0, lambda r, t: True
    )
    answers = []
    jobs = [module.Job([10 + i], 50, lambda t: None, answers.append) for i in range(5)]
    engine.start()
    for job in jobs:
        engine.submit(job)
    assert started.wait(timeout=30)  # a step is running; the rest wait in the queue
    stopper = threading.Thread(target=engine.stop)
    stopper.start()
    release.set()
    stopper.join(timeout=60)
    assert not engine.thread.is_alive()
    assert len(answers) == 5
    assert all(isinstance(a, module.Unloading) for a in answers), answers
    late = []
    engine.submit(module.Job([1], 5, lambda t: None, late.append))
    assert len(late) == 1 and isinstance(late[0], module.Unloading)


# --- prefill: short prompts taken together in one call, long ones a chunk per turn ---


class CallLog(MixingRunner):
    """MixingRunner that also notes each call as (rows, new tokens, past length)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def run(self, ids, mask, past):
        self.calls.append((ids.shape[0], ids.shape[1], past.shape[4]))
        return super().run(ids, mask, past)


@pytest.mark.parametrize(("seed", "chunk"), [(s, c) for s in range(4) for c in (3, 8, 64)])
def test_chunked_and_batched_prefill_give_each_row_what_it_gets_alone(module, seed, chunk):
    """Prompts of 1 to 40 tokens and one that reaches the context end, all arriving together:
    with a chunk of 3 or 8 most are prefilled in chunks (interleaved with decode steps), the
    rest in one call per turn; every row still makes the tokens it makes alone."""
    jobs = mixed_jobs(seed)
    alone = run_jobs(module, MixingRunner(), jobs, max_batch=1)
    runner = CallLog()
    got = run_jobs(module, runner, jobs, max_batch=4, chunk=chunk)
    assert got == alone
    chunks = [c for c in runner.calls if c[1] > 1 and c[2] > 0]  # a prompt's later chunk
    if chunk < 64:
        assert chunks and all(new <= chunk and rows == 1 for rows, new, _ in chunks)
    else:  # no prompt is longer than a chunk: the first four share the first call
        assert not chunks and runner.calls[0][0] == 4 and runner.calls[0][2] == 0
    assert 2 <= max(rows for rows, new, _ in runner.calls if new == 1) <= 4  # decode batch


def test_a_long_prompt_is_prefilled_between_decode_steps(module):
    """A 20-token prompt (chunk 4: 5 chunks) next to two rows decoding: one chunk per turn,
    each followed by a decode step of the rows in flight, and the counters say so."""
    runner = CallLog()
    deltas = []
    engine = module.Engine(
        runner, [1, 2, 1, 1, 0, 1], EOS, 64, 8, 0.0, lambda r, t: True, deltas.append, 4
    )
    jobs = [([5, 6, 7], 30), ([4, 5], 30), (list(range(30, 50)), 10)]  # no end of text
    assert run_engine(module, engine, jobs) == run_jobs(module, MixingRunner(), jobs, 1)
    assert runner.calls[:3] == [
        (2, 3, 0),  # the two short prompts, one call (the shorter padded on the left)
        (1, 4, 0),  # the long prompt's first chunk, with an empty cache
        (2, 1, 3),  # a decode step of the two short rows
    ]
    assert runner.calls[3:10] == [(1, 4, 4), (2, 1, 4), (1, 4, 8), (2, 1, 5)] + [
        (1, 4, 12),
        (2, 1, 6),
        (1, 4, 16),  # the last chunk: its first token; the row joins the batch
    ]
    assert runner.calls[10] == (3, 1, 20)  # three rows decode (padded to the longest)
    order = [key for d in deltas for key in ("prefill_chunks", "steps") if d.get(key)]
    first, last = order.index("prefill_chunks"), len(order) - order[::-1].index("prefill_chunks")
    assert order[first:last].count("steps") == 4  # a decode step after each chunk but the last
    assert engine.counters["prefill_chunks"] == 5 and engine.counters["prefill_calls"] == 1
    assert engine.counters["prefills"] == 3


def test_a_request_cancelled_mid_prefill_leaves_before_its_next_chunk(module):
    """Cancelled after its second chunk: no third chunk, no token, an error that says so; the
    row decoding next to it keeps its tokens."""
    runner = CallLog()
    engine = module.Engine(
        runner, [1, 2, 1, 1, 0, 1], EOS, 64, 8, 0.0, lambda r, t: True, prefill_chunk=4
    )
    results, done = {}, threading.Event()
    tokens = {"gone": [], "stays": []}

    def finish(name):
        def f(error):
            assert name not in results, "finished twice"
            results[name] = error
            if len(results) == 2:
                done.set()

        return f

    gone = module.Job(list(range(30, 50)), 10, tokens["gone"].append, finish("gone"))
    gone.cancelled = lambda: engine.counters["prefill_chunks"] >= 2
    engine.submit(module.Job([20, 21, 22], 30, tokens["stays"].append, finish("stays")))
    engine.submit(gone)
    engine.start()
    try:
        assert done.wait(timeout=30)
    finally:
        engine.stop()
    assert isinstance(results["gone"], module.Cancelled) and tokens["gone"] == []
    assert results["stays"] is None
    assert tokens["stays"] == run_jobs(module, MixingRunner(), [([20, 21, 22], 30)], 1)[0]
    assert engine.counters["prefill_chunks"] == 2 and engine.counters["cancelled"] == 1
    assert engine.counters["prefills"] == 1  # the short one; the cancelled one never finished
    assert [c for c in runner.calls if c[0] == 1 and c[1] == 4] == [(1, 4, 0), (1, 4, 4)]


def test_stopping_answers_requests_being_prefilled_in_chunks(module):
    """Unloading while a long prompt is half prefilled and another waits for its chunks:
    each gets an error, none is left without an answer."""

    started, release = threading.Event(), threading.Event()
    engine = module.Engine(
        SlowRunner(started, release),
        [1, 2, 1, 1, 0, 1],
        EOS,
        64,
        4,
        0.0,
        lambda r, t: True,
        prefill_chunk=4,
    )
    answers = []
    jobs = [module.Job(list(range(10, 30)), 50, lambda t: None, answers.append)]
    jobs += [
        module.Job(list(range(40 + i, 60)), 50, lambda t: None, answers.append) for i in (0, 1)
    ]
    jobs += [module.Job([5], 50, lambda t: None, answers.append) for _ in range(3)]
    for job in jobs:
        engine.submit(job)
    engine.start()
    assert started.wait(timeout=30)  # the first chunk is running; others wait their turn
    stopper = threading.Thread(target=engine.stop)
    stopper.start()
    release.set()
    stopper.join(timeout=60)
    assert not engine.thread.is_alive()
    assert len(answers) == 6
    assert all(isinstance(a, module.Unloading) for a in answers), answers


# --- the session: made at load, on the device asked for, never a silent CPU fallback ---


class StandInOnnxruntime(types.ModuleType):
    """A STAND-IN for the onnxruntime module (no GPU here): it lists the providers a package
    would list, and makes sessions that run on CUDA only where ``cuda_starts``, as
    onnxruntime-gpu does (it falls back to the CPU with a log line when its CUDA provider
    cannot load)."""

    def __init__(self, providers, cuda_starts, folder):
        super().__init__("onnxruntime")
        self.__version__ = "1.19.2"
        self.__file__ = str(folder / "onnxruntime" / "__init__.py")  # no provider library there
        self.providers = providers
        self.cuda_starts = cuda_starts
        self.made = []
        stand_in = self

        class InferenceSession:
            def __init__(self, path, options, providers):
                stand_in.made.append(providers)
                names = [p[0] if isinstance(p, tuple) else p for p in providers]
                running = [n for n in names if n != "CUDAExecutionProvider" or cuda_starts]
                self.providers = running

            def get_providers(self):
                return self.providers

        self.InferenceSession = InferenceSession
        self.SessionOptions = lambda: types.SimpleNamespace(intra_op_num_threads=0)

    def get_available_providers(self):
        return list(self.providers)


GPU_PACKAGE = ["CUDAExecutionProvider", "CPUExecutionProvider"]
CUDA_OPTIONS = {"device_id": "0", "use_tf32": "0", "arena_extend_strategy": "kSameAsRequested"}


def open_with(module, tmp_path, providers, cuda_starts, device, gpu_present):
    ort = StandInOnnxruntime(providers, cuda_starts, tmp_path)
    session, where = module.open_session(
        ort, tmp_path / "step.onnx", None, device, CUDA_OPTIONS, gpu_present
    )
    return ort, session, where


def test_a_gpu_host_runs_the_session_on_cuda_with_the_options_set(module, tmp_path):
    ort, session, where = open_with(module, tmp_path, GPU_PACKAGE, True, "auto", True)
    assert where == "cuda" and session.get_providers()[0] == "CUDAExecutionProvider"
    assert ort.made == [[("CUDAExecutionProvider", CUDA_OPTIONS), "CPUExecutionProvider"]]


def test_a_gpu_host_whose_cuda_provider_cannot_start_fails_the_load(module, tmp_path):
    with pytest.raises(module.SessionError) as err:
        open_with(module, tmp_path, GPU_PACKAGE, False, "auto", True)
    message = str(err.value)
    assert message.startswith(
        "this host has an NVIDIA GPU, but onnxruntime 1.19.2 could not start its CUDA "
        "provider and would run on the CPU: "
    )
    # the loader's own words for the provider library it could not open, and what to do
    assert "libonnxruntime_providers_cuda.so: cannot open shared object file" in message
    assert "onnxruntime-gpu==1.19.2" in message and "onnxruntime_device" in message


def test_the_cpu_package_on_a_gpu_host_fails_the_load(module, tmp_path):
    with pytest.raises(module.SessionError) as err:
        open_with(module, tmp_path, ["CPUExecutionProvider"], False, "auto", True)
    assert "has no CUDA provider: it is the CPU package" in str(err.value)


def test_cpu_on_purpose_and_cpu_hosts_run_on_the_cpu(module, tmp_path):
    for providers, device, gpu in [(GPU_PACKAGE, "cpu", True), (GPU_PACKAGE, "auto", False)]:
        ort, session, where = open_with(module, tmp_path, providers, False, device, gpu)
        assert where == "cpu" and ort.made == [["CPUExecutionProvider"]]
    with pytest.raises(module.SessionError, match="onnxruntime_device is 'cuda', but"):
        open_with(module, tmp_path, GPU_PACKAGE, False, "cuda", False)
    with pytest.raises(module.SessionError, match="must be 'auto', 'cuda' or 'cpu'"):
        open_with(module, tmp_path, GPU_PACKAGE, True, "gpu", True)


def test_the_cuda_options_come_from_the_committed_config(module):
    from tutorial.repository import load_config

    config = load_config(REPO_ROOT / "model_repository/generate_stream/config.pbtxt")
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["onnxruntime_device"] == "auto"
    assert module.cuda_provider_options(params, "0") == CUDA_OPTIONS  # TF32 off, no cap
    params["cuda_gpu_mem_limit_bytes"] = str(8 * 2**30)
    assert module.cuda_provider_options(params, "1")["gpu_mem_limit"] == "8589934592"


class TimedRunner(MixingRunner):
    """MixingRunner on a fake clock: a decode step (one new token a row) costs ``step``, a
    prefill call one unit a prompt token. Records each call's (rows, new tokens)."""

    def __init__(self, step):
        super().__init__()
        self.now, self.step, self.calls = 0.0, step, []

    def clock(self):
        return self.now

    def run(self, ids, mask, past):
        batch, new = ids.shape
        self.now += self.step if new == 1 else batch * new
        self.calls.append((batch, new))
        return super().run(ids, mask, past)


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_chunks_sized_to_a_share_of_a_decode_step(module, share):
    """With prefill_chunk_share, a long prompt's chunks take about that share of a decode step
    while rows decode (here 0.5 x 40 / 1 per token = 20 tokens; 16, MIN_CHUNK, until both are
    timed); without it, chunks of prefill_chunk. Tokens: those each request gets alone."""
    runner = TimedRunner(step=40.0)
    engine = module.Engine(
        runner, [1, 2, 1, 1, 0, 1], EOS, 256, 8, 0.0, lambda r, t: True,
        prefill_chunk=64, chunk_share=share, clock=runner.clock,
    )  # fmt: skip
    jobs = [([5, 6, 7], 40), ([4, 5], 40), (list(range(4, 94)) + list(range(4, 14)), 5)]
    alone = run_jobs(module, MixingRunner(), jobs, 1, context=256)
    assert run_engine(module, engine, jobs) == alone
    chunks = [new for rows, new in runner.calls if rows == 1 and new > 1]
    assert runner.calls[0] == (2, 3)  # the two short prompts, one call
    assert sum(chunks) == 100
    assert chunks == ([16, 20, 20, 20, 20, 4] if share else [64, 36])


def test_counters_are_sent_in_batches_and_before_each_answer(module):
    """Metrics adds the engine's counts up and sends them to Triton at most every EVERY_S (each
    increment is a round trip to the server process) and whenever a request is answered: the
    engine flushes before every finish, so a client that reads the counters after its answer
    sees its own request counted."""
    sent = []

    class Family:
        COUNTER = "counter"

        def __init__(self, name, description, kind):
            self.name = name

        def Metric(self, labels):  # noqa: N802 - pb_utils' name
            return types.SimpleNamespace(increment=lambda v, n=self.name: sent.append((n, v)))

    module.pb_utils.MetricFamily = Family
    try:
        now = [0.0]
        metrics = module.Metrics("generate_stream", clock=lambda: now[0])
        metrics.publish({"steps": 1, "rows": 3})
        metrics.publish({"steps": 1, "rows": 2, "cancelled": 0})
        assert sent == []  # held back: less than EVERY_S since the last send
        now[0] += metrics.EVERY_S
        metrics.publish({"steps": 1, "rows": 1})
        assert sorted(sent) == [
            ("generate_engine_rows_total", 6),
            ("generate_engine_steps_total", 3),
        ]
        sent.clear()
        runner = MixingRunner()
        order = []
        engine = module.Engine(
            runner, [1, 2, 1, 1, 0, 1], EOS, 64, 4, 0.0, lambda r, t: True, metrics.publish,
            flush=lambda: (metrics.flush(), order.append("flush")),
        )  # fmt: skip
        done = threading.Event()
        job = module.Job(
            [5, 6, 7], 5, lambda t: None, lambda e: (order.append("finish"), done.set())
        )
        engine.submit(job)
        engine.start()
        assert done.wait(timeout=30)
        engine.stop()
        assert order[-2:] == ["flush", "finish"]  # flushed right before the answer
        totals = {}
        for name, value in sent:
            totals[name] = totals.get(name, 0) + value
        assert totals["generate_engine_steps_total"] == 4  # 5 tokens: a prefill and 4 steps
        assert totals["generate_engine_prefills_total"] == 1
    finally:
        del module.pb_utils.MetricFamily

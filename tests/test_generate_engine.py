"""generate's in-flight batching engine, outside Triton, on a step model that makes padding
mistakes visible: each row's next token depends on every real token in its cache, and on
nothing else, so a row that saw another row's tokens, a padding column, or lost a column of
its own would make different tokens in a batch than alone.

The real thing (transformers' tokens from a batch served by Triton) is tested in
tests/test_triton.py; this checks the bookkeeping (joins, leaves, padding, trimming, errors)
on many more mixes than a server test can afford.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import types

import numpy as np
import pytest

from tutorial.common import REPO_ROOT

VOCAB = 97
EOS = 3


def load_model_module():
    stub = types.ModuleType("triton_python_backend_utils")
    stub.Logger = types.SimpleNamespace(log_error=print, log_info=print, log_warn=print)
    previous = sys.modules.get("triton_python_backend_utils")
    sys.modules["triton_python_backend_utils"] = stub
    try:
        spec = importlib.util.spec_from_file_location(
            "generate_engine_under_test", REPO_ROOT / "model_repository/generate_stream/1/model.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del sys.modules["triton_python_backend_utils"]
        else:
            sys.modules["triton_python_backend_utils"] = previous
    return module


class MixingRunner:
    """A fake step model with the real one's shapes: the cache holds the token ids themselves
    ([1, 2, batch, 1, length, 1]); a row's next token is a hash of its real tokens, in order,
    and the mask (0 on padding) decides which columns are real."""

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
            real = present[0, 0, row, 0, mask[row] == 1, 0].astype(np.int64)
            assert (present[0, 0, row, 0, mask[row] == 0, 0] == 0).all(), "padding is not zero"
            weights = np.arange(1, len(real) + 1)
            logits[row, int((real * weights).sum() + 7 * len(real)) % VOCAB] = 1.0
        self.rows_per_step.append(batch)
        return logits, present


def run_jobs(module, runner, jobs, max_batch, context=64, fits=lambda rows, tokens: True):
    """Submit every job at once; return each job's tokens (or its error) once all finish."""
    engine = module.Engine(runner, [1, 2, 1, 1, 0, 1], EOS, context, max_batch, 0.0, fits)
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
    assert engine.counters == {
        "steps": 29,  # the longer request's decode steps; the other joined 9 of them
        "rows": 29 + 9,
        "mixed_steps": 9,
        "prefills": 2,
        "cancelled": 0,
    }
    assert runner.rows_per_step == [1, 1] + [2] * 9 + [1] * 20  # 2 prefills, then decode steps


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

    class SlowRunner(MixingRunner):
        def run(self, ids, mask, past):
            started.set()
            release.wait(timeout=30)
            return super().run(ids, mask, past)

    started, release = threading.Event(), threading.Event()
    engine = module.Engine(SlowRunner(), [1, 2, 1, 1, 0, 1], EOS, 64, 2, 0.0, lambda r, t: True)
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
    from tutorial.common import REPO_ROOT
    from tutorial.repository import load_config

    config = load_config(REPO_ROOT / "model_repository/generate_stream/config.pbtxt")
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["onnxruntime_device"] == "auto"
    assert module.cuda_provider_options(params, "0") == CUDA_OPTIONS  # TF32 off, no cap
    params["cuda_gpu_mem_limit_bytes"] = str(8 * 2**30)
    assert module.cuda_provider_options(params, "1")["gpu_mem_limit"] == "8589934592"

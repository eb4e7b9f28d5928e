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

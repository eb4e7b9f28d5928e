"""Chunked and batched prefill on the real step model: the engine of
model_repository/generate_stream/1/model.py run in-process (as tests/test_generate_engine.py
runs it) on the tiny GPT-2's ``gpt2_with_past.onnx`` in an onnxruntime session, the way the
server runs it. Every request's tokens must equal transformers' ``generate(do_sample=False)``
on the same weights, for the request alone.

Chunks of 8 tokens on the tiny model: a 30-token prompt is prefilled in 4 calls, each with the
request's own cache as past, between the decode steps of the rows already in flight.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.test_generate_engine import load_model_module
from tutorial.client import reference_generate

pytestmark = pytest.mark.slow

CHUNK = 8


@pytest.fixture(scope="module", params=["per_layer", "stacked"])
def step(request, tiny_workdir):
    """The engine's module and a factory of engines on the tiny model's step model: the file
    the repository serves (its cache per layer), and the exported one (one ``past`` array,
    as a BLS step sends it)."""
    import json

    from tutorial.repository import load_config

    module = load_model_module()
    folder = tiny_workdir / "model_repository" / "generate_stream"
    params = {k: v.string_value for k, v in load_config(folder / "config.pbtxt").parameters.items()}
    shape = [int(d) for d in params["empty_past_shape"].split(",")]
    path = folder / "1" / "gpt2_with_past.onnx"
    if request.param == "stacked":
        path = json.loads((tiny_workdir / "state.json").read_text())["onnx"]["with_past"]
    runner = module.SessionRunner(Path(path), 1, "cpu")
    runner.open(gpu_present=False)
    assert (runner.cache_in == ["past"]) == (request.param == "stacked")

    def engine(chunk, max_batch=8, publish=None, batch_tokens=0, wrap=None, **options):
        return module.Engine(
            wrap(runner) if wrap else runner,
            shape,
            50256,
            1024,
            max_batch,
            0.0,
            lambda r, t: True,
            publish,
            chunk,
            prefill_batch_tokens=batch_tokens,
            **options,
        )

    return module, engine


class Collect:
    """Jobs whose tokens and final answers are kept; ``wait`` until all are answered."""

    def __init__(self, module):
        self.module = module
        self.tokens, self.answers = {}, {}
        self.done = threading.Event()
        self.expected = 0

    def job(self, name, ids, max_new, cancelled=None):
        self.expected += 1
        self.tokens[name] = []

        def finish(error):
            assert name not in self.answers, f"{name} answered twice"
            self.answers[name] = error
            if len(self.answers) == self.expected:
                self.done.set()

        job = self.module.Job(ids, max_new, self.tokens[name].append, finish)
        job.cancelled = cancelled
        return job

    def wait(self, engine, timeout=120):
        try:
            assert self.done.wait(timeout), f"answered: {sorted(self.answers)}"
        finally:
            engine.stop()
        assert not engine.thread.is_alive()


def long_prompt_after_decoders(engine, jobs, tok, decoders, long, submit_first=False):
    """The decoders (prompt, max new tokens) submitted (before the engine starts with
    ``submit_first``), then, once each has made 5 tokens, ``long``; every request's tokens
    when all are answered: the decoders' in order, then the long one's."""
    if not submit_first:
        engine.start()
    for i, (prompt, max_new) in enumerate(decoders):
        engine.submit(jobs.job(i, tok(prompt)["input_ids"], max_new))
    if submit_first:
        engine.start()
    deadline = time.monotonic() + 60
    while min(len(jobs.tokens[i]) for i in range(len(decoders))) < 5:  # all are decoding
        assert time.monotonic() < deadline, "the decoders did not start"
        time.sleep(0.001)
    engine.submit(jobs.job("long", tok(long[0])["input_ids"], long[1]))
    jobs.wait(engine)
    return [jobs.tokens[i] for i in range(len(decoders))] + [jobs.tokens["long"]]


def prompt_of(tok, tokens: int) -> str:
    """A text of exactly ``tokens`` tokens."""
    text = " ".join(["Once upon a time, a dog barked at the moon."] * (tokens // 4 + 2))
    ids = tok(text)["input_ids"][:tokens]
    text = tok.decode(ids)
    assert len(tok(text)["input_ids"]) == tokens
    return text


def test_prompts_of_mixed_lengths_arriving_together(step, tiny_reference):
    """Eight prompts of 1 to 30 tokens arrive together (chunk 8): the four of at most 8 tokens
    share one prefill call (left-padded), the four longer ones are prefilled a chunk per turn
    between decode steps; each gets transformers' tokens alone."""
    module, make = step
    tf_model, tok = tiny_reference
    lengths = [1, 5, 8, 3, 9, 17, 30, 24]
    prompts = [(prompt_of(tok, n), 6 + 3 * i) for i, n in enumerate(lengths)]
    expected = [reference_generate(tf_model, tok, p, n) for p, n in prompts]
    engine, jobs = make(CHUNK), Collect(module)
    for i, (prompt, max_new) in enumerate(prompts):
        engine.submit(jobs.job(i, tok(prompt)["input_ids"], max_new))
    engine.start()
    jobs.wait(engine)
    assert [jobs.tokens[i] for i in range(8)] == expected
    assert all(jobs.answers[i] is None for i in range(8))
    counters = engine.counters
    assert counters["prefill_calls"] == 1  # the four short prompts, one call
    assert counters["prefill_chunks"] == 2 + 3 + 4 + 3  # 9, 17, 30 and 24 tokens in 8s
    assert counters["prefills"] == 8


def test_short_prompts_prefilled_in_calls_of_at_most_prefill_batch_tokens(step, tiny_reference):
    """prefill_batch_tokens 16: eight short prompts arriving together are prefilled in four
    calls of at most 16 tokens (rows x the longest), in arrival order, each answered as its
    call ends; each gets transformers' tokens alone."""
    module, make = step
    tf_model, tok = tiny_reference
    lengths = [3, 5, 2, 8, 4, 6, 1, 7]  # calls: [3, 5, 2] (15), [8, 4] (16), [6, 1], [7]
    prompts = [(prompt_of(tok, n), 5 + i) for i, n in enumerate(lengths)]
    expected = [reference_generate(tf_model, tok, p, n) for p, n in prompts]
    events: list = []  # "call" when a prefill call is counted, then i at request i's 1st token

    def publish(deltas):
        if deltas.get("prefill_calls"):
            events.append("call")

    def first_marked(i, emit):
        def marked(token):
            if i not in events:
                events.append(i)
            emit(token)

        return marked

    engine, jobs = make(CHUNK, publish=publish, batch_tokens=16), Collect(module)
    for i, (prompt, max_new) in enumerate(prompts):
        job = jobs.job(i, tok(prompt)["input_ids"], max_new)
        job.emit = first_marked(i, job.emit)
        engine.submit(job)
    engine.start()
    jobs.wait(engine)
    assert [jobs.tokens[i] for i in range(8)] == expected
    assert engine.counters["prefill_calls"] == 4 and engine.counters["prefills"] == 8
    assert events == ["call", 0, 1, 2, "call", 3, 4, "call", 5, 6, "call", 7]


def test_a_long_prompt_arriving_while_others_decode(step, tiny_reference):
    """Three requests decode; a 100-token prompt arrives (13 chunks of 8): the decoders keep
    transformers' tokens, the long one gets its own, and the counters show decode steps
    between its first and last chunk (the chunks did not stall the decoders)."""
    module, make = step
    tf_model, tok = tiny_reference
    decoders = [(prompt_of(tok, n), 60) for n in (4, 7, 8)]  # one prefill call each
    long = (prompt_of(tok, 100), 10)
    expected = [reference_generate(tf_model, tok, p, n) for p, n in [*decoders, long]]
    deltas: list[dict] = []
    engine, jobs = make(CHUNK, publish=deltas.append), Collect(module)
    assert long_prompt_after_decoders(engine, jobs, tok, decoders, long) == expected
    assert len(jobs.tokens[0]) == 60  # the decoders outlived the long prompt's prefill
    order = [key for d in deltas for key in ("prefill_chunks", "steps") if d.get(key)]
    assert order.count("prefill_chunks") == 13
    first, last = order.index("prefill_chunks"), len(order) - order[::-1].index("prefill_chunks")
    assert order[first:last].count("steps") == 12  # one decode step after each chunk but the last
    # fp32, per layer: each chunk ran in its decode step's call (two groups, one read of the
    # weights); the exported file runs them apart
    assert engine.counters["chunk_steps"] == (13 if engine.runner.two_groups else 0)


class Timed:
    """The runner, on a fake clock: a decode step costs ``step``, a prompt token one unit
    (in a call of its own or as the second group of a decode step's call). Records the
    tokens of each chunk of one row: a call of its own (one row, several tokens) or a
    second group."""

    def __init__(self, runner, step):
        self.runner, self.step, self.now, self.chunks = runner, step, 0.0, []

    def __getattr__(self, name):  # two_groups, keep, numpy, ... of the runner
        return getattr(self.runner, name)

    def clock(self):
        return self.now

    def run(self, ids, mask, past, chunk=None):
        rows, new = ids.shape
        self.now += self.step if new == 1 else rows * new
        if chunk is None:
            if rows == 1 and new > 1:
                self.chunks.append(new)
            return self.runner.run(ids, mask, past)
        self.now += chunk[0].size
        self.chunks.append(chunk[0].shape[1])
        return self.runner.run(ids, mask, past, chunk=chunk)


def test_chunks_sized_to_a_share_of_a_decode_step(step, tiny_reference):
    """With prefill_chunk_share 0.5, a 100-token prompt arriving while three rows decode is
    prefilled in chunks of about half a decode step (fake clock: a step 40, a prompt token 1:
    20 tokens; 16, MIN_CHUNK, until both are timed), whether a chunk runs in a call of its own
    (the exported file) or in the decode step's call (the file served: there the chunk's time
    is the call less the step alone); every request gets transformers' tokens."""
    module, make = step
    tf_model, tok = tiny_reference
    decoders = [(prompt_of(tok, n), 60) for n in (4, 7, 8)]
    long = (prompt_of(tok, 100), 10)
    expected = [reference_generate(tf_model, tok, p, n) for p, n in [*decoders, long]]
    timed = []

    def wrap(runner):
        timed.append(Timed(runner, step=40.0))
        return timed[0]

    engine = make(64, wrap=wrap, chunk_share=0.5, clock=lambda: timed[0].clock())
    jobs = Collect(module)
    # the decoders submitted before the engine starts: one prefill call of three rows
    tokens = long_prompt_after_decoders(engine, jobs, tok, decoders, long, submit_first=True)
    assert tokens == expected
    assert timed[0].chunks == [16, 20, 20, 20, 20, 4]
    assert engine.counters["chunk_steps"] == (6 if engine.runner.two_groups else 0)


def test_short_prompts_arriving_while_others_decode(step, tiny_reference):
    """Two requests decode; four short prompts arrive: with the file the repository serves
    (two groups) they are prefilled in a decode step's own call, the exported file prefills
    them in a call of their own; every request gets transformers' tokens alone."""
    module, make = step
    tf_model, tok = tiny_reference
    decoders = [(prompt_of(tok, n), 40) for n in (6, 3)]
    joiners = [(prompt_of(tok, n), 8 + n) for n in (2, 7, 5, 8)]
    expected = [reference_generate(tf_model, tok, p, n) for p, n in [*decoders, *joiners]]
    engine, jobs = make(CHUNK), Collect(module)
    for i, (prompt, max_new) in enumerate(decoders):
        engine.submit(jobs.job(i, tok(prompt)["input_ids"], max_new))
    engine.start()
    deadline = time.monotonic() + 60
    while min(len(jobs.tokens[i]) for i in range(2)) < 3:  # both are decoding
        assert time.monotonic() < deadline, "the decoders did not start"
        time.sleep(0.001)
    for i, (prompt, max_new) in enumerate(joiners, start=2):
        engine.submit(jobs.job(i, tok(prompt)["input_ids"], max_new))
    jobs.wait(engine)
    assert [jobs.tokens[i] for i in range(6)] == expected
    assert len(jobs.tokens[0]) == 40  # the decoders outlived the joiners' prefill
    counters = engine.counters
    assert counters["prefills"] == 6
    if engine.runner.two_groups:  # each joiners' call was a decode step's
        assert counters["step_prefill_calls"] == counters["prefill_calls"] - 1 >= 1
        assert counters["step_prefills"] == 4
    else:
        assert counters["step_prefill_calls"] == 0


def test_a_prompt_that_reaches_the_context_end(step, tiny_reference):
    """A 1020-token prompt in chunks of 64 (16 chunks) next to a short request: 4 tokens fill
    the 1024 context and a 5th is predicted from it, as transformers does."""
    module, make = step
    tf_model, tok = tiny_reference
    prompt = " hello" * 1020
    ids = tok(prompt)["input_ids"]
    assert len(ids) == 1020
    short = prompt_of(tok, 6)
    engine, jobs = make(64), Collect(module)
    engine.submit(jobs.job("long", ids, 50))
    engine.submit(jobs.job("short", tok(short)["input_ids"], 30))
    engine.start()
    jobs.wait(engine, timeout=300)
    assert jobs.tokens["long"] == reference_generate(tf_model, tok, prompt, 5)
    assert jobs.tokens["short"] == reference_generate(tf_model, tok, short, 30)
    assert engine.counters["prefill_chunks"] == 16


def test_a_request_cancelled_mid_prefill(step, tiny_reference):
    """Cancelled after 3 of its 13 chunks: it leaves with CANCELLED and no token, and is never
    prefilled further; the request decoding beside it keeps transformers' tokens."""
    module, make = step
    tf_model, tok = tiny_reference
    short, long = prompt_of(tok, 5), prompt_of(tok, 100)
    engine, jobs = make(CHUNK), Collect(module)
    engine.submit(jobs.job("short", tok(short)["input_ids"], 30))
    engine.submit(
        jobs.job(
            "gone",
            tok(long)["input_ids"],
            20,
            cancelled=lambda: engine.counters["prefill_chunks"] >= 3,
        )
    )
    engine.start()
    jobs.wait(engine)
    assert isinstance(jobs.answers["gone"], module.Cancelled) and jobs.tokens["gone"] == []
    assert jobs.tokens["short"] == reference_generate(tf_model, tok, short, 30)
    assert engine.counters["prefill_chunks"] == 3 and engine.counters["cancelled"] == 1

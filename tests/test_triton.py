"""The repository on a real Triton server: token-exact parity, bad input, load, generate."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from tests.conftest import require_local_triton
from tutorial.client import (
    infer_json,
    next_token_requests,
    reference_generate,
    reference_text_loop,
    wait_for_engine_counter,
)

pytestmark = pytest.mark.slow

PROMPT = "My dog is cute, but he barks a lot."
# Prompts whose generated text re-encodes to the same tokens on the tiny model are found below.
CANDIDATES = [
    "Machine learning is a field of computer science.",
    "Hello world",
    "The quick brown fox",
    "Triton serves models over HTTP.",
    "Once upon a time",
    "In 1998, the company",
]


def next_token(server, text):
    return next_token_requests(server.url, text)


def ensemble(server, data, shape=None, datatype="BYTES"):
    body = {
        "inputs": [
            {"name": "TEXT", "datatype": datatype, "shape": shape or [len(data)], "data": data}
        ]
    }
    return requests.post(f"{server.url}/v2/models/ensemble_model/infer", json=body, timeout=60)


def generate(server, text, max_new_tokens=None):
    inputs = [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": [text]}]
    if max_new_tokens is not None:
        inputs.append(
            {"name": "MAX_NEW_TOKENS", "datatype": "INT32", "shape": [1], "data": [max_new_tokens]}
        )
    return requests.post(
        f"{server.url}/v2/models/generate/infer", json={"inputs": inputs}, timeout=120
    )


def generated_ids(response):
    assert response.status_code == 200, response.text
    return {o["name"]: o["data"] for o in response.json()["outputs"]}["TOKEN_IDS"]


def assert_still_serving(server, tiny_reference):
    tf_model, tok = tiny_reference
    expected = reference_text_loop(tf_model, tok, PROMPT, 1)[1][0]
    assert next_token(server, PROMPT) == expected


def test_text_loop_equals_reference(triton_server, tiny_reference):
    tf_model, tok = tiny_reference
    text = PROMPT
    for _ in range(20):
        text += next_token(triton_server, text)
    assert text == reference_text_loop(tf_model, tok, PROMPT, 20)[0]


def test_text_loop_equals_generate_when_it_round_trips(triton_server, tiny_reference):
    from tutorial.client import retokenizes_same

    tf_model, tok = tiny_reference
    checked = 0
    for prompt in CANDIDATES:
        ref = reference_generate(tf_model, tok, prompt, 12)
        if not retokenizes_same(tok, prompt, ref):
            continue
        text = prompt
        for _ in range(12):
            text += next_token(triton_server, text)
        assert tok(text)["input_ids"] == tok(prompt)["input_ids"] + ref, prompt
        checked += 1
    assert checked >= 1, "no candidate prompt round-trips: add one"


def test_generate_equals_transformers(triton_server, tiny_reference):
    tf_model, tok = tiny_reference
    ids = generated_ids(generate(triton_server, PROMPT, 50))
    assert ids == reference_generate(tf_model, tok, PROMPT, 50)
    response = generate(triton_server, PROMPT, 50)
    text = {o["name"]: o["data"] for o in response.json()["outputs"]}["GENERATED_TEXT"][0]
    assert text == tok.decode(ids)


def test_generate_default_is_50_tokens(triton_server, tiny_reference):
    tf_model, tok = tiny_reference
    assert generated_ids(generate(triton_server, "Hello world")) == reference_generate(
        tf_model, tok, "Hello world", 50
    )


@pytest.mark.parametrize(
    ("value", "shape"),
    [(0, [1]), (1001, [1]), (-5, [1])],
)
def test_generate_max_new_tokens_bounds(triton_server, value, shape, tiny_reference):
    response = generate(triton_server, PROMPT, value)
    assert response.status_code == 400
    assert (
        response.json()["error"]
        == f"MAX_NEW_TOKENS must be one integer from 1 to 1000, got {value}"
    )
    assert len(generated_ids(generate(triton_server, PROMPT, 3))) == 3


def test_generate_stops_at_the_context_limit(triton_server, tiny_reference):
    tf_model, tok = tiny_reference
    prompt = " hello" * 1020  # 1020 tokens: 4 more fill the 1024 context, one more is predicted
    assert len(tok(prompt)["input_ids"]) == 1020
    ids = generated_ids(generate(triton_server, prompt, 50))
    assert len(ids) == 5
    assert ids == reference_generate(tf_model, tok, prompt, 5)


def test_generate_concurrent_calls_stay_correct(triton_server, tiny_reference):
    tf_model, tok = tiny_reference
    prompts = [PROMPT, *CANDIDATES[:3]]
    expected = {p: reference_generate(tf_model, tok, p, 20) for p in prompts}
    jobs = [prompts[i % len(prompts)] for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda p: generated_ids(generate(triton_server, p, 20)), jobs))
    assert all(r == expected[p] for p, r in zip(jobs, results))


def test_generate_batches_requests_in_flight_token_exact(triton_server, tiny_reference):
    """Requests of different lengths and limits share decode steps with a long one already in
    flight (in-flight batching), and each gets exactly transformers' tokens alone."""
    import threading

    tf_model, tok = tiny_reference
    long = ("Hello world", 1000)  # in flight while the others come and go
    others = [
        (PROMPT, 5),  # stops at its own limit, early
        (CANDIDATES[0], 40),
        (CANDIDATES[2], 1),  # prefill only: never joins a decode step
        (" hello" * 1015, 50),  # 1015 tokens: its row pads the others; the context ends it
    ]
    assert len(tok(others[3][0])["input_ids"]) == 1015
    # 1015 + 9 new tokens fill the context; the 10th is predicted from it, and is the last.
    lengths = {
        job: min(job[1], 1024 - len(tok(job[0])["input_ids"]) + 1) for job in [long, *others]
    }
    expected = {job: reference_generate(tf_model, tok, job[0], lengths[job]) for job in lengths}
    finished = []
    lock = threading.Lock()

    def run(job):
        ids = generated_ids(generate(triton_server, *job))
        with lock:
            finished.append(job)
        return ids

    with ThreadPoolExecutor(len(others) + 1) as pool:
        first = pool.submit(run, long)
        rest = [pool.submit(run, job) for job in others]
        results = {long: first.result(), **{job: f.result() for job, f in zip(others, rest)}}
    for job, ids in results.items():
        assert ids == expected[job], job[1]
    assert lengths[others[3]] == 10
    # One request at a time would answer the long request first; batched, the others finish
    # while it is still in flight.
    assert finished[-1] == long, [n for _, n in finished]


def test_generate_16_clients_batched_token_exact(triton_server, tiny_reference):
    tf_model, tok = tiny_reference
    prompts = [PROMPT, *CANDIDATES]
    jobs = [(prompts[i % len(prompts)], 8 + 7 * (i % 5)) for i in range(16)]
    expected = {job: reference_generate(tf_model, tok, *job) for job in set(jobs)}

    def client(job):
        session = requests.Session()
        got = []
        for _ in range(2):
            inputs = [
                {"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": [job[0]]},
                {"name": "MAX_NEW_TOKENS", "datatype": "INT32", "shape": [1], "data": [job[1]]},
            ]
            body = infer_json(triton_server.url, "generate", {"inputs": inputs}, session=session)
            got.append({o["name"]: o["data"] for o in body["outputs"]}["TOKEN_IDS"])
        return got

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(client, jobs))
    assert sum(len(a) for a in answers) == 32
    for job, got in zip(jobs, answers):
        assert got == [expected[job]] * 2, job


# --- bad input: a clear error each, and the next good request is still answered correctly ---


def test_empty_text(triton_server, tiny_reference):
    response = ensemble(triton_server, [""])
    assert response.status_code == 400
    assert (
        response.json()["error"]
        == "in ensemble 'ensemble_model', TEXT is empty: send at least one character"
    )
    assert generate(triton_server, "").status_code == 400
    assert_still_serving(triton_server, tiny_reference)


def test_text_longer_than_the_context_keeps_the_last_1024_tokens(triton_server, tiny_reference):
    tf_model, tok = tiny_reference
    text = "Once upon a time, there was a dog. " * 150
    ids = tok(text)["input_ids"]
    assert len(ids) > 1024
    logits = tf_model(np.asarray([ids[-1024:]], dtype=np.int32)).logits.numpy()
    expected = tok.decode([int(np.argmax(logits[0, -1]))])
    assert next_token(triton_server, text) == expected
    assert_still_serving(triton_server, tiny_reference)


def test_invalid_utf8(triton_server, tiny_reference):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(triton_server.url.removeprefix("http://"))
    inp = httpclient.InferInput("TEXT", [1], "BYTES")
    inp.set_data_from_numpy(np.asarray([b"caf\xe9 \xff"], dtype=object))
    with pytest.raises(InferenceServerException) as err:
        client.infer("ensemble_model", [inp])
    assert "TEXT is not valid UTF-8 (invalid continuation byte at byte 3)" in str(err.value)
    assert_still_serving(triton_server, tiny_reference)


def test_wrong_datatype(triton_server, tiny_reference):
    response = ensemble(triton_server, [123], datatype="INT32")
    assert response.status_code == 400
    assert (
        "data-type is 'INT32', but model 'ensemble_model' expects 'BYTES'"
        in response.json()["error"]
    )
    assert_still_serving(triton_server, tiny_reference)


def test_wrong_shape(triton_server, tiny_reference):
    response = ensemble(triton_server, [PROMPT], shape=[1, 1])
    assert response.status_code == 400
    assert (
        "unexpected shape for input 'TEXT' for model 'ensemble_model'. Expected [1], got [1,1]"
        in response.json()["error"]
    )
    assert_still_serving(triton_server, tiny_reference)


def test_several_texts_in_one_request(triton_server, tiny_reference):
    response = ensemble(triton_server, [PROMPT, "Hello world"])
    assert response.status_code == 400
    assert "Expected [1], got [2]" in response.json()["error"]
    assert_still_serving(triton_server, tiny_reference)


def test_load_8_clients_x_20_requests(triton_server, tiny_reference):
    tf_model, tok = tiny_reference
    prompts = [f"{[PROMPT, *CANDIDATES][i % 7]} {i}" for i in range(8)]
    expected = {p: reference_text_loop(tf_model, tok, p, 1)[1][0] for p in prompts}

    def client(prompt):
        session = requests.Session()
        return [
            infer_json(
                triton_server.url,
                "ensemble_model",
                {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": [prompt]}]},
                session=session,
            )["outputs"][0]["data"][0]
            for _ in range(20)
        ]

    with ThreadPoolExecutor(8) as pool:
        answers = dict(zip(prompts, pool.map(client, prompts)))
    assert sum(len(a) for a in answers.values()) == 160
    for prompt, got in answers.items():
        assert got == [expected[prompt]] * 20, prompt


def test_generate_stream_sends_each_token_as_it_comes(triton_server, tiny_reference):
    from tutorial.client import stream_generate

    tf_model, tok = tiny_reference
    events = list(stream_generate(triton_server.url, PROMPT, 30))
    ids = [i for _, piece_ids in events for i in piece_ids]
    assert ids == reference_generate(tf_model, tok, PROMPT, 30)
    assert len(events) >= 30  # one event per token (plus one if a character was held back)
    assert "".join(piece for piece, _ in events) == tok.decode(ids)
    assert (
        "".join(piece for piece, _ in events)
        == generate(triton_server, PROMPT, 30).json()["outputs"][0]["data"][0]
    )


def test_generate_stream_bad_input(triton_server):
    from tutorial.client import stream_generate
    from tutorial.common import TutorialError

    with pytest.raises(TutorialError, match="HTTP 400: TEXT is empty: send at least one character"):
        list(stream_generate(triton_server.url, "", 5))
    with pytest.raises(
        TutorialError, match="MAX_NEW_TOKENS must be one integer from 1 to 1000, got 0"
    ):
        list(stream_generate(triton_server.url, PROMPT, 0))


# --- one engine: streaming and non-streaming requests in one batch; cancellation ---


def counter_deltas(server, before):
    from tutorial.client import engine_counters

    after = engine_counters(server.metrics_url)
    return {name: value - before.get(name, 0) for name, value in after.items()}


def test_streaming_and_non_streaming_requests_share_one_engine_step(triton_server, tiny_reference):
    """One engine: a `generate` request (one response) sent while a `generate_stream` request is
    in flight joins the stream's decode steps, as the engine's own counters show, and both get
    transformers' tokens exactly."""
    from tutorial.client import engine_counters, stream_generate

    tf_model, tok = tiny_reference
    before = engine_counters(triton_server.metrics_url)
    assert set(before) == {
        "requests",
        "steps",
        "rows",
        "mixed_steps",
        "prefills",
        "prefill_calls",
        "prefill_chunks",
        "chunk_steps",
        "step_prefill_calls",
        "step_prefills",
        "cancelled",
        "queue_us",
        "first_token_us",
        "prefill_us",
        "step_us",
        "emit_us",
    }
    # The stream asks for 1000 tokens (the most a request may) and is closed once the other
    # request is answered: it outlives that request however slow this machine is.
    events = stream_generate(triton_server.url, "Hello world", 1000)
    _, streamed = next(events)  # the stream is in flight: its first token has come
    ids = generated_ids(generate(triton_server, PROMPT, 20))
    for _, piece in events:  # a few more tokens, then hang up
        streamed += piece
        if len(streamed) >= 40:
            break
    events.close()
    wait_for_engine_counter(triton_server.metrics_url, "cancelled", before["cancelled"] + 1)
    delta = counter_deltas(triton_server, before)
    assert ids == reference_generate(tf_model, tok, PROMPT, 20)
    assert streamed == reference_generate(tf_model, tok, "Hello world", len(streamed))
    assert len(streamed) >= 40 and delta["cancelled"] == 1  # it outlived the other request
    assert delta["prefills"] == 2
    # the 20-token request's 19 decode steps (its first token comes from its prefill) were all
    # steps of the stream's batch: one engine, one batch
    assert delta["mixed_steps"] == 19
    assert delta["rows"] == delta["steps"] + 19 and delta["steps"] >= 39
    # the engine timed itself: each request's first token came after its admission and after
    # the prefill that made it; the steps took time
    assert delta["first_token_us"] >= delta["queue_us"] + delta["prefill_us"] > 0
    assert delta["step_us"] > 0 and delta["emit_us"] > 0


def test_a_long_prompt_is_prefilled_in_chunks_beside_a_stream(triton_server, tiny_reference):
    """Chunked prefill as shipped (the committed prefill_chunk): a 1015-token prompt sent to
    `generate` while a stream decodes is prefilled in chunks, then joins the stream's decode
    steps; both get transformers' tokens exactly."""
    from tutorial.client import engine_counters, stream_generate
    from tutorial.common import REPO_ROOT
    from tutorial.repository import load_config

    config = load_config(REPO_ROOT / "model_repository/generate_stream/config.pbtxt")
    chunk = int(config.parameters["prefill_chunk"].string_value)
    assert 0 < chunk < 1015
    tf_model, tok = tiny_reference
    long = " hello" * 1015
    before = engine_counters(triton_server.metrics_url)
    # The stream is long (1000 tokens, the most a request may ask) so that it is still
    # decoding when the long request is done, however slow this machine is; the long request
    # needs 8 decode steps and a turn per chunk (32 chunks of the committed 32 tokens; at most
    # 64 with prefill_chunk_share, whose chunks hold at least 16).
    events = stream_generate(triton_server.url, "Hello world", 1000)
    _, streamed = next(events)  # the stream is in flight
    ids = generated_ids(generate(triton_server, long, 9))  # 1015 + 9 = the context
    streamed += [i for _, piece in events for i in piece]
    delta = counter_deltas(triton_server, before)
    assert ids == reference_generate(tf_model, tok, long, 9)
    assert streamed == reference_generate(tf_model, tok, "Hello world", 1000)
    # at least ceil(1015 / chunk) chunks: prefill_chunk_share may make them smaller
    assert delta["prefill_chunks"] >= -(-1015 // chunk)
    # the fp32 engine file runs each chunk in a decode step's call (the stream decodes all along)
    assert delta["chunk_steps"] == delta["prefill_chunks"]
    assert delta["prefills"] == 2 and delta["prefill_calls"] == 1  # the stream's short prompt
    assert delta["mixed_steps"] == 8  # the long request's 8 decode steps, all in the batch


def grpc_text_inputs(text, max_new_tokens):
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput("TEXT", [1], "BYTES")
    tensor.set_data_from_numpy(np.asarray([text.encode()], dtype=object))
    limit = grpcclient.InferInput("MAX_NEW_TOKENS", [1], "INT32")
    limit.set_data_from_numpy(np.asarray([max_new_tokens], dtype=np.int32))
    return [tensor, limit]


def wait_for(condition, what, timeout=60.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout:.0f} s"
        time.sleep(0.1)


def test_a_stream_closed_mid_way_leaves_the_batch(triton_server, tiny_reference):
    """A gRPC client closes its stream after the first of 1000 tokens: the engine sees the
    cancellation and the row leaves at the next step, instead of making the other 999."""
    import queue

    import tritonclient.grpc as grpcclient

    from tutorial.client import engine_counters

    before = engine_counters(triton_server.metrics_url)
    responses = queue.Queue()
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer("generate_stream", grpc_text_inputs("Hello world", 1000))
        result, error = responses.get(timeout=60)  # its first token: the request is in flight
        assert error is None, error
        client.stop_stream(cancel_requests=True)
        wait_for_engine_counter(triton_server.metrics_url, "cancelled", before["cancelled"] + 1)
    finally:
        client.close()
    delta = counter_deltas(triton_server, before)
    assert delta["cancelled"] == 1 and delta["prefills"] == 1
    assert delta["rows"] < 999  # the row left before making its 1000 tokens
    assert_still_serving(triton_server, tiny_reference)


def test_unloading_the_engine_leaves_no_request_unanswered(tiny_workdir):
    """The engine unloaded (explicit model control) with max_batch + 2 streams in flight, two of
    them still queued behind the batch's rows: each gets a final response. In Triton 24.10 the
    python backend finalizes a decoupled model once its requests are answered, so they are
    served to the end; the engine answers any it still holds at finalize with an error
    (tests/test_generate_engine.py checks that part)."""
    import requests
    import tritonclient.grpc as grpcclient

    from tutorial.client import engine_counters
    from tutorial.common import REPO_ROOT
    from tutorial.oci_deploy import triton_command
    from tutorial.repository import load_config
    from tutorial.triton_local import serve_artifact

    require_local_triton()
    config = load_config(REPO_ROOT / "model_repository/generate_stream/config.pbtxt")
    rows = int(config.parameters["max_batch"].string_value)
    cmd = [
        a.replace("--model-control-mode=none", "--model-control-mode=explicit")
        for a in triton_command()
    ]
    server = serve_artifact(
        tiny_workdir / "model_artifact.zip", cmd=[*cmd, "--load-model=*"], runtime="bundled"
    )
    streams = [{"tokens": 0, "final": False, "error": None} for _ in range(rows + 2)]

    def callback(state, result, error):
        if error is not None:
            state["error"], state["final"] = str(error), True
            return
        response = result.get_response()
        state["tokens"] += len(response.outputs) > 0
        final = response.parameters.get("triton_final_response")
        state["final"] = bool(final and final.bool_param)

    clients = []
    try:
        for state in streams:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            client.start_stream(callback=lambda result, error, s=state: callback(s, result, error))
            client.async_stream_infer(
                "generate_stream",
                grpc_text_inputs("Hello world", 1000),
                enable_empty_final_response=True,
            )
            clients.append(client)
        wait_for(lambda: sum(s["tokens"] > 0 for s in streams) == rows, f"{rows} streams starting")
        # and the last two have reached the engine (queued), not only left this process: a
        # request that reaches Triton after the unload began is refused as an unknown model
        wait_for(
            lambda: engine_counters(server.metrics_url).get("requests", 0) == rows + 2,
            f"{rows + 2} requests handed to the engine",
        )
        unload = requests.post(
            f"{server.url}/v2/repository/models/generate_stream/unload", timeout=60
        )
        assert unload.status_code == 200, unload.text
        wait_for(lambda: all(s["final"] for s in streams), "a final response to every stream", 300)
        assert streams == [{"tokens": 1000, "final": True, "error": None}] * (rows + 2)
        wait_for(
            lambda: requests.get(f"{server.url}/v2/models/generate_stream/ready").status_code
            != 200,
            "the engine unloading",
        )
    finally:
        for client in clients:
            client.stop_stream()
            client.close()
        server.stop()

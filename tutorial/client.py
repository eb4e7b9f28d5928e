"""Clients for the served pipeline and the in-process references they are checked against."""

from __future__ import annotations

import atexit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tutorial.common import TutorialError


def seed_payload(text: str) -> dict[str, Any]:
    """The seed walkthrough's JSON body for ``ensemble_model``, unchanged."""
    return {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": [text]}]}


def infer_json(
    url: str,
    model: str,
    payload: dict[str, Any],
    session: Any = None,
    timeout: float = 60.0,
    **kwargs: Any,
) -> dict[str, Any]:
    """POST a KServe v2 JSON request to Triton; raise with Triton's own message on an error."""
    import requests

    http = session or requests
    response = http.post(f"{url}/v2/models/{model}/infer", json=payload, timeout=timeout, **kwargs)
    if response.status_code != 200:
        raise TutorialError(f"{model} answered HTTP {response.status_code}: {response.text}")
    return response.json()


def next_token_requests(url: str, text: str, session: Any = None) -> str:
    """One ensemble call with plain ``requests`` and the seed's payload: the next token's text."""
    body = infer_json(url, "ensemble_model", seed_payload(text), session=session)
    return str(body["outputs"][0]["data"][0])


def next_token_tritonclient(client: Any, text: str) -> str:
    """One ensemble call with ``tritonclient.http``: the next token's text."""
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("TEXT", [1], "BYTES")
    inp.set_data_from_numpy(np.asarray([text.encode("utf-8")], dtype=object))
    result = client.infer(
        "ensemble_model", [inp], outputs=[httpclient.InferRequestedOutput("NEXT_TOKEN")]
    )
    return result.as_numpy("NEXT_TOKEN")[0].decode("utf-8")


def _event_lines(response: Any) -> Any:
    """The lines of a streamed response as each arrives. Triton sends every server-sent event
    as its own HTTP chunk; ``iter_lines`` would wait for 512 bytes (several events) before it
    yields, so token times would come in bursts."""
    if response.headers.get("Transfer-Encoding", "").lower() != "chunked":
        yield from (line for line in response.iter_lines(decode_unicode=True) if line)
        return
    pending = b""
    for chunk in response.raw.read_chunked(decode_content=True):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from (line.decode() for line in lines if line.strip())
    if pending.strip():
        yield pending.decode()


def stream_generate(url: str, text: str, max_new_tokens: int = 50, timeout: float = 60.0) -> Any:
    """Tokens from the decoupled `generate_stream` model as they come (HTTP server-sent events).

    Yields ``(text_piece, token_ids)`` per event; raises with Triton's message on an error.
    """
    import json

    import requests

    body = {"TEXT": text, "MAX_NEW_TOKENS": max_new_tokens}
    with requests.post(
        f"{url}/v2/models/generate_stream/generate_stream", json=body, stream=True, timeout=timeout
    ) as response:
        for line in _event_lines(response):
            if not line.startswith("data:"):
                continue
            event = json.loads(line.removeprefix("data:"))
            if "error" in event:
                raise TutorialError(
                    f"generate_stream answered HTTP {response.status_code}: {event['error']}"
                )
            ids = event["TOKEN_IDS"]
            yield event["GENERATED_TEXT"], ids if isinstance(ids, list) else [ids]


def text_loop(
    next_token: Callable[[str], str], prompt: str, new_tokens: int
) -> tuple[str, list[str]]:
    """The seed's client loop, fixed: the token text is appended as is (no extra space).

    Returns the whole text and the list of token texts, one per call.
    """
    from tqdm.auto import tqdm

    text, pieces = prompt, []
    for _ in tqdm(range(new_tokens), desc="tokens", leave=False):
        piece = next_token(text)
        pieces.append(piece)
        text += piece
    return text, pieces


def reference_text_loop(
    tf_model: Any, tokenizer: Any, prompt: str, new_tokens: int, max_context: int = 1024
) -> tuple[str, list[str]]:
    """What the ensemble loop should return, computed by transformers in this process:
    encode the whole text (keeping the last ``max_context`` tokens), take the greedy next
    token from the last position, append its decoded text, repeat."""
    text, pieces = prompt, []
    for _ in range(new_tokens):
        ids = tokenizer(text)["input_ids"][-max_context:]
        logits = tf_model(np.asarray([ids], dtype=np.int32)).logits.numpy()
        piece = tokenizer.decode([int(np.argmax(logits[0, -1]))])
        pieces.append(piece)
        text += piece
    return text, pieces


def reference_generate(tf_model: Any, tokenizer: Any, prompt: str, new_tokens: int) -> list[int]:
    """``generate(do_sample=False)`` from transformers: the new token ids."""
    ids = tokenizer(prompt)["input_ids"]
    out = tf_model.generate(
        np.asarray([ids], dtype=np.int32),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
    )
    return out.numpy()[0, len(ids) :].tolist()


def retokenizes_same(tokenizer: Any, prompt: str, token_ids: list[int]) -> bool:
    """Does decoding prompt + tokens and encoding the text again give the same ids?

    When it does not (BPE merges across the boundary), a text-in/text-out loop feeds the
    model a different sequence than the one it generated, and drifts from ``generate()``.
    """
    ids = tokenizer(prompt)["input_ids"] + list(token_ids)
    return tokenizer(tokenizer.decode(ids))["input_ids"] == ids


def model_stats(url: str, model: str) -> dict[str, Any]:
    """Triton's cumulative statistics of one model (``GET /v2/models/<m>/stats``)."""
    import requests

    response = requests.get(f"{url}/v2/models/{model}/stats", timeout=10)
    response.raise_for_status()
    return response.json()["model_stats"][0]


def engine_counters(metrics_url: str, model: str = "generate_stream") -> dict[str, int]:
    """The generation engine's own counters, read from Triton's Prometheus metrics
    (``generate_engine_<name>_total{model="generate_stream"}``): ``requests`` received, decode
    ``steps``, ``rows``,
    ``mixed_steps`` (streaming and non-streaming requests in one step), ``prefills``,
    ``prefill_calls`` (calls that prefilled whole prompts), ``prefill_chunks`` (chunks of long
    prompts), ``cancelled``; and where the time went, in microseconds summed: ``queue_us``
    (arrival to admission), ``first_token_us`` (arrival to first token sent), ``prefill_us``,
    ``step_us`` (decode steps), ``emit_us`` (handing tokens to Triton)."""
    import re

    import requests

    response = requests.get(metrics_url, timeout=10)
    response.raise_for_status()
    pattern = re.compile(
        rf'^generate_engine_(\w+)_total\{{model="{re.escape(model)}"\}} (\S+)$', re.M
    )
    return {name: int(float(value)) for name, value in pattern.findall(response.text)}


def wait_for_engine_counter(
    metrics_url: str, name: str, value: int, timeout: float = 60.0
) -> dict[str, int]:
    """The engine's counters (:func:`engine_counters`) once ``name`` has reached ``value``;
    raises after ``timeout`` seconds. A cancelled request leaves the batch at the engine's next
    step, so its ``cancelled`` count goes up a moment after the client hangs up."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        counters = engine_counters(metrics_url)
        if counters.get(name, 0) >= value:
            return counters
        if time.monotonic() > deadline:
            raise TutorialError(
                f"The engine's {name} counter stayed at {counters.get(name, 0)} for "
                f"{timeout:.0f} s (waited for {value}): see the server's log."
            )
        time.sleep(0.1)


def stats_table(url: str, models: list[str]) -> list[dict[str, Any]]:
    """Per model: requests served and mean ms per request in queue and in compute."""
    rows = []
    for model in models:
        stats = model_stats(url, model)["inference_stats"]
        count = int(stats["success"]["count"]) or 1

        def ms(key: str, stats: dict = stats, count: int = count) -> float:
            return int(stats[key]["ns"]) / count / 1e6

        rows.append(
            {
                "model": model,
                "requests": int(stats["success"]["count"]),
                "queue_ms": round(ms("queue"), 3),
                "compute_input_ms": round(ms("compute_input"), 3),
                "compute_infer_ms": round(ms("compute_infer"), 3),
                "compute_output_ms": round(ms("compute_output"), 3),
            }
        )
    return rows


def launch_local_triton(repository: Path, **kwargs: Any) -> Any:
    """Start a local Triton for a notebook: stopped by :meth:`stop`, and in any case when the
    kernel exits (also after a failed cell), so no server outlives the notebook."""
    from tutorial.triton_local import launch_triton

    server = launch_triton(repository, **kwargs)
    atexit.register(server.stop)
    return server


def serve_local_artifact(zip_path: Path, **kwargs: Any) -> Any:
    """:func:`tutorial.triton_local.serve_artifact` for a notebook: the artifact zip served as
    OCI serves it, stopped by :meth:`stop` or in any case when the kernel exits."""
    from tutorial.triton_local import serve_artifact

    server = serve_artifact(zip_path, **kwargs)
    atexit.register(server.stop)
    return server

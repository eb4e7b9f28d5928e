"""The server's engine run in this process (tutorial.engine_local), as the benchmark's
in-process floor runs it: transformers' tokens, and the plain loop's."""

from __future__ import annotations

import json

import pytest

PROMPT = "My dog is cute, but he barks a lot."


@pytest.mark.slow
def test_the_engine_in_process_makes_transformers_tokens(tiny_workdir, tiny_reference):
    from tutorial.client import reference_generate
    from tutorial.engine_local import LocalEngine
    from tutorial.export import greedy_with_past, ort_session

    tf_model, tok = tiny_reference
    path = json.loads((tiny_workdir / "state.json").read_text())["onnx"]["with_past"]
    ids = tok(PROMPT)["input_ids"]
    engine = LocalEngine(path, eos=tok.eos_token_id)
    try:
        times: list[float] = []
        tokens = engine.generate(ids, 20, times)
        again = engine.generate(ids, 20)
    finally:
        engine.close()
    assert not engine.engine.thread.is_alive()
    assert tokens == again == reference_generate(tf_model, tok, PROMPT, 20)
    assert len(times) == len(tokens) + 1 and times == sorted(times)  # submitted, then each token
    plain = greedy_with_past(ort_session(path), ids, 20, eos_token_id=tok.eos_token_id)
    assert plain == tokens

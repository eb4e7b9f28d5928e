"""Notebook 02's checks, each run as a child process like the export's stages.

A check loads TensorFlow, onnxruntime sessions or whole ONNX graphs: on gpt2-large that is
several GB at once, which a notebook kernel would keep (TensorFlow never gives memory back
inside a process). ``helpers.run_export_check(NAME, log_dir=..., **arguments)`` runs
``python -m tutorial.export_checks NAME ARGUMENTS.json RESULT.json`` with its memory sampled
(:func:`tutorial.export.run_monitored`) and returns what the check returned, with the figures.
The notebook prints each function's source, and asserts on its result.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tutorial.export_past import say


def logits_parity(
    model_dir: str, vocab_dir: str, onnx: str, prompts: list[str], rows: str
) -> dict[str, Any]:
    """Every position's logits of ``onnx`` (model.onnx) against TensorFlow's, on each prompt.
    The last position's row of each goes to ``rows`` (npz) for the trimmed model's check."""
    from tutorial.export import ort_logits, ort_session
    from tutorial.model_source import load_tf_model, load_tokenizer

    tok = load_tokenizer(Path(vocab_dir))
    tf_model = load_tf_model(Path(model_dir))
    session = ort_session(Path(onnx))
    diffs, lengths, last_rows = {}, {}, {}
    for i, prompt in enumerate(prompts):
        ids = tok(prompt)["input_ids"]
        tf_logits = tf_model(np.asarray([ids], dtype=np.int32)).logits.numpy()
        onnx_logits = ort_logits(session, ids)
        vocab = tf_model.config.vocab_size
        assert onnx_logits.shape == tf_logits.shape == (1, len(ids), vocab), onnx_logits.shape
        diffs[prompt] = float(np.abs(onnx_logits - tf_logits).max())
        lengths[prompt] = len(ids)
        last_rows[f"p{i}"] = onnx_logits[:, -1]
        say(f"{len(ids)} tokens: max |ONNX - TF| = {diffs[prompt]:.2e}")
    np.savez(rows, **last_rows)
    return {"diffs": diffs, "lengths": lengths}


def trimmed_parity(
    full: str, last: str, vocab_dir: str, prompts: list[str], rows: str
) -> dict[str, Any]:
    """Trim ``full`` to ``last_logits`` (written to ``last``); on each prompt, is its output
    equal to the last row of the full model's logits (``rows``, from :func:`logits_parity`)?"""
    from tutorial.export import ort_logits, ort_session
    from tutorial.model_source import load_tokenizer
    from tutorial.onnx_surgery import trim_to_last_logits

    signature = trim_to_last_logits(Path(full), Path(last))
    tok = load_tokenizer(Path(vocab_dir))
    session = ort_session(Path(last))
    expected = np.load(rows)
    equal = {}
    for i, prompt in enumerate(prompts):
        row = ort_logits(session, tok(prompt)["input_ids"], "last_logits")
        equal[prompt] = bool(np.array_equal(row, expected[f"p{i}"]))
    return {"signature": signature, "equal": equal}


def greedy_parity(
    model_dir: str, vocab_dir: str, with_past: str, prompt: str, new_tokens: int
) -> dict[str, Any]:
    """Greedy tokens of the with-past model (prefill, then one token a step with the cache it
    returns) and of transformers' ``generate(do_sample=False)``, from ``prompt``."""
    from tutorial.export import greedy_with_past, ort_session
    from tutorial.model_source import load_tf_model, load_tokenizer

    tok = load_tokenizer(Path(vocab_dir))
    prompt_ids = tok(prompt)["input_ids"]
    onnx_tokens = greedy_with_past(ort_session(Path(with_past)), prompt_ids, new_tokens)
    say(f"onnxruntime: {onnx_tokens}")
    tf_model = load_tf_model(Path(model_dir))
    tf_tokens = (
        tf_model.generate(
            np.asarray([prompt_ids], dtype=np.int32),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=50256,
        )
        .numpy()[0, len(prompt_ids) :]
        .tolist()
    )
    return {
        "prompt_ids": prompt_ids,
        "onnx_tokens": onnx_tokens,
        "tf_tokens": tf_tokens,
        "text": tok.decode(onnx_tokens),
    }


def int8_against_fp32(
    fp32: str, int8: str, prompt_ids: list[int], fp32_tokens: list[int], new_tokens: int
) -> dict[str, Any]:
    """Quantize ``fp32`` to ``int8`` (:func:`tutorial.export.quantize_int8`), then compare:
    greedy tokens against ``fp32_tokens``, and int8's logits against fp32's on the same tokens
    (:func:`tutorial.export.int8_logit_error`)."""
    from tutorial.export import greedy_with_past, int8_logit_error, ort_session, quantize_int8

    say("quantizing")
    signature = quantize_int8(Path(fp32), Path(int8))
    int8_session = ort_session(Path(int8))
    int8_tokens = greedy_with_past(int8_session, prompt_ids, new_tokens)
    same = sum(a == b for a, b in zip(int8_tokens, fp32_tokens))
    say("int8 logits against fp32's")
    error = int8_logit_error(ort_session(Path(fp32)), int8_session, [prompt_ids], new_tokens)
    return {
        "signature": signature,
        "int8_tokens": int8_tokens,
        "same": same,
        "agreement": same / len(fp32_tokens),
        "error": error,
    }


#: ``python -m tutorial.export_checks NAME ...`` runs ``CHECKS[NAME]``.
CHECKS = {
    "logits": logits_parity,
    "trim": trimmed_parity,
    "greedy": greedy_parity,
    "int8": int8_against_fp32,
}


def main(argv: list[str] | None = None) -> None:
    name, arguments, result = argv or sys.argv[1:]
    out = CHECKS[name](**json.loads(Path(arguments).read_text()))
    Path(result).write_text(json.dumps(out, indent=1))
    say(f"wrote {result}")


if __name__ == "__main__":
    main()

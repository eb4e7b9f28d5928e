"""Triton python backend: TEXT -> input_ids, attention_mask (GPT-2's byte-level BPE).

Uses the fast tokenizer (the `tokenizers` package) on the vocab.json and merges.txt beside
this file. No TensorFlow, no network, and nothing is written here: OCI mounts the model
folder read-only.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import ByteLevelBPETokenizer

END_OF_TEXT = "<|endoftext|>"


def read_text(tensor) -> str:
    """The single string of a TEXT tensor, or ValueError with what is wrong."""
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise ValueError(f"TEXT must hold exactly one string, got {values.size}")
    value = values[0]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"TEXT is not valid UTF-8 ({exc.reason} at byte {exc.start})"
            ) from None
    if not isinstance(value, str) or value == "":
        raise ValueError("TEXT is empty: send at least one character")
    return value


class TritonPythonModel:
    def initialize(self, args):
        here = Path(args["model_repository"]) / args["model_version"]
        config = json.loads(args["model_config"])
        self.max_tokens = int(config["parameters"]["max_context_tokens"]["string_value"])
        if not (here / "vocab.json").is_file():
            raise pb_utils.TritonModelException(
                f"{config['name']}: no vocab.json beside model.py. This is the committed template "
                "of the model repository; run notebooks/03_model_repository.ipynb, which "
                "assembles the repository to serve (weights, vocab files, shapes)."
            )
        self.tokenizer = ByteLevelBPETokenizer(str(here / "vocab.json"), str(here / "merges.txt"))
        self.tokenizer.add_special_tokens([END_OF_TEXT])  # as GPT-2's tokenizer treats it
        self.dtypes = {
            out["name"]: pb_utils.triton_string_to_numpy(out["data_type"])
            for out in config["output"]
        }

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                text = read_text(pb_utils.get_input_tensor_by_name(request, "TEXT"))
            except ValueError as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)  # HTTP 400
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            # Longer than the context: keep the last max_context_tokens tokens (documented).
            ids = self.tokenizer.encode(text).ids[-self.max_tokens :]
            input_ids = np.asarray([ids], dtype=self.dtypes["input_ids"])
            mask = np.ones_like(input_ids, dtype=self.dtypes["attention_mask"])
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("input_ids", input_ids),
                        pb_utils.Tensor("attention_mask", mask),
                    ]
                )
            )
        return responses

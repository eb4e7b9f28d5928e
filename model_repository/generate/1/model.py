"""Triton python backend (BLS): greedy generation with a KV cache, the loop on the server.

Serves both `generate` (one response with all tokens) and, in decoupled mode, `generate_stream`
(one response per token as it comes); `generate_stream/1/model.py` links to this file.

One request in, N tokens out: tokenize once, prefill through `gpt2_with_past` with an empty
cache, then feed one token per step with the cache it returned. The ONNX model does the math
(on the GPU in a GPU deployment); this model only loops. Imports nothing from the repository.
"""

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import ByteLevelBPETokenizer

END_OF_TEXT = "<|endoftext|>"


class InputError(ValueError):
    """A request the client must fix (answered with HTTP 400)."""


#: Where the python backend keeps the tensors it passes between Triton and this process.
SHM_PATH = "/dev/shm"


def shm_bytes(path=SHM_PATH):
    """The size of the shared-memory filesystem (a container's default is 64 MB)."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_blocks * stats.f_frsize


def shm_problem(tokens, cache_bytes_per_token, copies, available):
    """Why a request of ``tokens`` tokens (prompt plus new) would not fit in shared memory, or
    None. Each step holds ``copies`` KV caches of that length in /dev/shm at once."""
    if available is None:
        return None
    needed = tokens * cache_bytes_per_token * copies
    if needed <= available:
        return None
    fits = max(0, available // (cache_bytes_per_token * copies))
    return (
        f"this request needs about {needed / 2**20:.0f} MiB of shared memory for its KV cache "
        f"({tokens} tokens: prompt plus MAX_NEW_TOKENS), but {SHM_PATH} holds "
        f"{available / 2**20:.0f} MiB (at most about {fits} tokens fit): send a shorter prompt "
        f"or fewer MAX_NEW_TOKENS, or give the server more shared memory "
        f"(docker run --shm-size=2g; see the README's troubleshooting)"
    )


def read_text(request) -> str:
    values = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
    if values.size != 1:
        raise InputError(f"TEXT must hold exactly one string, got {values.size}")
    value = values[0]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(
                f"TEXT is not valid UTF-8 ({exc.reason} at byte {exc.start})"
            ) from None
    if not isinstance(value, str) or value == "":
        raise InputError("TEXT is empty: send at least one character")
    return value


class TritonPythonModel:
    def initialize(self, args):
        here = Path(args["model_repository"]) / args["model_version"]
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        self.step_model = params["step_model"]
        self.default_new = int(params["default_max_new_tokens"])
        self.limit = int(params["max_new_tokens_limit"])
        self.context = int(params["max_context_tokens"])
        if "empty_past_shape" not in params:
            raise pb_utils.TritonModelException(
                f"{config['name']}: parameter 'empty_past_shape' is not set. This is the "
                "committed template of the model repository; run notebooks/03_model_repository"
                ".ipynb, which assembles the repository to serve (weights, vocab files, shapes)."
            )
        self.past_shape = [int(d) for d in params["empty_past_shape"].split(",")]
        # Bytes of KV cache per token: n_layer * 2 * n_head * head_dim float32 values.
        n_layer, two, _, n_head, _, head_dim = self.past_shape
        self.cache_bytes_per_token = n_layer * two * n_head * head_dim * 4
        # KV caches of a request's length in /dev/shm at once during a step (parameter
        # shm_caches_per_step, explained in config.pbtxt).
        self.shm_copies = int(params.get("shm_caches_per_step", "8"))
        self.shm_available = shm_bytes()
        self.tokenizer = ByteLevelBPETokenizer(str(here / "vocab.json"), str(here / "merges.txt"))
        self.tokenizer.add_special_tokens([END_OF_TEXT])
        self.eos = self.tokenizer.token_to_id(END_OF_TEXT)
        # The same file serves `generate` (one response) and `generate_stream` (decoupled).
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)

    def max_new_tokens(self, request) -> int:
        tensor = pb_utils.get_input_tensor_by_name(request, "MAX_NEW_TOKENS")
        if tensor is None:
            return self.default_new
        values = tensor.as_numpy().reshape(-1)
        if values.size != 1 or not (1 <= int(values[0]) <= self.limit):
            got = values.tolist() if values.size != 1 else int(values[0])
            raise InputError(
                f"MAX_NEW_TOKENS must be one integer from 1 to {self.limit}, got {got}"
            )
        return int(values[0])

    def step(self, ids, length, past):
        """One call of the ONNX model through BLS: logits of the last position, new cache."""
        inputs = [
            pb_utils.Tensor("input_ids", np.asarray([ids], dtype=np.int32)),
            pb_utils.Tensor("attention_mask", np.ones((1, length), dtype=np.int32)),
            past,
        ]
        request = pb_utils.InferenceRequest(
            model_name=self.step_model,
            requested_output_names=["logits", "present"],
            inputs=inputs,
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
        )
        response = request.exec()
        if response.has_error():
            message = response.error().message()
            if "shared memory" in message:  # the python backend could not grow its region
                size = self.shm_available
                raise RuntimeError(
                    f"{SHM_PATH} is full ({size / 2**20:.0f} MiB in all): the KV cache of "
                    f"{length} tokens did not fit. Send a shorter prompt or fewer "
                    "MAX_NEW_TOKENS, or give the server more shared memory (docker run "
                    f"--shm-size=2g; see the README's troubleshooting). Triton said: {message}"
                )
            raise RuntimeError(f"{self.step_model} failed: {message}")
        logits = pb_utils.get_output_tensor_by_name(response, "logits").as_numpy()
        present = pb_utils.get_output_tensor_by_name(response, "present")
        # The cache goes back in as `past` without a copy in this process (DLPack view).
        return logits, pb_utils.Tensor.from_dlpack("past", present.to_dlpack())

    def prepare(self, request):
        """Check the request; return the prompt's token ids and how many tokens to make."""
        text = read_text(request)
        max_new = self.max_new_tokens(request)
        prompt = self.tokenizer.encode(text).ids[-(self.context - 1) :]
        tokens = min(len(prompt) + max_new, self.context)
        problem = shm_problem(
            tokens, self.cache_bytes_per_token, self.shm_copies, self.shm_available
        )
        if problem:
            raise InputError(problem)
        return prompt, max_new

    def tokens(self, prompt, max_new):
        """Greedy tokens, one per step: prefill with an empty cache, then one token a step."""
        past = pb_utils.Tensor("past", np.zeros(self.past_shape, dtype=np.float32))
        ids, length, count = prompt, len(prompt), 0
        while count < max_new and length <= self.context:
            logits, past = self.step(ids, length, past)
            token = int(np.argmax(logits[0]))
            count += 1
            yield token
            if token == self.eos or length == self.context:
                return
            ids, length = [token], length + 1

    @staticmethod
    def outputs(text, ids):
        return [
            pb_utils.Tensor("GENERATED_TEXT", np.asarray([text.encode("utf-8")], dtype=object)),
            pb_utils.Tensor("TOKEN_IDS", np.asarray(ids, dtype=np.int64)),
        ]

    def stream(self, request):
        """Decoupled mode: one response per token as it comes, then a final flag.

        Each response carries the new text since the last one; a token that ends inside a
        multi-byte character is held back until the character is complete, so the pieces
        joined equal the non-streaming GENERATED_TEXT.
        """
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            prompt, max_new = self.prepare(request)
            new, sent = [], ""
            for token in self.tokens(prompt, max_new):
                new.append(token)
                text = self.tokenizer.decode(new, skip_special_tokens=False)
                piece = "" if text.endswith("\ufffd") else text[len(sent) :]
                sent += piece
                sender.send(pb_utils.InferenceResponse(output_tensors=self.outputs(piece, [token])))
            text = self.tokenizer.decode(new, skip_special_tokens=False)
            if text != sent:
                sender.send(
                    pb_utils.InferenceResponse(output_tensors=self.outputs(text[len(sent) :], []))
                )
            sender.send(flags=final)
        except InputError as exc:
            error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
            sender.send(pb_utils.InferenceResponse(error=error), flags=final)
        except Exception as exc:
            sender.send(
                pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))), flags=final
            )

    def generate(self, request):
        new = list(self.tokens(*self.prepare(request)))
        return self.outputs(self.tokenizer.decode(new, skip_special_tokens=False), new)

    def execute(self, requests):
        if self.decoupled:
            for request in requests:
                self.stream(request)
            return None
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=self.generate(request)))
            except InputError as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
            except Exception as exc:  # the step model's own error, passed on
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses

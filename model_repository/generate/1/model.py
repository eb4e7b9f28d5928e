"""Triton python backend: `generate`, one response with every token, for Triton's `/infer` (and
OCI's `/predict`, which maps to it).

It holds no weights and no tokenizer: each request is forwarded, unchanged, to the server's one
generation engine, the decoupled model `generate_stream` (`../../generate_stream/1/model.py`),
through BLS with the request parameter ``"stream": false``, so streaming and non-streaming
requests share the engine's batch, its one onnxruntime session and its one copy of the
weights. Triton's HTTP `/infer` does not serve a decoupled model, hence this model in front.

`execute` hands each request to a thread of its own and returns; the thread waits for the
engine's answer and sends it through the request's response sender, so requests that arrive
while others are in flight reach the engine at once. Imports nothing from the repository.
"""

import json
import threading

import triton_python_backend_utils as pb_utils

OUTPUTS = ["GENERATED_TEXT", "TOKEN_IDS"]
#: Error codes the engine names at the start of its messages to `generate` (see engine_error).
CODES = ("INVALID_ARG", "UNAVAILABLE", "CANCELLED", "INTERNAL")


def engine_error(message):
    """The engine's error as this model's: the python backend of Triton 24.10 hands a BLS caller
    every error as INTERNAL (HTTP 500), so the engine starts its messages to `generate` with
    the code ("INVALID_ARG: MAX_NEW_TOKENS must be ..."), and the code is restored here (a bad
    request is then HTTP 400, as it is from the engine directly)."""
    name, _, rest = message.partition(": ")
    if name in CODES and rest:
        return pb_utils.TritonError(rest, getattr(pb_utils.TritonError, name))
    return pb_utils.TritonError(message)


def release_after_cleanup(responses, sender):
    """Let the last reference to a finished BLS response iterator go here, holding the GIL.

    The python backend's stub also keeps each decoupled BLS iterator, and drops it from a C++
    thread of its own once it has told Triton the iterator is finished (the "cleanup" message,
    queued by the iterator's last ``next``). If the model has let its own reference go by
    then, the iterator and its responses' numpy arrays are freed on that thread without the
    GIL: Python 3.12 crashes there (the stub segfaults; Triton answers "Stub process ... is not
    healthy"), as any extension freeing Python objects without the GIL does on 3.12 (e.g.
    github.com/ska-sa/spead2/issues/230). ``sender.is_cancelled()`` is a synchronous round trip
    through the same queue and thread, so when it returns the cleanup has been handled and the
    reference dropped here is the last one.
    """
    if responses is None:
        return
    try:
        sender.is_cancelled()
    except Exception as exc:  # nothing to wait for: the request is gone
        pb_utils.Logger.log_warn(f"generate: is_cancelled failed: {exc}")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.name = config["name"]
        self.engine = params.get("engine_model", "generate_stream")
        if pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(
                f"{self.name} must not be decoupled: it answers /infer, which refuses "
                "decoupled models"
            )

    def forward(self, inputs, sender):
        """One request through the engine; its one answer (or its error) to ``sender``."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        responses = None
        try:
            request = pb_utils.InferenceRequest(
                model_name=self.engine,
                inputs=inputs,
                requested_output_names=OUTPUTS,
                parameters={"stream": False},
            )
            outputs, error = None, None
            responses = request.exec(decoupled=True)
            for response in responses:
                if response.has_error():
                    error = response.error()
                    continue
                tensors = [pb_utils.get_output_tensor_by_name(response, n) for n in OUTPUTS]
                if all(t is not None for t in tensors):
                    outputs = [pb_utils.Tensor(n, t.as_numpy()) for n, t in zip(OUTPUTS, tensors)]
            if error is not None:
                answer = pb_utils.InferenceResponse(error=engine_error(error.message()))
            elif outputs is None:
                answer = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{self.engine} answered without tokens")
                )
            else:
                answer = pb_utils.InferenceResponse(output_tensors=outputs)
        except Exception as exc:
            answer = pb_utils.InferenceResponse(
                error=pb_utils.TritonError(f"{self.name}: {self.engine} failed: {exc}")
            )
        release_after_cleanup(responses, sender)
        try:
            sender.send(answer, flags=final)
        except Exception as exc:  # the client went away: nothing left to tell it
            pb_utils.Logger.log_warn(f"{self.name}: could not send a response: {exc}")

    def execute(self, requests):
        for request in requests:
            # Copies: the request's own tensors are released once execute returns.
            inputs = [pb_utils.Tensor(t.name(), t.as_numpy()) for t in request.inputs()]
            sender = request.get_response_sender()
            threading.Thread(
                target=self.forward, args=(inputs, sender), name="generate-forward", daemon=True
            ).start()
        return None

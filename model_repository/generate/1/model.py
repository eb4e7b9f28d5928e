"""Triton python backend: greedy generation with a KV cache, the loop on the server, with
in-flight batching of concurrent requests.

Serves both `generate` (one response with all tokens) and, in decoupled mode, `generate_stream`
(one response per token as it comes); `generate_stream/1/model.py` loads this file.

One request in, N tokens out: tokenize once, prefill the prompt (alone), then one token per
step with the cache of the steps before. `execute` only checks a request and hands it to the
engine thread, which runs every request in flight as one batch: one step makes the next token
of each of them, reading the model's weights once for all (a decode step is bound by reading
the weights, so a step over 8 rows costs little more than a step over 1). A request joins at
the step after its prefill and leaves when it stops; its row's attention mask and positions
are its own (the ONNX model derives positions from the mask), so it gets the tokens it gets
alone. Imports nothing from the repository.

Who computes a step (parameter `step_runner`):
  onnxruntime  this process runs the same ONNX file as `gpt2_with_past` in an onnxruntime
               session (IO binding; on a GPU the cache stays on the device), no hop per step;
  bls          each step is a BLS call to `gpt2_with_past` (the cache crosses /dev/shm).
"""

import json
import os
import queue
import threading
import time
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


# --- who computes a step ---------------------------------------------------------------------


class BlsRunner:
    """A step is a BLS call to the step model (`gpt2_with_past`); the cache crosses /dev/shm."""

    uses_shm = True

    def __init__(self, step_model, shm_available):
        self.step_model = step_model
        self.shm_available = shm_available

    def numpy(self, cache):
        return cache if isinstance(cache, np.ndarray) else cache.as_numpy()

    def run(self, ids, mask, past):
        """logits [batch, vocab] of the last position, and the new cache (opaque)."""
        if isinstance(past, np.ndarray):
            past = pb_utils.Tensor("past", np.ascontiguousarray(past))
        else:  # the step model's `present`, sent back without a copy here (DLPack view)
            past = pb_utils.Tensor.from_dlpack("past", past.to_dlpack())
        request = pb_utils.InferenceRequest(
            model_name=self.step_model,
            requested_output_names=["logits", "present"],
            inputs=[
                pb_utils.Tensor("input_ids", ids),
                pb_utils.Tensor("attention_mask", mask),
                past,
            ],
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
        )
        response = request.exec()
        if response.has_error():
            message = response.error().message()
            if "shared memory" in message:  # the python backend could not grow its region
                size = self.shm_available or 0
                raise RuntimeError(
                    f"{SHM_PATH} is full ({size / 2**20:.0f} MiB in all): the KV cache of "
                    f"{mask.shape[0]} x {mask.shape[1]} tokens did not fit. Send a shorter "
                    "prompt or fewer MAX_NEW_TOKENS, or give the server more shared memory "
                    "(docker run --shm-size=2g; see the README's troubleshooting). Triton said: "
                    f"{message}"
                )
            raise RuntimeError(f"{self.step_model} failed: {message}")
        logits = pb_utils.get_output_tensor_by_name(response, "logits").as_numpy()
        return logits, pb_utils.get_output_tensor_by_name(response, "present")


class SessionRunner:
    """A step runs in this process on an onnxruntime session of the step model's ONNX file:
    no hop, no /dev/shm. IO binding keeps the cache where it was made (the GPU's memory when
    onnxruntime has CUDA), and the session is created at the first request."""

    uses_shm = False

    def __init__(self, path, threads):
        self.path = path
        self.threads = threads
        self.session = None
        self.device = "cpu"
        self.keep = []  # what the last step's binding points to (see run)

    def open(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        cpu = ["CPUExecutionProvider"]
        # The image's onnxruntime-gpu lists the CUDA provider on every shape; use it where the
        # machine has an NVIDIA GPU, and fall back to the CPU where it cannot start.
        if (
            "CUDAExecutionProvider" in ort.get_available_providers()
            and Path("/dev/nvidiactl").exists()
        ):
            try:
                self.session = ort.InferenceSession(
                    str(self.path), options, providers=["CUDAExecutionProvider", *cpu]
                )
            except Exception as exc:
                pb_utils.Logger.log_warn(f"generate: onnxruntime's CUDA provider failed: {exc}")
        if self.session is None:
            self.session = ort.InferenceSession(str(self.path), options, providers=cpu)
        if self.session.get_providers()[0] == "CUDAExecutionProvider":
            self.device = "cuda"
        pb_utils.Logger.log_info(
            f"generate: onnxruntime {ort.__version__} runs {self.path.parent.parent.name}/"
            f"{self.path.parent.name}/{self.path.name} in-process on {self.device}"
        )

    def numpy(self, cache):
        return cache if isinstance(cache, np.ndarray) else cache.numpy()

    def run(self, ids, mask, past):
        if self.session is None:
            self.open()
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        if isinstance(past, np.ndarray):
            past = np.ascontiguousarray(past)
            binding.bind_cpu_input("past", past)
        else:
            binding.bind_ortvalue_input("past", past)
        binding.bind_output("logits", "cpu")
        binding.bind_output("present", self.device, 0)
        self.session.run_with_iobinding(binding)
        logits, present = binding.get_outputs()
        # onnxruntime 1.19 (Triton 24.10's) does not keep alive what a binding points to: the
        # inputs and this binding (which owns `present`, the next step's past) stay referenced
        # until the next step has run.
        self.keep = [binding, ids, mask, past]
        return logits.numpy(), present


# --- the engine: requests in flight, one batch per step --------------------------------------


class Job:
    """One request in flight: its prompt, its limits, and where its tokens go."""

    def __init__(self, prompt, max_new, emit, finish):
        self.prompt = prompt
        self.max_new = max_new
        self.emit = emit  # called with each new token id
        self.finish = finish  # called once: with None, or with the error
        self.count = 0
        self.length = len(prompt)  # tokens in the cache after the last step
        self.last = None
        self.done = False
        self.error = None

    def planned(self, context):
        return min(len(self.prompt) + self.max_new, context)


class Engine:
    """Runs every request in flight as one batch, in a thread of its own.

    ``max_batch`` rows at most (1 means one request at a time, in arrival order: the
    `inflight_batching` "off" switch); an idle engine waits up to ``join_wait_s`` for more
    requests before its first step.
    """

    def __init__(self, runner, past_shape, eos, context, max_batch, join_wait_s, fits):
        self.runner = runner
        self.past_shape = past_shape
        self.eos = eos
        self.context = context
        self.max_batch = max_batch
        self.join_wait_s = join_wait_s
        self.fits = fits  # fits(rows, tokens): may a batch of rows x tokens run now?
        self.pending = queue.Queue()
        self.waiting = []  # taken from the queue, not yet admitted (did not fit)
        self.active = []
        self.cache = None
        self.mask = None
        self.stopping = False
        self.thread = threading.Thread(target=self.loop, name="generate-engine", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def submit(self, job):
        self.pending.put(job)

    def stop(self):
        self.stopping = True
        self.pending.put(None)
        self.thread.join(timeout=30)

    # -- the loop --

    def take(self, block):
        """Requests to admit before the next step (at most max_batch in all)."""
        free = self.max_batch - len(self.active)
        taken, deadline = [], None
        while len(taken) < free:
            if self.waiting:
                taken.append(self.waiting.pop(0))
                continue
            try:
                if block and not taken:
                    job = self.pending.get()
                    deadline = time.monotonic() + self.join_wait_s
                elif deadline is not None and deadline > time.monotonic():
                    job = self.pending.get(timeout=deadline - time.monotonic())
                else:
                    job = self.pending.get_nowait()
            except queue.Empty:
                break
            if job is None:
                break
            taken.append(job)
        return taken

    def loop(self):
        while not self.stopping:
            try:
                self.turn()
            except Exception as exc:  # never lose the thread: fail what is in flight, go on
                pb_utils.Logger.log_error(f"generate engine: {exc!r}")
                for job in self.active:
                    job.finish(exc)
                self.active, self.cache, self.mask = [], None, None
        for job in self.active + self.waiting:
            job.finish(RuntimeError("the server is shutting down"))

    def turn(self):
        """Admit what waits (prefill each), then one decode step for the batch."""
        for job in self.take(block=not self.active):
            if self.stopping:
                job.finish(RuntimeError("the server is shutting down"))
                continue
            rows = len(self.active) + 1
            longest = max(j.planned(self.context) for j in [job, *self.active])
            if self.active and not self.fits(rows, longest):
                self.waiting.append(job)  # joins when rows have left
                continue
            self.prefill(job)
        if self.active:
            self.decode()

    def advance(self, job, token):
        job.count += 1
        job.last = token
        job.done = token == self.eos or job.length >= self.context or job.count >= job.max_new
        try:
            job.emit(token)
        except Exception as exc:  # a stream whose client went away: the row leaves
            job.error, job.done = exc, True

    def prefill(self, job):
        """The prompt alone, with an empty cache; then the row joins the batch."""
        shape = list(self.past_shape)
        shape[2], shape[4] = 1, 0
        try:
            ids = np.asarray([job.prompt], dtype=np.int32)
            mask = np.ones((1, len(job.prompt)), dtype=np.int32)
            logits, present = self.runner.run(ids, mask, np.zeros(shape, np.float32))
            self.advance(job, int(np.argmax(logits[0])))
        except Exception as exc:
            job.finish(exc)
            return
        if job.done:
            job.finish(job.error)
            return
        if not self.active:
            self.active, self.cache, self.mask = [job], present, mask
            return
        # Pad the shorter side on the left (mask 0) to a common length, then stack the rows.
        batch = self.runner.numpy(self.cache)
        row = self.runner.numpy(present)
        gap = batch.shape[4] - row.shape[4]
        if gap > 0:
            row = np.pad(row, [(0, 0)] * 4 + [(gap, 0), (0, 0)])
            mask = np.pad(mask, [(0, 0), (gap, 0)])
        elif gap < 0:
            batch = np.pad(batch, [(0, 0)] * 4 + [(-gap, 0), (0, 0)])
            self.mask = np.pad(self.mask, [(0, 0), (-gap, 0)])
        self.cache = np.concatenate([batch, row], axis=2)
        self.mask = np.concatenate([self.mask, mask], axis=0)
        self.active.append(job)

    def decode(self):
        """One step for every row: each row's last token in, each row's next token out."""
        ids = np.asarray([[job.last] for job in self.active], dtype=np.int32)
        mask = np.pad(self.mask, [(0, 0), (0, 1)], constant_values=1)
        try:
            logits, present = self.runner.run(ids, mask, self.cache)
        except Exception as exc:  # every row of the failed step gets the error
            for job in self.active:
                job.finish(exc)
            self.active, self.cache, self.mask = [], None, None
            return
        for i, job in enumerate(self.active):
            job.length += 1
            self.advance(job, int(np.argmax(logits[i])))
        self.cache, self.mask = present, mask
        finished = [job for job in self.active if job.done]
        if not finished:
            return
        for job in finished:
            job.finish(job.error)
        keep = [i for i, job in enumerate(self.active) if not job.done]
        self.active = [self.active[i] for i in keep]
        if not self.active:
            self.cache = self.mask = None
            return
        # Drop the finished rows, and the columns no remaining row uses (padding only).
        mask = self.mask[keep]
        first = int(np.argmax(mask.any(axis=0)))
        self.cache = self.runner.numpy(self.cache)[:, :, keep, :, first:]
        self.mask = mask[:, first:]


# --- the Triton model -----------------------------------------------------------------------


class TritonPythonModel:
    def initialize(self, args):
        here = Path(args["model_repository"]) / args["model_version"]
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        self.name = config["name"]
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
        # KV caches of a request's length in /dev/shm at once during a BLS step (parameter
        # shm_caches_per_step, explained in config.pbtxt).
        self.shm_copies = int(params.get("shm_caches_per_step", "8"))
        self.shm_available = shm_bytes()
        self.tokenizer = ByteLevelBPETokenizer(str(here / "vocab.json"), str(here / "merges.txt"))
        self.tokenizer.add_special_tokens([END_OF_TEXT])
        self.eos = self.tokenizer.token_to_id(END_OF_TEXT)
        # The same file serves `generate` (one response) and `generate_stream` (decoupled).
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)

        runner = params.get("step_runner", "onnxruntime")
        if runner == "bls":
            self.runner = BlsRunner(params["step_model"], self.shm_available)
        elif runner == "onnxruntime":
            repository = Path(args["model_repository"]).parent
            path = repository / params["step_model"] / "1" / "model.onnx"
            if not path.is_file():
                raise pb_utils.TritonModelException(
                    f"{self.name}: step_runner 'onnxruntime' needs {path}, which is missing"
                )
            self.runner = SessionRunner(path, int(params.get("onnxruntime_threads", "0")))
        else:
            raise pb_utils.TritonModelException(
                f"{self.name}: step_runner must be 'onnxruntime' or 'bls', got {runner!r}"
            )
        batching = params.get("inflight_batching", "on")
        if batching not in ("on", "off"):
            raise pb_utils.TritonModelException(
                f"{self.name}: inflight_batching must be 'on' or 'off', got {batching!r}"
            )
        max_batch = int(params.get("max_batch", "8")) if batching == "on" else 1
        wait_s = float(params.get("max_join_wait_ms", "0")) / 1000.0
        self.engine = Engine(
            self.runner,
            self.past_shape,
            self.eos,
            self.context,
            max(1, max_batch),
            wait_s,
            self.fits,
        ).start()
        pb_utils.Logger.log_info(
            f"{self.name}: step_runner {runner}, inflight_batching {batching} "
            f"(at most {max(1, max_batch)} requests per step, join wait {wait_s * 1e3:g} ms)"
        )

    def finalize(self):
        self.engine.stop()

    def fits(self, rows, tokens):
        """May a batch of ``rows`` requests of up to ``tokens`` tokens run now? Only the BLS
        runner's cache goes through /dev/shm; a joiner that would overflow it waits."""
        if not self.runner.uses_shm:
            return True
        problem = shm_problem(
            tokens * rows, self.cache_bytes_per_token, self.shm_copies, self.shm_available
        )
        return problem is None

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

    def prepare(self, request):
        """Check the request; return the prompt's token ids and how many tokens to make."""
        text = read_text(request)
        max_new = self.max_new_tokens(request)
        prompt = self.tokenizer.encode(text).ids[-(self.context - 1) :]
        if self.runner.uses_shm:
            tokens = min(len(prompt) + max_new, self.context)
            problem = shm_problem(
                tokens, self.cache_bytes_per_token, self.shm_copies, self.shm_available
            )
            if problem:
                raise InputError(problem)
        return prompt, max_new

    @staticmethod
    def outputs(text, ids):
        return [
            pb_utils.Tensor("GENERATED_TEXT", np.asarray([text.encode("utf-8")], dtype=object)),
            pb_utils.Tensor("TOKEN_IDS", np.asarray(ids, dtype=np.int64)),
        ]

    @staticmethod
    def error_response(exc):
        if isinstance(exc, InputError):
            error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
        else:  # the step's own error, passed on
            error = pb_utils.TritonError(str(exc))
        return pb_utils.InferenceResponse(error=error)

    def job(self, request, sender):
        """A Job whose tokens go to the request's response sender: all at the end (generate),
        or one response per token as it comes (generate_stream).

        Streaming: each response carries the new text since the last one; a token that ends
        inside a multi-byte character is held back until the character is complete, so the
        pieces joined equal the non-streaming GENERATED_TEXT.
        """
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        prompt, max_new = self.prepare(request)
        new, sent = [], [""]

        def emit(token):
            new.append(token)
            if not self.decoupled:
                return
            text = self.tokenizer.decode(new, skip_special_tokens=False)
            piece = "" if text.endswith("\ufffd") else text[len(sent[0]) :]
            sent[0] += piece
            sender.send(pb_utils.InferenceResponse(output_tensors=self.outputs(piece, [token])))

        def finish(error):
            try:
                if error is not None:
                    sender.send(self.error_response(error), flags=final)
                    return
                text = self.tokenizer.decode(new, skip_special_tokens=False)
                if not self.decoupled:
                    response = pb_utils.InferenceResponse(output_tensors=self.outputs(text, new))
                    sender.send(response, flags=final)
                    return
                if text != sent[0]:
                    rest = pb_utils.InferenceResponse(
                        output_tensors=self.outputs(text[len(sent[0]) :], [])
                    )
                    sender.send(rest)
                sender.send(flags=final)
            except Exception as exc:  # the client went away: nothing left to tell it
                pb_utils.Logger.log_warn(f"{self.name}: could not send a response: {exc}")

        return Job(prompt, max_new, emit, finish)

    def execute(self, requests):
        # Every request is answered through its response sender, by the engine thread (or here,
        # at once, when it is refused); execute returns at once, so requests that come while
        # others are in flight join them.
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for request in requests:
            sender = request.get_response_sender()
            try:
                job = self.job(request, sender)
            except Exception as exc:
                sender.send(self.error_response(exc), flags=final)
                continue
            self.engine.submit(job)
        return None

"""Triton python backend: the generation engine. Greedy generation with a KV cache, the loop on
the server, every request in flight run as one batch.

This model (`generate_stream`, decoupled) is the server's one engine: one onnxruntime session,
one batch. Streaming clients call it directly (one response per token as it comes); `generate`
(`../../generate/1/model.py`, not decoupled, so it answers Triton's `/infer` and OCI's
`/predict`) forwards each request here through BLS with the request parameter
``"stream": false`` and gets one response with every token. So streaming and non-streaming
requests share decode steps.

One request in, N tokens out: tokenize once, prefill the prompt, then one token per step with
the cache of the steps before. Prefill (parameter `prefill_chunk`, 0: off): the prompts taken
in one turn that are no longer than a chunk are prefilled in one call (padded on the left to
the longest, mask 0); a longer prompt is prefilled one chunk per engine turn, each chunk with
the request's own cache so far as past, and each turn then runs a decode step of the batch, so
a long prompt does not stall the rows in flight for its whole prefill. Its first token comes
from its last chunk; then its row joins the batch. With `prefill_chunk` 0 each prompt is
prefilled alone, whole, while no decode step runs. `execute` only checks a request and hands it to the
engine thread, which runs every request in flight as one batch: one step makes the next token
of each of them, reading the model's weights once for all (a decode step is bound by reading
the weights, so a step over 8 rows costs little more than a step over 1). A request joins at
the step after its prefill (a request being prefilled in chunks holds one of the batch's rows) and leaves when it stops, or at the next step once its client has
cancelled it; its row's attention mask and positions are its own (the ONNX model derives
positions from the mask), so it gets the tokens it gets alone. Imports nothing from the
repository.

Who computes a step (parameter `step_runner`):
  onnxruntime  this process runs the step model's ONNX file, kept beside this file as
               `<step_model>.onnx`, in an onnxruntime session made in `initialize` (IO binding;
               on a GPU the cache stays on the device), no hop per step;
  bls          each step is a BLS call to the model `<step_model>` (the cache crosses /dev/shm).
"""

import ctypes
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


# --- the KV cache: the step model's one `past` array, or one array per layer ------------------
# Every array is [..., batch, n_head, length, head_dim]: `past` [n_layer, 2, ...], a layer's
# key or value [...] (the engine's own file, see SessionRunner), a layer's both [2, ...].


def cache_map(cache, fn):
    return tuple(fn(part) for part in cache) if isinstance(cache, tuple) else fn(cache)


def cache_length(cache):
    part = cache[0] if isinstance(cache, tuple) else cache
    return part.shape[-2]


def cache_rows(cache, rows, first):
    """The rows ``rows`` of the batch, from column ``first`` of the length axis on."""

    def take(part):
        index = [slice(None)] * part.ndim
        index[-4], index[-2] = rows, slice(first, None)
        return part[tuple(index)]

    return cache_map(cache, take)


def cache_pad(cache, gap):
    """``gap`` empty columns (zeros) on the left of the length axis."""
    return cache_map(
        cache, lambda part: np.pad(part, [(0, 0)] * (part.ndim - 2) + [(gap, 0), (0, 0)])
    )


def cache_stack(cache, rows):
    """The batch's rows, then the rows ``rows`` (same length)."""
    if isinstance(cache, tuple):
        return tuple(np.concatenate([a, b], axis=a.ndim - 4) for a, b in zip(cache, rows))
    return np.concatenate([cache, rows], axis=cache.ndim - 4)


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


class SessionError(RuntimeError):
    """The onnxruntime session cannot run where the configuration says it must."""


#: What onnxruntime-gpu 1.19 (CUDA 12 build, PyPI) loads for its CUDA provider, besides the
#: driver: https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html#requirements
CUDA_LIBRARIES = ("libcudart.so.12", "libcublas.so.12", "libcublasLt.so.12", "libcudnn.so.9")


def nvidia_gpu_present():
    """True where this process sees an NVIDIA driver and device (a GPU shape, or a container
    started with GPUs)."""
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()


def cuda_load_problems(ort):
    """Why onnxruntime's CUDA provider cannot load here: each library it needs that the loader
    cannot open, with the loader's message. The provider library is tried last: its message
    names the first dependency missing."""
    problems = []
    for name in CUDA_LIBRARIES:
        try:
            ctypes.CDLL(name)
        except OSError as exc:
            problems.append(str(exc))
    provider = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    try:
        ctypes.CDLL(str(provider))
    except OSError as exc:
        problems.append(str(exc))
    return problems


def cuda_provider_options(params, device_id):
    """The CUDA provider's options, each set on purpose (parameters in config.pbtxt):
    use_tf32 "0" keeps fp32 matrix products in fp32 on Ampere and later GPUs (onnxruntime's
    default, "1", rounds their inputs to TF32, which can change greedy tokens);
    arena_extend_strategy kSameAsRequested grows the memory pool by what a step asks for, not
    to the next power of two; gpu_mem_limit caps that pool (0: no cap)."""
    options = {
        "device_id": str(device_id),
        "use_tf32": params.get("cuda_use_tf32", "0"),
        "arena_extend_strategy": params.get("cuda_arena_extend_strategy", "kSameAsRequested"),
    }
    limit = int(params.get("cuda_gpu_mem_limit_bytes", "0"))
    if limit > 0:
        options["gpu_mem_limit"] = str(limit)
    return options


def open_session(ort, path, options, device, cuda_options, gpu_present):
    """An onnxruntime session of ``path`` on the device the configuration asks for.

    ``device``: "auto" (CUDA where the host has an NVIDIA GPU, else the CPU), "cuda" (CUDA or a
    load error) or "cpu" (the CPU on purpose, even on a GPU host). Where CUDA is expected, a
    session that would run on the CPU is a SessionError naming the cause: onnxruntime itself
    only logs a line and carries on on the CPU.
    """
    cpu = ["CPUExecutionProvider"]
    if device not in ("auto", "cuda", "cpu"):
        raise SessionError(f"onnxruntime_device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if device == "cpu" or (device == "auto" and not gpu_present):
        return ort.InferenceSession(str(path), options, providers=cpu), "cpu"
    where = "this host has an NVIDIA GPU" if gpu_present else "onnxruntime_device is 'cuda'"
    fix = (
        "Fix the image (docker/Dockerfile installs onnxruntime-gpu==1.19.2 on the NGC 24.10 "
        "image, which has CUDA 12 and cuDNN 9), or set the parameter onnxruntime_device to "
        "'cpu' to run on the CPU on purpose."
    )
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SessionError(
            f"{where}, but this onnxruntime ({ort.__version__}) has no CUDA provider: it is "
            f"the CPU package (available: {ort.get_available_providers()}). {fix}"
        )
    session = ort.InferenceSession(
        str(path), options, providers=[("CUDAExecutionProvider", cuda_options), *cpu]
    )
    if session.get_providers()[0] != "CUDAExecutionProvider":
        problems = cuda_load_problems(ort) or ["onnxruntime logged why above"]
        raise SessionError(
            f"{where}, but onnxruntime {ort.__version__} could not start its CUDA provider and "
            f"would run on the CPU: " + "; ".join(problems) + f". {fix}"
        )
    return session, "cuda"


class SessionRunner:
    """A step runs in this process on an onnxruntime session of the step model's ONNX file:
    no hop, no /dev/shm. IO binding keeps the cache where it was made (the GPU's memory when
    the session runs on CUDA). The session is made by ``open``, in ``initialize``, so a session
    that cannot run fails the load and readiness covers it."""

    uses_shm = False

    def __init__(self, path, threads, device="auto", cuda_options=None):
        self.path = path
        self.threads = threads
        self.want = device
        self.cuda_options = cuda_options or {}
        self.session = None
        self.device = "cpu"
        self.keep = []  # what the last step's binding points to (see run)
        self.cache_in, self.cache_out = ["past"], ["present"]
        self.chunk_in, self.chunk_out = [], []  # the second group's cache (two_groups)
        self.two_groups = False
        self.no_chunk = {}

    def open(self, gpu_present=None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        gpu = nvidia_gpu_present() if gpu_present is None else gpu_present
        self.session, self.device = open_session(
            ort, self.path, options, self.want, self.cuda_options, gpu
        )
        # The file notebook 03 puts here has its cache per layer (past_key_<i>, ...: no copy of
        # the whole cache to split and stack it each step); the exported one takes `past`.
        ids_mask = ("input_ids", "attention_mask")
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.cache_in = [
            i.name for i in inputs if i.name not in ids_mask and not i.name.startswith("chunk_")
        ]
        self.cache_out = [
            o.name for o in outputs if o.name != "logits" and not o.name.startswith("chunk_")
        ]
        # fp32: a second group of rows, a long prompt's chunk run in the decode step's call
        # (tutorial.onnx_surgery.two_groups); a step without one gives it no token.
        self.chunk_in = [i.name for i in inputs if i.name.startswith("chunk_past_")]
        self.chunk_out = [o.name for o in outputs if o.name.startswith("chunk_present_")]
        self.two_groups = bool(self.chunk_in)
        self.no_chunk = {
            "chunk_input_ids": np.zeros((1, 0), np.int32),
            "chunk_attention_mask": np.zeros((1, 0), np.int32),
            **{
                i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
                for i in inputs
                if i.name.startswith("chunk_past_")
            },
        }
        pb_utils.Logger.log_info(
            f"generate engine: opened an onnxruntime {ort.__version__} session of "
            f"{self.path.parent.parent.name}/{self.path.parent.name}/{self.path.name} on "
            f"{self.device}" + (f" with {self.cuda_options}" if self.device == "cuda" else "")
        )
        return self

    def numpy(self, cache):
        return cache if isinstance(cache, np.ndarray) else cache.numpy()

    def split_past(self, past):
        """A cache in this session's form, from one in the form of ``past`` [n_layer, 2, ...]."""
        if self.cache_in == ["past"]:
            return past
        parts = []
        for name in self.cache_in:  # past_key_<i>, past_value_<i> or past_<i>
            kind, layer = name.split("_")[-2], int(name.split("_")[-1])
            parts.append(
                past[layer, 0]
                if kind == "key"
                else past[layer, 1]
                if kind == "value"
                else past[layer]
            )
        return tuple(parts)

    def run(self, ids, mask, past, chunk=None):
        """One call: ``logits`` (each row's last position) and the rows' cache. With
        ``chunk`` (ids, mask, past of a second group: a prompt's chunk) in the same call, the
        logits of its rows follow, and its cache is returned third."""
        binding = self.session.io_binding()
        bound = []

        def bind(name, part):
            if isinstance(part, np.ndarray):
                part = np.ascontiguousarray(part)
                binding.bind_cpu_input(name, part)
            else:
                binding.bind_ortvalue_input(name, part)
            bound.append(part)

        bind("input_ids", ids)
        bind("attention_mask", mask)
        for name, part in zip(
            self.cache_in, past if isinstance(past, tuple) else (past,), strict=True
        ):
            bind(name, part)
        if chunk is not None and not self.two_groups:
            raise ValueError("this step model has no second group of rows")
        if self.two_groups:
            if chunk is None:
                for name, part in self.no_chunk.items():
                    bind(name, part)
            else:
                chunk_ids, chunk_mask, chunk_past = chunk
                bind("chunk_input_ids", chunk_ids)
                bind("chunk_attention_mask", chunk_mask)
                for name, part in zip(self.chunk_in, chunk_past, strict=True):
                    bind(name, part)
        binding.bind_output("logits", "cpu")
        for name in self.cache_out + self.chunk_out:
            binding.bind_output(name, self.device, 0)
        self.session.run_with_iobinding(binding)
        logits, *caches = binding.get_outputs()
        present, chunk_present = caches[: len(self.cache_out)], caches[len(self.cache_out) :]
        # onnxruntime 1.19 (Triton 24.10's) does not keep alive what a binding points to: the
        # inputs and this binding (which owns `present`, the next step's past) stay referenced
        # until the next step has run.
        self.keep = [binding, bound]
        present = tuple(present) if isinstance(past, tuple) else present[0]
        if chunk is None:
            return logits.numpy(), present
        return logits.numpy(), present, tuple(chunk_present)


# --- the engine: requests in flight, one batch per step --------------------------------------


class Job:
    """One request in flight: its prompt, its limits, and where its tokens go."""

    def __init__(self, prompt, max_new, emit, finish, stream=True, cancelled=None):
        self.prompt = prompt
        self.max_new = max_new
        self.emit = emit  # called with each new token id
        self.finish = finish  # called once: with None, or with the error
        self.stream = stream  # one response per token (else one response at the end)
        self.cancelled = cancelled  # () -> True once the client has cancelled the request
        self.count = 0
        self.length = len(prompt)  # tokens in the cache after the last step
        self.last = None
        self.done = False
        self.error = None
        self.filled = 0  # prompt tokens in its own cache (a prefill in chunks)
        self.past = None  # that cache, until the row joins the batch
        self.held = ()  # what the runner needs kept alive for ``past`` (SessionRunner.keep)
        self.arrived = time.perf_counter()

    def planned(self, context):
        return min(len(self.prompt) + self.max_new, context)


class Cancelled(RuntimeError):
    """The client cancelled the request (a closed stream): its row left the batch."""


class Unloading(RuntimeError):
    """The model is being unloaded (the server stops, or the model is unloaded)."""


#: The engine's own counters (also published as Prometheus metrics, see Metrics).
COUNTERS = {
    "requests": "requests handed to the engine (in flight or queued)",
    "steps": "decode steps run",
    "rows": "rows over all decode steps (tokens made by decode steps)",
    "mixed_steps": "decode steps holding both a streaming and a non-streaming request",
    "prefills": "prompts prefilled",
    "prefill_calls": "calls that prefilled whole prompts (prompts taken together share one)",
    "prefill_chunks": "chunks of prompts longer than prefill_chunk (one per engine turn)",
    "chunk_steps": "decode steps that ran a chunk in the same call (fp32: one read of the weights)",
    "step_prefill_calls": "prefill_calls run in a decode step's call (fp32: one read of the weights)",
    "step_prefills": "prompts prefilled in a decode step's call (counted in prefills too)",
    "cancelled": "requests that left the batch because their client cancelled them",
    # Where the time goes (microseconds, summed; divide by a count above for a mean):
    "queue_us": "time from a request's arrival (execute) to its admission into the engine",
    "first_token_us": "time from a request's arrival to its first token handed to Triton",
    "prefill_us": "time in prefill calls and chunks (onnxruntime or BLS)",
    "step_us": "time in decode steps (onnxruntime or BLS)",
    "emit_us": "time handing tokens to Triton (detokenizing and sending responses)",
}


#: The fewest prompt tokens a chunk holds when ``prefill_chunk_share`` sizes it.
MIN_CHUNK = 16


class Engine:
    """Runs every request in flight as one batch, in a thread of its own.

    ``max_batch`` rows at most (1 means one request at a time, in arrival order: the
    `inflight_batching` "off" switch); an idle engine waits up to ``join_wait_s`` for more
    requests before its first step. ``prefill_chunk`` (0: off) is the most prompt tokens one
    turn prefills for a long prompt: a longer prompt is prefilled a chunk per turn, between the
    batch's decode steps, and the prompts taken together that are no longer than a chunk share
    one prefill call. With ``chunk_share`` (0: off) and rows decoding, a chunk is as many tokens
    (at most ``prefill_chunk``, at least MIN_CHUNK) as take about that share of a decode step,
    from the times of the last steps and chunks (``clock``; a chunk in a decode step's call
    counts as the call less the step alone), so the decoders' next token is late by that share
    at most. ``prefill_batch_tokens`` (0: off) splits the short prompts
    taken together into calls of at most that many tokens (rows x the longest), one after
    another in the same turn, so the first of them get their first token sooner. With
    ``shared_step`` and a runner that takes a second group of rows (``two_groups``: the fp32
    engine file), a chunk, or else the short prompts taken, run in the decode step's own call.
    ``counters`` counts what it does (COUNTERS); ``publish(deltas)`` is called after each step
    with what changed (it may hold them back), and ``flush()`` before each request is
    answered.
    """

    def __init__(
        self,
        runner,
        past_shape,
        eos,
        context,
        max_batch,
        join_wait_s,
        fits,
        publish=None,
        prefill_chunk=0,
        chunk_share=0.0,
        clock=time.perf_counter,
        flush=None,
        prefill_batch_tokens=0,
        shared_step=True,
    ):
        self.runner = runner
        self.past_shape = past_shape
        self.eos = eos
        self.context = context
        self.max_batch = max_batch
        self.join_wait_s = join_wait_s
        self.fits = fits  # fits(rows, tokens): may a batch of rows x tokens run now?
        self.publish = publish or (lambda deltas: None)
        self.flush = flush or (lambda: None)  # publish what publish() held back
        self.prefill_chunk = max(0, int(prefill_chunk))
        self.chunk_share = max(0.0, float(chunk_share))
        self.prefill_batch_tokens = max(0, int(prefill_batch_tokens))
        # a prefill in the decode step's call, where the runner takes a second group of rows
        self.shared_step = bool(shared_step) and getattr(runner, "two_groups", False)
        self.clock = clock
        self.step_s = None  # a decode step's time, smoothed (EWMA)
        self.chunk_token_s = None  # a chunk's time per token, smoothed (EWMA)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.counting = threading.Lock()  # count() runs on the engine's thread and in submit
        self.pending = queue.Queue()
        self.waiting = []  # taken from the queue, not yet admitted (did not fit)
        self.prefilling = []  # admitted, prompt longer than a chunk: prefilled a chunk per turn
        self.active = []
        self.cache = None
        self.mask = None
        self.held = ()  # what the runner needs kept alive for ``cache`` (SessionRunner.keep)
        self.stopping = False
        self.unanswered = 0  # requests answered with an error when the engine stopped
        self.thread = threading.Thread(target=self.loop, name="generate-engine", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def submit(self, job):
        finish = job.finish

        def flush_then_finish(error):  # the counters are up to date when a client is answered
            try:
                self.flush()
            except Exception as exc:  # metrics are a report: never fail a request for them
                pb_utils.Logger.log_warn(f"generate engine: could not publish counters: {exc!r}")
            finish(error)

        job.finish = flush_then_finish
        if self.stopping:
            job.finish(Unloading("the model is being unloaded: send the request again"))
            return
        self.count({"requests": 1})
        self.pending.put(job)

    def stop(self):
        """Stop after the step in progress: every request in flight or still queued gets an
        error response (none is left unanswered)."""
        self.stopping = True
        self.pending.put(None)
        self.thread.join(timeout=30)

    def count(self, deltas):
        with self.counting:
            for key, value in deltas.items():
                self.counters[key] += value
        try:
            self.publish(deltas)
        except Exception as exc:  # metrics are a report: never fail a step for them
            pb_utils.Logger.log_warn(f"generate engine: could not publish counters: {exc!r}")

    # -- the loop --

    def take(self, block):
        """Requests to admit before the next step (at most max_batch in all, counting the rows
        being prefilled in chunks)."""
        free = self.max_batch - len(self.active) - len(self.prefilling)
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
                for job in self.active + self.prefilling:
                    job.finish(exc)
                self.active, self.prefilling, self.cache, self.mask = [], [], None, None
                self.held = ()
        left = self.active + self.prefilling + self.waiting
        while True:  # and what is still queued: every request gets an answer
            try:
                job = self.pending.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                left.append(job)
        self.active, self.prefilling, self.waiting = [], [], []
        self.unanswered = len(left)
        for job in left:
            job.finish(Unloading("the model is being unloaded: send the request again"))

    def turn(self):
        """Admit what waits; prefill the short prompts taken (one call) and one chunk of the
        oldest long prompt; then one decode step for the batch."""
        short = []
        limit = self.chunk_size()
        taken = self.take(block=not self.active and not self.prefilling)
        if taken:
            now = time.perf_counter()
            self.count({"queue_us": sum(int(1e6 * (now - job.arrived)) for job in taken)})
        for job in taken:
            if self.stopping:
                self.waiting.append(job)  # answered by loop() on its way out
                continue
            if job.cancelled is not None and job.cancelled():  # gone before its prefill
                job.finish(Cancelled("the client cancelled the request"))
                self.count({"cancelled": 1})
                continue
            admitted = [*self.active, *self.prefilling, *short]
            longest = max(j.planned(self.context) for j in [job, *admitted])
            if admitted and not self.fits(len(admitted) + 1, longest):
                self.waiting.append(job)  # joins when rows have left
                continue
            if self.prefill_chunk and len(job.prompt) > limit:
                self.prefilling.append(job)
            elif self.prefill_chunk:
                short.append(job)
            else:  # chunking off: each prompt alone, whole
                self.prefill([job])
        groups = self.prefill_groups(short)
        shared = self.shared_step and bool(self.active)
        if shared and groups and not self.prefilling:  # the last group in the decode step's call
            *groups, last = groups
        else:
            last = None
        for group in groups:
            self.prefill(group)
        self.drop_cancelled()
        if shared and self.active and (last or self.prefilling):
            # a chunk of the oldest long prompt, or short prompts, in the decode step's call
            self.decode(with_chunk=last is None, prompts=last)
            return
        if last:  # the rows decoding were all cancelled
            self.prefill(last)
        if self.prefilling:
            self.prefill_next_chunk()
        self.drop_cancelled()
        if self.active:
            self.decode()

    def prefill_groups(self, jobs):
        """``jobs`` in arrival order, in groups of at most ``prefill_batch_tokens`` tokens
        (rows x the longest prompt; a prompt longer than that alone); one group when off."""
        if not self.prefill_batch_tokens:
            return [jobs] if jobs else []
        groups, group = [], []
        for job in jobs:
            longest = max(len(j.prompt) for j in [*group, job])
            if group and longest * (len(group) + 1) > self.prefill_batch_tokens:
                groups.append(group)
                group = []
            group.append(job)
        return [*groups, group] if group else groups

    def chunk_size(self):
        """Prompt tokens one turn may prefill: ``prefill_chunk``; with ``chunk_share`` and rows
        decoding, what takes that share of a decode step (MIN_CHUNK until both are timed)."""
        if not self.chunk_share or not self.active:
            return self.prefill_chunk
        floor = min(MIN_CHUNK, self.prefill_chunk)
        if self.step_s is None or self.chunk_token_s is None:
            return floor
        fit = int(self.chunk_share * self.step_s / self.chunk_token_s)
        return max(floor, min(self.prefill_chunk, fit))

    @staticmethod
    def smooth(old, new):
        return new if old is None else 0.5 * old + 0.5 * new

    def advance(self, jobs, logits):
        """Each row's next token (greedy) handed to its request; counts the time it took."""
        start = time.perf_counter()
        first = 0
        for i, job in enumerate(jobs):
            token = int(np.argmax(logits[i]))
            job.count += 1
            job.last = token
            job.done = token == self.eos or job.length >= self.context or job.count >= job.max_new
            try:
                job.emit(token)
            except Exception as exc:  # a stream whose client went away: the row leaves
                job.error, job.done = exc, True
            if job.count == 1:
                first += int(1e6 * (time.perf_counter() - job.arrived))
        deltas = {"emit_us": int(1e6 * (time.perf_counter() - start))}
        if first:
            deltas["first_token_us"] = first
        self.count(deltas)

    def drop_cancelled(self):
        """Rows whose client cancelled the request leave before the next step."""
        gone = [job for job in self.active if job.cancelled is not None and job.cancelled()]
        if not gone:
            return
        for job in gone:
            job.done, job.error = True, Cancelled("the client cancelled the request")
        self.count({"cancelled": len(gone)})
        self.remove_finished()

    def empty_past(self, rows):
        shape = list(self.past_shape)
        shape[2], shape[4] = rows, 0
        empty = np.zeros(shape, np.float32)
        split = getattr(self.runner, "split_past", None)  # the runner's form of the cache
        return split(empty) if split else empty

    @staticmethod
    def padded_prompts(jobs):
        """The prompts as one batch: each row padded on the left (mask 0, so it keeps its own
        positions) to the longest."""
        width = max(len(job.prompt) for job in jobs)
        ids = np.zeros((len(jobs), width), dtype=np.int32)
        mask = np.zeros((len(jobs), width), dtype=np.int32)
        for i, job in enumerate(jobs):
            ids[i, width - len(job.prompt) :] = job.prompt
            mask[i, width - len(job.prompt) :] = 1
        return ids, mask

    def prefill(self, jobs):
        """Whole prompts with an empty cache, in one call (:meth:`padded_prompts`); then the
        rows join the batch."""
        ids, mask = self.padded_prompts(jobs)
        try:
            start = time.perf_counter()
            logits, present = self.runner.run(ids, mask, self.empty_past(len(jobs)))
            took = int(1e6 * (time.perf_counter() - start))
        except Exception as exc:
            for job in jobs:
                job.finish(exc)
            return
        self.count({"prefills": len(jobs), "prefill_calls": 1, "prefill_us": took})
        self.advance(jobs, logits)
        self.join(jobs, present, mask, tuple(getattr(self.runner, "keep", ())))

    def next_chunk(self):
        """The oldest prompt longer than a chunk and its next chunk: (job, ids, mask, past,
        end), with that prompt's own cache as past (mask of 1s over prefix and chunk); None
        when its client has cancelled it (it is answered)."""
        job = self.prefilling[0]
        if job.cancelled is not None and job.cancelled():
            self.prefilling.pop(0)
            job.finish(Cancelled("the client cancelled the request"))
            self.count({"cancelled": 1})
            return None
        end = min(job.filled + self.chunk_size(), len(job.prompt))
        ids = np.asarray([job.prompt[job.filled : end]], dtype=np.int32)
        mask = np.ones((1, end), dtype=np.int32)
        past = self.empty_past(1) if job.past is None else job.past
        return job, ids, mask, past, end

    def chunk_failed(self, job, exc):
        self.prefilling.remove(job)
        job.past = job.held = None
        job.finish(exc)

    def chunk_ran(self, job, end, logits, present, mask):
        """After a chunk: its cache kept; after the last one its row joins the batch, its
        first token from that chunk's logits."""
        job.filled, job.past = end, present
        job.held = tuple(getattr(self.runner, "keep", ()))
        if end < len(job.prompt):
            return
        self.prefilling.remove(job)
        job.past = None
        self.count({"prefills": 1})
        self.advance([job], logits)
        held, job.held = job.held, ()
        self.join([job], present, mask, held)

    def prefill_next_chunk(self):
        """The next chunk of the oldest prompt longer than a chunk, in a call of its own."""
        chunk = self.next_chunk()
        if chunk is None:
            return
        job, ids, mask, past, end = chunk
        try:
            start, wall = self.clock(), time.perf_counter()
            logits, present = self.runner.run(ids, mask, past)
            took = int(1e6 * (time.perf_counter() - wall))
            per_token = (self.clock() - start) / (end - job.filled)
            self.chunk_token_s = self.smooth(self.chunk_token_s, per_token)
        except Exception as exc:
            self.chunk_failed(job, exc)
            return
        self.count({"prefill_chunks": 1, "prefill_us": took})
        self.chunk_ran(job, end, logits, present, mask)

    def join(self, jobs, present, mask, held):
        """Rows prefilled (their cache ``present``, their ``mask``) join the batch; those
        already done (one token asked, end of text) are answered instead."""
        keep = [i for i, job in enumerate(jobs) if not job.done]
        for job in jobs:
            if job.done:
                job.finish(job.error)
        if not keep:
            return
        jobs = [jobs[i] for i in keep]
        if len(keep) < len(mask):  # drop the rows done, and the columns only they used
            mask = mask[keep]
            first = int(np.argmax(mask.any(axis=0)))
            present = cache_rows(cache_map(present, self.runner.numpy), keep, first)
            mask = mask[:, first:]
        if not self.active:
            self.active, self.cache, self.mask, self.held = jobs, present, mask, held
            return
        # Pad the shorter side on the left (mask 0) to a common length, then stack the rows.
        batch = cache_map(self.cache, self.runner.numpy)
        rows = cache_map(present, self.runner.numpy)
        gap = cache_length(batch) - cache_length(rows)
        if gap > 0:
            rows = cache_pad(rows, gap)
            mask = np.pad(mask, [(0, 0), (gap, 0)])
        elif gap < 0:
            batch = cache_pad(batch, -gap)
            self.mask = np.pad(self.mask, [(0, 0), (-gap, 0)])
        self.cache = cache_stack(batch, rows)
        self.mask = np.concatenate([self.mask, mask], axis=0)
        self.held = ()
        self.active.extend(jobs)

    def decode(self, with_chunk=False, prompts=None):
        """One step for every row: each row's last token in, each row's next token out. A
        runner with two groups takes a second group in the same call (one read of the weights
        for both): with ``with_chunk`` the next chunk of the oldest long prompt, or
        ``prompts`` (jobs), short prompts prefilled together; their rows join afterwards."""
        ids = np.asarray([[job.last] for job in self.active], dtype=np.int32)
        mask = np.pad(self.mask, [(0, 0), (0, 1)], constant_values=1)
        chunk = self.next_chunk() if with_chunk else None
        second = None
        if chunk is not None:
            second = chunk[1:4]
        elif prompts:
            second = (*self.padded_prompts(prompts), self.empty_past(len(prompts)))
        try:
            start, wall = self.clock(), time.perf_counter()
            if second is None:
                logits, present = self.runner.run(ids, mask, self.cache)
            else:
                logits, present, second_present = self.runner.run(
                    ids, mask, self.cache, chunk=second
                )
            took = int(1e6 * (time.perf_counter() - wall))
            elapsed = self.clock() - start
            if second is None:  # a step's own time (what chunk_share weighs a chunk against)
                self.step_s = self.smooth(self.step_s, elapsed)
            elif chunk is not None and self.step_s is not None:
                # the chunk's own part of the call: the call less a decode step alone
                tokens = chunk[4] - chunk[0].filled
                own = max(0.0, elapsed - self.step_s) / tokens
                self.chunk_token_s = self.smooth(self.chunk_token_s, own)
        except Exception as exc:  # every row of the failed step gets the error
            for job in self.active + (prompts or []):
                job.finish(exc)
            self.active, self.cache, self.mask, self.held = [], None, None, ()
            if chunk is not None:
                self.chunk_failed(chunk[0], exc)
            return
        rows = len(self.active)
        for job in self.active:
            job.length += 1
        kinds = {job.stream for job in self.active}
        self.count(
            {
                "steps": 1,
                "rows": rows,
                "mixed_steps": int(len(kinds) == 2),
                "step_us": took,
                **({"prefill_chunks": 1, "chunk_steps": 1} if chunk is not None else {}),
                **(
                    {
                        "prefills": len(prompts),
                        "prefill_calls": 1,
                        "step_prefill_calls": 1,
                        "step_prefills": len(prompts),
                    }
                    if chunk is None and second is not None
                    else {}
                ),
            }
        )
        self.advance(self.active, logits[:rows])
        self.cache, self.mask = present, mask
        self.held = tuple(getattr(self.runner, "keep", ()))
        self.remove_finished()
        if chunk is not None:
            job, _, chunk_mask, _, end = chunk
            self.chunk_ran(job, end, logits[rows:], second_present, chunk_mask)
        elif second is not None:
            self.advance(prompts, logits[rows:])
            self.join(prompts, second_present, second[1], tuple(self.held))

    def remove_finished(self):
        """Answer the rows that are done and take them out of the batch."""
        finished = [job for job in self.active if job.done]
        if not finished:
            return
        for job in finished:
            job.finish(job.error)
        keep = [i for i, job in enumerate(self.active) if not job.done]
        self.active = [self.active[i] for i in keep]
        if not self.active:
            self.cache = self.mask = None
            self.held = ()
            return
        # Drop the finished rows, and the columns no remaining row uses (padding only).
        mask = self.mask[keep]
        first = int(np.argmax(mask.any(axis=0)))
        self.cache = cache_rows(cache_map(self.cache, self.runner.numpy), keep, first)
        self.mask = mask[:, first:]


# --- the Triton model -----------------------------------------------------------------------


class Metrics:
    """The engine's counters (COUNTERS) as Prometheus counters on Triton's metrics endpoint,
    ``generate_engine_<counter>_total{model="..."}``; a no-op where Triton's metrics are off."""

    #: Each increment is a round trip to the Triton process (about 1 ms a decode step for the
    #: engine's counters, measured on 2 CPU cores): counts are added up and sent at most this
    #: often, and whenever a request is answered (flush), so what a client reads after its
    #: answer is up to date.
    EVERY_S = 0.5

    def __init__(self, model, clock=time.monotonic):
        self.metrics = {}
        self.pending = {}
        self.clock = clock
        self.sent = clock()
        self.lock = threading.Lock()
        try:
            for key, what in COUNTERS.items():
                family = pb_utils.MetricFamily(
                    name=f"generate_engine_{key}_total",
                    description=f"generate engine: {what}",
                    kind=pb_utils.MetricFamily.COUNTER,
                )
                self.metrics[key] = (family, family.Metric(labels={"model": model}))
        except Exception as exc:  # metrics disabled (--allow-metrics=false): counters stay local
            pb_utils.Logger.log_info(f"{model}: engine counters not published: {exc}")
            self.metrics = {}

    def publish(self, deltas):
        with self.lock:
            for key, value in deltas.items():
                if value and key in self.metrics:
                    self.pending[key] = self.pending.get(key, 0) + value
        if self.clock() - self.sent >= self.EVERY_S:
            self.flush()

    def flush(self):
        with self.lock:
            pending, self.pending, self.sent = self.pending, {}, self.clock()
            for key, value in pending.items():
                self.metrics[key][1].increment(value)

    def close(self):
        """Send what is left, then let the metric families go while the stub can still tell
        Triton (in ``finalize``). Left to the interpreter's exit, they are freed after the
        stub's shared memory is gone, and the stub segfaults on its way out (seen with Triton
        24.10's Python 3.12 stub)."""
        self.flush()
        self.metrics = {}


class TritonPythonModel:
    def initialize(self, args):
        here = Path(args["model_repository"]) / args["model_version"]
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        self.name = config["name"]
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(
                f"{self.name}: the generation engine must be decoupled "
                "(model_transaction_policy { decoupled: true })"
            )
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

        runner = params.get("step_runner", "onnxruntime")
        if runner == "bls":
            self.runner = BlsRunner(params["step_model"], self.shm_available)
        elif runner == "onnxruntime":
            path = here / f"{params['step_model']}.onnx"
            if not path.is_file():
                raise pb_utils.TritonModelException(
                    f"{self.name}: step_runner 'onnxruntime' needs {path}, which is missing "
                    "(notebook 03 puts the step model's ONNX file there)"
                )
            self.runner = SessionRunner(
                path,
                int(params.get("onnxruntime_threads", "0")),
                params.get("onnxruntime_device", "auto"),
                cuda_provider_options(params, args.get("model_instance_device_id", "0")),
            )
            try:  # here, not at the first request: a session that cannot run fails the load
                self.runner.open()
            except SessionError as exc:
                raise pb_utils.TritonModelException(f"{self.name}: {exc}") from None
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
        chunk = int(params.get("prefill_chunk", "0"))
        if chunk < 0:
            raise pb_utils.TritonModelException(
                f"{self.name}: prefill_chunk must be 0 (off) or a number of tokens, got {chunk}"
            )
        batch_tokens = int(params.get("prefill_batch_tokens", "0"))
        if batch_tokens < 0:
            raise pb_utils.TritonModelException(
                f"{self.name}: prefill_batch_tokens must be 0 (off) or a number of tokens, "
                f"got {batch_tokens}"
            )
        shared_step = params.get("shared_step", "on")
        if shared_step not in ("on", "off"):
            raise pb_utils.TritonModelException(
                f"{self.name}: shared_step must be 'on' or 'off', got {shared_step!r}"
            )
        share = float(params.get("prefill_chunk_share", "0"))
        if share < 0:
            raise pb_utils.TritonModelException(
                f"{self.name}: prefill_chunk_share must be 0 (off) or a share of a decode step "
                f"(e.g. 0.75), got {share}"
            )
        self.metrics = Metrics(self.name)
        self.engine = Engine(
            self.runner,
            self.past_shape,
            self.eos,
            self.context,
            max(1, max_batch),
            wait_s,
            self.fits,
            self.metrics.publish,
            prefill_chunk=chunk,
            chunk_share=share,
            flush=self.metrics.flush,
            prefill_batch_tokens=batch_tokens,
            shared_step=shared_step == "on",
        ).start()
        pb_utils.Logger.log_info(
            f"{self.name}: step_runner {runner}, inflight_batching {batching} "
            f"(at most {max(1, max_batch)} requests per step, join wait {wait_s * 1e3:g} ms), "
            f"prefill_chunk {chunk or 'off'}"
            + (f" (sized to {share:g} of a decode step while rows decode)" if share else "")
        )

    def finalize(self):
        self.engine.stop()
        self.metrics.close()
        pb_utils.Logger.log_info(
            f"{self.name}: unloaded; {self.engine.unanswered} requests in flight or queued "
            "were answered with an error"
        )

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
    def error_response(exc, stream=True):
        """The error for the client. To `generate` (``stream`` false) the message starts with
        the code's name: BLS in Triton 24.10 hands every error to its caller as INTERNAL, and
        `generate` restores the code from the message."""
        if isinstance(exc, InputError):
            code = "INVALID_ARG"
        elif isinstance(exc, Cancelled):
            code = "CANCELLED"
        elif isinstance(exc, Unloading):
            code = "UNAVAILABLE"
        else:  # the step's own error, passed on
            code = "INTERNAL"
        message = str(exc) if stream else f"{code}: {exc}"
        error = pb_utils.TritonError(message, getattr(pb_utils.TritonError, code))
        return pb_utils.InferenceResponse(error=error)

    @staticmethod
    def streaming(request):
        """One response per token, unless the request parameter "stream" is false (what
        `generate` sends): then one response with every token."""
        try:
            parameters = json.loads(request.parameters() or "{}")
        except (AttributeError, ValueError):
            parameters = {}
        value = parameters.get("stream", True)
        return value not in (False, "false", "False", "0", 0)

    def job(self, request, sender):
        """A Job whose tokens go to the request's response sender: one response per token as
        it comes (a stream), or one response with all of them at the end.

        Streaming: each response carries the new text since the last one; a token that ends
        inside a multi-byte character is held back until the character is complete, so the
        pieces joined equal the non-streaming GENERATED_TEXT.
        """
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        prompt, max_new = self.prepare(request)
        stream = self.streaming(request)
        new, sent = [], [""]

        def emit(token):
            new.append(token)
            if not stream:
                return
            text = self.tokenizer.decode(new, skip_special_tokens=False)
            piece = "" if text.endswith("\ufffd") else text[len(sent[0]) :]
            sent[0] += piece
            sender.send(pb_utils.InferenceResponse(output_tensors=self.outputs(piece, [token])))

        def finish(error):
            try:
                if error is not None:
                    sender.send(self.error_response(error, stream), flags=final)
                    return
                text = self.tokenizer.decode(new, skip_special_tokens=False)
                if not stream:
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

        # A client can cancel a stream (gRPC: closing it); checked before each step. Requests
        # from `generate` (BLS) are not checked: nothing cancels them, and each check is a
        # round trip to the server.
        cancelled = sender.is_cancelled if stream else None
        return Job(prompt, max_new, emit, finish, stream=stream, cancelled=cancelled)

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
                response = self.error_response(exc, self.streaming(request))
                sender.send(response, flags=final)
                continue
            self.engine.submit(job)
        return None

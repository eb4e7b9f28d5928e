"""Measuring latency: Triton over HTTP (local, or an OCI deployment's signed /predict) and
onnxruntime in-process on the decoder-with-past model (CPU, or a GPU through CUDA).

Every measured call becomes one row for :func:`tutorial.results.write_results`. Warm-up calls
are never recorded. Counts and time are bounded by a :class:`MeasurementPlan`. Triton's
statistics (``GET /v2/models/stats``) are read before and after each call or series, so
rows carry the server's queue and compute time next to the client's wall time.
"""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tutorial.common import TutorialError, load_state, paths

#: The Triton model each served method calls (its statistics give the server-side split).
SERVED_MODELS = {"ensemble_next_token": "ensemble_model", "generate": "generate"}
#: Text the prompts are cut from (the seed's test sentences, repeated as needed).
PROMPT_TEXT = (
    "My dog is cute, but he barks a lot. Machine learning is a field of computer science. "
    "It is a field of applied mathematics that is not only applied to the problem of learning, "
    "but also to the problem of learning in general. The quick brown fox jumps over the lazy "
    "dog while the cat sleeps in the warm afternoon sun. "
)
STAT_FIELDS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@dataclass
class MeasurementPlan:
    """How much to measure, bounded in count and time.

    ``iterations`` calls per series at concurrency 1 (after ``warmup`` unrecorded calls);
    ``concurrency_iterations`` calls per worker at each concurrency level; ``max_seconds``
    caps each series, ``max_total_seconds`` the whole target (later series are skipped).
    """

    warmup: int = 2
    iterations: int = 10
    prompt_tokens: int = 10
    new_tokens: int = 50
    prompt_lengths: tuple[int, ...] = (8, 32, 128, 512)
    concurrency_levels: tuple[int, ...] = (1, 2, 4, 8)
    concurrency_iterations: int = 3
    max_seconds: float = 120.0
    max_total_seconds: float = 900.0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.warmup < 0 or self.concurrency_iterations < 1:
            raise TutorialError("iterations and concurrency_iterations must be >= 1, warmup >= 0.")
        if self.new_tokens < 2:
            raise TutorialError("new_tokens must be >= 2 (decode time is derived from it).")
        if any(c < 1 for c in self.concurrency_levels):
            raise TutorialError("concurrency levels must be >= 1.")


@dataclass
class Prompt:
    """A prompt as text (what Triton receives) and token ids (what the model sees)."""

    text: str
    ids: list[int]

    @property
    def tokens(self) -> int:
        """Its length in tokens."""
        return len(self.ids)


class PromptMaker:
    """Builds prompts of a given token length from :data:`PROMPT_TEXT` with GPT-2's tokenizer."""

    def __init__(self, tokenizer: Any, max_positions: int = 1024) -> None:
        self.tokenizer = tokenizer
        self.max_positions = max_positions
        self._text = PROMPT_TEXT.strip()
        self._base = list(tokenizer.encode(self._text))

    @classmethod
    def from_workdir(cls) -> PromptMaker:
        """The tokenizer notebook 01 saved, and the model's context length from the state."""
        from tutorial.model_source import load_tokenizer

        # the local Triton is started (forked) after the tokenizer ran: keep it single-threaded
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        vocab_dir = paths()["vocab_dir"]
        if not (vocab_dir / "vocab.json").exists():
            raise TutorialError(
                f"No tokenizer in {vocab_dir}: run notebooks/01_download_gpt2.ipynb first "
                "(or set TUTORIAL_WORKDIR to the folder it wrote to)."
            )
        info = load_state().get("model", {})
        return cls(load_tokenizer(vocab_dir), int(info.get("n_positions") or 1024))

    def __call__(self, n_tokens: int) -> Prompt:
        """A prompt of ``n_tokens`` tokens (re-encoded, so the ids are what the server sees)."""
        if n_tokens < 1:
            raise TutorialError("a prompt needs at least 1 token.")
        repeats = n_tokens // len(self._base) + 2
        ids = self.tokenizer.encode(" ".join([self._text] * repeats))
        text = self.tokenizer.decode(ids[:n_tokens])
        return Prompt(text, list(self.tokenizer.encode(text)))


@dataclass
class CallResult:
    """One timed call: when it started (epoch s), how long it took, what it produced."""

    started_at: float
    latency_ms: float
    new_tokens: int
    token_ids: list[int] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Triton's statistics


def parse_model_stats(payload: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Turn a ``/v2/models[/<m>]/stats`` answer into flat cumulative counters per model
    (summed over versions): ``<field>_count`` and ``<field>_ns`` for success, fail, queue and
    compute_input/infer/output, plus ``inference_count`` and ``execution_count``."""
    out: dict[str, dict[str, int]] = {}
    for model in payload.get("model_stats", []):
        flat = out.setdefault(
            model["name"],
            {f"{f}_{unit}": 0 for f in STAT_FIELDS for unit in ("count", "ns")}
            | {"inference_count": 0, "execution_count": 0},
        )
        stats = model.get("inference_stats", {})
        for name in STAT_FIELDS:
            flat[f"{name}_count"] += int(stats.get(name, {}).get("count", 0))
            flat[f"{name}_ns"] += int(stats.get(name, {}).get("ns", 0))
        flat["inference_count"] += int(model.get("inference_count", 0))
        flat["execution_count"] += int(model.get("execution_count", 0))
    return out


def stats_delta(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    """What happened between two statistics snapshots, per model."""
    return {
        model: {key: value - before.get(model, {}).get(key, 0) for key, value in counters.items()}
        for model, counters in after.items()
    }


def server_split_ms(
    delta: dict[str, dict[str, int]], model: str, parts: list[str] | None = None
) -> tuple[float | None, float | None]:
    """Mean server queue and compute ms per successful request of ``model`` in a delta.

    Compute is compute_input + compute_infer + compute_output. For an ensemble, ``parts`` are
    its steps: its own counters time the whole pipeline (the steps' queues included) and the
    steps' own times overlap, so queue = the ensemble's queue + its steps' queues, and
    compute = the ensemble's compute minus its steps' queues. Queue + compute is then the
    server's time for the request, never more than the client's wall time.
    """
    own = delta.get(model, {})
    count = own.get("success_count", 0)
    if count <= 0:
        return None, None
    queue = own.get("queue_ns", 0)
    compute = sum(own.get(f"compute_{k}_ns", 0) for k in ("input", "infer", "output"))
    steps = [p for p in parts or [] if p != model]
    waited = sum(delta.get(p, {}).get("queue_ns", 0) for p in steps)
    return (queue + waited) / count / 1e6, max(0, compute - waited) / count / 1e6


# --------------------------------------------------------------------------------------------
# Targets


class HttpTarget:
    """Triton's KServe v2 HTTP API, local (``base_url``) or behind OCI's ``/predict``.

    For OCI, ``predict_url`` receives every request and the Triton model is chosen by the
    ``model_name``/``model_version`` headers (:func:`tutorial.oci_deploy.predict_headers`); ``auth`` is any
    ``requests`` auth object, e.g. an OCI signer. Statistics are read only from a local
    Triton (OCI maps /predict to infer only).
    """

    has_ensemble = True

    def __init__(
        self,
        name: str,
        *,
        base_url: str | None = None,
        predict_url: str | None = None,
        auth: Any = None,
        device_name: str | None = None,
        shape: str = "local",
        model_variant: str = "fp32",
        timeout_s: float = 60.0,
    ) -> None:
        if (base_url is None) == (predict_url is None):
            raise TutorialError("give exactly one of base_url (Triton) or predict_url (OCI).")
        self.name = name
        self.base_url = base_url.rstrip("/") if base_url else None
        self.predict_url = predict_url
        self.auth = auth
        self.device_name = device_name
        self.shape = shape
        self.model_variant = model_variant
        self.timeout_s = timeout_s
        self.description = "Triton over HTTP" if base_url else "OCI Model Deployment /predict"
        self._local = threading.local()
        self._parts: dict[str, list[str]] = {}

    def _session(self) -> Any:
        import requests

        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _url(self, model: str) -> tuple[str, dict[str, str]]:
        if self.base_url:
            return f"{self.base_url}/v2/models/{model}/infer", {}
        from tutorial.oci_deploy import predict_headers

        return str(self.predict_url), predict_headers(model)

    def infer(
        self, model: str, inputs: list[dict[str, Any]]
    ) -> tuple[dict[str, Any], float, float]:
        """POST one inference; returns (answer, started_at epoch s, latency ms)."""
        import requests

        url, headers = self._url(model)
        started_at = time.time()
        start = time.perf_counter()
        try:
            response = self._session().post(
                url,
                json={"inputs": inputs},
                headers=headers,
                auth=self.auth,
                timeout=self.timeout_s,
            )
            answer = response.json() if response.status_code == 200 else None
        except requests.RequestException as exc:
            raise TutorialError(f"{self.name}: request to {url} failed: {exc}") from exc
        latency_ms = (time.perf_counter() - start) * 1000.0
        if answer is None:
            hint = {
                401: " The signature was refused: check the OCI auth object passed as auth.",
                404: f" Is model {model!r} loaded (GET /v2/models/{model}/ready)?",
                429: " Too many requests: the deployment's bandwidth or the 150 requests/s "
                "tenancy limit is exceeded; lower the concurrency.",
            }.get(response.status_code, "")
            raise TutorialError(
                f"{self.name}: HTTP {response.status_code} from {url} ({model}): "
                f"{response.text[:300]}{hint}"
            )
        return answer, started_at, latency_ms

    @staticmethod
    def _output(answer: dict[str, Any], name: str) -> list[Any]:
        for output in answer.get("outputs", []):
            if output.get("name") == name:
                return output["data"]
        names = [o.get("name") for o in answer.get("outputs", [])]
        raise TutorialError(f"no output {name!r} in the answer (outputs: {names}).")

    def next_token(self, prompt: Prompt) -> CallResult:
        """One ``ensemble_model`` call: the seed's payload, one next token back."""
        inputs = [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": [prompt.text]}]
        answer, started_at, latency_ms = self.infer("ensemble_model", inputs)
        self._output(answer, "NEXT_TOKEN")
        return CallResult(started_at, latency_ms, 1)

    def generate(self, prompt: Prompt, max_new_tokens: int) -> CallResult:
        """One ``generate`` call producing up to ``max_new_tokens`` tokens server-side."""
        inputs = [
            {"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": [prompt.text]},
            {"name": "MAX_NEW_TOKENS", "datatype": "INT32", "shape": [1], "data": [max_new_tokens]},
        ]
        answer, started_at, latency_ms = self.infer("generate", inputs)
        ids = [int(i) for i in self._output(answer, "TOKEN_IDS")]
        return CallResult(started_at, latency_ms, len(ids), token_ids=ids)

    def stats(self) -> dict[str, dict[str, int]] | None:
        """Cumulative statistics of every model (local Triton only; ``None`` behind OCI,
        whose /predict reaches infer only)."""
        if not self.base_url:
            return None
        url = f"{self.base_url}/v2/models/stats"
        response = self._session().get(url, timeout=self.timeout_s)
        if response.status_code != 200:
            raise TutorialError(f"{self.name}: HTTP {response.status_code} from {url}.")
        return parse_model_stats(response.json())

    def parts(self, model: str) -> list[str]:
        """The models whose statistics add up to ``model``'s server time: an ensemble's
        steps (from its config), else the model itself."""
        if model not in self._parts:
            url = f"{self.base_url}/v2/models/{model}/config"
            response = self._session().get(url, timeout=self.timeout_s)
            if response.status_code != 200:
                raise TutorialError(f"{self.name}: HTTP {response.status_code} from {url}.")
            config = response.json()
            steps = config.get("ensemble_scheduling", {}).get("step", [])
            self._parts[model] = [step["model_name"] for step in steps] or [model]
        return self._parts[model]

    def stats_after(
        self, model: str, before: dict[str, dict[str, int]], expected: int, timeout_s: float = 2.0
    ) -> dict[str, dict[str, int]]:
        """Statistics once ``expected`` more successes of ``model`` and of each of its
        :meth:`parts` are counted: Triton may record a request (an ensemble's last step
        especially) just after answering it. Gives up after ``timeout_s``."""
        names = {model, *self.parts(model)}
        deadline = time.perf_counter() + timeout_s
        while True:
            after = self.stats()
            assert after is not None
            if all(
                after.get(n, {}).get("success_count", 0)
                >= before.get(n, {}).get("success_count", 0) + expected
                for n in names
            ):
                return after
            if time.perf_counter() > deadline:
                return after
            time.sleep(0.005)


def triton_target(
    url: str, name: str = "local-cpu", model_variant: str = "fp32", device_name: str | None = None
) -> HttpTarget:
    """A Triton server at ``url`` (e.g. the local one from ``start_local_triton``)."""
    return HttpTarget(name, base_url=url, model_variant=model_variant, device_name=device_name)


def oci_target(
    predict_url: str,
    auth: Any,
    *,
    shape: str,
    name: str = "oci-cpu",
    device_name: str | None = None,
    model_variant: str = "fp32",
    timeout_s: float = 60.0,
) -> HttpTarget:
    """An OCI Model Deployment's ``.../predict`` endpoint, requests signed by ``auth``
    (any ``requests`` auth object: an ``oci.signer.Signer`` or a resource principal signer).

    ``device_name`` defaults to ``"OCI <shape>"``: the client cannot see the server's chip.
    """
    if not predict_url.rstrip("/").endswith("/predict"):
        raise TutorialError(f"{predict_url!r} is not a deployment's predict URL (.../predict).")
    return HttpTarget(
        name,
        predict_url=predict_url,
        auth=auth,
        shape=shape,
        device_name=device_name or f"OCI {shape}",
        model_variant=model_variant,
        timeout_s=timeout_s,
    )


def gpu_name() -> str | None:
    """The first GPU's name from ``nvidia-smi``, or ``None`` when there is none."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    names = [line.strip() for line in out.splitlines() if line.strip()]
    return names[0] if names else None


def cuda_status() -> tuple[bool, str]:
    """Whether onnxruntime can run on a GPU here: ``(True, gpu name)`` or ``(False, why)``."""
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return False, (
            f"onnxruntime {ort.__version__} offers {', '.join(providers)}: no "
            "CUDAExecutionProvider (on a GPU machine install onnxruntime-gpu instead)."
        )
    name = gpu_name()
    if name is None:
        return False, "onnxruntime has the CUDA provider but nvidia-smi sees no GPU."
    return True, name


class InProcessTarget:
    """The decoder-with-past ONNX model run by onnxruntime in this process.

    ``gpu=True`` uses CUDAExecutionProvider and keeps the KV cache on the GPU between steps
    (I/O binding), so a step copies only the new token in and the logits out.
    """

    has_ensemble = False

    def __init__(
        self,
        name: str,
        model_path: str | Path,
        *,
        gpu: bool = False,
        device_name: str | None = None,
        model_variant: str = "fp32",
        threads: int | None = None,
    ) -> None:
        self.name = name
        self.model_path = Path(model_path)
        self.gpu = gpu
        self.device_name = device_name
        self.shape = "local"
        self.model_variant = model_variant
        self.threads = threads
        self.description = f"onnxruntime {'CUDA' if gpu else 'CPU'}, in-process"
        self._session: Any = None
        self._lock = threading.Lock()

    def session(self) -> Any:
        """The onnxruntime session (created on first use, checked for the expected I/O)."""
        with self._lock:
            if self._session is None:
                import onnxruntime as ort

                if not self.model_path.exists():
                    raise TutorialError(
                        f"{self.model_path} does not exist: run notebooks/02_export_onnx.ipynb."
                    )
                opts = ort.SessionOptions()
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                if self.threads:
                    opts.intra_op_num_threads = self.threads
                providers = ["CUDAExecutionProvider"] if self.gpu else []
                session = ort.InferenceSession(
                    str(self.model_path), opts, providers=[*providers, "CPUExecutionProvider"]
                )
                if self.gpu and session.get_providers()[0] != "CUDAExecutionProvider":
                    raise TutorialError(
                        f"onnxruntime fell back to {session.get_providers()} for "
                        f"{self.model_path.name}: the CUDA provider failed to start (check CUDA "
                        "and cuDNN versions against onnxruntime-gpu's requirements)."
                    )
                names = {i.name for i in session.get_inputs()}
                outputs = {o.name for o in session.get_outputs()}
                if (
                    names != {"input_ids", "attention_mask", "past"}
                    or not {
                        "logits",
                        "present",
                    }
                    <= outputs
                ):
                    raise TutorialError(
                        f"{self.model_path} is not the decoder-with-past model (inputs {names}, "
                        f"outputs {outputs}); pass the file notebook 02 wrote as onnx_past."
                    )
                self._session = session
            return self._session

    def generate(self, prompt: Prompt, max_new_tokens: int) -> CallResult:
        """Greedy decoding of exactly ``max_new_tokens`` tokens (prefill, then one token per
        step); ``step_ms`` holds each step's time, prefill first."""
        import numpy as np
        import onnxruntime as ort

        session = self.session()
        kinds = {i.name: i for i in session.get_inputs()}
        dtypes = {"tensor(int32)": np.int32, "tensor(int64)": np.int64}
        id_type = dtypes[kinds["input_ids"].type]
        mask_type = dtypes[kinds["attention_mask"].type]
        n_layer, two, _, n_head, _, head_dim = kinds["past"].shape
        device = "cuda" if self.gpu else "cpu"
        # onnxruntime 1.19 (Triton 24.10's) does not keep alive what an OrtValue or a binding
        # points to: the numpy arrays stay referenced here, and each step gets a new binding
        # while the previous one (which owns the cache now bound as `past`) is kept until the
        # step is done. Clearing a binding would free the cache it returned.
        empty = np.zeros((n_layer, two, 1, n_head, 0, head_dim), dtype=np.float32)
        past = ort.OrtValue.ortvalue_from_numpy(empty, device, 0)
        previous = None
        ids = np.asarray([prompt.ids], dtype=id_type)
        total = ids.shape[1]
        tokens: list[int] = []
        steps: list[float] = []
        started_at = time.time()
        start = time.perf_counter()
        for _ in range(max_new_tokens):
            step_start = time.perf_counter()
            binding = session.io_binding()
            mask = np.ones((1, total), dtype=mask_type)
            binding.bind_cpu_input("input_ids", ids)
            binding.bind_cpu_input("attention_mask", mask)
            binding.bind_ortvalue_input("past", past)
            binding.bind_output("logits", "cpu")
            binding.bind_output("present", device, 0)
            session.run_with_iobinding(binding)
            logits, past = binding.get_outputs()
            previous = binding  # owns `past` until the next step has run
            token = int(np.argmax(logits.numpy()[0]))
            steps.append((time.perf_counter() - step_start) * 1000.0)
            tokens.append(token)
            ids = np.asarray([[token]], dtype=id_type)
            total += 1
        del previous
        latency_ms = (time.perf_counter() - start) * 1000.0
        return CallResult(started_at, latency_ms, len(tokens), token_ids=tokens, step_ms=steps)

    def stats(self) -> None:
        """In-process targets have no server statistics."""
        return None


def onnx_past_path(model_variant: str = "fp32") -> Path:
    """The decoder-with-past model notebook 02 exported, for ``fp32`` or ``int8``."""
    key = {"fp32": "onnx_past", "int8": "onnx_past_int8"}.get(model_variant)
    if key is None:
        raise TutorialError(f"model_variant must be fp32 or int8, not {model_variant!r}.")
    return paths()[key]


def inprocess_target(
    gpu: bool = False, model_variant: str = "fp32", name: str | None = None
) -> InProcessTarget:
    """onnxruntime in this process: ``inprocess-cpu``, or ``local-gpu`` with ``gpu=True``
    (raises :class:`TutorialError` saying why when no usable GPU is present)."""
    device_name = None
    if gpu:
        ok, why = cuda_status()
        if not ok:
            raise TutorialError(f"local-gpu cannot be measured: {why}")
        device_name = why
    return InProcessTarget(
        name or ("local-gpu" if gpu else "inprocess-cpu"),
        onnx_past_path(model_variant),
        gpu=gpu,
        device_name=device_name,
        model_variant=model_variant,
    )


# --------------------------------------------------------------------------------------------
# Series of calls


@dataclass
class Series:
    """One measured series: its rows, how many requests were sent (warm-up excluded), and the
    change in the served model's Triton statistics over the series (``None`` without)."""

    target: str
    method: str
    prompt_tokens: int
    new_tokens: int
    concurrency: int
    rows: list[dict[str, Any]]
    sent: int
    results: list[CallResult] = field(default_factory=list)
    model: str | None = None
    stats_delta: dict[str, dict[str, int]] | None = None
    elapsed_s: float = 0.0
    stopped_early: bool = False

    def describe(self) -> str:
        """One line: what was measured and how many calls."""
        return (
            f"{self.target} {self.method} prompt={self.prompt_tokens} new={self.new_tokens} "
            f"c={self.concurrency}: {self.sent} calls in {self.elapsed_s:.1f} s"
            + (" (stopped at the time limit)" if self.stopped_early else "")
        )


def _call(target: Any, method: str, prompt: Prompt, new_tokens: int) -> CallResult:
    if method == "ensemble_next_token":
        return target.next_token(prompt)
    if method == "generate":
        return target.generate(prompt, new_tokens)
    raise TutorialError(f"unknown method {method!r}: ensemble_next_token or generate.")


def _row(
    target: Any,
    method: str,
    prompt: Prompt,
    result: CallResult,
    *,
    concurrency: int,
    iteration: int,
    sweep: str,
    queue_ms: float | None = None,
    compute_ms: float | None = None,
    notes: str = "",
) -> dict[str, Any]:
    return {
        "target": target.name,
        "method": method,
        "model_variant": target.model_variant,
        "device_name": target.device_name,
        "shape": target.shape,
        "sweep": sweep,
        "prompt_tokens": prompt.tokens,
        "new_tokens": result.new_tokens,
        "concurrency": concurrency,
        "iteration": iteration,
        "started_at": result.started_at,
        "latency_ms": result.latency_ms,
        "server_queue_ms": queue_ms,
        "server_compute_ms": compute_ms,
        "notes": notes,
    }


def measure_series(
    target: Any,
    method: str,
    prompt: Prompt,
    *,
    new_tokens: int = 1,
    count: int = 10,
    concurrency: int = 1,
    warmup: int = 0,
    sweep: str = "",
    max_seconds: float | None = None,
    progress: Any = None,
    per_call_stats: bool = True,
) -> Series:
    """Send ``count`` calls of ``method`` (after ``warmup`` unrecorded ones), ``concurrency``
    at a time from a thread pool; stop issuing calls after ``max_seconds``.

    At concurrency 1 (and ``per_call_stats``), Triton's statistics are read around every
    call, so each row has its own server queue/compute split; otherwise rows get the series'
    mean (reading statistics between calls would add gaps to a throughput series).
    """
    model = SERVED_MODELS.get(method) if getattr(target, "base_url", None) else None
    parts = target.parts(model) if model else None
    first = target.stats() if model else None
    for _ in range(warmup):
        _call(target, method, prompt, new_tokens)
        if progress is not None:
            progress.update(1)
    if first is not None and warmup:
        first = target.stats_after(model, first, warmup)  # the warm-up calls fully counted
    deadline = time.perf_counter() + max_seconds if max_seconds else None
    rows: list[dict[str, Any]] = []
    calls: list[CallResult] = []
    start = time.perf_counter()
    stopped = False
    if concurrency == 1 and per_call_stats:
        for i in range(count):
            if deadline and time.perf_counter() > deadline:
                stopped = True
                break
            before = target.stats() if model else None
            result = _call(target, method, prompt, new_tokens)
            queue_ms = compute_ms = None
            if before is not None:
                after = target.stats_after(model, before, 1)
                queue_ms, compute_ms = server_split_ms(stats_delta(before, after), model, parts)
            calls.append(result)
            rows.append(
                _row(target, method, prompt, result, concurrency=1, iteration=i, sweep=sweep,
                     queue_ms=queue_ms, compute_ms=compute_ms)
            )  # fmt: skip
            if progress is not None:
                progress.update(1)
    else:
        tickets = itertools.count()
        lock = threading.Lock()
        results: list[tuple[int, CallResult]] = []

        def worker() -> None:
            nonlocal stopped
            while True:
                with lock:
                    ticket = next(tickets)
                if ticket >= count:
                    return
                if deadline and time.perf_counter() > deadline:
                    stopped = True
                    return
                result = _call(target, method, prompt, new_tokens)
                with lock:
                    results.append((ticket, result))
                    if progress is not None:
                        progress.update(1)

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            for future in [pool.submit(worker) for _ in range(concurrency)]:
                future.result()
        results.sort(key=lambda item: item[1].started_at)
        calls = [result for _, result in results]
        rows = [
            _row(target, method, prompt, result, concurrency=concurrency, iteration=i, sweep=sweep)
            for i, (_, result) in enumerate(results)
        ]
    elapsed = time.perf_counter() - start
    delta = None
    if first is not None:
        delta = stats_delta(first, target.stats_after(model, first, len(rows)))
        if not (concurrency == 1 and per_call_stats):
            queue_ms, compute_ms = server_split_ms(delta, model, parts)
            for row in rows:
                row.update(server_queue_ms=queue_ms, server_compute_ms=compute_ms)
                row["notes"] = "server split: mean over the series"
    return Series(
        target=target.name,
        method=method,
        prompt_tokens=prompt.tokens,
        new_tokens=new_tokens,
        concurrency=concurrency,
        rows=rows,
        sent=len(rows),
        results=calls,
        model=model,
        stats_delta=delta,
        elapsed_s=elapsed,
        stopped_early=stopped,
    )


def decode_rows(one: Series, many: Series) -> list[dict[str, Any]]:
    """Per-token decode time, one row per ``generate`` call of ``many`` (N new tokens).

    In-process, each call's own decode steps are measured (mean of steps 2..N). Over HTTP it
    is derived: (call's latency - median latency of 1-token calls) / (N - 1), which removes the
    request overhead, tokenizing and the prefill; server compute is derived the same way.
    A call whose difference is not positive (noise larger than the decode cost, as on a tiny
    model) gives no row: :func:`measure_target` reports how many in ``skipped``.
    """
    out = []
    base = statistics.median(r["latency_ms"] for r in one.rows) if one.rows else None
    computes = [r["server_compute_ms"] for r in one.rows]
    base_compute = statistics.median(computes) if computes and None not in computes else None
    for row, result in zip(many.rows, many.results, strict=True):
        n = row["new_tokens"]
        if n < 2 or base is None:
            continue
        steps = result.step_ms
        if steps:
            ms = sum(steps[1:]) / (len(steps) - 1)
            notes = f"measured: mean of the {len(steps) - 1} decode steps of one call"
        else:
            ms = (row["latency_ms"] - base) / (n - 1)
            notes = f"derived: (generate {n} tokens - median generate 1 token) / {n - 1}"
        if ms <= 0:
            continue
        compute = None
        if base_compute is not None and row["server_compute_ms"] is not None:
            value = (row["server_compute_ms"] - base_compute) / (n - 1)
            compute = value if value > 0 else None
        out.append(
            dict(row, method="decode_token", new_tokens=1, started_at=None, latency_ms=ms,
                 server_queue_ms=None, server_compute_ms=compute, tokens_per_s=1000.0 / ms,
                 notes=notes)
        )  # fmt: skip
    return out


@dataclass
class TargetRun:
    """Everything measured on one target: the rows to write and each series' bookkeeping."""

    target: str
    rows: list[dict[str, Any]]
    series: list[Series]
    skipped: list[str]

    def statistics_check(self) -> list[tuple[str, int, int]]:
        """(series, requests sent, successes Triton counted) for each series with statistics."""
        return [
            (s.describe(), s.sent, s.stats_delta[s.model]["success_count"])
            for s in self.series
            if s.stats_delta is not None and s.model
        ]


def measure_target(
    target: Any, plan: MeasurementPlan | None = None, prompts: PromptMaker | None = None
) -> TargetRun:
    """Measure one target: the reference prompt (next token, generate 1 and N tokens, decode
    per token), a prompt-length sweep, and a concurrency sweep of ``generate``.

    Prompt lengths that do not fit the model's context with ``new_tokens`` more are skipped.
    """
    return _measure(target, plan, prompts, prompt_sweeps=True)


def measure_concurrency(
    target: Any, plan: MeasurementPlan | None = None, prompts: PromptMaker | None = None
) -> TargetRun:
    """Only :func:`measure_target`'s concurrency sweep of ``generate`` (the reference prompt,
    ``plan.new_tokens`` new tokens, each of ``plan.concurrency_levels``), measured the same way:
    for comparing one server setting (e.g. ``generate`` with ``inflight_batching`` off) where
    only throughput against concurrency is asked."""
    return _measure(target, plan, prompts, prompt_sweeps=False)


def _measure(
    target: Any, plan: MeasurementPlan | None, prompts: PromptMaker | None, prompt_sweeps: bool
) -> TargetRun:
    from tqdm.auto import tqdm

    plan = plan or MeasurementPlan()
    prompts = prompts or PromptMaker.from_workdir()
    methods = ["ensemble_next_token"] if target.has_ensemble else []
    lengths = [plan.prompt_tokens] + [p for p in plan.prompt_lengths if p != plan.prompt_tokens]
    if not prompt_sweeps:
        lengths = []
    skipped = [
        f"prompt {p} tokens: {p} + {plan.new_tokens} new > context {prompts.max_positions}"
        for p in lengths
        if p + plan.new_tokens > prompts.max_positions
    ]
    lengths = [p for p in lengths if p + plan.new_tokens <= prompts.max_positions]
    per_point = (len(methods) + 2) * (plan.warmup + plan.iterations)
    total = len(lengths) * per_point + sum(
        c * plan.concurrency_iterations for c in plan.concurrency_levels
    )
    total += plan.warmup if plan.concurrency_levels else 0
    deadline = time.perf_counter() + plan.max_total_seconds
    rows: list[dict[str, Any]] = []
    series: list[Series] = []
    bar = tqdm(total=total, desc=target.name, unit="call", disable=not plan.progress)

    def run(method: str, prompt: Prompt, sweep: str, **kw: Any) -> Series | None:
        if time.perf_counter() > deadline:
            skipped.append(f"{method} prompt={prompt.tokens} {kw}: over max_total_seconds")
            return None
        bar.set_postfix_str(f"{method} prompt={prompt.tokens} c={kw.get('concurrency', 1)}")
        s = measure_series(
            target, method, prompt, sweep=sweep, max_seconds=plan.max_seconds, progress=bar, **kw
        )
        series.append(s)
        rows.extend(s.rows)
        return s

    try:
        for length in lengths:
            prompt = prompts(length)
            sweep = "reference" if length == plan.prompt_tokens else "prompt_length"
            common = {"count": plan.iterations, "warmup": plan.warmup}
            for method in methods:
                run(method, prompt, sweep, **common)
            one = run("generate", prompt, sweep, new_tokens=1, **common)
            many = run("generate", prompt, sweep, new_tokens=plan.new_tokens, **common)
            if one and many:
                decoded = decode_rows(one, many)
                rows.extend(decoded)
                if len(decoded) < len(many.rows):
                    skipped.append(
                        f"decode_token prompt={prompt.tokens}: {len(many.rows) - len(decoded)} of "
                        f"{len(many.rows)} calls not derived (generate {plan.new_tokens} was not "
                        "slower than generate 1, or stopped at end-of-text after 1 token)"
                    )
        prompt = prompts(plan.prompt_tokens)
        for level in plan.concurrency_levels:
            run(
                "generate",
                prompt,
                "concurrency",
                new_tokens=plan.new_tokens,
                count=level * plan.concurrency_iterations,
                concurrency=level,
                warmup=plan.warmup if level == plan.concurrency_levels[0] else 0,
                per_call_stats=False,
            )
    finally:
        bar.close()
    return TargetRun(target.name, rows, series, skipped)


def measure_streaming(
    target: HttpTarget, plan: MeasurementPlan | None = None, prompts: PromptMaker | None = None
) -> TargetRun:
    """The concurrency sweep again, streamed through ``generate_stream`` (server-sent events):
    at each of ``plan.concurrency_levels``, that many client threads each stream
    ``plan.concurrency_iterations`` requests of the reference prompt, ``plan.new_tokens`` new
    tokens each (:func:`tutorial.streaming.run_clients`). Rows: ``generate_stream``, ``ttft``
    and ``itl`` (:func:`tutorial.streaming.stream_rows`).

    Every stream must give the tokens of one stream alone (sent first, unrecorded, with
    ``plan.warmup`` more); levels after ``plan.max_total_seconds`` are skipped.
    """
    from tqdm.auto import tqdm

    from tutorial.streaming import run_clients, stream_rows, timed_stream

    if not target.base_url:
        raise TutorialError(f"{target.name}: streaming needs a Triton URL (generate_stream).")
    plan = plan or MeasurementPlan()
    prompts = prompts or PromptMaker.from_workdir()
    prompt = prompts(plan.prompt_tokens)

    def stream() -> dict:
        return timed_stream(target.base_url, prompt.text, plan.new_tokens, timeout=target.timeout_s)

    alone = [stream()["tokens"] for _ in range(1 + plan.warmup)][0]
    deadline = time.perf_counter() + plan.max_total_seconds
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    total = sum(level * plan.concurrency_iterations for level in plan.concurrency_levels)
    bar = tqdm(total=total, desc=f"{target.name} stream", unit="stream", disable=not plan.progress)

    def recorded(_client: int, _i: int) -> dict:
        out = stream()
        bar.update(1)
        return out

    try:
        for level in plan.concurrency_levels:
            if time.perf_counter() > deadline:
                skipped.append(f"generate_stream c={level}: over max_total_seconds")
                continue
            bar.set_postfix_str(f"c={level}")
            runs = run_clients(recorded, level, plan.concurrency_iterations)
            off = sum(r["tokens"] != alone for r in runs)
            if off:
                raise TutorialError(
                    f"{target.name}: {off} of {len(runs)} streams at {level} clients gave other "
                    "tokens than one stream alone; batching must not change greedy tokens."
                )
            rows += stream_rows(
                runs, target=target.name, model_variant=target.model_variant,
                device_name=target.device_name, shape=target.shape,
                prompt_tokens=prompt.tokens, concurrency=level,
            )  # fmt: skip
    finally:
        bar.close()
    return TargetRun(target.name, rows, [], skipped)

"""The serving engine (``model_repository/generate_stream/1/model.py``) in this process, without
Triton: the benchmark's in-process floor and the engine's tests run the very code the server
runs (its onnxruntime session with IO binding, its batch bookkeeping), so the difference
between the server and this is what Triton, HTTP and the python backend add, nothing else.

    engine = LocalEngine(Path("gpt2_with_past.onnx"))
    tokens = engine.generate(prompt_ids, 50, times)   # times: when each token came
    engine.close()
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import Any

from tutorial.common import REPO_ROOT, TutorialError, workdir

ENGINE_FILE = REPO_ROOT / "model_repository" / "generate_stream" / "1" / "model.py"


def load_engine_module(name: str = "generate_engine_local") -> Any:
    """``generate_stream/1/model.py`` as a module, with a stand-in for Triton's
    ``triton_python_backend_utils`` (its logger prints; nothing else of it is used outside
    Triton). The stand-in is removed from ``sys.modules`` afterwards."""
    stub = types.ModuleType("triton_python_backend_utils")
    stub.Logger = types.SimpleNamespace(log_error=print, log_info=print, log_warn=print)
    previous = sys.modules.get("triton_python_backend_utils")
    sys.modules["triton_python_backend_utils"] = stub
    try:
        spec = importlib.util.spec_from_file_location(name, ENGINE_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del sys.modules["triton_python_backend_utils"]
        else:
            sys.modules["triton_python_backend_utils"] = previous
    return module


def engine_copy(path: Path, folder: Path, simplify: bool = True) -> Path:
    """``path`` (a step model with ``past``) written into ``folder`` with its KV cache per layer,
    as :func:`tutorial.repository.assemble` writes the engine's file (``simplify`` False: the
    fp32 graph's nodes left as they are); its external data files are linked beside it (they
    are not copied)."""
    from tutorial.onnx_surgery import onnx_files, write_engine_step

    model_file, *data_files = onnx_files(path)
    for data in data_files:
        (folder / data.name).symlink_to(data.resolve())
    write_engine_step(model_file, folder / model_file.name, simplify)
    return folder / model_file.name


class LocalEngine:
    """The engine on an onnxruntime CPU session of ``path`` (a decoder with past), as the server
    makes it (``threads`` 0: onnxruntime's default, as the committed ``onnxruntime_threads``),
    one request at a time unless several are submitted together. ``eos``: the token that ends
    a request (the server's is <|endoftext|>); None: every request makes the tokens it asks for.
    """

    def __init__(
        self,
        path: Path,
        threads: int = 0,
        max_batch: int = 8,
        prefill_chunk: int = 32,
        eos: int | None = None,
    ):
        from tutorial.export import ort_session

        self.module = load_engine_module()
        past = next(i for i in ort_session(path).get_inputs() if i.name == "past").shape
        # the engine's own form of the file, as notebook 03 writes it into the repository
        self._folder = tempfile.TemporaryDirectory(prefix="engine-local-", dir=workdir())
        engine_file = engine_copy(Path(path), Path(self._folder.name))
        self.runner = self.module.SessionRunner(engine_file, threads, device="cpu")
        self.runner.open(gpu_present=False)
        self.engine = self.module.Engine(
            self.runner,
            [past[0], past[1], 1, past[3], 0, past[5]],
            -1 if eos is None else eos,
            10**9,
            max_batch,
            0.0,
            lambda rows, tokens: True,
            prefill_chunk=prefill_chunk,
        ).start()

    def generate(
        self, prompt_ids: list[int], new_tokens: int, times: list[float] | None = None
    ) -> list[int]:
        """Greedy tokens for one request; ``times`` receives ``time.perf_counter()`` at the
        request's submission, then as each token was handed over."""
        tokens: list[int] = []
        done = threading.Event()
        error: list[BaseException | None] = [None]
        stamps = [time.perf_counter()]

        def emit(token: int) -> None:
            stamps.append(time.perf_counter())
            tokens.append(token)

        def finish(exc: BaseException | None) -> None:
            error[0] = exc
            done.set()

        self.engine.submit(self.module.Job(list(prompt_ids), new_tokens, emit, finish))
        if not done.wait(timeout=600):
            raise TutorialError("the in-process engine made no answer in 600 s")
        if error[0] is not None:
            raise TutorialError(f"the in-process engine failed: {error[0]!r}")
        if times is not None:
            times.extend(stamps)
        return tokens

    def close(self) -> None:
        self.engine.stop()
        self.runner.session = None
        self._folder.cleanup()

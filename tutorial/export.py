"""ONNX export and parity checks (notebook 02).

Heavy work runs in child processes so TensorFlow's conversion memory is returned to the
system when it ends: the 124M model's conversion alone takes several GB, and TensorFlow
never gives memory back inside a process.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tutorial.common import REPO_ROOT, TutorialError

#: The Triton 24.10 container's onnxruntime (1.19.2) loads at most these (onnxruntime's
#: versioning table: https://onnxruntime.ai/docs/reference/compatibility.html).
MAX_IR_VERSION = 10
MAX_OPSET = 21
DEFAULT_OPSET = 17

ONNX_DTYPES = {1: "FLOAT", 6: "INT32", 7: "INT64", 10: "FLOAT16", 11: "DOUBLE", 9: "BOOL"}


def run_logged(cmd: list[str], log_path: Path, what: str) -> float:
    """Run ``cmd``, streaming its output to ``log_path`` and a line of progress to stdout.

    Returns the seconds it took; raises :class:`TutorialError` with the log's tail on failure.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    print(f"{what}: {' '.join(cmd[1:])}\n  (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise TutorialError(f"{what} failed (exit {proc.returncode}); its log ends with:\n{tail}")
    print(f"{what}: done in {elapsed:.1f} s", flush=True)
    return elapsed


def convert_saved_model(
    saved_model_dir: Path, output: Path, opset: int = DEFAULT_OPSET, log_dir: Path | None = None
) -> float:
    """The seed's export: ``python -m tf2onnx.convert --saved-model ... --output ...``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "tf2onnx.convert",
        "--saved-model",
        str(saved_model_dir),
        "--opset",
        str(opset),
        "--output",
        str(output),
    ]
    return run_logged(cmd, (log_dir or output.parent) / "tf2onnx_saved_model.log", "tf2onnx")


def export_with_past(
    model_dir: Path, output: Path, opset: int = DEFAULT_OPSET, log_dir: Path | None = None
) -> float:
    """Export the decoder-with-past model (see :mod:`tutorial.export_past`) in a child process."""
    output.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "tutorial.export_past",
        str(model_dir),
        str(output),
        "--opset",
        str(opset),
    ]
    return run_logged(cmd, (log_dir or output.parent) / "tf2onnx_with_past.log", "export with past")


def onnx_signature(path: Path) -> dict[str, Any]:
    """Inputs, outputs (name, dtype, dims), IR version, opset and size of an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out.append(
                {"name": v.name, "dtype": ONNX_DTYPES.get(t.elem_type, t.elem_type), "dims": dims}
            )
        return out

    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {
        "inputs": describe(model.graph.input),
        "outputs": describe(model.graph.output),
        "ir_version": int(model.ir_version),
        "opset": int(opset),
        "bytes": Path(path).stat().st_size,
    }


def print_signature(path: Path) -> dict[str, Any]:
    """Print an ONNX file's signature as a small table and return it."""
    sig = onnx_signature(path)
    print(
        f"{Path(path).name}: {sig['bytes'] / 1e6:.1f} MB, IR {sig['ir_version']}, opset {sig['opset']}"
    )
    for kind in ("inputs", "outputs"):
        for v in sig[kind]:
            print(f"  {kind[:-1]:6} {v['name']:<18} {v['dtype']:<6} {v['dims']}")
    return sig


def check_loadable_by_triton(path: Path) -> dict[str, Any]:
    """Assert IR version and opset are ones the pinned Triton's onnxruntime loads."""
    sig = onnx_signature(path)
    if sig["ir_version"] > MAX_IR_VERSION or sig["opset"] > MAX_OPSET:
        raise TutorialError(
            f"{path.name} has IR {sig['ir_version']} / opset {sig['opset']}; Triton 24.10's "
            f"onnxruntime loads IR <= {MAX_IR_VERSION} and opset <= {MAX_OPSET}. Re-export with "
            f"a lower --opset."
        )
    return sig


def trim_to_last_logits(full: Path, output: Path) -> dict[str, Any]:
    """Rewrite the seed's export so it returns only what the decoder uses.

    The seed's model returns ``logits [B, L, vocab]`` and the stacked ``past_key_values``;
    the decoder reads one row of the logits. This adds ``last_logits [B, vocab]``, the row at
    each sequence's last real position (from ``attention_mask``), and drops everything else,
    so the ensemble moves ``vocab`` floats per step instead of ``L * vocab`` plus the cache.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(full))
    graph = model.graph
    names = [o.name for o in graph.output]
    if "logits" not in names:
        raise TutorialError(f"{full.name} has outputs {names}; expected 'logits'.")
    mask = next((i.name for i in graph.input if i.name == "attention_mask"), None)
    if mask is None:
        raise TutorialError(f"{full.name} has no 'attention_mask' input.")
    vocab = next(o for o in graph.output if o.name == "logits").type.tensor_type.shape.dim[-1]
    one = helper.make_tensor("trim_one", TensorProto.INT64, [], [1])
    axis = helper.make_tensor("trim_axis", TensorProto.INT64, [1], [1])
    graph.initializer.extend([one, axis])
    graph.node.extend(
        [
            helper.make_node("Cast", [mask], ["trim_mask64"], to=TensorProto.INT64),
            helper.make_node("ReduceSum", ["trim_mask64", "trim_axis"], ["trim_len"], keepdims=1),
            helper.make_node("Sub", ["trim_len", "trim_one"], ["trim_last"]),
            helper.make_node("GatherND", ["logits", "trim_last"], ["last_logits"], batch_dims=1),
        ]
    )
    out = helper.make_tensor_value_info(
        "last_logits", TensorProto.FLOAT, ["batch", vocab.dim_value]
    )
    del graph.output[:]
    graph.output.append(out)
    prune_unused(graph)
    onnx.checker.check_model(model)
    output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(output))
    return onnx_signature(output)


def prune_unused(graph: Any) -> None:
    """Drop nodes and initializers that no graph output depends on."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def ort_session(path: Path, threads: int | None = None, providers: list[str] | None = None) -> Any:
    """An onnxruntime session with all graph optimizations (CPU unless told otherwise)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def input_dtype(session: Any, name: str) -> Any:
    """The numpy dtype an onnxruntime session expects for input ``name``."""
    kind = next(i.type for i in session.get_inputs() if i.name == name)
    return {"tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(float)": np.float32}[kind]


def empty_past(session: Any, batch: int = 1) -> np.ndarray:
    """A zero-length KV cache ``[n_layer, 2, batch, n_head, 0, head_dim]`` for prefill."""
    shape = next(i.shape for i in session.get_inputs() if i.name == "past")
    n_layer, two, _, n_head, _, head_dim = shape
    return np.zeros((n_layer, two, batch, n_head, 0, head_dim), dtype=np.float32)


def greedy_with_past(
    session: Any,
    prompt_ids: list[int],
    max_new_tokens: int,
    eos_token_id: int | None = 50256,
    timings: list[float] | None = None,
) -> list[int]:
    """Greedy generation on the decoder-with-past model: one prefill, then one token a step.

    ``timings`` (if given) receives the seconds of each step (prefill first).
    """
    idt = input_dtype(session, "input_ids")
    mdt = input_dtype(session, "attention_mask")
    past = empty_past(session)
    ids = np.asarray([prompt_ids], dtype=idt)
    total = len(prompt_ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        start = time.perf_counter()
        logits, past = session.run(
            ["logits", "present"],
            {"input_ids": ids, "attention_mask": np.ones((1, total), dtype=mdt), "past": past},
        )
        token = int(np.argmax(logits[0]))
        if timings is not None:
            timings.append(time.perf_counter() - start)
        new.append(token)
        if eos_token_id is not None and token == eos_token_id:
            break
        ids = np.asarray([[token]], dtype=idt)
        total += 1
    return new


def ort_logits(session: Any, input_ids: list[int], output: str = "logits") -> np.ndarray:
    """Run the seed's (or the trimmed) model on one sequence and return ``output``."""
    feeds = {
        "input_ids": np.asarray([input_ids], dtype=input_dtype(session, "input_ids")),
        "attention_mask": np.ones(
            (1, len(input_ids)), dtype=input_dtype(session, "attention_mask")
        ),
    }
    return session.run([output], feeds)[0]


def weight_bytes_read_per_step(path: Path) -> dict[str, int]:
    """Bytes of weights one decode step must read: every initializer except those only
    gathered from (the embedding tables: a step reads one row of each).

    Divided by the memory bandwidth, this is the decode floor on a CPU.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, set()).add(
                "Gather.data" if node.op_type == "Gather" and i == 0 else node.op_type
            )
    total = gathered = 0
    for init in model.graph.initializer:
        size = numpy_helper.to_array(init).nbytes
        total += size
        if consumers.get(init.name) == {"Gather.data"}:
            gathered += size
    return {"all_weights": total, "gathered_only": gathered, "read_per_step": total - gathered}


def quantize_int8(fp32: Path, output: Path) -> dict[str, Any]:
    """Dynamic int8 quantization of the weights (onnxruntime.quantization), for CPU shapes."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(output), weight_type=QuantType.QInt8)
    return onnx_signature(output)

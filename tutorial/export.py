"""ONNX export and parity checks (notebook 02).

The export's stages run in child processes (:func:`run_export_stage`), each with its memory
sampled: TensorFlow never gives memory back inside a process, and a child's memory goes away
when it ends. The stages themselves are in :mod:`tutorial.export_past`, the ONNX graph edits in
:mod:`tutorial.onnx_surgery`.
"""

from __future__ import annotations

import contextlib
import os
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


#: The three stages of the export (``python -m tutorial.export_past STAGE``), in order.
EXPORT_STAGES = ("trace", "convert", "assemble")


def _high_water_mark(pid: int) -> int:
    """A process's peak resident memory so far (VmHWM in /proc/<pid>/status), in bytes."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        return 0


def run_monitored(
    cmd: list[str],
    log_path: Path,
    what: str,
    every_s: float = 15.0,
    sample_s: float = 0.5,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run ``cmd`` as a child process, logging to ``log_path`` and sampling its memory.

    Every ``sample_s`` seconds it reads the resident memory (RSS) of the child and of its own
    children, and the machine's used memory (``free``'s "used"). Every ``every_s`` seconds it
    prints a progress line (elapsed time, ``what``, the child's RSS and peak so far), and it
    echoes the child's own progress lines (those starting with ``[``, as the export stages
    print them) as they come. Returns ``seconds``, ``peak_rss`` (the process tree, sampled),
    ``max_rss`` (the largest single process's high-water mark, VmHWM, sampled; the kernel's
    ``ru_maxrss`` of a child started from a large process also counts that parent's pages at
    the exec, so it is not used) and the
    machine's used memory before, at peak and after (bytes). Raises :class:`TutorialError`
    with the log's tail if the command fails; an interrupt stops the child.
    """
    import psutil

    log_path.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        shown = [Path(cmd[0]).name, *cmd[1:]]
        print(f"$ {' '.join(shown)}\n  (log: {log_path})", flush=True)
    used_before = psutil.virtual_memory().used
    start = last_print = time.monotonic()
    peak_rss, max_rss, used_peak, status = 0, 0, used_before, 0
    with open(log_path, "w") as log, open(log_path, errors="replace") as follow:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        pending, reaped = "", False
        try:
            parent = psutil.Process(proc.pid)
            while True:
                pid, status, _rusage = os.wait4(proc.pid, os.WNOHANG)
                done = reaped = pid == proc.pid
                if not done:
                    try:
                        tree = [parent, *parent.children(recursive=True)]
                        rss = sum(p.memory_info().rss for p in tree)
                        max_rss = max(max_rss, *(_high_water_mark(p.pid) for p in tree))
                    except psutil.Error:
                        rss = 0  # it exited between two reads
                    peak_rss = max(peak_rss, rss)
                    used_peak = max(used_peak, psutil.virtual_memory().used)
                *lines, pending = (pending + follow.read()).split("\n")
                for line in lines if not quiet else []:
                    if line.startswith("["):
                        print(f"  | {line}", flush=True)
                if done:
                    break
                now = time.monotonic()
                if not quiet and now - last_print >= every_s:
                    last_print = now
                    print(
                        f"  [{now - start:5.0f} s] {what}: RSS {rss / 1e9:.2f} GB "
                        f"(peak {peak_rss / 1e9:.2f} GB)",
                        flush=True,
                    )
                time.sleep(sample_s)
        except BaseException:
            if not reaped:
                proc.kill()
                proc.wait()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.monotonic() - start
    result = {
        "seconds": elapsed,
        "peak_rss": peak_rss,
        "max_rss": max_rss,
        "used_before": used_before,
        "used_peak": used_peak,
        "used_after": psutil.virtual_memory().used,
    }
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        why = f"{what} failed (exit {proc.returncode})"
        if proc.returncode == -9:  # SIGKILL: on Linux, most often the kernel's out-of-memory killer
            why += (
                f", killed after reaching {max(peak_rss, result['max_rss']) / 1e9:.1f} GB resident "
                f"on a machine with {psutil.virtual_memory().total / 1e9:.1f} GB: most likely "
                "out of memory (`dmesg` says so if you can read it); a smaller GPT-2 or a machine "
                "with more memory"
            )
        raise TutorialError(f"{why}; its log ends with:\n{tail}")
    if not quiet:
        print(
            f"{what}: done in {elapsed:.1f} s, peak RSS "
            f"{max(peak_rss, result['max_rss']) / 1e9:.2f} GB",
            flush=True,
        )
    return result


def export_stage_command(stage: str, *args: Any) -> list[str]:
    """The command line of one export stage (see :mod:`tutorial.export_past`)."""
    if stage not in EXPORT_STAGES:
        raise TutorialError(f"stage must be one of {EXPORT_STAGES}, not {stage!r}")
    return [sys.executable, "-m", "tutorial.export_past", stage, *(str(a) for a in args)]


def run_export_stage(stage: str, *args: Any, log_dir: Path, **monitor: Any) -> dict[str, Any]:
    """Run one export stage in a child process with progress lines; return its figures."""
    cmd = export_stage_command(stage, *args)
    return run_monitored(cmd, log_dir / f"export_{stage}.log", stage, **monitor)


def run_export_check(
    check: str, log_dir: Path, every_s: float = 15.0, **arguments: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one of notebook 02's checks (:mod:`tutorial.export_checks`) in a child process with
    progress lines. Returns what the check returned and the child's figures (seconds, memory)."""
    import json

    from tutorial.export_checks import CHECKS

    if check not in CHECKS:
        raise TutorialError(f"check must be one of {sorted(CHECKS)}, not {check!r}")
    log_dir.mkdir(parents=True, exist_ok=True)
    args_file, result_file = log_dir / f"check_{check}.json", log_dir / f"check_{check}.out.json"
    args_file.write_text(json.dumps({k: _jsonable(v) for k, v in arguments.items()}))
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "tutorial.export_checks", check, str(args_file), str(result_file)]
    figures = run_monitored(cmd, log_dir / f"check_{check}.log", check, every_s=every_s)
    return json.loads(result_file.read_text()), figures


def _jsonable(value: Any) -> Any:
    """Paths as strings, numpy integers as ints (for a check's arguments file)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def onnx_signature(path: Path) -> dict[str, Any]:
    """Inputs, outputs (name, dtype, dims), IR version, opset and size of an ONNX file."""
    from tutorial.onnx_surgery import load_without_weights, onnx_files

    model = load_without_weights(path)  # the weights' memory is not needed here

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
        "bytes": sum(p.stat().st_size for p in onnx_files(path)),  # with external data
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
    """Run the plain (or the trimmed) model on one sequence and return ``output``."""
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


#: Weights are quantized to [-64, 64] (onnxruntime's ``reduce_range``), so no int8 product can
#: saturate: on x86-64 with AVX2, or AVX-512 without VNNI, onnxruntime multiplies uint8
#: activations by int8 weights with VPMADDUBSW, which adds two products into a 16-bit integer
#: and clamps what does not fit (onnxruntime's quantization guide, "When and why do I need to
#: try U8U8?": https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html).
#: With 8-bit weights, 255 * 127 * 2 = 64770 overflows 32767; with 7-bit, 255 * 64 * 2 = 32640
#: fits, and every CPU computes the same integer products.
INT8_WEIGHT_LIMIT = 64

#: The largest error int8 may add to the logits, as fractions of the fp32 logits' spread (their
#: standard deviation at that position): ``rms`` over the vocabulary, ``max`` for one logit.
#: A correct int8 graph of weights rounded to 7 bits and activations to 8 bits stays well
#: inside (measured figures: ``tests/test_artifact.py``); a graph that computes something else
#: (a wrong scale, attention that sees the future) lands far outside.
INT8_LOGIT_ERROR_LIMIT = {"rms": 0.25, "max": 1.5}


def quantize_int8(fp32: Path, output: Path, simplify: bool = True) -> dict[str, Any]:
    """Dynamic int8 quantization of the weights (onnxruntime.quantization), for CPU shapes.

    int8 weights (symmetric, one scale per tensor, within +-:data:`INT8_WEIGHT_LIMIT` so that
    AVX2 CPUs compute what VNNI CPUs compute), uint8 activations quantized at run time:
    onnxruntime fuses each into one DynamicQuantizeMatMul (VNNI's u8 x s8 product). First
    the graph is made smaller (:func:`tutorial.onnx_surgery.simplify_decoder`, ``simplify``):
    a decode step reads 124 MB of int8 weights in about 4 ms, and the export's ~1,500 small
    nodes cost about as much again. Each layer's attention becomes onnxruntime's contrib
    ``Attention`` op (``QAttention`` once quantized), so the file is for onnxruntime (Triton's
    onnxruntime backend, the in-process loops), like the int8 kernels themselves. Returns the
    file's signature, with ``simplified`` (what the rewrite did) when it ran.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from tutorial.onnx_surgery import (
        external_data_threshold,
        load_for_rewrite,
        onnx_files,
        simplify_decoder,
        write_external_data,
    )

    source, done = Path(fp32), None
    fp32_bytes = sum(p.stat().st_size for p in onnx_files(fp32))
    if simplify:
        # The rewrite reads no large weight: they stay in fp32's data file (if it has one),
        # which the rewritten graph, saved beside it, points at; the weights it holds (all of
        # them where fp32 has no data file) are written a tensor at a time to one of its own.
        model = load_for_rewrite(fp32)
        done = simplify_decoder(model)
        source = Path(fp32).with_name(f"{Path(output).stem}.simplified.onnx")
        write_external_data(model, source)
        del model
    Path(f"{output}.data").unlink(missing_ok=True)
    try:
        with lean_quantizer():
            quantize_dynamic(
                str(source),
                str(output),
                weight_type=QuantType.QInt8,
                reduce_range=True,
                # int8 weights take about a quarter of the fp32 bytes, the fp32 embedding
                # tables stay: external data from half the threshold on, to stay clear of it
                use_external_data_format=fp32_bytes / 4 > external_data_threshold() / 2,
            )
    finally:
        if simplify:  # its own files only: the weights it points at are fp32's
            for path in (source, source.with_name(f"{source.name}.data")):
                path.unlink(missing_ok=True)
    sig = onnx_signature(output)
    return {**sig, "simplified": done} if done else sig


@contextlib.contextmanager
def lean_quantizer() -> Any:
    """onnxruntime 1.19's ``quantize_dynamic`` with two of its steps done in less memory, the
    result unchanged (tests/test_int8.py compares): its ``ONNXQuantizer`` saves the whole model
    to a temporary folder and loads it again only to infer shapes (``onnx_quantizer.py``, the
    ``save_and_reload_model_with_shape_infer`` call), holding two copies of the weights; here
    the shapes are inferred on the graph without its large weights and written into the same
    model. And it saves the result with onnx's external-data writer; here with
    :func:`tutorial.onnx_surgery.write_external_data`. The memory before and after:
    docs/performance.md, "The int8 quantization in half the memory"."""
    from onnxruntime.quantization import onnx_model, onnx_quantizer
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    from tutorial.onnx_surgery import without_large_weights, write_external_data

    def infer_in_place(model: Any) -> Any:
        import onnx

        inferred = onnx.shape_inference.infer_shapes(without_large_weights(model))
        del model.graph.value_info[:]
        model.graph.value_info.extend(inferred.graph.value_info)
        add_infer_metadata(model)
        return model

    def save(self: Any, output_path: str, use_external_data_format: bool = False) -> None:
        import onnx

        self.topological_sort()
        for init in self.model.graph.initializer:
            self._check_init(init, "end")
        if use_external_data_format:
            write_external_data(self.model, Path(output_path))
        else:
            onnx.save_model(self.model, output_path)

    if not hasattr(onnx_quantizer, "save_and_reload_model_with_shape_infer"):
        # another onnxruntime than the pinned one: its own route, with its memory
        print("quantize_int8: onnxruntime's quantizer as it is (more memory; see lean_quantizer)")
        yield
        return
    saved = onnx_quantizer.save_and_reload_model_with_shape_infer
    saved_save = onnx_model.ONNXModel.save_model_to_file
    onnx_quantizer.save_and_reload_model_with_shape_infer = infer_in_place
    onnx_model.ONNXModel.save_model_to_file = save
    try:
        yield
    finally:
        onnx_quantizer.save_and_reload_model_with_shape_infer = saved
        onnx_model.ONNXModel.save_model_to_file = saved_save


def int8_weight_check(int8: Path, fp32: Path) -> dict[str, Any]:
    """What the int8 file holds, against the fp32 weights it was made from (no CPU involved).

    For every quantized weight ``<name>_quantized`` with its ``_scale`` and ``_zero_point``:
    the largest ``|q|`` of the int8 ones (at most :data:`INT8_WEIGHT_LIMIT`: no saturation
    anywhere) and the largest rounding error ``|scale * (q - zero_point) - w|`` in units of
    ``scale`` (at most 0.5 when every weight is its fp32 value rounded). The fp32 weights are
    those of ``fp32`` after the same graph rewrite :func:`quantize_int8` applies.
    Returns ``tensors``, ``max_abs_q`` and ``max_rounding`` (in steps).
    """
    import onnx
    from onnx import numpy_helper

    from tutorial.onnx_surgery import simplify_decoder

    reference = onnx.load(str(fp32))
    simplify_decoder(reference)
    weights = {i.name: i for i in reference.graph.initializer}
    del reference
    quantized = {i.name: i for i in onnx.load(str(int8)).graph.initializer}
    tensors, max_q, max_rounding = 0, 0, 0.0
    for name, init in quantized.items():
        if not name.endswith("_quantized"):
            continue
        base = name[: -len("_quantized")]
        if base not in weights:
            raise TutorialError(f"{Path(int8).name}: {name} quantizes {base}, not in {fp32}")
        q = numpy_helper.to_array(init).astype(np.int64)
        scale = numpy_helper.to_array(quantized[f"{base}_scale"]).astype(np.float64)
        zero = numpy_helper.to_array(quantized[f"{base}_zero_point"]).astype(np.int64)
        w = numpy_helper.to_array(weights[base]).astype(np.float64)
        if init.data_type == onnx.TensorProto.INT8:
            max_q = max(max_q, int(np.abs(q - zero).max()))
        error = np.abs(scale * (q - zero) - w).max() / float(np.max(scale))
        max_rounding = max(max_rounding, float(error))
        tensors += 1
    return {"tensors": tensors, "max_abs_q": max_q, "max_rounding": max_rounding}


def teacher_forced_logits(session: Any, prompt_ids: list[int], tokens: list[int]) -> np.ndarray:
    """The decoder-with-past model's logits ``[len(tokens), vocab]``: the prompt prefilled,
    then ``tokens`` fed one a step whatever the model would have chosen (teacher forcing), so
    two models are compared on the same sequence and one early disagreement does not send
    them down different texts."""
    idt = input_dtype(session, "input_ids")
    mdt = input_dtype(session, "attention_mask")
    past, rows = empty_past(session), []
    ids, total = np.asarray([prompt_ids], dtype=idt), len(prompt_ids)
    for token in tokens:
        logits, past = session.run(
            ["logits", "present"],
            {"input_ids": ids, "attention_mask": np.ones((1, total), dtype=mdt), "past": past},
        )
        rows.append(logits[0])
        ids, total = np.asarray([[token]], dtype=idt), total + 1
    return np.stack(rows)


def logit_error(reference: np.ndarray, other: np.ndarray) -> dict[str, Any]:
    """How far ``other`` logits are from ``reference`` ones (``[positions, vocab]``), per
    position as fractions of the reference logits' standard deviation: the worst position's
    ``rms`` and ``max`` error, and how many positions keep the reference's top token."""
    diff = other.astype(np.float64) - reference
    spread = reference.std(axis=1)
    return {
        "rms": float((np.sqrt((diff**2).mean(axis=1)) / spread).max()),
        "max": float((np.abs(diff).max(axis=1) / spread).max()),
        "top1_equal": int((other.argmax(axis=1) == reference.argmax(axis=1)).sum()),
        "positions": int(reference.shape[0]),
    }


def int8_logit_error(
    fp32: Any, int8: Any, prompts: list[list[int]], new_tokens: int = 20
) -> dict[str, Any]:
    """The int8 model's logits against the fp32 model's, teacher-forced along fp32's greedy
    tokens for each prompt (sessions of the two decoder-with-past files): the worst
    :func:`logit_error` over the prompts, with ``top1_equal`` and ``positions`` summed."""
    worst: dict[str, Any] = {"rms": 0.0, "max": 0.0, "top1_equal": 0, "positions": 0}
    for ids in prompts:
        tokens = greedy_with_past(fp32, ids, new_tokens, eos_token_id=None)
        err = logit_error(
            teacher_forced_logits(fp32, ids, tokens), teacher_forced_logits(int8, ids, tokens)
        )
        worst = {
            "rms": max(worst["rms"], err["rms"]),
            "max": max(worst["max"], err["max"]),
            "top1_equal": worst["top1_equal"] + err["top1_equal"],
            "positions": worst["positions"] + err["positions"],
        }
    return worst

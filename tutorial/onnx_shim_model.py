"""Triton python backend model that serves an ONNX file with the onnxruntime pip package.

Only for the local server bundled in nvidia-pytriton, which has the python backend but not
the onnxruntime one. ``tutorial.triton_local`` copies this file as ``model.py`` next to the
real ``model.onnx`` and derives the config from the real one: same name, inputs, outputs,
dtypes and dims, only ``backend: "python"`` instead of ``platform: "onnxruntime_onnx"``.

At load it refuses what Triton's onnxruntime backend refuses, with that backend's wording
(``ValidateInputs`` / ``ValidateOutputs`` and ``CompareDimsSupported`` in
triton-inference-server/onnxruntime_backend, r24.10): the input count, each configured
input's and output's name and data type, input dims (a -1 in the model accepts any dim) and
output dims (compared exactly). It runs inside Triton and imports nothing from the repository.
"""

import json
import os
from pathlib import Path

import onnxruntime as ort
import triton_python_backend_utils as pb_utils

#: onnxruntime's element types -> Triton's data type names (TRITONSERVER_DataTypeString).
ORT_TO_TRITON = {
    "tensor(float)": "FP32",
    "tensor(float16)": "FP16",
    "tensor(double)": "FP64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}


def shape_text(dims):
    return "[" + ",".join(str(d) for d in dims) + "]"


def compare_dims(model, tensor, model_shape, dims, max_batch_size, exact):
    """The onnxruntime backend's CompareDimsSupported; returns its error text or None."""
    if max_batch_size > 0 and (not model_shape or model_shape[0] != -1):
        return (
            f"model '{model}', tensor '{tensor}': for the model to support batching the "
            "shape should have at least 1 dimension and the first dimension must be -1; "
            f"but shape expected by the model is {shape_text(model_shape)}"
        )
    full = [-1, *dims] if max_batch_size > 0 else list(dims)
    if len(model_shape) == len(full) and all(
        m == d for m, d in zip(model_shape, full) if exact or m != -1
    ):
        return None
    configured = (
        f"{len(full)} dimensions (an initial batch dimension because max_batch_size > 0 "
        f"followed by the explicit tensor shape, making complete shape {shape_text(full)})"
        if max_batch_size > 0
        else f"{len(full)} dimensions (shape {shape_text(full)})"
    )
    return (
        f"model '{model}', tensor '{tensor}': the model expects {len(model_shape)} dimensions "
        f"(shape {shape_text(model_shape)}) but the model configuration specifies {configured}"
    )


def check_config(config, session):
    """Every refusal the onnxruntime backend would make at load, or None."""
    model = config["name"]
    max_batch = int(config.get("max_batch_size", 0))
    onnx = {
        "input": {i.name: i for i in session.get_inputs()},
        "output": {o.name: o for o in session.get_outputs()},
    }
    if len(onnx["input"]) != len(config.get("input", [])):
        return (
            f"unable to load model '{model}', configuration expects "
            f"{len(config.get('input', []))} inputs, model provides {len(onnx['input'])}"
        )
    for kind in ("input", "output"):
        for io in config.get(kind, []):
            name, dtype = io["name"], io["data_type"]
            real = onnx[kind].get(name)
            if real is None:
                allowed = ", ".join(sorted(onnx[kind]))
                return f"unexpected inference {kind} '{name}', allowed {kind}s are: {allowed}"
            real_dtype = ORT_TO_TRITON.get(real.type, real.type)
            if "TYPE_" + real_dtype != dtype:
                return (
                    f"unable to load model '{model}', unexpected datatype {real_dtype} for "
                    f"{kind} '{name}', expecting {dtype}"
                )
            model_shape = [d if isinstance(d, int) else -1 for d in real.shape]
            dims = [int(d) for d in io.get("reshape", {}).get("shape", io["dims"])]
            problem = compare_dims(model, name, model_shape, dims, max_batch, kind == "output")
            if problem:
                return problem
    return None


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        here = Path(args["model_repository"]) / args["model_version"]
        filename = config["parameters"]["onnx_model_filename"]["string_value"]
        if not (here / filename).is_file():
            raise pb_utils.TritonModelException(
                f"{config['name']}: no {filename} in {here}. This is the committed template of "
                "the model repository; run notebooks/03_model_repository.ipynb, which assembles "
                "the repository to serve (weights, vocab files, shapes)."
            )
        options = ort.SessionOptions()
        threads = int(os.environ.get("TUTORIAL_ORT_THREADS", "0"))
        if threads:
            options.intra_op_num_threads = threads
        # Idle onnxruntime threads spin for a while after each run; beside the BLS model that
        # drives this one, on few cores, that spinning takes the CPU the next step needs.
        spinning = os.environ.get("TUTORIAL_ORT_SPINNING", "0")
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        self.session = ort.InferenceSession(
            str(here / filename), options, providers=["CPUExecutionProvider"]
        )
        problem = check_config(config, self.session)
        if problem:
            raise pb_utils.TritonModelException(problem)
        pb_utils.Logger.log_info(
            f"{config['name']}: onnxruntime {ort.__version__} serves {filename} "
            "(python-backend stand-in for Triton's onnxruntime backend)"
        )
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {}
            for name in self.inputs:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    feeds[name] = tensor.as_numpy()
            try:
                values = self.session.run(self.outputs, feeds)
            except Exception as exc:  # onnxruntime's own message names the bad input
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
                continue
            tensors = [pb_utils.Tensor(n, v) for n, v in zip(self.outputs, values)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

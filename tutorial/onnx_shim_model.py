"""Triton python backend model that serves an ONNX file with the onnxruntime pip package.

Only for the local server bundled in nvidia-pytriton, which has the python backend but not
the onnxruntime one. ``tutorial.triton_local`` copies this file as ``model.py`` next to the
real ``model.onnx`` and derives the config from the real one: same name, inputs, outputs,
dtypes and dims, only ``backend: "python"`` instead of ``platform: "onnxruntime_onnx"``.
It runs inside Triton and imports nothing from the repository.
"""

import json
import os
from pathlib import Path

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        here = Path(args["model_repository"]) / args["model_version"]
        filename = config["parameters"]["onnx_model_filename"]["string_value"]
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

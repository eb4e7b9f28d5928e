"""Triton python backend: last-position logits -> the next token's text (greedy).

The text is exactly what GPT-2's tokenizer decodes for that token, its own leading space
included, so a client appends it as is (the seed added another space before each token).
"""

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import ByteLevelBPETokenizer


class TritonPythonModel:
    def initialize(self, args):
        here = Path(args["model_repository"]) / args["model_version"]
        if not (here / "vocab.json").is_file():
            raise pb_utils.TritonModelException(
                f"{args['model_name']}: no vocab.json beside model.py. This is the committed "
                "template of the model repository; run notebooks/03_model_repository.ipynb, "
                "which assembles the repository to serve (weights, vocab files, shapes)."
            )
        self.tokenizer = ByteLevelBPETokenizer(str(here / "vocab.json"), str(here / "merges.txt"))

    def execute(self, requests):
        responses = []
        for request in requests:
            logits = pb_utils.get_input_tensor_by_name(request, "last_logits").as_numpy()
            token = int(np.argmax(logits[-1]))
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            out = np.asarray([text.encode("utf-8")], dtype=object)
            responses.append(
                pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("NEXT_TOKEN", out)])
            )
        return responses

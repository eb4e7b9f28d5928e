"""Export GPT-2 as one ONNX model for prefill and decode, with a stacked KV cache.

Run as ``python -m tutorial.export_past MODEL_DIR OUTPUT.onnx [--opset 17]`` (notebook 02
does, through ``helpers.export_with_past``, so TensorFlow's memory goes away with the process).

Inputs:  ``input_ids`` [batch, new_len] int32, ``attention_mask`` [batch, past_len + new_len]
int32, ``past`` [n_layer, 2, batch, n_head, past_len, head_dim] float32 (past_len may be 0:
that call is the prefill). Outputs: ``logits`` [batch, vocab] at the last position, and
``present`` (the cache to feed back as ``past``).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def export(model_dir: Path, output: Path, opset: int) -> None:
    """Trace the step function and convert it with ``tf2onnx.convert.from_function``."""
    from tutorial.model_source import import_tensorflow

    tf = import_tensorflow()
    import tf2onnx
    from transformers import TFGPT2LMHeadModel

    model = TFGPT2LMHeadModel.from_pretrained(str(model_dir))
    cfg = model.config
    head_dim = cfg.n_embd // cfg.n_head
    spec = (
        tf.TensorSpec([None, None], tf.int32, name="input_ids"),
        tf.TensorSpec([None, None], tf.int32, name="attention_mask"),
        tf.TensorSpec([cfg.n_layer, 2, None, cfg.n_head, None, head_dim], tf.float32, name="past"),
    )

    @tf.function(input_signature=spec)
    def step(input_ids, attention_mask, past):
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=tf.unstack(past, axis=0),
            use_cache=True,
        )
        return {"logits": out.logits[:, -1, :], "present": tf.stack(out.past_key_values, axis=0)}

    output.parent.mkdir(parents=True, exist_ok=True)
    tf2onnx.convert.from_function(step, input_signature=spec, opset=opset, output_path=str(output))
    print(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--opset", type=int, default=17)
    args = parser.parse_args()
    export(args.model_dir, args.output, args.opset)


if __name__ == "__main__":
    main()

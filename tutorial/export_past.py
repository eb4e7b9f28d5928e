"""Export GPT-2 to ONNX without copying its weights: one traced step, weights as graph inputs.

Notebook 02 runs each stage as a child process (``python -m tutorial.export_past STAGE ...``,
through ``helpers.run_export_stage``), so TensorFlow's memory goes away with the process:

``trace MODEL_DIR PARTS_DIR``
    Load the TensorFlow GPT-2, trace :func:`step_function`, and write the traced graph with
    every variable turned into a graph input (``graph.pb``, 0.6 MB for 124M) and the variables'
    values as ``.npy`` files (``weights/``), listed in ``parts.json``.
``convert PARTS_DIR LIGHT.onnx [--opset 17]``
    ``tf2onnx.convert.from_graph_def`` on that graph (see :func:`convert`): the ONNX model has
    the same nodes, and one input per weight instead of an initializer.
``assemble PARTS_DIR LIGHT.onnx WITH_PAST.onnx FULL.onnx``
    Write the real weights into initializers (matched by name, shape and dtype, every one
    checked) and derive the two models (:func:`tutorial.onnx_surgery.assemble`).

Why: ``tf2onnx.convert.from_function`` freezes the variables into constants, and from there
every step holds its own copy of the weights: the frozen function and its GraphDef, grappler's
MetaGraph in and out, tf2onnx's graph, and one deep copy of that graph per optimizer pass
(tf2onnx keeps them to roll back a failed pass). For GPT-2 124M (0.5 GB of weights) that peaked
at 20-22 GB. Without weights the traced graph is 0.6 MB, and each stage holds at most one copy.

The step function's inputs: ``input_ids`` [batch, new_len] int32, ``attention_mask`` [batch,
past_len + new_len] int32, ``past`` [n_layer, 2, batch, n_head, past_len, head_dim] float32
(past_len may be 0: that call is the prefill); positions come from the mask (a row padded with
0s keeps its own positions, so rows of different lengths can share a batch). Outputs: ``logits`` [batch, vocab] at the last
position, ``all_logits`` [batch, new_len, vocab], and ``present`` (the cache to feed back).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from tutorial.common import TutorialError

#: Written by ``trace``, read by ``convert`` and ``assemble``.
PARTS_FILE = "parts.json"
GRAPH_FILE = "graph.pb"
WEIGHTS_DIR = "weights"

_START = time.monotonic()


def say(message: str) -> None:
    """One line of progress on stdout (the parent process shows the latest one)."""
    print(f"[{time.monotonic() - _START:5.1f} s] {message}", flush=True)


def step_function(model: Any) -> Any:
    """One generation step of ``model`` as a ``tf.function`` (what the export traces)."""
    from tutorial.model_source import import_tensorflow

    tf = import_tensorflow()
    cfg = model.config
    head_dim = cfg.n_embd // cfg.n_head
    spec = (
        tf.TensorSpec([None, None], tf.int32, name="input_ids"),
        tf.TensorSpec([None, None], tf.int32, name="attention_mask"),
        tf.TensorSpec([cfg.n_layer, 2, None, cfg.n_head, None, head_dim], tf.float32, name="past"),
    )

    @tf.function(input_signature=spec)
    def step(input_ids, attention_mask, past):
        # Each token's position is the number of real tokens before it in its row: the count
        # of 1s in attention_mask, as transformers' generate() derives it. With a mask of all
        # 1s that is past_len, past_len + 1, ... (what the model does without position_ids);
        # in a batch whose rows are padded (mask 0) to a common cache length, every row keeps
        # the positions it has alone, so batched rows make the same tokens as single ones.
        new_len = tf.shape(input_ids)[1]
        positions = tf.math.cumsum(attention_mask, axis=-1)[:, -new_len:] - 1
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=tf.maximum(positions, 0),
            past_key_values=tf.unstack(past, axis=0),
            use_cache=True,
        )
        return {
            "logits": out.logits[:, -1, :],  # served by gpt2_with_past
            "all_logits": out.logits,  # every position: model.onnx and the trimmed gpt2
            "present": tf.stack(out.past_key_values, axis=0),
        }

    return step


def weights_as_inputs(graph_def: Any, variables: dict[str, Any]) -> dict[str, str]:
    """Turn the traced graph's captured variables into placeholders, in place.

    ``variables`` maps each captured resource placeholder's node name to its variable. Each
    placeholder becomes a float placeholder of the variable's shape, named after the variable;
    ``ReadVariableOp`` becomes ``Identity`` and ``ResourceGather`` becomes ``GatherV2``, which
    is what TensorFlow's freezing does, minus the copy of the values. Returns {old: new} names.
    """
    from tutorial.model_source import import_tensorflow

    tf = import_tensorflow()
    existing = {n.name for n in graph_def.node}
    renamed = {old: var.name.split(":")[0] for old, var in variables.items()}
    clash = sorted(set(renamed.values()) & (existing - set(renamed)))
    if clash:
        raise TutorialError(f"variable names clash with graph nodes: {clash[:5]}")

    def new_name(ref: str) -> str:
        control = ref.startswith("^")
        node, _, port = ref.lstrip("^").partition(":")
        node = renamed.get(node, node)
        return ("^" if control else "") + node + (f":{port}" if port else "")

    axis_nodes = []
    for node in graph_def.node:
        reads_variable = any(ref.lstrip("^").split(":")[0] in variables for ref in node.input)
        node.input[:] = [new_name(ref) for ref in node.input]
        if node.name in variables:
            var = variables[node.name]
            node.name = renamed[node.name]
            node.op = "Placeholder"
            node.attr.clear()
            node.attr["dtype"].type = var.dtype.as_datatype_enum
            node.attr["shape"].shape.CopyFrom(tf.TensorShape(var.shape).as_proto())
        elif node.op == "ReadVariableOp" and reads_variable:
            dtype = node.attr["dtype"].type
            node.op = "Identity"
            node.attr.clear()
            node.attr["T"].type = dtype
        elif node.op == "ResourceGather" and reads_variable:
            if "batch_dims" in node.attr and node.attr["batch_dims"].i != 0:
                raise TutorialError(f"{node.name}: ResourceGather with batch_dims != 0")
            dtype, tindices = node.attr["dtype"].type, node.attr["Tindices"].type
            node.op = "GatherV2"
            node.attr.clear()
            node.attr["Tparams"].type = dtype
            node.attr["Tindices"].type = tindices
            node.attr["Taxis"].type = tf.int32.as_datatype_enum
            data = [ref for ref in node.input if not ref.startswith("^")]
            control = [ref for ref in node.input if ref.startswith("^")]
            node.input[:] = [*data, f"{node.name}/axis", *control]
            axis_nodes.append(f"{node.name}/axis")
        elif reads_variable:
            raise TutorialError(
                f"{node.name} ({node.op}) reads a variable; only ReadVariableOp and "
                "ResourceGather are rewritten. Export this model with tf2onnx.convert.from_function."
            )
    for name in axis_nodes:
        const = graph_def.node.add()
        const.name, const.op = name, "Const"
        const.attr["dtype"].type = tf.int32.as_datatype_enum
        const.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(0, dtype=tf.int32))
    resource = tf.resource.as_datatype_enum
    left = [
        n.name for n in graph_def.node if "dtype" in n.attr and n.attr["dtype"].type == resource
    ]
    if left:
        raise TutorialError(f"resource tensors left in the traced graph: {left[:5]}")
    return renamed


def trace(model_dir: Path, parts_dir: Path) -> dict[str, Any]:
    """Trace the step function; write its weightless graph and the weights' values apart."""
    import numpy as np

    from tutorial.model_source import load_tf_model

    say(f"loading the TensorFlow model from {model_dir}")
    model = load_tf_model(model_dir)
    say("tracing the step function")
    concrete = step_function(model).get_concrete_function()
    graph_def = concrete.graph.as_graph_def()
    by_handle = {id(v.handle): v for v in model.variables}
    variables = {}
    for external, internal in concrete.graph.captures:
        if id(external) not in by_handle:
            raise TutorialError(f"the step captures {internal.op.name}, which is no variable")
        variables[internal.op.name] = by_handle[id(external)]
    renamed = weights_as_inputs(graph_def, variables)

    weights_dir = parts_dir / WEIGHTS_DIR
    weights_dir.mkdir(parents=True, exist_ok=True)
    say(f"writing {len(variables)} weights to {weights_dir}")
    weights = []
    for i, (old, var) in enumerate(variables.items()):
        value = var.numpy()
        np.save(weights_dir / f"{i:03d}.npy", value)
        weights.append(
            {
                "name": renamed[old],
                "shape": list(value.shape),
                "dtype": str(value.dtype),
                "file": f"{WEIGHTS_DIR}/{i:03d}.npy",
            }
        )
    (parts_dir / GRAPH_FILE).write_bytes(graph_def.SerializeToString())
    outputs = {key: t.name for key, t in concrete.structured_outputs.items()}
    inputs = [t.name for t in concrete.inputs if t.name.split(":")[0] not in variables]
    cfg = model.config
    parts = {
        "inputs": inputs,  # input_ids:0, attention_mask:0, past:0
        "outputs": outputs,  # {"logits": "Identity_1:0", ...}
        "weights": weights,
        "config": {k: int(getattr(cfg, k)) for k in ("n_layer", "n_head", "n_embd", "vocab_size")},
    }
    (parts_dir / PARTS_FILE).write_text(json.dumps(parts, indent=1))
    say(f"wrote {GRAPH_FILE} ({graph_def.ByteSize() / 1e6:.1f} MB) and {PARTS_FILE}")
    return parts


def convert(parts_dir: Path, output: Path, opset: int) -> None:
    """The tf2onnx call: the traced graph, its weights still graph inputs, to ONNX."""
    import tf2onnx

    from tutorial.model_source import import_tensorflow

    tf = import_tensorflow()
    parts = json.loads((parts_dir / PARTS_FILE).read_text())
    graph_def = tf.compat.v1.GraphDef.FromString((parts_dir / GRAPH_FILE).read_bytes())
    weights = [w["name"] + ":0" for w in parts["weights"]]
    rename = {tensor: key for key, tensor in parts["outputs"].items()}
    rename.update({name: name.split(":")[0] for name in parts["inputs"] + weights})
    say(f"tf2onnx: {len(graph_def.node)} TensorFlow nodes, {len(weights)} weights as inputs")
    tf2onnx.convert.from_graph_def(
        graph_def,
        input_names=parts["inputs"] + weights,  # input_ids:0, attention_mask:0, past:0, weights
        output_names=list(parts["outputs"].values()),
        tensors_to_rename=rename,  # Identity_1:0 -> logits, input_ids:0 -> input_ids, ...
        opset=opset,
        output_path=str(output),
    )
    say(f"wrote {output} ({output.stat().st_size / 1e6:.2f} MB, no weights yet)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    stages = parser.add_subparsers(dest="stage", required=True)
    p = stages.add_parser("trace")
    p.add_argument("model_dir", type=Path)
    p.add_argument("parts_dir", type=Path)
    p = stages.add_parser("convert")
    p.add_argument("parts_dir", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--opset", type=int, default=17)
    p = stages.add_parser("assemble")
    p.add_argument("parts_dir", type=Path)
    p.add_argument("light", type=Path)
    p.add_argument("with_past", type=Path)
    p.add_argument("full", type=Path)
    args = parser.parse_args(argv)
    if args.stage == "trace":
        trace(args.model_dir, args.parts_dir)
    elif args.stage == "convert":
        convert(args.parts_dir, args.output, args.opset)
    else:
        from tutorial.onnx_surgery import assemble

        assemble(args.parts_dir, args.light, args.with_past, args.full, log=say)


if __name__ == "__main__":
    main()

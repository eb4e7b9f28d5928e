"""ONNX graph edits of notebook 02: the real weights into the traced graph, the served variants.

Only ``onnx`` and numpy: no TensorFlow, so these steps stay small (one copy of the weights,
plus one while a file is written).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tutorial.common import TutorialError

#: The step's own inputs; every other input of the converted graph must be a weight.
STEP_INPUTS = ("input_ids", "attention_mask", "past")
#: Weight-only nodes folded into initializers (tf2onnx folds these when weights are constants).
FOLDABLE = ("Transpose", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Cast")


def _dims(value_info: Any) -> list[int]:
    return [
        d.dim_value if d.HasField("dim_value") else -1
        for d in value_info.type.tensor_type.shape.dim
    ]


def _fold(node: Any, args: list[np.ndarray]) -> np.ndarray:
    """numpy's result of one of the :data:`FOLDABLE` nodes."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    x = args[0]
    if node.op_type == "Transpose":
        return np.ascontiguousarray(np.transpose(x, attrs.get("perm")))
    if node.op_type == "Unsqueeze":
        return np.expand_dims(x, tuple(int(a) for a in args[1]))
    if node.op_type == "Squeeze":
        return np.squeeze(x, tuple(int(a) for a in args[1]) if len(args) > 1 else None)
    if node.op_type == "Reshape":
        shape = [int(d) for d in args[1]]
        if not attrs.get("allowzero", 0):
            shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return x.reshape(shape)
    if node.op_type == "Cast":
        return x.astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
    return x  # Identity


def attach_weights(
    model: Any, parts_dir: Path, log: Callable[[str], None] = print
) -> dict[str, list[str]]:
    """Turn the converted graph's weight inputs into initializers holding the real values.

    Every weight ``trace`` wrote must be an input of the graph, with the same name, dtype and
    shape, and every input other than :data:`STEP_INPUTS` must be a weight; otherwise this
    raises, naming the mismatch. Nodes that only transform weights (tf2onnx folds those when
    weights are constants: the transposed embedding the LM head multiplies by) are folded.
    Returns the names attached and a line per folded node.
    """
    from onnx import helper

    parts = json.loads((parts_dir / "parts.json").read_text())
    manifest = {w["name"]: w for w in parts["weights"]}
    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    missing = sorted(set(manifest) - set(inputs))
    unknown = sorted(set(inputs) - set(manifest) - set(STEP_INPUTS))
    if missing or unknown:
        raise TutorialError(
            f"the converted graph and the traced weights disagree: weights that are no input "
            f"{missing[:5]}, inputs that are no weight {unknown[:5]}. Rerun the trace stage."
        )
    values: dict[str, np.ndarray] = {}
    for name, w in manifest.items():
        value = np.load(parts_dir / w["file"], mmap_mode="r")
        declared = _dims(inputs[name])
        elem = inputs[name].type.tensor_type.elem_type
        if list(value.shape) != w["shape"] or declared != w["shape"]:
            raise TutorialError(
                f"weight {name}: file {list(value.shape)}, recorded {w['shape']}, graph input "
                f"{declared}; they must be equal."
            )
        if str(value.dtype) != w["dtype"] or helper.np_dtype_to_tensor_dtype(value.dtype) != elem:
            raise TutorialError(f"weight {name}: dtype {value.dtype} does not match the graph")
        values[name] = value
    keep = [i for i in graph.input if i.name not in manifest]
    del graph.input[:]
    graph.input.extend(keep)

    constants = {t.name: t for t in graph.initializer}
    folded, nodes = [], []
    for node in graph.node:
        args = [n for n in node.input if n]
        if (
            node.op_type in FOLDABLE
            and args
            and args[0] in values
            and all(a in values or a in constants for a in args)
        ):
            from onnx import numpy_helper

            inputs_np = [
                values[a] if a in values else numpy_helper.to_array(constants[a]) for a in args
            ]
            values[node.output[0]] = _fold(node, inputs_np)
            folded.append(
                f"{node.op_type}({args[0]}) {list(inputs_np[0].shape)} -> "
                f"{list(values[node.output[0]].shape)}"
            )
            continue
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    folded += matmul_weights_2d(graph, values)

    used = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
    for name in list(values):
        value = values.pop(name)  # the initializer becomes the only copy
        if name not in used:
            continue
        tensor = graph.initializer.add()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(value.dtype)
        tensor.dims.extend(value.shape)
        tensor.raw_data = np.ascontiguousarray(value).tobytes()
        del value
    prune_unused(graph)
    log(f"attached {len(manifest)} weights (name, dtype and shape checked); folded: {folded}")
    return {"attached": sorted(manifest), "folded": folded}


def matmul_weights_2d(graph: Any, values: dict[str, np.ndarray]) -> list[str]:
    """Give every MatMul weight of shape [1, K, N] the shape [K, N], in place; a line for each.

    tf2onnx multiplies by the LM head's transposed embedding as a [1, 768, 50257] tensor.
    onnxruntime pre-packs only a 2-D constant right-hand side, so with three dims each step
    over more than one row re-reads it the slow way (measured with onnxruntime 1.19.2, GPT-2
    124M, 8 rows: that MatMul took 15 ms of a 45 ms step; 4 ms for 1 row). The left-hand side
    has at least three dims ([batch, tokens, 768]), so broadcasting gives the same result.
    """
    changed = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in values:
            continue
        value = values[node.input[1]]
        if value.ndim == 3 and value.shape[0] == 1:
            values[node.input[1]] = value[0]
            changed.append(
                f"MatMul({node.input[1]}) {list(value.shape)} -> {list(value.shape[1:])}"
            )
    return changed


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
    # Delete in place: re-adding the kept initializers would copy every weight, and protobuf
    # keeps the old copies until the whole model is freed.
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name not in needed:
            del graph.initializer[i]


def keep_outputs(graph: Any, names: list[str]) -> None:
    """Keep only the graph outputs ``names`` (in that order) and what computes them."""
    by_name = {o.name: o for o in graph.output}
    absent = [n for n in names if n not in by_name]
    if absent:
        raise TutorialError(f"the graph has no output {absent}; it has {sorted(by_name)}")
    chosen = [_copy(by_name[n]) for n in names]
    del graph.output[:]
    graph.output.extend(chosen)
    prune_unused(graph)


def _copy(message: Any) -> Any:
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def rename_tensor(graph: Any, old: str, new: str) -> None:
    """Rename tensor ``old`` to ``new`` everywhere in ``graph`` (nodes, inputs, outputs)."""
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.name == old:
            value.name = new


def with_empty_past(graph: Any) -> list[Any]:
    """Replace the ``past`` input with an empty cache built in the graph.

    ``past`` [n_layer, 2, batch, n_head, 0, head_dim] of zeros, batch taken from
    ``input_ids``: the step model then computes the prefill from ``input_ids`` and
    ``attention_mask`` alone. Returns the nodes added.
    """
    from onnx import TensorProto, helper

    past = next((i for i in graph.input if i.name == "past"), None)
    if past is None:
        raise TutorialError("the graph has no 'past' input")
    n_layer, two, _, n_head, _, head_dim = _dims(past)
    lead = helper.make_tensor("empty_past_lead", TensorProto.INT64, [2], [n_layer, two])
    tail = helper.make_tensor("empty_past_tail", TensorProto.INT64, [3], [n_head, 0, head_dim])
    first = helper.make_tensor("empty_past_first", TensorProto.INT64, [1], [0])
    zero = helper.make_tensor("empty_past_zero", TensorProto.FLOAT, [1], [0.0])
    graph.initializer.extend([lead, tail, first])
    added = [
        helper.make_node("Shape", ["input_ids"], ["empty_past_ids_shape"]),
        helper.make_node(
            "Gather", ["empty_past_ids_shape", "empty_past_first"], ["empty_past_batch"]
        ),
        helper.make_node(
            "Concat",
            ["empty_past_lead", "empty_past_batch", "empty_past_tail"],
            ["empty_past_shape"],
            axis=0,
        ),
        helper.make_node("ConstantOfShape", ["empty_past_shape"], ["past"], value=zero),
    ]
    keep = [i for i in graph.input if i.name != "past"]
    del graph.input[:]
    graph.input.extend(keep)
    for node in reversed(added):
        graph.node.insert(0, node)
    return added


def assemble(
    parts_dir: Path,
    light: Path,
    with_past: Path,
    full: Path,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """From the converted graph and the traced weights, write the two exported models.

    ``with_past``: inputs ``input_ids``, ``attention_mask``, ``past`` -> ``logits`` (last
    position), ``present``. ``full``, the plain export with the original OCI sample's outputs:
    inputs ``input_ids``, ``attention_mask`` -> ``logits`` (every position),
    ``past_key_values``; the same graph with an empty ``past`` built inside
    (:func:`with_empty_past`).
    """
    import onnx

    model = onnx.load(str(light))
    onnx.checker.check_model(model)  # the graph without weights: cheap to check
    info = attach_weights(model, parts_dir, log)
    graph = model.graph

    outputs = {o.name: _copy(o) for o in graph.output}
    keep_outputs(graph, ["logits", "present"])
    with_past.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(with_past))
    log(f"wrote {with_past} ({with_past.stat().st_size / 1e6:.1f} MB)")

    del graph.output[:]
    graph.output.extend([outputs["all_logits"], outputs["present"]])
    prune_unused(graph)  # drops the last-position slice
    rename_tensor(graph, "all_logits", "logits")
    rename_tensor(graph, "present", "past_key_values")
    added = with_empty_past(graph)
    onnx.save(model, str(full))
    log(
        f"wrote {full} ({full.stat().st_size / 1e6:.1f} MB): {len(added)} nodes build the empty past"
    )
    return {**info, "empty_past_nodes": [onnx.helper.printable_node(n) for n in added]}


def _outputs_text(graph: Any) -> str:
    def dim(d: Any) -> str:
        return str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")

    return ", ".join(
        f"{o.name} [{', '.join(dim(d) for d in o.type.tensor_type.shape.dim)}]"
        for o in graph.output
    )


def trim_to_last_logits(full: Path, output: Path) -> dict[str, Any]:
    """Rewrite the plain export so it returns only what the decoder uses.

    The plain model returns ``logits [B, L, vocab]`` and the stacked ``past_key_values``;
    the decoder reads one row of the logits. This adds ``last_logits [B, vocab]``, the row at
    each sequence's last real position (from ``attention_mask``), and drops everything else,
    so the ensemble moves ``vocab`` floats per step instead of ``L * vocab`` plus the cache.
    Prints the outputs before and after, and the nodes it adds.
    """
    import onnx
    from onnx import TensorProto, helper

    from tutorial.export import onnx_signature

    model = onnx.load(str(full))
    graph = model.graph
    names = [o.name for o in graph.output]
    if "logits" not in names:
        raise TutorialError(f"{full.name} has outputs {names}; expected 'logits'.")
    mask = next((i.name for i in graph.input if i.name == "attention_mask"), None)
    if mask is None:
        raise TutorialError(f"{full.name} has no 'attention_mask' input.")
    print(f"before: {full.name} -> {_outputs_text(graph)}")
    vocab = next(o for o in graph.output if o.name == "logits").type.tensor_type.shape.dim[-1]
    one = helper.make_tensor("trim_one", TensorProto.INT64, [], [1])
    axis = helper.make_tensor("trim_axis", TensorProto.INT64, [1], [1])
    graph.initializer.extend([one, axis])
    added = [
        helper.make_node("Cast", [mask], ["trim_mask64"], to=TensorProto.INT64),
        helper.make_node("ReduceSum", ["trim_mask64", "trim_axis"], ["trim_len"], keepdims=1),
        helper.make_node("Sub", ["trim_len", "trim_one"], ["trim_last"]),
        helper.make_node("GatherND", ["logits", "trim_last"], ["last_logits"], batch_dims=1),
    ]
    graph.node.extend(added)
    out = helper.make_tensor_value_info(
        "last_logits", TensorProto.FLOAT, ["batch", vocab.dim_value]
    )
    del graph.output[:]
    graph.output.append(out)
    before = len(graph.node)
    prune_unused(graph)
    print(f"added {len(added)} nodes:")
    for node in added:
        print("  ", helper.printable_node(node))
    print(f"pruned {before - len(graph.node)} nodes that only computed the dropped outputs")
    print(f"after:  {output.name} -> {_outputs_text(graph)}")
    output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(output))
    del model
    onnx.checker.check_model(str(output))
    return onnx_signature(output)

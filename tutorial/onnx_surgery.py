"""ONNX graph edits of notebook 02: the real weights into the traced graph, the served variants.

Only ``onnx`` and numpy: no TensorFlow, so these steps stay small (one copy of the weights,
plus one while a file is written).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tutorial.common import TutorialError

#: The step's own inputs; every other input of the converted graph must be a weight.
STEP_INPUTS = ("input_ids", "attention_mask", "past")
#: Weight-only nodes folded into initializers (tf2onnx folds these when weights are constants).
FOLDABLE = ("Transpose", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Cast")


#: Files whose protobuf would pass this many bytes keep their weights in a data file beside them
#: (``<file>.data``): protobuf cannot hold a message over 2 GB (onnx's external data format,
#: https://onnx.ai/onnx/repo-docs/ExternalData.html). ``TUTORIAL_EXTERNAL_DATA_MB`` lowers it,
#: so that the tests carry a small model through that route.
EXTERNAL_DATA_BYTES = 2_000_000_000


def external_data_threshold() -> int:
    """:data:`EXTERNAL_DATA_BYTES`, or ``TUTORIAL_EXTERNAL_DATA_MB`` megabytes when set."""
    mb = os.environ.get("TUTORIAL_EXTERNAL_DATA_MB")
    return int(float(mb) * 1e6) if mb else EXTERNAL_DATA_BYTES


def save_onnx(model: Any, path: Path, keep: bool = True) -> list[Path]:
    """Save ``model`` at ``path``, its weights in ``<name>.data`` beside it when the file would
    pass :func:`external_data_threshold`. Returns the files written (see :func:`onnx_files`).
    ``keep=False``: the caller is done with ``model``, whose weights may then be left out of it
    (saving with external data moves them to the file)."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(f"{path.name}.data")
    data.unlink(missing_ok=True)  # a stale data file from an earlier, larger save
    if model.ByteSize() > external_data_threshold():
        write_external_data(model, path)
        # the weights moved out of ``model`` into the file: read them back, so the caller's
        # model is whole again (the next save must not point into this file)
        if keep:
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(model, str(path.parent))
    else:
        onnx.save(model, str(path))
    return onnx_files(path)


def write_external_data(model: Any, path: Path, size_threshold: int = 1024) -> None:
    """Save ``model`` at ``path`` with every initializer of ``size_threshold`` bytes or more
    that it holds moved into ``<name>.data`` beside it, one tensor at a time; initializers
    already in external data keep pointing where they point. What ``onnx.save(...,
    save_as_external_data=True)`` writes (https://onnx.ai/onnx/repo-docs/ExternalData.html:
    ``location``, ``offset``, ``length``), without its memory: onnx 1.23 with the upb protobuf
    held about four times the weights at its peak here (3.2 GB for GPT-2 124M's 0.65 GB,
    2026-12-01), this the model and one tensor (0.9 GB). ``model`` is left without those
    weights."""
    import onnx

    path = Path(path)
    data = path.with_name(f"{path.name}.data")
    offset = 0
    with open(data, "wb") as out:
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
                continue
            raw = tensor.raw_data  # one tensor's bytes
            if len(raw) < size_threshold:
                continue
            out.write(raw)
            del tensor.external_data[:]
            for key, value in (("location", data.name), ("offset", offset), ("length", len(raw))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
            offset += len(raw)
            del raw
    if not offset:
        data.unlink()
    path.write_bytes(model.SerializeToString())


def load_for_rewrite(path: Path, small_bytes: int = 1 << 20) -> Any:
    """``path`` for a graph rewrite: its external weights left on disk (the rewrite changes
    no weight's bytes), those under ``small_bytes`` read in (biases and constants, whose
    values the rewrites read). A model saved from it in the same folder keeps pointing at the
    same data file: no second copy of the weights, in memory or on disk."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        length = next((int(e.value) for e in tensor.external_data if e.key == "length"), None)
        if length is not None and length < small_bytes:
            load_external_data_for_tensor(tensor, str(path.parent))
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
    return model


def _varint(buf: Any, pos: int) -> tuple[int, int]:
    """A protobuf varint at ``pos``: (value, position after it)."""
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: Any, start: int, end: int) -> Any:
    """Each protobuf field in ``buf[start:end]``: (number, start of the field, start of its
    value, end), without reading the value (a length-delimited value is skipped over)."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, stop = _varint(buf, pos)
        elif wire == 1:
            stop = pos + 8
        elif wire == 5:
            stop = pos + 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            stop = pos + length
        else:
            raise TutorialError(f"protobuf wire type {wire} (groups) is not used by ONNX")
        yield number, first, pos, stop
        pos = stop


def _key_and_length(number: int, length: int) -> bytes:
    """The start of a length-delimited protobuf field: its key and its length."""
    out, value = bytearray(), (number << 3) | 2
    for v in (value, length):
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def _delimited(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    return _key_and_length(number, len(payload)) + payload


#: TensorProto's value fields (float_data, int32_data, string_data, int64_data, raw_data,
#: double_data, uint64_data): what :func:`load_without_weights` leaves out.
_TENSOR_VALUES = {4, 5, 6, 7, 9, 10, 11}


def load_without_weights(path: Path, small_bytes: int = 0) -> Any:
    """An ONNX file's ``ModelProto`` with every initializer's values left out (names, dtypes,
    shapes and external-data entries kept): its inputs, outputs, nodes and opsets, read
    without the memory of the weights. ``onnx.load`` parses a file whole, so a 1.6 GB model
    whose weights are inside it costs that much (and more) to ask for its signature; this
    reads the protobuf fields through ``mmap`` and skips over the weights' bytes. Initializers
    stored in fewer than ``small_bytes`` bytes (constants, whose values rewrites read) are kept
    whole."""
    import mmap

    import onnx

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        model = bytearray()
        for number, first, start, stop in _fields(buf, 0, len(buf)):
            if number != 7:  # not the graph
                model += buf[first:stop]
                continue
            graph = bytearray()
            for g_number, g_first, g_start, g_stop in _fields(buf, start, stop):
                if g_number != 5 or g_stop - g_start < small_bytes:  # not a weight
                    graph += buf[g_first:g_stop]
                    continue
                tensor = b"".join(
                    buf[t_first:t_stop]
                    for t_number, t_first, _, t_stop in _fields(buf, g_start, g_stop)
                    if t_number not in _TENSOR_VALUES
                )
                graph += _delimited(5, tensor)
            model += _delimited(7, bytes(graph))
    return onnx.ModelProto.FromString(bytes(model))


def onnx_files(path: Path) -> list[Path]:
    """An ONNX file and the external data files it names (relative to its folder), in that
    order: what must travel together when the model is copied."""
    import onnx

    path = Path(path)
    model = load_without_weights(path)
    names = []
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors += [a.t for a in node.attribute if a.HasField("t")]
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next(e.value for e in tensor.external_data if e.key == "location")
            if location not in names:
                names.append(location)
    missing = [n for n in names if not (path.parent / n).is_file()]
    if missing:
        raise TutorialError(f"{path} names external data that is not beside it: {missing}")
    return [path, *(path.parent / n for n in names)]


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
    model: Any, parts_dir: Path, log: Callable[[str], None] = print, data: Path | None = None
) -> dict[str, list[str]]:
    """Turn the converted graph's weight inputs into initializers holding the real values.

    With ``data``, the values are written one weight at a time into that file and the
    initializers refer to it (ONNX external data, its name relative to the model's folder):
    the weights are never all in memory at once, which bounds the export of large models.

    Every weight ``trace`` wrote must be an input of the graph, with the same name, dtype and
    shape, and every input other than :data:`STEP_INPUTS` must be a weight; otherwise this
    raises, naming the mismatch. Nodes that only transform weights (tf2onnx folds those when
    weights are constants: the transposed embedding the LM head multiplies by) are folded.
    Returns the names attached and a line per folded node.
    """
    import onnx
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
    out = open(data, "wb") if data is not None else None  # noqa: SIM115 - closed below
    offset = 0
    try:
        for name in list(values):
            value = values.pop(name)  # the initializer becomes the only copy
            if name not in used:
                continue
            tensor = graph.initializer.add()
            tensor.name = name
            tensor.data_type = helper.np_dtype_to_tensor_dtype(value.dtype)
            tensor.dims.extend(value.shape)
            value = np.ascontiguousarray(value)
            if out is None:
                tensor.raw_data = value.tobytes()
            else:
                out.write(memoryview(value).cast("B"))  # from the mapped file, page by page
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, item in (("location", data.name), ("offset", offset)):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, str(item)
                entry = tensor.external_data.add()
                entry.key, entry.value = "length", str(value.nbytes)
                offset += value.nbytes
            del value  # unmaps the weight's file
    finally:
        if out is not None:
            out.close()
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
    parts = json.loads((parts_dir / "parts.json").read_text())
    weight_bytes = sum((parts_dir / w["file"]).stat().st_size for w in parts["weights"])
    # Past the threshold the weights stream into one data file that both models refer to.
    data = with_past.with_name(f"{with_past.name}.data")
    data.unlink(missing_ok=True)
    external = weight_bytes > external_data_threshold()
    with_past.parent.mkdir(parents=True, exist_ok=True)
    info = attach_weights(model, parts_dir, log, data=data if external else None)
    graph = model.graph

    outputs = {o.name: _copy(o) for o in graph.output}
    keep_outputs(graph, ["logits", "present"])
    if external:
        onnx.save(model, str(with_past))  # the graph; its weights are already in ``data``
    else:
        save_onnx(model, with_past)
    log(f"wrote {with_past} ({sum(f.stat().st_size for f in onnx_files(with_past)) / 1e6:.1f} MB)")

    del graph.output[:]
    graph.output.extend([outputs["all_logits"], outputs["present"]])
    prune_unused(graph)  # drops the last-position slice
    rename_tensor(graph, "all_logits", "logits")
    rename_tensor(graph, "present", "past_key_values")
    added = with_empty_past(graph)
    if external:
        full.with_name(f"{full.name}.data").unlink(missing_ok=True)  # an earlier export's
        onnx.save(model, str(full))  # refers to ``data`` too: one copy of the weights on disk
    else:
        save_onnx(model, full)
    log(
        f"wrote {full} ({sum(f.stat().st_size for f in onnx_files(full)) / 1e6:.1f} MB): "
        f"{len(added)} nodes build the empty past"
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

    model = onnx.load(str(full), load_external_data=False)  # external weights stay on disk
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
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer):
        # the trimmed graph refers to the same data file as ``full``; it must sit beside it
        if Path(output).parent.resolve() != Path(full).parent.resolve():
            raise TutorialError(f"{output} must be in {Path(full).parent}, beside its weights")
        Path(f"{output}.data").unlink(missing_ok=True)
        onnx.save(model, str(output))
    else:
        save_onnx(model, output, keep=False)
    del model
    onnx.checker.check_model(str(output))
    return onnx_signature(output)


# --------------------------------------------------------------------------------------------
# Fewer nodes for the decode step (the int8 model's, see tutorial.export.quantize_int8)
#
# A decode step reads every weight once, but the exported graph also runs ~1,400 small nodes
# (tf2onnx's shape arithmetic, LayerNorm as eleven ops), each costing a few microseconds of
# dispatch: as much as the int8 matrix products themselves. These rewrites keep the results
# (to float rounding). All but the last use only standard ONNX ops (LayerNormalization is
# opset 17); the last, fuse_attention, writes onnxruntime's contrib Attention op, which every
# onnxruntime build has (Triton's onnxruntime backend included) and other runtimes do not.


def _producers(graph: Any) -> dict[str, Any]:
    return {out: node for node in graph.node for out in node.output}


def _consumers(graph: Any) -> dict[str, list[Any]]:
    users: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in dict.fromkeys(node.input):
            users.setdefault(name, []).append(node)
    return users


def _sole_user(users: dict[str, list[Any]], name: str, op_type: str) -> Any:
    found = users.get(name, [])
    return found[0] if len(found) == 1 and found[0].op_type == op_type else None


def _constant(initializers: dict[str, Any], name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    return numpy_helper.to_array(initializers[name]) if name in initializers else None


def fuse_layer_norms(graph: Any) -> int:
    """Replace TensorFlow's LayerNorm (``moments`` + ``batchnorm``: GlobalAveragePool, Sub,
    Mul, GlobalAveragePool, Add, Sqrt, Reciprocal, four Mul/Sub, Add) by one
    LayerNormalization over the last axis. Returns how many were replaced."""
    from onnx import helper

    users = _consumers(graph)
    inits = {i.name: i for i in graph.initializer}
    replaced: dict[str, Any] = {}
    for pool in graph.node:
        if pool.op_type != "GlobalAveragePool":
            continue
        x, mean = pool.input[0], pool.output[0]
        mean_users = users.get(mean, [])
        sub = next(
            (u for u in mean_users if u.op_type == "Sub" and list(u.input) == [x, mean]), None
        )
        mean_mul = next((u for u in mean_users if u.op_type == "Mul"), None)
        if len(mean_users) != 2 or sub is None or mean_mul is None:
            continue
        square = _sole_user(users, sub.output[0], "Mul")
        if square is None or list(square.input) != [sub.output[0]] * 2:
            continue
        var = _sole_user(users, square.output[0], "GlobalAveragePool")
        add_eps = var and _sole_user(users, var.output[0], "Add")
        eps_name = add_eps and next((i for i in add_eps.input if i != var.output[0]), None)
        eps = _constant(inits, eps_name) if eps_name else None
        sqrt = add_eps and _sole_user(users, add_eps.output[0], "Sqrt")
        recip = sqrt and _sole_user(users, sqrt.output[0], "Reciprocal")
        scale = recip and _sole_user(users, recip.output[0], "Mul")
        if eps is None or eps.size != 1 or scale is None:
            continue
        gamma = next(i for i in scale.input if i != recip.output[0])
        scale_users = users.get(scale.output[0], [])
        x_mul = next(
            (u for u in scale_users if u.op_type == "Mul" and set(u.input) == {x, scale.output[0]}),
            None,
        )
        if (
            gamma not in inits
            or x_mul is None
            or len(scale_users) != 2
            or mean_mul not in scale_users
            or set(mean_mul.input) != {mean, scale.output[0]}
        ):
            continue
        shift = _sole_user(users, mean_mul.output[0], "Sub")
        if shift is None or shift.input[1] != mean_mul.output[0] or shift.input[0] not in inits:
            continue
        out = _sole_user(users, x_mul.output[0], "Add")
        if out is None or set(out.input) != {x_mul.output[0], shift.output[0]}:
            continue
        replaced[out.output[0]] = helper.make_node(
            "LayerNormalization",
            [x, gamma, shift.input[0]],
            [out.output[0]],
            name=f"{out.name}/LayerNormalization",
            axis=-1,
            epsilon=float(eps.reshape(-1)[0]),
        )
    nodes = [replaced.get(n.output[0], n) if n.output else n for n in graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    prune_unused(graph)
    return len(replaced)


def _slices_dim(node: Any, dim: int, x: str, inits: dict[str, Any], producers: dict) -> bool:
    """Whether ``node`` is ``Slice(Cast*(Shape(x)), [dim], [dim + 1], axes [0])``."""
    if node is None or node.op_type != "Slice" or len(node.input) not in (3, 4):
        return False
    starts, ends = _constant(inits, node.input[1]), _constant(inits, node.input[2])
    axes = _constant(inits, node.input[3]) if len(node.input) == 4 else np.array([0])
    if starts is None or ends is None or axes is None:
        return False
    if [list(starts), list(ends), list(axes)] != [[dim], [dim + 1], [0]]:
        return False
    shape = producers.get(node.input[0])
    while shape is not None and shape.op_type == "Cast":
        shape = producers.get(shape.input[0])
    return (
        shape is not None
        and shape.op_type == "Shape"
        and not shape.attribute
        and shape.input[0] == x
    )


def drop_linear_reshapes(graph: Any) -> int:
    """``x [B, n, K]`` → Reshape ``[-1, K]`` → MatMul W → Add b → Reshape to ``[B, n, N]``
    (from ``Shape(x)``) becomes MatMul(x, W) + b: MatMul takes the 3-D input as it is, and the
    shape arithmetic (seven nodes a linear layer) goes. Returns how many were rewritten."""
    producers, users = _producers(graph), _consumers(graph)
    inits = {i.name: i for i in graph.initializer}
    renames: dict[str, str] = {}
    for matmul in graph.node:
        if matmul.op_type != "MatMul" or matmul.input[1] not in inits:
            continue
        w_dims = list(inits[matmul.input[1]].dims)
        flatten = producers.get(matmul.input[0])
        if len(w_dims) != 2 or flatten is None or flatten.op_type != "Reshape":
            continue
        flat_shape = _constant(inits, flatten.input[1])
        if flat_shape is None or list(flat_shape) != [-1, w_dims[0]]:
            continue
        x = flatten.input[0]
        bias = _sole_user(users, matmul.output[0], "Add")
        unflatten = bias and _sole_user(users, bias.output[0], "Reshape")
        if unflatten is None or unflatten.output[0] in {o.name for o in graph.output}:
            continue
        concat = producers.get(unflatten.input[1])
        while concat is not None and concat.op_type == "Cast":
            concat = producers.get(concat.input[0])
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 3:
            continue
        last = _constant(inits, concat.input[2])
        if last is None or list(last) != [w_dims[1]]:
            continue
        if not all(
            _slices_dim(producers.get(concat.input[d]), d, x, inits, producers) for d in (0, 1)
        ):
            continue
        matmul.input[0] = x
        renames[unflatten.output[0]] = bias.output[0]
    for node in graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
    prune_unused(graph)
    return len(renames)


def without_large_weights(model: Any, elements: int = 4096) -> Any:
    """A copy of ``model`` for shape inference (its nodes, inputs, outputs and the shapes it
    knows): its initializers of more than ``elements`` values, and those whose values sit in
    an external data file, are graph inputs of the same type and shape instead (no weight
    bytes copied or read)."""
    from onnx import TensorProto, helper

    skeleton = type(model)()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    graph = skeleton.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    for init in model.graph.initializer:
        if int(np.prod(init.dims)) > elements or init.data_location == TensorProto.EXTERNAL:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, init.dims))
        else:
            graph.initializer.append(init)
    return skeleton


def symbolic_shapes(model: Any) -> dict[str, tuple]:
    """Every tensor's shape as onnxruntime's symbolic shape inference finds it (dims are ints
    or names), for the tensors whose every dim it could name."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inferred = SymbolicShapeInference.infer_shapes(without_large_weights(model), auto_merge=True)
    shapes: dict[str, tuple] = {}
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        tensor = value.type.tensor_type
        dims = tuple(d.dim_param or d.dim_value for d in tensor.shape.dim)
        if tensor.HasField("shape") and all(d not in ("", 0) for d in dims):
            shapes[value.name] = dims
    return shapes


def share_shape_inputs(model: Any, shapes: dict[str, tuple]) -> int:
    """Point every Shape node at the first tensor of the same symbolic shape (``shapes``, from
    :func:`symbolic_shapes`), so each layer's identical shape arithmetic (the attention
    mask's) becomes the same nodes and :func:`eliminate_common_subexpressions` keeps one.
    Only between tensors computed from the same group of rows (:func:`two_groups`: the
    second group's inputs are named ``chunk_...``): shape inference names the two groups'
    dims apart, and should it ever merge one, this still keeps a group from taking the other's
    shape. Returns how many Shape nodes were re-pointed."""
    graph = model.graph
    producers = _producers(graph)

    @functools.cache
    def group(name: str) -> Any:
        behind = _graph_inputs_behind(graph, name, producers)
        return None if behind is None else frozenset(i.startswith(CHUNK) for i in behind)

    first: dict[tuple, str] = {}
    for node in graph.node:
        for out in node.output:
            if out in shapes:
                first.setdefault((shapes[out], group(out)), out)
    moved = 0
    for node in graph.node:
        if node.op_type == "Shape" and node.input[0] in shapes:
            canonical = first[(shapes[node.input[0]], group(node.input[0]))]
            if canonical != node.input[0]:
                node.input[0] = canonical
                moved += 1
    return moved


def flatten_matmul_weights(graph: Any, shapes: dict[str, tuple]) -> int:
    """A MatMul weight ``[1, K, N]`` times an input of rank 3 or more is the same product as
    with the weight ``[K, N]``: make it 2-D (the LM head's, which tf2onnx left 3-D), so the
    quantizer can give it one scale per column. Returns how many were changed."""
    inits = {i.name: i for i in graph.initializer}
    users = _consumers(graph)
    changed = 0
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 3 or weight.dims[0] != 1:
            continue
        if len(shapes.get(node.input[0], ())) < 3 or len(users[weight.name]) != 1:
            continue
        dims = list(weight.dims)[1:]
        del weight.dims[:]
        weight.dims.extend(dims)  # the same bytes, row-major
        changed += 1
    return changed


def eliminate_common_subexpressions(graph: Any) -> int:
    """Merge equal small constants, then nodes with the same op, inputs and attributes.
    Returns how many nodes were merged away."""
    from onnx import numpy_helper

    renames: dict[str, str] = {}
    constants: dict[tuple, str] = {}
    for init in graph.initializer:
        if int(np.prod(init.dims)) <= 64:
            key = (init.data_type, tuple(init.dims), numpy_helper.to_array(init).tobytes())
            if constants.setdefault(key, init.name) != init.name:
                renames[init.name] = constants[key]
    outputs = {o.name for o in graph.output}
    seen: dict[tuple, Any] = {}
    kept = []
    merged = 0
    for node in graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
        key = (
            node.domain,
            node.op_type,
            tuple(node.input),
            tuple(a.SerializeToString() for a in node.attribute),
            len(node.output),
        )
        if key in seen and "Random" not in node.op_type and not set(node.output) & outputs:
            renames.update(zip(node.output, seen[key].output))
            merged += 1
            continue
        seen[key] = node
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    prune_unused(graph)
    return merged


def _graph_inputs_behind(graph: Any, name: str, producers: dict[str, Any]) -> set[str] | None:
    """The graph inputs whose values ``name`` depends on (a ``Shape`` node depends on its
    input's shape only, so the walk stops there); None when it cannot tell (a cycle, a name
    nothing produces)."""
    inputs, inits = {i.name for i in graph.input}, {i.name for i in graph.initializer}
    found: set[str] = set()
    todo, seen = [name], set()
    while todo:
        current = todo.pop()
        if current in seen or current in inits or not current:
            continue
        seen.add(current)
        if current in inputs:
            found.add(current)
            continue
        node = producers.get(current)
        if node is None:
            return None
        if node.op_type != "Shape":
            todo.extend(node.input)
    return found


def fuse_attention(model: Any) -> int:
    """Each layer's self-attention, as tf2onnx writes transformers' TF GPT-2 (the q/k/v
    product, split into heads, the cache concatenated, scaled scores, the causal and the
    padding masks, softmax, the weighted sum, heads merged: about 25 nodes, plus the cache's
    squeeze and stack), becomes one ``com.microsoft.Attention`` node: the same product, the
    layer's ``[2, batch, heads, past, head_size]`` cache in, the grown cache out,
    ``unidirectional=1`` for the causal mask and the ``attention_mask`` input as its 2-D
    ``mask_index`` (a masked key gets the same -10000 GPT-2 adds; a padded query position,
    whose every key is masked, caches arbitrary values in either graph, and no real token
    reads them). ``quantize_dynamic`` then
    makes it a ``QAttention`` (int8 q/k/v weights). onnxruntime (Triton's backend included)
    ships these contrib ops; plain ONNX runtimes do not, which is why only the int8 model
    (onnxruntime, CPU shapes) gets this. Returns how many layers were fused; every match is
    checked op by op, anything else is left as it was."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    producers, users = _producers(graph), _consumers(graph)
    inits = {i.name: i for i in graph.initializer}
    past = next((i for i in graph.input if i.name == "past"), None)
    dims = _dims(past) if past is not None else []
    if len(dims) != 6 or dims[3] <= 0 or dims[5] <= 0:
        return 0
    heads, head_size = dims[3], dims[5]

    def made_by(name: str, op_type: str) -> Any:
        node = producers.get(name)
        return node if node is not None and node.op_type == op_type else None

    def one_of(node: Any, op_type: str) -> tuple[Any, list[str]]:
        """The input of ``node`` made by an ``op_type`` node, and the other inputs."""
        for k, name in enumerate(node.input):
            found = made_by(name, op_type)
            if found is not None:
                return found, [x for j, x in enumerate(node.input) if j != k]
        return None, []

    def attr(node: Any, name: str, default: Any = None) -> Any:
        found = [helper.get_attribute_value(a) for a in node.attribute if a.name == name]
        return found[0] if found else default

    def transposed(name: str, perm: list[int]) -> Any:
        node = made_by(name, "Transpose")
        return node if node is not None and list(attr(node, "perm", [])) == perm else None

    def split_heads(name: str) -> str | None:
        """``Transpose(0,2,1,3)(Reshape(x to [.., .., heads, head_size]))`` -> x."""
        reshape = (t := transposed(name, [0, 2, 1, 3])) and made_by(t.input[0], "Reshape")
        shape = reshape and _constant(inits, reshape.input[1])
        ok = shape is not None and list(shape[-2:]) == [heads, head_size]
        return reshape.input[0] if ok else None

    def cache_half(name: str) -> tuple[str, int] | None:
        """``Squeeze(Split(cache, axis 0)[i])`` -> (cache, i)."""
        squeeze = made_by(name, "Squeeze")
        split = squeeze and made_by(squeeze.input[0], "Split")
        if split is None or attr(split, "axis", 0) != 0 or len(split.output) != 2:
            return None
        return split.input[0], list(split.output).index(squeeze.input[0])

    fused: dict[str, Any] = {}  # the q/k/v MatMul's output -> the Attention node before it
    gone: set[str] = set()  # outputs whose old producers the Attention nodes replace
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        masked = made_by(softmax.input[0], "Add")
        causal, padding = one_of(masked, "Sub") if masked is not None else (None, [])
        if causal is None or len(padding) != 1:
            continue
        if _graph_inputs_behind(graph, padding[0], producers) != {"attention_mask"}:
            continue
        kept = made_by(causal.input[0], "Mul")  # scores * causal - 10000 * (1 - causal)
        scaled, band = one_of(kept, "Mul") if kept is not None else (None, [])
        if scaled is None or len(band) != 1:
            continue
        if _graph_inputs_behind(graph, band[0], producers) != set():  # shapes only
            continue
        if _graph_inputs_behind(graph, causal.input[1], producers) != set():
            continue
        scores, scale = one_of(scaled, "MatMul")
        scale_value = _constant(inits, scale[0]) if len(scale) == 1 else None
        if scores is None or scale_value is None or scale_value.size != 1:
            continue
        if not np.isclose(float(scale_value.reshape(())), 1 / np.sqrt(head_size)):
            continue
        keys_t = transposed(scores.input[1], [0, 1, 3, 2])
        keys = keys_t and made_by(keys_t.input[0], "Concat")
        weighted = users.get(softmax.output[0], [])
        if keys is None or len(weighted) != 1 or weighted[0].op_type != "MatMul":
            continue
        values = made_by(weighted[0].input[1], "Concat")
        if values is None or weighted[0].input[0] != softmax.output[0]:
            continue
        if attr(keys, "axis") != 2 or attr(values, "axis") != 2:
            continue
        past_k, past_v = cache_half(keys.input[0]), cache_half(values.input[0])
        if past_k is None or past_v is None or past_k[0] != past_v[0]:
            continue
        if (past_k[1], past_v[1]) != (0, 1):
            continue
        q, k, v = (split_heads(x) for x in (scores.input[0], keys.input[1], values.input[1]))
        split = q and made_by(q, "Split")
        if split is None or list(split.output) != [q, k, v] or len(split.input) != 1:
            continue
        biased = made_by(split.input[0], "Add")
        product, bias = one_of(biased, "MatMul") if biased is not None else (None, [])
        if product is None or product.input[1] not in inits or len(bias) != 1:
            continue
        weight, bias_value = inits[product.input[1]], _constant(inits, bias[0])
        width = heads * head_size
        if list(weight.dims) != [width, 3 * width] or bias_value is None:
            continue
        if bias_value.size != 3 * width or attr(split, "axis") not in (2, -1):
            continue
        merged_t = [u for u in users.get(weighted[0].output[0], []) if u.op_type == "Transpose"]
        if len(merged_t) != 1 or list(attr(merged_t[0], "perm", [])) != [0, 2, 1, 3]:
            continue
        merged = users.get(merged_t[0].output[0], [])
        if len(merged) != 1 or merged[0].op_type != "Reshape":
            continue
        stacked = [
            c
            for u in users.get(keys.output[0], [])
            if u.op_type == "Unsqueeze"
            for c in users.get(u.output[0], [])
            if c.op_type == "Concat" and attr(c, "axis") == 0 and list(c.input[:1]) == [u.output[0]]
        ]
        if len(stacked) != 1 or len(stacked[0].input) != 2:
            continue
        tail = made_by(stacked[0].input[1], "Unsqueeze")
        if tail is None or tail.input[0] != values.output[0]:
            continue
        bias_1d = f"{bias[0]}/1d"
        if bias_1d not in inits:
            inits[bias_1d] = numpy_helper.from_array(bias_value.reshape(-1), bias_1d)
            graph.initializer.append(inits[bias_1d])
        outputs = [merged[0].output[0], stacked[0].output[0]]
        fused[product.output[0]] = helper.make_node(
            "Attention",
            [product.input[0], product.input[1], bias_1d, "attention_mask", past_k[0]],
            outputs,
            name=f"{softmax.name}/Attention",
            domain="com.microsoft",
            num_heads=heads,
            unidirectional=1,
        )
        gone.update(outputs)
        for name in outputs:  # onnx's shape inference does not know contrib ops
            graph.value_info.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    if not fused:
        return 0
    nodes = []
    for node in graph.node:
        if node.output and node.output[0] in fused:
            nodes.append(fused[node.output[0]])
        if not (node.output and node.output[0] in gone):
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    prune_unused(graph)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(fused)


def simplify_decoder(model: Any, attention: bool = True) -> dict[str, int]:
    """All of the above on the decoder-with-past model, in place (:func:`fuse_attention` when
    ``attention``); returns what each did and the node count before and after. Plain ONNX
    without ``attention``: what the engine's fp32 file gets (:func:`engine_step`)."""
    before = len(model.graph.node)
    done = {
        "layer_norms": fuse_layer_norms(model.graph),
        "linear_reshapes": drop_linear_reshapes(model.graph),
    }
    shapes = symbolic_shapes(model)
    done["weights_made_2d"] = flatten_matmul_weights(model.graph, shapes)
    done["shape_inputs_shared"] = share_shape_inputs(model, shapes)
    done["nodes_merged"] = eliminate_common_subexpressions(model.graph)
    if attention:
        done["attentions"] = fuse_attention(model)
    return {**done, "nodes_before": before, "nodes_after": len(model.graph.node)}


def _squeezed_split(name: str, users: dict, inits: dict) -> list[str] | None:
    """The tensors ``Squeeze(Split(name, axis 0)[i], axes [0])``, i = 0..; None unless
    ``name`` feeds exactly that (a TensorFlow ``unstack``)."""
    split = _sole_user(users, name, "Split")
    axis = next((a.i for a in split.attribute if a.name == "axis"), 0) if split else None
    if split is None or axis != 0:
        return None
    parts = []
    for out in split.output:
        squeeze = _sole_user(users, out, "Squeeze")
        axes = None
        if squeeze is not None and len(squeeze.input) > 1:
            axes = _constant(inits, squeeze.input[1])
        elif squeeze is not None:
            axes = next((list(a.ints) for a in squeeze.attribute if a.name == "axes"), None)
        if axes is None or list(np.asarray(axes).reshape(-1)) != [0]:
            return None
        parts.append(squeeze.output[0])
    return parts


def _unsqueezed_stack(node: Any, producers: dict, inits: dict) -> list[str] | None:
    """The tensors ``x_i`` of ``Concat(Unsqueeze(x_i, axes [0]) ..., axis 0)`` (a TensorFlow
    ``stack``) computed by ``node``; None unless it is that."""
    axis = next((a.i for a in node.attribute if a.name == "axis"), None)
    if node.op_type != "Concat" or axis != 0:
        return None
    parts = []
    for name in node.input:
        unsqueeze = producers.get(name)
        if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or len(unsqueeze.input) < 2:
            return None
        axes = _constant(inits, unsqueeze.input[1])
        if axes is None or list(np.asarray(axes).reshape(-1)) != [0]:
            return None
        parts.append(unsqueeze.input[0])
    return parts


def per_layer_cache(graph: Any) -> list[str]:
    """Give a decoder with past its KV cache per layer, in place; the names of the new inputs.

    The exported step model takes the whole cache as one tensor ``past`` [n_layer, 2, batch,
    n_head, past, head_dim] and returns ``present`` likewise: in the graph, TensorFlow's
    ``unstack`` splits ``past`` per layer (and, in the fp32 graph, into key and value) and
    ``stack`` puts ``present`` together again, each a copy of the whole cache, every step.
    Here each layer's key and value become inputs ``past_key_<i>``/``past_value_<i>`` [batch,
    n_head, past, head_dim] and outputs ``present_key_<i>``/``present_value_<i>``; where a
    layer's cache goes whole into one op (the int8 graph's fused attention), its input is
    ``past_<i>`` [2, batch, ...] and its output ``present_<i>``. What is computed is the same;
    only the copies go (``tests/test_engine_cache.py`` compares the two). Raises unless the
    graph has the ``unstack``/``stack`` structure described."""
    from onnx import TensorProto, helper

    producers, users = _producers(graph), _consumers(graph)
    inits = {t.name: t for t in graph.initializer}
    past = next((v for v in graph.input if v.name == "past"), None)
    present = producers.get("present")
    layers = _squeezed_split("past", users, inits) if past is not None else None
    stacked = _unsqueezed_stack(present, producers, inits) if present is not None else None
    if not layers or not stacked or len(layers) != len(stacked):
        raise TutorialError(
            "per_layer_cache: the graph's `past` is not unstacked per layer and `present` not "
            "stacked from the layers' caches as the exported step model does"
        )
    dims = [d.dim_param or d.dim_value for d in past.type.tensor_type.shape.dim]
    batch, n_head, length, head_dim = dims[2], dims[3], dims[4], dims[5]
    new_inputs, new_outputs = [], []

    def cache_value(name: str, shape: list) -> Any:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    for i, (layer_past, layer_present) in enumerate(zip(layers, stacked)):
        kv_in = _squeezed_split(layer_past, users, inits)
        kv_out = _unsqueezed_stack(producers[layer_present], producers, inits)
        if kv_in and kv_out and len(kv_in) == len(kv_out) == 2:  # key and value apart
            for kind, name_in, name_out in zip(("key", "value"), kv_in, kv_out):
                rename_tensor(graph, name_in, f"past_{kind}_{i}")
                rename_tensor(graph, name_out, f"present_{kind}_{i}")
                new_inputs.append(
                    cache_value(f"past_{kind}_{i}", [batch, n_head, length, head_dim])
                )
                new_outputs.append(
                    cache_value(f"present_{kind}_{i}", [batch, n_head, f"{length}+n", head_dim])
                )
        else:  # the layer's cache [2, batch, ...] goes whole into one op
            rename_tensor(graph, layer_past, f"past_{i}")
            rename_tensor(graph, layer_present, f"present_{i}")
            new_inputs.append(cache_value(f"past_{i}", [2, batch, n_head, length, head_dim]))
            new_outputs.append(
                cache_value(f"present_{i}", [2, batch, n_head, f"{length}+n", head_dim])
            )
    inputs = {v.name for v in new_inputs}
    for i in reversed(range(len(graph.node))):  # what made the layers' caches from `past`
        if inputs.intersection(graph.node[i].output):
            del graph.node[i]
    kept_inputs = [_copy(v) for v in graph.input if v.name != "past"]
    kept_outputs = [_copy(v) for v in graph.output if v.name != "present"]
    del graph.input[:]
    graph.input.extend(kept_inputs + new_inputs)
    del graph.output[:]
    graph.output.extend(kept_outputs + new_outputs)
    prune_unused(graph)
    names = {v.name for v in [*graph.input, *graph.output]}
    for i in reversed(range(len(graph.value_info))):  # shapes of what is now an input/output
        if graph.value_info[i].name in names:
            del graph.value_info[i]
    return [v.name for v in new_inputs]


def write_rewritten(source: Path, dest: Path, rewrite: Any, whole_model: bool = False) -> Any:
    """Write at ``dest`` the model of ``source`` with its graph changed by ``rewrite(graph)``
    (``rewrite(model)`` with ``whole_model``; it must leave the weights' values alone); returns
    what ``rewrite`` returns. The graph is
    read without the weights (:func:`load_without_weights`) and each weight kept is copied from
    ``source``'s bytes as it is, a slice at a time: the memory of the graph, not of the weights
    (``onnx.load`` and ``onnx.save`` of a 650 MB model peaked at 3.2 GB). Weights kept in an
    external data file stay there: ``dest`` names the same file, which must sit beside it."""
    import mmap

    model = load_without_weights(Path(source), small_bytes=1 << 16)
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    result = rewrite(model if whole_model else model.graph)
    for tensor in model.graph.initializer:  # stored weights are copied with their own dims
        if tensor.name in dims and list(tensor.dims) != dims[tensor.name]:
            raise ValueError(f"the rewrite changed the shape of weight {tensor.name!r}")
    with open(source, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        stored = {}  # name: (start, stop) of each initializer field in source's bytes
        for number, _, start, stop in _fields(buf, 0, len(buf)):
            if number != 7:
                continue
            for g_number, g_first, g_start, g_stop in _fields(buf, start, stop):
                if g_number != 5:
                    continue
                name = next(
                    bytes(buf[t_start:t_stop]).decode()
                    for t_number, _, t_start, t_stop in _fields(buf, g_start, g_stop)
                    if t_number == 8
                )
                stored[name] = (g_first, g_stop)
        weights = [stored[t.name] for t in model.graph.initializer if t.name in stored]
        for i in reversed(range(len(model.graph.initializer))):  # new ones stay in the graph
            if model.graph.initializer[i].name in stored:
                del model.graph.initializer[i]
        graph = model.graph.SerializeToString()
        model.ClearField("graph")
        length = len(graph) + sum(stop - start for start, stop in weights)
        view = memoryview(buf)
        try:
            with open(dest, "wb") as out:
                out.write(model.SerializeToString())
                out.write(_key_and_length(7, length))
                out.write(graph)
                for start, stop in weights:
                    for at in range(start, stop, 1 << 26):
                        out.write(view[at : min(stop, at + (1 << 26))])
        finally:
            view.release()
    return result


def last_position_logits(graph: Any) -> bool:
    """Run the LM head on the last position only, in place; whether the graph was changed.

    The exported step model computes ``all_logits`` [batch, new tokens, vocab], the LM head
    (the largest matrix, 768 x 50257 for 124M) on every new token, then keeps the last
    position's: a prefill of 96 tokens paid for 96 heads to use 8. Here the last position is
    taken first (the same Slice and Squeeze), then the head: the same logits (bit for bit here:
    ``tests/test_engine_cache.py``). Only where the head is a plain ``MatMul`` (fp32); the int8
    file's head quantizes its input with one scale over all positions, which taking the last
    position first would change, so it is left as it is."""
    from onnx import helper

    producers = _producers(graph)
    chain, name = [], "logits"
    for op_type in ("Squeeze", "Slice", "MatMul"):  # logits = Squeeze(Slice(MatMul(h, W)))
        node = producers.get(name)
        if node is None or node.op_type != op_type:
            return False
        chain.append(node)
        name = node.input[0]
    squeeze, last, head = chain
    hidden = head.input[0]
    graph.node.remove(squeeze)
    graph.node.extend(
        [
            helper.make_node(
                "Slice", [hidden, *last.input[1:]], ["last_hidden_3d"], name="last_position"
            ),
            helper.make_node(
                "Squeeze",
                ["last_hidden_3d", *squeeze.input[1:]],
                ["last_hidden"],
                name="last_position_squeeze",
            ),
            helper.make_node("MatMul", ["last_hidden", head.input[1]], ["logits"], name="lm_head"),
        ]
    )
    prune_unused(graph)  # the head over every position and its slice
    return True


def engine_step(model: Any, simplify: bool = True) -> dict[str, Any]:
    """The engine's step model from the exported one, in place: its KV cache per layer
    (:func:`per_layer_cache`; ``cache_inputs``: the inputs' names), the LM head on the last
    position only (:func:`last_position_logits`; ``last_position_head``: whether it applied)
    and, where that applied (fp32), a second group of rows (:func:`two_groups`: a long prompt's
    chunk in the decode step's call; ``two_groups``) and a smaller graph
    (:func:`simplify_decoder` without the contrib attention: one LayerNormalization per layer
    norm, no reshapes around the linear layers, one copy of each layer's identical shape
    arithmetic; ``simplified``: what it did). TensorFlow's export runs about 2,000 nodes a
    step, and each small node costs onnxruntime a few microseconds whatever the batch;
    the int8 file was simplified when it was made. ``simplify`` False leaves the fp32 graph's
    nodes as they are (``benchmarks/bench_cache_layout.py`` times both)."""
    graph = model.graph
    names = per_layer_cache(graph)
    head = last_position_logits(graph)
    two = head and "chunk_input_ids" not in {v.name for v in graph.input}
    if two:
        two_groups(graph)
    simplified = simplify_decoder(model, attention=False) if head and simplify else {}
    return {
        "cache_inputs": names,
        "last_position_head": head,
        "two_groups": two,
        "simplified": simplified,
    }


def write_engine_step(source: Path, dest: Path, simplify: bool = True) -> dict[str, Any]:
    """Write ``source`` (a step model with ``past``/``present``) at ``dest`` as the engine runs
    it (:func:`engine_step`, whose summary it returns). Weights stay where they are stored: in
    the file (copied into ``dest``) or in an external data file, which ``dest`` names too and
    which must sit beside it (the caller copies it)."""
    return write_rewritten(
        Path(source), Path(dest), lambda model: engine_step(model, simplify), whole_model=True
    )


CHUNK = "chunk_"  # the second group's inputs and outputs: chunk_input_ids, chunk_past_key_0, ...


def _reach(graph: Any, start: set[str], down: bool, stop: frozenset = frozenset()) -> set[str]:
    """Names of the tensors reachable from ``start``: downstream (what depends on them) or
    upstream (what they depend on), not going past ``stop``."""
    seen, todo = set(start), [n for n in start if n not in stop]
    users, producers = _consumers(graph), _producers(graph)
    while todo:
        name = todo.pop()
        nodes = users.get(name, []) if down else [producers[name]] if name in producers else []
        for node in nodes:
            for other in node.output if down else node.input:
                if other and other not in seen:
                    seen.add(other)
                    if other not in stop:
                        todo.append(other)
    return seen


def _clone(graph: Any, nodes: list[Any], rename: dict[str, str], suffix: str) -> list[Any]:
    """Copies of ``nodes`` whose outputs get ``suffix`` and whose inputs are renamed the same
    way (or by ``rename``) when they are one of the copies' outputs."""
    made = {out for node in nodes for out in node.output if out}
    names = dict(rename)
    names.update({out: out + suffix for out in made if out not in names})
    copies = []
    for node in nodes:
        copy = _copy(node)
        copy.name = node.name + suffix
        copy.input[:] = [names.get(n, n) for n in node.input]
        copy.output[:] = [names.get(n, n) if n else n for n in node.output]
        copies.append(copy)
    return copies


def _topological(graph: Any) -> list[Any]:
    """The graph's nodes, each after the nodes that make its inputs."""
    producers = _producers(graph)
    done, order = set(), []
    for root in graph.node:
        stack = [(root, False)]
        while stack:
            node, ready = stack.pop()
            if id(node) in done:
                continue
            if ready:
                done.add(id(node))
                order.append(node)
                continue
            stack.append((node, True))
            for name in node.input:
                before = producers.get(name)
                if before is not None and id(before) not in done:
                    stack.append((before, False))
    return order


def two_groups(graph: Any) -> dict[str, Any]:
    """Give the engine's step model (:func:`engine_step`, fp32) a second group of rows, in
    place, so that a long prompt's chunk and the decode step of the rows in flight run as one
    call: one read of the weights for both. Inputs ``chunk_input_ids``,
    ``chunk_attention_mask`` and ``chunk_past_key_<i>``/``chunk_past_value_<i>`` are the second
    group's ids, mask and cache (its own batch, lengths and padding); outputs
    ``chunk_present_...`` its cache, and ``logits`` [rows of both groups, vocab] each row's last
    position, the first group's rows first. The second group may have no token ([1, 0] ids): a plain step.

    Every token of both groups goes through the layer norms and linear layers together (they
    work token by token, as TensorFlow's Conv1D flattens its input); each group's attention,
    mask, causal mask and positions are the exported graph's own nodes, run once per group
    (copied for the second). So each group's logits and cache are what a call with that group
    alone gives: bit for bit when the second group is empty (``chunk_input_ids`` [1, 0], its
    cache [1, n_head, 0, head_dim]: a decode step), and to float rounding when both have
    tokens (the products run over more rows; ``tests/test_engine_cache.py``). Raises unless the
    graph is the fp32 engine step model."""
    from onnx import TensorProto, helper, numpy_helper

    names = [v.name for v in graph.input]
    layers = sorted(int(n.rsplit("_", 1)[1]) for n in names if n.startswith("past_key_"))
    producers, users = _producers(graph), _consumers(graph)
    inits = {t.name: t for t in graph.initializer}
    head = producers.get("logits")
    last = producers.get(head.input[0]) if head is not None and head.op_type == "MatMul" else None
    if (
        not layers
        or {"input_ids", "attention_mask"} - set(names)
        or last is None
        or last.op_type != "Squeeze"
        or producers.get(last.input[0]) is None
        or producers[last.input[0]].op_type != "Slice"
    ):
        raise TutorialError(
            "two_groups: not the fp32 engine step model (inputs input_ids, attention_mask, "
            "past_key_<i>/past_value_<i>; the LM head on the last position)"
        )
    group_inputs = {"input_ids", "attention_mask"}
    # The front: what only the ids and the mask decide (embeddings, positions, masks, shapes).
    inputs = set(names)
    depends = {n: {n} for n in inputs}
    front = []
    for node in _topological(graph):
        from_inputs = set().union(*(depends.get(i, set()) for i in node.input if i))
        for out in node.output:
            depends[out] = from_inputs
        if from_inputs and from_inputs <= group_inputs:
            front.append(node)
    # The hidden state entering the first block: the Add of the token and position embeddings.
    wte = next((n for n in front if n.op_type == "Gather" and "wte" in n.input[0]), None)
    hidden = None
    if wte is not None:
        for user in users.get(wte.output[0], []):
            if user.op_type == "Add":
                hidden = user.output[0]
    if hidden is None:
        raise TutorialError("two_groups: no token embedding (a Gather of `wte`) found")
    after = _reach(graph, {hidden}, down=True) - {hidden}  # the first block onwards
    front = [n for n in front if not after.intersection(n.output)]
    front_out = {out for node in front for out in node.output}
    slice_node = producers[last.input[0]]
    new_nodes: list[Any] = []
    rename_in = {"input_ids": CHUNK + "input_ids", "attention_mask": CHUNK + "attention_mask"}
    front_b = _clone(graph, front, rename_in, "__chunk")
    new_nodes += front_b
    # A group with no new token ([rows, 0] ids) must run too: a Reshape to [-1, tokens] cannot
    # (nothing to divide by), and [0, tokens] (0: keep the input's dimension) is the same shape.
    for copy in front_b:
        if copy.op_type != "Concat" or not copy.input:
            continue
        first = _constant(inits, copy.input[0])
        if first is not None and first.reshape(-1).tolist() == [-1]:
            keep = f"two_groups/keep_dim_{first.dtype}"
            if keep not in inits:
                inits[keep] = numpy_helper.from_array(np.zeros(1, first.dtype), keep)
                graph.initializer.append(inits[keep])
            copy.input[0] = keep
    hidden_b = hidden + "__chunk"
    consts = [
        helper.make_tensor("two_groups/flat_shape", TensorProto.INT64, [3], [1, -1, 0]),
        helper.make_tensor("two_groups/to_end", TensorProto.INT64, [1], [2**62]),
        helper.make_tensor("two_groups/zero", TensorProto.INT64, [], [0]),
        helper.make_tensor("two_groups/one", TensorProto.INT64, [], [1]),
        helper.make_tensor("two_groups/axis0", TensorProto.INT64, [1], [0]),
        helper.make_tensor("two_groups/axis1", TensorProto.INT64, [1], [1]),
    ]
    graph.initializer.extend(consts)

    def node(op, ins, out, **attrs):
        new_nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    # Each group's rows x tokens, and how many tokens that is.
    sizes = {}
    for tag, ids in (("a", "input_ids"), ("b", CHUNK + "input_ids")):
        shape = node("Shape", [ids], f"two_groups/{tag}_shape")
        rows = node("Gather", [shape, "two_groups/zero"], f"two_groups/{tag}_rows", axis=0)
        width = node("Gather", [shape, "two_groups/one"], f"two_groups/{tag}_width", axis=0)
        count = node("Mul", [rows, width], f"two_groups/{tag}_tokens")
        sizes[tag] = (shape, rows, width, count)
    count_a = node("Unsqueeze", [sizes["a"][3], "two_groups/axis0"], "two_groups/a_tokens_1d")
    # The hidden state of both groups' tokens as one sequence [1, tokens, width].
    flat_a = node("Reshape", [hidden, "two_groups/flat_shape"], "two_groups/hidden_a")
    flat_b = node("Reshape", [hidden_b, "two_groups/flat_shape"], "two_groups/hidden_b")
    joined = node("Concat", [flat_a, flat_b], "two_groups/hidden", axis=1)
    for user in users.get(hidden, []):
        if user not in front:
            user.input[:] = [joined if n == hidden else n for n in user.input]
    # Each layer's attention, once per group.
    for i in layers:
        key, value = f"past_key_{i}", f"past_value_{i}"
        present_k, present_v = f"present_key_{i}", f"present_value_{i}"
        split = producers[producers[producers[present_k].input[1]].input[0]].input[0]
        split_node = producers[split]
        if split_node.op_type != "Split":
            raise TutorialError(f"two_groups: layer {i}'s keys do not come from a Split")
        x = split_node.input[0]  # the c_attn output [1, tokens, 3 x width]
        mm = [u for u in users[present_v] if u.op_type == "MatMul"]
        tr = users[mm[0].output[0]][0] if mm else None
        rs = users[tr.output[0]][0] if tr is not None else None
        if not mm or tr.op_type != "Transpose" or rs.op_type != "Reshape":
            raise TutorialError(f"two_groups: layer {i}'s attention output not found")
        y = rs.output[0]  # the heads merged [rows, tokens, width]
        down = _reach(graph, {x, key, value} | (front_out - {hidden}), down=True)
        up = _reach(graph, {y, present_k, present_v}, down=False, stop=frozenset(front_out | {x}))
        chain = [
            n
            for n in graph.node
            if n not in front and x not in n.output and set(n.output) & down & up
        ]
        # The first group: its part of the sequence, in its own rows x tokens.
        part_a = node(
            "Slice", [x, "two_groups/axis0", count_a, "two_groups/axis1"], f"two_groups/{i}/x_a"
        )
        width3 = node("Shape", [x], f"two_groups/{i}/x_shape", start=2)
        shape_a = node("Concat", [sizes["a"][0], width3], f"two_groups/{i}/x_a_shape", axis=0)
        x_a = node("Reshape", [part_a, shape_a], f"two_groups/{i}/x_a_rows")
        part_b = node(
            "Slice",
            [x, count_a, "two_groups/to_end", "two_groups/axis1"],
            f"two_groups/{i}/x_b",
        )
        shape_b = node("Concat", [sizes["b"][0], width3], f"two_groups/{i}/x_b_shape", axis=0)
        x_b = node("Reshape", [part_b, shape_b], f"two_groups/{i}/x_b_rows")
        rename = {
            x: x_b,
            key: CHUNK + key,
            value: CHUNK + value,
            present_k: CHUNK + present_k,
            present_v: CHUNK + present_v,
        }
        rename.update({out: out + "__chunk" for out in front_out})
        chain_b = _clone(graph, chain, rename, "__chunk")
        for copy in chain_b:  # a shape computed from sizes means 0 where a size is 0
            if copy.op_type == "Reshape" and copy.input[1] not in inits:
                copy.attribute.append(helper.make_attribute("allowzero", 1))
        new_nodes += chain_b
        for n in chain:
            n.input[:] = [x_a if name == x else name for name in n.input]
        y_a = node("Reshape", [y, "two_groups/flat_shape"], f"two_groups/{i}/y_a")
        y_b = node("Reshape", [y + "__chunk", "two_groups/flat_shape"], f"two_groups/{i}/y_b")
        y_ab = node("Concat", [y_a, y_b], f"two_groups/{i}/y", axis=1)
        for user in users.get(y, []):
            if user not in chain:
                user.input[:] = [y_ab if name == y else name for name in user.input]
    # Each row's last position in the sequence: row r of a group ends at r x width + width - 1.
    last_pos = []
    for tag in ("a", "b"):  # a group of rows with no new token (width 0) has no logits
        _, rows, width, _ = sizes[tag]
        some = node("Min", [width, "two_groups/one"], f"two_groups/{tag}_any")
        rows = node("Mul", [rows, some], f"two_groups/{tag}_rows_with_tokens")
        r = node("Range", ["two_groups/zero", rows, "two_groups/one"], f"two_groups/{tag}_r")
        ends = node("Mul", [r, width], f"two_groups/{tag}_starts")
        ends = node("Add", [ends, width], f"two_groups/{tag}_ends")
        last_pos.append(node("Sub", [ends, "two_groups/one"], f"two_groups/{tag}_last"))
    last_b = node("Add", [last_pos[1], sizes["a"][3]], "two_groups/b_last_in_sequence")
    index = node("Concat", [last_pos[0], last_b], "two_groups/last_index", axis=0)
    hidden_final = slice_node.input[0]
    # The final reshape back to [rows, tokens, width] must keep the one sequence's shape.
    final = producers[hidden_final]
    if final.op_type == "Reshape":
        final.input[1] = "two_groups/flat_shape"
    picked = node("Gather", [hidden_final, index], "two_groups/last_hidden_3d", axis=1)
    last.input[:] = [picked, "two_groups/axis0"]  # [1, rows, width] -> [rows, width]
    graph.node.remove(slice_node)
    graph.node.extend(new_nodes)
    ordered = [_copy(n) for n in _topological(graph)]  # prune_unused walks the nodes in order
    del graph.node[:]
    graph.node.extend(ordered)
    cache = [v for v in graph.input if v.name.startswith("past_")]
    extra_in = [
        helper.make_tensor_value_info(
            CHUNK + "input_ids", TensorProto.INT32, ["chunk_rows", "chunk_tokens"]
        ),
        helper.make_tensor_value_info(
            CHUNK + "attention_mask", TensorProto.INT32, ["chunk_rows", "chunk_length"]
        ),
    ]

    def chunk_copy(v: Any) -> Any:
        copy = _copy(v)
        copy.name = CHUNK + v.name
        for dim in copy.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = CHUNK + dim.dim_param
        return copy

    extra_in += [chunk_copy(v) for v in cache]
    extra_out = [chunk_copy(v) for v in graph.output if v.name.startswith("present_")]
    logits = next(v for v in graph.output if v.name == "logits")
    logits.type.tensor_type.shape.dim[0].dim_param = "rows_of_both_groups"
    graph.input.extend(extra_in)
    graph.output.extend(extra_out)
    del graph.value_info[:]
    prune_unused(graph)
    return {"chunk_inputs": [v.name for v in extra_in]}

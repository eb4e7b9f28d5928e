"""The engine's file takes its KV cache per layer (tutorial.onnx_surgery.per_layer_cache) and, in
fp32, runs the LM head on the last position only (last_position_logits) and takes a second group
of rows (two_groups: a prompt's chunk in the decode step's call): the same model as the
exported step model, without the copies that split `past` per layer and stack `present` again
every step, nor the head over every new token; fp32's graph is also made smaller
(simplify_decoder without the contrib attention). Compared on the tiny model for a left-padded
batch with a past: int8's logits and cache bit for bit, fp32's to float rounding with the same
tokens (bit for bit without the smaller graph); and the file the repository serves is that
rewrite."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def per_layer_feeds(past: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """The parts of a stacked cache [n_layer, 2, ...] by the rewritten inputs' names."""
    feeds = {}
    for name in names:
        kind, layer = name.split("_")[-2], int(name.split("_")[-1])
        part = (
            past[layer, 0] if kind == "key" else past[layer, 1] if kind == "value" else past[layer]
        )
        feeds[name] = np.ascontiguousarray(part)
    return feeds


@pytest.mark.parametrize("variant", ["with_past", "with_past_int8"])
def test_the_per_layer_file_computes_what_the_exported_one_does(tiny_workdir, tmp_path, variant):
    import onnx

    from tutorial.export import ort_session
    from tutorial.onnx_surgery import write_engine_step

    source = Path(json.loads((tiny_workdir / "state.json").read_text())["onnx"][variant])
    done = write_engine_step(source, tmp_path / "step.onnx")
    names = done["cache_inputs"]
    stacked, split = ort_session(source), ort_session(tmp_path / "step.onnx")
    past_dims = next(i.shape for i in stacked.get_inputs() if i.name == "past")
    n_layer, n_head, head_dim = past_dims[0], past_dims[3], past_dims[5]
    if variant == "with_past":  # key and value apart
        assert names[:2] == ["past_key_0", "past_value_0"] and len(names) == 2 * n_layer
    else:  # the fused attention takes a layer's cache whole
        assert names[:2] == ["past_0", "past_1"] and len(names) == n_layer
    fp32 = variant == "with_past"
    chunk = ["chunk_input_ids", "chunk_attention_mask", *("chunk_" + n for n in names)]
    assert [i.name for i in split.get_inputs()] == [
        "input_ids",
        "attention_mask",
        *names,
        *(chunk if fp32 else []),
    ]
    outputs = [o.name for o in split.get_outputs()]
    present = [n.replace("past", "present") for n in names]
    assert outputs == ["logits", *present, *(["chunk_" + n for n in present] if fp32 else [])]
    # fp32: the LM head runs on the last position only, and a second group of rows may share
    # the call; int8's is left as exported
    graph = onnx.load(str(tmp_path / "step.onnx"), load_external_data=False).graph
    assert any(n.name == "lm_head" for n in graph.node) == fp32
    assert done["last_position_head"] == done["two_groups"] == fp32

    rng = np.random.default_rng(0)
    rows, new, length = 3, 4, 9
    ids = rng.integers(0, 1000, (rows, new)).astype(np.int32)
    mask = np.ones((rows, length + new), np.int32)
    mask[0, :5] = 0  # a row padded on the left
    past = rng.standard_normal((n_layer, 2, rows, n_head, length, head_dim)).astype(np.float32)
    logits, present = stacked.run(None, {"input_ids": ids, "attention_mask": mask, "past": past})
    feeds = {"input_ids": ids, "attention_mask": mask, **per_layer_feeds(past, names)}
    if fp32:  # the second group has no token: a plain step
        feeds.update(no_chunk(names, n_head, head_dim))
    got = split.run(None, feeds)
    want = per_layer_feeds(present, names)
    if not fp32:  # int8: the same nodes, the cache only split apart: bit for bit
        assert np.array_equal(got[0], logits)
        assert all(np.array_equal(part, want[name]) for name, part in zip(names, got[1:]))
        return
    # fp32's graph is also made smaller (one LayerNormalization per layer norm: its own
    # rounding), so to float rounding, and the same tokens; without that, bit for bit
    plain = write_engine_step(source, tmp_path / "plain.onnx", simplify=False)
    assert plain["simplified"] == {} and plain["two_groups"]
    unsimplified = ort_session(tmp_path / "plain.onnx").run(None, feeds)
    assert np.array_equal(unsimplified[0], logits)
    assert all(np.array_equal(p, want[n]) for n, p in zip(names, unsimplified[1:]))
    simplified = done["simplified"]
    assert simplified["layer_norms"] == 2 * n_layer + 1
    assert simplified["nodes_after"] < 0.7 * simplified["nodes_before"]
    np.testing.assert_allclose(got[0], logits, atol=1e-4, rtol=0)
    assert got[0].argmax(-1).tolist() == logits.argmax(-1).tolist()
    for name, part in zip(names, got[1:]):
        np.testing.assert_allclose(part, want[name], atol=1e-4, rtol=0)


def no_chunk(names: list[str], n_head: int, head_dim: int) -> dict[str, np.ndarray]:
    empty = np.zeros((1, n_head, 0, head_dim), np.float32)
    return {
        "chunk_input_ids": np.zeros((1, 0), np.int32),
        "chunk_attention_mask": np.zeros((1, 0), np.int32),
        **{"chunk_" + name: empty for name in names},
    }


def test_two_groups_in_one_call_compute_what_each_computes_alone(tiny_workdir, tmp_path):
    """fp32: three decoding rows (one padded on the left) and a second group, one row's
    chunk of 8 tokens after 20 cached, in one call: each group's logits and cache are those
    of a call with that group alone (to float rounding: the products run over more rows), and
    the same tokens come out."""
    from tutorial.export import ort_session
    from tutorial.onnx_surgery import write_engine_step

    source = Path(json.loads((tiny_workdir / "state.json").read_text())["onnx"]["with_past"])
    names = write_engine_step(source, tmp_path / "step.onnx")["cache_inputs"]
    session = ort_session(tmp_path / "step.onnx")
    past_dims = next(i.shape for i in ort_session(source).get_inputs() if i.name == "past")
    n_layer, n_head, head_dim = past_dims[0], past_dims[3], past_dims[5]
    rng = np.random.default_rng(2)

    def group(rows, new, length):
        ids = rng.integers(0, 1000, (rows, new)).astype(np.int32)
        mask = np.ones((rows, length + new), np.int32)
        past = rng.standard_normal((n_layer, 2, rows, n_head, length, head_dim))
        return ids, mask, per_layer_feeds(past.astype(np.float32), names)

    ids_a, mask_a, past_a = group(3, 1, 12)
    mask_a[1, :7] = 0
    ids_b, mask_b, past_b = group(1, 8, 20)
    alone_a = session.run(
        None,
        {
            "input_ids": ids_a,
            "attention_mask": mask_a,
            **past_a,
            **no_chunk(names, n_head, head_dim),
        },
    )
    alone_b = session.run(
        None,
        {
            "input_ids": ids_b,
            "attention_mask": mask_b,
            **past_b,
            **no_chunk(names, n_head, head_dim),
        },
    )
    both = session.run(
        None,
        {
            "input_ids": ids_a,
            "attention_mask": mask_a,
            **past_a,
            "chunk_input_ids": ids_b,
            "chunk_attention_mask": mask_b,
            **{"chunk_" + name: part for name, part in past_b.items()},
        },
    )
    logits, caches = both[0], both[1:]
    assert logits.shape == (3 + 1, alone_a[0].shape[1])
    np.testing.assert_allclose(logits[:3], alone_a[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits[3:], alone_b[0], atol=1e-4, rtol=0)
    assert logits.argmax(1).tolist() == [*alone_a[0].argmax(1), *alone_b[0].argmax(1)]
    n = len(names)
    for mine, alone in zip(caches[:n], alone_a[1:]):
        assert mine.shape == alone.shape
        np.testing.assert_allclose(mine, alone, atol=1e-4, rtol=0)
    for mine, alone in zip(caches[n:], alone_b[1:]):
        assert mine.shape == alone.shape == (1, n_head, 28, head_dim)
        np.testing.assert_allclose(mine, alone, atol=1e-4, rtol=0)


def test_two_groups_refuses_another_graph():
    from onnx import TensorProto, helper

    from tutorial.common import TutorialError
    from tutorial.onnx_surgery import two_groups

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT32, [1, 1])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1])
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)],
        "g",
        [ids],
        [logits],
    )
    with pytest.raises(TutorialError, match="not the fp32 engine step model"):
        two_groups(graph)


def test_the_repository_serves_the_per_layer_file(tiny_workdir):
    from tutorial.export import ort_session

    path = tiny_workdir / "model_repository" / "generate_stream" / "1" / "gpt2_with_past.onnx"
    inputs = [i.name for i in ort_session(path).get_inputs()]
    assert "past" not in inputs and inputs[2:4] == ["past_key_0", "past_value_0"]


def test_a_graph_without_the_exported_structure_is_refused():
    from onnx import TensorProto, helper

    from tutorial.common import TutorialError
    from tutorial.onnx_surgery import per_layer_cache

    past = helper.make_tensor_value_info("past", TensorProto.FLOAT, [2, 2, 1, 2, 0, 4])
    present = helper.make_tensor_value_info("present", TensorProto.FLOAT, [2, 2, 1, 2, 0, 4])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["past"], ["present"])], "g", [past], [present]
    )
    with pytest.raises(TutorialError, match="not unstacked per layer"):
        per_layer_cache(graph)


def test_weights_in_an_external_data_file_stay_there(tiny_workdir, tmp_path):
    """A model whose weights sit in a data file beside it (gpt2-large and gpt2-xl): the
    per-layer file names the same data file and holds no weight itself."""
    import onnx

    from tutorial.export import ort_session
    from tutorial.onnx_surgery import onnx_files, write_engine_step, write_external_data

    source = Path(json.loads((tiny_workdir / "state.json").read_text())["onnx"]["with_past"])
    external = tmp_path / "with_past.onnx"
    write_external_data(onnx.load(str(source)), external)
    names = write_engine_step(external, tmp_path / "step.onnx")["cache_inputs"]
    files = onnx_files(tmp_path / "step.onnx")
    assert [f.name for f in files] == ["step.onnx", "with_past.onnx.data"]
    assert (tmp_path / "step.onnx").stat().st_size < files[1].stat().st_size / 10

    rng = np.random.default_rng(1)
    past_dims = next(i.shape for i in ort_session(source).get_inputs() if i.name == "past")
    past = rng.standard_normal([past_dims[0], 2, 2, past_dims[3], 5, past_dims[5]])
    past = past.astype(np.float32)
    ids = rng.integers(0, 1000, (2, 3)).astype(np.int32)
    mask = np.ones((2, 8), np.int32)
    want = ort_session(source).run(
        ["logits"], {"input_ids": ids, "attention_mask": mask, "past": past}
    )
    feeds = {"input_ids": ids, "attention_mask": mask, **per_layer_feeds(past, names)}
    feeds.update(no_chunk(names, past_dims[3], past_dims[5]))
    got = ort_session(tmp_path / "step.onnx").run(["logits"], feeds)
    np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=0)
    assert got[0].argmax(-1).tolist() == want[0].argmax(-1).tolist()


def test_the_lm_head_is_left_alone_unless_it_is_the_exported_one():
    from onnx import TensorProto, helper

    from tutorial.onnx_surgery import last_position_logits

    hidden = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, 4])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["hidden"], ["logits"])], "g", [hidden], [logits]
    )
    assert last_position_logits(graph) is False and len(graph.node) == 1

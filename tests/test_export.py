"""The export of notebook 02: memory sampling, the weights put back, and the graph it yields."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT
from tutorial.common import TutorialError


def test_run_monitored_measures_the_childs_peak_and_echoes_its_progress(tmp_path, capsys):
    from tutorial.export import run_monitored

    code = (
        "import time; print('[  0.0 s] allocating', flush=True); "
        "block = b'x' * 300_000_000; time.sleep(2); print('noise'); print('[  2.0 s] done')"
    )
    res = run_monitored([sys.executable, "-c", code], tmp_path / "log", "alloc", every_s=0.5)
    out = capsys.readouterr().out
    assert "  | [  0.0 s] allocating" in out and "  | [  2.0 s] done" in out
    assert "  | noise" not in out  # only the child's progress lines are echoed
    assert "alloc: RSS" in out  # the periodic line
    assert 0.3e9 < res["peak_rss"] < 1.0e9  # sampled: the 300 MB block and an interpreter
    assert 0.3e9 < res["max_rss"] < 1.0e9  # the kernel's figure for the largest process
    assert res["seconds"] >= 2


def test_run_monitored_names_a_failure_with_the_logs_tail(tmp_path):
    from tutorial.export import run_monitored

    code = "import sys; print('the last words'); sys.exit(3)"
    with pytest.raises(TutorialError, match=r"(?s)boom failed \(exit 3\).*the last words"):
        run_monitored([sys.executable, "-c", code], tmp_path / "log", "boom", quiet=True)


def assert_close(got: np.ndarray, want: np.ndarray, rel: float) -> None:
    """Equal but for float32 sums taken in another order (graphs, kernels and CPUs differ):
    within ``rel`` of the largest value compared, or of 1 when they are all smaller."""
    np.testing.assert_allclose(got, want, rtol=0, atol=rel * max(1.0, float(np.abs(want).max())))


def write_light_model(folder: Path, weights: dict[str, np.ndarray]) -> Path:
    """A small graph shaped like the converted step: weights as inputs, logits, present.

    all_logits = (Gather(emb, ids) + bias) @ emb^T; logits = all_logits[:, -1];
    present = past (the cache plumbing is not what this checks).
    """
    import onnx
    from onnx import TensorProto, helper

    f, i32 = TensorProto.FLOAT, TensorProto.INT32
    inputs = [
        helper.make_tensor_value_info("input_ids", i32, [None, None]),
        helper.make_tensor_value_info("attention_mask", i32, [None, None]),
        helper.make_tensor_value_info("past", f, [1, 2, None, 1, None, 2]),
        helper.make_tensor_value_info("emb", f, [5, 2]),
        helper.make_tensor_value_info("bias", f, [2]),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h0"]),
        helper.make_node("Add", ["h0", "bias"], ["h"]),
        helper.make_node("Transpose", ["emb"], ["emb_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "emb_t"], ["all_logits"]),
        helper.make_node("Gather", ["all_logits", "minus_one"], ["logits"], axis=1),
        helper.make_node("Identity", ["past"], ["present"]),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", f, [None, 5]),
        helper.make_tensor_value_info("all_logits", f, [None, None, 5]),
        helper.make_tensor_value_info("present", f, [1, 2, None, 1, None, 2]),
    ]
    minus_one = helper.make_tensor("minus_one", TensorProto.INT64, [], [-1])
    graph = helper.make_graph(nodes, "light", inputs, outputs, [minus_one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "light.onnx"))
    (folder / "weights").mkdir(exist_ok=True)
    manifest = []
    for name, value in weights.items():
        np.save(folder / "weights" / f"{name}.npy", value)
        manifest.append(
            {
                "name": name,
                "shape": [5, 2] if name == "emb" else [2],  # what the trace recorded
                "dtype": "float32",
                "file": f"weights/{name}.npy",
            }
        )
    (folder / "parts.json").write_text(json.dumps({"weights": manifest}))
    return folder / "light.onnx"


def test_assemble_puts_every_weight_back_and_derives_both_models(tmp_path):
    import onnx
    import onnxruntime as ort

    from tutorial.onnx_surgery import assemble

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(5, 2)).astype(np.float32)
    bias = rng.normal(size=2).astype(np.float32)
    light = write_light_model(tmp_path, {"emb": emb, "bias": bias})
    past_path, full_path = tmp_path / "with_past.onnx", tmp_path / "full.onnx"
    info = assemble(tmp_path, light, past_path, full_path, log=lambda _: None)
    assert info["attached"] == ["bias", "emb"]
    assert len(info["folded"]) == 1 and info["folded"][0].startswith("Transpose(emb)")

    with_past = onnx.load(str(past_path))
    assert [i.name for i in with_past.graph.input] == ["input_ids", "attention_mask", "past"]
    assert "Transpose" not in {n.op_type for n in with_past.graph.node}  # folded into a weight
    ids = np.array([[1, 4, 2], [0, 3, 3]], dtype=np.int32)
    mask = np.ones_like(ids)
    expected = (emb[ids] + bias) @ emb.T
    past = np.zeros((1, 2, 2, 1, 0, 2), dtype=np.float32)
    feeds = {"input_ids": ids, "attention_mask": mask}
    logits, present = ort.InferenceSession(str(past_path)).run(None, {**feeds, "past": past})
    assert_close(logits, expected[:, -1], 1e-6)  # numpy's sums against onnxruntime's

    full = ort.InferenceSession(str(full_path))
    assert [i.name for i in full.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in full.get_outputs()] == ["logits", "past_key_values"]
    all_logits, cache = full.run(None, feeds)
    assert_close(all_logits, expected, 1e-6)
    assert cache.shape == (1, 2, 2, 1, 0, 2)  # the empty past built in the graph


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("shape", r"weight bias: file \[3\], recorded \[2\]"),
        ("extra", r"weights that are no input \['extra'\]"),
        ("missing", r"inputs that are no weight \['bias'\]"),
    ],
)
def test_assemble_refuses_weights_that_do_not_match(tmp_path, change, message):
    from tutorial.onnx_surgery import assemble

    weights = {"emb": np.ones((5, 2), np.float32), "bias": np.ones(2, np.float32)}
    if change == "shape":
        weights["bias"] = np.ones(3, np.float32)
    light = write_light_model(tmp_path, weights)
    parts = json.loads((tmp_path / "parts.json").read_text())
    if change == "extra":
        parts["weights"].append({**parts["weights"][0], "name": "extra"})
    if change == "missing":
        parts["weights"] = [w for w in parts["weights"] if w["name"] != "bias"]
    (tmp_path / "parts.json").write_text(json.dumps(parts))
    with pytest.raises(TutorialError, match=message):
        assemble(tmp_path, light, tmp_path / "a.onnx", tmp_path / "b.onnx", log=lambda _: None)
    assert not (tmp_path / "a.onnx").exists()


MICRO_MODEL = """
import sys
from tutorial.model_source import import_tensorflow
tf = import_tensorflow()
import numpy as np
from transformers import GPT2Config, TFGPT2LMHeadModel
cfg = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=1000, n_positions=64,
                 bos_token_id=0, eos_token_id=0)
model = TFGPT2LMHeadModel(cfg)
model(tf.constant([[1, 2]]))
rng = np.random.default_rng(0)
for v in model.weights:  # no zero bias or unit gain for grappler to simplify away
    v.assign(rng.normal(0, 0.3, v.shape).astype(np.float32))
model.save_pretrained(sys.argv[1])
"""

FROM_FUNCTION = """
import sys
import tf2onnx
from tutorial.export_past import step_function
from tutorial.model_source import load_tf_model
step = step_function(load_tf_model(sys.argv[1]))
tf2onnx.convert.from_function(step, input_signature=step.input_signature, opset=17,
                              output_path=sys.argv[2])
"""


@pytest.mark.slow
def test_export_computes_what_tf2onnx_from_function_computes(tmp_path):
    """The three stages against tf2onnx's usual path (weights frozen into constants), on a
    2-layer model: the same outputs, and the same graph but for one Add of 0.0 that grappler
    folds only when the embeddings are constants."""
    import onnx
    import onnxruntime as ort

    from tutorial.export import quantize_int8, run_export_stage
    from tutorial.onnx_surgery import simplify_decoder

    def python(code: str, *args: Path) -> None:
        cmd = [sys.executable, "-c", code, *map(str, args)]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)

    model_dir, parts = tmp_path / "model", tmp_path / "parts"
    python(MICRO_MODEL, model_dir)
    python(FROM_FUNCTION, model_dir, tmp_path / "reference.onnx")
    run_export_stage("trace", model_dir, parts, log_dir=tmp_path, quiet=True)
    run_export_stage("convert", parts, tmp_path / "light.onnx", log_dir=tmp_path, quiet=True)
    new, full = tmp_path / "with_past.onnx", tmp_path / "full.onnx"
    run_export_stage("assemble", parts, tmp_path / "light.onnx", new, full, log_dir=tmp_path)

    ref_ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "reference.onnx")).graph.node)
    new_ops = Counter(n.op_type for n in onnx.load(str(new)).graph.node)
    assert new_ops - ref_ops == Counter({"Add": 1}) and not ref_ops - new_ops

    ref, ours, plain = (
        ort.InferenceSession(str(p)) for p in (tmp_path / "reference.onnx", new, full)
    )
    rng = np.random.default_rng(1)
    for past_len in (0, 3):
        ids = rng.integers(0, 1000, (2, 4)).astype(np.int32)
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones((2, past_len + 4), np.int32),
            "past": rng.normal(size=(2, 2, 2, 2, past_len, 8)).astype(np.float32),
        }
        want = ref.run(["logits", "all_logits", "present"], feeds)
        got = ours.run(["logits", "present"], feeds)
        assert_close(got[0], want[0], 1e-6)
        assert_close(got[1], want[2], 1e-6)
        if past_len == 0:  # the plain model is the prefill with the empty past built inside
            logits, cache = plain.run(None, {k: feeds[k] for k in ("input_ids", "attention_mask")})
            assert_close(logits, want[1], 1e-6)
            assert_close(cache, want[2], 1e-6)
        # the int8 model's graph (tutorial.export.quantize_int8): fewer nodes, same results
        simplified = onnx.load(str(new))
        done = simplify_decoder(simplified)
        ops = Counter(n.op_type for n in simplified.graph.node)
        assert done["layer_norms"] == ops["LayerNormalization"] == 5  # 2 layers x 2, ln_f
        assert done["linear_reshapes"] == 8
        assert done["weights_made_2d"] == 0  # assemble made the LM head's weight 2-D
        assert "GlobalAveragePool" not in ops and done["nodes_after"] < done["nodes_before"] * 0.6
        # each layer's attention is one contrib Attention node (the int8 model's QAttention)
        assert done["attentions"] == ops["Attention"] == 2 and "Softmax" not in ops
        feeds["attention_mask"][1, 0] = 0  # a padded row too
        want = ours.run(["logits", "present"], feeds)
        small = ort.InferenceSession(simplified.SerializeToString())
        got = small.run(["logits", "present"], feeds)
        assert_close(got[0], want[0], 1e-5)
        # The cache where the mask is 1. A padded position attends to nothing real (every key
        # it may see is masked), so what it caches is arbitrary (TF's graph and the Attention
        # op break that tie differently) and no real token ever reads it.
        real = feeds["attention_mask"][None, None, :, None, :, None].astype(bool)
        assert_close(got[1] * real, want[1] * real, 1e-5)
    int8 = tmp_path / "with_past_int8.onnx"
    assert quantize_int8(new, int8)["simplified"]["nodes_after"] == done["nodes_after"]
    assert not list(tmp_path.glob("*.simplified.onnx"))
    logits, _ = ort.InferenceSession(str(int8)).run(["logits", "present"], feeds)
    assert logits.shape == want[0].shape and np.isfinite(logits).all()

    # A batch of rows with different cache lengths: the shorter row is padded on the left with
    # mask 0 and must compute what it computes alone (its positions come from its mask).
    short, long = (rng.normal(size=(2, 2, 1, 2, n, 8)).astype(np.float32) for n in (2, 5))
    ids = rng.integers(0, 1000, (2, 1)).astype(np.int32)
    alone = [
        ours.run(
            ["logits", "present"],
            {
                "input_ids": ids[i : i + 1],
                "past": past,
                "attention_mask": np.ones((1, past.shape[4] + 1), np.int32),
            },
        )
        for i, past in enumerate((short, long))
    ]
    padded = np.concatenate([np.zeros((2, 2, 1, 2, 3, 8), np.float32), short], axis=4)
    mask = np.ones((2, 6), np.int32)
    mask[0, :3] = 0
    batch = ours.run(
        ["logits", "present"],
        {"input_ids": ids, "attention_mask": mask, "past": np.concatenate([padded, long], 2)},
    )
    for i in range(2):
        assert_close(batch[0][i], alone[i][0][0], 1e-5)
    assert_close(batch[1][:, :, 0, :, 3:], alone[0][1][:, :, 0], 1e-5)
    assert_close(batch[1][:, :, 1], alone[1][1][:, :, 0], 1e-5)

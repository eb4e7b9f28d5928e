"""Any GPT-2-family checkpoint: sizes derived from the config, the checkpoint chosen by
``MODEL_ID`` (a folder here: no Hub), a second architecture and external data end to end."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import requests

from tests.conftest import require_local_triton, run_notebook
from tutorial.common import TutorialError

PROMPT = "My dog is cute, but he barks a lot."


def test_family_parameter_counts_are_the_published_ones():
    """The derived counts against the sizes the checkpoints are known by (their Hub model
    cards: distilgpt2 82M, gpt2 124M, gpt2-medium 355M, gpt2-large 774M, gpt2-xl 1.5B)."""
    from tutorial.model_source import GPT2_FAMILY
    from tutorial.sizes import model_sizes

    millions = {n: model_sizes(**c)["parameters"] / 1e6 for n, c in GPT2_FAMILY.items()}
    assert {n: round(m) for n, m in millions.items()} == {
        "distilgpt2": 82,
        "gpt2": 124,
        "gpt2-medium": 355,
        "gpt2-large": 774,
        "gpt2-xl": 1558,
    }
    xl = model_sizes(**GPT2_FAMILY["gpt2-xl"])
    assert xl["kv_per_token"] == 600 * 1024 and xl["external_data"] is True
    assert model_sizes(**GPT2_FAMILY["gpt2"])["kv_per_token"] == 72 * 1024
    assert model_sizes(**GPT2_FAMILY["gpt2-medium"])["external_data"] is False


@pytest.mark.slow
def test_sizes_are_those_of_the_exported_files(tiny_workdir):
    from tutorial.export import weight_bytes_read_per_step
    from tutorial.sizes import sizes_of

    state = json.loads((tiny_workdir / "state.json").read_text())
    sizes = sizes_of(state["model"])
    assert sizes["parameters"] == state["model"]["parameters"]  # counted by Keras
    onnx = state["onnx"]
    for key, path in (("onnx_fp32", onnx["with_past"]), ("onnx_int8", onnx["with_past_int8"])):
        assert abs(Path(path).stat().st_size / sizes[key] - 1) < 0.01, key
    read = weight_bytes_read_per_step(Path(onnx["with_past"]))["read_per_step"]
    assert abs(read / sizes["read_per_step_fp32"] - 1) < 1e-3
    past = next(i for i in onnx["signature_with_past"]["inputs"] if i["name"] == "past")
    n_layer, two, _, n_head, _, head_dim = past["dims"]
    assert sizes["empty_past_shape"] == [n_layer, two, 1, n_head, 0, head_dim]


def test_offline_stand_ins_and_refusals():
    from transformers import BertConfig, GPT2Config

    from tutorial.model_source import check_gpt2_architecture, offline_size

    assert offline_size("124M") == "gpt2"
    assert offline_size("openai-community/gpt2-large") == "gpt2-large"
    assert offline_size("tiny-3x96") == "tiny-3x96"
    with pytest.raises(TutorialError, match=r"GPT-2 family architectures only .* not 'gpt-j'"):
        offline_size("gpt-j")
    check_gpt2_architecture(GPT2Config(), "gpt2")
    with pytest.raises(TutorialError) as err:
        check_gpt2_architecture(BertConfig(architectures=["BertForMaskedLM"]), "bert-base")
    assert str(err.value).startswith(
        "bert-base is a 'bert' model (BertForMaskedLM), not GPT-2's architecture."
    )


def test_a_folder_is_a_local_source(tmp_path):
    from tutorial.model_source import resolve_model_source

    with pytest.raises(TutorialError, match="is a folder without config.json"):
        resolve_model_source("auto", model_id=str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_source("hub", model_id=str(tmp_path)) == "local"
    assert resolve_model_source("offline", model_id=str(tmp_path)) == "offline"


@pytest.fixture(scope="module")
def wide_workdir(tmp_path_factory):
    """Notebooks 01-03 on a second architecture (3 layers, 3 heads of 32: no 2/64 or 12/768
    assumption survives), chosen by MODEL_ID as a saved folder, every ONNX file over 1 MB
    written with external data."""
    from tutorial.model_source import build_random_model, save_offline_vocab

    work = tmp_path_factory.mktemp("wide")
    checkpoint = work / "checkpoint"
    build_random_model("tiny-3x96", seed=1).save_pretrained(str(checkpoint))
    save_offline_vocab(checkpoint)
    saved = {k: os.environ.get(k) for k in ("TUTORIAL_WORKDIR", "TUTORIAL_EXTERNAL_DATA_MB")}
    os.environ.update(TUTORIAL_WORKDIR=str(work), TUTORIAL_EXTERNAL_DATA_MB="1")
    try:
        executed = work / "executed"
        executed.mkdir()
        run_notebook("01_download_gpt2", executed, MODEL_ID=str(checkpoint))
        run_notebook("02_export_onnx", executed)
        run_notebook("03_model_repository", executed)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return work


@pytest.mark.slow
def test_second_architecture_with_external_data_serves_token_exact(wide_workdir):
    from tutorial.client import reference_generate
    from tutorial.model_source import load_tf_model, load_tokenizer
    from tutorial.onnx_surgery import onnx_files
    from tutorial.triton_local import serve_artifact

    state = json.loads((wide_workdir / "state.json").read_text())
    model = state["model"]
    assert model["source"] == "local" and model["weights"] == "random-offline"  # the mark
    assert (model["n_layer"], model["n_head"], model["n_embd"]) == (3, 3, 96)
    unpacked = wide_workdir / "unpacked"
    with zipfile.ZipFile(wide_workdir / "model_artifact.zip") as zf:
        zf.extractall(unpacked)
    models = sorted(unpacked.rglob("*.onnx"))
    assert models  # every ONNX file's external data travels beside it (onnx_files checks)
    assert all(len(onnx_files(m)) == 2 for m in models), [onnx_files(m) for m in models]

    require_local_triton()
    tf_model = load_tf_model(wide_workdir / "gpt2model")
    tok = load_tokenizer(wide_workdir / "vocab")
    expected = reference_generate(tf_model, tok, PROMPT, 20)
    server = serve_artifact(wide_workdir / "model_artifact.zip", runtime="bundled")
    try:
        inputs = [
            {"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": [PROMPT]},
            {"name": "MAX_NEW_TOKENS", "datatype": "INT32", "shape": [1], "data": [20]},
        ]
        r = requests.post(
            f"{server.url}/v2/models/generate/infer", json={"inputs": inputs}, timeout=120
        )
        assert r.status_code == 200, r.text
        out = {o["name"]: o["data"] for o in r.json()["outputs"]}
        assert out["TOKEN_IDS"] == expected
        body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": [PROMPT]}]}
        r = requests.post(f"{server.url}/v2/models/ensemble_model/infer", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [tok.decode(expected[:1])]
    finally:
        server.stop()


def test_save_onnx_gives_each_file_its_own_external_data(tmp_path, monkeypatch):
    """Past the threshold the weights go to ``<file>.data``; the model saved twice (as notebook
    02 saves the step model, then the plain one) gives two self-contained files."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from tutorial.onnx_surgery import onnx_files, save_onnx

    weight = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert save_onnx(model, tmp_path / "small.onnx") == [tmp_path / "small.onnx"]  # under 2 GB
    monkeypatch.setenv("TUTORIAL_EXTERNAL_DATA_MB", "0.001")
    first, second = tmp_path / "a" / "first.onnx", tmp_path / "b" / "second.onnx"
    assert save_onnx(model, first) == [first, first.with_name("first.onnx.data")]
    assert save_onnx(model, second) == [second, second.with_name("second.onnx.data")]
    x = np.ones((1, 64), np.float32)
    for path in (first, second):
        (y,) = ort.InferenceSession(str(path)).run(None, {"x": x})
        np.testing.assert_allclose(y, x @ weight, rtol=1e-5, atol=1e-5)
    (first.with_name("first.onnx.data")).unlink()
    with pytest.raises(TutorialError, match=r"names external data that is not beside it"):
        onnx_files(first)


def test_signatures_are_read_without_the_weights(tmp_path, monkeypatch):
    """``load_without_weights`` gives what ``onnx.load`` gives but the weights' values, whether
    they are inside the file or beside it: notebook 02's kernel reads a 1.6 GB gpt2-medium
    file's signature this way without holding its weights."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tutorial.export import onnx_signature
    from tutorial.onnx_surgery import load_without_weights, onnx_files, save_onnx

    weight = np.random.default_rng(0).normal(size=(300, 300)).astype(np.float32)
    scale = numpy_helper.from_array(np.asarray([2.0], np.float32), "s")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Mul", ["h", "s"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 300])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 300])],
        [numpy_helper.from_array(weight, "W"), scale],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    inline, external = tmp_path / "inline.onnx", tmp_path / "ext" / "external.onnx"
    save_onnx(model, inline)
    monkeypatch.setenv("TUTORIAL_EXTERNAL_DATA_MB", "0.1")
    save_onnx(model, external)
    assert inline.stat().st_size > weight.nbytes > 100 * external.stat().st_size
    for path in (inline, external):
        light, whole = load_without_weights(path), onnx.load(str(path), load_external_data=False)
        assert light.ByteSize() < 2000
        assert light.graph.node == whole.graph.node and light.graph.input == whole.graph.input
        assert light.graph.output == whole.graph.output and light.opset_import == whole.opset_import
        assert light.ir_version == whole.ir_version
        described = [(t.name, list(t.dims), t.data_type) for t in light.graph.initializer]
        assert described == [("W", [300, 300], TensorProto.FLOAT), ("s", [1], TensorProto.FLOAT)]
        assert all(not t.raw_data and not t.float_data for t in light.graph.initializer)
        sig = onnx_signature(path)
        assert sig["inputs"] == [{"name": "x", "dtype": "FLOAT", "dims": [-1, 300]}]
        assert sig["bytes"] == sum(p.stat().st_size for p in onnx_files(path))
    assert onnx_files(external) == [external, external.with_name("external.onnx.data")]
    assert onnx_files(inline) == [inline]


def test_the_notebooks_say_what_this_size_needed_from_the_family_run(tmp_path, monkeypatch):
    """memory_note (notebooks 02 and 04): the measured row of the same architecture (a
    fine-tune of a member matches by its layers, heads and width), a warning where the machine
    has not comfortably more, nothing where nothing was measured."""
    import tutorial.sizes as sizes
    from tutorial.model_source import GPT2_FAMILY

    row = {
        "member": "gpt2-medium",
        "when": "2026-12-01 19:42",
        "dims": "24 x 16 x 64",
        "export": {"trace": {"s": 28, "peak_gb": 4.0}, "assemble": {"s": 26, "peak_gb": 7.4}},
        "checks": {"int8": {"s": 25, "peak_gb": 4.1}},
        "server_gb": 6.6,
        "disk_gb": {"checkpoint": 3.0, "zip": 3.3},
    }
    results = tmp_path / "family.json"
    results.write_text(json.dumps({"meta": {}, "rows": [{"member": "gpt2-xl", "error": "x"}, row]}))
    fine_tune = {**GPT2_FAMILY["gpt2-medium"], "model_id": "someone/medium-finetune"}
    needs = sizes.measured_needs(fine_tune, results)
    assert needs["member"] == "gpt2-medium" and needs["export_peak_stage"] == "assemble"
    assert needs["export_peak_gb"] == 7.4 and needs["server_gb"] == 6.6
    assert abs(needs["disk_gb"] - 6.3) < 1e-9
    assert sizes.measured_needs(GPT2_FAMILY["gpt2-xl"], results) is None  # its run failed
    monkeypatch.setattr(sizes, "measured_needs", lambda info: needs)
    roomy = sizes.memory_note(fine_tune, "export", 24e9)
    assert "peaked at 7.4 GB; this machine has 24.0 GB" in roomy and "WARNING" not in roomy
    assert "WARNING" in sizes.memory_note(fine_tune, "export", 8e9)
    assert "held, every model having answered, 6.6 GB" in sizes.memory_note(
        fine_tune, "server", 8e9
    )


def test_the_committed_family_results_cover_every_member():
    """docs/family.json (written by make family-bench) has a measured, token-exact row for each
    GPT-2 family member, so the notebooks' memory lines have a figure for each."""
    from tutorial.model_source import GPT2_FAMILY
    from tutorial.sizes import measured_needs

    for name, config in GPT2_FAMILY.items():
        needs = measured_needs(config)
        assert needs is not None and needs["member"] == name, name
        assert needs["export_peak_gb"] > 0 and needs["server_gb"] > 0
    rows = json.loads((Path(__file__).parent.parent / "docs" / "family.json").read_text())["rows"]
    assert all(r["tokens_equal_transformers"] and r["served_tokens_equal"] for r in rows)

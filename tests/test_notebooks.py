"""The notebooks run end to end on the tiny offline model (their asserts are checks too)."""

from __future__ import annotations

import json
import re
import zipfile

import pytest

from tests.conftest import notebook_text as outputs_text
from tests.conftest import require_local_triton, run_notebook


@pytest.mark.slow
def test_notebooks_01_to_03(tiny_workdir):
    state = json.loads((tiny_workdir / "state.json").read_text())
    assert state["model"]["weights"] == "random-offline"
    assert state["model"]["n_layer"] == 2 and state["model"]["vocab_size"] == 50257
    assert "RANDOM WEIGHTS" in outputs_text(tiny_workdir / "executed" / "01_download_gpt2.ipynb")
    onnx = state["onnx"]
    assert onnx["max_abs_diff"] < 1e-3 and onnx["greedy_tokens_equal"] is True
    assert onnx["signature_full"]["inputs"][0]["dtype"] == "INT32"
    assert [o["name"] for o in onnx["signature_last"]["outputs"]] == ["last_logits"]
    assert (
        onnx["signature_with_past"]["ir_version"] <= 10
        and onnx["signature_with_past"]["opset"] <= 21
    )
    # every stage and check that loads a model ran in a child process, its peak measured; the
    # kernel itself held no TensorFlow (importing it alone takes about 0.5 GB)
    assert sorted(onnx["export_stages"]) == ["assemble", "convert", "trace"]  # (state.json sorts)
    assert sorted(onnx["check_stages"]) == ["greedy", "int8", "logits", "trim"]
    assert all(f["peak_rss"] > 0 for f in onnx["check_stages"].values())
    text = outputs_text(tiny_workdir / "executed" / "02_export_onnx.ipynb")
    kernel_gb = float(re.search(r"this kernel: peak RSS ([0-9.]+) GB", text).group(1))
    assert 0 < kernel_gb < 0.5, kernel_gb
    repo = state["repository"]
    assert repo["weights"] == "random-offline"
    with zipfile.ZipFile(repo["artifact_zip"]) as zf:
        names = set(zf.namelist())
    assert "model_repository/ensemble_model/config.pbtxt" in names
    assert "model_repository/gpt2/1/model.onnx" in names
    assert "model_repository/encoder/1/vocab.json" in names
    info = json.loads((tiny_workdir / "model_repository" / "MODEL_INFO.json").read_text())
    assert info["weights"] == "random-offline"


@pytest.mark.slow
def test_notebook_04(tiny_workdir):
    require_local_triton()
    out = run_notebook("04_local_triton", tiny_workdir / "executed")
    text = outputs_text(out)
    assert "runtime: bundled" in text
    assert "the ensemble's text equals the reference, string for string" in text
    assert "token for token" in text
    assert "decode steps were steps of the stream's batch" in text  # one engine
    state = json.loads((tiny_workdir / "state.json").read_text())["local_triton"]
    assert state["new_tokens"] == 50 and state["weights"] == "random-offline"


@pytest.mark.slow
def test_notebook_04_without_a_local_triton_runs_the_loop_in_the_kernel(tiny_workdir):
    """Where no Triton can run (RUNTIME="docker" on a machine without a Docker engine, as in
    an OCI notebook session), the notebook says so, skips the server cells and still checks the
    KV-cache greedy loop against transformers."""
    from tutorial.triton_local import docker_available

    if docker_available():
        pytest.skip("a Docker engine answers here")
    out = run_notebook("04_local_triton", tiny_workdir / "executed", RUNTIME="docker")
    text = outputs_text(out)
    assert "local Triton: none (no Docker engine answers on this machine)" in text
    assert "50 tokens equal transformers' generate(do_sample=False)" in text
    assert "skipped: no local Triton (section 1)" in text
    assert "ERROR" not in text

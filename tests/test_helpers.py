"""Unit tests of the helpers (fast: no server, small or no model)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tutorial.common import TutorialError


def test_import_is_light():
    code = (
        "import time, sys; t = time.perf_counter(); import helpers; "
        "dt = time.perf_counter() - t; "
        "heavy = [m for m in ('tensorflow', 'onnxruntime', 'oci', 'transformers', 'matplotlib') "
        "if m in sys.modules]; print(dt, heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    seconds, heavy = out.stdout.split(" ", 1)
    assert heavy.strip() == "[]", f"helpers imports heavy modules at import time: {heavy}"
    print(f"import helpers: {float(seconds):.2f} s")  # a figure, not a check: it is the CPU's


def test_offline_tokenizer_is_gpt2s(tmp_path):
    from tutorial.model_source import load_tokenizer, save_offline_vocab

    save_offline_vocab(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert len(tok) == 50257
    assert tok.decode([15496, 995]) == "Hello world"


def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends


def test_hub_unreachable_gives_clear_message(monkeypatch):
    from tutorial.model_source import resolve_model_source

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(TutorialError) as err:
        resolve_model_source("hub", timeout=2)
    message = str(err.value)
    assert "cannot be reached" in message
    assert "MODEL_SOURCE='offline'" in message and "'auto'" in message
    assert resolve_model_source("auto", timeout=2) == "offline"
    with pytest.raises(TutorialError, match="MODEL_SOURCE must be one of"):
        resolve_model_source("s3")


@pytest.mark.slow
def test_notebook01_hub_without_network_fails_with_the_message(tmp_path, monkeypatch):
    import papermill

    from tests.conftest import run_notebook

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("TUTORIAL_WORKDIR", str(tmp_path))
    with pytest.raises(papermill.PapermillExecutionError) as err:
        run_notebook("01_download_gpt2", tmp_path, MODEL_SOURCE="hub", HUB_TIMEOUT_S=2.0)
    assert err.value.ename == "TutorialError"
    assert "cannot be reached" in err.value.evalue
    assert not (tmp_path / "gpt2model").exists()


def test_state_file_round_trip(tmp_path, monkeypatch):
    from tutorial import common

    monkeypatch.setenv("TUTORIAL_WORKDIR", str(tmp_path))
    with pytest.raises(TutorialError, match="run notebooks/01_download_gpt2.ipynb first"):
        common.model_info()
    common.update_state("model", weights="random-offline", size="tiny")
    common.update_state("model", n_layer=2)
    assert common.model_info() == {"weights": "random-offline", "size": "tiny", "n_layer": 2}
    assert common.weights_label() == "random-offline"
    assert json.loads((tmp_path / "state.json").read_text())["model"]["n_layer"] == 2


def test_bytes_per_step_124m():
    from tutorial.repository import bytes_per_step

    b = bytes_per_step(n_layer=12, n_head=12, n_embd=768, vocab=50257, length=10)
    assert b["seed_logits"] == 10 * 50257 * 4
    assert b["seed_past"] == 12 * 2 * 12 * 10 * 64 * 4
    assert b["trimmed"] == 50257 * 4


def test_template_configs_parse_and_are_wired():
    from tutorial.repository import load_config

    names = sorted(p.parent.name for p in (ROOT / "model_repository").glob("*/config.pbtxt"))
    assert names == [
        "decoder",
        "encoder",
        "ensemble_model",
        "generate",
        "generate_stream",
        "gpt2",
        "gpt2_with_past",
    ]
    ens = load_config(ROOT / "model_repository" / "ensemble_model" / "config.pbtxt")
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["encoder", "gpt2", "decoder"]
    assert [t.name for t in ens.input] == ["TEXT"] and ens.max_batch_size == 0


def test_bad_config_is_named(tmp_path):
    from tutorial.repository import validate_repository

    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "config.pbtxt").write_text(
        'name: "m"\nbackend: "python"\nmax_batch_size: 0\nbogus: 1\n'
    )
    with pytest.raises(TutorialError, match="is not a valid Triton model config"):
        validate_repository(tmp_path)


def test_model_py_files_import_nothing_from_the_repo():
    for path in (ROOT / "model_repository").glob("*/1/model.py"):
        text = path.read_text()
        for name in ("helpers", "tutorial", "tensorflow", "transformers"):
            assert f"import {name}" not in text and f"from {name}" not in text, (path, name)


def test_validation_names_mismatches(tiny_workdir, tmp_path):
    """A copy of the assembled repository, broken in several ways, is refused with each named."""
    import shutil

    from tutorial.repository import validate_repository

    repo = tmp_path / "repo"
    shutil.copytree(tiny_workdir / "model_repository", repo)
    gpt2 = repo / "gpt2" / "config.pbtxt"
    gpt2.write_text(gpt2.read_text().replace("TYPE_INT32", "TYPE_INT64", 1))
    ens = repo / "ensemble_model" / "config.pbtxt"
    ens.write_text(ens.read_text().replace('value: "last_logits"', 'value: "logits_typo"', 1))
    (repo / "decoder" / "1" / "vocab.json").unlink()
    with pytest.raises(TutorialError) as err:
        validate_repository(repo)
    message = str(err.value)
    assert "gpt2: input 'input_ids' is INT64 in config.pbtxt but INT32 in the ONNX model" in message
    assert "decoder: missing 1/vocab.json" in message
    assert (
        "ensemble_model step 3 (decoder): 'last_logits' is not produced before this step" in message
    )


def test_docker_command_mounts_the_artifact_where_oci_does(tmp_path):
    from tutorial.oci_deploy import triton_command
    from tutorial.triton_local import NGC_IMAGE, docker_command

    args = triton_command()[1:]
    cmd = docker_command(tmp_path, args, 8123, NGC_IMAGE, "t", gpus=False)
    assert "--gpus" not in cmd
    assert f"{tmp_path}:/opt/ds/model/deployed_model:ro" in cmd
    assert "127.0.0.1:8123:8000" in cmd
    assert cmd[-1].startswith("pip install -q --no-cache-dir --no-deps ")
    assert cmd[-1].endswith(f"&& exec {' '.join(['tritonserver', *args])}")
    own = docker_command(tmp_path, args, 8123, "iad.ocir.io/ns/gpt2:1", "t", gpus=True)
    assert own[own.index("--gpus") + 1] == "all"
    assert own[own.index("iad.ocir.io/ns/gpt2:1") + 1 :] == triton_command()


def test_the_plain_ngc_container_installs_what_the_models_import(tmp_path):
    """Notebook 04's Docker path on the plain NGC image installs exactly the Dockerfile's pinned
    packages, and they cover every package a python-backend model imports."""
    import shlex

    from tutorial.oci_deploy import triton_command
    from tutorial.repository import model_imports
    from tutorial.triton_local import NGC_IMAGE, docker_command, dockerfile_packages

    cmd = docker_command(tmp_path, triton_command()[1:], 8123, NGC_IMAGE, "t", gpus=False)
    words = shlex.split(cmd[-1].split("&&")[0])
    installed = [w for w in words if "==" in w]
    assert installed == dockerfile_packages()
    names = {p.split("==")[0] for p in installed}
    imported = set().union(*model_imports(ROOT / "model_repository").values())
    assert {"numpy", "tokenizers", "onnxruntime"} <= imported  # what the models import today
    for module in imported:  # onnxruntime-gpu provides the module onnxruntime
        assert module in names or f"{module}-gpu" in names, f"{module} is not installed"

"""Notebook 06 run with papermill against the loopback OCI stand-in (tests/oci_standin.py).

The real OCI SDK sends real signed requests to the stand-in, which forwards /predict to a real
local Triton serving the tiny model (fixtures in conftest.py); the generated tokens are checked
against transformers on the same weights.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import papermill
import pytest
from oci_standin import BOOTSTRAP_FAILED, OciStandIn, make_test_credentials

from tests.conftest import notebook_text as outputs
from tests.conftest import run_notebook

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "06_deploy_oci.ipynb"
COMPARTMENT = "ocid1.compartment.oc1..standincompartment"
PROJECT = "ocid1.datascienceproject.oc1.iad.standinproject"
IMAGE = "iad.ocir.io/standinns/oci-datascience-triton-server/gpt2-triton:24.10-1"
DIGEST = "sha256:" + "cd" * 32
PROMPT = "Machine learning is a field of computer science."
EOS = 50256


@pytest.fixture(autouse=True)
def no_resource_principal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OCI_RESOURCE_PRINCIPAL_VERSION", raising=False)


def run(out_dir: Path, **parameters: object) -> Path:
    return run_notebook("06_deploy_oci", out_dir, **parameters)


def standin_parameters(creds, standin: OciStandIn) -> dict:
    return {
        "OCI_CONFIG_FILE": str(creds.config_file),
        "OCI_PROFILE": creds.profile,
        "SERVICE_ENDPOINT": standin.url,
        "COMPARTMENT_OCID": COMPARTMENT,
        "PROJECT_OCID": PROJECT,
        "POLL_SECONDS": 0.05,
        "PROMPT": PROMPT,
    }


@pytest.mark.slow
def test_notebook06_without_credentials_explains_and_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUTORIAL_WORKDIR", str(tmp_path / "work"))
    out = run(tmp_path, OCI_CONFIG_FILE=str(tmp_path / "no-oci-config"))
    text = outputs(out)
    assert "ERROR" not in text
    assert "No OCI credentials: not in a notebook session" in text
    assert "RUN_OCI = False (the cells below only explain what they would do)" in text
    assert '"environmentVariables": {\n        "CONTAINER_TYPE": "TRITON"' in text
    assert "Would create the deployment 'gpt2-triton-deployment' on VM.GPU.A10.1" in text
    assert "Nothing was created." in text


def write_minimal_inputs(work: Path) -> None:
    """What notebooks 03 and 05 leave for 06, without running them (no Triton needed)."""
    work.mkdir(parents=True, exist_ok=True)
    artifact = work / "model_artifact.zip"
    with zipfile.ZipFile(artifact, "w") as zf:
        zf.writestr("model_repository/ensemble_model/config.pbtxt", 'name: "ensemble_model"')
    state = {
        "repository": {"artifact_zip": str(artifact), "instance_kind": "KIND_CPU"},
        "image": {"reference": IMAGE, "digest": DIGEST},
    }
    (work / "state.json").write_text(json.dumps(state))


@pytest.mark.slow
def test_notebook06_failed_deployment_reports_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    monkeypatch.setenv("TUTORIAL_WORKDIR", str(work))
    write_minimal_inputs(work)
    creds = make_test_credentials(tmp_path / "oci")
    with OciStandIn(creds, polls_to_finish=2) as standin:
        standin.fail_next_deployment(BOOTSTRAP_FAILED)
        with pytest.raises(papermill.PapermillExecutionError) as err:
            run(tmp_path, **standin_parameters(creds, standin))
        assert "The deployment did not become ACTIVE: see section 5's message." in str(err.value)
        text = outputs(tmp_path / "06_deploy_oci.ipynb")
        assert f"is FAILED: {BOOTSTRAP_FAILED} No logs are attached to this deployment" in text
        operations = standin.operations()
        assert "predict" not in operations
        assert operations.count("delete_model_deployment") == 1
        assert operations.count("delete_model") == 1
        assert standin.live() == []
        assert standin.unhandled == []


def reference_loop(model, tokenizer, prompt: str, new_tokens: int) -> str:
    """The seed's loop done right, by transformers: encode the whole text, argmax the last
    position's logits, append the decoded token as is."""
    text = prompt
    for _ in range(new_tokens):
        ids = tokenizer(text)["input_ids"]
        logits = model(np.asarray([ids], dtype=np.int32)).logits.numpy()
        text += tokenizer.decode([int(np.argmax(logits[0, -1]))])
    return text[len(prompt) :]


def reference_ids(model, tokenizer, prompt: str, new_tokens: int) -> list[int]:
    """Greedy token ids without re-tokenizing (what the server-side generate loop computes)."""
    ids = tokenizer(prompt)["input_ids"]
    new: list[int] = []
    for _ in range(new_tokens):
        logits = model(np.asarray([ids + new], dtype=np.int32)).logits.numpy()
        new.append(int(np.argmax(logits[0, -1])))
    return new


@pytest.mark.slow
def test_notebook06_end_to_end(tiny_workdir, triton_server, tiny_reference, tmp_path: Path) -> None:
    state_file = tiny_workdir / "state.json"
    saved = state_file.read_text()
    state = json.loads(saved)
    state["image"] = {"reference": IMAGE, "digest": DIGEST}  # what notebook 05 would record
    state_file.write_text(json.dumps(state))
    creds = make_test_credentials(tmp_path / "oci")
    try:
        with OciStandIn(creds, triton_url=triton_server.url, polls_to_finish=3) as standin:
            out = run(tmp_path, **standin_parameters(creds, standin), MAX_NEW_TOKENS=50)
            operations = standin.operations()
            uploaded = [m["artifact"] for m in standin.models.values()]
            assert standin.unhandled == []
            assert standin.live() == []
            forwarded = [f["url"].split("/v2/", 1)[1] for f in standin.forwarded]
            statuses = {r["status"] for r in standin.requests}
        record = json.loads(state_file.read_text())["deployment"]
    finally:
        state_file.write_text(saved)

    assert statuses <= {200, 202, 204}
    assert operations[:3] == ["create_model", "create_model_artifact", "create_model_deployment"]
    assert operations.count("predict") == 51
    assert forwarded == ["models/ensemble_model/versions/1/infer"] * 50 + [
        "models/generate/versions/1/infer"
    ]
    for name in (
        "delete_model_deployment",
        "delete_model",
        "list_models",
        "list_model_deployments",
    ):
        assert name in operations
    artifact_zip = Path(state["repository"]["artifact_zip"])
    assert [a["size"] for a in uploaded] == [artifact_zip.stat().st_size]

    model, tokenizer = tiny_reference
    assert record["loop_text"] == reference_loop(model, tokenizer, PROMPT, 50)
    server_ids = record["generate_token_ids"]
    expected = reference_ids(model, tokenizer, PROMPT, 50)
    assert server_ids == expected[: len(server_ids)]
    assert len(server_ids) == 50 or server_ids[-1] == EOS
    assert record["generate_text"] == tokenizer.decode(server_ids)
    assert record["deleted"] is True
    assert "ERROR" not in outputs(out)

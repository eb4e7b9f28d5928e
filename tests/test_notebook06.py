"""Notebook 06 run with papermill against the loopback OCI stand-in (tests/oci_standin.py).

The real OCI SDK sends real signed requests to the stand-in. A deployment there runs what was
uploaded: the stand-in serves the artifact zip from notebook 03 (tiny model) on the real local
Triton with the deployment's command, and forwards /predict to it; the generated tokens are
checked against transformers on the same weights. The stand-in's endpoint reaches the notebook
through ``TUTORIAL_OCI_ENDPOINT`` (read by the helpers), not through its parameters cell.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np
import papermill
import pytest
from oci_standin import OciStandIn, make_test_credentials

from tests.conftest import notebook_text as outputs
from tests.conftest import require_local_triton, run_notebook
from tutorial.oci_deploy import ENDPOINT_OVERRIDE_ENV

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "06_deploy_oci.ipynb"
COMPARTMENT = "ocid1.compartment.oc1..standincompartment"
PROJECT = "ocid1.datascienceproject.oc1.iad.standinproject"
REPOSITORY = "oci-datascience-triton-server/gpt2-triton"
IMAGE = f"iad.ocir.io/standinns/{REPOSITORY}:24.10-1"
DIGEST = "sha256:" + "cd" * 32
PROMPT = "Machine learning is a field of computer science."
EOS = 50256
ENSEMBLE_VERSION_MISSING = (
    "at least one version must be available under the version policy of model 'ensemble_model'"
)


@pytest.fixture(autouse=True)
def no_resource_principal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OCI_RESOURCE_PRINCIPAL_VERSION", raising=False)


def run(out_dir: Path, **parameters: object) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    return run_notebook("06_deploy_oci", out_dir, **parameters)


def test_the_test_knob_is_not_a_parameter() -> None:
    """The loopback endpoint is the tests' business: no parameter of the notebook names it."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    parameters = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
    assert len(parameters) == 1
    text = "".join(parameters[0]["source"])
    assert "ENDPOINT" not in text and "ALLOW_RANDOM_WEIGHTS = False" in text


def _standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **options: object):
    """The stand-in with what notebook 05 leaves (the repository, the pushed image), reached
    through TUTORIAL_OCI_ENDPOINT; it must have handled every request."""
    creds = make_test_credentials(tmp_path / "oci")
    with OciStandIn(creds, **options) as server:
        server.add_repository(COMPARTMENT, REPOSITORY)  # what notebook 05 creates
        server.record_push(IMAGE, DIGEST)  # and pushes
        monkeypatch.setenv(ENDPOINT_OVERRIDE_ENV, server.url)
        server.creds = creds
        yield server
        assert server.unhandled == []


@pytest.fixture
def standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each deployment starts the real local Triton on its artifact."""
    yield from _standin(tmp_path, monkeypatch, polls_to_finish=3)


@pytest.fixture
def shared_standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, triton_server):
    """Every deployment's container is the session's Triton (no server per deployment)."""
    yield from _standin(tmp_path, monkeypatch, triton_url=triton_server.url, polls_to_finish=2)


def standin_parameters(standin: OciStandIn, **overrides: object) -> dict:
    return {
        "OCI_CONFIG_FILE": str(standin.creds.config_file),
        "OCI_PROFILE": standin.creds.profile,
        "COMPARTMENT_OCID": COMPARTMENT,
        "PROJECT_OCID": PROJECT,
        "POLL_SECONDS": 0.2,
        "PROMPT": PROMPT,
        **overrides,
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
    assert re.search(
        r"Would create the deployment 'gpt2-triton-gpu-\d{8}-\d{6}-deployment' on VM.GPU.A10.1",
        text,
    )
    assert "Nothing was created." in text


def write_minimal_inputs(work: Path, info: dict) -> Path:
    """What notebooks 03 and 05 leave for 06, without running them (no Triton needed)."""
    work.mkdir(parents=True, exist_ok=True)
    artifact = work / "model_artifact.zip"
    with zipfile.ZipFile(artifact, "w") as zf:
        zf.writestr("model_repository/ensemble_model/config.pbtxt", 'name: "ensemble_model"')
        zf.writestr("model_repository/MODEL_INFO.json", json.dumps(info))
        zf.writestr(
            "model_repository/generate_stream/config.pbtxt",
            'name: "generate_stream"\nparameters: { key: "empty_past_shape" '
            'value: { string_value: "2,2,1,2,0,32" } }\n',
        )
    state = {
        "repository": {"artifact_zip": str(artifact)},
        "image": {"reference": IMAGE, "digest": DIGEST},
    }
    (work / "state.json").write_text(json.dumps(state))
    return artifact


@pytest.mark.slow
@pytest.mark.parametrize(
    ("info", "parameters", "reason"),
    [
        (
            {"variant": "fp32", "shapes": "gpu or cpu", "weights": "random-offline"},
            {},
            "The artifact holds RANDOM weights (notebook 01's offline stand-in, weights: "
            "random-offline): a deployment bills per hour and would generate gibberish.",
        ),
        (
            {"variant": "int8", "shapes": "cpu", "weights": "real"},
            {"USE_GPU": True},
            "The artifact is the int8 variant (shapes: cpu), but VM.GPU.A10.1 is a GPU shape: "
            "dynamic int8 runs on the CPU, so the GPU would bill and idle.",
        ),
    ],
)
def test_notebook06_refuses_before_creating_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, standin, info, parameters, reason
) -> None:
    work = tmp_path / "work"
    monkeypatch.setenv("TUTORIAL_WORKDIR", str(work))
    write_minimal_inputs(work, info)
    with pytest.raises(papermill.PapermillExecutionError) as err:
        run(tmp_path, **standin_parameters(standin, **parameters))
    assert f"Nothing was created. {reason}" in str(err.value)
    assert f"REFUSED: {reason}" in outputs(tmp_path / "06_deploy_oci.ipynb")
    assert standin.operations() == []  # not a single call reached OCI


@pytest.fixture
def tiny_state(tiny_workdir: Path):
    """tiny_workdir's state, with the image notebook 05 would have recorded; restored after."""
    state_file = tiny_workdir / "state.json"
    saved = state_file.read_text()
    state = json.loads(saved)
    state["image"] = {"reference": IMAGE, "digest": DIGEST}
    state_file.write_text(json.dumps(state))
    try:
        yield state
    finally:
        state_file.write_text(saved)


def without_entry(zip_path: Path, dest: Path, entry: str) -> Path:
    """A copy of the artifact zip without one entry and what it holds (written with zipfile,
    nothing else)."""
    with zipfile.ZipFile(zip_path) as src, zipfile.ZipFile(dest, "w") as out:
        names = src.namelist()
        assert entry in names
        for info in src.infolist():
            if not info.filename.startswith(entry):
                out.writestr(info, src.read(info.filename))
    return dest


@pytest.mark.slow
def test_notebook06_broken_zip_fails_with_tritons_message(
    tiny_workdir: Path, tiny_state, standin: OciStandIn, tmp_path: Path
) -> None:
    require_local_triton()
    zip_path = Path(tiny_state["repository"]["artifact_zip"])
    broken = without_entry(zip_path, tmp_path / "broken.zip", "model_repository/ensemble_model/1/")
    out = run(
        tmp_path,
        **standin_parameters(standin, ARTIFACT_ZIP=str(broken), ALLOW_RANDOM_WEIGHTS=True),
    )
    text = outputs(out)
    assert "- The deployment did not become ACTIVE: see section 5's message. Deleted: True." in text
    assert "is FAILED: Errors occurred while bootstrapping the Model Deployment." in text
    assert ENSEMBLE_VERSION_MISSING in text  # Triton's own refusal, shown by the wait step
    operations = standin.operations()
    assert "predict" not in operations
    assert operations.count("delete_model_deployment") == 1
    assert operations.count("delete_model") == 1
    assert standin.live() == []
    assert standin.containers == {}


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
def test_notebook06_end_to_end(
    tiny_workdir: Path, tiny_state, tiny_reference, standin: OciStandIn, tmp_path: Path
) -> None:
    """Notebook 03's zip, uploaded through the SDK, served by the real Triton the stand-in
    started from it, answers token for token like transformers through the signed /predict."""
    require_local_triton()
    out = run(tmp_path, **standin_parameters(standin, MAX_NEW_TOKENS=50, ALLOW_RANDOM_WEIGHTS=True))
    record = json.loads((tiny_workdir / "state.json").read_text())["deployment"]
    operations = standin.operations()
    uploaded = [m["artifact"] for m in standin.models.values()]
    forwarded = [f["url"].split("/v2/", 1)[1] for f in standin.forwarded]
    assert standin.live() == []
    assert standin.containers == {}  # the clean-up stopped the server
    assert {r["status"] for r in standin.requests} <= {200, 202, 204}
    assert operations[:3] == ["create_model", "create_model_artifact", "create_model_deployment"]
    # one call by hand, the 50-call loop, one generate call (no /dev/shm probe: onnxruntime)
    assert operations.count("predict") == 52
    assert forwarded == ["models/ensemble_model/versions/1/infer"] * 51 + [
        "models/generate/versions/1/infer"
    ]
    (sent,) = standin.deployments.values()
    env = sent.model_deployment_configuration_details.environment_configuration_details
    assert env.environment_variables == {"CONTAINER_TYPE": "TRITON", "SHM_SIZE": "1g"}
    for name in (
        "delete_model_deployment",
        "delete_model",
        "list_models",
        "list_model_deployments",
    ):
        assert name in operations
    artifact_zip = Path(tiny_state["repository"]["artifact_zip"])
    assert [a["size"] for a in uploaded] == [artifact_zip.stat().st_size]

    model, tokenizer = tiny_reference
    assert record["loop_text"] == reference_loop(model, tokenizer, PROMPT, 50)
    server_ids = record["generate_token_ids"]
    expected = reference_ids(model, tokenizer, PROMPT, 50)
    assert server_ids == expected[: len(server_ids)]
    assert len(server_ids) == 50 or server_ids[-1] == EOS
    assert record["generate_text"] == tokenizer.decode(server_ids)
    assert record["deleted"] is True
    assert record["shm_finding"] == "step_runner 'onnxruntime': the KV cache does not use /dev/shm"

    text = outputs(out)
    assert "ERROR" not in text
    assert "REFUSED" not in text and "WARNING" not in text
    assert "OK to deploy the fp32 artifact on VM.GPU.A10.1." in text
    assert "200 {'model_name': 'ensemble_model', 'model_version': '1'" in text  # by hand
    assert "- Generated 50 tokens through the signed /predict: " in text


@pytest.mark.slow
def test_two_runs_are_both_recorded_found_and_deleted_by_the_clean_up(
    tiny_workdir: Path, tiny_state, shared_standin: OciStandIn, tmp_path: Path
) -> None:
    """Run 06 twice: the first keeps its deployment (CLEAN_UP = False, as for notebook 07), the
    second cleans up everything of the tutorial (CLEAN_UP_ALL = True). Both deployments are in
    state.json, and the clean-up names and deletes both."""
    standin = shared_standin
    common = dict(MAX_NEW_TOKENS=2, ALLOW_RANDOM_WEIGHTS=True)
    run(tmp_path / "first", **standin_parameters(standin, CLEAN_UP=False, **common))
    first = set(standin.deployments)
    out = run(
        tmp_path / "second",
        **standin_parameters(standin, USE_GPU=False, CLEAN_UP_ALL=True, **common),
    )
    assert len(first) == 1 and len(standin.deployments) == 2
    assert standin.live() == []
    recorded = json.loads((tiny_workdir / "state.json").read_text())["deployments"]
    assert set(recorded) == set(standin.deployments)
    assert all(entry["deleted"] for entry in recorded.values())
    assert sorted(e["shape"] for e in recorded.values()) == ["VM.GPU.A10.1", "VM.Standard.E4.Flex"]
    assert {e["model_info"]["variant"] for e in recorded.values()} == {"fp32"}
    text = outputs(out)
    for deployment_id, deployment in standin.deployments.items():
        assert (
            f"Deleting model_deployment {deployment.display_name} (ACTIVE) {deployment_id} "
            "(bills until deleted)" in text
        )
        assert f"deleted model_deployment {deployment_id}" in text


@pytest.mark.slow
def test_notebook07_measures_the_kept_deployment_with_its_recorded_variant_and_deletes_it(
    tiny_workdir: Path, tiny_state, shared_standin: OciStandIn, tmp_path: Path
) -> None:
    """06 keeps a CPU deployment (CLEAN_UP = False); 07 finds it in state.json, labels its rows
    with the variant of the artifact that was uploaded (MODEL_INFO.json), lists it as still
    billing and, with CLEAN_UP_OCI = True, deletes it."""
    standin = shared_standin
    parameters = dict(USE_GPU=False, CLEAN_UP=False, MAX_NEW_TOKENS=2, ALLOW_RANDOM_WEIGHTS=True)
    run(tmp_path / "06", **standin_parameters(standin, **parameters))
    ((deployment_id, deployment),) = standin.deployments.items()
    assert deployment.lifecycle_state == "ACTIVE"
    (tmp_path / "07").mkdir()
    out = run_notebook(
        "07_latency_cpu_gpu",
        tmp_path / "07",
        MEASURE_LOCAL_CPU=False,
        MEASURE_INPROCESS_CPU=False,
        MEASURE_LOCAL_GPU=False,
        OCI_CONFIG_FILE=str(standin.creds.config_file),
        WARMUP=0,
        ITERATIONS=1,
        NEW_TOKENS=2,
        PROMPT_LENGTHS=[8],
        CONCURRENCY_LEVELS=[1],
        CONCURRENCY_ITERATIONS=1,
        CLEAN_UP_OCI=True,
    )
    text = outputs(out)
    url = f"{deployment.model_deployment_url}/predict"
    assert f"oci-cpu: VM.Standard.E4.Flex, fp32, {url}" in text
    assert (
        f"Deleting model_deployment {deployment.display_name} (ACTIVE) {deployment_id} "
        "(bills until deleted)" in text
    )
    assert standin.live() == []
    recorded = json.loads((tiny_workdir / "state.json").read_text())["deployments"]
    assert recorded[deployment_id]["deleted"] is True
    from tutorial.results import read_results

    results = re.search(r"this run's results: (\S+)", text).group(1)
    rows = read_results([results])
    assert rows and {(r["target"], r["model_variant"]) for r in rows} == {("oci-cpu", "fp32")}

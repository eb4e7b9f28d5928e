"""tutorial/oci_deploy.py against the loopback OCI stand-in: the real SDK, real signatures.

These need no Triton: predict forwarding goes to a tiny recording upstream in this file.
"""

from __future__ import annotations

import hashlib
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import oci
import pytest
import requests
from oci_standin import (
    BOOTSTRAP_FAILED,
    OciStandIn,
    StandInCredentials,
    make_test_credentials,
)

from tutorial import oci_deploy as od
from tutorial.common import TutorialError

COMPARTMENT = "ocid1.compartment.oc1..standincompartment"
PROJECT = "ocid1.datascienceproject.oc1.iad.standinproject"
IMAGE = "iad.ocir.io/standinns/gpt2-triton:24.10-1"
DIGEST = "sha256:" + "ab" * 32


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> StandInCredentials:
    return make_test_credentials(tmp_path_factory.mktemp("oci"))


@pytest.fixture(autouse=True)
def no_resource_principal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(od.RESOURCE_PRINCIPAL_ENV, raising=False)


class _Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.calls.append({"path": self.path, "body": json.loads(body)})
        answer = json.dumps(
            {
                "model_name": self.path.split("/")[3],
                "outputs": [
                    {"name": "NEXT_TOKEN", "datatype": "BYTES", "shape": [1], "data": [" x"]}
                ],
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def upstream():
    """A recording stand-in for Triton's /v2/models/.../infer (answers one NEXT_TOKEN)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    server.calls = []
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def standin(creds: StandInCredentials, upstream):
    with OciStandIn(
        creds, triton_url=f"http://127.0.0.1:{upstream.server_address[1]}", polls_to_finish=2
    ) as server:
        yield server
        assert server.unhandled == []


@pytest.fixture
def auth(creds: StandInCredentials) -> od.OciAuth:
    return od.oci_auth(creds.config_file, creds.profile)


@pytest.fixture
def client(auth: od.OciAuth, standin: OciStandIn):
    # No SDK retries: every error path answers at once.
    return od.data_science_client(auth, standin.url, retry_strategy=oci.retry.NoneRetryStrategy())


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    path = tmp_path / "model_artifact.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model_repository/ensemble_model/config.pbtxt", 'name: "ensemble_model"')
        zf.writestr("model_repository/generate/config.pbtxt", 'name: "generate"')
        # 3 MB that does not compress: the upload must take several chunks
        zf.writestr("model_repository/gpt2/1/model.onnx", hashlib.sha256(b"0").digest() * 100_000)
    return path


def request_kwargs(**overrides: object) -> dict:
    kwargs = dict(
        display_name="gpt2-triton-deployment",
        compartment_id=COMPARTMENT,
        project_id=PROJECT,
        image=IMAGE,
        image_digest=DIGEST,
        freeform_tags={"tutorial": "gpt2-triton"},
    )
    kwargs.update(overrides)
    return kwargs


def model_with_artifact(client, artifact: Path, name: str = "gpt2-triton-model", tags=None):
    model = od.create_model(
        client,
        compartment_id=COMPARTMENT,
        project_id=PROJECT,
        display_name=name,
        freeform_tags=tags,
    )
    od.upload_artifact(client, model.id, artifact)
    return model


def deploy(client, model_id: str, **overrides: object):
    details = od.deployment_request(model_id=model_id, **request_kwargs(**overrides))
    deployment, work_request_id = od.create_deployment(client, details)
    return od.wait_for_deployment(client, deployment.id, work_request_id, poll_s=0.01)


def signed(auth: od.OciAuth, method: str, url: str, **kwargs: object) -> requests.PreparedRequest:
    """A request signed by the SDK's signer, prepared but not sent (so a test can tamper)."""
    return requests.Request(method, url, auth=auth.signer, **kwargs).prepare()


def send(prepared: requests.PreparedRequest) -> requests.Response:
    with requests.Session() as session:
        return session.send(prepared, timeout=30)


# --------------------------------------------------------------------------------------------
# Authentication


def test_api_key_config_authenticates(auth: od.OciAuth, creds: StandInCredentials) -> None:
    assert auth.kind == "api_key"
    assert auth.region == "us-ashburn-1"
    assert auth.describe() == (
        f"API key (fingerprint {creds.fingerprint}) from {creds.config_file} [DEFAULT], "
        "region us-ashburn-1"
    )


def test_missing_credentials_say_what_to_do(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-config"
    with pytest.raises(TutorialError) as err:
        od.oci_auth(missing, "DEFAULT")
    assert str(err.value).startswith(
        "No OCI credentials: not in a notebook session (OCI_RESOURCE_PRINCIPAL_VERSION is not "
        f"set) and the API-key config {missing} [profile DEFAULT] is not usable "
        "(ConfigFileNotFound: "
    )
    assert "set OCI_CONFIG_FILE / OCI_PROFILE" in str(err.value)
    auth, message = od.try_oci_auth(missing)
    assert auth is None and message == str(err.value)


def test_unknown_profile_is_named(creds: StandInCredentials) -> None:
    auth, message = od.try_oci_auth(creds.config_file, "NOPE")
    assert auth is None
    assert "[profile NOPE] is not usable (ProfileNotFound: Profile 'NOPE' not found" in message


def test_resource_principal_is_tried_in_a_notebook_session(
    monkeypatch: pytest.MonkeyPatch, creds: StandInCredentials
) -> None:
    # The env var marks a notebook session: the API-key file is then not used at all.
    monkeypatch.setenv(od.RESOURCE_PRINCIPAL_ENV, "2.2")
    for name in ("OCI_RESOURCE_PRINCIPAL_RPST", "OCI_RESOURCE_PRINCIPAL_PRIVATE_PEM"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(TutorialError, match="the resource principal signer failed"):
        od.oci_auth(creds.config_file)


# --------------------------------------------------------------------------------------------
# The happy path, operation by operation


def test_model_upload_deploy_and_cleanup(client, standin: OciStandIn, artifact: Path) -> None:
    model = od.create_model(
        client, compartment_id=COMPARTMENT, project_id=PROJECT, display_name="gpt2-triton-model"
    )
    assert model.lifecycle_state == "ACTIVE"
    assert model.freeform_tags == {"tutorial": "gpt2-triton"}

    upload = od.upload_artifact(client, model.id, artifact)
    stored = standin.models[model.id]["artifact"]
    assert upload["bytes"] == artifact.stat().st_size == stored["size"]
    assert stored["path"].read_bytes() == artifact.read_bytes()
    # streamed: never more than one chunk in memory
    assert 0 < upload["max_read"] <= od.UPLOAD_CHUNK_BYTES < upload["bytes"]
    assert stored["content_disposition"] == "attachment; filename=model_artifact.zip"

    details = od.deployment_request(model_id=model.id, **request_kwargs())
    deployment, work_request_id = od.create_deployment(client, details)
    assert deployment.lifecycle_state == "CREATING" and work_request_id
    deployment = od.wait_for_deployment(client, deployment.id, work_request_id, poll_s=0.01)
    assert deployment.lifecycle_state == "ACTIVE"
    assert deployment.model_deployment_url == f"{standin.url}/{deployment.id}"
    env = deployment.model_deployment_configuration_details.environment_configuration_details
    assert env.environment_variables == {"CONTAINER_TYPE": "TRITON"}
    assert env.cmd == [
        "tritonserver",
        "--model-repository=/opt/ds/model/deployed_model/model_repository",
        "--http-port=8000",
    ]
    assert (env.server_port, env.health_check_port, env.image_digest) == (8000, 8000, DIGEST)

    od.delete_deployment(client, deployment.id, poll_s=0.01)
    assert standin.deployments[deployment.id].lifecycle_state == "DELETED"
    od.delete_model(client, model.id)
    assert client.get_model(model.id).data.lifecycle_state == "DELETED"
    assert standin.live() == []
    assert [op for op in standin.operations() if op not in ("get_work_request",)] == [
        "create_model",
        "create_model_artifact",
        "create_model_deployment",
        "get_model_deployment",
        "delete_model_deployment",
        "delete_model",
        "get_model",
    ]
    assert {r["status"] for r in standin.requests} <= {200, 202, 204}


def test_cpu_flex_shape_with_autoscaling(client, standin: OciStandIn, artifact: Path) -> None:
    model = model_with_artifact(client, artifact)
    deployment = deploy(
        client,
        model.id,
        shape="VM.Standard.E4.Flex",
        ocpus=4,
        memory_in_gbs=32,
        autoscaling_max_instances=3,
    )
    config = deployment.model_deployment_configuration_details.model_configuration_details
    shape_config = config.instance_configuration.model_deployment_instance_shape_config_details
    assert (shape_config.ocpus, shape_config.memory_in_gbs) == (4.0, 32.0)
    assert config.scaling_policy.policy_type == "AUTOSCALING"
    rule = config.scaling_policy.auto_scaling_policies[0]
    assert (rule.minimum_instance_count, rule.maximum_instance_count) == (1, 3)


def test_logs_are_attached(client, standin: OciStandIn, artifact: Path) -> None:
    model = model_with_artifact(client, artifact)
    deployment = deploy(
        client,
        model.id,
        log_group_id="ocid1.loggroup.oc1.iad.group",
        access_log_id="ocid1.log.oc1.iad.access",
        predict_log_id="ocid1.log.oc1.iad.predict",
    )
    logs = deployment.category_log_details
    assert logs.predict.log_id == "ocid1.log.oc1.iad.predict"
    assert logs.access.log_group_id == "ocid1.loggroup.oc1.iad.group"


# --------------------------------------------------------------------------------------------
# Error paths: deployment


def test_failed_deployment_shows_lifecycle_details(
    client, standin: OciStandIn, artifact: Path
) -> None:
    model = model_with_artifact(client, artifact)
    standin.fail_next_deployment(BOOTSTRAP_FAILED)
    with pytest.raises(od.DeploymentFailed) as err:
        deploy(client, model.id)
    message = str(err.value)
    assert message.startswith("Model deployment ocid1.datasciencemodeldeployment.")
    assert f"is FAILED: {BOOTSTRAP_FAILED} No logs are attached to this deployment" in message
    assert "The deployment still exists: the Clean up section deletes it." in message
    # and the failed deployment can be cleaned up, then its model
    found = od.cleanup_tutorial_resources(client, COMPARTMENT, dry_run=False, poll_s=0.01)
    assert sorted(item["kind"] for item in found) == ["model", "model_deployment"]
    assert standin.live() == []


def test_failed_deployment_points_at_its_logs(client, standin: OciStandIn, artifact: Path) -> None:
    model = model_with_artifact(client, artifact)
    standin.fail_next_deployment("Container exited with code 1.")
    with pytest.raises(od.DeploymentFailed) as err:
        deploy(
            client,
            model.id,
            log_group_id="ocid1.loggroup.oc1.iad.group",
            predict_log_id="ocid1.log.oc1.iad.predict",
        )
    assert (
        "is FAILED: Container exited with code 1. Triton's own output is in the predict log "
        "ocid1.log.oc1.iad.predict (log group ocid1.loggroup.oc1.iad.group)"
    ) in str(err.value)


def test_wrong_repository_path_fails_like_triton_would(
    client, standin: OciStandIn, artifact: Path
) -> None:
    model = model_with_artifact(client, artifact)
    with pytest.raises(od.DeploymentFailed, match=f"is FAILED: {BOOTSTRAP_FAILED}"):
        deploy(client, model.id, cmd=["tritonserver", "--model-repository=/opt/ds/model/wrong"])


def test_wait_gives_up_with_a_clear_message(client, standin: OciStandIn, artifact: Path) -> None:
    model = model_with_artifact(client, artifact)
    standin.polls_to_finish = 10_000
    details = od.deployment_request(model_id=model.id, **request_kwargs())
    deployment, work_request_id = od.create_deployment(client, details)
    with pytest.raises(TutorialError) as err:
        od.wait_for_deployment(client, deployment.id, work_request_id, poll_s=0.01, timeout_s=0.05)
    assert str(err.value).startswith(
        f"Work request {work_request_id} is still IN_PROGRESS after 0 s."
    )


def test_model_in_use_cannot_be_deleted(client, standin: OciStandIn, artifact: Path) -> None:
    model = model_with_artifact(client, artifact)
    deployment = deploy(client, model.id)
    with pytest.raises(TutorialError) as err:
        od.delete_model(client, model.id)
    assert str(err.value).startswith(
        f"delete_model failed: HTTP 409 IncorrectState: Model {model.id} is used by model "
        f"deployment(s) {deployment.id}: delete them first."
    )


def test_model_without_artifact_cannot_be_deployed(client, standin: OciStandIn) -> None:
    model = od.create_model(
        client, compartment_id=COMPARTMENT, project_id=PROJECT, display_name="gpt2-triton-model"
    )
    details = od.deployment_request(model_id=model.id, **request_kwargs())
    with pytest.raises(TutorialError) as err:
        od.create_deployment(client, details)
    assert str(err.value).startswith(
        f"create_model_deployment failed: HTTP 400 InvalidParameter: Model {model.id} has no "
        "model artifact."
    )


# --------------------------------------------------------------------------------------------
# Error paths: BYOC rules, client side and server side


@pytest.mark.parametrize(
    ("port", "env", "expected"),
    [
        (8446, {}, "server_port=8446: ports must be integers in 1024-65535, except 24224, 8446"),
        (80, {}, "server_port=80: ports must be integers in 1024-65535"),
        (8000, {"1ABC": "x"}, "environment variable '1ABC': keys must start with a letter"),
        (8000, {"A-B": "x"}, "environment variable 'A-B': keys must start with a letter"),
        (8000, {"K" * 32: "x"}, f"environment variable '{'K' * 32}': 32 characters; keys must"),
        (8000, {"BIG": "v" * 2025}, "environment variables take 2048 bytes; the limit is 2048"),
    ],
)
def test_byoc_rules_checked_before_sending(port: int, env: dict, expected: str) -> None:
    with pytest.raises(TutorialError) as err:
        od.deployment_request(
            model_id="ocid1.datasciencemodel.oc1.iad.x",
            **request_kwargs(server_port=port, environment_variables=env),
        )
    assert str(err.value).startswith("The deployment breaks OCI's bring-your-own-container rules:")
    assert expected in str(err.value)


def test_byoc_limits_allow_the_edges() -> None:
    # 31-character key, 2047 bytes in total, highest port: all allowed
    od.validate_byoc(65535, 65535, {"K" * 31: "v" * (2047 - 31)})


@pytest.mark.parametrize(
    ("field", "value", "code", "message"),
    [
        (
            "server_port",
            24224,
            "InvalidParameter",
            "server_port 24224 is not allowed: use 1024-65535 except 24224, 8446 and 8447",
        ),
        (
            "environment_variables",
            {"CONTAINER_TYPE": "TRITON", "bad-key": "1"},
            "InvalidParameter",
            "environment variable key 'bad-key' is invalid",
        ),
    ],
)
def test_byoc_rules_checked_by_the_service(
    client, artifact: Path, field: str, value: object, code: str, message: str
) -> None:
    # Bypass the client-side check: the stand-in refuses like the service.
    model = model_with_artifact(client, artifact)
    details = od.deployment_request(model_id=model.id, **request_kwargs())
    env = details.model_deployment_configuration_details.environment_configuration_details
    setattr(env, field, value)
    with pytest.raises(TutorialError) as err:
        od.create_deployment(client, details)
    assert str(err.value).startswith(f"create_model_deployment failed: HTTP 400 {code}: ")
    assert message in str(err.value)


def test_flex_shape_rules() -> None:
    with pytest.raises(TutorialError, match="VM.Standard.E4.Flex is a Flex shape: give it OCPUs"):
        od.deployment_request(model_id="m", **request_kwargs(shape="VM.Standard.E4.Flex"))
    with pytest.raises(TutorialError, match="VM.GPU.A10.1 has a fixed size"):
        od.deployment_request(model_id="m", **request_kwargs(ocpus=2, memory_in_gbs=8))


def test_service_refuses_flex_shape_without_config(client, artifact: Path) -> None:
    model = model_with_artifact(client, artifact)
    details = od.deployment_request(model_id=model.id, **request_kwargs())
    config = details.model_deployment_configuration_details.model_configuration_details
    config.instance_configuration.instance_shape_name = "VM.Standard.E4.Flex"
    with pytest.raises(TutorialError) as err:
        od.create_deployment(client, details)
    assert (
        "HTTP 400 InvalidParameter: VM.Standard.E4.Flex is a flexible shape: "
        "modelDeploymentInstanceShapeConfigDetails needs ocpus and memoryInGBs."
    ) in str(err.value)


def test_service_checks_required_fields_and_enums(client, artifact: Path) -> None:
    details = oci.data_science.models.CreateModelDetails(project_id=PROJECT)
    with pytest.raises(oci.exceptions.ServiceError) as err:
        client.create_model(details)
    assert (err.value.status, err.value.code) == (400, "MissingParameter")
    assert err.value.message == "compartmentId: required"

    model = model_with_artifact(client, artifact)
    details = od.deployment_request(model_id=model.id, **request_kwargs())
    config = details.model_deployment_configuration_details.model_configuration_details
    config.instance_configuration.network_access_type = "PUBLIC_PLEASE"  # SDK -> UNKNOWN_ENUM
    with pytest.raises(oci.exceptions.ServiceError) as err:
        client.create_model_deployment(details)
    assert (err.value.status, err.value.code) == (400, "InvalidParameter")
    assert err.value.message.startswith(
        "modelDeploymentConfigurationDetails.modelConfigurationDetails.instanceConfiguration."
        "networkAccessType: 'UNKNOWN_ENUM_VALUE' is not one of "
        "MANAGED_NETWORKING_NO_INTERNET_ACCESS"
    )


def test_service_refuses_unknown_fields_and_wrong_types(auth, standin: OciStandIn) -> None:
    url = f"{standin.url}/20190101/models"
    body = {"compartmentId": COMPARTMENT, "projectId": PROJECT, "displayNmae": "typo"}
    answer = send(signed(auth, "POST", url, json=body))
    assert answer.status_code == 400
    assert answer.json() == {"code": "InvalidParameter", "message": "displayNmae: unknown field"}
    body = {"compartmentId": COMPARTMENT, "projectId": PROJECT, "freeformTags": {"a": 1}}
    answer = send(signed(auth, "POST", url, json=body))
    assert answer.json() == {
        "code": "InvalidParameter",
        "message": "freeformTags.a: must be a string",
    }


# --------------------------------------------------------------------------------------------
# Error paths: signatures


def test_unsigned_request_is_refused(standin: OciStandIn) -> None:
    answer = requests.get(f"{standin.url}/20190101/models?compartmentId={COMPARTMENT}", timeout=30)
    assert answer.status_code == 401
    assert answer.json() == {
        "code": "NotAuthenticated",
        "message": "The required information to complete authentication was not provided.",
    }


def test_tampered_body_is_refused(auth, standin: OciStandIn) -> None:
    body = {"compartmentId": COMPARTMENT, "projectId": PROJECT, "displayName": "a"}
    prepared = signed(auth, "POST", f"{standin.url}/20190101/models", json=body)
    assert send(prepared).status_code == 200  # the same request, untouched, is fine
    prepared = signed(auth, "POST", f"{standin.url}/20190101/models", json=body)
    prepared.body = prepared.body.replace(b'"a"', b'"b"')  # same length, other bytes
    answer = send(prepared)
    assert answer.status_code == 401
    assert answer.json()["message"] == "x-content-sha256 does not match the body."


def test_tampered_signed_header_is_refused(auth, standin: OciStandIn) -> None:
    prepared = signed(auth, "GET", f"{standin.url}/20190101/models?compartmentId={COMPARTMENT}")
    prepared.url = prepared.url.replace(COMPARTMENT, COMPARTMENT + "x")  # (request-target)
    answer = send(prepared)
    assert answer.status_code == 401
    assert answer.json()["message"] == "The signature does not match the request."


def test_body_headers_must_be_signed(auth, standin: OciStandIn) -> None:
    url = f"{standin.url}/20190101/models"
    prepared = requests.Request("POST", url, json={"compartmentId": COMPARTMENT}).prepare()
    auth.signer.without_content_headers(prepared)  # signs date, (request-target), host only
    answer = send(prepared)
    assert answer.status_code == 401
    assert answer.json()["message"] == (
        "These headers must be signed: content-length, content-type, x-content-sha256."
    )


def test_a_different_key_is_refused_through_the_sdk(
    tmp_path: Path, creds: StandInCredentials, standin: OciStandIn
) -> None:
    other = make_test_credentials(tmp_path / "other")
    # the right user and fingerprint, but signed with another private key
    text = other.config_file.read_text().replace(other.fingerprint, creds.fingerprint)
    other.config_file.write_text(text)
    client = od.data_science_client(
        od.oci_auth(other.config_file), standin.url, retry_strategy=oci.retry.NoneRetryStrategy()
    )
    with pytest.raises(TutorialError) as err:
        od.create_model(client, compartment_id=COMPARTMENT, project_id=PROJECT, display_name="x")
    assert str(err.value).startswith(
        "create_model failed: HTTP 401 NotAuthenticated: The signature does not match the request."
    )
    assert standin.live() == []


# --------------------------------------------------------------------------------------------
# Predict


@pytest.fixture
def predict_url(client, standin: OciStandIn, artifact: Path) -> str:
    deployment = deploy(client, model_with_artifact(client, artifact).id)
    return f"{deployment.model_deployment_url}/predict"


def text_payload(text: str) -> dict:
    return {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": [text]}]}


def test_predict_forwards_by_header(auth, predict_url: str, upstream) -> None:
    result = od.predict(
        predict_url, text_payload("Hello"), auth.signer, model_name="ensemble_model"
    )
    assert od.output_by_name(result, "NEXT_TOKEN") == [" x"]
    assert upstream.calls == [
        {"path": "/v2/models/ensemble_model/versions/1/infer", "body": text_payload("Hello")}
    ]


@pytest.mark.parametrize(
    "headers",
    [
        {"model_name": "generate", "model_version": "1"},
        {"model-name": "generate", "model-version": "1"},
    ],
)
def test_either_header_form_selects_the_model(auth, predict_url: str, upstream, headers) -> None:
    prepared = signed(auth, "POST", predict_url, json=text_payload("Hi"), headers=headers)
    answer = send(prepared)
    assert answer.status_code == 200
    assert upstream.calls[-1]["path"] == "/v2/models/generate/versions/1/infer"


def test_conflicting_model_headers_are_refused(auth, predict_url: str, upstream) -> None:
    headers = {"model_name": "generate", "model-name": "ensemble_model"}
    answer = send(signed(auth, "POST", predict_url, json=text_payload("Hi"), headers=headers))
    assert answer.status_code == 400
    assert upstream.calls == []


def test_predict_unsigned_is_refused(predict_url: str, upstream) -> None:
    answer = requests.post(predict_url, json=text_payload("Hi"), timeout=30)
    assert answer.status_code == 401
    assert upstream.calls == []


def test_predict_retries_429(auth, predict_url: str, standin: OciStandIn) -> None:
    standin.answer_429(2)
    result = od.predict(
        predict_url, text_payload("Hi"), auth.signer, model_name="ensemble_model", backoff_s=0.01
    )
    assert od.output_by_name(result, "NEXT_TOKEN") == [" x"]
    statuses = [r["status"] for r in standin.requests if r["operation"] == "predict"]
    assert statuses == [429, 429, 200]


def test_predict_gives_up_after_bounded_retries(auth, predict_url: str, standin) -> None:
    standin.answer_429(5)
    with pytest.raises(TutorialError) as err:
        od.predict(
            predict_url,
            text_payload("Hi"),
            auth.signer,
            model_name="ensemble_model",
            max_retries=2,
            backoff_s=0.01,
        )
    assert str(err.value).startswith(
        f"HTTP 429 Too Many Requests from {predict_url}, still after 2 retries."
    )
    statuses = [r["status"] for r in standin.requests if r["operation"] == "predict"]
    assert statuses == [429, 429, 429]


def test_payload_over_10mb_is_not_sent(auth, predict_url: str, standin, upstream) -> None:
    big = text_payload("x" * od.PREDICT_PAYLOAD_LIMIT_BYTES)
    with pytest.raises(TutorialError) as err:
        od.predict(predict_url, big, auth.signer, model_name="ensemble_model")
    size = len(json.dumps(big).encode())
    assert str(err.value) == (
        f"The payload is {size:,} bytes; OCI Model Deployment accepts at most 10,485,760 bytes "
        "(10 MB) per /predict call: send less per call."
    )
    assert "predict" not in standin.operations()


def test_service_refuses_payload_over_10mb(auth, predict_url: str, upstream) -> None:
    data = json.dumps(text_payload("x" * od.PREDICT_PAYLOAD_LIMIT_BYTES)).encode()
    headers = {"Content-Type": "application/json", "model_name": "ensemble_model"}
    answer = send(signed(auth, "POST", predict_url, data=data, headers=headers))
    assert answer.status_code == 413
    assert upstream.calls == []


def test_slow_predict_times_out_with_the_limit_named(auth, predict_url: str, standin) -> None:
    standin.delay_predict(1.0)
    with pytest.raises(TutorialError) as err:
        od.predict(
            predict_url, text_payload("Hi"), auth.signer, model_name="ensemble_model", timeout_s=0.2
        )
    assert str(err.value).startswith(
        f"No answer from {predict_url} within 0.2 s. OCI ends every /predict call at 60 s"
    )


def test_service_cuts_calls_at_its_time_limit(auth, predict_url: str, standin, upstream) -> None:
    standin.predict_time_limit_s = 0.05  # stands for the service's 60 s
    standin.delay_predict(0.05)
    with pytest.raises(TutorialError, match=r"^HTTP 504 from .*GatewayTimeout"):
        od.predict(predict_url, text_payload("Hi"), auth.signer, model_name="ensemble_model")
    assert upstream.calls == []


def test_predict_with_a_wrong_key_says_401(
    tmp_path: Path, creds: StandInCredentials, predict_url: str
) -> None:
    other = make_test_credentials(tmp_path / "other")
    other.config_file.write_text(
        other.config_file.read_text().replace(other.fingerprint, creds.fingerprint)
    )
    with pytest.raises(TutorialError, match="^HTTP 401 from .*: the request signature was refused"):
        od.predict(
            predict_url,
            text_payload("Hi"),
            od.oci_auth(other.config_file).signer,
            model_name="ensemble_model",
        )


# --------------------------------------------------------------------------------------------
# Finding leftovers


def test_cleanup_finds_by_tag_or_prefix_and_dry_runs_first(
    client, standin: OciStandIn, artifact: Path, capsys: pytest.CaptureFixture
) -> None:
    tagged = model_with_artifact(client, artifact, "anything")
    named = model_with_artifact(client, artifact, "gpt2-triton-old", tags={"other": "x"})
    other = model_with_artifact(client, artifact, "someone-else", tags={"other": "x"})
    deployment = deploy(client, tagged.id)
    for _ in range(2):  # more than a page each (the stand-in pages by 2)
        od.create_model(client, compartment_id=COMPARTMENT, project_id=PROJECT, display_name="z")

    found = od.cleanup_tutorial_resources(
        client, COMPARTMENT, project_id=PROJECT, name_prefix="gpt2-triton"
    )
    ids = {item["id"] for item in found}
    assert {tagged.id, named.id, deployment.id} <= ids and other.id not in ids
    assert len(ids) == 5  # plus the two tagged "z" models
    assert "Dry run: nothing deleted (pass dry_run=False to delete)." in capsys.readouterr().out
    assert set(standin.live()) == ids | {other.id}  # nothing deleted

    od.cleanup_tutorial_resources(
        client, COMPARTMENT, name_prefix="gpt2-triton", dry_run=False, poll_s=0.01
    )
    assert standin.live() == [other.id]
    assert od.find_tutorial_resources(client, COMPARTMENT, name_prefix="gpt2-triton") == []


def test_request_json_is_what_the_sdk_sends(client) -> None:
    details = od.deployment_request(model_id="ocid1.datasciencemodel.oc1.iad.m", **request_kwargs())
    body = json.loads(od.request_json(details))
    assert body == client.base_client.sanitize_for_serialization(details)
    env = body["modelDeploymentConfigurationDetails"]["environmentConfigurationDetails"]
    assert env["environmentVariables"] == {"CONTAINER_TYPE": "TRITON"}


def test_gpu_repository_fails_on_a_cpu_shape(client, standin: OciStandIn, tmp_path: Path) -> None:
    path = tmp_path / "gpu_artifact.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(
            "model_repository/gpt2/config.pbtxt",
            'name: "gpt2"\ninstance_group [{ kind: KIND_GPU }]\n',
        )
    model = model_with_artifact(client, path)
    with pytest.raises(od.DeploymentFailed, match=f"is FAILED: {BOOTSTRAP_FAILED}"):
        deploy(client, model.id, shape="VM.Standard.E4.Flex", ocpus=2, memory_in_gbs=16)
    # the same repository on a GPU shape comes up
    assert deploy(client, model.id).lifecycle_state == "ACTIVE"

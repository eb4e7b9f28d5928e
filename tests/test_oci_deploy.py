"""tutorial/oci_deploy.py against the loopback OCI stand-in: the real SDK, real signatures.

Most of these need no Triton: every deployment's container is a tiny recording upstream in this
file. The tests marked slow deploy the real artifact zip (notebook 03's, tiny model) on the real
local Triton that the stand-in starts, as OCI runs the container.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import oci
import pytest
import requests
from oci_standin import (
    BOOTSTRAP_FAILED,
    IMAGE_ACCESS_FAILED,
    OciStandIn,
    StandInCredentials,
    make_test_credentials,
)

from tests.conftest import ROOT, require_local_triton
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
        server.add_repository(COMPARTMENT, "gpt2-triton")  # what notebook 05 creates
        server.record_push(IMAGE, DIGEST)  # and pushes
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
    assert env.cmd == od.triton_command(8000)
    assert "--model-repository=/opt/ds/model/deployed_model/model_repository" in env.cmd
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
        (8000, {"K": "x"}, "environment variable 'K': keys must have at least 2 characters"),
        (8000, {"TEST_": "x"}, "environment variable 'TEST_': keys must not end with _"),
        (8000, {"TENANCY_OCID": "x"}, "'TENANCY_OCID': the service sets this one itself"),
        (8000, {"METRICS_PORT": "8446"}, "'METRICS_PORT'=8446: ports must be integers in"),
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
    # 2- and 31-character keys, 2047 bytes in total, highest port: all allowed
    od.validate_byoc(65535, 65535, {"AB": "", "K" * 31: "v" * (2047 - 31 - 2)})
    # cmd + entrypoint: 2047 bytes pass, 2048 do not
    od.validate_byoc(8000, 8000, {}, ["x" * 2000], ["y" * 47])
    with pytest.raises(TutorialError, match="cmd and entrypoint take 2048 bytes together"):
        od.validate_byoc(8000, 8000, {}, ["x" * 2000], ["y" * 48])


def test_request_rules_checked_before_sending() -> None:
    """check_deployment_request lists every break of OCI's rules in one message."""
    details = od.deployment_request(model_id="m", **request_kwargs())
    config = details.model_deployment_configuration_details
    config.environment_configuration_details.server_port = 9000  # Triton listens on 8000
    model_config = config.model_configuration_details
    model_config.instance_configuration.instance_shape_name = "VM.Standard.E4.Flex"
    model_config.instance_configuration.model_deployment_instance_shape_config_details = (
        oci.data_science.models.ModelDeploymentInstanceShapeConfigDetails(
            ocpus=4.0, memory_in_gbs=16.0
        )
    )
    model_config.maximum_bandwidth_mbps = 50
    with pytest.raises(TutorialError) as err:
        od.check_deployment_request(details)
    lines = str(err.value).splitlines()
    assert lines[0] == "The deployment request breaks OCI's rules (docs/troubleshooting.md):"
    assert lines[1:] == [
        "  - the command starts Triton on port 8000 but server_port is 9000: the health "
        "check would never succeed",
        "  - VM.Standard.E4.Flex: 16 GB for 4 OCPUs; model deployments need at least 6 GB per "
        "OCPU (24 GB)",
        "  - maximum_bandwidth_mbps=50: more than bandwidth_mbps=10 and at most twice it",
    ]


def test_another_server_port_is_refused_for_the_images_healthcheck() -> None:
    with pytest.raises(TutorialError) as err:
        od.deployment_request(model_id="m", **request_kwargs(server_port=9000))
    assert str(err.value).splitlines()[1:] == [
        "  - health_check_port=9000: the image's HEALTHCHECK (docker/Dockerfile) asks "
        "127.0.0.1:8000, and OCI monitors that HEALTHCHECK on the health-check port "
        "(DOCS['sdk_env']): keep SERVER_PORT = 8000, or change the HEALTHCHECK line and rebuild "
        "the image"
    ]
    instruction = (ROOT / "docker" / "Dockerfile").read_text().split("\nHEALTHCHECK ", 1)[1]
    command = instruction.split("\n")[1]  # the line after the options
    assert f"http://127.0.0.1:{od.IMAGE_HEALTHCHECK_PORT}/v2/health/ready " in command


def test_service_fails_a_deployment_the_healthcheck_cannot_reach(
    client, standin: OciStandIn, artifact: Path
) -> None:
    model = model_with_artifact(client, artifact)
    details = od.deployment_request(model_id=model.id, **request_kwargs())
    env = _env(details)
    env.cmd = od.triton_command(9000)
    env.server_port = env.health_check_port = 9000
    deployment, work_request_id = od.create_deployment(client, details)
    with pytest.raises(od.DeploymentFailed) as err:
        od.wait_for_deployment(client, deployment.id, work_request_id, poll_s=0.01)
    assert (
        f"is FAILED: {BOOTSTRAP_FAILED} The image's HEALTHCHECK asks port 8000, but "
        "health_check_port is 9000." in str(err.value)
    )


def test_autoscaling_rules_checked_before_sending() -> None:
    details = od.deployment_request(
        model_id="m",
        **request_kwargs(
            shape="VM.Standard.E4.Flex", ocpus=2, memory_in_gbs=12, autoscaling_max_instances=3
        ),
    )
    policy = details.model_deployment_configuration_details.model_configuration_details
    policy = policy.scaling_policy
    assert policy.cool_down_in_seconds == 600
    policy.cool_down_in_seconds = 120
    policy.auto_scaling_policies[0].minimum_instance_count = 2  # above initial (1)
    rule = policy.auto_scaling_policies[0].rules[0]
    rule.scale_in_configuration.threshold = 80  # above scale-out (70)
    with pytest.raises(TutorialError) as err:
        od.check_deployment_request(details)
    assert str(err.value).splitlines()[1:] == [
        "  - cool_down_in_seconds=120: at least 300 s",
        "  - instances minimum=2, initial=1, maximum=3: need 1 <= minimum <= initial <= maximum",
        "  - thresholds scale-in 80 %, scale-out 70 %: need 0 < scale-in < scale-out <= 100 "
        "(percent)",
    ]


def _env(details):
    return details.model_deployment_configuration_details.environment_configuration_details


def _model_config(details):
    return details.model_deployment_configuration_details.model_configuration_details


def _flex(ocpus: float, memory: float):
    def change(details) -> None:
        instance = _model_config(details).instance_configuration
        instance.instance_shape_name = "VM.Standard.E4.Flex"
        instance.model_deployment_instance_shape_config_details = (
            oci.data_science.models.ModelDeploymentInstanceShapeConfigDetails(
                ocpus=ocpus, memory_in_gbs=memory
            )
        )

    return change


def _autoscaling(**changes: object):
    def change(details) -> None:
        from oci.data_science import models as m

        rule = m.PredefinedMetricExpressionRule(
            metric_expression_rule_type="PREDEFINED_EXPRESSION",
            metric_type="CPU_UTILIZATION",
            scale_in_configuration=m.PredefinedExpressionThresholdScalingConfiguration(
                scaling_configuration_type="THRESHOLD", threshold=changes.get("scale_in", 30)
            ),
            scale_out_configuration=m.PredefinedExpressionThresholdScalingConfiguration(
                scaling_configuration_type="THRESHOLD", threshold=70
            ),
        )
        _model_config(details).scaling_policy = m.AutoScalingPolicy(
            policy_type="AUTOSCALING",
            cool_down_in_seconds=changes.get("cool_down", 600),
            auto_scaling_policies=[
                m.ThresholdBasedAutoScalingPolicyDetails(
                    auto_scaling_policy_type="THRESHOLD",
                    minimum_instance_count=changes.get("minimum", 1),
                    initial_instance_count=changes.get("initial", 1),
                    maximum_instance_count=changes.get("maximum", 2),
                    rules=[rule],
                )
            ],
        )

    return change


def _set_env(name: str, value: object):
    def change(details) -> None:
        setattr(_env(details), name, value)

    return change


def _env_vars(**variables: str):
    return _set_env("environment_variables", {"CONTAINER_TYPE": "TRITON", **variables})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            _set_env("server_port", 24224),
            "server_port 24224 is not allowed: use 1024-65535 except 24224, 8446 and 8447",
        ),
        (
            _env_vars(**{"bad-key": "1"}),
            "environment variable key 'bad-key' is invalid: 2 to 31 characters, letters, "
            "digits and underscores, starting with a letter and not ending with an underscore",
        ),
        (_env_vars(X="1"), "environment variable key 'X' is invalid"),
        (_env_vars(TEST_="1"), "environment variable key 'TEST_' is invalid"),
        (_env_vars(**{"K" * 32: "1"}), f"environment variable key '{'K' * 32}' is invalid"),
        (
            _env_vars(MODEL_DEPLOYMENT_OCID="x"),
            "environment variable key 'MODEL_DEPLOYMENT_OCID' is reserved: the service sets it",
        ),
        (
            _env_vars(GRPC_PORT="80"),
            "environment variable GRPC_PORT=80: ports must be 1024-65535 except 24224, 8446 "
            "and 8447",
        ),
        (
            _env_vars(BIG="v" * 2030),
            "environmentVariables use 2053 bytes; the limit is 2048",
        ),
        (
            _set_env("entrypoint", ["/bin/sh", "-c", "x" * 2000]),
            "cmd and entrypoint use ",
        ),
        (
            _flex(4, 16),
            "memoryInGBs 16 is below the minimum of 6 GB per OCPU for 4 OCPUs (24 GB).",
        ),
        (
            _flex(1, 65),
            "memoryInGBs 65 is above the maximum of 64 GB per OCPU for 1 OCPUs (64 GB).",
        ),
        (
            _autoscaling(minimum=2, initial=1, maximum=3),
            "Need 1 <= minimumInstanceCount <= initialInstanceCount <= maximumInstanceCount, "
            "got 2, 1, 3.",
        ),
        (_autoscaling(minimum=0), "Need 1 <= minimumInstanceCount"),
        (
            _autoscaling(cool_down=299),
            "coolDownInSeconds 299 is below the minimum of 300.",
        ),
        (
            _autoscaling(scale_in=75),
            "Scale-in threshold 75 must be below the scale-out threshold 70, both percentages.",
        ),
        (
            lambda d: setattr(_model_config(d), "maximum_bandwidth_mbps", 21),
            "maximumBandwidthMbps 21 must be more than bandwidthMbps and at most twice it.",
        ),
    ],
)
def test_rules_checked_by_the_service(
    client, artifact: Path, standin: OciStandIn, change, message: str
) -> None:
    """Each documented rule, broken after the client-side check: the stand-in refuses the
    request as OCI does, 400 InvalidParameter with a message naming the field; nothing is
    created."""
    model = model_with_artifact(client, artifact)
    details = od.deployment_request(model_id=model.id, **request_kwargs())
    change(details)
    with pytest.raises(oci.exceptions.ServiceError) as err:
        client.create_model_deployment(details)
    assert (err.value.status, err.value.code) == (400, "InvalidParameter")
    assert message in err.value.message
    assert standin.deployments == {}


def test_edges_of_the_rules_are_accepted_by_the_service(client, artifact: Path) -> None:
    model = model_with_artifact(client, artifact)
    for change in (
        _flex(4, 24),  # exactly 6 GB per OCPU
        _autoscaling(minimum=1, initial=2, maximum=2, cool_down=300),
        _env_vars(AB="", **{"K" * 31: "v"}),
    ):
        details = od.deployment_request(model_id=model.id, **request_kwargs())
        change(details)
        deployment, work_request_id = od.create_deployment(client, details)
        od.wait_for_deployment(client, deployment.id, work_request_id, poll_s=0.01)


@pytest.mark.parametrize(
    ("shape", "ocpus", "memory", "client_says", "service_says"),
    [
        ("VM.Standard.E4.Flex", 65, 400, "ocpus=65; at most 64 OCPUs", "ocpus 65 is above 64"),
        ("VM.Standard.E4.Flex", 64, 1025, "memory_in_gbs=1025; at most 1024 GB", "above 1024"),
        ("VM.Standard3.Flex", 33, 300, "ocpus=33; at most 32 OCPUs", "ocpus 33 is above 32"),
        ("VM.Standard3.Flex", 32, 513, "memory_in_gbs=513; at most 512 GB", "above 512"),
        ("VM.Optimized3.Flex", 19, 200, "ocpus=19; at most 18 OCPUs", "ocpus 19 is above 18"),
        ("VM.Optimized3.Flex", 18, 257, "memory_in_gbs=257; at most 256 GB", "above 256"),
    ],
)
def test_per_shape_maxima(
    client, artifact: Path, standin: OciStandIn, shape, ocpus, memory, client_says, service_says
) -> None:
    """The SDK's documented ranges per Flex shape, checked before sending and by the service."""
    with pytest.raises(TutorialError, match=f"{shape}: {client_says}"):
        od.deployment_request(
            model_id="m", **request_kwargs(shape=shape, ocpus=ocpus, memory_in_gbs=memory)
        )
    model = model_with_artifact(client, artifact)
    details = od.deployment_request(
        model_id=model.id, **request_kwargs(shape=shape, ocpus=1, memory_in_gbs=6)
    )
    config = _model_config(details).instance_configuration
    config.model_deployment_instance_shape_config_details.ocpus = ocpus
    config.model_deployment_instance_shape_config_details.memory_in_gbs = memory
    with pytest.raises(oci.exceptions.ServiceError) as err:
        client.create_model_deployment(details)
    assert err.value.status == 400 and service_says in err.value.message
    # the edges pass
    od.deployment_request(
        model_id="m",
        **request_kwargs(
            shape=shape,
            ocpus=od.FLEX_SHAPE_MAXIMA[shape][0],
            memory_in_gbs=od.FLEX_SHAPE_MAXIMA[shape][1],
        ),
    )


@pytest.mark.parametrize(
    ("image", "digest", "outcome"),
    [
        (IMAGE, DIGEST, "ACTIVE"),
        (f"{IMAGE}@{DIGEST}", None, "ACTIVE"),
        (f"{IMAGE}@{DIGEST}", DIGEST, "ACTIVE"),
        (IMAGE, "sha256:" + "ef" * 32, "no image with digest sha256:efef"),
        (f"{IMAGE}@sha256:{'ef' * 32}", None, "no image with digest sha256:efef"),
        (
            "iad.ocir.io/standinns/gpt2-triton:never-pushed",
            None,
            "no image with tag 'never-pushed'",
        ),
    ],
)
def test_the_image_must_be_one_that_was_pushed(
    client, artifact: Path, standin: OciStandIn, image: str, digest, outcome: str
) -> None:
    model = model_with_artifact(client, artifact)
    details = od.deployment_request(model_id=model.id, **request_kwargs())
    _env(details).image, _env(details).image_digest = image, digest
    deployment, work_request_id = od.create_deployment(client, details)
    if outcome == "ACTIVE":
        done = od.wait_for_deployment(client, deployment.id, work_request_id, poll_s=0.01)
        assert done.lifecycle_state == "ACTIVE"
        return
    with pytest.raises(od.DeploymentFailed) as err:
        od.wait_for_deployment(client, deployment.id, work_request_id, poll_s=0.01)
    assert f"is FAILED: {IMAGE_ACCESS_FAILED} (stand-in: {outcome}" in str(err.value)


def test_a_push_without_a_repository_lands_in_the_root_compartment(
    client, artifact: Path, standin: OciStandIn, creds: StandInCredentials
) -> None:
    image = "iad.ocir.io/standinns/first-push:1"
    repository = standin.record_push(image, DIGEST)
    assert repository.compartment_id == creds.tenancy
    model = model_with_artifact(client, artifact)
    with pytest.raises(od.DeploymentFailed) as err:
        deploy(client, model.id, image=image)
    assert f"repository 'first-push' is in compartment {creds.tenancy}" in str(err.value)


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


def test_predict_sends_the_documented_headers_only() -> None:
    # Oracle's Triton sample (od.DOCS["triton_sample"]) sends exactly these two.
    assert od.predict_headers("generate", 1) == {"model_name": "generate", "model_version": "1"}


def test_model_name_header_selects_the_model(auth, predict_url: str, upstream) -> None:
    headers = {"model_name": "generate", "model_version": "1"}
    answer = send(signed(auth, "POST", predict_url, json=text_payload("Hi"), headers=headers))
    assert answer.status_code == 200
    assert upstream.calls[-1]["path"] == "/v2/models/generate/versions/1/infer"


def test_predict_without_model_name_reaches_triton_with_no_name(
    auth, predict_url: str, upstream
) -> None:
    """OCI documents no answer for this (oci_standin RULES["predict_no_model"]): the stand-in
    invents none, it forwards with the name empty and Triton answers (the slow test below)."""
    headers = {"model-name": "generate", "model-version": "1"}  # not the documented spelling
    answer = send(signed(auth, "POST", predict_url, json=text_payload("Hi"), headers=headers))
    assert answer.status_code == 200  # what this recording upstream answers to anything
    assert [call["path"] for call in upstream.calls] == ["/v2/models//infer"]


def test_predict_unsigned_is_refused(predict_url: str, upstream) -> None:
    answer = requests.post(predict_url, json=text_payload("Hi"), timeout=30)
    assert answer.status_code == 401
    assert upstream.calls == []


@pytest.mark.parametrize(
    ("status", "meaning"),
    [(429, "Too Many Requests"), (500, "Internal Server Error"), (503, "Service Unavailable")],
)
def test_predict_retries_what_oci_says_to_retry(
    auth, predict_url: str, standin: OciStandIn, capsys, status: int, meaning: str
) -> None:
    standin.answer_errors(status, 2)
    result = od.predict(
        predict_url, text_payload("Hi"), auth.signer, model_name="ensemble_model", backoff_s=0.01
    )
    assert od.output_by_name(result, "NEXT_TOKEN") == [" x"]
    statuses = [r["status"] for r in standin.requests if r["operation"] == "predict"]
    assert statuses == [status, status, 200]
    assert capsys.readouterr().out.splitlines() == [
        f"HTTP {status} from /predict ({meaning}); retry 1 of 5 in 0.01 s",
        f"HTTP {status} from /predict ({meaning}); retry 2 of 5 in 0.02 s",
    ]


def test_predict_gives_up_after_bounded_retries(auth, predict_url: str, standin, capsys) -> None:
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
        f"HTTP 429 from {predict_url}, still after 2 retries. Too Many Requests: the "
        "deployment's load-balancer bandwidth (BANDWIDTH_MBPS)"
    )
    statuses = [r["status"] for r in standin.requests if r["operation"] == "predict"]
    assert statuses == [429, 429, 429]
    assert len(capsys.readouterr().out.splitlines()) == 2  # every retry printed


def test_backoff_is_bounded(auth, predict_url: str, standin) -> None:
    standin.answer_errors(503, 3)
    delays = []
    od.predict(
        predict_url,
        text_payload("Hi"),
        auth.signer,
        model_name="ensemble_model",
        backoff_s=0.01,
        max_backoff_s=0.02,
        log=delays.append,
    )
    assert [line.rsplit(" in ", 1)[1] for line in delays] == ["0.01 s", "0.02 s", "0.02 s"]


def test_404_says_policy_or_endpoint(auth, predict_url: str, standin, upstream) -> None:
    standin.deny_predict()
    with pytest.raises(TutorialError) as err:
        od.predict(predict_url, text_payload("Hi"), auth.signer, model_name="ensemble_model")
    message = str(err.value)
    assert message.startswith(f"HTTP 404 NotAuthorizedOrNotFound from {predict_url}: either no ")
    assert message.endswith(
        "allow group <your-group> to {DATA_SCIENCE_MODEL_DEPLOYMENT_PREDICT} in compartment "
        "<compartment>"
    )
    standin.deny_predict(False)
    wrong = predict_url.replace(
        "datasciencemodeldeployment.oc1.iad.", "datasciencemodeldeployment.oc1.iad.0"
    )
    with pytest.raises(TutorialError, match="^HTTP 404 NotAuthorizedOrNotFound from .*wrong"):
        od.predict(wrong, text_payload("Hi"), auth.signer, model_name="ensemble_model")
    assert upstream.calls == []


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
    standin.predict_time_limit_s = 0.05  # stands for the service's 60 s: it answers 500
    standin.delay_predict(0.05)
    with pytest.raises(TutorialError) as err:
        od.predict(
            predict_url,
            text_payload("Hi"),
            auth.signer,
            model_name="ensemble_model",
            max_retries=1,
            backoff_s=0.01,
        )
    assert str(err.value).startswith(
        f"HTTP 500 from {predict_url}, still after 1 retries. Internal Server Error: the model "
        "server failed, or the call ran into the service's 60 s limit"
    )
    statuses = [r["status"] for r in standin.requests if r["operation"] == "predict"]
    assert statuses == [500, 500]
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


def _artifact_with_generate(path: Path, empty_past_shape: str, runner: str = "bls") -> Path:
    config = "".join(
        f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n'
        for k, v in (
            ("empty_past_shape", empty_past_shape),
            ("max_context_tokens", "1024"),
            ("shm_caches_per_step", "8"),
            ("step_runner", runner),
        )
    )
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(  # the engine's config: step_runner, shapes, limits
            "model_repository/generate_stream/config.pbtxt", f'name: "generate_stream"\n{config}'
        )
    return path


def test_shm_size_fits_the_longest_request(tmp_path: Path) -> None:
    # GPT-2 124M: 72 KiB of cache per token, 1024 tokens, 8 caches = 576 MiB -> 1 GiB
    size, why = od.shm_size_for_artifact(
        _artifact_with_generate(tmp_path / "a.zip", "12,2,1,12,0,64")
    )
    assert (size, why) == (
        "1g",
        "1024 tokens x 72 KiB of KV cache per token x 8 caches = 576 MiB, rounded up to 1 GiB "
        "(step_runner 'bls')",
    )
    # gpt2-large: 360 KiB per token -> 2880 MiB -> 3 GiB
    large = _artifact_with_generate(tmp_path / "b.zip", "36,2,1,20,0,64", "onnxruntime")
    assert od.shm_size_for_artifact(large)[0] == "3g"


def test_shm_size_is_in_the_deployment_request(client, standin: OciStandIn, artifact: Path) -> None:
    model = model_with_artifact(client, artifact)
    deployment = deploy(client, model.id, shm_size="1g")
    sent = standin.deployments[deployment.id].model_deployment_configuration_details
    variables = sent.environment_configuration_details.environment_variables
    assert variables == {"CONTAINER_TYPE": "TRITON", "SHM_SIZE": "1g"}


def test_request_json_is_what_the_sdk_sends(client) -> None:
    details = od.deployment_request(model_id="ocid1.datasciencemodel.oc1.iad.m", **request_kwargs())
    body = json.loads(od.request_json(details))
    assert body == client.base_client.sanitize_for_serialization(details)
    env = body["modelDeploymentConfigurationDetails"]["environmentConfigurationDetails"]
    assert env["environmentVariables"] == {"CONTAINER_TYPE": "TRITON"}


# --------------------------------------------------------------------------------------------
# The image: its repository's compartment, its region


@pytest.fixture
def artifacts(auth: od.OciAuth, standin: OciStandIn):
    return od.artifacts_client(auth, standin.url, retry_strategy=oci.retry.NoneRetryStrategy())


def test_repository_is_created_once_in_the_chosen_compartment(artifacts, standin) -> None:
    from tutorial import registry

    other = "ocid1.compartment.oc1..othercompartment"
    first = registry.ensure_container_repository(artifacts, other, "team/gpt2-triton")
    assert first["created"] is True
    assert (first["compartment_id"], first["namespace"]) == (other, "standinns")
    again = registry.ensure_container_repository(artifacts, other, "team/gpt2-triton")
    assert again == dict(first, created=False)
    # the name is the tenancy's: the same name in another compartment is refused, and said so
    with pytest.raises(TutorialError) as err:
        registry.ensure_container_repository(artifacts, COMPARTMENT, "team/gpt2-triton")
    assert str(err.value).startswith(
        "A repository named 'team/gpt2-triton' already exists in your tenancy, but not in "
        f"compartment {COMPARTMENT} (HTTP 409 Conflict: "
    )
    found = artifacts.list_container_repositories(compartment_id=other).data
    assert [r.display_name for r in found.items] == ["team/gpt2-triton"]


@pytest.mark.parametrize(
    ("image", "detail"),
    [
        (
            "iad.ocir.io/standinns/elsewhere:1",
            "repository 'elsewhere' is in compartment ocid1.compartment.oc1..othercompartment; "
            "the deployment's policy reads repos in its own compartment",
        ),
        ("iad.ocir.io/standinns/never-pushed:1", "no repository 'never-pushed'"),
        ("iad.ocir.io/otherns/gpt2-triton:1", "the namespace 'otherns' is not this tenancy's"),
    ],
)
def test_image_out_of_the_policy_fails_the_deployment(
    client, standin: OciStandIn, artifact: Path, image: str, detail: str
) -> None:
    standin.add_repository("ocid1.compartment.oc1..othercompartment", "elsewhere")
    model = model_with_artifact(client, artifact)
    with pytest.raises(od.DeploymentFailed) as err:
        deploy(client, model.id, image=image)
    assert f"is FAILED: {IMAGE_ACCESS_FAILED} (stand-in: {detail}" in str(err.value)
    assert standin.containers == {}


def test_repositories_and_deployments_are_regional(
    auth: od.OciAuth, client, standin: OciStandIn, artifact: Path, monkeypatch
) -> None:
    """A repository made through Frankfurt's endpoint exists only there; an image in another
    region than the deployment fails it."""
    monkeypatch.setenv(od.ENDPOINT_OVERRIDE_ENV, standin.url_for("{region}"))
    fra = od.OciAuth("api_key", dict(auth.config, region="eu-frankfurt-1"), auth.signer)
    from tutorial import registry

    registry.ensure_container_repository(od.artifacts_client(fra), COMPARTMENT, "fra-only")
    iad = od.artifacts_client(auth).list_container_repositories(compartment_id=COMPARTMENT)
    assert [r.display_name for r in iad.data.items] == ["gpt2-triton"]
    model = model_with_artifact(client, artifact)
    for image, detail in (
        ("iad.ocir.io/standinns/fra-only:1", "no repository 'fra-only' in us-ashburn-1."),
        (
            "fra.ocir.io/standinns/fra-only:1",
            "the image is in eu-frankfurt-1's registry (fra.ocir.io); the deployment is in "
            "us-ashburn-1.",
        ),
    ):
        with pytest.raises(od.DeploymentFailed) as err:
            deploy(client, model.id, image=image)
        assert f"is FAILED: {IMAGE_ACCESS_FAILED} (stand-in: {detail})" in str(err.value)
    assert standin.containers == {}


def test_region_mismatch_is_explained() -> None:
    assert od.image_region_problem(IMAGE, "us-ashburn-1") is None
    assert od.image_region_problem("us-ashburn-1.ocir.io/ns/r:1", "us-ashburn-1") is None
    message = od.image_region_problem("fra.ocir.io/ns/r:1", "us-ashburn-1")
    assert message.startswith(
        "The image is in OCIR of region 'fra' (fra.ocir.io), but the deployment is created in "
        "'us-ashburn-1' (iad)."
    )
    assert message.endswith(
        "Fix: push the image to iad.ocir.io (notebook 05 with REGION='iad') and deploy that "
        "reference, or deploy in the image's region."
    )


# --------------------------------------------------------------------------------------------
# What is deployed: the artifact's own description


def test_refusals_read_from_the_artifact(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    info = {"variant": "int8", "shapes": "cpu", "weights": "random-offline"}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model_repository/MODEL_INFO.json", json.dumps(info))
    assert od.artifact_model_info(path) == info
    random, int8 = od.deployment_refusals(info, "VM.GPU.A10.1")
    assert random.startswith("The artifact holds RANDOM weights")
    assert "set ALLOW_RANDOM_WEIGHTS = True" in random
    assert int8.startswith(
        "The artifact is the int8 variant (shapes: cpu), but VM.GPU.A10.1 is a GPU shape: "
        "dynamic int8 runs on the CPU"
    )
    assert od.deployment_refusals(info, "VM.Standard.E4.Flex", allow_random_weights=True) == []
    fp32 = {"variant": "fp32", "shapes": "gpu or cpu", "weights": "real"}
    assert od.deployment_refusals(fp32, "VM.GPU.A10.1") == []
    assert od.artifact_model_info(artifact_without_info(tmp_path)) == {}


def test_a_model_that_does_not_fit_the_shape_is_refused() -> None:
    from tutorial.model_source import GPT2_FAMILY

    def info(size: str, variant: str = "fp32", **dims: int) -> dict:
        dims = dims or GPT2_FAMILY[size]
        return {**dims, "size": size, "variant": variant, "shapes": "gpu or cpu", "weights": "real"}

    assert od.gpu_memory_gb("VM.GPU.A10.1") == 24 and od.gpu_memory_gb("BM.GPU4.8") == 40
    assert od.gpu_memory_gb("VM.GPU.Unknown.1") is None
    large = info("gpt2-large")  # 2 x 3.35 GB of weights, 0.38 GB of cache, 2 GB of server
    assert 9.0 < od.memory_needed_gb(large) < 9.2
    [refusal] = od.deployment_refusals(large, "VM.Standard.E4.Flex", memory_in_gbs=8)
    assert refusal.startswith("gpt2-large needs about 9.1 GB (2 copies of its weights")
    assert "but VM.Standard.E4.Flex is asked for 8 GB" in refusal
    assert od.deployment_refusals(large, "VM.Standard.E4.Flex", memory_in_gbs=16) == []
    assert od.deployment_refusals(info("gpt2-xl"), "VM.GPU.A10.1") == []  # 15.7 GB of 24
    huge = info("a 3B GPT-2", n_layer=64, n_head=16, n_embd=2048)
    [refusal] = od.deployment_refusals(huge, "VM.GPU.A10.1")
    assert "but each GPU of VM.GPU.A10.1 has 24 GB" in refusal
    assert od.deployment_refusals({"weights": "real"}, "VM.GPU.A10.1") == []  # no dims: no guess


def artifact_without_info(tmp_path: Path) -> Path:
    path = tmp_path / "plain.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model_repository/gpt2/config.pbtxt", 'name: "gpt2"')
    return path


# --------------------------------------------------------------------------------------------
# The real container: notebook 03's zip on the real local Triton


@pytest.mark.slow
def test_real_triton_serves_the_zip_and_stops_with_the_deployment(
    tiny_workdir: Path, creds: StandInCredentials, auth: od.OciAuth
) -> None:
    require_local_triton()
    with OciStandIn(creds, polls_to_finish=2) as standin:
        standin.add_repository(COMPARTMENT, "gpt2-triton")
        standin.record_push(IMAGE, DIGEST)
        client = od.data_science_client(
            auth, standin.url, retry_strategy=oci.retry.NoneRetryStrategy()
        )
        model = model_with_artifact(client, tiny_workdir / "model_artifact.zip")
        details = od.deployment_request(
            model_id=model.id,
            **request_kwargs(shape="VM.Standard.E4.Flex", ocpus=1, memory_in_gbs=6),
        )
        deployment, work_request_id = od.create_deployment(client, details)
        deployment = od.wait_for_deployment(client, deployment.id, work_request_id, poll_s=0.2)
        container = standin.containers[deployment.id]
        assert container.process.poll() is None
        # the deployed zip, unpacked read-only as OCI does
        assert (container.artifact_root / "model_repository" / "MODEL_INFO.json").is_file()
        result = od.predict(
            f"{deployment.model_deployment_url}/predict",
            text_payload("Hello world"),
            auth.signer,
            model_name="ensemble_model",
        )
        assert len(od.output_by_name(result, "NEXT_TOKEN")) == 1
        # no model_name: Triton's own answer (the stand-in forwards with the name empty)
        nameless = send(
            signed(
                auth,
                "POST",
                f"{deployment.model_deployment_url}/predict",
                json=text_payload("Hi"),
            )
        )
        assert nameless.status_code != 200 and "error" in nameless.json()
        od.delete_deployment(client, deployment.id, poll_s=0.2)
        assert container.process.poll() is not None  # deleting stopped the server
        assert standin.containers == {}
        assert standin.unhandled == []


# --------------------------------------------------------------------------------------------
# Large artifacts: through Object Storage above the direct-upload limit


def test_large_artifact_goes_through_object_storage_and_deploys(
    auth: od.OciAuth, client, standin: OciStandIn, tmp_path: Path
) -> None:
    """The threshold is set low, not the artifact large: 12 MiB in two parts of 10 MiB
    (the smallest the stand-in takes), then the catalog's export, then a deployment."""
    path = tmp_path / "big.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model_repository/gpt2/config.pbtxt", 'name: "gpt2"')
        zf.writestr("model_repository/gpt2/1/model.onnx", os.urandom(12 * 2**20))
    standin.add_bucket("standinns", "artifacts")
    storage = od.object_storage_client(
        auth, standin.url, retry_strategy=oci.retry.NoneRetryStrategy()
    )
    model = od.create_model(
        client, compartment_id=COMPARTMENT, project_id=PROJECT, display_name="big"
    )
    kwargs = dict(storage=storage, namespace="standinns", region="us-ashburn-1", poll_s=0.01)
    with pytest.raises(TutorialError, match="it goes through Object Storage. Set ARTIFACT_BUCKET"):
        od.upload_artifact_by_size(client, model.id, path, limit_bytes=2**20)
    done = od.upload_artifact_by_size(
        client,
        model.id,
        path,
        bucket="artifacts",
        limit_bytes=2**20,
        part_bytes=10 * 2**20,
        **kwargs,
    )
    assert done["route"] == "object_storage" and done["bytes"] == path.stat().st_size
    operations = standin.operations()
    assert operations.count("upload_part") == 2
    assert "create_model_artifact" not in operations
    assert operations[-1:] == ["delete_object"]  # the staged copy is removed
    artifact = standin.models[model.id]["artifact"]
    assert artifact["route"] == "object_storage"
    assert Path(artifact["path"]).read_bytes() == path.read_bytes()
    assert standin.buckets[("standinns", "artifacts")]["objects"] == {}
    deployment = deploy(client, model.id)
    assert deployment.lifecycle_state == "ACTIVE"
    # below the limit: straight to the catalog
    small = od.create_model(
        client, compartment_id=COMPARTMENT, project_id=PROJECT, display_name="s"
    )
    assert od.upload_artifact_by_size(client, small.id, path, **kwargs)["route"] == "direct"


def test_parts_below_10_mib_are_refused(auth: od.OciAuth, standin: OciStandIn, tmp_path: Path):
    path = tmp_path / "a.bin"
    path.write_bytes(os.urandom(3 * 2**20))
    standin.add_bucket("standinns", "artifacts")
    storage = od.object_storage_client(
        auth, standin.url, retry_strategy=oci.retry.NoneRetryStrategy()
    )
    manager = oci.object_storage.UploadManager(storage, allow_parallel_uploads=False)
    with pytest.raises(oci.exceptions.ServiceError) as err:
        manager.upload_file("standinns", "artifacts", "a.bin", str(path), part_size=2**20)
    assert err.value.status == 400 and "at least 10 MiB" in err.value.message

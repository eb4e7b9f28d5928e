"""OCI Data Science: the model in the catalog, the Triton deployment, signed /predict, clean up.

Notebook 06 calls these. Every function takes the SDK client it works with, so tests point the
real SDK at a loopback stand-in (``service_endpoint=``) and the same code runs against OCI.
The OCI SDK is imported inside the functions: importing this module costs nothing.

Limits this module enforces on the client side, so a learner sees a clear message instead of a
bare HTTP error (OCI Data Science documentation: model deployment limits and BYOC rules):

- BYOC: ports 1024-65535 except 24224, 8446 and 8447; environment variables under 2048 bytes in
  total, keys under 32 characters (letters, digits and ``_``, starting with a letter).
- ``/predict``: at most 10 MB of payload and 60 s per call (not adjustable); HTTP 429 when the
  load balancer's bandwidth is exceeded, retried here with a bounded exponential backoff.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tutorial.common import TutorialError
from tutorial.repository import OCI_REPOSITORY_PATH

#: Env var OCI sets inside notebook sessions (and jobs): a resource principal is available.
RESOURCE_PRINCIPAL_ENV = "OCI_RESOURCE_PRINCIPAL_VERSION"
#: Freeform tag every resource of this tutorial carries, so the cleanup helper can find them.
TUTORIAL_TAG = {"tutorial": "gpt2-triton"}
#: The Console refuses artifacts above this size; the SDK takes up to 6 GB.
CONSOLE_UPLOAD_LIMIT_BYTES = 100 * 1024 * 1024
PREDICT_PAYLOAD_LIMIT_BYTES = 10 * 1024 * 1024
PREDICT_TIME_LIMIT_S = 60
#: BYOC: server and health-check ports must avoid these (the service uses them).
RESERVED_PORTS = (24224, 8446, 8447)
ENV_TOTAL_LIMIT_BYTES = 2048
ENV_KEY_LIMIT_CHARS = 32
UPLOAD_CHUNK_BYTES = 1024 * 1024
FAILED_STATES = ("FAILED", "NEEDS_ATTENTION")


class DeploymentFailed(TutorialError):
    """The deployment ended FAILED; the message carries lifecycle_details and where logs are."""


# --------------------------------------------------------------------------------------------
# Authentication


@dataclass
class OciAuth:
    """How this session talks to OCI: ``kind`` is ``resource_principal`` or ``api_key``."""

    kind: str
    config: dict[str, Any]
    signer: Any

    @property
    def region(self) -> str | None:
        """The region the clients talk to."""
        return self.config.get("region")

    def describe(self) -> str:
        """One line for the notebook (no secrets: kind, region and the key's fingerprint)."""
        if self.kind == "resource_principal":
            return f"resource principal of this notebook session, region {self.region}"
        return (
            f"API key (fingerprint {self.config.get('fingerprint')}) from "
            f"{self.config.get('_source')}, region {self.region}"
        )


def oci_auth(config_file: str | Path = "~/.oci/config", profile: str = "DEFAULT") -> OciAuth:
    """Authenticate: a resource principal inside an OCI notebook session, else an API-key config.

    A notebook session is detected from ``OCI_RESOURCE_PRINCIPAL_VERSION`` in the environment.
    Raises :class:`TutorialError` saying what is missing when neither works.
    """
    import oci

    if os.environ.get(RESOURCE_PRINCIPAL_ENV):
        try:
            signer = oci.auth.signers.get_resource_principals_signer()
        except Exception as exc:  # the SDK raises many kinds here
            raise TutorialError(
                f"{RESOURCE_PRINCIPAL_ENV} is set, so this looks like an OCI notebook session, "
                f"but the resource principal signer failed: {exc}. Check that the session's "
                "dynamic group has the policies in the README (IAM policies)."
            ) from exc
        region = getattr(signer, "region", None) or os.environ.get("OCI_RESOURCE_PRINCIPAL_REGION")
        return OciAuth("resource_principal", {"region": region}, signer)

    path = Path(config_file).expanduser()
    try:
        config = oci.config.from_file(str(path), profile)
        oci.config.validate_config(config)
        signer = oci.signer.Signer.from_config(config)
    except (oci.exceptions.ClientError, ValueError, OSError) as exc:
        raise TutorialError(
            f"No OCI credentials: not in a notebook session ({RESOURCE_PRINCIPAL_ENV} is not set) "
            f"and the API-key config {path} [profile {profile}] is not usable "
            f"({type(exc).__name__}: {exc}). Run this notebook in an OCI Data Science notebook "
            "session, or create an API key and config file "
            "(https://docs.oracle.com/en-us/iaas/Content/API/Concepts/sdkconfig.htm) and set "
            "OCI_CONFIG_FILE / OCI_PROFILE."
        ) from exc
    config = dict(config, _source=f"{path} [{profile}]")
    return OciAuth("api_key", config, signer)


def try_oci_auth(
    config_file: str | Path = "~/.oci/config", profile: str = "DEFAULT"
) -> tuple[OciAuth | None, str]:
    """Like :func:`oci_auth`, but returns ``(None, why)`` instead of raising (notebook flag)."""
    try:
        auth = oci_auth(config_file, profile)
    except TutorialError as exc:
        return None, str(exc)
    return auth, f"Authenticated with the {auth.describe()}."


def data_science_client(
    auth: OciAuth,
    service_endpoint: str | None = None,
    *,
    retry_strategy: Any = None,
    timeout: tuple[float, float] = (10.0, 300.0),
) -> Any:
    """A ``DataScienceClient`` for ``auth``; ``service_endpoint`` overrides the region's endpoint.

    The read timeout is long because the service answers the artifact upload only after it
    has stored the whole zip.
    """
    import oci

    kwargs: dict[str, Any] = {"signer": auth.signer, "timeout": timeout}
    if service_endpoint:
        kwargs["service_endpoint"] = service_endpoint
    if retry_strategy is not None:
        kwargs["retry_strategy"] = retry_strategy
    config = {k: v for k, v in auth.config.items() if not k.startswith("_")}
    return oci.data_science.DataScienceClient(config, **kwargs)


def _service_error(exc: Exception, what: str) -> TutorialError:
    """Turn an ``oci.exceptions.ServiceError`` into a message that says what to do."""
    status = getattr(exc, "status", None)
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", str(exc))
    hint = {
        400: "the request was refused as invalid; the message says which field.",
        401: "the request signature was refused: check the API key, its fingerprint and the "
        "config file (or the session's resource principal).",
        404: "not found or not authorized: check the OCIDs and the IAM policies in the README.",
        409: "the resource is in a state that does not allow this yet.",
        429: "too many requests: wait a minute and run the cell again.",
    }.get(status or 0, "see the message.")
    return TutorialError(f"{what} failed: HTTP {status} {code}: {message} ({hint})")


# --------------------------------------------------------------------------------------------
# Model catalog


def create_model(
    client: Any,
    *,
    compartment_id: str,
    project_id: str,
    display_name: str,
    description: str = "",
    freeform_tags: dict[str, str] | None = None,
) -> Any:
    """Create a model in the catalog (no artifact yet) and return it (``oci...models.Model``)."""
    import oci
    from oci.data_science.models import CreateModelDetails

    details = CreateModelDetails(
        compartment_id=compartment_id,
        project_id=project_id,
        display_name=display_name,
        description=description or None,
        freeform_tags=dict(freeform_tags or TUTORIAL_TAG),
    )
    try:
        return client.create_model(details).data
    except oci.exceptions.ServiceError as exc:
        raise _service_error(exc, "create_model") from exc


class ProgressReader:
    """A read-only file wrapper that reports progress and never returns more than one chunk.

    ``create_model_artifact`` is signed without the body headers (like Object Storage
    uploads), so the SDK reads the stream once, while sending it. Reads are capped at
    ``chunk`` bytes, so memory stays flat whatever the artifact's size; if the SDK retries
    and rewinds, the bar starts again.
    """

    def __init__(self, path: Path, chunk: int = UPLOAD_CHUNK_BYTES, bar: Any = None) -> None:
        from tqdm import tqdm

        self._file = open(path, "rb")  # closed by close()
        self.size = path.stat().st_size
        self.chunk = chunk
        self.max_read = 0
        self.passes = 0
        self.bar = bar or tqdm(
            total=self.size, unit="B", unit_scale=True, unit_divisor=1024, desc="uploading"
        )

    def read(self, size: int = -1) -> bytes:
        """Read at most one chunk."""
        if size is None or size < 0 or size > self.chunk:
            size = self.chunk
        start = self._file.tell()
        data = self._file.read(size)
        if data and start == 0:
            self.passes += 1
            if self.passes > 1:
                self.bar.reset(total=self.size)
                self.bar.set_description(f"uploading (retry {self.passes - 1})")
        self.max_read = max(self.max_read, len(data))
        self.bar.update(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        """Rewind (the SDK does this between its hashing pass and the upload)."""
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        """Current position."""
        return self._file.tell()

    def __len__(self) -> int:
        return self.size

    def close(self) -> None:
        """Close the file and the bar."""
        self._file.close()
        self.bar.close()


def upload_artifact(client: Any, model_id: str, zip_path: str | Path) -> dict[str, Any]:
    """Upload the artifact zip to the model as a stream, with a progress bar.

    The file is never read into memory (the Console's limit is 100 MB; the SDK takes up to
    6 GB this way). Returns ``{"bytes": ..., "max_read": ...}``.
    """
    import oci

    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise TutorialError(
            f"No artifact zip at {zip_path}: run notebooks/03_model_repository.ipynb first."
        )
    reader = ProgressReader(zip_path)
    try:
        client.create_model_artifact(
            model_id,
            reader,
            content_length=reader.size,
            content_disposition=f"attachment; filename={zip_path.name}",
        )
    except oci.exceptions.ServiceError as exc:
        raise _service_error(exc, "create_model_artifact") from exc
    finally:
        reader.close()
    return {"bytes": reader.size, "max_read": reader.max_read}


def delete_model(client: Any, model_id: str) -> None:
    """Delete a model from the catalog (its deployments must be deleted first)."""
    import oci

    try:
        client.delete_model(model_id)
    except oci.exceptions.ServiceError as exc:
        if exc.status == 404:
            return
        raise _service_error(exc, "delete_model") from exc


# --------------------------------------------------------------------------------------------
# The deployment request


def triton_command(port: int = 8000, repository: str = OCI_REPOSITORY_PATH) -> list[str]:
    """The container command: Triton on the repository OCI unpacked from the artifact.

    Every model loads at start, and a model that fails to load stops the server, so a broken
    artifact fails the deployment at once instead of serving half a pipeline. The tests and
    notebook 04 serve the artifact zip with this same command (``serve_artifact``).
    """
    return [
        "tritonserver",
        f"--model-repository={repository}",
        "--model-control-mode=none",
        "--strict-readiness=true",
        "--exit-on-error=true",
        f"--http-port={port}",
    ]


def validate_byoc(
    server_port: Any, health_check_port: Any, environment_variables: dict[str, Any]
) -> None:
    """Check OCI's bring-your-own-container rules before sending the request."""
    problems = []
    for name, port in (("server_port", server_port), ("health_check_port", health_check_port)):
        if (
            not isinstance(port, int)
            or isinstance(port, bool)
            or not 1024 <= port <= 65535
            or port in RESERVED_PORTS
        ):
            problems.append(
                f"{name}={port!r}: ports must be integers in 1024-65535, except 24224, 8446 "
                "and 8447"
            )
    total = 0
    for key, value in environment_variables.items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", key):
            problems.append(
                f"environment variable {key!r}: keys must start with a letter and hold only "
                "letters, digits and _"
            )
        elif len(key) >= ENV_KEY_LIMIT_CHARS:
            problems.append(
                f"environment variable {key!r}: {len(key)} characters; keys must be shorter "
                f"than {ENV_KEY_LIMIT_CHARS}"
            )
        if not isinstance(value, str):
            problems.append(f"environment variable {key!r}: the value must be a string")
            value = str(value)
        total += len(str(key).encode()) + len(value.encode())
    if total >= ENV_TOTAL_LIMIT_BYTES:
        problems.append(
            f"environment variables take {total} bytes; the limit is {ENV_TOTAL_LIMIT_BYTES} "
            "bytes in total (keys and values)"
        )
    if problems:
        raise TutorialError(
            "The deployment breaks OCI's bring-your-own-container rules:\n  - "
            + "\n  - ".join(problems)
        )


def deployment_request(
    *,
    display_name: str,
    compartment_id: str,
    project_id: str,
    model_id: str,
    image: str,
    image_digest: str,
    shape: str = "VM.GPU.A10.1",
    ocpus: float | None = None,
    memory_in_gbs: float | None = None,
    instance_count: int = 1,
    autoscaling_max_instances: int = 0,
    bandwidth_mbps: int = 10,
    cmd: list[str] | None = None,
    server_port: int = 8000,
    environment_variables: dict[str, str] | None = None,
    log_group_id: str = "",
    access_log_id: str = "",
    predict_log_id: str = "",
    freeform_tags: dict[str, str] | None = None,
    description: str = "",
) -> Any:
    """Build the ``CreateModelDeploymentDetails`` for Triton in a BYOC container.

    Flex shapes (``*.Flex``, CPU) take ``ocpus`` and ``memory_in_gbs``; other shapes must not.
    ``autoscaling_max_instances > instance_count`` adds a CPU-utilization autoscaling policy,
    otherwise the pool has a fixed size. Access and predict logs are attached when their ids
    are given (they are the only place Triton's own output shows up). Checks the BYOC rules.
    """
    from oci.data_science import models as m

    env = {"CONTAINER_TYPE": "TRITON", **(environment_variables or {})}
    validate_byoc(server_port, server_port, env)
    if not image or not image_digest:
        raise TutorialError(
            "No image: run notebooks/05_build_push_image.ipynb (it records the image reference "
            "and digest) or set IMAGE and IMAGE_DIGEST."
        )

    if shape.endswith(".Flex"):
        if not ocpus or not memory_in_gbs:
            raise TutorialError(
                f"{shape} is a Flex shape: give it OCPUs and memory (ocpus=, memory_in_gbs=)."
            )
        shape_config = m.ModelDeploymentInstanceShapeConfigDetails(
            ocpus=float(ocpus), memory_in_gbs=float(memory_in_gbs)
        )
    else:
        if ocpus or memory_in_gbs:
            raise TutorialError(
                f"{shape} has a fixed size: OCPUs and memory apply to Flex shapes only."
            )
        shape_config = None
    if instance_count < 1:
        raise TutorialError(f"instance_count={instance_count}: a deployment needs 1 or more.")

    if autoscaling_max_instances > instance_count:

        def threshold(value: int) -> Any:
            return m.PredefinedExpressionThresholdScalingConfiguration(
                scaling_configuration_type="THRESHOLD",
                threshold=value,
                instance_count_adjustment=1,
                pending_duration="PT5M",
            )

        scaling_policy = m.AutoScalingPolicy(
            policy_type="AUTOSCALING",
            is_enabled=True,
            cool_down_in_seconds=600,
            auto_scaling_policies=[
                m.ThresholdBasedAutoScalingPolicyDetails(
                    auto_scaling_policy_type="THRESHOLD",
                    minimum_instance_count=instance_count,
                    initial_instance_count=instance_count,
                    maximum_instance_count=autoscaling_max_instances,
                    rules=[
                        m.PredefinedMetricExpressionRule(
                            metric_expression_rule_type="PREDEFINED_EXPRESSION",
                            metric_type="CPU_UTILIZATION",
                            scale_out_configuration=threshold(70),
                            scale_in_configuration=threshold(30),
                        )
                    ],
                )
            ],
        )
    else:
        scaling_policy = m.FixedSizeScalingPolicy(
            policy_type="FIXED_SIZE", instance_count=instance_count
        )

    category_log_details = None
    if access_log_id or predict_log_id:
        if not log_group_id:
            raise TutorialError("Logs need their log group: set LOG_GROUP_OCID too.")
        category_log_details = m.CategoryLogDetails(
            access=m.LogDetails(log_id=access_log_id, log_group_id=log_group_id)
            if access_log_id
            else None,
            predict=m.LogDetails(log_id=predict_log_id, log_group_id=log_group_id)
            if predict_log_id
            else None,
        )

    return m.CreateModelDeploymentDetails(
        display_name=display_name,
        description=description or None,
        compartment_id=compartment_id,
        project_id=project_id,
        freeform_tags=dict(freeform_tags or TUTORIAL_TAG),
        category_log_details=category_log_details,
        model_deployment_configuration_details=m.SingleModelDeploymentConfigurationDetails(
            deployment_type="SINGLE_MODEL",
            model_configuration_details=m.ModelConfigurationDetails(
                model_id=model_id,
                bandwidth_mbps=bandwidth_mbps,
                instance_configuration=m.InstanceConfiguration(
                    instance_shape_name=shape,
                    model_deployment_instance_shape_config_details=shape_config,
                ),
                scaling_policy=scaling_policy,
            ),
            environment_configuration_details=m.OcirModelDeploymentEnvironmentConfigurationDetails(
                environment_configuration_type="OCIR_CONTAINER",
                image=image,
                image_digest=image_digest,
                cmd=list(cmd or triton_command(server_port)),
                server_port=server_port,
                health_check_port=server_port,
                environment_variables=env,
            ),
        ),
    )


def request_json(details: Any) -> str:
    """The JSON body the SDK sends for an SDK model object (camelCase keys, no nulls)."""

    def wire(value: Any) -> Any:
        if hasattr(value, "swagger_types") and hasattr(value, "attribute_map"):
            return {
                value.attribute_map[name]: wire(getattr(value, name))
                for name in value.swagger_types
                if getattr(value, name) is not None
            }
        if isinstance(value, dict):
            return {k: wire(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [wire(v) for v in value]
        return value

    return json.dumps(wire(details), indent=2)


# --------------------------------------------------------------------------------------------
# Deployment life cycle


def create_deployment(client: Any, details: Any) -> tuple[Any, str]:
    """Send the create request; return ``(deployment, work_request_id)``."""
    import oci

    try:
        response = client.create_model_deployment(details)
    except oci.exceptions.ServiceError as exc:
        raise _service_error(exc, "create_model_deployment") from exc
    return response.data, response.headers.get("opc-work-request-id", "")


def wait_for_work_request(
    client: Any,
    work_request_id: str,
    *,
    poll_s: float = 30.0,
    timeout_s: float = 3600.0,
    desc: str = "work request",
) -> Any:
    """Poll a work request until it ends, showing ``percent_complete``; return it."""
    import oci
    from tqdm import tqdm

    deadline = time.monotonic() + timeout_s
    bar_format = "{l_bar}{bar}| {n:.0f}% [{elapsed}{postfix}]"
    with tqdm(total=100, desc=desc, unit="%", bar_format=bar_format) as bar:
        while True:
            try:
                work_request = client.get_work_request(work_request_id).data
            except oci.exceptions.ServiceError as exc:
                raise _service_error(exc, "get_work_request") from exc
            bar.update(max(0.0, float(work_request.percent_complete or 0) - bar.n))
            bar.set_postfix_str(work_request.status)
            if work_request.status in ("SUCCEEDED", "FAILED", "CANCELED"):
                return work_request
            if time.monotonic() > deadline:
                raise TutorialError(
                    f"Work request {work_request_id} is still {work_request.status} after "
                    f"{timeout_s:.0f} s. It keeps running in OCI: check it in the Console "
                    "(Data Science > project > Model deployments > Work requests) and run the "
                    "Clean up section when you are done."
                )
            time.sleep(poll_s)


def _logs_hint(deployment: Any) -> str:
    logs = getattr(deployment, "category_log_details", None)
    where = []
    for kind in ("predict", "access"):
        detail = getattr(logs, kind, None) if logs else None
        if detail and detail.log_id:
            where.append(f"{kind} log {detail.log_id} (log group {detail.log_group_id})")
    if where:
        return (
            "Triton's own output is in the "
            + " and the ".join(where)
            + ": Console > Observability & Management > Logging > Logs, or "
            "`oci logging-search search-logs`."
        )
    return (
        "No logs are attached to this deployment, so this message is all OCI reports: create "
        "a log group with a predict and an access log, set LOG_GROUP_OCID, PREDICT_LOG_OCID "
        "and ACCESS_LOG_OCID, and deploy again to see Triton's output (README, Troubleshooting)."
    )


def wait_for_deployment(
    client: Any,
    deployment_id: str,
    work_request_id: str,
    *,
    poll_s: float = 30.0,
    timeout_s: float = 3600.0,
) -> Any:
    """Wait until the deployment is ACTIVE (following its work request); return it.

    Raises :class:`DeploymentFailed` with ``lifecycle_details`` and where the logs are.
    """
    import oci

    if work_request_id:
        wait_for_work_request(
            client, work_request_id, poll_s=poll_s, timeout_s=timeout_s, desc="deploying"
        )
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            deployment = client.get_model_deployment(deployment_id).data
        except oci.exceptions.ServiceError as exc:
            raise _service_error(exc, "get_model_deployment") from exc
        state = deployment.lifecycle_state
        if state == "ACTIVE":
            return deployment
        if state in FAILED_STATES or state in ("DELETING", "DELETED", "INACTIVE"):
            raise DeploymentFailed(
                f"Model deployment {deployment_id} is {state}: "
                f"{(deployment.lifecycle_details or '(no lifecycle_details)').rstrip('.')}. "
                + _logs_hint(deployment)
                + " The deployment still exists: the Clean up section deletes it."
            )
        if time.monotonic() > deadline:
            raise TutorialError(
                f"Model deployment {deployment_id} is still {state} after {timeout_s:.0f} s."
            )
        time.sleep(poll_s)


def delete_deployment(
    client: Any, deployment_id: str, *, poll_s: float = 30.0, timeout_s: float = 3600.0
) -> None:
    """Delete a deployment and wait until it is DELETED (so its model can be deleted)."""
    import oci

    try:
        response = client.delete_model_deployment(deployment_id)
    except oci.exceptions.ServiceError as exc:
        if exc.status == 404:
            return
        raise _service_error(exc, "delete_model_deployment") from exc
    work_request_id = response.headers.get("opc-work-request-id")
    if work_request_id:
        work_request = wait_for_work_request(
            client, work_request_id, poll_s=poll_s, timeout_s=timeout_s, desc="deleting"
        )
        if work_request.status != "SUCCEEDED":
            raise TutorialError(
                f"Deleting {deployment_id} ended {work_request.status}: delete it in the Console."
            )


# --------------------------------------------------------------------------------------------
# Inference


def predict(
    url: str,
    payload: dict[str, Any],
    signer: Any,
    *,
    model_name: str,
    model_version: str = "1",
    timeout_s: float = PREDICT_TIME_LIMIT_S,
    max_retries: int = 5,
    backoff_s: float = 1.0,
    max_backoff_s: float = 30.0,
    session: Any = None,
) -> dict[str, Any]:
    """POST a KServe v2 payload to a deployment's signed ``/predict`` and return the JSON answer.

    ``url`` is ``<model_deployment_url>/predict``. The Triton model is chosen by headers
    (``model_name``/``model_version`` as the public samples send them, and the dash forms
    oracle-ads sends). Checks the 10 MB payload limit before sending, stops waiting after
    ``timeout_s`` (the service cuts every call at 60 s), and retries HTTP 429 at most
    ``max_retries`` times with exponential backoff (honouring ``Retry-After``).
    """
    import requests

    body = json.dumps(payload).encode("utf-8")
    if len(body) > PREDICT_PAYLOAD_LIMIT_BYTES:
        raise TutorialError(
            f"The payload is {len(body):,} bytes; OCI Model Deployment accepts at most "
            f"{PREDICT_PAYLOAD_LIMIT_BYTES:,} bytes (10 MB) per /predict call: send less per call."
        )
    headers = {
        "Content-Type": "application/json",
        "model_name": model_name,
        "model_version": str(model_version),
        "model-name": model_name,
        "model-version": str(model_version),
    }
    http = session or requests
    for attempt in range(max_retries + 1):
        try:
            response = http.post(url, data=body, headers=headers, auth=signer, timeout=timeout_s)
        except requests.Timeout as exc:
            raise TutorialError(
                f"No answer from {url} within {timeout_s:g} s. OCI ends every /predict call at "
                f"{PREDICT_TIME_LIMIT_S} s (not adjustable): make each call do less work (fewer "
                "tokens per call), and check the deployment's predict log."
            ) from exc
        except requests.ConnectionError as exc:
            raise TutorialError(f"Could not reach {url}: {exc}") from exc
        if response.status_code != 429 or attempt == max_retries:
            break
        delay = min(max_backoff_s, backoff_s * 2**attempt)
        retry_after = response.headers.get("Retry-After", "")
        if retry_after.isdigit():
            delay = min(max_backoff_s, float(retry_after))
        time.sleep(delay)
    if response.status_code == 429:
        raise TutorialError(
            f"HTTP 429 Too Many Requests from {url}, still after {max_retries} retries. The "
            "deployment's load balancer bandwidth (BANDWIDTH_MBPS) or the tenancy's 150 "
            "requests/s is exceeded: send fewer requests or raise the bandwidth."
        )
    if response.status_code == 401:
        raise TutorialError(
            f"HTTP 401 from {url}: the request signature was refused. Check the API key and "
            "config (or, in a notebook session, the policy that lets its dynamic group "
            "use model deployments)."
        )
    if response.status_code != 200:
        raise TutorialError(
            f"HTTP {response.status_code} from {url} ({model_name} v{model_version}): "
            f"{response.text[:500]}"
        )
    return response.json()


def output_by_name(result: dict[str, Any], name: str) -> list[Any]:
    """The ``data`` of one named output in a KServe v2 answer."""
    for output in result.get("outputs", []):
        if output.get("name") == name:
            return output["data"]
    names = [o.get("name") for o in result.get("outputs", [])]
    raise TutorialError(f"No output {name!r} in the answer (outputs: {names}).")


# --------------------------------------------------------------------------------------------
# Finding and removing this tutorial's resources


def find_tutorial_resources(
    client: Any,
    compartment_id: str,
    *,
    project_id: str | None = None,
    tag: dict[str, str] | None = None,
    name_prefix: str | None = None,
) -> list[dict[str, Any]]:
    """List this tutorial's live deployments and models (by freeform tag or name prefix)."""
    import oci

    tag = TUTORIAL_TAG if tag is None else tag
    kwargs: dict[str, Any] = {"compartment_id": compartment_id}
    if project_id:
        kwargs["project_id"] = project_id

    def ours(item: Any) -> bool:
        tags = item.freeform_tags or {}
        by_tag = bool(tag) and all(tags.get(k) == v for k, v in tag.items())
        by_name = bool(name_prefix) and (item.display_name or "").startswith(name_prefix)
        return by_tag or by_name

    found = []
    for kind, operation in (
        ("model_deployment", client.list_model_deployments),
        ("model", client.list_models),
    ):
        try:
            items = oci.pagination.list_call_get_all_results(operation, **kwargs).data
        except oci.exceptions.ServiceError as exc:
            raise _service_error(exc, operation.__name__) from exc
        for item in items:
            if item.lifecycle_state != "DELETED" and ours(item):
                found.append(
                    {
                        "kind": kind,
                        "id": item.id,
                        "display_name": item.display_name,
                        "lifecycle_state": item.lifecycle_state,
                        "time_created": str(item.time_created),
                    }
                )
    return found


def cleanup_tutorial_resources(
    client: Any,
    compartment_id: str,
    *,
    project_id: str | None = None,
    tag: dict[str, str] | None = None,
    name_prefix: str | None = None,
    dry_run: bool = True,
    poll_s: float = 30.0,
    timeout_s: float = 3600.0,
) -> list[dict[str, Any]]:
    """Print this tutorial's resources; with ``dry_run=False`` delete them (deployments first).

    Returns what was found. Anything left running keeps billing.
    """
    found = find_tutorial_resources(
        client, compartment_id, project_id=project_id, tag=tag, name_prefix=name_prefix
    )
    if not found:
        print("No resources of this tutorial found.")
        return found
    verb = "Would delete" if dry_run else "Deleting"
    for item in found:
        print(
            f"{verb} {item['kind']} {item['display_name']} ({item['lifecycle_state']}) {item['id']}"
        )
    if dry_run:
        print("Dry run: nothing deleted (pass dry_run=False to delete).")
        return found
    for item in found:
        if item["kind"] == "model_deployment":
            if item["lifecycle_state"] == "DELETING":
                _wait_deleted(client, item["id"], poll_s=poll_s, timeout_s=timeout_s)
            else:
                delete_deployment(client, item["id"], poll_s=poll_s, timeout_s=timeout_s)
    for item in found:
        if item["kind"] == "model":
            delete_model(client, item["id"])
    return found


def _wait_deleted(client: Any, deployment_id: str, *, poll_s: float, timeout_s: float) -> None:
    """Poll a deployment that is already DELETING until it is gone."""
    import oci

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            state = client.get_model_deployment(deployment_id).data.lifecycle_state
        except oci.exceptions.ServiceError as exc:
            if exc.status == 404:
                return
            raise _service_error(exc, "get_model_deployment") from exc
        if state == "DELETED":
            return
        if time.monotonic() > deadline:
            raise TutorialError(f"{deployment_id} is still {state} after {timeout_s:.0f} s.")
        time.sleep(poll_s)

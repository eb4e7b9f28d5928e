"""OCI Data Science: the model in the catalog, the Triton deployment, signed /predict, clean up.

Notebook 06 calls these. Every function takes the SDK client it works with, so tests point the
real SDK at a loopback stand-in (``service_endpoint=``) and the same code runs against OCI.
The OCI SDK is imported inside the functions: importing this module costs nothing.

Rules this module checks on the client side, so a learner reads a clear message instead of a bare
HTTP 400 or a FAILED deployment (each constant below names its source in ``DOCS``):

- BYOC ports 1024-65535 except 24224, 8446 and 8447 (``DOCS["byoc"]``); environment variables
  under 2048 bytes in total, keys of 2 to 31 characters (letters, digits and ``_``, starting
  with a letter, not ending with ``_``) that are not the service's own (``DOCS["env"]``); ``cmd``
  and ``entrypoint`` under 2048 bytes together (``DOCS["sdk_env"]``).
- Flex shapes: 6 to 64 GB of memory per OCPU for model deployments (``DOCS["shapes"]``);
  autoscaling bounds (``DOCS["sdk_autoscaling"]``, ``DOCS["autoscale"]``).
- ``/predict`` (``DOCS["predict"]``): at most 10 MB of payload and 60 s per call (not
  adjustable); HTTP 429, 500 and 503 are to be retried with backoff, done here a bounded number
  of times, each retry printed; 404 ``NotAuthorizedOrNotFound`` is a missing policy or a wrong
  endpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tutorial.common import TutorialError
from tutorial.repository import OCI_REPOSITORY_PATH

#: Where each rule checked here is documented (OCI's public documentation).
DOCS = {
    "byoc": "https://docs.oracle.com/en-us/iaas/data-science/using/mod-dep-byoc.htm",
    "env": "https://docs.oracle.com/en-us/iaas/data-science/using/mod-dep-byoc-variables.htm",
    "sdk_env": "https://docs.oracle.com/en-us/iaas/tools/python/latest/api/data_science/models/"
    "oci.data_science.models.OcirModelDeploymentEnvironmentConfigurationDetails.html",
    "shapes": "https://docs.oracle.com/en-us/iaas/data-science/using/supported-shapes.htm",
    "sdk_shape_config": "https://docs.oracle.com/en-us/iaas/tools/python/latest/api/data_science/"
    "models/oci.data_science.models.ModelDeploymentInstanceShapeConfigDetails.html",
    "sdk_autoscaling": "https://docs.oracle.com/en-us/iaas/tools/python/latest/api/data_science/"
    "models/oci.data_science.models.AutoScalingPolicy.html",
    "autoscale": "https://docs.oracle.com/en-us/iaas/Content/data-science/using/"
    "autoscale-vms-custom-metrics-steps.htm",
    "predict": "https://docs.oracle.com/en-us/iaas/Content/data-science/using/"
    "model-dep-predict-endpoint.htm",
    "policies": "https://docs.oracle.com/en-us/iaas/data-science/using/model-dep-policies-auth.htm",
    "troubleshoot": "https://docs.oracle.com/en-us/iaas/Content/data-science/using/"
    "tshoot-model-deploy-byoc.htm",
    # Artifacts through Object Storage: the model catalog takes up to 400 GB that way.
    "models": "https://docs.oracle.com/en-us/iaas/data-science/using/models-about.htm",
    "sdk_export": "https://docs.oracle.com/en-us/iaas/tools/python/latest/api/data_science/"
    "client/oci.data_science.DataScienceClient.html#oci.data_science.DataScienceClient."
    "export_model_artifact",
    # oracle-ads (its ModelCatalog._export_model_artifact): artifacts over 2 GB go to a bucket,
    # then export_model_artifact, then the staged object is removed.
    "ads_large_artifact": "https://github.com/oracle/accelerated-data-science",
    "multipart": "https://docs.oracle.com/iaas/Content/Object/Tasks/usingmultipartuploads.htm",
    # Oracle's BYOC samples set the container's /dev/shm with SHM_SIZE (not on DOCS["env"]).
    "shm_sample": "https://github.com/oracle-samples/oci-data-science-ai-samples/blob/main/"
    "model-deployment/containers/nim/README.md",
    # Oracle's public Triton sample: CONTAINER_TYPE=TRITON, headers model_name / model_version.
    "triton_sample": "https://github.com/oracle-samples/oci-data-science-ai-samples/blob/main/"
    "model-deployment/containers/Triton/Deploy%20ONNX%20model%20on%20Triton.md",
}

#: Env var OCI sets inside notebook sessions (and jobs): a resource principal is available.
RESOURCE_PRINCIPAL_ENV = "OCI_RESOURCE_PRINCIPAL_VERSION"
#: Tests only: every OCI client this tutorial makes talks to this endpoint (the loopback
#: stand-in) instead of the region's. Unset for real use.
ENDPOINT_OVERRIDE_ENV = "TUTORIAL_OCI_ENDPOINT"
#: Freeform tag every resource of this tutorial carries, so the cleanup helper can find them.
TUTORIAL_TAG = {"tutorial": "gpt2-triton"}
#: The Console refuses artifacts above this size; the SDK uploads larger ones.
CONSOLE_UPLOAD_LIMIT_BYTES = 100 * 1024 * 1024
#: Above this, artifacts go through Object Storage (DOCS["models"]: up to 400 GB that way), as
#: oracle-ads does above 2 GB (DOCS["ads_large_artifact"]); below, straight to the catalog.
DIRECT_UPLOAD_LIMIT_BYTES = 2 * 1024**3
#: Multipart part size for that route (DOCS["multipart"]: parts up to 50 GiB).
OBJECT_STORAGE_PART_BYTES = 128 * 1024**2
PREDICT_PAYLOAD_LIMIT_BYTES = 10 * 1024 * 1024  # DOCS["predict"]: 413 PayloadTooLarge beyond
PREDICT_TIME_LIMIT_S = 60  # DOCS["predict"]: "A 60 second timeout ... can't be changed"
#: DOCS["predict"]: "Yes, with backoff" for these three.
RETRY_STATUSES = (429, 500, 503)
#: The policy line that lets a group call /predict (DOCS["policies"]).
PREDICT_POLICY = (
    "allow group <your-group> to {DATA_SCIENCE_MODEL_DEPLOYMENT_PREDICT} in compartment "
    "<compartment>"
)
#: BYOC: server and health-check ports must avoid these (the service uses them; DOCS["byoc"]).
RESERVED_PORTS = (24224, 8446, 8447)
ENV_TOTAL_LIMIT_BYTES = 2048  # DOCS["env"]: keys and values together
ENV_KEY_LIMIT_CHARS = 32  # DOCS["env"]: "under 32 characters"
ENV_KEY_MIN_CHARS = 2  # DOCS["env"]: "at least 2 characters"
#: DOCS["env"], "Service Provided Environment Variables": set by the service, not by you.
RESERVED_ENV_KEYS = (
    "MODEL_DEPLOYMENT_OCID",
    "MODEL_SERVING_PYTHON_VERSION",
    "TENANCY_OCID",
    "CONTAINER_CUSTOM_IMAGE",
)
#: DOCS["sdk_env"]: "The combined size of CMD and ENTRYPOINT must be less than 2048 bytes".
CMD_ENTRYPOINT_LIMIT_BYTES = 2048
#: DOCS["shapes"]: standard flexible shapes for model deployments, memory per OCPU.
FLEX_MIN_GB_PER_OCPU = 6
FLEX_MAX_GB_PER_OCPU = 64
#: DOCS["sdk_shape_config"]: (most OCPUs, most GB of memory) a model deployment may give each
#: of these Flex shapes.
FLEX_SHAPE_MAXIMA = {
    "VM.Standard.E3.Flex": (64, 1024),
    "VM.Standard.E4.Flex": (64, 1024),
    "VM.Standard3.Flex": (32, 512),
    "VM.Optimized3.Flex": (18, 256),
}
#: DOCS["sdk_autoscaling"]: the Python SDK pinned here (2.189) says "The minimum value is 300
#: seconds"; older .NET SDK pages (90.x) say 600. deployment_request uses 600, which meets both.
AUTOSCALING_MIN_COOLDOWN_S = 300
UPLOAD_CHUNK_BYTES = 1024 * 1024
#: The port docker/Dockerfile's HEALTHCHECK asks; DOCS["sdk_env"]: health_check_port is "the
#: port on which the container HEALTHCHECK would listen", so it must be this one.
IMAGE_HEALTHCHECK_PORT = 8000
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
                "dynamic group has the policies in docs/iam-policies.md."
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


def service_endpoint(explicit: str | None = None, region: str | None = None) -> str | None:
    """The endpoint to give an SDK client: ``explicit``, else ``$TUTORIAL_OCI_ENDPOINT`` (tests
    point it at the loopback stand-in; ``{region}`` in it becomes the client's region, as a
    real endpoint names its region), else ``None`` (the region's endpoint)."""
    endpoint = explicit or os.environ.get(ENDPOINT_OVERRIDE_ENV) or None
    if endpoint and "{region}" in endpoint:
        endpoint = endpoint.replace("{region}", region or "")
    return endpoint


def _client_kwargs(
    auth: OciAuth, endpoint: str | None, retry_strategy: Any, timeout: tuple[float, float]
) -> tuple[dict[str, Any], dict[str, Any]]:
    kwargs: dict[str, Any] = {"signer": auth.signer, "timeout": timeout}
    endpoint = service_endpoint(endpoint, auth.region)
    if endpoint:
        kwargs["service_endpoint"] = endpoint
    if retry_strategy is not None:
        kwargs["retry_strategy"] = retry_strategy
    config = {k: v for k, v in auth.config.items() if not k.startswith("_")}
    return config, kwargs


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

    config, kwargs = _client_kwargs(auth, service_endpoint, retry_strategy, timeout)
    return oci.data_science.DataScienceClient(config, **kwargs)


def artifacts_client(
    auth: OciAuth,
    service_endpoint: str | None = None,
    *,
    retry_strategy: Any = None,
    timeout: tuple[float, float] = (10.0, 60.0),
) -> Any:
    """An ``ArtifactsClient`` (Container Registry's API: repositories, images) for ``auth``."""
    import oci

    config, kwargs = _client_kwargs(auth, service_endpoint, retry_strategy, timeout)
    return oci.artifacts.ArtifactsClient(config, **kwargs)


def _service_error(exc: Exception, what: str) -> TutorialError:
    """Turn an ``oci.exceptions.ServiceError`` into a message that says what to do."""
    status = getattr(exc, "status", None)
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", str(exc))
    hint = {
        400: "the request was refused as invalid; the message says which field.",
        401: "the request signature was refused: check the API key, its fingerprint and the "
        "config file (or the session's resource principal).",
        404: "not found or not authorized: check the OCIDs and the IAM policies in docs/iam-policies.md.",
        409: "the resource is in a state that does not allow this yet.",
        429: "too many requests: wait a minute and run the cell again.",
    }.get(status or 0, "see the message.")
    return TutorialError(f"{what} failed: HTTP {status} {code}: {message} ({hint})")


@contextlib.contextmanager
def oci_errors(what: str):
    """Around an OCI SDK call: its ``ServiceError`` becomes a :class:`TutorialError` that says
    what failed and what to do (``with oci_errors("create_model"): client.create_model(...)``)."""
    import oci

    try:
        yield
    except oci.exceptions.ServiceError as exc:
        raise _service_error(exc, what) from exc


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
    from oci.data_science.models import CreateModelDetails

    details = CreateModelDetails(
        compartment_id=compartment_id,
        project_id=project_id,
        display_name=display_name,
        description=description or None,
        freeform_tags=dict(freeform_tags or TUTORIAL_TAG),
    )
    with oci_errors("create_model"):
        return client.create_model(details).data


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

    def __enter__(self) -> ProgressReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def upload_artifact(client: Any, model_id: str, zip_path: str | Path) -> dict[str, Any]:
    """Upload the artifact zip to the model as a stream, with a progress bar.

    The file is never read into memory (the Console's limit is 100 MB). For artifacts over
    :data:`DIRECT_UPLOAD_LIMIT_BYTES` use :func:`upload_artifact_by_size`, which goes through
    Object Storage. Returns ``{"bytes": ..., "max_read": ...}``.
    """

    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise TutorialError(
            f"No artifact zip at {zip_path}: run notebooks/03_model_repository.ipynb first."
        )
    with ProgressReader(zip_path) as reader, oci_errors("create_model_artifact"):
        client.create_model_artifact(
            model_id,
            reader,
            content_length=reader.size,
            content_disposition=f"attachment; filename={zip_path.name}",
        )
    return {"bytes": reader.size, "max_read": reader.max_read}


def object_storage_client(
    auth: OciAuth,
    service_endpoint: str | None = None,
    *,
    retry_strategy: Any = None,
    timeout: tuple[float, float] = (10.0, 300.0),
) -> Any:
    """An ``ObjectStorageClient`` for ``auth`` (the large-artifact route)."""
    import oci

    config, kwargs = _client_kwargs(auth, service_endpoint, retry_strategy, timeout)
    return oci.object_storage.ObjectStorageClient(config, **kwargs)


def upload_artifact_via_object_storage(
    client: Any,
    storage: Any,
    model_id: str,
    zip_path: str | Path,
    *,
    namespace: str,
    bucket: str,
    region: str,
    part_bytes: int = OBJECT_STORAGE_PART_BYTES,
    poll_s: float = 30.0,
    timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """Put the zip in ``bucket`` (multipart, with a progress bar), have the catalog copy it
    into the model (``export_model_artifact``, a work request: DOCS["sdk_export"]), then
    delete the staged object. Returns ``{"bytes", "object", "parts_bytes"}``."""
    import oci
    from oci.data_science.models import ArtifactExportDetailsObjectStorage as Source
    from oci.data_science.models import ExportModelArtifactDetails
    from oci.object_storage import UploadManager
    from tqdm import tqdm

    zip_path = Path(zip_path)
    size = zip_path.stat().st_size
    name = f"gpt2-triton-artifacts/{model_id}.zip"
    manager = UploadManager(storage, allow_parallel_uploads=False)
    with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc="to bucket") as bar:
        try:
            manager.upload_file(
                namespace,
                bucket,
                name,
                str(zip_path),
                part_size=part_bytes,
                progress_callback=bar.update,
            )
        except oci.exceptions.ServiceError as exc:
            raise _service_error(exc, f"Uploading to bucket {bucket!r}") from exc
    details = ExportModelArtifactDetails(
        artifact_export_details=Source(
            artifact_source_type="ORACLE_OBJECT_STORAGE",
            namespace=namespace,
            source_bucket=bucket,
            source_object_name=name,
            source_region=region,
        )
    )
    try:
        response = client.export_model_artifact(model_id, details)
    except oci.exceptions.ServiceError as exc:
        raise _service_error(exc, "export_model_artifact") from exc
    work_request = wait_for_work_request(
        client,
        response.headers["opc-work-request-id"],
        poll_s=poll_s,
        timeout_s=timeout_s,
        desc="into the catalog",
    )
    if work_request.status != "SUCCEEDED":
        raise TutorialError(
            f"The catalog could not take the artifact from oci://{bucket}@{namespace}/{name} "
            f"(work request {work_request.status}): check that the bucket is in {region} and "
            "that your group may read it. The object stays in the bucket; delete it there."
        )
    storage.delete_object(namespace, bucket, name)
    return {"bytes": size, "object": name, "part_bytes": part_bytes}


def upload_artifact_by_size(
    client: Any,
    model_id: str,
    zip_path: str | Path,
    *,
    storage: Any = None,
    namespace: str = "",
    bucket: str = "",
    region: str = "",
    limit_bytes: int = DIRECT_UPLOAD_LIMIT_BYTES,
    part_bytes: int = OBJECT_STORAGE_PART_BYTES,
    poll_s: float = 30.0,
) -> dict[str, Any]:
    """Upload the artifact straight to the catalog up to ``limit_bytes``, through Object
    Storage above it (``storage``, ``namespace``, ``bucket`` and ``region`` are needed then).
    Returns the upload's figures with ``route``: ``"direct"`` or ``"object_storage"``."""
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise TutorialError(
            f"No artifact zip at {zip_path}: run notebooks/03_model_repository.ipynb first."
        )
    size = zip_path.stat().st_size
    if size <= limit_bytes:
        return {"route": "direct", **upload_artifact(client, model_id, zip_path)}
    if storage is None or not (namespace and bucket and region):
        raise TutorialError(
            f"The artifact is {size / 1e9:.1f} GB, above {limit_bytes / 1e9:.1f} GB: it goes "
            "through Object Storage. Set ARTIFACT_BUCKET to a bucket in this region and "
            "OBJECT_STORAGE_NAMESPACE (`oci os ns get`), with a policy that lets you manage "
            "objects in it."
        )
    done = upload_artifact_via_object_storage(
        client,
        storage,
        model_id,
        zip_path,
        namespace=namespace,
        bucket=bucket,
        region=region,
        part_bytes=part_bytes,
        poll_s=poll_s,
    )
    return {"route": "object_storage", **done}


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
# What gets deployed: the artifact's own description, the shape, the image's region

#: Where notebook 03 writes the model's description inside the artifact zip.
MODEL_INFO_ENTRY = "model_repository/MODEL_INFO.json"


def artifact_model_info(zip_path: str | Path) -> dict[str, Any]:
    """``MODEL_INFO.json`` read from the artifact zip itself (what will really be deployed):
    ``variant`` (fp32 | int8), ``shapes`` ("gpu or cpu" | "cpu"), ``weights`` (real |
    random-offline). ``{}`` when the zip has none (an artifact from elsewhere)."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            if MODEL_INFO_ENTRY not in archive.namelist():
                return {}
            return json.loads(archive.read(MODEL_INFO_ENTRY))
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise TutorialError(f"Cannot read {MODEL_INFO_ENTRY} from {zip_path}: {exc}") from exc


def artifact_model_parameters(
    zip_path: str | Path, model: str = "generate_stream"
) -> dict[str, str]:
    """The ``parameters`` of one model's ``config.pbtxt`` in the artifact zip (what ships); by
    default the generation engine's (``generate_stream``: step_runner, shapes, limits)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    entry = f"model_repository/{model}/config.pbtxt"
    try:
        with zipfile.ZipFile(zip_path) as archive:
            text = archive.read(entry).decode()
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
    except (OSError, KeyError, zipfile.BadZipFile, text_format.ParseError) as exc:
        raise TutorialError(f"Cannot read {entry} from {zip_path}: {exc}") from exc
    return {key: value.string_value for key, value in config.parameters.items()}


def shm_size_for_artifact(zip_path: str | Path) -> tuple[str, str]:
    """``SHM_SIZE`` for a deployment of this artifact, and why: room in ``/dev/shm`` for the
    longest request ``generate`` accepts (``max_context_tokens``), ``shm_caches_per_step`` KV
    caches of that length (what a ``bls`` step holds there at once, measured on the local
    server), rounded up to whole GiB. With ``step_runner`` ``onnxruntime`` (the default) the
    cache never crosses ``/dev/shm``, and the size is headroom for the python backend's own
    tensors. Oracle's BYOC samples set ``SHM_SIZE`` (``DOCS["shm_sample"]``).
    """
    params = artifact_model_parameters(zip_path)
    n_layer, two, _, n_head, _, head_dim = (int(d) for d in params["empty_past_shape"].split(","))
    tokens = int(params.get("max_context_tokens", "1024"))
    copies = int(params.get("shm_caches_per_step", "8"))
    needed = tokens * n_layer * two * n_head * head_dim * 4 * copies  # fp32 cache
    gib = max(1, -(-needed // 2**30))
    why = (
        f"{tokens} tokens x {n_layer * two * n_head * head_dim * 4 // 1024} KiB of KV cache per "
        f"token x {copies} caches = {needed / 2**20:.0f} MiB, rounded up to {gib} GiB "
        f"(step_runner {params.get('step_runner', 'onnxruntime')!r})"
    )
    return f"{gib}g", why


def is_gpu_shape(shape: str) -> bool:
    """``VM.GPU.A10.1``, ``BM.GPU4.8``, ...: the shape has NVIDIA GPUs."""
    return ".GPU" in shape


#: Memory of one GPU of each GPU shape, GB (OCI's compute shapes page,
#: https://docs.oracle.com/en-us/iaas/Content/Compute/References/computeshapes.htm: A10 24 GB,
#: P100 and V100 16 GB, A100 40 GB (GPU4) or 80 GB (A100-v2), H100 80 GB, L40S 48 GB). Each GPU
#: holds the GPU models' weights: Triton places one instance of a KIND_AUTO model per GPU.
GPU_MEMORY_GB = {
    "VM.GPU.A10": 24,
    "BM.GPU.A10": 24,
    "VM.GPU2": 16,
    "BM.GPU2": 16,
    "VM.GPU3": 16,
    "BM.GPU3": 16,
    "BM.GPU4": 40,
    "BM.GPU.A100-v2": 80,
    "BM.GPU.H100": 80,
    "BM.GPU.L40S": 48,
}

#: Copies of the fp32 weights one server holds, on each GPU or in the CPU's memory: the seed
#: ensemble's ``gpt2`` and the generation engine.
SERVER_WEIGHT_COPIES = 2

#: What a server needs beside the weights and one full-context KV cache, GB: the CUDA context,
#: onnxruntime's workspace, Triton and its python stubs (an estimate, not a measurement).
SERVER_OVERHEAD_GB = 2.0


def gpu_memory_gb(shape: str) -> int | None:
    """The memory of one GPU of ``shape`` in GB, or None for a shape not in the table."""
    return next((gb for prefix, gb in GPU_MEMORY_GB.items() if shape.startswith(prefix)), None)


def memory_needed_gb(info: dict[str, Any]) -> float | None:
    """What one server of this artifact needs, GB: :data:`SERVER_WEIGHT_COPIES` copies of the
    weights (fp32, or int8 for the int8 variant's engine), one full-context KV cache and
    :data:`SERVER_OVERHEAD_GB`; None when MODEL_INFO.json has no model dims."""
    from tutorial.sizes import sizes_of

    try:
        size = sizes_of(info)
    except (KeyError, TypeError, ValueError):
        return None
    engine = size["onnx_int8"] if info.get("variant") == "int8" else size["onnx_fp32"]
    weights = size["onnx_fp32"] + (SERVER_WEIGHT_COPIES - 1) * engine
    return (weights + size["kv_full_context"]) / 1e9 + SERVER_OVERHEAD_GB


def deployment_refusals(
    info: dict[str, Any],
    shape: str,
    *,
    allow_random_weights: bool = False,
    memory_in_gbs: float | None = None,
) -> list[str]:
    """Why this artifact should not be deployed on ``shape`` (empty list: go ahead).

    - random weights (the offline stand-in) would bill a GPU or CPU shape per hour to serve
      gibberish, unless ``allow_random_weights`` says the learner means it;
    - an int8 artifact (``shapes: "cpu"``) on a GPU shape: the dynamic int8 model runs on the
      CPU, so the GPU would be paid for and idle (fp32 serves on any shape);
    - a model that does not fit: :func:`memory_needed_gb` against one GPU of the shape
      (:data:`GPU_MEMORY_GB`) or the Flex shape's ``memory_in_gbs``; the deployment would
      report ready and fail its first requests, or not start.
    """
    refusals = []
    needed = memory_needed_gb(info)
    have = gpu_memory_gb(shape) if is_gpu_shape(shape) else memory_in_gbs
    if needed is not None and have is not None and needed > have:
        where = (
            f"each GPU of {shape} has {have} GB"
            if is_gpu_shape(shape)
            else (f"{shape} is asked for {have:g} GB")
        )
        refusals.append(
            f"{info.get('size', 'The model')} needs about {needed:.1f} GB ("
            f"{SERVER_WEIGHT_COPIES} copies of its weights, a full-context KV cache and "
            f"{SERVER_OVERHEAD_GB:g} GB for the server), but {where}. Choose a larger shape "
            "(or more memory for a Flex shape), or a smaller member of the GPT-2 family."
        )
    if info.get("weights") == "random-offline" and not allow_random_weights:
        refusals.append(
            "The artifact holds RANDOM weights (notebook 01's offline stand-in, weights: "
            "random-offline): a deployment bills per hour and would generate gibberish. Run "
            "notebooks 01-03 with the real GPT-2 (MODEL_SOURCE='hub'), or set "
            "ALLOW_RANDOM_WEIGHTS = True in the parameters cell if you want to try the "
            "pipeline anyway."
        )
    if info.get("shapes") == "cpu" and is_gpu_shape(shape):
        refusals.append(
            f"The artifact is the {info.get('variant', 'int8')} variant (shapes: cpu), but "
            f"{shape} is a GPU shape: dynamic int8 runs on the CPU, so the GPU would bill and "
            "idle. Deploy it on a CPU shape (USE_GPU = False), or rebuild the artifact with "
            "MODEL_VARIANT = 'fp32' in notebook 03 (fp32 serves on any shape)."
        )
    return refusals


def region_key(region: str) -> str:
    """``us-ashburn-1`` -> ``iad`` (the OCI SDK's region table); a key stays as it is."""
    from oci.regions import REGIONS_SHORT_NAMES  # key -> region identifier

    value = (region or "").strip().lower()
    keys = {identifier: key for key, identifier in REGIONS_SHORT_NAMES.items()}
    return keys.get(value, value)


def image_region_problem(image: str, region: str | None) -> str | None:
    """Why the image cannot be deployed from ``region`` (its OCIR is another region's), or None.

    ``image`` is ``<region-key>.ocir.io/...`` (or ``<region-id>.ocir.io``); ``region`` is the
    region the Data Science client talks to.
    """
    host = (image or "").split("/", 1)[0].lower()
    if not host.endswith(".ocir.io") or not region:
        return None
    image_key = region_key(host[: -len(".ocir.io")])
    deploy_key = region_key(region)
    if image_key == deploy_key:
        return None
    return (
        f"The image is in OCIR of region '{image_key}' ({host}), but the deployment is created "
        f"in '{region}' ({deploy_key}). Container Registry is regional, and OCI documents no "
        "pull from another region's registry for model deployments. "
        f"Fix: push the image to {deploy_key}.ocir.io (notebook 05 with REGION='{deploy_key}') "
        f"and deploy that reference, or deploy in the image's region."
    )


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


def _port_problem(name: str, port: Any) -> str | None:
    if (
        not isinstance(port, int)
        or isinstance(port, bool)
        or not 1024 <= port <= 65535
        or port in RESERVED_PORTS
    ):
        return f"{name}={port!r}: ports must be integers in 1024-65535, except 24224, 8446 and 8447"
    return None


def environment_problems(environment_variables: dict[str, Any]) -> list[str]:
    """OCI's rules for a deployment's environment variables (``DOCS["env"]``), as messages."""
    problems = []
    total = 0
    for key, value in environment_variables.items():
        where = f"environment variable {key!r}"
        if not isinstance(key, str) or not key:
            problems.append(f"{where}: a key cannot be empty")
        elif len(key) < ENV_KEY_MIN_CHARS:
            problems.append(f"{where}: keys must have at least {ENV_KEY_MIN_CHARS} characters")
        elif len(key) >= ENV_KEY_LIMIT_CHARS:
            problems.append(
                f"{where}: {len(key)} characters; keys must be shorter than {ENV_KEY_LIMIT_CHARS}"
            )
        elif not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", key):
            problems.append(
                f"{where}: keys must start with a letter and hold only letters, digits and _"
            )
        elif key.endswith("_"):
            problems.append(f"{where}: keys must not end with _")
        elif key in RESERVED_ENV_KEYS:
            problems.append(f"{where}: the service sets this one itself (it cannot be overridden)")
        if not isinstance(value, str):
            problems.append(f"{where}: the value must be a string")
            value = str(value)
        elif key.upper().endswith("PORT") and value.isdigit():
            problem = _port_problem(where, int(value))
            if problem:
                problems.append(problem)
        total += len(str(key).encode()) + len(value.encode())
    if total >= ENV_TOTAL_LIMIT_BYTES:
        problems.append(
            f"environment variables take {total} bytes; the limit is {ENV_TOTAL_LIMIT_BYTES} "
            "bytes in total (keys and values)"
        )
    return problems


def validate_byoc(
    server_port: Any,
    health_check_port: Any,
    environment_variables: dict[str, Any],
    cmd: list[str] | None = None,
    entrypoint: list[str] | None = None,
) -> None:
    """Check OCI's bring-your-own-container rules before sending the request."""
    problems = [
        p
        for p in (
            _port_problem("server_port", server_port),
            _port_problem("health_check_port", health_check_port),
        )
        if p
    ]
    problems += environment_problems(environment_variables)
    size = sum(len(str(a).encode()) for a in [*(cmd or []), *(entrypoint or [])])
    if size >= CMD_ENTRYPOINT_LIMIT_BYTES:
        problems.append(
            f"cmd and entrypoint take {size} bytes together; the limit is "
            f"{CMD_ENTRYPOINT_LIMIT_BYTES} bytes"
        )
    if problems:
        raise TutorialError(
            "The deployment breaks OCI's bring-your-own-container rules:\n  - "
            + "\n  - ".join(problems)
        )


def _flex_problems(shape: str, shape_config: Any) -> list[str]:
    if not shape.endswith(".Flex"):
        if shape_config is not None:
            return [f"{shape} has a fixed size: OCPUs and memory apply to Flex shapes only."]
        return []
    ocpus = getattr(shape_config, "ocpus", None)
    memory = getattr(shape_config, "memory_in_gbs", None)
    if not ocpus or not memory:
        return [f"{shape} is a Flex shape: give it OCPUs and memory (ocpus=, memory_in_gbs=)."]
    problems = []
    if ocpus < 1:
        problems.append(f"{shape}: ocpus={ocpus:g}; at least 1 OCPU")
    if shape in FLEX_SHAPE_MAXIMA:
        most_ocpus, most_gb = FLEX_SHAPE_MAXIMA[shape]
        if ocpus > most_ocpus:
            problems.append(f"{shape}: ocpus={ocpus:g}; at most {most_ocpus} OCPUs")
        if memory > most_gb:
            problems.append(f"{shape}: memory_in_gbs={memory:g}; at most {most_gb} GB")
    if memory < FLEX_MIN_GB_PER_OCPU * ocpus:
        problems.append(
            f"{shape}: {memory:g} GB for {ocpus:g} OCPUs; model deployments need at least "
            f"{FLEX_MIN_GB_PER_OCPU} GB per OCPU ({FLEX_MIN_GB_PER_OCPU * ocpus:g} GB)"
        )
    if memory > FLEX_MAX_GB_PER_OCPU * ocpus:
        problems.append(
            f"{shape}: {memory:g} GB for {ocpus:g} OCPUs; at most {FLEX_MAX_GB_PER_OCPU} GB per "
            f"OCPU ({FLEX_MAX_GB_PER_OCPU * ocpus:g} GB)"
        )
    return problems


def _scaling_problems(policy: Any, bandwidth: Any, max_bandwidth: Any) -> list[str]:
    problems = []
    kind = getattr(policy, "policy_type", None)
    if kind == "FIXED_SIZE" and (policy.instance_count or 0) < 1:
        problems.append(f"instance_count={policy.instance_count}: a deployment needs 1 or more.")
    if kind == "AUTOSCALING":
        cool_down = policy.cool_down_in_seconds
        if cool_down is not None and cool_down < AUTOSCALING_MIN_COOLDOWN_S:
            problems.append(
                f"cool_down_in_seconds={cool_down}: at least {AUTOSCALING_MIN_COOLDOWN_S} s"
            )
        for rule in policy.auto_scaling_policies or []:
            low, start, high = (
                rule.minimum_instance_count,
                rule.initial_instance_count,
                rule.maximum_instance_count,
            )
            if None in (low, start, high) or not 1 <= low <= start <= high:
                problems.append(
                    f"instances minimum={low}, initial={start}, maximum={high}: need "
                    "1 <= minimum <= initial <= maximum"
                )
            for metric in getattr(rule, "rules", None) or []:
                scale_in = getattr(metric, "scale_in_configuration", None)
                scale_out = getattr(metric, "scale_out_configuration", None)
                limits = [getattr(c, "threshold", None) for c in (scale_in, scale_out)]
                if None in limits:
                    continue
                if not (0 < limits[0] < limits[1] <= 100):
                    problems.append(
                        f"thresholds scale-in {limits[0]} %, scale-out {limits[1]} %: need "
                        "0 < scale-in < scale-out <= 100 (percent)"
                    )
    if max_bandwidth is not None and not bandwidth < max_bandwidth <= 2 * bandwidth:
        problems.append(
            f"maximum_bandwidth_mbps={max_bandwidth}: more than bandwidth_mbps={bandwidth} and "
            "at most twice it"
        )
    return problems


def check_deployment_request(details: Any) -> Any:
    """Check a ``CreateModelDeploymentDetails`` against the rules OCI applies (module docstring)
    and return it; raise :class:`TutorialError` listing every break, before anything is sent."""
    config = details.model_deployment_configuration_details
    env = config.environment_configuration_details
    model = config.model_configuration_details
    problems: list[str] = []
    try:
        validate_byoc(
            env.server_port,
            env.health_check_port,
            env.environment_variables or {},
            env.cmd,
            env.entrypoint,
        )
    except TutorialError as exc:
        problems += [line[4:] for line in str(exc).splitlines()[1:]]
    if env.health_check_port != IMAGE_HEALTHCHECK_PORT:
        problems.append(
            f"health_check_port={env.health_check_port}: the image's HEALTHCHECK "
            f"(docker/Dockerfile) asks 127.0.0.1:{IMAGE_HEALTHCHECK_PORT}, and OCI monitors "
            "that HEALTHCHECK on the health-check port (DOCS['sdk_env']): keep SERVER_PORT = "
            f"{IMAGE_HEALTHCHECK_PORT}, or change the HEALTHCHECK line and rebuild the image"
        )
    http_ports = [a.split("=", 1)[1] for a in env.cmd or [] if a.startswith("--http-port=")]
    if http_ports and http_ports[-1] != str(env.server_port):
        problems.append(
            f"the command starts Triton on port {http_ports[-1]} but server_port is "
            f"{env.server_port}: the health check would never succeed"
        )
    if not env.image or not env.image_digest:
        problems.append(
            "no image: run notebooks/05_build_push_image.ipynb (it records the image reference "
            "and digest) or set IMAGE and IMAGE_DIGEST"
        )
    instance = model.instance_configuration
    problems += _flex_problems(
        instance.instance_shape_name, instance.model_deployment_instance_shape_config_details
    )
    problems += _scaling_problems(
        model.scaling_policy, model.bandwidth_mbps, model.maximum_bandwidth_mbps
    )
    if problems:
        raise TutorialError(
            "The deployment request breaks OCI's rules (docs/troubleshooting.md):\n  - "
            + "\n  - ".join(problems)
        )
    return details


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
    shm_size: str = "",
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
    otherwise the pool has a fixed size. ``shm_size`` (``"1g"``) sets ``SHM_SIZE``, the size of
    the container's ``/dev/shm`` (:func:`shm_size_for_artifact`). Access and predict logs are
    attached when their ids are given (they are the only place Triton's own output shows up).
    Checks OCI's rules (:func:`check_deployment_request`).
    """
    from oci.data_science import models as m

    env = {"CONTAINER_TYPE": "TRITON", **(environment_variables or {})}
    if shm_size:
        env["SHM_SIZE"] = shm_size  # DOCS["shm_sample"]
    cmd = list(cmd or triton_command(server_port))
    validate_byoc(server_port, server_port, env, cmd)
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

    details = m.CreateModelDeploymentDetails(
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
                cmd=cmd,
                server_port=server_port,
                health_check_port=server_port,
                environment_variables=env,
            ),
        ),
    )
    return check_deployment_request(details)


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
    with oci_errors("create_model_deployment"):
        response = client.create_model_deployment(details)
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
        "and ACCESS_LOG_OCID, and deploy again to see Triton's output (docs/troubleshooting.md)."
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


def predict_headers(model_name: str, model_version: str = "1") -> dict[str, str]:
    """The headers that pick the Triton model behind ``/predict`` with ``CONTAINER_TYPE=TRITON``.

    ``model_name`` / ``model_version``, with underscores, as Oracle's public Triton sample sends
    them (``DOCS["triton_sample"]``); no other spelling is documented, so none is sent.
    """
    return {"model_name": model_name, "model_version": str(model_version)}


#: What each status that OCI says to retry means (``DOCS["predict"]``).
_RETRY_MEANING = {
    429: "Too Many Requests: the deployment's load-balancer bandwidth (BANDWIDTH_MBPS) or the "
    "tenancy's 150 requests/s is exceeded: send fewer requests or raise the bandwidth",
    500: "Internal Server Error: the model server failed, or the call ran into the service's "
    "60 s limit: make each call do less work (fewer tokens per call) and read the predict log",
    503: "Service Unavailable: the model server is not answering (starting, restarting or "
    "overloaded): check the deployment's state and its predict log",
}


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
    log: Any = print,
) -> dict[str, Any]:
    """POST a KServe v2 payload to a deployment's signed ``/predict`` and return the JSON answer.

    ``url`` is ``<model_deployment_url>/predict``; :func:`predict_headers` picks the model.
    Checks the 10 MB payload limit before sending, stops waiting after ``timeout_s`` (the
    service cuts every call at 60 s), and retries HTTP 429, 500 and 503 at most ``max_retries``
    times with exponential backoff (``backoff_s * 2**attempt``, at most ``max_backoff_s``,
    or ``Retry-After``), printing each retry with ``log``.
    """
    import requests

    body = json.dumps(payload).encode("utf-8")
    if len(body) > PREDICT_PAYLOAD_LIMIT_BYTES:
        raise TutorialError(
            f"The payload is {len(body):,} bytes; OCI Model Deployment accepts at most "
            f"{PREDICT_PAYLOAD_LIMIT_BYTES:,} bytes (10 MB) per /predict call: send less per call."
        )
    headers = {"Content-Type": "application/json", **predict_headers(model_name, model_version)}
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
        status = response.status_code
        if status not in RETRY_STATUSES or attempt == max_retries:
            break
        delay = min(max_backoff_s, backoff_s * 2**attempt)
        retry_after = response.headers.get("Retry-After", "")
        if retry_after.isdigit():
            delay = min(max_backoff_s, float(retry_after))
        log(
            f"HTTP {status} from /predict ({_RETRY_MEANING[status].split(':')[0]}); retry "
            f"{attempt + 1} of {max_retries} in {delay:.2f} s"
        )
        time.sleep(delay)
    if status in RETRY_STATUSES:
        raise TutorialError(
            f"HTTP {status} from {url}, still after {max_retries} retries. "
            f"{_RETRY_MEANING[status]}."
        )
    if status == 401:
        raise TutorialError(
            f"HTTP 401 from {url}: the request signature was refused. Check the API key and "
            "config (or, in a notebook session, its resource principal)."
        )
    if status == 404:
        raise TutorialError(
            f"HTTP 404 NotAuthorizedOrNotFound from {url}: either no policy lets you call this "
            "deployment's /predict, or the endpoint is wrong (it is the deployment's "
            "model_deployment_url + '/predict', in the deployment's region, and the deployment "
            f"must be ACTIVE). The policy to add (docs/iam-policies.md): {PREDICT_POLICY}"
        )
    if status != 200:
        raise TutorialError(
            f"HTTP {status} from {url} ({model_name} v{model_version}): {response.text[:500]}"
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
# The record of every deployment notebook 06 made (state.json, section "deployments")

#: state.json's section with one entry per deployment, keyed by its OCID: a second run of
#: notebook 06 adds an entry instead of replacing the first.
DEPLOYMENTS_SECTION = "deployments"


def record_deployment(deployment_id: str, **fields: Any) -> dict[str, Any]:
    """Add ``fields`` to one deployment's entry in state.json (created if new); return it."""
    from tutorial.common import load_state, update_state

    entry = load_state().get(DEPLOYMENTS_SECTION, {}).get(deployment_id, {})
    entry = {**entry, **fields}
    update_state(DEPLOYMENTS_SECTION, **{deployment_id: entry})
    return entry


def recorded_deployments(live_only: bool = True) -> dict[str, dict[str, Any]]:
    """The deployments notebook 06 recorded, oldest first (``live_only``: not deleted)."""
    from tutorial.common import load_state

    entries = load_state().get(DEPLOYMENTS_SECTION, {})
    ordered = sorted(entries.items(), key=lambda item: str(item[1].get("created", "")))
    return {k: v for k, v in ordered if not (live_only and v.get("deleted"))}


def deployment_id_of(predict_url: str) -> str | None:
    """``.../<deployment OCID>/predict`` -> the OCID (None when the URL holds none)."""
    match = re.search(r"(ocid1\.datasciencemodeldeployment\.[^/]+)", predict_url or "")
    return match.group(1) if match else None


def recorded_predict_url(gpu: bool) -> tuple[str, str]:
    """``(predict_url, shape)`` of the newest live recorded deployment on a GPU (or CPU)
    shape; ``("", "")`` when there is none."""
    found = [e for e in recorded_deployments().values() if is_gpu_shape(e.get("shape", "")) == gpu]
    return (found[-1]["predict_url"], found[-1]["shape"]) if found else ("", "")


def deployment_variant(predict_url: str) -> str:
    """The variant (fp32 | int8) a deployment serves, from the ``MODEL_INFO.json`` of the
    artifact notebook 06 uploaded for it (recorded in state.json)."""
    deployment_id = deployment_id_of(predict_url)
    entry = recorded_deployments(live_only=False).get(deployment_id or "", {})
    variant = (entry.get("model_info") or {}).get("variant")
    if not variant:
        raise TutorialError(
            f"No record of deployment {deployment_id or predict_url} in state.json: notebook "
            "06 records each deployment with its artifact's MODEL_INFO.json. Run 06 with this "
            "TUTORIAL_WORKDIR, or set the variant by hand (OCI_CPU_VARIANT / OCI_GPU_VARIANT)."
        )
    return variant


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
    """Print this tutorial's resources; with ``dry_run=False`` delete them (deployments first,
    each named as it goes) and mark them deleted in state.json's record.

    Finds them by freeform tag (or name prefix), so deployments of every run of notebook 06
    are found, not only the last one. Returns what was found. A deployment bills until it is
    deleted.
    """
    found = find_tutorial_resources(
        client, compartment_id, project_id=project_id, tag=tag, name_prefix=name_prefix
    )
    if not found:
        print("No resources of this tutorial found.")
        return found
    verb = "Would delete" if dry_run else "Deleting"
    for item in found:
        bills = " (bills until deleted)" if item["kind"] == "model_deployment" else ""
        print(
            f"{verb} {item['kind']} {item['display_name']} ({item['lifecycle_state']}) "
            f"{item['id']}{bills}"
        )
    if dry_run:
        print("Dry run: nothing deleted (pass dry_run=False to delete).")
        return found
    recorded = recorded_deployments(live_only=False)
    for item in found:
        if item["kind"] == "model_deployment":
            if item["lifecycle_state"] == "DELETING":
                _wait_deleted(client, item["id"], poll_s=poll_s, timeout_s=timeout_s)
            else:
                delete_deployment(client, item["id"], poll_s=poll_s, timeout_s=timeout_s)
            print(f"deleted model_deployment {item['id']}")
            if item["id"] in recorded:
                record_deployment(item["id"], deleted=True)
    for item in found:
        if item["kind"] == "model":
            delete_model(client, item["id"])
            print(f"deleted model {item['id']}")
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

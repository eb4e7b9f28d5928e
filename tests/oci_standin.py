"""A loopback stand-in for OCI Data Science, Model Deployment and Container Registry's API (a
test utility, not a feature).

No public emulator covers these services, so the tests point the real OCI SDK at this server
(every SDK client takes ``service_endpoint=``) and send the tutorial's signed ``/predict``
requests to it. It runs on 127.0.0.1 (a free port, in a thread), checks what OCI checks and
answers the way OCI answers; each rule names its public source.

- Every request: the draft-cavage HTTP signature in ``Authorization`` is parsed, the signing
  string rebuilt from the listed headers and verified with the test key's public key; the
  headers OCI requires must be signed (``date``, ``(request-target)``, ``host``, and for
  POST/PUT/PATCH ``content-length``, ``content-type``, ``x-content-sha256``, except for the
  binary artifact upload, which the SDK signs without them), a signed ``x-content-sha256`` and
  ``content-length`` must match the body, the date must be within 5 minutes.
  Otherwise: 401 ``NotAuthenticated``.
- Request bodies are checked against the SDK's own model classes (``oci.data_science.models``,
  ``oci.artifacts.models``): unknown fields, wrong JSON types, missing ``[Required]`` fields
  and values outside the documented enums answer 400 with OCI's error JSON
  ``{"code": ..., "message": ...}``. So do the documented deployment rules (``RULES``): BYOC
  ports, environment variables, ``cmd`` + ``entrypoint`` size, Flex memory per OCPU,
  autoscaling bounds, bandwidth; unknown shapes, malformed images, digests and OCIDs, models
  without an artifact.
- A deployment runs what it was given. Its work request starts, in the background, the real
  local Triton (``serve_artifact``: the uploaded artifact zip unpacked read-only as
  ``/opt/ds/model/deployed_model``, the deployment's ``cmd``, no check of the zip, as OCI does
  none), waits for ``/v2/health/ready`` like OCI's health check, and only then turns ACTIVE.
  It ends FAILED, with Triton's own error lines in ``lifecycle_details``, when Triton exits;
  FAILED with "Unable to access the container image" when the image's repository is not in
  the deployment's compartment (the compartment its ``read repos`` policy names), does not
  exist in the image's region, or is in another region than the deployment (``RULES["region"]``); FAILED when Triton would not answer the health check (ports). Deleting a deployment
  stops its server; :meth:`OciStandIn.stop` stops all.
- ``POST /{md_ocid}/predict`` works as ``CONTAINER_TYPE=TRITON`` is inferred to work (Oracle's
  Triton sample; the mapping itself is not documented): it forwards the body to the
  deployment's ``/v2/models/{model_name}/versions/{model_version}/infer``. The model is picked
  by the ``model_name`` / ``model_version`` headers, the only spelling OCI documents (Oracle's
  Triton sample). What OCI does without ``model_name`` is not documented (``RULES
  ["predict_no_model"]``): the stand-in forwards such a request with an empty name, so the
  answer is Triton's own, not one it made up. Over 10 MB: 413; no Content-Length:
  411; past the time limit: 500 (the service's 60 s timeout); no predict policy: 404
  ``NotAuthorizedOrNotFound`` (``deny_predict``).
- Container Registry: ``create/list/get/delete_container_repository`` (private repositories
  in a compartment; a name is unique in the tenancy's namespace in a region: 409 otherwise).
- Images: a deployment's image must be one a push recorded (:meth:`OciStandIn.record_push`,
  from the tests' local registry round trip or a fixture), by digest or tag; the image may name
  its digest (``repo:tag@sha256:...``, RULES["image_form"]). Otherwise it FAILS with
  "Unable to access the container image" (RULES["image_exists"]).
- Large artifacts: Object Storage's ``put_object`` and multipart upload (create, parts with
  their Content-MD5 checked, commit, abort; RULES["multipart"]) into buckets a test adds
  (:meth:`OciStandIn.add_bucket`, per region), and the catalog's ``export_model_artifact``,
  which copies the object into the model's artifact in an ``EXPORT_MODEL_ARTIFACT`` work
  request (RULES["export_artifact"]).
- Regions: ``url`` is the credentials' region; ``url_for(region)`` is another region's
  endpoint. Repositories and deployments belong to the region whose endpoint created them.

Knobs for error paths: :meth:`OciStandIn.fail_next_deployment`, :meth:`OciStandIn.answer_errors`,
:meth:`OciStandIn.delay_predict`, :meth:`OciStandIn.deny_predict`. Anything it does not
implement answers 404 and is recorded in ``unhandled`` (tests assert it stays empty).
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import hashlib
import json
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DATA_SCIENCE_API = "/20190101"
ARTIFACTS_API = "/20160918"
PREDICT_PAYLOAD_LIMIT_BYTES = 10 * 1024 * 1024
MAX_CLOCK_SKEW_S = 300
#: Binary uploads OCI signs without the body headers (the SDK passes
#: ``enforce_content_headers=False`` for them, as for Object Storage uploads).
UNSIGNED_BODY_OPERATIONS = {"create_model_artifact", "put_object", "upload_part"}
#: Object Storage multipart uploads (RULES["multipart"]).
MAX_PART_NUMBER = 10_000
MAX_PART_BYTES = 50 * 2**30
MIN_PART_BYTES = 10 * 2**20  # all but the last part; see RULES["multipart"]
BOOTSTRAP_FAILED = "Errors occurred while bootstrapping the Model Deployment."
#: The port docker/Dockerfile's HEALTHCHECK asks (the image every test deployment plays).
IMAGE_HEALTHCHECK_PORT = 8000
IMAGE_ACCESS_FAILED = (
    "Unable to access the container image: Data Science found no authorized path to it in the "
    "tenancy (a missing resource principal policy, an incorrect image path, or an image that "
    "does not exist)."
)
#: Where each rule the stand-in applies is documented.
RULES = {
    "env": "https://docs.oracle.com/en-us/iaas/data-science/using/mod-dep-byoc-variables.htm",
    "byoc": "https://docs.oracle.com/en-us/iaas/data-science/using/mod-dep-byoc.htm",
    "cmd": "SDK OcirModelDeploymentEnvironmentConfigurationDetails.cmd/entrypoint: combined "
    "size under 2048 bytes",
    "flex": "https://docs.oracle.com/en-us/iaas/data-science/using/supported-shapes.htm",
    "flex_maxima": "SDK ModelDeploymentInstanceShapeConfigDetails.ocpus/memory_in_gbs: E3/E4 "
    "Flex 1-64 OCPUs and 6-1024 GB, Standard3.Flex 1-32 and 512 GB, Optimized3.Flex 1-18 and "
    "256 GB",
    "image_form": "SDK OcirModelDeploymentEnvironmentConfigurationDetails.image: "
    "'<region>.ocir.io/<registry>/<image>:<tag>' or '...:<tag>@digest'",
    "image_exists": "https://docs.oracle.com/en-us/iaas/Content/data-science/using/"
    "tshoot-model-deploy-byoc.htm: at create, Data Science checks that an authorized path to "
    "the image exists; 'the image doesn't exist' fails it",
    "multipart": "https://docs.oracle.com/iaas/Content/Object/Tasks/usingmultipartuploads.htm: "
    "part numbers 1-10,000, parts no larger than 50 GiB; a 10 MiB minimum for all but the last "
    "part is reported by third parties, not on Oracle's page: the stand-in applies it "
    "(stricter at worst)",
    "export_artifact": "SDK DataScienceClient.export_model_artifact ('Export model artifact "
    "from source to the service bucket'), ArtifactExportDetailsObjectStorage; oracle-ads "
    "uploads artifacts over 2 GB this way; https://docs.oracle.com/en-us/iaas/data-science/"
    "using/models-about.htm: up to 400 GB through Object Storage",
    "predict_no_model": "not found: OCI documents no answer for a /predict without model_name "
    "under CONTAINER_TYPE=TRITON (model-dep-invoke.htm, the Triton sample); the stand-in "
    "forwards it with the name empty, so the answer is Triton's own",
    "autoscaling": "Python SDK 2.189 AutoScalingPolicy.cool_down_in_seconds (minimum 300 s; "
    ".NET 90.x pages say 600); ThresholdBasedAutoScalingPolicyDetails (minimum <= initial <= "
    "maximum); scale-in/scale-out thresholds in percent",
    "bandwidth_min": "bandwidthMbps >= 10: kept from the first stand-in, not re-verified",
    "bandwidth": "https://docs.oracle.com/en-us/iaas/Content/data-science/using/"
    "autoscale-vms-custom-metrics-steps.htm",
    "image": "https://docs.oracle.com/en-us/iaas/Content/data-science/using/"
    "tshoot-model-deploy-byoc.htm",
    "region": "OCIR serves each region at its own endpoint (https://docs.oracle.com/iaas/"
    "Content/Registry/Concepts/registryprerequisites.htm, Availability by Region); OCI documents no cross-region pull for model "
    "deployments, so the stand-in fails one (stricter than known, not verified against OCI)",
    "healthcheck": "SDK OcirModelDeploymentEnvironmentConfigurationDetails.health_check_port: "
    "'The port on which the container HEALTHCHECK would listen'; docker/Dockerfile's "
    "HEALTHCHECK asks 127.0.0.1:8000",
    "predict": "https://docs.oracle.com/en-us/iaas/Content/data-science/using/"
    "model-dep-predict-endpoint.htm",
}
RESERVED_ENV_KEYS = {
    "MODEL_DEPLOYMENT_OCID",
    "MODEL_SERVING_PYTHON_VERSION",
    "TENANCY_OCID",
    "CONTAINER_CUSTOM_IMAGE",
}
#: RULES["flex_maxima"]: (most OCPUs, most GB) per Flex shape.
FLEX_SHAPE_MAXIMA = {
    "VM.Standard.E3.Flex": (64, 1024),
    "VM.Standard.E4.Flex": (64, 1024),
    "VM.Standard3.Flex": (32, 512),
    "VM.Optimized3.Flex": (18, 256),
}
#: Shapes Model Deployment offers (a subset; the real list comes from list_model_deployment_shapes).
KNOWN_SHAPES = {
    "VM.Standard2.1",
    "VM.Standard2.2",
    "VM.Standard2.4",
    "VM.Standard2.8",
    "VM.Standard2.16",
    "VM.Standard.E3.Flex",
    "VM.Standard.E4.Flex",
    "VM.Standard.E5.Flex",
    "VM.Standard3.Flex",
    "VM.Optimized3.Flex",
    "VM.Standard.A1.Flex",
    "VM.GPU2.1",
    "VM.GPU3.1",
    "VM.GPU3.2",
    "VM.GPU3.4",
    "VM.GPU.A10.1",
    "VM.GPU.A10.2",
    "BM.GPU.A10.4",
    "BM.GPU3.8",
    "BM.GPU4.8",
    "BM.GPU.A100-v2.8",
    "BM.GPU.H100.8",
}


class ApiError(Exception):
    """An OCI-style error answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


# --------------------------------------------------------------------------------------------
# Throwaway credentials


@dataclass
class StandInCredentials:
    """An API key written to a temporary folder, with the OCI config file that points at it."""

    config_file: Path
    profile: str
    tenancy: str
    user: str
    fingerprint: str
    region: str
    public_key: Any

    @property
    def key_id(self) -> str:
        """The ``keyId`` the SDK's signer sends."""
        return f"{self.tenancy}/{self.user}/{self.fingerprint}"


def make_test_credentials(directory: Path, profile: str = "DEFAULT") -> StandInCredentials:
    """Generate a throwaway RSA key and an OCI config file for it under ``directory``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = directory / "standin_api_key.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fingerprint = ":".join(f"{b:02x}" for b in hashlib.md5(der, usedforsecurity=False).digest())
    tenancy = "ocid1.tenancy.oc1..standintenancy"
    user = "ocid1.user.oc1..standinuser"
    region = "us-ashburn-1"
    config_file = directory / "oci_config"
    config_file.write_text(
        f"[{profile}]\nuser={user}\nfingerprint={fingerprint}\ntenancy={tenancy}\n"
        f"region={region}\nkey_file={key_file}\n"
    )
    return StandInCredentials(
        config_file, profile, tenancy, user, fingerprint, region, key.public_key()
    )


# --------------------------------------------------------------------------------------------
# Validation with the SDK's own models


def _models(module: str = "data_science") -> Any:
    import oci

    return getattr(oci, module).models


def _allowed_values(doc: str) -> list[str] | None:
    match = re.search(r"Allowed values for (?:this property|items in this list) are: ([^\n]*)", doc)
    if not match:
        return None
    return re.findall(r'"([^"]*)"', match.group(1))


def check_json(
    value: Any,
    swagger_type: str,
    path: str,
    errors: list[tuple[str, str]],
    module: str = "data_science",
) -> None:
    """Check raw JSON against an SDK type (``swagger_types`` notation); append (code, message)."""
    where = path.rstrip(".") or "body"
    if value is None:
        return
    if swagger_type == "str" or swagger_type == "datetime":
        if not isinstance(value, str):
            errors.append(("InvalidParameter", f"{where}: must be a string"))
    elif swagger_type == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            errors.append(("InvalidParameter", f"{where}: must be an integer"))
    elif swagger_type == "float":
        if not isinstance(value, int | float) or isinstance(value, bool):
            errors.append(("InvalidParameter", f"{where}: must be a number"))
    elif swagger_type == "bool":
        if not isinstance(value, bool):
            errors.append(("InvalidParameter", f"{where}: must be true or false"))
    elif swagger_type == "object":
        pass
    elif swagger_type.startswith("list["):
        if not isinstance(value, list):
            errors.append(("InvalidParameter", f"{where}: must be a list"))
            return
        inner = swagger_type[5:-1]
        for i, item in enumerate(value):
            check_json(item, inner, f"{path.rstrip('.')}[{i}].", errors, module)
    elif swagger_type.startswith("dict("):
        if not isinstance(value, dict):
            errors.append(("InvalidParameter", f"{where}: must be an object"))
            return
        inner = swagger_type[5:-1].split(",", 1)[1].strip()
        for key, item in value.items():
            check_json(item, inner, f"{path}{key}.", errors, module)
    else:
        models = _models(module)
        cls = getattr(models, swagger_type, None)
        if cls is None:
            return
        if not isinstance(value, dict):
            errors.append(("InvalidParameter", f"{where}: must be an object"))
            return
        if hasattr(cls, "get_subtype"):
            try:
                cls = getattr(models, cls.get_subtype(value))
            except KeyError as exc:
                errors.append(("MissingParameter", f"{path}{exc.args[0]}: required"))
                return
        instance = cls()
        known = set(instance.attribute_map.values())
        for key in value:
            if key not in known:
                errors.append(("InvalidParameter", f"{path}{key}: unknown field"))
        for attr, attr_type in instance.swagger_types.items():
            key = instance.attribute_map[attr]
            doc = getattr(cls, attr).__doc__ or ""
            item = value.get(key)
            if item is None:
                if "**[Required]**" in doc:
                    errors.append(("MissingParameter", f"{path}{key}: required"))
                continue
            allowed = _allowed_values(doc)
            if allowed is not None:
                items = item if isinstance(item, list) else [item]
                for one in items:
                    if isinstance(one, str) and one not in allowed:
                        errors.append(
                            (
                                "InvalidParameter",
                                f"{path}{key}: {one!r} is not one of {', '.join(allowed)}",
                            )
                        )
            check_json(item, attr_type, f"{path}{key}.", errors, module)


def _bad_port(port: int) -> bool:
    return not 1024 <= port <= 65535 or port in (24224, 8446, 8447)


def byoc_problems(env_config: Any) -> list[str]:
    """OCI's bring-your-own-container rules, written independently of the tutorial's checks:
    ports (RULES["byoc"]), environment variables (RULES["env"]), cmd + entrypoint (RULES["cmd"])."""
    problems = []
    for name in ("server_port", "health_check_port"):
        port = getattr(env_config, name)
        if port is not None and _bad_port(port):
            problems.append(
                f"{name} {port} is not allowed: use 1024-65535 except 24224, 8446 and 8447"
            )
    variables = env_config.environment_variables or {}
    size = sum(len(k.encode()) + len(v.encode()) for k, v in variables.items())
    if size >= 2048:
        problems.append(f"environmentVariables use {size} bytes; the limit is 2048")
    for key, value in variables.items():
        if (
            not 2 <= len(key) < 32
            or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", key)
            or key.endswith("_")
        ):
            problems.append(
                f"environment variable key {key!r} is invalid: 2 to 31 characters, letters, "
                "digits and underscores, starting with a letter and not ending with an underscore"
            )
        elif key in RESERVED_ENV_KEYS:
            problems.append(f"environment variable key {key!r} is reserved: the service sets it")
        elif key.upper().endswith("PORT") and value.isdigit() and _bad_port(int(value)):
            problems.append(
                f"environment variable {key}={value}: ports must be 1024-65535 except 24224, "
                "8446 and 8447"
            )
    command = [*(env_config.entrypoint or []), *(env_config.cmd or [])]
    size = sum(len(part.encode()) for part in command)
    if size >= 2048:
        problems.append(f"cmd and entrypoint use {size} bytes together; the limit is 2048")
    return problems


def _require_ocid(value: str | None, kinds: tuple[str, ...], field: str) -> None:
    if value is None:
        return
    if not any(value.startswith(f"ocid1.{kind}.") for kind in kinds):
        raise ApiError(
            400, "InvalidParameter", f"{field}: {value!r} is not an OCID of a {' or '.join(kinds)}"
        )


def _region_of_host(host: str) -> str:
    """``iad.ocir.io`` (or ``us-ashburn-1.ocir.io``) -> ``us-ashburn-1``."""
    from oci.regions import REGIONS_SHORT_NAMES  # region key -> region identifier

    name = host.lower().removesuffix(".ocir.io")
    return REGIONS_SHORT_NAMES.get(name, name)


def _http_port(command: list[str]) -> int:
    """The HTTP port Triton listens on with this command line (its default is 8000)."""
    ports = [int(a.split("=", 1)[1]) for a in command if a.startswith("--http-port=")]
    return ports[-1] if ports else 8000


# --------------------------------------------------------------------------------------------
# Containers: what a deployment runs


@dataclass
class RunningUpstream:
    """An already-running HTTP server that plays every deployment's container (API tests)."""

    url: str

    def stop(self) -> None:
        pass


def triton_container(zip_path: Path, command: list[str]) -> Any:
    """The real local Triton serving the artifact zip with the deployment's command, as OCI
    runs the container; raises ``TutorialError`` (with Triton's log) when it does not start."""
    from tutorial.triton_local import serve_artifact

    return serve_artifact(zip_path, cmd=command, check=False, runtime="bundled")


def triton_error_lines(message: str) -> str:
    """Triton's own error lines (``E1125 ... file.cc:12] text``) from a start failure, without
    the timestamp prefix; the whole message when there are none."""
    lines = [
        re.sub(r"^E\d{4} [\d:.]+\s+\d+\s+\S+\]\s*", "", line)
        for line in message.splitlines()
        if re.match(r"E\d{4} ", line)
    ]
    unique = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
    return " | ".join(unique) if unique else " ".join(message.split())


# --------------------------------------------------------------------------------------------
# The server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # idle keep-alive connections end on their own

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.standin._handle(self)  # type: ignore[attr-defined]

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


class OciStandIn:
    """The stand-in server. Use as a context manager; ``url`` is its service endpoint.

    ``triton_url``: for API-only tests, every deployment's container is this already-running
    server (no Triton is started); by default each deployment starts the real local Triton on
    its artifact zip. ``launcher(zip_path, command)`` replaces either.
    """

    def __init__(
        self,
        credentials: StandInCredentials,
        *,
        triton_url: str | None = None,
        launcher: Callable[[Path, list[str]], Any] | None = None,
        polls_to_finish: int = 3,
        page_size: int = 2,
        predict_time_limit_s: float = 60.0,
        namespace: str = "standinns",
    ) -> None:
        import oci

        from tutorial.registry import TRITON_CMD

        self.keys = {credentials.key_id: credentials.public_key}
        self.tenancy = credentials.tenancy
        #: With ``triton_url``: the container of every deployment, also of those a test puts
        #: in ``deployments`` by hand.
        self._upstream = RunningUpstream(triton_url.rstrip("/")) if triton_url else None
        if launcher is None:
            if self._upstream is not None:
                launcher = lambda zip_path, command: self._upstream  # noqa: E731
            else:
                launcher = triton_container
        self.launcher = launcher
        #: The image's CMD (docker/Dockerfile): what runs when a deployment gives no cmd.
        self.image_cmd = list(TRITON_CMD)
        self.namespace = namespace
        #: The region of ``url``; ``url_for(region)`` serves another one. Container Registry
        #: and deployments are regional: each repository and deployment keeps its region.
        self.region = credentials.region
        self.regions: dict[str, str] = {}  # repository or deployment OCID -> region
        self.pushes: dict[str, dict[str, str]] = {}  # repository OCID -> {tag: digest}
        self.polls_to_finish = polls_to_finish
        self.page_size = page_size
        self.predict_time_limit_s = predict_time_limit_s
        self.models: dict[str, dict[str, Any]] = {}
        self.deployments: dict[str, Any] = {}
        self.containers: dict[str, Any] = {}
        self.repositories: dict[str, Any] = {}
        self.work_requests: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.unhandled: list[str] = []
        self.forwarded: list[dict[str, Any]] = []
        self.lock = threading.RLock()
        self._threads: list[threading.Thread] = []
        self._fail_next: str | None = None
        self._errors: list[int] = []
        self._predict_delay_s = 0.0
        self._predict_allowed = True
        self._retry_tokens: dict[tuple[str, str], tuple[int, bytes, dict[str, str]]] = {}
        self._tmp = Path(tempfile.mkdtemp(prefix="oci-standin-"))
        # SDK clients used only for their (de)serializers; they never send anything.
        fake_config = {
            "region": credentials.region,
            "user": credentials.user,
            "tenancy": credentials.tenancy,
            "fingerprint": credentials.fingerprint,
            "key_file": str(self._tmp / "unused"),
        }
        self._sdk = {
            "data_science": oci.data_science.DataScienceClient(
                fake_config, signer=object(), service_endpoint="http://127.0.0.1:1"
            ).base_client,
            "artifacts": oci.artifacts.ArtifactsClient(
                fake_config, signer=object(), service_endpoint="http://127.0.0.1:1"
            ).base_client,
            "object_storage": oci.object_storage.ObjectStorageClient(
                fake_config, signer=object(), service_endpoint="http://127.0.0.1:1"
            ).base_client,
        }
        #: Object Storage: (namespace, bucket) -> {"region", "objects": {name: path}}
        self.buckets: dict[tuple[str, str], dict[str, Any]] = {}
        self.uploads: dict[str, dict[str, Any]] = {}  # multipart upload id -> its parts
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle of the server itself
    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: pass as ``service_endpoint``."""
        assert self._server is not None, "start() the stand-in first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def url_for(self, region: str) -> str:
        """The endpoint of ``region`` (``{region}`` in ``TUTORIAL_OCI_ENDPOINT`` becomes it)."""
        return f"{self.url}/region/{region}"

    def start(self) -> OciStandIn:
        """Listen on a free loopback port in a background thread."""
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.standin = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="oci-standin",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening, wait for work in flight, stop every container, remove the uploads."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        for entry in list(self.work_requests.values()):
            entry["stop"].set()  # every container stops with its bring-up thread
        for thread in list(self._threads):
            thread.join(timeout=300)
        with self.lock:
            containers, self.containers = list(self.containers.values()), {}
        for container in containers:  # only if a thread did not end in time
            container.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> OciStandIn:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- knobs
    def fail_next_deployment(self, lifecycle_details: str = BOOTSTRAP_FAILED) -> None:
        """The next deployment created ends FAILED with these ``lifecycle_details``."""
        self._fail_next = lifecycle_details

    def answer_errors(self, status: int, times: int) -> None:
        """The next ``times`` predict calls answer HTTP ``status`` (429, 500 or 503)."""
        self._errors = [status] * times

    def answer_429(self, times: int) -> None:
        """The next ``times`` predict calls answer HTTP 429."""
        self.answer_errors(429, times)

    def delay_predict(self, seconds: float) -> None:
        """Each predict call waits this long first (500 past ``predict_time_limit_s``)."""
        self._predict_delay_s = seconds

    def deny_predict(self, denied: bool = True) -> None:
        """No policy lets the caller use /predict: 404 NotAuthorizedOrNotFound."""
        self._predict_allowed = not denied

    def add_repository(
        self, compartment_id: str, display_name: str, region: str | None = None
    ) -> Any:
        """A container repository, as if created in the Console (tests' shortcut)."""
        with self.lock:
            return self._new_repository(
                compartment_id, display_name, "tests", region or self.region
            )

    def record_push(self, reference: str, digest: str) -> Any:
        """What a push of ``reference`` (``<key>.ocir.io/<namespace>/<repo>:<tag>``) with this
        digest leaves in OCIR: the image in its repository; a repository that does not exist
        yet is created in the tenancy's root compartment, as a push does (SDK
        ``ContainerConfiguration``). Returns the repository."""
        host, path = reference.split("/", 1)
        name, _, tag = path.partition("/")[2].partition(":")
        region = _region_of_host(host)
        with self.lock:
            repository = next(
                (
                    r
                    for r in self.repositories.values()
                    if r.display_name == name
                    and r.lifecycle_state != "DELETED"
                    and self.regions[r.id] == region
                ),
                None,
            ) or self._new_repository(self.tenancy, name, "push", region)
            self.pushes.setdefault(repository.id, {})[tag or "latest"] = digest
            return repository

    # ---- helpers for tests
    def operations(self) -> list[str]:
        """The operations called, in order (``predict`` included)."""
        return [r["operation"] for r in self.requests]

    def live(self) -> list[str]:
        """OCIDs of models and deployments that are not DELETED."""
        with self.lock:
            out = [i for i, d in self.deployments.items() if d.lifecycle_state != "DELETED"]
            out += [i for i, m in self.models.items() if m["model"].lifecycle_state != "DELETED"]
        return out

    # ---- request handling
    ROUTES = [
        ("POST", rf"{DATA_SCIENCE_API}/models", "create_model"),
        ("GET", rf"{DATA_SCIENCE_API}/models", "list_models"),
        ("POST", rf"{DATA_SCIENCE_API}/models/(?P<id>[^/]+)/artifact", "create_model_artifact"),
        ("GET", rf"{DATA_SCIENCE_API}/models/(?P<id>[^/]+)", "get_model"),
        ("DELETE", rf"{DATA_SCIENCE_API}/models/(?P<id>[^/]+)", "delete_model"),
        ("POST", rf"{DATA_SCIENCE_API}/modelDeployments", "create_model_deployment"),
        ("GET", rf"{DATA_SCIENCE_API}/modelDeployments", "list_model_deployments"),
        ("GET", rf"{DATA_SCIENCE_API}/modelDeployments/(?P<id>[^/]+)", "get_model_deployment"),
        (
            "DELETE",
            rf"{DATA_SCIENCE_API}/modelDeployments/(?P<id>[^/]+)",
            "delete_model_deployment",
        ),
        ("GET", rf"{DATA_SCIENCE_API}/workRequests/(?P<id>[^/]+)", "get_work_request"),
        ("POST", rf"{ARTIFACTS_API}/container/repositories", "create_container_repository"),
        ("GET", rf"{ARTIFACTS_API}/container/repositories", "list_container_repositories"),
        (
            "GET",
            rf"{ARTIFACTS_API}/container/repositories/(?P<id>[^/]+)",
            "get_container_repository",
        ),
        (
            "DELETE",
            rf"{ARTIFACTS_API}/container/repositories/(?P<id>[^/]+)",
            "delete_container_repository",
        ),
        ("POST", r"/(?P<id>ocid1\.datasciencemodeldeployment\.[^/]+)/predict", "predict"),
        (
            "POST",
            rf"{DATA_SCIENCE_API}/models/(?P<id>[^/]+)/actions/exportArtifact",
            "export_model_artifact",
        ),
        ("PUT", r"/n/(?P<ns>[^/]+)/b/(?P<bucket>[^/]+)/o/(?P<name>.+)", "put_object"),
        ("DELETE", r"/n/(?P<ns>[^/]+)/b/(?P<bucket>[^/]+)/o/(?P<name>.+)", "delete_object"),
        ("POST", r"/n/(?P<ns>[^/]+)/b/(?P<bucket>[^/]+)/u", "create_multipart_upload"),
        ("PUT", r"/n/(?P<ns>[^/]+)/b/(?P<bucket>[^/]+)/u/(?P<name>.+)", "upload_part"),
        ("POST", r"/n/(?P<ns>[^/]+)/b/(?P<bucket>[^/]+)/u/(?P<name>.+)", "commit_multipart_upload"),
        (
            "DELETE",
            r"/n/(?P<ns>[^/]+)/b/(?P<bucket>[^/]+)/u/(?P<name>.+)",
            "abort_multipart_upload",
        ),
    ]

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body_file, size, digest = self._read_body(h)
        parsed = urllib.parse.urlsplit(h.path)
        path = urllib.parse.unquote(parsed.path)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        region = self.region  # url_for(region): a region's own endpoint
        if match := re.fullmatch(r"/region/([a-z0-9-]+)(/.*)", path):
            region, path = match.groups()
        operation, params = "unhandled", {}
        for method, pattern, name in self.ROUTES:
            match = re.fullmatch(pattern, path)
            if match and method == h.command:
                operation, params = name, match.groupdict()
                break
        record = {"method": h.command, "path": h.path, "operation": operation}
        try:
            try:
                record["key_id"] = self._verify_signature(h, size, digest, operation)
                if operation == "unhandled":
                    self.unhandled.append(f"{h.command} {h.path}")
                    raise ApiError(
                        404, "NotAuthorizedOrNotFound", f"stand-in: no {h.command} {path}"
                    )
                token = h.headers.get("opc-retry-token")
                if token and (operation, token) in self._retry_tokens:
                    status, payload, headers = self._retry_tokens[(operation, token)]
                else:
                    handler = getattr(self, f"_op_{operation}")
                    status, payload, headers = handler(
                        h=h, body=body_file, size=size, query=query, region=region, **params
                    )
                    if token:
                        self._retry_tokens[(operation, token)] = (status, payload, headers)
            except ApiError as err:
                status = err.status
                payload = json.dumps({"code": err.code, "message": err.message}).encode()
                headers = {"Content-Type": "application/json"}
            except Exception as exc:  # a stand-in bug: answer 500 and make the test see it
                self.unhandled.append(f"{h.command} {h.path}: {type(exc).__name__}: {exc}")
                status = 500
                payload = json.dumps({"code": "InternalError", "message": repr(exc)}).encode()
                headers = {"Content-Type": "application/json"}
        finally:
            body_file.close()
        record["status"] = status
        with self.lock:
            self.requests.append(record)
        self._send(h, status, payload, headers)

    def _read_body(self, h: BaseHTTPRequestHandler) -> tuple[Any, int, str]:
        sink = tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024, dir=self._tmp)
        sha = hashlib.sha256()
        size = 0

        def take(n: int) -> None:
            nonlocal size
            while n > 0:
                chunk = h.rfile.read(min(n, 1024 * 1024))
                if not chunk:
                    break
                sha.update(chunk)
                sink.write(chunk)
                size += len(chunk)
                n -= len(chunk)

        if "chunked" in (h.headers.get("Transfer-Encoding") or "").lower():
            while True:
                length = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if length == 0:
                    h.rfile.readline()
                    break
                take(length)
                h.rfile.readline()
        else:
            take(int(h.headers.get("Content-Length") or 0))
        sink.seek(0)
        return sink, size, base64.b64encode(sha.digest()).decode()

    def _send(self, h: BaseHTTPRequestHandler, status: int, payload: bytes, headers: dict) -> None:
        h.send_response(status)
        headers = {"opc-request-id": h.headers.get("opc-request-id") or uuid.uuid4().hex, **headers}
        for name, value in headers.items():
            h.send_header(name, value)
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if payload and h.command != "HEAD":
            h.wfile.write(payload)

    def _verify_signature(
        self, h: BaseHTTPRequestHandler, size: int, digest: str, operation: str
    ) -> str:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        def reject(message: str) -> ApiError:
            return ApiError(401, "NotAuthenticated", message)

        authorization = h.headers.get("Authorization") or ""
        if not authorization.startswith("Signature "):
            raise reject("The required information to complete authentication was not provided.")
        fields = dict(re.findall(r'(\w+)="([^"]*)"', authorization[len("Signature ") :]))
        for name in ("keyId", "algorithm", "headers", "signature"):
            if name not in fields:
                raise reject(f"The Authorization header has no {name}.")
        if fields["algorithm"] != "rsa-sha256" or fields.get("version", "1") != "1":
            raise reject("Only rsa-sha256 signatures, version 1, are accepted.")
        signed = fields["headers"].lower().split()
        required = ["(request-target)", "host", "date" if "date" in signed else "x-date"]
        if h.command in ("POST", "PUT", "PATCH") and operation not in UNSIGNED_BODY_OPERATIONS:
            required += ["content-length", "content-type", "x-content-sha256"]
        missing = [name for name in required if name not in signed]
        if missing:
            raise reject(f"These headers must be signed: {', '.join(missing)}.")
        public_key = self.keys.get(fields["keyId"])
        if public_key is None:
            raise reject("The keyId is unknown (no such user, key or fingerprint).")
        lines = []
        for name in signed:
            if name == "(request-target)":
                lines.append(f"(request-target): {h.command.lower()} {h.path}")
                continue
            value = h.headers.get(name)
            if value is None:
                raise reject(f"The signed header {name} is not in the request.")
            lines.append(f"{name}: {value}")
        try:
            public_key.verify(
                base64.b64decode(fields["signature"]),
                "\n".join(lines).encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except (InvalidSignature, ValueError) as exc:
            raise reject("The signature does not match the request.") from exc
        when = email.utils.parsedate_to_datetime(h.headers.get("date") or h.headers["x-date"])
        skew = abs((dt.datetime.now(dt.timezone.utc) - when).total_seconds())
        if skew > MAX_CLOCK_SKEW_S:
            raise reject(f"The date header is {skew:.0f} s off the server's clock (limit 300 s).")
        if h.headers.get("host") != f"127.0.0.1:{h.server.server_address[1]}":
            raise reject(f"The request was signed for host {h.headers.get('host')}.")
        if "x-content-sha256" in signed:
            if h.headers["x-content-sha256"] != digest:
                raise reject("x-content-sha256 does not match the body.")
            if int(h.headers.get("content-length") or -1) != size:
                raise reject("content-length does not match the body.")
        return fields["keyId"]

    # ---- (de)serialization
    def _parse(self, body: Any, type_name: str, module: str = "data_science") -> Any:
        raw_bytes = body.read()
        try:
            raw = json.loads(raw_bytes)
        except ValueError as exc:
            raise ApiError(400, "CannotParseRequest", "The body is not valid JSON.") from exc
        errors: list[tuple[str, str]] = []
        check_json(raw, type_name, "", errors, module)
        if errors:
            raise ApiError(400, errors[0][0], "; ".join(message for _, message in errors))
        return self._sdk[module].deserialize_response_data(raw_bytes, type_name)

    def _json(self, status: int, obj: Any, **headers: str) -> tuple[int, bytes, dict[str, str]]:
        payload = json.dumps(self._sdk["data_science"].sanitize_for_serialization(obj)).encode()
        return (
            status,
            payload,
            {"Content-Type": "application/json", "etag": uuid.uuid4().hex, **headers},
        )

    @staticmethod
    def _ocid(kind: str) -> str:
        return f"ocid1.{kind}.oc1.iad.{uuid.uuid4().hex}"

    @staticmethod
    def _now() -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)

    def _page(
        self, items: list[Any], query: dict[str, str], summary: str, module: str = "data_science"
    ) -> tuple:
        for name, attr in (
            ("projectId", "project_id"),
            ("displayName", "display_name"),
            ("lifecycleState", "lifecycle_state"),
            ("id", "id"),
        ):
            if name in query:
                items = [i for i in items if getattr(i, attr) == query[name]]
        start = int(query.get("page") or 0)
        limit = int(query.get("limit") or self.page_size)
        page = items[start : start + limit]
        cls = getattr(_models(module), summary)
        summaries = []
        for item in page:
            kwargs = {k: getattr(item, k) for k in cls().swagger_types if hasattr(item, k)}
            summaries.append(cls(**kwargs))
        headers = {}
        if start + limit < len(items):
            headers["opc-next-page"] = str(start + limit)
        return summaries, headers

    # ---- models
    def _model(self, model_id: str) -> dict[str, Any]:
        entry = self.models.get(model_id)
        if entry is None:
            raise ApiError(404, "NotAuthorizedOrNotFound", f"Model {model_id} not found.")
        return entry

    def _op_create_model(self, *, h: Any, body: Any, **_: Any) -> tuple:
        details = self._parse(body, "CreateModelDetails")
        _require_ocid(details.compartment_id, ("compartment", "tenancy"), "compartmentId")
        _require_ocid(details.project_id, ("datascienceproject",), "projectId")
        model = _models().Model(
            id=self._ocid("datasciencemodel"),
            compartment_id=details.compartment_id,
            project_id=details.project_id,
            display_name=details.display_name or f"model{time.strftime('%Y%m%d%H%M')}",
            description=details.description,
            lifecycle_state="ACTIVE",
            time_created=self._now(),
            created_by=h.headers["Authorization"].split('keyId="')[1].split("/")[1],
            freeform_tags=details.freeform_tags or {},
            defined_tags=details.defined_tags or {},
        )
        with self.lock:
            self.models[model.id] = {"model": model, "artifact": None}
        return self._json(200, model)

    def _op_create_model_artifact(
        self, *, h: Any, body: Any, size: int, id: str, **_: Any
    ) -> tuple:
        with self.lock:
            entry = self._model(id)
            if entry["model"].lifecycle_state != "ACTIVE":
                raise ApiError(409, "IncorrectState", f"Model {id} is not ACTIVE.")
            if entry["artifact"] is not None:
                raise ApiError(
                    409,
                    "NotAuthorizedOrResourceAlreadyExists",
                    "The model already has an artifact; artifacts cannot be replaced.",
                )
            if size == 0:
                raise ApiError(400, "InvalidParameter", "The model artifact is empty.")
            path = self._tmp / f"{id}.zip"
            with open(path, "wb") as out:
                shutil.copyfileobj(body, out, 1024 * 1024)
            if not zipfile.is_zipfile(path):
                path.unlink()
                raise ApiError(400, "InvalidParameter", "The model artifact must be a zip file.")
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
            entry["artifact"] = {
                "path": path,
                "size": size,
                "sha256": h.headers["x-content-sha256"],
                "names": names,
                "content_disposition": h.headers.get("content-disposition"),
            }
        return 200, b"", {}

    def _op_get_model(self, *, id: str, **_: Any) -> tuple:
        with self.lock:
            return self._json(200, self._model(id)["model"])

    def _op_delete_model(self, *, id: str, **_: Any) -> tuple:
        with self.lock:
            model = self._model(id)["model"]
            if model.lifecycle_state == "DELETED":
                raise ApiError(404, "NotAuthorizedOrNotFound", f"Model {id} not found.")
            users = [
                d.id
                for d in self.deployments.values()
                if d.lifecycle_state != "DELETED"
                and d.model_deployment_configuration_details.model_configuration_details.model_id
                == id
            ]
            if users:
                raise ApiError(
                    409,
                    "IncorrectState",
                    f"Model {id} is used by model deployment(s) {', '.join(users)}: delete "
                    "them first.",
                )
            model.lifecycle_state = "DELETED"
        return 204, b"", {}

    def _op_list_models(self, *, query: dict[str, str], **_: Any) -> tuple:
        if "compartmentId" not in query:
            raise ApiError(400, "MissingParameter", "compartmentId is required.")
        with self.lock:
            items = [
                e["model"]
                for e in self.models.values()
                if e["model"].compartment_id == query["compartmentId"]
            ]
            summaries, headers = self._page(items, query, "ModelSummary")
            return self._json(200, summaries, **headers)

    # ---- Container Registry
    def _new_repository(
        self, compartment_id: str, display_name: str, created_by: str, region: str
    ) -> Any:
        if any(
            r.display_name == display_name
            and self.regions[r.id] == region
            and r.lifecycle_state != "DELETED"
            for r in self.repositories.values()
        ):
            raise ApiError(
                409,
                "Conflict",
                f"A repository named {display_name} already exists in namespace {self.namespace}.",
            )
        repository = _models("artifacts").ContainerRepository(
            id=self._ocid("containerrepo"),
            compartment_id=compartment_id,
            created_by=created_by,
            display_name=display_name,
            image_count=0,
            is_immutable=False,
            is_public=False,
            layer_count=0,
            layers_size_in_bytes=0,
            lifecycle_state="AVAILABLE",
            time_created=self._now(),
            billable_size_in_gbs=0,
            namespace=self.namespace,
            freeform_tags={},
            defined_tags={},
            system_tags={},
        )
        self.repositories[repository.id] = repository
        self.regions[repository.id] = region
        return repository

    def _op_create_container_repository(self, *, h: Any, body: Any, region: str, **_: Any) -> tuple:
        details = self._parse(body, "CreateContainerRepositoryDetails", "artifacts")
        _require_ocid(details.compartment_id, ("compartment", "tenancy"), "compartmentId")
        if not re.fullmatch(r"[a-z0-9]+(?:[._/-][a-z0-9]+)*", details.display_name):
            raise ApiError(
                400, "InvalidParameter", f"displayName {details.display_name!r} is invalid."
            )
        with self.lock:
            user = h.headers["Authorization"].split('keyId="')[1].split("/")[1]
            repository = self._new_repository(
                details.compartment_id, details.display_name, user, region
            )
            if details.is_public:
                repository.is_public = True
            return self._json(200, repository)

    def _op_list_container_repositories(
        self, *, query: dict[str, str], region: str, **_: Any
    ) -> tuple:
        if "compartmentId" not in query:
            raise ApiError(400, "MissingParameter", "compartmentId is required.")
        with self.lock:
            items = [
                r
                for r in self.repositories.values()
                if r.compartment_id == query["compartmentId"]
                and r.lifecycle_state != "DELETED"
                and self.regions[r.id] == region
            ]
            summaries, headers = self._page(items, query, "ContainerRepositorySummary", "artifacts")
            collection = _models("artifacts").ContainerRepositoryCollection(
                items=summaries,
                repository_count=len(summaries),
                image_count=0,
                layer_count=0,
                layers_size_in_bytes=0,
                remaining_items_count=0,
            )
            return self._json(200, collection, **headers)

    def _repository(self, repository_id: str) -> Any:
        repository = self.repositories.get(repository_id)
        if repository is None or repository.lifecycle_state == "DELETED":
            raise ApiError(404, "NotAuthorizedOrNotFound", f"Repository {repository_id} not found.")
        return repository

    def _op_get_container_repository(self, *, id: str, **_: Any) -> tuple:
        with self.lock:
            return self._json(200, self._repository(id))

    def _op_delete_container_repository(self, *, id: str, **_: Any) -> tuple:
        with self.lock:
            self._repository(id).lifecycle_state = "DELETED"
        return 204, b"", {}

    # ---- deployments: what OCI refuses up front (400)
    def _deployment(self, deployment_id: str) -> Any:
        deployment = self.deployments.get(deployment_id)
        if deployment is None:
            raise ApiError(
                404, "NotAuthorizedOrNotFound", f"Model deployment {deployment_id} not found."
            )
        return deployment

    @staticmethod
    def _invalid(message: str) -> ApiError:
        return ApiError(400, "InvalidParameter", message)

    def _check_shape(self, shape: str, config: Any) -> None:
        if shape not in KNOWN_SHAPES:
            raise self._invalid(f"{shape} is not a Model Deployment shape.")
        if not shape.endswith(".Flex"):
            if config is not None:
                raise self._invalid(
                    f"{shape} is not flexible: remove modelDeploymentInstanceShapeConfigDetails."
                )
            return
        if not config or not config.ocpus or not config.memory_in_gbs:
            raise self._invalid(
                f"{shape} is a flexible shape: modelDeploymentInstanceShapeConfigDetails "
                "needs ocpus and memoryInGBs."
            )
        ocpus, memory = config.ocpus, config.memory_in_gbs
        if ocpus < 1:
            raise self._invalid(f"ocpus {ocpus:g} is below 1.")
        most_ocpus, most_gb = FLEX_SHAPE_MAXIMA.get(shape, (None, None))
        if most_ocpus is not None and ocpus > most_ocpus:  # RULES["flex_maxima"]
            raise self._invalid(f"ocpus {ocpus:g} is above {most_ocpus} for {shape}.")
        if most_gb is not None and memory > most_gb:  # RULES["flex_maxima"]
            raise self._invalid(f"memoryInGBs {memory:g} is above {most_gb} for {shape}.")
        if memory < 6 * ocpus:  # RULES["flex"]
            raise self._invalid(
                f"memoryInGBs {memory:g} is below the minimum of 6 GB per OCPU for "
                f"{ocpus:g} OCPUs ({6 * ocpus:g} GB)."
            )
        if memory > 64 * ocpus:  # RULES["flex"]
            raise self._invalid(
                f"memoryInGBs {memory:g} is above the maximum of 64 GB per OCPU for "
                f"{ocpus:g} OCPUs ({64 * ocpus:g} GB)."
            )

    def _check_scaling(self, model_config: Any) -> None:
        bandwidth = model_config.bandwidth_mbps
        if bandwidth is not None and bandwidth < 10:  # RULES["bandwidth_min"]
            raise self._invalid("bandwidthMbps must be at least 10.")
        maximum = model_config.maximum_bandwidth_mbps
        if maximum is not None and not (bandwidth or 10) < maximum <= 2 * (bandwidth or 10):
            raise self._invalid(  # RULES["bandwidth"]
                f"maximumBandwidthMbps {maximum} must be more than bandwidthMbps and at most "
                "twice it."
            )
        policy = model_config.scaling_policy
        if policy is None:
            return
        if policy.policy_type == "FIXED_SIZE" and policy.instance_count < 1:
            raise self._invalid("instanceCount must be at least 1.")
        if policy.policy_type != "AUTOSCALING":
            return
        if policy.cool_down_in_seconds is not None and policy.cool_down_in_seconds < 300:
            raise self._invalid(  # RULES["autoscaling"]
                f"coolDownInSeconds {policy.cool_down_in_seconds} is below the minimum of 300."
            )
        for rule in policy.auto_scaling_policies:
            counts = (
                rule.minimum_instance_count,
                rule.initial_instance_count,
                rule.maximum_instance_count,
            )
            if not 1 <= counts[0] <= counts[1] <= counts[2]:
                raise self._invalid(
                    "Need 1 <= minimumInstanceCount <= initialInstanceCount <= "
                    f"maximumInstanceCount, got {counts[0]}, {counts[1]}, {counts[2]}."
                )
            for metric in rule.rules:
                low = getattr(metric.scale_in_configuration, "threshold", None)
                high = getattr(metric.scale_out_configuration, "threshold", None)
                if low is not None and high is not None and not 0 < low < high <= 100:
                    raise self._invalid(
                        f"Scale-in threshold {low} must be below the scale-out threshold "
                        f"{high}, both percentages."
                    )

    def _check_deployment(self, details: Any) -> dict[str, Any]:
        """Raise 400 for what OCI refuses up front; return the model's catalog entry."""
        _require_ocid(details.compartment_id, ("compartment", "tenancy"), "compartmentId")
        _require_ocid(details.project_id, ("datascienceproject",), "projectId")
        config = details.model_deployment_configuration_details
        if config.deployment_type != "SINGLE_MODEL":
            raise self._invalid("stand-in: only SINGLE_MODEL deployments.")
        model_config = config.model_configuration_details
        entry = self._model(model_config.model_id)
        if entry["model"].lifecycle_state != "ACTIVE":
            raise self._invalid(f"Model {model_config.model_id} is not ACTIVE.")
        if entry["artifact"] is None:
            raise self._invalid(f"Model {model_config.model_id} has no model artifact.")
        instance = model_config.instance_configuration
        self._check_shape(
            instance.instance_shape_name, instance.model_deployment_instance_shape_config_details
        )
        self._check_scaling(model_config)
        env = config.environment_configuration_details
        if env.environment_configuration_type != "OCIR_CONTAINER":
            raise self._invalid("stand-in: only OCIR_CONTAINER environments.")
        problems = byoc_problems(env)
        if problems:
            raise self._invalid("; ".join(problems))
        if not re.fullmatch(  # RULES["image_form"]
            r"[a-z0-9-]+\.ocir\.io/[a-z0-9_.-]+/[a-z0-9_./-]+(:[\w.-]+)?(@sha256:[0-9a-f]{64})?",
            env.image or "",
        ):
            raise self._invalid(
                f"image {env.image!r} is not an OCIR image (<region-key>.ocir.io/<namespace>/"
                "<repository>:<tag>)."
            )
        if env.image_digest is not None and not re.fullmatch(
            r"sha256:[0-9a-f]{64}", env.image_digest
        ):
            raise self._invalid(f"imageDigest {env.image_digest!r} is malformed.")
        in_image = env.image.partition("@")[2]
        if in_image and env.image_digest and in_image != env.image_digest:
            raise self._invalid(  # not documented either way: the stand-in refuses the doubt
                f"image names digest {in_image} but imageDigest is {env.image_digest}."
            )
        logs = details.category_log_details
        for kind in ("access", "predict"):
            log = getattr(logs, kind, None) if logs else None
            if log is not None:
                _require_ocid(log.log_id, ("log",), f"categoryLogDetails.{kind}.logId")
                _require_ocid(
                    log.log_group_id, ("loggroup",), f"categoryLogDetails.{kind}.logGroupId"
                )
        return entry

    # ---- deployments: what happens once the container runs (the work request)
    def _image_problem(self, deployment: Any, image: str, digest: str | None) -> str | None:
        """Why the deployment's resource principal cannot pull ``image``, or None."""
        host_path, _, in_image = image.partition("@")
        digest = digest or in_image or None
        host, path = host_path.split("/", 1)
        namespace, _, name = path.partition("/")
        name, _, tag = name.partition(":")
        image_region = _region_of_host(host)
        deployment_region = self.regions[deployment.id]
        if namespace != self.namespace:
            return (
                f"{IMAGE_ACCESS_FAILED} (stand-in: the namespace {namespace!r} is not this "
                f"tenancy's, {self.namespace!r}.)"
            )
        repository = next(
            (
                r
                for r in self.repositories.values()
                if r.display_name == name
                and r.lifecycle_state != "DELETED"
                and self.regions[r.id] == image_region
            ),
            None,
        )
        if repository is None:
            return f"{IMAGE_ACCESS_FAILED} (stand-in: no repository {name!r} in {image_region}.)"
        if image_region != deployment_region:  # RULES["region"]
            return (
                f"{IMAGE_ACCESS_FAILED} (stand-in: the image is in {image_region}'s registry "
                f"({host}); the deployment is in {deployment_region}.)"
            )
        if repository.compartment_id != deployment.compartment_id:
            return (
                f"{IMAGE_ACCESS_FAILED} (stand-in: repository {name!r} is in compartment "
                f"{repository.compartment_id}; the deployment's policy reads repos in its own "
                f"compartment, {deployment.compartment_id}.)"
            )
        pushed = self.pushes.get(repository.id, {})
        if (digest or pushed.get(tag or "latest")) not in pushed.values():  # RULES["image_exists"]
            what = f"digest {digest}" if digest else f"tag {tag or 'latest'!r}"
            return f"{IMAGE_ACCESS_FAILED} (stand-in: no image with {what} was pushed to {name!r}.)"
        return None

    def _container_command(self, env: Any) -> list[str]:
        command = [*(env.entrypoint or []), *(env.cmd or self.image_cmd)]
        while command and command[0].endswith("nvidia_entrypoint.sh"):
            command = command[1:]  # NVIDIA's entrypoint only execs its arguments
        return command

    def _bring_up(self, entry: dict[str, Any], zip_path: Path, env: Any) -> None:
        """The work request's background: pull, start the container, wait for its health;
        then keep the container until the deployment is deleted.

        The container lives in this thread: the local Triton asks Linux to stop it when the
        thread that started it ends (PR_SET_PDEATHSIG), as a container ends with its host."""
        deployment = entry["deployment"]
        final, details, container = "FAILED", None, None
        try:
            command = self._container_command(env)
            port = _http_port(command)
            health = env.health_check_port or env.server_port
            if self._fail_next is not None:
                details, self._fail_next = self._fail_next, None
            elif problem := self._image_problem(deployment, env.image, env.image_digest):
                details = problem
            elif health != IMAGE_HEALTHCHECK_PORT:
                details = (  # RULES["healthcheck"]
                    f"{BOOTSTRAP_FAILED} The image's HEALTHCHECK asks port "
                    f"{IMAGE_HEALTHCHECK_PORT}, but health_check_port is {health}."
                )
            elif port != env.server_port or health != port:
                details = (
                    f"{BOOTSTRAP_FAILED} The health check on port {health} got no answer: "
                    f"Triton listens on {port} (--http-port), server_port is {env.server_port}."
                )
            else:
                try:
                    container = self.launcher(zip_path, command)
                    final = "ACTIVE"
                except Exception as exc:  # TutorialError: Triton exited or never got ready
                    details = f"{BOOTSTRAP_FAILED} {triton_error_lines(str(exc))}"
        except Exception as exc:  # a stand-in bug: make the test see it
            self.unhandled.append(f"bring-up of {deployment.id}: {type(exc).__name__}: {exc}")
            details = f"stand-in error: {exc}"
        keep = False
        with self.lock:
            if deployment.lifecycle_state in ("DELETING", "DELETED"):
                final = None  # deleted meanwhile: nothing to report, stop it now
            elif container is not None:
                self.containers[deployment.id] = container
                keep = True
            entry["final"], entry["details"] = final, details
        if keep:
            entry["stop"].wait()
            with self.lock:
                self.containers.pop(deployment.id, None)
        if container is not None:
            container.stop()

    def _take_down(self, entry: dict[str, Any], bring_up: dict[str, Any] | None) -> None:
        if bring_up is not None:
            bring_up["stop"].set()
            bring_up["thread"].join()
        with self.lock:
            entry["final"], entry["details"] = "DELETED", None

    def _background(self, target: Callable[..., None], *args: Any) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def _op_create_model_deployment(self, *, h: Any, body: Any, region: str, **_: Any) -> tuple:
        details = self._parse(body, "CreateModelDeploymentDetails")
        with self.lock:
            entry = self._check_deployment(details)
            deployment_id = self._ocid("datasciencemodeldeployment")
            deployment = _models().ModelDeployment(
                id=deployment_id,
                time_created=self._now(),
                display_name=details.display_name or f"modeldeployment{time.strftime('%Y%m%d')}",
                description=details.description,
                project_id=details.project_id,
                compartment_id=details.compartment_id,
                created_by=h.headers["Authorization"].split('keyId="')[1].split("/")[1],
                model_deployment_configuration_details=details.model_deployment_configuration_details,
                category_log_details=details.category_log_details,
                model_deployment_url=f"{self.url}/{deployment_id}",
                lifecycle_state="CREATING",
                freeform_tags=details.freeform_tags or {},
                defined_tags=details.defined_tags or {},
            )
            self.deployments[deployment_id] = deployment
            self.regions[deployment_id] = region
            work = self._start_work_request("MODEL_DEPLOYMENT_CREATE", deployment)
        env = details.model_deployment_configuration_details.environment_configuration_details
        work["thread"] = self._background(self._bring_up, work, entry["artifact"]["path"], env)
        return self._json(200, deployment, **{"opc-work-request-id": work["work_request"].id})

    def _start_work_request(self, operation: str, deployment: Any) -> dict[str, Any]:
        work_request = _models().WorkRequest(
            id=self._ocid("datascienceworkrequest"),
            operation_type=operation,
            status="ACCEPTED",
            compartment_id=deployment.compartment_id,
            percent_complete=0.0,
            resources=[
                _models().WorkRequestResource(
                    action_type="IN_PROGRESS",
                    entity_type="modelDeployment",
                    identifier=deployment.id,
                    entity_uri=f"/modelDeployments/{deployment.id}",
                )
            ],
            time_accepted=self._now(),
        )
        entry = {
            "work_request": work_request,
            "deployment": deployment,
            "polls_left": self.polls_to_finish,
            "final": None,
            "details": None,
            "thread": None,
            "stop": threading.Event(),
        }
        self.work_requests[work_request.id] = entry
        return entry

    def _tick(
        self, *, work_request_id: str | None = None, deployment_id: str | None = None
    ) -> None:
        """One poll: advance the matching unfinished work requests. One finishes when its
        background work is done and it has been polled ``polls_to_finish`` times."""
        for entry in self.work_requests.values():
            work_request = entry["work_request"]
            if work_request.status in ("SUCCEEDED", "FAILED", "CANCELED"):
                continue
            target = entry["deployment"]
            if work_request.id != work_request_id and (
                target is None or target.id != deployment_id
            ):
                continue
            entry["polls_left"] -= 1
            done = entry["final"] is not None and entry["polls_left"] <= 0
            polled = self.polls_to_finish - max(entry["polls_left"], 0)
            fraction = polled / max(self.polls_to_finish, 1)
            work_request.percent_complete = 100.0 if done else min(90.0, 90.0 * fraction)
            work_request.status = "IN_PROGRESS"
            work_request.time_started = work_request.time_started or self._now()
            if done:
                deployment = entry["deployment"]
                if deployment is not None:
                    deployment.lifecycle_state = entry["final"]
                    deployment.lifecycle_details = entry["details"]
                work_request.status = "FAILED" if entry["final"] == "FAILED" else "SUCCEEDED"
                work_request.time_finished = self._now()
                work_request.resources[0].action_type = (
                    "DELETED" if entry["final"] == "DELETED" else "CREATED"
                )

    def _op_get_model_deployment(self, *, id: str, **_: Any) -> tuple:
        with self.lock:
            deployment = self._deployment(id)
            self._tick(deployment_id=id)
            return self._json(200, deployment)

    def _op_get_work_request(self, *, id: str, **_: Any) -> tuple:
        with self.lock:
            if id not in self.work_requests:
                raise ApiError(404, "NotAuthorizedOrNotFound", f"Work request {id} not found.")
            self._tick(work_request_id=id)
            return self._json(200, self.work_requests[id]["work_request"])

    def _op_delete_model_deployment(self, *, id: str, **_: Any) -> tuple:
        with self.lock:
            deployment = self._deployment(id)
            if deployment.lifecycle_state == "DELETED":
                raise ApiError(404, "NotAuthorizedOrNotFound", f"Model deployment {id} not found.")
            if deployment.lifecycle_state == "DELETING":
                raise ApiError(409, "IncorrectState", f"Model deployment {id} is already DELETING.")
            bring_up = None
            for entry in self.work_requests.values():
                if entry["deployment"] is not deployment:
                    continue
                if entry["work_request"].operation_type == "MODEL_DEPLOYMENT_CREATE":
                    bring_up = entry
                if entry["work_request"].status in ("ACCEPTED", "IN_PROGRESS"):
                    entry["work_request"].status = "CANCELED"
            deployment.lifecycle_state = "DELETING"
            work = self._start_work_request("MODEL_DEPLOYMENT_DELETE", deployment)
        work["thread"] = self._background(self._take_down, work, bring_up)
        return 202, b"", {"opc-work-request-id": work["work_request"].id}

    def _op_list_model_deployments(self, *, query: dict[str, str], **_: Any) -> tuple:
        if "compartmentId" not in query:
            raise ApiError(400, "MissingParameter", "compartmentId is required.")
        with self.lock:
            items = [
                d for d in self.deployments.values() if d.compartment_id == query["compartmentId"]
            ]
            summaries, headers = self._page(items, query, "ModelDeploymentSummary")
            return self._json(200, summaries, **headers)

    # ---- Object Storage (the large-artifact route) and the catalog's export from it
    def add_bucket(self, namespace: str, name: str, region: str | None = None) -> None:
        """A bucket, as if created in the Console (tests' shortcut)."""
        with self.lock:
            self.buckets[(namespace, name)] = {"region": region or self.region, "objects": {}}

    def _bucket(self, ns: str, bucket: str, region: str) -> dict[str, Any]:
        entry = self.buckets.get((ns, bucket))
        if entry is None or entry["region"] != region:
            raise ApiError(
                404,
                "BucketNotFound",
                f"Either the bucket named '{bucket}' does not exist in "
                f"the namespace '{ns}' or you are not authorized to access it",
            )
        return entry

    def _store(self, body: Any, size: int) -> Path:
        path = self._tmp / f"object-{uuid.uuid4().hex}"
        with open(path, "wb") as out:
            shutil.copyfileobj(body, out, 1024 * 1024)
        assert path.stat().st_size == size
        return path

    def _op_put_object(
        self, *, body: Any, size: int, ns: str, bucket: str, name: str, region: str, **_: Any
    ) -> tuple:
        with self.lock:
            entry = self._bucket(ns, bucket, region)
            entry["objects"][name] = self._store(body, size)
        return 200, b"", {"etag": uuid.uuid4().hex}

    def _op_delete_object(self, *, ns: str, bucket: str, name: str, region: str, **_: Any) -> tuple:
        with self.lock:
            entry = self._bucket(ns, bucket, region)
            if entry["objects"].pop(name, None) is None:
                raise ApiError(404, "ObjectNotFound", f"The object '{name}' does not exist.")
        return 204, b"", {}

    def _op_create_multipart_upload(
        self, *, body: Any, ns: str, bucket: str, region: str, **_: Any
    ) -> tuple:
        details = self._parse(body, "CreateMultipartUploadDetails", "object_storage")
        with self.lock:
            self._bucket(ns, bucket, region)
            upload = _models("object_storage").MultipartUpload(
                namespace=ns,
                bucket=bucket,
                object=details.object,
                upload_id=uuid.uuid4().hex,
                time_created=self._now(),
            )
            self.uploads[upload.upload_id] = {"upload": upload, "parts": {}}
        return self._json(200, upload)

    def _upload(self, query: dict[str, str], ns: str, bucket: str, name: str) -> dict[str, Any]:
        entry = self.uploads.get(query.get("uploadId", ""))
        upload = entry and entry["upload"]
        if not entry or (upload.namespace, upload.bucket, upload.object) != (ns, bucket, name):
            raise ApiError(404, "NoSuchUpload", f"No multipart upload {query.get('uploadId')}.")
        return entry

    def _op_upload_part(
        self,
        *,
        h: Any,
        body: Any,
        size: int,
        query: dict[str, str],
        ns: str,
        bucket: str,
        name: str,
        **_: Any,
    ) -> tuple:
        number = int(query.get("uploadPartNum") or 0)
        if not 1 <= number <= MAX_PART_NUMBER:  # RULES["multipart"]
            raise ApiError(400, "InvalidParameter", f"uploadPartNum {number} is not 1-10000.")
        if size > MAX_PART_BYTES:
            raise ApiError(400, "InvalidParameter", "A part must be no larger than 50 GiB.")
        with self.lock:
            entry = self._upload(query, ns, bucket, name)
            path = self._store(body, size)
        md5 = base64.b64encode(hashlib.md5(path.read_bytes(), usedforsecurity=False).digest())
        given = h.headers.get("Content-MD5")
        if given is not None and given != md5.decode():
            path.unlink()
            raise ApiError(400, "InvalidContentMD5", "The Content-MD5 does not match the body.")
        etag = uuid.uuid4().hex
        with self.lock:
            entry["parts"][number] = {"etag": etag, "path": path, "size": size}
        return 200, b"", {"etag": etag, "opc-content-md5": md5.decode()}

    def _op_commit_multipart_upload(
        self,
        *,
        body: Any,
        query: dict[str, str],
        ns: str,
        bucket: str,
        name: str,
        region: str,
        **_: Any,
    ) -> tuple:
        details = self._parse(body, "CommitMultipartUploadDetails", "object_storage")
        with self.lock:
            entry = self._upload(query, ns, bucket, name)
            bucket_entry = self._bucket(ns, bucket, region)
            chosen = sorted(details.parts_to_commit, key=lambda part: part.part_num)
            for index, part in enumerate(chosen):
                stored = entry["parts"].get(part.part_num)
                if stored is None or stored["etag"] != part.etag:
                    raise ApiError(
                        400,
                        "InvalidParameter",
                        f"Part {part.part_num}: no such part with that etag.",
                    )
                if index < len(chosen) - 1 and stored["size"] < MIN_PART_BYTES:
                    raise ApiError(
                        400,
                        "InvalidParameter",
                        f"Part {part.part_num} is "
                        f"{stored['size']} bytes; all but the last part must be at "
                        "least 10 MiB (RULES['multipart']).",
                    )
            path = self._tmp / f"object-{uuid.uuid4().hex}"
            with open(path, "wb") as out:
                for part in chosen:
                    with open(entry["parts"][part.part_num]["path"], "rb") as src:
                        shutil.copyfileobj(src, out, 1024 * 1024)
            bucket_entry["objects"][name] = path
            self.uploads.pop(query["uploadId"])
        return 200, b"", {"etag": uuid.uuid4().hex, "opc-multipart-md5": "stand-in"}

    def _op_abort_multipart_upload(
        self, *, query: dict[str, str], ns: str, bucket: str, name: str, **_: Any
    ) -> tuple:
        with self.lock:
            self._upload(query, ns, bucket, name)
            self.uploads.pop(query["uploadId"])
        return 204, b"", {}

    def _op_export_model_artifact(self, *, body: Any, id: str, **_: Any) -> tuple:
        """RULES["export_artifact"]: the catalog copies the zip from the bucket into the model's
        artifact, in a work request (EXPORT_MODEL_ARTIFACT)."""
        details = self._parse(body, "ExportModelArtifactDetails")
        source = details.artifact_export_details
        with self.lock:
            entry = self._model(id)
            if entry["artifact"] is not None:
                raise ApiError(
                    409,
                    "NotAuthorizedOrResourceAlreadyExists",
                    "The model already has an artifact; artifacts cannot be replaced.",
                )
            work = {
                "work_request": _models().WorkRequest(
                    id=self._ocid("datascienceworkrequest"),
                    operation_type="EXPORT_MODEL_ARTIFACT",
                    status="ACCEPTED",
                    compartment_id=entry["model"].compartment_id,
                    percent_complete=0.0,
                    resources=[
                        _models().WorkRequestResource(
                            action_type="IN_PROGRESS",
                            entity_type="model",
                            identifier=id,
                            entity_uri=f"/models/{id}",
                        )
                    ],
                    time_accepted=self._now(),
                ),
                "deployment": None,
                "polls_left": self.polls_to_finish,
                "final": "FAILED",
                "details": None,
                "thread": None,
                "stop": threading.Event(),
            }
            self.work_requests[work["work_request"].id] = work
            bucket = self.buckets.get((source.namespace, source.source_bucket))
            path = None
            if bucket and bucket["region"] == source.source_region:
                path = bucket["objects"].get(source.source_object_name)
            if path is not None and zipfile.is_zipfile(path):
                artifact = self._tmp / f"{id}.zip"
                shutil.copyfile(path, artifact)
                with zipfile.ZipFile(artifact) as archive:
                    names = archive.namelist()
                entry["artifact"] = {
                    "path": artifact,
                    "size": artifact.stat().st_size,
                    "names": names,
                    "sha256": None,
                    "content_disposition": None,
                    "route": "object_storage",
                }
                work["final"] = "SUCCEEDED"
        return 200, b"", {"opc-work-request-id": work["work_request"].id}

    # ---- predict (CONTAINER_TYPE=TRITON)
    def _op_predict(self, *, h: Any, body: Any, size: int, id: str, **_: Any) -> tuple:
        with self.lock:
            deployment = self.deployments.get(id)
            if (
                deployment is None
                or deployment.lifecycle_state != "ACTIVE"
                or not self._predict_allowed
            ):  # RULES["predict"]: one answer for both, so nothing leaks
                raise ApiError(
                    404,
                    "NotAuthorizedOrNotFound",
                    "Model deployment not found or authorization failed.",
                )
            if h.headers.get("Content-Length") is None:
                raise ApiError(411, "LengthRequired", "Missing content length header.")
            if size > PREDICT_PAYLOAD_LIMIT_BYTES:
                raise ApiError(413, "PayloadTooLarge", "The payload size limit is 10 MB.")
            if self._errors:
                status = self._errors.pop(0)
                code, message = {
                    429: ("TooManyRequests", "Too Many Requests."),
                    500: ("InternalServerError", "Internal Server Error."),
                    503: ("ServiceUnavailable", "Model server unavailable."),
                }[status]
                raise ApiError(status, code, message)
            container = self.containers.get(id) or self._upstream
        # RULES["predict_no_model"]: without model_name the name is empty, and Triton answers.
        name = h.headers.get("model_name") or ""
        version = h.headers.get("model_version")
        if self._predict_delay_s:
            time.sleep(min(self._predict_delay_s, self.predict_time_limit_s))
            if self._predict_delay_s >= self.predict_time_limit_s:
                raise ApiError(  # RULES["predict"]: the 60 s timeout answers 500
                    500,
                    "InternalServerError",
                    f"Service Timeout: the model did not answer within "
                    f"{self.predict_time_limit_s:g} s.",
                )
        if container is None:
            raise ApiError(503, "ServiceUnavailable", "Model server unavailable.")
        target = f"{container.url}/v2/models/{urllib.parse.quote(name)}"
        if version:
            target += f"/versions/{urllib.parse.quote(version)}"
        target += "/infer"
        with self.lock:
            self.forwarded.append({"url": target, "model_name": name, "model_version": version})
        request = urllib.request.Request(
            target, data=body.read(), headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.predict_time_limit_s) as response:
                return response.status, response.read(), {"Content-Type": "application/json"}
        except urllib.error.HTTPError as err:
            return err.code, err.read(), {"Content-Type": "application/json"}
        except (urllib.error.URLError, TimeoutError) as err:
            raise ApiError(503, "ServiceUnavailable", f"Model server unavailable: {err}") from err

"""A loopback stand-in for OCI Data Science and Model Deployment (a test utility, not a feature).

No public emulator covers these services, so the tests point the real OCI SDK at this server
(every SDK client takes ``service_endpoint=``) and send the tutorial's signed ``/predict``
requests to it. It runs on 127.0.0.1 (a free port, in a thread), checks what OCI checks and
answers the way OCI answers:

- Every request: the draft-cavage HTTP signature in ``Authorization`` is parsed, the signing
  string rebuilt from the listed headers and verified with the test key's public key; the
  headers OCI requires must be signed (``date``, ``(request-target)``, ``host``, and for
  POST/PUT/PATCH ``content-length``, ``content-type``, ``x-content-sha256``, except for the
  binary artifact upload, which the SDK signs without them), a signed ``x-content-sha256`` and
  ``content-length`` must match the body, the date must be within 5 minutes.
  Otherwise: 401 ``NotAuthenticated``.
- Request bodies are checked against the SDK's own model classes (``oci.data_science.models``):
  unknown fields, wrong JSON types, missing ``[Required]`` fields and values outside the
  documented enums answer 400 with OCI's error JSON ``{"code": ..., "message": ...}``; so do
  BYOC rule breaks (ports, environment variables), unknown shapes, Flex shapes without OCPUs
  and memory, malformed images, digests and OCIDs, and models without an artifact.
- Life cycle: deployments walk CREATING -> ACTIVE (or FAILED with ``lifecycle_details``) and
  DELETING -> DELETED through work requests, after ``polls_to_finish`` polls; a model used by
  a live deployment cannot be deleted (409 ``IncorrectState``). A deployment also ends FAILED
  where Triton would not start: a ``--model-repository`` that is not in the artifact, a server
  or health-check port Triton does not listen on, ``KIND_GPU`` models on a CPU shape.
- ``POST /{md_ocid}/predict`` works like ``CONTAINER_TYPE=TRITON``: it forwards the body to
  ``{triton_url}/v2/models/{model_name}/versions/{model_version}/infer``, the model chosen by
  the ``model_name``/``model_version`` or ``model-name``/``model-version`` headers; payloads over
  10 MB answer 413.

Knobs for error paths: :meth:`OciStandIn.fail_next_deployment`, :meth:`OciStandIn.answer_429`,
:meth:`OciStandIn.delay_predict`. Anything it does not implement answers 404 and is recorded in
``unhandled`` (tests assert it stays empty).
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
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

API = "/20190101"
PREDICT_PAYLOAD_LIMIT_BYTES = 10 * 1024 * 1024
MAX_CLOCK_SKEW_S = 300
DEPLOYED_MODEL_DIR = "/opt/ds/model/deployed_model/"
#: Binary uploads OCI signs without the body headers (the SDK passes
#: ``enforce_content_headers=False`` for them, as for Object Storage uploads).
UNSIGNED_BODY_OPERATIONS = {"create_model_artifact"}
BOOTSTRAP_FAILED = "Errors occurred while bootstrapping the Model Deployment."
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


def _models() -> Any:
    from oci.data_science import models

    return models


def _allowed_values(doc: str) -> list[str] | None:
    match = re.search(r"Allowed values for (?:this property|items in this list) are: ([^\n]*)", doc)
    if not match:
        return None
    return re.findall(r'"([^"]*)"', match.group(1))


def check_json(value: Any, swagger_type: str, path: str, errors: list[tuple[str, str]]) -> None:
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
            check_json(item, inner, f"{path.rstrip('.')}[{i}].", errors)
    elif swagger_type.startswith("dict("):
        if not isinstance(value, dict):
            errors.append(("InvalidParameter", f"{where}: must be an object"))
            return
        inner = swagger_type[5:-1].split(",", 1)[1].strip()
        for key, item in value.items():
            check_json(item, inner, f"{path}{key}.", errors)
    else:
        cls = getattr(_models(), swagger_type, None)
        if cls is None:
            return
        if not isinstance(value, dict):
            errors.append(("InvalidParameter", f"{where}: must be an object"))
            return
        if hasattr(cls, "get_subtype"):
            try:
                cls = getattr(_models(), cls.get_subtype(value))
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
            check_json(item, attr_type, f"{path}{key}.", errors)


def byoc_problems(env_config: Any) -> list[str]:
    """OCI's bring-your-own-container rules (checked independently of the tutorial's code)."""
    problems = []
    for name in ("server_port", "health_check_port"):
        port = getattr(env_config, name)
        if port is None:
            continue
        if not 1024 <= port <= 65535 or port in (24224, 8446, 8447):
            problems.append(
                f"{name} {port} is not allowed: use 1024-65535 except 24224, 8446 and 8447"
            )
    variables = env_config.environment_variables or {}
    size = sum(len(k.encode()) + len(v.encode()) for k, v in variables.items())
    if size >= 2048:
        problems.append(f"environmentVariables use {size} bytes; the limit is 2048")
    for key in variables:
        if len(key) >= 32 or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", key):
            problems.append(
                f"environment variable key {key!r} is invalid: under 32 characters, letters, "
                "digits and underscores, starting with a letter"
            )
    return problems


def _require_ocid(value: str | None, kinds: tuple[str, ...], field: str) -> None:
    if value is None:
        return
    if not any(value.startswith(f"ocid1.{kind}.") for kind in kinds):
        raise ApiError(
            400, "InvalidParameter", f"{field}: {value!r} is not an OCID of a {' or '.join(kinds)}"
        )


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
    """The stand-in server. Use as a context manager; ``url`` is its service endpoint."""

    def __init__(
        self,
        credentials: StandInCredentials,
        *,
        triton_url: str | None = None,
        polls_to_finish: int = 3,
        page_size: int = 2,
        predict_time_limit_s: float = 60.0,
    ) -> None:
        import oci

        self.keys = {credentials.key_id: credentials.public_key}
        self.triton_url = triton_url.rstrip("/") if triton_url else None
        self.polls_to_finish = polls_to_finish
        self.page_size = page_size
        self.predict_time_limit_s = predict_time_limit_s
        self.models: dict[str, dict[str, Any]] = {}
        self.deployments: dict[str, Any] = {}
        self.work_requests: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.unhandled: list[str] = []
        self.forwarded: list[dict[str, Any]] = []
        self.lock = threading.RLock()
        self._fail_next: str | None = None
        self._answer_429 = 0
        self._predict_delay_s = 0.0
        self._retry_tokens: dict[tuple[str, str], tuple[int, bytes, dict[str, str]]] = {}
        self._tmp = Path(tempfile.mkdtemp(prefix="oci-standin-"))
        # An SDK client used only for its (de)serializer; it never sends anything.
        fake_config = {
            "region": credentials.region,
            "user": credentials.user,
            "tenancy": credentials.tenancy,
            "fingerprint": credentials.fingerprint,
            "key_file": str(self._tmp / "unused"),
        }
        self._sdk = oci.data_science.DataScienceClient(
            fake_config, signer=object(), service_endpoint="http://127.0.0.1:1"
        ).base_client
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle of the server itself
    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: pass as ``service_endpoint``."""
        assert self._server is not None, "start() the stand-in first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

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
        """Stop listening and remove the uploaded artifacts."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> OciStandIn:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- knobs
    def fail_next_deployment(self, lifecycle_details: str = BOOTSTRAP_FAILED) -> None:
        """The next deployment created ends FAILED with these ``lifecycle_details``."""
        self._fail_next = lifecycle_details

    def answer_429(self, times: int) -> None:
        """The next ``times`` predict calls answer HTTP 429."""
        self._answer_429 = times

    def delay_predict(self, seconds: float) -> None:
        """Each predict call waits this long first (504 past ``predict_time_limit_s``)."""
        self._predict_delay_s = seconds

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
        ("POST", rf"{API}/models", "create_model"),
        ("GET", rf"{API}/models", "list_models"),
        ("POST", rf"{API}/models/(?P<id>[^/]+)/artifact", "create_model_artifact"),
        ("GET", rf"{API}/models/(?P<id>[^/]+)", "get_model"),
        ("DELETE", rf"{API}/models/(?P<id>[^/]+)", "delete_model"),
        ("POST", rf"{API}/modelDeployments", "create_model_deployment"),
        ("GET", rf"{API}/modelDeployments", "list_model_deployments"),
        ("GET", rf"{API}/modelDeployments/(?P<id>[^/]+)", "get_model_deployment"),
        ("DELETE", rf"{API}/modelDeployments/(?P<id>[^/]+)", "delete_model_deployment"),
        ("GET", rf"{API}/workRequests/(?P<id>[^/]+)", "get_work_request"),
        ("POST", r"/(?P<id>ocid1\.datasciencemodeldeployment\.[^/]+)/predict", "predict"),
    ]

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body_file, size, digest = self._read_body(h)
        parsed = urllib.parse.urlsplit(h.path)
        path = urllib.parse.unquote(parsed.path)
        query = dict(urllib.parse.parse_qsl(parsed.query))
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
                        h=h, body=body_file, size=size, query=query, **params
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
        skew = abs((dt.datetime.now(dt.UTC) - when).total_seconds())
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
    def _parse(self, body: Any, type_name: str) -> Any:
        raw_bytes = body.read()
        try:
            raw = json.loads(raw_bytes)
        except ValueError as exc:
            raise ApiError(400, "CannotParseRequest", "The body is not valid JSON.") from exc
        errors: list[tuple[str, str]] = []
        check_json(raw, type_name, "", errors)
        if errors:
            raise ApiError(400, errors[0][0], "; ".join(message for _, message in errors))
        return self._sdk.deserialize_response_data(raw_bytes, type_name)

    def _json(self, status: int, obj: Any, **headers: str) -> tuple[int, bytes, dict[str, str]]:
        payload = json.dumps(self._sdk.sanitize_for_serialization(obj)).encode()
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
        return dt.datetime.now(dt.UTC)

    def _page(self, items: list[Any], query: dict[str, str], summary: str) -> tuple:
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
        models = _models()
        summaries = []
        for item in page:
            cls = getattr(models, summary)
            kwargs = {k: getattr(item, k) for k in cls().swagger_types if hasattr(item, k)}
            summaries.append(cls(**kwargs))
        headers = {}
        if start + limit < len(items):
            headers["opc-next-page"] = str(start + limit)
        return self._json(200, summaries, **headers)

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
            return self._page(items, query, "ModelSummary")

    # ---- deployments
    def _deployment(self, deployment_id: str) -> Any:
        deployment = self.deployments.get(deployment_id)
        if deployment is None:
            raise ApiError(
                404, "NotAuthorizedOrNotFound", f"Model deployment {deployment_id} not found."
            )
        return deployment

    def _check_deployment(self, details: Any) -> str | None:
        """Raise 400 for what OCI refuses up front; return lifecycle_details if it will fail."""
        _require_ocid(details.compartment_id, ("compartment", "tenancy"), "compartmentId")
        _require_ocid(details.project_id, ("datascienceproject",), "projectId")
        config = details.model_deployment_configuration_details
        if config.deployment_type != "SINGLE_MODEL":
            raise ApiError(400, "InvalidParameter", "stand-in: only SINGLE_MODEL deployments.")
        model_config = config.model_configuration_details
        entry = self._model(model_config.model_id)
        if entry["model"].lifecycle_state != "ACTIVE":
            raise ApiError(400, "InvalidParameter", f"Model {model_config.model_id} is not ACTIVE.")
        if entry["artifact"] is None:
            raise ApiError(
                400, "InvalidParameter", f"Model {model_config.model_id} has no model artifact."
            )
        instance = model_config.instance_configuration
        shape = instance.instance_shape_name
        if shape not in KNOWN_SHAPES:
            raise ApiError(400, "InvalidParameter", f"{shape} is not a Model Deployment shape.")
        shape_config = instance.model_deployment_instance_shape_config_details
        if shape.endswith(".Flex"):
            if not shape_config or not shape_config.ocpus or not shape_config.memory_in_gbs:
                raise ApiError(
                    400,
                    "InvalidParameter",
                    f"{shape} is a flexible shape: modelDeploymentInstanceShapeConfigDetails "
                    "needs ocpus and memoryInGBs.",
                )
            if shape_config.memory_in_gbs > 64 * shape_config.ocpus:
                raise ApiError(400, "InvalidParameter", "At most 64 GB of memory per OCPU.")
        elif shape_config is not None:
            raise ApiError(
                400,
                "InvalidParameter",
                f"{shape} is not flexible: remove modelDeploymentInstanceShapeConfigDetails.",
            )
        if model_config.bandwidth_mbps is not None and model_config.bandwidth_mbps < 10:
            raise ApiError(400, "InvalidParameter", "bandwidthMbps must be at least 10.")
        policy = model_config.scaling_policy
        if policy is not None and policy.policy_type == "FIXED_SIZE":
            if policy.instance_count is None or policy.instance_count < 1:
                raise ApiError(400, "InvalidParameter", "instanceCount must be at least 1.")
        if policy is not None and policy.policy_type == "AUTOSCALING":
            for rule in policy.auto_scaling_policies or []:
                counts = (
                    rule.minimum_instance_count,
                    rule.initial_instance_count,
                    rule.maximum_instance_count,
                )
                if not 1 <= counts[0] <= counts[1] <= counts[2]:
                    raise ApiError(
                        400,
                        "InvalidParameter",
                        "Need 1 <= minimum <= initial <= maximum instances.",
                    )
        env = config.environment_configuration_details
        if env.environment_configuration_type != "OCIR_CONTAINER":
            raise ApiError(400, "InvalidParameter", "stand-in: only OCIR_CONTAINER environments.")
        problems = byoc_problems(env)
        if problems:
            raise ApiError(400, "InvalidParameter", "; ".join(problems))
        if not re.fullmatch(
            r"[a-z0-9-]+\.ocir\.io/[a-z0-9_.-]+/[a-z0-9_./-]+(:[\w.-]+)?", env.image
        ):
            raise ApiError(
                400,
                "InvalidParameter",
                f"image {env.image!r} is not an OCIR image (<region-key>.ocir.io/<namespace>/"
                "<repository>:<tag>).",
            )
        if env.image_digest is not None and not re.fullmatch(
            r"sha256:[0-9a-f]{64}", env.image_digest
        ):
            raise ApiError(
                400, "InvalidParameter", f"imageDigest {env.image_digest!r} is malformed."
            )
        logs = details.category_log_details
        for kind in ("access", "predict"):
            log = getattr(logs, kind, None) if logs else None
            if log is not None:
                _require_ocid(log.log_id, ("log",), f"categoryLogDetails.{kind}.logId")
                _require_ocid(
                    log.log_group_id, ("loggroup",), f"categoryLogDetails.{kind}.logGroupId"
                )

        # What the container does once it runs (Triton's behaviour, not the API's).
        if self._fail_next is not None:
            details_text, self._fail_next = self._fail_next, None
            return details_text
        cmd = env.cmd or []
        if any("tritonserver" in part for part in cmd):
            repo = next(
                (c.split("=", 1)[1] for c in cmd if c.startswith("--model-repository=")), ""
            )
            port = int(
                next((c.split("=", 1)[1] for c in cmd if c.startswith("--http-port=")), 8000)
            )
            if not repo.startswith(DEPLOYED_MODEL_DIR):
                return BOOTSTRAP_FAILED
            inside = repo[len(DEPLOYED_MODEL_DIR) :].strip("/") + "/"
            if not any(
                n.startswith(inside) and n.endswith("/config.pbtxt")
                for n in entry["artifact"]["names"]
            ):
                return BOOTSTRAP_FAILED
            if port != env.server_port or (env.health_check_port or port) != port:
                return BOOTSTRAP_FAILED
            if ".GPU" not in shape and self._wants_gpu(entry["artifact"]["path"]):
                return BOOTSTRAP_FAILED  # Triton cannot place KIND_GPU instances on a CPU shape
        return None

    @staticmethod
    def _wants_gpu(zip_path: Path) -> bool:
        with zipfile.ZipFile(zip_path) as archive:
            return any(
                b"KIND_GPU" in archive.read(name)
                for name in archive.namelist()
                if name.endswith("/config.pbtxt")
            )

    def _op_create_model_deployment(self, *, h: Any, body: Any, **_: Any) -> tuple:
        details = self._parse(body, "CreateModelDeploymentDetails")
        with self.lock:
            failure = self._check_deployment(details)
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
            work_request_id = self._start_work_request(
                "MODEL_DEPLOYMENT_CREATE",
                deployment,
                "ACTIVE" if failure is None else "FAILED",
                failure,
            )
            return self._json(200, deployment, **{"opc-work-request-id": work_request_id})

    def _start_work_request(
        self, operation: str, deployment: Any, final: str, details: str | None
    ) -> str:
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
        self.work_requests[work_request.id] = {
            "work_request": work_request,
            "deployment": deployment,
            "polls_left": self.polls_to_finish,
            "final": final,
            "details": details,
        }
        return work_request.id

    def _tick(
        self, *, work_request_id: str | None = None, deployment_id: str | None = None
    ) -> None:
        """One poll: advance the matching unfinished work requests."""
        for entry in self.work_requests.values():
            work_request = entry["work_request"]
            if work_request.status in ("SUCCEEDED", "FAILED", "CANCELED"):
                continue
            if work_request.id != work_request_id and entry["deployment"].id != deployment_id:
                continue
            entry["polls_left"] -= 1
            done = self.polls_to_finish - max(entry["polls_left"], 0)
            work_request.percent_complete = 100.0 * done / max(self.polls_to_finish, 1)
            work_request.status = "IN_PROGRESS"
            work_request.time_started = work_request.time_started or self._now()
            if entry["polls_left"] <= 0:
                deployment = entry["deployment"]
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
            for entry in self.work_requests.values():
                if entry["deployment"] is deployment and entry["work_request"].status in (
                    "ACCEPTED",
                    "IN_PROGRESS",
                ):
                    entry["work_request"].status = "CANCELED"
            deployment.lifecycle_state = "DELETING"
            work_request_id = self._start_work_request(
                "MODEL_DEPLOYMENT_DELETE", deployment, "DELETED", None
            )
        return 202, b"", {"opc-work-request-id": work_request_id}

    def _op_list_model_deployments(self, *, query: dict[str, str], **_: Any) -> tuple:
        if "compartmentId" not in query:
            raise ApiError(400, "MissingParameter", "compartmentId is required.")
        with self.lock:
            items = [
                d for d in self.deployments.values() if d.compartment_id == query["compartmentId"]
            ]
            return self._page(items, query, "ModelDeploymentSummary")

    # ---- predict (CONTAINER_TYPE=TRITON)
    def _op_predict(self, *, h: Any, body: Any, size: int, id: str, **_: Any) -> tuple:
        with self.lock:
            deployment = self._deployment(id)
            if deployment.lifecycle_state != "ACTIVE":
                raise ApiError(
                    404, "NotAuthorizedOrNotFound", f"Model deployment {id} is not ACTIVE."
                )
            if size > PREDICT_PAYLOAD_LIMIT_BYTES:
                raise ApiError(413, "PayloadTooLarge", "The payload is larger than 10 MB.")
            if self._answer_429 > 0:
                self._answer_429 -= 1
                raise ApiError(429, "TooManyRequests", "Too many requests: bandwidth exceeded.")
        names = {h.headers.get("model_name"), h.headers.get("model-name")} - {None}
        versions = {h.headers.get("model_version"), h.headers.get("model-version")} - {None}
        if len(names) != 1 or len(versions) > 1:
            raise ApiError(
                400,
                "InvalidParameter",
                "Send one model name (model_name or model-name header) and at most one version.",
            )
        name = names.pop()
        version = versions.pop() if versions else None
        if self._predict_delay_s:
            time.sleep(min(self._predict_delay_s, self.predict_time_limit_s))
            if self._predict_delay_s >= self.predict_time_limit_s:
                raise ApiError(504, "GatewayTimeout", "The model did not answer within 60 s.")
        if not self.triton_url:
            raise ApiError(503, "ServiceUnavailable", "stand-in: no Triton to forward to.")
        target = f"{self.triton_url}/v2/models/{urllib.parse.quote(name)}"
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
            raise ApiError(502, "BadGateway", f"The model server did not answer: {err}") from err

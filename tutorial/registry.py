"""Build the serving image and push it to OCIR, the registry OCI Model Deployment pulls from.

Notebook 05 uses this module. It drives whichever container engine is installed (Docker or
Podman) through its command line, so the learner can repeat every step in a terminal:
``<engine> login``, ``<engine> build``, ``<engine> push``. The auth token goes to the engine on
stdin (``--password-stdin``) and nowhere else: it is never printed, logged, returned or kept.
"""

from __future__ import annotations

import collections
import getpass
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tutorial.common import REPO_ROOT, TutorialError, update_state, weights_label

#: The engines this step knows, in the order ``find_engine()`` tries them.
ENGINES = ("docker", "podman")
#: The serving image's Dockerfile (its build context is the folder it is in).
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
#: NGC's Triton 24.10, "-py3" flavour: Triton 2.51.0 with the python and onnxruntime backends,
#: the same release as the tritonserver bundled in nvidia-pytriton 0.7.0 (used locally).
TRITON_BASE_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
#: Where OCI Model Deployment unpacks the model artifact (read-only) and where Triton looks.
MODEL_REPOSITORY_IN_CONTAINER = "/opt/ds/model/deployed_model/model_repository"
#: Triton's ports in the image. OCI reserves 24224, 8446 and 8447; BYOC allows 1024-65535.
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
OCI_RESERVED_PORTS = frozenset({24224, 8446, 8447})
#: The image's CMD (docker/Dockerfile has the same list; a test checks it). Notebook 06 can
#: pass it as the deployment's ``cmd``; the image's ENTRYPOINT (NVIDIA's entrypoint) stays.
TRITON_CMD = [
    "tritonserver",
    f"--model-repository={MODEL_REPOSITORY_IN_CONTAINER}",
    "--model-control-mode=none",
    f"--http-port={TRITON_PORTS['http']}",
    f"--grpc-port={TRITON_PORTS['grpc']}",
    f"--metrics-port={TRITON_PORTS['metrics']}",
    "--strict-readiness=true",
    "--exit-on-error=true",
    "--log-verbose=0",
]
#: OCI's limit for a model deployment's image: "the image size must be within 16 GB", because
#: the pull must finish within 20 minutes (Troubleshooting BYOC model deployments, below).
#: Read as 16 * 10**9 bytes, the stricter of GB and GiB.
OCI_IMAGE_LIMIT_BYTES = 16 * 10**9
IMAGE_LIMIT_DOC = (
    "https://docs.oracle.com/en-us/iaas/Content/data-science/using/tshoot-model-deploy-byoc.htm"
)
#: Tests and unusual setups only (rootful Podman in a container, a plain-HTTP test registry):
#: extra engine flags, shell-quoted, read by find_engine() when it is given none.
ENGINE_ARGS_ENV = {
    "global_args": "TUTORIAL_ENGINE_GLOBAL_ARGS",
    "build_args": "TUTORIAL_ENGINE_BUILD_ARGS",
    "login_args": "TUTORIAL_ENGINE_LOGIN_ARGS",
    "push_args": "TUTORIAL_ENGINE_PUSH_ARGS",
}
#: The environment variable notebook 05 reads the OCIR auth token from (else: getpass).
AUTH_TOKEN_ENV = "OCIR_AUTH_TOKEN"
#: The "domain" part of the login of users federated through Oracle Identity Cloud Service.
FEDERATED_DOMAIN = "oracleidentitycloudservice"

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# The distribution reference grammar (github.com/distribution/reference), without IPv6 hosts.
_HOST = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"(?::[0-9]+)?"
)
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_REGION_KEY = re.compile(r"[a-z]{3}")
_REGION_ID = re.compile(r"[a-z]{2,}(?:-[a-z]+)+-\d+")  # us-ashburn-1, us-gov-ashburn-1
# What engines print when a registry refuses credentials or an upload.
_REFUSED = re.compile(
    r"unauthorized|authentication required|invalid username/password|incorrect username"
    r"|denied|forbidden|\b40[13]\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ContainerEngine:
    """A working Docker or Podman command line, plus the extra flags this session needs.

    ``name`` is how the engine behaves (``docker`` or ``podman``; Podman's ``docker`` shim counts
    as ``podman``). The ``*_args`` are for unusual setups, not for OCIR: rootful Podman inside a
    container needs ``global_args=("--storage-driver=vfs",)`` and ``build_args=
    ("--isolation=chroot",)``; a plain-HTTP test registry needs ``login_args``/``push_args`` of
    ``("--tls-verify=false",)``.
    """

    name: str
    executable: str
    version: str
    global_args: tuple[str, ...] = ()
    build_args: tuple[str, ...] = ()
    login_args: tuple[str, ...] = ()
    push_args: tuple[str, ...] = ()

    def command(self, *args: str) -> list[str]:
        """The argv for ``<engine> <global args> <args>``."""
        return [self.executable, *self.global_args, *args]


# --------------------------------------------------------------------------- names


def ocir_host(region: str) -> str:
    """The OCIR host for a region: ``iad`` or ``us-ashburn-1`` -> ``iad.ocir.io``.

    Accepts a region key (three letters), a region identifier (mapped to its key with the OCI
    SDK's region table), or a full ``<key>.ocir.io`` host. That is the commercial realm's
    naming; elsewhere (government realms) give the registry host itself as ``REGISTRY_HOST``.
    """
    value = (region or "").strip().lower()
    if value.endswith(".ocir.io"):
        key = value[: -len(".ocir.io")]
        if _REGION_KEY.fullmatch(key) or _REGION_ID.fullmatch(key):
            return value
    elif _REGION_KEY.fullmatch(value):
        return f"{value}.ocir.io"
    elif _REGION_ID.fullmatch(value):
        from oci.regions import REGIONS_SHORT_NAMES  # region key -> region identifier

        keys = {identifier: key for key, identifier in REGIONS_SHORT_NAMES.items()}
        if value in keys:
            return f"{keys[value]}.ocir.io"
        raise TutorialError(
            f"Unknown OCI region {region!r}: give its region key instead (the three letters in "
            "the Console's region list, e.g. 'iad' for us-ashburn-1, 'fra' for eu-frankfurt-1)."
        )
    raise TutorialError(
        f"{region!r} is not an OCI region key or identifier: set REGION (or OCIR_REGION) to a "
        "region key such as 'iad', 'phx', 'fra' or an identifier such as 'us-ashburn-1'."
    )


def push_region(region: str, auth_region: str | None) -> str:
    """The region to push to: ``region`` (a key or identifier), else the OCI credentials'.

    Container Registry is regional: notebook 05 creates the repository with a client of the
    credentials' region, and a push to another region's host would create a second repository
    there, in the tenancy's root compartment (``ContainerConfiguration``), where the
    deployment's policy does not reach. So a ``region`` other than ``auth_region`` is refused,
    naming both, before anything is built. Returns the region key (``iad``).
    """
    from tutorial.oci_deploy import region_key

    if not auth_region:
        if not region:
            raise TutorialError(
                "No region: set REGION (a key such as 'iad') or give OCI credentials whose "
                "config names a region."
            )
        return region_key(region)
    if not region:
        return region_key(auth_region)
    if region_key(region) != region_key(auth_region):
        raise TutorialError(
            f"REGION={region!r} pushes to {ocir_host(region)}, but your OCI credentials talk "
            f"to {auth_region} ({region_key(auth_region)}.ocir.io), where section 4 creates the "
            "repository and notebook 06 deploys. Repositories are regional: the push would "
            "create another repository, in the other region's root compartment, and the "
            f"deployment could not read it. Set REGION = '' (or {region_key(auth_region)!r}), "
            f"or use an OCI profile for {region_key(region)!r} here and in notebook 06. "
            "Nothing was built or pushed."
        )
    return region_key(region)


def ocir_username(namespace: str, user: str, identity_domain: str = "") -> str:
    """The login OCIR expects, checked: ``<namespace>/[<domain>/]<user>``.

    - default identity domain: ``ocir_username("mytenancy", "jane@example.com")``
      -> ``mytenancy/jane@example.com``
    - federated through Identity Cloud Service: ``identity_domain="oracleidentitycloudservice"``
      -> ``mytenancy/oracleidentitycloudservice/jane@example.com``
    - another identity domain: ``identity_domain="MyDomain"`` -> ``mytenancy/MyDomain/jane@...``

    A ``user`` that already starts with ``<namespace>/`` is taken as the full login.
    """
    namespace, user, domain = (namespace or "").strip(), (user or "").strip(), identity_domain
    domain = (domain or "").strip().strip("/")
    if not namespace:
        raise TutorialError(
            "The OCIR login needs your tenancy's namespace: set OCIR_NAMESPACE (Console > "
            "Tenancy details > Object storage namespace, or `oci os ns get`)."
        )
    if not _NAMESPACE.fullmatch(namespace):
        raise TutorialError(
            f"{namespace!r} is not a tenancy namespace (letters, digits, '-' and '_'): set "
            "OCIR_NAMESPACE to the Object storage namespace shown in Tenancy details."
        )
    if not user:
        raise TutorialError(
            "The OCIR login needs your user name: set OCIR_USER (e.g. jane@example.com, as shown "
            "in the Console under Profile)."
        )
    if user.startswith(f"{namespace}/"):
        full = user
    elif "/" in user:
        raise TutorialError(
            f"OCIR_USER {user!r} contains '/' but does not start with the namespace "
            f"{namespace!r}: give the user name alone (jane@example.com) and the identity domain "
            "in OCIR_IDENTITY_DOMAIN, or the full login '<namespace>/<user>'."
        )
    else:
        full = "/".join(part for part in (namespace, domain, user) if part)
    parts = full.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise TutorialError(
            f"{full!r} is not an OCIR login: it must be '<namespace>/<user>', "
            f"'<namespace>/{FEDERATED_DOMAIN}/<user>' (federated) or "
            "'<namespace>/<identity-domain>/<user>'."
        )
    if any(ch.isspace() for ch in full) or ":" in full:
        raise TutorialError(
            f"The OCIR login {full!r} contains whitespace or ':', which no OCI user name has "
            "(and ':' would break the registry's basic authentication): check OCIR_USER."
        )
    return full


def image_reference(host: str, namespace: str, repository: str, tag: str) -> str:
    """``<host>/<namespace>/<repository>:<tag>``, checked with :func:`check_image_reference`."""
    parts = [p.strip().strip("/") for p in (host, namespace, repository)]
    if not all(parts):
        raise TutorialError(
            "An OCIR image reference needs a host, a namespace and a repository "
            f"(got host={host!r}, namespace={namespace!r}, repository={repository!r}): set "
            "REGION, OCIR_NAMESPACE and REPOSITORY."
        )
    return check_image_reference(f"{'/'.join(parts)}:{(tag or '').strip()}")


def check_image_reference(reference: str) -> str:
    """Return ``reference`` if it is ``<host>/<namespace>/<repo...>:<tag>``, else say what is
    wrong (the rules are the registry's: lowercase path components, a tag of letters, digits,
    ``_``, ``.`` and ``-``)."""
    ref = reference.strip()
    name, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        raise TutorialError(
            f"Image reference {reference!r} has no tag: add one, e.g. ':24.10-1' (this tutorial "
            "never pushes 'latest': the deployment pins the digest of a named tag)."
        )
    if not _TAG.fullmatch(tag):
        raise TutorialError(
            f"Invalid tag {tag!r} in {reference!r}: a tag has up to 128 letters, digits, '_', "
            "'.' and '-', and does not start with '.' or '-'."
        )
    host, _, path = name.partition("/")
    if not _HOST.fullmatch(host) or not ("." in host or ":" in host or host == "localhost"):
        raise TutorialError(
            f"Invalid registry host {host!r} in {reference!r}: use '<region-key>.ocir.io' "
            "(for example iad.ocir.io)."
        )
    components = path.split("/") if path else []
    if len(components) < 2:
        raise TutorialError(
            f"Invalid repository name in {reference!r}: OCIR needs "
            "'<host>/<tenancy-namespace>/<repository>:<tag>'."
        )
    for component in components:
        if not _PATH_COMPONENT.fullmatch(component):
            raise TutorialError(
                f"Invalid repository name {path!r} in {reference!r}: component {component!r} "
                "must be lowercase letters and digits, separated by '.', '_', '__' or '-' "
                "(no uppercase, no leading or trailing separator, no empty '//')."
            )
    if len(name) > 255:
        raise TutorialError(f"Image name {name!r} is longer than 255 characters: shorten it.")
    return ref


# --------------------------------------------------------------------------- engines


def _mask(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every secret replaced by ``****``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "****")
    return text


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(
    argv: list[str],
    *,
    stdin_text: str | None = None,
    secrets: Sequence[str] = (),
    echo: bool = True,
    timeout: float | None = None,
) -> tuple[int, str]:
    """Run ``argv`` with stderr merged into stdout and return ``(returncode, output)``, masked.

    ``echo=True`` streams the output line by line as it comes (build and push progress; the
    last 2,000 lines are kept); ``echo=False`` captures it, with an optional ``timeout``.
    """
    if not echo:
        try:
            done = subprocess.run(
                argv,
                input=stdin_text,
                stdin=None if stdin_text is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return 124, f"{Path(argv[0]).name} did not answer within {timeout:g} s"
        except OSError as err:
            raise TutorialError(f"Could not start {argv[0]}: {err}") from None
        return done.returncode, _mask(done.stdout or "", secrets)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
        )
    except OSError as err:
        raise TutorialError(f"Could not start {argv[0]}: {err}") from None
    if stdin_text is not None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(stdin_text)
            proc.stdin.close()
        except BrokenPipeError:
            pass
    kept: collections.deque[str] = collections.deque(maxlen=2000)
    previous = None
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = _mask(raw.rstrip("\n"), secrets)
        kept.append(line)
        if line.strip() and line != previous:
            print(line, flush=True)
        previous = line
    return proc.wait(), "\n".join(kept)


def _probe(argv: list[str]) -> tuple[int, str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, errors="replace")
    except (OSError, subprocess.TimeoutExpired) as err:
        return 1, str(err)
    return done.returncode, (done.stdout + done.stderr).strip()


def find_engine(
    prefer: str | None = None,
    *,
    global_args: Sequence[str] | None = None,
    build_args: Sequence[str] | None = None,
    login_args: Sequence[str] | None = None,
    push_args: Sequence[str] | None = None,
) -> ContainerEngine:
    """The first working container engine: ``prefer`` (``docker`` or ``podman``) or, when
    ``None``/``""``, Docker then Podman. "Working" means ``<engine> version`` succeeds: an
    installed Docker CLI whose daemon is not running does not count. Extra flags not given
    here come from the ``TUTORIAL_ENGINE_*_ARGS`` variables (``ENGINE_ARGS_ENV``), if set.

    Raises :class:`TutorialError` saying what was found and where this step can run instead.
    """

    def flags(given: Sequence[str] | None, kind: str) -> tuple[str, ...]:
        if given is not None:
            return tuple(given)
        return tuple(shlex.split(os.environ.get(ENGINE_ARGS_ENV[kind], "")))

    global_args = flags(global_args, "global_args")
    build_args = flags(build_args, "build_args")
    login_args = flags(login_args, "login_args")
    push_args = flags(push_args, "push_args")
    prefer = (prefer or "").strip().lower() or None
    if prefer is not None and prefer not in ENGINES:
        raise TutorialError(
            f"CONTAINER_ENGINE must be 'docker', 'podman' or '' (whichever works), not {prefer!r}."
        )
    problems = []
    for candidate in [prefer] if prefer else list(ENGINES):
        executable = shutil.which(candidate)
        if executable is None:
            problems.append(f"{candidate}: not installed (not on PATH)")
            continue
        _, banner = _probe([executable, "--version"])
        kind = "podman" if "podman" in banner.lower() else candidate
        fmt = "{{.Server.Version}}" if kind == "docker" else "{{.Client.Version}}"
        rc, out = _probe([executable, *global_args, "version", "--format", fmt])
        if rc != 0 or not out:
            hint = (
                " Is the Docker daemon running? Start Docker Desktop, or `sudo systemctl start "
                "docker`, and make sure your user may use it (`docker info`)."
                if kind == "docker"
                else " Run `podman info` to see why."
            )
            problems.append(
                f"{candidate}: installed at {executable} but not working: {_tail(out, 3)}.{hint}"
            )
            continue
        return ContainerEngine(
            name=kind,
            executable=executable,
            version=out.splitlines()[-1].strip(),
            global_args=tuple(global_args),
            build_args=tuple(build_args),
            login_args=tuple(login_args),
            push_args=tuple(push_args),
        )
    raise TutorialError(
        "No working container engine (" + "; ".join(problems) + "). Building and pushing the "
        "serving image needs Docker or Podman: run this notebook on a workstation or an OCI "
        "Compute VM that has one (50 GB of disk or more). OCI Data Science notebook sessions "
        "cannot run a container engine, so this step cannot run there, and OCI Cloud Shell's "
        "5 GB of home storage cannot hold the base image (docs/tested-versions.md, The serving image's size)."
    )


# --------------------------------------------------------------------------- steps


def _read_token(token_env: str, prompt: str) -> str:
    token = os.environ.get(token_env, "")
    if token:
        return token
    try:
        token = getpass.getpass(prompt)
    except Exception:  # papermill / no terminal: Jupyter refuses stdin
        token = ""
    if not token:
        raise TutorialError(
            f"No OCIR auth token: set the environment variable {token_env} before starting "
            "Jupyter (for example `read -s OCIR_AUTH_TOKEN && export OCIR_AUTH_TOKEN`), or run "
            "the notebook interactively to type it at the prompt. Create a token in the Console: "
            "Profile > Auth tokens > Generate token."
        )
    return token


def registry_login(
    engine: ContainerEngine,
    host: str,
    username: str,
    *,
    token_env: str = AUTH_TOKEN_ENV,
    argv: list[str] | None = None,
) -> None:
    """``<engine> login <host> --username <username> --password-stdin`` (or ``argv``, the same
    command written out by the caller), explaining a refusal.

    The auth token comes from ``$token_env`` or a getpass prompt, goes to the engine on stdin,
    and is dropped; the engine keeps the credential in its own store (Docker:
    ``~/.docker/config.json`` or a credential helper; Podman: ``$REGISTRY_AUTH_FILE`` or
    ``${XDG_RUNTIME_DIR}/containers/auth.json``). Log out with :func:`registry_logout`.
    """
    token = _read_token(token_env, f"OCIR auth token for {username}: ")
    if argv is None:
        argv = engine.command(
            "login", *engine.login_args, "--username", username, "--password-stdin", host
        )
        print(f"$ {engine.name} login {host} --username {username} --password-stdin")
    if "--password-stdin" not in argv:
        raise TutorialError("The login command must read the token from stdin: --password-stdin.")
    rc, out = _run(argv, stdin_text=token, secrets=[token], echo=False, timeout=120)
    message = _mask(_tail(out, 6), [token])
    del token
    if rc == 0:
        print(f"Logged in to {host} as {username}.")
        return
    if _REFUSED.search(message):
        raise TutorialError(
            f"{host} refused the login for {username!r}: {message}\nWhat to check: the login "
            f"form ('<namespace>/<user>', '<namespace>/{FEDERATED_DOMAIN}/<user>' if you sign "
            "in through Identity Cloud Service, '<namespace>/<identity-domain>/<user>' for a "
            "non-default identity domain); that the password is an auth token (Profile > Auth "
            "tokens), not your Console password, and was copied whole (a new token can take a "
            "minute to work); and that the region key in the host is where you push."
        )
    raise TutorialError(
        f"Login to {host} failed ({engine.name} exit code {rc}): {message}\nCheck the host "
        "name (<region-key>.ocir.io), your network or proxy, and that the engine works."
    )


def registry_logout(engine: ContainerEngine, host: str) -> None:
    """``<engine> logout <host>``: remove the stored credential (no error if there was none)."""
    rc, out = _run(engine.command("logout", host), echo=False, timeout=60)
    if rc == 0:
        print(f"Logged out of {host}.")
    elif "not logged in" in out.lower():
        print(f"Not logged in to {host}: nothing to remove.")
    else:
        raise TutorialError(f"`{engine.name} logout {host}` failed: {_tail(out, 4)}")


def build_image(
    engine: ContainerEngine,
    reference: str,
    *,
    dockerfile: str | Path = DOCKERFILE,
    context: str | Path | None = None,
    platform: str | None = "linux/amd64",
    argv: list[str] | None = None,
) -> float:
    """``<engine> build -f <dockerfile> -t <reference> <context>`` (or ``argv``, the same
    command written out by the caller), streaming the engine's output and explaining a
    failure; returns the seconds it took.

    ``platform`` defaults to ``linux/amd64`` because OCI's GPU shapes are x86_64 (on an Apple
    Silicon Mac this builds under emulation). Podman builds in Docker's image format, which
    keeps the HEALTHCHECK (the OCI format drops it).
    """
    reference = check_image_reference(reference)
    if argv is None:
        dockerfile = Path(dockerfile).resolve()
        if not dockerfile.is_file():
            raise TutorialError(f"No Dockerfile at {dockerfile}: check DOCKERFILE.")
        context = Path(context).resolve() if context is not None else dockerfile.parent
        argv = engine.command("build", *engine.build_args, "-f", str(dockerfile), "-t", reference)
        if engine.name == "podman":
            argv += ["--format", "docker"]
        if platform:
            argv += ["--platform", platform]
        argv.append(str(context))
    print("$ " + " ".join(argv))
    start = time.perf_counter()
    rc, out = _run(argv)
    seconds = time.perf_counter() - start
    if rc != 0:
        lower = out.lower()
        hint = "Read the engine's output above; fix the Dockerfile or the engine, then re-run."
        if "no space left" in lower:
            hint = (
                "The disk is full: the Triton base image is about 15.5 GB unpacked (NVIDIA, 24.06). Free space "
                f"(`{engine.name} system prune`) or build on a machine with more disk."
            )
        elif "exec format error" in lower:
            hint = (
                f"The build ran {platform} binaries without emulation: install QEMU/binfmt "
                "(Docker Desktop has it) or build on an x86_64 machine."
            )
        elif "nvcr.io" in lower and _REFUSED.search(out):
            hint = (
                "nvcr.io refused the base image pull. It is public, so this is usually a stale "
                f"login: `{engine.name} logout nvcr.io`, or log in with an NGC API key "
                "(user '$oauthtoken')."
            )
        raise TutorialError(
            f"Building {reference} failed after {seconds:.0f} s ({engine.name} exit code {rc}):\n"
            f"{_tail(out)}\n{hint}"
        )
    print(f"Built {reference} in {seconds:.1f} s.")
    return seconds


def digest_from_push_output(output: str, reference: str | None = None) -> str | None:
    """The manifest digest in ``docker push`` output (``<tag>: digest: sha256:... size: N``)."""
    tag = reference.rpartition(":")[2] if reference else None
    found = None
    for line in output.splitlines():
        match = re.search(r"(\S+): digest: (sha256:[0-9a-f]{64}) size: \d+", line)
        if match and (tag is None or match.group(1) == tag):
            found = match.group(2)
    return found


def _docker_repo_digest(engine: ContainerEngine, reference: str) -> str | None:
    rc, out = _probe(
        engine.command(
            "inspect", "--format", "{{range .RepoDigests}}{{println .}}{{end}}", reference
        )
    )
    name = reference.rpartition(":")[0]
    for line in out.splitlines() if rc == 0 else []:
        repo, _, digest = line.strip().partition("@")
        if repo == name and _DIGEST.fullmatch(digest):
            return digest
    return None


def image_size_bytes(engine: ContainerEngine, reference: str) -> int:
    """The local image's size as the engine reports it (``<engine> image inspect``: the
    unpacked size, what ``docker images`` shows)."""
    rc, out = _probe(engine.command("image", "inspect", "--format", "{{.Size}}", reference))
    size = out.strip().splitlines()[-1] if rc == 0 and out.strip() else ""
    if not size.isdigit():
        raise TutorialError(
            f"Could not read the size of the local image {reference}: {_tail(out, 3)}. Build it "
            "first (build_image), under exactly this reference."
        )
    return int(size)


#: compressed_size_bytes' results, by (engine, reference, unpacked size): it reads the image.
_COMPRESSED: dict[tuple[str, str, int], int] = {}


def compressed_size_bytes(engine: ContainerEngine, reference: str, level: int = 1) -> int:
    """About the bytes a deployment pulls: the image's layers gzip-compressed, as a registry
    stores them. ``<engine> save`` streamed through gzip at ``level`` and counted, nothing
    written to disk; level 1 compresses less than the engines' own gzip (level 6 by default),
    so the figure errs on the large side. It reads the whole image (minutes for the NGC base);
    a second call for the same image returns the first figure."""
    import zlib

    from tqdm.auto import tqdm

    key = (engine.executable, reference, image_size_bytes(engine, reference))
    if key in _COMPRESSED:
        return _COMPRESSED[key]
    argv = engine.command("save", reference)
    print("$ " + " ".join(argv) + " | gzip -1 | wc -c")
    gzip = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: the gzip format
    total = 0
    with (
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc,
        tqdm(total=key[2], unit="B", unit_scale=True, desc="gzip", leave=False) as bar,
    ):
        for chunk in iter(lambda: proc.stdout.read(1 << 22), b""):
            total += len(gzip.compress(chunk))
            bar.update(len(chunk))
        total += len(gzip.flush())
        errors = proc.stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        raise TutorialError(f"Could not read the local image {reference}: {_tail(errors, 3)}")
    _COMPRESSED[key] = total
    return total


def check_image_size(size: int, reference: str = "the image", compressed: int | None = None) -> str:
    """Return a line stating the size against OCI's 16 GB limit; raise if the image is over it.

    The limit exists because a deployment must pull the image within 20 minutes, and a pull
    moves the compressed layers; OCI's page does not say which size it means. So: an image
    within 16 GB unpacked passes; a larger one passes when ``compressed``
    (:func:`compressed_size_bytes`) is within 16 GB, and the line says so.
    """
    shown = f"{size / 1e9:.2f} GB"
    if compressed is not None:
        shown += f" unpacked, {compressed / 1e9:.2f} GB compressed (what a deployment pulls)"
    line = (
        f"{reference}: {shown}; OCI model deployments take images up to "
        f"{OCI_IMAGE_LIMIT_BYTES / 1e9:.0f} GB"
    )
    if size <= OCI_IMAGE_LIMIT_BYTES:
        return line + "."
    if compressed is not None and compressed <= OCI_IMAGE_LIMIT_BYTES:
        return (
            f"{line}: within it as pulled (OCI's page does not say whether the limit is on the "
            "unpacked or the compressed size; the pull it is there for moves the compressed "
            "layers)."
        )
    raise TutorialError(
        f"{line}, so it is not pushed. A model deployment must pull its image within 20 "
        f"minutes, and OCI requires the image to be within 16 GB ({IMAGE_LIMIT_DOC}). Make "
        "it smaller: compose a Triton image with only the python and onnxruntime backends "
        "(Triton's compose.py), or build on the -py3-min image (docs/tested-versions.md, The "
        "serving image's size)."
    )


def push_image(
    engine: ContainerEngine,
    reference: str,
    *,
    max_bytes: int | None = OCI_IMAGE_LIMIT_BYTES,
    argv: list[str] | None = None,
) -> str:
    """``<engine> push <reference>`` (or ``argv``, the same command written out by the caller),
    streaming progress and explaining a refusal; returns the manifest digest (``sha256:...``)
    the registry now serves for it.

    Refuses an image over ``max_bytes`` (OCI's 16 GB limit for model deployment images) both
    unpacked and compressed (:func:`check_image_size`) before uploading anything. Podman
    writes the digest with ``--digestfile``; for Docker it is read from the push output, else
    from ``docker inspect``'s RepoDigests.
    """
    reference = check_image_reference(reference)
    if max_bytes is not None:
        size = image_size_bytes(engine, reference)
        if size > max_bytes:  # over it unpacked: what counts is what a deployment pulls
            compressed = compressed_size_bytes(engine, reference)
            if compressed > max_bytes:
                check_image_size(size, reference, compressed)  # raises with OCI's reason
                raise TutorialError(
                    f"{reference} is {compressed:,} bytes compressed, over {max_bytes:,}: "
                    "not pushed."
                )
    host = reference.partition("/")[0]
    with tempfile.TemporaryDirectory(prefix="push-") as tmp:
        digest_file = Path(tmp) / "digest"
        if argv is None:
            argv = engine.command("push", *engine.push_args)
            if engine.name == "podman":
                argv += ["--digestfile", str(digest_file)]
            argv.append(reference)
        elif "--digestfile" in argv:
            digest_file = Path(argv[argv.index("--digestfile") + 1])
        print("$ " + " ".join(argv))
        start = time.perf_counter()
        rc, out = _run(argv)
        seconds = time.perf_counter() - start
        digest = digest_file.read_text().strip() if digest_file.exists() else None
    if rc != 0:
        lower = out.lower()
        if _REFUSED.search(out):
            raise TutorialError(
                f"{host} refused the push of {reference}:\n{_tail(out, 6)}\nWhat to do: log in "
                "first (registry_login; logins expire when the auth token is deleted); check that "
                "the namespace in the reference is your tenancy's; that your group may push "
                "(policy `allow group <your-group> to manage repos in compartment "
                "<compartment>`: docs/iam-policies.md); and that a repository of that name, if "
                "it exists, is in that compartment."
            )
        if any(word in lower for word in ("invalid reference", "name invalid", "lowercase")):
            raise TutorialError(
                f"{host} rejected the name {reference!r}:\n{_tail(out, 4)}\nUse lowercase "
                "'<region-key>.ocir.io/<namespace>/<repository>:<tag>'."
            )
        if any(word in lower for word in ("no such image", "image not known", "does not exist")):
            raise TutorialError(
                f"There is no local image {reference}: build it first (build_image), under "
                "exactly this reference."
            )
        raise TutorialError(
            f"Pushing {reference} failed after {seconds:.0f} s ({engine.name} exit code {rc}):\n"
            f"{_tail(out)}\nCheck the network (the image is several GB) and re-run: layers "
            "already uploaded are skipped."
        )
    if digest is None and engine.name == "docker":
        digest = digest_from_push_output(out, reference) or _docker_repo_digest(engine, reference)
    if digest is None or not _DIGEST.fullmatch(digest):
        raise TutorialError(
            f"Pushed {reference}, but could not read its digest (got {digest!r}). Read it in the "
            "Console (Container Registry > repository > image) and record it by hand."
        )
    print(f"Pushed {reference} in {seconds:.1f} s: {digest}")
    return digest


def remove_local_image(engine: ContainerEngine, reference: str) -> None:
    """``<engine> rmi <reference>`` (frees disk; the pushed copy in the registry stays)."""
    rc, out = _run(engine.command("rmi", reference), echo=False, timeout=300)
    if rc != 0 and "no such image" not in out.lower() and "image not known" not in out.lower():
        raise TutorialError(f"`{engine.name} rmi {reference}` failed: {_tail(out, 4)}")
    print(f"Removed the local image {reference}.")


def record_image(
    reference: str,
    digest: str,
    *,
    registry: str,
    engine: ContainerEngine | str,
    size_bytes: int | None = None,
    repository: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the pushed image to the state file's ``image`` section for notebook 06.

    Notebook 06 deploys ``reference`` pinned to ``digest``, so the deployment runs exactly the
    bytes pushed here even if the tag is pushed again later. ``size_bytes`` and ``repository``
    (:func:`ensure_container_repository`'s answer: its OCID and compartment) are kept with it.
    """
    reference = check_image_reference(reference)
    if not _DIGEST.fullmatch(digest):
        raise TutorialError(f"{digest!r} is not an image digest (sha256:<64 hex digits>).")
    try:
        weights = weights_label()
    except TutorialError:  # notebook 01 did not run here: the image holds no weights anyway
        weights = None
    state = update_state(
        "image",
        reference=reference,
        digest=digest,
        pinned=f"{reference.rpartition(':')[0]}@{digest}",
        registry=registry,
        engine=engine if isinstance(engine, str) else engine.name,
        weights=weights,
        size_bytes=size_bytes,
        repository=repository,
        cmd=list(TRITON_CMD),
        server_port=TRITON_PORTS["http"],
        health_check_port=TRITON_PORTS["http"],
        pushed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    return state["image"]


# --------------------------------------------------------------------------- the repository


def ensure_container_repository(
    client: Any, compartment_id: str, display_name: str
) -> dict[str, Any]:
    """Find, or create, the private OCIR repository ``display_name`` in ``compartment_id``.

    A push to a repository that does not exist yet creates it in the tenancy's root
    compartment, where a deployment whose policy names your compartment cannot read it; so
    this runs before the push. ``client`` is an ``oci.artifacts.ArtifactsClient``. Returns
    ``{"id", "display_name", "compartment_id", "namespace", "created"}``.
    """
    import oci
    from oci.artifacts.models import CreateContainerRepositoryDetails

    try:
        found = oci.pagination.list_call_get_all_results(
            client.list_container_repositories,
            compartment_id=compartment_id,
            display_name=display_name,
        ).data
        created = False
        if found:
            repository = found[0]
        else:
            repository = client.create_container_repository(
                CreateContainerRepositoryDetails(
                    compartment_id=compartment_id, display_name=display_name, is_public=False
                )
            ).data
            created = True
    except oci.exceptions.ServiceError as exc:
        if exc.status == 409:
            raise TutorialError(
                f"A repository named {display_name!r} already exists in your tenancy, but not "
                f"in compartment {compartment_id} (HTTP 409 {exc.code}: {exc.message}). Move it "
                "there (Console > Container Registry > repository > Move resource), or choose "
                "another REPOSITORY."
            ) from exc
        if exc.status in (401, 404):
            raise TutorialError(
                f"Container Registry refused to list or create {display_name!r} in compartment "
                f"{compartment_id} (HTTP {exc.status} {exc.code}: {exc.message}). Your group "
                "needs: allow group <your-group> to manage repos in compartment <compartment> "
                "(docs/iam-policies.md)."
            ) from exc
        raise TutorialError(
            f"Container Registry: HTTP {exc.status} {exc.code}: {exc.message}"
        ) from exc
    return {
        "id": repository.id,
        "display_name": repository.display_name,
        "compartment_id": repository.compartment_id,
        "namespace": getattr(repository, "namespace", None),
        "created": created,
    }

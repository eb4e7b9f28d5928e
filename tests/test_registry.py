"""Notebook 05's registry plumbing against real parts: Podman, and Debian's docker-registry (the
CNCF distribution registry, which OCIR also speaks) on 127.0.0.1 with htpasswd (bcrypt) auth,
standing in for OCIR. The image is a small one built FROM scratch: the real Dockerfile's base is
on NGC, out of reach here (tests/test_dockerfile.py checks that file statically).

Needs: apt-get install podman docker-registry apache2-utils. Without them these tests skip; with
CI=true they fail.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tutorial import registry
from tutorial.common import REPO_ROOT, TutorialError, load_state, update_state

NAMESPACE = "mytenancy"
COMPARTMENT = "ocid1.compartment.oc1..standincompartment"
USER = "jane@example.com"
DOMAIN = registry.FEDERATED_DOMAIN
# What htpasswd stores and the registry checks: the same string ocir_username() composes.
LOGIN = "mytenancy/oracleidentitycloudservice/jane@example.com"
REPOSITORY = "oci-datascience-triton-server/round-trip"
MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    ]
)
CONTAINERFILE = """\
FROM scratch
COPY hello.txt /hello.txt
LABEL org.opencontainers.image.title="registry round trip"
HEALTHCHECK --interval=30s CMD ["/hello.txt"]
CMD ["/hello.txt"]
"""


def require_tools(*names: str) -> None:
    """Skip (or, with CI=true, fail) when a system tool is missing."""
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        message = (
            f"{', '.join(missing)} not installed: apt-get install podman docker-registry "
            "apache2-utils"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- unit checks


def test_ocir_host_from_region_key_or_identifier():
    assert registry.ocir_host("iad") == "iad.ocir.io"
    assert registry.ocir_host(" FRA ") == "fra.ocir.io"
    assert registry.ocir_host("us-ashburn-1") == "iad.ocir.io"  # via the OCI SDK's table
    assert registry.ocir_host("eu-frankfurt-1") == "fra.ocir.io"
    assert registry.ocir_host("uk-london-1") == "lhr.ocir.io"
    assert registry.ocir_host("phx.ocir.io") == "phx.ocir.io"
    with pytest.raises(TutorialError, match=r"^'ashburn' is not an OCI region key"):
        registry.ocir_host("ashburn")
    with pytest.raises(TutorialError, match=r"^Unknown OCI region 'xx-nowhere-9'"):
        registry.ocir_host("xx-nowhere-9")


def test_push_region_defaults_to_the_credentials_and_refuses_another():
    assert registry.push_region("", "us-ashburn-1") == "iad"
    assert registry.push_region("iad", "us-ashburn-1") == "iad"
    assert registry.push_region("us-ashburn-1", "us-ashburn-1") == "iad"
    assert registry.push_region("fra", None) == "fra"
    with pytest.raises(TutorialError) as err:
        registry.push_region("fra", "us-ashburn-1")
    assert str(err.value).startswith(
        "REGION='fra' pushes to fra.ocir.io, but your OCI credentials talk to us-ashburn-1 "
        "(iad.ocir.io), where section 4 creates the repository and notebook 06 deploys."
    )


def test_ocir_username_forms():
    assert registry.ocir_username(NAMESPACE, USER) == "mytenancy/jane@example.com"
    assert registry.ocir_username(NAMESPACE, USER, DOMAIN) == LOGIN
    assert (
        registry.ocir_username(NAMESPACE, USER, "MyDomain") == "mytenancy/MyDomain/jane@example.com"
    )
    # a full login given as the user is kept as is
    assert registry.ocir_username(NAMESPACE, LOGIN, "") == LOGIN
    assert registry.ocir_username(NAMESPACE, "mytenancy/jane", "ignored") == "mytenancy/jane"


@pytest.mark.parametrize(
    ("namespace", "user", "domain", "message"),
    [
        ("", USER, "", r"^The OCIR login needs your tenancy's namespace: set OCIR_NAMESPACE"),
        ("my tenancy", USER, "", r"^'my tenancy' is not a tenancy namespace"),
        (NAMESPACE, "", "", r"^The OCIR login needs your user name: set OCIR_USER"),
        (NAMESPACE, "other/jane", "", r"^OCIR_USER 'other/jane' contains '/' but does not start"),
        (NAMESPACE, "jane:x", "", r"contains whitespace or ':'"),
        (NAMESPACE, "jane doe", "", r"contains whitespace or ':'"),
        (NAMESPACE, "mytenancy/a/b/jane", "", r"is not an OCIR login: it must be"),
    ],
)
def test_ocir_username_errors(namespace, user, domain, message):
    with pytest.raises(TutorialError, match=message):
        registry.ocir_username(namespace, user, domain)


def test_image_reference_checks():
    ref = registry.image_reference("iad.ocir.io", NAMESPACE, REPOSITORY, "24.10-1")
    assert ref == "iad.ocir.io/mytenancy/oci-datascience-triton-server/round-trip:24.10-1"
    assert registry.check_image_reference("127.0.0.1:5000/ns/repo:1") == "127.0.0.1:5000/ns/repo:1"
    cases = {
        "iad.ocir.io/mytenancy/GPT2:1": r"^Invalid repository name 'mytenancy/GPT2'.*'GPT2'",
        "iad.ocir.io/mytenancy/gpt2-:1": r"component 'gpt2-' must be lowercase",
        "iad.ocir.io/mytenancy//gpt2:1": r"component '' must be lowercase",
        "iad.ocir.io/gpt2:1": r"OCIR needs '<host>/<tenancy-namespace>/<repository>:<tag>'",
        "iad.ocir.io/mytenancy/gpt2": r"has no tag",
        "iad.ocir.io/mytenancy/gpt2:.bad": r"^Invalid tag '.bad'",
        "mytenancy/gpt2/x:1": r"^Invalid registry host 'mytenancy'",
    }
    for reference, message in cases.items():
        with pytest.raises(TutorialError, match=message):
            registry.check_image_reference(reference)
    with pytest.raises(TutorialError, match=r"needs a host, a namespace and a repository"):
        registry.image_reference("", NAMESPACE, REPOSITORY, "1")


def test_digest_from_docker_push_output():
    digest = "sha256:" + "ab" * 32
    output = (
        "The push refers to repository [iad.ocir.io/mytenancy/gpt2-triton]\n"
        "5f70bf18a086: Pushed\n"
        f"other: digest: sha256:{'cd' * 32} size: 1570\n"
        f"24.10-1: digest: {digest} size: 5342\n"
    )
    assert registry.digest_from_push_output(output, "iad.ocir.io/mytenancy/x:24.10-1") == digest
    assert registry.digest_from_push_output("5f70bf18a086: Pushed\n") is None


def test_find_engine_without_any_engine(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: neither docker nor podman
    with pytest.raises(TutorialError) as err:
        registry.find_engine()
    assert str(err.value).startswith(
        "No working container engine (docker: not installed (not on PATH); podman: not "
        "installed (not on PATH)). Building and pushing the serving image needs Docker or Podman"
    )
    assert "notebook sessions cannot run a container engine" in str(err.value)
    with pytest.raises(TutorialError, match=r"^CONTAINER_ENGINE must be 'docker', 'podman'"):
        registry.find_engine("containerd")


def test_find_engine_docker_cli_without_daemon(tmp_path, monkeypatch):
    """An installed docker command whose daemon does not answer is not a working engine."""
    if shutil.which("docker") is None:
        pytest.skip("no docker command on this machine")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-daemon.sock")
    with pytest.raises(TutorialError) as err:
        registry.find_engine("docker")
    message = str(err.value)
    where = shutil.which("docker")
    assert message.startswith(f"No working container engine (docker: installed at {where} but ")
    assert "Is the Docker daemon running?" in message


def test_find_engine_treats_podmans_docker_shim_as_podman(tmp_path, monkeypatch):
    require_tools("podman")
    shim = tmp_path / "docker"  # what Debian's podman-docker package installs
    shim.write_text(f'#!/bin/sh\nexec {shutil.which("podman")} "$@"\n')
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    engine = registry.find_engine()
    assert engine.name == "podman" and engine.executable == str(tmp_path / "docker")
    assert re.fullmatch(r"\d+\.\d+\.\d+", engine.version)


def test_image_over_16_gb_is_refused_before_the_push(monkeypatch):
    """OCI requires a deployment's image within 16 GB (it must be pulled within 20 minutes)."""
    engine = registry.ContainerEngine("podman", "/usr/bin/podman", "5.0.0")
    ran = []
    monkeypatch.setattr(registry, "_run", lambda argv, **kw: ran.append(argv) or (0, ""))
    monkeypatch.setattr(registry, "image_size_bytes", lambda engine, ref: 16_500_000_000)
    monkeypatch.setattr(registry, "compressed_size_bytes", lambda engine, ref: 16_400_000_000)
    reference = "iad.ocir.io/mytenancy/gpt2-triton:24.10-1"
    with pytest.raises(TutorialError) as err:
        registry.push_image(engine, reference)
    message = str(err.value)
    assert message.startswith(
        f"{reference}: 16.50 GB unpacked, 16.40 GB compressed (what a deployment pulls); OCI "
        "model deployments take images up to 16 GB, so it is not pushed. A model deployment must pull its image within 20 minutes, and OCI requires the "
        "image to be within 16 GB (https://docs.oracle.com/en-us/iaas/Content/data-science/"
        "using/tshoot-model-deploy-byoc.htm)."
    )
    assert "compose.py" in message and "-py3-min" in message
    assert ran == []  # nothing was uploaded
    # the limit itself passes
    assert registry.check_image_size(16_000_000_000).endswith("take images up to 16 GB.")


def test_an_image_over_16_gb_unpacked_but_not_as_pulled_is_pushed(monkeypatch, tmp_path):
    """The serving image (NGC -py3 base about 15.5-16 GB, plus onnxruntime-gpu's 640 MB) is over
    16 GB unpacked; a deployment pulls the compressed layers, and those are what is checked."""
    engine = registry.ContainerEngine("podman", "/usr/bin/podman", "5.0.0")
    pushed = []
    monkeypatch.setattr(registry, "image_size_bytes", lambda engine, ref: 16_300_000_000)
    monkeypatch.setattr(registry, "compressed_size_bytes", lambda engine, ref: 8_100_000_000)

    def run(argv, **kw):
        pushed.append(argv)
        Path(argv[argv.index("--digestfile") + 1]).write_text("sha256:" + "a" * 64)
        return 0, ""

    monkeypatch.setattr(registry, "_run", run)
    reference = "iad.ocir.io/mytenancy/gpt2-triton:24.10-1"
    assert registry.push_image(engine, reference) == "sha256:" + "a" * 64
    assert len(pushed) == 1
    assert registry.check_image_size(16_300_000_000, reference, 8_100_000_000) == (
        f"{reference}: 16.30 GB unpacked, 8.10 GB compressed (what a deployment pulls); OCI "
        "model deployments take images up to 16 GB: within it as pulled (OCI's page does not "
        "say whether the limit is on the unpacked or the compressed size; the pull it is there "
        "for moves the compressed layers)."
    )


def test_the_compressed_size_is_the_saved_image_through_gzip(tmp_path):
    """compressed_size_bytes reads `<engine> save` (here a STAND-IN engine script that writes
    1 MB of zeros and then 1 MB of random bytes) and counts gzip's output."""
    import gzip
    import os

    data = bytes(2**20) + os.urandom(2**20)
    (tmp_path / "image.tar").write_bytes(data)
    fake = tmp_path / "podman"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = save ]; then cat ' + str(tmp_path / "image.tar") + "; exit 0; fi\n"
        'if [ "$1" = image ]; then echo ' + str(len(data)) + "; exit 0; fi\nexit 1\n"
    )
    fake.chmod(0o755)
    engine = registry.ContainerEngine("podman", str(fake), "5.0.0")
    size = registry.compressed_size_bytes(engine, "localhost/x:1")
    assert abs(size - len(gzip.compress(data, compresslevel=1))) < 64  # headers aside
    assert 2**20 < size < 2**20 + 2**16  # the zeros vanish, the random bytes do not shrink


def test_engine_flags_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(registry.ENGINE_ARGS_ENV["push_args"], "--tls-verify=false --quiet")
    fake = tmp_path / "podman"
    fake.write_text("#!/bin/sh\necho 'podman version 5.0.0'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    engine = registry.find_engine("podman")
    assert engine.push_args == ("--tls-verify=false", "--quiet") and engine.build_args == ()
    assert registry.find_engine("podman", push_args=[]).push_args == ()  # given wins


def test_record_image_writes_what_notebook_06_reads(tmp_path, monkeypatch):
    monkeypatch.setenv("TUTORIAL_WORKDIR", str(tmp_path))
    digest = "sha256:" + "0f" * 32
    ref = "iad.ocir.io/mytenancy/gpt2-triton:24.10-1"
    image = registry.record_image(ref, digest, registry="iad.ocir.io", engine="docker")
    assert image["weights"] is None  # notebook 01 did not run in this work folder
    update_state("model", weights="random-offline")
    image = registry.record_image(ref, digest, registry="iad.ocir.io", engine="docker")
    assert load_state()["image"] == image
    assert image["reference"] == ref and image["digest"] == digest
    assert image["pinned"] == f"iad.ocir.io/mytenancy/gpt2-triton@{digest}"
    assert (image["registry"], image["engine"], image["weights"]) == (
        "iad.ocir.io",
        "docker",
        "random-offline",
    )
    assert image["cmd"] == registry.TRITON_CMD and image["server_port"] == 8000
    with pytest.raises(TutorialError, match=r"is not an image digest"):
        registry.record_image(ref, "sha256:123", registry="iad.ocir.io", engine="docker")


# --------------------------------------------------------------------------- real registry


@dataclass
class LocalRegistry:
    host: str
    username: str
    password: str
    log: Path

    def get(self, path: str, method: str = "GET", **headers: str) -> requests.Response:
        return requests.request(
            method,
            f"http://{self.host}/v2/{path}",
            auth=(self.username, self.password),
            headers=headers,
            timeout=10,
        )

    def served_digest(self, repository: str, tag: str) -> str:
        """The digest the registry serves for ``repository:tag`` (HEAD, Docker-Content-Digest)."""
        response = self.get(f"{repository}/manifests/{tag}", "HEAD", Accept=MANIFEST_TYPES)
        assert response.status_code == 200, response.status_code
        return response.headers["Docker-Content-Digest"]


@pytest.fixture(scope="module")
def local_registry(tmp_path_factory):
    """docker-registry on a free loopback port, htpasswd (bcrypt) auth, storage in a tmp dir."""
    require_tools("docker-registry", "htpasswd")
    root = tmp_path_factory.mktemp("registry")
    password = secrets.token_urlsafe(24)
    done = subprocess.run(
        ["htpasswd", "-Bni", LOGIN], input=password, capture_output=True, text=True, check=True
    )
    (root / "htpasswd").write_text(done.stdout)
    assert done.stdout.startswith(f"{LOGIN}:$2y$")  # htpasswd keeps the '/' and '@' as given
    port = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16)},
        "auth": {"htpasswd": {"realm": "ocir-stand-in", "path": str(root / "htpasswd")}},
    }
    (root / "config.yml").write_text(json.dumps(config))  # YAML reads JSON
    log = root / "registry.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["docker-registry", "serve", str(root / "config.yml")], stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"docker-registry exited: {log.read_text()[-2000:]}"
            try:
                status = requests.get(f"http://127.0.0.1:{port}/v2/", timeout=2).status_code
                if status == 401:  # up, and asking for credentials
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"registry not up in 30 s: {log.read_text()}"
            time.sleep(0.2)
        yield LocalRegistry(f"127.0.0.1:{port}", LOGIN, password, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory):
    """Podman storage, run root, temp files and credential store in a tmp dir, removed after."""
    require_tools("podman")
    root = tmp_path_factory.mktemp("podman")
    (root / "tmp").mkdir()
    runroot = Path(tempfile.mkdtemp(prefix="podman-run-", dir="/tmp"))  # podman: <= 50 chars
    flags = {
        # rootful Podman inside a container: vfs storage and chroot isolation; the loopback
        # registry speaks plain HTTP. Test settings, passed as the helpers read them (the
        # TUTORIAL_ENGINE_*_ARGS variables), never defaults for users.
        "global_args": (
            "--root",
            str(root / "storage"),
            "--runroot",
            str(runroot),
            "--storage-driver=vfs",
        ),
        "build_args": ("--isolation=chroot",),
        "login_args": ("--tls-verify=false",),
        "push_args": ("--tls-verify=false",),
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REGISTRY_AUTH_FILE", str(root / "auth.json"))
        mp.setenv("TMPDIR", str(root / "tmp"))
        for kind, args in flags.items():
            mp.setenv(registry.ENGINE_ARGS_ENV[kind], shlex.join(args))
        yield {
            "root": root,
            **flags,
        }
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(runroot, ignore_errors=True)


@pytest.fixture(scope="module")
def engine(podman_env) -> registry.ContainerEngine:
    found = registry.find_engine("podman")  # the flags come from TUTORIAL_ENGINE_*_ARGS
    for kind in registry.ENGINE_ARGS_ENV:
        assert getattr(found, kind) == podman_env[kind]
    return found


@pytest.fixture
def context(tmp_path) -> Path:
    folder = tmp_path / "context"
    folder.mkdir()
    (folder / "hello.txt").write_text("hello from the registry round trip\n")
    (folder / "Containerfile").write_text(CONTAINERFILE)
    return folder


@pytest.mark.slow
def test_round_trip_digest_matches_what_the_registry_serves(
    local_registry, engine, context, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("TUTORIAL_WORKDIR", str(tmp_path / "work"))
    update_state("model", weights="random-offline")
    monkeypatch.setenv(registry.AUTH_TOKEN_ENV, local_registry.password)
    username = registry.ocir_username(NAMESPACE, USER, DOMAIN)
    assert username == local_registry.username
    reference = registry.image_reference(local_registry.host, NAMESPACE, REPOSITORY, "1.0")

    start = time.perf_counter()
    registry.build_image(engine, reference, dockerfile=context / "Containerfile", context=context)
    built = time.perf_counter()
    size = registry.image_size_bytes(engine, reference)
    assert 0 < size < 10_000  # one small file, FROM scratch
    assert registry.check_image_size(size, reference) == (
        f"{reference}: 0.00 GB; OCI model deployments take images up to 16 GB."
    )
    registry.registry_login(engine, local_registry.host, username)
    digest = registry.push_image(engine, reference)
    pushed = time.perf_counter()
    image = registry.record_image(reference, digest, registry=local_registry.host, engine=engine)

    served = local_registry.served_digest(f"{NAMESPACE}/{REPOSITORY}", "1.0")
    assert served == digest == load_state()["image"]["digest"]
    assert image["reference"] == reference and image["engine"] == "podman"
    assert image["registry"] == local_registry.host and image["weights"] == "random-offline"

    # what was pushed: Docker's manifest format (so the HEALTHCHECK survives), one layer
    manifest = local_registry.get(
        f"{NAMESPACE}/{REPOSITORY}/manifests/{digest}", Accept=MANIFEST_TYPES
    ).json()
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert len(manifest["layers"]) == 1
    config = local_registry.get(
        f"{NAMESPACE}/{REPOSITORY}/blobs/{manifest['config']['digest']}"
    ).json()
    assert config["config"]["Healthcheck"]["Test"] == ["CMD", "/hello.txt"]
    assert config["config"]["Cmd"] == ["/hello.txt"]
    assert config["architecture"] == "amd64"  # the platform OCI's shapes run

    # the token reached the engine's credential store and nothing else
    output = capsys.readouterr()
    assert local_registry.password not in output.out + output.err
    assert local_registry.password not in json.dumps(load_state())
    auths = json.loads(Path(os.environ["REGISTRY_AUTH_FILE"]).read_text())["auths"]
    assert local_registry.host in auths
    with capsys.disabled():
        print(
            f"\n[registry round trip] build {built - start:.2f} s, login + push "
            f"{pushed - built:.2f} s, one layer of {manifest['layers'][0]['size']} B"
        )

    registry.registry_logout(engine, local_registry.host)
    auths = json.loads(Path(os.environ["REGISTRY_AUTH_FILE"]).read_text()).get("auths", {})
    assert local_registry.host not in auths
    registry.remove_local_image(engine, reference)


@pytest.mark.slow
def test_wrong_password_is_refused_clearly(local_registry, engine, monkeypatch, capsys):
    wrong = "not-the-" + secrets.token_hex(8)
    monkeypatch.setenv(registry.AUTH_TOKEN_ENV, wrong)
    with pytest.raises(TutorialError) as err:
        registry.registry_login(engine, local_registry.host, local_registry.username)
    message = str(err.value)
    assert message.startswith(
        f"{local_registry.host} refused the login for '{local_registry.username}': "
    )
    assert "an auth token (Profile > Auth tokens)" in message
    output = capsys.readouterr()
    assert wrong not in message + output.out + output.err


@pytest.mark.slow
def test_token_from_getpass_when_the_variable_is_unset(local_registry, engine, monkeypatch):
    """Without $OCIR_AUTH_TOKEN the token is asked with getpass (stubbed: the keyboard); where
    nothing can be asked (papermill), the error says to set the variable."""
    monkeypatch.delenv(registry.AUTH_TOKEN_ENV, raising=False)
    prompts = []

    def typed(prompt: str) -> str:
        prompts.append(prompt)
        return local_registry.password

    monkeypatch.setattr(registry.getpass, "getpass", typed)
    registry.registry_login(engine, local_registry.host, local_registry.username)
    assert prompts == [f"OCIR auth token for {local_registry.username}: "]

    def no_stdin(prompt: str) -> str:
        raise NotImplementedError("raw_input was called, but this frontend does not support it")

    monkeypatch.setattr(registry.getpass, "getpass", no_stdin)
    with pytest.raises(TutorialError, match=r"^No OCIR auth token: set the environment variable "):
        registry.registry_login(engine, local_registry.host, local_registry.username)
    registry.registry_logout(engine, local_registry.host)


@pytest.mark.slow
def test_push_without_login_is_refused_clearly(
    local_registry, engine, context, tmp_path, monkeypatch
):
    (tmp_path / "empty-auth.json").write_text('{"auths": {}}')  # a credential store, empty
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "empty-auth.json"))
    reference = registry.image_reference(local_registry.host, NAMESPACE, "refused/push", "1.0")
    registry.build_image(engine, reference, dockerfile=context / "Containerfile", context=context)
    try:
        with pytest.raises(TutorialError) as err:
            registry.push_image(engine, reference)
        assert str(err.value).startswith(
            f"{local_registry.host} refused the push of {reference}:\n"
        )
        assert "authentication required" in str(err.value)
    finally:
        registry.remove_local_image(engine, reference)
    # nothing arrived
    response = local_registry.get(f"{NAMESPACE}/refused/push/manifests/1.0", "HEAD")
    assert response.status_code == 404


@pytest.mark.slow
def test_invalid_reference_is_refused_before_the_engine_runs(engine):
    with pytest.raises(TutorialError, match=r"^Invalid repository name 'MyTenancy/gpt2'"):
        registry.push_image(engine, "127.0.0.1:5000/MyTenancy/gpt2:1")
    with pytest.raises(TutorialError, match=r"has no tag"):
        registry.build_image(engine, "127.0.0.1:5000/mytenancy/gpt2")


# --------------------------------------------------------------------------- the notebook

NOTEBOOK = REPO_ROOT / "notebooks" / "05_build_push_image.ipynb"


def run_notebook(output: Path, parameters: dict) -> str:
    from tests.conftest import run_notebook as run

    output.parent.mkdir(parents=True, exist_ok=True)
    return run(NOTEBOOK.stem, output.parent, **parameters).read_text()


@pytest.mark.slow
def test_notebook_creates_the_repository_pushes_and_records_the_served_digest(
    local_registry, podman_env, context, tmp_path, monkeypatch
):
    from oci_standin import OciStandIn, make_test_credentials

    from tutorial.oci_deploy import ENDPOINT_OVERRIDE_ENV

    monkeypatch.setenv("TUTORIAL_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))
    monkeypatch.setenv("OCIR_AUTH_TOKEN", local_registry.password)
    monkeypatch.delenv("OCI_RESOURCE_PRINCIPAL_VERSION", raising=False)
    creds = make_test_credentials(tmp_path / "oci")
    repository = "oci-datascience-triton-server/from-notebook"
    with OciStandIn(creds, namespace=NAMESPACE) as standin:
        monkeypatch.setenv(ENDPOINT_OVERRIDE_ENV, standin.url)  # Container Registry's API
        executed = run_notebook(
            tmp_path / "05.ipynb",
            {
                "REGISTRY_HOST": local_registry.host,
                "OCIR_NAMESPACE": NAMESPACE,
                "OCIR_USER": USER,
                "OCIR_IDENTITY_DOMAIN": DOMAIN,
                "OCI_CONFIG_FILE": str(creds.config_file),
                "COMPARTMENT_OCID": COMPARTMENT,
                "REPOSITORY": repository,
                "TAG": "nb-1",
                "DOCKERFILE": str(context / "Containerfile"),
                "BUILD_CONTEXT": str(context),
                "CONTAINER_ENGINE": "podman",
                "CLEAN_UP": True,
            },
        )
        repositories = list(standin.repositories.values())
        assert standin.unhandled == []
    # the repository exists where the deployment's policy will look, before the push
    assert [(r.display_name, r.compartment_id) for r in repositories] == [(repository, COMPARTMENT)]
    assert f"Created repository {repository} ({repositories[0].id})" in executed
    assert f"in compartment {COMPARTMENT}, namespace {NAMESPACE}" in executed
    image = load_state()["image"]
    assert image["repository"]["compartment_id"] == COMPARTMENT
    assert 0 < image["size_bytes"] < 10_000
    assert "GB; OCI model deployments take images up to 16 GB." in executed
    served = local_registry.served_digest(f"{NAMESPACE}/{repository}", "nb-1")
    assert image["digest"] == served
    assert image["reference"] == f"{local_registry.host}/{NAMESPACE}/{repository}:nb-1"
    assert f"Logged in to {local_registry.host} as {LOGIN}." in executed
    assert local_registry.password not in executed
    # CLEAN_UP logged out: the credential is gone from the engine's store
    auths = json.loads((tmp_path / "auth.json").read_text()).get("auths", {})
    assert local_registry.host not in auths


def test_engine_flags_are_not_notebook_parameters():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    (parameters,) = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
    assert "_ARGS" not in "".join(parameters["source"])


@pytest.mark.slow
def test_notebook_without_engine_explains_and_stops_cleanly(tmp_path, monkeypatch):
    """Like `make run` on a machine with neither Docker nor Podman and no registry settings."""
    monkeypatch.setenv("TUTORIAL_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    for name in (
        "OCIR_REGION",
        "OCIR_NAMESPACE",
        "OCIR_USER",
        "CONTAINER_ENGINE",
        "NB_SESSION_COMPARTMENT_OCID",
    ):
        monkeypatch.delenv(name, raising=False)
    executed = run_notebook(
        tmp_path / "05.ipynb", {"OCI_CONFIG_FILE": str(tmp_path / "no-oci-config")}
    )
    assert "No working container engine (docker: not installed" in executed
    assert "Settings missing: REGION, OCIR_NAMESPACE, OCIR_USER, COMPARTMENT_OCID" in executed
    assert "No OCI credentials: not in a notebook session" in executed
    assert "Nothing will be built or pushed from here" in executed
    assert "No image recorded: nothing was pushed from here." in executed
    assert "Traceback" not in executed
    assert "image" not in load_state()


@pytest.mark.slow
def test_notebook_refuses_another_region_before_the_build(tmp_path, monkeypatch):
    """REGION names Frankfurt, the credentials Ashburn: refused in section 1, naming both; the
    engine (a recording fake) is asked its version and nothing else."""
    import papermill
    from oci_standin import make_test_credentials

    creds = make_test_credentials(tmp_path / "oci")  # region us-ashburn-1
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / "podman"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho "podman version 4.9.3"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    monkeypatch.setenv("TUTORIAL_WORKDIR", str(tmp_path / "work"))
    monkeypatch.delenv("OCI_RESOURCE_PRINCIPAL_VERSION", raising=False)
    with pytest.raises(papermill.PapermillExecutionError) as err:
        run_notebook(
            tmp_path / "05.ipynb",
            {
                "REGION": "fra",
                "OCIR_NAMESPACE": NAMESPACE,
                "OCIR_USER": USER,
                "OCI_CONFIG_FILE": str(creds.config_file),
                "COMPARTMENT_OCID": COMPARTMENT,
                "CONTAINER_ENGINE": "podman",
            },
        )
    assert (
        "REGION='fra' pushes to fra.ocir.io, but your OCI credentials talk to us-ashburn-1 "
        "(iad.ocir.io)" in str(err.value)
    )
    assert "Nothing was built or pushed." in str(err.value)
    asked = calls.read_text().splitlines()
    assert asked and all(
        line.split()[-3:-2] == ["version"] or line == "--version" for line in asked
    )
    assert "image" not in load_state()

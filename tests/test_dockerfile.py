"""docker/Dockerfile, checked without building it (its base image is on NGC, out of reach here).

The static checks read the Dockerfile's instructions; the slow check starts the tritonserver
bundled in nvidia-pytriton (the same release, 2.51.0, as the image's) with the image's CMD
flags and runs the image's HEALTHCHECK command against it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tutorial import registry
from tutorial.common import REPO_ROOT

DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
MODEL_MOUNT = "/opt/ds/model"


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs: continuation lines joined, comments dropped."""
    result, buffer = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments may also sit between continuation lines
        if line.endswith("\\"):
            buffer += line[:-1].rstrip() + " "
            continue
        buffer += line
        keyword, _, args = buffer.partition(" ")
        result.append((keyword.upper(), args.strip()))
        buffer = ""
    assert not buffer, f"dangling continuation: {buffer!r}"
    return result


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def only(parsed: list[tuple[str, str]], keyword: str) -> str:
    found = [args for kw, args in parsed if kw == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


def requirement_pins() -> dict[str, str]:
    pins = {}
    files = ("requirements.txt", "requirements-triton.txt")  # the second: nvidia-pytriton
    for line in "\n".join((REPO_ROOT / f).read_text() for f in files).splitlines():
        match = re.fullmatch(
            r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)", line.split("#")[0].strip()
        )
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def test_instruction_parser_joins_continuations_and_skips_comments():
    parsed = instructions('FROM a:1\n# c\nRUN x \\\n  # inner\n  && y\nCMD ["z"]\n')
    assert parsed == [("FROM", "a:1"), ("RUN", "x && y"), ("CMD", '["z"]')]


def test_base_is_the_pinned_ngc_triton_py3_image(dockerfile):
    base = only(dockerfile, "FROM")
    assert base == registry.TRITON_BASE_IMAGE == "nvcr.io/nvidia/tritonserver:24.10-py3"
    repository, _, tag = base.rpartition(":")
    assert repository == "nvcr.io/nvidia/tritonserver"
    assert tag != "latest" and "@" not in base
    # -py3 is the flavour with the python and onnxruntime backends (not -py3-min, -pyt-python-py3)
    assert re.fullmatch(r"(\d{2})\.(\d{2})-py3", tag), tag
    # NGC YY.MM <-> Triton 2.N.0 (23.01 is 2.30.0): 24.10 is 2.51.0, the release bundled in
    # nvidia-pytriton 0.7.0, which the local tests run. The file says so.
    yy, mm = (int(x) for x in tag[:5].split("."))
    assert f"2.{30 + (yy - 23) * 12 + (mm - 1)}.0" == "2.51.0"
    assert requirement_pins()["nvidia-pytriton"] == "0.7.0"
    text = DOCKERFILE.read_text()
    assert "2.51.0" in text and "nvidia-pytriton 0.7.0" in text
    from tutorial import triton_local  # runs this same image locally when Docker is there

    assert triton_local.NGC_IMAGE == base


def test_installs_only_the_pinned_tokenizer_numpy_and_onnxruntime(dockerfile):
    runs = [args for kw, args in dockerfile if kw == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    assert len(installs) == 1, installs
    command = installs[0].split("&&")[0]
    words = shlex.split(command)
    packages = [w for w in words[words.index("install") + 1 :] if not w.startswith("-")]
    assert sorted(packages) == ["numpy==1.26.4", "onnxruntime-gpu==1.19.2", "tokenizers==0.22.1"]
    pins = requirement_pins()
    for package in packages:
        name, _, version = package.partition("==")
        name = name.removesuffix("-gpu")  # the same release as requirements.txt's CPU wheel
        assert pins[name] == version, f"{package} differs from requirements.txt ({pins[name]})"
    # Triton 24.10's onnxruntime backend is built on 1.19.2: generate's session runs the same
    from tutorial.triton_local import TRITON_ONNXRUNTIME

    assert pins["onnxruntime"] == TRITON_ONNXRUNTIME
    for heavy in ("tensorflow", "transformers", "torch"):
        assert not any(heavy in r for r in installs), heavy
    # the one apt-get: curl, for OCI's health check, and only where the base lacks it
    apt = [r for r in runs if "apt-get" in r]
    assert len(apt) == 1 and apt[0].startswith("(command -v curl >/dev/null ||"), apt
    assert "apt-get install -y --no-install-recommends curl &&" in apt[0]


def test_every_python_model_import_is_in_the_image(dockerfile):
    """What the committed python-backend models import: the standard library, Triton's own
    module, and the packages the Dockerfile installs; nothing else (no TensorFlow)."""
    from tutorial.repository import model_imports

    installed = set()
    for keyword, args in dockerfile:
        if keyword == "RUN" and "pip install" in args:
            words = shlex.split(args.split("&&")[0])
            installed |= {w.split("==")[0].removesuffix("-gpu") for w in words if "==" in w}
    imports = model_imports(REPO_ROOT / "model_repository")
    assert imports["generate_stream"] == {"numpy", "onnxruntime", "tokenizers"}
    for model, modules in imports.items():
        for module in modules:
            assert module in installed, f"{model}/1/model.py imports {module}"


def test_nothing_is_written_under_the_read_only_model_mount(dockerfile):
    for keyword, args in dockerfile:
        if keyword in ("COPY", "ADD", "WORKDIR", "VOLUME", "RUN", "ENV", "USER", "ARG"):
            assert MODEL_MOUNT not in args, f"{keyword} {args}"
    env = dict(
        re.findall(r"(\w+)=(\S+)", " ".join(a for k, a in dockerfile if k == "ENV")),
    )
    assert env["HOME"] == "/tmp"
    assert env["XDG_CACHE_HOME"].startswith("/tmp/") and env["HF_HOME"].startswith("/tmp/")
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # no __pycache__ next to model.py


def test_exposed_ports_are_allowed_by_oci(dockerfile):
    ports = [int(p.split("/")[0]) for p in only(dockerfile, "EXPOSE").split()]
    assert sorted(ports) == sorted(registry.TRITON_PORTS.values()) == [8000, 8001, 8002]
    for port in ports:
        assert 1024 <= port <= 65535 and port not in registry.OCI_RESERVED_PORTS, port
    assert registry.OCI_RESERVED_PORTS == {24224, 8446, 8447}


def test_cmd_serves_the_deployed_model_repository(dockerfile):
    assert json.loads(only(dockerfile, "ENTRYPOINT")) == ["/opt/nvidia/nvidia_entrypoint.sh"]
    cmd = json.loads(only(dockerfile, "CMD"))  # exec form, so OCI's `cmd` replaces it whole
    assert cmd == registry.TRITON_CMD
    assert cmd[0] == "tritonserver"
    assert "--model-repository=/opt/ds/model/deployed_model/model_repository" in cmd
    assert "--model-control-mode=none" in cmd
    assert f"--http-port={registry.TRITON_PORTS['http']}" in cmd


def test_healthcheck_probes_ready_on_the_http_port_with_curl(dockerfile):
    """OCI's health check needs curl in the image (Troubleshooting BYOC model deployments)."""
    health = only(dockerfile, "HEALTHCHECK")
    options, _, command = health.partition(" CMD ")
    assert re.search(r"--start-period=\d+s", options)
    # shell form, as Docker's reference shows it: curl's own exit codes become 1 (unhealthy)
    assert command == "curl -fsS -o /dev/null http://127.0.0.1:8000/v2/health/ready || exit 1"
    assert any("command -v curl" in args for kw, args in dockerfile if kw == "RUN")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bundled_tritonserver() -> tuple[Path, Path]:
    try:
        import pytriton
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("nvidia-pytriton is not installed (requirements-triton.txt pins it)")
        pytest.skip("nvidia-pytriton is not installed: no local tritonserver 2.51.0")
    root = Path(pytriton.__file__).parent
    return root / "tritonserver" / "bin" / "tritonserver", root.parent / "nvidia_pytriton.libs"


def _healthcheck(dockerfile, port: int) -> int:
    command = only(dockerfile, "HEALTHCHECK").partition(" CMD ")[2]
    command = command.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    return subprocess.run(["sh", "-c", command], capture_output=True, timeout=30).returncode


def test_cmd_flags_exist_in_triton_2_51(dockerfile):
    binary, libs = _bundled_tritonserver()
    env = {**os.environ, "LD_LIBRARY_PATH": str(libs)}
    done = subprocess.run([str(binary), "--help"], capture_output=True, text=True, env=env)
    help_text = done.stdout + done.stderr
    for flag in json.loads(only(dockerfile, "CMD"))[1:]:
        name = flag.split("=")[0]
        assert re.search(rf"^\s+{re.escape(name)} <", help_text, re.M), f"{name} unknown"


@pytest.mark.slow
def test_healthcheck_passes_on_triton_started_with_the_image_cmd(dockerfile, tmp_path):
    """The image's CMD, with the repository and ports moved, on the same Triton release: the
    HEALTHCHECK command exits 0 while the server is ready and 1 once it has stopped."""
    binary, libs = _bundled_tritonserver()
    (tmp_path / "repo").mkdir()
    ports = {"http": _free_port(), "grpc": _free_port(), "metrics": _free_port()}
    argv = [str(binary)]
    for flag in json.loads(only(dockerfile, "CMD"))[1:]:
        name = flag.split("=")[0]
        if name == "--model-repository":
            flag = f"--model-repository={tmp_path / 'repo'}"
        for kind, port in ports.items():
            if name == f"--{kind}-port":
                flag = f"{name}={port}"
        argv.append(flag)
    env = {**os.environ, "LD_LIBRARY_PATH": str(libs)}
    log = (tmp_path / "triton.log").open("w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while _healthcheck(dockerfile, ports["http"]) != 0:
            assert proc.poll() is None, (tmp_path / "triton.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "Triton did not become ready in 60 s"
            time.sleep(0.5)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert _healthcheck(dockerfile, ports["http"]) == 1


@pytest.mark.slow
def test_podman_reads_the_image_config_we_intend(dockerfile, tmp_path):
    """The Dockerfile with FROM scratch and without its RUN (the base image is out of reach),
    built by a real engine: the image config it yields is the one OCI will run."""
    if shutil.which("podman") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("podman not installed: apt-get install podman")
        pytest.skip("podman not installed: apt-get install podman")
    lines = []
    for keyword, args in dockerfile:
        if keyword == "FROM":
            lines.append("FROM scratch")
        elif keyword != "RUN":
            lines.append(f"{keyword} {args}")
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "Dockerfile").write_text("\n".join(lines) + "\n")
    runroot = Path(tempfile.mkdtemp(prefix="podman-run-", dir="/tmp"))  # podman: <= 50 chars
    podman = [
        "podman",
        "--root",
        str(tmp_path / "storage"),
        "--runroot",
        str(runroot),
        "--storage-driver=vfs",
    ]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    try:
        build = [*podman, "build", "--isolation=chroot", "--format", "docker", "-t", "static:1"]
        done = subprocess.run(
            [*build, str(tmp_path / "ctx")], capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, done.stdout + done.stderr
        done = subprocess.run(
            [*podman, "image", "inspect", "static:1"], capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, done.stderr
        inspected = json.loads(done.stdout)[0]
    finally:
        shutil.rmtree(tmp_path / "storage", ignore_errors=True)
        shutil.rmtree(runroot, ignore_errors=True)
    config, health = inspected["Config"], inspected["Healthcheck"]
    assert config["Cmd"] == registry.TRITON_CMD
    assert config["Entrypoint"] == ["/opt/nvidia/nvidia_entrypoint.sh"]
    assert sorted(config["ExposedPorts"]) == ["8000/tcp", "8001/tcp", "8002/tcp"]
    assert health["Test"] == [
        "CMD-SHELL",
        "curl -fsS -o /dev/null http://127.0.0.1:8000/v2/health/ready || exit 1",
    ]
    assert health["StartPeriod"] == 180 * 10**9  # ns
    assert {"HOME=/tmp", "PYTHONDONTWRITEBYTECODE=1"} <= set(config["Env"])

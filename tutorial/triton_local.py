"""Start and stop a real Triton server on this machine (notebook 04, tests).

Two runtimes:
- ``docker``: the pinned NGC image (Triton 24.10 = 2.51.0, python + onnxruntime backends),
  when a Docker engine answers.
- ``bundled``: the real ``tritonserver`` 2.51.0 that the nvidia-pytriton wheel ships, with the
  python backend only. Each ``onnxruntime_onnx`` model is then served by a python-backend
  model running the same ``model.onnx`` in the onnxruntime pip package (pinned to 1.19.2, the
  onnxruntime inside Triton 24.10), with a config derived from the real one (same name,
  inputs, outputs, dtypes, dims), refusing at load what the onnxruntime backend refuses.

:func:`serve_artifact` serves what ships: the artifact zip unpacked read-only into a fresh
folder, with the deployment's own command line (the OCI path mapped to that folder).
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tutorial.common import TutorialError, workdir
from tutorial.repository import OCI_ARTIFACT_ROOT

NGC_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
#: The onnxruntime that Triton 24.10's onnxruntime backend is built on (Triton's 24.10 release
#: notes); requirements.txt pins the same, so the local server computes with the cloud's library.
TRITON_ONNXRUNTIME = "1.19.2"
#: The serving image's Dockerfile: the one list of what the python-backend models need.
DOCKERFILE = Path(__file__).resolve().parent.parent / "docker" / "Dockerfile"
SHIM_MODEL = Path(__file__).with_name("onnx_shim_model.py")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def docker_available() -> bool:
    """True when a Docker engine answers (not just the client being installed)."""
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def bundled_server_dir() -> Path:
    """A runnable copy of the tritonserver tree from the nvidia-pytriton wheel.

    The wheel keeps the python backend stubs per Python version; the one for this Python is
    put where the backend looks for it. Made once under the work folder.
    """
    try:
        import pytriton
    except ImportError as exc:
        raise TutorialError(
            "The bundled Triton needs nvidia-pytriton: pip install -r requirements-triton.txt "
            "(Linux with glibc >= 2.35)"
        ) from exc
    src = Path(pytriton.__file__).parent / "tritonserver"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = src / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.exists():
        raise TutorialError(f"nvidia-pytriton has no python backend stub for Python {py}.")
    dest = workdir() / "tritonserver"
    marker = dest / ".complete"
    if not marker.exists():
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(
            src, dest, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__")
        )
        shutil.copy2(stub, dest / "backends" / "python" / "triton_python_backend_stub")
        marker.touch()
    return dest


def local_repository(repository: Path, dest: Path) -> list[str]:
    """Derive a repository the bundled (python-only) Triton can serve from the real one.

    Python-backend models and ensembles are linked unchanged; each ``onnxruntime_onnx`` model
    gets ``backend: "python"``, KIND_CPU, and :mod:`tutorial.onnx_shim_model` as ``model.py``
    beside a link to the same ``model.onnx``. Returns the names of the converted models.
    """
    from tutorial.repository import load_config, set_instance_kind, write_config

    converted = []
    dest.mkdir(parents=True, exist_ok=True)
    for model_dir in sorted(p for p in Path(repository).iterdir() if (p / "config.pbtxt").exists()):
        config = load_config(model_dir / "config.pbtxt")
        if config.platform != "onnxruntime_onnx":
            (dest / model_dir.name).symlink_to(model_dir.resolve(), target_is_directory=True)
            continue
        out = dest / model_dir.name / "1"
        out.mkdir(parents=True)
        config.parameters["onnx_model_filename"].string_value = (
            config.default_model_filename or "model.onnx"
        )
        config.default_model_filename = ""
        config.platform = ""
        config.backend = "python"
        config.ClearField("optimization")  # the CUDA provider's options: no GPU here
        set_instance_kind(config, "KIND_CPU")
        write_config(config, dest / model_dir.name / "config.pbtxt")
        for item in (model_dir / "1").iterdir():
            (out / item.name).symlink_to(item.resolve())
        shutil.copyfile(SHIM_MODEL, out / "model.py")
        converted.append(model_dir.name)
    return converted


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Ask Linux to SIGTERM the server if the process that started it dies."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class TritonServer:
    """A running Triton: its URL, runtime, process and log."""

    url: str
    runtime: str
    process: subprocess.Popen
    log_path: Path
    converted: list[str] = field(default_factory=list)
    started_s: float = 0.0
    #: Triton's gRPC endpoint (``127.0.0.1:<port>``) and Prometheus metrics URL, where served.
    grpc_url: str | None = None
    metrics_url: str | None = None
    container: str | None = None
    artifact_root: Path | None = None
    command: list[str] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory | None = None
    _cleanups: list[Any] = field(default_factory=list)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def memory_bytes(self) -> int:
        """Resident memory of the server and the processes it started (backend stubs): the sum
        of VmRSS over its process group, read from /proc (0 where that cannot be read)."""
        total = 0
        for status in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = status.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) != self.process.pid:  # fields[2]: the process group id
                    continue
                rss = (status.parent / "status").read_text().split("VmRSS:")[1].split()[0]
                total += int(rss) * 1024
            except (OSError, IndexError, ValueError):
                continue
        return total

    def log_errors(self, limit: int = 10) -> str:
        """The error lines of the server log (``E...`` lines: why a model failed to load)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        errors = [line for line in lines if re.match(r"E\d{4} ", line)]
        return "\n".join(errors[:limit])

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server and every process it started (python backend stubs)."""
        if self.container:
            subprocess.run(["docker", "stop", "-t", "10", self.container], capture_output=True)
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        try:  # stubs left in the group after the server exited
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        while self._cleanups:
            self._cleanups.pop()()


def wait_until_ready(server: TritonServer, timeout: float) -> None:
    """Poll ``/v2/health/ready``; on timeout or exit, raise with the end of the server log."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            errors = server.log_errors()
            raise TutorialError(
                f"Triton exited with code {server.process.returncode} while starting. "
                + (f"Errors in its log:\n{errors}\n" if errors else "")
                + f"Its log ({server.log_path}) ends with:\n{server.log_tail()}"
            )
        try:
            if requests.get(f"{server.url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise TutorialError(
        f"Triton did not become ready in {timeout:.0f} s; its log ({server.log_path}) ends "
        f"with:\n{server.log_tail()}"
    )


#: Flags of the deployment's command line that the bundled server replaces: its repository
#: is the derived one, and it listens on a free loopback port, HTTP only.
REPLACED_FLAGS = (
    "--model-repository=", "--http-port=", "--http-address=", "--grpc-port=",
    "--grpc-address=", "--metrics-port=", "--metrics-address=", "--allow-grpc=",
    "--allow-metrics=", "--backend-directory=", "--cache-directory=",
)  # fmt: skip


def _sandbox(command: list[str], read_only: Path | None, shm_size: str | None) -> list[str]:
    """Run ``command`` in a private mount namespace where ``read_only`` is mounted read-only
    (as OCI mounts the artifact) and ``/dev/shm`` is a tmpfs of ``shm_size``. Needs root and
    ``unshare`` (util-linux); returns ``command`` unchanged when there is nothing to do."""
    steps = []
    if read_only is not None:
        folder = shlex.quote(str(read_only))
        steps.append(f"mount --bind {folder} {folder} && mount -o remount,ro,bind {folder}")
    if shm_size is not None:
        steps.append(f"mount -t tmpfs -o size={shlex.quote(shm_size)} tmpfs /dev/shm")
    if not steps:
        return command
    script = " && ".join([*steps, 'exec "$@"'])
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *command]


def can_sandbox() -> bool:
    """True when this process may make a private mount namespace (root with ``unshare``)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True
    )
    return probe.returncode == 0


def _launch_bundled(
    repository: Path,
    server_args: list[str],
    http_port: int,
    log_path: Path,
    read_only: Path | None = None,
    shm_size: str | None = None,
) -> TritonServer:
    server_dir = bundled_server_dir()
    tmp = tempfile.TemporaryDirectory(prefix="triton-repo-")
    converted = local_repository(repository, Path(tmp.name))
    import pytriton

    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    env = dict(os.environ)
    # The python backend stub links libpython3.X.so; a Python that keeps it outside the
    # loader's paths (pyenv, conda) needs its LIBDIR named.
    libdir = sysconfig.get_config_var("LIBDIR")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        filter(None, [str(libs), env.get("LD_LIBRARY_PATH"), libdir])
    )
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    kept = [a for a in server_args if not a.startswith(REPLACED_FLAGS)]
    grpc_port, metrics_port = free_port(), free_port()  # gRPC streams; the engine's counters
    cmd = [
        str(server_dir / "bin" / "tritonserver"),
        f"--model-repository={tmp.name}",
        *kept,
        f"--backend-directory={server_dir / 'backends'}",
        f"--cache-directory={server_dir / 'caches'}",
        f"--http-port={http_port}",
        "--http-address=127.0.0.1",
        f"--grpc-port={grpc_port}",
        "--grpc-address=127.0.0.1",
        f"--metrics-port={metrics_port}",
        "--metrics-address=127.0.0.1",
        "--allow-gpu-metrics=false",
    ]
    if not any(a.startswith("--log-verbose=") for a in kept):
        cmd.append("--log-verbose=0")
    print("$", " ".join(cmd), flush=True)
    shown, cmd = cmd, _sandbox(cmd, read_only, shm_size)
    log = open(log_path, "w")  # noqa: SIM115 - the server writes to it until it stops
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
    )
    log.close()
    return TritonServer(
        f"http://127.0.0.1:{http_port}", "bundled", proc, log_path, converted, _tmp=tmp,
        command=shown, grpc_url=f"127.0.0.1:{grpc_port}",
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
    )  # fmt: skip


def local_runtime(runtime: str = "auto") -> tuple[str | None, str]:
    """Which local Triton can run here: ``("docker" | "bundled", why)`` or ``(None, why not)``.

    The bundled server needs the optional nvidia-pytriton wheel (requirements-triton.txt),
    which exists for glibc >= 2.35 only (not Oracle Linux 8, the OS of OCI notebook sessions).
    """
    if runtime in ("auto", "docker") and docker_available():
        return "docker", "a Docker engine answers"
    if runtime == "docker":
        return None, "no Docker engine answers on this machine"
    try:
        import pytriton  # noqa: F401
    except ImportError:
        libc = " ".join(platform.libc_ver())
        return None, (
            "no Docker engine answers, and the tritonserver bundled in nvidia-pytriton is not "
            f"installed (pip install -r requirements-triton.txt; it needs glibc >= 2.35, this "
            f"machine has {libc or 'no glibc'})"
        )
    why = "asked for" if runtime == "bundled" else "no Docker engine answers"
    return "bundled", f"the tritonserver bundled in nvidia-pytriton ({why})"


def gpu_present() -> bool:
    """True when ``nvidia-smi`` lists a GPU (Docker then gets ``--gpus all``)."""
    if not shutil.which("nvidia-smi"):
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def dockerfile_packages(dockerfile: Path = DOCKERFILE) -> list[str]:
    """The pinned packages (``name==version``) the Dockerfile's ``pip install`` adds to the NGC
    image: what the python-backend models import beyond it. Read from the file, so a plain NGC
    container gets exactly what the built image has."""
    text = re.sub(r"\\\n", " ", Path(dockerfile).read_text())  # join continuation lines
    packages = []
    for line in text.splitlines():
        if line.startswith("RUN ") and "pip install" in line:
            command = line.split("&&")[0]
            packages += [w for w in shlex.split(command) if "==" in w and not w.startswith("-")]
    if not packages:
        raise TutorialError(f"{dockerfile} has no pinned `pip install`: nothing to install.")
    return packages


def docker_command(
    artifact_root: Path,
    server_args: list[str],
    http_port: int,
    image: str,
    name: str,
    gpus: bool,
    shm_size: str = "1g",
    metrics_port: int | None = None,
) -> list[str]:
    """``docker run`` with the unpacked artifact mounted read-only where OCI mounts it, and
    the deployment's Triton arguments.

    The plain NGC image lacks the packages the python-backend models import (the tokenizer,
    onnxruntime); with it, the container first installs exactly the Dockerfile's pinned
    packages (:func:`dockerfile_packages`), so it serves what the image notebook 05 builds
    serves (that image has them already).
    """
    serve = ["tritonserver", *server_args]
    if image == NGC_IMAGE:
        install = " ".join(shlex.quote(p) for p in dockerfile_packages())
        serve = [
            "bash",
            "-c",
            f"pip install -q --no-cache-dir --no-deps {install} && exec {' '.join(serve)}",
        ]
    return [
        "docker", "run", "--rm", "--name", name, f"--shm-size={shm_size}",
        *(["--gpus", "all"] if gpus else []),
        "-p", f"127.0.0.1:{http_port}:8000",
        *(["-p", f"127.0.0.1:{metrics_port}:8002"] if metrics_port else []),
        "-v", f"{Path(artifact_root).resolve()}:{OCI_ARTIFACT_ROOT}:ro",
        image, *serve,
    ]  # fmt: skip


def _launch_docker(
    artifact_root: Path, server_args: list[str], http_port: int, log_path: Path, image: str
) -> TritonServer:
    name = f"tutorial-triton-{http_port}"
    args = [a for a in server_args if not a.startswith(("--http-port=", "--http-address="))]
    metrics_port = free_port()  # the engine's counters (Triton's metrics, port 8002 inside)
    cmd = docker_command(
        artifact_root, [*args, "--http-port=8000"], http_port, image, name, gpu_present(),
        metrics_port=metrics_port,
    )  # fmt: skip
    log = open(log_path, "w")  # noqa: SIM115
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    log.close()
    return TritonServer(
        f"http://127.0.0.1:{http_port}", "docker", proc, log_path, container=name, command=cmd,
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
    )  # fmt: skip


def launch_triton(
    repository: Path,
    runtime: str = "auto",
    timeout: float = 180.0,
    http_port: int | None = None,
    image: str | None = None,
    log_path: Path | None = None,
    server_args: list[str] | None = None,
) -> TritonServer:
    """Serve the folder ``repository`` on 127.0.0.1 and return it once ready (stopped again if
    it never gets ready). The caller stops it: prefer :func:`start_local_triton`.

    For what ships, use :func:`serve_artifact`: this serves a work folder as it is.
    ``runtime``: ``auto`` (Docker when an engine answers, else bundled), ``docker`` or
    ``bundled``. ``image`` is the Docker image (default: the tutorial's image built in notebook
    05 if the state file names one, else the NGC image, which lacks the tokenizer package).
    """
    from tutorial.oci_deploy import triton_command

    args = server_args if server_args is not None else triton_command()[1:]
    runtime = _runtime(runtime)
    if runtime == "docker":
        # Docker mounts the folder holding model_repository/, as OCI does.
        repository = Path(repository).resolve()
        if repository.name != "model_repository":
            raise TutorialError("Docker serves a folder named model_repository (as OCI does).")
        return _start(
            lambda port, log: _launch_docker(
                repository.parent, args, port, log, image or _default_image()
            ),
            timeout,
            http_port,
            log_path,
        )
    return _start(
        lambda port, log: _launch_bundled(repository, args, port, log),
        timeout,
        http_port,
        log_path,
    )


def serve_artifact(
    zip_path: Path,
    cmd: list[str] | None = None,
    runtime: str = "auto",
    timeout: float = 180.0,
    http_port: int | None = None,
    image: str | None = None,
    log_path: Path | None = None,
    shm_size: str | None = None,
    check: bool = True,
) -> TritonServer:
    """Serve the artifact zip the way OCI does, and return the server once ready.

    The zip is checked and unpacked into a fresh folder that plays OCI's
    ``/opt/ds/model/deployed_model``, made read-only (and, as root, mounted read-only in a
    private mount namespace), and served with the deployment's command line ``cmd`` (default:
    the one notebook 06 deploys, :func:`tutorial.oci_deploy.triton_command`), where the OCI path
    is replaced by that folder. ``shm_size`` (e.g. ``"64m"``) gives the server a ``/dev/shm``
    of that size (Docker: ``--shm-size``; bundled: a private tmpfs, as root). The folder is
    deleted when the server stops. ``check=False`` skips the zip check before unpacking (OCI
    does not check: Triton's own refusal then shows in the log).
    """
    from tutorial.oci_deploy import triton_command
    from tutorial.repository import make_writable, unpack_artifact

    cmd = list(cmd or triton_command())
    if not cmd or Path(cmd[0]).name != "tritonserver":
        raise TutorialError(f"The deployment command must start with tritonserver, not {cmd!r}.")
    deployed = tempfile.TemporaryDirectory(prefix="deployed_model-", dir=workdir())
    root = Path(deployed.name)
    try:
        unpack_artifact(zip_path, root, check=check)
        args = [a.replace(OCI_ARTIFACT_ROOT, str(root)) for a in cmd[1:]]
        repos = [a.split("=", 1)[1] for a in args if a.startswith("--model-repository=")]
        if len(repos) != 1 or not Path(repos[0]).is_dir():
            raise TutorialError(
                f"The command's --model-repository must name a folder inside "
                f"{OCI_ARTIFACT_ROOT} that the zip holds; got {cmd!r}."
            )
        runtime = _runtime(runtime)
        if runtime == "docker":
            docker_args = [a.replace(str(root), OCI_ARTIFACT_ROOT) for a in args]

            def launch(port: int, log: Path) -> TritonServer:
                return _launch_docker(root, docker_args, port, log, image or _default_image())

        else:
            sandbox = can_sandbox()
            if shm_size is not None and not sandbox:
                raise TutorialError("Limiting /dev/shm needs root and unshare (util-linux).")

            def launch(port: int, log: Path) -> TritonServer:
                return _launch_bundled(
                    Path(repos[0]),
                    args,
                    port,
                    log,
                    read_only=root if sandbox else None,
                    shm_size=shm_size,
                )

        server = _start(launch, timeout, http_port, log_path)
    except BaseException:
        make_writable(root)
        deployed.cleanup()
        raise
    server.artifact_root = root
    server._cleanups.append(lambda: (make_writable(root), deployed.cleanup()))
    return server


def _runtime(runtime: str) -> str:
    if runtime not in ("auto", "docker", "bundled"):
        raise TutorialError(f"runtime must be 'auto', 'docker' or 'bundled', not {runtime!r}.")
    if runtime == "auto":
        return "docker" if docker_available() else "bundled"
    return runtime


def _default_image() -> str:
    from tutorial.common import load_state

    return load_state().get("image", {}).get("reference") or NGC_IMAGE


def _start(
    launch: Any, timeout: float, http_port: int | None, log_path: Path | None
) -> TritonServer:
    port = http_port or free_port()
    logs = workdir() / "logs"
    logs.mkdir(exist_ok=True)
    log_path = log_path or logs / f"triton-{port}.log"
    start = time.monotonic()
    server = launch(port, log_path)
    try:
        wait_until_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    server.started_s = time.monotonic() - start
    return server


@contextmanager
def start_local_triton(repository: Path, **kwargs: Any) -> Iterator[TritonServer]:
    """:func:`launch_triton` in a ``with`` block: the server stops when the block ends, also
    on error."""
    server = launch_triton(repository, **kwargs)
    try:
        yield server
    finally:
        server.stop()

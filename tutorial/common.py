"""Paths, the shared state file, and the errors every step uses."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The committed Triton repository: config.pbtxt and model.py files only (a template).
TEMPLATE_REPOSITORY = REPO_ROOT / "model_repository"

OFFLINE_BANNER = (
    "RANDOM WEIGHTS: the text will be gibberish; shapes and latency are GPT-2's. "
    "(offline stand-in: real GPT-2 architecture and tokenizer, weights: random-offline)"
)


class TutorialError(RuntimeError):
    """An error whose message says what went wrong and what to do next."""


def workdir() -> Path:
    """Where every generated file goes: ``$TUTORIAL_WORKDIR`` or ``<repo>/artifacts``.

    Notebooks and tests find what earlier steps produced here, never in another kernel's
    memory. Tests point ``TUTORIAL_WORKDIR`` at a temporary folder.
    """
    path = Path(os.environ.get("TUTORIAL_WORKDIR") or REPO_ROOT / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def paths() -> dict[str, Path]:
    """The well-known locations of every step's outputs (under :func:`workdir`)."""
    root = workdir()
    return {
        "workdir": root,
        "state": root / "state.json",
        # 01: the seed's layout: ./gpt2model/saved_model/1 and ./vocab/{vocab.json,merges.txt}
        "model_dir": root / "gpt2model",
        "saved_model": root / "gpt2model" / "saved_model" / "1",
        "vocab_dir": root / "vocab",
        # 02: exports
        "onnx_dir": root / "onnx",
        "onnx_full": root / "onnx" / "model.onnx",
        "onnx_last": root / "onnx" / "gpt2_last_logits.onnx",
        "onnx_past": root / "onnx" / "gpt2_with_past.onnx",
        "onnx_past_int8": root / "onnx" / "gpt2_with_past_int8.onnx",
        # 03: the assembled repository and the artifact zip
        "repository": root / "model_repository",
        "artifact_zip": root / "model_artifact.zip",
        # 04/07: measurements
        "results_dir": root / "results",
        "logs_dir": root / "logs",
    }


def load_state() -> dict[str, Any]:
    """Read the state file the notebooks share (``{}`` when no step has run yet)."""
    path = paths()["state"]
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def update_state(section: str, **values: Any) -> dict[str, Any]:
    """Merge ``values`` into ``section`` of the state file and write it atomically."""
    state = load_state()
    state.setdefault(section, {}).update(values)
    path = paths()["state"]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True, default=str))
    tmp.replace(path)
    return state


def require_state(section: str, produced_by: str) -> dict[str, Any]:
    """Return a state section, or say which notebook must run first."""
    state = load_state()
    if section not in state:
        raise TutorialError(
            f"No '{section}' entry in {paths()['state']}: run {produced_by} first "
            f"(or set TUTORIAL_WORKDIR to the folder it wrote to)."
        )
    return state[section]


def model_info() -> dict[str, Any]:
    """What notebook 01 recorded about the model (source, size, and ``weights``)."""
    return require_state("model", "notebooks/01_download_gpt2.ipynb")


def weights_label() -> str:
    """``real`` or ``random-offline``: written into every file the pipeline writes about the
    model, so no figure or text from the stand-in can pass as real GPT-2's."""
    return str(model_info().get("weights", "unknown"))


def machine_metadata() -> dict[str, Any]:
    """Machine and version facts stored with every measurement."""
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "hostname": platform.node(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "onnxruntime": version("onnxruntime") or version("onnxruntime-gpu"),
        "tensorflow": version("tensorflow"),
        "transformers": version("transformers"),
        "tritonclient": version("tritonclient"),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def show_banner(message: str) -> None:
    """Print a loud banner (used for the random-weights warning)."""
    line = "!" * min(100, max(40, len(message) + 4))
    print(f"{line}\n! {message}\n{line}")

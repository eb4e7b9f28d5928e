"""Shared fixtures: a tiny offline GPT-2 pipeline (notebooks 01-03) and a real Triton serving it.

The tiny model has GPT-2's tokenizer, vocabulary and context, 2 layers and random weights, so
notebooks and servers run in seconds; every generated token is still checked against
transformers on the same weights.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def with_advanced_settings(path: Path, parameters: dict):
    """The notebook at ``path``, with the settings of its ``advanced`` cell that ``parameters``
    name set in a cell right after that cell (papermill injects after the ``parameters`` cell,
    which the advanced cell follows). Removes those names from ``parameters``."""
    import ast

    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    for index, cell in enumerate(nb.cells):
        if "advanced" not in cell.metadata.get("tags", []):
            continue
        names = {
            target.id
            for node in ast.parse(cell.source).body
            if isinstance(node, ast.Assign)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        late = {name: parameters.pop(name) for name in list(parameters) if name in names}
        if late:
            source = "\n".join(f"{name} = {value!r}" for name, value in late.items())
            injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-advanced"]})
            nb.cells.insert(index + 1, injected)
    return nb


def run_notebook(name: str, out_dir: Path, **parameters) -> Path:
    """Execute notebooks/<name>.ipynb with papermill (cwd notebooks/), like `make run` does;
    a setting of the notebook's advanced cell is set right after that cell."""
    import papermill

    out = out_dir / f"{name}.ipynb"
    nb = with_advanced_settings(ROOT / "notebooks" / f"{name}.ipynb", parameters)
    papermill.execute_notebook(
        nb,
        str(out),
        parameters=parameters,
        cwd=str(ROOT / "notebooks"),
        kernel_name="python3",
        progress_bar=False,
    )
    return out


def notebook_text(path: Path) -> str:
    """All text an executed notebook printed (streams, results, errors)."""
    import json

    parts = []
    for cell in json.loads(Path(path).read_text())["cells"]:
        for output in cell.get("outputs", []):
            if output["output_type"] == "stream":
                parts.append("".join(output["text"]))
            elif output["output_type"] == "error":
                parts.append(f"ERROR {output['ename']}: {output['evalue']}")
            else:
                parts.append("".join(output.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory) -> Path:
    """TUTORIAL_WORKDIR with notebooks 01-03 run on the tiny offline model (CPU instances)."""
    work = tmp_path_factory.mktemp("tiny")
    previous = os.environ.get("TUTORIAL_WORKDIR")
    os.environ["TUTORIAL_WORKDIR"] = str(work)
    executed = work / "executed"
    executed.mkdir()
    run_notebook("01_download_gpt2", executed, MODEL_SOURCE="offline", OFFLINE_SIZE="tiny")
    run_notebook("02_export_onnx", executed)
    run_notebook("03_model_repository", executed)
    yield work
    if previous is None:
        os.environ.pop("TUTORIAL_WORKDIR", None)
    else:
        os.environ["TUTORIAL_WORKDIR"] = previous


def require_local_triton() -> None:
    """Skip (fail under CI=true) where the bundled tritonserver cannot run: it comes with the
    optional nvidia-pytriton wheel (requirements-triton.txt, glibc >= 2.35 only)."""
    from tutorial.triton_local import local_runtime

    runtime, why = local_runtime("bundled")
    if runtime is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the server tests: {why}")
        pytest.skip(f"no local Triton: {why}")


@pytest.fixture(scope="session")
def triton_server(tiny_workdir):
    """A real Triton (bundled 2.51.0) serving what ships: notebook 03's artifact zip, unpacked
    read-only into a fresh folder and served with the deployment's command line, as OCI does.
    Stopped after the session."""
    from tutorial.triton_local import serve_artifact

    require_local_triton()
    server = serve_artifact(tiny_workdir / "model_artifact.zip", runtime="bundled")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_reference(tiny_workdir):
    """transformers (TensorFlow) on the same tiny weights, and the tokenizer."""
    from tutorial.model_source import load_tf_model, load_tokenizer

    return load_tf_model(tiny_workdir / "gpt2model"), load_tokenizer(tiny_workdir / "vocab")

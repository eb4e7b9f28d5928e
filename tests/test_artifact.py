"""What ships is what is served: the artifact zip, read back and served as OCI unpacks it, the
onnxruntime inside Triton 24.10, the onnxruntime backend's load checks, and /dev/shm."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.conftest import ROOT, require_local_triton
from tutorial.common import TutorialError

pytestmark = pytest.mark.slow

PROMPT = "My dog is cute, but he barks a lot."


def rezip(src: Path, dest: Path, drop=(), edit=None, files_only=False) -> Path:
    """A copy of the artifact zip without the entries in ``drop``, with ``edit`` applied to the
    text of the entries it names ({name: function}), or with file entries only."""
    edit = edit or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            if info.filename in drop or (files_only and info.filename.endswith("/")):
                continue
            data = zin.read(info)
            if info.filename in edit:
                data = edit[info.filename](data.decode()).encode()
            zout.writestr(info, data)
    return dest


# --- the zip itself ---


def test_zip_has_an_entry_for_every_folder(tiny_workdir):
    from tutorial.repository import validate_artifact_zip

    zip_path = tiny_workdir / "model_artifact.zip"
    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
    models = validate_artifact_zip(zip_path)
    assert sorted(models) == [
        "decoder",
        "encoder",
        "ensemble_model",
        "generate",
        "generate_stream",
        "gpt2",
    ]  # no gpt2_with_past: the engine (generate_stream) runs its ONNX file, loaded once
    assert models["ensemble_model"] == [
        "model_repository/ensemble_model/",
        "model_repository/ensemble_model/1/",
        "model_repository/ensemble_model/1/README.md",
        "model_repository/ensemble_model/config.pbtxt",
    ]
    for model in models:
        assert f"model_repository/{model}/1/" in names
    assert "model_repository/generate_stream/1/model.py" in names
    assert "model_repository/generate_stream/1/gpt2_with_past.onnx" in names
    assert models["generate"] == [  # a forwarder: no weights, no tokenizer
        "model_repository/generate/",
        "model_repository/generate/1/",
        "model_repository/generate/1/model.py",
        "model_repository/generate/config.pbtxt",
    ]
    info = json.loads(zipfile.ZipFile(zip_path).read("model_repository/MODEL_INFO.json"))
    assert info["variant"] == "fp32" and info["shapes"] == "gpu or cpu"


ENSEMBLE_README = "model_repository/ensemble_model/1/README.md"


def test_every_version_folder_holds_a_file(tiny_workdir, tmp_path):
    """An unzip that skips directory entries keeps every version folder; without the README
    the ensemble's folder is empty (refused) or gone (refused)."""
    from tutorial.repository import KEEP_FOLDER_README, validate_artifact_zip

    src = tiny_workdir / "model_artifact.zip"
    with zipfile.ZipFile(src) as zf:
        assert zf.read(ENSEMBLE_README).decode() == KEEP_FOLDER_README
        files = [n for n in zf.namelist() if not n.endswith("/")]
        versions = {n for n in zf.namelist() if n.endswith("/1/")}
    assert versions and all(any(f.startswith(v) for f in files) for v in versions)
    validate_artifact_zip(rezip(src, tmp_path / "files.zip", files_only=True))

    empty = rezip(src, tmp_path / "empty.zip", drop={ENSEMBLE_README})
    with pytest.raises(TutorialError) as err:
        validate_artifact_zip(empty)
    assert (
        "ensemble_model: the version folder model_repository/ensemble_model/1/ holds no file"
        in str(err.value)
    )
    gone = rezip(src, tmp_path / "gone.zip", drop={ENSEMBLE_README}, files_only=True)
    with pytest.raises(TutorialError) as err:
        validate_artifact_zip(gone)
    message = str(err.value)
    assert (
        "ensemble_model: no numeric version folder (e.g. model_repository/ensemble_model/1/)"
        in message
    )
    assert "gpt2:" not in message  # a version folder holding files exists after unzip


def test_zip_missing_files_links_and_callees_are_named(tiny_workdir, tmp_path):
    from tutorial.repository import validate_artifact_zip

    src = tiny_workdir / "model_artifact.zip"
    broken = rezip(
        src,
        tmp_path / "b.zip",
        drop={
            "model_repository/gpt2/1/model.onnx",
            "model_repository/decoder/1/vocab.json",
            "model_repository/generate_stream/config.pbtxt",
        },
    )
    with zipfile.ZipFile(broken, "a") as zf:
        link = zipfile.ZipInfo("model_repository/encoder/1/link.py")
        link.external_attr = (0o120777) << 16
        zf.writestr(link, "model.py")
    with pytest.raises(TutorialError) as err:
        validate_artifact_zip(broken)
    message = str(err.value)
    assert "gpt2: missing model_repository/gpt2/1/model.onnx" in message
    assert "decoder: missing model_repository/decoder/1/vocab.json" in message
    assert "generate_stream: no config.pbtxt" in message
    assert "generate: calls 'generate_stream', which is not in the zip" in message
    assert "model_repository/encoder/1/link.py is a symbolic link" in message


def test_pack_refuses_symlinks(tiny_workdir, tmp_path):
    import shutil

    from tutorial.repository import pack_artifact

    repo = tmp_path / "repo"
    shutil.copytree(
        tiny_workdir / "model_repository", repo, ignore=shutil.ignore_patterns("*.onnx")
    )
    (repo / "encoder" / "1" / "extra.py").symlink_to(repo / "encoder" / "1" / "model.py")
    with pytest.raises(TutorialError, match=r"symbolic links.*encoder/1/extra.py"):
        pack_artifact(repo, tmp_path / "x.zip")


def test_committed_repository_has_no_symlinks():
    """A checkout without symlink support (Windows) must get every file."""
    links = [p for p in (ROOT / "model_repository").rglob("*") if p.is_symlink()]
    assert links == []


# --- served as OCI serves it (the session server is serve_artifact on the zip) ---


def test_server_serves_the_unpacked_zip_read_only(triton_server):
    from tutorial.oci_deploy import triton_command

    root = triton_server.artifact_root
    assert root is not None and (root / "model_repository" / "ensemble_model" / "1").is_dir()
    assert all(not os.access(p, os.W_OK) or os.geteuid() == 0 for p in root.rglob("*"))
    assert oct((root / "model_repository").stat().st_mode & 0o777) == "0o555"
    for flag in triton_command()[2:-1]:  # the deployment's flags, but its port
        assert flag in triton_server.command, flag
    mounts = Path(f"/proc/{triton_server.process.pid}/mountinfo")
    if mounts.exists() and os.geteuid() == 0:  # as root: a read-only bind mount, as on OCI
        line = next(m for m in mounts.read_text().splitlines() if f" {root} " in m)
        assert " ro," in line


def test_local_onnx_models_run_the_onnxruntime_of_triton_24_10(triton_server):
    import onnxruntime

    from tutorial.triton_local import TRITON_ONNXRUNTIME

    assert onnxruntime.__version__ == TRITON_ONNXRUNTIME == "1.19.2"
    log = triton_server.log_path.read_text()
    assert "gpt2: onnxruntime 1.19.2 serves model.onnx" in log
    # the engine's own session, made at load, is the only other copy of the weights
    opened = "generate engine: opened an onnxruntime 1.19.2 session of generate_stream/1/"
    assert log.count(opened) == 1
    assert f"{opened}gpt2_with_past.onnx on cpu" in log
    assert "gpt2_with_past: onnxruntime" not in log


def test_every_export_runs_in_onnxruntime_1_19_2_and_matches_transformers(
    tiny_workdir, tiny_reference
):
    """The four exports load and run in the onnxruntime inside Triton 24.10: the plain export
    and the last-logits model give TF's logits, the fp32 KV-cache model TF's greedy tokens,
    and the int8 one runs."""
    import onnxruntime

    from tutorial.client import reference_generate
    from tutorial.export import greedy_with_past, ort_logits, ort_session

    assert onnxruntime.__version__ == "1.19.2"
    tf_model, tok = tiny_reference
    onnx = json.loads((tiny_workdir / "state.json").read_text())["onnx"]
    ids = tok(PROMPT)["input_ids"]
    tf_logits = tf_model(np.asarray([ids], dtype=np.int32)).logits.numpy()
    full = ort_session(tiny_workdir / "onnx" / "model.onnx")
    assert np.abs(ort_logits(full, ids) - tf_logits).max() < 1e-3
    last = ort_session(tiny_workdir / "onnx" / "gpt2_last_logits.onnx")
    assert np.abs(ort_logits(last, ids, "last_logits") - tf_logits[:, -1]).max() < 1e-3
    expected = reference_generate(tf_model, tok, PROMPT, 20)
    fp32 = ort_session(Path(onnx["with_past"]))
    assert greedy_with_past(fp32, ids, 20) == expected
    # int8 changes the numbers, so its tokens are not transformers' exactly: it must load and
    # run here; tests/test_int8.py bounds what it computes, on this CPU and on AVX2 kernels.
    int8 = ort_session(Path(onnx["with_past_int8"]))
    assert len(greedy_with_past(int8, ids, 20, eos_token_id=None)) == 20


# --- the onnxruntime backend's load checks, applied by the local stand-in of that backend ---

GPT2_CONFIG = "model_repository/gpt2/config.pbtxt"


def _drop_second_input(text: str) -> str:
    start = text.index('input {\n  name: "attention_mask"')
    end = text.index("}\n", start) + 2
    return text[:start] + text[end:]


REFUSALS = [
    (
        GPT2_CONFIG,
        _drop_second_input,
        "unable to load model 'gpt2', configuration expects 1 inputs, model provides 2",
    ),
    (
        GPT2_CONFIG,
        lambda t: t.replace('name: "input_ids"', 'name: "ids"', 1),
        "unexpected inference input 'ids', allowed inputs are: attention_mask, input_ids",
    ),
    (
        GPT2_CONFIG,
        lambda t: t.replace("TYPE_INT32", "TYPE_INT64", 1),
        "unable to load model 'gpt2', unexpected datatype INT32 for input 'input_ids', "
        "expecting TYPE_INT64",
    ),
    (
        GPT2_CONFIG,
        lambda t: t.replace("dims: -1\n  dims: 50257", "dims: -1\n  dims: -1"),
        "model 'gpt2', tensor 'last_logits': the model expects 2 dimensions (shape "
        "[-1,50257]) but the model configuration specifies 2 dimensions (shape [-1,-1])",
    ),
]


@pytest.mark.parametrize(("entry", "edit", "message"), REFUSALS, ids=lambda v: str(v)[:30])
def test_the_local_server_refuses_what_the_onnxruntime_backend_refuses(
    tiny_workdir, tmp_path, entry, edit, message
):
    from tutorial.triton_local import serve_artifact

    require_local_triton()
    broken = rezip(tiny_workdir / "model_artifact.zip", tmp_path / "c.zip", edit={entry: edit})
    with zipfile.ZipFile(broken) as zf:
        assert zf.read(entry) != zipfile.ZipFile(tiny_workdir / "model_artifact.zip").read(entry)
    with pytest.raises(TutorialError) as err:
        serve_artifact(broken, runtime="bundled", check=False, timeout=120)
    assert message in str(err.value)


def test_validation_compares_output_dims_exactly(tiny_workdir, tmp_path):
    import shutil

    from tutorial.repository import validate_repository

    repo = tmp_path / "repo"
    shutil.copytree(tiny_workdir / "model_repository", repo)
    cfg = repo / "gpt2" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("dims: -1\n  dims: 50257", "dims: -1\n  dims: -1"))
    with pytest.raises(TutorialError) as err:
        validate_repository(repo)
    assert (
        "gpt2: output 'last_logits' has dims [-1, -1] in config.pbtxt but [-1, 50257] in the "
        "ONNX model" in str(err.value)
    )


def test_zip_without_version_folder_fails_in_triton_itself(tiny_workdir, tmp_path):
    """Unchecked, as OCI unpacks it: Triton's own refusal, the one a deployment would log."""
    from tutorial.triton_local import serve_artifact

    require_local_triton()
    broken = rezip(
        tiny_workdir / "model_artifact.zip",
        tmp_path / "d.zip",
        drop={ENSEMBLE_README},  # the folder's entry stays: unpacked as OCI may, it is gone
    )
    with pytest.raises(TutorialError) as err:
        serve_artifact(broken, runtime="bundled", check=False, timeout=120)
    assert (
        "at least one version must be available under the version policy of model "
        "'ensemble_model'" in str(err.value)
    )


def test_the_committed_template_says_to_run_notebook_03(tiny_workdir):
    from tutorial.common import TEMPLATE_REPOSITORY
    from tutorial.triton_local import launch_triton

    require_local_triton()
    with pytest.raises(TutorialError) as err:
        launch_triton(TEMPLATE_REPOSITORY, runtime="bundled", timeout=120)
    log = str(err.value)
    assert "run notebooks/03_model_repository.ipynb" in log


# --- /dev/shm: the python backend's tensors travel through it ---


def _need_sandbox():
    from tutorial.triton_local import can_sandbox

    require_local_triton()
    if not can_sandbox():
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root with unshare: the /dev/shm tests must run there")
        pytest.skip("limiting /dev/shm needs root and unshare (a private mount namespace)")


def _generate(url, text, n):
    inputs = [
        {"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": [text]},
        {"name": "MAX_NEW_TOKENS", "datatype": "INT32", "shape": [1], "data": [n]},
    ]
    return requests.post(f"{url}/v2/models/generate/infer", json={"inputs": inputs}, timeout=300)


def _ids(response):
    assert response.status_code == 200, response.text
    return {o["name"]: o["data"] for o in response.json()["outputs"]}["TOKEN_IDS"]


def _artifact(tiny_workdir, tmp_path, step_runner):
    """The tiny artifact, with the engine's step_runner set (the committed default is
    "onnxruntime"; "bls" sends the KV cache through /dev/shm every step, to the model
    `gpt2_with_past`, which is then assembled into the repository)."""
    from tutorial.common import paths
    from tutorial.repository import assemble_repository, pack_artifact

    source = tiny_workdir / "model_artifact.zip"
    if step_runner == "onnxruntime":
        return source
    p = paths()
    repo = tmp_path / f"{step_runner}_repository"
    changes = assemble_repository(
        repo,
        p["vocab_dir"],
        {"gpt2": p["onnx_last"], "gpt2_with_past": p["onnx_past"]},
        step_runner=step_runner,
    )
    assert "generate_stream: step_runner = bls" in changes
    return Path(pack_artifact(repo, tmp_path / f"{step_runner}.zip")["path"])


@pytest.mark.parametrize("step_runner", ["bls", "onnxruntime"])
def test_a_1000_token_prompt_in_64_mb_of_shm(tiny_workdir, tiny_reference, tmp_path, step_runner):
    """A container's default /dev/shm: the tiny model's cache fits; tokens stay exact."""
    from tutorial.client import reference_generate
    from tutorial.triton_local import serve_artifact

    _need_sandbox()
    tf_model, tok = tiny_reference
    prompt = " hello" * 1000
    artifact = _artifact(tiny_workdir, tmp_path, step_runner)
    server = serve_artifact(artifact, runtime="bundled", shm_size="64m")
    try:
        mounts = Path(f"/proc/{server.process.pid}/mountinfo").read_text()
        shm = [m for m in mounts.splitlines() if " /dev/shm " in m][-1]  # the one on top
        assert "size=65536k" in shm
        got = _ids(_generate(server.url, prompt, 10))
        print(f"{step_runner}: 64 MB /dev/shm, 1000-token prompt: HTTP 200, {len(got)} tokens")
        assert got == reference_generate(tf_model, tok, prompt, 10)
        assert _ids(_generate(server.url, PROMPT, 5)) == reference_generate(
            tf_model, tok, PROMPT, 5
        )
    finally:
        server.stop()


def test_when_shm_is_too_small_the_answer_says_so_and_the_server_goes_on(
    tiny_workdir, tiny_reference, tmp_path
):
    """step_runner "bls": the cache crosses /dev/shm, and 8 MB cannot hold a 1000-token one.
    The default, "onnxruntime", keeps the cache in its own process: the same request is served."""
    from tutorial.client import reference_generate
    from tutorial.triton_local import serve_artifact

    _need_sandbox()
    tf_model, tok = tiny_reference
    long = " hello" * 1000
    server = serve_artifact(
        _artifact(tiny_workdir, tmp_path, "bls"), runtime="bundled", shm_size="8m"
    )
    try:
        response = _generate(server.url, long, 10)
        print(
            "bls: 8 MB /dev/shm, 1000-token prompt:", response.status_code, response.json()["error"]
        )
        assert response.status_code in (400, 500)
        error = response.json()["error"]
        assert "/dev/shm" in error and "MiB" in error and "--shm-size" in error
        assert _ids(_generate(server.url, PROMPT, 5)) == reference_generate(
            tf_model, tok, PROMPT, 5
        )
    finally:
        server.stop()
    server = serve_artifact(tiny_workdir / "model_artifact.zip", runtime="bundled", shm_size="8m")
    try:
        got = _ids(_generate(server.url, long, 10))
        print(f"onnxruntime: 8 MB /dev/shm, 1000-token prompt: HTTP 200, {len(got)} tokens")
        assert got == reference_generate(tf_model, tok, long, 10)
    finally:
        server.stop()


def test_shm_check_refuses_what_cannot_fit():
    """generate's check, on GPT-2 124M's numbers: 72 KiB of cache per token, eight caches
    (the config's shm_caches_per_step)."""
    import importlib.util
    import sys
    import types

    sys.modules.setdefault("triton_python_backend_utils", types.ModuleType("pb_utils_stub"))
    sys.modules.setdefault("tokenizers", __import__("tokenizers"))
    spec = importlib.util.spec_from_file_location(
        "generate_model", ROOT / "model_repository" / "generate_stream" / "1" / "model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    per_token = 12 * 2 * 12 * 64 * 4
    assert per_token == 73728
    assert module.shm_problem(113, per_token, 8, 64 * 2**20) is None
    message = module.shm_problem(1024, per_token, 8, 64 * 2**20)
    assert message == (
        "this request needs about 576 MiB of shared memory for its KV cache (1024 tokens: "
        "prompt plus MAX_NEW_TOKENS), but /dev/shm holds 64 MiB (at most about 113 tokens "
        "fit): send a shorter prompt or fewer MAX_NEW_TOKENS, or give the server more shared "
        "memory (docker run --shm-size=2g; see the README's troubleshooting)"
    )

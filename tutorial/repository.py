"""Assemble, validate and pack the Triton model repository (notebook 03)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
import zipfile
from pathlib import Path
from typing import Any

from tutorial.common import TEMPLATE_REPOSITORY, TutorialError

#: Where OCI unpacks the artifact zip (read-only). The zip holds ``model_repository/`` at its
#: root, so the container command serves ``/opt/ds/model/deployed_model/model_repository``.
OCI_ARTIFACT_ROOT = "/opt/ds/model/deployed_model"
OCI_REPOSITORY_PATH = f"{OCI_ARTIFACT_ROOT}/model_repository"

#: Python-backend models that read GPT-2's vocab files from their version folder.
TOKENIZER_MODELS = ("encoder", "decoder", "generate_stream")
#: The model that runs generation (``generate`` forwards to it), and its step model's name.
ENGINE_MODEL = "generate_stream"
STEP_MODEL = "gpt2_with_past"
VOCAB_FILES = ("vocab.json", "merges.txt")
CONFIG_TO_ONNX_DTYPE = {"TYPE_INT32": "INT32", "TYPE_INT64": "INT64", "TYPE_FP32": "FLOAT"}


def load_config(path: Path) -> Any:
    """Parse a ``config.pbtxt`` with Triton's own protobuf schema (a typo fails here)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise TutorialError(f"{path} is not a valid Triton model config: {exc}") from None


def write_config(config: Any, path: Path) -> None:
    """Write a ModelConfig back as text."""
    from google.protobuf import text_format

    Path(path).write_text(text_format.MessageToString(config))


def dtype_name(config_dtype: int) -> str:
    """``TYPE_INT32`` and friends from the enum value."""
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(config_dtype)


def set_instance_kind(config: Any, kind: str) -> None:
    """Set every instance group of ``config`` to ``KIND_AUTO``, ``KIND_GPU`` or ``KIND_CPU``.

    ``KIND_AUTO`` (written as no ``kind`` at all) lets Triton choose: the GPUs when the machine
    has them, else the CPU, so one artifact loads on a GPU shape and on a CPU shape.
    """
    from tritonclient.grpc import model_config_pb2

    if kind not in ("KIND_AUTO", "KIND_GPU", "KIND_CPU"):
        raise TutorialError(f"instance kind must be KIND_AUTO, KIND_GPU or KIND_CPU, not {kind!r}.")
    value = model_config_pb2.ModelInstanceGroup.Kind.Value(kind)
    if not config.instance_group:
        config.instance_group.add(count=1)
    for group in config.instance_group:
        group.kind = value


def model_dims_from_onnx(config: Any, signature: dict[str, Any]) -> list[str]:
    """Copy the ONNX model's fixed dims into the config's tensors of the same name.

    The KV cache dims (layers, heads, head size) depend on the model size: the committed
    config has GPT-2 124M's; the tiny test model differs. Returns what was changed.
    """
    onnx_dims = {v["name"]: v["dims"] for v in signature["inputs"] + signature["outputs"]}
    changed = []
    for tensor in list(config.input) + list(config.output):
        dims = onnx_dims.get(tensor.name)
        if dims is not None and list(tensor.dims) != dims:
            changed.append(f"{config.name}.{tensor.name}: {list(tensor.dims)} -> {dims}")
            del tensor.dims[:]
            tensor.dims.extend(dims)
    return changed


def step_runner_of(config: Any) -> str | None:
    """The ``step_runner`` of a model that drives a step model (``onnxruntime`` or ``bls``), or
    None for any other model."""
    if "step_model" not in config.parameters:
        return None
    runner = (
        config.parameters["step_runner"].string_value if "step_runner" in config.parameters else ""
    )
    return runner or "onnxruntime"


def assemble_repository(
    target: Path,
    vocab_dir: Path,
    onnx_models: dict[str, Path],
    model_info: dict[str, Any] | None = None,
    template: Path = TEMPLATE_REPOSITORY,
    step_runner: str | None = None,
) -> list[str]:
    """Build the repository at ``target`` from the committed template and generated files.

    ``onnx_models`` maps a model name of the template (``gpt2``, ``gpt2_with_past``) to the
    ONNX file to serve as its ``1/model.onnx``. The ONNX models' instance groups name no kind,
    so Triton places them on the GPU when there is one, else on the CPU: the same repository
    serves on either shape.

    The engine's step model (``gpt2_with_past``) is loaded once: with the engine's
    ``step_runner`` ``onnxruntime`` (the template's default; ``step_runner`` overrides it) its
    ONNX file sits in the engine's version folder as ``gpt2_with_past.onnx`` and the model
    ``gpt2_with_past`` is left out, since nothing would call it; with ``bls`` it is a model of its
    own and the engine holds no file. Returns the changes made to the committed configs, to
    show the learner.
    """
    from tutorial.export import onnx_signature
    from tutorial.onnx_surgery import onnx_files, write_engine_step

    if target.resolve() == template.resolve():
        raise TutorialError("Assemble into a separate folder; the committed template stays as is.")
    engine = load_config(template / ENGINE_MODEL / "config.pbtxt")
    runner = step_runner or step_runner_of(engine)
    if runner not in ("onnxruntime", "bls"):
        raise TutorialError(f"step_runner must be 'onnxruntime' or 'bls', not {runner!r}.")
    step = engine.parameters["step_model"].string_value
    if target.exists():
        shutil.rmtree(target)
    changes: list[str] = []
    for model_dir in sorted(p for p in template.iterdir() if (p / "config.pbtxt").exists()):
        name = model_dir.name
        if name == step and runner == "onnxruntime":
            changes.append(f"{name}: left out (step_runner onnxruntime: {ENGINE_MODEL} runs it)")
            continue
        dest = target / name
        (dest / "1").mkdir(parents=True)
        config = load_config(model_dir / "config.pbtxt")
        for path in (model_dir / "1").glob("*.py"):
            shutil.copyfile(path, dest / "1" / path.name)  # the file's content, never a link
        if name in TOKENIZER_MODELS:
            for vocab in VOCAB_FILES:
                shutil.copyfile(vocab_dir / vocab, dest / "1" / vocab)
        if config.platform == "onnxruntime_onnx":
            if name not in onnx_models:
                raise TutorialError(f"No ONNX file given for model '{name}'.")
            model_file, *data_files = onnx_files(onnx_models[name])
            shutil.copyfile(model_file, dest / "1" / "model.onnx")
            for data in data_files:  # external data keeps its name: model.onnx refers to it
                shutil.copyfile(data, dest / "1" / data.name)
            changes += model_dims_from_onnx(config, onnx_signature(onnx_models[name]))
            set_instance_kind(config, "KIND_AUTO")
        if name == ENGINE_MODEL:
            if runner != step_runner_of(config):
                config.parameters["step_runner"].string_value = runner
                changes.append(f"{name}: step_runner = {runner}")
            if runner == "onnxruntime":
                if step not in onnx_models:
                    raise TutorialError(f"No ONNX file given for model '{step}'.")
                model_file, *data_files = onnx_files(onnx_models[step])
                for data in data_files:  # external data keeps its name: the file refers to it
                    shutil.copyfile(data, dest / "1" / data.name)
                # the same model with its KV cache per layer (no copy of the whole cache to
                # split and stack it every step), the LM head on the last position only, a
                # second group of rows and fewer nodes (onnx_surgery.engine_step)
                done = write_engine_step(model_file, dest / "1" / f"{step}.onnx")
                names = done["cache_inputs"]
                changes.append(
                    f"{name}: 1/{step}.onnx takes its KV cache per layer ({len(names)} inputs: "
                    f"{names[0]}, ...)"
                    + (", LM head on the last position only" if done["last_position_head"] else "")
                    + (
                        ", a second group of rows (a prompt's chunk in the decode step's call)"
                        if done["two_groups"]
                        else ""
                    )
                    + (
                        f", {done['simplified']['nodes_before']:,} nodes made "
                        f"{done['simplified']['nodes_after']:,}"
                        if done["simplified"]
                        else ""
                    )
                )
        write_config(config, dest / "config.pbtxt")
    changes += _set_empty_past_shapes(target, onnx_models)
    if model_info is not None:
        (target / "MODEL_INFO.json").write_text(json.dumps(model_info, indent=2, sort_keys=True))
    return changes


def _set_empty_past_shapes(target: Path, onnx_models: dict[str, Path]) -> list[str]:
    """Tell each BLS model that drives a step model (parameter ``step_model``) the shape of an
    empty KV cache, read from that model's ONNX ``past`` input: [n_layer, 2, 1, n_head, 0, d]."""
    from tutorial.export import onnx_signature

    changes = []
    for cfg_path in sorted(target.glob("*/config.pbtxt")):
        config = load_config(cfg_path)
        if "step_model" not in config.parameters:
            continue
        step = config.parameters["step_model"].string_value
        if step not in onnx_models:
            raise TutorialError(f"{config.name} drives '{step}', which has no ONNX file.")
        past = next(v for v in onnx_signature(onnx_models[step])["inputs"] if v["name"] == "past")
        n_layer, two, _, n_head, _, head_dim = past["dims"]
        shape = f"{n_layer},{two},1,{n_head},0,{head_dim}"
        config.parameters["empty_past_shape"].string_value = shape
        write_config(config, cfg_path)
        changes.append(f"{config.name}: empty_past_shape = [{shape}]")
    return changes


def _tensors(config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    return {t.name: t for t in config.input}, {t.name: t for t in config.output}


def required_files(name: str, config: Any) -> list[str]:
    """The files a model folder must hold for Triton to load it, relative to the folder.

    One list for both checks: the assembled folder (:func:`validate_repository`) and the
    artifact zip as OCI unpacks it (:func:`validate_artifact_zip`).
    """
    files = ["config.pbtxt"]
    if config.platform == "onnxruntime_onnx":
        files.append(f"1/{config.default_model_filename or 'model.onnx'}")
    if config.backend == "python":
        files.append("1/model.py")
    if name in TOKENIZER_MODELS:
        files += [f"1/{v}" for v in VOCAB_FILES]
    if step_runner_of(config) == "onnxruntime":
        files.append(f"1/{config.parameters['step_model'].string_value}.onnx")
    return files


def called_models(config: Any) -> list[str]:
    """The models ``config``'s model calls: an ensemble's steps, the engine ``generate``
    forwards to, the step model of an engine whose step_runner is ``bls``."""
    called = [s.model_name for s in config.ensemble_scheduling.step]
    if "engine_model" in config.parameters:
        called.append(config.parameters["engine_model"].string_value)
    if step_runner_of(config) == "bls":
        called.append(config.parameters["step_model"].string_value)
    return called


def model_imports(repository: Path) -> dict[str, set[str]]:
    """The third-party top-level modules each python-backend ``model.py`` under ``repository``
    imports (the standard library and Triton's own ``triton_python_backend_utils`` left out):
    what the serving image must carry."""
    import ast
    import sys

    found = {}
    for path in sorted(Path(repository).glob("*/1/model.py")):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        found[path.parent.parent.name] = {
            top
            for top in (m.split(".")[0] for m in names)
            if top not in sys.stdlib_module_names and top != "triton_python_backend_utils"
        }
    return found


def validate_repository(repo: Path) -> dict[str, Any]:
    """Check every model against its files and the ensemble's wiring; raise on the first
    class of problems with a message that names each mismatch. Returns the parsed configs."""
    from tutorial.export import onnx_signature

    problems: list[str] = []
    configs: dict[str, Any] = {}
    for model_dir in sorted(p for p in Path(repo).iterdir() if p.is_dir()):
        cfg_path = model_dir / "config.pbtxt"
        if not cfg_path.exists():
            problems.append(f"{model_dir.name}: no config.pbtxt")
            continue
        config = load_config(cfg_path)
        configs[model_dir.name] = config
        if config.name != model_dir.name:
            problems.append(f"{model_dir.name}: config name '{config.name}' != folder name")
        if not (model_dir / "1").is_dir():
            problems.append(f"{model_dir.name}: no version folder '1'")
        problems += [
            f"{model_dir.name}: missing {f}" + (HINTS.get(Path(f).name, ""))
            for f in required_files(model_dir.name, config)
            if not (model_dir / f).is_file()
        ]
        if config.platform == "onnxruntime_onnx" and (model_dir / "1" / "model.onnx").exists():
            problems += _check_onnx(config, model_dir / "1" / "model.onnx", onnx_signature)
    for config in configs.values():
        if config.platform == "ensemble":
            problems += _check_ensemble(config, configs)
        elif missing := [m for m in called_models(config) if m not in configs]:
            problems += [
                f"{config.name}: calls '{m}', which is not in the repository" for m in missing
            ]
    if problems:
        raise TutorialError("The model repository has problems:\n  - " + "\n  - ".join(problems))
    return configs


#: What to do about a missing file, by its name.
HINTS = {
    "model.onnx": " (notebook 03 copies it from notebook 02's exports)",
    "vocab.json": " (copy GPT-2's vocab files: notebook 03 does)",
    "merges.txt": " (copy GPT-2's vocab files: notebook 03 does)",
}


def _check_onnx(config: Any, path: Path, signature_of: Any) -> list[str]:
    """The onnxruntime backend's load-time checks (r24.10 ``ValidateInputs`` /
    ``ValidateOutputs``): names, dtypes, and dims, where an input's -1 in the ONNX model
    accepts any configured dim but an output's dims must equal the model's exactly."""
    sig = signature_of(path)
    problems = []
    batched = config.max_batch_size > 0
    for kind, onnx_values, cfg_values in (
        ("input", sig["inputs"], config.input),
        ("output", sig["outputs"], config.output),
    ):
        real = {v["name"]: v for v in onnx_values}
        for tensor in cfg_values:
            where = f"{config.name}: {kind} '{tensor.name}'"
            if tensor.name not in real:
                problems.append(f"{where} is not in the ONNX model (it has {sorted(real)})")
                continue
            want = real[tensor.name]
            got = CONFIG_TO_ONNX_DTYPE.get(
                dtype_name(tensor.data_type), dtype_name(tensor.data_type)
            )
            if got != want["dtype"]:
                problems.append(
                    f"{where} is {got} in config.pbtxt but {want['dtype']} in the ONNX model"
                )
            dims = want["dims"][1:] if batched else want["dims"]
            if batched and want["dims"][:1] != [-1]:
                problems.append(
                    f"{where}: max_batch_size > 0 needs a dynamic first dim in the model"
                )
            cfg_dims = list(tensor.dims)
            exact = kind == "output"
            if len(cfg_dims) != len(dims) or any(
                (exact or m != -1) and c != m for c, m in zip(cfg_dims, dims)
            ):
                problems.append(
                    f"{where} has dims {cfg_dims} in config.pbtxt but {dims} in the ONNX model"
                )
        if kind == "input":
            missing = set(real) - {t.name for t in cfg_values}
            problems += [
                f"{config.name}: ONNX input '{m}' is missing from config.pbtxt"
                for m in sorted(missing)
            ]
    return problems


def _check_ensemble(config: Any, configs: dict[str, Any]) -> list[str]:
    problems = []
    ens_in, ens_out = _tensors(config)
    available = {name: t.data_type for name, t in ens_in.items()}
    for i, step in enumerate(config.ensemble_scheduling.step, 1):
        where = f"{config.name} step {i} ({step.model_name})"
        model = configs.get(step.model_name)
        if model is None:
            problems.append(f"{where}: no model '{step.model_name}' in the repository")
            continue
        if model.max_batch_size != config.max_batch_size:
            problems.append(
                f"{where}: max_batch_size {model.max_batch_size} != ensemble's {config.max_batch_size}"
            )
        m_in, m_out = _tensors(model)
        for key, value in step.input_map.items():
            if key not in m_in:
                problems.append(f"{where}: input_map key '{key}' is not an input of {model.name}")
            elif value not in available:
                problems.append(f"{where}: '{value}' is not produced before this step")
            elif available[value] != m_in[key].data_type:
                problems.append(
                    f"{where}: '{value}' is {dtype_name(available[value])} but {model.name}.{key} "
                    f"expects {dtype_name(m_in[key].data_type)}"
                )
        missing = set(m_in) - set(step.input_map) - {t.name for t in model.input if t.optional}
        problems += [f"{where}: input '{m}' of {model.name} is not mapped" for m in sorted(missing)]
        for key, value in step.output_map.items():
            if key not in m_out:
                problems.append(f"{where}: output_map key '{key}' is not an output of {model.name}")
            else:
                available[value] = m_out[key].data_type
    for name, tensor in ens_out.items():
        if name not in available:
            problems.append(f"{config.name}: output '{name}' is not produced by any step")
        elif available[name] != tensor.data_type:
            problems.append(
                f"{config.name}: output '{name}' dtype differs from the step producing it"
            )
    return problems


def bytes_per_step(
    n_layer: int, n_head: int, n_embd: int, vocab: int, length: int
) -> dict[str, int]:
    """Bytes gpt2 hands the decoder per ensemble call, before and after trimming (fp32)."""
    head_dim = n_embd // n_head
    logits = length * vocab * 4
    past = n_layer * 2 * n_head * length * head_dim * 4
    return {
        "seed_logits": logits,
        "seed_past": past,
        "seed_total": logits + past,
        "trimmed": vocab * 4,
    }


#: Written into every folder that would otherwise travel empty in the artifact zip.
KEEP_FOLDER_NAME = "README.md"
KEEP_FOLDER_README = (
    "This file keeps this folder in the artifact zip. Triton loads a model only from a numeric "
    "version folder, and an ensemble's version folder has no file of its own. OCI documents "
    "that it unzips the artifact, not that its unzip keeps empty folders; an unzip that drops "
    "them would make Triton refuse the model and the deployment fail. Triton ignores this "
    "file.\n"
)


def pack_artifact(repo: Path, zip_path: Path) -> dict[str, Any]:
    """Zip ``repo`` as ``model_repository/...`` for OCI (unpacked under ``OCI_ARTIFACT_ROOT``).

    Every folder gets its own entry, and a folder with no file (``ensemble_model/1/``) also
    gets a short ``README.md`` (:data:`KEEP_FOLDER_README`): Triton refuses a model without a
    version folder, and OCI documents only that it unzips the artifact, not that its unzip
    keeps empty folders. ONNX files are stored (they barely compress), the rest deflated;
    progress in bytes. The zip is then checked as OCI will read it
    (:func:`validate_artifact_zip`).
    """
    from tqdm.auto import tqdm

    repo = Path(repo)
    links = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_symlink())
    if links:
        raise TutorialError(f"{repo} holds symbolic links, which a zip cannot carry: {links}")
    folders = sorted(p for p in repo.rglob("*") if p.is_dir())
    files = sorted(p for p in repo.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = zip_path.with_suffix(".zip.tmp")
    with (
        zipfile.ZipFile(tmp, "w") as zf,
        tqdm(total=total, unit="B", unit_scale=True, desc="zip") as bar,
    ):
        for folder in [repo, *folders]:
            arcname = (Path("model_repository") / folder.relative_to(repo)).as_posix() + "/"
            info = zipfile.ZipInfo(arcname, date_time=time.localtime(folder.stat().st_mtime)[:6])
            info.external_attr = (stat.S_IFDIR | 0o755) << 16 | 0x10  # MS-DOS directory flag
            zf.writestr(info, b"")
            if folder != repo and not any(folder.iterdir()):
                zf.writestr(f"{arcname}{KEEP_FOLDER_NAME}", KEEP_FOLDER_README)
        for path in files:
            arcname = Path("model_repository") / path.relative_to(repo)
            weights = path.suffix in (".onnx", ".data")  # weights barely compress
            method = zipfile.ZIP_STORED if weights else zipfile.ZIP_DEFLATED
            zf.write(path, arcname.as_posix(), compress_type=method)
            bar.update(path.stat().st_size)
    tmp.replace(zip_path)
    models = validate_artifact_zip(zip_path)
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
    return {
        "path": str(zip_path),
        "bytes": zip_path.stat().st_size,
        "files": names,
        "models": models,
    }


def validate_artifact_zip(zip_path: Path) -> dict[str, list[str]]:
    """Read the artifact zip itself (not the folder it came from) and name what is missing
    for Triton to load it once OCI unpacks it: per model folder a ``config.pbtxt``, a numeric
    version folder, and every file the config needs; the models an ensemble or a BLS model
    calls; no symbolic links; everything under ``model_repository/``.

    Returns ``{model: [its entries]}``; raises :class:`TutorialError` listing every problem.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        archive = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise TutorialError(f"{zip_path} is not a readable zip: {exc}") from None
    problems: list[str] = []
    with archive:
        infos = archive.infolist()
        names = {i.filename for i in infos}
        problems += [
            f"{i.filename} is a symbolic link (OCI unpacks it as a broken file)"
            for i in infos
            if stat.S_ISLNK(i.external_attr >> 16)
        ]
        problems += [
            f"{n} is outside model_repository/" for n in sorted(names) if not n.startswith(ROOT)
        ]
        # A folder exists after unzip if it has its own entry or holds an entry; it surely
        # exists only if it holds a file (an unzip may skip directory entries).
        folders = {n for n in names if n.endswith("/")}
        folders |= {n[: i + 1] for n in names for i, c in enumerate(n) if c == "/"}
        files = {n for n in names if not n.endswith("/")}
        kept = {n[: i + 1] for n in files for i, c in enumerate(n) if c == "/"}
        model_dirs = sorted({n.split("/")[1] for n in folders if n.count("/") >= 2})
        configs: dict[str, Any] = {}
        for model in model_dirs:
            prefix = f"{ROOT}{model}/"
            if f"{prefix}config.pbtxt" not in names:
                problems.append(f"{model}: no config.pbtxt")
                continue
            try:
                text = archive.read(f"{prefix}config.pbtxt").decode()
                config = text_format.Parse(text, model_config_pb2.ModelConfig())
            except (UnicodeDecodeError, text_format.ParseError) as exc:
                problems.append(f"{model}: config.pbtxt does not parse: {exc}")
                continue
            configs[model] = config
            versions = {
                f[len(prefix) :].split("/")[0]
                for f in folders
                if f.startswith(prefix) and f != prefix
            }
            if not any(v.isdigit() for v in versions):
                problems.append(
                    f"{model}: no numeric version folder (e.g. {prefix}1/): Triton refuses the "
                    f"model ('at least one version must be available'). Pack it with "
                    f"pack_artifact, which writes folder entries."
                )
            problems += [
                f"{model}: the version folder {prefix}{v}/ holds no file: an unzip that drops "
                "empty folders would leave Triton no version to load. Pack it with "
                f"pack_artifact, which puts a {KEEP_FOLDER_NAME} in it."
                for v in sorted(versions)
                if v.isdigit() and f"{prefix}{v}/" not in kept
            ]
            problems += [
                f"{model}: missing {prefix}{f}"
                for f in required_files(model, config)
                if f"{prefix}{f}" not in names
            ]
        for model, config in configs.items():
            called = called_models(config)
            problems += [
                f"{model}: calls '{c}', which is not in the zip" for c in called if c not in configs
            ]
        entries = {m: sorted(n for n in names if n.startswith(f"{ROOT}{m}/")) for m in configs}
    if not configs and not problems:
        problems.append(f"no model folders under {ROOT}")
    if problems:
        raise TutorialError(
            f"The artifact {zip_path} would not load on OCI:\n  - " + "\n  - ".join(problems)
        )
    return entries


#: The folder at the zip's root; OCI serves ``OCI_ARTIFACT_ROOT/model_repository``.
ROOT = "model_repository/"


def artifact_with_parameters(
    zip_path: Path, output: Path, models: list[str], parameters: dict[str, str]
) -> Path:
    """A copy of the artifact zip whose ``models`` have ``parameters`` set in their configs
    (``parameters`` entries added or replaced); every other entry is copied as it is.

    For comparisons of one setting on the same artifact (the benchmark's ``inflight_batching``
    off and on, the tests' ``step_runner``); the copy is checked like the original.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    targets = {f"model_repository/{m}/config.pbtxt": m for m in models}
    found = set()
    output.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path) as source, zipfile.ZipFile(output, "w") as copy:
        for info in source.infolist():
            if info.filename in targets:
                text = source.read(info).decode()
                config = text_format.Parse(text, model_config_pb2.ModelConfig())
                for key, value in parameters.items():
                    config.parameters[key].string_value = value
                copy.writestr(info, text_format.MessageToString(config).encode())
                found.add(targets[info.filename])
            elif info.is_dir():
                copy.writestr(info, b"")
            else:  # streamed: the ONNX files are hundreds of MB
                with source.open(info) as fin, copy.open(info, "w") as fout:
                    shutil.copyfileobj(fin, fout, 16 << 20)
    missing = sorted(set(models) - found)
    if missing:
        raise TutorialError(f"{zip_path} has no config for {missing}")
    validate_artifact_zip(output)  # raises, naming what is wrong
    return output


def unpack_artifact(zip_path: Path, dest: Path, check: bool = True) -> Path:
    """Unpack the artifact into ``dest`` the way OCI does at ``OCI_ARTIFACT_ROOT``, after
    :func:`validate_artifact_zip` (``check=False`` skips it, as OCI does not check), and make
    it read-only (OCI mounts it read-only).

    ``dest`` plays ``/opt/ds/model/deployed_model``; returns it.
    """
    if check:
        validate_artifact_zip(zip_path)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path) as zf:
        # Files only: an empty folder is not relied on to survive OCI's unzip (see
        # pack_artifact), so it does not survive this one either.
        zf.extractall(dest, [i for i in zf.infolist() if not i.is_dir()])
    for folder, _dirs, files in os.walk(dest, topdown=False):
        for name in files:
            os.chmod(os.path.join(folder, name), 0o444)
        os.chmod(folder, 0o555)
    return dest


def make_writable(path: Path) -> None:
    """Undo :func:`unpack_artifact`'s read-only modes so the folder can be deleted."""
    for folder, _dirs, files in os.walk(path):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)

"""Assemble, validate and pack the Triton model repository (notebook 03)."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

from tutorial.common import TEMPLATE_REPOSITORY, TutorialError

#: Where OCI unpacks the artifact zip (read-only). The zip holds ``model_repository/`` at its
#: root, so the container command serves ``/opt/ds/model/deployed_model/model_repository``.
OCI_ARTIFACT_ROOT = "/opt/ds/model/deployed_model"
OCI_REPOSITORY_PATH = f"{OCI_ARTIFACT_ROOT}/model_repository"

#: Python-backend models that read GPT-2's vocab files from their version folder.
TOKENIZER_MODELS = ("encoder", "decoder", "generate", "generate_stream")
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
    """Set every instance group of ``config`` to ``KIND_GPU`` or ``KIND_CPU``."""
    from tritonclient.grpc import model_config_pb2

    if kind not in ("KIND_GPU", "KIND_CPU"):
        raise TutorialError(f"INSTANCE_KIND must be KIND_GPU or KIND_CPU, not {kind!r}.")
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


def assemble_repository(
    target: Path,
    vocab_dir: Path,
    onnx_models: dict[str, Path],
    instance_kind: str = "KIND_GPU",
    model_info: dict[str, Any] | None = None,
    template: Path = TEMPLATE_REPOSITORY,
) -> list[str]:
    """Build the repository at ``target`` from the committed template and generated files.

    ``onnx_models`` maps a model name of the template (``gpt2``, ``gpt2_with_past``) to the
    ONNX file to serve as its ``1/model.onnx``. Returns a list of the changes made to the
    committed configs (instance kinds, model-dependent dims), to show the learner.
    """
    from tutorial.export import onnx_signature

    if target.resolve() == template.resolve():
        raise TutorialError("Assemble into a separate folder; the committed template stays as is.")
    if target.exists():
        shutil.rmtree(target)
    changes: list[str] = []
    for model_dir in sorted(p for p in template.iterdir() if (p / "config.pbtxt").exists()):
        name = model_dir.name
        dest = target / name
        (dest / "1").mkdir(parents=True)
        config = load_config(model_dir / "config.pbtxt")
        for path in (model_dir / "1").glob("*.py"):
            shutil.copyfile(path, dest / "1" / path.name)
        if name in TOKENIZER_MODELS:
            for vocab in VOCAB_FILES:
                shutil.copyfile(vocab_dir / vocab, dest / "1" / vocab)
        if config.platform == "onnxruntime_onnx":
            if name not in onnx_models:
                raise TutorialError(f"No ONNX file given for model '{name}'.")
            shutil.copyfile(onnx_models[name], dest / "1" / "model.onnx")
            changes += model_dims_from_onnx(config, onnx_signature(onnx_models[name]))
            before = [g.kind for g in config.instance_group]
            set_instance_kind(config, instance_kind)
            if before != [g.kind for g in config.instance_group]:
                changes.append(f"{name}: instance kind -> {instance_kind}")
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
        if config.backend == "python" and not (model_dir / "1" / "model.py").exists():
            problems.append(f"{model_dir.name}: python backend but no 1/model.py")
        if model_dir.name in TOKENIZER_MODELS:
            problems += [
                f"{model_dir.name}: missing 1/{v} (copy GPT-2's vocab files)"
                for v in VOCAB_FILES
                if not (model_dir / "1" / v).exists()
            ]
        if config.platform == "onnxruntime_onnx":
            problems += _check_onnx(config, model_dir / "1" / "model.onnx", onnx_signature)
    for config in configs.values():
        if config.platform == "ensemble":
            problems += _check_ensemble(config, configs)
    if problems:
        raise TutorialError("The model repository has problems:\n  - " + "\n  - ".join(problems))
    return configs


def _check_onnx(config: Any, path: Path, signature_of: Any) -> list[str]:
    if not path.exists():
        return [f"{config.name}: no 1/model.onnx"]
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
            if len(cfg_dims) != len(dims) or any(
                m != -1 and c != m for c, m in zip(cfg_dims, dims)
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


def pack_artifact(repo: Path, zip_path: Path) -> dict[str, Any]:
    """Zip ``repo`` as ``model_repository/...`` for OCI (unpacked under ``OCI_ARTIFACT_ROOT``).

    ONNX files are stored (they barely compress), the rest deflated; progress in bytes.
    """
    from tqdm.auto import tqdm

    files = sorted(p for p in Path(repo).rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = zip_path.with_suffix(".zip.tmp")
    with (
        zipfile.ZipFile(tmp, "w") as zf,
        tqdm(total=total, unit="B", unit_scale=True, desc="zip") as bar,
    ):
        for path in files:
            arcname = Path("model_repository") / path.relative_to(repo)
            method = zipfile.ZIP_STORED if path.suffix == ".onnx" else zipfile.ZIP_DEFLATED
            zf.write(path, arcname.as_posix(), compress_type=method)
            bar.update(path.stat().st_size)
    tmp.replace(zip_path)
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
    return {"path": str(zip_path), "bytes": zip_path.stat().st_size, "files": names}

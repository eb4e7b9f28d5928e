"""Triton python backend: `generate_stream` runs the same code as `generate`, in decoupled mode.

The code lives once, in `../../generate/1/model.py` (this file loads it from the model
repository it is served from, which holds both models). A plain file, not a link: zips,
read-only mounts and checkouts without symbolic links (Windows) all carry it.
"""

import importlib.util
from pathlib import Path

_source = Path(__file__).resolve().parents[2] / "generate" / "1" / "model.py"
_spec = importlib.util.spec_from_file_location("generate_model", _source)
if _spec is None or not _source.is_file():
    raise ImportError(f"generate_stream needs the generate model's code at {_source}")
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)

TritonPythonModel = _module.TritonPythonModel

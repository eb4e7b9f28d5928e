"""The GPT-2 family measured here, one member after another (``make family-bench``).

    python benchmarks/family_bench.py                          # distilgpt2 gpt2 gpt2-medium
    python benchmarks/family_bench.py --members gpt2-large --root /tmp/family
    python benchmarks/family_bench.py --reuse     # the exports kept: notebook 03 and the rest

For each member, in its own work folder under ``--root``: notebooks 01-03 with the offline
stand-in (``MODEL_SOURCE=offline``, ``MODEL_ID=<member>``: the member's architecture with random
weights, so sizes and speeds are the member's and the text is not), then

- the export: seconds and peak resident memory of each stage (notebook 02's figures), and
  whether its greedy tokens equalled transformers' ``generate(do_sample=False)`` (notebook 02
  asserts it: the notebook fails otherwise);
- sizes: the ONNX files (with external data) and the artifact zip;
- decode ms/token, p50 of ``--steps`` steps in-process (onnxruntime, fp32 and int8), against the
  weight-read floor: the bytes a step reads (:mod:`tutorial.sizes`) over the all-core matvec
  bandwidth measured in the same run;
- the served artifact (the zip unpacked read-only, the bundled Triton): ``generate``'s tokens
  against the in-process fp32 loop's, and the server's resident memory (every process) once
  ``ensemble_model``, ``generate`` and ``generate_stream`` have each answered.

Every figure lands in ``docs/family.json`` (``--results``, kept in git so that a run of one
member adds its row to the others') as it is measured, and the table in ``docs/family.md``
(``--out``) is rewritten from it after each member: a member that fails (out of memory, say)
is written with its error, and the others still run.

Disk: the notebooks keep every intermediate (the TensorFlow checkpoint, the ONNX files, the
repository and the zip: the table's disk column, measured). ``--prune`` deletes
what no later step reads (the checkpoint and the full-sequence ONNX after notebook 02, the
repository folder after notebook 03's zip, the ONNX files and the zip once the member is
measured) and the row records the disk each step took, so the total a learner needs without
pruning is still measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tutorial import export, sizes  # noqa: E402
from tutorial.onnx_surgery import onnx_files  # noqa: E402

DEFAULT_MEMBERS = ("distilgpt2", "gpt2", "gpt2-medium")
PROMPT = "My dog is cute, but he barks a lot."


def folder_gb(path: Path) -> float:
    """The bytes under ``path`` (a file or a folder), in GB."""
    if path.is_file():
        return path.stat().st_size / 1e9
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


def prune(work: Path, after: str) -> dict[str, float]:
    """Delete, after notebook ``after``, what no later step reads; return the GB each part took
    (measured before deleting it)."""
    import shutil

    state = json.loads((work / "state.json").read_text())
    taken: dict[str, float] = {}
    if after == "02_export_onnx":
        model_dir = Path(state["model"]["model_dir"])
        taken["checkpoint"] = folder_gb(model_dir)
        taken["onnx"] = folder_gb(Path(state["onnx"]["with_past"]).parent)
        shutil.rmtree(model_dir)
        # the full-sequence model's own files; a data file it shares with those kept stays
        kept = {f for k in ("with_past", "last_logits", "with_past_int8")
                for f in onnx_files(Path(state["onnx"][k]))}  # fmt: skip
        for f in onnx_files(Path(state["onnx"]["full"])):
            if f not in kept:
                f.unlink()
    elif after == "03_model_repository":
        taken["repository"] = folder_gb(work / "model_repository")
        taken["zip"] = folder_gb(work / "model_artifact.zip")
        shutil.rmtree(work / "model_repository")
    return taken


def run_notebooks(
    work: Path, member: str, reuse: bool = False, pruned: dict[str, float] | None = None
) -> dict[str, float]:
    """Notebooks 01-03 on ``member``'s offline stand-in in ``work``; seconds per notebook.
    ``reuse``: where notebook 02 already exported into ``work``, run notebook 03 only (the
    repository and zip from the current code; the export's figures stay those measured).
    ``pruned``: a dict to fill with :func:`prune`'s figures, pruning after notebooks 02 and 03."""
    env = {**os.environ, "TUTORIAL_WORKDIR": str(work), "MODEL_SOURCE": "offline"}
    env["MODEL_ID"] = member
    seconds = {}
    names = ["01_download_gpt2", "02_export_onnx", "03_model_repository"]
    state = work / "state.json"
    if reuse and state.exists() and "onnx" in json.loads(state.read_text()):
        names = names[2:]
    for name in names:
        start = time.monotonic()
        print(f"[{member}] {name} ...", flush=True)
        cmd = [sys.executable, "-m", "papermill", "--cwd", "notebooks", "--kernel", "python3"]
        cmd += [f"notebooks/{name}.ipynb", str(work / "executed" / f"{name}.ipynb")]
        cmd += ["--log-level", "ERROR", "--no-progress-bar"]
        (work / "executed").mkdir(parents=True, exist_ok=True)
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{name} failed: {out.stderr[-1500:]}")
        seconds[name] = round(time.monotonic() - start, 1)
        if pruned is not None:
            pruned.update(prune(work, name))
    return seconds


def decode_ms(path: Path, prompt_ids: list[int], steps: int) -> tuple[float, list[int]]:
    """p50 ms of a decode step in-process, and the greedy tokens."""
    session = export.ort_session(path)
    timings: list[float] = []
    tokens = export.greedy_with_past(session, prompt_ids, steps + 1, None, timings)
    return 1000 * float(np.median(timings[1:])), tokens


def serve(zip_path: Path, tokens: int) -> dict[str, Any]:
    """Serve the artifact as OCI does, call every entry point, return the tokens and memory."""
    import requests

    from tutorial.client import stream_generate
    from tutorial.triton_local import serve_artifact

    server = serve_artifact(zip_path, runtime="bundled")
    try:
        base = server.url
        body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": [PROMPT]}]}
        r = requests.post(f"{base}/v2/models/ensemble_model/infer", json=body, timeout=600)
        r.raise_for_status()
        body["inputs"].append(
            {"name": "MAX_NEW_TOKENS", "datatype": "INT32", "shape": [1], "data": [tokens]}
        )
        r = requests.post(f"{base}/v2/models/generate/infer", json=body, timeout=600)
        r.raise_for_status()
        ids = {o["name"]: o["data"] for o in r.json()["outputs"]}["TOKEN_IDS"]
        streamed = sum(1 for _ in stream_generate(base, PROMPT, tokens, timeout=600))
        return {"tokens": ids, "streamed_events": streamed, "memory": server.memory_bytes()}
    finally:
        server.stop()


def measure(
    member: str,
    root: Path,
    steps: int,
    bandwidth: float,
    reuse: bool = False,
    pruning: bool = False,
) -> dict[str, Any]:
    from tutorial.model_source import load_tokenizer

    work = root / member
    pruned: dict[str, float] | None = {} if pruning else None
    row: dict[str, Any] = {
        "member": member,
        "when": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "bandwidth_gbs": bandwidth / 1e9,
        "notebooks_s": run_notebooks(work, member, reuse, pruned),
    }
    if pruned:
        row["disk_gb"] = pruned
    state = json.loads((work / "state.json").read_text())
    model, onnx = state["model"], state["onnx"]
    size = sizes.sizes_of(model)
    row["dims"] = f"{model['n_layer']} x {model['n_head']} x {model['n_embd'] // model['n_head']}"
    row["parameters"] = model["parameters"]
    row["export"] = {
        k: {"s": v["seconds"], "peak_gb": max(v["peak_rss"], v["max_rss"]) / 1e9}
        for k, v in onnx["export_stages"].items()
    }
    row["checks"] = {
        k: {"s": v["seconds"], "peak_gb": max(v["peak_rss"], v["max_rss"]) / 1e9}
        for k, v in onnx.get("check_stages", {}).items()
    }
    row["tokens_equal_transformers"] = onnx["greedy_tokens_equal"]
    row["onnx_fp32_mb"] = sum(p.stat().st_size for p in onnx_files(onnx["with_past"])) / 1e6
    row["onnx_int8_mb"] = sum(p.stat().st_size for p in onnx_files(onnx["with_past_int8"])) / 1e6
    row["external_data"] = len(onnx_files(onnx["with_past"])) > 1
    row["zip_mb"] = (work / "model_artifact.zip").stat().st_size / 1e6
    ids = load_tokenizer(work / "vocab")(PROMPT)["input_ids"]
    reference: list[int] = []
    for variant, key in (("fp32", "with_past"), ("int8", "with_past_int8")):
        ms, tokens = decode_ms(Path(onnx[key]), ids, steps)
        floor = size[f"read_per_step_{variant}"] / bandwidth * 1000
        row[variant] = {"ms": ms, "floor_ms": floor, "ratio": ms / floor}
        if variant == "fp32":
            reference = tokens[:20]
    served = serve(work / "model_artifact.zip", len(reference))
    row["server_gb"] = served["memory"] / 1e9
    row["served_tokens_equal"] = served["tokens"] == reference
    if pruning:  # the member measured: its ONNX files and zip go too (state.json stays)
        import shutil

        shutil.rmtree(Path(onnx["with_past"]).parent)
        (work / "model_artifact.zip").unlink()
    return row


def table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# The GPT-2 family, measured",
        "",
        f"Written by `benchmarks/family_bench.py` ({meta['when']} UTC, {meta['machine']}; "
        f"matvec bandwidth {meta['bandwidth_gbs']:.1f} GB/s in the latest run; each row's floor "
        "uses its own run's figure). Offline stand-ins: each member's "
        "architecture with **random weights**, so sizes and speeds are the member's and the "
        "text is not. Tokens: notebook 02's greedy tokens against transformers' "
        "`generate(do_sample=False)` (fp32), and the served `generate` against the in-process "
        "fp32 loop. Server memory: every process of the local Triton once `ensemble_model`, "
        "`generate` and `generate_stream` have answered. Floors: the bytes a decode step reads "
        "over the matvec bandwidth. Export figures are those of each member's own export "
        "(`--reuse` keeps them: notebook 02's `export_stages` in the member's `state.json`); "
        "the rest is measured in the row's run (its time in the last column). "
        "02 peak: the largest child of notebook 02 (export stages and checks, resident memory). "
        "Disk: the checkpoint, the ONNX files, the repository and the zip, which notebooks 01-03 "
        "keep (`--prune` runs delete them as soon as no later step reads them and measure them "
        "first); the served test unpacks the zip once more.",
        "",
        "| member | layers x heads x head | params | export s (trace / convert / assemble) "
        "| 02 peak GB (stage) | ONNX fp32 / int8 MB | zip MB | disk GB | server GB "
        "| fp32 ms/token (floor) | int8 ms/token (floor) | tokens = transformers / served "
        "| measured (UTC) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            error = " ".join(r["error"].split()).replace("|", "/")
            lines.append(f"| {r['member']} | {error} |" + " |" * 10 + f" {r.get('when', '')} |")
            continue
        ex = r["export"]
        secs = " / ".join(f"{ex[k]['s']:.0f}" for k in ("trace", "convert", "assemble"))
        stage, peak_gb = sizes.largest_child(r)
        peak = f"{peak_gb:.1f} ({stage})"
        disk = f"{sum(r['disk_gb'].values()):.1f}" if "disk_gb" in r else "-"
        lines.append(
            f"| {r['member']} | {r['dims']} | {r['parameters'] / 1e6:.0f}M | {secs} | {peak} "
            f"| {r['onnx_fp32_mb']:,.0f}{' (external data)' if r['external_data'] else ''} / "
            f"{r['onnx_int8_mb']:,.0f} | {r['zip_mb']:,.0f} | {disk} | {r['server_gb']:.1f} "
            f"| {r['fp32']['ms']:.1f} ({r['fp32']['floor_ms']:.1f}) "
            f"| {r['int8']['ms']:.1f} ({r['int8']['floor_ms']:.1f}) "
            f"| {'yes' if r['tokens_equal_transformers'] else 'NO'} / "
            f"{'yes' if r['served_tokens_equal'] else 'NO'} | {r.get('when', '')} |"
        )
    lines += ["", *stage_table(rows)]
    return "\n".join(lines) + "\n"


STAGES = ("trace", "convert", "assemble", "logits", "trim", "greedy", "int8")


def stage_table(rows: list[dict[str, Any]]) -> list[str]:
    """Each of notebook 02's children (export stages, then checks, in the order they run):
    peak resident memory and seconds, per member."""
    measured = [r for r in rows if "export" in r and "checks" in r]
    if not measured:
        return []
    lines = [
        "Notebook 02's children, in the order they run: peak resident memory GB / seconds "
        "(export stages, then the checks against TensorFlow and the int8 quantization).",
        "",
        "| member | " + " | ".join(STAGES) + " |",
        "|---|" + "---|" * len(STAGES),
    ]
    for r in measured:
        stages = {**r["export"], **r["checks"]}
        cells = [
            f"{stages[k]['peak_gb']:.1f} / {stages[k]['s']:.0f}" if k in stages else "-"
            for k in STAGES
        ]
        lines.append(f"| {r['member']} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", nargs="+", default=list(DEFAULT_MEMBERS))
    parser.add_argument("--root", type=Path, default=ROOT / "artifacts" / "family")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "family.md")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "family.json")
    parser.add_argument(
        "--prune", action="store_true", help="delete what no later step reads (see the docstring)"
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--reuse", action="store_true", help="keep each member's export; rerun notebook 03 on"
    )
    args = parser.parse_args()
    from bench_generation import matvec_bandwidth

    args.root.mkdir(parents=True, exist_ok=True)
    results_path = args.results
    rows = json.loads(results_path.read_text())["rows"] if results_path.exists() else []
    bandwidth = matvec_bandwidth(400_000_000, 768)["gb_s"] * 1e9
    meta = {
        "when": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "bandwidth_gbs": bandwidth / 1e9,
    }
    for member in args.members:
        rows = [r for r in rows if r["member"] != member]
        try:
            rows.append(measure(member, args.root, args.steps, bandwidth, args.reuse, args.prune))
        except Exception as exc:  # noqa: BLE001 - a member's failure is a result too
            rows.append({"member": member, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(json.dumps(rows[-1], indent=1), flush=True)
        results_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table(rows, meta))
    print(f"wrote {args.out} and {results_path}")


def rewrite_table(results: Path, out: Path) -> None:
    """Rewrite the Markdown table from a results file, measuring nothing."""
    data = json.loads(results.read_text())
    out.write_text(table(data["rows"], data["meta"]))


if __name__ == "__main__":
    main()

"""The latency results file: one tidy CSV row per measured call, metadata on every row.

Every measurement in the series (notebook 07, ``benchmarks/``) goes through
:func:`write_results`, so runs from different machines (a laptop, a GPU box, two OCI shapes)
can be read back together with :func:`read_results` and summarized or plotted as one table.
pandas is not needed: rows are plain dicts, statistics come from numpy.
"""

from __future__ import annotations

import csv
import glob
import math
import re
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tutorial.common import TutorialError, load_state, machine_metadata, weights_label

#: The columns of a results file, in order. Empty cells mean "unknown" (``None`` when read).
RESULT_COLUMNS: tuple[str, ...] = (
    "run_id",  # one id per write_results call unless given: rows of one run share it
    "timestamp",  # UTC, ISO 8601, when the rows were written
    "target",  # where it ran: local-cpu, local-gpu, inprocess-cpu, oci-cpu, oci-gpu, ...
    "method",  # ensemble_next_token, generate, decode_token, prefill, seed_client_loop,
    # generate_stream, ttft, itl (streaming: tutorial.streaming.stream_rows), ...
    "model",  # which network: "gpt2 124M", "tiny test model (n_layer=2, ...)", ...
    "model_variant",  # fp32 | int8
    "weights",  # real | random-offline
    "device_name",  # CPU model or GPU name the call ran on
    "shape",  # OCI shape, or "local"
    "sweep",  # which series the row belongs to: reference, prompt_length, concurrency, ...
    "prompt_tokens",
    "new_tokens",  # tokens the call produced (per-token rows: 1)
    "concurrency",  # requests in flight at once
    "iteration",  # index of the call within its series
    "started_at",  # epoch seconds when the call started (throughput = tokens / wall span)
    "latency_ms",  # client-side wall time of the call
    "tokens_per_s",  # new_tokens / latency
    "server_queue_ms",  # Triton statistics: time in the queue (empty when unknown)
    "server_compute_ms",  # Triton statistics: compute_input + compute_infer + compute_output
    "onnxruntime",  # versions on the measuring machine
    "tritonclient",
    "python",
    "hostname",
    "notes",  # free text: how a value was derived, "SYNTHETIC TEST DATA", ...
)

MODEL_VARIANTS = ("fp32", "int8")
WEIGHTS = ("real", "random-offline")
#: Columns every row must carry (the rest have defaults, see :func:`write_results`).
REQUIRED_COLUMNS = (
    "target",
    "method",
    "model_variant",
    "prompt_tokens",
    "new_tokens",
    "iteration",
    "latency_ms",
)
INT_COLUMNS = ("prompt_tokens", "new_tokens", "concurrency", "iteration")
FLOAT_COLUMNS = (
    "started_at",
    "latency_ms",
    "tokens_per_s",
    "server_queue_ms",
    "server_compute_ms",
)
#: The key :func:`summarize` groups rows by.
GROUP_KEY = (
    "target",
    "method",
    "model_variant",
    "concurrency",
    "prompt_tokens",
    "new_tokens",
    "model",
    "weights",
    "device_name",
)
_TARGET_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_METHOD_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")
_FLOAT_FORMATS = {"started_at": ".6f", "tokens_per_s": ".3f"}


class ResultsError(TutorialError, ValueError):
    """A results row or file that does not follow the schema; the message says where and why."""


def model_label() -> str:
    """A short name for the model notebook 01 recorded, for the ``model`` column.

    The tiny stand-in the tests use is labelled "tiny test model" so its figures can never
    pass for GPT-2's.
    """
    info = load_state().get("model", {})
    if not info:
        return "unspecified"
    from tutorial.model_source import TEST_CONFIGS

    dims = ", ".join(f"{k}={info[k]}" for k in ("n_layer", "n_head", "n_embd") if k in info)
    if info.get("size") in TEST_CONFIGS:
        return f"tiny test model ({dims})" if dims else "tiny test model"
    name = {"124M": "gpt2"}.get(info.get("size") or "gpt2", info.get("size") or "gpt2")
    params = info.get("parameters")
    if isinstance(params, int | float) and params > 0:
        return f"{name} {params / 1e6:.0f}M"
    return f"{name} ({dims})" if dims else name


def new_run_id() -> str:
    """A run id that sorts by time and does not collide across machines."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def _where(index: int | str) -> str:
    return index if isinstance(index, str) else f"row {index}"


def _to_int(value: Any, column: str, where: str) -> int:
    if isinstance(value, bool):
        raise ResultsError(f"{where}: {column} must be an integer, not {value!r}.")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ResultsError(f"{where}: {column} must be an integer, not {value!r}.")


def _to_float(value: Any, column: str, where: str) -> float:
    if isinstance(value, bool):
        raise ResultsError(f"{where}: {column} must be a number, not {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ResultsError(f"{where}: {column} must be a number, not {value!r}.") from None
    if not math.isfinite(number):
        raise ResultsError(f"{where}: {column} must be a finite number, not {value!r}.")
    return number


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def validate_row(row: dict[str, Any], index: int | str = 0) -> dict[str, Any]:
    """Check one complete row against the schema and return it with typed values.

    Raises :class:`ResultsError` naming the row, the column and the problem.
    """
    where = _where(index)
    unknown = sorted(set(row) - set(RESULT_COLUMNS))
    if unknown:
        raise ResultsError(
            f"{where}: unknown column(s) {', '.join(unknown)}; "
            f"the schema is tutorial.results.RESULT_COLUMNS."
        )
    missing = [c for c in RESULT_COLUMNS if c not in row]
    if missing:
        raise ResultsError(f"{where}: missing column(s) {', '.join(missing)}.")
    for column in (*REQUIRED_COLUMNS, "concurrency", "weights", "device_name", "shape", "run_id"):
        if _empty(row[column]):
            raise ResultsError(f"{where}: {column} is empty; every row needs it.")

    out: dict[str, Any] = {}
    for column in RESULT_COLUMNS:
        value = row[column]
        if column in INT_COLUMNS:
            out[column] = _to_int(value, column, where)
        elif column in FLOAT_COLUMNS:
            out[column] = None if _empty(value) else _to_float(value, column, where)
        else:
            out[column] = "" if value is None else str(value)

    if not _TARGET_RE.match(out["target"]):
        raise ResultsError(
            f"{where}: target {out['target']!r} must be lower-case letters, digits and '-' "
            "(e.g. local-cpu, oci-gpu)."
        )
    if not _METHOD_RE.match(out["method"]):
        raise ResultsError(
            f"{where}: method {out['method']!r} must be lower-case letters, digits and '_' "
            "(e.g. ensemble_next_token, generate, decode_token)."
        )
    if out["model_variant"] not in MODEL_VARIANTS:
        raise ResultsError(
            f"{where}: model_variant must be one of {MODEL_VARIANTS}, not {out['model_variant']!r}."
        )
    if out["weights"] not in WEIGHTS:
        raise ResultsError(f"{where}: weights must be one of {WEIGHTS}, not {out['weights']!r}.")
    if out["latency_ms"] <= 0:
        raise ResultsError(f"{where}: latency_ms must be > 0, not {out['latency_ms']!r}.")
    if out["concurrency"] < 1:
        raise ResultsError(f"{where}: concurrency must be >= 1, not {out['concurrency']!r}.")
    for column in ("prompt_tokens", "new_tokens", "iteration"):
        if out[column] < 0:
            raise ResultsError(f"{where}: {column} must be >= 0, not {out[column]!r}.")
    for column in ("started_at", "tokens_per_s", "server_queue_ms", "server_compute_ms"):
        if out[column] is not None and out[column] < 0:
            raise ResultsError(f"{where}: {column} must be >= 0, not {out[column]!r}.")
    return out


def complete_row(
    row: dict[str, Any], index: int = 0, defaults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Fill a row's metadata defaults (versions, hostname, time, device, weights) and validate.

    ``defaults`` is a cache shared across the rows of one write (machine facts, run id).
    """
    where = _where(index)
    unknown = sorted(set(row) - set(RESULT_COLUMNS))
    if unknown:
        raise ResultsError(
            f"{where}: unknown column(s) {', '.join(unknown)}; "
            f"the schema is tutorial.results.RESULT_COLUMNS."
        )
    cache = defaults if defaults is not None else {}
    if "machine" not in cache:
        cache["machine"] = machine_metadata()
        cache["run_id"] = new_run_id()
    machine = cache["machine"]
    full = dict(row)
    target = str(full.get("target") or "")

    def fill(column: str, value: Any) -> None:
        if _empty(full.get(column)):
            full[column] = value() if callable(value) else value

    fill("run_id", cache["run_id"])
    fill("timestamp", machine["timestamp"])
    for column in ("onnxruntime", "tritonclient", "python", "hostname"):
        fill(column, machine.get(column) or "")
    fill("concurrency", 1)
    fill("sweep", "")
    fill("notes", "")
    if _empty(full.get("weights")):
        if "weights" not in cache:
            try:
                cache["weights"] = weights_label()
            except TutorialError as exc:
                raise ResultsError(
                    f"{where}: weights is empty and no model is recorded ({exc}). Pass "
                    f"weights='real' or 'random-offline' in the row."
                ) from None
        full["weights"] = cache["weights"]
    if _empty(full.get("model")):
        if "model" not in cache:
            cache["model"] = model_label()
        full["model"] = cache["model"]
    if _empty(full.get("device_name")):
        if "gpu" in target:
            raise ResultsError(
                f"{where}: device_name is empty for GPU target {target!r}; pass the GPU's "
                "name (e.g. from nvidia-smi), it cannot be guessed from this machine."
            )
        if target.startswith("oci"):
            raise ResultsError(
                f"{where}: device_name is empty for remote target {target!r}; pass the "
                "shape's CPU or GPU, this machine's CPU is not the one that served it."
            )
        full["device_name"] = machine.get("cpu") or "unknown CPU"
    if _empty(full.get("shape")):
        if target.startswith("oci"):
            raise ResultsError(f"{where}: shape is empty for {target!r}; pass the OCI shape.")
        full["shape"] = "local"
    if _empty(full.get("tokens_per_s")):
        try:
            new_tokens = int(full.get("new_tokens") or 0)
            latency = float(full.get("latency_ms") or 0)
        except (TypeError, ValueError):
            new_tokens, latency = 0, 0.0
        full["tokens_per_s"] = new_tokens / (latency / 1000.0) if new_tokens and latency else None
    for column in RESULT_COLUMNS:
        full.setdefault(column, None)
    return validate_row(full, index)


def _format(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column in FLOAT_COLUMNS:
        return format(value, _FLOAT_FORMATS.get(column, ".4f"))
    return str(value)


def _read_header(path: Path) -> list[str] | None:
    with path.open(newline="") as handle:
        return next(csv.reader(handle), None)


def write_results(rows: list[dict[str, Any]], path: str | Path, run_id: str | None = None) -> Path:
    """Validate ``rows`` and append them to the CSV at ``path`` (created with a header).

    Missing metadata is filled in: run_id (``run_id``, else one new id per call), timestamp,
    versions, hostname, weights (from the state file), model, device_name (this machine's
    CPU, for CPU targets only), shape ("local", for non-OCI targets), concurrency (1) and
    tokens_per_s. All rows are checked before anything is written, so a bad row leaves the
    file untouched.
    """
    path = Path(path)
    cache: dict[str, Any] = {}
    if run_id:
        cache.update(machine=machine_metadata(), run_id=run_id)
    complete = [complete_row(row, i, cache) for i, row in enumerate(rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    exists = path.exists() and path.stat().st_size > 0
    if exists:
        header = _read_header(path)
        if header != list(RESULT_COLUMNS):
            raise ResultsError(
                f"{path} has different columns than tutorial.results.RESULT_COLUMNS "
                f"(an older schema?): write to a new file."
            )
    with path.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if not exists:
            writer.writerow(RESULT_COLUMNS)
        for row in complete:
            writer.writerow([_format(c, row[c]) for c in RESULT_COLUMNS])
    return path


def _expand(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    found: list[Path] = []
    for item in items:
        text = str(item)
        if any(ch in text for ch in "*?["):
            found.extend(Path(p) for p in sorted(glob.glob(text, recursive=True)))
        else:
            path = Path(text)
            if not path.exists():
                raise ResultsError(f"results file {path} does not exist.")
            found.append(path)
    unique: list[Path] = []
    seen: set[Path] = set()
    for path in found:
        key = path.resolve()
        if key not in seen and path.is_file():
            seen.add(key)
            unique.append(path)
    return unique


def read_results(paths: str | Path | Iterable[str | Path]) -> list[dict[str, Any]]:
    """Read and validate the rows of every results file ``paths`` names.

    ``paths`` is a path, a glob pattern (``"results/*.csv"``) or a list of them. A glob that
    matches nothing adds nothing; a plain path that does not exist is an error. Numbers come
    back as int/float and empty cells as ``None``.
    """
    rows: list[dict[str, Any]] = []
    for path in _expand(paths):
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None:
                continue
            if list(reader.fieldnames) != list(RESULT_COLUMNS):
                missing = sorted(set(RESULT_COLUMNS) - set(reader.fieldnames))
                extra = sorted(set(reader.fieldnames) - set(RESULT_COLUMNS))
                raise ResultsError(
                    f"{path}: columns differ from tutorial.results.RESULT_COLUMNS "
                    f"(missing: {missing or 'none'}, unknown: {extra or 'none'})."
                )
            for line, raw in enumerate(reader, start=2):
                rows.append(validate_row(raw, f"{path} line {line}"))
    return rows


def latency_stats(latencies_ms: Iterable[float]) -> dict[str, float]:
    """count, mean, min, max and p50/p90/p95/p99 (numpy's linear interpolation) in ms."""
    import numpy as np

    values = np.asarray(list(latencies_ms), dtype=float)
    if values.size == 0:
        raise ResultsError("no latencies to summarize.")
    p50, p90, p95, p99 = np.percentile(values, [50, 90, 95, 99])
    return {
        "count": int(values.size),
        "mean_ms": float(values.mean()),
        "min_ms": float(values.min()),
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "max_ms": float(values.max()),
    }


def throughput(rows: list[dict[str, Any]]) -> float | None:
    """New tokens per second over ``rows``, added up per series (run_id, sweep, concurrency).

    A series at concurrency 1 ran its calls one after another: its time is the sum of the
    latencies (client bookkeeping between calls is not counted). A concurrent series' time is
    its wall span, from the first start to the last end. Rows without ``started_at``
    (derived rows, other tools' rows) are left out; ``None`` when none is left or nothing
    was produced.
    """
    series: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("started_at") is None:
            continue
        key = (row["run_id"], row.get("sweep") or "", row["concurrency"])
        series.setdefault(key, []).append(row)
    tokens, seconds = 0, 0.0
    for (_, _, concurrency), group in series.items():
        tokens += sum(r["new_tokens"] for r in group)
        if concurrency == 1:
            seconds += sum(r["latency_ms"] for r in group) / 1000.0
        else:
            start = min(r["started_at"] for r in group)
            end = max(r["started_at"] + r["latency_ms"] / 1000.0 for r in group)
            seconds += end - start
    return tokens / seconds if seconds > 0 and tokens else None


def summarize(rows: list[dict[str, Any]], key: tuple[str, ...] = GROUP_KEY) -> list[dict[str, Any]]:
    """Latency percentiles and tokens/s per (target, method, model_variant, concurrency,
    prompt_tokens) -- also split by new_tokens, model, weights and device_name, so runs of
    different models or machines never mix.

    Each summary holds the key, ``count``, ``mean_ms``, ``p50_ms`` ... ``p99_ms``,
    ``tokens_per_s`` (median per-call rate), ``throughput_tokens_per_s`` (all tokens over the
    wall time, see :func:`throughput`) and the mean server queue/compute ms where known.
    """
    import numpy as np

    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in key), []).append(row)
    out = []
    for values, group in groups.items():
        summary = dict(zip(key, values, strict=True))
        summary.update(latency_stats(r["latency_ms"] for r in group))
        rates = [r["tokens_per_s"] for r in group if r["tokens_per_s"] is not None]
        summary["tokens_per_s"] = float(np.median(rates)) if rates else None
        summary["throughput_tokens_per_s"] = throughput(group)
        for column in ("server_queue_ms", "server_compute_ms"):
            known = [r[column] for r in group if r[column] is not None]
            summary[column] = float(np.mean(known)) if known else None
        out.append(summary)
    order = ("target", "method", "model_variant", "concurrency", "prompt_tokens", "new_tokens")
    out.sort(key=lambda s: tuple(_sort_value(s.get(k)) for k in order))
    return out


def _sort_value(value: Any) -> tuple[int, float, str]:
    if isinstance(value, int | float):
        return (0, float(value), "")
    return (1, 0.0, str(value or ""))


def format_summary(
    summaries: list[dict[str, Any]],
    columns: tuple[str, ...] = (
        "target",
        "method",
        "model_variant",
        "concurrency",
        "prompt_tokens",
        "new_tokens",
        "count",
        "p50_ms",
        "p90_ms",
        "p95_ms",
        "p99_ms",
        "mean_ms",
        "tokens_per_s",
        "throughput_tokens_per_s",
        "server_queue_ms",
        "server_compute_ms",
    ),
) -> str:
    """A plain-text table of :func:`summarize`'s output (no pandas needed)."""
    short = {"throughput_tokens_per_s": "throughput_tok_s", "tokens_per_s": "tok_s"}

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.2f}" if value < 1000 else f"{value:.0f}"
        return str(value)

    header = [short.get(c, c) for c in columns]
    body = [[cell(s.get(c)) for c in columns] for s in summaries]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    numeric = [all(isinstance(s.get(c), int | float | None) for s in summaries) for c in columns]
    lines += [
        "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(r, widths, numeric, strict=True)
        )
        for r in body
    ]
    return "\n".join(lines)


#: The rows a ``generate_stream`` sweep writes (:func:`tutorial.streaming.stream_rows`).
STREAM_METHODS = ("generate_stream", "ttft", "itl")


def streaming_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (target, concurrency) of the streaming rows in ``rows``: ``requests``, ``ttft_ms``
    and ``itl_ms`` (each ``{"p50", "p95", "p99"}``, ``None`` without a value) and
    ``tokens_per_s`` (all streamed tokens over the wall time, see :func:`throughput`).
    Other methods' rows are left out; the order is target, then concurrency."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        if row["method"] in STREAM_METHODS:
            groups.setdefault((row["target"], row["concurrency"]), []).append(row)

    def percentiles(group: list[dict[str, Any]], method: str) -> dict[str, float] | None:
        values = [r["latency_ms"] for r in group if r["method"] == method]
        if not values:
            return None
        stats = latency_stats(values)
        return {q: stats[f"{q}_ms"] for q in ("p50", "p95", "p99")}

    out = []
    for (target, concurrency), group in sorted(groups.items()):
        whole = [dict(r, run_id=r.get("run_id")) for r in group if r["method"] == "generate_stream"]
        out.append(
            {
                "target": target,
                "concurrency": concurrency,
                "requests": len(whole),
                "ttft_ms": percentiles(group, "ttft"),
                "itl_ms": percentiles(group, "itl"),
                "tokens_per_s": throughput(whole),
            }
        )
    return out


def format_streaming_summary(summaries: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`streaming_summary`: TTFT and ITL p50 / p95 / p99 in ms and
    tokens/s per target and concurrency."""
    header = ("target", "clients", "requests", "TTFT p50/p95/p99 ms", "ITL p50/p95/p99 ms", "tok/s")

    def ms(value: float) -> str:
        return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"

    def triple(p: dict[str, float] | None) -> str:
        return "-" if p is None else " / ".join(ms(p[q]) for q in ("p50", "p95", "p99"))

    body = [
        (
            s["target"],
            str(s["concurrency"]),
            str(s["requests"]),
            triple(s["ttft_ms"]),
            triple(s["itl_ms"]),
            "-" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:.1f}",
        )
        for s in summaries
    ]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(
            [r[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(r[1:], widths[1:], strict=True)]
        )
        for r in body
    ]
    return "\n".join(lines)

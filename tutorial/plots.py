"""Latency plots from results files: only measured numbers, missing targets say so.

Every figure is built from rows of :mod:`tutorial.results` (one row per measured call).
A target that has no rows is drawn as an empty slot (or legend entry) labelled
"not measured"; nothing is interpolated or filled in. Titles carry the model, the variant,
the weights (``random-offline`` or ``real``) and the devices, so a figure cut out of its
notebook still says what it shows. A target measured only over concurrency (``local-cpu``'s
server with in-flight batching off, :data:`BATCHING_OFF`) appears only in the throughput figure,
next to the target it is a setting of. Figures are built with ``matplotlib.figure.Figure`` (no
pyplot, no global state), which saves with the Agg backend anywhere.
"""

from __future__ import annotations

import re
import shutil
import textwrap
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tutorial.results import ResultsError, latency_stats, streaming_summary, throughput

#: The targets every figure has a slot for, CPU and GPU side by side.
DEFAULT_TARGETS: tuple[str, ...] = ("local-cpu", "local-gpu", "oci-cpu", "oci-gpu")
#: Where known targets go on the x axis (others follow, alphabetically).
TARGET_ORDER = (
    "local-cpu",
    "local-cpu-unbatched",
    "inprocess-cpu",
    "local-gpu",
    "oci-cpu",
    "oci-gpu",
)
#: Targets that are another target's server with ``generate``'s in-flight batching off,
#: measured over concurrency only: (off target) -> (the target, batching on).
BATCHING_OFF = {"local-cpu-unbatched": "local-cpu"}
TARGET_DESCRIPTIONS = {
    "local-cpu": "Triton over HTTP, this machine",
    "local-cpu-unbatched": "Triton over HTTP, this machine, generate's in-flight batching off",
    "inprocess-cpu": "onnxruntime CPU, in-process",
    "local-gpu": "onnxruntime CUDA, in-process",
    "oci-cpu": "OCI Model Deployment, CPU shape",
    "oci-gpu": "OCI Model Deployment, GPU shape",
}
METHOD_TITLES = {
    "ensemble_next_token": "ensemble_model: one next token",
    "generate": "generate",
    "decode_token": "decode: time per new token",
    "prefill": "prefill",
    "ttft": "time to first token (TTFT)",
    "itl": "inter-token latency (ITL): gaps between token events",
}
NOT_MEASURED = "not measured"
SYNTHETIC_MARK = "SYNTHETIC TEST DATA"
PLOT_FILES = {
    "latency_bars": "latency_p50_p95_by_target.png",
    "latency_vs_prompt": "latency_vs_prompt_length.png",
    "latency_cdf": "latency_cdf.png",
    "throughput_vs_concurrency": "throughput_vs_concurrency.png",
    "streaming_vs_concurrency": "ttft_itl_vs_concurrency.png",
}


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


#: One colour per known target: CPU targets in blues and purples (in-process: purple), GPU targets in greens.
TARGET_COLORS = {
    "local-cpu": "#2166ac",
    "local-cpu-unbatched": "#92c5de",
    "inprocess-cpu": "#6a51a3",
    "oci-cpu": "#35978f",
    "local-gpu": "#1b7837",
    "oci-gpu": "#7fbc41",
}


def _color(target: str) -> str:
    if target in TARGET_COLORS:
        return TARGET_COLORS[target]
    return "#4d4d4d" if "gpu" not in target else "#a6d96a"


def _ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _plain_log_axis(axis: Any) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def order_targets(targets: Iterable[str]) -> list[str]:
    """Targets in display order: known ones first (CPU next to its GPU), then the rest."""
    rank = {t: i for i, t in enumerate(TARGET_ORDER)}
    return sorted(set(targets), key=lambda t: (rank.get(t, len(rank)), t))


def _short_device(name: str, width: int = 26) -> str:
    for noise in ("(R)", "(TM)", "(tm)", " CPU", " Processor", " 64-Core", " 32-Core"):
        name = name.replace(noise, "")
    name = re.sub(r"\s*@\s*[\d.]+\s*GHz", "", name)
    name = " ".join(name.split())
    return textwrap.shorten(name, width=width, placeholder="...")


def _wrapped_device(name: str, width: int = 15) -> str:
    return "\n".join(textwrap.wrap(_short_device(name, 40), width=width)[:3])


def target_label(target: str, rows: list[dict[str, Any]]) -> str:
    """A target's tick label: its name, then the device(s) it ran on."""
    devices = sorted({r["device_name"] for r in rows if r["target"] == target})
    shapes = sorted({r["shape"] for r in rows if r["target"] == target and r["shape"] != "local"})
    lines = [target]
    if shapes:
        lines.append(", ".join(shapes))
    if devices:
        lines.append("\n".join(_wrapped_device(d) for d in devices))
    return "\n".join(lines)


def _values(rows: list[dict[str, Any]], column: str) -> list[Any]:
    return sorted({r[column] for r in rows}, key=str)


def describe_rows(rows: list[dict[str, Any]]) -> str:
    """The "what, which model, which weights" line every title carries."""
    if not rows:
        return "no measurements"
    models = ", ".join(_values(rows, "model"))
    variants = ", ".join(_values(rows, "model_variant"))
    weights = ", ".join(_values(rows, "weights"))
    text = f"model: {models} ({variants}) | weights: {weights}"
    if any(SYNTHETIC_MARK in (r.get("notes") or "") for r in rows):
        text = f"{SYNTHETIC_MARK}, not measurements | {text}"
    return text


def choose_model(rows: list[dict[str, Any]], model: str | None = None) -> list[dict[str, Any]]:
    """Keep one model's rows: ``model`` if given, else the one with most rows.

    Figures never mix the tiny test model with GPT-2, nor two different networks.
    """
    if not rows:
        return []
    if model is None:
        model = Counter(r["model"] for r in rows).most_common(1)[0][0]
    kept = [r for r in rows if r["model"] == model]
    if not kept:
        raise ResultsError(
            f"no rows for model {model!r}; the files hold: {', '.join(_values(rows, 'model'))}."
        )
    return kept


def reference_point(rows: list[dict[str, Any]], method: str) -> tuple[int, int] | None:
    """The (prompt_tokens, new_tokens) a method is compared at across targets.

    Rows of the ``reference`` sweep win; otherwise the most common prompt length at
    concurrency 1. For new_tokens the largest value is taken (generate N rather than 1).
    """
    pool = [r for r in rows if r["method"] == method and r["concurrency"] == 1]
    if not pool:
        return None
    preferred = [r for r in pool if r["sweep"] == "reference"] or pool
    prompt = Counter(r["prompt_tokens"] for r in preferred).most_common(1)[0][0]
    new = max(r["new_tokens"] for r in preferred if r["prompt_tokens"] == prompt)
    return prompt, new


def _select(
    rows: list[dict[str, Any]], target: str, method: str, **equal: Any
) -> list[dict[str, Any]]:
    return [
        r
        for r in rows
        if r["target"] == target
        and r["method"] == method
        and all(r[k] == v for k, v in equal.items())
    ]


def _at_reference(
    rows: list[dict[str, Any]], target: str, method: str, point: tuple[int, int] | None
) -> list[dict[str, Any]]:
    """A target's rows for ``method`` at concurrency 1 and the reference (prompt, new tokens)."""
    if point is None:
        return []
    return _select(rows, target, method, concurrency=1, prompt_tokens=point[0], new_tokens=point[1])


def _not_measured_slot(ax: Any, x: float, why: str = "") -> None:
    text = NOT_MEASURED + (f"\n{why}" if why else "")
    ax.text(
        x,
        0.5,
        text,
        transform=ax.get_xaxis_transform(),
        ha="center",
        va="center",
        rotation=90,
        color="0.35",
        fontsize=9,
        bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.6", "linestyle": "--"},
    )


def _method_title(method: str, point: tuple[int, int] | None) -> str:
    title = METHOD_TITLES.get(method, method)
    if point is None:
        return title
    prompt, new = point
    if method == "generate":
        return f"{title}: {new} new tokens, prompt {prompt} tokens"
    if method == "decode_token":
        return f"{title} (prompt {prompt} tokens)"
    return f"{title}, prompt {prompt} tokens"


def _slots(rows: list[dict[str, Any]], expected: Iterable[str]) -> list[str]:
    return order_targets([*expected, *(r["target"] for r in rows)])


def concurrency_only(rows: list[dict[str, Any]]) -> set[str]:
    """Targets whose every row is from a concurrency sweep (e.g. batching off): they have no
    reference or prompt-length series, so only the throughput figure shows them."""
    other = {r["target"] for r in rows if r["sweep"] != "concurrency"}
    return {r["target"] for r in rows} - other


def _per_call_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows the latency figures draw: without :func:`concurrency_only` targets."""
    dropped = concurrency_only(rows)
    return [r for r in rows if r["target"] not in dropped]


def batching_label(target: str, rows: list[dict[str, Any]]) -> str:
    """``target``, plus "batching on" / "batching off" where ``rows`` hold both sides of a
    :data:`BATCHING_OFF` pair."""
    present = {r["target"] for r in rows}
    for off, on in BATCHING_OFF.items():
        if {off, on} <= present and target in (off, on):
            return f"{target}, batching {'off' if target == off else 'on'}"
    return target


def plot_latency_bars(
    rows: list[dict[str, Any]],
    expected_targets: Iterable[str] = DEFAULT_TARGETS,
    methods: Iterable[str] = ("ensemble_next_token", "generate", "decode_token"),
) -> Any:
    """p50 and p95 bars per target (CPU and GPU side by side), one panel per method, at
    concurrency 1 and each method's reference prompt length. Targets without rows for a
    panel get an empty slot labelled "not measured" (concurrency-only targets get none)."""
    rows = _per_call_rows(rows)
    methods = list(methods)
    slots = _slots(rows, expected_targets)
    fig = _figure(max(6.0, 4.2 * len(methods)), 5.2)
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    for ax, method in zip(axes, methods, strict=True):
        point = reference_point(rows, method)
        width = 0.38
        for x, target in enumerate(slots):
            picked = _at_reference(rows, target, method, point)
            if not picked:
                _not_measured_slot(ax, x)
                continue
            stats = latency_stats(r["latency_ms"] for r in picked)
            for offset, key, alpha, hatch in ((-1, "p50_ms", 1.0, None), (1, "p95_ms", 0.55, "//")):
                bar = ax.bar(
                    x + offset * width / 2,
                    stats[key],
                    width,
                    color=_color(target),
                    alpha=alpha,
                    hatch=hatch,
                    edgecolor="white" if hatch else None,
                )
                ax.bar_label(bar, fmt=_ms, fontsize=7, padding=1)
            ax.text(
                x, 0.98, f"n={stats['count']}", transform=ax.get_xaxis_transform(),
                ha="center", va="top", fontsize=7, color="0.3",
            )  # fmt: skip
        ax.set_xticks(range(len(slots)), [target_label(t, rows) for t in slots], fontsize=7)
        ax.set_xlim(-0.6, len(slots) - 0.4)
        ax.set_ylabel("latency (ms), client side")
        ax.set_title(_method_title(method, point), fontsize=9)
        ax.margins(y=0.15)
    from matplotlib.patches import Patch

    # The legend names a GPU colour only when a GPU target was measured.
    if any("gpu" in r["target"] for r in rows):
        gpu = Patch(facecolor=TARGET_COLORS["local-gpu"], label="GPU targets: greens")
    else:
        gpu = Patch(facecolor="none", edgecolor="0.6", linestyle="--", label="GPU: not measured")
    fig.legend(
        handles=[
            Patch(facecolor="0.35", label="p50 (solid)"),
            Patch(
                facecolor="0.35", alpha=0.55, hatch="//", edgecolor="white", label="p95 (hatched)"
            ),
            Patch(facecolor=TARGET_COLORS["local-cpu"], label="CPU targets: blues and purples"),
            gpu,
        ],
        loc="outside lower center",
        ncols=4,
        fontsize=8,
    )
    fig.suptitle(
        "GPT-2 latency p50/p95 per target at concurrency 1 (measured)\n" + describe_rows(rows),
        fontsize=10,
    )
    return fig


def _missing_legend(ax: Any, missing: list[str]) -> None:
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    for target in missing:
        handles.append(Line2D([], [], linestyle="none", marker="x", color="0.6"))
        labels.append(f"{target}: {NOT_MEASURED}")
    if handles:
        ax.legend(handles, labels, fontsize=7)


def plot_latency_vs_prompt(
    rows: list[dict[str, Any]],
    expected_targets: Iterable[str] = DEFAULT_TARGETS,
    panels: Iterable[tuple[str, int | None]] = (
        ("ensemble_next_token", None),
        ("generate", 1),
        ("decode_token", None),
    ),
) -> Any:
    """p50 latency (band up to p95) against prompt length, per target, at concurrency 1.

    ``panels`` are (method, new_tokens) pairs; ``("generate", 1)`` is tokenize + prefill +
    one token. Targets without rows are listed in the legend as "not measured" (concurrency-only
    targets are left out).
    """
    rows = _per_call_rows(rows)
    panels = list(panels)
    slots = _slots(rows, expected_targets)
    fig = _figure(max(6.0, 4.2 * len(panels)), 4.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (method, new_tokens) in zip(axes, panels, strict=True):
        missing = []
        for target in slots:
            picked = _select(rows, target, method, concurrency=1)
            if new_tokens is not None:
                picked = [r for r in picked if r["new_tokens"] == new_tokens]
            prompts = sorted({r["prompt_tokens"] for r in picked})
            if not picked:
                missing.append(target)
                continue
            stats = [
                latency_stats(r["latency_ms"] for r in picked if r["prompt_tokens"] == p)
                for p in prompts
            ]
            p50 = [s["p50_ms"] for s in stats]
            p95 = [s["p95_ms"] for s in stats]
            label = f"{target} ({_short_device(_values(picked, 'device_name')[0], 22)})"
            ax.plot(prompts, p50, marker="o", color=_color(target), label=label)
            ax.fill_between(prompts, p50, p95, color=_color(target), alpha=0.2, linewidth=0)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("latency (ms): p50 line, band to p95")
        title = METHOD_TITLES.get(method, method)
        if method == "generate" and new_tokens is not None:
            title = f"{title}: {new_tokens} new token{'s' if new_tokens != 1 else ''}"
        ax.set_title(title, fontsize=9)
        if len(missing) == len(slots):
            ax.text(0.5, 0.5, NOT_MEASURED, transform=ax.transAxes, ha="center", color="0.4")
        _missing_legend(ax, missing)
    fig.suptitle(
        "GPT-2 latency against prompt length at concurrency 1 (measured)\n" + describe_rows(rows),
        fontsize=10,
    )
    return fig


def plot_latency_cdf(
    rows: list[dict[str, Any]],
    expected_targets: Iterable[str] = DEFAULT_TARGETS,
    methods: Iterable[str] = ("ensemble_next_token", "generate", "decode_token"),
) -> Any:
    """The empirical CDF of per-call latency per target, at concurrency 1 and each method's
    reference prompt length (latency axis log-scaled when it spans more than 20x);
    concurrency-only targets are left out."""
    rows = _per_call_rows(rows)
    methods = list(methods)
    slots = _slots(rows, expected_targets)
    fig = _figure(max(6.0, 4.2 * len(methods)), 4.4)
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    for ax, method in zip(axes, methods, strict=True):
        point = reference_point(rows, method)
        missing = []
        for target in slots:
            picked = _at_reference(rows, target, method, point)
            if not picked:
                missing.append(target)
                continue
            values = sorted(r["latency_ms"] for r in picked)
            fraction = [(i + 1) / len(values) for i in range(len(values))]
            ax.step(
                values,
                fraction,
                where="post",
                color=_color(target),
                label=f"{target} (n={len(values)})",
            )
        if len(missing) < len(slots):
            shown = [v for line in ax.get_lines() for v in line.get_xdata()]
            if max(shown) > 20 * min(shown):  # log scale only when the range needs it
                ax.set_xscale("log")
                _plain_log_axis(ax.xaxis)
        else:
            ax.text(0.5, 0.5, NOT_MEASURED, transform=ax.transAxes, ha="center", color="0.4")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("latency (ms), client side")
        ax.set_ylabel("fraction of calls")
        ax.set_title(_method_title(method, point), fontsize=9)
        ax.grid(alpha=0.3)
        _missing_legend(ax, missing)
    devices = "; ".join(
        f"{t}: {_short_device(d, 40)}"
        for t in order_targets(r["target"] for r in rows)
        for d in _values([r for r in rows if r["target"] == t], "device_name")
    )
    fig.suptitle(
        "Latency CDF at concurrency 1 (measured)\n" + describe_rows(rows) + "\n" + devices,
        fontsize=9,
    )
    return fig


def plot_throughput_vs_concurrency(
    rows: list[dict[str, Any]],
    expected_targets: Iterable[str] = DEFAULT_TARGETS,
    method: str = "generate",
) -> Any:
    """Tokens per second of wall time (left) and p50/p95 latency (right) against the number
    of concurrent requests, for ``method`` at its reference prompt and token counts.

    A :data:`BATCHING_OFF` target is drawn next to its batching-on target (lighter, square
    markers), both labelled "batching on" / "batching off"."""
    slots = _slots(rows, expected_targets)
    point = reference_point(_per_call_rows(rows), method) or reference_point(rows, method)
    fig = _figure(10.0, 4.4)
    ax_tput, ax_lat = fig.subplots(1, 2)
    missing = []
    for target in slots:
        picked = (
            _select(rows, target, method, prompt_tokens=point[0], new_tokens=point[1])
            if point
            else []
        )
        levels = sorted({r["concurrency"] for r in picked})
        if not picked:
            missing.append(target)
            continue
        tputs, p50, p95 = [], [], []
        for level in levels:
            at = [r for r in picked if r["concurrency"] == level]
            stats = latency_stats(r["latency_ms"] for r in at)
            tputs.append(throughput(at) or float("nan"))
            p50.append(stats["p50_ms"])
            p95.append(stats["p95_ms"])
        name = batching_label(target, rows)
        label = f"{name} ({_short_device(_values(picked, 'device_name')[0], 22)})"
        marker = "s" if target in BATCHING_OFF else "o"
        ax_tput.plot(levels, tputs, marker=marker, color=_color(target), label=label)
        ax_lat.plot(levels, p50, marker=marker, color=_color(target), label=f"{name} p50")
        ax_lat.plot(
            levels, p95, marker="^", linestyle="--", color=_color(target), alpha=0.6, label="p95"
        )
    all_levels = sorted({r["concurrency"] for r in rows}) or [1]
    for ax in (ax_tput, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_levels)
        _plain_log_axis(ax.xaxis)
        ax.set_xlabel("concurrent requests")
        ax.grid(alpha=0.3)
        if len(missing) == len(slots):
            ax.text(0.5, 0.5, NOT_MEASURED, transform=ax.transAxes, ha="center", color="0.4")
        _missing_legend(ax, missing)
    ax_tput.set_ylabel("new tokens per second (all requests, wall time)")
    ax_lat.set_ylabel("latency per call (ms), client side")
    what = _method_title(method, point)
    ax_tput.set_title(f"throughput, {what}", fontsize=9)
    ax_lat.set_title(f"latency, {what}", fontsize=9)
    fig.suptitle("Throughput against concurrency (measured)\n" + describe_rows(rows), fontsize=10)
    return fig


#: How each percentile is drawn in :func:`plot_streaming_vs_concurrency`.
PERCENTILE_STYLES = {"p50": ("-", "o", 1.0), "p95": ("--", "^", 0.7), "p99": (":", "v", 0.5)}


def plot_streaming_vs_concurrency(
    rows: list[dict[str, Any]], expected_targets: Iterable[str] = DEFAULT_TARGETS
) -> Any:
    """TTFT (left) and ITL (right) p50/p95/p99 against the number of concurrent streams, per
    target, from ``generate_stream`` rows (:data:`tutorial.results.STREAM_METHODS`) at their
    most common prompt length, with one legend beside both panels. Targets without streaming
    rows are listed there as "not measured"; a :data:`BATCHING_OFF` target is labelled
    "batching off" next to its "batching on" one."""
    streamed = [r for r in rows if r["method"] in ("ttft", "itl", "generate_stream")]
    prompt = Counter(r["prompt_tokens"] for r in streamed).most_common(1)
    streamed = [r for r in streamed if prompt and r["prompt_tokens"] == prompt[0][0]]
    summaries = streaming_summary(streamed)
    slots = _slots(streamed, expected_targets)
    fig = _figure(12.5, 4.4)
    axes = dict(zip(("ttft", "itl"), fig.subplots(1, 2), strict=True))
    missing = []
    for target in slots:
        mine = [s for s in summaries if s["target"] == target]
        if not mine:
            missing.append(target)
            continue
        device = _short_device(
            _values([r for r in streamed if r["target"] == target], "device_name")[0], 22
        )
        name = batching_label(target, streamed)
        for method, ax in axes.items():
            points = [(s["concurrency"], s[f"{method}_ms"]) for s in mine if s[f"{method}_ms"]]
            for q, (style, marker, alpha) in PERCENTILE_STYLES.items():
                label = f"{name} {q}" + (f" ({device})" if q == "p50" else "")
                ax.plot(
                    [c for c, _ in points], [p[q] for _, p in points], linestyle=style,
                    marker=marker, color=_color(target), alpha=alpha, label=label,
                )  # fmt: skip
    all_levels = sorted({r["concurrency"] for r in streamed}) or [1]
    for method, ax in axes.items():
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_levels)
        _plain_log_axis(ax.xaxis)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(f"{method.upper()} (ms), client side: p50, p95, p99")
        ax.set_title(METHOD_TITLES[method], fontsize=9)
        ax.grid(alpha=0.3)
        if len(missing) == len(slots):
            ax.text(0.5, 0.5, NOT_MEASURED, transform=ax.transAxes, ha="center", color="0.4")
    from matplotlib.lines import Line2D

    # one legend for both panels, beside them (the lines would hide under it)
    handles, labels = axes["ttft"].get_legend_handles_labels()
    for target in missing:
        handles.append(Line2D([], [], linestyle="none", marker="x", color="0.6"))
        labels.append(f"{target}: {NOT_MEASURED}")
    fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    what = f", prompt {prompt[0][0]} tokens" if prompt else ""
    fig.suptitle(
        f"Streaming (generate_stream) against concurrency{what} (measured)\n"
        + describe_rows(streamed or rows),
        fontsize=10,
    )
    return fig


def figure_texts(fig: Any) -> list[str]:
    """Every text string drawn on a figure (titles, labels, legends, annotations)."""
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Save a figure as PNG (creating the folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def make_all_plots(
    rows: list[dict[str, Any]],
    out_dir: str | Path,
    expected_targets: Iterable[str] = DEFAULT_TARGETS,
    model: str | None = None,
    model_variant: str | None = None,
) -> dict[str, Path]:
    """Write the five latency figures as PNG files under ``out_dir``; return their paths.

    Rows are narrowed to one model (``model``, else the one with most rows) and one variant
    (``model_variant``, else fp32 when present) so a figure never mixes them.
    """
    rows = choose_model(rows, model)
    if rows:
        variants = _values(rows, "model_variant")
        variant = model_variant or ("fp32" if "fp32" in variants else variants[0])
        rows = [r for r in rows if r["model_variant"] == variant]
    expected = list(expected_targets)
    out_dir = Path(out_dir)
    figures = {
        "latency_bars": plot_latency_bars(rows, expected),
        "latency_vs_prompt": plot_latency_vs_prompt(rows, expected),
        "latency_cdf": plot_latency_cdf(rows, expected),
        "throughput_vs_concurrency": plot_throughput_vs_concurrency(rows, expected),
        "streaming_vs_concurrency": plot_streaming_vs_concurrency(rows, expected),
    }
    return {name: save_figure(fig, out_dir / PLOT_FILES[name]) for name, fig in figures.items()}


def copy_for_readme(plots: dict[str, Path], destination: str | Path) -> Path:
    """Copy the p50/p95 bar chart to ``destination`` (the README's images/latency_cpu_gpu.png)."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(plots["latency_bars"], destination)
    return destination

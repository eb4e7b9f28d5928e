"""The results file (schema, round trip, validation, summaries) and the latency plots.

Every row here is SYNTHETIC TEST DATA, marked so in its ``model`` and ``notes`` columns (and
so in every figure title drawn from it); none of it is a measurement.
"""

from __future__ import annotations

import csv
import platform
import re
import sys
from pathlib import Path

import pytest

from tutorial import plots, results
from tutorial.results import (
    RESULT_COLUMNS,
    ResultsError,
    format_summary,
    read_results,
    summarize,
    write_results,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SYNTHETIC = "SYNTHETIC TEST DATA"
CPU = "Synthetic Xeon 8358 (test data)"
GPU = "Synthetic A10 (test data)"


def synthetic_row(**overrides) -> dict:
    """One complete synthetic row (a test fixture, not a measurement)."""
    row = {
        "target": "local-cpu",
        "method": "generate",
        "model": "synthetic test data",
        "model_variant": "fp32",
        "weights": "random-offline",
        "device_name": CPU,
        "shape": "local",
        "sweep": "reference",
        "prompt_tokens": 10,
        "new_tokens": 50,
        "concurrency": 1,
        "iteration": 0,
        "started_at": 1000.0,
        "latency_ms": 100.0,
        "notes": SYNTHETIC,
    }
    row.update(overrides)
    return row


def synthetic_rows(targets=("local-cpu", "oci-gpu")) -> list[dict]:
    """A small data set for every figure: reference point, prompt sweep, concurrency sweep."""
    rows = []
    clock = 1000.0
    for target in targets:
        gpu = "gpu" in target
        extra = {
            "target": target,
            "device_name": GPU if gpu else CPU,
            "shape": ("VM.GPU.A10.1" if gpu else "VM.Standard.E4.Flex")
            if target.startswith("oci")
            else "local",
        }
        scale = 0.25 if gpu else 1.0
        for prompt in (10, 32, 128):
            sweep = "reference" if prompt == 10 else "prompt_length"
            for method, new, base in (
                ("ensemble_next_token", 1, 50.0 + prompt),
                ("generate", 1, 40.0 + prompt),
                ("generate", 50, 1000.0),
                ("decode_token", 1, 19.0),
            ):
                if target == "inprocess-cpu" and method == "ensemble_next_token":
                    continue
                for i in range(8):
                    latency = scale * base * (1 + i / 40)
                    rows.append(
                        synthetic_row(
                            **extra, method=method, sweep=sweep, prompt_tokens=prompt,
                            new_tokens=new, iteration=i, started_at=clock, latency_ms=latency,
                        )
                    )  # fmt: skip
                    clock += latency / 1000
        for level in (1, 2, 4):
            for i in range(2 * level):
                latency = scale * 1000.0 * max(1, level / 2)
                rows.append(
                    synthetic_row(
                        **extra, sweep="concurrency", concurrency=level, iteration=i,
                        started_at=clock + (i // level) * latency / 1000, latency_ms=latency,
                    )
                )  # fmt: skip
            clock += 3 * latency / 1000
    return rows


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A fresh TUTORIAL_WORKDIR with a state file that records the tiny model."""
    monkeypatch.setenv("TUTORIAL_WORKDIR", str(tmp_path))
    from tutorial.common import update_state

    update_state("model", weights="random-offline", size="tiny", n_layer=2, n_head=2, n_embd=64)
    return tmp_path


# ---------------------------------------------------------------------------------------------
# results file


def test_round_trip_keeps_every_value(workdir):
    rows = [
        synthetic_row(
            iteration=i, latency_ms=100.25 + i, started_at=1000.5 + i, server_queue_ms=0.5
        )
        for i in range(3)
    ]
    path = write_results(rows, workdir / "results" / "r.csv")
    with path.open(newline="") as handle:
        assert next(csv.reader(handle)) == list(RESULT_COLUMNS)
    back = read_results(path)
    assert len(back) == 3
    for written, read in zip(rows, back, strict=True):
        for column, value in written.items():
            assert read[column] == value, column
        assert read["server_compute_ms"] is None  # empty cell = unknown
        assert read["tokens_per_s"] == pytest.approx(50 / (written["latency_ms"] / 1000), abs=1e-3)
        assert read["python"] == platform.python_version() == sys.version.split()[0]
        assert read["hostname"] == platform.node()
    assert len({r["run_id"] for r in back}) == 1


def test_append_keeps_one_header_and_separate_runs(workdir):
    path = workdir / "r.csv"
    write_results([synthetic_row(iteration=0)], path)
    write_results([synthetic_row(iteration=1)], path)
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    assert lines[0] == ",".join(RESULT_COLUMNS)
    back = read_results(str(workdir / "*.csv"))
    assert [r["iteration"] for r in back] == [0, 1]
    assert back[0]["run_id"] != back[1]["run_id"]


def test_metadata_defaults_come_from_state_and_machine(workdir):
    from tutorial.common import machine_metadata

    row = synthetic_row()
    for column in ("weights", "model", "device_name", "shape", "concurrency", "sweep", "notes"):
        del row[column]
    (back,) = read_results(write_results([row], workdir / "r.csv"))
    assert back["weights"] == "random-offline"
    assert back["model"] == "tiny test model (n_layer=2, n_head=2, n_embd=64)"
    assert back["device_name"] == machine_metadata()["cpu"]
    assert back["shape"] == "local"
    assert back["concurrency"] == 1
    assert back["sweep"] == "" and back["notes"] == ""


BAD_ROWS = [
    (
        {"model_variant": "fp16"},
        "row 0: model_variant must be one of ('fp32', 'int8'), not 'fp16'.",
    ),
    (
        {"weights": "pretrained"},
        "row 0: weights must be one of ('real', 'random-offline'), not 'pretrained'.",
    ),
    ({"latency_ms": 0}, "row 0: latency_ms must be > 0, not 0.0."),
    ({"latency_ms": "fast"}, "row 0: latency_ms must be a number, not 'fast'."),
    ({"latency_ms": float("nan")}, "row 0: latency_ms must be a finite number, not nan."),
    ({"iteration": 1.5}, "row 0: iteration must be an integer, not 1.5."),
    ({"concurrency": 0}, "row 0: concurrency must be >= 1, not 0."),
    ({"server_queue_ms": -1}, "row 0: server_queue_ms must be >= 0, not -1.0."),
    ({"method": ""}, "row 0: method is empty; every row needs it."),
    (
        {"target": "Local CPU"},
        "row 0: target 'Local CPU' must be lower-case letters, digits and '-' "
        "(e.g. local-cpu, oci-gpu).",
    ),
    (
        {"colour": "red"},
        "row 0: unknown column(s) colour; the schema is tutorial.results.RESULT_COLUMNS.",
    ),
    (
        {"target": "local-gpu", "device_name": ""},
        "row 0: device_name is empty for GPU target 'local-gpu'; pass the GPU's name "
        "(e.g. from nvidia-smi), it cannot be guessed from this machine.",
    ),
    (
        {"target": "oci-cpu", "device_name": "OCI E4", "shape": None},
        "row 0: shape is empty for 'oci-cpu'; pass the OCI shape.",
    ),
]


@pytest.mark.parametrize(("change", "message"), BAD_ROWS)
def test_bad_rows_are_refused_and_nothing_is_written(workdir, change, message):
    path = workdir / "r.csv"
    write_results([synthetic_row()], path)
    before = path.read_bytes()
    with pytest.raises(ResultsError, match=f"^{re.escape(message)}$"):
        write_results([synthetic_row(**change)], path)
    assert path.read_bytes() == before


def test_second_bad_row_is_named(workdir):
    with pytest.raises(ResultsError, match=r"^row 1: latency_ms must be > 0"):
        write_results([synthetic_row(), synthetic_row(latency_ms=-3)], workdir / "r.csv")
    assert not (workdir / "r.csv").exists()


def test_read_refuses_other_schemas_and_missing_files(workdir):
    other = workdir / "old.csv"
    other.write_text("target,latency_ms\nlocal-cpu,12.5\n")
    with pytest.raises(ResultsError, match=r"columns differ from tutorial.results.RESULT_COLUMNS"):
        read_results(other)
    with pytest.raises(ResultsError, match=r"old.csv has different columns"):
        write_results([synthetic_row()], other)
    with pytest.raises(ResultsError, match=r"results file .*nothere.csv does not exist"):
        read_results(workdir / "nothere.csv")
    assert read_results([str(workdir / "nothing-*.csv")]) == []


def test_read_reports_file_and_line_of_a_bad_row(workdir):
    path = write_results([synthetic_row(), synthetic_row(iteration=1)], workdir / "r.csv")
    text = path.read_text().splitlines()
    text[2] = text[2].replace(",fp32,", ",fp64,")
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(ResultsError, match=rf"^{re.escape(str(path))} line 3: model_variant"):
        read_results(path)


def test_summarize_percentiles_and_throughput():
    rows = [
        synthetic_row(iteration=i, latency_ms=float(i + 1), started_at=1000 + i / 1000, run_id="r")
        for i in range(100)
    ]
    (summary,) = summarize([_complete(r) for r in rows])
    assert summary["count"] == 100
    assert summary["p50_ms"] == pytest.approx(50.5)
    assert summary["p90_ms"] == pytest.approx(90.1)
    assert summary["p95_ms"] == pytest.approx(95.05)
    assert summary["p99_ms"] == pytest.approx(99.01)
    assert summary["mean_ms"] == pytest.approx(50.5)
    # one call after another: 5000 tokens over the sum of the latencies, 5.05 s
    assert summary["throughput_tokens_per_s"] == pytest.approx(5000 / 5.05)
    # median of the per-call rates 50 tokens / (i ms): between the 50th and the 51st call
    assert summary["tokens_per_s"] == pytest.approx((50_000 / 50 + 50_000 / 51) / 2)
    table = format_summary([summary])
    assert "p95_ms" in table.splitlines()[0] and "95.05" in table


def test_throughput_of_overlapping_calls_uses_wall_time():
    # 4 calls of 100 ms, 2 at a time: starts at 0, 0, 0.1, 0.1 s -> 0.2 s of wall time
    rows = [
        _complete(
            synthetic_row(iteration=i, concurrency=2, started_at=1000 + (i // 2) / 10, run_id="r")
        )
        for i in range(4)
    ]
    (summary,) = summarize(rows)
    assert summary["throughput_tokens_per_s"] == pytest.approx(200 / 0.2)
    assert summary["tokens_per_s"] == pytest.approx(500)
    # a row from a tool that does not record start times does not change it
    untimed = _complete(synthetic_row(concurrency=2, started_at=None, run_id="other"))
    (summary,) = summarize([*rows, untimed])
    assert summary["throughput_tokens_per_s"] == pytest.approx(200 / 0.2)
    (summary,) = summarize([untimed])
    assert summary["throughput_tokens_per_s"] is None


def test_summarize_keeps_models_and_targets_apart():
    rows = [
        _complete(synthetic_row(target=t, model=m))
        for t in ("local-cpu", "oci-cpu")
        for m in ("a", "b")
    ]
    assert len(summarize(rows)) == 4


def _complete(row: dict) -> dict:
    from tutorial.results import complete_row

    return complete_row(row)


# ---------------------------------------------------------------------------------------------
# plots


def test_every_plot_is_a_png(workdir):
    path = write_results(
        synthetic_rows(("local-cpu", "inprocess-cpu", "oci-gpu")), workdir / "r.csv"
    )
    written = plots.make_all_plots(read_results(path), workdir / "plots")
    assert set(written) == set(plots.PLOT_FILES)
    import matplotlib.image

    for name, png in written.items():
        assert png == workdir / "plots" / plots.PLOT_FILES[name]
        data = png.read_bytes()
        assert data[:8] == PNG_SIGNATURE, name
        assert len(data) > 10_000, name
        height, width, channels = matplotlib.image.imread(png).shape
        assert height > 300 and width > 500 and channels in (3, 4)


def _texts(fig) -> list[str]:
    return plots.figure_texts(fig)


def test_missing_targets_are_drawn_not_measured():
    rows = [_complete(r) for r in synthetic_rows(("local-cpu", "oci-gpu"))]
    fig = plots.plot_latency_bars(rows)
    texts = _texts(fig)
    # local-gpu and oci-cpu are missing: one "not measured" slot each in each of 3 panels
    assert sum(t == plots.NOT_MEASURED for t in texts) == 6
    ticks = [t.get_text() for ax in fig.axes for t in ax.get_xticklabels()]
    assert sum(t.startswith("local-gpu") for t in ticks) == 3
    # nothing drawn in those slots: every bar sits at local-cpu (0) or oci-gpu (3)
    from matplotlib.patches import Rectangle

    for ax in fig.axes:
        centers = {
            round(p.get_x() + p.get_width() / 2) for p in ax.patches if isinstance(p, Rectangle)
        }
        assert centers == {0, 3}
    for plot in (plots.plot_latency_vs_prompt, plots.plot_latency_cdf):
        texts = _texts(plot(rows))
        assert "local-gpu: not measured" in texts
        assert "oci-cpu: not measured" in texts
        assert "local-cpu: not measured" not in texts
    texts = _texts(plots.plot_throughput_vs_concurrency(rows))
    assert "local-gpu: not measured" in texts


def test_the_legend_names_a_gpu_colour_only_when_a_gpu_was_measured():
    cpu_only = [_complete(r) for r in synthetic_rows(("local-cpu", "inprocess-cpu"))]
    texts = _texts(plots.plot_latency_bars(cpu_only))
    assert "GPU: not measured" in texts and "GPU targets: greens" not in texts
    assert "CPU targets: blues and purples" in texts


def test_measured_gpu_fills_its_slot():
    rows = [_complete(r) for r in synthetic_rows(("local-cpu", "local-gpu", "oci-cpu", "oci-gpu"))]
    texts = _texts(plots.plot_latency_bars(rows))
    assert plots.NOT_MEASURED not in texts
    assert "GPU targets: greens" in texts and "GPU: not measured" not in texts
    assert not any("not measured" in t for t in _texts(plots.plot_latency_cdf(rows)))


def unbatched_rows(levels=(1, 2, 4)) -> list[dict]:
    """Synthetic local-cpu-unbatched rows (a test fixture): only a concurrency sweep, one request
    at a time: at each level, two waves of ``level`` calls that each take ``level`` seconds
    (every call waits for the others of its wave), so 50 tokens/s whatever the level."""
    rows = []
    for level in levels:
        for i in range(2 * level):
            rows.append(
                synthetic_row(
                    target="local-cpu-unbatched", run_id="r1", sweep="concurrency",
                    concurrency=level, iteration=i, latency_ms=1000.0 * level,
                    started_at=5000.0 + level * 100 + (i // level) * level,
                )
            )  # fmt: skip
    return rows


def _legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_batching_off_is_drawn_only_against_concurrency():
    measured = [_complete(r) for r in synthetic_rows(("local-cpu", "oci-gpu"))]
    rows = measured + [_complete(r) for r in unbatched_rows()]
    assert plots.concurrency_only(rows) == {"local-cpu-unbatched"}
    # the per-call figures are drawn exactly as without it: no slot, no legend entry
    bars = plots.plot_latency_bars(rows)
    assert sum(t == plots.NOT_MEASURED for t in _texts(bars)) == 6
    ticks = [t.get_text() for ax in bars.axes for t in ax.get_xticklabels()]
    assert not any("unbatched" in t for t in ticks) and len(ticks) == 3 * 4
    for plot in (plots.plot_latency_bars, plots.plot_latency_vs_prompt, plots.plot_latency_cdf):
        texts = _texts(plot(rows))
        assert not any("unbatched" in t or "batching" in t for t in texts), plot.__name__
        assert texts == _texts(plot(measured)), plot.__name__
    # the throughput figure: both lines, labelled batching on and off
    fig = plots.plot_throughput_vs_concurrency(rows)
    ax_tput, ax_lat = fig.axes[:2]
    labels = _legend_texts(ax_tput)
    assert any(t.startswith("local-cpu, batching on (Synthetic Xeon") for t in labels)
    assert any(t.startswith("local-cpu-unbatched, batching off (") for t in labels)
    assert "local-gpu: not measured" in labels
    assert not any(t.startswith("local-cpu-unbatched: not measured") for t in labels)
    assert "local-cpu, batching on p50" in _legend_texts(ax_lat)
    assert "local-cpu-unbatched, batching off p50" in _legend_texts(ax_lat)
    (off,) = [line for line in ax_tput.get_lines() if "batching off" in line.get_label()]
    assert list(off.get_xdata()) == [1, 2, 4]
    assert list(off.get_ydata()) == pytest.approx([50.0, 50.0, 50.0])
    assert off.get_marker() == "s"
    # without the unbatched rows nothing says batching
    alone = _texts(plots.plot_throughput_vs_concurrency(measured))
    assert not any("batching" in t for t in alone)
    assert any(t.startswith("local-cpu (Synthetic Xeon") for t in alone)


def test_nothing_measured_at_all_still_draws_labelled_slots():
    fig = plots.plot_latency_bars([])
    assert sum(t == plots.NOT_MEASURED for t in _texts(fig)) == 12
    assert "no measurements" in fig.get_suptitle()


def test_titles_say_what_on_which_devices_and_weights():
    rows = [_complete(r) for r in synthetic_rows(("local-cpu", "oci-gpu"))]
    for plot in (
        plots.plot_latency_bars,
        plots.plot_latency_vs_prompt,
        plots.plot_latency_cdf,
        plots.plot_throughput_vs_concurrency,
    ):
        fig = plot(rows)
        title = fig.get_suptitle()
        assert "weights: random-offline" in title
        assert "model: synthetic test data (fp32)" in title
        assert title.startswith(("GPT-2 latency", "Latency CDF", "Throughput"))
        assert SYNTHETIC in title
        joined = "\n".join(_texts(fig))
        assert "Synthetic A10" in joined and "Synthetic Xeon" in joined
    ticks = [
        t.get_text() for ax in plots.plot_latency_bars(rows).axes for t in ax.get_xticklabels()
    ]
    assert any(t.startswith("oci-gpu\nVM.GPU.A10.1\nSynthetic A10") for t in ticks)
    assert any(
        "generate: 50 new tokens, prompt 10 tokens" == t
        for t in _texts(plots.plot_latency_bars(rows))
    )


def test_figures_never_mix_models(workdir):
    rows = [_complete(r) for r in synthetic_rows(("local-cpu",))]
    other = [
        _complete(
            synthetic_row(
                model="another model", target="oci-gpu", device_name=GPU, shape="VM.GPU.A10.1"
            )
        )
    ]
    kept = plots.choose_model(rows + other)
    assert {r["model"] for r in kept} == {"synthetic test data"}
    assert plots.choose_model(rows + other, "another model") == other
    with pytest.raises(ResultsError, match=r"no rows for model 'gpt2 124M'"):
        plots.choose_model(rows, "gpt2 124M")
    written = plots.make_all_plots(rows + other, workdir / "plots")
    assert all(p.exists() for p in written.values())


def test_copy_for_readme(workdir):
    rows = [_complete(r) for r in synthetic_rows(("local-cpu",))]
    written = plots.make_all_plots(rows, workdir / "plots")
    copy = plots.copy_for_readme(written, workdir / "images" / "latency_cpu_gpu.png")
    assert copy.read_bytes() == written["latency_bars"].read_bytes()


# ---------------------------------------------------------------------------------------------
# streaming: TTFT and ITL per concurrency level


def synthetic_streams(level: int) -> list[dict]:
    """``2 * level`` synthetic :func:`tutorial.streaming.timed_stream` results (a test fixture,
    not measurements), in two waves of ``level`` sent 1 s apart; request k: TTFT
    ``10 * level + k`` ms, then 4 gaps of ``level``, ``2 level``, ``3 level``, ``4 level`` ms."""
    runs = []
    for k in range(2 * level):
        sent = 100.0 + (k // level)
        first = sent + (10 * level + k) / 1000
        times = [first + level * j * (j + 1) / 2 / 1000 for j in range(5)]
        runs.append({"sent": sent, "times": times, "tokens": [7, 8, 9, 10, 11]})
    return runs


def synthetic_stream_rows(target="local-cpu", device=CPU, levels=(1, 2, 4)) -> list[dict]:
    from tutorial.streaming import stream_rows

    rows = []
    for level in levels:
        for row in stream_rows(
            synthetic_streams(level), target=target, model_variant="fp32", device_name=device,
            shape="local", prompt_tokens=10, concurrency=level,
        ):  # fmt: skip
            rows.append(
                dict(
                    row,
                    model="synthetic test data",
                    weights="random-offline",
                    notes=f"{SYNTHETIC}: {row['notes']}",
                )
            )
    return rows


def test_stream_rows_and_their_summary(workdir):
    rows = synthetic_stream_rows()
    # per request: its whole stream, its TTFT and one ITL row per gap (5 tokens, 4 gaps)
    assert [r["method"] for r in rows[:6]] == ["generate_stream", "ttft"] + ["itl"] * 4
    assert len(rows) == 6 * (2 + 4 + 8)
    ttft_at_4 = [r["latency_ms"] for r in rows if r["method"] == "ttft" and r["concurrency"] == 4]
    assert ttft_at_4 == pytest.approx([40, 41, 42, 43, 44, 45, 46, 47])
    whole = [r for r in rows if r["method"] == "generate_stream"]
    assert {r["new_tokens"] for r in whole} == {5}
    assert whole[0]["latency_ms"] == pytest.approx(10 + 10)  # TTFT 10 ms + gaps 1+2+3+4 ms

    back = read_results(write_results(rows, workdir / "streams.csv"))
    summary = results.streaming_summary(back + read_results(write_results(
        [synthetic_row()], workdir / "other.csv")))  # fmt: skip
    assert [(s["target"], s["concurrency"], s["requests"]) for s in summary] == [
        ("local-cpu", 1, 2),
        ("local-cpu", 2, 4),
        ("local-cpu", 4, 8),
    ]  # the generate row is not a stream's
    at = {s["concurrency"]: s for s in summary}
    assert at[4]["ttft_ms"] == pytest.approx({"p50": 43.5, "p95": 46.65, "p99": 46.93})
    assert at[2]["ttft_ms"] == pytest.approx({"p50": 21.5, "p95": 22.85, "p99": 22.97})
    # the gaps: a quarter each of L, 2L, 3L and 4L ms
    assert at[4]["itl_ms"] == pytest.approx({"p50": 10.0, "p95": 16.0, "p99": 16.0})
    # one at a time: 10 tokens over 20 + 21 ms; two waves 1 s apart: 20 tokens over 1.043 s
    assert at[1]["tokens_per_s"] == pytest.approx(10 / 0.041, rel=1e-3)
    assert at[2]["tokens_per_s"] == pytest.approx(20 / 1.043, rel=1e-3)
    table = results.format_streaming_summary(summary).splitlines()
    assert table[0].split() == [
        "target", "clients", "requests", "TTFT", "p50/p95/p99", "ms", "ITL", "p50/p95/p99",
        "ms", "tok/s",
    ]  # fmt: skip
    assert table[4].split() == [
        "local-cpu", "4", "8", "43.5", "/", "46.6", "/", "46.9", "10.0", "/", "16.0", "/", "16.0",
        f"{at[4]['tokens_per_s']:.1f}",
    ]  # fmt: skip


def _figure_legend(fig) -> list[str]:
    (legend,) = fig.legends
    return [t.get_text() for t in legend.get_texts()]


def test_streaming_plot_draws_ttft_and_itl_percentiles_per_level():
    rows = [_complete(r) for r in synthetic_stream_rows() + synthetic_rows(("local-cpu",))]
    fig = plots.plot_streaming_vs_concurrency(rows)
    ax_ttft, ax_itl = fig.axes[:2]
    assert ax_ttft.get_title() == "time to first token (TTFT)"
    assert ax_itl.get_title().startswith("inter-token latency (ITL)")
    assert ax_ttft.get_xlabel() == "concurrent streams"
    assert ax_ttft.get_ylabel().startswith("TTFT (ms)")
    assert ax_itl.get_ylabel().startswith("ITL (ms)")
    title = fig.get_suptitle()
    assert title.startswith("Streaming (generate_stream) against concurrency, prompt 10 tokens")
    assert SYNTHETIC in title and "weights: random-offline" in title
    (legend,) = fig.legends  # one, for both panels
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[:3] == ["local-cpu p50 (Synthetic Xeon 8358...)", "local-cpu p95",
                          "local-cpu p99"]  # fmt: skip
    # measured only on local-cpu: the GPU (and OCI) say so, nothing is drawn for them
    assert labels[3:] == [
        "local-gpu: not measured",
        "oci-cpu: not measured",
        "oci-gpu: not measured",
    ]
    lines = {line.get_label(): line for line in ax_ttft.get_lines()}
    p50, p99 = lines["local-cpu p50 (Synthetic Xeon 8358...)"], lines["local-cpu p99"]
    assert list(p50.get_xdata()) == [1, 2, 4]
    assert list(p50.get_ydata()) == pytest.approx([10.5, 21.5, 43.5])
    assert list(p99.get_ydata()) == pytest.approx([10.99, 22.97, 46.93])
    itl_p50 = [line for line in ax_itl.get_lines() if line.get_label().startswith("local-cpu p50")]
    assert list(itl_p50[0].get_ydata()) == pytest.approx([2.5, 5.0, 10.0])
    assert len(ax_ttft.get_lines()) == len(ax_itl.get_lines()) == 3

    # a measured GPU gets its own lines and no "not measured"
    gpu = [_complete(r) for r in synthetic_stream_rows("local-gpu", GPU, levels=(1, 2))]
    labels = _figure_legend(plots.plot_streaming_vs_concurrency(rows + gpu))
    assert "local-gpu p50 (Synthetic A10 (test...)" in labels and "oci-gpu: not measured" in labels
    assert "local-gpu: not measured" not in labels

    # the same server with batching off: labelled against batching on, as in the throughput figure
    off = [_complete(r) for r in synthetic_stream_rows("local-cpu-unbatched", CPU, levels=(1, 2))]
    labels = _figure_legend(plots.plot_streaming_vs_concurrency(rows + off))
    assert labels[:6] == [
        "local-cpu, batching on p50 (Synthetic Xeon 8358...)",
        "local-cpu, batching on p95",
        "local-cpu, batching on p99",
        "local-cpu-unbatched, batching off p50 (Synthetic Xeon 8358...)",
        "local-cpu-unbatched, batching off p95",
        "local-cpu-unbatched, batching off p99",
    ]


def test_streaming_plot_without_streams_says_not_measured():
    fig = plots.plot_streaming_vs_concurrency([_complete(r) for r in synthetic_rows()])
    for ax in fig.axes[:2]:
        assert ax.get_lines() == []
        assert plots.NOT_MEASURED in [t.get_text() for t in ax.texts]
    assert "local-cpu: not measured" in _figure_legend(fig)

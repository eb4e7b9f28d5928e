"""Time to first token, inter-token latency and tokens/s through ``generate_stream``, per
number of clients; what a long prompt does to the clients already decoding, with chunked
prefill off and on; and a ``max_batch`` sweep.

    python benchmarks/bench_streaming.py            # after notebooks 01-03 (make run)
    python benchmarks/bench_streaming.py --levels 1 8 --requests 2 --new-tokens 50
    python benchmarks/bench_streaming.py --skip-levels --skip-sweep --long-chunks 0 32 128:0.75

It serves the artifact notebook 03 packed (the zip unpacked read-only, the bundled Triton, as
the tests do) and streams over HTTP (``/v2/models/generate_stream/generate_stream``), the way a
chat client does. Definitions (TTFT, ITL as gaps and as per-request TPOT): :mod:`tutorial.streaming`.
Each setting below is a copy of the zip with the engine's parameters set
(:func:`tutorial.repository.artifact_with_parameters`) on a server of its own, started and
stopped here, one at a time.

1. Levels (the artifact as committed): ``N`` clients, each sending ``--requests`` requests one
   after another, a ``--prompt-tokens``-token prompt and ``--new-tokens`` new tokens each.
2. Long prompt, per ``--long-chunks`` setting ``CHUNK`` or ``CHUNK:SHARE`` (``prefill_chunk``
   and ``prefill_chunk_share``, 0 if not given; chunk 0: chunked prefill off): 7 clients decode ``--long-decode`` tokens; ``--long-after`` seconds in, one request with a
   ``--long-prompt``-token prompt arrives. Reported: the decoders' ITL p50/p95/p99 with it, and
   without it in a run just before (same server, clients and tokens), the longest gap (a
   stall shows there, while p99 over ~1,000 gaps can miss 7 long ones), and the long request's
   TTFT.
3. ``max_batch`` sweep: per ``--sweep-max-batch`` value, ``--sweep-clients`` clients as in 1;
   tokens/s, TTFT p50 and ITL p50.

Prints the tables and writes ``results/bench_streaming.json`` (``--out``) in the work folder.
Every token stream is checked against the same prompt's tokens at one client before any time is
reported; with the long prompt, the decoders' tokens and its first token must not change.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_generation import parse_param  # noqa: E402

from tutorial import common  # noqa: E402
from tutorial.measure import PromptMaker  # noqa: E402
from tutorial.streaming import latency_metrics, run_clients, timed_stream  # noqa: E402


def fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}"


def levels_table(rows: list[dict]) -> str:
    lines = [
        "| clients | requests | TTFT p50 / p95 / p99 ms | ITL (gaps) p50 / p95 / p99 ms "
        "| TPOT p50 / p95 ms | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"]
        t, i, p = m["ttft_ms"], m["itl_ms"], m["tpot_ms"]
        lines.append(
            f"| {r['clients']} | {m['requests']} | {fmt(t['p50'])} / {fmt(t['p95'])} / "
            f"{fmt(t['p99'])} | {fmt(i['p50'])} / {fmt(i['p95'])} / {fmt(i['p99'])} "
            f"| {fmt(p['p50'])} / {fmt(p['p95'])} | {m['tokens_per_s']:.1f} |"
        )
    return "\n".join(lines)


def chunk_setting(text: str) -> tuple[int, float]:
    """``CHUNK`` or ``CHUNK:SHARE`` -> (prefill_chunk, prefill_chunk_share)."""
    chunk, _, share = text.partition(":")
    try:
        value = (int(chunk), float(share or 0))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CHUNK or CHUNK:SHARE, not {text!r}") from None
    if value[0] < 0 or value[1] < 0:
        raise argparse.ArgumentTypeError(f"chunk and share must be >= 0, not {text!r}")
    return value


def chunk_label(row: dict) -> str:
    if not row["prefill_chunk"]:
        return "off (0)"
    share = row.get("prefill_chunk_share") or 0
    return f"{row['prefill_chunk']}" + (f", share {share:g}" if share else "")


def long_table(rows: list[dict], long_tokens: int) -> str:
    lines = [
        f"| prefill_chunk (, share) | decoders' ITL without the {long_tokens}-token prompt p50 / p95 / "
        "p99 ms | with it p50 / p95 / p99 / longest ms | p99 with / p50 without | its TTFT ms |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        base, hit = r["without"]["decoders"]["itl_ms"], r["with"]["decoders"]["itl_ms"]
        lines.append(
            f"| {chunk_label(r)} | {fmt(base['p50'])} / {fmt(base['p95'])} / "
            f"{fmt(base['p99'])} | {fmt(hit['p50'])} / {fmt(hit['p95'])} / {fmt(hit['p99'])} / "
            f"{fmt(hit.get('max'))} | {r['ratio']:.1f}x | "
            f"{fmt(r['with']['long_prompt_ttft_ms'])} |"
        )
    return "\n".join(lines)


def sweep_table(rows: list[dict]) -> str:
    lines = [
        "| max_batch | clients | requests | tokens/s | TTFT p50 ms | ITL (gaps) p50 ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"]
        lines.append(
            f"| {r['max_batch']} | {r['clients']} | {m['requests']} | "
            f"{m['tokens_per_s']:.1f} | {fmt(m['ttft_ms']['p50'])} | {fmt(m['itl_ms']['p50'])} |"
        )
    return "\n".join(lines)


def engine_breakdown(before: dict, after: dict, wall_s: float) -> dict | None:
    """Where a level's time went inside the engine, from its counters (``*_us`` summed over the
    level; see COUNTERS in generate_stream/1/model.py): means per request, per call, per step.
    None where the artifact's engine does not time itself (one packed before it did)."""
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    if "first_token_us" not in d or not d.get("prefills") or not d.get("steps"):
        return None
    # prefills run in a decode step's call (chunk_steps, step_prefill_calls) are timed with it:
    # the prefill columns are the calls of their own
    calls = d["prefill_calls"] + d["prefill_chunks"]
    calls -= d.get("chunk_steps", 0) + d.get("step_prefill_calls", 0)
    alone = d["prefills"] - d.get("step_prefills", 0)
    return {
        "requests": d["prefills"],
        "first_token_ms": d["first_token_us"] / d["prefills"] / 1000,
        "queue_ms": d["queue_us"] / d["prefills"] / 1000,
        "prefill_call_ms": d["prefill_us"] / max(1, calls) / 1000,
        "rows_per_prefill_call": alone / max(1, calls),
        "prefills_in_steps": d.get("step_prefills", 0),
        "step_ms": d["step_us"] / d["steps"] / 1000,
        "rows_per_step": d["rows"] / d["steps"],
        "emit_ms_per_token": d["emit_us"] / (d["rows"] + d["prefills"]) / 1000,
        "busy": (d["prefill_us"] + d["step_us"] + d["emit_us"]) / 1e6 / wall_s,
    }


def breakdown_table(rows: list[dict]) -> str:
    lines = [
        "| clients | TTFT mean ms (client) | arrival -> first token sent ms (engine) | of which "
        "queued ms | prefill call ms (rows) | prompts prefilled in a decode step's call | "
        "decode step ms (rows) | handing a token to Triton ms | engine busy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r.get("engine")
        if not b:
            continue
        lines.append(
            f"| {r['clients']} | {fmt(r['ttft_mean_ms'])} | {fmt(b['first_token_ms'])} | "
            f"{fmt(b['queue_ms'])} | {fmt(b['prefill_call_ms'])} "
            f"({b['rows_per_prefill_call']:.1f}) | {b.get('prefills_in_steps', 0)} "
            f"| {fmt(b['step_ms'])} ({b['rows_per_step']:.1f}) "
            f"| {b['emit_ms_per_token']:.2f} | {100 * b['busy']:.0f}% |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def client_levels(
    url: str, prompt, args, levels: list[int], alone: list[int], metrics_url: str | None = None
) -> list[dict]:
    """Each level: ``clients`` clients streaming ``--requests`` requests each; every stream
    must equal ``alone`` (the prompt's tokens at one client). With ``metrics_url``, the
    engine's own timings for the level too (:func:`engine_breakdown`)."""
    from tutorial.client import engine_counters

    rows = []
    for clients in levels:
        before = engine_counters(metrics_url) if metrics_url else {}
        start = time.perf_counter()
        runs = run_clients(
            lambda c, i: timed_stream(url, prompt.text, args.new_tokens), clients, args.requests
        )
        wall = time.perf_counter() - start
        off = sum(r["tokens"] != alone for r in runs)
        if off:
            raise SystemExit(f"{off} streams at {clients} clients differ from one alone")
        ttft = [1000 * (r["times"][0] - r["sent"]) for r in runs]
        row = {"clients": clients, "metrics": latency_metrics(runs)}
        row["ttft_mean_ms"] = sum(ttft) / len(ttft)
        if metrics_url:
            row["engine"] = engine_breakdown(before, engine_counters(metrics_url), wall)
        rows.append(row)
        print(f"  {clients} clients done", flush=True)
    return rows


def long_prompt_run(url: str, prompt, long_prompt, args, with_long: bool) -> dict:
    """7 decoders, and (``with_long``) one long prompt arriving ``--long-after`` s in."""
    long_result: dict = {}

    def long_call() -> None:
        time.sleep(args.long_after)
        long_result.update(timed_stream(url, long_prompt.text, 1))

    thread = threading.Thread(target=long_call) if with_long else None
    if thread:
        thread.start()
    decoders = run_clients(lambda c, i: timed_stream(url, prompt.text, args.long_decode), 7, 1)
    if thread:
        thread.join()
    out = {"decoders": latency_metrics(decoders), "decoder_tokens": [d["tokens"] for d in decoders]}
    if long_result:
        out["long_prompt_ttft_ms"] = 1000 * (long_result["times"][0] - long_result["sent"])
        out["long_prompt_tokens"] = long_result["tokens"]
        if long_result["times"][0] > max(d["times"][-1] for d in decoders):
            print("  NOTE: the long prompt's first token came after the decoders ended: "
                  "raise --long-decode", flush=True)  # fmt: skip
    return out


def engine_reads(artifact: Path, parameter: str) -> bool:
    """Does the artifact's engine (generate_stream/1/model.py) read ``parameter``?"""
    import zipfile

    with zipfile.ZipFile(artifact) as zf:
        code = zf.read("model_repository/generate_stream/1/model.py").decode()
    return f'"{parameter}"' in code


class Servers:
    """The artifact with engine parameters set, served one setting at a time."""

    def __init__(self, artifact: Path, folder: Path):
        self.artifact, self.folder = artifact, folder

    def serve(self, name: str, params: dict[str, str]):
        from tutorial.repository import artifact_with_parameters
        from tutorial.triton_local import serve_artifact

        copy = self.folder / "setting.zip"
        copy.unlink(missing_ok=True)
        if params:
            print(f"{name}: {params}: writing the artifact copy ...", flush=True)
            artifact_with_parameters(self.artifact, copy, ["generate_stream"], params)
        else:
            print(f"{name}: the artifact as it is ...", flush=True)
            copy = self.artifact
        server = serve_artifact(copy, runtime="bundled")
        print(f"  served in {server.started_s:.1f} s at {server.url}", flush=True)
        return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=2, help="per client, in sequence")
    parser.add_argument("--prompt-tokens", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=50)
    parser.add_argument("--long-prompt", type=int, default=1000)
    parser.add_argument("--long-decode", type=int, default=150)
    parser.add_argument("--long-after", type=float, default=1.0)
    parser.add_argument(
        "--long-chunks",
        type=chunk_setting,
        nargs="+",
        default=[(0, 0.0), (32, 0.0), (32, 0.75)],
        help="CHUNK or CHUNK:SHARE settings (prefill_chunk, prefill_chunk_share) for the "
        "long-prompt runs (0: chunked prefill off); default: 0 32 32:0.75 (32:0.75: the "
        "committed one)",
    )
    parser.add_argument("--sweep-max-batch", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--sweep-clients", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument(
        "--param",
        type=parse_param,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set this engine parameter (generate_stream's config) for the levels; repeatable",
    )
    parser.add_argument("--skip-levels", action="store_true")
    parser.add_argument("--skip-long", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument(
        "--out", default="bench_streaming.json", help="file name under results/ in the work folder"
    )
    args = parser.parse_args()

    state = common.require_state("repository", "notebooks/03_model_repository.ipynb")
    make = PromptMaker.from_workdir()
    prompt = make(args.prompt_tokens)
    n_positions = int(common.load_state()["model"].get("n_positions") or 1024)
    long_prompt = make(min(args.long_prompt, n_positions - 2))
    print(f"model: {common.weights_label()}; artifact {state['artifact_zip']}", flush=True)
    if not args.skip_long and not engine_reads(Path(state["artifact_zip"]), "prefill_chunk"):
        raise SystemExit(
            f"{state['artifact_zip']}: its generate_stream/1/model.py predates the parameter "
            "prefill_chunk, so the long-prompt runs would measure one engine twice: run "
            "notebooks 03 again (make run), or pass --skip-long"
        )
    for key, _ in args.param:
        if not engine_reads(Path(state["artifact_zip"]), key):
            raise SystemExit(
                f"{state['artifact_zip']}: its generate_stream/1/model.py does not read the "
                f"parameter {key!r}: run notebook 03 again (make run), or leave --param out"
            )
    summary: dict = {"args": vars(args), "machine": common.machine_metadata(), "levels": []}
    alone: list[int] | None = None
    tables = []

    with tempfile.TemporaryDirectory(prefix="bench-streaming-", dir=common.workdir()) as tmp:
        servers = Servers(Path(state["artifact_zip"]), Path(tmp))
        if not args.skip_levels:
            params = dict(args.param)
            server = servers.serve("levels", params)
            try:
                alone = timed_stream(server.url, prompt.text, args.new_tokens)["tokens"]
                summary["levels"] = client_levels(
                    server.url, prompt, args, args.levels, alone, server.metrics_url
                )
            finally:
                server.stop()
            tables.append(levels_table(summary["levels"]))
            print(tables[-1], flush=True)
            where = breakdown_table(summary["levels"])
            if where:
                tables.append(
                    "Where the time went (the engine's own timings, means over each level; "
                    "TTFT less the engine's part is Triton's HTTP front end, the python "
                    "backend's hand-over to `execute` and the response's way back):\n" + where
                )
                print(tables[-1], flush=True)
        if not args.skip_long:
            rows = []
            for chunk, share in args.long_chunks:
                params = {"prefill_chunk": str(chunk), "prefill_chunk_share": f"{share:g}"}
                server = servers.serve("long prompt", params)
                try:
                    base = long_prompt_run(server.url, prompt, long_prompt, args, False)
                    hit = long_prompt_run(server.url, prompt, long_prompt, args, True)
                finally:
                    server.stop()
                if hit["decoder_tokens"] != base["decoder_tokens"]:
                    raise SystemExit(f"prefill_chunk {chunk}: the decoders' tokens changed")
                ratio = hit["decoders"]["itl_ms"]["p99"] / base["decoders"]["itl_ms"]["p50"]
                rows.append(
                    {
                        "prefill_chunk": chunk,
                        "prefill_chunk_share": share,
                        "without": base,
                        "with": hit,
                        "ratio": ratio,
                    }
                )
            firsts = {tuple(r["with"]["long_prompt_tokens"]) for r in rows}
            if len(firsts) != 1:
                raise SystemExit("the long prompt's first token differs between settings")
            summary["long_prompt"] = {"prompt_tokens": long_prompt.tokens, "runs": rows}
            tables.append(
                f"7 clients decoding {args.long_decode} tokens; a {long_prompt.tokens}-token "
                f"prompt arriving {args.long_after:g} s in:\n"
                + long_table(rows, long_prompt.tokens)
            )
            print(tables[-1], flush=True)
        if not args.skip_sweep:
            rows = []
            for max_batch in args.sweep_max_batch:
                server = servers.serve("max_batch sweep", {"max_batch": str(max_batch)})
                try:
                    first = timed_stream(server.url, prompt.text, args.new_tokens)["tokens"]
                    if alone is not None and first != alone:
                        raise SystemExit(f"max_batch {max_batch}: one client's tokens changed")
                    levels = client_levels(server.url, prompt, args, args.sweep_clients, first)
                finally:
                    server.stop()
                rows += [{"max_batch": max_batch, **level} for level in levels]
            summary["max_batch_sweep"] = rows
            tables.append(sweep_table(rows))
            print(tables[-1], flush=True)

    out = common.workdir() / "results" / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print("\n" + "\n\n".join(tables))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Time to first token, inter-token latency and tokens/s through ``generate_stream``, per
number of clients, and what a long prompt does to the clients already decoding.

    python benchmarks/bench_streaming.py            # after notebooks 01-03 (make run)
    python benchmarks/bench_streaming.py --levels 1 8 --requests 2 --new-tokens 50

It serves the artifact notebook 03 packed (the zip unpacked read-only, the bundled Triton, as
the tests do) and streams over HTTP (``/v2/models/generate_stream/generate_stream``), the way a
chat client does. Definitions (TTFT, ITL as gaps and as per-request TPOT): :mod:`tutorial.streaming`.

1. Levels: ``N`` clients, each sending ``--requests`` requests one after another, a
   ``--prompt-tokens``-token prompt and ``--new-tokens`` new tokens each.
2. Long prompt: 7 clients decode ``--long-decode`` tokens; ``--long-after`` seconds in, one
   request with a ``--long-prompt``-token prompt arrives. Reported: the decoders' ITL p50 and
   p99 with it, and without it in a run just before (same clients, same tokens), and the ratio
   p99 with / p50 without.

Prints the tables and writes ``results/bench_streaming.json`` in the work folder. Every token
stream is checked against the same prompt's tokens at one client before any time is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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


def long_prompt_run(url: str, prompt, long_prompt, args, with_long: bool) -> dict:
    """7 decoders, and (``with_long``) one long prompt arriving ``--long-after`` s in."""
    decoders: list[dict] = []
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
    out = {"decoders": latency_metrics(decoders)}
    if long_result:
        out["long_prompt_ttft_ms"] = 1000 * (long_result["times"][0] - long_result["sent"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=2, help="per client, in sequence")
    parser.add_argument("--prompt-tokens", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=50)
    parser.add_argument("--long-prompt", type=int, default=1000)
    parser.add_argument("--long-decode", type=int, default=150)
    parser.add_argument("--long-after", type=float, default=1.0)
    parser.add_argument("--skip-long", action="store_true")
    args = parser.parse_args()

    from tutorial.triton_local import serve_artifact

    state = common.require_state("repository", "notebooks/03_model_repository.ipynb")
    make = PromptMaker.from_workdir()
    prompt = make(args.prompt_tokens)
    n_positions = int(common.load_state()["model"].get("n_positions") or 1024)
    long_prompt = make(min(args.long_prompt, n_positions - 2))
    print(f"model: {common.weights_label()}; artifact {state['artifact_zip']}", flush=True)
    server = serve_artifact(Path(state["artifact_zip"]), runtime="bundled")
    summary: dict = {"args": vars(args), "machine": common.machine_metadata(), "levels": []}
    try:
        alone = timed_stream(server.url, prompt.text, args.new_tokens)["tokens"]
        for clients in args.levels:
            runs = run_clients(
                lambda c, i: timed_stream(server.url, prompt.text, args.new_tokens),
                clients,
                args.requests,
            )
            off = sum(r["tokens"] != alone for r in runs)
            if off:
                raise SystemExit(f"{off} streams at {clients} clients differ from one alone")
            summary["levels"].append({"clients": clients, "metrics": latency_metrics(runs)})
            print(f"{clients} clients done", flush=True)
        print(levels_table(summary["levels"]))
        if not args.skip_long:
            base = long_prompt_run(server.url, prompt, long_prompt, args, with_long=False)
            hit = long_prompt_run(server.url, prompt, long_prompt, args, with_long=True)
            ratio = hit["decoders"]["itl_ms"]["p99"] / base["decoders"]["itl_ms"]["p50"]
            summary["long_prompt"] = {"without": base, "with": hit, "ratio": ratio}
            print(
                f"\n7 clients decoding {args.long_decode} tokens; a {long_prompt.tokens}-token "
                f"prompt arriving {args.long_after:g} s in (TTFT "
                f"{hit['long_prompt_ttft_ms']:,.0f} ms):\n"
                f"  decoders' ITL without it: p50 {fmt(base['decoders']['itl_ms']['p50'])} ms, "
                f"p99 {fmt(base['decoders']['itl_ms']['p99'])} ms\n"
                f"  decoders' ITL with it:    p50 {fmt(hit['decoders']['itl_ms']['p50'])} ms, "
                f"p99 {fmt(hit['decoders']['itl_ms']['p99'])} ms\n"
                f"  p99 with / p50 without: {ratio:.1f}x"
            )
    finally:
        server.stop()
    out = common.workdir() / "results" / "bench_streaming.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

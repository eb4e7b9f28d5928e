"""NVIDIA AIPerf, an outside load generator, against our ``generate_stream``, beside the
repository's own streaming client on the same server and load.

    make aiperf                                          # after notebooks 01-03 (make run)
    python benchmarks/aiperf_peer.py --requests 32 --concurrency 8

It serves the artifact notebook 03 packed (``serve_artifact(zip, runtime="bundled")``, as
``bench_streaming.py`` does), then, on that one server:

1. our client (``tutorial.streaming``: ``--concurrency`` threads, ``--requests`` in all);
2. AIPerf (``.venv-aiperf``: ``aiperf profile``), run as a new user would: the ``template``
   endpoint type on ``/v2/models/generate_stream/generate_stream`` with ``--streaming``, the
   payload template ``benchmarks/aiperf_generate_stream.jinja`` and ``response_field``
   ``GENERATED_TEXT``, GPT-2's tokenizer saved by ``GPT2TokenizerFast.save_pretrained``;
   ``--synthetic-input-tokens-mean`` / ``--output-tokens-mean`` set to our prompt and answer
   lengths;
3. our client again (a slow minute then shows as a difference between 1 and 3).

For each: TTFT, ITL and tokens/s, and the CPU seconds the load generator itself used (our
client: this process's ``time.process_time``; AIPerf: ``getrusage(RUSAGE_CHILDREN)`` over its
run, all its processes) and the server's (its process group, from /proc).

Definitions. TTFT, shared: request start to the first response carrying text (AIPerf's
``ttft_metric.py``; ours :func:`tutorial.streaming.latency_metrics`). ITL: AIPerf's
``inter_token_latency`` is ``(request latency - TTFT) / (output tokens - 1)`` per request, the
output tokens counted by re-tokenizing the concatenated text (``inference_result_parser.py``),
request latency ending at the last response carrying text: our per-request **TPOT**, which
counts token events instead. Our **ITL (gaps)**, every gap between token events, is AIPerf's
``inter_chunk_latency`` (exported, not shown on its console). Throughput: all output tokens
over the run's wall time in both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tutorial import common  # noqa: E402
from tutorial.streaming import latency_metrics, run_clients, timed_stream  # noqa: E402

AIPERF = ROOT / ".venv-aiperf" / "bin" / "aiperf"
TEMPLATE = ROOT / "benchmarks" / "aiperf_generate_stream.jinja"
ENDPOINT = "/v2/models/generate_stream/generate_stream"


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group ``pgid`` (/proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def save_tokenizer(vocab_dir: Path, out: Path) -> Path:
    """GPT-2's tokenizer as a folder AIPerf's ``--tokenizer`` loads (AutoTokenizer)."""
    from transformers import GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast(
        vocab_file=str(vocab_dir / "vocab.json"), merges_file=str(vocab_dir / "merges.txt")
    )
    tokenizer.save_pretrained(str(out))
    return out


def aiperf_command(url: str, tokenizer: Path, out_dir: Path, args: argparse.Namespace) -> list[str]:
    extra = {"payload_template": str(TEMPLATE), "response_field": "GENERATED_TEXT"}
    return [
        str(AIPERF),
        "profile",
        "--model", "generate_stream",
        "--url", url,
        "--endpoint-type", "template",
        "--custom-endpoint", ENDPOINT,
        "--streaming",
        "--extra-inputs", json.dumps(extra),
        "--tokenizer", str(tokenizer),
        "--synthetic-input-tokens-mean", str(args.prompt_tokens),
        "--synthetic-input-tokens-stddev", "0",
        "--output-tokens-mean", str(args.new_tokens),
        "--output-tokens-stddev", "0",
        "--request-count", str(args.requests),
        "--concurrency", str(args.concurrency),
        "--artifact-dir", str(out_dir),
        "--ui-type", "none",  # the dashboard needs a TTY and costs CPU
        *shlex.split(args.aiperf_args),
    ]  # fmt: skip


def read_aiperf(out_dir: Path) -> dict:
    """The figures AIPerf exported (``profile_export_aiperf.json``)."""
    found = sorted(out_dir.rglob("profile_export_aiperf.json"))
    if not found:
        raise SystemExit(f"AIPerf wrote no profile_export_aiperf.json under {out_dir}")
    return json.loads(found[-1].read_text())


def metric(data: dict, tag: str, stat: str) -> float | None:
    """``data[tag][stat]`` in AIPerf's export (missing -> None)."""
    entry = data.get(tag)
    if isinstance(entry, dict):
        value = entry.get(stat)
        return float(value) if isinstance(value, (int, float)) else None
    return None


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32, help="in all")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=50)
    parser.add_argument(
        "--aiperf-args",
        default="",
        help="more aiperf options, e.g. '--no-gpu-telemetry --no-server-metrics --workers-max 1'",
    )
    args = parser.parse_args()
    if not AIPERF.exists():
        raise SystemExit(f"{AIPERF} is missing: make aiperf-venv builds it.")
    if args.requests % args.concurrency:
        raise SystemExit("--requests must be a multiple of --concurrency (our client's threads).")

    from tutorial.measure import PromptMaker
    from tutorial.triton_local import serve_artifact

    state = common.require_state("repository", "notebooks/03_model_repository.ipynb")
    label = common.weights_label()
    work = common.workdir() / "peers" / "aiperf"
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = save_tokenizer(common.paths()["vocab_dir"], work / "tokenizer")
    prompt = PromptMaker.from_workdir()(args.prompt_tokens)
    print(f"model: {label} weights; artifact {state['artifact_zip']}", flush=True)
    if label != "real":
        print(common.OFFLINE_BANNER)
    server = serve_artifact(Path(state["artifact_zip"]), runtime="bundled")
    pgid = server.process.pid
    summary: dict = {"args": vars(args), "weights": label, "machine": common.machine_metadata()}
    per_client = args.requests // args.concurrency

    def ours(name: str) -> None:
        cpu, srv, start = time.process_time(), group_cpu_s(pgid), time.perf_counter()
        runs = run_clients(
            lambda c, i: timed_stream(server.url, prompt.text, args.new_tokens),
            args.concurrency,
            per_client,
        )
        summary[name] = {
            "metrics": latency_metrics(runs),
            "wall_s": time.perf_counter() - start,
            "client_cpu_s": time.process_time() - cpu,
            "server_cpu_s": group_cpu_s(pgid) - srv,
            "tokens_per_request": sorted({len(r["tokens"]) for r in runs}),
        }
        print(f"our client ({name}) done", flush=True)

    try:
        first = timed_stream(server.url, prompt.text, args.new_tokens)
        if len(first["tokens"]) != args.new_tokens:
            raise SystemExit(
                f"the server streamed {len(first['tokens'])} tokens, not {args.new_tokens}"
            )
        ours("ours_before")
        out_dir = work / time.strftime("run-%Y%m%dT%H%M%S")
        cmd = aiperf_command(server.url, tokenizer, out_dir, args)
        print("$ " + " ".join(cmd), flush=True)
        cpu, srv, start = children_cpu_s(), group_cpu_s(pgid), time.perf_counter()
        log = out_dir.with_suffix(".log")
        out_dir.mkdir(parents=True)
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        summary["aiperf_run"] = {
            "command": cmd,
            "rc": rc,
            "wall_s": time.perf_counter() - start,
            "client_cpu_s": children_cpu_s() - cpu,
            "server_cpu_s": group_cpu_s(pgid) - srv,
            "log": str(log),
        }
        if rc != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise SystemExit(f"aiperf exited with {rc}; its output ends with:\n{tail}")
        summary["aiperf"] = read_aiperf(out_dir)
        ours("ours_after")
    finally:
        server.stop()

    a, run = summary["aiperf"], summary["aiperf_run"]
    print(
        f"\n{args.requests} requests at concurrency {args.concurrency}, {args.prompt_tokens}-token "
        f"prompts, {args.new_tokens} new tokens, one server ({label} weights)\n"
    )
    print(
        "| load generator | TTFT p50 / p99 ms | ITL p50 / p99 ms (AIPerf's = our TPOT) "
        "| gaps p50 / p99 ms (AIPerf: ICL) | output tokens/s | output tokens/request "
        "| generator CPU s | server CPU s | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ("ours_before", "ours_after"):
        s = summary[name]
        m = s["metrics"]
        print(
            f"| our client ({name.split('_')[1]}) | {fmt(m['ttft_ms']['p50'])} / "
            f"{fmt(m['ttft_ms']['p99'])} | {fmt(m['tpot_ms']['p50'])} / {fmt(m['tpot_ms']['p99'])} "
            f"| {fmt(m['itl_ms']['p50'])} / {fmt(m['itl_ms']['p99'])} | {fmt(m['tokens_per_s'])} "
            f"| {s['tokens_per_request']} | {s['client_cpu_s']:.1f} | {s['server_cpu_s']:.1f} "
            f"| {s['wall_s']:.1f} |"
        )
    osl = metric(a, "output_sequence_length", "avg")
    print(
        f"| AIPerf 0.13.0 | {fmt(metric(a, 'time_to_first_token', 'p50'))} / "
        f"{fmt(metric(a, 'time_to_first_token', 'p99'))} | "
        f"{fmt(metric(a, 'inter_token_latency', 'p50'))} / {fmt(metric(a, 'inter_token_latency', 'p99'))} "
        f"| {fmt(metric(a, 'inter_chunk_latency', 'p50'))} / {fmt(metric(a, 'inter_chunk_latency', 'p99'))} "
        f"| {fmt(metric(a, 'output_token_throughput', 'avg'))} | {fmt(osl)} (avg, re-tokenized) "
        f"| {run['client_cpu_s']:.1f} | {run['server_cpu_s']:.1f} | {run['wall_s']:.1f} |"
    )
    print(
        f"\nAIPerf's benchmark duration {fmt(metric(a, 'benchmark_duration', 'avg'))} s "
        f"(its tokens/s divide by it; its wall time above includes its start-up), "
        f"request count {fmt(metric(a, 'request_count', 'avg'), 0)}, "
        f"errors {fmt(metric(a, 'error_request_count', 'avg'), 0)}; its log: {run['log']}"
    )
    out = common.workdir() / "results" / "aiperf_peer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

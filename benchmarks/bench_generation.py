"""Benchmark: the seed's client loop against server-side generation and the in-process floor.

All in one run, on one machine, on the model notebooks 01-03 left in the work folder:
  a) seed:      the seed's client loop (fixed) through `ensemble_model`: one HTTP call per token
  b) generate:  the server-side `generate` model: one call for all tokens, KV cache on the server
  c) floor:     the server's own engine (generate_stream/1/model.py: its onnxruntime session,
                IO binding and bookkeeping) in this process, no Triton (tutorial.engine_local);
                c0) beside it, a plain session.run loop with numpy in and out, for comparison;
                one c) and one c0) run after each b) call, so that b/c compares the same minutes
  d) TF peer:   transformers' TensorFlow generate(do_sample=False) on the same weights, in a
                child process (its memory leaves with it); its tokens checked against c)
  b) and c) also with the int8 model.
It prints per-token p50/p95, the total for N tokens and the ratios between the methods; the
machine's all-core read bandwidth measured two ways (an fp32 matrix-vector product as large as
a decode step's weights on onnxruntime, which the weight-read floors use, and np.sum); and a
concurrency table: C clients at once against the artifact zip served as OCI serves it, with
generate's `inflight_batching` parameter "off" and "on" (two servers, alternating level by
level). It writes rows to
<workdir>/results/bench_generation.csv (tutorial.results schema, read by notebook 07) and a
summary JSON beside it.

Run: make bench   (or .venv/bin/python benchmarks/bench_generation.py --help)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tutorial import common, export, results  # noqa: E402
from tutorial.client import text_loop  # noqa: E402
from tutorial.repository import artifact_with_parameters  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
PROMPT = "My dog is cute, but he barks a lot."


def memory_bandwidth(gb_per_thread: float = 0.25, repeats: int = 5) -> float:
    """All-core memory read bandwidth in GB/s: every core sums its own large array."""
    threads = os.cpu_count() or 1
    arrays = [np.ones(int(gb_per_thread * 1e9 / 8)) for _ in range(threads)]
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.sum, arrays))
            best = max(best, threads * gb_per_thread / (time.perf_counter() - start))
    return best


def matvec_bandwidth(weight_bytes: int, k: int, runs: int = 20, warmup: int = 3) -> dict:
    """All-core read bandwidth the way a decode step reads its weights: an fp32 [1,K] x [K,N]
    MatMul on onnxruntime (the in-process loop's session options), the [K,N] weight an
    initializer of ``weight_bytes`` bytes. GB/s = weight bytes / median time of ``runs``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = max(1, round(weight_bytes / (4 * k)))
    weight = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "matvec",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(weight, "W")],
    )
    del weight
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # loadable by the pinned onnxruntime (IR <= 10)
    with tempfile.TemporaryDirectory(prefix="bench-matvec-") as tmp:
        path = Path(tmp) / "matvec.onnx"
        onnx.save(model, str(path))
        del model
        session = export.ort_session(path)
    x = np.random.default_rng(1).standard_normal((1, k), dtype=np.float32)
    times = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        session.run(["y"], {"x": x})
        if i >= warmup:
            times.append(time.perf_counter() - start)
    median, best = float(np.median(times)), min(times)
    return {
        "gb_s": 4 * k * n / median / 1e9,
        "best_gb_s": 4 * k * n / best / 1e9,
        "median_ms": median * 1e3,
        "runs": runs,
        "k": k,
        "n": n,
    }


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


class FloorRuns:
    """c) the server's own engine in this process (:mod:`tutorial.engine_local`: the same
    code, onnxruntime session options and IO binding as `generate`, no Triton), per-token
    timings; and beside it c0) the plain loop (``session.run`` with numpy in and out each step,
    :func:`tutorial.export.greedy_with_past`). ``one()`` runs each once; the benchmark calls it
    after each b) call, so c), c0) and b) share the same minutes of a shared machine."""

    def __init__(self, model: Path, prompt_ids: list[int], new_tokens: int):
        from tutorial.engine_local import LocalEngine

        self.prompt_ids, self.new_tokens = prompt_ids, new_tokens
        self.engine = LocalEngine(model)
        self.session = export.ort_session(model)
        self.totals: list[float] = []
        self.decode: list[float] = []
        self.tokens = None
        self.plain: dict = {"totals_s": [], "decode_s": [], "tokens": None}
        try:
            self.engine.generate(prompt_ids, 3)  # warm-up
            export.greedy_with_past(self.session, prompt_ids, 3)
        except BaseException:
            self.engine.close()
            raise

    def one(self) -> None:
        times: list[float] = []
        self.tokens = self.engine.generate(self.prompt_ids, self.new_tokens, times)
        self.totals.append(times[-1] - times[0])  # submitted -> last token
        self.decode += [b - a for a, b in zip(times[1:], times[2:])]  # after the first token
        steps: list[float] = []
        self.plain["tokens"] = export.greedy_with_past(
            self.session, self.prompt_ids, self.new_tokens, eos_token_id=None, timings=steps
        )
        self.plain["totals_s"].append(sum(steps))
        self.plain["decode_s"] += steps[1:]

    def close(self) -> dict:
        self.engine.close()
        self.session = None
        return {
            "totals_s": self.totals,
            "decode_s": self.decode,
            "tokens": self.tokens,
            "plain": self.plain,
        }


def tf_peer_child(out_path: Path, new_tokens: int, runs: int) -> None:
    """In the child (``--tf-peer``): transformers' TensorFlow ``generate(do_sample=False)`` on
    notebook 01's model, exactly ``new_tokens`` tokens; writes totals and tokens as JSON."""
    from tutorial.model_source import load_tf_model, load_tokenizer

    paths = common.paths()
    start = time.perf_counter()
    model = load_tf_model(paths["model_dir"])
    load_s = time.perf_counter() - start
    encoded = load_tokenizer(paths["vocab_dir"])(PROMPT, return_tensors="tf")
    eos = model.config.eos_token_id

    def generate(n: int) -> list[int]:
        out = model.generate(
            **encoded,
            do_sample=False,
            min_new_tokens=n,
            max_new_tokens=n,
            pad_token_id=eos,
        )
        return [int(t) for t in out[0].numpy()[encoded["input_ids"].shape[1] :]]

    generate(3)  # warm-up
    totals, tokens = [], []
    for _ in range(runs):
        start = time.perf_counter()
        tokens = generate(new_tokens)
        totals.append(time.perf_counter() - start)
    out_path.write_text(json.dumps({"totals_s": totals, "tokens": tokens, "load_s": load_s}))


def tf_peer(new_tokens: int, runs: int, log_path: Path) -> dict | None:
    """Run :func:`tf_peer_child` in a child process (TensorFlow's memory leaves with it);
    ``None`` (and the log's tail printed) when it fails."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="bench-tf-") as tmp:
        out = Path(tmp) / "tf.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--tf-peer", str(out)]
        cmd += ["--new-tokens", str(new_tokens), "--runs", str(runs)]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0 or not out.exists():
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            print(f"TF peer failed (exit {done.returncode}); {log_path} ends with:\n{tail}")
            return None
        return json.loads(out.read_text())


def generate_call(
    url: str, text: str, n: int, session: Any = None, timeout: float = 60.0
) -> tuple[float, list[int]]:
    from tutorial.client import infer_json

    payload = {
        "inputs": [
            {"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": [text]},
            {"name": "MAX_NEW_TOKENS", "datatype": "INT32", "shape": [1], "data": [n]},
        ]
    }
    start = time.perf_counter()
    body = infer_json(url, "generate", payload, session=session, timeout=timeout)
    elapsed = time.perf_counter() - start
    return elapsed, {o["name"]: o["data"] for o in body["outputs"]}["TOKEN_IDS"]


def concurrency_sweep(
    url: str,
    levels: list[int],
    requests_per_client: int,
    new_tokens: int,
    reference: list[int],
    out: list[dict] | None = None,
) -> list[dict]:
    """C clients at once (threads, one requests.Session each, released together by a
    barrier), each sending ``requests_per_client`` generate calls one after another, for
    each C in ``levels``. Per level: every call's start (epoch s), latency (s) and token
    count, the wall time (first start to last end), and how many calls' TOKEN_IDS differ
    from ``reference``. Each level is appended to ``out`` (returned) as soon as it is done."""
    import threading

    import requests

    def run_level(clients: int) -> list[tuple[float, float, list[int]]]:
        barrier = threading.Barrier(clients)
        lock = threading.Lock()
        calls: list[tuple[float, float, list[int]]] = []
        errors: list[BaseException] = []

        def client() -> None:
            session = requests.Session()
            try:
                barrier.wait()
                for _ in range(requests_per_client):
                    started = time.time()
                    latency, tokens = generate_call(
                        url, PROMPT, new_tokens, session=session, timeout=900
                    )
                    with lock:
                        calls.append((started, latency, tokens))
            except BaseException as exc:  # raised after the level
                with lock:
                    errors.append(exc)
                barrier.abort()
            finally:
                session.close()

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return sorted(calls)

    out = [] if out is None else out
    for clients in levels:
        raw = run_level(clients)
        calls = [
            {"started_at": s, "latency_s": lat, "tokens": len(t), "same": t == reference}
            for s, lat, t in raw
        ]
        wall = max(c["started_at"] + c["latency_s"] for c in calls) - calls[0]["started_at"]
        latencies = [c["latency_s"] for c in calls]
        tokens = sum(c["tokens"] for c in calls)
        level = {
            "clients": clients,
            "calls": calls,
            "wall_s": wall,
            "tokens": tokens,
            "tokens_per_s": tokens / wall,
            "p50_s": pct(latencies, 50),
            "p95_s": pct(latencies, 95),
            "mismatches": sum(not c["same"] for c in calls),
        }
        print(
            f"  {clients:2d} clients x {requests_per_client}: {level['tokens_per_s']:6.1f} tok/s, "
            f"p50 {level['p50_s']:.2f} s, p95 {level['p95_s']:.2f} s, "
            f"{level['mismatches']} token mismatches",
            flush=True,
        )
        for _, _, got in [c for c in raw if c[2] != reference][:3]:
            print(f"    mismatch: got {got[:12]}... expected {reference[:12]}...", flush=True)
        out.append(level)
    return out


def concurrency_runs(
    artifact: Path,
    levels: list[int],
    requests_per_client: int,
    new_tokens: int,
    reference: list[int],
    extra: dict[str, str],
) -> dict:
    """:func:`concurrency_sweep` against the artifact served as OCI serves it, with generate's
    ``inflight_batching`` "off" and "on" (each a copy of the zip, both servers up at once).
    The two alternate level by level (off then on, then on then off at the next level), so a
    slow minute on a shared machine weighs on both sides of a level's ratio, not on one."""
    from tutorial.triton_local import serve_artifact

    out: dict = {}
    servers: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-zip-", dir=common.workdir()) as tmp:
        try:
            for mode in ("off", "on"):
                params = {**extra, "inflight_batching": mode}
                out[mode] = {"params": params, "levels": [], "warmup_equals_reference": None}
                print(
                    f"concurrency, inflight_batching={mode}: writing the artifact copy ...",
                    flush=True,
                )
                try:
                    copy = artifact_with_parameters(
                        artifact, Path(tmp) / f"{mode}.zip", ["generate_stream"], params
                    )
                    servers[mode] = server = serve_artifact(copy)
                    print(
                        f"  served in {server.started_s:.1f} s at {server.url} "
                        f"(load {os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
                    _, first = generate_call(server.url, PROMPT, new_tokens, timeout=900)  # warm-up
                    out[mode]["warmup_equals_reference"] = first == reference
                except Exception as exc:  # the other setting still runs
                    concurrency_failed(out[mode], mode, exc, servers.pop(mode, None))
            for i, clients in enumerate(levels):
                for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):
                    if mode not in servers:
                        continue
                    print(f"  inflight_batching={mode}:", flush=True)
                    try:
                        concurrency_sweep(
                            servers[mode].url,
                            [clients],
                            requests_per_client,
                            new_tokens,
                            reference,
                            out=out[mode]["levels"],
                        )
                    except Exception as exc:  # the rest of the benchmark still reports
                        concurrency_failed(out[mode], mode, exc, servers.pop(mode))
        finally:
            for server in servers.values():
                server.stop()
    return out


def concurrency_failed(result: dict, mode: str, exc: Exception, server: Any) -> None:
    """Record and print a failed concurrency setting; stop its server."""
    result["error"] = f"{type(exc).__name__}: {exc}"
    print(f"  FAILED with inflight_batching={mode}: {result['error']}", flush=True)
    if server is not None:
        print(f"  server log ends with:\n{server.log_tail(15)}", flush=True)
        server.stop()


def server_runs(
    repository: Path, new_tokens: int, runs: int, seed_loop: bool, between: Any = None
) -> dict:
    """a) and b) against a local Triton serving ``repository``; ``between()`` (c) and c0):
    :class:`FloorRuns`) after each b) call, the server idle meanwhile."""
    import requests

    from tutorial.client import next_token_requests
    from tutorial.triton_local import start_local_triton

    out: dict = {}
    with start_local_triton(repository) as server:
        out["runtime"], out["start_s"] = server.runtime, server.started_s
        session = requests.Session()
        if seed_loop:
            next_token_requests(server.url, PROMPT, session=session)  # warm-up
            calls, totals = [], []
            for _ in range(runs):
                times: list[float] = []

                def timed(text: str, times: list[float] = times) -> str:
                    start = time.perf_counter()
                    piece = next_token_requests(server.url, text, session=session)
                    times.append(time.perf_counter() - start)
                    return piece

                out["seed_text"], _ = text_loop(timed, PROMPT, new_tokens)
                calls += times
                totals.append(sum(times))
            out["seed"] = {"call_s": calls, "totals_s": totals}
        generate_call(server.url, PROMPT, 3)  # warm-up
        totals, firsts, tokens = [], [], None
        for _ in range(runs):
            first, _ = generate_call(server.url, PROMPT, 1)
            total, tokens = generate_call(server.url, PROMPT, new_tokens)
            firsts.append(first)
            totals.append(total)
            if between is not None:
                between()
        decode = [(t - f) / (new_tokens - 1) for t, f in zip(totals, firsts)]
        out["generate"] = {
            "totals_s": totals,
            "prefill_s": firsts,
            "decode_s": decode,
            "tokens": tokens,
        }
    return out


def parse_levels(text: str) -> list[int]:
    levels = [int(x) for x in text.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("client counts must be integers >= 1, e.g. 1,2,4")
    return levels


def parse_param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-int8", action="store_true")
    parser.add_argument("--skip-tf", action="store_true", help="no TensorFlow generate() peer")
    parser.add_argument("--skip-concurrency", action="store_true", help="no concurrency table")
    parser.add_argument(
        "--concurrency", type=parse_levels, default=[1, 2, 4, 8, 16], help="client counts: 1,2,4"
    )
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument(
        "--generate-param",
        type=parse_param,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also set this parameter of the engine (generate_stream's config) in both "
        "concurrency runs (e.g. max_batch=8); repeatable",
    )
    parser.add_argument("--tf-peer", type=Path, help=argparse.SUPPRESS)  # the child's output
    args = parser.parse_args()
    n, runs = args.new_tokens, args.runs
    if n < 2:
        parser.error("--new-tokens must be >= 2 (decode time = N tokens minus the first)")
    if args.tf_peer:
        tf_peer_child(args.tf_peer, n, runs)
        return
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show at once under make
    began = time.perf_counter()

    def stage(text: str) -> None:
        # the 1-minute load average: other work on the machine shows in every figure
        load = os.getloadavg()[0]
        print(f"[{time.perf_counter() - began:5.0f} s, load {load:4.1f}] {text}", flush=True)

    paths = common.paths()
    model = common.model_info()
    onnx = common.require_state("onnx", "notebooks/02_export_onnx.ipynb")
    repo_state = common.require_state("repository", "notebooks/03_model_repository.ipynb")
    if repo_state["variant"] != "fp32":
        raise common.TutorialError("Run notebook 03 with MODEL_VARIANT='fp32' before benchmarking.")
    if not args.skip_concurrency and not paths["artifact_zip"].exists():
        raise common.TutorialError(
            f"No {paths['artifact_zip']}: run notebook 03 first, or pass --skip-concurrency."
        )
    from tutorial.model_source import load_tokenizer

    prompt_ids = load_tokenizer(paths["vocab_dir"])(PROMPT)["input_ids"]
    print(f"model: {model['size']} ({model['parameters'] / 1e6:.0f}M), weights: {model['weights']}")
    if model["weights"] != "real":
        print("NOTE:", common.OFFLINE_BANNER)

    stage("memory bandwidth: np.sum over large arrays, and an fp32 matvec on onnxruntime ...")
    bandwidth = memory_bandwidth()
    weight_bytes = {
        "fp32": export.weight_bytes_read_per_step(Path(onnx["with_past"]))["read_per_step"]
    }
    matvec = matvec_bandwidth(weight_bytes["fp32"], int(model.get("n_embd") or 768))
    cores = os.cpu_count()
    print(
        f"read bandwidth, all {cores} cores: matvec {matvec['gb_s']:.1f} GB/s "
        f"([1,{matvec['k']}] x [{matvec['k']},{matvec['n']}] fp32 MatMul on onnxruntime, "
        f"median of {matvec['runs']} runs {matvec['median_ms']:.1f} ms, best run "
        f"{matvec['best_gb_s']:.1f} GB/s)  |  np.sum {bandwidth:.1f} GB/s (best of 5)"
    )

    res: dict = {"fp32": {}, "int8": {}}
    tf = None
    if not args.skip_tf:
        stage("TF generate() peer, in a child process ...")
        tf = tf_peer(n, runs, paths["logs_dir"] / "bench_tf_peer.log")
    stage("a) + b) local Triton fp32, and after each b) call c) the engine in-process, c0) ...")
    floor = FloorRuns(Path(onnx["with_past"]), prompt_ids, n)
    try:
        res["fp32"].update(
            server_runs(paths["repository"], n, runs, seed_loop=True, between=floor.one)
        )
    finally:
        res["fp32"]["floor"] = floor.close()
    variants = ["fp32"]
    if not args.skip_int8 and onnx.get("with_past_int8"):
        variants.append("int8")
        weight_bytes["int8"] = export.weight_bytes_read_per_step(Path(onnx["with_past_int8"]))[
            "read_per_step"
        ]
        from tutorial.repository import assemble_repository

        with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
            repo = Path(tmp) / "model_repository"
            assemble_repository(
                repo,
                paths["vocab_dir"],
                {"gpt2": paths["onnx_last"], "gpt2_with_past": Path(onnx["with_past_int8"])},
            )
            stage("b) local Triton int8, and after each call c) and c0) in-process ...")
            floor = FloorRuns(Path(onnx["with_past_int8"]), prompt_ids, n)
            try:
                res["int8"].update(server_runs(repo, n, runs, seed_loop=False, between=floor.one))
            finally:
                res["int8"]["floor"] = floor.close()
    conc = None
    if not args.skip_concurrency:
        import zipfile

        with zipfile.ZipFile(paths["artifact_zip"]) as zf:
            code = zf.read("model_repository/generate_stream/1/model.py").decode(errors="replace")
        batching_in_code = "inflight_batching" in code
        stage(
            f"concurrency: {args.concurrency} clients x {args.requests_per_client} generate "
            f"calls of {n} tokens, served from {paths['artifact_zip'].name} ..."
        )
        if not batching_in_code:
            print(
                "  NOTE: this artifact's engine (generate_stream/1/model.py) does not read "
                "'inflight_batching': "
                "'on' and 'off' run the same code (rebuild the zip with notebook 03 once "
                "in-flight batching is in)."
            )
        conc = concurrency_runs(
            paths["artifact_zip"],
            args.concurrency,
            args.requests_per_client,
            n,
            res["fp32"]["generate"]["tokens"],
            dict(args.generate_param),
        )
    stage("done measuring")
    report(args, model, prompt_ids, res, variants, weight_bytes, bandwidth, matvec, tf, conc)
    print(f"\nbench_generation: {time.perf_counter() - began:.0f} s in all")


def report(
    args: argparse.Namespace,
    model: dict,
    prompt_ids: list[int],
    res: dict,
    variants: list[str],
    weight_bytes: dict,
    bandwidth: float,
    matvec: dict,
    tf: dict | None,
    conc: dict | None,
) -> None:
    """Print the tables and ratios; write the results CSV and the JSON summary."""
    n, runs = args.new_tokens, args.runs
    paths = common.paths()
    rows: list[dict] = []
    summary: dict = {
        "model": model,
        "new_tokens": n,
        "runs": runs,
        "bandwidth_gb_s": bandwidth,
        "matvec_bandwidth_gb_s": matvec["gb_s"],
        "matvec": matvec,
        "weight_bytes": weight_bytes,
    }
    device = common.machine_metadata()["cpu"]
    seed = res["fp32"]["seed"]
    table = [("a) seed loop, ensemble", seed["call_s"], seed["totals_s"])]
    for v in variants:
        gen, floor = res[v]["generate"], res[v]["floor"]
        table.append((f"b) generate model, {v}", gen["decode_s"], gen["totals_s"]))
        table.append((f"c) in-process floor, {v}", floor["decode_s"], floor["totals_s"]))
        plain = floor["plain"]
        table.append((f"c0) plain ort loop, {v}", plain["decode_s"], plain["totals_s"]))
    if tf:
        table.append(("d) TF generate(), fp32", [t / n for t in tf["totals_s"]], tf["totals_s"]))
    print(f"\n{n} new tokens from a {len(prompt_ids)}-token prompt, {runs} runs each")
    print(f"{'method':30} {'per token p50':>14} {'p95':>8} {'total p50':>10}")
    for name, per_token, totals in table:
        print(
            f"{name:30} {pct(per_token, 50) * 1e3:11.1f} ms {pct(per_token, 95) * 1e3:5.1f} ms {pct(totals, 50):8.2f} s"
        )
        summary[name] = {
            "per_token_ms_p50": pct(per_token, 50) * 1e3,
            "per_token_ms_p95": pct(per_token, 95) * 1e3,
            "total_s_p50": pct(totals, 50),
        }
    print(
        "(per token: a) one ensemble call; b) (total - a 1-token call) / (N-1); c) the gaps "
        "between tokens of the server's engine run in this process; c0) each session.run of a "
        "plain loop (numpy in and out); d) total / N, prefill included)"
    )
    print(
        f"\nread bandwidth, all {os.cpu_count()} cores: {matvec['gb_s']:.1f} GB/s fp32 matvec on "
        f"onnxruntime (the floors below use it) | {bandwidth:.1f} GB/s np.sum"
    )
    for variant in variants:
        floor_ms = weight_bytes[variant] / (matvec["gb_s"] * 1e9) * 1e3
        sum_ms = weight_bytes[variant] / (bandwidth * 1e9) * 1e3
        summary[f"weight_read_floor_ms_{variant}"] = floor_ms
        summary[f"weight_read_floor_ms_{variant}_np_sum"] = sum_ms
        print(
            f"weight-read floor {variant}: {weight_bytes[variant] / 1e6:.0f} MB read per step (all weights but the gathered embedding tables) / {matvec['gb_s']:.1f} GB/s (matvec) = {floor_ms:.1f} ms per token"
        )
        print(f"{'':19}{'(np.sum':>8} {bandwidth:.1f} GB/s: {sum_ms:.1f} ms per token)")

    def total(name: str) -> float:
        return summary[name]["total_s_p50"]

    seed_name, tf_name = "a) seed loop, ensemble", "d) TF generate(), fp32"
    # keys: the letters of the table (a/b fp32 = seed loop total / generate fp32 total), as
    # docs/performance.md's tables name them; what each is, in the printout
    ratios: dict[str, float] = {}
    what: dict[str, str] = {}

    def ratio(key: str, text: str, value: float) -> None:
        ratios[key], what[key] = value, text

    for v in variants:
        gen, floor = f"b) generate model, {v}", f"c) in-process floor, {v}"
        ratio(f"a/b {v}", f"seed loop / generate {v}", total(seed_name) / total(gen))
        if tf:
            ratio(f"d/b {v}", f"TF generate / generate {v}", total(tf_name) / total(gen))
        ratio(f"b/c {v}", f"generate {v} / in-process ort {v}", total(gen) / total(floor))
        ratio(
            f"c0/c {v}",
            f"plain ort loop {v} / the engine in-process {v}",
            total(f"c0) plain ort loop, {v}") / total(floor),
        )
        if tf:
            ratio(f"d/c {v}", f"TF generate / in-process ort {v}", total(tf_name) / total(floor))
        per_token = summary[floor]["per_token_ms_p50"]
        ratio(
            f"c {v} / weight-read floor",
            f"in-process ort {v} per token / floor (matvec)",
            per_token / summary[f"weight_read_floor_ms_{v}"],
        )
        ratio(
            f"c {v} / weight-read floor (np.sum)",
            f"in-process ort {v} per token / floor (np.sum)",
            per_token / summary[f"weight_read_floor_ms_{v}_np_sum"],
        )
    if "int8" in variants:
        for key, name in (("generate", "b) generate model"), ("floor", "c) in-process floor")):
            ratio(
                f"fp32/int8 ({key})",
                f"{name[0]}) fp32 / int8",
                total(f"{name}, fp32") / total(f"{name}, int8"),
            )
        fp32_tokens, int8_tokens = res["fp32"]["floor"]["tokens"], res["int8"]["floor"]["tokens"]
        agree = sum(a == b for a, b in zip(fp32_tokens, int8_tokens))
        summary["int8_agreement"] = f"{agree}/{len(fp32_tokens)}"
        print(
            f"int8 greedy tokens agreeing with fp32: {agree}/{len(fp32_tokens)} (random weights: says little)"
        )
    same = res["fp32"]["generate"]["tokens"] == res["fp32"]["floor"]["tokens"]
    for v in variants:
        if res[v]["floor"]["plain"]["tokens"] != res[v]["floor"]["tokens"]:
            raise SystemExit(f"{v}: the plain loop's tokens differ from the engine's")
    summary["generate_equals_floor_tokens"] = same
    print(f"generate (server) tokens == in-process onnxruntime tokens: {same}")
    if tf:
        ort_tokens = res["fp32"]["floor"]["tokens"]
        agree = sum(a == b for a, b in zip(tf["tokens"], ort_tokens))
        summary["tf_equals_floor_tokens"] = tf["tokens"] == ort_tokens
        summary["tf_agreement"] = f"{agree}/{len(ort_tokens)}"
        summary["tf_load_s"] = tf["load_s"]
        print(
            f"TF generate() tokens == in-process onnxruntime tokens: {tf['tokens'] == ort_tokens} "
            f"({agree}/{len(ort_tokens)} agree)"
        )
        if 50256 in ort_tokens[:-1]:
            print("  (the onnxruntime loop chose <|endoftext|>, which min_new_tokens forbids TF)")
    elif not args.skip_tf:
        print("TF generate() peer: failed, see logs/bench_tf_peer.log")
    print("\nratios (totals for the same number of tokens; > 1: the first is slower):")
    for key, value in ratios.items():
        print(f"  {key:36} {value:6.2f}   {what[key]}")
    summary["ratios"] = ratios
    summary["server_start_s"] = res["fp32"]["start_s"]
    summary["runtime"] = res["fp32"]["runtime"]

    base = {
        "model_variant": "fp32",
        "prompt_tokens": len(prompt_ids),
        "device_name": device,
        "shape": "local",
        "sweep": "bench_generation",
    }
    for i, t in enumerate(seed["call_s"]):
        rows.append(
            {
                **base,
                "target": "local-cpu",
                "method": "seed_client_loop",
                "new_tokens": 1,
                "iteration": i,
                "latency_ms": t * 1e3,
            }
        )
    for v in variants:
        g, f = res[v]["generate"], res[v]["floor"]
        for i, t in enumerate(g["totals_s"]):
            rows.append(
                {
                    **base,
                    "model_variant": v,
                    "target": "local-cpu",
                    "method": "generate",
                    "new_tokens": n,
                    "iteration": i,
                    "latency_ms": t * 1e3,
                }
            )
        for i, t in enumerate(g["prefill_s"]):
            rows.append(
                {
                    **base,
                    "model_variant": v,
                    "target": "local-cpu",
                    "method": "prefill",
                    "new_tokens": 1,
                    "iteration": i,
                    "latency_ms": t * 1e3,
                    "notes": "generate with MAX_NEW_TOKENS=1",
                }
            )
        for i, t in enumerate(f["decode_s"]):
            rows.append(
                {
                    **base,
                    "model_variant": v,
                    "target": "inprocess-cpu",
                    "method": "decode_token",
                    "new_tokens": 1,
                    "iteration": i,
                    "latency_ms": t * 1e3,
                    "notes": "the server's engine in this process, no Triton",
                }
            )
        for i, t in enumerate(f["totals_s"]):
            rows.append(
                {
                    **base,
                    "model_variant": v,
                    "target": "inprocess-cpu",
                    "method": "generate",
                    "new_tokens": n,
                    "iteration": i,
                    "latency_ms": t * 1e3,
                }
            )
    if tf:
        for i, t in enumerate(tf["totals_s"]):
            rows.append(
                {
                    **base,
                    "target": "inprocess-cpu",
                    "method": "tf_generate",
                    "new_tokens": n,
                    "iteration": i,
                    "latency_ms": t * 1e3,
                    "notes": "transformers TF generate(do_sample=False), child process",
                }
            )
    if conc:
        rows += concurrency_report(conc, args, base, summary)
    out_dir = paths["results_dir"]
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = results.write_results(rows, out_dir / "bench_generation.csv")
    summary["machine"] = common.machine_metadata()
    summary["weights"] = model["weights"]
    (out_dir / "bench_generation.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nwrote {csv_path} and {out_dir / 'bench_generation.json'}")


def concurrency_report(conc: dict, args: argparse.Namespace, base: dict, summary: dict) -> list:
    """Print the concurrency table (batching off against on); return its results rows."""
    n, per_client = args.new_tokens, args.requests_per_client
    print(
        f"\nconcurrent generate calls ({n} tokens each, {per_client} per client, all clients "
        "started together; fp32 artifact served as OCI serves it; off and on alternate level "
        "by level)"
    )
    extra = {k: v for k, v in conc["off"]["params"].items() if k != "inflight_batching"}
    if extra:
        print(f"generate parameters in both runs: {extra}")
    print(
        f"{'clients':>7} | {'off tok/s':>9} | {'off p50':>8} | {'off p95':>8} | "
        f"{'on tok/s':>9} | {'on p50':>8} | {'on p95':>8} | {'on/off tok/s':>12}"
    )
    by_clients = {mode: {lv["clients"]: lv for lv in conc[mode]["levels"]} for mode in conc}
    table = []
    for clients in sorted(set(by_clients["off"]) | set(by_clients["on"])):
        off, on = by_clients["off"].get(clients), by_clients["on"].get(clients)
        cells = []
        for level in (off, on):
            if level is None:
                cells += [f"{'-':>9}", f"{'-':>8}", f"{'-':>8}"]
            else:
                cells += [
                    f"{level['tokens_per_s']:9.1f}",
                    f"{level['p50_s']:7.2f}s",
                    f"{level['p95_s']:7.2f}s",
                ]
        speedup = on["tokens_per_s"] / off["tokens_per_s"] if off and on else None
        cells.append(f"{speedup:12.2f}" if speedup else f"{'-':>12}")
        print(f"{clients:7d} | " + " | ".join(cells))
        row: dict = {"clients": clients, "on_off_tokens_per_s": speedup}
        for mode, level in (("off", off), ("on", on)):
            for key in ("tokens_per_s", "p50_s", "p95_s", "wall_s", "mismatches"):
                row[f"{mode}_{key}"] = level[key] if level else None
        table.append(row)
    for mode in ("off", "on"):
        if conc[mode].get("error"):
            print(f"inflight_batching={mode} FAILED: {conc[mode]['error']}")
    mismatches = {mode: sum(lv["mismatches"] for lv in conc[mode]["levels"]) for mode in conc}
    calls = {mode: sum(len(lv["calls"]) for lv in conc[mode]["levels"]) for mode in conc}
    for mode in ("off", "on"):
        print(
            f"inflight_batching={mode}: {mismatches[mode]}/{calls[mode]} responses' TOKEN_IDS "
            f"differ from the single-request tokens (warm-up request equal: "
            f"{conc[mode]['warmup_equals_reference']})"
        )
    summary["concurrency"] = {
        "new_tokens": n,
        "requests_per_client": per_client,
        "params": {mode: conc[mode]["params"] for mode in conc},
        "errors": {mode: conc[mode].get("error") for mode in conc},
        "table": table,
        "mismatches": mismatches,
        "calls": calls,
    }
    rows = []
    for mode in ("off", "on"):
        for level in conc[mode]["levels"]:
            for i, call in enumerate(level["calls"]):
                rows.append(
                    {
                        **base,
                        "target": "local-cpu",
                        "method": "generate_concurrent",
                        "sweep": f"concurrency_batching_{mode}",
                        "new_tokens": call["tokens"],
                        "concurrency": level["clients"],
                        "iteration": i,
                        "started_at": call["started_at"],
                        "latency_ms": call["latency_s"] * 1e3,
                        "notes": f"inflight_batching={mode}, {level['clients']} clients x "
                        f"{per_client} requests"
                        + ("" if call["same"] else ", TOKEN_IDS differ from single request"),
                    }
                )
    return rows


if __name__ == "__main__":
    main()

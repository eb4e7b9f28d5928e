"""Benchmark: the seed's client loop against server-side generation and the in-process floor.

All in one run, on one machine, on the model notebooks 01-03 left in the work folder:
  a) seed:      the seed's client loop (fixed) through `ensemble_model`: one HTTP call per token
  b) generate:  the server-side `generate` model: one call for all tokens, KV cache on the server
  c) floor:     the same greedy KV-cache loop on onnxruntime in this process, no server
  d) b and c with the int8 model
It prints per-token p50/p95, the total for N tokens, the ratios a/b, b/c and fp32/int8, the
machine's all-core memory read bandwidth and the model's weight bytes (the decode floor), and
writes rows to <workdir>/results/bench_generation.csv (tutorial.results schema, read by
notebook 07) and a summary JSON beside it.

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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tutorial import common, export, results  # noqa: E402
from tutorial.client import text_loop  # noqa: E402

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


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def floor_run(model: Path, prompt_ids: list[int], new_tokens: int, runs: int) -> dict:
    """c) greedy with the KV cache on onnxruntime in-process; per-step timings."""
    session = export.ort_session(model)
    export.greedy_with_past(session, prompt_ids, 3)  # warm-up
    totals, decode, tokens = [], [], None
    for _ in range(runs):
        steps: list[float] = []
        tokens = export.greedy_with_past(
            session, prompt_ids, new_tokens, eos_token_id=None, timings=steps
        )
        totals.append(sum(steps))
        decode += steps[1:]
    return {"totals_s": totals, "decode_s": decode, "tokens": tokens}


def generate_call(url: str, text: str, n: int) -> tuple[float, list[int]]:
    from tutorial.client import infer_json

    payload = {
        "inputs": [
            {"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": [text]},
            {"name": "MAX_NEW_TOKENS", "datatype": "INT32", "shape": [1], "data": [n]},
        ]
    }
    start = time.perf_counter()
    body = infer_json(url, "generate", payload)
    elapsed = time.perf_counter() - start
    return elapsed, {o["name"]: o["data"] for o in body["outputs"]}["TOKEN_IDS"]


def server_runs(repository: Path, new_tokens: int, runs: int, seed_loop: bool) -> dict:
    """a) and b) against a local Triton serving ``repository``."""
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
        decode = [(t - f) / (new_tokens - 1) for t, f in zip(totals, firsts)]
        out["generate"] = {
            "totals_s": totals,
            "prefill_s": firsts,
            "decode_s": decode,
            "tokens": tokens,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-int8", action="store_true")
    args = parser.parse_args()
    n, runs = args.new_tokens, args.runs

    paths = common.paths()
    model = common.model_info()
    onnx = common.require_state("onnx", "notebooks/02_export_onnx.ipynb")
    repo_state = common.require_state("repository", "notebooks/03_model_repository.ipynb")
    if repo_state["variant"] != "fp32":
        raise common.TutorialError("Run notebook 03 with MODEL_VARIANT='fp32' before benchmarking.")
    from tutorial.model_source import load_tokenizer

    prompt_ids = load_tokenizer(paths["vocab_dir"])(PROMPT)["input_ids"]
    print(f"model: {model['size']} ({model['parameters'] / 1e6:.0f}M), weights: {model['weights']}")
    if model["weights"] != "real":
        print("NOTE:", common.OFFLINE_BANNER)

    bandwidth = memory_bandwidth()
    weight_bytes = {
        "fp32": export.weight_bytes_read_per_step(Path(onnx["with_past"]))["read_per_step"]
    }
    print(f"memory read bandwidth, all {os.cpu_count()} cores: {bandwidth:.1f} GB/s")

    res: dict = {"fp32": {}, "int8": {}}
    print("c) floor fp32 ...", flush=True)
    res["fp32"]["floor"] = floor_run(Path(onnx["with_past"]), prompt_ids, n, runs)
    print("a) + b) local Triton fp32 ...", flush=True)
    res["fp32"].update(server_runs(paths["repository"], n, runs, seed_loop=True))
    variants = ["fp32"]
    if not args.skip_int8 and onnx.get("with_past_int8"):
        variants.append("int8")
        weight_bytes["int8"] = export.weight_bytes_read_per_step(Path(onnx["with_past_int8"]))[
            "read_per_step"
        ]
        print("c) floor int8 ...", flush=True)
        res["int8"]["floor"] = floor_run(Path(onnx["with_past_int8"]), prompt_ids, n, runs)
        from tutorial.repository import assemble_repository

        with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
            repo = Path(tmp) / "model_repository"
            assemble_repository(
                repo,
                paths["vocab_dir"],
                {"gpt2": paths["onnx_last"], "gpt2_with_past": Path(onnx["with_past_int8"])},
            )
            print("b) local Triton int8 ...", flush=True)
            res["int8"].update(server_runs(repo, n, runs, seed_loop=False))

    # ---- report ----
    rows, summary = [], {"model": model, "bandwidth_gb_s": bandwidth, "weight_bytes": weight_bytes}
    device = common.machine_metadata()["cpu"]
    seed = res["fp32"]["seed"]
    table = [("a) seed loop, ensemble", "fp32", seed["call_s"], seed["totals_s"])]
    for v in variants:
        table.append(
            (
                f"b) generate model, {v}",
                v,
                res[v]["generate"]["decode_s"],
                res[v]["generate"]["totals_s"],
            )
        )
        table.append(
            (
                f"c) in-process floor, {v}",
                v,
                res[v]["floor"]["decode_s"],
                res[v]["floor"]["totals_s"],
            )
        )
    print(f"\n{n} new tokens from a {len(prompt_ids)}-token prompt, {runs} runs each")
    print(f"{'method':30} {'per token p50':>14} {'p95':>8} {'total p50':>10}")
    for name, _variant, per_token, totals in table:
        print(
            f"{name:30} {pct(per_token, 50) * 1e3:11.1f} ms {pct(per_token, 95) * 1e3:5.1f} ms {pct(totals, 50):8.2f} s"
        )
        summary[name] = {
            "per_token_ms_p50": pct(per_token, 50) * 1e3,
            "per_token_ms_p95": pct(per_token, 95) * 1e3,
            "total_s_p50": pct(totals, 50),
        }
    for variant in variants:
        floor_ms = weight_bytes[variant] / (bandwidth * 1e9) * 1e3
        summary[f"weight_read_floor_ms_{variant}"] = floor_ms
        print(
            f"weight-read floor {variant}: {weight_bytes[variant] / 1e6:.0f} MB read per step (all weights but the gathered embedding tables) / {bandwidth:.1f} GB/s = {floor_ms:.1f} ms per token"
        )

    def total(name: str) -> float:
        return summary[name]["total_s_p50"]

    ratios = {
        "a/b fp32": total("a) seed loop, ensemble") / total("b) generate model, fp32"),
        "b/c fp32": total("b) generate model, fp32") / total("c) in-process floor, fp32"),
        "c fp32 / weight-read floor": summary["c) in-process floor, fp32"]["per_token_ms_p50"]
        / summary["weight_read_floor_ms_fp32"],
    }
    if "int8" in variants:
        ratios["a/b int8"] = total("a) seed loop, ensemble") / total("b) generate model, int8")
        ratios["b/c int8"] = total("b) generate model, int8") / total("c) in-process floor, int8")
        ratios["fp32/int8 (generate)"] = total("b) generate model, fp32") / total(
            "b) generate model, int8"
        )
        ratios["fp32/int8 (floor)"] = total("c) in-process floor, fp32") / total(
            "c) in-process floor, int8"
        )
        fp32_tokens, int8_tokens = res["fp32"]["floor"]["tokens"], res["int8"]["floor"]["tokens"]
        agree = sum(a == b for a, b in zip(fp32_tokens, int8_tokens))
        summary["int8_agreement"] = f"{agree}/{len(fp32_tokens)}"
        print(
            f"int8 greedy tokens agreeing with fp32: {agree}/{len(fp32_tokens)} (random weights: says little)"
        )
    same = res["fp32"]["generate"]["tokens"] == res["fp32"]["floor"]["tokens"]
    summary["generate_equals_floor_tokens"] = same
    print(f"generate (server) tokens == floor (in-process) tokens: {same}")
    print("\nratios (totals for the same number of tokens):")
    for key, value in ratios.items():
        print(f"  {key:28} {value:6.2f}")
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
    out_dir = paths["results_dir"]
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = results.write_results(rows, out_dir / "bench_generation.csv")
    summary["machine"] = common.machine_metadata()
    summary["weights"] = model["weights"]
    (out_dir / "bench_generation.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nwrote {csv_path} and {out_dir / 'bench_generation.json'}")


if __name__ == "__main__":
    main()

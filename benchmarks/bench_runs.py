"""Several `make bench` runs side by side, as Markdown (the tables in docs/performance.md).

    python benchmarks/bench_runs.py run1.json run2.json run3.json

Each file is a ``results/bench_generation.json`` that ``benchmarks/bench_generation.py`` wrote
(copy it away after each run: the next run overwrites it). Prints, for each run, the per-token
p50 of every method, the floors, the ratios and the concurrency table's tokens per second, so
the figures in docs/performance.md come from the runs' own output, not from copying by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

METHODS = (
    ("a) seed loop, ensemble", "a) the original sample's loop"),
    ("b) generate model, fp32", "b) `generate`, fp32"),
    ("c) in-process floor, fp32", "c) the engine in-process, fp32"),
    ("c0) plain ort loop, fp32", "c0) a plain onnxruntime loop, fp32"),
    ("b) generate model, int8", "b) `generate`, int8"),
    ("c) in-process floor, int8", "c) the engine in-process, int8"),
    ("c0) plain ort loop, int8", "c0) a plain onnxruntime loop, int8"),
    ("d) TF generate(), fp32", "d) transformers' TF `generate()`, fp32"),
)
RATIOS = ("a/b", "d/b", "b/c", "c0/c", "c/floor", "fp32/int8")


def load(path: Path) -> dict[str, Any]:
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        sys.exit(f"{path}: not a bench_generation.json ({err})")
    missing = [k for k in ("matvec_bandwidth_gb_s", "ratios", "machine") if k not in summary]
    if missing:
        sys.exit(f"{path}: not a bench_generation.json (no {', '.join(missing)})")
    return summary


def ratio(summary: dict[str, Any], name: str) -> list[str]:
    """The run's ratios whose key starts with ``name`` (fp32 and int8), as 'fp32 x, int8 y'."""
    found = []
    for key, value in summary["ratios"].items():
        head = key.split(" ", 1)
        if name == "c/floor" and key.startswith("c ") and key.endswith("weight-read floor"):
            found.append(f"{key.split()[1]} {value:.2f}")
        elif head[0] == name:
            found.append(f"{head[1] if len(head) > 1 else ''} {value:.2f}".strip())
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="bench_generation.json files")
    parser.add_argument(
        "--latency", type=int, metavar="N", help="also run N's per-request p50/p95 (1 = first)"
    )
    args = parser.parse_args()
    runs = [load(p) for p in args.runs]
    if args.latency is not None and not 1 <= args.latency <= len(runs):
        sys.exit(f"--latency {args.latency}: there are runs 1 to {len(runs)}")
    tokens = {r.get("new_tokens") for r in runs}
    if len(tokens) != 1:
        sys.exit(f"the runs made different numbers of tokens ({sorted(map(str, tokens))})")
    head = " | ".join(f"run {i + 1}" for i in range(len(runs)))
    print(f"| {tokens.pop()} new tokens, per token p50 | {head} |")
    print("|---" * (len(runs) + 1) + "|")
    for key, label in METHODS:
        cells = [f"{r[key]['per_token_ms_p50']:.1f} ms" if key in r else "-" for r in runs]
        print(f"| {label} | " + " | ".join(cells) + " |")
    cells = [f"{r['matvec_bandwidth_gb_s']:.1f} GB/s ({r['bandwidth_gb_s']:.1f})" for r in runs]
    print("| read bandwidth: matvec (`np.sum`) | " + " | ".join(cells) + " |")
    for variant in ("fp32", "int8"):
        key = f"weight_read_floor_ms_{variant}"
        cells = [f"{r[key]:.1f} ms" if key in r else "-" for r in runs]
        print(f"| floor {variant} (matvec) | " + " | ".join(cells) + " |")
    for name in RATIOS:
        cells = [", ".join(ratio(r, name)) or "-" for r in runs]
        print(f"| ratio {name} | " + " | ".join(cells) + " |")
    cells = [f"{r.get('machine', {}).get('timestamp', '?')}" for r in runs]
    print("| when (UTC) | " + " | ".join(cells) + " |")

    print()
    print(
        f"| clients | {' | '.join(f'run {i + 1}: off / on tok/s (on/off)' for i in range(len(runs)))} |"
    )
    print("|---" * (len(runs) + 1) + "|")
    tables = [
        {row["clients"]: row for row in r.get("concurrency", {}).get("table", [])} for r in runs
    ]
    for clients in sorted(set().union(*tables)):
        cells = []
        for table in tables:
            row = table.get(clients)
            if row is None or row["off_tokens_per_s"] is None or row["on_tokens_per_s"] is None:
                cells.append("-")
                continue
            cells.append(
                f"{row['off_tokens_per_s']:.1f} / {row['on_tokens_per_s']:.1f} "
                f"({row['on_off_tokens_per_s']:.2f})"
            )
        print(f"| {clients} | " + " | ".join(cells) + " |")
    cells = []
    for r in runs:
        conc = r.get("concurrency", {})
        bad, calls = sum(conc.get("mismatches", {}).values()), sum(conc.get("calls", {}).values())
        cells.append(f"{bad} of {calls}")
    print("| responses off the single-request tokens | " + " | ".join(cells) + " |")
    if args.latency is not None:
        latency_table(runs[args.latency - 1], args.latency)


def latency_table(run: dict[str, Any], number: int) -> None:
    """Run ``number``'s concurrency table with each request's latency p50 and p95."""
    print(f"\nRun {number}, each request's latency:\n")
    print("| clients | off: tok/s | p50 | p95 | on: tok/s | p50 | p95 | on/off |")
    print("|---" * 8 + "|")
    for row in run.get("concurrency", {}).get("table", []):
        cells = [str(row["clients"])]
        for mode in ("off", "on"):
            if row[f"{mode}_tokens_per_s"] is None:
                cells += ["-", "-", "-"]
                continue
            cells.append(f"{row[f'{mode}_tokens_per_s']:.1f}")
            cells += [f"{row[f'{mode}_{q}_s']:.2f} s" for q in ("p50", "p95")]
        speedup = row["on_off_tokens_per_s"]
        cells.append(f"{speedup:.2f}" if speedup else "-")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

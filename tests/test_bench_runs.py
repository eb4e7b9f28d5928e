"""benchmarks/bench_runs.py: make bench runs side by side (the README's Performance tables)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_runs.py"


def summary(scale: float, new_tokens: int = 50) -> dict:
    """A bench_generation.json's shape, with made-up figures (this tests the formatting)."""
    methods = ("a) seed loop, ensemble", "b) generate model, fp32", "c) in-process floor, fp32")
    return {
        "new_tokens": new_tokens,
        "matvec_bandwidth_gb_s": 40.0 / scale,
        "bandwidth_gb_s": 50.0 / scale,
        "weight_read_floor_ms_fp32": 12.0 * scale,
        **{m: {"per_token_ms_p50": 10.0 * (i + 1) * scale} for i, m in enumerate(methods)},
        "ratios": {"a/b fp32": 3.0, "b/c fp32": 1.1, "c fp32 / weight-read floor": 1.25},
        "machine": {"timestamp": f"2026-11-25T0{int(scale)}:00:00Z"},
        "concurrency": {
            "table": [
                {
                    "clients": 8,
                    "on_off_tokens_per_s": 4.0,
                    **{f"off_{k}": v for k, v in (("tokens_per_s", 50.0), ("p50_s", 6.0))},
                    **{f"on_{k}": v for k, v in (("tokens_per_s", 200.0), ("p50_s", 1.5))},
                    "off_p95_s": 7.0,
                    "on_p95_s": 1.8,
                }
            ],
            "mismatches": {"off": 0, "on": 1},
            "calls": {"off": 16, "on": 16},
        },
    }


def run(tmp_path: Path, *summaries: dict, args: tuple = ()) -> subprocess.CompletedProcess:
    paths = []
    for i, s in enumerate(summaries):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(s))
    cmd = [sys.executable, str(SCRIPT), *map(str, paths), *args]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_bench_runs_prints_each_runs_figures_side_by_side(tmp_path):
    out = run(tmp_path, summary(1), summary(2), args=("--latency", "2"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "| 50 new tokens, per token p50 | run 1 | run 2 |" in lines
    assert "| b) `generate`, fp32 | 20.0 ms | 40.0 ms |" in lines
    assert "| b) `generate`, int8 | - | - |" in lines  # absent from both runs
    assert "| read bandwidth: matvec (`np.sum`) | 40.0 GB/s (50.0) | 20.0 GB/s (25.0) |" in lines
    assert "| ratio c/floor | fp32 1.25 | fp32 1.25 |" in lines
    assert "| 8 | 50.0 / 200.0 (4.00) | 50.0 / 200.0 (4.00) |" in lines
    assert "| responses off the single-request tokens | 1 of 32 | 1 of 32 |" in lines
    assert "| 8 | 50.0 | 6.00 s | 7.00 s | 200.0 | 1.50 s | 1.80 s | 4.00 |" in lines


def test_bench_runs_refuses_runs_it_cannot_compare(tmp_path):
    out = run(tmp_path, summary(1), summary(1, new_tokens=20))
    assert out.returncode != 0 and "different numbers of tokens" in out.stderr
    out = run(tmp_path, {"new_tokens": 50})
    assert out.returncode != 0 and "not a bench_generation.json" in out.stderr
    out = run(tmp_path, summary(1), args=("--latency", "2"))
    assert out.returncode != 0 and "there are runs 1 to 1" in out.stderr

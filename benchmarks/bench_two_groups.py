"""What running a long prompt's chunk in the decode step's call saves (fp32): the engine's
``SessionRunner`` on the file the repository serves (:func:`tutorial.onnx_surgery.two_groups`),
a decode step of ``rows`` rows and a chunk of one prompt run apart (two calls, as the engine did
before, and still does for int8) and together (one call), in alternating rounds.

    python benchmarks/bench_two_groups.py                 # notebook 02's fp32 step model
    python benchmarks/bench_two_groups.py --rounds 5 --steps 10

Per case it prints the median over rounds of each round's median time: the decode step alone,
the chunk alone, their sum (a turn with a chunk run apart), the one call, and each turn over the
decode step alone: what a decoding request's inter-token gap becomes in a turn with a chunk
(the issue's goal for its ITL p99: at most 2x its p50 without a long prompt). The caches are
random: times do not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tutorial.common import TutorialError, paths, workdir  # noqa: E402
from tutorial.engine_local import engine_copy, load_engine_module  # noqa: E402
from tutorial.export import ort_session  # noqa: E402

# (decoding rows, their cached tokens, chunk tokens, the chunk's prompt tokens cached before it)
CASES = [(7, 100, 8, 982), (7, 100, 16, 974), (7, 100, 32, 958), (15, 100, 16, 974)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="an fp32 step model (default: notebook 02's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="0: onnxruntime's default")
    args = parser.parse_args()
    state = json.loads((workdir() / "state.json").read_text())
    model = Path(args.model or state["onnx"]["with_past"])
    past_dims = next(i.shape for i in ort_session(model).get_inputs() if i.name == "past")
    n_layer, n_head, head_dim = past_dims[0], past_dims[3], past_dims[5]
    module = load_engine_module()
    rng = np.random.default_rng(0)
    results = []
    with tempfile.TemporaryDirectory(prefix="two-groups-", dir=workdir()) as folder:
        runner = module.SessionRunner(engine_copy(model, Path(folder)), args.threads, "cpu")
        runner.open(gpu_present=False)
        if not runner.two_groups:
            raise TutorialError(f"{model}: its engine file has no second group (int8?)")

        def cache(rows, length):
            past = rng.standard_normal((n_layer, 2, rows, n_head, length, head_dim))
            return runner.split_past(past.astype(np.float32))

        for rows, length, chunk, cached in CASES:
            ids = rng.integers(0, 50000, (rows, 1)).astype(np.int32)
            mask = np.ones((rows, length + 1), np.int32)
            past = cache(rows, length)
            chunk_ids = rng.integers(0, 50000, (1, chunk)).astype(np.int32)
            chunk_mask = np.ones((1, cached + chunk), np.int32)
            chunk_past = cache(1, cached)
            chunk_args = (chunk_ids, chunk_mask, chunk_past)
            calls = {  # runner.run's arguments
                "decode": (ids, mask, past, None),
                "chunk": (*chunk_args, None),
                "together": (ids, mask, past, chunk_args),
            }
            rounds = {name: [] for name in calls}
            for _ in range(args.rounds):  # alternating, so a slow minute weighs on all
                for name, (a, b, c, d) in calls.items():
                    runner.run(a, b, c, chunk=d)  # warm-up
                    times = []
                    for _ in range(args.steps):
                        start = time.perf_counter()
                        runner.run(a, b, c, chunk=d)
                        times.append(time.perf_counter() - start)
                    rounds[name].append(float(np.median(times)))
            ms = {name: 1e3 * float(np.median(r)) for name, r in rounds.items()}
            apart = ms["decode"] + ms["chunk"]
            row = {
                "case": f"{rows} rows decoding over {length} cached; chunk of {chunk} after {cached}",
                "decode_ms": round(ms["decode"], 2),
                "chunk_ms": round(ms["chunk"], 2),
                "apart_ms": round(apart, 2),
                "together_ms": round(ms["together"], 2),
                "apart_over_decode": round(apart / ms["decode"], 2),
                "together_over_decode": round(ms["together"] / ms["decode"], 2),
                "rounds_ms": {n: [round(1e3 * t, 2) for t in r] for n, r in rounds.items()},
            }
            results.append(row)
            print(
                f"{row['case']:58} decode {ms['decode']:6.1f}  chunk {ms['chunk']:6.1f}  "
                f"apart {apart:6.1f} ({row['apart_over_decode']:.2f}x)  "
                f"together {ms['together']:6.1f} ms ({row['together_over_decode']:.2f}x)",
                flush=True,
            )
    out = paths()["results_dir"] / "bench_two_groups.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "model": str(model),
                "weights": state["onnx"].get("weights"),
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

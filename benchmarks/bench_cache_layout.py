"""What the engine's file saves: the engine's step on the exported file (one ``past`` tensor)
against the file the repository serves (its cache per layer and, in fp32, the LM head on the
last position only, a second group of rows and a smaller graph:
:func:`tutorial.onnx_surgery.engine_step`), in alternating rounds; in fp32 also that file with
its graph's nodes left as exported (``engine_step(simplify=False)``), to show what the smaller
graph alone saves.

    python benchmarks/bench_cache_layout.py                  # fp32 and int8 from notebook 02
    python benchmarks/bench_cache_layout.py --rounds 5 --steps 10

Each case runs the engine's own ``SessionRunner`` (``generate_stream/1/model.py``: its session
options and IO binding) on a cache of ``rows`` x ``length`` tokens: decode steps (1 new token a
row, the cache fed back each step as the engine does) and prefill chunks (one row, ``chunk``
tokens after ``length`` cached: the chunked prefill of a long prompt) and prefills (prompts
with nothing cached). Per case it prints the
median over rounds of each round's median step time for each file, and the ratios. The cache
here is random: times do not depend on its values.
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

from tutorial.common import paths, workdir  # noqa: E402
from tutorial.engine_local import engine_copy, load_engine_module  # noqa: E402
from tutorial.export import ort_session  # noqa: E402

DECODE = [(1, 62), (8, 62), (8, 150), (16, 150), (16, 512)]  # (rows, cached tokens)
CHUNKS = [(16, 974), (32, 958)]  # (chunk tokens, cached tokens), one row
PREFILLS = [(1, 12), (8, 12), (1, 128)]  # (rows, prompt tokens), nothing cached


def step_times(runner, past, rows, new, length, steps, rng):
    """Median seconds of ``steps`` runs of ``new`` tokens on ``rows`` rows after ``length``
    cached tokens; decode steps (new 1) feed each step's cache to the next."""
    ids = rng.integers(0, 50000, (rows, new)).astype(np.int32)
    cache = runner.split_past(past)
    times = []
    for _ in range(steps + 1):  # the first one warms up
        mask = np.ones((rows, length + new), np.int32)
        start = time.perf_counter()
        _, present = runner.run(ids, mask, cache)
        times.append(time.perf_counter() - start)
        if new == 1:  # the engine's next step: this step's cache in, one column longer
            cache, length = present, length + 1
    return float(np.median(times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", help="step models (default: notebook 02's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="0: onnxruntime's default")
    args = parser.parse_args()
    state = json.loads((workdir() / "state.json").read_text())
    models = args.models or [
        state["onnx"][k] for k in ("with_past", "with_past_int8") if k in state["onnx"]
    ]
    module = load_engine_module()
    rng = np.random.default_rng(0)
    results = []
    for model in map(Path, models):
        past_dims = next(i.shape for i in ort_session(model).get_inputs() if i.name == "past")
        n_layer, n_head, head_dim = past_dims[0], past_dims[3], past_dims[5]
        with tempfile.TemporaryDirectory(prefix="cache-layout-", dir=workdir()) as folder:
            runners = {
                "exported": module.SessionRunner(model, args.threads, device="cpu"),
                "engine's": module.SessionRunner(
                    engine_copy(model, Path(folder)), args.threads, device="cpu"
                ),
            }
            for runner in runners.values():
                runner.open(gpu_present=False)
            if runners["engine's"].two_groups:  # fp32 (int8 was simplified when made)
                unsimplified = Path(folder) / "unsimplified"
                unsimplified.mkdir()
                path = engine_copy(model, unsimplified, simplify=False)
                runner = module.SessionRunner(path, args.threads, device="cpu")
                runners["unsimplified"] = runner.open(gpu_present=False)
            cases = [("decode", rows, 1, length) for rows, length in DECODE]
            cases += [("chunk", 1, chunk, length) for chunk, length in CHUNKS]
            cases += [("prefill", rows, new, 0) for rows, new in PREFILLS]
            for kind, rows, new, length in cases:
                past = rng.standard_normal((n_layer, 2, rows, n_head, length, head_dim))
                past = past.astype(np.float32)
                rounds = {form: [] for form in runners}
                for _ in range(args.rounds):  # alternating, so a slow minute weighs on both
                    for form, runner in runners.items():
                        rounds[form].append(
                            step_times(runner, past, rows, new, length, args.steps, rng)
                        )
                ms = {f: 1e3 * float(np.median(rounds[f])) for f in runners}
                one, split = ms["exported"], ms["engine's"]
                row = {
                    "model": model.name,
                    "case": f"{kind}: {rows} row(s) x {new} new, {length} cached",
                    "exported_ms": round(one, 2),
                    "engine_ms": round(split, 2),
                    "ratio": round(split / one, 3),
                    "rounds_ms": {f: [round(1e3 * t, 2) for t in r] for f, r in rounds.items()},
                }
                line = (
                    f"{row['model']:28} {row['case']:40} exported {one:7.2f} ms  "
                    f"engine's {split:7.2f} ms  ({split / one:.2f}x)"
                )
                if "unsimplified" in ms:  # the smaller graph alone: engine's / unsimplified
                    row["unsimplified_ms"] = round(ms["unsimplified"], 2)
                    row["simplified_ratio"] = round(split / ms["unsimplified"], 3)
                    line += (
                        f"  not simplified {ms['unsimplified']:7.2f} ms "
                        f"(simplified {split / ms['unsimplified']:.2f}x)"
                    )
                results.append(row)
                print(line, flush=True)
    out = paths()["results_dir"] / "bench_cache_layout.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "weights": state["onnx"].get("weights"),
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Where an int8 decode step's time goes, and how far it is from reading its weights once.

    python benchmarks/profile_int8.py                      # the model notebook 02 exported
    python benchmarks/profile_int8.py --fp32 gpt2_with_past.onnx [--current A --chosen B]
    TUTORIAL_WORKDIR=/tmp/int8tiny python benchmarks/profile_int8.py --skip-floor

From the fp32 decoder-with-past model it quantizes two int8 models into a scratch folder (or
takes them ready with ``--current`` / ``--chosen``): *current*, ``quantize_dynamic``'s defaults
on the exported graph (what :func:`tutorial.export.quantize_int8` did before), and *chosen*,
what :func:`tutorial.export.quantize_int8` does now (the same quantization on the graph
:func:`tutorial.onnx_surgery.simplify_decoder` made smaller). Then it prints:

- per op type, the kernel time of one decode step (onnxruntime's profiler, decode steps only;
  the profiler itself slows every node, so read the shares, not the sum, as the step's time);
- ms/token, p50 over ``--steps`` decode steps after a ~12-token prompt, with tutorial.measure's
  in-process loop (I/O binding), the two models in alternating rounds (the median of the
  rounds' p50s, every round shown: other work on the machine shows up as outlying rounds);
- the weight-read floor: onnxruntime's int8 matrix-vector product (DynamicQuantizeMatMul,
  ``[1, 768] x [768, N]``) over as many weight bytes as a step reads, and the fp32 MatMul over
  as many elements, under the same thread settings, as GB/s; also the step's own 49 int8
  products alone (its matrix shapes, no other node);
- agreement with fp32 over five prompts, 20 greedy tokens each: tokens equal (free-running)
  and the largest logit difference with both fed fp32's tokens (teacher-forced).

Every figure says which weights it ran on: the offline stand-in has GPT-2's architecture with
random weights (``random-offline``), so its speeds are GPT-2's and its agreement is not.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tutorial import common, export, measure  # noqa: E402

PROMPTS = (
    "The quick brown fox jumps over the lazy dog, and then",
    "In 1969, the first humans landed on the Moon. The mission",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Triton Inference Server serves models over HTTP and gRPC, so",
    "Once upon a time, in a small village by the sea, there lived",
)


def session(path: Path, threads: int | None, spinning: str | None, profile: str = "") -> Any:
    """A CPU session as tutorial.export.ort_session makes it, plus the optional thread and
    profiling settings."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    if spinning is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def step(sess: Any, ids: list[int], total: int, past: np.ndarray) -> tuple[np.ndarray, Any]:
    feeds = {
        "input_ids": np.asarray([ids], dtype=np.int32),
        "attention_mask": np.ones((1, total), dtype=np.int32),
        "past": past,
    }
    logits, present = sess.run(["logits", "present"], feeds)
    return logits[0], present


def op_profile(path: Path, prompt: list[int], steps: int, args: Any, scratch: Path) -> dict:
    """Microseconds per decode step by op type (and node count) from onnxruntime's profiler."""
    sess = session(path, args.threads, args.spinning, profile=str(scratch / path.stem))
    past = export.empty_past(sess)
    ids, total = list(prompt), len(prompt)
    for _ in range(steps + 1):
        logits, past = step(sess, ids, total, past)
        ids, total = [int(np.argmax(logits))], total + 1
    events = json.loads(Path(sess.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[
        3:
    ]  # the prefill and the first two decode steps warm up
    per_op: collections.Counter = collections.Counter()
    nodes: collections.Counter = collections.Counter()
    starts = [a for a, _ in runs]
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if i >= 0 and e["ts"] <= runs[i][1]:
            per_op[e["args"]["op_name"]] += e["dur"]
            nodes[e["args"]["op_name"]] += 1
    n = len(runs)
    return {
        "us": {k: v / n for k, v in per_op.items()},
        "nodes": {k: v / n for k, v in nodes.items()},
        "run_us": float(np.median([b - a for a, b in runs])),
    }


def print_profiles(profiles: dict[str, dict]) -> None:
    names = list(profiles)
    ops = sorted(
        {op for p in profiles.values() for op in p["us"]},
        key=lambda op: -max(p["us"].get(op, 0) for p in profiles.values()),
    )
    print(f"\n{'op type':24}" + "".join(f"{name + ' us/step':>20}{'nodes':>6}" for name in names))
    for op in ops:
        row = f"{op:24}"
        for name in names:
            us, count = profiles[name]["us"].get(op, 0.0), profiles[name]["nodes"].get(op, 0)
            share = 100 * us / sum(profiles[name]["us"].values())
            row += f"{us:11.0f} ({share:4.1f}%){count:6.0f}"
        print(row)
    print(
        f"{'sum of kernels':24}"
        + "".join(
            f"{sum(p['us'].values()):11.0f}{'':9}{sum(p['nodes'].values()):6.0f}"
            for p in profiles.values()
        )
    )
    print(
        f"{'model_run (profiled)':24}"
        + "".join(f"{p['run_us']:11.0f}{'':15}" for p in profiles.values())
    )


def decode_step_ms(paths: dict[str, Path], prompt: list[int], args: Any) -> dict[str, Any]:
    """Per model, a function returning one round's p50 decode step (ms) with
    tutorial.measure's in-process loop (I/O binding; the prefill is left out)."""
    rounds = {}
    for name, path in paths.items():
        target = measure.InProcessTarget(name, path, model_variant="int8", threads=args.threads)
        if args.spinning is not None:  # the same session, with the spinning setting
            target._session = session(path, args.threads, args.spinning)
        p = measure.Prompt("", list(prompt))
        target.generate(p, 5)

        def one_round(target: Any = target, p: Any = p) -> float:
            steps = target.generate(p, args.steps + 1).step_ms[1:]
            return float(np.percentile(steps, 50))

        rounds[name] = one_round
    return rounds


def alternate(measures: dict[str, Any], rounds: int) -> dict[str, list[float]]:
    """Call each measure once a round, in turn, ``rounds`` times: what other work on the
    machine does to one round it does to its neighbours, so ratios are taken within a round."""
    out: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure_once in measures.items():
            time.sleep(0.05)
            out[name].append(measure_once())
    return out


def matvec_graph(kind: str, shapes: list[tuple[int, int]], seed: int = 0) -> Any:
    """x [1, K] times each [K, N] of ``shapes``: int8 DynamicQuantizeMatMul or fp32 MatMul."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    k_max = max(k for k, _ in shapes)
    nodes, inits, outputs = [], [], []
    for i, (k, n) in enumerate(shapes):
        x = "x"
        if k != k_max:
            for name, value in (("starts", 0), ("ends", k), ("axes", 1)):
                inits.append(numpy_helper.from_array(np.array([value], np.int64), f"{name}{i}"))
            nodes.append(
                helper.make_node("Slice", ["x", f"starts{i}", f"ends{i}", f"axes{i}"], [f"x{i}"])
            )
            x = f"x{i}"
        if kind == "fp32":
            w = rng.standard_normal((k, n), dtype=np.float32)
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"]))
        else:
            w = rng.integers(-127, 128, (k, n), dtype=np.int8)
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            inits.append(numpy_helper.from_array(np.array(0.01, np.float32), f"scale{i}"))
            inits.append(numpy_helper.from_array(np.array(0, np.int8), f"zero{i}"))
            nodes.append(
                helper.make_node(
                    "DynamicQuantizeMatMul",
                    [x, f"w{i}", f"scale{i}", f"zero{i}"],
                    [f"y{i}"],
                    domain="com.microsoft",
                )
            )
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]))
    graph = helper.make_graph(
        nodes,
        "matvec",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k_max])],
        outputs,
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def matvec_ms(model: Any, args: Any, reps: int = 40) -> Any:
    """A function returning the median ms of ``reps`` runs of a :func:`matvec_graph` model."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if args.threads:
        opts.intra_op_num_threads = args.threads
    if args.spinning is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", args.spinning)
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    k = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    feed = {"x": np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)}
    for _ in range(5):
        sess.run(None, feed)

    def one_round() -> float:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - start)
        return float(np.median(times)) * 1000

    return one_round


def floor_measures(int8_bytes: int, args: Any) -> dict[str, Any]:
    """The weight-read floor's measures (see the module's docstring)."""
    n = int8_bytes // 768
    gpt2 = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12 + [(768, 50257)]
    measures = {
        "floor int8": matvec_ms(matvec_graph("int8", [(768, n)]), args),
        "floor fp32": matvec_ms(matvec_graph("fp32", [(768, n)]), args),
    }
    if abs(sum(k * n for k, n in gpt2) - int8_bytes) < 0.01 * int8_bytes:  # GPT-2 124M
        measures["49 products"] = matvec_ms(matvec_graph("int8", gpt2), args)
    return measures


def agreement(fp32: Any, int8: Any, prompts: list[list[int]], new_tokens: int) -> dict:
    """Free-running greedy tokens equal to fp32's, and the largest logit difference with both
    models fed fp32's tokens (prefill and every step)."""
    equal = first_diff = 0
    max_diff, max_logit = 0.0, 0.0
    per_prompt = []
    for prompt in prompts:
        reference = export.greedy_with_past(fp32, prompt, new_tokens, eos_token_id=None)
        tokens = export.greedy_with_past(int8, prompt, new_tokens, eos_token_id=None)
        same = sum(a == b for a, b in zip(tokens, reference))
        lead = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), new_tokens)
        equal, first_diff = equal + same, first_diff + lead
        past_a, past_b = export.empty_past(fp32), export.empty_past(int8)
        ids, total = list(prompt), len(prompt)
        for token in reference:
            logits_a, past_a = step(fp32, ids, total, past_a)
            logits_b, past_b = step(int8, ids, total, past_b)
            max_diff = max(max_diff, float(np.abs(logits_a - logits_b).max()))
            max_logit = max(max_logit, float(np.abs(logits_a).max()))
            ids, total = [token], total + 1
        per_prompt.append(f"{same}/{new_tokens}")
    return {
        "tokens_equal": equal,
        "tokens": new_tokens * len(prompts),
        "leading_equal": first_diff,
        "per_prompt": per_prompt,
        "max_abs_logit_diff": max_diff,
        "max_abs_logit_fp32": max_logit,
    }


def default_fp32() -> Path:
    onnx_state = common.require_state("onnx", "notebooks/02_export_onnx.ipynb")
    return Path(onnx_state["with_past"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fp32", type=Path, help="fp32 decoder-with-past (default: state's)")
    parser.add_argument("--current", type=Path, help="int8 with the old settings (default: made)")
    parser.add_argument("--chosen", type=Path, help="int8 with the new settings (default: made)")
    parser.add_argument("--steps", type=int, default=50, help="decode steps a round")
    parser.add_argument("--rounds", type=int, default=7, help="alternating timing rounds")
    parser.add_argument("--prompt-tokens", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=20, help="tokens a prompt (agreement)")
    parser.add_argument("--threads", type=int, default=None, help="intra_op_num_threads")
    parser.add_argument("--spinning", choices=("0", "1"), default=None, help="allow_spinning")
    parser.add_argument("--skip-floor", action="store_true", help="no floor measurement")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()

    import onnxruntime as ort

    fp32 = args.fp32 or default_fp32()
    weights = common.load_state().get("model", {}).get("weights", "unknown")
    print(
        f"fp32 model: {fp32} (weights: {weights}"
        + (
            "; GPT-2's architecture with random weights, an offline stand-in"
            if weights == "random-offline"
            else ""
        )
        + ")"
    )
    print(
        f"onnxruntime {ort.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; threads {args.threads or 'default'}, "
        f"allow_spinning {args.spinning or 'default (1)'}"
    )
    try:
        maker = measure.PromptMaker.from_workdir()
        prompt = maker(args.prompt_tokens).ids
        prompts = [list(maker.tokenizer.encode(text)) for text in PROMPTS]
    except common.TutorialError as err:
        print(f"(no tokenizer: {err} Fixed token ids instead.)")
        prompt = list(range(464, 464 + args.prompt_tokens))
        prompts = [[50256, 11 * i + 3, 7 * i + 100, 1000 + i] for i in range(len(PROMPTS))]

    with tempfile.TemporaryDirectory(prefix="profile_int8_") as tmp:
        scratch = Path(tmp)
        models = {"current": args.current, "chosen": args.chosen}
        for name, path in models.items():
            if path is None:
                path = models[name] = scratch / f"{name}_int8.onnx"
                start = time.perf_counter()
                sig = export.quantize_int8(fp32, path, simplify=name == "chosen")
                print(
                    f"quantized {name}: {sig['bytes'] / 1e6:.1f} MB in "
                    f"{time.perf_counter() - start:.1f} s"
                    + (f", graph simplified: {sig['simplified']}" if sig.get("simplified") else "")
                )
        read = {name: export.weight_bytes_read_per_step(path) for name, path in models.items()}
        for name in models:
            print(
                f"{name}: weights read per decode step {read[name]['read_per_step'] / 1e6:.1f} MB"
            )

        profiles = {
            name: op_profile(path, prompt, 20, args, scratch) for name, path in models.items()
        }
        print(f"\nOne decode step by op type (onnxruntime profiler; prompt {len(prompt)} tokens):")
        print_profiles(profiles)

        step_bytes = read["chosen"]["read_per_step"]
        measures = decode_step_ms(models, prompt, args)
        if not args.skip_floor:
            measures.update(floor_measures(step_bytes, args))
        rounds = alternate(measures, args.rounds)
        ms = {name: float(np.median(r)) for name, r in rounds.items()}
        print(
            f"\nms/token, p50 of {args.steps} decode steps after a {len(prompt)}-token prompt; "
            f"floors: median of {args.rounds} rounds, all measured in alternating rounds:"
        )
        for name, r in rounds.items():
            print(f"  {name:12} {ms[name]:6.2f} ms  (rounds: {' '.join(f'{x:.2f}' for x in r)})")
        figures: dict[str, Any] = {"weights": weights, "ms": ms, "rounds": rounds}
        if not args.skip_floor:
            n = step_bytes // 768
            print(
                f"\nweight-read floor ({step_bytes / 1e6:.1f} MB of int8 weights a step):"
                f"\n  int8 DynamicQuantizeMatMul [1,768]x[768,{n}]: {ms['floor int8']:.2f} ms, "
                f"{step_bytes / ms['floor int8'] / 1e6:.1f} GB/s"
                f"\n  fp32 MatMul, same shape ({4 * n * 768 / 1e6:.0f} MB): "
                f"{ms['floor fp32']:.2f} ms, {4 * n * 768 / ms['floor fp32'] / 1e6:.1f} GB/s"
            )
            if "49 products" in ms:
                print(
                    f"  the step's 49 int8 products alone (its shapes): {ms['49 products']:.2f} ms"
                )
            for name in models:
                ratios = [a / b for a, b in zip(rounds[name], rounds["floor int8"])]
                figures[f"{name}_to_floor"] = float(np.median(ratios))
                print(
                    f"  {name:8} {ms[name]:.2f} ms/token = {np.median(ratios):.2f}x the int8 "
                    f"floor (median of the rounds' ratios; "
                    f"{' '.join(f'{x:.2f}' for x in ratios)})"
                )

        print(f"\nAgreement with fp32 ({len(prompts)} prompts x {args.new_tokens} greedy tokens):")
        reference = session(fp32, args.threads, args.spinning)
        figures["agreement"] = {}
        for name, path in models.items():
            agree = agreement(
                reference, session(path, args.threads, args.spinning), prompts, args.new_tokens
            )
            figures["agreement"][name] = agree
            print(
                f"  {name:8} tokens equal {agree['tokens_equal']}/{agree['tokens']} "
                f"(per prompt {' '.join(agree['per_prompt'])}; equal before the first difference "
                f"{agree['leading_equal']}), max |logit diff| (fed fp32's tokens) "
                f"{agree['max_abs_logit_diff']:.4f} (max |logit| {agree['max_abs_logit_fp32']:.2f})"
            )
        figures["profiles"] = profiles
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
            print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

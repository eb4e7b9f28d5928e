"""llama.cpp, the CPU engine users pick instead, on the same GPT-2 weights as our onnxruntime
models: single-stream greedy decode, measured side by side in one run.

    make llamacpp-peer                                   # after notebooks 01-02 (make run)
    python benchmarks/llamacpp_peer.py --rounds 6 --new-tokens 50 --threads 2

1. Notebook 01's weights (``gpt2model/tf_model.h5``) are written to GGUF in llama.cpp's
   ``gpt2`` layout (:mod:`tutorial.gguf_gpt2`), F32, then quantized to Q8_0 with
   ``llama_model_quantize``; both under ``<workdir>/peers/llamacpp/``.
2. Before any time is reported, llama.cpp's logits on the same tokens (a prompt and our fp32
   model's greedy continuation) are checked against our onnxruntime fp32 model's: F32 within
   ``--atol`` with correlation >= 0.99999, Q8_0 correlation >= 0.99.
3. Rounds: the server's own engine in this process (fp32 and int8: :mod:`tutorial.engine_local`,
   the ``c)`` of ``make bench``: the file notebook 03 writes for it, its onnxruntime session
   with IO binding; its tokens must equal the exported model's greedy ones) and llama.cpp (F32
   and Q8_0, through llama-cpp-python's ``Llama.eval``), each decoding ``--new-tokens`` tokens,
   the order rotated every round, so a slow minute on a shared machine weighs on all four.
   Both use ``--threads`` threads.

llama.cpp runs in its own virtual environment (``.venv-llamacpp``: llama-cpp-python compiled
from source) as a worker process (``benchmarks/llamacpp_worker.py``) that waits while
onnxruntime runs here, and the other way round.

llama-cpp-python's own server (``python -m llama_cpp.server``) answers one request at a time:
its ``llama_cpp/server/app.py`` holds one model behind a lock (``llama_outer_lock`` /
``llama_inner_lock``) and has no parallel slots (those are the C++ ``llama-server``'s
``--parallel``, which the Python package does not build), so no 8-client figure is measured.

Prints the table and writes ``results/llamacpp_peer.json`` in the work folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tutorial import common, export  # noqa: E402
from tutorial.gguf_gpt2 import gguf_tensors, read_tf_h5  # noqa: E402

VENV_PYTHON = ROOT / ".venv-llamacpp" / "bin" / "python"
WORKER = ROOT / "benchmarks" / "llamacpp_worker.py"
ENGINES = ("onnxruntime fp32", "llama.cpp F32", "onnxruntime int8", "llama.cpp Q8_0")


def write_ggufs(model_dir: Path, vocab_dir: Path, out_dir: Path, threads: int) -> dict[str, Path]:
    """The F32 and Q8_0 GGUF files (written again when the weights are newer)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    h5 = model_dir / "tf_model.h5"
    f32, q8 = out_dir / "gpt2-f32.gguf", out_dir / "gpt2-q8_0.gguf"
    if not f32.exists() or f32.stat().st_mtime < h5.stat().st_mtime:
        config = json.loads((model_dir / "config.json").read_text())
        config["name"] = f"gpt2 ({common.weights_label()} weights)"
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            np.savez(Path(tmp) / "tensors.npz", **gguf_tensors(read_tf_h5(h5)))
            (Path(tmp) / "config.json").write_text(json.dumps(config))
            worker(
                "write-gguf",
                str(Path(tmp) / "tensors.npz"),
                str(Path(tmp) / "config.json"),
                str(vocab_dir),
                str(f32),
            )
        q8.unlink(missing_ok=True)
    if not q8.exists():
        worker("quantize", str(f32), str(q8), str(threads))
    return {"F32": f32, "Q8_0": q8}


def worker(*args: str) -> None:
    subprocess.run([str(VENV_PYTHON), str(WORKER), *args], check=True)


class Worker:
    """The llama.cpp worker process: one JSON request, one JSON answer."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [str(VENV_PYTHON), str(WORKER), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def __call__(self, cmd: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            hint = (
                " (SIGILL, an illegal instruction: a CPU feature the build used that this machine"
                " does not run, e.g. AMX a virtual machine reports but does not enable; try"
                " --no-extra-bufts, which keeps llama.cpp off its AMX and repacked buffers)"
                if code == -4
                else ""
            )
            raise SystemExit(f"the llama.cpp worker exited (code {code}){hint}")
        answer = json.loads(line)
        if "error" in answer:
            raise SystemExit(f"llama.cpp worker: {answer['error']}")
        return answer

    def close(self) -> None:
        try:
            self.proc.stdin.write('{"cmd": "quit"}\n')
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def ort_greedy_logits(session, prompt: list[int], new_tokens: int) -> tuple[list[int], np.ndarray]:
    """Our fp32 model's greedy tokens and the last-position logits of every step."""
    idt = export.input_dtype(session, "input_ids")
    mdt = export.input_dtype(session, "attention_mask")
    past, ids, total = export.empty_past(session), np.asarray([prompt], dtype=idt), len(prompt)
    tokens, rows = [], []
    for _ in range(new_tokens):
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, total), mdt), "past": past}
        logits, past = session.run(["logits", "present"], feeds)
        rows.append(np.asarray(logits[0], dtype=np.float32))
        tokens.append(int(np.argmax(rows[-1])))
        ids, total = np.asarray([[tokens[-1]]], dtype=idt), total + 1
    return tokens, np.stack(rows)


def compare(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    diff = np.abs(ours - theirs)
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "correlation": float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]),
        "logit_std": float(ours.std()),
        "argmax_agree": int((ours.argmax(1) == theirs.argmax(1)).sum()),
        "rows": int(len(ours)),
    }


def stats(steps_s: list[float]) -> dict[str, float]:
    ms = 1000 * np.asarray(steps_s)
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "mean_ms": float(ms.mean()),
        "n": int(len(ms)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=50)
    parser.add_argument("--prompt-tokens", type=int, default=12)
    parser.add_argument("--check-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--atol", type=float, default=1e-2, help="F32 logits vs ours")
    parser.add_argument(
        "--no-extra-bufts",
        action="store_true",
        help="llama.cpp without its extra buffer types (AMX, repacked weights)",
    )
    args = parser.parse_args()
    if not VENV_PYTHON.exists():
        raise SystemExit(f"{VENV_PYTHON} is missing: make llamacpp-venv builds it (~9 min).")

    from tutorial.measure import PromptMaker

    paths = common.paths()
    label = common.weights_label()
    print(f"model: {paths['model_dir']} ({label} weights)", flush=True)
    if label != "real":
        print(common.OFFLINE_BANNER)
    ggufs = write_ggufs(
        paths["model_dir"],
        paths["vocab_dir"],
        common.workdir() / "peers" / "llamacpp",
        args.threads,
    )
    sizes = {k: p.stat().st_size for k, p in ggufs.items()}
    prompt = PromptMaker.from_workdir()(args.prompt_tokens).ids
    sessions = {
        "fp32": export.ort_session(paths["onnx_past"], threads=args.threads),
        "int8": export.ort_session(paths["onnx_past_int8"], threads=args.threads),
    }
    load_before = os.getloadavg()
    llama = Worker()
    engines: dict = {}  # the server's engine in this process, per precision (the rounds)
    summary: dict = {
        "args": vars(args),
        "weights": label,
        "machine": common.machine_metadata(),
        "gguf_bytes": sizes,
        "onnx_bytes": {
            k: paths[f"onnx_past{s}"].stat().st_size for k, s in (("fp32", ""), ("int8", "_int8"))
        },
    }
    try:
        summary["llama_cpp"] = llama(
            "load",
            paths={k: str(p) for k, p in ggufs.items()},
            threads=args.threads,
            n_ctx=256,
            extra_bufts=not args.no_extra_bufts,
        )
        print(
            f"llama-cpp-python {summary['llama_cpp']['llama_cpp_python']}: {summary['llama_cpp']['system']}"
        )

        # -- the check, before any time
        ours_tokens, ours = ort_greedy_logits(sessions["fp32"], prompt, args.check_tokens)
        _, ours_int8 = ort_greedy_logits(sessions["int8"], prompt, 1)
        seq = prompt + ours_tokens[:-1]
        checks = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("F32", "Q8_0"):
                out = str(Path(tmp) / f"{name}.npy")
                llama("logits", name=name, tokens=seq, first_row=len(prompt) - 1, out=out)
                checks[name] = compare(ours, np.load(out))
        checks["onnxruntime int8 (first step)"] = compare(ours[:1], ours_int8)
        summary["logits_check"] = checks
        for name, c in checks.items():
            print(
                f"logits vs our onnxruntime fp32, {name}: max |diff| {c['max_abs_diff']:.2e} "
                f"(logits' std {c['logit_std']:.2f}), correlation {c['correlation']:.7f}, "
                f"argmax agrees {c['argmax_agree']}/{c['rows']}"
            )
        f32, q8 = checks["F32"], checks["Q8_0"]
        if f32["max_abs_diff"] > args.atol or f32["correlation"] < 0.99999:
            raise SystemExit("llama.cpp F32 logits differ from ours: no time reported.")
        if q8["correlation"] < 0.99:
            raise SystemExit("llama.cpp Q8_0 logits do not follow ours: no time reported.")

        # -- rounds, alternating; ours: the server's engine on the file it serves
        from tutorial.engine_local import LocalEngine

        for kind, suffix in (("fp32", ""), ("int8", "_int8")):
            engines[kind] = LocalEngine(paths[f"onnx_past{suffix}"], threads=args.threads)
        sessions.clear()  # the check is done: its sessions' memory back
        plain = ours_tokens[: args.new_tokens]

        def run(engine: str, n: int) -> dict:
            if engine.startswith("onnxruntime"):
                times: list[float] = []
                tokens = engines[engine.split()[1]].generate(prompt, n, times)
                if engine.endswith("fp32") and tokens[: len(plain)] != plain[:n]:
                    raise SystemExit("the engine's fp32 tokens differ from the exported model's")
                return {"step_s": [b - a for a, b in zip(times, times[1:])], "tokens": tokens}
            return llama("decode", name=engine.split()[1], prompt=prompt, new_tokens=n)

        for engine in ENGINES:  # warm-up
            run(engine, 3)
        decode = {e: [] for e in ENGINES}
        prefill = {e: [] for e in ENGINES}
        per_round = {e: [] for e in ENGINES}  # each round's decode p50, ms
        tokens = {}
        start = time.time()
        for r in range(args.rounds):
            order = ENGINES[r % len(ENGINES) :] + ENGINES[: r % len(ENGINES)]
            for engine in order:
                out = run(engine, args.new_tokens)
                prefill[engine].append(out["step_s"][0])
                per_round[engine].append(1000 * float(np.median(out["step_s"][1:])))
                decode[engine] += out["step_s"][1:]
                tokens[engine] = out["tokens"]
            print(f"round {r + 1}/{args.rounds} done", flush=True)
        summary["seconds"] = time.time() - start
        summary["load_avg_before_after"] = [load_before, os.getloadavg()]
        rows = {
            e: {
                "decode": stats(decode[e]),
                "prefill": stats(prefill[e]),
                "round_p50_ms": per_round[e],
            }
            for e in ENGINES
        }
        summary["engines"] = rows
        same = tokens["llama.cpp F32"] == tokens["onnxruntime fp32"]
        agree = sum(a == b for a, b in zip(tokens["llama.cpp F32"], tokens["onnxruntime fp32"]))
        summary["f32_greedy_tokens_agree"] = agree
    finally:
        llama.close()
        for engine in engines.values():
            engine.close()

    print(
        f"\nSingle stream, greedy, {args.prompt_tokens}-token prompt, {args.new_tokens} tokens, "
        f"{args.threads} threads, {args.rounds} alternating rounds ({label} weights)\n"
    )
    print(
        "| engine | decode p50 ms/token | p90 | mean | best round's p50 | prefill p50 ms "
        "| tokens/s (decode p50) |"
    )
    print("|---|---|---|---|---|---|---|")
    for e in ENGINES:
        d, p = rows[e]["decode"], rows[e]["prefill"]
        print(
            f"| {e} | {d['p50_ms']:.2f} | {d['p90_ms']:.2f} | {d['mean_ms']:.2f} | "
            f"{min(rows[e]['round_p50_ms']):.2f} | "
            f"{p['p50_ms']:.1f} | {1000 / d['p50_ms']:.1f} |"
        )
    ratios = {
        "llama.cpp F32 / onnxruntime fp32": rows["llama.cpp F32"]["decode"]["p50_ms"]
        / rows["onnxruntime fp32"]["decode"]["p50_ms"],
        "llama.cpp Q8_0 / onnxruntime int8": rows["llama.cpp Q8_0"]["decode"]["p50_ms"]
        / rows["onnxruntime int8"]["decode"]["p50_ms"],
    }
    best = {e: min(rows[e]["round_p50_ms"]) for e in ENGINES}
    ratios["best rounds: llama.cpp F32 / onnxruntime fp32"] = (
        best["llama.cpp F32"] / best["onnxruntime fp32"]
    )
    ratios["best rounds: llama.cpp Q8_0 / onnxruntime int8"] = (
        best["llama.cpp Q8_0"] / best["onnxruntime int8"]
    )
    summary["ratios_p50"] = ratios
    print()
    for k, v in ratios.items():
        print(f"{k} (decode ms/token, p50): {v:.2f}x")
    print(
        f"greedy tokens, llama.cpp F32 vs onnxruntime fp32: {agree}/{args.new_tokens} agree ({'same' if same else 'differ'})"
    )
    print(f"GGUF sizes: F32 {sizes['F32'] / 2**20:.0f} MiB, Q8_0 {sizes['Q8_0'] / 2**20:.0f} MiB")
    print(
        f"load average before / after: {load_before[0]:.2f} / {summary['load_avg_before_after'][1][0]:.2f}"
    )
    out = common.workdir() / "results" / "llamacpp_peer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Memory of notebook 02's exports: each stage as a child process, sampled, peaks printed.

    python benchmarks/export_memory.py                    # the model notebook 01 saved
    python benchmarks/export_memory.py --model-dir DIR    # any saved TFGPT2LMHeadModel
    python benchmarks/export_memory.py --notebook         # notebook 02 itself: its kernel's peak

Runs the stages notebook 02 runs, in the same order and with the same commands (trace,
convert, assemble: ``python -m tutorial.export_past``; then its checks, ``python -m
tutorial.export_checks``: logits against TensorFlow, the trimmed ``gpt2`` model, greedy tokens
against TensorFlow, the int8 quantization and its comparison), each in its own child process,
writing to a scratch folder (deleted afterwards unless ``--keep``). Every 0.5 s it samples the
resident memory (RSS) of the child's process tree and the machine's used memory (``free``'s
"used"). It prints, per stage: wall time, the sampled peak RSS of the process tree, the largest
single process's max RSS as the kernel reports it (what ``/usr/bin/time -v`` prints), and the
machine's used memory before, at peak and after. The used-memory delta includes whatever else
runs on the machine meanwhile; the RSS figures do not.

``--notebook [PATH]`` runs notebook 02 itself instead (papermill, in ``TUTORIAL_WORKDIR``, after
notebook 01; PATH: another copy of it, such as an older checkout's, run with that checkout's
code) and prints the peak resident memory (VmHWM, sampled) of its kernel and of the largest
process the kernel started: what a learner's notebook session must hold.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tutorial import common, export  # noqa: E402

GB = 1e9


def check_command(name: str, out: Path, **arguments) -> list:
    """The command line of one of notebook 02's checks, its arguments written beside it."""
    args_file = out / "logs" / f"check_{name}.json"
    args_file.parent.mkdir(parents=True, exist_ok=True)
    args_file.write_text(json.dumps({k: export._jsonable(v) for k, v in arguments.items()}))
    result = out / "logs" / f"check_{name}.out.json"
    return [sys.executable, "-m", "tutorial.export_checks", name, str(args_file), str(result)]


def stage_commands(
    model_dir: Path, vocab_dir: Path, out: Path, opset: int, int8: bool
) -> list[tuple[str, list]]:
    """(name, command) of every stage and check, in notebook 02's order."""
    parts, light = out / "parts", out / "parts" / "light.onnx"
    full, last = out / "model.onnx", out / "gpt2_last_logits.onnx"
    past, past8 = out / "gpt2_with_past.onnx", out / "gpt2_with_past_int8.onnx"
    rows, prompt = out / "last_rows.npz", "My dog is cute, but he barks a lot."
    prompts = [prompt, "Machine learning is a field of computer science.", "Hello world"]
    stages = [
        ("trace", export.export_stage_command("trace", model_dir, parts)),
        ("convert", export.export_stage_command("convert", parts, light, "--opset", opset)),
        ("assemble", export.export_stage_command("assemble", parts, light, past, full)),
        (
            "check logits",
            check_command(
                "logits",
                out,
                model_dir=model_dir,
                vocab_dir=vocab_dir,
                onnx=full,
                prompts=prompts,
                rows=rows,
            ),
        ),
        (
            "check trim",
            check_command(
                "trim", out, full=full, last=last, vocab_dir=vocab_dir, prompts=prompts, rows=rows
            ),
        ),
        (
            "check greedy",
            check_command(
                "greedy",
                out,
                model_dir=model_dir,
                vocab_dir=vocab_dir,
                with_past=past,
                prompt=prompt,
                new_tokens=20,
            ),
        ),
    ]
    if int8:
        # the greedy check's tokens are read when this stage starts (see main)
        stages.append(("check int8", ["int8", out, past, past8]))
    return stages


def measure_notebook(notebook: Path, out: Path) -> dict:
    """Run ``notebook`` with papermill; the peak RSS of its kernel and of the kernel's children."""
    import subprocess
    import time

    import psutil

    executed = out / f"executed_{notebook.name}"
    cmd = [sys.executable, "-m", "papermill", "--cwd", str(notebook.parent), "--kernel"]
    cmd += ["python3", str(notebook), str(executed), "--log-level", "ERROR", "--no-progress-bar"]
    print("$", " ".join(cmd), flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(cmd)
    peaks: dict[int, tuple[str, int]] = {}
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            for p in parent.children(recursive=True):
                line = " ".join(p.cmdline())
                hwm = export._high_water_mark(p.pid)
                peaks[p.pid] = (line, max(hwm, peaks.get(p.pid, ("", 0))[1]))
        except psutil.Error:
            pass
        time.sleep(0.5)
    if proc.returncode:
        raise SystemExit(f"notebook failed (exit {proc.returncode}): see {executed}")
    kernel = [v for v in peaks.values() if "ipykernel" in v[0]]
    others = [v for v in peaks.values() if "ipykernel" not in v[0]]
    result = {
        "seconds": time.monotonic() - start,
        "kernel_peak_rss": max(v[1] for v in kernel),
        "child_peak_rss": max((v[1] for v in others), default=0),
        "children": sorted(others, key=lambda v: -v[1])[:8],
    }
    print(
        f"\n{notebook.name}: {result['seconds']:.0f} s; kernel peak RSS "
        f"{result['kernel_peak_rss'] / GB:.2f} GB; largest child {result['child_peak_rss'] / GB:.2f} GB"
    )
    for line, hwm in result["children"]:
        print(f"  {hwm / GB:6.2f} GB  {line[:110]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="default: notebook 01's")
    parser.add_argument("--vocab-dir", type=Path, default=None, help="default: notebook 01's")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: a scratch folder")
    parser.add_argument("--opset", type=int, default=export.DEFAULT_OPSET)
    parser.add_argument("--skip-int8", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the files written")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--notebook",
        type=Path,
        nargs="?",
        const=Path(__file__).resolve().parent.parent / "notebooks" / "02_export_onnx.ipynb",
        help="run notebook 02 (or this copy of it) and print its kernel's peak",
    )
    args = parser.parse_args()
    if args.notebook:
        out = Path(tempfile.mkdtemp(prefix="export_memory_nb_", dir=common.workdir()))
        try:
            result = measure_notebook(args.notebook.resolve(), out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        if args.json:
            args.json.write_text(json.dumps(result))
        return

    model_dir = args.model_dir or common.paths()["model_dir"]
    vocab_dir = args.vocab_dir or common.paths()["vocab_dir"]
    if not (model_dir / "config.json").exists():
        raise SystemExit(f"{model_dir} holds no saved model: run notebook 01 or pass --model-dir")
    config = json.loads((model_dir / "config.json").read_text())
    out = args.out_dir or Path(tempfile.mkdtemp(prefix="export_memory_", dir=common.workdir()))
    out.mkdir(parents=True, exist_ok=True)
    meta = common.machine_metadata()
    print(
        f"model: {model_dir} (n_layer {config['n_layer']}, n_embd {config['n_embd']}, "
        f"vocab {config['vocab_size']})\nmachine: {meta['cpu']}, {meta['cpu_count']} cores, "
        f"{platform.system()}; python {meta['python']}, tensorflow {meta['tensorflow']}\n"
        f"scratch: {out}\n"
    )
    rows = []
    try:
        stages = stage_commands(model_dir, vocab_dir, out, args.opset, not args.skip_int8)
        for name, cmd in stages:
            if cmd[0] == "int8":
                greedy = json.loads((out / "logs" / "check_greedy.out.json").read_text())
                cmd = check_command(
                    "int8",
                    out,
                    fp32=cmd[2],
                    int8=cmd[3],
                    prompt_ids=greedy["prompt_ids"],
                    fp32_tokens=greedy["onnx_tokens"],
                    new_tokens=20,
                )
            res = export.run_monitored(cmd, out / "logs" / f"{name.split()[0]}.log", name)
            rows.append({"stage": name, **res})
            print()
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)

    head = (
        f"{'stage':<14} {'wall s':>7} {'peak RSS tree':>14} {'max RSS proc':>13} "
        f"{'used before':>12} {'used peak':>10} {'used after':>11} {'used delta':>11}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['stage']:<14} {r['seconds']:7.1f} {r['peak_rss'] / GB:11.2f} GB "
            f"{r['max_rss'] / GB:10.2f} GB {r['used_before'] / GB:9.2f} GB "
            f"{r['used_peak'] / GB:7.2f} GB {r['used_after'] / GB:8.2f} GB "
            f"{(r['used_peak'] - r['used_before']) / GB:8.2f} GB"
        )
    worst = max(rows, key=lambda r: max(r["peak_rss"], r["max_rss"]))
    print(
        f"\npeak of the export: {max(worst['peak_rss'], worst['max_rss']) / GB:.2f} GB resident "
        f"({worst['stage']}); largest machine used-memory delta: "
        f"{max(r['used_peak'] - r['used_before'] for r in rows) / GB:.2f} GB; "
        f"total wall time {sum(r['seconds'] for r in rows):.0f} s"
    )
    if args.json:
        args.json.write_text(json.dumps({"model": config, "machine": meta, "stages": rows}))


if __name__ == "__main__":
    main()

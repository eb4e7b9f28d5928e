"""Memory of notebook 02's exports: each stage as a child process, sampled, peaks printed.

    python benchmarks/export_memory.py                    # the model notebook 01 saved
    python benchmarks/export_memory.py --model-dir DIR    # any saved TFGPT2LMHeadModel

Runs the stages notebook 02 runs, in the same order and with the same commands (trace,
convert, assemble: ``python -m tutorial.export_past``; then the trimmed ``gpt2`` model and the
int8 quantization, which the notebook runs in its kernel), each in its own child process,
writing to a scratch folder (deleted afterwards unless ``--keep``). Every 0.5 s it samples the
resident memory (RSS) of the child's process tree and the machine's used memory (``free``'s
"used"). It prints, per stage: wall time, the sampled peak RSS of the process tree, the largest
single process's max RSS as the kernel reports it (what ``/usr/bin/time -v`` prints), and the
machine's used memory before, at peak and after. The used-memory delta includes whatever else
runs on the machine meanwhile; the RSS figures do not.
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


def stage_commands(model_dir: Path, out: Path, opset: int, int8: bool) -> list[tuple[str, list]]:
    """(name, command) of every stage, in notebook 02's order."""
    parts, light = out / "parts", out / "parts" / "light.onnx"
    full, last = out / "model.onnx", out / "gpt2_last_logits.onnx"
    past, past8 = out / "gpt2_with_past.onnx", out / "gpt2_with_past_int8.onnx"
    py = sys.executable
    stages = [
        ("trace", export.export_stage_command("trace", model_dir, parts)),
        ("convert", export.export_stage_command("convert", parts, light, "--opset", opset)),
        ("assemble", export.export_stage_command("assemble", parts, light, past, full)),
        (
            "trim (gpt2)",
            [
                py,
                "-c",
                "import sys; from pathlib import Path; from tutorial.onnx_surgery import "
                "trim_to_last_logits as t; t(Path(sys.argv[1]), Path(sys.argv[2]))",
                str(full),
                str(last),
            ],
        ),
    ]
    if int8:
        stages.append(
            (
                "quantize int8",
                [
                    py,
                    "-c",
                    "import sys; from pathlib import Path; from tutorial.export import "
                    "quantize_int8 as q; q(Path(sys.argv[1]), Path(sys.argv[2]))",
                    str(past),
                    str(past8),
                ],
            )
        )
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="default: notebook 01's")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: a scratch folder")
    parser.add_argument("--opset", type=int, default=export.DEFAULT_OPSET)
    parser.add_argument("--skip-int8", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the files written")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    model_dir = args.model_dir or common.paths()["model_dir"]
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
        for name, cmd in stage_commands(model_dir, out, args.opset, not args.skip_int8):
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

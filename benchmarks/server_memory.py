"""Memory of the served repository: every process of the local Triton, once loaded and once
every model has answered.

    python benchmarks/server_memory.py                  # notebook 03's artifact zip
    python benchmarks/server_memory.py --zip FILE.zip   # any artifact zip

Serves the zip as OCI does (unpacked read-only, the deployment's command line) on the bundled
tritonserver, then sums the resident memory (VmRSS) of the server and every backend stub it
started: after loading, and again after `ensemble_model`, `generate` and `generate_stream` have
each answered (generate and generate_stream must give the same tokens). Prints the total and
each process. The copies of the weights show as stubs of about the ONNX file's size or more.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tutorial import common  # noqa: E402
from tutorial.client import infer_json, next_token_requests, stream_generate  # noqa: E402
from tutorial.triton_local import serve_artifact  # noqa: E402

GIB = 2**30


def processes(server) -> list[tuple[float, str]]:
    """(RSS in GiB, command line) of every process in the server's process group."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) != server.process.pid:
                continue
            rss = (stat.parent / "status").read_text().split("VmRSS:")[1].split()[0]
            command = (stat.parent / "cmdline").read_text().replace("\0", " ").strip()
        except (OSError, IndexError, ValueError):
            continue
        found.append((int(rss) * 1024 / GIB, command))
    return sorted(found, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=common.paths()["artifact_zip"])
    parser.add_argument("--settle-s", type=float, default=5.0, help="wait before each reading")
    args = parser.parse_args()
    server = serve_artifact(args.zip, runtime="bundled")
    try:
        time.sleep(args.settle_s)
        loaded = server.memory_bytes() / GIB
        next_token_requests(server.url, "My dog is cute")
        payload = {
            "inputs": [
                {"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["My dog is cute"]},
                {"name": "MAX_NEW_TOKENS", "datatype": "INT32", "shape": [1], "data": [20]},
            ]
        }
        once = {
            o["name"]: o["data"] for o in infer_json(server.url, "generate", payload)["outputs"]
        }
        streamed = [i for _, ids in stream_generate(server.url, "My dog is cute", 20) for i in ids]
        assert streamed == once["TOKEN_IDS"], "generate and generate_stream disagree"
        time.sleep(args.settle_s)
        answered = server.memory_bytes() / GIB
        print(f"{args.zip}: started in {server.started_s:.1f} s")
        print(f"server memory (all processes): {loaded:.2f} GiB loaded, {answered:.2f} GiB once")
        print("ensemble_model, generate and generate_stream have answered; by process:")
        for rss, command in processes(server):
            print(f"  {rss:6.2f} GiB  {command[:150]}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()

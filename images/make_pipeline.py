"""Draw images/pipeline.png: the models in the Triton repository and what flows between them.

Run: .venv/bin/python images/make_pipeline.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

BOXES = {
    # name: (x, y, w, h, label, color)
    "client": (0.1, 3.1, 1.5, 1.0, "client\n(notebook 04 / 06)", "#eeeeee"),
    "encoder": (2.6, 3.1, 1.8, 1.0, "encoder\npython, CPU\ntext -> token ids", "#cfe2f3"),
    "gpt2": (5.9, 3.1, 1.8, 1.0, "gpt2\nonnxruntime, GPU|CPU\n-> last_logits", "#d9ead3"),
    "decoder": (9.2, 3.1, 1.8, 1.0, "decoder\npython, CPU\nargmax -> text", "#cfe2f3"),
    "generate": (
        2.6,
        0.6,
        2.2,
        1.0,
        "generate\npython, no weights\none response (/infer)",
        "#fce5cd",
    ),
    "engine": (
        6.0,
        0.6,
        3.4,
        1.0,
        "generate_stream: the engine\none onnxruntime session (made at load)\n"
        "over gpt2_with_past.onnx beside it",
        "#fce5cd",
    ),
}
ARROWS = [
    ("client", "encoder", "TEXT\nBYTES [1]"),
    ("encoder", "gpt2", "input_ids, attention_mask\nINT32 [1, L]"),
    ("gpt2", "decoder", "last_logits\nFP32 [1, 50257]"),
    ("client", "generate", "TEXT, MAX_NEW_TOKENS"),
]
#: generate holds no weights: it forwards each request to the engine (BLS), whose one batch
#: serves streaming and one-response requests alike. gpt2_with_past is a model of its own only
#: with step_runner "bls".
FORWARD = ("generate", "engine", "each request\n(BLS)")

OUT = Path(__file__).with_name("pipeline.png")


def main(out: Path = OUT) -> Path:
    fig, ax = plt.subplots(figsize=(11, 5))
    ax.set_xlim(0, 11.4)
    ax.set_ylim(0, 5.2)
    ax.axis("off")
    ax.add_patch(
        FancyBboxPatch(
            (2.4, 2.8), 8.9, 1.6, boxstyle="round,pad=0.05", fc="none", ec="#888", ls="--"
        )
    )
    ax.text(
        2.5,
        4.5,
        "ensemble_model: one call = one next token (the original sample's interface)",
        fontsize=9,
    )
    ax.add_patch(
        FancyBboxPatch(
            (2.4, 0.3), 7.2, 1.6, boxstyle="round,pad=0.05", fc="none", ec="#888", ls="--"
        )
    )
    ax.text(
        2.5,
        2.0,
        "generate / generate_stream: one call = N tokens; one engine batches every request",
        fontsize=9,
    )
    for x, y, w, h, label, color in BOXES.values():
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=color, ec="#333"))
        ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", fontsize=8.5)
    for a, b, label in ARROWS:
        ax_, ay, aw, ah = BOXES[a][:4]
        bx, by, bw, bh = BOXES[b][:4]
        if ay == by:
            start, end = (ax_ + aw + 0.05, ay + ah / 2), (bx - 0.05, by + bh / 2)
            tx, ty = (start[0] + end[0]) / 2, ay + ah / 2 + 0.08
        else:
            start, end = (ax_ + aw / 2, ay - 0.05), (bx - 0.05, by + bh / 2)
            tx, ty = 1.0, 1.5
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, color="#333"))
        ax.text(tx, ty, label, ha="center", va="bottom", fontsize=7.5, color="#222")
    a, b, label = FORWARD
    ax_, ay, aw, ah = BOXES[a][:4]
    bx, by, bw, bh = BOXES[b][:4]
    start, end = (ax_ + aw + 0.05, ay + ah / 2), (bx - 0.05, by + bh / 2)
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color="#333"))
    ax.text(
        (start[0] + end[0]) / 2, ay + ah / 2 + 0.08, label, ha="center", va="bottom", fontsize=7
    )
    ax.set_title("GPT-2 on Triton: the model repository served locally and on OCI", fontsize=11)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(main())

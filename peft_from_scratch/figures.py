"""Diagrams drawn in code: where a method sits in a transformer block, with the tensors' shapes.

A notebook draws its method's picture from three pieces:

    fig, ax = figures.canvas(10, 8)
    at = figures.llama_block(ax, d=576, d_ff=1536, heads=9, kv_heads=3)   # the frozen block; returns anchors
    figures.side_branch(ax, at["v_proj"], "A  (r x 576)", "B  (192 x r)", label="+ (alpha/r) B A x")
    figures.side_branch(ax, at["q_proj"], "A  (r x 576)", "B  (576 x r)", side="left")
    figures.legend(ax, 7.5, 0.3)

``llama_block`` / ``bert_layer`` draw the frozen layer as grey boxes in the order data flows through
them and return each sub-module's box (its centre and size), named as in transformers, so a method
can attach its own trainable boxes (orange) beside, before or after any of them. Shapes are written
as the tensors' shapes, e.g. ``(T, 576)`` for the hidden states of T tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

FROZEN, TRAINABLE, DATA = "#d9d9d9", "#f4a259", "#ffffff"


@dataclass(frozen=True)
class Box:
    """A drawn box: centre (x, y), width w, height h."""
    x: float
    y: float
    w: float
    h: float

    @property
    def top(self) -> tuple[float, float]:
        return self.x, self.y + self.h / 2

    @property
    def bottom(self) -> tuple[float, float]:
        return self.x, self.y - self.h / 2

    @property
    def left(self) -> tuple[float, float]:
        return self.x - self.w / 2, self.y

    @property
    def right(self) -> tuple[float, float]:
        return self.x + self.w / 2, self.y


def canvas(width: float = 11, height: float = 8, title: str | None = None):
    """A figure with one axis in data units 0..width x 0..height, no ticks."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    if title:
        ax.set_title(title)
    return fig, ax


def box(ax, x: float, y: float, text: str, w: float = 1.6, h: float = 0.45, kind: str = FROZEN,
        fontsize: int = 9) -> Box:
    """A labelled box centred at (x, y); ``kind`` is its fill (FROZEN, TRAINABLE, DATA or any colour)."""
    from matplotlib.patches import FancyBboxPatch
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02", facecolor=kind,
                                edgecolor="black", linewidth=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)
    return Box(x, y, w, h)


def arrow(ax, start: tuple[float, float], end: tuple[float, float], text: str | None = None, fontsize: int = 8,
          style: str = "->") -> None:
    """An arrow from ``start`` to ``end``, with an optional label (a shape, say) beside its middle."""
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle=style, lw=0.9))
    if text:
        ax.text((start[0] + end[0]) / 2 + 0.08, (start[1] + end[1]) / 2, text, fontsize=fontsize, va="center",
                color="#444444")


def plus(ax, x: float, y: float, r: float = 0.14) -> Box:
    """A circled + (a residual or an added branch)."""
    from matplotlib.patches import Circle
    ax.add_patch(Circle((x, y), r, facecolor="white", edgecolor="black", linewidth=0.8))
    ax.text(x, y, "+", ha="center", va="center", fontsize=10)
    return Box(x, y, 2 * r, 2 * r)


def legend(ax, x: float = 0.2, y: float = 0.3) -> None:
    """Grey = frozen, orange = trained."""
    box(ax, x + 0.35, y, "frozen", w=0.7, h=0.3, fontsize=8)
    box(ax, x + 1.2, y, "trained", w=0.7, h=0.3, kind=TRAINABLE, fontsize=8)


def skip(ax, start: Box, end: Box, offset: float = 1.9) -> None:
    """A residual connection: from ``start``'s top, round the left of the block, into ``end`` (a plus)."""
    x0, y0 = start.x, start.y + start.h / 2 + 0.08
    xl = start.x - offset
    ax.plot([x0, xl, xl], [y0, y0, end.y], color="black", lw=0.8)
    arrow(ax, (xl, end.y), end.left)


def llama_block(ax, d: int = 576, d_ff: int = 1536, heads: int = 9, kv_heads: int = 3, x: float = 5.5,
                y0: float = 0.5, step: float = 0.62) -> dict[str, Box]:
    """One pre-norm Llama decoder layer, bottom to top, as in SmolLM2 (hidden d, MLP width d_ff).

    Returns the boxes by module name: input_layernorm, q_proj, k_proj, v_proj, attention, o_proj,
    residual_1, post_attention_layernorm, gate_proj, up_proj, down_proj, residual_2, and the "input"
    and "output" hidden states.
    """
    head_dim = d // heads
    at: dict[str, Box] = {}
    y = y0
    at["input"] = box(ax, x, y, f"x  (T, {d})", kind=DATA)
    y += step
    at["input_layernorm"] = box(ax, x, y, "RMSNorm")
    y += step
    at["q_proj"] = box(ax, x - 1.5, y, f"q_proj {d}→{d}", w=1.4, fontsize=8)
    at["k_proj"] = box(ax, x, y, f"k_proj {d}→{kv_heads * head_dim}", w=1.4, fontsize=8)
    at["v_proj"] = box(ax, x + 1.5, y, f"v_proj {d}→{kv_heads * head_dim}", w=1.4, fontsize=8)
    y += step
    at["attention"] = box(ax, x, y, f"attention ({heads} heads, {kv_heads} kv)", w=2.6)
    y += step
    at["o_proj"] = box(ax, x, y, f"o_proj {d}→{d}")
    y += step
    at["residual_1"] = plus(ax, x, y)
    y += step
    at["post_attention_layernorm"] = box(ax, x, y, "RMSNorm")
    y += step
    at["gate_proj"] = box(ax, x - 0.85, y, f"gate_proj {d}→{d_ff}", w=1.6, fontsize=8)
    at["up_proj"] = box(ax, x + 0.85, y, f"up_proj {d}→{d_ff}", w=1.6, fontsize=8)
    y += step
    at["down_proj"] = box(ax, x, y, f"SiLU(gate)·up → down_proj {d_ff}→{d}", w=2.8, fontsize=8)
    y += step
    at["residual_2"] = plus(ax, x, y)
    y += step
    at["output"] = box(ax, x, y, f"h  (T, {d})", kind=DATA)
    for a, b in [("input", "input_layernorm"), ("input_layernorm", "q_proj"), ("input_layernorm", "k_proj"),
                 ("input_layernorm", "v_proj"), ("q_proj", "attention"), ("k_proj", "attention"),
                 ("v_proj", "attention"), ("attention", "o_proj"), ("o_proj", "residual_1"),
                 ("residual_1", "post_attention_layernorm"), ("post_attention_layernorm", "gate_proj"),
                 ("post_attention_layernorm", "up_proj"), ("gate_proj", "down_proj"), ("up_proj", "down_proj"),
                 ("down_proj", "residual_2"), ("residual_2", "output")]:
        arrow(ax, at[a].top, at[b].bottom)
    skip(ax, at["input"], at["residual_1"], offset=2.3)
    skip(ax, at["residual_1"], at["residual_2"], offset=2.3)
    return at


def bert_layer(ax, d: int = 384, d_ff: int = 1536, heads: int = 12, x: float = 5.5, y0: float = 0.5,
               step: float = 0.62) -> dict[str, Box]:
    """One post-norm BERT encoder layer, bottom to top, as in MiniLM (hidden d, FFN width d_ff).

    Returns boxes: input, query, key, value, attention, attention.output.dense, residual_1,
    attention.output.LayerNorm, intermediate.dense, output.dense, residual_2, output.LayerNorm, output.
    """
    at: dict[str, Box] = {}
    y = y0
    at["input"] = box(ax, x, y, f"x  (T, {d})", kind=DATA)
    y += step
    at["query"] = box(ax, x - 1.5, y, f"query {d}→{d}", w=1.4, fontsize=8)
    at["key"] = box(ax, x, y, f"key {d}→{d}", w=1.4, fontsize=8)
    at["value"] = box(ax, x + 1.5, y, f"value {d}→{d}", w=1.4, fontsize=8)
    y += step
    at["attention"] = box(ax, x, y, f"attention ({heads} heads)", w=2.6)
    y += step
    at["attention.output.dense"] = box(ax, x, y, f"attention.output.dense {d}→{d}", w=2.4, fontsize=8)
    y += step
    at["residual_1"] = plus(ax, x, y)
    y += step
    at["attention.output.LayerNorm"] = box(ax, x, y, "LayerNorm")
    y += step
    at["intermediate.dense"] = box(ax, x, y, f"intermediate.dense {d}→{d_ff}, GELU", w=2.6, fontsize=8)
    y += step
    at["output.dense"] = box(ax, x, y, f"output.dense {d_ff}→{d}", w=2.0, fontsize=8)
    y += step
    at["residual_2"] = plus(ax, x, y)
    y += step
    at["output.LayerNorm"] = box(ax, x, y, "LayerNorm")
    y += step
    at["output"] = box(ax, x, y, f"h  (T, {d})", kind=DATA)
    for a, b in [("input", "query"), ("input", "key"), ("input", "value"), ("query", "attention"),
                 ("key", "attention"), ("value", "attention"), ("attention", "attention.output.dense"),
                 ("attention.output.dense", "residual_1"), ("residual_1", "attention.output.LayerNorm"),
                 ("attention.output.LayerNorm", "intermediate.dense"), ("intermediate.dense", "output.dense"),
                 ("output.dense", "residual_2"), ("residual_2", "output.LayerNorm"), ("output.LayerNorm", "output")]:
        arrow(ax, at[a].top, at[b].bottom)
    skip(ax, at["input"], at["residual_1"], offset=2.3)
    skip(ax, at["attention.output.LayerNorm"], at["residual_2"], offset=2.3)
    return at


def side_branch(ax, target: Box, *boxes: str, label: str | None = None, dx: float = 1.2, side: str = "right",
                kind: str = TRAINABLE, w: float = 1.6) -> list[Box]:
    """Trainable boxes stacked beside ``target`` (e.g. LoRA's A, then B above it), fed from the
    target's input and added to its output; ``label`` is written beside them, away from the block."""
    sign = 1 if side == "right" else -1
    edge = target.x + sign * target.w / 2
    x = edge + sign * (dx + w / 2)
    h = 0.34
    ys = [target.y - h * (len(boxes) - 1) / 2 + i * h * 1.15 for i in range(len(boxes))]
    drawn = [box(ax, x, y, text, w=w, h=h * 0.9, kind=kind, fontsize=8) for y, text in zip(ys, boxes)]
    near = (lambda b: b.left) if side == "right" else (lambda b: b.right)
    arrow(ax, (edge, target.y - target.h / 4), near(drawn[0]))
    arrow(ax, near(drawn[-1]), (edge, target.y + target.h / 4))
    if label:
        ax.text(x + sign * (w / 2 + 0.1), target.y, label, fontsize=8, va="center",
                ha="left" if side == "right" else "right")
    return drawn


def mark_trained(ax, boxes, kind: str = TRAINABLE) -> None:
    """Refill boxes already drawn (e.g. those ``bert_layer`` returned) with ``kind``: for full
    fine-tuning, where the block's own weights are the ones trained."""
    from matplotlib.patches import FancyBboxPatch
    corners = {(round(b.x - b.w / 2, 6), round(b.y - b.h / 2, 6)) for b in boxes}
    for patch in ax.patches:
        if isinstance(patch, FancyBboxPatch) and (round(patch.get_x(), 6), round(patch.get_y(), 6)) in corners:
            patch.set_facecolor(kind)

"""LLM-Adapters: series and parallel bottleneck adapters on a decoder's linear layers (Hu et al. 2023,
"LLM-Adapters: An Adapter Family for Parameter-Efficient Fine-Tuning of Large Language Models",
arXiv 2304.01933).

The paper compares four adapter families on LLaMA, BLOOM and GPT-J at their best placements. Two of
them are bottleneck adapters attached to single ``nn.Linear`` layers chosen by name (the official
code's ``BottleneckConfig``, ``peft/src/peft/tuners/bottleneck.py`` in AGI-Edgerunners/LLM-Adapters):
with D: d -> b and U: b -> d' (no biases), f = tanh and a scale s (1, or ``"learned"``),

* **series**, after the layer (``"output_adapter"``):   y = h + s U f(D h),     h = W x + b;
  before the layer (``"mh_adapter"``):                   y = W (x + s U f(D x)) + b;
* **parallel** (``"parallel_adapter"``):                 y = W x + b + s U f(D x),

with dropout on the adapter's input. The paper's placement study (§4.1, math) finds the series
adapter best after the MLP (``down_proj``'s output, the default here), the parallel adapter best in
the MLP (``up_proj`` and ``down_proj``), and LoRA best on attention and MLP (q, k, v, up, down).
Which side a series adapter sits on follows the official code's table for Llama: ``gate_proj`` and
``up_proj`` get theirs on the input (an adapter each, reading the same normalised vector), every
other target on the output (``input_side``).

A parallel adapter with f = identity is LoRA with A = D, B = U and scaling s: ``lora_weights``
gives those factors, and the notebook checks the identity against peft's ``LoraConfig``.

The official code's details, kept: the adapter weights are float32 and the branch runs in float32,
cast back to the layer's dtype before the scale multiplies it; ``init="bert"`` (its default) draws D
and U from N(0, 0.02²), so the model is *not* the identity at init; ``init="mam"`` (its
``"mam_adapter"``) is Kaiming-uniform D and zero U, the identity. Two departures of the released
scripts from the paper are not followed here: ``finetune.py`` ignores ``--lora_target_modules`` (the
LoRA arm silently uses ``--target_modules``), and the LLaMA math command puts the series adapter on
``gate_proj``/``up_proj``, before the MLP, against the paper's finding; the notebook measures both
placements.

Trainable parameters: b (d_in + d_out) per adapted layer, + 1 for a learned s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..core import AdapterConfig, AdapterLayer, register
from ..core.targets import matches
from .bottleneck import NON_LINEARITIES, check_non_linearity

PLACEMENTS = {"series": ["down_proj"], "parallel": ["up_proj", "down_proj"]}   # the paper's best on a decoder
INPUT_SIDE = ["gate_proj", "up_proj"]                                        # the official code's "mh_adapter"


class BottleneckLinear(AdapterLayer):
    """A frozen ``nn.Linear`` with a bottleneck adapter in series after it (``where="output"``), in
    series before it (``"input"``), or in parallel (``"parallel"``)."""

    def __init__(self, base_layer: nn.Linear, where: str, bottleneck_size: int, non_linearity: str = "tanh",
                 dropout: float = 0.0, scaling: float | str = 1.0, init: str = "bert"):
        super().__init__(base_layer)
        d_in, d_out = base_layer.in_features, base_layer.out_features
        d_in, d_out = {"input": (d_in, d_in), "output": (d_out, d_out), "parallel": (d_in, d_out)}[where]
        device = base_layer.weight.device
        self.where, self.f = where, NON_LINEARITIES[non_linearity]
        self.dropout = nn.Dropout(dropout)
        self.down = nn.Linear(d_in, bottleneck_size, bias=False, device=device)     # D, float32
        self.up = nn.Linear(bottleneck_size, d_out, bias=False, device=device)      # U, float32
        if scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1, device=device))
        else:
            self.scaling = float(scaling)
        if init == "bert":
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.normal_(self.up.weight, std=0.02)
        else:                                   # "mam": the LoRA init, exactly the identity
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        self.train(base_layer.training)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """s U f(D drop(x)), computed in float32 and cast back to x's dtype before the scale."""
        return self.up(self.f(self.down(self.dropout(x.float())))).to(x.dtype) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.where == "input":
            return self.base_layer(x + self.branch(x))
        h = self.base_layer(x)
        return h + self.branch(h if self.where == "output" else x)

    def lora_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) = (D, U): the LoRA this parallel adapter is when f is the identity (scaling s)."""
        if self.where != "parallel":
            raise ValueError(f"only a parallel adapter is a LoRA; this one is in series ({self.where} side)")
        return self.down.weight, self.up.weight


@register("llm_adapter", family="additive", paper="hu2023llmadapters")
@dataclass
class LLMAdapterConfig(AdapterConfig):
    """A series or parallel bottleneck adapter on named linear layers, as LLM-Adapters' ``BottleneckConfig``.

    Args:
        kind: "series" (AdapterH/AdapterP of the paper) or "parallel".
        bottleneck_size: b (the paper: 256 on 7B models).
        target_modules: the linear layers; default ``PLACEMENTS[kind]``, the paper's best placement.
        input_side: for a series adapter, the targets whose adapter acts on their input (the rest
            act on their output); the official code's choice for Llama.
        non_linearity: f ("tanh", the official default; any of ``bottleneck.NON_LINEARITIES``).
        dropout: on the adapter's input (the official ``adapter_dropout``; its scripts use 0).
        scaling: s, a number or "learned" (a trained scalar starting at 1).
        init: "bert" (N(0, 0.02²) on D and U, the official default) or "mam" (Kaiming D, zero U).
    """
    kind: str = "series"
    bottleneck_size: int = 256
    target_modules: list[str] | str | None = None
    input_side: list[str] = field(default_factory=lambda: list(INPUT_SIDE))
    non_linearity: str = "tanh"
    dropout: float = 0.0
    scaling: float | str = 1.0
    init: str = "bert"

    identity_at_init: ClassVar[bool | str] = ("the official init ('bert') draws both projections from N(0, 0.02²); "
                                              "init='mam' starts at the identity")
    mergeable: ClassVar[bool | str] = "the adapter is non-linear (f between D and U), so it does not fold into W"

    def __post_init__(self):
        if self.kind not in PLACEMENTS:
            raise ValueError(f"kind must be 'series' or 'parallel', got {self.kind!r}")
        if self.target_modules is None:
            self.target_modules = list(PLACEMENTS[self.kind])
        if not isinstance(self.bottleneck_size, int) or self.bottleneck_size < 1:
            raise ValueError(f"bottleneck_size must be a positive integer, got {self.bottleneck_size!r}")
        check_non_linearity(self.non_linearity)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.scaling != "learned" and not (isinstance(self.scaling, (int, float)) and math.isfinite(self.scaling)):
            raise ValueError(f"scaling must be a finite number or 'learned', got {self.scaling!r}")
        if self.init not in ("bert", "mam"):
            raise ValueError(f"init must be 'bert' (the official default) or 'mam', got {self.init!r}")

    def make_layer(self, name: str, module: nn.Linear) -> BottleneckLinear:
        where = "parallel" if self.kind == "parallel" else "input" if matches(name, self.input_side) else "output"
        return BottleneckLinear(module, where, self.bottleneck_size, self.non_linearity, self.dropout, self.scaling,
                                self.init)

    @classmethod
    def examples(cls):
        return [("llama", cls(kind="parallel", bottleneck_size=8, scaling="learned", init="mam")),
                ("llama", cls(kind="series", bottleneck_size=8, target_modules=["gate_proj", "up_proj"],
                              scaling=4.0, init="mam")),
                ("llama", cls(bottleneck_size=16, scaling=4.0, dropout=0.1)),
                ("bert", cls(kind="parallel", bottleneck_size=4, target_modules=["intermediate.dense", "output.dense"],
                             modules_to_save=["classifier"]))]

    @classmethod
    def invalid_examples(cls):
        return [{"kind": "prefix"}, {"bottleneck_size": 0}, {"non_linearity": "sigmoidal"}, {"dropout": 1.0},
                {"scaling": "fixed"}, {"init": "xavier"}]


def parameter_count(kind: str, bottleneck_size: int, shapes: dict[str, tuple[int, int]], layers: int,
                    targets: list[str] | None = None) -> int:
    """Trainable parameters of ``LLMAdapterConfig(kind, bottleneck_size, targets)`` on a model with
    ``layers`` blocks whose linear layers have ``shapes`` {name: (d_in, d_out)}: b (d_in + d_out) per
    parallel adapter, 2 b d per series adapter (d the side it reads)."""
    total = 0
    for name in targets or PLACEMENTS[kind]:
        d_in, d_out = shapes[name]
        if kind == "parallel":
            total += bottleneck_size * (d_in + d_out)
        else:
            d = d_in if name in INPUT_SIDE else d_out
            total += 2 * bottleneck_size * d
    return layers * total

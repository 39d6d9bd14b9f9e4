"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022, arXiv 2205.05638).

Learned vectors rescale three activations of every Transformer block (the paper's Section 3.3):
the keys and values in attention and the feed-forward network's intermediate activation,

    softmax(Q (l_k ⊙ K)ᵀ / √d_k) (l_v ⊙ V)        and        (l_ff ⊙ γ(W_1 x)) W_2,

with l_k, l_v ∈ R^{d_k}, l_ff ∈ R^{d_ff}, broadcast over the positions. Each l starts at 1, so the
adapted model starts identical to the base. On a linear layer y = W x + b that is one of two places:

* output scaling (keys, values: ``k_proj``, ``v_proj``): y = l ⊙ (W x + b), l ∈ R^{d_out};
* input scaling (the feed-forward's second matrix, ``down_proj``): y = W (l ⊙ x) + b, l ∈ R^{d_in}.
  In Llama's gated FFN, γ(W_1 x) = silu(W_gate x) ⊙ (W_up x) is exactly ``down_proj``'s input.

Both fold into the weight: W ← diag(l) W, b ← l ⊙ b (output), or W ← W diag(l) (input), so inference
costs nothing extra. Unmerging divides by l, so it needs every entry non-zero.

peft (``IA3Config``): the same forward and merge (``feedforward_modules`` are the input-scaled
targets, a subset of ``target_modules``); its vectors are shaped (d_out, 1) or (1, d_in), ours are
flat (``interop.peft`` reshapes); its unmerge divides by l + 1e-8, ours by l (exact, refused at 0).
The paper's official code (r-three/t-few, ``lora.py`` with ``lora_scaling_rank=1``) scales the
*output* of T5's ``wi_1`` rather than the input of ``wo``: for T5 v1.1's gated FFN the same thing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..blocks.lowrank import adapter_like
from ..core import AdapterConfig, AdapterLayer, register
from ..core.targets import find_targets, matches

DEFAULT_TARGETS = {"llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),   # peft's defaults too
                   "bert": (["key", "value", "output.dense"], ["output.dense"])}


class IA3Linear(AdapterLayer):
    """x -> l ⊙ (W x + b) (``on_input=False``) or W (l ⊙ x) + b (``on_input=True``), around a frozen
    ``nn.Linear``; l starts at 1."""

    def __init__(self, base_layer: nn.Linear, on_input: bool):
        super().__init__(base_layer)
        self.on_input = on_input
        size = base_layer.in_features if on_input else base_layer.out_features
        self.l = nn.Parameter(torch.ones(size, **adapter_like(base_layer)))
        self.train(base_layer.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.on_input:
            return self.base_layer((x.to(self.l.dtype) * self.l).to(x.dtype))    # round once, as peft
        result = self.base_layer(x)
        return (result * self.l).to(result.dtype)

    def _merge(self) -> None:
        W, b, l = self.base_layer.weight, self.base_layer.bias, self.l.detach()
        if self.on_input:
            W.data *= l.to(W.dtype)                     # W diag(l): column j times l_j
        else:
            W.data *= l.to(W.dtype)[:, None]            # diag(l) W: row i times l_i
            if b is not None:
                b.data *= l.to(b.dtype)

    def _unmerge(self) -> None:
        l = self.l.detach()
        if (l == 0).any():
            raise ValueError(f"cannot unmerge (IA)³: {int((l == 0).sum())} entries of l are 0, so the merged "
                             "weight lost those rows or columns; reload the base weights instead")
        W, b = self.base_layer.weight, self.base_layer.bias
        if self.on_input:
            W.data /= l.to(W.dtype)
        else:
            W.data /= l.to(W.dtype)[:, None]
            if b is not None:
                b.data /= l.to(b.dtype)


@register("ia3", family="additive", paper="liu2022fewshot")
@dataclass
class IA3Config(AdapterConfig):
    """(IA)³'s choices: which linear layers get a vector, and which of them scale their input.

    Args:
        target_modules: the layers (default: Llama's keys, values and FFN output, as the paper and peft).
        feedforward_modules: the targets whose *input* is scaled (the FFN's second matrix); the rest
            scale their output. Must select a subset of ``target_modules``.

    peft's ``IA3Config`` has the same two fields (and ``init_ia3_weights=True``: ours always starts at 1).
    """
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS["llama"][0]))
    feedforward_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS["llama"][1]))

    mergeable: ClassVar[bool | str] = True

    def __post_init__(self):
        if isinstance(self.feedforward_modules, (list, tuple)) and isinstance(self.target_modules, (list, tuple)):
            stray = [f for f in self.feedforward_modules if f not in self.target_modules]
            if stray:
                raise ValueError(f"feedforward_modules {stray} are not in target_modules {list(self.target_modules)}: "
                                 "the feed-forward layers must be targets too")

    def inject(self, model: nn.Module) -> None:
        targets = set(find_targets(model, self.target_modules))
        stray = [n for n, _ in model.named_modules() if n and matches(n, self.feedforward_modules) and n not in targets]
        if stray:          # a regex feedforward_modules is checked here, on the model's names
            raise ValueError(f"feedforward_modules selects {stray[:3]}, which target_modules does not")
        super().inject(model)

    def make_layer(self, name: str, module: nn.Linear) -> IA3Linear:
        return IA3Linear(module, on_input=matches(name, self.feedforward_modules))

    @classmethod
    def examples(cls):
        return [("llama", cls()),
                ("llama", cls(target_modules=["q_proj", "up_proj", "down_proj"], feedforward_modules=["down_proj"])),
                ("bert", cls(target_modules=DEFAULT_TARGETS["bert"][0], feedforward_modules=DEFAULT_TARGETS["bert"][1],
                             modules_to_save=["classifier"]))]

    @classmethod
    def invalid_examples(cls):
        return [{"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}]

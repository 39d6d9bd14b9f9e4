"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", arXiv 1902.00751).

An adapter is a small bottleneck MLP with its own skip connection (paper, Figure 2):

    A(h) = h + W_up f(W_down h + b_down) + b_up,     W_down: m x d,  W_up: d x m,  m << d

with f a non-linearity (GELU in the official code, google-research/adapter-bert). The weights are
drawn from a zero-mean Gaussian with a small std (the paper: 1e-2, truncated at two standard
deviations; the official code's default is 1e-3) and the biases are zero, so A(h) ~ h at init: the
adapted network starts close to the pretrained one (near identity, not exactly).

Placement ("houlsby", the paper's): two adapters per transformer layer, one on the output of the
attention block's output projection and one on the output of the feed-forward block, each
*before* the residual add (and, in BERT, before the LayerNorm that follows it):

    BERT (post-norm)   h1 = LN1(x  + A1(W_o attn(x)))            wrap ``attention.output.dense``
                       h2 = LN2(h1 + A2(W_2 f(W_1 h1)))          wrap ``output.dense``
    Llama (pre-norm)   h1 = x  + A1(o_proj(attn(RMSNorm1(x))))   wrap ``self_attn.o_proj``
                       h2 = h1 + A2(down_proj(mlp(RMSNorm2(h1))))   wrap ``mlp.down_proj``

Wrapping the output linear does exactly this: BertSelfOutput / BertOutput apply dropout, the
residual and the LayerNorm to whatever the dense layer returns (dropout acts after the adapter here,
while adapter-bert applies it before; with dropout off, as in eval mode, the two are the same).

Besides the adapters the paper trains the layer normalisation parameters (and the task head).
``train_layer_norms=True`` does that through the core's ``extra_trainable``: in BERT every LayerNorm
(the two per layer and the embeddings'); in Llama, which is pre-norm and has no norm after the
residual add, the RMSNorm weights ``input_layernorm``, ``post_attention_layernorm`` and the final
``model.norm``. The head is not trained unless named in ``modules_to_save`` (e.g. ["classifier"]).

Other placements:

* "pfeiffer": a single adapter after the feed-forward block only (Pfeiffer et al. 2021, AdapterFusion).
* "parallel": the adapter reads the *input* of the feed-forward block and its output is added to
  the block's output (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer
  Learning"):  FFN'(x) = FFN(x) + W_up f(W_down x + b_down) + b_up. On Llama it wraps ``mlp``; on
  BERT it wraps ``output`` (BertOutput), whose forward gets the FFN input as ``input_tensor``.

Trainable parameters per adapter: 2dm + d + m (two matrices, two biases; ``bottleneck.parameter_count``);
per layer, twice that for "houlsby". The AdapterHub ``adapters`` library (1.3.0) is a second reference. It pins transformers 4.57,
so ``interop.adapterhub`` runs it in a subprocess on a cached side env (requirements/adapterhub.txt).
On a tiny BERT and on MiniLM, with random non-trivial adapter, LayerNorm and head values, the logits,
the gradients and the parameters after 5 AdamW steps are bit-identical to AdapterHub's, with
"houlsby" = ``DoubleSeqBnConfig`` (pass ``non_linearity``: its default is "swish", ours "gelu"),
"pfeiffer" = ``SeqBnConfig(original_ln_before=False)`` (its default feeds the adapter the layer-normed
LN(h + x) instead of h, and applies that LayerNorm again afterwards) and "parallel" =
``ParBnConfig(scaling=1.0)`` (its default scales the adapter's output by 4). AdapterHub, like
adapter-bert, applies the layer's dropout before the adapter; the comparison runs in eval mode.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core import AdapterConfig, AdapterLayer, register
from .bottleneck import Bottleneck, check_non_linearity, float_dtype

# Which modules each placement wraps, per architecture (regexes on the full module name).
PLACEMENT_TARGETS = {
    "bert": {"houlsby": r".*layer\.\d+\.(attention\.output\.dense|output\.dense)",
             "pfeiffer": r".*layer\.\d+\.output\.dense",
             "parallel": r".*layer\.\d+\.output",
             "parallel_attn": r".*layer\.\d+\.attention\.output"},
    "llama": {"houlsby": r".*layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)",
              "pfeiffer": r".*layers\.\d+\.mlp\.down_proj",
              "parallel": r".*layers\.\d+\.mlp",
              "parallel_attn": r".*layers\.\d+\.self_attn"},
}
LAYER_NORMS = r".*[Nn]orm\.(weight|bias)"   # BERT's LayerNorm, Llama's *_layernorm and final norm


def placement_targets(model: nn.Module, placement: str, target_modules=None):
    """``target_modules`` if given, else the modules ``placement`` wraps in this model's architecture."""
    if target_modules is not None:
        return target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = {"bert": "bert", "roberta": "bert", "llama": "llama", "mistral": "llama", "qwen2": "llama"}.get(model_type)
    if family is None:
        raise ValueError(f"no default adapter placement for model type {model_type!r} (known: BERT and "
                         f"Llama families); pass target_modules naming the output layers to wrap")
    return PLACEMENT_TARGETS[family][placement]


class HoulsbyAdapterLinear(AdapterLayer):
    """x -> A(W x + b) = h + Bottleneck(h) with h = base_layer(x): the serial (Houlsby/Pfeiffer) adapter."""

    def __init__(self, base_layer: nn.Linear, m: int, non_linearity: str = "gelu", init_std: float = 1e-2,
                 name: str = "", adapter: nn.Module | None = None):
        super().__init__(base_layer)
        d = base_layer.out_features
        # ``adapter``: another d -> m -> d branch in place of the Bottleneck (Compacter's PHM bottleneck)
        self.adapter = adapter or Bottleneck(d, m, non_linearity, init_std, float_dtype(base_layer),
                                             base_layer.weight.device, name)
        self.train(base_layer.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        return h + self.adapter(h.to(self.adapter.dtype)).to(h.dtype)


class ParallelAdapter(AdapterLayer):
    """h' = h + s * Bottleneck(x): the adapter reads the sub-layer's *input* x (He et al. 2022).

    Wraps a whole sub-layer: Llama's ``mlp`` (forward(x)) or ``self_attn`` (forward(hidden_states, ...)
    returning (output, weights)), or BERT's ``BertOutput`` / ``BertSelfOutput`` (forward(hidden_states,
    input_tensor), which computes LayerNorm(dropout(dense(hidden_states)) + input_tensor); the sub-layer's
    input is ``input_tensor``, so the adapter's output joins before the residual add and the LayerNorm).
    ``scaling``: the fixed s of the scaled parallel adapter, or a ``torch.nn.Parameter`` (a learned s).
    """

    def __init__(self, base_layer: nn.Module, d: int, m: int, non_linearity: str = "gelu",
                 init_std: float = 1e-2, name: str = "", scaling: float | nn.Parameter = 1.0):
        super().__init__(base_layer)
        weight = next(base_layer.parameters())
        self.adapter = Bottleneck(d, m, non_linearity, init_std, float_dtype(base_layer), weight.device, name)
        self.scaling = scaling
        self.bert_output = hasattr(base_layer, "LayerNorm") and hasattr(base_layer, "dense")
        self.train(base_layer.training)

    def delta(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (self.adapter(x.to(self.adapter.dtype)) * self.scaling).to(dtype)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.bert_output:   # LN(dropout(W a) + s Bottleneck(x) + x), x = the sub-layer's input
            x = args[0] if args else kwargs["input_tensor"]
            b = self.base_layer
            out = b.dropout(b.dense(hidden_states))
            return b.LayerNorm(out + self.delta(x, out.dtype) + x)
        out = self.base_layer(hidden_states, *args, **kwargs)
        if isinstance(out, tuple):   # Llama attention: (output, attention weights)
            return (out[0] + self.delta(hidden_states, out[0].dtype), *out[1:])
        return out + self.delta(hidden_states, out.dtype)


@register("houlsby", family="additive", paper="houlsby2019parameterefficient")
@dataclass
class HoulsbyConfig(AdapterConfig):
    """Bottleneck adapters. ``m`` is the paper's bottleneck size (adapter size).

    Args:
        m: bottleneck width, 1 <= m <= d (the paper uses 8, 64 or 256 on BERT-Large).
        non_linearity: "gelu" (the official code), "relu", "swish"/"silu" or "tanh".
        init_std: std of the truncated-normal init of W_down and W_up (paper 1e-2; official code 1e-3).
        placement: "houlsby" (two per layer), "pfeiffer" (after the FFN) or "parallel" (He et al. 2022).
        train_layer_norms: also train every layer norm, as the paper does (adds their names to
            ``extra_trainable``).
        target_modules: None picks the modules for ``placement`` from the model type (BERT or Llama
            family); give names or a regex to place adapters elsewhere.
    """
    target_modules: list[str] | str | None = None
    m: int = 64
    non_linearity: str = "gelu"
    init_std: float = 1e-2
    placement: str = "houlsby"
    train_layer_norms: bool = True

    wraps: ClassVar[tuple] = (nn.Module,)
    identity_at_init: ClassVar = ("near the identity, not exactly: W_down and W_up start as small Gaussians "
                                  "(std init_std), so A(h) = h + O(init_std^2)")
    mergeable: ClassVar = "the bottleneck is non-linear (f between W_down and W_up): it has no weight to fold in"

    def __post_init__(self):
        if not isinstance(self.m, int) or self.m <= 0:
            raise ValueError(f"adapter bottleneck m must be a positive integer, got {self.m!r}")
        if self.placement not in ("houlsby", "pfeiffer", "parallel"):
            raise ValueError(f"placement must be 'houlsby', 'pfeiffer' or 'parallel', got {self.placement!r}")
        check_non_linearity(self.non_linearity)
        self.extra_trainable = list(self.extra_trainable)
        if self.train_layer_norms and LAYER_NORMS not in self.extra_trainable:
            self.extra_trainable.append(LAYER_NORMS)

    def inject(self, model: nn.Module) -> None:
        targets = placement_targets(model, self.placement, self.target_modules)
        AdapterConfig.inject(dataclasses.replace(self, target_modules=targets), model)

    def make_layer(self, name: str, module: nn.Module) -> AdapterLayer:
        if self.placement == "parallel":
            if isinstance(module, nn.Linear):
                raise TypeError(f"placement='parallel' wraps a whole feed-forward block (Llama 'mlp', BERT "
                                f"'output'), not the Linear {name}")
            d = module.dense.out_features if hasattr(module, "dense") else module.down_proj.out_features
            return ParallelAdapter(module, d, self.m, self.non_linearity, self.init_std, name=name)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"placement={self.placement!r} wraps output Linear layers; {name} is a "
                            f"{type(module).__name__}")
        return HoulsbyAdapterLinear(module, self.m, self.non_linearity, self.init_std, name=name)

    @classmethod
    def examples(cls):
        return [("bert", cls(m=8, modules_to_save=["classifier"])),
                ("bert", cls(m=4, placement="parallel", non_linearity="relu", modules_to_save=["classifier"])),
                ("llama", cls(m=4, placement="parallel", non_linearity="relu")),
                ("llama", cls(m=8, placement="pfeiffer", train_layer_norms=False))]

    @classmethod
    def invalid_examples(cls):
        return [{"m": 0}, {"m": 2.5}, {"placement": "serial"}, {"non_linearity": "softmax"}]

"""The unified view of parameter-efficient tuning (He, Zhou, Ma, Berg-Kirkpatrick & Neubig 2022,
"Towards a Unified View of Parameter-Efficient Transfer Learning", arXiv 2110.04366).

Every method of the family computes a modification Δh of a frozen sub-layer's output h and composes
it with h (paper, Table 1). Three choices describe a method: what Δh reads (the sub-layer's input x
or its output h), which sub-layer (attention or feed-forward), and how Δh joins (added, scaled, gated).

**Prefix tuning is a gated parallel adapter** (§3.1, Eqs. 7-9). One attention head with query q = x W_q
reading the context keys K, values V and l prefix rows P_k, P_v computes

    head = softmax(q [P_k; K]^T) [P_v; V]
         = (1 - λ(x)) softmax(q K^T) V  +  λ(x) softmax(q P_k^T) P_v                  (Eq. 7)
    λ(x) = Σ_i exp(q P_k^T)_i / (Σ_i exp(q P_k^T)_i + Σ_j exp(q K^T)_j)             (Eq. 8)

an adapter f(x W_1) W_2 with W_1 = W_q P_k^T, W_2 = P_v and f = softmax, *beside* the attention (it
reads x, not h), per head, composed by the gate λ. ``gated_prefix_attention`` computes the right-hand
side; the notebook checks it against the model's own attention over the prefix.

**The parallel adapter (PA)** reads the sub-layer's input and is added to its output (Table 1):

    h <- h + s * ReLU(x W_down + b_down) W_up + b_up      (s = 1: PA; s = 4: the scaled PA of Table 5)

on the feed-forward block (``position="ffn"``: Llama's ``mlp``, BERT's ``BertOutput``) or on the
attention block (``position="attn"``: Llama's ``self_attn``, BERT's ``BertSelfOutput``), where the
adapter's output joins after W_o and before the residual add (and, in BERT, before the LayerNorm).
``scaling="learned"`` makes s a trained scalar starting at 1 (Table 5's "trainable s"). The paper's
A.3 initialises the scaled PA as LoRA (the official code's ``ffn_adapter_init_option="lora"``):
W_down Kaiming-uniform (a = √5), W_up and both biases zero, so the adapter starts as the identity.

**The MAM adapter** (§4.5): prefix tuning with a short prefix (l = 30, through the reparameterisation
MLP of width 800) on every attention + a scaled PA with a large bottleneck (r = 512, s = 4) on every
feed-forward block. ``MAMConfig`` composes ``prefix_tuning.PrefixEncoder`` and ``ParallelAdapter``.

**Against the references.**

* AdapterHub's plain ``ParBnConfig()`` already is the scaled PA: ``scaling=4.0``,
  ``init_weights="mam_adapter"`` (the LoRA init), ReLU, FFN only; ``ParallelAdapterConfig()`` here with
  ``m = d // reduction_factor`` computes the same numbers (``interop.adapterhub``). Its
  ``scaling="learned"`` is ours; its ``"scaled_par_bn"`` name is not a fixed s.
* ``MAMConfig()`` of AdapterHub = ``PrefixTuningConfig(prefix_length=30, bottleneck_size=800)`` +
  ``ParBnConfig()``, the paper's composition; ours uses our prefix (proven equal to peft's in notebook
  07) on decoder models only, so MAM is for the Llama family here.
* On Llama (``interop.adapterhub``, tests/test_adapterhub.py) AdapterHub departs three times:
  1. its parallel adapter reads the residual stream *before* the block's RMSNorm
     (``post_attention_layernorm``, or ``input_layernorm`` beside attention); the paper's, and ours,
     reads the block's input, the normalised stream. Rewired by hooks to read the residual
     (``interop.adapterhub.reading_the_residual``), our weights give AdapterHub's logits to float32
     rounding, for ``ParBnConfig`` and ``MAMConfig``: that one input is the whole difference. On BERT
     (post-norm) the two inputs are one vector, and there the equality is exact, bit for bit.
  2. its prefix leaves the real tokens at positions 0..T-1; peft's (through the KV cache) puts them
     after the prefix. ``PrefixTuningConfig(positions="from_zero")`` is AdapterHub's convention, and with
     it our flat prefix equals AdapterHub's ``PrefixTuningConfig(flat=True)``: logits, gradients, 5 steps.
  3. under "sdpa" attention, transformers 4.57's default, its prefix attention is another function
     (the comparison runs AdapterHub's Llama in "eager", where it is Eq. 7's); we have not pinned down
     why (with no mask, torch's ``is_causal`` aligns the causal mask to the top left when there are
     more keys than queries, which would hide real tokens from the queries).
* The official code (jxhe/unify-parameter-efficient-tuning) adds its attention PA to the heads'
  concatenation *before* W_o, with a LayerNorm on its input; ours adds after W_o: the same function
  class (W_o is a fixed invertible-or-not linear map absorbed by W_up), another parameterisation.
  Its adapter applies the model's dropout (0.1) after the ReLU; here the adapter has no dropout.

Trainable parameters: 2dm + d + m per adapter (+1 for a learned s), as Houlsby's; prefix: l x 2 x
(n_kv_heads x head_dim) per layer once the MLP is folded (``prefix_tuning.fold_prefix``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from ..core import AdapterConfig, register
from ..core.targets import check_wraps, find_targets, set_module
from .houlsby import HoulsbyConfig, ParallelAdapter, placement_targets
from .prefix_tuning import PrefixTuningConfig
from .soft_prompt import NOT_IDENTITY


# ----------------------------------------------------------------------------- 1. prefix tuning as a gated adapter

class GatedPrefix(NamedTuple):
    head: torch.Tensor    # (1 - λ) attn + λ delta: the head's output, equal to attention over [P; context]
    gate: torch.Tensor    # λ(x), one per query position and head (Eq. 8)
    attn: torch.Tensor    # softmax(q K^T) V: the frozen head without the prefix
    delta: torch.Tensor   # softmax(q P_k^T) P_v: the "adapter" Δh the prefix adds


def gated_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p_k: torch.Tensor,
                           p_v: torch.Tensor, causal: bool = True) -> GatedPrefix:
    """Eqs. 7-8 for every head: q (batch, heads, T, hd), k and v (batch, kv_heads, T, hd), the prefix
    p_k, p_v (kv_heads, l, hd) or (batch, kv_heads, l, hd). With grouped-query attention each query head
    reads its group's keys and prefix. ``causal``: query t sees context positions <= t (every prefix row)."""
    groups = q.shape[1] // k.shape[1]
    k, v, p_k, p_v = (t.repeat_interleave(groups, dim=-3) for t in (k, v, p_k, p_v))
    scale = q.shape[-1] ** -0.5
    s_prefix = q @ p_k.transpose(-1, -2) * scale                  # (batch, heads, T, l)
    s_context = q @ k.transpose(-1, -2) * scale                   # (batch, heads, T, T)
    if causal:
        T = q.shape[-2]
        s_context = s_context.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), -math.inf)
    # λ = Σ exp(s_prefix) / (Σ exp(s_prefix) + Σ exp(s_context)) = sigmoid(lse(s_prefix) - lse(s_context))
    gate = torch.sigmoid(s_prefix.logsumexp(-1) - s_context.logsumexp(-1)).unsqueeze(-1)
    attn = s_context.softmax(-1) @ v
    delta = s_prefix.softmax(-1) @ p_v
    return GatedPrefix((1 - gate) * attn + gate * delta, gate.squeeze(-1), attn, delta)


# ----------------------------------------------------------------------------- 2. the (scaled) parallel adapter

@torch.no_grad()
def lora_init(adapter: nn.Module) -> None:
    """The paper's A.3 init for the scaled PA (LoRA's): W_down Kaiming-uniform (a=√5), W_up and biases 0."""
    nn.init.kaiming_uniform_(adapter.down.weight, a=math.sqrt(5))
    for t in (adapter.down.bias, adapter.up.weight, adapter.up.bias):
        nn.init.zeros_(t)


@register("parallel_adapter", family="additive", paper="he2021towards", parent="houlsby")
@dataclass
class ParallelAdapterConfig(HoulsbyConfig):
    """Parallel and scaled parallel adapters (He et al. 2022).

    Args:
        m: the bottleneck r (the paper: 512 for the FFN PA of MAM, 16 on GLUE).
        scaling: s, a number (1: PA, 4: the paper's scaled PA) or "learned" (a trained scalar from 1).
        init: "lora" (W_down Kaiming-uniform, the rest zero: exactly the identity at init; the paper's
            choice for the scaled PA) or "houlsby" (both weights small Gaussians of std ``init_std``).
        position: "ffn" (beside the feed-forward block) or "attn" (beside the attention block).
        non_linearity: ReLU in the paper.
        train_layer_norms: False: the paper's code trains only the adapter (and the head, if named in
            ``modules_to_save``).
    """
    m: int = 16
    non_linearity: str = "relu"
    placement: str = "parallel"
    train_layer_norms: bool = False
    scaling: float | str = 4.0
    init: str = "lora"
    position: str = "ffn"

    identity_at_init: ClassVar = True    # the LoRA init (the examples); init="houlsby" is near the identity
    mergeable: ClassVar = HoulsbyConfig.mergeable

    def __post_init__(self):
        if self.placement != "parallel":
            raise ValueError(f"a parallel adapter has placement 'parallel', got {self.placement!r}; for serial "
                             f"adapters use HoulsbyConfig")
        if self.scaling != "learned" and (isinstance(self.scaling, (bool, str)) or not self.scaling > 0):
            raise ValueError(f"scaling must be a positive number or 'learned', got {self.scaling!r}")
        if self.init not in ("lora", "houlsby"):
            raise ValueError(f"init must be 'lora' or 'houlsby', got {self.init!r}")
        if self.position not in ("ffn", "attn"):
            raise ValueError(f"position must be 'ffn' (feed-forward) or 'attn' (attention), got {self.position!r}")
        super().__post_init__()

    def inject(self, model: nn.Module) -> None:
        targets = placement_targets(model, "parallel" if self.position == "ffn" else "parallel_attn",
                                    self.target_modules)
        AdapterConfig.inject(dataclasses.replace(self, target_modules=targets), model)

    def make_layer(self, name: str, module: nn.Module) -> ParallelAdapter:
        if isinstance(module, nn.Linear):
            raise TypeError(f"a parallel adapter wraps a whole sub-layer (Llama 'mlp' or 'self_attn', BERT "
                            f"'output' or 'attention.output'), not the Linear {name}")
        out = getattr(module, "dense", None) or getattr(module, "down_proj", None) or getattr(module, "o_proj", None)
        if out is None:
            raise TypeError(f"{name} ({type(module).__name__}) is not a feed-forward or attention block this "
                            f"adapter knows (it looks for its output projection dense, down_proj or o_proj)")
        weight = next(module.parameters())
        scaling = (nn.Parameter(torch.ones(1, dtype=weight.dtype, device=weight.device))
                   if self.scaling == "learned" else float(self.scaling))
        layer = ParallelAdapter(module, out.out_features, self.m, self.non_linearity, self.init_std, name, scaling)
        if self.init == "lora":
            lora_init(layer.adapter)
        return layer

    @classmethod
    def examples(cls):
        return [("llama", cls(m=4)), ("llama", cls(m=4, scaling="learned", position="attn")),
                ("bert", cls(m=8, scaling=1.0, modules_to_save=["classifier"])),
                ("bert", cls(m=8, position="attn", train_layer_norms=True, modules_to_save=["classifier"]))]

    @classmethod
    def invalid_examples(cls):
        return [{"m": 0}, {"scaling": 0}, {"scaling": "fixed"}, {"init": "zeros"}, {"position": "both"},
                {"placement": "houlsby"}]


# ----------------------------------------------------------------------------- 3. MAM: prefix on attention + scaled PA on FFN

@register("mam", family="additive", paper="he2021towards", parent=("parallel_adapter", "prefix_tuning"))
@dataclass
class MAMConfig(AdapterConfig):
    """The MAM adapter: a prefix of ``num_virtual_tokens`` rows in every attention (Li & Liang's, through
    the MLP of width ``encoder_hidden_size`` while ``prefix_projection``) and a scaled parallel adapter
    (bottleneck ``m``, scale ``scaling``, LoRA init) beside every feed-forward block. Decoder models
    (the prefix enters through the KV cache, ``prefix_tuning``)."""
    target_modules: list[str] | str | None = None    # the feed-forward blocks; None: the model's ``mlp``s
    num_virtual_tokens: int = 30
    prefix_projection: bool = True
    encoder_hidden_size: int | None = 800
    m: int = 512
    scaling: float | str = 4.0
    non_linearity: str = "relu"
    positions: str = "after_prefix"       # the prefix's token positions, see prefix_tuning's docstring

    wraps: ClassVar[tuple] = (nn.Module,)
    identity_at_init: ClassVar = NOT_IDENTITY
    mergeable: ClassVar = HoulsbyConfig.mergeable

    def parts(self) -> tuple[PrefixTuningConfig, ParallelAdapterConfig]:
        return (PrefixTuningConfig(num_virtual_tokens=self.num_virtual_tokens, prefix_projection=self.prefix_projection,
                                   encoder_hidden_size=self.encoder_hidden_size, positions=self.positions),
                ParallelAdapterConfig(target_modules=self.target_modules, m=self.m, scaling=self.scaling,
                                      non_linearity=self.non_linearity))

    def __post_init__(self):
        self.parts()   # each part checks its own hyper-parameters

    def inject(self, model: nn.Module) -> None:
        prefix, parallel = self.parts()
        targets = find_targets(model, placement_targets(model, "parallel", self.target_modules))
        check_wraps(model, targets, self.wraps, self.method)
        layers = {n: parallel.make_layer(n, model.get_submodule(n)) for n in targets}   # all built first
        prefix.inject(model)                   # raises, before any change, on a model it does not support
        for name, layer in layers.items():
            set_module(model, name, layer)

    @classmethod
    def examples(cls):
        return [("llama", cls(num_virtual_tokens=3, encoder_hidden_size=8, m=8)),
                ("llama", cls(num_virtual_tokens=2, prefix_projection=False, encoder_hidden_size=None, m=4,
                              scaling="learned"))]

    @classmethod
    def invalid_examples(cls):
        return [{"num_virtual_tokens": 0}, {"m": -1}, {"scaling": -4.0}]

"""LLaMA-Adapter: adaption prompts with zero-init attention (Zhang et al. 2023, arXiv 2303.16199).

In each of the top L layers a learned prompt P_l (K tokens of width d) is read by the layer's own
attention. With the frozen projections, the prompt's keys and values are K_P = P_l W_k and
V_P = P_l W_v (no position: they carry no rotary embedding, as in the official code), and a query
Q_t scores the prompt and the M + 1 tokens up to t separately (Section 3.2, Eqs. 6-8):

    S_K = Q_t K_Pᵀ / √C,      S_{M+1} = Q_t K_{≤t}ᵀ / √C
    S_g = [softmax(S_K) · tanh(g_l);  softmax(S_{M+1})]             (Eq. 8, zero-init attention)
    o_t = W_o (S_g [V_P; V_{≤t}])

g_l is a gate per head (the official ``alpaca_finetuning_v1/llama/model.py``: ``zeros(1, n_heads,
1, 1)``, through tanh), zero at the start, so each adapted layer starts as the frozen one. Because
the two softmaxes are separate, the output is the frozen attention plus a gated term,

    o_t = W_o softmax(S_{M+1}) V  +  W_o (tanh(g_l) ⊙ softmax(S_K) V_P)     (per head, then W_o)

which is how it is computed here: the frozen attention module runs unchanged (any attention
kernel, the KV cache included) and the prompt's term is added. With grouped-query attention
(SmolLM2: 9 query heads, 3 key/value heads), a query head reads the prompt keys of its key/value
head, as it reads the tokens'.

peft (``AdaptionPromptConfig``) computes the same with one gate per layer, a scalar used as it is
(no tanh): ``gate="scalar"`` is that variant. At g = 0 both are the base model; once g moves they
differ (tanh(g) < g, and the paper's heads move apart). The prompt starts as N(0, 1), as the
official ``nn.Embedding`` and peft. Not mergeable: the prompt's term depends on each query.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core import AdapterConfig, AdapterLayer, register
from ..core.targets import find_targets, set_module

GATES = ("tanh_per_head", "scalar")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class AdaptionPromptAttention(AdapterLayer):
    """A Llama attention module (``base_layer``) that also reads a learned prompt through a zero-init gate."""

    def __init__(self, base_layer: nn.Module, adapter_len: int, gate: str):
        super().__init__(base_layer)
        config = base_layer.config
        self.num_heads, self.head_dim = config.num_attention_heads, base_layer.head_dim
        self.kv_heads = config.num_key_value_heads
        self.gate_kind = gate
        weight = base_layer.q_proj.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.prompt = nn.Parameter(torch.randn(adapter_len, config.hidden_size, device=weight.device, dtype=dtype))
        self.gate = nn.Parameter(torch.zeros(self.num_heads if gate == "tanh_per_head" else 1,
                                             device=weight.device, dtype=dtype))

    def gate_values(self) -> torch.Tensor:
        """The factor on each head's prompt term: tanh(g_l) per head (the paper), or g (peft's scalar)."""
        return self.gate.tanh() if self.gate_kind == "tanh_per_head" else self.gate

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, **kwargs):
        out, weights = self.base_layer(hidden_states, position_embeddings=position_embeddings, **kwargs)
        attn = self.base_layer
        B, T, _ = hidden_states.shape
        q = attn.q_proj(hidden_states).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)   # (B, H, T, C)
        cos, sin = position_embeddings
        q = q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)          # the queries carry RoPE
        prompt = self.prompt[None].to(hidden_states.dtype)                                        # (1, K, d)
        K = prompt.shape[1]
        heads = lambda t: t.view(1, K, self.kv_heads, self.head_dim).repeat(B, 1, 1, 1).transpose(1, 2)  # noqa: E731
        group = self.num_heads // self.kv_heads                                                  # GQA: H / H_kv
        k_p = heads(attn.k_proj(prompt)).repeat_interleave(group, 1)                              # (B, H, K, C)
        v_p = heads(attn.v_proj(prompt)).repeat_interleave(group, 1)
        s_k = q @ k_p.transpose(-1, -2) / math.sqrt(self.head_dim)                                # (B, H, T, K)
        probs = F.softmax(s_k, dim=-1, dtype=torch.float32).to(q.dtype)                           # Eq. 8's softmax(S_K)
        gated = self.gate_values().to(q.dtype).view(-1, 1, 1) * probs                             # · tanh(g_l)
        term = (gated @ v_p).transpose(1, 2).reshape(B, T, -1)                                    # (B, T, H·C)
        return out + attn.o_proj(term), weights


@register("llama_adapter", family="additive", paper="zhang2023llamaadapter")
@dataclass
class LlamaAdapterConfig(AdapterConfig):
    """LLaMA-Adapter's choices.

    Args:
        adapter_len: K, the prompt's tokens per adapted layer (the official code: 10).
        adapter_layers: L, how many of the top layers get a prompt (official: 30 of LLaMA-7B's 32).
        gate: "tanh_per_head" (the paper and official code) or "scalar" (peft's ``AdaptionPromptConfig``).
        target_modules: the attention modules' name (Llama's ``self_attn``); the top L are adapted.

    peft's ``AdaptionPromptConfig(adapter_len, adapter_layers)`` is ``gate="scalar"``.
    """
    adapter_len: int = 10
    adapter_layers: int = 8
    gate: str = "tanh_per_head"
    target_modules: list[str] | str = field(default_factory=lambda: ["self_attn"])

    wraps: ClassVar[tuple[type, ...]] = (nn.Module,)
    mergeable: ClassVar[bool | str] = ("the prompt's term depends on every query (a softmax over the prompt's keys), "
                                       "so it does not fold into a weight")

    def __post_init__(self):
        for name in ("adapter_len", "adapter_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")

    def inject(self, model: nn.Module) -> None:
        names = find_targets(model, self.target_modules)
        bad = [n for n in names if not all(hasattr(model.get_submodule(n), p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))]
        if bad:
            raise ValueError(f"{bad[0]} has no q_proj, k_proj, v_proj and o_proj: LLaMA-Adapter needs Llama-style attention")
        if self.adapter_layers > len(names):
            raise ValueError(f"adapter_layers = {self.adapter_layers}, but the model has {len(names)} attention layers")
        layers = {n: self.make_layer(n, model.get_submodule(n)) for n in names[-self.adapter_layers:]}   # the top L
        for name, layer in layers.items():
            set_module(model, name, layer)

    def make_layer(self, name: str, module: nn.Module) -> AdaptionPromptAttention:
        return AdaptionPromptAttention(module, self.adapter_len, self.gate)

    @classmethod
    def examples(cls):
        return [("llama", cls(adapter_len=4, adapter_layers=1)),
                ("llama", cls(adapter_len=3, adapter_layers=2, gate="scalar"))]

    @classmethod
    def invalid_examples(cls):
        return [{"adapter_len": 0}, {"adapter_layers": 1.5}, {"gate": "sigmoid"}]

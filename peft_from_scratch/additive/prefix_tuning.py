"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
arXiv 2101.00190).

Every layer's attention gets n extra key/value vectors, P_k and P_v, that the input attends to
(paper, §4.2: h_i = P_theta[i,:] for i in the prefix). They enter through the model's KV cache (a
transformers ``DynamicCache``), as if the model had already read n tokens: a prefix *is* a KV cache.
During training P_theta = MLP_theta(P'_theta) (eq. 5, the reparameterisation,
``prefix_projection=True``); ``fold_prefix`` computes P_theta once and drops the MLP.

peft's projection, Embedding(n, w) -> Linear(w, h) -> tanh -> Linear(h, 2Lw), is the official one,
with h defaulting to w (the paper: 512 for GPT-2, 800 for BART). With grouped query attention (Llama)
the prefix is as wide as the keys, w = n_kv_heads x head_dim, not d, and so is the projection's
embedding. The paper's ``prefix_dropout`` is not in peft (nor here).

**Where the real tokens sit.** The prefix keys are never rotated (RoPE acts on the tokens' keys
only), so the positions of the real tokens matter: through the KV cache they come *after* the
prefix, at n, ..., n + T - 1 (peft's, and ours by default, ``positions="after_prefix"``). AdapterHub
concatenates its prefix to the already rotated keys inside attention and leaves the tokens at 0, ...,
T - 1 (``positions="from_zero"``). Attention among the real tokens depends only on their distances,
the same either way; a query against the prefix keys does not: two different functions on Llama.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn
from transformers import Cache, DynamicCache

from ..core import AdapterConfig, register
from .soft_prompt import NOT_IDENTITY, NOT_MERGEABLE, SoftPrompt, check_n, max_positions

PREFIX_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")   # caches of (batch, kv_heads, seq, head_dim)


class PrefixEncoder(SoftPrompt):
    """P_theta: n rows of L x 2 x (n_kv_heads * head_dim) numbers, the keys and values of every layer.

    Without projection ``embedding`` (n x 2L*w) is P_theta itself. With it, P_theta =
    ``transform``(``embedding``), transform = Linear(w, h) -> tanh -> Linear(h, 2Lw) (paper eq. 5).
    Row layout (peft's): [layer 0 keys | layer 0 values | layer 1 keys | ...], heads inside each.
    """

    def __init__(self, n: int, num_layers: int, kv_heads: int, head_dim: int, projection: bool = False,
                 hidden: int | None = None, max_positions: int | None = None, positions: str = "after_prefix"):
        super().__init__(n, max_positions)
        self.positions = positions
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        width = kv_heads * head_dim
        self.projection = projection
        if projection:
            self.embedding = nn.Embedding(n, width)
            h = hidden or width
            self.transform = nn.Sequential(nn.Linear(width, h), nn.Tanh(), nn.Linear(h, num_layers * 2 * width))
        else:
            self.embedding = nn.Embedding(n, num_layers * 2 * width)

    def prefix(self) -> torch.Tensor:   # (n, 2L * w)
        p = self.embedding.weight
        return self.transform(p) if self.projection else p

    def prefix_cache(self, batch: int, cache: Cache | None = None, dtype: torch.dtype | None = None) -> Cache:
        """The prefix as a KV cache: layer l gets keys/values of shape (batch, kv_heads, n, head_dim).

        ``dtype``: the attention's (the base model's); a float32 prefix on a bf16/fp16 model is cast to
        it, as peft does (``past_key_values.to(base_model_torch_dtype)``): attention needs one dtype.
        Cast after the expansion to the batch, as peft, so the backward sums the batch in float32."""
        n = self.num_virtual_tokens
        kv = self.prefix().view(n, 2 * self.num_layers, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        cache = DynamicCache() if cache is None else cache           # kv: (2L, kv_heads, n, head_dim)
        for layer in range(self.num_layers):
            k, v = (kv[2 * layer + i].unsqueeze(0).expand(batch, -1, -1, -1) for i in (0, 1))
            if dtype is not None:
                k, v = k.to(dtype), v.to(dtype)
            cache.update(k, v, layer)
        return cache

    def rewrite(self, model, kwargs, batch, prefill) -> None:
        n = self.num_virtual_tokens
        if self.positions == "from_zero" and kwargs.get("position_ids") is None:   # the tokens keep 0, 1, ...
            ids = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
            past = 0 if prefill else kwargs["past_key_values"].get_seq_length() - n
            kwargs["position_ids"] = torch.arange(past, past + ids.shape[1], device=ids.device).expand(batch, -1)
        elif self.positions == "after_prefix" and kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + n
        if prefill:
            dtype = model.get_input_embeddings().weight.dtype          # the base model's
            kwargs["past_key_values"] = self.prefix_cache(batch, kwargs.get("past_key_values"), dtype)

    @torch.no_grad()
    def fold(self) -> None:
        """Compute P_theta = MLP(P') once and keep only it (the paper keeps just the prefix after training)."""
        if not self.projection:
            return
        prefix = self.prefix().detach().clone()
        del self.transform
        self.embedding = nn.Embedding.from_pretrained(prefix, freeze=False)
        self.projection = False


@register("prefix_tuning", family="additive", paper="li2021prefix")
@dataclass
class PrefixTuningConfig(AdapterConfig):
    """Prefix tuning.

    Args:
        num_virtual_tokens: n, the prefix length (the paper: 10 for table-to-text).
        prefix_projection: train through the reparameterisation MLP (paper eq. 5); ``fold_prefix``
            removes it afterwards.
        encoder_hidden_size: the MLP's hidden width; None means the key width (peft's default).
        positions: "after_prefix" (the real tokens at n, n + 1, ...: peft's) or "from_zero" (at 0, 1, ...:
            AdapterHub's); see the module docstring.
    """
    target_modules: list[str] | str | None = None
    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    positions: str = "after_prefix"

    identity_at_init: ClassVar = NOT_IDENTITY
    mergeable: ClassVar = NOT_MERGEABLE

    def __post_init__(self):
        check_n(self.num_virtual_tokens)
        if self.positions not in ("after_prefix", "from_zero"):
            raise ValueError(f"positions must be 'after_prefix' (peft's) or 'from_zero' (AdapterHub's), got {self.positions!r}")

    def inject(self, model: nn.Module) -> None:
        config = model.config
        if config.model_type not in PREFIX_MODEL_TYPES:
            raise NotImplementedError(f"prefix tuning supports decoder models whose KV cache holds (batch, kv_heads, "
                                      f"tokens, head_dim) per layer: {', '.join(PREFIX_MODEL_TYPES)}; the model type "
                                      f"{config.model_type!r} is not supported")
        limit = max_positions(model, self.num_virtual_tokens)
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        device = model.get_input_embeddings().weight.device
        PrefixEncoder(self.num_virtual_tokens, config.num_hidden_layers, kv_heads, head_dim, self.prefix_projection,
                      self.encoder_hidden_size, limit, self.positions).to(device).attach(model)

    @classmethod
    def examples(cls):
        return [("llama", cls(num_virtual_tokens=4)), ("llama", cls(num_virtual_tokens=3, prefix_projection=True)),
                ("llama", cls(num_virtual_tokens=2, positions="from_zero"))]

    @classmethod
    def invalid_examples(cls):
        return [{"num_virtual_tokens": 0}, {"num_virtual_tokens": 2.0}, {"positions": "before"}]


def fold_prefix(model: nn.Module) -> None:
    """Replace the reparameterisation MLP by the prefix it computes; the config becomes prefix_projection=False."""
    config = getattr(model, "adapter_config", None)
    if not isinstance(config, PrefixTuningConfig):
        raise ValueError(f"fold_prefix needs a prefix-tuning model, this one has "
                         f"{'no adapter' if config is None else config.method}")
    model.prompt_encoder.fold()
    model.adapter_config = replace(config, prefix_projection=False, encoder_hidden_size=None)

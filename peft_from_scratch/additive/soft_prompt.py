"""The hook prompt tuning, P-tuning and prefix tuning share: n virtual tokens in front of the input.

All three leave every model weight frozen and add n "virtual tokens" that the input attends to.
``add_adapter(model, config)`` attaches the method's encoder as ``model.prompt_encoder`` and a
forward pre-hook that rewrites the call ``model(input_ids, attention_mask, labels, ...)``, as peft's
``PeftModelForCausalLM.forward`` does:

* the attention mask gets n ones in front (the virtual tokens are always visible);
* prompt tuning / P-tuning (``EmbeddingPrompt``): ``inputs_embeds = [P; E(input_ids)]``, labels get
  n times -100 in front (no loss on virtual tokens), position ids are dropped (peft ignores them
  too), so positions run 0..n+T-1;
* prefix tuning: ``past_key_values`` = the prefix cache; given position ids are shifted by n;
* in later generation steps (the cache already holds the prompt) only the mask is extended.

So ``model(...)``, a training loop and ``model.generate(...)`` work unchanged. (Calling
``model.forward`` directly skips the hook, and with it the prompt.)

Padding, and what it does to positions (as in peft; ``tests/test_prompts.py`` checks both against
peft on left- and right-padded batches). The mask hides pad tokens from attention either way. A
forward pass without position ids numbers the positions 0..n+T-1, pad slots included, so a
*left*-padded row's real tokens sit further right than they would alone. ``generate`` passes
position ids computed from the mask (the pad slots skipped): prefix tuning shifts them by n and a
padded row then generates exactly as it would alone; prompt tuning and P-tuning drop them (peft
too: "Position ids are not supported"), so a left-padded row's logits move slightly (2e-3 to 4e-3
on the tiny test Llama) against the same row alone. Right padding (what ``evaluate.label_word_logits``
uses) moves nothing in front of the real tokens.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import Cache

from ..core import ModelAdapter


class SoftPrompt(ModelAdapter):
    """Base of the three: knows n and the model's limits, and rewrites the model's forward arguments.

    Subclasses implement ``rewrite(model, kwargs, batch, prefill)``, which changes ``kwargs`` in place.
    """

    def __init__(self, n: int, max_positions: int | None):
        super().__init__()
        self.num_virtual_tokens = n
        self.max_positions = max_positions

    def pre_forward(self, model, args, kwargs):
        if len(args) > 1:
            raise TypeError("with a soft prompt, call the model with keyword arguments (input_ids=..., "
                            "attention_mask=...); only input_ids may be positional")
        kwargs = dict(kwargs)
        if args:
            kwargs["input_ids"] = args[0]
        n = self.num_virtual_tokens
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        batch, length = (ids if ids is not None else embeds).shape[:2]
        cache = kwargs.get("past_key_values")
        prefill = cache is None or (isinstance(cache, Cache) and cache.get_seq_length() == 0)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError("soft prompts need a 2-D attention_mask (batch, tokens)")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        if prefill and self.max_positions is not None and n + length > self.max_positions:
            raise ValueError(f"{n} virtual tokens + {length} input tokens = {n + length} positions, more than the "
                             f"model's max_position_embeddings={self.max_positions}; shorten the input or the prompt")
        self.rewrite(model, kwargs, batch, prefill)
        return (), kwargs

    def rewrite(self, model: nn.Module, kwargs: dict, batch: int, prefill: bool) -> None:
        raise NotImplementedError


class EmbeddingPrompt(SoftPrompt):
    """A soft prompt prepended to the input embeddings; subclasses give ``prompts()`` (n, d)."""

    def prompts(self) -> torch.Tensor:
        raise NotImplementedError

    def rewrite(self, model, kwargs, batch, prefill) -> None:
        kwargs["position_ids"] = None
        if not prefill:
            return
        n, embeds = self.num_virtual_tokens, kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(kwargs["input_ids"])
        # Expand, then cast (as peft): on a bf16/fp16 model the backward then sums the batch's gradients
        # of a float32 prompt in float32, not in the model's dtype.
        prompts = self.prompts().unsqueeze(0).expand(batch, -1, -1).to(embeds.dtype)   # (batch, n, d)
        kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)                    # (batch, n + T, d)
        kwargs["input_ids"] = None
        if kwargs.get("labels") is not None:
            labels = kwargs["labels"]
            kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)


def max_positions(model: nn.Module, n: int) -> int | None:
    """The model's position limit, checking that n virtual tokens leave room for input."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and n >= limit:
        raise ValueError(f"num_virtual_tokens={n} leaves no room for input: the model's max_position_embeddings "
                         f"is {limit}")
    return limit


def check_n(n) -> None:
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"num_virtual_tokens must be a positive integer, got {n!r}")


# What the contract test is told about all three (``AdapterConfig.identity_at_init`` / ``mergeable``).
NOT_IDENTITY = "the virtual tokens are attended to from the first step: a fresh prompt changes the output"
NOT_MERGEABLE = "the prompt is extra input, not a change of any weight"

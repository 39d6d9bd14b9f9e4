"""Prompt tuning (Lester, Al-Rfou & Constant 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning", arXiv 2104.08691).

A matrix P (n x d), the only trained parameter, is prepended to the input embeddings: the frozen
model reads [P; E(x)] (``soft_prompt.EmbeddingPrompt`` does the prepending, for P-tuning too).

Initialisation, and where peft departs from the paper (peft 0.21.2):

* "random" is peft's RANDOM, ``nn.Embedding``'s N(0, 1); the official code draws U(-0.5, 0.5).
* "vocab" is peft's SAMPLE_VOCAB: embeddings of token ids sampled uniformly from the whole
  vocabulary; the paper samples from the 5,000 most common tokens.
* "text" is peft's TEXT (not in the paper): the text's tokens repeated to fill n, a longer text
  *silently truncated*, as peft does.
* "labels" is the paper's best init, class labels, which peft does not have: each label word's
  mean token embedding, then sampled vocabulary for the rest of the prompt.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core import AdapterConfig, register
from ..core.pretrained import load_tokenizer
from .soft_prompt import NOT_IDENTITY, NOT_MERGEABLE, EmbeddingPrompt, check_n, max_positions

INITS = ("random", "vocab", "text", "labels")


class PromptEmbedding(EmbeddingPrompt):
    """The prompt P (n x d), stored as ``embedding`` (an nn.Embedding, float32, as peft keeps it)."""

    def __init__(self, n: int, d: int, max_positions: int | None = None):
        super().__init__(n, max_positions)
        self.embedding = nn.Embedding(n, d)   # N(0, 1) init: peft's RANDOM

    def prompts(self) -> torch.Tensor:        # (n, d)
        return self.embedding.weight


@register("prompt_tuning", family="additive", paper="lester2021power")
@dataclass
class PromptTuningConfig(AdapterConfig):
    """Prompt tuning.

    Args:
        num_virtual_tokens: n, the prompt length (the paper's default is 100).
        init: "random", "vocab", "text" or "labels" (module docstring).
        init_text / label_words: for "text" / "labels".
        tokenizer_name_or_path: tokenizer for "text" and "labels" (a folder, a hub id, or an offline
            model name such as ``models.SMOLLM2``).
    """
    target_modules: list[str] | str | None = None   # unused: a model-level method
    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    label_words: list[str] | None = None
    tokenizer_name_or_path: str | None = None

    identity_at_init: ClassVar = NOT_IDENTITY
    mergeable: ClassVar = NOT_MERGEABLE

    def __post_init__(self):
        check_n(self.num_virtual_tokens)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(map(repr, INITS))}, got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise ValueError("init='text' needs init_text, the text whose token embeddings start the prompt")
        if self.init == "labels" and not self.label_words:
            raise ValueError("init='labels' needs label_words, e.g. ['negative', 'positive']")
        if self.init in ("text", "labels") and not self.tokenizer_name_or_path:
            raise ValueError(f"init={self.init!r} needs tokenizer_name_or_path to turn words into token ids")
        if self.init == "labels" and len(self.label_words) > self.num_virtual_tokens:
            raise ValueError(f"{len(self.label_words)} label words do not fit {self.num_virtual_tokens} virtual tokens")

    def inject(self, model: nn.Module) -> None:
        n = self.num_virtual_tokens
        limit = max_positions(model, n)
        words = model.get_input_embeddings()
        encoder = PromptEmbedding(n, words.embedding_dim, limit).to(words.weight.device)
        init = self.initial_prompt(words)
        if init is not None:
            encoder.embedding.weight.data.copy_(init)
        encoder.attach(model)

    @torch.no_grad()
    def initial_prompt(self, words: nn.Embedding) -> torch.Tensor | None:
        """P at the start, (n, d); None keeps the embedding's own N(0, 1) draw ("random")."""
        n, vocab, device = self.num_virtual_tokens, words.num_embeddings, words.weight.device
        if self.init == "random":
            return None
        if self.init == "vocab":
            return words(torch.randint(0, vocab, (n,), device=device)).float()
        tokenizer = load_tokenizer(self.tokenizer_name_or_path)
        if self.init == "text":   # peft's rule: repeat to fill n, truncate a longer text
            ids = tokenizer(self.init_text)["input_ids"]
            ids = (ids * math.ceil(n / len(ids)))[:n]
            return words(torch.tensor(ids, device=device)).float()
        rows = [words(torch.tensor(tokenizer(w, add_special_tokens=False)["input_ids"], device=device)).mean(0)
                for w in self.label_words]
        rest = words(torch.randint(0, vocab, (n - len(rows),), device=device))
        return torch.cat([torch.stack(rows), rest]).float()

    @classmethod
    def examples(cls):
        return [("llama", cls(num_virtual_tokens=4)), ("llama", cls(num_virtual_tokens=3, init="vocab"))]

    @classmethod
    def invalid_examples(cls):
        return [{"num_virtual_tokens": 0}, {"init": "zeros"}, {"init": "text"},
                {"init": "labels", "label_words": ["a", "b"]}]

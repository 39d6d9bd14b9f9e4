"""P-tuning (Liu et al. 2021, "GPT Understands, Too", arXiv 2103.10385).

The n prompt embeddings come out of a *prompt encoder* over trainable embeddings e_1..e_n (paper,
§3.2, eq. 3):

    h_i = MLP([LSTM_fwd(e)_i ; LSTM_bwd(e)_i])

and are prepended to the input embeddings like prompt tuning's (``soft_prompt.EmbeddingPrompt``).

Where peft departs from the paper (peft 0.21.2): peft's LSTM encoder is LSTM(d -> h, bidirectional,
2 layers) then Linear(2h, 2h) -> ReLU -> Linear(2h, d), with h = ``encoder_hidden_size``
defaulting to d. The official code uses h = d/2, so the MLP is d -> d -> d; peft equals the paper
only with ``encoder_hidden_size=d//2`` (our default). peft's default encoder is an MLP
(d -> h -> h -> d, ReLUs), which the paper does not have: ``encoder="mlp"`` here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core import AdapterConfig, register
from .soft_prompt import NOT_IDENTITY, NOT_MERGEABLE, EmbeddingPrompt, check_n, max_positions


class PromptEncoder(EmbeddingPrompt):
    """P-tuning's encoder: h = MLP(BiLSTM(e)) over trainable embeddings e (n x d), or peft's MLP variant.

    LSTM: ``lstm_head`` = LSTM(d -> h, 2 layers, bidirectional), ``mlp_head`` = Linear(2h, 2h) ->
    ReLU -> Linear(2h, d). MLP: ``mlp_head`` = Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, d).
    The names are the official code's (and peft's).
    """

    def __init__(self, n: int, d: int, encoder: str = "lstm", hidden: int | None = None, num_layers: int = 2,
                 dropout: float = 0.0, max_positions: int | None = None):
        super().__init__(n, max_positions)
        self.encoder = encoder
        self.embedding = nn.Embedding(n, d)
        if encoder == "lstm":
            h = hidden or d // 2
            self.lstm_head = nn.LSTM(d, h, num_layers=num_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            h = hidden or d
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def prompts(self) -> torch.Tensor:   # (n, d): the encoder runs once and is shared by the batch
        e = self.embedding.weight.unsqueeze(0)                 # (1, n, d)
        if self.encoder == "lstm":
            e = self.lstm_head(e)[0]                           # (1, n, 2h)
        return self.mlp_head(e)[0]                             # (n, d)


@register("p_tuning", family="additive", paper="liu2021gpt")
@dataclass
class PTuningConfig(AdapterConfig):
    """P-tuning.

    Args:
        num_virtual_tokens: n.
        encoder: "lstm" (the paper's) or "mlp" (peft's default, not in the paper).
        encoder_hidden_size: h; None means the paper's d/2 for "lstm" (so the MLP is d -> d -> d) and
            peft's d for "mlp". Pass d to match peft's LSTM default.
        encoder_num_layers: LSTM layers (2). encoder_dropout: dropout between LSTM layers.
    """
    target_modules: list[str] | str | None = None
    num_virtual_tokens: int = 20
    encoder: str = "lstm"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    identity_at_init: ClassVar = NOT_IDENTITY
    mergeable: ClassVar = NOT_MERGEABLE

    def __post_init__(self):
        check_n(self.num_virtual_tokens)
        if self.encoder not in ("lstm", "mlp"):
            raise ValueError(f"encoder must be 'lstm' (the paper's) or 'mlp' (peft's default), got {self.encoder!r}")

    def inject(self, model: nn.Module) -> None:
        limit = max_positions(model, self.num_virtual_tokens)
        words = model.get_input_embeddings()
        PromptEncoder(self.num_virtual_tokens, words.embedding_dim, self.encoder, self.encoder_hidden_size,
                      self.encoder_num_layers, self.encoder_dropout, limit).to(words.weight.device).attach(model)

    @classmethod
    def examples(cls):
        return [("llama", cls(num_virtual_tokens=4)), ("llama", cls(num_virtual_tokens=3, encoder="mlp"))]

    @classmethod
    def invalid_examples(cls):
        return [{"num_virtual_tokens": -2}, {"encoder": "gru"}]

"""T-Few's multiple-choice objective (Liu et al. 2022, Section 3.2), for a decoder-only model.

A multiple-choice example is a prompt x and C answer choices y^(1), ..., y^(C), one of them correct.
A decoder scores a choice by reading x followed by the choice: the log-probability of its t-th token
is log p(y_t | x, y_<t), taken from the logits one position earlier. T-Few trains with three losses:

    L_LM = -(1/T) sum_t log p(y_t | x, y_<t)                  the correct choice, as language modelling
    L_UL = -sum_{n != correct} sum_t log(1 - p(y^(n)_t | x, y^(n)_<t)) / sum_{n != correct} T^(n)   (Eq. 2)
    beta(x, y) = (1/T) sum_t log p(y_t | x, y_<t)             length-normalised log-probability (Eq. 3)
    L_LN = -log( exp beta(x, y) / sum_c exp beta(x, y^(c)) )    a softmax over the choices' beta
    L = L_LM + L_UL + L_LN

(L_LM is averaged over every correct-choice token of the batch, L_UL over every wrong-choice token,
L_LN over the examples.) A prediction is rank classification: the choice with the largest beta.

Where the official code (r-three/t-few, ``src/models/EncoderDecoder.py``) departs from the paper:
its unlikelihood term is log(1 - p + 0.01), a floor against log 0, and its sum also runs over the
padding of the choices and over the correct choice's positions, each adding -log(1.01), while its
count holds only the wrong choices' tokens. ``official=True`` computes that; the default is Eq. 2.

Batches: ``multiple_choice_batch`` lays out each example's C sequences x + y^(c) as rows (B x C rows,
right-padded) with ``choice_mask`` marking the choice tokens; ``TFewObjective(model)`` wraps a causal
LM so that ``training.train`` trains it with L (its forward returns ``{"loss": L, ...}``).

One-token choices (a label word: "yes" / "no") need one forward pass per example, not C: the C rows
differ only in their last token, and under causal attention no position before it sees it, so the
distribution at the prompt's last position scores every choice (``choice_logprobs_one_token``).
T-Few's encoder-decoder gets the same saving by encoding x once and decoding each choice.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["multiple_choice_batch", "choice_logprobs", "one_token_choices", "choice_logprobs_one_token", "tfew_losses",
           "rank_classify", "TFewObjective"]


def multiple_choice_batch(prompts: Sequence[Sequence[int]], choices: Sequence[Sequence[Sequence[int]]],
                          labels: Sequence[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Token ids of B prompts, each with the same number C of choices (token ids), and the index of
    each correct choice -> {input_ids, attention_mask, choice_mask: (B*C, L); labels: (B,)}."""
    if not prompts or len(prompts) != len(choices) or len(prompts) != len(labels):
        raise ValueError(f"need as many prompts, choice lists and labels, got {len(prompts)}, {len(choices)}, {len(labels)}")
    n_choices = {len(c) for c in choices}
    if len(n_choices) != 1 or n_choices.pop() < 2:
        raise ValueError(f"every example needs the same number (>= 2) of choices, got {[len(c) for c in choices]}")
    for i, (cs, label) in enumerate(zip(choices, labels)):
        if not 0 <= label < len(cs):
            raise ValueError(f"example {i}: label {label} is not the index of one of its {len(cs)} choices")
        if any(len(c) == 0 for c in cs) or len(prompts[i]) == 0:
            raise ValueError(f"example {i}: an empty prompt or choice (a choice is scored by its tokens)")
    rows = [(list(p), list(c)) for p, cs in zip(prompts, choices) for c in cs]
    length = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention, choice_mask = torch.zeros_like(ids), torch.zeros(len(rows), length, dtype=torch.bool)
    for r, (p, c) in enumerate(rows):
        ids[r, :len(p) + len(c)] = torch.tensor(p + c)
        attention[r, :len(p) + len(c)] = 1
        choice_mask[r, len(p):len(p) + len(c)] = True
    return {"input_ids": ids, "attention_mask": attention, "choice_mask": choice_mask,
            "labels": torch.tensor(list(labels), dtype=torch.long)}


def choice_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, choice_mask: torch.Tensor,
                    n_examples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(y_t | x, y_<t) of every choice token: (B, C, T) log-probabilities and the (B, C, T) mask
    of real tokens (T: the longest choice), from a causal LM's (B*C, L, V) logits."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = choice_mask[:, 1:]                       # token t is predicted at position t - 1
    lengths, start = mask.sum(-1), mask.int().argmax(-1)   # each row's choice: one run of positions
    T = int(lengths.max())
    offsets = torch.arange(T, device=mask.device)
    real = offsets < lengths[:, None]
    where = (start[:, None] + offsets).clamp(max=mask.shape[1] - 1)    # the choice tokens, moved to the front
    out = logp.gather(1, where) * real
    return out.view(n_examples, -1, T), real.view(n_examples, -1, T)


def one_token_choices(choice_mask: torch.Tensor) -> bool:
    """Whether every choice of a ``multiple_choice_batch`` (its ``choice_mask``) is a single token."""
    return bool((choice_mask.sum(-1) == 1).all())


def choice_logprobs_one_token(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                              choice_mask: torch.Tensor, n_examples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``choice_logprobs``' (B, C, 1) output for one-token choices, from one row per example (its first
    choice's row, whose prompt all its rows share): the output head runs at one position per example."""
    C = input_ids.shape[0] // n_examples
    first = slice(0, None, C)                                  # each example's first row
    position = choice_mask[first].int().argmax(-1) - 1         # the prompt's last token
    out = model(input_ids=input_ids[first], attention_mask=attention_mask[first], output_hidden_states=True,
                logits_to_keep=1)
    h = out.hidden_states[-1]                                  # after the final norm (Llama, GPT-2 ...)
    h = h[torch.arange(n_examples, device=h.device), position + (h.shape[1] - input_ids.shape[1])]  # virtual tokens in front
    choice_ids = input_ids[choice_mask].view(n_examples, C)    # each row's one choice token
    logp = torch.log_softmax((h @ model.get_output_embeddings().weight.T).float(), dim=-1)   # (B, V)
    logp = logp.gather(-1, choice_ids)[:, :, None]
    return logp, torch.ones_like(logp, dtype=torch.bool)


def tfew_losses(logp: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, official: bool = False) -> dict:
    """L_LM, L_UL, L_LN and their sum L (module docstring) from ``choice_logprobs``' output."""
    B, C, _ = logp.shape
    correct = F.one_hot(labels, C).bool()[:, :, None] & mask            # (B, C, T)
    wrong = ~F.one_hot(labels, C).bool()[:, :, None] & mask
    lm = -logp[correct].mean()
    p = logp.exp()
    if official:
        eps, others = 1e-2, mask.numel() - int(wrong.sum())
        ul = (-torch.log1p(-p[wrong] + eps).sum() - others * math.log1p(eps)) / wrong.sum()
    else:
        ul = -torch.log1p(-p[wrong].clamp(max=1 - 1e-7)).mean()        # log(1 - p), p < 1 in float32
    beta = (logp * mask).sum(-1) / mask.sum(-1)                          # (B, C)
    ln = F.cross_entropy(beta, labels)
    return {"loss": lm + ul + ln, "lm": lm, "ul": ul, "ln": ln, "beta": beta}


def rank_classify(beta: torch.Tensor) -> torch.Tensor:
    """The predicted choice of each example: the largest length-normalised log-probability."""
    return beta.argmax(-1)


class TFewObjective(nn.Module):
    """A causal LM trained with T-Few's loss: ``forward(**multiple_choice_batch(...))`` returns
    ``{"loss": L, "lm", "ul", "ln", "beta"}``, so ``training.train(TFewObjective(model), loader)`` works;
    the adapter stays on ``self.model`` (save it from there). ``losses`` picks the terms summed into
    "loss" (``("lm",)`` is plain fine-tuning on the correct choice: the ablation of the paper's Section 3.2)."""

    TERMS = ("lm", "ul", "ln")

    def __init__(self, model: nn.Module, official: bool = False, losses: Sequence[str] = TERMS):
        super().__init__()
        if not losses or any(t not in self.TERMS for t in losses):
            raise ValueError(f"losses must be a non-empty selection of {self.TERMS}, got {tuple(losses)}")
        self.model, self.official, self.losses = model, official, tuple(losses)

    def forward(self, input_ids, attention_mask, choice_mask, labels):
        if one_token_choices(choice_mask):                      # one forward per example (module docstring)
            logp, mask = choice_logprobs_one_token(self.model, input_ids, attention_mask, choice_mask, labels.shape[0])
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            logp, mask = choice_logprobs(logits, input_ids, choice_mask, labels.shape[0])
        out = tfew_losses(logp, mask, labels, self.official)
        out["loss"] = sum(out[t] for t in self.losses)
        return out

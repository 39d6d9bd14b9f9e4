"""Task metrics the notebooks share: accuracy, greedy generation, multi-reference BLEU, perplexity."""
from __future__ import annotations

import math
import re

import sacrebleu
import torch
from torch import nn

from .data import chat_prompt


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    """Classification accuracy of a model whose output has ``.logits`` (batch, classes)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in loader:
        batch = {k: v.to(_device(model)) for k, v in batch.items()}
        labels = batch.pop("labels")
        correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
        total += labels.numel()
    model.train(was_training)
    return correct / total


def label_token_ids(tokenizer, words: list[str]) -> list[int]:
    """The token id of each label word; each must be a single token (else rank classification is ambiguous)."""
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    long = [w for w, i in zip(words, ids) if len(i) != 1]
    if long:
        raise ValueError(f"label words must be single tokens for this tokenizer; {long} are not "
                         f"({[len(i) for w, i in zip(words, ids) if len(i) != 1]} tokens)")
    return [i[0] for i in ids]


@torch.no_grad()
def label_word_logits(model: nn.Module, tokenizer, rows, example_fn, words: list[str],
                      batch_size: int = 16) -> torch.Tensor:
    """(len(rows), len(words)) float32: at the answer position after the chat-formatted prompt
    ``example_fn(row)[0]``, each label word's logit, per row.

    Works with soft prompts and prefixes: batches are right-padded, so the answer position (the last
    real token) is counted from the end of the logits, and virtual tokens in front shift nothing.
    The tokenizer's ``padding_side`` and the model's train/eval mode are restored.
    """
    label_ids = label_token_ids(tokenizer, words)
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "right"      # then the answer position is the last real token (+ n virtual ones)
    texts = [chat_prompt(tokenizer, example_fn(r)[0]) for r in rows]
    out = []
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(_device(model)) for k, v in enc.items()}
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            last = enc["attention_mask"].sum(1) - 1 + (logits.shape[1] - enc["input_ids"].shape[1])
            out.append(logits[torch.arange(len(last)), last][:, label_ids].float().cpu())
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return torch.cat(out)


def label_word_accuracy(model: nn.Module, tokenizer, rows, example_fn, words: list[str], batch_size: int = 16) -> float:
    """Rank classification: the share of ``rows`` where, at the answer position after the chat-formatted
    prompt ``example_fn(row)[0]``, the logit of the right label word is the largest among ``words``
    (``label_word_logits``).

    Unlike parsing greedy generations it always yields a class, and it is the decision greedy decoding
    makes once the model answers in format. Works with soft prompts and prefixes.
    """
    pred = label_word_logits(model, tokenizer, rows, example_fn, words, batch_size).argmax(-1)
    return (pred == torch.tensor(list(rows["label"]))).sum().item() / len(pred)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 16,
             system: str | None = None) -> list[str]:
    """Greedy answers to ``prompts``, each wrapped in the chat template. Batches are left-padded,
    so every prompt ends right where generation starts."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    answers = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [chat_prompt(tokenizer, p, system) for p in prompts[i:i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(_device(model))
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [a.strip() for a in answers]


def corpus_bleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU (sacrebleu, 0-100) with a varying number of references per hypothesis, as the
    E2E NLG challenge scores it."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    n = max(len(r) for r in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(n)]
    return sacrebleu.corpus_bleu(hypotheses, streams).score


def final_number(text: str) -> str | None:
    """The answer a GSM8K-style solution ends with: the number after '####', else the last number."""
    m = re.search(r"####\s*(-?[\d,]*\.?\d+)", text)
    numbers = [m[1]] if m else re.findall(r"-?\d[\d,]*\.?\d*", text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token loss) over ``blocks`` (n, block_size) of consecutive text."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i:i + batch_size].to(_device(model))
        loss = model(input_ids=ids, labels=ids).loss
        n = ids.numel() - ids.shape[0]  # one prediction fewer than tokens per block
        total, count = total + loss.item() * n, count + n
    model.train(was_training)
    return math.exp(total / count)

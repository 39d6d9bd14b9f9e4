"""T-Few's multiple-choice objective: the batched losses against the paper's equations recomputed
here one sequence at a time, the official code's variant against its arithmetic, rank
classification, training (IA)³ through the one loop, and bad input."""
from __future__ import annotations

import math

import pytest
import torch

from peft_from_scratch import core, train
from peft_from_scratch.additive.ia3 import IA3Config
from peft_from_scratch.models import tiny_llama
from peft_from_scratch.training import TrainConfig
from peft_from_scratch.training.multiple_choice import TFewObjective, multiple_choice_batch, rank_classify

PROMPTS = [[5, 9, 17, 3], [44, 2, 8]]
CHOICES = [[[11, 12], [13], [14, 15, 16]], [[21], [22, 23], [24]]]
LABELS = [2, 0]


def token_probs(model, prompt, choice):
    """p(y_t | x, y_<t) for each token of ``choice``, from one unpadded sequence."""
    ids = torch.tensor([prompt + choice])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    probs = torch.softmax(logits, -1)
    return [probs[len(prompt) + t - 1, tok].item() for t, tok in enumerate(choice)]


def by_hand(model, official=False):
    p = [[token_probs(model, x, y) for y in ys] for x, ys in zip(PROMPTS, CHOICES)]
    correct = [math.log(q) for b, c in enumerate(LABELS) for q in p[b][c]]
    wrong = [q for b, c in enumerate(LABELS) for n, ps in enumerate(p[b]) if n != c for q in ps]
    lm = -sum(correct) / len(correct)
    if official:       # log(1 - p + 0.01); the sum also over every other position of the (B, C, T) layout
        T = max(len(y) for ys in CHOICES for y in ys)
        others = len(PROMPTS) * len(CHOICES[0]) * T - len(wrong)
        ul = (-sum(math.log(1 - q + 0.01) for q in wrong) - others * math.log(1.01)) / len(wrong)
    else:
        ul = -sum(math.log(1 - q) for q in wrong) / len(wrong)
    beta = [[sum(map(math.log, ps)) / len(ps) for ps in p[b]] for b in range(len(PROMPTS))]
    ln = -sum(beta[b][c] - math.log(sum(map(math.exp, beta[b]))) for b, c in enumerate(LABELS)) / len(LABELS)
    return {"lm": lm, "ul": ul, "ln": ln, "loss": lm + ul + ln, "beta": beta}


@pytest.mark.parametrize("official", [False, True])
def test_batched_losses_equal_the_equations_one_sequence_at_a_time(official):
    model = tiny_llama()
    batch = multiple_choice_batch(PROMPTS, CHOICES, LABELS, pad_token_id=0)
    with torch.no_grad():
        out = TFewObjective(model, official=official)(**batch)
    expected = by_hand(model, official)
    for k in ("lm", "ul", "ln", "loss"):
        assert out[k].item() == pytest.approx(expected[k], rel=1e-5), k
    torch.testing.assert_close(out["beta"].double(), torch.tensor(expected["beta"], dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert rank_classify(out["beta"]).tolist() == [max(range(3), key=b.__getitem__) for b in expected["beta"]]


def test_the_official_variant_differs_from_the_paper():
    model = tiny_llama()
    batch = multiple_choice_batch(PROMPTS, CHOICES, LABELS, pad_token_id=0)
    with torch.no_grad():
        paper, official = TFewObjective(model)(**batch), TFewObjective(model, official=True)(**batch)
    assert paper["lm"] == official["lm"] and paper["ln"] == official["ln"]
    assert abs(paper["ul"] - official["ul"]) > 1e-3


def test_ia3_trains_with_the_tfew_loss_through_the_one_loop():
    model = core.add_adapter(tiny_llama(), IA3Config())
    base = {k: v.clone() for k, v in model.state_dict().items() if not core.is_adapter_key(model, k)}
    objective = TFewObjective(model)
    batches = [multiple_choice_batch(PROMPTS, CHOICES, LABELS, pad_token_id=0)] * 2
    history = train(objective, batches, TrainConfig(lr=3e-3, max_steps=4, warmup_ratio=0.0), progress=False)
    assert all(math.isfinite(x) for x in history.loss) and history.loss[-1] < history.loss[0]
    assert any((layer.l != 1).any() for layer in core.adapter_layers(model).values())
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items() if k in base)


def test_bad_multiple_choice_input_names_the_problem():
    with pytest.raises(ValueError, match="label 3 is not the index"):
        multiple_choice_batch(PROMPTS, CHOICES, [3, 0], pad_token_id=0)
    with pytest.raises(ValueError, match="same number"):
        multiple_choice_batch(PROMPTS, [CHOICES[0], CHOICES[1][:2]], LABELS, pad_token_id=0)
    with pytest.raises(ValueError, match="empty prompt or choice"):
        multiple_choice_batch(PROMPTS, [CHOICES[0], [[21], [], [24]]], LABELS, pad_token_id=0)
    with pytest.raises(ValueError, match="as many prompts"):
        multiple_choice_batch(PROMPTS, CHOICES, [0], pad_token_id=0)


ONE_TOKEN_PROMPTS = [[5, 9, 17, 3, 8, 2], [44, 2, 8], [7, 7, 1, 30]]
ONE_TOKEN_CHOICES = [[[11], [13]], [[21], [22]], [[13], [11]]]


@pytest.mark.parametrize("official", [False, True])
def test_one_token_choices_take_one_row_per_example_and_equal_the_general_path(official):
    from peft_from_scratch.training.multiple_choice import choice_logprobs, one_token_choices, tfew_losses
    torch.manual_seed(0)
    model = core.add_adapter(tiny_llama(), IA3Config())
    for layer in core.adapter_layers(model).values():     # vectors away from 1, so the adapter matters
        layer.l.data.uniform_(0.5, 1.5)
    batch = multiple_choice_batch(ONE_TOKEN_PROMPTS, ONE_TOKEN_CHOICES, [0, 1, 1], pad_token_id=0)
    assert one_token_choices(batch["choice_mask"]) and not one_token_choices(
        multiple_choice_batch(PROMPTS, CHOICES, LABELS, pad_token_id=0)["choice_mask"])
    fast = TFewObjective(model, official=official)(**batch)                       # the one-token path
    fast["loss"].backward()
    fast_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    general = tfew_losses(*choice_logprobs(logits, batch["input_ids"], batch["choice_mask"], 3), batch["labels"], official)
    general["loss"].backward()
    for k in ("lm", "ul", "ln", "loss"):
        torch.testing.assert_close(fast[k], general[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast["beta"], general["beta"], rtol=1e-5, atol=1e-6)
    for g, p in zip(fast_grads, [p for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_a_selection_of_terms_sums_only_those_and_bad_selections_are_refused():
    model = tiny_llama()
    batch = multiple_choice_batch(PROMPTS, CHOICES, LABELS, pad_token_id=0)
    with torch.no_grad():
        full = TFewObjective(model)(**batch)
        lm_only = TFewObjective(model, losses=("lm",))(**batch)
        no_ul = TFewObjective(model, losses=("lm", "ln"))(**batch)
    assert torch.equal(full["loss"], full["lm"] + full["ul"] + full["ln"])     # the default is the paper's L
    assert torch.equal(lm_only["loss"], full["lm"]) and torch.equal(no_ul["loss"], full["lm"] + full["ln"])
    for bad in ((), ("lm", "kl")):
        with pytest.raises(ValueError, match="non-empty selection"):
            TFewObjective(model, losses=bad)

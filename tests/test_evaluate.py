"""Rank classification by label words (evaluate.label_word_accuracy), with and without a soft prompt."""
import pytest
import torch
from datasets import Dataset
from torch import nn

from peft_from_scratch import core, data, evaluate
from peft_from_scratch.models import tiny_llama
from peft_from_scratch.additive import PromptTuningConfig
from test_data import smol  # noqa: F401  (the SmolLM2 tokenizer fixture)

ROWS = Dataset.from_dict({"text": ["good", "bad", "fine film", "awful, dull", "ok"], "label": [1, 0, 1, 0, 1]})


class Oracle(nn.Module):
    """Puts the highest logit on the right label word at the answer position (it reads the label off
    the input, which ends in the prompt of ``row``), and noise everywhere else."""

    def __init__(self, tokenizer, answers: dict[tuple, int], label_ids: list[int], vocab: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.answers, self.label_ids, self.vocab = answers, label_ids, vocab

    def forward(self, input_ids, attention_mask):
        logits = torch.randn(*input_ids.shape, self.vocab, generator=torch.Generator().manual_seed(0))
        for b in range(len(input_ids)):
            real = input_ids[b][attention_mask[b].bool()]
            last = int(attention_mask[b].sum()) - 1
            logits[b, last, self.label_ids[self.answers[tuple(real.tolist())]]] = 100.0
        return type("Out", (), {"logits": logits})()


def test_label_word_accuracy_reads_the_answer_position(smol):  # noqa: F811
    ids = evaluate.label_token_ids(smol, data.SST2_WORDS)
    prompts = [smol(data.chat_prompt(smol, data.sst2_generation_example(r)[0]), add_special_tokens=False)["input_ids"]
               for r in ROWS]
    right = {tuple(p): r["label"] for p, r in zip(prompts, ROWS)}
    wrong = {tuple(p): 1 - r["label"] for p, r in zip(prompts, ROWS)}
    assert evaluate.label_word_accuracy(Oracle(smol, right, ids, len(smol)), smol, ROWS, data.sst2_generation_example,
                                        data.SST2_WORDS, batch_size=2) == 1.0
    assert evaluate.label_word_accuracy(Oracle(smol, wrong, ids, len(smol)), smol, ROWS, data.sst2_generation_example,
                                        data.SST2_WORDS, batch_size=3) == 0.0


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_padding_side_and_the_mode_are_restored(smol, side):  # noqa: F811
    before = smol.padding_side
    model = tiny_llama(vocab_size=len(smol)).train()
    try:
        smol.padding_side = side
        evaluate.label_word_logits(model, smol, ROWS.select([0, 3]), data.sst2_generation_example, data.SST2_WORDS)
        assert smol.padding_side == side and model.training
    finally:
        smol.padding_side = before


@pytest.mark.parametrize("config", [None, PromptTuningConfig(num_virtual_tokens=3)], ids=["plain", "soft-prompt"])
def test_label_word_logits_of_a_padded_batch_equal_scoring_one_row_at_a_time(smol, config):  # noqa: F811
    """Each row's label-word logits in a batch of 5 prompts of different lengths (right-padded) equal
    those of the row alone (no padding), to float32 rounding. Reading the last *padded* position
    instead of the last real one changes them by ~1 (and the accuracy over these 5 rows not at all:
    a random tiny model predicts one class for every row, so accuracy is no evidence here)."""
    model = tiny_llama(vocab_size=len(smol))
    if config is not None:
        torch.manual_seed(0)
        model = core.add_adapter(model, config)
    enc = smol([data.chat_prompt(smol, data.sst2_generation_example(r)[0]) for r in ROWS], add_special_tokens=False)
    lengths = {len(i) for i in enc["input_ids"]}
    assert len(lengths) > 1, "the rows must differ in length, or the batch has no padding"
    batched = evaluate.label_word_logits(model, smol, ROWS, data.sst2_generation_example, data.SST2_WORDS, batch_size=5)
    single = torch.cat([evaluate.label_word_logits(model, smol, ROWS.select([i]), data.sst2_generation_example,
                                                   data.SST2_WORDS) for i in range(len(ROWS))])
    assert batched.shape == (5, 2)
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5 * single.abs().max().item())
    accuracy = evaluate.label_word_accuracy(model, smol, ROWS, data.sst2_generation_example, data.SST2_WORDS, batch_size=5)
    assert accuracy == (single.argmax(-1) == torch.tensor(ROWS["label"])).sum().item() / len(ROWS)


def test_multi_token_label_words_are_refused(smol):  # noqa: F811
    with pytest.raises(ValueError, match="single tokens.*'politics'"):
        evaluate.label_token_ids(smol, ["World", "politics"])


def test_label_word_scores_with_cached_demonstrations_equal_running_them_every_time(smol):  # noqa: F811
    from peft_from_scratch import tasks
    model = tiny_llama(vocab_size=len(smol))           # 256 positions: enough for two demonstrations
    demos = "Review: great\nIs this review positive or negative?\npositive\n\nReview: dull\nIs this review positive or negative?\nnegative\n\n"
    cached = tasks.label_word_scores(model, smol, ROWS, data.sst2_generation_example, data.SST2_WORDS, batch_size=2,
                                     demonstrations=demos)
    again = tasks.label_word_scores(model, smol, ROWS, data.sst2_generation_example, data.SST2_WORDS, batch_size=2,
                                    demonstrations=demos, cache_demonstrations=False)
    torch.testing.assert_close(cached, again, rtol=1e-4, atol=1e-5)
    # the uncached path scores the templated prompt (tokenized in two pieces) one row at a time, unpadded
    opening = data.chat_prompt(smol, demos + "\x00").split("\x00")[0]
    for i in range(len(ROWS)):
        text = data.chat_prompt(smol, demos + data.sst2_generation_example(ROWS[i])[0])
        ids = smol(opening, add_special_tokens=False)["input_ids"] + smol(text[len(opening):], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1, evaluate.label_token_ids(smol, data.SST2_WORDS)]
        torch.testing.assert_close(again[i], logits, rtol=1e-4, atol=1e-5)
    without = tasks.label_word_scores(model, smol, ROWS, data.sst2_generation_example, data.SST2_WORDS)
    assert (without - cached).abs().max() > 1e-3                  # the demonstrations change the scores
    assert tasks.label_word_correct(model, smol, ROWS, data.sst2_generation_example, data.SST2_WORDS, demonstrations=demos) == \
        [int(p == y) for p, y in zip(cached.argmax(-1).tolist(), ROWS["label"])]

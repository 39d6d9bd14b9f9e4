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
    assert smol.padding_side == "left" or smol.padding_side == "right"   # restored, whatever it was


def test_label_word_accuracy_with_a_soft_prompt_equals_scoring_one_row_at_a_time(smol):  # noqa: F811
    torch.manual_seed(0)
    model = core.add_adapter(tiny_llama(vocab_size=len(smol)), PromptTuningConfig(num_virtual_tokens=3))
    batched = evaluate.label_word_accuracy(model, smol, ROWS, data.sst2_generation_example, data.SST2_WORDS, batch_size=5)
    single = [evaluate.label_word_accuracy(model, smol, ROWS.select([i]), data.sst2_generation_example, data.SST2_WORDS)
              for i in range(len(ROWS))]
    assert batched == pytest.approx(sum(single) / len(single))   # right padding keeps every answer position


def test_multi_token_label_words_are_refused(smol):  # noqa: F811
    with pytest.raises(ValueError, match="single tokens.*'politics'"):
        evaluate.label_token_ids(smol, ["World", "politics"])

"""T-Few's few-shot protocol (tasks.FewShot) on SmolLM2 cut to 2 layers: the batches, the
demonstrations, the optimizer's relative step, and bad input."""
import pytest
import torch

from peft_from_scratch import core, tasks
from peft_from_scratch.additive import IA3Config
from peft_from_scratch.models import ModelNotAvailable
from peft_from_scratch.training import TrainConfig
from peft_from_scratch.training.multiple_choice import TFewObjective
from tests.helpers import one_thread  # noqa: F401  (autouse)


@pytest.fixture(scope="module", params=["sst2", "rte"])
def few(request):
    task = tasks.FewShot(k=6, n_val=4, steps=3, batch=4, dataset=request.param, layers=2)
    try:
        task.base()
    except ModelNotAvailable as e:
        pytest.skip(str(e))
    return task


def test_each_example_is_its_prompt_once_per_label_word_and_every_example_comes_once_per_pass(few):
    seen = []
    for batch in few.loader():
        B = len(batch["labels"])
        assert batch["input_ids"].shape[0] == B * len(few.words)
        assert (batch["choice_mask"].sum(-1) == 1).all()                      # one-token answers
        answers = batch["input_ids"][batch["choice_mask"]].view(B, -1)
        assert (answers == torch.tensor(few.label_ids)).all()                 # choice c is label word c
        for b in range(B):
            row = batch["input_ids"][b * len(few.words)][batch["attention_mask"][b * len(few.words)].bool()]
            seen.append((row[:-1].tolist(), int(batch["labels"][b])))
    expected = sorted((few.prompt_ids(r), r["label"]) for r in few.train_rows)
    assert sorted(seen) == expected


def test_the_demonstrations_are_the_training_examples_with_their_answers(few):
    demos = few.demonstrations()
    for row in few.train_rows:
        question, answer = few.example_fn(row)
        assert f"{question}\n{answer}\n\n" in demos
    longer = few.prompt_tokens(demos)
    assert all(a > b for a, b in zip(longer, few.prompt_tokens()))


def test_fit_trains_the_adapter_with_the_chosen_terms_and_leaves_the_base(few):
    model = core.add_adapter(few.base(), IA3Config())
    base = {k: v.clone() for k, v in model.state_dict().items() if not core.is_adapter_key(model, k)}
    history = few.fit(model, 3e-3, losses=("lm", "ln"), progress=False)
    assert len(history.loss) == few.steps
    assert any((layer.l != 1).any() for layer in core.adapter_layers(model).values())
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items() if k in base)
    assert len(few.correct(model)) == len(few.val_rows)


def test_adafactor_steps_relative_to_the_tensor_so_a_zero_tensor_starts_slowly():
    ones, zeros = torch.nn.Parameter(torch.ones(64)), torch.nn.Parameter(torch.zeros(64))
    g = torch.randn(64, generator=torch.Generator().manual_seed(0))
    ones.grad, zeros.grad = g.clone(), g.clone()
    opt = tasks.tfew_adafactor([ones, zeros], TrainConfig(lr=3e-3))
    opt.step()
    moved_ones, moved_zeros = (ones.detach() - 1).abs(), zeros.detach().abs()
    # the first update is about sign(g), clipped to RMS 1, times lr x max(1e-3, RMS(p))
    assert torch.allclose(moved_ones.pow(2).mean().sqrt(), torch.tensor(3e-3), rtol=0.05)
    assert torch.allclose(moved_zeros.pow(2).mean().sqrt(), torch.tensor(3e-6), rtol=0.05)
    assert (torch.sign(ones.detach() - 1) == -torch.sign(g)).all()


def test_bad_protocols_are_refused():
    with pytest.raises(ValueError, match="dataset must be one of"):
        tasks.FewShot(k=8, n_val=4, steps=1, dataset="cola")
    with pytest.raises(ValueError, match="batch <= k"):
        tasks.FewShot(k=4, n_val=4, steps=1, batch=8)
    with pytest.raises(ValueError, match="non-empty selection"):
        TFewObjective(torch.nn.Linear(1, 1), losses=("lm", "unlikelihood"))


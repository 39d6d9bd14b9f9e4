"""Tests for peft_from_scratch.training: schedule, determinism, accumulation, clipping, freezing, eval, peft."""
import json

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from peft_from_scratch.training import History, TrainConfig, evaluate_loss, lr_multiplier, make_adamw, train

VOCAB, SEQ = 64, 16


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def token_batches(n_batches, batch_size, seed=0):
    """Random token batches with labels = input_ids (no padding: equal token counts per batch)."""
    ids = torch.randint(0, VOCAB, (n_batches * batch_size, SEQ), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}
            for x in ids.split(batch_size)]


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def quiet(**kw):
    return TrainConfig(**{"lr": 1e-3, **kw})


def test_lr_multiplier_warmup_then_linear_or_constant():
    linear = [lr_multiplier(s, 10, 2) for s in range(10)]
    assert linear == pytest.approx([0, 0.5, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    constant = [lr_multiplier(s, 10, 2, "constant") for s in range(10)]
    assert constant == pytest.approx([0, 0.5] + [1] * 8)
    assert lr_multiplier(0, 10, 0) == 1.0 and lr_multiplier(10, 10, 0) == 0.0


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_history_lr_follows_schedule_and_max_steps_cycles_loader(schedule):
    history = train(tiny_llama(), token_batches(3, 2), quiet(max_steps=10, warmup_ratio=0.2, schedule=schedule),
                    progress=False)
    expected = [1e-3 * lr_multiplier(s, 10, 2, schedule) for s in range(10)]
    assert history.step == list(range(1, 11)) and history.lr == pytest.approx(expected)


def test_epochs_and_grad_accum_set_the_number_of_steps():
    history = train(tiny_llama(), token_batches(5, 2), quiet(epochs=2, grad_accum=3), progress=False)
    assert len(history.loss) == 10 // 3


def test_loss_decreases_on_memorisation():
    history = train(tiny_llama(), token_batches(1, 4), quiet(lr=1e-2, max_steps=40), desc="memorise")
    assert history.loss[-1] < 0.5 * history.loss[0]
    assert history.tokens_per_s > 0 and history.peak_memory_mb > 0 and history.device.startswith("cpu")


def test_bitwise_deterministic_for_a_seed():
    examples = [{k: v[0] for k, v in b.items()} for b in token_batches(8, 1)]

    def run(seed):
        loader = torch.utils.data.DataLoader(examples, batch_size=2, shuffle=True)  # order depends on the seed
        return train(tiny_llama(), loader, quiet(epochs=2, seed=seed), progress=False).loss

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_grad_accum_matches_one_big_batch():
    big = token_batches(3, 4)
    small = [{k: v[i:i + 2] for k, v in b.items()} for b in big for i in (0, 2)]
    a, b = tiny_llama(), tiny_llama()
    ha = train(a, big, quiet(lr=1e-2), progress=False)
    hb = train(b, small, quiet(lr=1e-2, grad_accum=2), progress=False)
    assert len(ha.loss) == len(hb.loss) == 3
    assert ha.loss == pytest.approx(hb.loss, abs=1e-6)
    assert ha.grad_norm == pytest.approx(hb.grad_norm, rel=1e-5)  # Adam alone would hide a missing 1/grad_accum
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("max_norm", [1e-3, None])
def test_clipping_limits_grad_norm(max_norm):
    seen = []

    def make_optimizer(params, config):  # record the norm the optimizer actually receives
        opt = make_adamw(params, config)
        opt.register_step_pre_hook(lambda o, *_: seen.append(float(torch.nn.utils.get_total_norm(
            [p.grad for g in o.param_groups for p in g["params"] if p.grad is not None]))))
        return opt

    history = train(tiny_llama(), token_batches(3, 2), quiet(max_grad_norm=max_norm), progress=False,
                    make_optimizer=make_optimizer)
    assert len(seen) == 3 and min(history.grad_norm) > 1e-2  # the raw norm is far above 1e-3
    if max_norm is None:
        assert seen == pytest.approx(history.grad_norm)
    else:
        assert max(seen) <= max_norm * (1 + 1e-4)


def test_only_requires_grad_params_change():
    model = tiny_llama()
    model.requires_grad_(False)
    model.model.layers[1].requires_grad_(True)
    before = snapshot(model)
    history = train(model, token_batches(3, 2), quiet(lr=1e-2, weight_decay=0.1), progress=False)
    assert history.trainable_params == sum(p.numel() for p in model.model.layers[1].parameters())
    for name, p in model.named_parameters():
        if name.startswith("model.layers.1."):
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name


def test_eval_fn_steps_and_mode_restored():
    model = tiny_llama().eval()
    train_modes, eval_calls = [], []
    model.register_forward_pre_hook(lambda m, *_: train_modes.append(m.training))

    def eval_fn(m):
        eval_calls.append((m.training, torch.is_grad_enabled()))
        return {"metric": torch.tensor(float(len(eval_calls)))}

    history = train(model, token_batches(7, 2), quiet(eval_every=2), eval_fn=eval_fn, progress=False)
    assert [e["step"] for e in history.eval] == [2, 4, 6, 7]
    assert eval_calls == [(False, False)] * 4
    assert train_modes == [True] * 7  # back in train mode after each evaluation
    assert history.final_eval == {"step": 7, "metric": 4.0}
    assert not model.training  # the caller's mode is restored


def test_elapsed_time_counts_training_and_not_evaluation():
    """``History.elapsed_s``: one increasing entry per step, the time spent in ``eval_fn`` left out."""
    import time
    pause = 0.25

    def slow_eval(m):
        time.sleep(pause)
        return {}

    history = train(tiny_llama(), token_batches(4, 2), quiet(eval_every=1), eval_fn=slow_eval, progress=False)
    assert len(history.elapsed_s) == 4 and all(b > a > 0 for a, b in zip(history.elapsed_s, history.elapsed_s[1:]))
    assert history.wall_time_s >= history.elapsed_s[-1] + 4 * pause      # the wall time has the four pauses
    assert history.elapsed_s[-1] < history.wall_time_s - 3.5 * pause       # the training time has none of them


def test_quality_at_wall_time_reads_between_checkpoints():
    """``tasks.time_curve`` pairs each checkpoint with the training time before it; ``loss_at_time``
    interpolates linearly from the untrained loss at 0 s and refuses to extrapolate."""
    from peft_from_scratch.tasks import loss_at_time, time_curve
    hist = History(elapsed_s=[1.0, 2.0, 3.0, 4.0], eval=[{"step": 2, "test_loss": 3.0}, {"step": 4, "test_loss": 1.0}])
    curve = time_curve(hist)
    assert curve == {"step": [2, 4], "elapsed_s": [2.0, 4.0], "test_loss": [3.0, 1.0]}
    assert loss_at_time(curve, 1.0, start_loss=5.0) == 4.0
    assert loss_at_time(curve, 3.0, start_loss=5.0) == 2.0
    with pytest.raises(ValueError, match="outside this run's 0-4.0 s"):
        loss_at_time(curve, 4.5, start_loss=5.0)


def test_param_groups_get_their_own_lr():
    """After one AdamW step with bias correction, m/sqrt(v) = g/|g|, so each weight moves by ~lr."""
    model = tiny_llama()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    before = snapshot(model)
    groups = [{"params": list(attn.parameters()), "lr": 1e-3}, {"params": list(mlp.parameters())}]
    history = train(model, token_batches(1, 2), quiet(lr=1e-2, warmup_ratio=0.0, schedule="constant"),
                    params=groups, progress=False)
    assert history.trainable_params == sum(p.numel() for g in groups for p in g["params"])
    for name, p in model.named_parameters():
        step = (p - before[name]).abs().max().item()
        if ".self_attn." in name and name.startswith("model.layers.0."):
            assert step == pytest.approx(1e-3, rel=1e-3), name
        elif ".mlp." in name and name.startswith("model.layers.0."):
            assert step == pytest.approx(1e-2, rel=1e-3), name
        else:
            assert step == 0, name


def test_peft_lora_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = snapshot(model)
    history = train(model, token_batches(1, 4), quiet(lr=1e-2, max_steps=20), progress=False)
    assert history.trainable_params == model.get_nb_trainable_parameters()[0]
    assert history.loss[-1] < history.loss[0]
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != ("lora_" in name), name


class TinyTagger(nn.Module):
    """A from-scratch-style module: per-token classification, returns a plain dict (no label shift)."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB)

    def forward(self, input_ids, labels=None, attention_mask=None):
        logits = self.head(self.emb(input_ids))
        return {"loss": nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()), "logits": logits}


def test_evaluate_loss_weights_batches_by_label_tokens():
    torch.manual_seed(0)
    model = TinyTagger()
    batches = token_batches(3, 2)
    for i, b in enumerate(batches):
        b["labels"][:, : 5 * i] = -100  # different numbers of label tokens per batch
    ids = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    expected = model(ids, labels)["loss"].item()
    assert evaluate_loss(model, batches) == pytest.approx(expected, rel=1e-6)
    history = train(model, batches, quiet(lr=1e-2, epochs=5), progress=False)  # dict outputs train too
    assert evaluate_loss(model, batches) < expected and history.loss[-1] < history.loss[0]
    assert model.training


def test_clear_errors_for_nothing_to_do():
    with pytest.raises(ValueError, match="no batches"):
        train(tiny_llama(), [], quiet(max_steps=2), progress=False)  # would otherwise cycle forever
    with pytest.raises(ValueError, match="nothing to train"):
        train(tiny_llama().requires_grad_(False), token_batches(1, 2), quiet(), progress=False)
    with pytest.raises(ValueError, match="no optimizer step"):
        train(tiny_llama(), token_batches(1, 2), quiet(grad_accum=2), progress=False)


def test_bf16_autocast_on_cpu():
    history = train(tiny_llama(), token_batches(2, 2), quiet(precision="bf16"), progress=False)
    assert all(torch.isfinite(torch.tensor(history.loss)))


def test_history_to_dict_is_json_and_plots():
    history = train(tiny_llama(), token_batches(2, 2), quiet(), progress=False,
                    eval_fn=lambda m: {"loss": evaluate_loss(m, token_batches(1, 2, seed=1))})
    data = json.loads(json.dumps(history.to_dict()))
    assert data["step"] == [1, 2] and data["eval"][0]["step"] == 2 and set(data["eval"][0]) == {"step", "loss"}
    assert History(**data) == history
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    ax = history.plot(label="tiny")
    assert len(ax.lines) == 1 and ax.get_legend() is not None
    matplotlib.pyplot.close("all")

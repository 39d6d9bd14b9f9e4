"""The memory meter (``training.memory``) against tensors counted by hand on a small MLP."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_from_scratch.core.step import BackpropStep, Step, StepResult
from peft_from_scratch.training import TrainConfig
from peft_from_scratch.training.memory import CATEGORIES, measure_step

F32 = 4


class MLP(nn.Module):
    """x -> W2 relu(W1 x + b1) + b2, loss: mean squared error against y."""

    def __init__(self, d_in=8, d_hidden=16, d_out=4):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out)
        self.register_buffer("scale", torch.ones(d_out))

    def forward(self, x, y):
        return {"loss": F.mse_loss(self.fc2(torch.relu(self.fc1(x))) * self.scale, y)}


def batch(n, d_in=8, d_out=4):
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(n, d_in, generator=g), "y": torch.randn(n, d_out, generator=g)}


def weight_bytes(model):
    return sum(t.numel() * F32 for t in [*model.parameters(), *model.buffers()])


def sgd(params, config):
    return torch.optim.SGD(params, lr=config.lr)


def test_weights_and_adam_state_are_counted_exactly():
    model = MLP(64, 128, 32)
    m = measure_step(model, [batch(2, 64, 32)], BackpropStep(), TrainConfig(lr=1e-3, max_grad_norm=None))
    n_params = sum(p.numel() for p in model.parameters())
    assert m.after["weights"] == weight_bytes(model) == (n_params + 32) * F32
    # AdamW: exp_avg and exp_avg_sq per parameter, plus a 0-d float32 step counter per parameter (4 of them)
    assert m.after["optimizer state"] == 2 * n_params * F32 + 4 * F32
    assert m.after["gradients"] == 0 and m.trained == n_params         # zero_grad(set_to_none=True) freed them
    assert set(m.at_peak) == set(CATEGORIES) and sum(m.at_peak.values()) == m.peak


def test_frozen_weights_have_no_gradient_and_no_state():
    model = MLP(64, 128, 32)
    model.fc1.requires_grad_(False)
    m = measure_step(model, [batch(2, 64, 32)], BackpropStep(), TrainConfig(lr=1e-3, max_grad_norm=None))
    trained = model.fc2.weight.numel() + model.fc2.bias.numel()
    assert m.trained == trained
    assert m.after["optimizer state"] == 2 * trained * F32 + 2 * F32
    assert m.at_peak["gradients"] <= trained * F32


def test_with_large_weights_the_peak_holds_every_gradient():
    """Weights dominate, the batch is one example: the peak comes when backward has made every gradient."""
    model = MLP(256, 512, 256)
    m = measure_step(model, [batch(1, 256, 256)], BackpropStep(sgd), TrainConfig(lr=1e-2, max_grad_norm=None))
    grads = sum(p.numel() for p in model.parameters()) * F32
    assert m.at_peak["gradients"] == grads
    assert m.at_peak["weights"] == weight_bytes(model)
    assert m.at_peak["optimizer state"] == 0                            # plain SGD keeps nothing


class ForwardOnly(Step):
    """A step that only runs the forward pass with autograd on, then, with the graph (and so every
    saved tensor) still alive, makes a large temporary: the peak comes then, at the end of the forward."""

    def setup(self, model, config):
        return [p for p in model.parameters() if p.requires_grad]

    def __call__(self, model, batches, forward, lr_scale):
        loss = forward(batches[0])
        spike = torch.zeros(2**20)
        return StepResult(loss.item() + spike[0].item(), float("nan"), 0.0)


class NoGrad(ForwardOnly):
    def __call__(self, model, batches, forward, lr_scale):
        with torch.no_grad():
            return super().__call__(model, batches, forward, lr_scale)


def test_activations_are_what_autograd_saves_counted_by_hand():
    """For x -> fc1 -> relu -> fc2 -> * scale -> mse, autograd keeps x (for dW1), relu's output (for its own
    backward and for dW2), and mse's two inputs, the prediction and y; the product with the frozen buffer
    keeps only the buffer (a weight), and W1, W2 are weights too. The hooks' own count must say the same,
    and the meter must find exactly that at the peak of a forward pass."""
    n = 512
    model, b = MLP(), batch(n)
    kept = []                                 # the saved tensors, alive, so no two storages share an address

    def pack(t):
        kept.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**b)["loss"]
    saved = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    by_hand = sum(v for k, v in saved.items() if k not in weights)
    del loss, kept
    # x (n x 8), relu(h) (n x 16), the prediction (n x 4) and y (n x 4)
    assert by_hand == n * (8 + 16 + 4 + 4) * F32

    m = measure_step(model, [b], ForwardOnly(), warmup_steps=0)
    assert m.at_peak["activations"] == by_hand
    assert m.at_peak["gradients"] == 0 and m.at_peak["optimizer state"] == 0
    inference = measure_step(model, [b], NoGrad(), warmup_steps=0)
    assert inference.at_peak["activations"] == 0                         # no graph, nothing saved
    assert inference.peak < m.peak


def test_gradient_checkpointing_keeps_fewer_activations():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(0, 64, (4, 64), generator=torch.Generator().manual_seed(0))
    b = {"input_ids": ids, "labels": ids}
    plain, ckpt = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    ckpt.load_state_dict(plain.state_dict())
    enable = getattr(ckpt, "activation_checkpointing_enable", None)      # transformers >= 5.x's name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    a, c = (measure_step(m, [b], ForwardOnly(), warmup_steps=0) for m in (plain, ckpt))
    assert 0 < c.at_peak["activations"] < a.at_peak["activations"] / 2


def test_the_meter_removes_its_hooks_and_leaves_training_as_it_was():
    model, b = MLP(), batch(4)
    reference = MLP()
    measure_step(model, [b], BackpropStep(sgd), TrainConfig(lr=0.1, max_grad_norm=None), warmup_steps=0)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    reference(**b)["loss"].backward()
    opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)                                         # the measured step is a real step
    assert all(not p._backward_hooks for p in model.parameters() if p._backward_hooks is not None)


@pytest.mark.parametrize("bad", [[], None])
def test_a_step_with_nothing_to_train_fails_clearly(bad):
    model = MLP().requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        measure_step(model, [batch(2)], BackpropStep(), TrainConfig())


def test_most_alive_counts_every_gradient_of_a_stored_backward():
    model = MLP(64, 128, 32)
    m = measure_step(model, [batch(4, 64, 32)], BackpropStep(sgd), TrainConfig(lr=1e-2, max_grad_norm=None))
    grads = sum(p.numel() for p in model.parameters()) * F32
    assert m.most["gradients"] == grads >= m.at_peak["gradients"]
    assert all(m.most[c] >= m.at_peak[c] for c in CATEGORIES)

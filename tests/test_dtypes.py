"""Half-precision bases: bf16 and fp16 models carrying float32 adapters, and bf16 training steps.

Mixed precision as the recipes run it: the frozen base in bfloat16 (or float16) and the trained
adapter tensors in float32 (peft's ``get_peft_model`` upcasts them so by default,
``autocast_adapter_dtype=True``). The layers then cross dtypes (LoRA's ``x.to(A.dtype)`` and
``.to(result.dtype)``, DoRA's ``z.dtype != Ax.dtype`` branch, the bottleneck's casts, the prompt cast
to the embeddings' dtype, the prefix cast to the attention's): every test here runs those branches.

References and tolerances, with eps = ``torch.finfo(dtype).eps`` (bf16 7.8e-3, fp16 9.8e-4), each
difference measured against the largest entry of the reference tensor:

* **peft** on the same half base with the same float32 values (``interop.peft.twin``): LoRA, RoSA
  with d = 0, prompt tuning and P-tuning are bit-identical (asserted: 0.0): like peft, LoRA adds its
  float32 branch to the half base output in float32 and rounds once. Prefix tuning is equal to
  float32 rounding (1e-6; observed 0.0). DoRA agrees to rounding of the half dtype: logits within
  6 eps, loss within 2 eps, gradients within 16 eps (observed 1.1 and 4.4 eps): its rescaling by
  m / ||W0 + sBA|| rounds in another order than peft's.
* **the float32 computation** of the same model (the half base upcast exactly, the same float32
  adapter): logits within 6 eps, gradients within 16 eps (observed at most 3.1 eps and 7.9 eps, LoRA;
  RoSA with a sparse part 2.6 and 5.8, Houlsby 0.8 and 1.3, the prompts at most 1.1 and 1.6), for
  every method, including those peft does not have. The adapter must move the logits by more than 5x
  the logits' tolerance, or agreeing would say little.
* **a bf16 training step** (``train(..., precision="bf16")``: autocast on a float32 model): ours and
  peft give the same losses and the same LoRA weights after 4 steps, bit for bit (observed and
  asserted), and the losses stay within eps_bf16 (relative) of float32 training (observed 7e-4).

QLoRA with ``bnb_4bit_compute_dtype=torch.bfloat16`` against bitsandbytes + peft is in
tests/test_qlora.py (``test_bf16_compute_equals_bitsandbytes_and_peft``).
"""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from peft_from_scratch import core
from peft_from_scratch.additive import HoulsbyConfig, PrefixTuningConfig, PromptTuningConfig, PTuningConfig
from peft_from_scratch.interop import peft as pio
from peft_from_scratch.models import tiny_llama
from peft_from_scratch.reparameterized.dora import DoRAConfig
from peft_from_scratch.reparameterized.lora import LoRAConfig
from peft_from_scratch.reparameterized.rosa import RoSAConfig
from peft_from_scratch.training import TrainConfig, train
from tests.helpers import batches, one_thread  # noqa: F401  (one_thread: autouse)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HALF = [torch.bfloat16, torch.float16]
PEFT_METHODS = {
    "lora": LoRAConfig(r=4, alpha=8, target_modules=ALL),
    "dora": DoRAConfig(r=4, alpha=8, target_modules=ALL),
    "rosa-d0": RoSAConfig(r=4, alpha=8, d=0, target_modules=ALL),
    "prompt": PromptTuningConfig(num_virtual_tokens=4),
    "p-tuning": PTuningConfig(num_virtual_tokens=4),
    "prefix-projection": PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True),
}
# LoRA (and RoSA with d = 0) add their float32 branch to the half base output in float32 and round once,
# as peft does: bit-identical. DoRA rounds its rescaling differently from peft: eps-based.
EXACT = {"lora": 0.0, "rosa-d0": 0.0, "prompt": 0.0, "p-tuning": 0.0, "prefix-projection": 1e-6}   # relative
ALL_METHODS = {
    **PEFT_METHODS,
    "rosa": RoSAConfig(r=4, alpha=8, d=0.05, target_modules=ALL),
    "houlsby": HoulsbyConfig(m=8, train_layer_norms=False),   # trained norms would turn the residual stream fp32
}


def float32_adapter(model, seed=1):
    """Every trainable tensor in float32, moved off its init (masks set for RoSA), as training would leave it."""
    config = model.adapter_config
    config.simulate_training(model, torch.Generator().manual_seed(seed))   # RoSA: a random mask of k entries
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def rel(a, b) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max()).item()


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def check_dtypes(model, dtype):
    assert {p.dtype for p in trainable(model)} == {torch.float32}, "the adapter must be float32"
    assert model.get_input_embeddings().weight.dtype == dtype and model.lm_head.weight.dtype == dtype


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(PEFT_METHODS))
def test_float32_adapters_on_a_half_base_agree_with_peft(name, dtype):
    eps = torch.finfo(dtype).eps
    ours, theirs, pairs = pio.twin(tiny_llama().to(dtype), PEFT_METHODS[name], "CAUSAL_LM", perturb=float32_adapter)
    check_dtypes(ours, dtype)
    assert all(q.dtype == torch.float32 for _, q in pairs.values())
    batch = batches(1)[0]
    a, b = ours(**batch), theirs(**batch)
    assert a.logits.dtype == dtype
    a.loss.backward(), b.loss.backward()
    grads = max(rel(p.grad, q.grad) for p, q in pairs.values())
    assert all(p.grad.dtype == torch.float32 for p, _ in pairs.values())
    logits, loss = rel(a.logits, b.logits), abs(a.loss.item() - b.loss.item()) / b.loss.item()
    print(f"{name} {dtype}: logits {logits / eps:.2f} eps, loss {loss / eps:.2f} eps, grads {grads / eps:.2f} eps")
    if name in EXACT:
        assert logits == loss == 0.0 and grads <= EXACT[name], (logits, loss, grads)
    else:
        assert logits <= 6 * eps and loss <= 2 * eps and grads <= 16 * eps, (logits / eps, loss / eps, grads / eps)
    with torch.no_grad():   # not vacuous: the adapter changes the logits far beyond the tolerance
        plain = tiny_llama().to(dtype)(input_ids=batch["input_ids"]).logits
    assert rel(a.logits[:, -plain.shape[1]:], plain) > 5 * 6 * eps       # (soft prompts: the last T positions)


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(ALL_METHODS))
def test_a_half_base_computes_the_float32_model_to_rounding(name, dtype):
    eps = torch.finfo(dtype).eps
    model = core.add_adapter(tiny_llama().to(dtype), ALL_METHODS[name])
    float32_adapter(model)
    check_dtypes(model, dtype)
    full = copy.deepcopy(model).float()          # the half weights upcast exactly, the same adapter
    batch = batches(1)[0]
    a, b = model(**batch), full(**batch)
    assert a.logits.dtype == dtype
    a.loss.backward(), b.loss.backward()
    grads = max(rel(p.grad, q.grad) for p, q in zip(trainable(model), trainable(full)))
    print(f"{name} {dtype}: logits {rel(a.logits, b.logits) / eps:.2f} eps, grads {grads / eps:.2f} eps")
    assert rel(a.logits, b.logits) <= 6 * eps, rel(a.logits, b.logits) / eps
    assert all(p.grad.dtype == torch.float32 for p in trainable(model)) and grads <= 16 * eps, grads / eps
    with torch.no_grad():
        core.remove_adapter(full)
        plain = full(input_ids=batch["input_ids"]).logits
    assert rel(b.logits[:, -plain.shape[1]:], plain) > 5 * 6 * eps, "the adapter barely changes the logits"


def test_a_bf16_training_step_gives_peft_losses_and_float32_losses():
    """``precision="bf16"`` (autocast) on a float32 model with LoRA, 4 AdamW steps: ours and peft give
    identical losses and LoRA weights (observed bit-identical: both compute the same bf16 matmuls),
    and the losses are within eps_bf16 (relative) of training in float32. (The weights after 4 Adam
    steps are not compared with float32 training: Adam turns rounding-level gradient differences into
    steps of size lr, see tests/helpers.py.)"""
    data = batches(4)
    config = TrainConfig(lr=1e-2, max_steps=4, warmup_ratio=0.0, max_grad_norm=None)
    ours, theirs, pairs = pio.twin(tiny_llama(), LoRAConfig(r=4, alpha=8, target_modules="all-linear"), "CAUSAL_LM",
                                   perturb=pio.random_B(0.1))
    full = copy.deepcopy(ours)
    h_ours = train(ours, data, replace(config, precision="bf16"), progress=False)
    h_peft = train(theirs, data, replace(config, precision="bf16"), progress=False)
    h_full = train(full, data, replace(config, precision="fp32"), progress=False)
    assert h_ours.loss == h_peft.loss, (h_ours.loss, h_peft.loss)
    for p, q in pairs.values():
        assert torch.equal(p, q)
    eps = torch.finfo(torch.bfloat16).eps
    for step, (a, b) in enumerate(zip(h_ours.loss, h_full.loss)):
        assert abs(a - b) <= eps * b, f"step {step + 1}: bf16 loss {a} vs float32 {b}"
    assert h_ours.loss != h_full.loss                     # bf16 really was in effect


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_training_steps_on_a_half_base_track_peft(dtype):
    """No autocast: a half base, float32 LoRA, 3 AdamW steps; the loss at every step agrees with
    peft's within 2 eps (relative), the parameters stay float32 and the half base does not move."""
    eps = torch.finfo(dtype).eps
    ours, theirs, pairs = pio.twin(tiny_llama().to(dtype), PEFT_METHODS["lora"], "CAUSAL_LM", perturb=float32_adapter)
    base_before = {k: v.clone() for k, v in ours.state_dict().items() if not core.is_adapter_key(ours, k)}
    opts = [torch.optim.AdamW([p for p, _ in pairs.values()], lr=1e-3),
            torch.optim.AdamW([q for _, q in pairs.values()], lr=1e-3)]
    for step, batch in enumerate(batches(3)):
        a, b = ours(**batch), theirs(**batch)
        assert abs(a.loss.item() - b.loss.item()) <= 2 * eps * b.loss.item(), f"step {step}"
        a.loss.backward(), b.loss.backward()
        for opt in opts:
            opt.step(), opt.zero_grad()
    assert all(p.dtype == torch.float32 for p, _ in pairs.values())
    after = ours.state_dict()
    assert all(torch.equal(after[k], v) and v.dtype == dtype for k, v in base_before.items()
               if v.is_floating_point())

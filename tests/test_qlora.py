"""QLoRA: our NF4 + LoRA SmolLM2 against bitsandbytes + peft, PagedAdamW against AdamW, prepare_qlora.

The reference is the QLoRA recipe as people run it: transformers loads SmolLM2 with a
``BitsAndBytesConfig`` (NF4, double quantization, float32 compute on CPU), peft's
``prepare_model_for_kbit_training`` turns on (non-re-entrant) gradient checkpointing, and
``get_peft_model(LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))`` adds LoRA. Ours is
``prepare_qlora`` on the float model loaded from the same folder.

What we found (bitsandbytes 0.50.2, peft 0.21.2, torch 2.13 CPU): the packed bytes and every state
tensor are identical; with the same LoRA A/B the logits are bit-identical, and so are the LoRA weights
after 3 AdamW steps. We still assert with a stated tolerance (``LOGITS_ATOL``, ``LORA_ATOL``), float32
rounding of a different matmul order, so that a harmless change of BLAS or kernel does not fail the
test; the exactness we observed is asserted separately where it is a property of the format (bytes).

One bitsandbytes detail the test steers around: on a CPU with AVX-512-BF16, bnb's ``Linear4bit``
in *eval* mode with an input that does not require grad repacks its weight into another layout
(``packing_format_for_cpu``) and runs a different kernel. Training mode never does, so we compare
in training mode (LoRA dropout is 0 and Llama has no other dropout, so the function is the same).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_from_scratch import core, models
from peft_from_scratch.quantized import linear4bit
from peft_from_scratch.reparameterized.dora import DoRAConfig
from peft_from_scratch.reparameterized.lora import LoRAConfig
from peft_from_scratch.optim import PagedAdamW, make_paged_adamw, optimizer_state_bytes
from peft_from_scratch.quantized.qlora import is_checkpointing, peft_style_parameter_count, prepare_qlora
from peft_from_scratch.training import TrainConfig, make_adamw, train

try:   # only the comparisons with bitsandbytes need it: PagedAdamW, prepare_qlora and the errors do not
    import bitsandbytes as bnb
except ImportError:
    bnb = None
NO_BNB = "bitsandbytes is not installed: this test compares with its 4-bit layers (pip install bitsandbytes)"
needs_bnb = pytest.mark.skipif(bnb is None, reason=NO_BNB)

R, ALPHA, STEPS, LR = 8, 16, 3, 1e-3
LOGITS_ATOL = 1e-4      # logits of size ~35; float32 rounding of another summation order is ~1e-5
LORA_ATOL = 1e-6        # LoRA weights (size ~0.05) after 3 AdamW steps of lr 1e-3; observed: 0.0


from tests.helpers import one_thread  # noqa: E402,F401  (autouse, module scope: these tests run on one thread)


# ----------------------------------------------------------------------------- SmolLM2: ours vs bnb + peft

@pytest.fixture(scope="module")
def smollm2_pair(one_thread):
    """(ours, peft's, [(our tensor, peft's tensor) for every LoRA A and B]) with identical LoRA weights."""
    if bnb is None:
        pytest.skip(NO_BNB)
    try:
        path = models.local_path(models.SMOLLM2)
    except models.ModelNotAvailable as e:
        pytest.skip(str(e))
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")
    theirs = prepare_model_for_kbit_training(theirs, use_gradient_checkpointing=True,
                                             gradient_checkpointing_kwargs={"use_reentrant": False})
    theirs = get_peft_model(theirs, LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear"))
    ours = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prepare_qlora(ours, LoRAConfig(r=R, alpha=ALPHA, target_modules="all-linear"))

    # Give our adapter "trained" values (B = 0 would hide the LoRA branch), then copy A and B across.
    g = torch.Generator().manual_seed(0)
    peft_modules, pairs = dict(theirs.named_modules()), []
    with torch.no_grad():
        for name, layer in core.adapter_layers(ours).items():
            layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=g) * 0.02)
            peft_layer = peft_modules["base_model.model." + name]
            for mine, their in ((layer.lora.A, peft_layer.lora_A["default"].weight),
                                (layer.lora.B, peft_layer.lora_B["default"].weight)):
                their.copy_(mine)
                pairs.append((mine, their))
    ours.train()
    theirs.train()   # see the module docstring: bnb's eval-mode CPU path repacks the weights
    return ours, theirs, pairs


def input_ids(shape=(2, 16), seed=1):
    return torch.randint(0, 49152, shape, generator=torch.Generator().manual_seed(seed))


def bnb_layers(peft_model):
    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
            if isinstance(m, bnb.nn.Linear4bit)}


def assert_same_quantized_weights(ours, theirs):
    layers = bnb_layers(theirs)
    mine = {n.removesuffix(".base_layer"): m for n, m in ours.named_modules() if isinstance(m, linear4bit.Linear4bit)}
    assert set(mine) == {n.removesuffix(".base_layer") for n in layers} and len(mine) == 30 * 7
    for name, theirs_layer in layers.items():
        m, w = mine[name.removesuffix(".base_layer")], theirs_layer.weight
        qs = w.quant_state
        assert w.data.dtype == torch.uint8
        assert w.data.shape == m.weight.shape == (m.out_features * m.in_features // 2, 1)   # bnb's (n/2, 1)
        assert torch.equal(m.weight, w.data), f"{name}: packed bytes differ"
        assert qs.nested and qs.blocksize == m.blocksize == 64 and qs.quant_type == "nf4"
        assert torch.equal(m.absmax, qs.absmax), f"{name}: absmax (8-bit, double-quantized) differs"
        assert torch.equal(m.offset, qs.offset), f"{name}: offset differs"
        assert torch.equal(m.absmax2, qs.state2.absmax), f"{name}: absmax2 differs"
        assert torch.equal(m.code, qs.code) and torch.equal(m.code2, qs.state2.code)
        assert qs.state2.blocksize == m.blocksize2 == 256 and tuple(qs.shape) == tuple(m.weight_shape)


@pytest.mark.slow   # SmolLM2, 4-bit twice
def test_same_quantized_weights_as_bitsandbytes(smollm2_pair):
    ours, theirs, _ = smollm2_pair
    assert_same_quantized_weights(ours, theirs)
    assert linear4bit.model_nbytes(ours) == sum(
        w.weight.data.numel() + w.weight.quant_state.absmax.numel()
        + 4 * (w.weight.quant_state.state2.absmax.numel() + 1) for w in bnb_layers(theirs).values())


@pytest.mark.slow   # SmolLM2, 4-bit twice
def test_same_trainable_parameters_as_peft(smollm2_pair):
    ours, theirs, _ = smollm2_pair
    assert peft_style_parameter_count(ours) == theirs.get_nb_trainable_parameters()
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    assert len(trainable) == 2 * 30 * 7                         # 7 linear layers x 30 blocks, not lm_head
    assert not isinstance(ours.lm_head, linear4bit.Linear4bit) and is_checkpointing(ours)


@pytest.mark.slow   # SmolLM2, 4-bit twice
def test_same_logits_as_bitsandbytes_and_peft(smollm2_pair):
    ours, theirs, _ = smollm2_pair
    ids = input_ids()
    with torch.no_grad():
        mine, ref = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    torch.testing.assert_close(mine, ref, rtol=0, atol=LOGITS_ATOL)


@pytest.mark.slow   # SmolLM2, 4-bit twice
def test_lora_weights_agree_after_adamw_steps_and_base_is_unchanged(smollm2_pair):
    ours, theirs, pairs = smollm2_pair
    before = [(a.detach().clone(), b.detach().clone()) for a, b in pairs]
    ids = input_ids()
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
                  for m in (ours, theirs)]
    try:
        for _ in range(STEPS):
            losses = []
            for model, opt in zip((ours, theirs), optimizers):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
            assert losses[0] == pytest.approx(losses[1], abs=1e-5)
        moved = max((a - a0).abs().max().item() for (a, _), (a0, _) in zip(pairs, before))
        assert moved > 0.5 * LR                                   # the steps did something
        for mine, their in pairs:
            torch.testing.assert_close(mine, their, rtol=0, atol=LORA_ATOL)
        assert_same_quantized_weights(ours, theirs)               # the frozen 4-bit base did not move
    finally:   # leave the module-scoped models as the other tests expect them
        with torch.no_grad():
            for (mine, their), (m0, t0) in zip(pairs, before):
                mine.copy_(m0)
                their.copy_(t0)


# ----------------------------------------------------------------------------- tiny Llama, bf16 compute: the recipe's setting

def tiny_pair(folder, compute_dtype, r=4, alpha=8):
    """Ours (``prepare_qlora``) and bnb + peft (``BitsAndBytesConfig``, ``prepare_model_for_kbit_training``)
    on the tiny Llama saved in ``folder``, with the same random B; both in training mode (module docstring)."""
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute_dtype)
    theirs = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu")
    theirs = prepare_model_for_kbit_training(theirs, use_gradient_checkpointing=True,
                                             gradient_checkpointing_kwargs={"use_reentrant": False})
    theirs = get_peft_model(theirs, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear"))
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prepare_qlora(ours, LoRAConfig(r=r, alpha=alpha, target_modules="all-linear"), compute_dtype=compute_dtype)
    modules, pairs, g = dict(theirs.named_modules()), [], torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in core.adapter_layers(ours).items():
            layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=g) * 0.1)
            other = modules["base_model.model." + name]
            for mine, their in ((layer.lora.A, other.lora_A["default"].weight),
                                (layer.lora.B, other.lora_B["default"].weight)):
                their.copy_(mine)
                pairs.append((mine, their))
    return ours.train(), theirs.train(), pairs


@needs_bnb
def test_bf16_compute_equals_bitsandbytes_and_peft(tmp_path):
    """``bnb_4bit_compute_dtype=torch.bfloat16``, the QLoRA recipe's setting (ours: ``compute_dtype``).
    Observed: logits, loss, every LoRA gradient and the LoRA weights after 3 AdamW steps bit-identical
    (both dequantize to float32, cast to bf16, matmul in bf16, cast back). Asserted with the float32
    tolerances of the SmolLM2 test scaled to these sizes (logits ~1: 1e-6; a different but equal
    summation order would show as ~1e-7 relative), and bf16 must differ from float32 compute
    (by ~1e-2 relative: bf16 has 8 bits of mantissa), so the setting is really in effect."""
    models.tiny_llama(hidden_size=128).save_pretrained(tmp_path)
    ours, theirs, pairs = tiny_pair(tmp_path, torch.bfloat16)
    assert all(l.base_layer.compute_dtype == torch.bfloat16 for l in core.adapter_layers(ours).values())
    ids = input_ids((2, 12), seed=1) % 128
    bases = [l.base_layer for l in core.adapter_layers(ours).values()]
    with torch.no_grad():
        for b in bases:
            b.compute_dtype = torch.float32
        full = ours(input_ids=ids).logits          # the same model computing in float32
        for b in bases:
            b.compute_dtype = torch.bfloat16
    opts = [torch.optim.AdamW([p for p, _ in pairs], lr=LR), torch.optim.AdamW([q for _, q in pairs], lr=LR)]
    for step in range(STEPS):
        a, b = ours(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
        scale = b.logits.abs().max().item()
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-6 * scale, msg=lambda m: f"step {step}: {m}")
        assert a.loss.item() == pytest.approx(b.loss.item(), abs=1e-6)
        if step == 0:
            rel = ((a.logits - full).abs().max() / full.abs().max()).item()
            assert 1e-4 < rel < 5e-2, f"bf16 vs float32 compute: {rel:.1e}"
        a.loss.backward(), b.loss.backward()
        if step == 0:
            for mine, their in pairs:
                torch.testing.assert_close(mine.grad, their.grad, rtol=0, atol=1e-6 * their.grad.abs().max().item())
        for opt in opts:
            opt.step(), opt.zero_grad()
    for mine, their in pairs:
        torch.testing.assert_close(mine, their, rtol=0, atol=LORA_ATOL)


# ----------------------------------------------------------------------------- PagedAdamW == AdamW

def run_optimizer(make, steps=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(shape, generator=g)) for shape in [(7, 5), (13,), (3, 4, 2)]]
    opt = make([{"params": params[:2]}, {"params": params[2:], "lr": 3e-2, "weight_decay": 0.0}])
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        params[1].grad = None if _ == 1 else params[1].grad        # a step without a gradient for one tensor
        opt.step()
    return params, opt


def test_paged_adamw_equals_torch_adamw_bitwise():
    kwargs = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    ours, paged = run_optimizer(lambda p: PagedAdamW(p, **kwargs))
    ref, adamw = run_optimizer(lambda p: torch.optim.AdamW(p, foreach=False, **kwargs))
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)                                  # bitwise: same ops in the same order
    for a, b in zip(ours, ref):
        sa, sb = paged.state[a], adamw.state[b]
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert sa["exp_avg"].device.type == "cpu"


def test_make_paged_adamw_trains_like_make_adamw():
    def run(make_optimizer):
        model = models.tiny_llama(hidden_size=64)
        prepare_qlora(model, LoRAConfig(r=4, alpha=8), gradient_checkpointing=False)
        batches = [{"input_ids": x, "labels": x} for x in torch.randint(1, 128, (4, 2, 12),
                                                                   generator=torch.Generator().manual_seed(0))]
        config = TrainConfig(lr=1e-2, weight_decay=0.01, max_steps=4, warmup_ratio=0.0, schedule="constant")
        history = train(model, batches, config, progress=False, make_optimizer=make_optimizer)
        return model, history
    (a, ha), (b, hb) = run(make_paged_adamw), run(make_adamw)
    assert ha.loss == hb.loss
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_optimizer_state_bytes():
    params, opt = run_optimizer(lambda p: PagedAdamW(p, lr=1e-3), steps=1)
    n = sum(p.numel() for p in params)
    assert optimizer_state_bytes(opt) == 2 * 4 * n + 3 * 4        # m and v in float32, one step counter each
    assert optimizer_state_bytes(opt, on_device=True) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the paging saves memory only on a GPU")
def test_paged_adamw_keeps_states_off_the_gpu():
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(1024, 1024, generator=g).cuda()) for _ in range(4)]
    ref = [nn.Parameter(p.detach().clone()) for p in params]
    paged, adamw = PagedAdamW(params, lr=1e-3), torch.optim.AdamW(ref, lr=1e-3, foreach=False)
    for _ in range(3):
        for p, q in zip(params, ref):
            p.grad = torch.randn(p.shape, generator=g).cuda()
            q.grad = p.grad.clone()
        paged.step()
        adamw.step()
    assert optimizer_state_bytes(paged, on_device=True) == 0
    assert optimizer_state_bytes(adamw, on_device=True) == 2 * 4 * 4 * 1024 * 1024
    assert paged.state[params[0]]["exp_avg"].is_pinned()
    for p, q in zip(params, ref):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------- prepare_qlora on a tiny Llama

def tiny_qlora(gradient_checkpointing=True, seed=0):
    model = models.tiny_llama(seed=seed, hidden_size=64).train()
    prepare_qlora(model, LoRAConfig(r=4, alpha=8), gradient_checkpointing=gradient_checkpointing)
    with torch.no_grad():
        for layer in core.adapter_layers(model).values():
            layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    return model


def test_prepare_qlora_quantizes_all_linear_and_freezes_the_rest():
    model = tiny_qlora()
    layers = core.adapter_layers(model)
    assert len(layers) == 2 * 7 and all(isinstance(l.base_layer, linear4bit.Linear4bit) for l in layers.values())
    assert all(l.base_layer.absmax2 is not None and l.base_layer.blocksize == 64 for l in layers.values())
    assert type(model.lm_head) is nn.Linear and not model.lm_head.weight.requires_grad
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    assert not model.model.embed_tokens.weight.requires_grad and not model.model.norm.weight.requires_grad
    assert is_checkpointing(model) and model.config.use_cache is False


def test_training_leaves_the_packed_weights_unchanged():
    model = tiny_qlora()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith((".A", ".B"))}
    lora = {k: v.clone() for k, v in model.state_dict().items() if k.endswith((".A", ".B"))}
    batches = [{"input_ids": x, "labels": x} for x in torch.randint(1, 128, (3, 2, 12),
                                                               generator=torch.Generator().manual_seed(0))]
    train(model, batches, TrainConfig(lr=1e-2, max_steps=3, warmup_ratio=0.0), progress=False,
          make_optimizer=make_paged_adamw)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert any(not torch.equal(after[k], v) for k, v in lora.items())


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = models.tiny_llama(hidden_size=64).train()
        prepare_qlora(model, LoRAConfig(r=4, alpha=8), gradient_checkpointing=checkpointing,
                      use_reentrant=use_reentrant)
        with torch.no_grad():
            for layer in core.adapter_layers(model).values():
                layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        assert is_checkpointing(model) == checkpointing
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert grads[1][name] is not None, f"{name}: no gradient under checkpointing"
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- errors

def test_an_already_quantized_model_is_refused():
    model = linear4bit.quantize_model(models.tiny_llama(hidden_size=64))
    with pytest.raises(ValueError, match="already quantized"):
        prepare_qlora(model)
    assert core.adapter_layers(model) == {}


@pytest.mark.slow   # SmolLM2, 4-bit twice
def test_a_bitsandbytes_model_is_refused(smollm2_pair):
    _, theirs, _ = smollm2_pair
    with pytest.raises(ValueError, match="already quantized.*BitsAndBytesConfig"):
        prepare_qlora(theirs.base_model.model, gradient_checkpointing=False)


def test_a_model_with_an_adapter_is_refused():
    model = core.add_adapter(models.tiny_llama(hidden_size=64), LoRAConfig(r=4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="already has a lora adapter.*remove_adapter"):
        prepare_qlora(model)
    assert not any(isinstance(m, linear4bit.Linear4bit) for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(RuntimeError, match="already has a lora adapter"):   # twice is the same mistake
        prepare_qlora(tiny_qlora())


def test_a_lora_config_that_does_not_fit_leaves_the_model_float():
    model = models.tiny_llama(hidden_size=64)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="rank r=1000"):
        prepare_qlora(model, LoRAConfig(r=1000))
    with pytest.raises(ValueError, match="blocksize=48"):
        prepare_qlora(model, blocksize=48)
    assert not any(isinstance(m, linear4bit.Linear4bit) for m in model.modules()) and core.adapter_layers(model) == {}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_dora_on_a_4bit_base_is_refused_and_changes_nothing():
    """DoRA takes row norms of W0, which a 4-bit layer does not hold as floats (README: the method
    cannot wrap the module); LoRA on the same base is the way (QLoRA)."""
    model = linear4bit.quantize_model(models.tiny_llama(hidden_size=64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotImplementedError, match=r"DoRA needs a floating-point base weight.*torch\.uint8 \(quantized\)"
                                                  r".*Use LoRA on a 4-bit base"):
        core.add_adapter(model, DoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert getattr(model, "adapter_config", None) is None and not core.adapter_layers(model)
    assert model.state_dict().keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(NotImplementedError, match="DoRA needs a floating-point base weight"):
        prepare_qlora(models.tiny_llama(hidden_size=64), DoRAConfig(r=2), gradient_checkpointing=False)


def test_gradient_checkpointing_needs_a_model_that_supports_it():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    with pytest.raises(ValueError, match="gradient_checkpointing=False"):
        prepare_qlora(model)
    prepare_qlora(model, LoRAConfig(r=2, target_modules=["0", "2"]), gradient_checkpointing=False)
    assert isinstance(model[0].base_layer, linear4bit.Linear4bit)

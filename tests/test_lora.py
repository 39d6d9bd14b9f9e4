"""LoRA against peft: same logits, same gradients, same parameters after training; merge; peft's format.

Tolerances (float32), in tests/helpers.py: every compared tensor passes
``assert_close(ours, peft, rtol=1e-5, atol=1e-6 * max(1, max|peft|))``. In practice our LoRA
performs the same float operations in the same order as peft's, and every difference is exactly 0.
"""
import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from peft_from_scratch import core
from peft_from_scratch.interop.peft import load_peft_adapter, save_peft_adapter
from peft_from_scratch.reparameterized.lora import LoRAConfig, LoRALinear
from peft_from_scratch.models import MINILM, SMOLLM2, tiny_bert, tiny_llama
from tests.helpers import (ATOL, RTOL, batches, compare_with_peft, make_pair, one_thread, perturb,  # noqa: F401
                           real_model, tokens)

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REAL = dict(b_std=0.01, m_noise=0.01)   # a gentler "trained" adapter for pretrained weights


# ----------------------------------------------------------------------------- equivalence with peft

@pytest.mark.parametrize("make,targets,seq_cls", [
    (tiny_llama, LLAMA_ALL, False),
    (tiny_llama, "all-linear", False),
    (tiny_bert, ["query", "value"], True),
])
def test_matches_peft_logits_grads_and_training(make, targets, seq_cls):
    saved = ["classifier"] if seq_cls else []
    ours, theirs = make_pair(make(), LoRAConfig(r=4, alpha=8, target_modules=targets, modules_to_save=saved),
                             task_type="SEQ_CLS" if seq_cls else "CAUSAL_LM")
    diffs = compare_with_peft(ours, theirs, batches(5, seq_cls=seq_cls))
    print(make.__name__, targets, {k: str(v) for k, v in diffs.items()})


@pytest.mark.slow
def test_matches_peft_on_smollm2():
    ours, theirs = make_pair(lambda: real_model(SMOLLM2), LoRAConfig(r=8, alpha=16, target_modules=LLAMA_ALL),
                             task_type="CAUSAL_LM", **REAL)
    diffs = compare_with_peft(ours, theirs, batches(5, vocab=49152, shape=(1, 16)))
    print("smollm2", {k: str(v) for k, v in diffs.items()})


@pytest.mark.slow
def test_matches_peft_on_minilm_seq_cls():
    config = LoRAConfig(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    ours, theirs = make_pair(lambda: real_model(MINILM), config, task_type="SEQ_CLS", **REAL)
    diffs = compare_with_peft(ours, theirs, batches(5, vocab=30522, shape=(2, 16), seq_cls=True))
    print("minilm", {k: str(v) for k, v in diffs.items()})


def test_rslora_scaling_equals_peft():
    config = LoRAConfig(r=8, alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"])
    ours, theirs = make_pair(tiny_llama(), config)
    for name, layer in core.adapter_layers(ours).items():
        assert layer.lora.scaling == pytest.approx(16 / 8 ** 0.5)
        assert layer.lora.scaling == theirs.get_submodule("base_model.model." + name).scaling["default"]
    x = tokens()
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=RTOL, atol=ATOL)


def test_dropout_in_eval_mode_equals_peft_and_train_mode_draws_the_same_masks():
    ours, theirs = make_pair(tiny_llama(), LoRAConfig(r=4, alpha=8, dropout=0.3, target_modules=LLAMA_ALL))
    x = tokens()
    torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=RTOL, atol=ATOL)  # eval: no dropout
    ours.train(), theirs.train()
    # Training mode: both call dropout once per adapted layer, in the same order, so the same seed
    # draws the same masks; with different seeds the outputs differ (dropout is really on).
    torch.manual_seed(0)
    a = ours(x).logits
    torch.manual_seed(0)
    b = theirs(x).logits
    torch.manual_seed(1)
    c = ours(x).logits
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    assert (a - c).abs().max() > 1e-3


def test_init_has_peft_distribution():
    """A ~ Kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(d_in), 1/sqrt(d_in)), B = 0, as peft (not the same
    draws: peft builds nn.Linear layers first, which consume random numbers)."""
    base = tiny_llama(hidden_size=256)
    ours = core.add_adapter(copy.deepcopy(base), LoRAConfig(r=16, target_modules=["q_proj"]))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, target_modules=["q_proj"]))
    for name, layer in core.adapter_layers(ours).items():
        peft_A = theirs.get_submodule("base_model.model." + name).lora_A["default"].weight
        bound = 1 / 256 ** 0.5
        for A in (layer.lora.A, peft_A):
            assert A.abs().max() <= bound and A.abs().max() > 0.95 * bound
            assert A.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)  # std of U(-b, b)
        assert torch.equal(layer.lora.B, torch.zeros_like(layer.lora.B))


# ----------------------------------------------------------------------------- peft's on-disk format

def trained(make, config):
    model = core.add_adapter(make(), config)
    perturb(model)
    return model


FORMAT_CASES = [
    (tiny_llama, LoRAConfig(r=4, alpha=8, target_modules="all-linear", use_rslora=True)),
    (tiny_bert, LoRAConfig(r=2, alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"])),
]


@pytest.mark.parametrize("make,config", FORMAT_CASES)
def test_ours_to_peft_round_trip(tmp_path, make, config):
    model = trained(make, config)
    x = tokens()
    save_peft_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == config.r and cfg["use_dora"] is False
    theirs = PeftModel.from_pretrained(make(), tmp_path)
    assert theirs.peft_config["default"].use_rslora == config.use_rslora
    torch.testing.assert_close(theirs(x).logits, model(x).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("make,config", FORMAT_CASES)
def test_peft_to_ours_round_trip(tmp_path, make, config):
    task = "SEQ_CLS" if make is tiny_bert else "CAUSAL_LM"
    _, theirs = make_pair(make(), config, task_type=task)
    x = tokens()
    theirs.save_pretrained(tmp_path)
    model = load_peft_adapter(make(), tmp_path)
    assert all(isinstance(m, LoRALinear) for m in core.adapter_layers(model).values())
    assert model.adapter_config.r == config.r and model.adapter_config.use_rslora == config.use_rslora
    torch.testing.assert_close(model(x).logits, theirs(x).logits, rtol=0, atol=1e-6)
    assert core.count_parameters(model)[0] == theirs.get_nb_trainable_parameters()[0]


# ----------------------------------------------------------------------------- errors

def test_bad_ranks_and_targets_fail_before_touching_the_model():
    model = tiny_llama()
    with pytest.raises(ValueError, match="positive integer"):
        LoRAConfig(r=0)
    with pytest.raises(ValueError, match=r"r=33 does not fit layer model.layers.0.self_attn.k_proj .*32"):
        core.add_adapter(model, LoRAConfig(r=33, target_modules=["q_proj", "k_proj"]))  # k_proj: 64 -> 32
    with pytest.raises(ValueError, match="(?s)matched no module.*did you mean 'q_proj'"):
        core.add_adapter(model, LoRAConfig(r=2, target_modules=["q_prj"]))
    assert not core.adapter_layers(model) and all(p.requires_grad for p in model.parameters())


def test_loading_peft_format_onto_the_wrong_base(tmp_path):
    """What a peft file lets us check: module names, Linear types, shapes, the target set; and our
    fingerprint when we wrote the file. A peft-written file on same-shaped other weights loads."""
    config = LoRAConfig(r=4, alpha=8, target_modules=LLAMA_ALL)
    _, theirs = make_pair(tiny_llama(), config)
    theirs.save_pretrained(tmp_path / "peft")
    save_peft_adapter(trained(tiny_llama, config), tmp_path / "ours")
    cases = [
        (tiny_llama(hidden_size=32), "shape"),                        # other sizes
        (tiny_llama(num_hidden_layers=3), "layers.2.* has no tensors"),  # deeper: targets left without tensors
        (tiny_llama(num_hidden_layers=1), "no Linear layer 'model.layers.1"),  # shallower
        (tiny_bert(), "matched no module"),                           # another architecture
    ]
    for folder in ("peft", "ours"):
        for model, message in cases:
            if folder == "ours":
                message = "another base model"                         # our fingerprint catches it first
            with pytest.raises(ValueError, match=message):
                load_peft_adapter(model, tmp_path / folder)
            assert not core.adapter_layers(model) and getattr(model, "adapter_config", None) is None
    with pytest.raises(ValueError, match="another base model"):       # same shapes, other weights: ours knows
        load_peft_adapter(tiny_llama(seed=5), tmp_path / "ours")
    load_peft_adapter(tiny_llama(seed=5), tmp_path / "peft")          # peft's file cannot tell


def test_loading_a_peft_adapter_with_options_we_do_not_implement(tmp_path):
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], bias="lora_only",
                                                     rank_pattern={"q_proj": 2}))
    theirs.save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match="bias.*rank_pattern|rank_pattern.*bias"):
        load_peft_adapter(tiny_llama(), tmp_path)


def test_config_fields_map_to_peft_and_the_docstring_says_so():
    """LoRAConfig's docstring once claimed peft's field names (alpha is lora_alpha in peft): the mapping
    is now written once, in interop.peft.LORA_FIELDS, and it covers every field."""
    import dataclasses
    from peft import LoraConfig as PeftLoraConfig
    from peft_from_scratch.interop.peft import LORA_FIELDS
    ours = {f.name for f in dataclasses.fields(LoRAConfig)} - {"extra_trainable"}
    theirs = {f.name for f in dataclasses.fields(PeftLoraConfig)}
    assert ours == set(LORA_FIELDS) and set(LORA_FIELDS.values()) <= theirs
    for mine, peft_name in LORA_FIELDS.items():
        assert mine == peft_name or f"``{peft_name}``" in LoRAConfig.__doc__, mine

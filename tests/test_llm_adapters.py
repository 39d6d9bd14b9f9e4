"""LLM-Adapters' series and parallel adapters against the official code's equations
(AGI-Edgerunners/LLM-Adapters ``peft/src/peft/tuners/bottleneck.py``, ``Linear.forward``), recomputed
here by hand from the layer's weights; a parallel adapter with no non-linearity against peft's LoRA
(same weights in, same outputs, gradients and parameters after k SGD steps); the parameter counts;
the errors. No installable package has these adapters (the PyPI ``llm-adapters`` is unrelated).

Tolerance: the hand computations do the official float operations in its order, so they match to
``rtol=1e-6, atol=1e-7`` (float32); against peft ``rtol=1e-5, atol=1e-6``, as the LoRA tests.
"""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_from_scratch import core
from peft_from_scratch.additive.llm_adapters import BottleneckLinear, LLMAdapterConfig, parameter_count
from peft_from_scratch.models import tiny_llama
from tests.helpers import batches, one_thread, real_model  # noqa: F401  (one_thread: autouse)


def adapted(config: LLMAdapterConfig, seed: int = 0):
    model = core.add_adapter(tiny_llama(), config)
    config.simulate_training(model, torch.Generator().manual_seed(seed))    # U off zero where init="mam"
    return model


def by_hand(layer: BottleneckLinear, x: torch.Tensor) -> torch.Tensor:
    """The official ``Linear.forward`` for the layer's adapter type, written out."""
    W, b = layer.base_layer.weight, layer.base_layer.bias
    D, U, s = layer.down.weight, layer.up.weight, layer.scaling

    def adapter(v):
        return (torch.tanh(v.float() @ D.T) @ U.T).to(v.dtype) * s
    if layer.where == "input":          # "mh_adapter": through the adapter, then the linear layer
        return torch.nn.functional.linear(adapter(x) + x, W, b)
    h = torch.nn.functional.linear(x, W, b)
    if layer.where == "output":         # "output_adapter": the linear layer, then the adapter
        return adapter(h) + h
    return h + adapter(x)               # "parallel_adapter"


@pytest.mark.parametrize("config, where", [
    (LLMAdapterConfig(bottleneck_size=8), {"down_proj": "output"}),
    (LLMAdapterConfig(bottleneck_size=8, target_modules=["gate_proj", "up_proj", "down_proj"], scaling="learned"),
     {"gate_proj": "input", "up_proj": "input", "down_proj": "output"}),
    (LLMAdapterConfig(kind="parallel", bottleneck_size=8, scaling=2.0), {"up_proj": "parallel", "down_proj": "parallel"}),
    (LLMAdapterConfig(kind="parallel", bottleneck_size=8, target_modules=["q_proj", "k_proj", "v_proj"]),
     {"q_proj": "parallel", "k_proj": "parallel", "v_proj": "parallel"}),
])
def test_each_layer_computes_the_official_equations(config, where):
    model = adapted(config)
    layers = core.adapter_layers(model)
    assert {name.rsplit(".", 1)[1]: layer.where for name, layer in layers.items()} == where
    assert len(layers) == len(where) * model.config.num_hidden_layers
    x = torch.randn(2, 5, model.config.hidden_size)
    for name, layer in layers.items():
        inp = x if layer.base_layer.in_features == x.shape[-1] else torch.randn(2, 5, layer.base_layer.in_features)
        torch.testing.assert_close(layer(inp), by_hand(layer, inp), rtol=1e-6, atol=1e-7)


def test_a_half_precision_layer_runs_its_adapter_in_float32_and_scales_after_the_cast():
    base = torch.nn.Linear(16, 24).to(torch.bfloat16)
    for where in ("input", "output", "parallel"):
        layer = BottleneckLinear(copy.deepcopy(base), where, 4, scaling=3.0)
        assert layer.down.weight.dtype == layer.up.weight.dtype == torch.float32       # as the official nn.Linear(...)
        x = torch.randn(3, 16).to(torch.bfloat16)
        out = layer(x)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, by_hand(layer, x))


def test_the_mam_init_is_the_identity_and_the_bert_init_is_not():
    base = tiny_llama()
    x = batches(1)[0]["input_ids"]
    with torch.no_grad():
        want = base(input_ids=x).logits
        for kind in ("series", "parallel"):
            same = core.add_adapter(copy.deepcopy(base), LLMAdapterConfig(kind=kind, bottleneck_size=8, init="mam"))
            assert torch.equal(same(input_ids=x).logits, want)
            moved = core.add_adapter(copy.deepcopy(base), LLMAdapterConfig(kind=kind, bottleneck_size=8))
            assert not torch.equal(moved(input_ids=x).logits, want)
    big = BottleneckLinear(torch.nn.Linear(512, 512), "output", 256)        # N(0, 0.02²): the sample std is near 0.02
    assert abs(big.down.weight.std().item() - 0.02) < 1e-3 and abs(big.up.weight.std().item() - 0.02) < 1e-3


def test_a_linear_parallel_adapter_is_peft_lora_with_A_D_and_B_U():
    """f = identity: y = W x + s U D x, LoRA with A = D, B = U and alpha / r = s, the same function and
    the same training: outputs, gradients and parameters after 4 SGD steps."""
    r, s, targets = 8, 2.0, ["q_proj", "v_proj", "up_proj", "down_proj"]
    ours = adapted(LLMAdapterConfig(kind="parallel", bottleneck_size=r, target_modules=targets, non_linearity="linear",
                                    scaling=s, init="mam"))
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=r, lora_alpha=r * s, target_modules=targets, lora_dropout=0.0))
    pairs = []
    for name, layer in core.adapter_layers(ours).items():
        lora = theirs.base_model.model.get_submodule(name)
        assert lora.scaling["default"] == s
        A, B = layer.lora_weights()
        with torch.no_grad():
            lora.lora_A["default"].weight.copy_(A)
            lora.lora_B["default"].weight.copy_(B)
        pairs += [(A, lora.lora_A["default"].weight), (B, lora.lora_B["default"].weight)]
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (ours, theirs)]
    for batch in batches(4):
        losses = [m(**batch).loss for m in (ours, theirs)]
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
        for loss in losses:
            loss.backward()
        for a, b in pairs:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    assert max((a - b).abs().max().item() for a, b in pairs) < 1e-6
    with pytest.raises(ValueError, match="only a parallel adapter is a LoRA"):
        core.adapter_layers(adapted(LLMAdapterConfig(bottleneck_size=4)))["model.layers.0.mlp.down_proj"].lora_weights()


def test_a_learned_scale_trains():
    model = adapted(LLMAdapterConfig(kind="parallel", bottleneck_size=4, scaling="learned"))
    model(**batches(1)[0]).loss.backward()
    scales = [layer.scaling for layer in core.adapter_layers(model).values()]
    assert all(s.requires_grad and s.grad is not None and s.grad.abs().item() > 0 for s in scales)


@pytest.mark.parametrize("kind, size, targets", [("series", 8, None), ("parallel", 4, None),
                                                 ("series", 4, ["gate_proj", "up_proj", "down_proj"]),
                                                 ("parallel", 4, ["q_proj", "k_proj", "v_proj"])])
def test_the_parameter_count_formula_counts_what_the_model_trains(kind, size, targets):
    base = tiny_llama()
    shapes = {name.rsplit(".", 1)[1]: (m.in_features, m.out_features) for name, m in base.model.layers[0].named_modules()
              if isinstance(m, torch.nn.Linear)}
    model = core.add_adapter(base, LLMAdapterConfig(kind=kind, bottleneck_size=size, target_modules=targets))
    trainable, _ = core.count_parameters(model)
    assert trainable == parameter_count(kind, size, shapes, model.config.num_hidden_layers, targets)


def test_bad_input_names_the_problem_and_leaves_the_model_alone():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="kind must be 'series' or 'parallel'"):
        LLMAdapterConfig(kind="prefix")
    with pytest.raises(ValueError, match="bottleneck_size must be a positive integer"):
        LLMAdapterConfig(bottleneck_size=0)
    with pytest.raises(ValueError, match="scaling must be a finite number or 'learned'"):
        LLMAdapterConfig(scaling=float("nan"))
    with pytest.raises(ValueError, match="fc_in"):
        core.add_adapter(model, LLMAdapterConfig(target_modules=["fc_in"]))     # GPT-J's name, not Llama's
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not core.adapter_layers(model)


def test_choice_correct_ranks_the_choices_by_their_summed_log_probability():
    """``tasks.choice_correct`` (notebook 20's ARC-Easy score) against the same sum computed one choice
    at a time, on real SmolLM2 and three ARC-Easy questions, with the right answers moved around."""
    from peft_from_scratch import data, tasks
    from peft_from_scratch.models import SMOLLM2, load_model
    model = real_model(SMOLLM2)
    _, tok = load_model(SMOLLM2)
    rows = data.load_arc_easy("test", n=3, seed=0)
    expected, picked = [], []
    for row in rows:
        prompt = tok(data.chat_prompt(tok, row["question"]), add_special_tokens=False)["input_ids"]
        sums = []
        for choice in row["choices"]:
            ids = prompt + tok(choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
            sums.append(sum(logp[t - 1, ids[t]].item() for t in range(len(prompt), len(ids))))
        picked.append(max(range(4), key=sums.__getitem__))
        expected.append(int(picked[-1] == row["label"]))
    assert tasks.choice_correct(model, tok, rows, lambda r: r["question"]) == expected
    relabelled = rows.map(lambda r, i: {"label": picked[i]}, with_indices=True)   # the model's own picks are "right"
    assert tasks.choice_correct(model, tok, relabelled, lambda r: r["question"]) == [1, 1, 1]


def test_the_task_refuses_an_unknown_task_name():
    from peft_from_scratch import tasks
    work = tasks.MathAndScience(**tasks.MathAndScience.PROFILES["smoke"])
    with pytest.raises(ValueError, match=r"task must be one of \('gsm8k', 'arc_easy'\)"):
        work.fit(tiny_llama(), "boolq", 1e-3)

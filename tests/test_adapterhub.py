"""Our bottleneck adapters against AdapterHub's ``adapters`` 1.3.0 (peft has no bottleneck adapters).

The machinery lives in ``peft_from_scratch/adapterhub.py`` (its docstring says why AdapterHub runs
in a subprocess on a cached side env, requirements/adapterhub.txt, and which AdapterHub config
equals which of our placements); notebook 06 calls the same ``compare``. Here every case builds the
base (a tiny random BERT, or the real all-MiniLM-L6-v2), adds our adapter with random "trained"
values (``perturb``: far from the near-identity init, so agreeing is not vacuous), trained layer
norms and classifier head, and runs both sides. They must agree on the logits at every step, every
gradient at the first step and every parameter after ``STEPS`` AdamW steps, within float32 rounding
(RTOL, ATOL of helpers; on torch 2.13 CPU they are in fact bit-identical).

One worker process runs all the cases the session selected (importing transformers 4.57 and
adapters takes seconds): ``prepare_case`` per case, one ``run_worker``, ``Case.report`` per case.
``test_compare_in_one_call`` runs the public ``compare`` as the notebook does.

The comparison skips only where the side env is not cached *and* PyPI is unreachable
(``test_the_side_env_skips_only_offline_and_uncached``). So that Houlsby is never left unchecked,
``test_our_placements_compute_adapterhubs_equations`` runs everywhere, offline: AdapterHub's code for
the config each placement maps to, written out as equations and computed by hand on our weights.
"""
from __future__ import annotations

import copy
import dataclasses
import sys

import pytest
import torch

from peft_from_scratch import core
from peft_from_scratch.interop import adapterhub
from peft_from_scratch.additive.compacter import CompacterConfig
from peft_from_scratch.additive.houlsby import HoulsbyConfig
from peft_from_scratch.additive.prefix_tuning import PrefixTuningConfig
from peft_from_scratch.additive.unified_view import MAMConfig, ParallelAdapterConfig
from peft_from_scratch.models import MINILM, tiny_bert, tiny_llama
from tests.helpers import ATOL, RTOL, one_thread, real_model, tokens  # noqa: F401  (one_thread: autouse)

STEPS, LR = 5, 1e-3


def adapterhub_env_or_skip():
    """The cached AdapterHub env; skip without network (nothing cached, PyPI unreachable), fail if pip fails."""
    try:
        return adapterhub.adapterhub_env()
    except adapterhub.NoNetwork as e:
        pytest.skip(str(e))
    except adapterhub.AdapterHubError as e:
        pytest.fail(str(e), pytrace=False)


def make_batches(vocab: int, n=2, shape=(2, 12), token_types=False) -> list[dict]:
    out = []
    for i in range(n):
        mask = torch.ones(shape, dtype=torch.long)
        mask[-1, shape[1] - 3 * i:] = 0            # the second batch has padding
        labels = torch.randint(0, 2, (shape[0],), generator=torch.Generator().manual_seed(100 + i))
        batch = {"input_ids": tokens(i, vocab, shape), "attention_mask": mask, "labels": labels}
        if token_types:
            batch["token_type_ids"] = (torch.arange(shape[1]) >= shape[1] // 2).long().expand(shape)
        out.append(batch)
    return out


# id -> (base model, our config, AdapterHub config override or None)
CASES = {
    "tiny-houlsby-gelu": ("tiny", HoulsbyConfig(m=8, non_linearity="gelu"), None),
    "tiny-houlsby-swish": ("tiny", HoulsbyConfig(m=16, non_linearity="swish"), None),
    "tiny-pfeiffer-relu": ("tiny", HoulsbyConfig(m=8, non_linearity="relu", placement="pfeiffer"), None),
    "tiny-parallel-gelu": ("tiny", HoulsbyConfig(m=8, placement="parallel"), None),
    "minilm-houlsby-gelu": ("minilm", HoulsbyConfig(m=16), None),
    "minilm-pfeiffer-gelu": ("minilm", HoulsbyConfig(m=16, placement="pfeiffer"), None),
    "tiny-compacter": ("tiny", CompacterConfig(reduction_factor=4, phm_dim=2), None),
    "tiny-compacterpp-rank2": ("tiny", CompacterConfig(reduction_factor=2, phm_dim=4, rank=2, placement="pfeiffer",
                                                       non_linearity="gelu_new"), None),
    # the unified view's scaled parallel adapter: ParBnConfig() is s = 4, the LoRA ("mam_adapter") init, ReLU
    "tiny-scaled-pa": ("tiny", ParallelAdapterConfig(m=8, train_layer_norms=True), None),
    "tiny-pa-learned-attn": ("tiny", ParallelAdapterConfig(m=16, scaling="learned", position="attn", init="houlsby",
                                                           train_layer_norms=True), None),
    "minilm-scaled-pa-default": ("minilm", ParallelAdapterConfig(m=192, train_layer_norms=True),
                                 ("ParBnConfig", {})),       # AdapterHub's defaults: m = d / 2, s = 4
    "minilm-compacter": ("minilm", CompacterConfig(), None),                     # the paper's: m = d/32, n = 4, r = 1
    "minilm-compacterpp": ("minilm", CompacterConfig(placement="pfeiffer"), None),
    # the defaults we do not compute, for test_adapterhub_defaults_are_different_functions
    "tiny-seqbn-default": ("tiny", HoulsbyConfig(m=8, placement="pfeiffer"),
                           ("SeqBnConfig", {"reduction_factor": 8.0, "non_linearity": "gelu"})),
    "tiny-compacterpp-default": ("tiny", CompacterConfig(reduction_factor=4, phm_dim=2, placement="pfeiffer"),
                                 ("CompacterPlusPlusConfig", {"reduction_factor": 4, "phm_dim": 2,
                                                              "non_linearity": "gelu"})),
}
# Llama (tiny): the unified view's prefix, parallel adapter and MAM. AdapterHub's prefix equals ours with
# positions="from_zero" under eager attention; the rest are its departures (test_llama_departures).
LLAMA_CASES = {
    "llama-prefix-from-zero": PrefixTuningConfig(num_virtual_tokens=3, positions="from_zero"),
    "llama-prefix-peft-positions": PrefixTuningConfig(num_virtual_tokens=3),
    "llama-prefix-sdpa": PrefixTuningConfig(num_virtual_tokens=3, positions="from_zero"),
    "llama-pa-attn": ParallelAdapterConfig(m=8, position="attn", scaling="learned"),
    "llama-mam": MAMConfig(num_virtual_tokens=3, prefix_projection=False, encoder_hidden_size=None, m=8,
                           positions="from_zero"),
}
CASES.update({case: ("llama", config, None) for case, config in LLAMA_CASES.items()})
ATTENTION = {"llama-prefix-sdpa": "sdpa"}    # the worker's Llama attention; eager for the others
SLOW = {"minilm-houlsby-gelu", "minilm-pfeiffer-gelu", "minilm-compacter", "minilm-compacterpp", "minilm-scaled-pa-default"}
DEFAULTS = ("tiny-seqbn-default", "tiny-compacterpp-default")
DEPARTURES = ("llama-prefix-peft-positions", "llama-prefix-sdpa", "llama-pa-attn", "llama-mam")


def adapted(kind: str, config):
    if kind == "llama":
        model = core.add_adapter(tiny_llama(seed=0), config)
    else:
        base = tiny_bert(seed=0) if kind == "tiny" else real_model(MINILM)
        model = core.add_adapter(base, dataclasses.replace(config, modules_to_save=["classifier"]))
    adapterhub.perturb(model)
    return model


def lm_batches(n=2, shape=(2, 12)) -> list[dict]:
    """Causal-LM batches: the labels are the tokens; the second batch has padding."""
    out = []
    for i in range(n):
        mask = torch.ones(shape, dtype=torch.long)
        mask[-1, shape[1] - 3 * i:] = 0
        x = tokens(i, 128, shape)
        out.append({"input_ids": x, "attention_mask": mask, "labels": x.masked_fill(mask == 0, -100)})
    return out


@pytest.fixture(scope="module")
def reports(request, tmp_path_factory) -> dict[str, adapterhub.AdapterHubReport]:
    """Run every selected case on both sides, in one worker process; ``-m "not slow"`` leaves MiniLM out."""
    here = [item for item in request.session.items if getattr(item, "module", None) is sys.modules[__name__]]
    selected = {item.callspec.params["case"] for item in here
                if hasattr(item, "callspec") and "case" in item.callspec.params}
    adapterhub_env_or_skip()
    tmp = tmp_path_factory.mktemp("adapterhub")
    cases = {}
    for case in sorted(selected):
        kind, config, override = CASES[case]
        model = adapted(kind, config)
        batches = lm_batches() if kind == "llama" else make_batches(model.config.vocab_size)
        cases[case] = adapterhub.prepare_case(model, batches, tmp / case, steps=STEPS, lr=LR, adapterhub=override,
                                              attn_implementation=ATTENTION.get(case, "eager"))
        cases[case].model, cases[case].batches = model, batches           # for test_llama_departures
    try:
        adapterhub.run_worker([c.folder for c in cases.values()])
    except adapterhub.AdapterHubError as e:
        pytest.fail(str(e), pytrace=False)
    # Case.report raises if the two sides train different tensors (ours: adapters, every LayerNorm,
    # the classifier; AdapterHub's: train_adapter plus the LayerNorms)
    reports = {case: c.report(RTOL, ATOL) for case, c in cases.items()}
    for case, c in cases.items():
        reports[case].case = c
    return reports


@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.slow] if c in SLOW else [])
                                  for c in CASES if c not in DEFAULTS + DEPARTURES])
def test_same_as_adapterhub(reports, case):
    r = reports[case]
    assert r.versions["transformers"] == "4.57.6" and r.versions["adapters"] == "1.3.0"
    # not vacuous: the adapters move the logits by > 5% of their size (at the init: ~1e-4)
    assert r.adapter_effect > 0.05
    print(f"\n{case}: {r.reference}; adapter effect {r.adapter_effect:.2f}\n{r.table()}")
    assert r.passed, r.table()


@pytest.mark.parametrize("case", DEFAULTS)
def test_adapterhub_defaults_are_different_functions(reports, case):
    """AdapterHub's SeqBnConfig and CompacterPlusPlusConfig defaults (original_ln_before=True) feed the
    adapter LN(h + x), not the feed-forward output h as Pfeiffer's and Compacter++'s papers do."""
    r = reports[case]
    print(f"\n{case}: max |ours - AdapterHub's| / max |AdapterHub's| over the steps = {r.diffs['logits'].rel:.2f}")
    assert r.diffs["logits"].rel > 0.05 and not r.passed


@pytest.mark.parametrize("case", DEPARTURES)
def test_llama_departures(reports, case):
    """Where AdapterHub's Llama code computes another function than the paper's (and ours):
    its prefix keeps the tokens at positions 0..T-1 (peft's and ours by default put them after the prefix);
    under sdpa attention (transformers 4.57's default) its prefix attention is not Eq. 7's; and its parallel
    adapter reads the residual before the RMSNorm. The last two are pinned down exactly: AdapterHub's logits
    equal our weights run with the adapters reading the residual."""
    r = reports[case]
    print(f"\n{case}: max |ours - AdapterHub's| / max |AdapterHub's| over the steps = {r.diffs['logits'].rel:.2f}")
    assert r.diffs["logits"].rel > 0.05 and not r.passed
    if case in ("llama-pa-attn", "llama-mam"):
        theirs = r.case.theirs()["logits.0"]
        with torch.no_grad(), adapterhub.reading_the_residual(r.case.model.eval()) as model:
            ours_rewired = model(**r.case.batches[0]).logits
        torch.testing.assert_close(ours_rewired, theirs, rtol=RTOL, atol=ATOL * theirs.abs().max().item())


def test_compare_in_one_call():
    """The notebook's entry point: one call, a copy trained (the model passed in is unchanged),
    inputs with token_type_ids as a BERT tokenizer gives them."""
    adapterhub_env_or_skip()
    model = adapted("tiny", HoulsbyConfig(m=8)).eval()
    before = copy.deepcopy(model.state_dict())
    try:
        r = adapterhub.compare(model, make_batches(model.config.vocab_size, token_types=True),
                               steps=3, rtol=RTOL, atol=ATOL)
    except adapterhub.AdapterHubError as e:
        pytest.fail(str(e), pytrace=False)
    assert isinstance(r, adapterhub.AdapterHubReport) and r.steps == 3
    assert r.reference.startswith("adapters 1.3.0 (transformers 4.57.6) DoubleSeqBnConfig(reduction_factor=8.0")
    assert r.adapter_effect > 0.05 and r.passed, r.table()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- offline: AdapterHub's equations by hand

# The flags of AdapterHub's configs that decide the function (adapters 1.3.0,
# configuration/adapter_config.py), overridden by the arguments ``adapterhub.adapterhub_config`` passes.
ADAPTERHUB_DEFAULTS = {
    "DoubleSeqBnConfig": dict(original_ln_before=False, original_ln_after=True, residual_before_ln=True,
                              mh_adapter=True, output_adapter=True, scaling=1.0, is_parallel=False),
    "SeqBnConfig": dict(original_ln_before=True, original_ln_after=True, residual_before_ln=True,
                        mh_adapter=False, output_adapter=True, scaling=1.0, is_parallel=False),
    "ParBnConfig": dict(original_ln_before=False, original_ln_after=True, residual_before_ln=True,
                        mh_adapter=False, output_adapter=True, scaling=4.0, is_parallel=True),
}
ACTIVATIONS = {"gelu": torch.nn.functional.gelu, "relu": torch.relu, "swish": torch.nn.functional.silu}


def adapterhub_sublayer(h, x, ln, adapter, flags):
    """One BERT sub-layer's end as AdapterHub computes it (methods/modeling.py, ``Adapter.pre_forward``,
    ``forward``, ``post_forward``; ``ParallelAdapter``'s), from the raw weights. h: the dense layer's
    output (after dropout, off here), x: the sub-layer's input, ln: BERT's LayerNorm after it."""
    F = torch.nn.functional
    norm = lambda t: F.layer_norm(t, (t.shape[-1],), ln.weight, ln.bias, ln.eps)
    if adapter is None:
        return norm(h + x)
    f = ACTIVATIONS[flags["non_linearity"]]
    branch = lambda z: (f(z @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T
                        + adapter.up.bias) * flags["scaling"]
    if flags["is_parallel"]:                 # pre_forward hands the adapter x; post_forward adds h, then LN(. + x)
        return norm(branch(x) + h + x)
    residual = h                             # residual_before_ln=True
    if flags["original_ln_before"]:
        h = norm(h + x)                      # the adapter reads LN(h + x) ...
    out = branch(h) + residual               # ... and its output joins the residual h
    return norm(out + x) if flags["original_ln_after"] else out + x


def encoder_by_hand(model, x, flags):
    """Every layer of a (tiny) BERT encoder with AdapterHub's adapters in the places ``flags`` name."""
    heads = model.config.num_attention_heads
    for layer in model.bert.encoder.layer:
        att, B, T, d = layer.attention, *x.shape
        hd = d // heads
        split = lambda t: t.view(B, T, heads, hd).transpose(1, 2)
        q, k, v = (split(x @ m.weight.T + m.bias) for m in (att.self.query, att.self.key, att.self.value))
        ctx = (torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5, -1) @ v).transpose(1, 2).reshape(B, T, d)
        dense = att.output.dense
        plain = getattr(dense, "base_layer", dense)
        h1 = adapterhub_sublayer(ctx @ plain.weight.T + plain.bias, x, att.output.LayerNorm,
                                 dense.adapter if flags["mh_adapter"] else None, flags)
        out = layer.output
        ffn_out = getattr(out, "base_layer", out)         # BertOutput (the parallel adapter wraps it)
        dense2 = getattr(ffn_out.dense, "base_layer", ffn_out.dense)
        a = torch.nn.functional.gelu(h1 @ layer.intermediate.dense.weight.T + layer.intermediate.dense.bias)
        adapter = (out.adapter if flags["is_parallel"] else ffn_out.dense.adapter) if flags["output_adapter"] else None
        x = adapterhub_sublayer(a @ dense2.weight.T + dense2.bias, h1, ffn_out.LayerNorm, adapter, flags)
    return x


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "parallel"])
@pytest.mark.parametrize("non_linearity", ["gelu", "swish"])
def test_our_placements_compute_adapterhubs_equations(placement, non_linearity):
    """Runs offline, never skips: the AdapterHub config ``adapterhub_config`` picks for each of our
    placements, written out as the equations of AdapterHub's code (above) and computed by hand on our
    model's own weights (perturbed: far from the near-identity init), equals our encoder. The
    SeqBnConfig default (original_ln_before=True) must not: that is the function we do *not* compute."""
    model = core.add_adapter(tiny_bert(seed=0), HoulsbyConfig(m=8, non_linearity=non_linearity, placement=placement,
                                                              modules_to_save=["classifier"]))
    adapterhub.perturb(model)
    d = model.config.hidden_size
    class_name, kwargs = adapterhub.adapterhub_config(model.adapter_config, d)
    flags = {**ADAPTERHUB_DEFAULTS[class_name], **kwargs}
    assert int(d // flags["reduction_factor"]) == 8 and flags["non_linearity"] == non_linearity
    x = model.bert.embeddings(input_ids=tokens(0, 128, (2, 12)))
    with torch.no_grad():
        ours = model.bert.encoder(x).last_hidden_state
        ref = encoder_by_hand(model, x, flags)
        torch.testing.assert_close(ours, ref, rtol=RTOL, atol=ATOL * ref.abs().max().item())
        without = encoder_by_hand(model, x, {**flags, "mh_adapter": False, "output_adapter": False})
        assert (ours - without).abs().max() > 0.05 * without.abs().max()     # the adapters matter here
        if placement == "pfeiffer":
            seqbn_default = encoder_by_hand(model, x, {**ADAPTERHUB_DEFAULTS["SeqBnConfig"], **kwargs,
                                                       "original_ln_before": True})
            assert (ours - seqbn_default).abs().max() > 0.05 * ref.abs().max()


def test_the_side_env_skips_only_offline_and_uncached(monkeypatch, tmp_path):
    """``adapterhub_env``: a cached env is used without the network (pip never runs); not cached and
    PyPI unreachable raises NoNetwork (the comparison tests then skip) before pip runs; not cached,
    PyPI reachable and pip failing is an AdapterHubError (the tests fail, they do not skip)."""
    import subprocess
    from pathlib import Path
    monkeypatch.delenv("PFS_ADAPTERHUB", raising=False)
    monkeypatch.setattr(adapterhub, "cache_dir", lambda: tmp_path)
    pip_calls = []

    def failing_pip(*args, **kwargs):
        pip_calls.append(args)
        return subprocess.CompletedProcess(args, 1, stdout="", stderr="ERROR: no matching distribution")
    monkeypatch.setattr(adapterhub.subprocess, "run", failing_pip)
    monkeypatch.setattr(adapterhub, "pypi_reachable", lambda timeout=10.0: False)
    with pytest.raises(adapterhub.NoNetwork, match="PyPI .* unreachable and the AdapterHub env .* is not cached"):
        adapterhub.adapterhub_env()
    assert not pip_calls
    monkeypatch.setattr(adapterhub, "pypi_reachable", lambda timeout=10.0: True)
    with pytest.raises(adapterhub.AdapterHubError, match="pip could not install") as failed:
        adapterhub.adapterhub_env()
    assert not isinstance(failed.value, adapterhub.NoNetwork) and len(pip_calls) == 1
    assert not list(tmp_path.iterdir()), "a failed install must leave no folder behind"
    monkeypatch.setattr(adapterhub, "pypi_reachable", lambda timeout=10.0: False)
    with pytest.raises(adapterhub.NoNetwork) as offline:
        adapterhub.adapterhub_env()
    import re
    cached = Path(re.search(r"is not cached in (.*?); run once", str(offline.value))[1])   # the folder it looks for
    assert cached.parent == tmp_path
    cached.mkdir()                                          # as a previous run leaves it
    assert adapterhub.adapterhub_env() == cached and len(pip_calls) == 1


def test_compare_refuses_what_adapterhub_cannot_mirror():
    """AdapterHub's recipe trains the head and the LayerNorms; a config that does not is refused
    before anything runs, and so is a model that is not a BERT classifier with our adapter."""
    with pytest.raises(ValueError, match="modules_to_save"):
        adapterhub.compare(core.add_adapter(tiny_bert(), HoulsbyConfig(m=8)), make_batches(128))
    with pytest.raises(ValueError, match="HoulsbyConfig"):
        adapterhub.compare(tiny_bert(), make_batches(128))
    with pytest.raises(ValueError, match="m dividing d"):
        adapterhub.compare(core.add_adapter(tiny_bert(), HoulsbyConfig(m=7, modules_to_save=["classifier"])),
                           make_batches(128))


def test_the_worker_lives_outside_the_package_and_needs_no_path_tricks():
    """It lived inside the package and had to drop its own folder from sys.path, because our adapters.py
    shadowed AdapterHub's ``adapters``. Now it is a script beside the repository's others."""
    from pathlib import Path
    import peft_from_scratch
    package = Path(peft_from_scratch.__file__).parent
    assert not list(package.rglob("adapters.py")) and not list(package.rglob("adapterhub_worker.py"))
    assert adapterhub.WORKER.exists() and adapterhub.WORKER.parent.name == "scripts"
    assert "sys.path" not in adapterhub.WORKER.read_text()

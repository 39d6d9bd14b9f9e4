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
"""
from __future__ import annotations

import copy
import dataclasses
import sys

import pytest
import torch

from peft_from_scratch import core
from peft_from_scratch.interop import adapterhub
from peft_from_scratch.additive.houlsby import HoulsbyConfig
from peft_from_scratch.models import MINILM, tiny_bert
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
    # SeqBn's default placement, for test_seqbn_default_is_a_different_function
    "tiny-seqbn-default": ("tiny", HoulsbyConfig(m=8, placement="pfeiffer"),
                           ("SeqBnConfig", {"reduction_factor": 8.0, "non_linearity": "gelu"})),
}
SLOW = {"minilm-houlsby-gelu", "minilm-pfeiffer-gelu"}


def adapted(kind: str, config: HoulsbyConfig):
    base = tiny_bert(seed=0) if kind == "tiny" else real_model(MINILM)
    model = core.add_adapter(base, dataclasses.replace(config, modules_to_save=["classifier"]))
    adapterhub.perturb(model)
    return model


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
        cases[case] = adapterhub.prepare_case(model, make_batches(model.config.vocab_size), tmp / case,
                                              steps=STEPS, lr=LR, adapterhub=override)
    try:
        adapterhub.run_worker([c.folder for c in cases.values()])
    except adapterhub.AdapterHubError as e:
        pytest.fail(str(e), pytrace=False)
    # Case.report raises if the two sides train different tensors (ours: adapters, every LayerNorm,
    # the classifier; AdapterHub's: train_adapter plus the LayerNorms)
    return {case: c.report(RTOL, ATOL) for case, c in cases.items()}


@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.slow] if c in SLOW else [])
                                  for c in CASES if c != "tiny-seqbn-default"])
def test_same_as_adapterhub(reports, case):
    r = reports[case]
    assert r.versions["transformers"] == "4.57.6" and r.versions["adapters"] == "1.3.0"
    # not vacuous: the adapters move the logits by > 5% of their size (at the init: ~1e-4)
    assert r.adapter_effect > 0.05
    print(f"\n{case}: {r.reference}; adapter effect {r.adapter_effect:.2f}\n{r.table()}")
    assert r.passed, r.table()


@pytest.mark.parametrize("case", ["tiny-seqbn-default"])
def test_seqbn_default_is_a_different_function(reports, case):
    """AdapterHub's SeqBnConfig default (original_ln_before=True) feeds the adapter LN(h + x), not h."""
    r = reports[case]
    print(f"\n{case}: max |ours - AdapterHub's| / max |AdapterHub's| over the steps = {r.diffs['logits'].rel:.2f}")
    assert r.diffs["logits"].rel > 0.05 and not r.passed


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

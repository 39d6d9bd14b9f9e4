"""The AdapterHub side of peft_from_scratch/interop/adapterhub.py, run in a subprocess with transformers 4.57.6.

    PYTHONPATH=<cached env> python scripts/adapterhub_worker.py CASE_DIR [CASE_DIR ...]
    PYTHONPATH=<cached env> python scripts/adapterhub_worker.py --serve CASE_DIR    (bench/bench_compacter.py)

The cached env (requirements/adapterhub.txt) holds adapters 1.3.0, transformers 4.57.6 and their
hub/tokenizers pins; torch, numpy and safetensors come from the project's venv. This script is
standalone: it imports nothing from peft_from_scratch (whose modules need transformers 5), and it
lives outside the package, so no module of ours can shadow AdapterHub's ``adapters``. Every CASE_DIR holds what ``prepare_case`` wrote:

    case.json            {"base": folder with config.json + model.safetensors, "arch": "bert" | "llama",
                          "config_class": "DoubleSeqBnConfig" | "SeqBnConfig" | "ParBnConfig" |
                          "CompacterConfig" | "CompacterPlusPlusConfig" | "PrefixTuningConfig" |
                          "MAMConfig", "config": {...},
                          "steps": k, "lr": lr}
    adapter.safetensors  our trained tensors, already under AdapterHub's parameter names
    batches.safetensors  <input name>.<i>: input_ids.0, attention_mask.0, labels.0, input_ids.1, ...

For each case it builds the BERT classifier (or, with "arch": "llama", the Llama causal LM) from the
same config and weights, adds the adapter
"a", makes the same tensors trainable as ours (train_adapter plus the LayerNorms, which Houlsby
trains and train_adapter leaves frozen), copies our values in, and runs k AdamW steps in eval mode
(dropout off). It writes result.safetensors (logits.<step>, grad.<name> at the first step,
param.<name> after the last step) and result.json (the trainable names, the versions used).
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import sys
import time
import weakref
from pathlib import Path

import torch
from packaging.requirements import Requirement
from safetensors.torch import load_file, save_file

import adapters
import transformers
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM


def check_requirements() -> None:
    """Fail clearly if a package taken from the project's venv does not fit transformers 4.57.6."""
    bad = []
    for dist in ("adapters", "transformers", "huggingface-hub", "tokenizers"):
        for line in md.requires(dist) or []:
            req = Requirement(line)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                version = md.version(req.name)
            except md.PackageNotFoundError:
                version = None
            if version is None or not req.specifier.contains(version, prereleases=True):
                bad.append(f"{dist} needs {req}, found {version}")
    if bad:
        sys.exit("the AdapterHub env does not fit the project's venv; pin these in "
                 "requirements/adapterhub.txt:\n  " + "\n  ".join(bad))


def build(case_dir: Path):
    """The case's BERT classifier with AdapterHub's adapter "a", our values copied in; its trained
    tensors by AdapterHub's names; the batches ({i: {input name: tensor}}); the case."""
    case = json.loads((case_dir / "case.json").read_text())
    base = Path(case["base"])

    torch.manual_seed(0)
    if case.get("arch", "bert") == "llama":
        config = LlamaConfig.from_json_file(base / "config.json")
        rope = json.loads((base / "config.json").read_text()).get("rope_parameters") or {}
        if "rope_theta" in rope:      # transformers 5 writes rope_parameters; 4.57 reads rope_theta
            config.rope_theta = rope["rope_theta"]
        config._attn_implementation = case.get("attn_implementation") or "eager"
        model = LlamaForCausalLM(config)
    else:
        model = BertForSequenceClassification(BertConfig.from_json_file(base / "config.json"))
    missing, unexpected = model.load_state_dict(load_file(base / "model.safetensors"), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]   # a buffer either version may omit
    assert not missing and not unexpected, f"base weights do not fit: missing {missing}, unexpected {unexpected}"

    adapters.init(model)
    if case["config_class"] == "MAMConfig":   # a union: its two parts are configs themselves
        config = adapters.MAMConfig(prefix_tuning=adapters.PrefixTuningConfig(**case["config"]["prefix_tuning"]),
                                    adapter=adapters.ParBnConfig(**case["config"]["adapter"]))
    else:
        config = getattr(adapters, case["config_class"])(**case["config"])
    model.add_adapter("a", config=config)
    model.train_adapter("a")          # freezes the BERT body, leaves the classifier head trainable
    for name, p in model.named_parameters():
        if "LayerNorm" in name:       # Houlsby trains the layer norms; train_adapter does not
            p.requires_grad_(True)
    model.eval()                      # train_adapter switched to train mode; compare without dropout

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ours = load_file(case_dir / "adapter.safetensors")
    unknown = sorted(set(ours) - set(params))
    if unknown:   # our key mapping names a tensor AdapterHub does not have (or does not train)
        sys.exit(f"{case_dir}: AdapterHub has no trainable tensor named {unknown[:5]} ({len(unknown)} in all)")
    with torch.no_grad():
        for name, value in ours.items():
            params[name].copy_(value)

    data = load_file(case_dir / "batches.safetensors")
    batches = {}                      # i -> {input name: tensor}
    for key, value in data.items():
        name, _, i = key.rpartition(".")
        batches.setdefault(int(i), {})[name] = value
    return model, params, batches, case


def run_case(case_dir: Path) -> None:
    model, params, batches, case = build(case_dir)
    opt = torch.optim.AdamW(params.values(), lr=case["lr"])
    out = {}
    for step in range(case["steps"]):
        result = model(**batches[step % len(batches)])
        out[f"logits.{step}"] = result.logits.detach()
        result.loss.backward()
        if step == 0:
            out.update({f"grad.{n}": p.grad.detach().clone() for n, p in params.items()})
        opt.step()
        opt.zero_grad()
    out.update({f"param.{n}": p.detach() for n, p in params.items()})
    save_file({k: v.contiguous() for k, v in out.items()}, case_dir / "result.safetensors")
    (case_dir / "result.json").write_text(json.dumps({
        "trainable": sorted(params),
        "versions": {"adapters": adapters.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__, "transformers_file": transformers.__file__}}))


def serve(case_dir: Path) -> None:
    """For bench/bench_compacter.py: build the case's model, then answer one command per stdin line,
    one JSON line each, so that the benchmark steps this process and its own in turn:
    "step" -> {"s": seconds of one AdamW training step}; "memory" -> {"saved_mib": what autograd
    saves for backward in one forward, parameters excluded}; "quit"."""
    model, params, batches, case = build(case_dir)
    model.train()                     # as the benchmark trains ours (dropout on both sides)
    opt = torch.optim.AdamW(params.values(), lr=case["lr"])

    def step(i):
        model(**batches[i % len(batches)]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    i = 0
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            start = time.perf_counter()
            step(i)
            out = {"s": time.perf_counter() - start}
        elif command == "memory":     # bench/common.py's saved_for_backward_mib, repeated here: this
            packed = []               # script cannot import the project (its transformers is 4.57)
            weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
            with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(weakref.ref(t)) or t, lambda t: t):
                loss = model(**batches[i % len(batches)]).loss
            alive = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (r() for r in packed)
                     if t is not None and t.untyped_storage().data_ptr() not in weights}
            loss.backward()
            opt.zero_grad(set_to_none=True)
            out = {"saved_mib": sum(alive.values()) / 2**20}
        elif command == "quit":
            return
        else:
            out = {"error": f"unknown command {command!r}"}
        i += 1
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))   # the caller's count
    check_requirements()
    if sys.argv[1:2] == ["--serve"]:
        serve(Path(sys.argv[2]))
    else:
        for arg in sys.argv[1:]:
            run_case(Path(arg))

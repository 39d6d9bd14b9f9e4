"""Our bottleneck adapters against AdapterHub's ``adapters`` 1.3.0, the reference library for them.

peft has no bottleneck adapters; AdapterHub's ``adapters`` has (Houlsby, Pfeiffer, parallel, and
Compacter / Compacter++). One call runs the comparison on a BERT classifier carrying our
``HoulsbyConfig`` or ``CompacterConfig`` adapter::

    model = core.add_adapter(bert, HoulsbyConfig(m=64, modules_to_save=["classifier"]))
    perturb(model)                          # "trained" values, so that agreeing means something
    report = compare(model, batches)        # an equivalence.Report: .table(), .verdict(), .passed

**Why a side environment.** ``adapters`` 1.3.0 pins transformers ~=4.57.6; this project runs
transformers 5. So AdapterHub runs in a subprocess, ``scripts/adapterhub_worker.py`` (outside the
package, standalone: it imports nothing from peft_from_scratch), whose PYTHONPATH starts with a small folder
holding exactly the pins of ``requirements/adapterhub.txt`` (adapters, transformers 4.57.6 and the
hub/tokenizers versions it needs); torch, numpy, safetensors and the rest come from the project's
venv. The two sides exchange only safetensors files and JSON.

**Without it.** With no cached env and no PyPI (or ``PFS_ADAPTERHUB=off``), ``compare`` raises
``NoNetwork`` before running anything of AdapterHub's; notebook 06 then says so and checks against
the paper's equations alone.

**How it is cached.** ``adapterhub_env()`` installs those pins once, with
``pip install --no-deps --target``, into ``$PFS_CACHE/adapterhub-<hash>`` (default
``~/.cache/peft_from_scratch``); the hash covers the requirement lines and the Python version, so
editing a pin makes a new folder and editing a comment does not. The folder is built under a
temporary name and renamed when complete, so concurrent runs never see half an install. Only the
first call needs the network (PyPI).

**What is compared.** ``compare`` copies the model (the caller's is left untouched) and writes, to a
temporary folder, the base model (its config and its *unwrapped* weights, so a model loaded from
any local folder works), the trained tensors under AdapterHub's names (``to_adapterhub_key``) and
the batches. The worker rebuilds the same BERT in transformers 4.57.6, adds AdapterHub's adapter
(``adapterhub_config``), copies the tensors in and trains. Both sides then run ``steps`` AdamW steps
in eval mode (dropout off) on the same batches, and the report holds the largest difference of the
logits at every step, of every gradient at the first step and of every parameter after the last.
Both sides use the caller's thread count; on CPU in float32 (torch 2.13, one thread) they come out
bit-identical.

**Which AdapterHub config computes what ours computes.** The defaults differ in three places (read
from adapters/methods/modeling.py, ``Adapter.pre_forward``/``forward``/``post_forward``):

* houlsby  = ``DoubleSeqBnConfig``: its defaults (original_ln_after=True, residual_before_ln=True,
  so A(h) = h + up(f(down(h))) and then LN(A(h) + x)) are our placement; only its default
  non-linearity is "swish" where ours (and adapter-bert) use "gelu", so we pass ours.
* pfeiffer = ``SeqBnConfig(original_ln_before=False)``. With SeqBn's default original_ln_before=True
  the adapter reads the layer-normed output instead: LN(h + up(f(down(LN(h + x)))) + x), the same
  LayerNorm applied twice -- a different function (``compare(..., adapterhub=("SeqBnConfig", {...}))``
  shows how different).
* parallel = ``ParBnConfig(scaling=1.0)``: LN(FFN(x) + up(f(down(x))) + x); AdapterHub's default
  scales the adapter's output by 4.

Compacter: ``CompacterConfig(placement="houlsby")`` = AdapterHub's ``CompacterConfig`` and
``placement="pfeiffer"`` = ``CompacterPlusPlusConfig(original_ln_before=False)``, for the same
reason as SeqBn's (``additive/compacter.py`` says where AdapterHub parts from the paper). The
shared rule ``phm_rule.C`` is AdapterHub's ``bert.shared_parameters.<adapter>.phm_rule``.

And one that does not show in eval mode: AdapterHub (like adapter-bert) applies the layer's hidden
dropout *before* the adapter, ours after it (we wrap the dense layer, and BertSelfOutput/BertOutput
apply dropout to what it returns). With dropout off the two are the same function.

What AdapterHub trains: ``train_adapter`` (the adapters and the head) plus every LayerNorm, which
Houlsby trains; so ours must be ``HoulsbyConfig(train_layer_norms=True, modules_to_save=["classifier"])``.

**Llama** (the unified view, ``additive/unified_view.py``): the worker also builds a LlamaForCausalLM,
in "eager" attention, for ``PrefixTuningConfig`` (flat prefixes only: AdapterHub's prefix MLP reads a
d-wide embedding, ours a key-wide one), ``ParallelAdapterConfig`` and ``MAMConfig``. There AdapterHub
trains the adapter alone. Its prefix equals ours with ``positions="from_zero"``; its parallel adapter
reads the residual stream before the RMSNorm, which ``reading_the_residual`` reproduces on our weights.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..additive.compacter import CompacterConfig, SharedRule
from ..additive.houlsby import HoulsbyConfig
from ..additive.prefix_tuning import PrefixEncoder, PrefixTuningConfig
from ..additive.unified_view import MAMConfig, ParallelAdapterConfig
from ..core import adapter_layers, model_adapters, remove_adapter
from ..equivalence import Report
from ..models import cache_dir

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "requirements" / "adapterhub.txt"
WORKER = REPO / "scripts" / "adapterhub_worker.py"


class AdapterHubError(RuntimeError):
    """The AdapterHub side could not be set up or run."""


class NoNetwork(AdapterHubError):
    """The AdapterHub env is not cached yet and PyPI cannot be reached to install it."""


# ----------------------------------------------------------------------------- 1. the side environment

def pypi_reachable(timeout: float = 10.0) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request("https://pypi.org/simple/adapters/", method="HEAD"),
                               timeout=timeout).close()
        return True
    except urllib.error.HTTPError:   # an answer, even an error page, means the network works
        return True
    except OSError:
        return False


def requirement_lines() -> list[str]:
    """The pins of requirements/adapterhub.txt (comments and blank lines dropped)."""
    if not REQUIREMENTS.is_file():
        raise AdapterHubError(
            f"{REQUIREMENTS} not found: the AdapterHub comparison reads requirements/adapterhub.txt from a "
            f"source checkout of peft-from-scratch. Install the package editable (pip install -e .) from "
            f"the repository, or set up that file next to the package's folder.")
    lines = (line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines())
    return [line for line in lines if line]


def adapterhub_env() -> Path:
    """The cached folder holding requirements/adapterhub.txt, installed on first use (see the docstring).

    Raises ``NoNetwork`` if it must be installed and PyPI is unreachable (checked before pip runs:
    a cached env never needs the network), or if ``$PFS_ADAPTERHUB`` is
    ``off`` (the offline path on demand, for its tests); ``AdapterHubError`` if pip fails.
    """
    if os.environ.get("PFS_ADAPTERHUB") == "off":
        raise NoNetwork("PFS_ADAPTERHUB=off: the AdapterHub side environment is switched off, as on a machine "
                        "where it is not cached and PyPI cannot be reached")
    pins = requirement_lines()
    key = hashlib.sha256("\n".join(pins + [sys.version.split()[0]]).encode()).hexdigest()[:12]
    target = cache_dir() / f"adapterhub-{key}"
    if target.is_dir():
        return target                       # cached: no network needed
    if not pypi_reachable():                # not cached and offline: say so at once (pip would retry for minutes)
        raise NoNetwork(f"no network: PyPI (pypi.org) is unreachable and the AdapterHub env ({', '.join(pins)}) "
                        f"is not cached in {target}; run once with network access, or copy that folder there")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp.", dir=target.parent))
    try:
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary", ":all:",
                              "--no-compile", "--disable-pip-version-check", "--quiet", "--timeout", "30",
                              "--target", str(tmp), *pins], capture_output=True, text=True)
        if pip.returncode != 0:
            if not pypi_reachable():
                raise NoNetwork("no network: PyPI (pypi.org) is unreachable, so the AdapterHub env "
                                f"({', '.join(pins)}) cannot be installed into {target}")
            raise AdapterHubError(f"pip could not install {REQUIREMENTS} into {target} (exit {pip.returncode}):\n"
                                  f"{pip.stdout[-2000:]}{pip.stderr[-4000:]}")
        try:
            tmp.rename(target)   # atomic: other runs see no folder or a complete one
        except OSError:
            pass                 # another run renamed its copy first; ours is removed below
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def run_worker(folders: list[Path]) -> None:
    """Run scripts/adapterhub_worker.py once on every case folder (one process: importing transformers
    4.57 and adapters takes seconds). Each folder gets result.safetensors and result.json."""
    if not WORKER.exists():
        raise AdapterHubError(f"{WORKER} is missing: the AdapterHub comparison runs from a source checkout of the "
                              "repository (the worker script is not part of the installed package)")
    proc = subprocess.run([sys.executable, str(WORKER), *map(str, folders)], env=worker_env(), capture_output=True,
                          text=True, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise AdapterHubError(f"the AdapterHub worker failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")


def worker_env() -> dict:
    """The worker's environment: the cached AdapterHub env first on its path, our thread count (the same
    as our side, so that both sum in the same order), no hub."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(adapterhub_env()), os.environ.get("PYTHONPATH", "")]),
                HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(torch.get_num_threads()))


def serve_worker(folder: Path) -> subprocess.Popen:
    """The worker in ``--serve`` mode on one case folder (bench/bench_compacter.py steps it by stdin)."""
    return subprocess.Popen([sys.executable, str(WORKER), "--serve", str(folder)], env=worker_env(), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=tempfile.gettempdir())


# ----------------------------------------------------------------------------- 2. names and configs

def to_adapterhub_key(key: str, name: str = "a") -> str:
    """Our parameter name -> AdapterHub's (its adapter is called ``name``), e.g.

    bert.encoder.layer.0.attention.output.dense.adapter.down.weight (houlsby, pfeiffer: wraps the dense)
    bert.encoder.layer.0.output.adapter.up.bias                        (parallel: wraps BertOutput)
    -> bert.encoder.layer.0.attention.output.adapters.a.adapter_down.0.weight  (adapter_down = [Linear, act])
    -> bert.encoder.layer.0.output.adapters.a.adapter_up.bias
    Compacter's PHM tensors keep their names (W_left, W_right, b) and its shared rule moves under the
    encoder: phm_rule.C -> bert.shared_parameters.a.phm_rule.
    The layer norms and the classifier have the same names in both (once ".base_layer" is dropped).
    """
    key = key.replace(".base_layer", "")
    if key == f"{PrefixEncoder.attr}.embedding.weight":          # a flat prefix (prefix_projection=False)
        return f"model.layers.0.self_attn.prefix_tuning.pool.prefix_tunings.{name}.self_prefix.control_trans"
    llama = re.fullmatch(r"(.*layers\.\d+)\.(mlp|self_attn)\.(adapter\.(down|up)\.(weight|bias)|scaling)", key)
    if llama:                                                    # Llama's parallel adapters
        layer, block, _, proj, kind = llama.groups()
        where = f"{layer}.{'output' if block == 'mlp' else 'attention'}_adapters.adapters.{name}"
        return f"{where}.scaling" if proj is None else \
            f"{where}.{'adapter_down.0' if proj == 'down' else 'adapter_up'}.{kind}"
    if key.endswith(".output.scaling"):                      # the parallel adapter's learned s
        return f"{key[:-len('scaling')]}adapters.{name}.scaling"
    if key == f"{SharedRule.attr}.C":
        return f"bert.shared_parameters.{name}.phm_rule"
    m = re.fullmatch(r"(.*\.output)(?:\.dense)?\.adapter\.(down|up)\.(weight|bias|W_left|W_right|b)", key)
    if m is None:
        return key
    module, proj, kind = m.groups()
    return f"{module}.adapters.{name}.{'adapter_down.0' if proj == 'down' else 'adapter_up'}.{kind}"


def to_adapterhub_value(key: str, t: torch.Tensor) -> torch.Tensor:
    """AdapterHub keeps a flat prefix as one vector; ours is (n, 2L x kv width), the same numbers row by row."""
    return t.reshape(-1) if key.endswith("control_trans") else t


def adapterhub_config(config, d: int) -> tuple[str, dict]:
    """The AdapterHub config class and arguments that compute what ``config`` computes (module docstring;
    for Compacter, ``additive/compacter.py``'s; for the unified view, ``additive/unified_view.py``'s)."""
    if isinstance(config, PrefixTuningConfig):
        return "PrefixTuningConfig", {"prefix_length": config.num_virtual_tokens, "flat": True}
    if isinstance(config, MAMConfig):
        prefix, parallel = config.parts()
        return "MAMConfig", {"prefix_tuning": adapterhub_config(prefix, d)[1], "adapter": adapterhub_config(parallel, d)[1]}
    if isinstance(config, CompacterConfig):
        common = {"reduction_factor": config.reduction_factor, "non_linearity": config.non_linearity,
                  "phm_dim": config.phm_dim, "phm_rank": config.rank, "phm_init_range": config.phm_init_range}
        return {"houlsby": ("CompacterConfig", common),
                "pfeiffer": ("CompacterPlusPlusConfig", {**common, "original_ln_before": False})}[config.placement]
    if d % config.m:
        raise ValueError(f"AdapterHub's bottleneck is int(d // reduction_factor); pick m dividing d={d}, "
                         f"not m={config.m}")
    common = {"reduction_factor": d / config.m, "non_linearity": config.non_linearity, "init_weights": "houlsby"}
    if isinstance(config, ParallelAdapterConfig):   # ParBnConfig() is the scaled PA (unified_view's docstring)
        return "ParBnConfig", {**common, "init_weights": "mam_adapter" if config.init == "lora" else "houlsby",
                               "scaling": config.scaling if config.scaling == "learned" else float(config.scaling),
                               "mh_adapter": config.position == "attn", "output_adapter": config.position == "ffn"}
    return {"houlsby": ("DoubleSeqBnConfig", common),
            "pfeiffer": ("SeqBnConfig", {**common, "original_ln_before": False}),
            "parallel": ("ParBnConfig", {**common, "scaling": 1.0})}[config.placement]


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Give the trainable tensors "trained" values, in place: adapter weights with std 1/sqrt(fan_in)
    (an output as large as the input, not the init's ~1e-2 of it), non-zero biases, layer norms and
    head moved off their pretrained values. At the init the adapters are nearly the identity, and
    agreeing on a near-identity would say little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g).to(p)
            if name.endswith(("W_right", f"{SharedRule.attr}.C")):   # Compacter: C and R ~ N(0, 1), and L scaled
                p.copy_(noise)                                        # so that H = sum_i C_i (x) L_i R_i has the
            elif name.endswith("W_left"):                             # gain of a 1/sqrt(d_in) matrix
                n, per_axis, rank = p.shape
                p.copy_(noise / (n * per_axis * n * rank) ** 0.5)
            elif ".adapter." in name:
                p.copy_(noise / p.shape[1] ** 0.5 if name.endswith("weight") else 0.1 * noise)
            elif "LayerNorm.weight" in name:
                p.mul_(1 + 0.1 * noise)
            else:   # layer-norm biases, classifier
                p.add_(0.05 * noise)


@torch.no_grad()
def adapter_effect(model: nn.Module, batch: dict) -> float:
    """max |logits - logits of the same model with the adapter removed| / max |the latter|: how much the
    adapter changes the function (a bottleneck adapter near its init: ~1e-4)."""
    logits = model(**batch).logits
    without = remove_adapter(copy.deepcopy(model))(**batch).logits
    return ((logits - without).abs().max() / without.abs().max()).item()


@contextlib.contextmanager
def reading_the_residual(model):
    """Our parallel adapters on a Llama ``model``, rewired (in place, until the block exits) to read what
    AdapterHub's read: the residual stream *before* the block's RMSNorm (``input_layernorm`` /
    ``post_attention_layernorm``), not the block's input as the paper's. Each block then returns
    out - s PA(x) + s PA(r): the same weights, AdapterHub's input. A reference tool (forward hooks), for
    showing that this one input is the whole difference from AdapterHub's ``ParBnConfig`` / ``MAMConfig``
    on Llama; the library's adapter itself follows the paper."""
    hooks = []
    for layer in model.model.layers:
        for block, norm in (("mlp", layer.post_attention_layernorm), ("self_attn", layer.input_layernorm)):
            pa = getattr(layer, block)
            if not hasattr(pa, "adapter"):
                continue
            seen = {}
            hooks.append(norm.register_forward_pre_hook(lambda m, args, seen=seen: seen.update(r=args[0])))

            def swap(m, args, kwargs, out, seen=seen):
                x = args[0] if args else kwargs["hidden_states"]
                h = out[0] if isinstance(out, tuple) else out
                h = h - m.delta(x, h.dtype) + m.delta(seen["r"], h.dtype)
                return (h, *out[1:]) if isinstance(out, tuple) else h
            hooks.append(pa.register_forward_hook(swap, with_kwargs=True))
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


# ----------------------------------------------------------------------------- 3. one comparison

@dataclass
class AdapterHubReport(Report):
    """``equivalence.Report`` (diffs of logits, grads, params; .table(), .verdict(), .passed) plus what ran."""
    reference: str = ""              # e.g. "adapters 1.3.0 (transformers 4.57.6) DoubleSeqBnConfig(...)"
    versions: dict = field(default_factory=dict)
    trained: list[str] = field(default_factory=list)   # the trained tensors, AdapterHub's names
    adapter_effect: float = 0.0      # see adapter_effect(), on the first batch before training


@dataclass
class Case:
    """One comparison written to ``folder`` for the worker, with our side already run."""
    folder: Path
    adapterhub: tuple[str, dict]     # AdapterHub's config class and arguments
    steps: int
    ours: dict[str, torch.Tensor]    # logits.<step>, grad.<name> at step 0, param.<name> at the end
    adapter_effect: float

    def theirs(self) -> dict[str, torch.Tensor]:
        """The worker's result: logits.<step>, grad.<name>, param.<name> under AdapterHub's names."""
        return load_file(self.folder / "result.safetensors")

    def report(self, rtol: float = 1e-5, atol: float = 1e-6) -> AdapterHubReport:
        """Read the worker's result and compare it with ours."""
        theirs = load_file(self.folder / "result.safetensors")
        info = json.loads((self.folder / "result.json").read_text())
        ours_trained = sorted(k[len("param."):] for k in self.ours if k.startswith("param."))
        if ours_trained != info["trainable"]:
            raise ValueError(f"ours and AdapterHub train different tensors: only ours "
                             f"{sorted(set(ours_trained) - set(info['trainable']))[:5]}, only AdapterHub's "
                             f"{sorted(set(info['trainable']) - set(ours_trained))[:5]}")
        class_name, kwargs = self.adapterhub
        v = info["versions"]
        report = AdapterHubReport(
            rtol, atol, self.steps, versions=v, trained=info["trainable"], adapter_effect=self.adapter_effect,
            reference=f"adapters {v['adapters']} (transformers {v['transformers']}) {class_name}("
                      + ", ".join(f"{k}={val!r}" for k, val in kwargs.items()) + ")")
        for prefix, what in (("logits.", "logits"), ("grad.", "grads"), ("param.", "params")):
            for k in (k for k in theirs if k.startswith(prefix)):
                report.diffs[what].update(self.ours[k], theirs[k], rtol, atol)
        return report


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model without its adapter: wrapped layers' weights under their plain names, adapter
    branches left out. (Trained layer norms and head keep their current values; they are sent again
    with the adapter anyway.) Cloned, so tied weights (an embedding shared with the head) save."""
    branches = tuple(n + "." for n in [*adapter_layers(model), *model_adapters(model)])   # + Compacter's phm_rule
    return {k.replace(".base_layer", ""): v.detach().cpu().clone() for k, v in model.state_dict().items()
            if not (k.startswith(branches) and ".base_layer." not in k)}


def architecture(model: nn.Module) -> str:
    """"bert" (a BERT classifier) or "llama" (a Llama causal LM): the two the worker builds."""
    name, model_type = type(model).__name__, getattr(model.config, "model_type", None)
    if model_type == "bert" and name.endswith("ForSequenceClassification"):
        return "bert"
    if model_type == "llama" and name.endswith("ForCausalLM"):
        return "llama"
    raise ValueError(f"the AdapterHub worker builds a BertForSequenceClassification or a LlamaForCausalLM; "
                     f"this is a {name} ({model_type})")


def check_model(model: nn.Module, adapterhub: tuple[str, dict] | None):
    config = getattr(model, "adapter_config", None)
    if architecture(model) == "llama":
        if not isinstance(config, (PrefixTuningConfig, MAMConfig, ParallelAdapterConfig)):
            raise ValueError("on Llama the comparison covers prefix tuning, the parallel adapter and MAM; this "
                             f"model has {'no adapter' if config is None else config.method}")
        if getattr(config, "prefix_projection", False):
            raise ValueError("AdapterHub's prefix MLP reads a d-wide embedding, ours (peft's) a key-wide one, so "
                             "their weights cannot be copied across: compare flat prefixes (prefix_projection=False)")
        if getattr(config, "train_layer_norms", False) or config.modules_to_save:
            raise ValueError("on Llama AdapterHub's train_adapter trains the adapter alone; use "
                             "train_layer_norms=False and no modules_to_save")
        return config
    if not isinstance(config, (HoulsbyConfig, CompacterConfig)):
        raise ValueError("compare needs a model with our bottleneck adapter: "
                         "core.add_adapter(model, HoulsbyConfig(...)) or CompacterConfig(...)")
    if adapterhub is None and config.target_modules is not None:
        raise ValueError("with custom target_modules there is no AdapterHub config to compare with; "
                         "use the default placements or pass adapterhub=(class name, arguments)")
    if not config.train_layer_norms or list(config.modules_to_save) != ["classifier"]:
        raise ValueError(f"AdapterHub's recipe trains the adapters, every LayerNorm and the head; use "
                         f"{type(config).__name__}(..., train_layer_norms=True, modules_to_save=['classifier'])")
    return config


def train_ours(model: nn.Module, batches: list[dict], steps: int, lr: float) -> dict[str, torch.Tensor]:
    """The worker's loop on our side: logits.<step>, grad.<name> at step 0, param.<name> at the end."""
    params = {to_adapterhub_key(n): p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=lr)
    out = {}
    for step in range(steps):
        result = model(**batches[step % len(batches)])
        out[f"logits.{step}"] = result.logits.detach().clone()
        result.loss.backward()
        if step == 0:
            out.update({f"grad.{n}": to_adapterhub_value(n, p.grad.detach().clone()) for n, p in params.items()})
        opt.step()
        opt.zero_grad()
    out.update({f"param.{n}": to_adapterhub_value(n, p.detach().clone()) for n, p in params.items()})
    return out


def prepare_case(model: nn.Module, batches: list[dict], folder: str | Path, steps: int = 5, lr: float = 1e-3,
                 adapterhub: tuple[str, dict] | None = None, attn_implementation: str = "eager") -> Case:
    """Write what the worker needs to ``folder`` (created) and run our side on a CPU float32 copy.

    ``adapterhub`` overrides the AdapterHub config (class name, arguments); by default
    ``adapterhub_config`` picks the one equal to ours. ``attn_implementation``: the attention the
    worker's Llama runs ("eager": AdapterHub's prefix under "sdpa", transformers 4.57's default,
    computes another function; ``additive/unified_view.py`` says more). BERT ignores it.
    """
    config = check_model(model, adapterhub)
    if not batches or any("labels" not in b for b in batches):
        raise ValueError("compare needs a non-empty list of batches with labels (the loss is trained)")
    adapterhub = adapterhub or adapterhub_config(config, model.config.hidden_size)
    ours = copy.deepcopy(model).to("cpu", torch.float32).eval()
    if architecture(ours) == "llama":      # the worker's attention, so that both sides sum in the same order
        ours.config._attn_implementation = attn_implementation
    batches = [{k: torch.as_tensor(v).cpu() for k, v in b.items()} for b in batches]

    folder = Path(folder)
    (folder / "base").mkdir(parents=True)
    ours.config.to_json_file(folder / "base" / "config.json")
    save_file(base_state_dict(ours), folder / "base" / "model.safetensors")
    save_file({(k := to_adapterhub_key(n)): to_adapterhub_value(k, p.detach()).contiguous()
               for n, p in ours.named_parameters() if p.requires_grad}, folder / "adapter.safetensors")
    save_file({f"{k}.{i}": v.contiguous() for i, b in enumerate(batches) for k, v in b.items()},
              folder / "batches.safetensors")
    (folder / "case.json").write_text(json.dumps({"base": str(folder / "base"), "arch": architecture(ours),
                                                  "attn_implementation": attn_implementation,
                                                  "config_class": adapterhub[0],
                                                  "config": adapterhub[1], "steps": steps, "lr": lr}))
    effect = adapter_effect(ours, batches[0])
    return Case(folder, adapterhub, steps, train_ours(ours, batches, steps, lr), effect)


def compare(model: nn.Module, batches: list[dict], steps: int = 5, lr: float = 1e-3, rtol: float = 1e-5,
            atol: float = 1e-6, adapterhub: tuple[str, dict] | None = None,
            attn_implementation: str = "eager") -> AdapterHubReport:
    """Train ``model`` (a copy; ours is unchanged) and its AdapterHub twin side by side and report.

    ``model``: a BERT classifier with ``HoulsbyConfig(..., modules_to_save=["classifier"])`` added and
    non-trivial values (``perturb``); ``batches``: a list of dicts of tensors with ``labels`` (e.g. the
    first few of ``data.make_loader``). Logits at every step, gradients at step 0 and parameters after
    ``steps`` AdamW steps (lr ``lr``) must agree within ``|ours - ref| <= atol * max(1, max|ref|) +
    rtol * |ref|``. Raises ``NoNetwork`` if the AdapterHub env is not cached and PyPI is unreachable.
    """
    with tempfile.TemporaryDirectory(prefix="adapterhub-") as tmp:
        case = prepare_case(model, batches, Path(tmp) / "case", steps, lr, adapterhub, attn_implementation)
        run_worker([case.folder])
        return case.report(rtol, atol)

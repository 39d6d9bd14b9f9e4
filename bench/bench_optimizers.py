"""Full fine-tuning in a small memory: one training step of each optimizer on SmolLM2-135M, its time and
where its memory goes, against AdamW and against each reference implementation.

Setting: SmolLM2-135M-Instruct in float32 (``--layers N`` keeps only the first N decoder layers), one
fixed real batch: the first ``--batch`` (4) E2E NLG training examples in the chat format, cut to
``--max-length`` (96) tokens, padded (labels -100 on the prompt and the padding). Every step clips at
global norm 1.0 (LOMO's paper setting; for LOMO and AdaLomo it means two backward passes), lr 1e-5, no
weight decay. The methods (ours), as notebook 10 section 3 measures them:

* **AdamW** full fine-tuning (``BackpropStep()``, ``torch.optim.AdamW``): the baseline of every "vs AdamW";
* **SGD** (``BackpropStep`` with ``torch.optim.SGD``);
* **LOMO** (``optim.LomoStep``) and **AdaLomo** (``optim.AdaLomoStep``): the update fused into backward;
* **GaLore** (``BackpropStep(optim.make_galore(model, rank=R))``, T = 200, scale 0.25) and **FLORA**
  (``BackpropStep(optim.make_flora(rank=R, kappa=1000))``), R = ``--rank`` (64);
* **MeZO** (``optim.MeZOStep(eps=1e-3)``): two forward passes, no backward;
* **LoRA** r = 8 (alpha 16) on every linear layer but the head, AdamW.

And the references, each driven in the same process, on the same batch, in the same rounds:

* ``lomo_optim.Lomo`` and ``lomo_optim.AdaLomo`` (lomo-optim, by the authors): ``grad_norm(loss)`` then
  ``fused_backward(loss, lr)``, as notebook 10 drives them. ``AdaLomo``'s constructor allocates its
  states with ``.cuda()``; on CPU ``Tensor.cuda`` is the identity while it is constructed (nothing else
  in it needs a GPU), as in notebook 10;
* ``galore_torch.GaLoreAdamW``: the attention and MLP matrices (the official script's ``["attn", "mlp"]``,
  selected here by name) in a group with ``rank``, ``update_proj_gap``, ``scale``, ``proj_type="std"``,
  the rest plain AdamW, as tests/test_galore.py sets it up; lr, betas and eps of ours;
* ``flora_opt.Flora`` (``rank``, ``kappa``, ``beta1=0.9``), as tests/test_flora.py;
* MeZO: there is no maintained package; the reference is ``optim.mezo.official_mezo``, the
  official trainer's algorithm written out plainly (``torch.manual_seed`` + ``torch.normal``, out of
  place ``p.data`` updates), called here one step at a time.

Memory, the same way for every row: ``training.memory.measure_step`` (one unmeasured step first for the steps that keep state, which an optimizer creates at its first
step; GaLore also computes its SVDs there), then one step counted by ``LiveTensors``: every tensor
storage alive at the step's peak, sorted into weights / gradients / optimizer state / activations
(what autograd saved for backward) / other (batch, logits, temporaries). Tensor bytes, not allocator
pages or RSS. "Optimizer state" is what the step keeps between steps: ``optimizer.state`` for a torch
optimizer, ``state_tensors()`` for the reference wrappers below (lomo_optim.AdaLomo's three dicts;
galore_torch's moments plus each projector's ``ortho_matrix``, which is not a tensor of its state dict).
On CUDA ``torch.cuda.max_memory_allocated`` is recorded beside it.

Time: after the memory step (which warms every model up), ``--steps`` rounds in which every method
takes one step (forward, backward, update, zero_grad: ``step(model, [batch], forward, 1.0)``),
round-robin with the order rotating each round, as bench/common.time_all does; the median
per method. "step 0" is the unmeasured first step of the stateful methods (state allocation; GaLore's
SVD of every projected gradient, repeated every T = 200 steps).

Weights. 13 copies of SmolLM2 with their states do not fit in this machine's memory beside its other
jobs, so the steps that leave nothing active on the model between steps share one copy of the
weights, each with its own optimizer state, each moving it by lr 1e-5 in turn: AdamW, SGD, LOMO,
AdaLomo, GaLore, FLORA, MeZO and the GaLore, FLORA and MeZO references (our LOMO/AdaLomo hooks act
only inside their own step). LoRA (its adapter changes the forward) and the two lomo_optim references
(their hooks act on every backward of their model) get their own copies. Neither a step's time nor
the tensors it is measured with depend on the weights' values.

    python -m bench.bench_optimizers [--device cpu|cuda] [--steps 3] [--threads 1] [--layers N] [--quick]

``--quick`` (2 layers, 1 timed round, results to a temporary folder) is a smoke run. Writes
bench/results/optimizers_<device-slug>[_<n>threads].json and .md (``_<N>layers`` added with --layers).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from bench.common import e2e_batch, load_average, machine, round_robin, sync, write_results
from peft_from_scratch import core, models
from peft_from_scratch.optim import AdaLomoStep, LomoStep, MeZOStep, make_flora, make_galore
from peft_from_scratch.reparameterized import LoRAConfig
from peft_from_scratch.training import BackpropStep, Step, StepResult, TrainConfig
from peft_from_scratch.training.memory import CATEGORIES, measure_step

LR, MAX_NORM, MEZO_EPS, GALORE_GAP, GALORE_SCALE, FLORA_KAPPA = 1e-5, 1.0, 1e-3, 200, 0.25, 1000
LORA = LoRAConfig(r=8, alpha=16, target_modules="all-linear")
OURS = ["AdamW", "SGD", "LOMO", "AdaLomo", "GaLore", "FLORA", "MeZO", "LoRA"]
REFERENCES = {"LOMO": "lomo_optim.Lomo", "AdaLomo": "lomo_optim.AdaLomo", "GaLore": "galore_torch.GaLoreAdamW",
              "FLORA": "flora_opt.Flora", "MeZO": "official_mezo (optim/mezo.py)"}
CONFIGS = OURS + [f"ref {m}" for m in REFERENCES]
# lomo_optim's hooks act on every backward of their model, and LoRA changes the forward: these get their
# own copy of the weights; the other steps leave nothing active behind and share one (13 copies of
# SmolLM2 with their states do not fit in the 2-core machine's memory beside its other jobs).
OWN_COPY = {"LoRA", "ref LOMO", "ref AdaLomo"}
STATEFUL = {"AdamW", "AdaLomo", "GaLore", "FLORA", "LoRA", "ref AdaLomo", "ref GaLore", "ref FLORA"}
MiB = 2 ** 20


# ----------------------------------------------------------------------------- the references as steps

class LomoOptimStep(Step):
    """lomo_optim.Lomo / AdaLomo as a training step: ``grad_norm(loss)`` (first backward, the clipping
    coefficient; only with clipping), then ``fused_backward(loss, lr)`` (the update inside backward)."""

    def __init__(self, adaptive: bool):
        self.adaptive = adaptive

    def setup(self, model, config):
        from lomo_optim import AdaLomo, Lomo
        kw = dict(lr=config.lr, clip_grad_norm=config.max_grad_norm, weight_decay=config.weight_decay)
        on_cpu = next(model.parameters()).device.type == "cpu"
        if self.adaptive:
            real_cuda = torch.Tensor.cuda
            if on_cpu:     # its constructor calls .cuda() on every state; only while it allocates them
                torch.Tensor.cuda = lambda self, *args, **kwargs: self
            try:
                self.optimizer = AdaLomo(model, **kw)
            finally:
                torch.Tensor.cuda = real_cuda
        else:
            self.optimizer = Lomo(model, **kw)
        self.lr, self.clip = config.lr, config.max_grad_norm
        return [p for p in model.parameters() if p.requires_grad]

    def state_tensors(self):
        o = self.optimizer
        return [*o.exp_avg_sq.values(), *o.exp_avg_sq_row.values(), *o.exp_avg_sq_col.values()] if self.adaptive else []

    def __call__(self, model, batches, forward, lr_scale):
        lr = self.lr * lr_scale
        loss = forward(batches[0])
        value = loss.detach().float().item()
        if self.clip is not None:
            self.optimizer.grad_norm(loss)
        self.optimizer.fused_backward(loss, lr=lr)
        return StepResult(value, math.nan, lr)


class GaLoreTorchStep(BackpropStep):
    """``BackpropStep`` with galore_torch.GaLoreAdamW: the Linear layers whose names contain "attn" or
    "mlp" (the official script's rule) in a GaLore group, the rest plain AdamW."""

    def __init__(self, model, rank: int):
        with warnings.catch_warnings():      # galore_torch imports bitsandbytes, whose torch.jit use warns
            warnings.simplefilter("ignore")
            from galore_torch import GaLoreAdamW
        targets = {id(m.weight) for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and ("attn" in n or "mlp" in n)}

        def make(groups, config):
            params = [p for g in groups for p in g["params"]]
            return GaLoreAdamW([{"params": [p for p in params if id(p) not in targets]},
                                {"params": [p for p in params if id(p) in targets], "rank": rank,
                                 "update_proj_gap": GALORE_GAP, "scale": GALORE_SCALE, "proj_type": "std"}],
                               lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
                               no_deprecation_warning=True)
        super().__init__(make)

    def state_tensors(self):
        out = []
        for s in self.optimizer.state.values():
            out += [t for t in s.values() if torch.is_tensor(t)]
            projector = s.get("projector")
            if projector is not None and torch.is_tensor(projector.ortho_matrix):
                out.append(projector.ortho_matrix)
        return out


class OfficialMeZOStep(Step):
    """``optim.mezo.official_mezo`` (the official algorithm, written out) as a step: one seed per
    step drawn from a generator seeded with ``config.seed``; the module modes are restored afterwards."""

    def __init__(self, eps: float):
        self.eps = eps

    def setup(self, model, config):
        from peft_from_scratch.optim import official_mezo
        self.official, self.lr, self.weight_decay = official_mezo, config.lr, config.weight_decay
        self.seeds = torch.Generator().manual_seed(config.seed)
        return [p for p in model.parameters() if p.requires_grad]

    def __call__(self, model, batches, forward, lr_scale):
        seed, lr = int(torch.randint(0, 10**9, (1,), generator=self.seeds)), self.lr * lr_scale
        modes = [(m, m.training) for m in model.modules()]
        try:
            [(plus, minus, g)] = self.official(model, [seed], [batches], lr, self.eps, self.weight_decay)
        finally:
            for m, training in modes:
                m.training = training
        return StepResult((plus + minus) / 2, abs(g), lr)


class Recorded(Step):
    """Any step, with the seconds and loss of each call recorded (the first: measure_step's warm-up)."""

    def __init__(self, inner: Step, device: str):
        self.inner, self.device, self.calls = inner, device, []

    def setup(self, model, config):
        return self.inner.setup(model, config)

    def __call__(self, model, batches, forward, lr_scale):
        sync(self.device)
        t = time.perf_counter()
        result = self.inner(model, batches, forward, lr_scale)
        sync(self.device)
        self.calls.append((time.perf_counter() - t, result.loss))
        return result

    def __getattr__(self, name):            # optimizer, state, state_tensors: what measure_step looks for
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def build(name: str, model, rank: int):
    """The step for one of CONFIGS on ``model`` (LoRA: the adapter is added to ``model`` here)."""
    if name == "LoRA":
        core.add_adapter(model, LORA)
    step = {"AdamW": lambda: BackpropStep(),
            "SGD": lambda: BackpropStep(lambda params, c: torch.optim.SGD(params, lr=c.lr)),
            "LOMO": lambda: LomoStep(),
            "AdaLomo": lambda: AdaLomoStep(),
            "GaLore": lambda: BackpropStep(make_galore(model, rank=rank, update_proj_gap=GALORE_GAP, scale=GALORE_SCALE)),
            "FLORA": lambda: BackpropStep(make_flora(rank=rank, kappa=FLORA_KAPPA)),
            "MeZO": lambda: MeZOStep(eps=MEZO_EPS),
            "LoRA": lambda: BackpropStep(),
            "ref LOMO": lambda: LomoOptimStep(adaptive=False),
            "ref AdaLomo": lambda: LomoOptimStep(adaptive=True),
            "ref GaLore": lambda: GaLoreTorchStep(model, rank),
            "ref FLORA": lambda: BackpropStep(_ref_flora(rank)),
            "ref MeZO": lambda: OfficialMeZOStep(eps=MEZO_EPS)}[name]()
    return step


def _ref_flora(rank):
    from flora_opt.optimizers.torch.flora import Flora

    def make(groups, config):
        return Flora(groups, lr=config.lr, rank=rank, kappa=FLORA_KAPPA, beta1=0.9, weight_decay=config.weight_decay)
    return make


# ----------------------------------------------------------------------------- the report

def ratio(a, b):
    return a / b if b else None


def fmt(x, spec=".2f"):
    return "n/a" if x is None else format(x, spec)


def ratio_cell(a, b, bold=False):
    """ours / reference as a cell; "0 / 0" when neither has any."""
    if a == b == 0:
        return "0 / 0"
    text = fmt(ratio(a, b), ".3f")
    return f"**{text}**" if bold else text


def markdown(result: dict) -> str:
    m, rows, s = result["machine"], result["rows"], result["setting"]
    loads = [x for x in result["load_1min_per_round"] if x is not None]
    lines = [
        f"# One training step of each optimizer on {s['model_label']}: time and memory, vs AdamW and vs the references", "",
        f"Machine: {m.get('gpu') or m['cpu']}; {m['cpu_count']} cores, torch {m['torch']} with {m['torch_threads']} "
        f"thread(s), transformers {m.get('transformers', '?')}. Load average (1, 5, 15 min) before / after: "
        f"{result['load_before']} / {result['load_after']}"
        + (f"; 1-minute load during the timed rounds {min(loads):.2f} to {max(loads):.2f} (this benchmark's own "
           f"thread included)" if loads else "") + f". Wall time of the whole run: {result['wall_s']:.0f} s.", "",
        f"One fixed real batch: the first {s['batch']} E2E NLG training examples, chat format, {s['tokens']} tokens "
        f"({tuple(s['shape'])}, {s['label_tokens']} of them labels). float32, lr {LR:g}, clipping at global norm "
        f"{MAX_NORM:g}, rank {s['rank']} for GaLore (T = {GALORE_GAP}) and FLORA (kappa = {FLORA_KAPPA}), "
        f"LoRA r = 8 all-linear. Time: median of {result['steps']} step(s), the {len(rows)} methods interleaved "
        "round-robin in one process (the order rotating each round), after the memory step warmed each up. "
        "Memory: `training.memory.measure_step` for every row, ours and the references alike: the tensor "
        "storages alive at the peak of one step (after one unmeasured step for the stateful ones), in MiB.", "",
        "| method | implementation | step median (s) | min-max (s) | time / AdamW | step 0 (s) | weights | gradients | "
        "optimizer state | activations | other | **peak** | peak / AdamW | state after step | most gradients alive "
        "| trained params |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = rows["AdamW"]
    for name in CONFIGS:
        r = rows[name]
        method = name.removeprefix("ref ")
        impl = REFERENCES[method] if name.startswith("ref ") else "ours"
        first = fmt(r["step0_s"]) if r["step0_s"] is not None else ""
        lines.append(
            f"| {method} | {impl} | {r['median_s']:.2f} | {r['min_s']:.2f}-{r['max_s']:.2f} | "
            f"{fmt(ratio(r['median_s'], base['median_s']), '.3f')} | {first} | "
            + " | ".join(f"{r['at_peak_mib'][c]:.0f}" for c in CATEGORIES)
            + f" | **{r['peak_mib']:.0f}** | {fmt(ratio(r['peak_mib'], base['peak_mib']), '.3f')} | "
              f"{r['after_mib']['optimizer state']:.1f} | {r['most_mib']['gradients']:.0f} | {r['trained']:,} |")
    lines += ["", "Ours / reference (same batch, same process, same round-robin rounds):", "",
              "| method | reference | time (ratio of medians) | time (median of per-round ratios) | peak | "
              "optimizer state at peak | state after step | activations | most gradients alive |",
              "|---|---|---|---|---|---|---|---|---|"]
    for method, label in REFERENCES.items():
        a, b, c = rows[method], rows[f"ref {method}"], result["vs_reference"][method]
        cells = [ratio_cell(a["peak_mib"], b["peak_mib"], bold=True),
                 ratio_cell(a["at_peak_mib"]["optimizer state"], b["at_peak_mib"]["optimizer state"]),
                 ratio_cell(a["after_mib"]["optimizer state"], b["after_mib"]["optimizer state"]),
                 ratio_cell(a["at_peak_mib"]["activations"], b["at_peak_mib"]["activations"]),
                 ratio_cell(a["most_mib"]["gradients"], b["most_mib"]["gradients"])]
        lines.append(f"| {method} | {label} | **{fmt(c['time'], '.3f')}** | {fmt(c['time_paired'], '.3f')} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Notes.",
              "* To fit in memory, the steps that leave nothing active on their model between steps share one "
              "copy of the weights (each with its own optimizer state): AdamW, SGD, LOMO, AdaLomo, GaLore, FLORA, "
              "MeZO and the GaLore, FLORA and MeZO references, each moving it by lr 1e-5 in turn. LoRA and the two "
              "lomo_optim references (whose hooks act on every backward) have their own copies. A step's time and "
              "its tracked tensors do not depend on the weights' values; the tracker counts only this step's "
              "tensors (the weights, its own state, what the step allocates), not the other steps' states.",
              "* Reference MeZO updates `p.data` out of place, so at its peak some weights are new storages and "
              "some old ones are already freed or not yet replaced: measure_step files the replaced-but-alive "
              "storages under \"other\". Its **peak** is exact; its weights / other split is not comparable to ours.",
              "* galore_torch keeps each projector in a `GaLoreProjector` object, not a tensor of its state dict; "
              "its `ortho_matrix` is added to the optimizer state here. Both implementations keep the projector "
              "as a view of the SVD's full U or Vh (min(m, n) rows or columns, not r), and storages are counted "
              "whole, so both GaLore states include the full factor.",
              "* The step-0 column is the unmeasured first step (no tracker): the state is allocated there, and "
              f"GaLore computes an SVD of every projected gradient (again every {GALORE_GAP} steps).",
              "* lomo_optim.AdaLomo allocates states for every parameter and multiplies the loss by 2^10; on CPU it "
              "is built with `Tensor.cuda` as the identity during construction only.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed rounds (every method steps once per round)")
    parser.add_argument("--warmup", type=int, default=0, help="extra untimed rounds (the memory step already warms up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--rank", type=int, default=64, help="GaLore and FLORA rank (capped at hidden / 4)")
    parser.add_argument("--only", nargs="*", default=None, help=argparse.SUPPRESS)   # debugging: a subset
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 layers, 1 round, results to a temp folder")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.layers, args.steps, args.warmup = args.layers or 2, 1, 0
        args.out = args.out or tempfile.mkdtemp(prefix="bench_optimizers_")
    torch.set_num_threads(args.threads)
    start, load_before = time.perf_counter(), load_average()

    base, tokenizer = models.load_model(models.SMOLLM2)
    if args.layers:
        models.keep_layers(base, args.layers)
    base.to(args.device)
    rank = min(args.rank, base.config.hidden_size // 4)
    batch = e2e_batch(tokenizer, args.batch, args.max_length, args.device)
    configs = [c for c in CONFIGS if args.only is None or c in args.only]
    train_config = TrainConfig(lr=LR, max_grad_norm=MAX_NORM, device=args.device)

    copies = {name: copy.deepcopy(base) if name in OWN_COPY else base for name in configs}   # before any setup
    built, rows = {}, {}
    for name in configs:
        model = copies[name]
        step = Recorded(build(name, model, rank), args.device)
        t = time.perf_counter()
        mem = measure_step(model, [batch], step, train_config, warmup_steps=1 if name in STATEFUL else 0)
        rows[name] = {"peak_mib": mem.peak / MiB, "at_peak_mib": {c: mem.at_peak[c] / MiB for c in CATEGORIES},
                      "after_mib": {c: v / MiB for c, v in mem.after.items()},
                      "most_mib": {c: v / MiB for c, v in mem.most.items()}, "peak_phase": mem.peak_phase,
                      "cuda_peak_mib": mem.cuda_peak / MiB if mem.cuda_peak is not None else None,
                      "trained": mem.trained,
                      "step0_s": step.calls[0][0] if name in STATEFUL else None}
        model.train()
        built[name] = (model, step)
        print(f"  memory {name}: peak {mem.peak / MiB:.0f} MiB ("
              + ", ".join(f"{c} {mem.at_peak[c] / MiB:.0f}" for c in CATEGORIES)
              + f"), {time.perf_counter() - t:.1f} s", flush=True)

    def one_step(model, step):
        return lambda: step(model, [batch], lambda b: model(**b).loss, 1.0)
    times = round_robin({n: one_step(*built[n]) for n in configs}, args.steps, args.device, warmup=args.warmup)
    for name in configs:
        t = times[name]
        rows[name].update(median_s=statistics.median(t), min_s=min(t), max_s=max(t), steps_s=t,
                          losses=[loss for _, loss in built[name][1].calls])

    vs = {}
    for method in REFERENCES:
        if method not in rows or f"ref {method}" not in rows:
            continue
        a, b = rows[method], rows[f"ref {method}"]
        vs[method] = {"time": ratio(a["median_s"], b["median_s"]),
                      "time_paired": statistics.median(x / y for x, y in zip(a["steps_s"], b["steps_s"])),
                      "peak": ratio(a["peak_mib"], b["peak_mib"]),
                      "state_at_peak": ratio(a["at_peak_mib"]["optimizer state"], b["at_peak_mib"]["optimizer state"]),
                      "state_after": ratio(a["after_mib"]["optimizer state"], b["after_mib"]["optimizer state"]),
                      "activations": ratio(a["at_peak_mib"]["activations"], b["at_peak_mib"]["activations"]),
                      "gradients": ratio(a["most_mib"]["gradients"], b["most_mib"]["gradients"])}
    n_layers = base.config.num_hidden_layers
    label = "SmolLM2-135M" if args.layers is None else f"SmolLM2-135M's first {n_layers} layers"
    result = {"device": args.device, "machine": machine(args.device), "steps": args.steps, "warmup": args.warmup,
              "load_before": load_before, "load_after": load_average(), "load_1min_per_round": times["load_1min_per_round"],
              "setting": {"model": models.SMOLLM2, "model_label": label, "layers": n_layers, "batch": args.batch,
                          "max_length": args.max_length, "shape": list(batch["input_ids"].shape),
                          "tokens": int(batch["attention_mask"].sum()), "label_tokens": int((batch["labels"] != -100).sum()),
                          "rank": rank, "lr": LR, "max_grad_norm": MAX_NORM, "mezo_eps": MEZO_EPS,
                          "galore_update_proj_gap": GALORE_GAP, "galore_scale": GALORE_SCALE, "flora_kappa": FLORA_KAPPA,
                          "lora": {"r": LORA.r, "alpha": LORA.alpha, "target_modules": LORA.target_modules},
                          "dtype": "float32"},
              "rows": rows, "vs_reference": vs, "wall_s": time.perf_counter() - start}
    if args.only is not None:
        print({n: (round(r["median_s"], 2), round(r["peak_mib"])) for n, r in rows.items()})
        return
    prefix = "optimizers" if args.layers is None else f"optimizers_{n_layers}layers"
    path = write_results(prefix, result, markdown(result), args.threads, Path(args.out) if args.out else None)
    print(f"wrote {path}.json and .md")


if __name__ == "__main__":
    main()

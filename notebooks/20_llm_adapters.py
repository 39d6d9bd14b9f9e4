# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 20 · LLM-Adapters: series, parallel and LoRA adapters on a decoder, at one budget
#
# Hu et al. (2023) put the adapter families of the encoder era on decoder LLMs (LLaMA, BLOOM, GPT-J)
# and ask which works best for math reasoning and commonsense questions, and where each should sit.
# Their adapters attach to single linear layers, chosen by name. With $D$ projecting to a bottleneck
# $b$, $U$ back, $f = \tanh$ and no biases:
#
# | adapter | on a linear layer $h = Wx + b$ | the paper's best place in a Llama block |
# |---|---|---|
# | series | $y = h + s\,U f(Dh)$ | after the MLP: `down_proj`'s output |
# | parallel | $y = h + s\,U f(Dx)$ | in the MLP: `up_proj` and `down_proj` |
# | LoRA | $y = h + \tfrac{\alpha}{r}BAx$ | attention and MLP: `q, k, v, up, down` |
#
# A parallel adapter is a non-linear LoRA: drop $f$ and it *is* LoRA with $A = D$, $B = U$. You build
# both adapters in a few lines on a real SmolLM2 layer and check them against the library, prove the
# linear parallel adapter equal to peft's LoRA, and then train the three at one trainable budget on
# GSM8K and on ARC-Easy.

# %% tags=["parameters"]
profile = "auto"      # "smoke" (the tests), "cpu" (the committed run), "gpu", or "auto"
seed = 0
results_dir = "results"

# %%
import copy

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Markdown, display
from torch import nn
from peft_from_scratch import bib, core, data, tasks, verdicts   # first: it quiets tqdm.auto's warning
from peft_from_scratch.additive import LLMAdapterConfig
from peft_from_scratch.additive.llm_adapters import parameter_count
from peft_from_scratch.notebook import start
from peft_from_scratch.reparameterized.lora import LoRAConfig

run = start("20_llm_adapters", profile, seed, results_dir)
bib.paper_card("hu2023llmadapters",
               claim="On LLaMA-7B, LoRA beats the parallel adapter, which beats the series adapter, on math word "
                     "problems (GSM8K), and LoRA beats both on ARC-Easy, each at its best placement. Here: SmolLM2 with the three at the same trainable budget, the same steps and "
                     "one learning rate, on GSM8K (held-out loss of the reference solutions) and ARC-Easy (accuracy).")

# %% [markdown]
# ## 1. Build the two adapters
#
# The official code (`peft/src/peft/tuners/bottleneck.py` in AGI-Edgerunners/LLM-Adapters) replaces
# the linear layer by one that runs the adapter branch $s\,U f(D\,\mathrm{drop}(v))$ in float32 and casts
# it back. Its default init ("bert") draws $D$ and $U$ from $\mathcal N(0, 0.02^2)$: unlike LoRA, the
# adapted model does not start as the base model. You write the series adapter for the last
# `down_proj` of SmolLM2 and the parallel one for its `up_proj`, copy the library's weights in, and
# compare outputs and gradients.

# %%
class MySeries(nn.Module):
    """y = h + s U tanh(D h), h = W x: a bottleneck after the frozen linear layer."""
    def __init__(self, linear: nn.Linear, b: int, s: float = 1.0):
        super().__init__()
        self.linear, self.s = linear, s
        self.D, self.U = nn.Linear(linear.out_features, b, bias=False), nn.Linear(b, linear.out_features, bias=False)

    def forward(self, x):
        h = self.linear(x)
        return h + self.s * self.U(torch.tanh(self.D(h)))


class MyParallel(MySeries):
    """y = W x + s U tanh(D x): the bottleneck beside the frozen linear layer."""
    def __init__(self, linear: nn.Linear, b: int, s: float = 1.0):
        nn.Module.__init__(self)
        self.linear, self.s = linear, s
        self.D, self.U = nn.Linear(linear.in_features, b, bias=False), nn.Linear(b, linear.out_features, bias=False)

    def forward(self, x):
        return self.linear(x) + self.s * self.U(torch.tanh(self.D(x)))


work = tasks.MathAndScience.for_run(run)
smol = work.base()
cfg = smol.config
mlp = smol.model.layers[-1].mlp
x_mlp = torch.randn(2, 7, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
x_down = torch.randn(2, 7, cfg.intermediate_size, generator=torch.Generator().manual_seed(seed + 1))
same = {}
for name, mine_cls, kind, where, x in [("series", MySeries, "series", "down_proj", x_down),
                                       ("parallel", MyParallel, "parallel", "up_proj", x_mlp)]:
    lib = core.add_adapter(copy.deepcopy(mlp), LLMAdapterConfig(kind=kind, bottleneck_size=16, target_modules=[where]))
    layer = core.adapter_layers(lib)[where]
    mine = mine_cls(copy.deepcopy(getattr(mlp, where)), 16)
    mine.D.load_state_dict(layer.down.state_dict()), mine.U.load_state_dict(layer.up.state_dict())
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_mine, y_lib = mine(x1), layer(x2)
    y_mine.square().sum().backward(), y_lib.square().sum().backward()
    close = lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())   # noqa: E731
    same[name] = {"outputs": close(y_mine, y_lib), "grad_D": close(mine.D.weight.grad, layer.down.weight.grad),
                  "grad_U": close(mine.U.weight.grad, layer.up.weight.grad), "grad_input": close(x1.grad, x2.grad)}
    with torch.no_grad():
        moved = ((layer(x) - layer.base_layer(x)).norm() / layer.base_layer(x).norm()).item()
    print(f"{name} on the last {where} ({tuple(layer.base_layer.weight.shape)}): at the official init the adapter "
          f"moves the layer's output by {100 * moved:.1f}% of its norm")

# %%
# NBVAL_CHECK_OUTPUT
for name, checks in same.items():
    for what, ok in checks.items():
        print(f"your {name} adapter and the library's agree on {what} (float32, 1e-5):",
              run.check(f"my_{name}_equals_library_{what}", ok))

# %% [markdown]
# ## 2. Proof: a linear parallel adapter is peft's LoRA
#
# No installable library has these adapters (peft never had a bottleneck tuner; the PyPI package
# `llm-adapters` is an unrelated API gateway), so the library is checked against the official
# equations, recomputed by hand in `tests/test_llm_adapters.py` for every adapter type, the float32
# branch of a bfloat16 layer included. What a reference library *can* check is the algebra above:
# with $f$ = identity ("linear"), $y = Wx + s\,UDx$ is LoRA with $A = D$, $B = U$ and
# $\alpha / r = s$. We put `LLMAdapterConfig(kind="parallel", non_linearity="linear", scaling=2)` on
# SmolLM2's `q, v, up, down`, copy its $D$, $U$ into peft's `LoraConfig(r=8, lora_alpha=16)`, and
# compare logits and gradients on real GSM8K batches and every factor after 3 SGD steps, within
# rtol 1e-5. (Our LoRA, the third arm, is proven equal to peft's in notebook 02.)

# %%
from peft import LoraConfig, get_peft_model

targets, r_eq, s_eq = ["q_proj", "v_proj", "up_proj", "down_proj"], 8, 2.0
ours = core.add_adapter(copy.deepcopy(smol), LLMAdapterConfig(kind="parallel", bottleneck_size=r_eq, target_modules=targets,
                                                              non_linearity="linear", scaling=s_eq, init="mam"))
LLMAdapterConfig().simulate_training(ours, torch.Generator().manual_seed(seed))   # U off zero
theirs = get_peft_model(copy.deepcopy(smol), LoraConfig(r=r_eq, lora_alpha=r_eq * s_eq, target_modules=targets, lora_dropout=0.0))
pairs = []
for name, layer in core.adapter_layers(ours).items():
    lora = theirs.base_model.model.get_submodule(name)
    A, B = layer.lora_weights()
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(A), lora.lora_B["default"].weight.copy_(B)
    pairs += [(A, lora.lora_A["default"].weight), (B, lora.lora_B["default"].weight)]
eq_loader = data.make_loader(work.train_sets["gsm8k"].select(range(6)), 2, pad_token_id=work.tokenizer.pad_token_id)
eq_batches = [{k: v[:, :64] for k, v in b.items()} for b in eq_loader]
opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (ours, theirs)]
rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()      # noqa: E731
gaps = {"logits": 0.0, "gradients": 0.0}
for batch in eq_batches:
    outs = [m(**batch) for m in (ours, theirs)]
    gaps["logits"] = max(gaps["logits"], rel(outs[0].logits, outs[1].logits))
    for o in outs:
        o.loss.backward()
    gaps["gradients"] = max(gaps["gradients"], max(rel(a.grad, b.grad) for a, b in pairs))
    for opt in opts:
        opt.step(), opt.zero_grad()
gaps["factors after 3 steps"] = max(rel(a, b) for a, b in pairs)
with torch.no_grad():
    lora_effect = rel(theirs(**eq_batches[0]).logits, smol(**eq_batches[0]).logits)
print(f"{len(pairs) // 2} adapted layers; largest relative gaps: "
      + ", ".join(f"{k} {v:.1e}" for k, v in gaps.items()) + f"; the adapters move the logits by {100 * lora_effect:.0f}%")
del ours, theirs, opts

# %%
# NBVAL_CHECK_OUTPUT
print("a parallel adapter without its non-linearity equals peft's LoRA (A = D, B = U; logits, gradients, "
      "3 SGD steps; rtol 1e-5):", run.check("linear_parallel_equals_peft_lora",
                                            max(gaps.values()) < 1e-5 and lora_effect > 1e-3))

# %% [markdown]
# ## 3. One budget for three adapters
#
# The paper compares each adapter at *its own* best size: series $b = 256$ on `down_proj`, parallel
# $b = 256$ on `up_proj` and `down_proj`, LoRA $r = 32$ on five matrices. On LLaMA-7B those are not
# the same budget (the formula below, with LLaMA-7B's shapes). Here the three get one budget: LoRA
# $r = 8$ on `q, k, v, up, down`, and the bottlenecks that come nearest to its count.

# %%
def shapes_of(config):
    hd = config.hidden_size // config.num_attention_heads
    kv = config.num_key_value_heads * hd
    d, m = config.hidden_size, config.intermediate_size
    return {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
            "gate_proj": (d, m), "up_proj": (d, m), "down_proj": (m, d)}


def lora_count(r, shapes, layers, targets):
    return layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


lora_targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
shapes, L = shapes_of(cfg), cfg.num_hidden_layers
r_lora = 8
budget = lora_count(r_lora, shapes, L, lora_targets)
b_series = round(budget / parameter_count("series", 1, shapes, L))
b_parallel = round(budget / parameter_count("parallel", 1, shapes, L))
arms = {"series": LLMAdapterConfig(kind="series", bottleneck_size=b_series),
        "parallel": LLMAdapterConfig(kind="parallel", bottleneck_size=b_parallel),
        "LoRA": LoRAConfig(r=r_lora, alpha=2 * r_lora, dropout=0.05, target_modules=lora_targets)}
counted = {name: core.count_parameters(core.add_adapter(copy.deepcopy(smol), c))[0] for name, c in arms.items()}
smol_total = sum(p.numel() for p in smol.parameters())
llama7b = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
shapes_7b, total_7b = shapes_of(type("C", (), llama7b)), 6_738_415_616
paper_counts = {"series": parameter_count("series", 256, shapes_7b, 32), "parallel": parameter_count("parallel", 256, shapes_7b, 32),
                "LoRA": lora_count(32, shapes_7b, 32, lora_targets)}
rows = ["| adapter | here (SmolLM2) | trained | % of SmolLM2 | the paper (LLaMA-7B) | trained | % of LLaMA-7B |", "|---|---|---|---|---|---|---|"]
sizes = {"series": f"b = {b_series}, down_proj", "parallel": f"b = {b_parallel}, up + down", "LoRA": f"r = {r_lora}, q k v up down"}
paper_sizes = {"series": "b = 256, down_proj", "parallel": "b = 256, up + down", "LoRA": "r = 32, q k v up down"}
for name in arms:
    rows.append(f"| {name} | {sizes[name]} | {counted[name]:,d} | {100 * counted[name] / smol_total:.2f}% | {paper_sizes[name]} | "
                f"{paper_counts[name] / 1e6:.1f}M | {100 * paper_counts[name] / total_7b:.2f}% |")
display(Markdown("\n".join(rows) + f"\n\nSmolLM2 has {smol_total:,d} parameters; LLaMA-7B {total_7b:,d}. The series and "
                 "parallel adapters have no bias (the official code's); LoRA's dropout 0.05 and $\\alpha = 2r$ are the "
                 "paper's LoRA arm."))

# %%
# NBVAL_CHECK_OUTPUT
print("each library count equals the formula:", run.check("parameter_counts_match_formula",
      counted["series"] == parameter_count("series", b_series, shapes, L)
      and counted["parallel"] == parameter_count("parallel", b_parallel, shapes, L)
      and counted["LoRA"] == lora_count(r_lora, shapes, L, lora_targets)))
print("the three arms train the same number of parameters, within 2%:",
      run.check("arms_matched_budget", max(counted.values()) / min(counted.values()) < 1.02))

# %% [markdown]
# ## 4. Training: GSM8K and ARC-Easy
#
# The recipe is the official `finetune.py`'s, shortened: AdamW, a warm-up (the official 100 steps
# scaled to a tenth of our run) then linear decay, **one learning rate for all three adapters** (the
# paper uses 3e-4 for every method over about 1,900 steps; for our runs of a few dozen steps we use
# 1e-3, the same for every arm, with no per-arm sweep, as the paper), the same training examples in
# the same order, the same number of steps. Where we depart from the official scripts: SmolLM2's own
# chat template instead of the Alpaca template (SmolLM2 was instruction-tuned on it), and the loss on
# the response only (the official default also trains on the prompt).
#
# * **GSM8K**: trained on the worked solutions. SmolLM2-135M solves few GSM8K problems, so accuracy
#   would be noise; the score is the loss per token of the test problems' reference solutions
#   (teacher-forced), lower is better.
# * **ARC-Easy**: the question with its four choices, answered by the letter; scored by rank
#   classification of A-D on the test questions. The paper trains on Commonsense170K (eight tasks'
#   training sets) and generates the answer; we train on ARC-Easy's own training questions.

# %%
print("data:", bib.cite("cobbe2021training"), "and", bib.cite("clark2018think"), "| model:", bib.cite("allal2025smollm2"))
lr = 1e-3
base_losses, base_correct = work.gsm8k_losses(smol), work.arc_correct(smol)
results = {}
for name, config in arms.items():
    res = {}
    for task in work.TASKS:
        model = core.add_adapter(work.base(), config)
        hist = work.fit(model, task, lr, desc=f"{task} · {name}")
        res[task] = dict(train_loss=hist.loss,
                         score=work.gsm8k_losses(model) if task == "gsm8k" else work.arc_correct(model))
        del model
    results[name] = res
mean = lambda v: float(np.mean(v))                                    # noqa: E731
rows = ["| adapter | trained | GSM8K test loss per token (base %.3f) | ARC-Easy accuracy (base %.3f) |" % (mean(base_losses), mean(base_correct)),
        "|---|---|---|---|"]
for name, res in results.items():
    rows.append(f"| {name} | {counted[name]:,d} | {mean(res['gsm8k']['score']):.4f} | {mean(res['arc_easy']['score']):.3f} |")
display(Markdown("\n".join(rows) + f"\n\n{work.steps} steps each: GSM8K in batches of {work.batch} ({work.n_train} training "
                 f"problems, {work.n_test_math} test problems), ARC-Easy in batches of {work.batch_science} "
                 f"({work.n_test_science} test questions); lr {lr:g}."))

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
for name, res in results.items():
    for ax, task in zip(axes[:2], work.TASKS):
        loss = np.asarray(res[task]["train_loss"])
        ax.plot(np.convolve(loss, np.ones(3) / 3, mode="valid") if len(loss) > 3 else loss, label=name)
for ax, task in zip(axes[:2], ("GSM8K", "ARC-Easy")):
    ax.set_title(f"{task}: training loss (3-step mean)", fontsize=10); ax.set_xlabel("step")
axes[0].legend(fontsize=8)
names = list(results)
delta = [mean(base_losses) - mean(results[n]["gsm8k"]["score"]) for n in names]
acc = [mean(results[n]["arc_easy"]["score"]) for n in names]
axes[2].bar(np.arange(3) - 0.2, delta, 0.4, label="GSM8K: drop of test loss")
ax2 = axes[2].twinx()
ax2.bar(np.arange(3) + 0.2, acc, 0.4, color="tab:orange", label="ARC-Easy accuracy")
ax2.axhline(mean(base_correct), color="tab:orange", ls=":", lw=1)
axes[2].set_xticks(range(3), names); axes[2].set_ylabel("base loss - test loss"); ax2.set_ylabel("accuracy")
axes[2].set_title("held out, same budget (dotted: base accuracy)", fontsize=10)
fig.legend(loc="lower right", fontsize=8); plt.tight_layout(); plt.show()

# %% [markdown]
# ## 5. Paper vs ours
#
# The rule for each claim "A beats B": the difference of the held-out scores of A and B (GSM8K: B's
# test loss minus A's, per problem; ARC-Easy: A's accuracy minus B's, per question), with a paired
# bootstrap interval over the test items; *reproduced* if the whole interval is above 0, *direction
# reproduced* if only the estimate is, *not reproduced* otherwise. The interval covers the choice
# of test items, not the training seed (one seed per arm). The paper's claims are accuracies of
# LLaMA-7B after three epochs, at budgets that differ by up to 4x; ours are SmolLM2 after a few
# dozen steps at one budget, so read a verdict as "at this scale, at matched budget".

# %%
def math_gap(a, b):    # loss(b) - loss(a): positive when a beats b
    return verdicts.mean_difference(results[b]["gsm8k"]["score"], results[a]["gsm8k"]["score"], what="GSM8K test problems")


def science_gap(a, b):
    return verdicts.mean_difference(results[a]["arc_easy"]["score"], results[b]["arc_easy"]["score"], what="ARC-Easy questions")


def said(task, a, b):
    fmt = (lambda v: f"loss {mean(v):.4f}") if task == "gsm8k" else (lambda v: f"accuracy {mean(v):.3f}")
    return f"SmolLM2, {work.steps} steps: {a} {fmt(results[a][task]['score'])}, {b} {fmt(results[b][task]['score'])}"


for claim, a, b, gap, task in [("llm_adapters_math_lora_beats_series", "LoRA", "series", math_gap, "gsm8k"),
                               ("llm_adapters_math_lora_beats_parallel", "LoRA", "parallel", math_gap, "gsm8k"),
                               ("llm_adapters_math_parallel_beats_series", "parallel", "series", math_gap, "gsm8k"),
                               ("llm_adapters_arc_lora_beats_series", "LoRA", "series", science_gap, "arc_easy"),
                               ("llm_adapters_arc_lora_beats_parallel", "LoRA", "parallel", science_gap, "arc_easy")]:
    _ = run.verdict(claim, gap(a, b), at_least=1e-9, ours=said(task, a, b))
display(run.verdict_table())

# %%
learned = {n: verdicts.mean_difference(base_losses, results[n]["gsm8k"]["score"], what="GSM8K test problems") for n in names}
above_base = {n: verdicts.mean_difference(results[n]["arc_easy"]["score"], base_correct, what="ARC-Easy questions") for n in names}
notes = ["**Did each arm learn?** GSM8K, the drop of test loss from the base model: "
         + "; ".join(f"{n} {learned[n]}" for n in names) + ". ARC-Easy, accuracy above the base model's: "
         + "; ".join(f"{n} {above_base[n]}" for n in names) + "."]
flat = [n for n in names if above_base[n].low <= 0]
if flat:
    notes.append(f"On ARC-Easy {', '.join(flat)} did not move clearly above the base model ({mean(base_correct):.3f}; "
                 f"chance 0.25): {work.steps} steps of {work.batch_science} questions are few for a skill the base model "
                 "half has, so the ARC verdicts say more about the noise of a short run than about the adapters; the gpu "
                 f"profile trains {tasks.MathAndScience.PROFILES['gpu']['steps']} steps.")
notes.append("One step further: the paper's ranking may owe part of its margins to its budgets. At LLaMA-7B's shapes "
             f"the parallel adapter it trains has {paper_counts['parallel'] / paper_counts['LoRA']:.1f}x LoRA's parameters "
             f"and the series adapter {paper_counts['series'] / paper_counts['LoRA']:.1f}x (section 3), so its "
             "parallel > series ordering is also a comparison of budgets. Here the budgets are equal.")
display(Markdown("\n\n".join(notes)))

# %% [markdown]
# ## Exercises
#
# Answers, with code that runs, in [`solutions/20_llm_adapters_solutions.ipynb`](solutions/20_llm_adapters_solutions.ipynb).
#
# 1. Placement: the official LLaMA math command puts the series adapter on `gate_proj` and `up_proj`
#    (at the MLP's *input*), against the paper's finding that after the MLP is best. Train that
#    placement on GSM8K at the same bottleneck and compare with section 4's series arm.
# 2. The official "bert" init makes the adapted model differ from the base before any training
#    (section 1). How much higher is the GSM8K test loss of the untrained series and parallel arms
#    than the base model's, and does `init="mam"` (the identity at init) train to a lower loss?
# 3. Write the parallel adapter's $s\,U\tanh(Dx)$ as LoRA plus a correction: expand $\tanh$ to third
#    order. When is the adapter close to LoRA with $A = D$, $B = U$, and how far from it are the
#    trained adapters of section 4?
# 4. Count the paper's budgets on LLaMA-13B (d = 5120, MLP 13824, 40 layers): which arm trains most?

# %%
_ = run.save(metrics={
    "lr": lr, "steps": work.steps, "counted": counted, "bottlenecks": {"series": b_series, "parallel": b_parallel, "lora_r": r_lora},
    "paper_counts_llama7b": paper_counts, "equivalence_gaps": gaps,
    "base": {"gsm8k_loss": mean(base_losses), "arc_accuracy": mean(base_correct)},
    "arms": {n: {"gsm8k_loss": mean(r["gsm8k"]["score"]), "arc_accuracy": mean(r["arc_easy"]["score"]),
                 "final_train_loss": {t: r[t]["train_loss"][-1] for t in work.TASKS}} for n, r in results.items()},
})

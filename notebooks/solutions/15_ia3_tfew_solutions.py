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
# # 15 · (IA)³ and T-Few: solutions to the exercises
#
# The answers use the chapter's protocol (`tasks.FewShot`: the same 32 SST-2 sentences, batch,
# T-Few's optimizer and learning rates). To fit in 10 minutes on 2 cores, the cpu profile trains 20
# steps instead of the chapter's 40 and scores on the first 64 of the chapter's validation sentences
# (the same shuffle, so a subset): accuracies differ from the chapter's by a few points and the
# intervals are wider. The smoke and gpu profiles use the chapter's sizes.

# %% tags=["parameters"]
profile = "auto"
seed = 0
results_dir = "../results"

# %%
from peft_from_scratch import bib, core, tasks, verdicts   # first: it quiets tqdm.auto's warning
from peft_from_scratch.additive import IA3Config
from peft_from_scratch.notebook import start
from peft_from_scratch.training import TrainConfig, make_adamw
from peft_from_scratch.training.multiple_choice import TFewObjective

import matplotlib.pyplot as plt
import torch

run = start("15_ia3_tfew_solutions", profile, seed, results_dir)
smaller = run.pick(smoke={}, cpu=dict(n_val=64, steps=20), gpu={})
few = tasks.FewShot.for_run(run, **smaller)
smol = few.base()
acc = lambda c: sum(c) / len(c)   # noqa: E731
print(f"SST-2, k = {few.k}, {few.steps} steps of {few.batch}, {few.n_val or len(few.val_rows)} validation sentences")

# %% [markdown]
# ## 1. Merging by hand
#
# Output scaling folds into the rows of the matrix ($\mathrm{diag}(l) W$: row $i$ times $l_i$),
# input scaling into its columns ($W \mathrm{diag}(l)$: column $j$ times $l_j$). Train the vectors for
# the chapter's recipe, fold them into a plain copy of SmolLM2, and compare.

# %%
trained = core.add_adapter(few.base(), IA3Config())
few.fit(trained, 3e-3, desc="SST-2 (IA)³, T-Few loss")
by_hand = few.base()
with torch.no_grad():
    for name, layer in core.adapter_layers(trained).items():
        W = by_hand.get_submodule(name).weight
        if layer.on_input:
            W.mul_(layer.l[None, :])          # W diag(l): the FFN's down_proj
        else:
            W.mul_(layer.l[:, None])          # diag(l) W: k_proj, v_proj
batch = next(iter(few.loader()))
ids = {k: batch[k] for k in ("input_ids", "attention_mask")}
with torch.no_grad():
    adapter_logits = trained(**ids).logits
    gap = ((by_hand(**ids).logits - adapter_logits).abs().max() / adapter_logits.abs().max()).item()
print(f"merged by hand vs the adapter: max |logit difference| {gap:.1e} of the largest logit")
print("merged by hand gives the adapter's logits (1e-5 of the largest):", run.check("merge_by_hand", gap < 1e-5))

# %% [markdown]
# Undoing the merge divides row $i$ (or column $j$) by $l_i$. Where $l_i = 0$ the merge wiped the
# row out: $0 \cdot W_{i,:}$ holds no trace of $W_{i,:}$, so no division can bring it back. The
# library refuses instead of dividing by zero (peft divides by $l + 10^{-8}$, which returns garbage):

# %%
with torch.no_grad():
    layer = core.adapter_layers(trained)["model.layers.0.self_attn.k_proj"]
    layer.l[0] = 0.0
core.merge_adapter(trained)
try:
    core.unmerge_adapter(trained)
    refused = False
except ValueError as e:
    print("ValueError:", e)
    refused = True
print("unmerging with a zero in l is refused:", run.check("unmerge_zero_refused", refused))
del trained, by_hand

# %% [markdown]
# ## 2. RTE
#
# RTE's premises are long, so a step reads about four times the tokens of an SST-2 step and 32
# demonstrations make a prompt of about 3,000 tokens. The same protocol, same settings:

# %%
print("data:", bib.cite("dagan2006pascal"), bib.cite("wang2019superglue"))
rte = tasks.FewShot.for_run(run, dataset="rte", **smaller)
rte_base = rte.base()
rte_zero = rte.correct(rte_base)
rte_icl = rte.correct(rte_base, demonstrations=rte.demonstrations())
rte_ia3_model = core.add_adapter(rte.base(), IA3Config())
rte_hist = rte.fit(rte_ia3_model, 3e-3, desc="RTE (IA)³, T-Few loss")
rte_ia3 = rte.correct(rte_ia3_model)
print(f"RTE ({len(rte_zero)} validation pairs, majority class {rte.majority():.3f}): zero-shot {acc(rte_zero):.3f}, "
      f"ICL {acc(rte_icl):.3f}, (IA)³ {acc(rte_ia3):.3f} (final training loss {rte_hist.loss[-1]:.3f})")
print("(IA)³ minus ICL:", verdicts.mean_difference(rte_ia3, rte_icl, what="validation pairs"))
del rte_base, rte_ia3_model

# %%
majority = rte.majority()
near = {name: abs(a - majority) < 0.05 for name, a in (("zero-shot", acc(rte_zero)), ("ICL", acc(rte_icl)), ("(IA)³", acc(rte_ia3)))}
print("within 5 points of the majority class:", ", ".join(f"{k} {v}" for k, v in near.items()))
print(f"final training loss {rte_hist.loss[-1]:.3f} (the loss at the first step: {rte_hist.loss[0]:.3f})")

# %% [markdown]
# Read the two lines above together. If the accuracies sit near the majority class while the
# training loss has fallen, the 32 pairs were memorised rather than generalised: at 135M parameters
# the model has no entailment to rescale towards. T-Few's RTE number comes from T0-3B, trained on
# many prompted tasks (RTE held out), with its (IA)³ vectors pre-trained on that mixture too.

# %% [markdown]
# ## 3. AdamW against Adafactor, first step
#
# For a vector that starts at 1, Adafactor's relative step multiplies the lr by the vector's RMS
# (1), and its update is the gradient over the root of its second moment, clipped to RMS 1: on the
# first step, with the second moment equal to $g^2$, that is about $\mathrm{sign}(g)$. Adam's first
# step is exactly $\mathrm{lr} \cdot g / (|g| + \epsilon)$, the sign too. Check on one batch:

# %%
def first_step(make_optimizer):
    model = core.add_adapter(few.base(), IA3Config())
    params = [p for p in model.parameters() if p.requires_grad]
    before = torch.cat([p.detach().flatten() for p in params]).clone()
    TFewObjective(model)(**batch)["loss"].backward()
    optimizer = make_optimizer(params, TrainConfig(lr=3e-3))
    optimizer.step()
    return torch.cat([p.detach().flatten() for p in params]) - before


adam, adafactor = first_step(make_adamw), first_step(tasks.tfew_adafactor)
cos = torch.nn.functional.cosine_similarity(adam, adafactor, dim=0).item()
print(f"first update: |AdamW| mean {adam.abs().mean():.2e} (lr 3e-3), |Adafactor| mean {adafactor.abs().mean():.2e}; "
      f"cosine {cos:.3f}; same sign on {(adam.sign() == adafactor.sign()).float().mean():.1%} of entries")
print("the first steps point the same way (cosine > 0.5):", run.check("first_steps_agree", cos > 0.5))

# %% [markdown]
# They differ later: Adam keeps a momentum and bias-corrects its moments; Adafactor (as T-Few runs
# it) has no momentum, and its second-moment decay $1 - t^{-0.8}$ grows with the step.
#
# ## 4. ICL against the number of demonstrations
#
# The first $n$ of the 32 training sentences as demonstrations, $n$ = 0, 4, 16, 32.

# %%
curve = {}
for n in (0, 4, 16, 32):
    demos = "".join(f"{q}\n{a}\n\n" for q, a in map(few.example_fn, few.train_rows.select(range(min(n, few.k)))))
    tokens = few.prompt_tokens(demos)
    curve[n] = dict(accuracy=acc(few.correct(smol, demonstrations=demos)), tokens=sum(tokens) / len(tokens))
    print(f"{n:2d} demonstrations: accuracy {curve[n]['accuracy']:.3f}, {curve[n]['tokens']:.0f} tokens per question")
fig, ax = plt.subplots(1, 2, figsize=(9, 3))
ax[0].plot(list(curve), [c["accuracy"] for c in curve.values()], "o-"); ax[0].set(xlabel="demonstrations", ylabel="accuracy")
ax[1].plot(list(curve), [c["tokens"] for c in curve.values()], "o-"); ax[1].set(xlabel="demonstrations", ylabel="tokens per question")
plt.tight_layout(); plt.show()
most = max(curve)
print(f"{most} demonstrations cost {curve[most]['tokens'] / curve[0]['tokens']:.1f}x the tokens of none and change the "
      f"accuracy by {curve[most]['accuracy'] - curve[0]['accuracy']:+.3f}")

# %% [markdown]
# The cost grows linearly with the demonstrations, whatever they do to the accuracy: compare the two
# numbers printed above.
#
# ## 5. The official unlikelihood loss
#
# The official code computes $\log(1 - p + 0.01)$ and sums it over every position of every choice,
# padding and correct choice included (each adds $-\log 1.01$), while dividing by the wrong choices'
# tokens only. With one-token choices and no padding the extra terms are the correct choices'.

# %%
model = core.add_adapter(few.base(), IA3Config())
with torch.no_grad():
    paper, official = TFewObjective(model)(**batch), TFewObjective(model, official=True)(**batch)
print(f"L_UL on one batch: Eq. 2 {paper['ul'].item():.4f}, official {official['ul'].item():.4f}")
paper_model = core.add_adapter(few.base(), IA3Config())
few.fit(paper_model, 3e-3, desc="SST-2 (IA)³, Eq. 2")
official_model = core.add_adapter(few.base(), IA3Config())
few.fit(official_model, 3e-3, official=True, desc="SST-2 (IA)³, official L_UL")
paper_c, official_c = few.correct(paper_model), few.correct(official_model)
print(f"accuracy: Eq. 2 {acc(paper_c):.3f}, official {acc(official_c):.3f}; difference "
      f"{verdicts.mean_difference(official_c, paper_c, what='validation sentences')}")

# %%
_ = run.save(metrics={"merge_by_hand_max_diff": gap, "rte": {"zero_shot": acc(rte_zero), "icl": acc(rte_icl), "ia3": acc(rte_ia3),
                                                              "majority": rte.majority()},
                      "first_step_cosine": cos, "icl_curve": {str(k): v for k, v in curve.items()},
                      "unlikelihood": {"paper_ul": paper["ul"].item(), "official_ul": official["ul"].item(),
                                       "paper_accuracy": acc(paper_c), "official_accuracy": acc(official_c)}})

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
# # 17 · Compacter: solutions to the exercises
#
# Each answer trains MiniLM on the chapter's SST-2 task (`tasks.SST2`: the same sentences, steps and
# batch) at one learning rate, 1e-2, the top of the chapter's grid (a Compacter starts with
# $C \sim 10^{-4}$ and needs a large rate in 40 steps), and compares it with the chapter's Compacter
# trained the same way: paired bootstrap intervals over the validation sentences.

# %% tags=["parameters"]
profile = "auto"
seed = 0
results_dir = "../results"

# %%
import torch

from peft_from_scratch import core, tasks, verdicts   # first: it quiets tqdm.auto's warning
from peft_from_scratch.additive.compacter import CompacterConfig, SharedRule, parameter_count
from peft_from_scratch.notebook import start

run = start("17_compacter_solutions", profile, seed, results_dir)
sst = tasks.SST2.for_run(run)
lr = 1e-2
d = 384


def fit(desc, model=None, **config):
    model = model or core.add_adapter(sst.base(), CompacterConfig(**{"modules_to_save": ["classifier"], **config}))
    hist = sst.fit(model, lr, desc=f"SST-2 {desc}, lr {lr:g}")
    return dict(model=model, correct=sst.correct(model), loss=hist.loss, trained=core.count_parameters(model)[0])


def accuracy(r):
    return sum(r["correct"]) / len(r["correct"])


def against(r, ref, name, ref_name="Compacter"):
    gap = verdicts.mean_difference(r["correct"], ref["correct"], what="validation sentences")
    print(f"{name}: accuracy {accuracy(r):.3f} ({r['trained']:,d} trained); minus {ref_name}: {gap}")
    return gap


compacter = fit("Compacter")
print(f"Compacter, the reference: accuracy {accuracy(compacter):.3f}, {compacter['trained']:,d} trained")

# %% [markdown]
# ## 1. One $A$ per adapter instead of one for the model
#
# Give each adapter its own `SharedRule` (registered on the adapter, so it trains and is saved with
# it) and point both of its projections at it. Sharing saves $(\text{adapters} - 1)\,n^3$ numbers.

# %%
def unshared():
    model = core.add_adapter(sst.base(), CompacterConfig(modules_to_save=["classifier"]))
    torch.manual_seed(seed)
    for layer in core.adapter_layers(model).values():
        branch = layer.adapter
        branch.own_rule = SharedRule(4)                    # a submodule: its C is a parameter of the model
        branch.down.rule = branch.up.rule = [branch.own_rule]
    model.phm_rule.requires_grad_(False)                   # no projection reads the shared one any more
    return model


own = fit("Compacter, one A per adapter", model=unshared())
adapters = len(core.adapter_layers(own["model"]))
adapter_own = sum(p.numel() for n, p in compacter["model"].named_parameters() if ".adapter." in n or "phm_rule" in n)
print(f"{adapters} adapters: {own['trained'] - compacter['trained']:,d} more parameters unshared "
      f"(= (adapters - 1) n^3 = {(adapters - 1) * 4 ** 3}), against the {adapter_own:,d} of the shared Compacter's adapters")
gap_own = against(own, compacter, "one A per adapter")
print("unsharing adds (adapters - 1) n^3 trained parameters:",
      run.check("unsharing_adds_adapters_minus_one_n_cubed", own["trained"] - compacter["trained"] == (adapters - 1) * 4 ** 3))

# %% [markdown]
# The saving is a few hundred numbers out of the adapters' fourteen thousand: at $n = 4$ the shared
# tensor is tiny, so on MiniLM sharing is about *tying* the layers (the paper's "slow weights" that capture what
# the layers have in common) more than about the count. The interval says whether SST-2 notices.

# %% [markdown]
# ## 2. Rank 4 instead of rank 1

# %%
rank4 = fit("Compacter rank 4", rank=4)
print(f"rank 4 trains {rank4['trained'] - compacter['trained']:,d} more parameters (3 (k + d) per projection)")
gap_rank = against(rank4, compacter, "rank 4")
print("rank 4 adds 3 (k + d) per projection, two projections per adapter:",
      run.check("rank4_adds_three_k_plus_d_per_projection",
                rank4["trained"] - compacter["trained"] == 3 * 2 * adapters * (d + d // 32)))

# %% [markdown]
# ## 3. The number of Kronecker products $n$
#
# Pure arithmetic: per projection $r(k + d)$ weights whatever $n$ is, plus $n^3$ shared, so the count
# barely moves; the rank bound $n^2 r$ does. At $n = 2$ it is 4, below the 12 a down projection
# $12 \times 384$ could reach: the bound binds.

# %%
m = d // 32
ranks = {}
for n in (2, 4, 6, 12):
    model = core.add_adapter(sst.base(), CompacterConfig(phm_dim=n, modules_to_save=["classifier"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dim() == 3:          # C, the W_left and W_right: random, as after training
                p.normal_()
        down = model.bert.encoder.layer[0].output.dense.adapter.down
        rank = ranks[n] = torch.linalg.matrix_rank(down.weight()).item()
    print(f"n = {n:2d}: {parameter_count(d, m, adapters=12, n=n):,d} adapter parameters; "
          f"rank of a 384 x 12 down projection {rank} (bound n^2 r = {n * n}, at most 12)")

# %% [markdown]
# %%
print("the rank never exceeds min(n^2 r, 12), and at n = 2 the bound (4) binds:",
      run.check("phm_rank_bound", all(r <= min(n * n, m) for n, r in ranks.items()) and ranks[2] == 4))

# %% [markdown]
# ## 4. Frozen LayerNorms

# %%
with_norms = fit("Compacter++", placement="pfeiffer")
without_norms = fit("Compacter++ without LayerNorms", placement="pfeiffer", train_layer_norms=False)
print(f"the LayerNorms are {with_norms['trained'] - without_norms['trained']:,d} of Compacter++'s "
      f"{with_norms['trained']:,d} trained parameters")
gap_norms = against(without_norms, with_norms, "Compacter++ with frozen LayerNorms", "Compacter++")
norms = sum(p.numel() for n, p in with_norms["model"].named_parameters() if "LayerNorm" in n)
print("freezing them removes exactly the LayerNorms' parameters:",
      run.check("frozen_norms_remove_the_layer_norm_parameters", with_norms["trained"] - without_norms["trained"] == norms))

# %%
_ = run.save(metrics={"lr": lr, "compacter": accuracy(compacter),
                      "unshared": {"accuracy": accuracy(own), "gap": gap_own.to_dict(), "extra": own["trained"] - compacter["trained"]},
                      "rank4": {"accuracy": accuracy(rank4), "gap": gap_rank.to_dict()},
                      "compacterpp": accuracy(with_norms),
                      "frozen_norms": {"accuracy": accuracy(without_norms), "gap": gap_norms.to_dict()}})

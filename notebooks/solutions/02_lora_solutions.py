# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · LoRA: solutions to the exercises
#
# Each answer runs on the same SST-2 task as the chapter (`tasks.SST2`: same sentences, same number
# of steps), so the numbers can be set beside the chapter's.

# %% tags=["parameters"]
profile = "auto"
seed = 0
results_dir = "../results"

# %%
import torch

from peft_from_scratch import core, tasks, verdicts   # first: it quiets tqdm.auto's warning
from peft_from_scratch.notebook import start
from peft_from_scratch.reparameterized.lora import LoRAConfig

run = start("02_lora_solutions", profile, seed, results_dir)
sst = tasks.SST2.for_run(run)
lr = tasks.lrs(sst, "adapter")[len(tasks.lrs(sst, "adapter")) // 2]     # the middle of the chapter's grid


def fit(config):
    model = core.add_adapter(sst.base(), config)
    sst.fit(model, lr, desc=f"{config.target_modules} r={config.r}{' rsLoRA' if config.use_rslora else ''}"
                            f"{' gaussian' if config.init == 'gaussian' else ''}")
    return model, sst.correct(model)


# %% [markdown]
# ## 1. All linear layers at r = 2 against query and value at r = 8
#
# All of MiniLM's linear layers (6 layers x (4 attention + 2 feed-forward) projections, and the
# pooler, as peft's "all-linear" takes them; not the classifier head) at r = 2 train r (d_in + d_out)
# per layer; q, v at r = 8 train 8 (384 + 384) per projection.

# %%
qv8, correct_qv8 = fit(LoRAConfig(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]))
all2, correct_all2 = fit(LoRAConfig(r=2, alpha=4, target_modules="all-linear", modules_to_save=["classifier"]))
n_qv8, n_all2 = core.count_parameters(qv8)[0], core.count_parameters(all2)[0]
gap = verdicts.mean_difference(correct_all2, correct_qv8, what="validation sentences")
print(f"q,v r=8: {n_qv8:,d} trained, accuracy {sum(correct_qv8) / len(correct_qv8):.3f}")
print(f"all-linear r=2: {n_all2:,d} trained, accuracy {sum(correct_all2) / len(correct_all2):.3f}")
print(f"accuracy(all-linear r=2) - accuracy(q,v r=8) = {gap}  ({gap.method})")
# The paper's Table 5 finds spreading the budget over more matrices at a lower rank better than a
# higher rank on fewer; at a few hundred steps the interval above says whether this run can tell.
linears = {n for n, m in sst.base().named_modules() if isinstance(m, torch.nn.Linear)}
run.check("all_linear_adapts_every_linear_but_the_head", set(core.adapter_layers(all2)) == linears - {"classifier"})

# %% [markdown]
# ## 2. rsLoRA: why α/√r keeps the update's size stable
#
# With LoRA's α/r the update's scale falls as 1/r for a fixed α, while the number of directions
# BA sums over grows as r: after the same training, a larger r gives a *smaller* update. With
# α/√r the two effects balance. We measure ‖ΔW‖_F of the layer-3 query after training.

# %%
def update_norm(model, name="bert.encoder.layer.3.attention.self.query"):
    return model.get_submodule(name).delta_weight().norm().item()


norms = {}
for rs in (False, True):
    for r in (8, 64):
        model, _ = fit(LoRAConfig(r=r, alpha=16, use_rslora=rs, target_modules=["query", "value"],
                                  modules_to_save=["classifier"]))
        norms[(rs, r)] = update_norm(model)
        scaling = model.get_submodule("bert.encoder.layer.3.attention.self.query").lora.scaling
        print(f"{'alpha/sqrt(r)' if rs else 'alpha/r':13s} r={r:2d}: scaling {scaling:.3f}, ||dW||_F = {norms[(rs, r)]:.4f}")
for rs in (False, True):
    print(f"{'alpha/sqrt(r)' if rs else 'alpha/r':13s}: ||dW|| at r=64 / at r=8 = {norms[(rs, 64)] / norms[(rs, 8)]:.2f}")
run.check("rslora_scales_by_alpha_over_sqrt_r", abs(
    core.add_adapter(sst.base(), LoRAConfig(r=64, alpha=16, use_rslora=True, target_modules=["query"]))
    .get_submodule("bert.encoder.layer.0.attention.self.query").lora.scaling - 16 / 8) < 1e-12)

# %% [markdown]
# ## 3. Subspace similarity for value, and for the first and last layers

# %%
def phi_11(a8, a64):
    u8 = torch.linalg.svd(a8.detach().double(), full_matrices=False).Vh[0]
    u64 = torch.linalg.svd(a64.detach().double(), full_matrices=False).Vh[0]
    return (u8 @ u64).pow(2).item()


qv64, _ = fit(LoRAConfig(r=64, alpha=128, target_modules=["query", "value"], modules_to_save=["classifier"]))
for layer in (0, 3, 5):
    for proj in ("query", "value"):
        name = f"bert.encoder.layer.{layer}.attention.self.{proj}"
        print(f"layer {layer} {proj:5s}: phi(A8, A64, 1, 1) = {phi_11(qv8.get_submodule(name).lora.A, qv64.get_submodule(name).lora.A):.3f}"
              f"  (chance 1/384 = {1 / 384:.4f})")

# %% [markdown]
# ## 4. Gaussian against Kaiming-uniform initialisation of A

# %%
gauss, correct_gauss = fit(LoRAConfig(r=8, alpha=16, init="gaussian", target_modules=["query", "value"],
                                      modules_to_save=["classifier"]))
A = gauss.get_submodule("bert.encoder.layer.0.attention.self.query").lora.A
init_gap = verdicts.mean_difference(correct_gauss, correct_qv8, what="validation sentences")
print(f"accuracy(gaussian) - accuracy(kaiming) = {init_gap}  ({init_gap.method})")
# A moved during training, but only a little: its spread is still that of N(0, 1/r^2).
print(f"std of A after training: {A.std().item():.4f} (initial N(0, 1/r^2): {1 / 8:.4f})")
run.check("gaussian_init_draws_std_1_over_r", abs(
    core.add_adapter(sst.base(), LoRAConfig(r=8, init="gaussian", target_modules=["query"]))
    .get_submodule("bert.encoder.layer.0.attention.self.query").lora.A.std().item() - 1 / 8) < 0.01)

# %%
_ = run.save(metrics={"all_linear_r2": {"trained": n_all2, "accuracy": sum(correct_all2) / len(correct_all2)},
                      "qv_r8": {"trained": n_qv8, "accuracy": sum(correct_qv8) / len(correct_qv8)},
                      "update_norms": {f"{'rslora' if rs else 'lora'}_r{r}": v for (rs, r), v in norms.items()},
                      "gaussian_minus_kaiming": init_gap.to_dict()})

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
# # 07 · Prefix tuning: steering a frozen LM through its key/value cache
#
# Li & Liang (2021) keep the language model frozen and learn a *prefix*: $n$ virtual tokens whose
# activations, at every layer, are free parameters $P_\theta$. Every real token attends to them as
# if the model had already read $n$ tokens of a perfect instruction (their §4.2):
#
# $$h_i = \begin{cases} P_\theta[i, :] & i \in \text{prefix} \\ \mathrm{LM}_\phi(z_i, h_{<i}) & \text{otherwise.}\end{cases}$$
#
# In a transformer the only thing later tokens read from earlier ones is their keys and values, so
# $P_\theta$ is exactly a KV cache: for each layer, $n$ keys and $n$ values. Optimising $P_\theta$
# directly was unstable in the paper, so they train through a reparameterisation
# $P_\theta = \mathrm{MLP}_\theta(P'_\theta)$ (eq. 5) and keep only $P_\theta$ afterwards.
#
# This notebook builds the prefix as a cache, proves it equal to `peft`'s prefix tuning (with and
# without the MLP), trains SmolLM2 on E2E NLG, folds the MLP away, and runs the paper's two
# ablations in miniature: prefix length and the reparameterisation.

# %% tags=["parameters"]
profile = "auto"      # "smoke" (CI), "cpu" (about 10 minutes), "gpu" (the full run), or "auto"
seed = 0
results_dir = "results"

# %%
import copy
import inspect
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display

from peft_from_scratch import bib, core, data, equivalence, evaluate, models
from peft_from_scratch.additive.prefix_tuning import PrefixEncoder, PrefixTuningConfig, fold_prefix
from peft_from_scratch.interop import peft as peft_io
from peft_from_scratch.notebook import load_results, start
from peft_from_scratch.reparameterized.lora import LoRAConfig
from peft_from_scratch.training import TrainConfig, evaluate_loss, train

run = start("07_prefix_tuning", profile, seed, results_dir)
bib.paper_card("li2021prefix",
               claim="Training only a prefix of virtual key/value activations at every layer (0.1% of the "
                     "parameters), through an MLP reparameterisation during training, comes close to full "
                     "fine-tuning on table-to-text generation (E2E: 69.7 vs 68.2 BLEU on GPT-2 Medium).",
               notebook_profile=run.profile)

# %% [markdown]
# ## 1. A prefix is a KV cache
#
# SmolLM2 has 30 layers; each attends with 9 query heads but only 3 key/value heads of width 64
# (grouped-query attention), so one virtual token costs $30 \times 2 \times 3 \times 64 = 11{,}520$
# numbers. `PrefixEncoder` stores them as one row per virtual token and hands them to the model as
# a `DynamicCache` before the first real token; a forward pre-hook extends the attention mask by
# $n$ ones and shifts the positions by $n$.

# %%
print(inspect.getsource(PrefixEncoder.prefix_cache))

# %%
smol, tok = models.load_model(models.SMOLLM2)
smol.to(run.torch_device).eval()
cfg = smol.config
L, kv_heads, head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
width = kv_heads * head_dim
print(f"layers {L}, key/value heads {kv_heads}, head dim {head_dim}: {2 * L * width:,d} numbers per virtual token")

# %% [markdown]
# If a prefix is just a cache, then the cache of a *real* text must be a prefix too. Run the frozen
# model on a text, copy its keys and values into a prefix of the same length, and the model with
# that prefix must continue exactly as the model does on the text itself. (The paper's best
# initialisation, "activations of real words", is this; peft has it as
# `initialize_kv_prefix_from_text`.)

# %%
text = tok("Describe restaurants in one sentence.", return_tensors="pt")["input_ids"]
cont = tok(" The Eagle is a cheap coffee shop near Burger King.", return_tensors="pt")["input_ids"]
n_text = text.shape[1]
with torch.no_grad():
    cache = smol(input_ids=text, use_cache=True).past_key_values
    kv = torch.stack([t[0] for layer in cache.layers for t in (layer.keys, layer.values)])  # (2L, kv_heads, n, head_dim)
    from_text = core.add_adapter(copy.deepcopy(smol), PrefixTuningConfig(num_virtual_tokens=n_text))
    from_text.prompt_encoder.embedding.weight.copy_(kv.permute(2, 0, 1, 3).reshape(n_text, -1))
    with_prefix = from_text(input_ids=cont).logits
    reading_text = smol(input_ids=torch.cat([text, cont], 1)).logits[:, n_text:]
prefix_is_cache = torch.allclose(with_prefix, reading_text, atol=1e-4)
del from_text

# %%
# NBVAL_CHECK_OUTPUT
print(f"a prefix of {n_text} virtual tokens holding the text's keys and values")
print("gives the logits of the model reading the text (atol 1e-4):", prefix_is_cache)

# %% [markdown]
# **Parameters.** Without reparameterisation, $P_\theta$ is an $n \times 2Lw$ matrix ($w$ = key width).
# With it, $P_\theta = W_2 \tanh(W_1 P' + b_1) + b_2$ with $P' \in \mathbb{R}^{n\times w}$: many more
# parameters during training (the second matrix alone is $h \times 2Lw$), but after training we
# compute $P_\theta$ once, keep it and drop the MLP.

# %%
# NBVAL_CHECK_OUTPUT
n_prefix = 10     # the paper's length for table-to-text
plain = core.add_adapter(copy.deepcopy(smol), PrefixTuningConfig(num_virtual_tokens=n_prefix))
projected = core.add_adapter(copy.deepcopy(smol), PrefixTuningConfig(num_virtual_tokens=n_prefix, prefix_projection=True))
total = sum(p.numel() for p in smol.parameters())
p_plain, p_proj = core.count_parameters(plain)[0], core.count_parameters(projected)[0]
h = width                                                     # peft's default hidden width
print(f"prefix, n={n_prefix}: {p_plain:,d} parameters = n x 2Lw:", p_plain == n_prefix * 2 * L * width)
print(f"with the MLP (h={h}): {p_proj:,d} = n w + (w h + h) + (h 2Lw + 2Lw):",
      p_proj == n_prefix * width + (width * h + h) + (h * 2 * L * width + 2 * L * width))
print(f"prefix = {100 * p_plain / total:.3f}% of SmolLM2's {total:,d} parameters")
del plain, projected

# %% [markdown]
# ## 2. Proof against peft
#
# Ours and peft's `PrefixTuningConfig` on two copies of SmolLM2, with and without the projection.
# Our prefix parameters are copied into peft (our `prompt_encoder.X` is peft's
# `prompt_encoder.default.X`); then both take five AdamW steps on the same real E2E batches and
# we compare logits, gradients and parameters, and finally greedy generation.

# %%
eq_rows = data.load_e2e("train", n=2, seed=seed)
eq_batches = list(data.make_loader(data.tokenize_causal(eq_rows, tok, data.e2e_example, max_length=192), 1,
                                   pad_token_id=tok.pad_token_id))
gen_prompt = tok(data.chat_prompt(tok, data.e2e_example(eq_rows[0])[0]), return_tensors="pt", add_special_tokens=False)


checks = {}
for projection in (False, True):
    ours, theirs, pairs = peft_io.twin(smol, PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=projection))
    report = equivalence.compare(ours, theirs, pairs, eq_batches, steps=5, lr=1e-2, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        same_tokens = torch.equal(*(m.generate(**gen_prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                               pad_token_id=tok.pad_token_id) for m in (ours, theirs)))
    checks[projection] = dict(report=report, same_tokens=same_tokens)
    print(f"projection={projection}:\n{report.table()}")
del ours, theirs, pairs

# %%
# NBVAL_CHECK_OUTPUT
for projection, c in checks.items():
    print(f"prefix tuning, prefix_projection={projection}:\n{c['report'].verdict()}")
    print("greedy generation, same 8 tokens:", c["same_tokens"])

# %% [markdown]
# ## 3. SmolLM2 on E2E NLG
#
# The same data, loop and number of steps as full fine-tuning (notebook 01) and LoRA (notebook 02),
# with a prefix of $n$ = 10 trained through the MLP. A prefix needs a much larger learning rate than
# full fine-tuning (the paper uses 5e-5 over 10 epochs; our runs are a few dozen steps): 1e-3 here.

# %%
gen_cfg = run.pick(
    smoke=dict(n_train=8, n_ablation=4, n_test=4, batch=4, new_tokens=16, lengths=(10,)),
    cpu=dict(n_train=384, n_ablation=192, n_test=64, batch=8, new_tokens=48, lengths=(5, 10, 20)),
    gpu=dict(n_train=4672, n_ablation=1024, n_test=630, batch=16, new_tokens=64, lengths=(5, 10, 20, 50)),
)
LR_PROJECTION, LR_DIRECT = 1e-3, 1e-2
train_rows = data.load_e2e("train", n=gen_cfg["n_train"], seed=seed)
train_ds = data.tokenize_causal(train_rows, tok, data.e2e_example, max_length=192)
test_rows = data.load_e2e("test", n=gen_cfg["n_test"], seed=seed)
test_loader = data.make_loader(data.tokenize_causal(test_rows, tok, data.e2e_example, max_length=192), 16,
                               pad_token_id=tok.pad_token_id)
prompts = [data.e2e_example(r)[0] for r in test_rows]
zero_shot_loss = evaluate_loss(smol, test_loader)


def fit(n, projection, dataset, desc):
    model = core.add_adapter(copy.deepcopy(smol), PrefixTuningConfig(num_virtual_tokens=n, prefix_projection=projection))
    hist = train(model, data.make_loader(dataset, gen_cfg["batch"], shuffle=True, seed=seed, pad_token_id=tok.pad_token_id),
                 TrainConfig(lr=LR_PROJECTION if projection else LR_DIRECT, seed=seed), desc=desc)
    return model, hist


prefix_model, prefix_hist = fit(n_prefix, True, train_ds, f"E2E prefix n={n_prefix} (MLP)")
trainable_during = core.count_parameters(prefix_model)[0]
test_loss = evaluate_loss(prefix_model, test_loader)

# %% [markdown]
# **Folding the MLP away.** After training, `fold_prefix` computes $P_\theta = \mathrm{MLP}(P')$
# once and replaces the encoder by that matrix; the model must give the same logits.

# %%
with torch.no_grad():
    prefix_model.eval()
    before_fold = prefix_model(**eq_batches[0]).logits
    fold_prefix(prefix_model)
    fold_diff = (prefix_model(**eq_batches[0]).logits - before_fold).abs().max().item()
trainable_after = core.count_parameters(prefix_model)[0]
hyps = evaluate.generate(prefix_model, tok, prompts, max_new_tokens=gen_cfg["new_tokens"])
bleu = evaluate.corpus_bleu(hyps, list(test_rows["refs"]))
print(f"trained {trainable_during:,d} parameters (prefix + MLP); kept {trainable_after:,d} after folding "
      f"({100 * trainable_after / total:.3f}% of SmolLM2)")
print(f"prefix tuning: BLEU {bleu:.1f}, test loss {test_loss:.3f} (zero-shot {zero_shot_loss:.3f}), "
      f"{len(prefix_hist.step)} steps, {prefix_hist.tokens_per_s:.0f} tokens/s")
print(f"\nMR: {test_rows[0]['mr']}\n  prefix: {hyps[0]}")

# %%
# NBVAL_CHECK_OUTPUT
print("folded prefix gives the same logits (atol 1e-5):", fold_diff < 1e-5)
print("folding keeps only n x 2Lw parameters:", trainable_after == n_prefix * 2 * L * width)

# %% [markdown]
# **LoRA at the same budget.** The folded prefix keeps $n \cdot 2L \cdot w$ parameters. LoRA on
# $W_q$ and $W_v$ with rank $r$ has $r\,L\,(d + d) + r\,L\,(d + w)$, which for $r = 2$ is exactly
# the same number on SmolLM2 ($d$ = 576, $w$ = 192, $L$ = 30). Same data, loop, steps and
# learning rate as the prefix.

# %%
lora_config = LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"])
lora_model = core.add_adapter(copy.deepcopy(smol), lora_config)
lora_params = core.count_parameters(lora_model)[0]
lora_hist = train(lora_model, data.make_loader(train_ds, gen_cfg["batch"], shuffle=True, seed=seed,
                                               pad_token_id=tok.pad_token_id),
                  TrainConfig(lr=LR_PROJECTION, seed=seed), desc="E2E LoRA r=2 (q, v)")
lora_loss = evaluate_loss(lora_model, test_loader)
lora_hyps = evaluate.generate(lora_model, tok, prompts, max_new_tokens=gen_cfg["new_tokens"])
lora_bleu = evaluate.corpus_bleu(lora_hyps, list(test_rows["refs"]))
del lora_model
print(f"LoRA r=2: BLEU {lora_bleu:.1f}, test loss {lora_loss:.3f}, {len(lora_hist.step)} steps")

# %%
# NBVAL_CHECK_OUTPUT
print(f"LoRA r=2 on q, v: {lora_params:,d} parameters; folded prefix n={n_prefix}: {trainable_after:,d}; "
      f"equal: {lora_params == trainable_after}")

# %% [markdown]
# ## 4. Ablations: prefix length, and the reparameterisation
#
# Shorter runs (half the data). The paper finds performance rises with the prefix length up to a
# threshold (about 10 for table-to-text) and that optimising $P_\theta$ directly, without the MLP,
# is unstable and worse. peft's direct prefix starts from $\mathcal{N}(0, 1)$, far from any real
# key or value; the MLP's output starts near zero. The direct prefix gets a 10x larger learning
# rate (1e-2 vs 1e-3) since nothing amplifies its updates.

# %%
abl_ds = data.tokenize_causal(data.load_e2e("train", n=gen_cfg["n_ablation"], seed=seed), tok, data.e2e_example,
                              max_length=192)
ablation = {}
for n in gen_cfg["lengths"]:
    model, hist = fit(n, True, abl_ds, f"ablation: n={n}, MLP")
    ablation[(n, True)] = dict(loss=evaluate_loss(model, test_loader), hist=hist)
model, hist = fit(n_prefix, False, abl_ds, f"ablation: n={n_prefix}, direct")
ablation[(n_prefix, False)] = dict(loss=evaluate_loss(model, test_loader), hist=hist)
del model
for (n, projection), r in ablation.items():
    print(f"n={n:3d} {'MLP   ' if projection else 'direct'}: test loss {r['loss']:.3f} after {len(r['hist'].step)} steps")

fig, axes = plt.subplots(1, 2, figsize=(10, 3))
axes[0].plot(gen_cfg["lengths"], [ablation[(n, True)]["loss"] for n in gen_cfg["lengths"]], "o-")
axes[0].axhline(zero_shot_loss, ls=":", color="gray", label="zero-shot")
axes[0].set(xlabel="prefix length n", ylabel="E2E test loss", title="prefix length"); axes[0].legend()
ablation[(n_prefix, True)]["hist"].plot(axes[1], label="with MLP (eq. 5)")
ablation[(n_prefix, False)]["hist"].plot(axes[1], label="direct P_θ")
axes[1].set_title(f"reparameterisation, n={n_prefix}")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## Paper vs. ours

# %%
baseline = load_results("01_full_finetuning", "results")   # the committed run of notebook 01
same_profile = baseline["profile"] == run.profile
ft = baseline["metrics"]["e2e"]
lora_path = Path("results/02_lora.json")
lora = load_results("02_lora", "results") if lora_path.exists() else None
lora_row = (f"{lora['metrics']['e2e']['bleu']:.1f} BLEU, test loss {lora['metrics']['e2e']['test_loss']:.3f} "
            f"(notebook 02, {lora['profile']} profile, {lora['metrics']['e2e']['trainable_params']:,d} params)"
            if lora else "not available (notebook 02 has no committed results yet)")
display(Markdown(f"""
| E2E (test set) | paper (GPT-2 Medium) | ours ({run.profile} profile, {run.device}) |
|---|---|---|
| prefix tuning | 69.7 BLEU, 0.35M params (0.1%) | {bleu:.1f} BLEU, test loss {test_loss:.3f}, {trainable_after:,d} params kept ({100 * trainable_after / total:.3f}%), {len(prefix_hist.step)} steps |
| full fine-tuning | 68.2 BLEU, 354.9M params | {ft['bleu_after']:.1f} BLEU, test loss {ft['eval_loss_after']:.3f} (notebook 01, {baseline['profile']} profile, {ft['steps']} steps) |
| LoRA | 70.4 BLEU (LoRA paper) | same budget (r=2, {lora_params:,d} params, same steps): {lora_bleu:.1f} BLEU, test loss {lora_loss:.3f}; r=8: {lora_row} |
| zero-shot | | {ft['bleu_before']:.1f} BLEU (notebook 01), test loss {zero_shot_loss:.3f} |
| best prefix length | ~10 (table-to-text) | {min(gen_cfg['lengths'], key=lambda n: ablation[(n, True)]['loss'])} of {list(gen_cfg['lengths'])} (by test loss, {len(ablation[(n_prefix, True)]['hist'].step)} steps) |
| without the MLP | unstable, lower | test loss {ablation[(n_prefix, False)]['loss']:.3f} vs {ablation[(n_prefix, True)]['loss']:.3f} with it |
| ours = peft (logits, grads, 5 steps, generation) | | {all(c['report'].passed and c['same_tokens'] for c in checks.values())} (with and without the MLP) |
"""))

# %% [markdown]
# The paper's BLEU comes from 10 epochs over 42k E2E training pairs with beam search; ours from a few
# dozen greedy-decoded steps on CPU, so only the direction carries over. The E2E numbers in the
# first three rows of the paper column are from the LoRA paper's table, which re-ran prefix tuning
# (see `/work/shared/research/methods.md` §3.2; METEOR/NIST columns there are from memory).
#
# ## Exercises
#
# 1. Initialise the prefix from the keys and values of a real instruction, as in section 1 (the
#    paper's "real words" init), and train it directly, without the MLP. Does it close the gap to
#    the MLP run?
# 2. Change the MLP's hidden width (`encoder_hidden_size`, the paper uses 512 for GPT-2) and the
#    learning rate. Which matters more in a short run?
# 3. Prefix tuning spends its parameters at every layer; prompt tuning (notebook 08) only at the
#    input. Train prompt tuning with the same number of parameters on E2E and compare.
# 4. Measure generation speed with and without the prefix: the cache grows by n per layer.

# %%
claims = {
    "a_real_texts_cache_is_a_prefix": prefix_is_cache,
    "prefix_matches_peft_logits_grads_and_5_steps": checks[False]["report"].passed,
    "prefix_with_projection_matches_peft": checks[True]["report"].passed,
    "greedy_generation_matches_peft": checks[False]["same_tokens"] and checks[True]["same_tokens"],
    "folded_prefix_gives_same_logits": fold_diff < 1e-5,
    "folded_prefix_under_0_1_percent_of_smollm2": trainable_after / total < 0.001,
}
if run.profile != "smoke":  # claims about what training learned need more than a few steps
    claims["prefix_e2e_test_loss_below_zero_shot"] = test_loss < zero_shot_loss
    claims["prefix_bleu_above_zero_shot"] = same_profile and bleu > ft["bleu_before"]
    claims["prefix_and_same_budget_lora_both_beat_zero_shot_loss"] = max(test_loss, lora_loss) < zero_shot_loss
    claims["mlp_reparameterisation_beats_direct_prefix"] = ablation[(n_prefix, True)]["loss"] < ablation[(n_prefix, False)]["loss"]
run.save(
    metrics={"e2e": {"bleu": bleu, "test_loss": test_loss, "zero_shot_test_loss": zero_shot_loss,
                     "trainable_params_training": trainable_during, "trainable_params_kept": trainable_after,
                     "steps": len(prefix_hist.step), "tokens_per_s": prefix_hist.tokens_per_s,
                     "full_finetuning_bleu": ft["bleu_after"],
                     "lora_same_budget": {"bleu": lora_bleu, "test_loss": lora_loss, "trainable_params": lora_params}, "lora_bleu": lora["metrics"]["e2e"]["bleu"] if lora else None},
             "ablation_test_loss": {f"n{n}_{'mlp' if p else 'direct'}": r["loss"] for (n, p), r in ablation.items()},
             "equivalence": {f"projection_{p}": {k: {"max_abs": d.abs, "max_rel": d.rel} for k, d in c["report"].diffs.items()}
                             for p, c in checks.items()},
             "fold_max_diff": fold_diff, "baseline_profile": baseline["profile"]},
    claims=claims,
)

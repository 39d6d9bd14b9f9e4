# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · Overview: solutions to the exercises

# %% tags=["parameters"]
profile = "auto"
seed = 0
results_dir = "../results"

# %%
import torch

import peft_from_scratch as pfs   # first: it quiets tqdm.auto's warning
from peft_from_scratch import core, data, models
from peft_from_scratch.notebook import start

run = start("00_overview_solutions", profile, seed, results_dir)
smol, tok = models.load_model(models.SMOLLM2)

# %% [markdown]
# ## 1. LoRA's parameter count from the shapes
#
# A rank-r pair (A: r x d_in, B: d_out x r) has r (d_in + d_out) entries. In SmolLM2 `q_proj` maps
# 576 -> 576 and `v_proj` 576 -> 192 (3 key/value heads of 64), in each of 30 layers.

# %%
c = smol.config
r, head_dim = 8, c.hidden_size // c.num_attention_heads
by_hand = c.num_hidden_layers * r * ((c.hidden_size + c.hidden_size) + (c.hidden_size + c.num_key_value_heads * head_dim))
pfs.add_adapter(smol, pfs.LoRAConfig(r=r, alpha=16, target_modules=["q_proj", "v_proj"]))
counted = core.count_parameters(smol)[0]
print(f"by hand: 30 x 8 x ((576 + 576) + (576 + 192)) = {by_hand:,d}; counted: {counted:,d}")
run.check("lora_count_by_hand_equals_count_parameters", by_hand == counted)
core.remove_adapter(smol)

# %% [markdown]
# ## 2. A masked GSM8K example
#
# The end-of-turn token `<|im_end|>` is part of the response: the model must learn to *stop* after
# its answer, and it only learns what carries a label.

# %%
prompt, response = data.gsm8k_example(data.load_gsm8k("train", n=1, seed=seed)[0])
ex = data.format_chat(tok, prompt, response, max_length=512)
ids, labels = torch.tensor(ex["input_ids"]), torch.tensor(ex["labels"])
print("masked (the prompt):", repr(tok.decode(ids[labels == -100])[-120:]))
print("trained (the response):", repr(tok.decode(ids[labels != -100])[-120:]))
run.check("the_last_trained_token_is_end_of_turn", tok.convert_ids_to_tokens(int(ids[labels != -100][-1])) == "<|im_end|>")

# %%
_ = run.save(metrics={"lora_params_q_v_r8": counted})

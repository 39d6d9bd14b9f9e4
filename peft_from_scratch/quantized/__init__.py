"""Quantized methods: a compressed storage format for the frozen base, and adapters built on it.

* ``nf4``: NF4/FP4/Int4 block-wise quantization and double quantization, bit-exact with
  bitsandbytes (Dettmers et al. 2023).
* ``linear4bit``: ``Linear4bit``, the 4-bit layer on that format; ``quantize_model``; checkpoints.
* ``intn``: group-wise asymmetric INT-b quantization (GPTQ's round-to-nearest quantizer), ``LinearIntN``.
* ``qa_lora``: QA-LoRA, a LoRA whose A reads the group-pooled input, so that it merges into the zeros
  of the INT-b base and the merged model stays INT-b (Xu et al. 2023), ``QALoRAConfig``, ``export_intn``.
* ``qlora``: ``prepare_qlora``, the recipe: an NF4 base, LoRA on every linear layer, gradient
  checkpointing (and ``optim.PagedAdamW``).
"""
from . import nf4
from .linear4bit import Linear4bit, load_quantized, model_nbytes, quantize_model, save_quantized
from .intn import LinearIntN, quantize_groupwise
from .qa_lora import QALoRAConfig, export_intn
from .qlora import is_checkpointing, is_quantized, peft_style_parameter_count, prepare_qlora

__all__ = ["nf4", "Linear4bit", "quantize_model", "save_quantized", "load_quantized", "model_nbytes",
           "LinearIntN", "quantize_groupwise", "QALoRAConfig", "export_intn", "prepare_qlora", "is_quantized", "is_checkpointing", "peft_style_parameter_count"]

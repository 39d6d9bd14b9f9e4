"""Reparameterized methods: a new parameterisation of the update ΔW of existing weights.

* ``lora``: ΔW = (alpha/r) B A (Hu et al. 2021), ``LoRAConfig``.
* ``dora``: W' = m (W0 + ΔW) / ||W0 + ΔW||_c, a declared variant of LoRA (Liu et al. 2024), ``DoRAConfig``.
* ``rosa``: ΔW = (alpha/r) B A + S with S sparse (Nikdan et al. 2024), ``RoSAConfig``.
"""
from .dora import DoRA, DoRAConfig
from .lora import LoRAConfig, LoRALinear, LoRAVariant
from .rosa import RoSAConfig, RoSALinear

__all__ = ["LoRAConfig", "LoRALinear", "LoRAVariant", "DoRA", "DoRAConfig", "RoSAConfig", "RoSALinear"]

"""Optimizers and training steps that update full parameters within a small memory.

Each removes a different part of what full fine-tuning with AdamW holds (weights, gradients,
optimizer state, activations; ``training.memory.measure_step`` measures the parts):

* ``paged_adamw``: ``PagedAdamW``, AdamW with its states paged to CPU memory (QLoRA, Dettmers et al. 2023);
* ``lomo``: ``LomoStep``, SGD fused into the backward pass, no stored gradients, no state (Lv et al. 2023);
* ``adalomo``: ``AdaLomoStep``, LOMO's fused backward with a factored adaptive learning rate (Lv et al. 2023b);
* ``galore``: ``GaLoreAdamW``, Adam's moments in a low-rank projection of each matrix's gradient (Zhao et al. 2024);
* ``flora``: ``Flora``, Adafactor with a momentum compressed by resampled random projections, and
  ``FloraAccumulationStep``, gradient accumulation in the compressed space (Hao et al. 2024);
* ``mezo``: ``MeZOStep``, zeroth-order SGD from two forward passes, z regenerated from a seed (Malladi et al. 2023).

They plug into the one training loop: an optimizer through ``train(..., make_optimizer=...)``, a
step that is not "backward, then optimizer.step()" through ``train(..., step=...)`` (``core.step``).
"""
from .lomo import LomoStep                                  # first: adalomo declares it as its parent
from .adalomo import AdaLomoReference, AdaLomoStep
from .flora import Flora, FloraAccumulationStep, make_flora
from .galore import GaLoreAdamW, make_galore
from .mezo import OFFICIAL_NO_DECAY, MeZOStep, official_mezo
from .paged_adamw import PagedAdamW, make_paged_adamw, optimizer_state_bytes

__all__ = ["PagedAdamW", "make_paged_adamw", "optimizer_state_bytes", "LomoStep", "AdaLomoStep", "AdaLomoReference",
           "GaLoreAdamW", "make_galore", "Flora", "make_flora", "FloraAccumulationStep", "MeZOStep", "OFFICIAL_NO_DECAY",
           "official_mezo"]

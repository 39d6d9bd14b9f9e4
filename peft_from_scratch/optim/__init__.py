"""Optimizers and training steps that update full parameters within a small memory.

* ``paged_adamw``: ``PagedAdamW``, AdamW with its states paged to CPU memory (QLoRA, Dettmers et al. 2023).

They plug into the one training loop: an optimizer through ``train(..., make_optimizer=...)``, a
step that is not "backward, then optimizer.step()" through ``train(..., step=...)``
(``training.steps``).
"""
from .paged_adamw import PagedAdamW, make_paged_adamw, optimizer_state_bytes

__all__ = ["PagedAdamW", "make_paged_adamw", "optimizer_state_bytes"]

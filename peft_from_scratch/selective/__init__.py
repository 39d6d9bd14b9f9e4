"""Selective methods: a chosen subset of the network's own weights is trained.

* ``masked_gradient``: ``MaskedGradientStep``, a burn-in that scores every weight by its mean squared
  gradient, then training through the top-share mask (Child-Tuning_D, Xu et al. 2021b).
"""
from .masked_gradient import MaskedGradientStep

__all__ = ["MaskedGradientStep"]

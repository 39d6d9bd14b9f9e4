"""The one training loop: ``train(model, loader, TrainConfig(...), step=...)``.

What each step does to the weights is a ``core.step.Step``: ``BackpropStep`` by default,
``selective.MaskedGradientStep`` for training through a mask, or any step of the same shape.
"""
from ..core.step import BackpropStep, Step, StepResult, make_adamw
from .loop import History, TrainConfig, evaluate_loss, lr_multiplier, set_progress, set_seed, train

__all__ = ["set_progress", "train", "TrainConfig", "History", "evaluate_loss", "set_seed", "lr_multiplier", "make_adamw",
           "Step", "StepResult", "BackpropStep"]

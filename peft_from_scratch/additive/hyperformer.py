"""HyperFormer++ (Karimi Mahabadi, Ruder, Dehghani & Henderson 2021, "Parameter-efficient Multi-task
Fine-tuning for Transformers via Shared Hypernetworks", arXiv 2106.04489).

One hypernetwork, shared by every layer and every task, *generates* the weights of every adapter
from a conditioning vector. For task τ, layer l and block b (feed-forward or self-attention):

    I_{τ,l,b} = LN( h_I([z_τ ; e_l ; e_b]) )                 the task, layer and block embeddings (t each)
    D = W_D I,  b_D = W_bD I,  U = W_U I,  b_U = W_bU I     the adapter's weights: m x d, m, d x m, d
    γ = W_γ I,  β = W_β I                                   a task-conditioned LayerNorm
    A(y) = y + LN_{γ,β}( U f(D y + b_D) + b_U )             the adapter, in Houlsby's places

h_I is Linear(3t, h) -> ReLU -> Linear(h, t) and LN a LayerNorm (eps 1e-6) with its own weights;
every W above is a Linear(t, .) with its own bias. Only z_τ is per task (t numbers): adding a task
costs 64 parameters. The adapter sits where Houlsby's does (after the attention output projection
and after the feed-forward output projection, before the residual add), so the generated LayerNorm
is *inside* the adapter, and the skip connection around it.

Read from the official code (rabeehk/hyperformer, ``adapters/adapter_modeling.py``
``AdapterLayersOneHyperNetController``, ``adapter_utils.py``, ``adapter_controller.py``
``MetaLayersAdapterController``; ``configs/hyperformer++.json``): t = 64, h = 128, m = d / 32,
f = gelu_new, block ids 0 = feed-forward and 1 = self-attention, z_τ ~ N(0, 1), every other Linear
N(0, 1e-2^2) with zero bias. So the generated γ is about N(0, 0.08^2) (I is layer-normed, |I| ~ 8),
not 1: the adapter's output is scaled down, but nothing is zero, and the branch is a layer-normed
vector of size about |γ| per feature. Beside T5's residual stream that is small; in a post-norm BERT,
whose sub-layer outputs are normalised to unit scale, it is not: a fresh HyperFormer++ MiniLM's last
hidden states move by about half their size, a fresh Houlsby adapter's by about 1% (notebook 19
and its solutions measure both). Its released ``hyperformer.json`` is not the paper's per-layer variant
(``unique_hyper_net`` shares the generators across layers, with separate ones per block type): we
implement HyperFormer++, which the released ``hyperformer++.json`` does build.

**The task of a batch.** A call passes it as ``model(..., task="rte")`` (the multi-task loader puts
it in every batch; one task per batch, as the official sampler); without one the hypernetwork uses
its active task, ``default_task`` at the start and changed by ``set_task(model, name)``. An unknown
task is a ``ValueError`` naming the known ones, raised before anything runs.

**Several processes.** A batch holds one task, so the other tasks' z get no gradient in that step;
DDP (``TrainConfig(parallel="ddp")``) refuses parameters that receive none, and the library's DDP
wrapper does not set ``find_unused_parameters``: train a multi-task HyperFormer in one process (the
distributed tests run it with one task).

Trainable: the hypernetwork (its embeddings, h_I, LN and the generators), the per-task z_τ, and, as
the paper (``unfreeze_layer_norms``), every LayerNorm of the model. The official T5 runs text to
text; on a classifier (MiniLM) the head trains too, shared by the tasks, whose inputs carry a task
prefix as the official inputs do.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core import AdapterConfig, AdapterLayer, ModelAdapter, register
from ..core.adapter import install
from ..core.targets import check_wraps, find_targets
from .bottleneck import NON_LINEARITIES, check_non_linearity, float_dtype
from .houlsby import LAYER_NORMS, placement_targets

FEED_FORWARD, SELF_ATTENTION = 0, 1          # the official block-type ids


def linear(d_in: int, d_out: int, dtype=None, device=None) -> nn.Linear:
    """The official init of every hypernetwork layer: weights N(0, 1e-2^2), bias zero."""
    layer = nn.Linear(d_in, d_out, dtype=dtype, device=device)
    nn.init.normal_(layer.weight, std=1e-2)
    nn.init.zeros_(layer.bias)
    return layer


class Generated(NamedTuple):
    down: torch.Tensor        # D, m x d
    down_bias: torch.Tensor   # b_D, m
    up: torch.Tensor          # U, d x m
    up_bias: torch.Tensor     # b_U, d
    gamma: torch.Tensor       # the conditional LayerNorm's weight, d
    beta: torch.Tensor        # and bias, d


class HyperNetwork(ModelAdapter):
    """z_τ for every task, e_l, e_b, h_I, LN and the generators: ``model.hypernet``."""
    attr: ClassVar[str] = "hypernet"

    def __init__(self, tasks: list[str], num_layers: int, d: int, m: int, t: int = 64, hidden: int = 128,
                 default_task: str | None = None, dtype=None, device=None):
        super().__init__()
        self.d, self.m, self.task_names = d, m, list(tasks)
        self.task_embeddings = nn.ParameterDict(
            {task: nn.Parameter(torch.randn(t, dtype=dtype, device=device)) for task in tasks})     # z_τ
        self.layer_embeddings = nn.Embedding(num_layers, t, dtype=dtype, device=device)          # e_l
        self.block_embeddings = nn.Embedding(2, t, dtype=dtype, device=device)                   # e_b
        self.task_net = nn.Sequential(linear(3 * t, hidden, dtype, device), nn.ReLU(), linear(hidden, t, dtype, device))
        self.norm = nn.LayerNorm(t, eps=1e-6, dtype=dtype, device=device)
        self.generators = nn.ModuleDict({name: linear(t, size, dtype, device) for name, size in (
            ("down", m * d), ("down_bias", m), ("up", d * m), ("up_bias", d), ("gamma", d), ("beta", d))})
        self.active = default_task

    @property
    def tasks(self) -> list[str]:
        return self.task_names

    def check_task(self, task) -> str:
        if task is None:
            raise ValueError(f"this HyperFormer model needs the task of the batch: model(..., task=name) or "
                             f"set_task(model, name); its tasks: {self.tasks}")
        if task not in self.task_embeddings:
            raise ValueError(f"unknown task {task!r}: this hypernetwork was built for {self.tasks}")
        return task

    def pre_forward(self, model, args, kwargs):
        kwargs = dict(kwargs)
        self.active = self.check_task(kwargs.pop("task", None) or self.active)
        return args, kwargs

    def condition(self, layer: int, block: int) -> torch.Tensor:
        """I_{τ,l,b} = LN(h_I([z_τ; e_l; e_b])) for the active task."""
        z = self.task_embeddings[self.check_task(self.active)]
        e = torch.cat([z, self.layer_embeddings.weight[layer], self.block_embeddings.weight[block]])
        return self.norm(self.task_net(e))

    def generate(self, layer: int, block: int) -> Generated:
        I, g = self.condition(layer, block), self.generators
        return Generated(g["down"](I).view(self.m, self.d), g["down_bias"](I), g["up"](I).view(self.d, self.m),
                         g["up_bias"](I), g["gamma"](I), g["beta"](I))


def set_task(model: nn.Module, task: str) -> None:
    """Make ``task`` the one calls without ``task=`` use: before an evaluation loop, or before
    ``generate`` (which passes no ``task=``). A call with ``task=`` makes that task the active one too."""
    model.hypernet.active = model.hypernet.check_task(task)


class HyperAdapterLinear(AdapterLayer):
    """y -> y + LN_{γ,β}(U f(D y + b_D) + b_U) with y = base_layer(x) and every weight generated for
    this (layer, block) and the active task."""

    def __init__(self, base_layer: nn.Linear, hypernet: HyperNetwork, layer: int, block: int,
                 non_linearity: str = "gelu_new"):
        super().__init__(base_layer)
        self.hypernet = [hypernet]     # a plain list: the shared hypernetwork is stored once, as model.hypernet
        self.layer, self.block, self.f = layer, block, NON_LINEARITIES[non_linearity]
        self.train(base_layer.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        w = self.hypernet[0].generate(self.layer, self.block)
        z = F.linear(self.f(F.linear(y.to(w.up.dtype), w.down, w.down_bias)), w.up, w.up_bias)
        return y + F.layer_norm(z, (z.shape[-1],), w.gamma, w.beta).to(y.dtype)


@register("hyperformer", family="additive", paper="mahabadi2021parameterefficient", parent="houlsby")
@dataclass
class HyperFormerConfig(AdapterConfig):
    """HyperFormer++: every adapter generated by one hypernetwork from task, layer and block embeddings.

    Args:
        tasks: the task names (identifiers: letters, digits, underscores), each with its embedding z_τ.
        default_task: the task a call without ``task=`` uses until ``set_task`` changes it.
        reduction_factor: m = d / reduction_factor (the official 32).
        task_embedding_dim: t (64); hidden_dim: h, the width of h_I (128).
        non_linearity: f ("gelu_new", the official).
        train_layer_norms: also train every layer norm of the model (the paper's recipe).
        target_modules: None picks Houlsby's places (the attention and feed-forward output projections).
    """
    target_modules: list[str] | str | None = None
    tasks: list[str] = field(default_factory=list)
    default_task: str | None = None
    reduction_factor: int = 32
    task_embedding_dim: int = 64
    hidden_dim: int = 128
    non_linearity: str = "gelu_new"
    train_layer_norms: bool = True

    wraps: ClassVar[tuple] = (nn.Linear,)
    identity_at_init: ClassVar = ("not the identity: the official init generates a LayerNorm weight of about "
                                  "N(0, 0.08^2), so each adapter adds a layer-normed branch of that size, which in a "
                                  "post-norm BERT is not small (the module docstring)")
    mergeable: ClassVar = "the adapter is non-linear and its weights depend on the task: nothing to fold in"

    def __post_init__(self):
        self.tasks = list(self.tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be a non-empty list of distinct names, got {self.tasks!r}")
        bad = [t for t in self.tasks if not (isinstance(t, str) and re.fullmatch(r"[A-Za-z_]\w*", t))]
        if bad:
            raise ValueError(f"task names must be identifiers (letters, digits, underscores; they name parameters), "
                             f"got {bad}")
        if self.default_task is not None and self.default_task not in self.tasks:
            raise ValueError(f"default_task {self.default_task!r} is not one of the tasks {self.tasks}")
        for name in ("reduction_factor", "task_embedding_dim", "hidden_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        check_non_linearity(self.non_linearity)
        self.extra_trainable = list(self.extra_trainable)
        if self.train_layer_norms and LAYER_NORMS not in self.extra_trainable:
            self.extra_trainable.append(LAYER_NORMS)

    def inject(self, model: nn.Module) -> None:
        targets = find_targets(model, placement_targets(model, "houlsby", self.target_modules))
        check_wraps(model, targets, self.wraps, self.method)
        widths = {model.get_submodule(n).out_features for n in targets}
        d = widths.pop()
        m = d // self.reduction_factor
        if widths or d % self.reduction_factor or m == 0:
            raise ValueError(f"HyperFormer generates one adapter shape for every layer: the targets must share one "
                             f"width d dividing by reduction_factor={self.reduction_factor} (got widths "
                             f"{sorted(widths | {d})})")
        first = model.get_submodule(targets[0])
        hypernet = HyperNetwork(self.tasks, model.config.num_hidden_layers, d, m, self.task_embedding_dim,
                                self.hidden_dim, self.default_task, float_dtype(first), first.weight.device)
        layers = {}
        for name in targets:      # every layer built before the model is touched
            index = re.search(r"layers?\.(\d+)\.", name)
            if index is None:
                raise ValueError(f"{name}: no layer index in the name (HyperFormer embeds the layer id)")
            block = SELF_ATTENTION if re.search(r"attention|self_attn", name) else FEED_FORWARD
            layers[name] = HyperAdapterLinear(model.get_submodule(name), hypernet, int(index.group(1)), block,
                                              self.non_linearity)
        install(model, layers, shared=hypernet)

    def make_layer(self, name: str, module: nn.Module) -> AdapterLayer:
        raise NotImplementedError("HyperFormer's layers share one hypernetwork: add them all with core.add_adapter")

    @classmethod
    def examples(cls):
        return [("bert", cls(tasks=["sst2", "rte"], default_task="sst2", reduction_factor=8, task_embedding_dim=8,
                             hidden_dim=16, modules_to_save=["classifier"])),
                ("bert", cls(tasks=["mrpc"], default_task="mrpc", reduction_factor=4, non_linearity="relu",
                             train_layer_norms=False, modules_to_save=["classifier"])),
                ("llama", cls(tasks=["arc"], default_task="arc", reduction_factor=8, task_embedding_dim=8,
                              hidden_dim=16))]   # one task: see "Several processes" in the module docstring

    @classmethod
    def invalid_examples(cls):
        return [{"tasks": []}, {"tasks": ["a", "a"]}, {"tasks": ["sst-2"]}, {"tasks": ["a"], "default_task": "b"},
                {"tasks": ["a"], "reduction_factor": 0}, {"tasks": ["a"], "non_linearity": "softmax"}]


def parameter_count(d: int, m: int, num_layers: int, tasks: int, t: int = 64, hidden: int = 128) -> int:
    """The hypernetwork's parameters (layer norms and head not counted): the embeddings (tasks + L + 2) t,
    h_I (3t h + h + h t + t), its LayerNorm 2t, and the generators (t + 1)(2md + m + 3d)."""
    return (tasks + num_layers + 2) * t + 3 * t * hidden + hidden + hidden * t + t + 2 * t + (t + 1) * (2 * m * d + m + 3 * d)

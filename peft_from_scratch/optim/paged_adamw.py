"""A paged AdamW: the optimizer states live in CPU memory and visit the GPU one parameter at a time.

QLoRA (Dettmers et al. 2023, section 3) pages the Adam states out of GPU memory so that a memory
spike does not run out of it; ``PagedAdamW`` is the readable version of that idea (its docstring
says how it differs from bitsandbytes' unified-memory optimizers).
"""
from __future__ import annotations

import torch

from ..core import register

@register("paged_adamw", family="optimizers", kind="optimizer", paper="dettmers2023qlora")
class PagedAdamW(torch.optim.Optimizer):
    """AdamW whose states (exp_avg m, exp_avg_sq v) live in CPU memory, paged to the GPU per parameter.

    The update is torch's AdamW (Loshchilov & Hutter 2019, Algorithm 2) with bias correction, written
    in the same operations and order as ``torch.optim.AdamW``'s single-tensor path, so the results are
    bit-identical (``foreach=False``, no amsgrad). At step t, with gradient g and parameter p:

        p <- p * (1 - lr * weight_decay)                      (decoupled weight decay)
        m <- m + (1 - beta1) (g - m)                          (= beta1 m + (1 - beta1) g, a lerp)
        v <- beta2 v + (1 - beta2) g^2
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    Paging: for each parameter in turn, m and v are copied to the parameter's device, updated there,
    and copied back (host memory is pinned when CUDA is available, so both copies are asynchronous
    DMA; one synchronisation at the end of ``step``). The device then holds the states of only one
    parameter at a time: 2 x 4 bytes x (largest parameter) instead of 2 x 4 bytes x (all trainable
    parameters), at the price of moving 16 bytes per trainable parameter over PCIe per step.

    What this is and is not. bitsandbytes' paged optimizers (what the paper uses) allocate the states
    in CUDA *unified memory*: they stay on the GPU and the driver evicts pages to CPU RAM only when
    the GPU runs out, so the usual step costs nothing extra. Ours always pages, which is simpler to
    read and has a fixed device footprint, but costs the transfer at every step. On CPU both copies
    are no-ops (the state already lives where the parameter does): there the class is plain AdamW,
    and the CPU tests prove only the numerics; the memory saving exists only on a GPU and is measured
    with ``optimizer_state_bytes(opt, on_device=True)`` and ``torch.cuda.memory_allocated``.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, pin_memory: bool | None = None):
        if not lr >= 0.0 or not eps >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got lr={lr}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory

    def _host_zeros(self, p: torch.Tensor) -> torch.Tensor:
        return torch.zeros(p.shape, dtype=p.dtype, device="cpu", pin_memory=self.pin_memory)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        moved_back = False
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PagedAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:   # lazy init, as torch: a CPU float32 step counter, zero moments (on the host)
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = self._host_zeros(p)
                    state["exp_avg_sq"] = self._host_zeros(p)
                host_m, host_v = state["exp_avg"], state["exp_avg_sq"]
                m = host_m.to(p.device, non_blocking=True)    # page in (the same tensor when p is on CPU)
                v = host_v.to(p.device, non_blocking=True)
                grad = p.grad

                state["step"] += 1
                if wd != 0:
                    p.mul_(1 - lr * wd)
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step = state["step"].item()
                bias_correction1 = 1 - beta1 ** step
                bias_correction2 = 1 - beta2 ** step
                step_size = lr / bias_correction1
                denom = (v.sqrt() / bias_correction2 ** 0.5).add_(eps)
                p.addcdiv_(m, denom, value=-step_size)

                if m is not host_m:                            # page out
                    host_m.copy_(m, non_blocking=True)
                    host_v.copy_(v, non_blocking=True)
                    moved_back = True
        if moved_back and torch.cuda.is_available():
            torch.cuda.synchronize()   # the host copies must have landed before anyone reads the state
        return loss


def make_paged_adamw(params, config) -> PagedAdamW:
    """``make_optimizer(params, config)`` for ``training.train``: PagedAdamW with the config's lr, betas, eps
    and weight decay (``train(..., make_optimizer=make_paged_adamw)``)."""
    return PagedAdamW(params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, on_device: bool = False) -> int:
    """Bytes of the optimizer's state tensors; with ``on_device``, only those resident on an accelerator
    (not CPU). For ``torch.optim.AdamW`` on CUDA that is 8 bytes per trainable float32 parameter; for
    ``PagedAdamW`` it is 0 between steps (only the step counter and moments of one parameter visit the
    device during a step, and are freed after)."""
    total = 0
    for state in optimizer.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor) and (not on_device or t.device.type != "cpu"):
                total += t.numel() * t.element_size()
    return total

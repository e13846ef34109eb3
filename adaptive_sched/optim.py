"""Optimizers by name (torch's own, or any torch-optimizer name), LR warmup and the EMA of weights."""
from __future__ import annotations

import torch

from adaptive_sched.errors import UsageError

TORCH_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def build_optimizer(name: str, params, lr: float, weight_decay: float = 0.0, device_type: str = "cpu"):
    """AdamW (fused on CUDA), Adam, SGD, or any torch-optimizer optimizer by name (lamb, adabelief, ...)."""
    key = name.lower()
    if key in TORCH_OPTIMIZERS:
        kwargs = {"lr": lr, "weight_decay": weight_decay}
        if key in ("adamw", "adam") and device_type == "cuda":
            kwargs["fused"] = True
        if key == "sgd":
            kwargs["momentum"] = 0.9
        return TORCH_OPTIMIZERS[key](params, **kwargs)
    try:
        import torch_optimizer
    except ImportError:
        raise UsageError(f"unknown optimizer {name!r}; choose one of {', '.join(TORCH_OPTIMIZERS)}, or install "
                         f"torch-optimizer (pip install torch-optimizer) for lamb, adabelief, radam, ...") from None
    try:
        factory = torch_optimizer.get(key)
    except ValueError:
        valid = sorted(set(TORCH_OPTIMIZERS) | set(getattr(torch_optimizer, "_NAME_OPTIM_MAP", {})))
        raise UsageError(f"unknown optimizer {name!r}; choose one of: {', '.join(valid)}") from None
    return factory(params, lr=lr, weight_decay=weight_decay)


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor of its parameter's shape the parameter's memory layout: load_state_dict
    keeps the saved strides (a run resumed with channels_last changed), and fused AdamW on CUDA requires equal ones."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def warmup_lr(base_lr: float, step: int, warmup: int) -> float:
    """Linear warmup: lr(step) = base_lr · min(1, (step + 1)/warmup)."""
    return base_lr if warmup <= 0 else base_lr * min(1.0, (step + 1) / warmup)


class EMA:
    """Exponential moving average of parameters, θ_ema ← θ_ema + (1 − d)(θ − θ_ema), with d ramped up early.

    The decay at step k is min(decay, (1 + k)/(10 + k)), so early averages are not dominated by the init.
    Updated with torch._foreach_lerp_ (one fused launch per dtype/device, no host sync).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.live = [p.detach() for p in model.parameters()]   # views of the trained weights, updated in place
        self.params = [p.clone() for p in self.live]
        self.buffers = [b.detach().clone() for b in model.buffers()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int, stepped: torch.Tensor | None = None) -> None:
        """One EMA step at `step`. `stepped` is a fused optimizer's verdict on the device (a 0-d bool tensor, False
        when it skipped a non-finite step): the average then moves by (1 − d)·stepped, so it stays as it is on a
        skipped step, as on the plain path (which does not call update then), without a host sync."""
        weight = 1.0 - min(self.decay, (1 + step) / (10 + step))
        if stepped is None:
            torch._foreach_lerp_(self.params, self.live, weight)
        elif self.params:              # θ_ema += w·(θ − θ_ema), w a device tensor (_foreach_lerp_ takes a number)
            delta = torch._foreach_sub(self.live, self.params)
            torch._foreach_mul_(delta, torch.where(stepped, weight, 0.0).to(self.params[0].device))
            torch._foreach_add_(self.params, delta)
        for mine, theirs in zip(self.buffers, model.buffers()):
            mine.copy_(theirs if stepped is None else torch.where(stepped, theirs, mine))

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for target, value in zip(model.parameters(), self.params):
            target.copy_(value)
        for target, value in zip(model.buffers(), self.buffers):
            target.copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "params": self.params, "buffers": self.buffers}

    def load_state_dict(self, state: dict) -> None:
        for mine, saved in zip(self.params, state["params"]):
            mine.copy_(saved)
        for mine, saved in zip(self.buffers, state["buffers"]):
            mine.copy_(saved)

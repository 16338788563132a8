"""Adam and SGD for training: torch's own fused multi-tensor kernels, driven without torch.optim.

``torch.optim.Optimizer`` imports ``torch._dynamo`` (and with it sympy and inductor) the first time
an optimizer is built or stepped: ~1 s and ~72 MiB of resident memory in every training process,
for a compiler nmtkit never uses (measured in bench/README.md, ninth session). These classes call
the same kernels ``torch.optim.Adam(fused=True)`` and ``torch.optim.SGD(fused=True)`` call
(``torch._fused_adam_``, ``torch._fused_sgd_``), so every update is bit-identical to theirs, and
keep their ``state_dict`` format, so checkpoints move freely between the two.

Adam (Kingma & Ba 2015, Algorithm 1): m_t = β1 m_{t-1} + (1 − β1) g_t, v_t = β2 v_{t-1} + (1 − β2) g_t²,
θ_t = θ_{t-1} − lr · m̂_t / (√v̂_t + ε), with m̂_t = m_t / (1 − β1^t), v̂_t = v_t / (1 − β2^t).
SGD: θ_t = θ_{t-1} − lr · g_t.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

ADAM_DEFAULTS: dict[str, Any] = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0,
                                 "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                                 "differentiable": False, "fused": True, "decoupled_weight_decay": False}
SGD_DEFAULTS: dict[str, Any] = {"lr": 1e-3, "momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False,
                                "maximize": False, "foreach": None, "differentiable": False, "fused": True}


class FusedOptimizer:
    """One parameter group, updated by one fused kernel call per step (CPU or CUDA parameters).

    ``param_groups``, ``state``, ``step``, ``zero_grad``, ``state_dict`` and ``load_state_dict``
    behave as torch.optim's; parameters without a gradient are skipped, as there.
    """

    defaults: dict[str, Any]

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float) -> None:
        params = list(params)
        if not params:
            raise ValueError("the optimizer got no parameters")
        self.param_groups: list[dict[str, Any]] = [{**self.defaults, "lr": lr, "params": params}]
        self.state: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self.param_groups[0]["params"]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        with_grad = [p for p in self.params if p.grad is not None]
        for device in {p.device for p in with_grad}:
            self._update([p for p in with_grad if p.device == device], self.param_groups[0])

    def _update(self, params: list[torch.nn.Parameter], group: dict[str, Any]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's format: per-parameter state by position, the group with positions."""
        index = {p: i for i, p in enumerate(self.params)}
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {"state": {index[p]: dict(s) for p, s in self.state.items()},
                "param_groups": [{**group, "params": list(range(len(self.params)))}]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of the torch.optim optimizer it stands for."""
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            sizes = [len(g["params"]) for g in groups]
            raise ValueError(f"optimizer state for parameter groups of sizes {sizes} does not fit this "
                             f"model's {len(self.params)} parameters")
        positions = groups[0]["params"]
        self.state = {}
        for position, saved in state_dict["state"].items():
            p = self.params[positions.index(int(position))]
            self.state[p] = {k: (v.to(p.device, torch.float32) if k == "step"
                                 else v.to(p.device, p.dtype)) for k, v in saved.items()}
        self.param_groups[0].update({k: v for k, v in groups[0].items() if k != "params"})


class Adam(FusedOptimizer):
    """torch.optim.Adam(params, lr, fused=True), without importing torch._dynamo."""

    defaults = ADAM_DEFAULTS

    def _update(self, params, group):
        for p in params:
            if p not in self.state:
                self.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                 "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        states = [self.state[p] for p in params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        beta1, beta2 = group["betas"]
        torch._fused_adam_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                           [s["exp_avg_sq"] for s in states], [], steps, amsgrad=False, lr=group["lr"],
                           beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                           maximize=False)


class SGD(FusedOptimizer):
    """torch.optim.SGD(params, lr, fused=True) (no momentum), without importing torch._dynamo."""

    defaults = SGD_DEFAULTS

    def _update(self, params, group):
        torch._fused_sgd_(params, [p.grad for p in params], [], weight_decay=group["weight_decay"], momentum=0.0,
                          lr=group["lr"], dampening=0.0, nesterov=False, maximize=False, is_first_step=False)

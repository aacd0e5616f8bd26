"""Exponential moving average of the trainable parameters (Flow-GRPO: decay 0.9 every 8 steps).

    ema = EMA(named_trainable_parameters, decay=0.9, update_interval=8)
    ...optimizer.step(); global_step += 1
    ema.update(global_step)            # averages when global_step % update_interval == 0
    with ema.swapped():                # evaluate / save with the averaged weights
        evaluate(model)

As in the reference code the decay warms up, d = min((1 + n) / (10 + n), decay) with n the
number of averaging updates so far, so early averages are not dominated by the initial weights.
The shadow copies are fp32 regardless of the parameters' dtype.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import Tensor

__all__ = ["EMA"]


class EMA:
    """EMA of named parameters: shadow <- shadow + (1 - d) (param - shadow).

    named_parameters: (name, Parameter) pairs (the trainable ones); decay in [0, 1)
    (0 makes the shadow follow the parameters); update_interval: optimizer steps per update;
    warmup: use the reference's decay warm-up (see module doc).
    """

    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]], decay: float = 0.9,
                 update_interval: int = 1, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if update_interval < 1:
            raise ValueError(f"EMA update_interval must be >= 1, got {update_interval}")
        self.parameters = dict(named_parameters)
        if not self.parameters:
            raise ValueError("EMA got no parameters")
        self.decay, self.update_interval, self.warmup = decay, update_interval, warmup
        self.shadow = {name: p.detach().float().clone() for name, p in self.parameters.items()}
        self.num_updates = 0

    def current_decay(self) -> float:
        """Decay of the next update (warmed up: min((1 + n) / (10 + n), decay))."""
        if not self.warmup:
            return self.decay
        return min((1 + self.num_updates) / (10 + self.num_updates), self.decay)

    @torch.no_grad()
    def update(self, global_step: int) -> bool:
        """Average in the current parameters if `global_step` (steps done) is a multiple of the
        interval. Returns whether an update happened."""
        if global_step % self.update_interval:
            return False
        weight = 1.0 - self.current_decay()
        for name, p in self.parameters.items():
            shadow = self.shadow[name]
            shadow.add_(p.detach().to(shadow.device, torch.float32) - shadow, alpha=weight)
        self.num_updates += 1
        return True

    @torch.no_grad()
    def copy_to_parameters(self) -> None:
        """Overwrite the parameters with the averages (e.g. before exporting the final model)."""
        for name, p in self.parameters.items():
            p.copy_(self.shadow[name].to(p.device, p.dtype))

    @contextlib.contextmanager
    def swapped(self):
        """Inside the block the parameters hold the averages; the originals are restored after."""
        backup = {name: p.detach().clone() for name, p in self.parameters.items()}
        self.copy_to_parameters()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.parameters.items():
                    p.copy_(backup[name])

    def state_dict(self) -> dict:
        return {"shadow": {k: v.clone() for k, v in self.shadow.items()}, "num_updates": self.num_updates,
                "decay": self.decay, "update_interval": self.update_interval}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        unexpected = set(state["shadow"]) - set(self.shadow)
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the parameters: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")
        for name, value in state["shadow"].items():
            self.shadow[name] = value.detach().float().clone().to(self.shadow[name].device)
        self.num_updates = int(state["num_updates"])

    def shadow_tensors(self) -> dict[str, Tensor]:
        """name -> averaged fp32 tensor."""
        return dict(self.shadow)

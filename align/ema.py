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
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

from .config import doc

__all__ = ["EMA", "DecaySchedule"]


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


@dataclass
class DecaySchedule:
    """EMA decay at optimizer step s: 0 before `delay`, then min(start + rate (s - delay), cap).

    DiffusionNFT's old policy (decay_type 1): DecaySchedule(0, 0.001, 0, 0.5); its slow one
    (decay_type 2): DecaySchedule(0, 0.0075, 75, 0.999); CRD's old snapshot (0.25, 0.005, 0, 0.999)."""

    start: float = doc(0.25, "Decay at s = delay.")
    rate: float = doc(0.005, "Increase of the decay per optimizer step.")
    delay: int = doc(0, "Optimizer steps during which the decay is 0 (the snapshot follows the weights).")
    cap: float = doc(0.999, "Upper bound of the decay (< 1).")

    def __post_init__(self):
        if self.start < 0 or self.rate < 0 or self.delay < 0 or not 0 <= self.cap < 1:
            raise ValueError("decay schedule needs start, rate, delay >= 0 and 0 <= cap < 1")

    def __call__(self, step: int) -> float:
        return 0.0 if step < self.delay else min(self.start + self.rate * (step - self.delay), self.cap)

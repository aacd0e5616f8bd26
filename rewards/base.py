"""The one reward signature, input validation and the reward registry.

Every reward is called the same way (ARCHITECTURE.md):

    out = reward(samples, prompts, **kwargs)   # -> RewardOutput(scores [B] float32, extras)

- ``samples``: float tensor in [0, 1], images ``(B, 3, H, W)`` or videos ``(B, 3, T, H, W)``.
- ``prompts``: ``list[str]`` of length B, or None for rewards that do not read text.
- ``kwargs``: per-sample metadata, by convention ``metadata=[dict, ...]`` (GenEval-style
  dicts) and ``group_ids=Tensor[B]`` (which prompt group each sample belongs to). Rewards
  ignore keyword arguments they do not use, so one call site serves every reward.
- ``scores``: NaN means "not applicable / failed" (a missing metadata line, an unparsable
  judge answer); it is counted (``RewardOutput.nan_count``), never silently turned into 0.

Writing a reward: subclass :class:`Reward`, set ``raw_range`` / ``differentiable`` /
``modalities`` and implement ``score``; or wrap a plain function with
:class:`FunctionReward`. Register it by name with :func:`register_reward`; configs then name
it (``"clip_score"``), point at it by import path (``"my_pkg.my_rewards:sharpness"``) or
give a dict with constructor arguments (see :func:`build_reward`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "RewardOutput",
    "Reward",
    "FunctionReward",
    "as_scores",
    "frames_as_images",
    "progress_bar",
    "cosine_lr",
    "register_reward",
    "build_reward",
    "build_weighted_reward",
    "registered_rewards",
]

IMAGE, VIDEO = "image", "video"
_RANK_OF = {IMAGE: 4, VIDEO: 5}
# Keyword arguments that carry one entry per sample; their length is checked against B.
PER_SAMPLE_KWARGS = ("metadata", "group_ids")


def frames_as_images(samples: Tensor) -> tuple[Tensor, int]:
    """(images [B*T, 3, H, W], T) for videos [B, 3, T, H, W], frames of a sample consecutive;
    (samples, 1) for images. Frame-wise rewards score the images, then average ``.view(-1, T).mean(1)``."""
    if samples.ndim == 5:
        return samples.transpose(1, 2).flatten(0, 1), samples.shape[2]
    return samples, 1


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True, unit: str = "steps"):
    """`samplers.progress.Progress` over ``total`` units (a rich bar on a terminal, plain flushed
    lines elsewhere; nothing when ``enabled`` is False); yields ``advance(n=1)``. Shared by the
    CLI and the training tools."""
    from samplers.progress import Progress

    with Progress(total, description, unit=unit, enabled=enabled) as bar:
        yield bar.advance


def cosine_lr(step: int, total: int, warmup: int = 0, floor: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then cosine decay from 1 to
    ``floor`` at ``total`` (for ``torch.optim.lr_scheduler.LambdaLR``). Shared by the training tools."""
    if step < warmup:
        return (step + 1) / warmup
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ----------------------------------------------------------------------------- output


def as_scores(values: Any, batch_size: int | None = None, *, name: str = "reward") -> Tensor:
    """Scores as a float32 ``[B]`` tensor; ``None`` entries (lists) become NaN.

    Accepts a tensor (its autograd graph is kept), a numpy array, or a sequence of numbers /
    None / 0-d tensors. Raises ValueError naming ``name`` if the shape is not ``[batch_size]``.
    """
    if isinstance(values, Tensor):
        scores = values.to(torch.float32)
    elif isinstance(values, np.ndarray):
        scores = torch.as_tensor(values, dtype=torch.float32)
    elif isinstance(values, (list, tuple)):
        scores = torch.tensor(
            [math.nan if v is None else float(v) for v in values], dtype=torch.float32
        )
    else:
        raise TypeError(
            f"{name}: scores must be a Tensor, numpy array or list of float|None, got {type(values).__name__}"
        )
    if scores.ndim != 1 or (batch_size is not None and scores.shape[0] != batch_size):
        expected = f"[{batch_size}]" if batch_size is not None else "[B]"
        raise ValueError(f"{name}: scores must have shape {expected}, got {list(scores.shape)}")
    return scores


@dataclass
class RewardOutput:
    """What every reward returns.

    scores: [B] float32, higher is better; NaN = not applicable / failed for that sample.
    extras: anything worth logging: per-sample tensors [B], sub-scores, counts, reasons.
    """

    scores: Tensor
    extras: dict = field(default_factory=dict)

    def __post_init__(self):
        self.scores = as_scores(self.scores)

    @property
    def nan_count(self) -> int:
        """How many samples got no score (NaN)."""
        return int(torch.isnan(self.scores.detach()).sum())


# ----------------------------------------------------------------------------- reward base


class Reward:
    """Base class of every reward: validates inputs, calls ``score``, checks the output.

    Subclasses implement ``score(samples, prompts, **kwargs)`` returning a RewardOutput, a
    ``[B]`` tensor or a list of float|None, and declare (class attributes or in __init__):

    name:              label used in logs and in compositions' extras.
    raw_range:         ``(low, high)`` of the raw score (``(-inf, inf)`` if unbounded); every
                       reward documents its scale in its docstring.
    differentiable:    True if gradients flow from scores to samples (reward-gradient methods,
                       guided sampling). Non-differentiable rewards are run under no_grad.
    higher_is_better:  always True for the scores returned (negate inside a reward if needed).
    modalities:        which inputs it accepts: ("image",), ("video",) or both.
    requires_prompts:  if True, ``prompts=None`` is an error.
    range_tolerance:   samples may leave [0, 1] by this much (decoder round-off) before the
                       input is rejected.
    """

    name: str = "reward"
    raw_range: tuple[float, float] = (-math.inf, math.inf)
    differentiable: bool = False
    higher_is_better: bool = True
    modalities: tuple[str, ...] = (IMAGE, VIDEO)
    requires_prompts: bool = True
    range_tolerance: float = 1e-3

    def score(self, samples: Tensor, prompts: Sequence[str] | None, **kwargs) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement score(samples, prompts, **kwargs)")

    def __call__(self, samples: Tensor, prompts: Sequence[str] | None = None, **kwargs) -> RewardOutput:
        """Score a batch. samples: [B, 3, H, W] or [B, 3, T, H, W] in [0, 1]; prompts: B strings."""
        self.validate(samples, prompts, **kwargs)
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            result = self.score(samples, prompts, **kwargs)
        output = result if isinstance(result, RewardOutput) else RewardOutput(as_scores(result, name=self.name))
        scores = as_scores(output.scores, samples.shape[0], name=self.name)
        return RewardOutput(scores.to(samples.device), output.extras)

    def validate(self, samples: Tensor, prompts: Sequence[str] | None = None, **kwargs) -> None:
        """Raise a ValueError/TypeError saying exactly what is wrong with the inputs."""
        who = f"{self.name} ({type(self).__name__})"
        if not isinstance(samples, Tensor):
            raise TypeError(f"{who}: samples must be a torch.Tensor, got {type(samples).__name__}")
        ranks = {_RANK_OF[m]: m for m in self.modalities}
        if samples.ndim not in ranks:
            accepted = " or ".join(
                "images (B, 3, H, W)" if m == IMAGE else "videos (B, 3, T, H, W)" for m in self.modalities
            )
            raise ValueError(f"{who}: expected {accepted}, got a {samples.ndim}-D tensor of shape "
                             f"{tuple(samples.shape)}")
        if samples.shape[1] != 3:
            raise ValueError(f"{who}: expected 3 (RGB) channels in dim 1, got shape {tuple(samples.shape)} "
                             "(channels-first: (B, 3, H, W) or (B, 3, T, H, W))")
        if not samples.is_floating_point():
            raise TypeError(f"{who}: samples must be float in [0, 1], got {samples.dtype} "
                            "(convert uint8 images with samples.float() / 255)")
        if samples.numel():
            values = samples.detach()
            if not bool(torch.isfinite(values).all()):
                bad = int((~torch.isfinite(values)).sum())
                raise ValueError(f"{who}: samples contain {bad} NaN/inf values")
            low, high = torch.aminmax(values)
            low, high = float(low), float(high)
            tol = self.range_tolerance
            if low < -tol or high > 1 + tol:
                hint = " (looks like [-1, 1]: use samples / 2 + 0.5)" if low >= -1 - tol and low < -tol else ""
                hint = hint or (" (looks like [0, 255]: divide by 255)" if 2 < high <= 255 else "")
                raise ValueError(f"{who}: samples must be in [0, 1], got values in [{low:.4g}, {high:.4g}]{hint}")
        batch = samples.shape[0]
        if prompts is None:
            if self.requires_prompts:
                raise ValueError(f"{who}: needs prompts (a list of {batch} strings), got None")
        else:
            if isinstance(prompts, str) or not isinstance(prompts, Sequence):
                raise TypeError(f"{who}: prompts must be a list of strings, got {type(prompts).__name__}")
            if len(prompts) != batch:
                raise ValueError(f"{who}: got {len(prompts)} prompts for {batch} samples")
            not_str = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
            if not_str:
                raise TypeError(f"{who}: prompts must be strings; entry {not_str[0]} is "
                                f"{type(prompts[not_str[0]]).__name__}")
        for key in PER_SAMPLE_KWARGS:
            value = kwargs.get(key)
            if value is None:
                continue
            if isinstance(value, Tensor) and value.ndim != 1:
                raise ValueError(f"{who}: {key}= must be a 1-D tensor [B], got shape {tuple(value.shape)}")
            if not hasattr(value, "__len__"):
                raise TypeError(f"{who}: {key}= must have one entry per sample, got {type(value).__name__}")
            if len(value) != batch:
                raise ValueError(f"{who}: got {len(value)} entries in {key}= for {batch} samples")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class FunctionReward(Reward):
    """A plain function as a Reward.

    ``fn(samples, prompts, **kwargs)`` returns a ``[B]`` tensor, a RewardOutput, or a list of
    float|None (None -> NaN). ``bound_kwargs`` (e.g. from a config dict) are passed on every
    call, call-time kwargs override them; if ``fn`` has no ``**kwargs`` it only receives the
    keyword arguments it names. Prompts are optional unless ``requires_prompts``.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        name: str | None = None,
        *,
        raw_range: tuple[float, float] = (-math.inf, math.inf),
        differentiable: bool = False,
        modalities: Sequence[str] = (IMAGE, VIDEO),
        requires_prompts: bool = False,
        **bound_kwargs,
    ):
        if not callable(fn):
            raise TypeError(f"FunctionReward needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "function_reward")
        self.raw_range = tuple(raw_range)
        self.differentiable = differentiable
        self.modalities = tuple(modalities)
        self.requires_prompts = requires_prompts
        self.bound_kwargs = bound_kwargs
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):  # builtins without a signature: pass everything
            params = None
        if params is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            self._accepted: set[str] | None = None
        else:
            self._accepted = {p.name for p in params}
        unknown = set(bound_kwargs) - self._accepted if self._accepted is not None else set()
        if unknown:
            raise TypeError(f"{self.name}: unexpected arguments {sorted(unknown)} for {fn!r}")

    def score(self, samples, prompts, **kwargs):
        kwargs = {**self.bound_kwargs, **kwargs}
        if self._accepted is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in self._accepted}
        return self.fn(samples, prompts, **kwargs)


# ----------------------------------------------------------------------------- registry

# name -> (target, kind); kind is "class" (a Reward subclass), "factory" (callable returning
# a Reward), "function" (a scoring function, wrapped in FunctionReward) or "instance".
_REGISTRY: dict[str, tuple[Any, str]] = {}


def _kind_of(target: Any, scoring_function: bool) -> str:
    if isinstance(target, Reward):
        return "instance"
    if isinstance(target, type):
        if not issubclass(target, Reward):
            raise TypeError(f"register_reward: {target.__name__} is not a Reward subclass")
        return "class"
    if not callable(target):
        raise TypeError(f"register_reward: expected a Reward class, factory or function, got {target!r}")
    return "function" if scoring_function else "factory"


def register_reward(name: str, *, scoring_function: bool = False) -> Callable[[Any], Any]:
    """Decorator registering a reward under ``name`` (returns the target unchanged).

    The target is a Reward subclass or a factory ``(**kwargs) -> Reward``; with
    ``scoring_function=True`` a plain ``f(samples, prompts, **kw)`` wrapped in FunctionReward.
    Registering a different target under a taken name is an error.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_reward: name must be a non-empty string, got {name!r}")

    def decorator(target):
        kind = _kind_of(target, scoring_function)
        existing = _REGISTRY.get(name)
        if existing is not None and not _same_target(existing[0], target):
            raise ValueError(f"reward name {name!r} is already registered to {existing[0]!r}")
        _REGISTRY[name] = (target, kind)
        return target

    return decorator


def _same_target(a: Any, b: Any) -> bool:
    # A module imported twice (e.g. as a script and as a module) re-registers an equal target.
    return a is b or (getattr(a, "__qualname__", None) == getattr(b, "__qualname__", object())
                      and getattr(a, "__module__", None) == getattr(b, "__module__", object()))


def registered_rewards() -> dict[str, Any]:
    """``{name: class | factory | function}`` of every registered reward, sorted by name."""
    return {name: _REGISTRY[name][0] for name in sorted(_REGISTRY)}


def _instantiate(target: Any, kind: str, kwargs: dict, label: str) -> Reward:
    if kind == "instance":
        if kwargs:
            raise ValueError(f"{label}: is a ready-made Reward instance, it takes no arguments "
                             f"(got {sorted(kwargs)})")
        return target
    if kind == "function":
        return FunctionReward(target, **kwargs)
    try:
        reward = target(**kwargs)
    except TypeError as err:
        raise TypeError(f"{label}: {err}") from err
    if not isinstance(reward, Reward):
        raise TypeError(f"{label}: factory returned {type(reward).__name__}, not a Reward")
    return reward


def _import_target(path: str) -> Any:
    """``package.module:attr`` or ``package.module.attr`` -> the object."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"reward import path {path!r} must look like 'package.module:attr'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward {path!r}: cannot import module {module_name!r} ({err})") from err
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"reward {path!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    return target


def _unknown(name: str) -> ValueError:
    names = ", ".join(sorted(_REGISTRY)) or "(none)"
    return ValueError(f"unknown reward {name!r}; registered rewards: {names}; "
                      "or give an import path 'package.module:attr'")


def build_weighted_reward(spec: Any) -> tuple[Reward, float]:
    """``build_reward`` that also returns the spec's ``weight`` (default 1.0); for compositions."""
    if isinstance(spec, Mapping):
        spec = dict(spec)
        weight = spec.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"reward weight must be a number, got {weight!r}")
        return _build(spec), float(weight)
    return _build(spec), 1.0


def build_reward(spec: Any) -> Reward:
    """A Reward from a spec (what a config's ``reward:`` entry holds).

    spec is one of
    - a Reward instance (returned as is);
    - a registered name, e.g. ``"shapes_geneval"``;
    - an import path ``"package.module:attr"`` or ``"package.module.attr"`` to a Reward
      subclass (instantiated), a Reward instance, or a plain scoring function
      ``f(samples, prompts, **kw)`` (wrapped in FunctionReward);
    - a dict: ``type`` or ``name`` picks the reward as above (when both are given ``type``
      picks it and ``name`` labels the instance); every other key except ``weight`` is a
      constructor argument, so compositions nest: ``{"type": "weighted_sum", "rewards":
      [{"name": "shapes_geneval", "weight": 1.0}, ...]}``. A top-level ``weight`` other than
      1 scales the scores (a one-member WeightedSum).

    Unknown names raise ValueError listing the registered names.
    """
    reward, weight = build_weighted_reward(spec)
    if weight == 1.0:
        return reward
    from rewards.compose import WeightedSum  # compose builds on this module

    return WeightedSum([(reward, weight)], name=f"{weight:g}*{reward.name}")


def _build(spec: Any) -> Reward:
    if isinstance(spec, Reward):
        return spec
    label = None
    if isinstance(spec, str):
        key, kwargs = spec, {}
    elif isinstance(spec, Mapping):
        kwargs = copy.copy(dict(spec))
        if "type" in kwargs:
            key = kwargs.pop("type")
            label = kwargs.pop("name", None)
        elif "name" in kwargs:
            key = kwargs.pop("name")
        else:
            raise ValueError(f"reward spec {dict(spec)!r} needs a 'name' or 'type' key")
        if not isinstance(key, str):
            raise TypeError(f"reward spec: 'name'/'type' must be a string, got {key!r}")
    else:
        raise TypeError(f"reward spec must be a name, import path, dict or Reward, got {type(spec).__name__}")

    if key in _REGISTRY:
        target, kind = _REGISTRY[key]
        reward = _instantiate(target, kind, kwargs, f"reward {key!r}")
        default_name = key
    elif ":" in key or "." in key:
        target = _import_target(key)
        if isinstance(target, Reward):
            kind = "instance"
        elif isinstance(target, type) and issubclass(target, Reward):
            kind = "class"
        elif callable(target):
            kind = "function"
        else:
            raise TypeError(f"reward {key!r} is a {type(target).__name__}, not a Reward or function")
        reward = _instantiate(target, kind, kwargs, f"reward {key!r}")
        default_name = reward.name
    else:
        raise _unknown(key)
    if kind != "instance":  # never rename a shared, ready-made instance
        reward.name = label or default_name
    elif label:
        raise ValueError(f"reward {key!r}: cannot relabel a ready-made instance as {label!r}")
    return reward

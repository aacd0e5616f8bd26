"""Reward compositions, each itself a Reward (so they nest and are built from config dicts).

- :class:`WeightedSum`: sum_i w_i * norm(r_i), with optional per-reward z-scoring over the
  batch or within each prompt group (decoupled multi-reward normalisation: each reward is
  standardised on its own before weighting, so one reward's scale cannot drown the others).
- :class:`BaseAndBonus`: FIRM multiplicative gating (CME for editing, QMA for generation).
- :class:`Ensemble`: mean, worst case (min), UWO (mean - lambda * variance across members,
  Coste et al. 2023) or mean - lambda * std, optionally on per-member z-scores.

NaN (a member could not score a sample) is handled explicitly by ``nan_policy``:
``"propagate"`` (default) makes the composite NaN for that sample; ``"ignore"`` combines the
members that did score it (documented per class). Statistics for z-scoring never include NaN.

    >>> reward = build_reward({"type": "weighted_sum", "normalize": "group", "rewards": [
    ...     {"name": "shapes_geneval", "weight": 1.0},
    ...     {"name": "shapes_saturation", "weight": 0.5}]})
    >>> out = reward(samples, prompts, group_ids=group_ids)
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from rewards.base import (
    IMAGE,
    VIDEO,
    Reward,
    RewardOutput,
    build_reward,
    build_weighted_reward,
    register_reward,
)

__all__ = ["WeightedSum", "BaseAndBonus", "Ensemble", "zscore"]

NanPolicy = Literal["propagate", "ignore"]


def zscore(scores: Tensor, group_ids: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """(s - mean) / (std + eps) over the whole batch, or within each group of ``group_ids``.

    scores: [B] (NaN entries are left NaN and excluded from the statistics); group_ids: [B]
    ints or None (one group). std is the population std (ddof 0), so a group of one or of
    equal scores maps to 0. Differentiable.
    """
    valid = ~torch.isnan(scores)  # [B]
    if group_ids is None:
        index = torch.zeros_like(scores, dtype=torch.long)
    else:
        _, index = torch.unique(torch.as_tensor(group_ids, device=scores.device), return_inverse=True)
    n_groups = int(index.max()) + 1 if index.numel() else 0
    filled = torch.where(valid, scores, torch.zeros_like(scores))  # [B], no NaN in the graph
    counts = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device).index_add(0, index, valid.to(scores.dtype))
    sums = torch.zeros_like(counts).index_add(0, index, filled)
    mean = (sums / counts.clamp_min(1))[index]  # [B]
    centred = torch.where(valid, filled - mean, torch.zeros_like(scores))  # [B]
    var = torch.zeros_like(counts).index_add(0, index, centred**2) / counts.clamp_min(1)
    std = var.clamp_min(1e-20).sqrt()[index]  # clamp: sqrt has an infinite gradient at 0
    return torch.where(valid, centred / (std + eps), scores)


def _unique_names(rewards: Sequence[Reward]) -> list[str]:
    """Member names for extras; repeated names get a suffix: clip, clip_2, ..."""
    names, seen = [], {}
    for reward in rewards:
        seen[reward.name] = seen.get(reward.name, 0) + 1
        names.append(reward.name if seen[reward.name] == 1 else f"{reward.name}_{seen[reward.name]}")
    return names


def _common_modalities(rewards: Sequence[Reward]) -> tuple[str, ...]:
    modalities = tuple(m for m in (IMAGE, VIDEO) if all(m in r.modalities for r in rewards))
    if not modalities:
        raise ValueError(f"members {[r.name for r in rewards]} accept no common input (images/videos)")
    return modalities


def _check_choice(value: str, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise ValueError(f"{what} must be one of {list(choices)}, got {value!r}")
    return value


class _Composite(Reward):
    """Shared plumbing: members, their names, and attributes derived from them."""

    def _set_members(self, members: Sequence[Reward]) -> None:
        self.members = list(members)
        self.member_names = _unique_names(self.members)
        self.differentiable = all(m.differentiable for m in self.members)
        self.modalities = _common_modalities(self.members)
        self.requires_prompts = any(m.requires_prompts for m in self.members)
        # Validate once at the top with the loosest member tolerance; members re-validate.
        self.range_tolerance = max(m.range_tolerance for m in self.members)

    def _score_members(self, samples, prompts, **kwargs) -> list[RewardOutput]:
        return [member(samples, prompts, **kwargs) for member in self.members]

    def _member_extras(self, outputs: Sequence[RewardOutput], names: Sequence[str]) -> dict:
        extras = {}
        for name, out in zip(names, outputs):
            extras[name] = out.scores.detach()
            if out.extras:
                extras[f"{name}/extras"] = out.extras
        return extras


@register_reward("weighted_sum")
class WeightedSum(_Composite):
    """R = sum_i w_i * n_i(r_i): weighted sum of rewards, optionally z-scored first.

    rewards:    members as ``(reward, weight)`` pairs, Rewards (weight 1) or specs (names,
                dicts with ``weight``; see ``build_reward``).
    normalize:  "none" (raw scores), "batch" (z-score each member over the batch) or
                "group" (z-score each member within each prompt group; needs kwarg
                ``group_ids=Tensor[B]``). Group z-scoring standardises every reward to unit
                spread inside every group before weighting, so a reward on a 0-1000 scale
                weighs exactly as much as one on a 0-1 scale; weights then set the trade-off.
    nan_policy: "propagate": R is NaN for a sample if any member is NaN for it.
                "ignore": R sums the members that scored the sample, with their weights
                rescaled by sum_all |w| / sum_present |w| (so the total weight is kept); NaN
                only if no member scored it.
    eps:        added to the std when z-scoring.

    Raw range: the weighted interval sum of the members' ranges without normalisation,
    unbounded with it (z-scores). extras: each member's raw scores under its name,
    ``"<name>/normalized"`` (if normalising) and ``"<name>/extras"``.
    """

    def __init__(
        self,
        rewards: Sequence[Any],
        normalize: Literal["none", "batch", "group"] = "none",
        nan_policy: NanPolicy = "propagate",
        eps: float = 1e-6,
        name: str = "weighted_sum",
    ):
        if not rewards:
            raise ValueError("WeightedSum needs at least one reward")
        members, weights = [], []
        for item in rewards:
            if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], (int, float)):
                reward, weight = build_reward(item[0]), float(item[1])
            else:
                reward, weight = build_weighted_reward(item)
            members.append(reward)
            weights.append(weight)
        self.name = name
        self.normalize = _check_choice(normalize, ("none", "batch", "group"), "WeightedSum normalize")
        self.nan_policy = _check_choice(nan_policy, ("propagate", "ignore"), "WeightedSum nan_policy")
        self.eps = eps
        self.weights = weights
        self._set_members(members)
        if self.normalize == "none":
            scaled = [_scale_range(m.raw_range, w) for m, w in zip(members, weights)]
            self.raw_range = (sum(r[0] for r in scaled), sum(r[1] for r in scaled))
        else:
            self.raw_range = (-math.inf, math.inf)

    def score(self, samples, prompts, group_ids=None, **kwargs) -> RewardOutput:
        if self.normalize == "group" and group_ids is None:
            raise ValueError(f"{self.name}: normalize='group' needs group_ids=Tensor[B] (prompt group of each sample)")
        outputs = self._score_members(samples, prompts, group_ids=group_ids, **kwargs)
        extras = self._member_extras(outputs, self.member_names)
        terms = []
        for name, out in zip(self.member_names, outputs):
            scores = out.scores.to(samples.device)  # [B]
            if self.normalize != "none":
                scores = zscore(scores, group_ids if self.normalize == "group" else None, self.eps)
                extras[f"{name}/normalized"] = scores.detach()
            terms.append(scores)
        stacked = torch.stack(terms)  # [M, B]
        weights = torch.tensor(self.weights, dtype=stacked.dtype, device=stacked.device)[:, None]  # [M, 1]
        if self.nan_policy == "propagate":
            return RewardOutput((weights * stacked).sum(0), extras)
        present = ~torch.isnan(stacked)  # [M, B]
        weighted = torch.where(present, weights * stacked, torch.zeros_like(stacked)).sum(0)  # [B]
        mass_present = (weights.abs() * present).sum(0)  # [B]
        scale = weights.abs().sum() / mass_present.clamp_min(1e-12)
        total = torch.where(present.any(0), weighted * scale, torch.full_like(weighted, math.nan))
        return RewardOutput(total, extras)


def _scale_range(raw_range: tuple[float, float], weight: float) -> tuple[float, float]:
    """Interval ``weight * [low, high]`` (a zero weight contributes [0, 0], even if unbounded)."""
    if weight == 0:
        return (0.0, 0.0)
    low, high = weight * raw_range[0], weight * raw_range[1]
    return (min(low, high), max(low, high))


@register_reward("base_and_bonus")
class BaseAndBonus(_Composite):
    """FIRM Base-and-Bonus gating ("Trust Your Critic"): R = B * (floor + gain * X).

    B = normalised base score, X = normalised bonus score; with ``normalize_1_5`` critic
    scores s in 1..5 map to (s - 1) / 4 in [0, 1] (raw scores outside [1, 5] are treated as
    failures: NaN). Defaults per mode:

    - "cme" (editing): R = E * (0.6 + 0.4 C), base = Execution, bonus = Consistency.
    - "qma" (generation): R = I * (0.4 + 0.6 Q), base = Instruction following, bonus =
      Quality (the min of the quality sub-scores, computed by the bonus reward).

    guard:           None (off), "base" (FIRM's execution guard on the base's own raw score),
                     or a reward (spec) whose raw score is tested instead. Where the guard's
                     raw score <= ``guard_threshold`` (default 2), R = B alone: the bonus
                     is not applied (nor needed: a NaN bonus there does not make R NaN). A
                     NaN guard score makes R NaN.
    floor, gain:     override the mode's constants.

    NaN in base or (needed) bonus -> R is NaN. Raw range [0, 1] with normalize_1_5 and the
    default constants. extras: "base", "bonus" (raw), "base/normalized", "bonus/normalized",
    "guarded" (bool [B]) and, with a separate guard, "guard".
    """

    MODES = {"cme": (0.6, 0.4), "qma": (0.4, 0.6)}

    def __init__(
        self,
        base: Any,
        bonus: Any,
        mode: Literal["qma", "cme"] = "qma",
        guard: Any = None,
        guard_threshold: float = 2.0,
        normalize_1_5: bool = True,
        floor: float | None = None,
        gain: float | None = None,
        name: str = "base_and_bonus",
    ):
        self.name = name
        self.mode = _check_choice(mode, tuple(self.MODES), "BaseAndBonus mode")
        default_floor, default_gain = self.MODES[mode]
        self.floor = default_floor if floor is None else float(floor)
        self.gain = default_gain if gain is None else float(gain)
        self.base, self.bonus = build_reward(base), build_reward(bonus)
        self.guard_on_base = guard == "base"
        self.guard = None if guard is None or self.guard_on_base else build_reward(guard)
        self.guard_threshold = float(guard_threshold)
        self.normalize_1_5 = normalize_1_5
        self._set_members([self.base, self.bonus] + ([self.guard] if self.guard is not None else []))
        if normalize_1_5:
            self.raw_range = (min(0.0, self.floor), max(1.0, self.floor + self.gain))
        else:
            self.raw_range = (-math.inf, math.inf)

    def _normalise(self, scores: Tensor) -> Tensor:
        if not self.normalize_1_5:
            return scores
        in_range = (scores >= 1) & (scores <= 5)  # NaN compares False -> stays NaN
        return torch.where(in_range, (scores - 1) / 4, torch.full_like(scores, math.nan))

    def score(self, samples, prompts, **kwargs) -> RewardOutput:
        outputs = self._score_members(samples, prompts, **kwargs)
        base_raw, bonus_raw = outputs[0].scores, outputs[1].scores  # [B]
        guard_raw = outputs[2].scores if self.guard is not None else (base_raw if self.guard_on_base else None)
        base, bonus = self._normalise(base_raw), self._normalise(bonus_raw)  # [B]
        gated = base * (self.floor + self.gain * bonus)  # [B]; NaN if either is NaN
        if guard_raw is None:
            guarded = torch.zeros_like(base, dtype=torch.bool)
            total = gated
        else:
            guarded = guard_raw <= self.guard_threshold  # [B]; NaN -> False
            total = torch.where(guarded, base, gated)
            total = torch.where(torch.isnan(guard_raw), torch.full_like(total, math.nan), total)
        extras = self._member_extras(outputs, ["base", "bonus", "guard"][: len(outputs)])
        extras.update({"base/normalized": base.detach(), "bonus/normalized": bonus.detach(), "guarded": guarded})
        return RewardOutput(total, extras)


@register_reward("ensemble")
class Ensemble(_Composite):
    """Ensemble of rewards on COMPARABLE scales (same model family, pre-normalised, or z-scored
    here with ``normalize``). Over the M members' scores r_i of a sample:

    - "mean":           R = mean_i r_i
    - "min":            R = min_i r_i (worst-case optimisation, WCO: every member must agree)
    - "uwo":            R = mean_i r_i - lam * var_i r_i, var the population variance over the
                        members, (1/M) sum_i (r_i - mean)^2: uncertainty-weighted optimisation
                        as published (Coste et al. 2023, "Reward model ensembles help mitigate
                        overoptimization", arXiv 2310.02743). Their members are normalised
                        reward models, so their lam values assume unit-scale members: use
                        ``normalize`` unless the members already share such a scale.
    - "mean_minus_std": R = mean_i r_i - lam * std_i r_i (population std; not the paper's UWO:
                        lam is on the reward scale, not its square)

    normalize:  "none" (raw member scores), "batch" (z-score each member over the batch) or
                "group" (within each prompt group; needs ``group_ids=Tensor[B]``), before
                combining (population std, NaN excluded; see :func:`zscore`).
    nan_policy: "propagate" (any NaN member -> NaN) or "ignore" (combine the members that
                scored the sample; NaN if none did).

    Ensembles mitigate reward hacking but do not remove it when members share error patterns.
    Raw range: the hull [low, high] of the members' ranges, lowered by lam * (high - low) / 2
    ("mean_minus_std") or lam * ((high - low) / 2)^2 ("uwo"), the largest std / variance of
    values in it; unbounded with ``normalize``. extras: members' raw scores by name,
    "<name>/normalized" (if normalising), "mean", "var" and "std" [B].
    """

    MODES = ("mean", "min", "uwo", "mean_minus_std")

    def __init__(
        self,
        members: Sequence[Any],
        mode: Literal["mean", "min", "uwo", "mean_minus_std"] = "mean",
        lam: float = 1.0,
        normalize: Literal["none", "batch", "group"] = "none",
        nan_policy: NanPolicy = "propagate",
        eps: float = 1e-6,
        name: str = "ensemble",
    ):
        if not members:
            raise ValueError("Ensemble needs at least one member")
        self.name = name
        self.mode = _check_choice(mode, self.MODES, "Ensemble mode")
        self.normalize = _check_choice(normalize, ("none", "batch", "group"), "Ensemble normalize")
        self.nan_policy = _check_choice(nan_policy, ("propagate", "ignore"), "Ensemble nan_policy")
        self.lam, self.eps = float(lam), eps
        self._set_members([build_reward(m) for m in members])
        low = min(m.raw_range[0] for m in self.members)
        high = max(m.raw_range[1] for m in self.members)
        spread = {"mean_minus_std": (high - low) / 2, "uwo": ((high - low) / 2) ** 2}.get(self.mode, 0.0)
        if self.lam != 0 and spread:
            low = low - self.lam * spread
        self.raw_range = (low, high) if self.normalize == "none" else (-math.inf, math.inf)

    def score(self, samples, prompts, group_ids=None, **kwargs) -> RewardOutput:
        if self.normalize == "group" and group_ids is None:
            raise ValueError(f"{self.name}: normalize='group' needs group_ids=Tensor[B] (prompt group of each sample)")
        outputs = self._score_members(samples, prompts, group_ids=group_ids, **kwargs)
        extras = self._member_extras(outputs, self.member_names)
        stacked = torch.stack([o.scores.to(samples.device) for o in outputs])  # [M, B]
        if self.normalize != "none":
            stacked = torch.stack([zscore(r, group_ids if self.normalize == "group" else None, self.eps)
                                   for r in stacked])
            extras.update({f"{name}/normalized": r.detach() for name, r in zip(self.member_names, stacked)})
        present = ~torch.isnan(stacked)  # [M, B]
        if self.nan_policy == "propagate":
            present = present.all(0, keepdim=True).expand_as(stacked)
        n = present.sum(0)  # [B]
        filled = torch.where(present, stacked, torch.zeros_like(stacked))  # [M, B]
        mean = filled.sum(0) / n.clamp_min(1)  # [B]
        var = (torch.where(present, stacked - mean, torch.zeros_like(stacked)) ** 2).sum(0) / n.clamp_min(1)
        std = var.clamp_min(1e-20).sqrt() * (var > 0)  # [B]; 0 exactly where members agree
        if self.mode == "mean":
            total = mean
        elif self.mode == "min":
            total = torch.where(present, stacked, torch.full_like(stacked, math.inf)).amin(0)
        elif self.mode == "uwo":
            total = mean - self.lam * var
        else:
            total = mean - self.lam * std
        total = torch.where(n > 0, total, torch.full_like(total, math.nan))
        extras.update({key: torch.where(n > 0, value, torch.nan).detach()
                       for key, value in (("mean", mean), ("var", var), ("std", std))})
        return RewardOutput(total, extras)

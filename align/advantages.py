"""Group advantages for GRPO-style training (docs ALGORITHMS.md sections 1, 2, 6).

Rewards come in groups: the samples generated for one prompt (Flow-GRPO, DanceGRPO) share a
group id. Advantages compare each sample with its own group, so every group must be complete
when they are computed: with several ranks, gather first (`distributed_group_advantages`);
Flow-GRPO's "groups split across GPUs" pain is exactly a group normalised on partial data.

Group ids are an int tensor [N] (e.g. the prompt's index in the global batch) or, on one
process, any sequence of N hashables (prompt strings); they only need to be equal within a
group. A non-finite reward (NaN: the reward failed or does not apply, as in trl) takes no part
in any mean or std and gets advantage 0.

Every function returns detached tensors; metrics are 0-d float tensors (call .item() to log).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Hashable, Sequence

import torch
from torch import Tensor

__all__ = [
    "group_index",
    "group_mean",
    "group_advantages",
    "nonzero_group_mask",
    "gather_for_advantages",
    "distributed_group_advantages",
    "best_of_n_mask",
    "PerPromptStatTracker",
]

GroupIds = Tensor | Sequence[Hashable]
_STD_MODES = ("global", "group", "none")


def group_index(group_ids: GroupIds, device: torch.device | str | None = None) -> tuple[Tensor, int]:
    """Map N group ids to dense indices: (index [N] long in [0, G), G).

    Tensor ids keep torch.unique's sorted order; other sequences are numbered in order of first
    appearance. Only equality of ids matters to the callers, never their order.
    """
    if isinstance(group_ids, Tensor):
        if group_ids.ndim != 1:
            raise ValueError(f"group_ids must be 1-D, got shape {tuple(group_ids.shape)}")
        if group_ids.is_floating_point():
            raise TypeError("group_ids must be an integer (or bool) tensor, not floating point")
        unique, index = torch.unique(group_ids, return_inverse=True)  # [G], [N]
        return index.to(device or group_ids.device), unique.numel()
    numbers: dict[Hashable, int] = {}
    index = [numbers.setdefault(key, len(numbers)) for key in group_ids]
    return torch.tensor(index, dtype=torch.long, device=device), len(numbers)


def _check_pair(values: Tensor, group_ids: GroupIds) -> None:
    if values.ndim != 1:
        raise ValueError(f"expected a 1-D tensor [N], got shape {tuple(values.shape)}")
    if len(group_ids) != values.shape[0]:
        raise ValueError(f"{len(group_ids)} group ids for {values.shape[0]} values")


def group_mean(values: Tensor, group_ids: GroupIds) -> Tensor:
    """Mean of `values` [N] over each sample's group, broadcast back -> [N] (differentiable)."""
    _check_pair(values, group_ids)
    index, num_groups = group_index(group_ids, values.device)  # [N], G
    sums = values.new_zeros(num_groups).index_add(0, index, values)  # [G]
    counts = values.new_zeros(num_groups).index_add(0, index, torch.ones_like(values))  # [G]
    return (sums / counts)[index]  # [N]


def group_advantages(
    rewards: Tensor,
    group_ids: GroupIds,
    std: str = "global",
    eps: float = 1e-4,
    clip: float | None = 5.0,
    unbiased: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Group-relative advantages (Flow-GRPO sec. 4 / DanceGRPO): A_i = (r_i - mean_g(i)) / s.

    rewards: [N]; group_ids: [N] (see module doc).
    std: "global": s = std of all valid rewards in the batch + eps (Flow-GRPO default; pass the
           gathered batch), "group": s = std of the sample's group + eps (DanceGRPO, with
           eps=1e-8 and unbiased=True as torch's .std()), "none": s = 1, group-centring only.
    eps: added to the std. clip: A is clamped to [-clip, clip] (None: no clipping).
    unbiased: Bessel's correction for the stds (False: population std, as numpy in Flow-GRPO).

    A group whose valid rewards are all equal (or has fewer than 2) carries no signal: its
    advantages are exactly 0 (no rounding residue) so `nonzero_group_mask` drops it.
    Returns (advantages [N] detached, in the rewards' float dtype, metrics) with metrics
    zero_std_fraction (of groups), nan_count (non-finite rewards), reward_mean, reward_std (of
    the valid rewards) and clip_fraction (of valid samples whose advantage was clipped).
    """
    if std not in _STD_MODES:
        raise ValueError(f"std must be one of {_STD_MODES}, got {std!r}")
    _check_pair(rewards, group_ids)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    r = rewards.detach().to(torch.float64)  # [N] fp64: sums of many rewards, exact zeros below
    index, num_groups = group_index(group_ids, r.device)  # [N], G
    valid = torch.isfinite(r)  # [N]
    r_valid = torch.where(valid, r, torch.zeros_like(r))  # [N]
    ddof = 1 if unbiased else 0

    counts = r.new_zeros(num_groups).index_add(0, index, valid.double())  # [G]
    means = r.new_zeros(num_groups).index_add(0, index, r_valid) / counts.clamp_min(1)  # [G]
    centred = torch.where(valid, r - means[index], torch.zeros_like(r))  # [N]
    group_max = r.new_full((num_groups,), -torch.inf).scatter_reduce(
        0, index, torch.where(valid, r, -torch.inf), reduce="amax"
    )  # [G]
    group_min = r.new_full((num_groups,), torch.inf).scatter_reduce(
        0, index, torch.where(valid, r, torch.inf), reduce="amin"
    )  # [G]
    zero_std = (counts < 2) | (group_max == group_min)  # [G]

    num_valid = valid.sum()  # 0-d
    reward_mean = r_valid.sum() / num_valid.clamp_min(1)  # 0-d
    squared_deviation = torch.where(valid, r - reward_mean, 0.0).square().sum()  # 0-d
    if std == "global":
        global_std = (squared_deviation / (num_valid - ddof).clamp_min(1)).sqrt()  # 0-d
        advantages = centred / (global_std + eps)  # [N]
    elif std == "group":
        variances = r.new_zeros(num_groups).index_add(0, index, centred.square())  # [G]
        group_std = (variances / (counts - ddof).clamp_min(1)).sqrt()  # [G]
        advantages = centred / (group_std[index] + eps)  # [N]
    else:
        advantages = centred  # [N]
    advantages = torch.where(valid & ~zero_std[index], advantages, torch.zeros_like(advantages))  # [N]
    clipped = torch.zeros_like(valid)  # [N]
    if clip is not None:
        clipped = valid & (advantages.abs() > clip)  # [N]
        advantages = advantages.clamp(-clip, clip)  # [N]

    metrics = {
        "zero_std_fraction": zero_std.double().sum() / max(num_groups, 1),
        "nan_count": (~valid).sum().double(),
        "reward_mean": reward_mean,
        "reward_std": (squared_deviation / num_valid.clamp_min(1)).sqrt(),
        "clip_fraction": clipped.sum() / num_valid.clamp_min(1),
    }
    return advantages.to(out_dtype), {k: v.float() for k, v in metrics.items()}


def nonzero_group_mask(advantages: Tensor, group_ids: GroupIds) -> Tensor:
    """BoolTensor [N]: True for samples of groups with at least one nonzero advantage.

    Flow-GRPO drops the other groups (they give no gradient) and logs the kept fraction.
    """
    _check_pair(advantages, group_ids)
    index, num_groups = group_index(group_ids, advantages.device)  # [N], G
    nonzero = advantages.new_zeros(num_groups, dtype=torch.long).index_add(
        0, index, (advantages != 0).long()
    )  # [G]
    return nonzero[index] > 0  # [N]


def gather_for_advantages(rewards: Tensor, group_ids: Tensor, accelerator: Any = None) -> tuple[Tensor, Tensor]:
    """All-gather rewards [n] and group ids [n] from every rank -> ([n P], [n P]) in rank order.

    accelerator: an accelerate.Accelerator (its `gather`); None or one process: identity.
    Every rank must hold the same number n of samples (accelerate's gather concatenates equal
    shapes; unequal ones would fail or hang inside the collective): the lengths are gathered
    first and a ValueError is raised if they differ. Group ids must be global (the same prompt
    has the same id on every rank), e.g. the prompt's index in the global batch.
    """
    if accelerator is None or getattr(accelerator, "num_processes", 1) <= 1:
        return rewards, group_ids
    if not isinstance(group_ids, Tensor):
        raise TypeError("group_ids must be an int tensor to be gathered across ranks")
    if rewards.shape != group_ids.shape or rewards.ndim != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must be [n]")
    device = getattr(accelerator, "device", rewards.device)
    lengths = accelerator.gather(torch.tensor([rewards.shape[0]], device=device))  # [P]
    if not bool((lengths == lengths[0]).all()):
        raise ValueError(f"every rank must hold the same number of samples, got {lengths.tolist()}")
    all_rewards = accelerator.gather(rewards.detach().to(device))  # [n P]
    all_group_ids = accelerator.gather(group_ids.to(device))  # [n P]
    return all_rewards, all_group_ids


def distributed_group_advantages(
    rewards: Tensor, group_ids: Tensor, accelerator: Any = None, **kwargs: Any
) -> tuple[Tensor, dict[str, Tensor]]:
    """`group_advantages` over the batch gathered from all ranks; returns this rank's slice.

    rewards, group_ids: [n] local; kwargs: as group_advantages. Ranks' slices are contiguous in
    gather order and of equal length n (checked), so rank p gets [p n, (p + 1) n). The metrics
    describe the whole gathered batch and are identical on every rank.
    """
    all_rewards, all_group_ids = gather_for_advantages(rewards, group_ids, accelerator)  # [n P], [n P]
    advantages, metrics = group_advantages(all_rewards, all_group_ids, **kwargs)  # [n P]
    if all_rewards is rewards:
        return advantages, metrics
    n = rewards.shape[0]
    start = accelerator.process_index * n
    return advantages[start : start + n].to(rewards.device), metrics  # [n]


def best_of_n_mask(rewards: Tensor, group_ids: GroupIds, k: int) -> Tensor:
    """BoolTensor [N]: the k highest and k lowest rewards of each group (DanceGRPO video).

    Groups with at most 2k valid rewards are kept whole. Non-finite rewards are never selected.
    Ties are broken by position (stable sort), so the result is deterministic.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _check_pair(rewards, group_ids)
    index, num_groups = group_index(group_ids, rewards.device)  # [N], G
    valid = torch.isfinite(rewards)  # [N]
    mask = torch.zeros_like(valid)  # [N]
    for g in range(num_groups):
        members = torch.nonzero((index == g) & valid).squeeze(1)  # [n_g]
        order = members[torch.argsort(rewards[members], descending=True, stable=True)]  # [n_g]
        mask[order[:k]] = True
        mask[order[-k:]] = True
    return mask


def _mean_std(values: Tensor) -> tuple[float, float]:
    """(mean, population std) of a non-empty 1-D tensor, as floats."""
    return float(values.mean()), float(values.std(unbiased=False))


class PerPromptStatTracker:
    """DDPO's per-prompt baseline: reward buffers per prompt that persist across epochs.

    update(prompts, rewards) appends the batch's rewards to each prompt's buffer (the last
    `buffer_size` kept), then normalises each reward by its prompt's buffer mean / std once the
    buffer holds `min_count` rewards, else by the current batch's mean / std (DDPO; eps 1e-6).
    Non-finite rewards are not buffered and get advantage 0.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16, eps: float = 1e-6):
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, eps
        self.buffers: dict[Hashable, deque[float]] = {}

    def update(self, prompts: Sequence[Hashable], rewards: Tensor) -> Tensor:
        """prompts: N hashables, rewards: [N] -> advantages [N] (fp32, on the rewards' device)."""
        if len(prompts) != rewards.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {rewards.shape[0]} rewards")
        values = rewards.detach().double().cpu()  # [N]
        valid = torch.isfinite(values)  # [N]
        for prompt, value, ok in zip(prompts, values.tolist(), valid.tolist()):
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            if ok:
                buffer.append(value)
        batch = values[valid]  # [N_valid]
        batch_stats = _mean_std(batch) if batch.numel() else (0.0, 0.0)
        advantages = torch.zeros_like(values)  # [N]
        for i, prompt in enumerate(prompts):
            if valid[i]:
                buffer = self.buffers[prompt]
                use_prompt = len(buffer) >= self.min_count
                mean, std = _mean_std(torch.tensor(list(buffer), dtype=torch.float64)) if use_prompt else batch_stats
                advantages[i] = (values[i] - mean) / (std + self.eps)
        return advantages.to(device=rewards.device, dtype=torch.float32)

    def stats(self) -> dict[Hashable, dict[str, float]]:
        """{prompt: {"mean", "std", "count"}} of the (non-empty) buffers."""
        out = {}
        for prompt, buffer in self.buffers.items():
            if buffer:
                mean, std = _mean_std(torch.tensor(list(buffer), dtype=torch.float64))
                out[prompt] = {"mean": mean, "std": std, "count": len(buffer)}
        return out

    def clear(self) -> None:
        self.buffers.clear()

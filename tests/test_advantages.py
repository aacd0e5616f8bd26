"""Tests for align/advantages.py against the formulas of ALGORITHMS.md sections 1, 2 and 6."""

import math

import pytest
import torch

from align.advantages import (
    PerPromptStatTracker,
    best_of_n_mask,
    distributed_group_advantages,
    gather_for_advantages,
    group_advantages,
    group_index,
    group_mean,
    nonzero_group_mask,
)

torch.set_num_threads(1)
NAN = float("nan")

# group 0: [0, 4] (mean 2, population std 2); group 1: [1, 2, 3] (mean 2, std sqrt(2/3));
# whole batch: mean 2, population std sqrt(2).
REWARDS = torch.tensor([0.0, 4.0, 1.0, 2.0, 3.0])
GROUPS = torch.tensor([7, 7, 3, 3, 3])
CENTRED = torch.tensor([-2.0, 2.0, -1.0, 0.0, 1.0])


def test_global_std_hand_example():
    advantages, metrics = group_advantages(REWARDS, GROUPS)
    torch.testing.assert_close(advantages, CENTRED / (math.sqrt(2) + 1e-4))
    assert advantages.dtype == torch.float32 and not advantages.requires_grad
    assert metrics["zero_std_fraction"] == 0 and metrics["nan_count"] == 0
    torch.testing.assert_close(metrics["reward_mean"], torch.tensor(2.0))
    torch.testing.assert_close(metrics["reward_std"], torch.tensor(math.sqrt(2)))


def test_group_std_hand_example():
    eps = 1e-8
    advantages, _ = group_advantages(REWARDS, GROUPS, std="group", eps=eps)
    s1 = math.sqrt(2 / 3) + eps
    expected = torch.tensor([-2 / (2 + eps), 2 / (2 + eps), -1 / s1, 0.0, 1 / s1])
    torch.testing.assert_close(advantages, expected)
    # DanceGRPO's torch .std() is unbiased: group stds sqrt(8) and 1.
    advantages, _ = group_advantages(REWARDS, GROUPS, std="group", eps=eps, unbiased=True)
    torch.testing.assert_close(advantages, torch.tensor([-2 / 8**0.5, 2 / 8**0.5, -1.0, 0.0, 1.0]))


def test_none_mode_centres_only():
    rewards = REWARDS * 10 + 3  # a shift cancels, the scale stays
    advantages, _ = group_advantages(rewards, GROUPS, std="none", clip=None)
    torch.testing.assert_close(advantages, CENTRED * 10)
    torch.testing.assert_close(group_mean(advantages, GROUPS), torch.zeros(5))


def test_equal_group_gets_exact_zeros_and_is_counted():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.0, 1.0, 0.7, 0.7])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    for std in ("global", "group", "none"):
        advantages, metrics = group_advantages(rewards, groups, std=std)
        assert (advantages[[0, 1, 2, 5, 6]] == 0).all()  # exact, not just close
        assert (advantages[3:5] != 0).all()
        assert metrics["zero_std_fraction"].item() == pytest.approx(2 / 3)
        assert nonzero_group_mask(advantages, groups).tolist() == [False] * 3 + [True] * 2 + [False] * 2


def test_nan_rewards_are_excluded_and_counted():
    rewards = torch.tensor([0.0, NAN, 4.0, 1.0, 2.0, 3.0, NAN])
    groups = torch.tensor([7, 7, 7, 3, 3, 3, 5])  # group 5 holds only a failed reward
    advantages, metrics = group_advantages(rewards, groups)
    assert torch.isfinite(advantages).all()
    assert advantages[1] == 0 and advantages[6] == 0
    torch.testing.assert_close(advantages[[0, 2, 3, 4, 5]], CENTRED / (math.sqrt(2) + 1e-4))
    assert metrics["nan_count"] == 2
    assert metrics["zero_std_fraction"].item() == pytest.approx(1 / 3)  # group 5: no signal
    torch.testing.assert_close(metrics["reward_mean"], torch.tensor(2.0))
    # A group left with a single valid reward has no signal either.
    advantages, metrics = group_advantages(torch.tensor([1.0, NAN, 0.0, 2.0]), torch.tensor([0, 0, 1, 1]))
    assert advantages[:2].tolist() == [0.0, 0.0] and metrics["zero_std_fraction"] == 0.5


def test_clip():
    rewards = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.5, 0.5])
    groups = torch.tensor([0] * 10 + [1, 2])
    raw, _ = group_advantages(rewards, groups, std="group", clip=None)
    assert raw[9] > 2
    advantages, metrics = group_advantages(rewards, groups, std="group", clip=2.0)
    assert advantages.abs().max() == 2.0 and advantages[9] == 2.0
    torch.testing.assert_close(advantages[:9], raw[:9])
    assert metrics["clip_fraction"].item() == pytest.approx(1 / 12)


def test_permutation_equivariance_and_hashable_ids():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(24, generator=g)
    groups = torch.randint(0, 5, (24,), generator=g)
    perm = torch.randperm(24, generator=g)
    for std in ("global", "group", "none"):
        advantages, metrics = group_advantages(rewards, groups, std=std, clip=1.0)
        permuted, permuted_metrics = group_advantages(rewards[perm], groups[perm], std=std, clip=1.0)
        torch.testing.assert_close(permuted, advantages[perm])
        for name in metrics:
            torch.testing.assert_close(permuted_metrics[name], metrics[name])
        # Prompt strings as ids give the same result as ints.
        by_prompt, _ = group_advantages(rewards, [f"prompt {i}" for i in groups.tolist()], std=std, clip=1.0)
        torch.testing.assert_close(by_prompt, advantages)


def test_group_index():
    index, count = group_index(["b", "a", "b", "c"])
    assert index.tolist() == [0, 1, 0, 2] and count == 3
    index, count = group_index(torch.tensor([5, -1, 5]))
    assert index.tolist() == [1, 0, 1] and count == 2
    with pytest.raises(TypeError):
        group_index(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long))


class FakeAccelerator:
    """Rank `process_index` of a fake world: gather() concatenates the other ranks' tensors
    (taken from `peers`, one list per call in order: lengths, rewards, group ids) around it."""

    device = torch.device("cpu")

    def __init__(self, process_index, peers):
        self.process_index, self.num_processes = process_index, len(peers) + 1
        self.peers = [list(p) for p in peers]

    def gather(self, tensor):
        parts = [peer.pop(0) for peer in self.peers]
        parts.insert(self.process_index, tensor)
        return torch.cat(parts)


def test_distributed_advantages_slice_the_gathered_batch():
    rewards = torch.tensor([0.0, 4.0, 1.0, 2.0, 3.0, 9.0])
    groups = torch.tensor([0, 0, 1, 1, 1, 2])  # group 1 is split across the two ranks
    expected, expected_metrics = group_advantages(rewards, groups, std="group")
    for rank in (0, 1):
        local = slice(3 * rank, 3 * rank + 3)
        other = slice(3 - 3 * rank, 6 - 3 * rank)
        acc = FakeAccelerator(rank, [[torch.tensor([3]), rewards[other], groups[other]]])
        advantages, metrics = distributed_group_advantages(rewards[local], groups[local], acc, std="group")
        torch.testing.assert_close(advantages, expected[local])
        torch.testing.assert_close(metrics["reward_mean"], expected_metrics["reward_mean"])
    # One process or no accelerator: the local computation.
    single = FakeAccelerator(0, [])
    single_rank, _ = distributed_group_advantages(rewards, groups, single)
    torch.testing.assert_close(single_rank, group_advantages(rewards, groups)[0])
    assert gather_for_advantages(rewards, groups)[0] is rewards


def test_distributed_advantages_require_equal_lengths():
    acc = FakeAccelerator(0, [[torch.tensor([2]), torch.zeros(2), torch.zeros(2, dtype=torch.long)]])
    with pytest.raises(ValueError, match="same number of samples"):
        distributed_group_advantages(torch.zeros(3), torch.zeros(3, dtype=torch.long), acc)


def test_best_of_n_mask():
    rewards = torch.tensor([0.5, 0.9, 0.1, 0.7, 0.3, 0.6, 1.0, 2.0, NAN, 0.0])
    groups = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    mask = best_of_n_mask(rewards, groups, k=2)
    # group 0: top-2 {0.9, 0.7}, bottom-2 {0.1, 0.3}; group 1 has 3 valid <= 2k: all but the NaN.
    assert mask.tolist() == [False, True, True, True, True, False, True, True, False, True]
    expected = [False, True, True, False, False, False] + [False, True, False, True]
    assert best_of_n_mask(rewards, groups, k=1).tolist() == expected


def test_per_prompt_stat_tracker():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    prompts = ["a", "a", "b"]
    # Buffers too small: the batch's mean / std (mean 2, std sqrt(8/3)).
    advantages = tracker.update(prompts, torch.tensor([0.0, 2.0, 4.0]))
    torch.testing.assert_close(advantages, (torch.tensor([0.0, 2.0, 4.0]) - 2) / (math.sqrt(8 / 3) + 1e-6))
    # "a" now has 4 buffered rewards [0, 2, 4, 6] (mean 3, std sqrt(5)), "b" has 2 (batch stats).
    advantages = tracker.update(prompts, torch.tensor([4.0, 6.0, NAN]))
    expected_a = (torch.tensor([4.0, 6.0]) - 3) / (math.sqrt(5) + 1e-6)
    torch.testing.assert_close(advantages, torch.cat([expected_a, torch.zeros(1)]))
    # The buffer keeps the last 4: [2, 4, 6, 8] after one more.
    tracker.update(["a"], torch.tensor([8.0]))
    assert tracker.stats()["a"] == {"mean": 5.0, "std": math.sqrt(5), "count": 4}
    assert tracker.stats()["b"]["count"] == 1
    tracker.clear()
    assert tracker.stats() == {}

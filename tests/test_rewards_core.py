"""Reward signature, registry, compositions (by hand) and the ShapesWorld rewards."""

import math

import numpy as np
import pytest
import torch

from eval.shapes import BACKGROUND, TAGS, all_prompts, render, scene_for_prompt
from rewards import (
    BaseAndBonus,
    Ensemble,
    FunctionReward,
    Reward,
    RewardOutput,
    SaturationReward,
    ShapesGenEvalReward,
    WeightedSum,
    build_reward,
    register_reward,
    registered_rewards,
    zscore,
)
from rewards import base as reward_base

NAN = float("nan")


def my_reward(samples, prompts, offset=0.0):
    """Module-level scoring function, built by import path in the registry tests."""
    return samples.flatten(1).mean(1) + offset


def my_list_reward(samples, prompts, **kwargs):
    return [0.5 if i % 2 == 0 else None for i in range(samples.shape[0])]


class Fixed(Reward):
    """Returns given scores, ignoring the samples (for hand-computed compositions)."""

    requires_prompts = False

    def __init__(self, scores, name="fixed", raw_range=(-math.inf, math.inf)):
        self.values = torch.tensor(scores, dtype=torch.float32)
        self.name = name
        self.raw_range = raw_range

    def score(self, samples, prompts, **kwargs):
        return self.values


def as_float(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255  # (3, H, W)


def blank(batch: int, size: int = 8) -> torch.Tensor:
    return torch.full((batch, 3, size, size), 0.5)


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=atol, rtol=0,
                               equal_nan=True)


# ----------------------------------------------------------------------------- shapes_geneval


@pytest.fixture(scope="module")
def ground_truth():
    """Two prompts per tag and their rendered ground-truth scenes as float [B, 3, 64, 64]."""
    metas = [next(m for m in all_prompts() if m["tag"] == tag) for tag in TAGS]
    metas += [[m for m in all_prompts() if m["tag"] == tag][-1] for tag in TAGS]
    images = torch.stack([as_float(render(scene_for_prompt(m, seed))) for seed, m in enumerate(metas)])
    return metas, images


def test_shapes_geneval_ground_truth_scores_one(ground_truth):
    metas, images = ground_truth
    prompts = [m["prompt"] for m in metas]
    partial = build_reward("shapes_geneval")(images, prompts)
    strict = build_reward({"name": "shapes_geneval", "mode": "strict"})(images, prompts)
    close(partial.scores, [1.0] * len(metas))
    close(strict.scores, [1.0] * len(metas))
    assert partial.nan_count == 0 and partial.extras["missing_metadata"] == 0
    assert partial.extras["per_tag_strict"] == {tag: 1.0 for tag in TAGS}
    assert partial.extras["reasons"] == [""] * len(metas)


def test_shapes_geneval_blank_background_scores_low(ground_truth):
    metas, _ = ground_truth
    background = torch.tensor(BACKGROUND, dtype=torch.float32)[:, None, None] / 255
    images = background.expand(len(metas), 3, 64, 64).clone()
    out = ShapesGenEvalReward()(images, [m["prompt"] for m in metas])
    assert out.scores.max() == 0.0
    assert out.extras["strict"].sum() == 0.0


def test_shapes_geneval_unknown_prompt_is_nan_and_counted(ground_truth):
    metas, images = ground_truth
    prompts = [m["prompt"] for m in metas[:3]]
    prompts[1] = "a photo of a dragon"
    prompts[2] = prompts[2].upper() + "."  # case and a final full stop are ignored
    out = ShapesGenEvalReward()(images[:3], prompts)
    close(out.scores, [1.0, NAN, 1.0])
    assert out.nan_count == 1
    assert out.extras["missing_metadata"] == 1 and out.extras["missing_prompts"] == ["a photo of a dragon"]
    assert out.extras["reasons"][1] is None


def test_shapes_geneval_metadata_kwarg(ground_truth):
    metas, images = ground_truth
    # metadata wins over prompt text (prompts may be absent); None entries fall back to the prompt.
    out = ShapesGenEvalReward(mode="strict")(images[:2], None, metadata=metas[:2])
    close(out.scores, [1.0, 1.0])
    swapped = ShapesGenEvalReward()(images[:2], ["unrelated", metas[1]["prompt"]], metadata=[metas[1], None])
    assert swapped.scores[0] < 1.0 and swapped.scores[1] == 1.0
    with pytest.raises(ValueError, match="needs prompts .* or metadata"):
        ShapesGenEvalReward()(images[:2], None)
    with pytest.raises(ValueError, match="2 entries in metadata= for 3 samples"):
        ShapesGenEvalReward()(images[:3], None, metadata=metas[:2])


def test_shapes_geneval_rejects_video_and_resizes(ground_truth):
    metas, images = ground_truth
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\), got a 5-D"):
        ShapesGenEvalReward()(images[:1, :, None], [metas[0]["prompt"]])
    big = torch.nn.functional.interpolate(images[:2], scale_factor=2, mode="nearest")
    close(ShapesGenEvalReward()(big, [m["prompt"] for m in metas[:2]]).scores, [1.0, 1.0])
    with pytest.raises(ValueError, match="needs 64x64 images, got 128x128"):
        ShapesGenEvalReward(resize=False)(big, [m["prompt"] for m in metas[:2]])


# ----------------------------------------------------------------------------- saturation


def test_saturation_by_hand_and_gradient_reaches_pixels():
    grey = torch.full((1, 3, 2, 2), 0.5)
    red = torch.tensor([1.0, 0.0, 0.0])[None, :, None, None].expand(1, 3, 2, 2)
    half = torch.tensor([0.8, 0.4, 0.4])[None, :, None, None].expand(1, 3, 2, 2)  # S = 0.5
    close(SaturationReward()(torch.cat([grey, red, half, torch.zeros(1, 3, 2, 2)])).scores, [0.0, 1.0, 0.5, 0.0])

    samples = torch.rand(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    out = build_reward("shapes_saturation")(samples, None)  # videos too
    assert out.scores.requires_grad
    out.scores.sum().backward()
    assert samples.grad is not None and samples.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- registry


def test_build_by_name_and_dict():
    assert {"shapes_geneval", "shapes_saturation", "weighted_sum", "base_and_bonus", "ensemble"} <= set(
        registered_rewards())
    reward = build_reward("shapes_geneval")
    assert isinstance(reward, ShapesGenEvalReward) and reward.name == "shapes_geneval"
    strict = build_reward({"type": "shapes_geneval", "name": "geneval_strict", "mode": "strict"})
    assert strict.mode == "strict" and strict.name == "geneval_strict"
    assert build_reward(reward) is reward


def test_build_by_import_path():
    for path in ("tests.test_rewards_core:my_reward", "tests.test_rewards_core.my_reward"):
        reward = build_reward(path)
        assert isinstance(reward, FunctionReward) and reward.name == "my_reward"
        close(reward(torch.full((2, 3, 4, 4), 0.25), ["a", "b"]).scores, [0.25, 0.25])
    shifted = build_reward({"name": "tests.test_rewards_core:my_reward", "offset": 1.0})
    close(shifted(torch.full((1, 3, 4, 4), 0.25), None).scores, [1.25])
    cls = build_reward({"type": "rewards.shapes:ShapesGenEvalReward", "mode": "strict"})
    assert isinstance(cls, ShapesGenEvalReward) and cls.mode == "strict"


def test_unknown_name_lists_registered_names():
    with pytest.raises(ValueError, match="unknown reward 'nope'.*shapes_geneval.*shapes_saturation"):
        build_reward("nope")
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod' \\(No module named"):
        build_reward("no_such_pkg.mod:f")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        build_reward("tests.test_rewards_core:missing")
    with pytest.raises(ValueError, match="needs a 'name' or 'type'"):
        build_reward({"weight": 1.0})
    with pytest.raises(TypeError, match="shapes_geneval"):
        build_reward({"name": "shapes_geneval", "bogus": 1})


def test_register_reward_decorator_and_function_reward():
    try:
        @register_reward("test_constant")
        def make_constant(value=1.0):  # a factory
            return FunctionReward(lambda s, p: torch.full((s.shape[0],), value), raw_range=(value, value))

        register_reward("test_list", scoring_function=True)(my_list_reward)
        close(build_reward({"name": "test_constant", "value": 3.0})(blank(2)).scores, [3.0, 3.0])
        out = build_reward("test_list")(blank(3))
        close(out.scores, [0.5, NAN, 0.5])  # None -> NaN, counted
        assert out.nan_count == 1
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_constant")(my_reward)
    finally:
        reward_base._REGISTRY.pop("test_constant", None)
        reward_base._REGISTRY.pop("test_list", None)


# ----------------------------------------------------------------------------- validation


def test_input_validation_messages():
    reward = SaturationReward()
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\) or videos .* got a 3-D"):
        reward(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="expected 3 \\(RGB\\) channels in dim 1, got shape \\(2, 8, 8, 3\\)"):
        reward(torch.rand(2, 8, 8, 3))
    with pytest.raises(ValueError, match=r"must be in \[0, 1\], got values in \[-1, .*use samples / 2 \+ 0.5"):
        reward(torch.linspace(-1, 1, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[0, 255\]: divide by 255"):
        reward(torch.full((1, 3, 4, 4), 200.0))
    with pytest.raises(TypeError, match="float in \\[0, 1\\], got torch.uint8"):
        reward(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN/inf"):
        reward(torch.full((1, 3, 4, 4), NAN))
    with pytest.raises(ValueError, match="got 1 prompts for 2 samples"):
        reward(blank(2), ["only one"])
    with pytest.raises(TypeError, match="prompts must be a list of strings, got str"):
        reward(blank(2), "a single string")
    with pytest.raises(ValueError, match="got 3 entries in group_ids= for 2 samples"):
        reward(blank(2), group_ids=torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="group_ids= must be a 1-D tensor"):
        reward(blank(2), group_ids=torch.zeros(2, 1))
    reward(torch.full((1, 3, 4, 4), 1.0005))  # decoder round-off within the tolerance is fine
    with pytest.raises(ValueError, match="scores must have shape \\[2\\], got \\[3\\]"):
        FunctionReward(lambda s, p: torch.zeros(3), name="bad")(blank(2))
    with pytest.raises(ValueError, match="needs prompts"):
        FunctionReward(my_reward, requires_prompts=True)(blank(1), None)


# ----------------------------------------------------------------------------- WeightedSum


def test_zscore_batch_and_group_by_hand():
    scores = torch.tensor([1.0, 3.0, 10.0, 20.0, NAN])
    # batch over the 4 valid: mean 8.5, population std sqrt(((7.5)^2+(5.5)^2+1.5^2+11.5^2)/4)
    std = math.sqrt((7.5**2 + 5.5**2 + 1.5**2 + 11.5**2) / 4)
    close(zscore(scores), [-7.5 / std, -5.5 / std, 1.5 / std, 11.5 / std, NAN], atol=1e-4)
    # groups {0,1}, {2,3,4}: each valid pair is (-1, +1); group of one equal value -> 0
    close(zscore(scores, torch.tensor([0, 0, 5, 5, 5])), [-1.0, 1.0, -1.0, 1.0, NAN], atol=1e-4)
    close(zscore(torch.tensor([2.0, 7.0]), torch.tensor([0, 1])), [0.0, 0.0])


def test_weighted_sum_by_hand():
    a, b = Fixed([1.0, 2.0, 3.0, 4.0], "a", (0, 5)), Fixed([10.0, 0.0, 10.0, 0.0], "b", (0, 10))
    raw = WeightedSum([(a, 1.0), (b, 0.5)])
    out = raw(blank(4))
    close(out.scores, [6.0, 2.0, 8.0, 4.0])
    close(out.extras["a"], [1.0, 2.0, 3.0, 4.0])
    close(out.extras["b"], [10.0, 0.0, 10.0, 0.0])
    assert raw.raw_range == (0.0, 10.0)

    batch = WeightedSum([(a, 1.0), (b, 0.5)], normalize="batch")(blank(4))
    za = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / math.sqrt(1.25)
    close(batch.scores, (za + 0.5 * torch.tensor([1.0, -1.0, 1.0, -1.0])).tolist(), atol=1e-4)

    group = WeightedSum([(a, 1.0), (b, 0.5)], normalize="group")(blank(4), group_ids=torch.tensor([0, 0, 1, 1]))
    close(group.scores, [-1.0 + 0.5, 1.0 - 0.5, -1.0 + 0.5, 1.0 - 0.5], atol=1e-4)
    close(group.extras["a/normalized"], [-1.0, 1.0, -1.0, 1.0], atol=1e-4)
    with pytest.raises(ValueError, match="normalize='group' needs group_ids"):
        WeightedSum([a], normalize="group")(blank(4))


def test_group_normalisation_stops_a_large_reward_drowning_a_small_one():
    # Two groups of four; within each group `small` and `large` disagree on which sample is
    # best, and `large` is on a 1000x scale (plus a per-group offset).
    small = Fixed([0.0, 1.0, 0.0, 1.0, 0.2, 0.4, 0.2, 0.4], "small")
    large = Fixed([0.0, 0.0, 1000.0, 1000.0, 5000.0, 5000.0, 7000.0, 7000.0], "large")
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    unnormalised = WeightedSum([small, large])(blank(8)).scores
    assert unnormalised[1] < unnormalised[2]  # large decides: small's preference is lost
    out = WeightedSum([small, large], normalize="group")(blank(8), group_ids=groups).scores
    # z(small) = z(large) = +-1 within each group: both members count equally, so the samples
    # preferred by exactly one member tie, and the one both prefer wins.
    close(out, [-2.0, 0.0, 0.0, 2.0] * 2, atol=1e-4)


def test_weighted_sum_nan_policies():
    a = Fixed([1.0, NAN, 3.0, NAN], "a")
    b = Fixed([1.0, 2.0, NAN, NAN], "b")
    propagate = WeightedSum([(a, 1.0), (b, 3.0)])(blank(4))
    close(propagate.scores, [4.0, NAN, NAN, NAN])
    assert propagate.nan_count == 3
    # ignore: present members' weights are rescaled to the full weight mass (4)
    ignore = WeightedSum([(a, 1.0), (b, 3.0)], nan_policy="ignore")(blank(4))
    close(ignore.scores, [4.0, 2.0 * 3.0 * 4 / 3, 3.0 * 4 / 1, NAN])
    # NaN is excluded from the z-score statistics and stays NaN
    z = WeightedSum([a, b], normalize="batch", nan_policy="ignore")(blank(4))
    close(z.extras["a/normalized"], [-1.0, NAN, 1.0, NAN], atol=1e-4)


def test_weighted_sum_from_nested_spec():
    spec = {
        "type": "weighted_sum",
        "normalize": "group",
        "rewards": [
            {"name": "shapes_saturation", "weight": 1.0},
            {"type": "ensemble", "name": "sat_ens", "weight": 0.5, "mode": "min",
             "members": ["shapes_saturation", {"name": "tests.test_rewards_core:my_reward"}]},
        ],
    }
    reward = build_reward(spec)
    assert isinstance(reward, WeightedSum) and reward.weights == [1.0, 0.5]
    assert isinstance(reward.members[1], Ensemble) and reward.member_names == ["shapes_saturation", "sat_ens"]
    samples = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = reward(samples, None, group_ids=torch.tensor([0, 0, 1, 1]))
    assert out.scores.shape == (4,) and out.nan_count == 0
    assert set(out.extras) >= {"shapes_saturation", "sat_ens", "sat_ens/extras"}
    scaled = build_reward({"name": "tests.test_rewards_core:my_reward", "weight": 2.0})
    close(scaled(torch.full((1, 3, 2, 2), 0.25)).scores, [0.5])


# ----------------------------------------------------------------------------- BaseAndBonus


def test_base_and_bonus_cme_qma_by_hand():
    base = Fixed([5.0, 3.0, 1.0, 4.0], "execution")  # 1-5 critic scores -> 1, .5, 0, .75
    bonus = Fixed([5.0, 1.0, 5.0, 3.0], "consistency")  # -> 1, 0, 1, .5
    cme = BaseAndBonus(base, bonus, mode="cme")(blank(4))
    close(cme.scores, [1.0 * (0.6 + 0.4), 0.5 * 0.6, 0.0, 0.75 * (0.6 + 0.4 * 0.5)])
    qma = BaseAndBonus(base, bonus, mode="qma")(blank(4))
    close(qma.scores, [1.0, 0.5 * 0.4, 0.0, 0.75 * (0.4 + 0.6 * 0.5)])
    close(qma.extras["base"], [5.0, 3.0, 1.0, 4.0])
    close(qma.extras["bonus/normalized"], [1.0, 0.0, 1.0, 0.5])
    custom = BaseAndBonus(base, bonus, mode="cme", floor=0.5, gain=0.5)(blank(4))
    close(custom.scores, [1.0, 0.25, 0.0, 0.75 * 0.75])


def test_base_and_bonus_guard_and_nan():
    base = Fixed([2.0, 3.0, 1.0, NAN, 2.0], "execution")
    bonus = Fixed([5.0, 5.0, 5.0, 5.0, NAN], "consistency")
    out = BaseAndBonus(base, bonus, mode="cme", guard="base")(blank(5))
    # raw execution <= 2 -> R = E alone (bonus ignored, even if NaN); NaN execution -> NaN
    close(out.scores, [0.25, 0.5 * 1.0, 0.0, NAN, 0.25])
    assert out.extras["guarded"].tolist() == [True, False, True, False, True]
    unguarded = BaseAndBonus(base, bonus, mode="cme")(blank(5))
    close(unguarded.scores, [0.25, 0.5, 0.0, NAN, NAN])
    # a separate guard reward (e.g. another critic) with its own threshold
    guard = Fixed([0.0, 0.0, 9.0, 9.0, NAN], "guard")
    other = BaseAndBonus(base, bonus, mode="cme", guard=guard, guard_threshold=1.0)(blank(5))
    close(other.scores, [0.25, 0.5, 0.0, NAN, NAN])
    # out-of-scale critic output is a failure, not a score
    close(BaseAndBonus(Fixed([7.0], "b"), Fixed([3.0], "x"))(blank(1)).scores, [NAN])


# ----------------------------------------------------------------------------- Ensemble


def test_ensemble_modes_by_hand():
    members = [Fixed([0.2, 0.9, 0.5], "m1", (0, 1)), Fixed([0.4, 0.1, 0.5], "m2", (0, 1)),
               Fixed([0.6, 0.5, NAN], "m3", (0, 1))]
    close(Ensemble(members, "mean")(blank(3)).scores, [0.4, 0.5, NAN])
    close(Ensemble(members, "min")(blank(3)).scores, [0.2, 0.1, NAN])
    std0 = math.sqrt((0.2**2 + 0 + 0.2**2) / 3)
    std1 = math.sqrt((0.4**2 + 0.4**2 + 0) / 3)
    out = Ensemble(members, "mean_minus_std", lam=0.5)(blank(3))
    close(out.scores, [0.4 - 0.5 * std0, 0.5 - 0.5 * std1, NAN])
    close(out.extras["std"], [std0, std1, NAN])
    ignore = Ensemble(members, "mean_minus_std", lam=0.5, nan_policy="ignore")(blank(3))
    close(ignore.scores[2:], [0.5])  # two members agree on 0.5: std 0
    close(Ensemble(members, "min", nan_policy="ignore")(blank(3)).scores, [0.2, 0.1, 0.5])
    assert Ensemble(members, "mean_minus_std", lam=1.0).raw_range == (-0.5, 1.0)


def test_ensemble_uwo_is_mean_minus_lambda_population_variance():
    """Coste et al. 2023 UWO, by hand: R = mean_i r_i - lam * (1/M) sum_i (r_i - mean)^2."""
    members = [Fixed([0.2, 0.9, 0.5], "m1", (0, 1)), Fixed([0.4, 0.1, 0.5], "m2", (0, 1)),
               Fixed([0.6, 0.5, NAN], "m3", (0, 1))]
    # sample 0: mean 0.4, var (0.04 + 0 + 0.04) / 3; sample 1: mean 0.5, var (0.16 + 0.16 + 0) / 3
    out = Ensemble(members, "uwo", lam=0.5)(blank(3))
    close(out.scores, [0.4 - 0.5 * 0.08 / 3, 0.5 - 0.5 * 0.32 / 3, NAN])
    close(out.scores[:2], [0.386667, 0.446667])
    close(out.extras["var"], [0.08 / 3, 0.32 / 3, NAN])
    close(Ensemble(members, "uwo", lam=0.5, nan_policy="ignore")(blank(3)).scores[2:], [0.5])
    # the std form keeps its own name and differs: lam * 0.163 vs lam * 0.027 on sample 0
    close(Ensemble(members, "mean_minus_std", lam=0.5)(blank(3)).scores[:1], [0.4 - 0.5 * math.sqrt(0.08 / 3)])
    assert Ensemble(members, "uwo", lam=2.0).raw_range == (-0.5, 1.0)  # largest variance on [0, 1]: 1/4


def test_ensemble_uwo_on_z_scored_members():
    # members on scales 1-3 and 10-30: z-scores over the batch (population std) are
    # [-1.2247, 0, 1.2247] and [-1.2247, 1.2247, 0] (1.2247 = sqrt(1.5))
    members = [Fixed([1.0, 2.0, 3.0], "small"), Fixed([10.0, 30.0, 20.0], "large")]
    out = Ensemble(members, "uwo", lam=1.0, normalize="batch")(blank(3))
    close(out.extras["small/normalized"], [-1.224745, 0.0, 1.224745])
    close(out.extras["var"], [0.0, 0.375, 0.375])  # (sqrt(1.5) / 2)^2
    close(out.scores, [-1.224745, 0.612372 - 0.375, 0.612372 - 0.375])
    raw = Ensemble(members, "uwo", lam=1.0)(blank(3))  # unnormalised, the large member's spread dominates
    close(raw.scores, [5.5 - 20.25, 16.0 - 196.0, 11.5 - 72.25])
    groups = torch.tensor([0, 0, 1])
    grouped = Ensemble(members, "uwo", normalize="group")(blank(3), group_ids=groups)
    close(grouped.extras["large/normalized"], [-1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="group_ids"):
        Ensemble(members, "uwo", normalize="group")(blank(3))
    assert Ensemble(members, "uwo", normalize="batch").raw_range == (-math.inf, math.inf)
    spec = build_reward({"type": "ensemble", "mode": "uwo", "lam": 0.5, "normalize": "batch",
                         "members": [{"name": "shapes_saturation"}, {"name": "shapes_saturation"}]})
    assert spec.mode == "uwo" and spec.member_names == ["shapes_saturation", "shapes_saturation_2"]


def test_reward_output_and_composites_are_differentiable_when_members_are():
    out = RewardOutput([1.0, None])
    assert out.scores.dtype == torch.float32 and out.nan_count == 1
    samples = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    reward = Ensemble([SaturationReward(), FunctionReward(my_reward, differentiable=True)], "mean_minus_std")
    assert reward.differentiable
    reward(samples, None).scores.sum().backward()
    assert samples.grad.abs().sum() > 0
    assert not WeightedSum([SaturationReward(), ShapesGenEvalReward()]).differentiable

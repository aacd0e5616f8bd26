"""Advantage Weighted Matching: the weighted flow-matching log-likelihood, and the trainer end to end."""

from __future__ import annotations

import pytest
import torch

from align.losses import awm_log_prob


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    v, v_star = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    return v, v_star, torch.tensor([0.2, 0.5, 0.9])


def test_weightings_by_hand():
    v, v_star, t = _case()
    e = (v - v_star).square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(awm_log_prob(v, v_star, t, "uniform"), -e)
    torch.testing.assert_close(awm_log_prob(v, v_star, t, "t"), -t * e)
    torch.testing.assert_close(awm_log_prob(v, v_star, t, "t2"), -t * t * e)
    torch.testing.assert_close(awm_log_prob(v, v_star, t, "huber"), -t * ((e + 1e-10).sqrt() - 1e-5))
    p = 0.25
    torch.testing.assert_close(awm_log_prob(v, v_star, t, "ghuber", p), -t * ((e + 1e-10) ** p - 1e-10 ** p) / p)
    # ghuber with power 1 is the t weighting
    torch.testing.assert_close(awm_log_prob(v, v_star, t, "ghuber", 1.0), -t * e, rtol=1e-5, atol=1e-9)


def test_gradient_is_advantage_weighted_score_matching():
    """At ratio 1 the clipped loss's gradient is -A grad log p: descent moves v toward v* for A > 0."""
    from align.losses import clipped_policy_loss

    v, v_star, t = _case(1)
    v = v.requires_grad_(True)
    lp = awm_log_prob(v, v_star, t, "uniform")
    loss, _ = clipped_policy_loss(lp, lp.detach(), torch.tensor([1.0, -1.0, 0.0]), 1.0)
    (grad,) = torch.autograd.grad(loss, v)
    D = v[0].numel()
    expected = torch.stack([2 * (v[0] - v_star[0]) / D, -2 * (v[1] - v_star[1]) / D, torch.zeros_like(v[2])]) / 3
    torch.testing.assert_close(grad, expected.detach())


def test_unknown_weighting_is_named():
    v, v_star, t = _case()
    with pytest.raises(ValueError, match="weighting"):
        awm_log_prob(v, v_star, t, "cosine")


@pytest.mark.parametrize("updates", [1, 2])
def test_awm_trains_lora_and_first_ratio_is_one(tmp_path, updates):
    from align.awm import AWMConfig, train
    from align.config import load_config
    from align.metrics import read_metrics_csv

    cfg = load_config(AWMConfig, "configs/shapes/awm.yaml", [
        "model=toy:test", "reward=shapes_saturation", "num_epochs=2", "group_size=4", "groups_per_epoch=2",
        "sampler.batch_size=8", "sampler.num_steps=6", "sampler.eval_num_steps=2", "prompts.eval_per_tag=1",
        "eval_every=0", "monitor_rewards=[]", "lora.rank=4", "lora.alpha=8", "micro_batch_size=4",
        f"updates_per_epoch={updates}", "clip_range=1e-4", "quiet=true", f"output_dir={tmp_path}"])
    train(cfg)
    rows = read_metrics_csv(tmp_path / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    for row in rows:
        assert row["optimizer_steps"] == updates and row["grad_norm"] > 0
        if updates == 1:  # on-policy: the ratio is exactly 1
            assert row["ratio_min"] == row["ratio_max"] == 1.0
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").is_file()

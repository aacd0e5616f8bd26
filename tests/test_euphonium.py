"""Euphonium's math (ALGORITHMS.md section 5): lambda, dual-reward advantages (process term 0
outside the window), the summed clipped losses, and the distillation target that turns the
guided step into the unguided step of the distilled velocity."""

import pytest
import torch

from align.euphonium import (distillation_kl, distillation_target, dual_advantages, dual_clipped_loss,
                             guidance_lambda, window_mask)
from samplers.steps import dance_sde_step, guided_sde_step


def test_lambda_and_window():
    assert guidance_lambda(0.25, 3.125) == pytest.approx(0.01)  # the paper's defaults
    assert window_mask(16, (12, 16)).tolist() == [False] * 12 + [True] * 4
    with pytest.raises(ValueError, match="beta"):
        guidance_lambda(0.25, 0.0)
    with pytest.raises(ValueError, match="window"):
        window_mask(16, (12, 17))


def test_dual_advantages_by_hand():
    groups = [0, 0, 1, 1]
    window = window_mask(3, (1, 3))
    process = torch.tensor([[9.0, 1.0, 2.0], [7.0, 3.0, 2.0], [5.0, 0.0, 4.0], [1.0, 2.0, 0.0]])
    outcome = torch.tensor([1.0, 0.0, 0.5, 0.5])
    a_process, a_outcome = dual_advantages(process, outcome, groups, window, std="none", clip=None)
    assert a_process[:, 0].eq(0).all()  # outside the window: exactly 0, whatever r_p says
    torch.testing.assert_close(a_process[:, 1], torch.tensor([-1.0, 1.0, -1.0, 1.0]))
    torch.testing.assert_close(a_process[:, 2], torch.tensor([0.0, 0.0, 2.0, -2.0]))  # tied group -> 0
    torch.testing.assert_close(a_outcome, torch.tensor([0.5, -0.5, 0.0, 0.0]))
    # per-group std (DanceGRPO form): each group's advantages are +-1 for two distinct values
    a_process, _ = dual_advantages(process, outcome, groups, window, std="group")
    assert a_process[:, 1].abs().tolist() == pytest.approx([1.0] * 4, rel=1e-3)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        dual_advantages(process[:, :2], outcome, groups, window)


def test_dual_loss_is_the_sum_of_two_clipped_surrogates():
    log_prob = torch.tensor([0.1, -0.2, 0.05], requires_grad=True)
    old = torch.tensor([0.1, -0.2, 0.05])
    a_out, a_proc = torch.tensor([1.0, -1.0, 0.5]), torch.tensor([0.5, 0.0, -2.0])
    loss, metrics = dual_clipped_loss(log_prob, old, a_out, a_proc, clip_range=1e-4)
    # ratio 1: L = -mean(A_out) - mean(A_proc), gradient -(A_out + A_proc) / B
    assert loss.item() == pytest.approx(-(a_out.mean() + a_proc.mean()).item())
    loss.backward()
    torch.testing.assert_close(log_prob.grad, -(a_out + a_proc) / 3)
    assert metrics["process_loss"].item() == pytest.approx(-a_proc.mean().item())


@pytest.mark.parametrize("sigma,sigma_next", [(0.9, 0.8), (0.4, 0.3), (0.1, 0.05)])
def test_distilled_velocity_reproduces_the_guided_step(sigma, sigma_next):
    gen = torch.Generator().manual_seed(0)
    x, v, grad, z = (torch.randn(3, 4, 8, 8, generator=gen) for _ in range(4))
    eta, lam = 0.25, guidance_lambda(0.25, 3.125)
    guided = guided_sde_step(x, v, sigma, sigma_next, eta=eta, grad=grad, guidance_lambda=lam, noise=z)
    target = distillation_target(v, grad, sigma, lam, eta)
    distilled = dance_sde_step(x, target, sigma, sigma_next, eta=eta, noise=z)
    torch.testing.assert_close(distilled.mean, guided.guided_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(distilled.next, guided.next, atol=1e-6, rtol=1e-5)
    kl = distillation_kl(distilled.mean, guided.guided_mean, eta, sigma - sigma_next)
    assert kl.shape == (3,) and kl.abs().max() < 1e-8
    # the unguided velocity is off by exactly the guidance shift: KL = lambda^2 D mean(grad^2) / (2 eta^2)
    plain = dance_sde_step(x, v, sigma, sigma_next, eta=eta, noise=z)
    d = sigma - sigma_next
    expected = (lam * d * grad).square().flatten(1).mean(1) / (2 * eta**2 * d)
    torch.testing.assert_close(distillation_kl(plain.mean, guided.guided_mean, eta, d), expected, rtol=1e-4, atol=1e-9)


# ----------------------------------------------------------------------------- the trainer (variant euphonium)


def _prm_folder(tmp_path, model):
    from rewards.process_reward import LatentPRM, prompt_vectors, save_prm

    torch.manual_seed(0)
    dim = prompt_vectors(model, ["a circle"]).shape[1]
    return save_prm(tmp_path / "prm", LatentPRM(latent_channels=4, text_dim=dim, hidden=8), {})


def test_euphonium_rollouts_follow_the_process_reward_in_the_window_only(tmp_path):
    from align.data import PromptDataset, load_prompt_items
    from align.flow_grpo import collect_rollouts, compute_process_advantages, epoch_step_schedule, \
        resolve_variant_defaults
    from rewards import build_reward
    from tests.test_flow_grpo import fresh_model, tiny_config

    model = fresh_model().eval()
    prm_dir = _prm_folder(tmp_path, model)
    cfg = resolve_variant_defaults(tiny_config(tmp_path, variant="euphonium", sampler=dict(num_steps=8),
                                               euphonium=dict(prm=str(prm_dir), guidance_lambda=50.0, distill_weight=1.0)))
    types, params, trained = epoch_step_schedule(cfg, 0)
    assert types == ["dance_sde"] * 6 + ["guided"] * 2 and trained == list(range(8))  # last quarter guided
    assert params["guided"]["guidance_lambda"] == 50.0 and cfg.clip_range == 1e-4 and cfg.share_initial_noise

    from rewards.process_reward import load_prm

    prm = load_prm(prm_dir)
    batch = PromptDataset(load_prompt_items("train"), seed=0).epoch_batch(0, 2, 4)
    reward = build_reward("shapes_saturation")
    guided = collect_rollouts(model, reward, batch, cfg, 0, types, params, prm)
    plain_types = ["dance_sde"] * 8
    plain = collect_rollouts(model, reward, batch, cfg, 0, plain_types, {"eta": cfg.sampler.eta})
    a, b = guided.trajectory.latents, plain.trajectory.latents  # same seeds: same noise
    assert torch.equal(a[:, :7], b[:, :7])  # identical until the first guided step's output
    assert not torch.allclose(a[:, 7], b[:, 7])
    assert sorted(guided.guided_means) == [6, 7] and guided.guided_means[6].shape == a[:, 6].shape
    # the guided step raised r_p relative to the unguided one from the same state and noise
    from align.euphonium import prompt_vector

    text = prompt_vector(guided.cond)
    sigma = guided.trajectory.sigmas[7].expand(len(a))
    with torch.no_grad():
        assert (prm(a[:, 7], sigma, text) > prm(b[:, 7], sigma, text)).float().mean() >= 0.75

    class One:  # a single process
        num_processes, device = 1, torch.device("cpu")

    # the process rewards kept during sampling are r_p of each guided step's input state
    recorded = guided.process_rewards
    assert recorded.shape == (8, 8) and recorded[:, :6].isnan().all()
    with torch.no_grad():
        for k in (6, 7):
            expected = prm(a[:, k], guided.trajectory.sigmas[k].expand(len(a)), text)
            torch.testing.assert_close(recorded[:, k], expected, rtol=1e-5, atol=1e-6)
    process, metrics = compute_process_advantages(cfg, guided, batch, One())
    assert process.shape == (8, 8) and process[:, :6].eq(0).all() and process[:, 6:].abs().sum() > 0
    assert "process_reward_mean" in metrics


def test_euphonium_trains_end_to_end_with_distillation(tmp_path):
    from align.flow_grpo import train
    from align.metrics import read_metrics_csv
    from tests.test_flow_grpo import fresh_model, tiny_config

    prm_dir = _prm_folder(tmp_path, fresh_model())
    cfg = tiny_config(tmp_path, variant="euphonium", num_epochs=2, step_fraction=1.0,
                      euphonium=dict(prm=str(prm_dir), guidance_lambda=1.0, distill_weight=1.0))
    model = fresh_model()
    train(cfg, model=model)
    rows = read_metrics_csv(tmp_path / "run" / "metrics.csv")
    assert [r["epoch"] for r in rows] == [0, 1]
    for row in rows:
        assert row["first_update_ratio_error"] == 0.0  # re-scoring under the unguided mean is exact
        assert row["distill_kl"] > 0 and "process_reward_mean" in row
    # zero-initialised lora_B moved, except the one that gets no gradient (see test_flow_grpo)
    last = len(model.transformer.transformer_blocks) - 1
    still_zero = {n for n, p in model.transformer.named_parameters() if "lora_B" in n and p.abs().sum() == 0}
    assert still_zero == {f"transformer_blocks.{last}.attn.add_q_proj.lora_B.default.weight"}


def test_euphonium_needs_a_process_reward_model(tmp_path):
    from tests.test_flow_grpo import tiny_config

    with pytest.raises(ValueError, match="euphonium.prm"):
        tiny_config(tmp_path, variant="euphonium")


def test_euphonium_with_a_decoded_process_reward_trains_and_records_it(tmp_path):
    """euphonium.process_reward: a differentiable reward on x0_hat guides the window steps instead of
    a trained PRM; its values there are the process rewards, and training runs end to end."""
    from align.flow_grpo import train
    from align.metrics import read_metrics_csv
    from tests.test_flow_grpo import fresh_model, tiny_config

    with pytest.raises(ValueError, match="not both"):
        tiny_config(tmp_path, variant="euphonium", euphonium=dict(prm="somewhere", process_reward="shapes_saturation"))
    with pytest.raises(ValueError, match="process_reward"):
        tiny_config(tmp_path, variant="euphonium")
    cfg = tiny_config(tmp_path, variant="euphonium", num_epochs=2, step_fraction=1.0,
                      euphonium=dict(process_reward="shapes_saturation", guidance_lambda=1.0, distill_weight=1.0))
    train(cfg, model=fresh_model())
    rows = read_metrics_csv(tmp_path / "run" / "metrics.csv")
    assert [r["epoch"] for r in rows] == [0, 1]
    for row in rows:
        assert row["first_update_ratio_error"] == 0.0 and row["distill_kl"] > 0
        assert 0 < row["process_reward_mean"] < 1  # shapes_saturation of x0_hat, in [0, 1]

"""Tests for samplers/: schedules, step functions, rollout. CPU, a few seconds in all."""

import math
import random

import pytest
import torch
from torch import nn

from samplers import (
    STEPS,
    FlowModel,
    StepOutput,
    cps_step,
    dance_sde_step,
    euler_ode_step,
    flow_grpo_sde_step,
    flow_sigmas,
    flux_sigmas,
    gaussian_log_prob,
    get_step,
    guided_sde_step,
    image_seq_len_shift_mu,
    kl_between_means,
    random_window,
    rescore,
    rescore_step,
    rollout,
    shift_sigmas,
    window_step_types,
)

torch.set_num_threads(1)

SHAPES = {"image": (3, 2, 4, 4), "video": (3, 2, 3, 4, 4)}  # (B, C, H, W) and (B, C, T, H, W)


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# ----------------------------------------------------------------------------- models


class GaussianFlow:
    """Exact velocity of x0 ~ N(mu, std^2) per element (a FlowModel).

    x_t = (1 - t) x0 + t eps and v = eps - x0 are jointly Gaussian, so
    E[v | x_t] = E[v] + Cov(v, x_t) / Var(x_t) (x_t - E[x_t]) with E[v] = -mu, E[x_t] = (1 - t) mu,
    Cov(v, x_t) = t - (1 - t) std^2, Var(x_t) = (1 - t)^2 std^2 + t^2.
    """

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, mu, std, latent_shape=(1, 1, 1)):
        self.mu, self.std, self.latent_shape = mu, std, latent_shape

    def velocity(self, latents, sigma, cond, guidance):
        t = sigma.reshape(-1, *[1] * (latents.ndim - 1))
        var_t = (1 - t) ** 2 * self.std**2 + t**2
        return -self.mu + (t - (1 - t) * self.std**2) / var_t * (latents - (1 - t) * self.mu)


class TinyLinearFlow(nn.Module):
    """A trainable per-channel linear velocity field for images and videos (a FlowModel)."""

    def __init__(self, latent_shape, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        channels = latent_shape[0]
        self.latent_shape = latent_shape
        self.proj = nn.Linear(channels, channels)
        self.time = nn.Linear(1, channels)
        self.calls = 0

    @property
    def dtype(self):
        return torch.float32

    @property
    def device(self):
        return torch.device("cpu")

    def velocity(self, latents, sigma, cond, guidance):
        self.calls += 1
        assert sigma.shape == (latents.shape[0],)
        v = self.proj(latents.movedim(1, -1)).movedim(-1, 1)
        bias = self.time(sigma[:, None]).reshape(*v.shape[:2], *[1] * (v.ndim - 2))
        return guidance * (v + bias + cond.reshape(-1, *[1] * (v.ndim - 1)))


# ----------------------------------------------------------------------------- 1. schedules


@pytest.mark.parametrize("num_steps", [1, 4, 10, 40])
def test_flow_sigmas_match_diffusers_sd3_scheduler(num_steps):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(num_steps)
    ours = flow_sigmas(num_steps, shift=3.0)
    assert ours.dtype == torch.float32 and ours.shape == (num_steps + 1,)
    assert torch.equal(ours, scheduler.sigmas)
    assert torch.equal(ours[:-1] * 1000, scheduler.timesteps)
    assert ours[0] == 1 and ours[-1] == 0


@pytest.mark.parametrize("num_steps,image_seq_len", [(4, 256), (28, 1024)])
def test_flux_sigmas_match_diffusers_dynamic_shift(num_steps, image_seq_len):
    diffusers = pytest.importorskip("diffusers")
    import numpy as np

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    scheduler.set_timesteps(
        sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=image_seq_len_shift_mu(image_seq_len)
    )
    assert torch.equal(flux_sigmas(num_steps, image_seq_len), scheduler.sigmas)


def test_shift_formula():
    sigma = torch.linspace(0, 1, 11)
    assert torch.allclose(shift_sigmas(sigma, 3.0), 3 * sigma / (1 + 2 * sigma))
    assert torch.equal(shift_sigmas(sigma, 1.0), sigma)
    assert shift_sigmas(0.5, 3.0) == pytest.approx(0.75)
    assert shift_sigmas(1.0, 5.0) == 1.0 and shift_sigmas(0.0, 5.0) == 0.0


# ----------------------------------------------------------------------------- 2. limits


@pytest.mark.parametrize("kind", ["image", "video"])
def test_zero_noise_limits_equal_euler(kind):
    x, v = _inputs(SHAPES[kind])
    sigma, sigma_next = torch.tensor([1.0, 0.7, 0.3]), torch.tensor([0.8, 0.5, 0.0])
    euler = euler_ode_step(x, v, sigma, sigma_next)
    assert torch.equal(euler.next, x + v * (sigma_next - sigma).reshape(-1, *[1] * (x.ndim - 1)))
    assert torch.equal(euler.log_prob, torch.zeros(3)) and torch.equal(euler.std, torch.zeros(3))

    noise = torch.randn_like(x)
    flow = flow_grpo_sde_step(x, v, sigma, sigma_next, noise_level=0.0, noise=noise)
    dance = dance_sde_step(x, v, sigma, sigma_next, eta=0.0, noise=noise)
    for out in (flow, dance):
        assert torch.equal(out.next, euler.next) and torch.equal(out.mean, euler.mean)
        assert torch.equal(out.log_prob, torch.zeros(3))
    # CPS with a = 0: x0_hat (1 - s') + eps_hat s' = x + v (s' - s) algebraically; equal up to rounding.
    cps = cps_step(x, v, sigma, sigma_next, noise_level=0.0, noise=noise)
    assert torch.allclose(cps.next, euler.next, atol=1e-6)
    # Zero noise (z = 0) on a stochastic step returns its mean.
    out = flow_grpo_sde_step(x, v, sigma, sigma_next, noise=torch.zeros_like(x))
    assert torch.equal(out.next, out.mean)


def test_formulas_match_the_papers_forms():
    x, v = _inputs(SHAPES["video"])
    t, t_next, a, eta = 0.6, 0.45, 0.7, 0.3
    dt = t_next - t
    g = a * math.sqrt(t / (1 - t))
    out = flow_grpo_sde_step(x, v, t, t_next, noise_level=a, noise=torch.zeros_like(x))
    assert torch.allclose(out.mean, x + (v + g**2 / (2 * t) * (x + (1 - t) * v)) * dt, atol=1e-6)
    assert torch.allclose(out.std, torch.full((3,), g * math.sqrt(-dt)))
    assert torch.allclose(out.noise_scale, torch.full((3,), g))

    out = dance_sde_step(x, v, t, t_next, eta=eta, noise=torch.zeros_like(x))
    x0_hat = x - t * v
    score = -(x - (1 - t) * x0_hat) / t**2  # DanceGRPO's form
    assert torch.allclose(out.mean, x + dt * (v - eta**2 / 2 * score), atol=1e-6)
    assert torch.allclose(out.std, torch.full((3,), eta * math.sqrt(-dt)))

    out = cps_step(x, v, t, t_next, noise_level=a, noise=torch.zeros_like(x))
    std = t_next * math.sin(a * math.pi / 2)
    expected = x0_hat * (1 - t_next) + (x + (1 - t) * v) * math.sqrt(t_next**2 - std**2)
    assert torch.allclose(out.mean, expected, atol=1e-6)
    assert torch.allclose(out.std, torch.full((3,), std))


def test_flow_grpo_first_step_uses_next_sigma_and_last_step_is_finite():
    x, v = _inputs(SHAPES["image"])
    sigmas = flow_sigmas(10, shift=3.0)
    first = flow_grpo_sde_step(x, v, sigmas[0], sigmas[1], noise_level=0.7)
    expected = 0.7 * math.sqrt(1 / (1 - sigmas[1].item()))
    assert torch.allclose(first.noise_scale, torch.full((3,), expected))
    for i in range(10):
        for name in STEPS:
            out = get_step(name)(x, v, sigmas[i], sigmas[i + 1])
            for t in (out.next, out.mean, out.std, out.log_prob):
                assert torch.isfinite(t).all(), (name, i)


def test_deterministic_steps_have_zero_log_prob_and_no_nan_gradients():
    x, v = _inputs(SHAPES["image"])
    v.requires_grad_(True)
    out = cps_step(x, v, 0.3, 0.0, log_prob_form="gaussian")  # std = sigma_next sin(.) = 0
    assert torch.equal(out.std, torch.zeros(3)) and torch.equal(out.log_prob, torch.zeros(3))
    assert torch.allclose(out.next, x - 0.3 * v)  # x0_hat
    out.log_prob.sum().backward()
    assert torch.isfinite(v.grad).all()
    assert torch.equal(gaussian_log_prob(x, v, 0.0), torch.zeros(3))
    assert torch.equal(kl_between_means(x, v, 0.0), torch.zeros(3))


def test_get_step_and_bad_arguments():
    assert get_step("dance_sde") is dance_sde_step
    with pytest.raises(ValueError, match="valid steps: cps, dance_sde, flow_grpo_sde, guided, ode"):
        get_step("sde")
    x, v = _inputs(SHAPES["image"])
    with pytest.raises(ValueError, match="reduction"):
        flow_grpo_sde_step(x, v, 0.5, 0.4, reduction="max")
    with pytest.raises(ValueError, match="reduction"):
        euler_ode_step(x, v, 0.5, 0.4, reduction="max")
    with pytest.raises(TypeError):
        dance_sde_step(x, v, 0.5, 0.4, noise_level=0.7)  # a typo'd parameter is an error


# ----------------------------------------------------------------------------- 3. log-probs


def _normal_log_prob(next, mean, std, reduction):
    std = std.reshape(-1, *[1] * (mean.ndim - 1))
    lp = torch.distributions.Normal(mean, std).log_prob(next)
    dims = tuple(range(1, lp.ndim))
    return lp.mean(dims) if reduction == "mean" else lp.sum(dims)


STOCHASTIC = [
    (flow_grpo_sde_step, {"noise_level": 0.7}),
    (dance_sde_step, {"eta": 0.3}),
    (cps_step, {"noise_level": 0.7, "log_prob_form": "gaussian"}),
    (guided_sde_step, {"eta": 0.3}),
]


@pytest.mark.parametrize("kind", ["image", "video"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("step,params", STOCHASTIC, ids=lambda p: getattr(p, "__name__", ""))
def test_log_prob_is_the_gaussian_density_and_rescoring_reproduces_it(kind, reduction, step, params):
    x, v = _inputs(SHAPES[kind])
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.2]), torch.tensor([0.9, 0.5, 0.05])  # per sample
    gen = torch.Generator().manual_seed(1)
    out = step(x, v, sigma, sigma_next, generator=gen, reduction=reduction, **params)
    assert isinstance(out, StepOutput) and out.next.dtype == torch.float32
    assert out.log_prob.shape == (3,) and out.std.shape == (3,)
    expected = _normal_log_prob(out.next, out.mean, out.std, reduction)
    assert torch.allclose(out.log_prob, expected, rtol=1e-5, atol=1e-4)
    assert torch.allclose(gaussian_log_prob(out.next, out.mean, out.std, reduction), expected, rtol=1e-5, atol=1e-4)
    again = step(x, v, sigma, sigma_next, next=out.next, reduction=reduction, **params)
    assert torch.equal(again.log_prob, out.log_prob) and torch.equal(again.next, out.next)
    # Same generator seed -> same sample; explicit noise -> mean + std z.
    same = step(x, v, sigma, sigma_next, generator=torch.Generator().manual_seed(1), reduction=reduction, **params)
    assert torch.equal(same.next, out.next)
    z = torch.randn_like(x)
    with_noise = step(x, v, sigma, sigma_next, noise=z, **params)
    assert torch.allclose(with_noise.next, with_noise.mean + with_noise.std.reshape(-1, *[1] * (x.ndim - 1)) * z)


@pytest.mark.parametrize("name", sorted(STEPS))
def test_float_and_per_sample_sigmas_give_bit_identical_steps(name):
    # Trainers may batch transitions of different steps (per-sample sigma tensors) and must
    # still reproduce the log-probs stored by the rollout (which passes python floats).
    x, v = _inputs(SHAPES["video"])
    sigmas = flow_sigmas(10, shift=3.0)  # fp32 values, as every schedule
    index = torch.tensor([0, 4, 9])
    outs = [get_step(name)(x[j : j + 1], v[j : j + 1], sigmas[i].item(), sigmas[i + 1].item(),
                           generator=torch.Generator().manual_seed(j)) for j, i in enumerate(index.tolist())]
    batched = get_step(name)(x, v, sigmas[index], sigmas[index + 1], next=torch.cat([o.next for o in outs]))
    assert torch.equal(batched.log_prob, torch.cat([o.log_prob for o in outs]))
    assert torch.equal(batched.mean, torch.cat([o.mean for o in outs]))
    assert torch.equal(batched.std, torch.cat([o.std for o in outs]))


def test_half_precision_inputs_compute_in_fp32():
    x, v = _inputs(SHAPES["video"])
    z = torch.randn_like(x)
    half = flow_grpo_sde_step(x.half(), v.bfloat16(), 0.6, 0.5, noise=z)
    assert half.next.dtype == half.log_prob.dtype == torch.float32


def test_cps_reference_log_prob_is_negative_squared_error():
    x, v = _inputs(SHAPES["image"])
    out = cps_step(x, v, 0.6, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.log_prob, -((out.next - out.mean) ** 2).mean(dim=(1, 2, 3)))


def test_kl_between_means():
    a, b = _inputs(SHAPES["video"])
    std = torch.tensor([0.5, 1.0, 2.0])
    kl = kl_between_means(a, b, std)
    expected = ((a - b) ** 2).mean(dim=(1, 2, 3, 4)) / (2 * std**2)
    assert kl.shape == (3,) and torch.allclose(kl, expected)
    std_b = std.reshape(-1, 1, 1, 1, 1)
    normal = torch.distributions.Normal
    exact = torch.distributions.kl_divergence(normal(a, std_b), normal(b, std_b))
    assert torch.allclose(kl, exact.mean(dim=(1, 2, 3, 4)), atol=1e-6)


# ----------------------------------------------------------------------------- 4. marginals


MARGINAL_STEPS = [("ode", {}), ("flow_grpo_sde", {"noise_level": 0.7}), ("dance_sde", {"eta": 0.3})]


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("step,params", MARGINAL_STEPS, ids=[name for name, _ in MARGINAL_STEPS])
def test_samplers_reach_the_true_marginal_of_a_gaussian(shift, step, params):
    # Tolerances (mean 0.02, variance 3%): with N = 40k samples the Monte Carlo std of the sample
    # variance is sqrt(2 / N) = 0.7% and of the mean std / sqrt(N) = 0.004; the initial noise is
    # standardised, so only the SDE noise adds Monte Carlo error. Euler(-Maruyama) is first order:
    # the exact variance bias of the discrete chains (see the next test) is -2.6% (ODE, shift 1)
    # to -4.1% (ODE, shift 3) at 100 steps, and -0.9% to -1.4% at the 300 used here, leaving
    # > 2 MC std of room.
    mu, std, n = 0.5, 0.8, 40_000
    model = GaussianFlow(mu, std)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(n, 1, 1, 1, generator=gen)
    noise = (noise - noise.mean()) / noise.std()
    traj = rollout(
        model, None, flow_sigmas(300, shift), step_types=step, step_params=params, initial_noise=noise, generator=gen
    )
    final = traj.final.double().flatten()
    assert abs(final.mean().item() - mu) < 0.02
    assert abs(final.var().item() / std**2 - 1) < 0.03


def _exact_chain_moments(model, sigmas, step, params):
    """Mean and variance after the discrete chain, without sampling: on a Gaussian with a linear
    velocity each step is affine, next = alpha x + beta + std z, so moments propagate exactly."""
    mean, var = torch.zeros(()), torch.ones(())
    x = torch.tensor([0.0, 1.0]).reshape(2, 1, 1, 1)  # the affine map at 0 and 1
    for i in range(len(sigmas) - 1):
        v = model.velocity(x, sigmas[i].expand(2), None, 1.0)
        out = get_step(step)(x, v, sigmas[i], sigmas[i + 1], noise=torch.zeros_like(x), **params)
        beta, alpha = out.mean[0].squeeze(), (out.mean[1] - out.mean[0]).squeeze()
        mean, var = alpha * mean + beta, alpha**2 * var + out.std[0] ** 2
    return mean.item(), var.item()


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("step,params", MARGINAL_STEPS, ids=[name for name, _ in MARGINAL_STEPS])
def test_discrete_chains_converge_to_the_true_marginal(shift, step, params):
    # No Monte Carlo: the discretisation bias alone, which must shrink with the number of steps.
    # (Flow-GRPO converges slowest, ~ steps^-0.45: its diffusion a^2 t / (1 - t) is not integrable
    # at t = 1 and its first step always injects variance a^2 sigma_1; bias +0.5% at 1000 steps.)
    mu, std = 0.5, 0.8
    model = GaussianFlow(mu, std)
    coarse = _exact_chain_moments(model, flow_sigmas(10, shift), step, params)
    fine = _exact_chain_moments(model, flow_sigmas(1000, shift), step, params)
    assert abs(fine[0] - mu) < 1e-3
    assert abs(fine[1] / std**2 - 1) < 0.01
    assert abs(fine[1] / std**2 - 1) < abs(coarse[1] / std**2 - 1)


def test_cps_chain_under_disperses_even_with_many_steps():
    # Documents a property of CPS, not a bug of ours: its per-step noise sigma_next sin(a pi / 2)
    # does not shrink with the step size, and re-noising x0_hat = E[x0 | x] (not x0) each step
    # loses variance that is never re-injected. The exact chain variance stays ~28% low at 1000
    # steps (a = 0.7), whereas ODE / Flow-GRPO / DanceGRPO converge (test above).
    model = GaussianFlow(0.5, 0.8)
    for steps in (10, 1000):
        _, var = _exact_chain_moments(model, flow_sigmas(steps, 3.0), "cps", {"noise_level": 0.7})
        assert var / 0.8**2 < 0.8
    _, var = _exact_chain_moments(model, flow_sigmas(1000, 3.0), "cps", {"noise_level": 0.0})  # = Euler
    assert abs(var / 0.8**2 - 1) < 0.01


# ----------------------------------------------------------------------------- 5. guided


@pytest.mark.parametrize("kind", ["image", "video"])
def test_guided_step_without_guidance_is_the_dance_step(kind):
    x, v = _inputs(SHAPES[kind])
    grad = torch.randn_like(x)
    reference = dance_sde_step(x, v, 0.7, 0.6, eta=0.3, generator=torch.Generator().manual_seed(3))
    for kwargs in ({"grad": None}, {"grad": grad, "guidance_lambda": 0.0}):
        out = guided_sde_step(x, v, 0.7, 0.6, eta=0.3, generator=torch.Generator().manual_seed(3), **kwargs)
        assert torch.equal(out.next, reference.next) and torch.equal(out.log_prob, reference.log_prob)
        assert torch.equal(out.mean, reference.mean) and torch.equal(out.std, reference.std)


def test_guided_step_shifts_the_mean_and_chooses_the_scored_mean():
    x, v = _inputs(SHAPES["image"])
    grad = torch.randn_like(x)
    z = torch.randn_like(x)
    base = dance_sde_step(x, v, 0.7, 0.6, eta=0.3, noise=z)
    out = guided_sde_step(x, v, 0.7, 0.6, eta=0.3, grad=grad, guidance_lambda=0.5, noise=z)
    assert torch.allclose(out.guided_mean, base.mean + 0.5 * 0.1 * grad, atol=1e-6)
    assert torch.allclose(out.next, base.next + 0.5 * 0.1 * grad, atol=1e-6)
    assert torch.equal(out.mean, base.mean)  # log-prob under the unguided (policy) mean
    assert torch.allclose(out.log_prob, gaussian_log_prob(out.next, base.mean, base.std))
    guided = guided_sde_step(x, v, 0.7, 0.6, eta=0.3, grad=grad, guidance_lambda=0.5, noise=z, log_prob_under="guided")
    assert torch.equal(guided.mean, guided.guided_mean)
    assert torch.allclose(guided.log_prob, gaussian_log_prob(guided.next, guided.guided_mean, guided.std))
    unit = guided_sde_step(x, v, 0.7, 0.6, grad=grad * 100, guidance_lambda=1.0, normalize_grad=True, noise=z)
    shift = (unit.guided_mean - unit.mean).flatten(1).norm(dim=1)
    assert torch.allclose(shift, torch.full((3,), 0.1), atol=1e-5)  # lambda D |unit grad|


def test_guided_rollouts_end_closer_to_the_target():
    model = GaussianFlow(0.0, 1.0, latent_shape=(2, 1, 1))  # 2-D standard Gaussian data
    target = torch.tensor([1.5, -1.0]).reshape(1, 2, 1, 1)

    def grad_fn(x, sigma, cond, velocity):  # d/dx of r = -||x - x*||^2
        x = x.detach().requires_grad_(True)
        reward = -((x - target) ** 2).sum()
        return torch.autograd.grad(reward, x)[0]

    def final_distance(guidance_lambda):
        params = {"eta": 0.3, "guidance_lambda": guidance_lambda, "grad_fn": grad_fn}
        traj = rollout(
            model, None, flow_sigmas(16, 3.0), step_types=window_step_types(16, (8, 16), sde="guided"),
            step_params={"guided": params}, batch_size=256, generator=torch.Generator().manual_seed(0),
        )
        return (traj.final - target).flatten(1).norm(dim=1)

    unguided, guided = final_distance(0.0), final_distance(2.0)
    assert guided.mean() < 0.8 * unguided.mean()
    assert (guided < unguided).float().mean() > 0.9  # same noise: almost every chain moved closer


# ----------------------------------------------------------------------------- 6. rollout


@pytest.mark.parametrize("latent_shape", [(2, 4, 4), (2, 3, 4, 4)], ids=["image", "video"])
def test_rollout_trajectory_shapes_mask_and_rescore(latent_shape):
    model = TinyLinearFlow(latent_shape)
    assert isinstance(model, FlowModel)
    batch, steps = 4, 6
    cond = torch.randn(batch)
    sigmas = flow_sigmas(steps, 3.0)
    types = window_step_types(steps, (1, 4), sde="flow_grpo_sde")
    assert types == ["ode", "flow_grpo_sde", "flow_grpo_sde", "flow_grpo_sde", "ode", "ode"]
    traj = rollout(
        model, cond, sigmas, step_types=types, step_params={"noise_level": 0.8}, guidance=1.5,
        batch_size=batch, generator=torch.Generator().manual_seed(0),
    )
    assert model.calls == steps  # one velocity call per step
    assert traj.latents.shape == (batch, steps + 1, *latent_shape) and traj.latents.dtype == torch.float32
    assert traj.log_probs.shape == (batch, steps) and traj.final.shape == (batch, *latent_shape)
    assert traj.sde_mask.tolist() == [False, True, True, True, False, False]
    assert torch.equal(traj.log_probs[:, ~traj.sde_mask], torch.zeros(batch, 3))
    assert (traj.log_probs[:, traj.sde_mask] != 0).all()
    assert not traj.latents.requires_grad and traj.means is None

    transitions = list(traj.transitions())
    assert [t.step_index for t in transitions] == [1, 2, 3] and len(list(traj.transitions(False))) == steps
    for step_index, x, next, sigma, sigma_next, old_log_prob in transitions:
        log_prob, mean, std = rescore(model, cond, traj, step_index)  # grad enabled
        assert log_prob.requires_grad and mean.shape == x.shape and std.shape == (batch,)
        assert torch.equal(log_prob, old_log_prob)
    log_probs, means, stds = rescore(model, cond, traj, [1, 3])
    assert log_probs.shape == (batch, 2) and means.shape == (batch, 2, *latent_shape)
    assert torch.equal(log_probs, traj.log_probs[:, [1, 3]])
    log_probs.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # Other weights -> other log-probs.
    with torch.no_grad():
        model.proj.weight.add_(0.1)
    assert not torch.equal(rescore_step(model, cond, traj, 2).log_prob, traj.log_probs[:, 2])

    sub = traj.select([0, 2])
    assert sub.latents.shape[0] == 2 and torch.equal(sub.log_probs, traj.log_probs[[0, 2]])
    assert traj.to("cpu").latents.device.type == "cpu"


def test_rollout_shared_initial_noise_and_storage_options():
    model = TinyLinearFlow((2, 4, 4))
    cond = torch.zeros(6)
    traj = rollout(
        model, cond, flow_sigmas(3), step_types="dance_sde", batch_size=6, group_size=3,
        share_initial_noise=True, generator=torch.Generator().manual_seed(0), store_means=True,
    )
    start = traj.initial_noise
    assert torch.equal(start[0], start[1]) and torch.equal(start[0], start[2]) and torch.equal(start[3], start[5])
    assert not torch.equal(start[0], start[3])
    assert not torch.equal(traj.final[0], traj.final[1])  # SDE noise differs within a group
    assert traj.means.shape == (6, 3, 2, 4, 4)
    video = rollout(model, cond, flow_sigmas(2), step_types="ode", batch_size=6, latent_shape=(2, 3, 4, 4))
    assert video.latents.shape == (6, 3, 2, 3, 4, 4)
    with pytest.raises(ValueError, match="group_size"):
        rollout(model, cond, flow_sigmas(3), batch_size=6, group_size=4, share_initial_noise=True)
    with pytest.raises(ValueError, match="step types"):
        rollout(model, cond, flow_sigmas(3), step_types=["ode", "ode"], batch_size=6)


def test_rollout_is_reproducible_and_ode_matches_euler_loop_with_grad():
    model = TinyLinearFlow((2, 4, 4))
    cond = torch.randn(2)
    sigmas = flow_sigmas(5)
    noise = torch.randn(2, 2, 4, 4)
    a = rollout(model, cond, sigmas, step_types="ode", initial_noise=noise, guidance=2.0, grad=True)
    x = noise
    for i in range(5):
        x = x + model.velocity(x, sigmas[i].expand(2), cond, 2.0) * (sigmas[i + 1] - sigmas[i])
    assert torch.allclose(a.final, x) and a.final.requires_grad
    b1 = rollout(model, cond, sigmas, step_params={"cps": {"noise_level": 0.5}}, step_types="cps",
                 batch_size=2, generator=torch.Generator().manual_seed(7))
    b2 = rollout(model, cond, sigmas, step_params={"cps": {"noise_level": 0.5}}, step_types="cps",
                 batch_size=2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(b1.latents, b2.latents) and torch.equal(b1.log_probs, b2.log_probs)


def test_rollout_accepts_latent_shape_as_a_method():
    class MethodShapeFlow(GaussianFlow):  # as samplers/models/sd3.py: latent_shape(height, width)
        def __init__(self):
            super().__init__(0.0, 1.0)
            del self.latent_shape

        def latent_shape(self, height=None, width=None):
            return (1, 2, 2)

    traj = rollout(MethodShapeFlow(), None, flow_sigmas(2), batch_size=3)
    assert traj.latents.shape == (3, 3, 1, 2, 2)


def test_callback_sees_every_step():
    model = TinyLinearFlow((2, 4, 4))
    seen = []
    rollout(model, torch.zeros(1), flow_sigmas(4), batch_size=1, callback=lambda i, x, v, out: seen.append(i))
    assert seen == [0, 1, 2, 3]


def test_random_window():
    rng = random.Random(0)
    windows = {random_window(10, 2, rng) for _ in range(200)}
    assert windows == {(s, s + 2) for s in range(4)}  # start in [0, 10 // 2 - 2]
    assert random_window(10, 3, torch.Generator().manual_seed(0), first_half=False)[1] <= 10
    assert random_window(10, 3, 5) == random_window(10, 3, 5)
    with pytest.raises(ValueError):
        random_window(10, 6)
    assert window_step_types(3, None, sde="cps") == ["cps"] * 3


def test_antithetic_rollout_pairs_opposite_step_noise_and_keeps_exact_log_probs():
    model = TinyLinearFlow((2, 4, 4))
    cond = torch.zeros(4)
    sigmas = flow_sigmas(4)
    types = ["flow_grpo_sde", "ode", "flow_grpo_sde", "ode"]
    traj = rollout(model, cond, sigmas, step_types=types, batch_size=4, group_size=4, share_initial_noise=True,
                   generator=torch.Generator().manual_seed(3), antithetic=True, store_means=True)
    # the first step starts from the shared noise: the pairs' next states mirror around one mean
    noise = traj.latents[:, 1] - traj.means[:, 0]
    torch.testing.assert_close(noise[0::2], -noise[1::2])
    assert not torch.allclose(noise[0], noise[2])  # different pairs, different directions
    # later stochastic steps: opposite standardised noise as well
    z = traj.latents[:, 3] - traj.means[:, 2]
    torch.testing.assert_close(z[0::2], -z[1::2])
    for step in (0, 2):  # re-scoring reproduces the recorded log-probs exactly
        assert torch.equal(rescore_step(model, cond, traj, step).log_prob, traj.log_probs[:, step])
    with pytest.raises(ValueError, match="even"):
        rollout(model, torch.zeros(3), sigmas, batch_size=3, antithetic=True)

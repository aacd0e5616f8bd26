"""How much reward signal one sample's gradient carries: Flow-GRPO vs a forward-process estimator.

    python -m eval.grad_snr [--groups 16] [--group-size 8] [--seed 0] [--model shapesworld]

Samples ``groups`` train prompts x ``group_size`` Flow-GRPO SDE rollouts (10 steps, noise level
0.7, CFG 4.5) from the ShapesWorld base model with a fresh LoRA (r 16), scores them with the
verifier (partial credit) and takes group-relative advantages A (per-prompt mean, batch std). For
every sample s it computes two per-sample gradients over the LoRA weights:

- policy gradient (Flow-GRPO at ratio 1): g_s = A_s grad sum_i log p(x_{i+1} | x_i), summed over
  all nine trained steps, or over the steps 0-2 (high noise: layout), 3-5 or 6-8 (details);
- forward process (the advantage-weighted flow-matching direction of the CRD / DiffusionNFT
  family): g_s = -A_s grad mean_t ||v(x_t, t) - (eps - x0_s)||^2 over 4 stratified t, x0_s the
  sample's final latent, at guidance 1;
- with ``--step-values``, step-level credit: V(x_k) = the verifier's score of the deterministic
  ODE completion from x_k (V of the final state = the outcome), and each step's own advantage
  A_s,k = V(x_k+1) - V(x_k) over the batch std of those differences (a TD(0) advantage with an
  ODE-rollout value), g_s = sum_k A_s,k grad log p(x_k+1 | x_k).

For each estimator it prints the signal and noise of the batch gradient: with mean m and total
per-sample variance V over the N samples, ||E g||^2 is estimated without bias as ||m||^2 - V / N;
N* = V / ||E g||^2 is the number of samples at which the batch gradient's signal equals its noise.
It also prints the cosine between the gradients of two disjoint halves of the groups (0 for a pure
noise direction, 1 for a clean one). A diagnostic for "why does my RL not move", not a test.
"""

from __future__ import annotations

import argparse
import math
import random

import torch


def flat_grad(params) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in params])


def signal_and_noise(grads: torch.Tensor, halves: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """grads [N, P] per-sample gradients; halves: two index tensors splitting the samples by group."""
    n = grads.shape[0]
    mean = grads.mean(0)
    variance = grads.var(0, unbiased=True).sum().item()  # trace of the per-sample covariance
    signal = mean.square().sum().item() - variance / n  # unbiased ||E g||^2
    a, b = (grads[h].sum(0) for h in halves)
    return {"signal": signal, "noise_per_sample": variance,
            "samples_for_snr_1": variance / signal if signal > 0 else math.inf,
            "split_half_cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item()}


@torch.no_grad()
def ode_completion_values(model, cond, latents: torch.Tensor, sigmas: torch.Tensor, guidance: float,
                          score) -> torch.Tensor:
    """[N, S + 1] V(x_k) = score(deterministic ODE completion from latents[:, k] at sigma_k);
    V(x_S) = score of the final latents themselves."""
    from samplers.rollout import rollout

    steps = len(sigmas) - 1
    values = torch.zeros(latents.shape[0], steps + 1)
    values[:, steps] = score(latents[:, steps])
    for k in range(steps):
        values[:, k] = score(rollout(model, cond, sigmas[k:], step_types="ode", guidance=guidance,
                                     initial_noise=latents[:, k]).final)
    return values


def main(argv=None) -> None:
    from align.data import derive_seed
    from samplers.generate import encode_prompts
    from align.runtime import LoraSettings, load_flow_model, setup_trainable
    from align.sample import shapesworld_prompts
    from rewards import build_reward
    from samplers.rollout import rescore_step, rollout
    from samplers.schedules import flow_sigmas

    parser = argparse.ArgumentParser(prog="python -m eval.grad_snr", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=16, help="prompts (groups); even")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="shapesworld")
    parser.add_argument("--step-values", action="store_true",
                        help="also the step-level (TD) advantages from ODE-completion values (10 more ODE solves)")
    args = parser.parse_args(argv)
    if args.groups < 2 or args.groups % 2 or args.group_size < 2:
        parser.error("--groups must be even and >= 2, --group-size >= 2")

    torch.manual_seed(args.seed)
    model = load_flow_model(args.model)
    trainable, _ = setup_trainable(model, LoraSettings(rank=16, alpha=32), torch.float32, frozen_reference=False)
    params = list(trainable.values())
    items = random.Random(args.seed).sample(shapesworld_prompts("train"), args.groups)
    items = [item for item in items for _ in range(args.group_size)]
    prompts = [item["prompt"] for item in items]
    guidance, steps = 4.5, 10
    cond = encode_prompts(model, prompts, guidance, "")
    sigmas = flow_sigmas(steps, shift=3.0)
    generator = torch.Generator().manual_seed(derive_seed(args.seed, 1))
    traj = rollout(model, cond, sigmas, step_types="flow_grpo_sde", step_params={"noise_level": 0.7},
                   guidance=guidance, batch_size=len(items), generator=generator)
    verifier, metadata = build_reward("shapes_geneval"), [item.get("meta") for item in items]

    def score(latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return verifier(model.decode(latents), prompts, metadata=metadata).scores.float()

    scores = score(traj.final)
    groups = scores.view(args.groups, args.group_size)
    advantages = ((groups - groups.mean(1, keepdim=True)) / scores.std().clamp_min(1e-4)).reshape(-1)
    print(f"{len(items)} samples: reward {scores.mean():.3f}, within-group std {groups.std(1).mean():.3f}")

    td = None
    if args.step_values:
        diffs = ode_completion_values(model, cond, traj.latents, sigmas, guidance, score).diff(dim=1)  # [N, S]
        td = diffs / diffs.std().clamp_min(1e-4)

    spans = {"all 9 steps": range(0, 9), "steps 0-2": range(0, 3), "steps 3-5": range(3, 6),
             "steps 6-8": range(6, 9)}
    estimators = {**{f"policy gradient, {k}": [] for k in spans}, "forward process (4 t)": [],
                  **({"step-level TD advantages": []} if td is not None else {})}
    fm_generator = torch.Generator().manual_seed(derive_seed(args.seed, 2))
    for s in range(len(items)):
        one, sample = cond.index(torch.tensor([s])), traj.select(torch.tensor([s]))
        step_grads = []  # grad of -log p(x_i+1 | x_i), one per trained step
        for i in range(steps - 1):
            model.transformer.zero_grad(set_to_none=True)
            (-rescore_step(model, one, sample, i).log_prob.sum()).backward()
            step_grads.append(flat_grad(params))
        step_grads = torch.stack(step_grads)
        for span, steps_in in spans.items():
            estimators[f"policy gradient, {span}"].append(advantages[s] * step_grads[list(steps_in)].sum(0))
        if td is not None:
            estimators["step-level TD advantages"].append(td[s, :steps - 1] @ step_grads)
        model.transformer.zero_grad(set_to_none=True)
        x0 = sample.final.expand(4, *sample.final.shape[1:])
        t = (torch.arange(4) + torch.rand(4, generator=fm_generator)) / 4  # stratified in (0, 1)
        eps = torch.randn(x0.shape, generator=fm_generator)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
        v = model.velocity(x_t, t, one.index(torch.zeros(4, dtype=torch.long)), guidance=1.0)
        (advantages[s] * (v - (eps - x0)).square().mean()).backward()
        estimators["forward process (4 t)"].append(flat_grad(params))

    half = args.groups // 2 * args.group_size
    halves = (torch.arange(half), torch.arange(half, len(items)))
    print(f"{'estimator':<32} {'N for SNR 1':>12} {'split-half cos':>15}")
    for name, grads in estimators.items():
        r = signal_and_noise(torch.stack(grads), halves)
        print(f"{name:<32} {r['samples_for_snr_1']:>12.0f} {r['split_half_cosine']:>15.3f}")


if __name__ == "__main__":
    main()

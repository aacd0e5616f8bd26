"""Does reward-gradient guidance help at inference? Euphonium's guided SDE without training.

    python -m eval.guided_sampling --model shapesworld_video --process-reward shapes_video_motion \\
        --lam 0 --lam 3 --lam 10 --window 4 10

Samples the same prompts from the same initial and step noise with DanceGRPO's SDE, the steps
in ``--window`` guided along grad_x r_p (samplers.steps.guided_sde_step, unit-norm gradient by
default) with each ``--lam`` (0: unguided), and prints the verifier's partial credit, strict
accuracy and (video) direction accuracy per lambda. r_p is a differentiable reward on the
decoded one-step estimate x0_hat = x_t - sigma v (rewards.process_reward.DecodedProcessReward).
This picks a guidance strength before training: Euphonium's process reward can only speed up RL
if following its gradient makes samples better.
"""

from __future__ import annotations

import argparse

import torch


def guided_samples(flow, prompts: list[str], metadata: list, process_reward: str, lam: float, *, window: tuple[int, int],
                   num_steps: int = 10, eta: float = 0.25, guidance: float = 4.5, shift: float = 3.0,
                   normalize_grad: bool = True, seed: int = 0, batch_size: int = 32) -> torch.Tensor:
    """Decoded samples [B, ...] of DanceGRPO's SDE whose `window` steps are guided with strength
    `lam` (0: the plain SDE), noise fixed by `seed` per batch so that lambdas are paired."""
    from align.euphonium import make_grad_fn
    from samplers.generate import encode_prompts
    from rewards.process_reward import DecodedProcessReward
    from samplers.rollout import rollout, window_step_types
    from samplers.schedules import flow_sigmas

    prm = DecodedProcessReward(flow, process_reward)
    sigmas = flow_sigmas(num_steps, shift=shift)
    types = ["dance_sde" if t == "ode" else t for t in window_step_types(num_steps, window, "guided")]
    out = []
    for start in range(0, len(prompts), batch_size):
        part = slice(start, start + batch_size)
        cond = encode_prompts(flow, prompts[part], guidance, "")
        grad_fn = make_grad_fn(prm, prompts[part], metadata[part])
        params = {"dance_sde": {"eta": eta},
                  "guided": {"eta": eta, "guidance_lambda": lam, "normalize_grad": normalize_grad, "grad_fn": grad_fn}}
        traj = rollout(flow, cond, sigmas, step_types=types, step_params=params, guidance=guidance,
                       batch_size=len(prompts[part]), generator=torch.Generator().manual_seed(seed + start))
        out.append(flow.decode(traj.final))
    return torch.cat(out)


def main(argv=None) -> list[dict]:
    from align.runtime import load_flow_model
    from align.sample import shapesworld_prompts, shapesworld_video_prompts
    from rewards import build_reward

    parser = argparse.ArgumentParser(prog="python -m eval.guided_sampling", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapesworld_video", help="shapesworld or shapesworld_video")
    parser.add_argument("--process-reward", default="shapes_video_motion", help="differentiable reward on x0_hat")
    parser.add_argument("--lam", type=float, action="append", help="guidance strengths (repeatable; default 0 3 10)")
    parser.add_argument("--window", type=int, nargs=2, default=None, metavar=("START", "END"),
                        help="guided steps [START, END) (default: the last quarter, Euphonium's)")
    parser.add_argument("--raw-grad", action="store_true", help="do not rescale the gradient to unit norm")
    parser.add_argument("--split", choices=("test", "train"), default="test")
    parser.add_argument("--prompts-per-tag", type=int, default=24)
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--eta", type=float, default=0.25, help="DanceGRPO SDE eta (0.25: the paper's for video)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)

    flow = load_flow_model(args.model)
    video = len(flow.latent_shape(64, 64)) == 4
    items = (shapesworld_video_prompts if video else shapesworld_prompts)(args.split, args.prompts_per_tag)
    prompts, metadata = [i["prompt"] for i in items], [i.get("meta") for i in items]
    verifier = build_reward("shapes_video_verifier" if video else "shapes_geneval")
    window = tuple(args.window) if args.window else (args.num_steps - max(1, args.num_steps // 4), args.num_steps)
    rows = []
    print(f"{len(prompts)} {args.split}-split prompts, guided steps {window[0]}-{window[1] - 1} of {args.num_steps}, "
          f"r_p = {args.process_reward}(x0_hat)")
    print(f"{'lambda':>7} {'r_p(final)':>10} {'partial':>8} {'strict':>7}" + (f" {'direction':>9}" if video else ""))
    for lam in args.lam or [0.0, 3.0, 10.0]:
        samples = guided_samples(flow, prompts, metadata, args.process_reward, lam, window=window,
                                 num_steps=args.num_steps, eta=args.eta, normalize_grad=not args.raw_grad,
                                 seed=args.seed)
        out = verifier(samples, prompts, metadata=metadata)
        row = {"lambda": lam, "process_reward": float(build_reward(args.process_reward)(samples, prompts,
                                                                                        metadata=metadata).scores.mean()),
               "partial": float(out.extras["partial"].nanmean()), "strict": float(out.extras["strict"].nanmean())}
        if video:
            row["direction"] = float(out.extras["direction"].nanmean())
        rows.append(row)
        print(f"{lam:>7g} {row['process_reward']:>10.3f} {row['partial']:>8.3f} {row['strict']:>7.3f}"
              + (f" {row['direction']:>9.3f}" if video else ""), flush=True)
    return rows


if __name__ == "__main__":
    main()

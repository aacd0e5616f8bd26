"""How much of the outcome a training-free process reward sees at each noise level.

    python -m eval.prm_reference [--reward shapes_geneval] [--reward shapes_clip_score] [--prompts-per-tag 8] [--split test]

Runs deterministic ODE trajectories of held-out (TEST-split; ``--split train``: the prompts RL
trains on) prompts, K seeds each, and scores each reward on the decoded Tweedie estimate
x0_hat = x_t - sigma v(x_t) at several steps. It prints the Spearman correlation with the final
verifier score, pooled and within prompt groups (the ranking that group-relative RL and reward
guidance need). The verifier on x0_hat is the reference a learned latent PRM (`align train-prm`)
should approach; a differentiable reward on x0_hat is what reward-gradient guidance (Euphonium)
can follow without training a PRM.
"""

from __future__ import annotations

import argparse


def main(argv=None) -> list[dict]:
    from rewards.process_reward import evaluate_prm

    parser = argparse.ArgumentParser(prog="python -m eval.prm_reference", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward", action="append", help="reward scored on x0_hat (repeatable; default: "
                                                          "shapes_geneval and shapes_clip_score)")
    parser.add_argument("--outcome", default=None, help="the final reward correlated against (default: the "
                                                         "verifier, shapes_geneval or shapes_video_verifier)")
    parser.add_argument("--model", default="shapesworld", help="shapesworld or shapesworld_video (its prompts)")
    parser.add_argument("--split", choices=("test", "train"), default="test", help="prompt split")
    parser.add_argument("--prompts-per-tag", type=int, default=8, help="prompts per category")
    parser.add_argument("--group-size", type=int, default=8, help="seeds per prompt")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    names = args.reward or ["shapes_geneval", "shapes_clip_score"]
    rows = evaluate_prm(None, model=args.model, reward=args.outcome, split=args.split, prompts_per_tag=args.prompts_per_tag,
                        group_size=args.group_size, seed=args.seed, tweedie=names)
    print(f"Spearman with the final {args.outcome or 'verifier'} ({len(rows)} steps, {args.split}-split prompts; "
          "pooled / within prompt groups)")
    print(f"{'step':>4} {'sigma':>6} " + " ".join(f"{name:>28}" for name in names))
    for row in rows:
        cells = [f"{row[name + ':pooled']:>13.3f} / {row[name + ':within_group']:>6.3f}      " for name in names]
        print(f"{row['step']:>4} {row['sigma']:>6.3f} " + " ".join(cells))
    return rows


if __name__ == "__main__":
    main()

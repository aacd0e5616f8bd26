"""How much signal the shipped ShapesWorld captioner gives PromptEcho.

    python -m eval.shapes_vlm_report [--path DIR] [--per-kind 64] [--seed 1234] [--samples 384] [--threads 1]

Each measure on two prompt sets: held-out compositions (TEST-split prompts, the stricter
reading: text the captioner never saw) and trained captions (TRAIN-split prompts on new
scenes and new noise seeds).

1. Preference on clean renders: how often "shapes_prompt_echo" scores the true prompt above a
   corrupted one (colour, count, position or shape changed; ``rewards.shapes_vlm.held_out_pairs``),
   per corruption kind.
2. Agreement with ground truth on generated images: Spearman correlation between
   shapes_prompt_echo and the verifier's partial credit ("shapes_geneval") on samples of the
   ShapesWorld base model (10 Euler steps, default CFG), pooled, per tag, and within prompts
   (scores and credit centred on each prompt's mean: does it rank seeds?). Noise seeds are
   drawn from [0, 2^31), so they almost surely miss the ranking pool's (100000 + i, i < 8).
   With 192 samples the pooled Spearman moves by about +-0.1 between draws; 384 halves that.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from rewards.process_reward import spearman


@torch.inference_mode()
def preference_report(path=None, per_kind: int = 64, seed: int = 1234, split: str = "test") -> dict:
    from rewards.shapes_vlm import CORRUPTIONS, ShapesPromptEcho, held_out_pairs

    pairs = held_out_pairs(per_kind, seed, split)
    echo = ShapesPromptEcho(path=path)
    images, kinds = pairs["images"], np.array(pairs["kinds"])
    true_echo, wrong_echo = echo(images, pairs["prompts"]).scores, echo(images, pairs["corrupted"]).scores
    prefers = (true_echo > wrong_echo).numpy()
    report = {}
    for kind in CORRUPTIONS + ("all",):
        sel = kinds == kind if kind != "all" else np.ones(len(kinds), bool)
        report[kind] = {"n": int(sel.sum()), "echo_prefers_true": float(prefers[sel].mean()),
                        "echo_margin": float((true_echo - wrong_echo).numpy()[sel].mean())}
    return report


@torch.inference_mode()
def base_model_report(path=None, samples: int = 384, seed: int = 0, num_steps: int = 10, split: str = "test") -> dict:
    from eval.shapes import prompts
    from rewards import build_reward
    from rewards.shapes_vlm import ShapesPromptEcho
    from samplers.generate import generate
    from samplers.models import load_model

    metas = prompts(split)
    rng = np.random.default_rng(seed)
    chosen = [metas[i] for i in rng.permutation(np.arange(samples) % len(metas))]
    texts = [m["prompt"] for m in chosen]
    seeds = [int(s) for s in rng.integers(0, 2**31 - 1, samples)]
    start = time.time()
    images = generate(load_model("shapesworld"), texts, seeds, num_steps=num_steps)
    sampled = time.time() - start
    start = time.time()
    partial = build_reward("shapes_geneval")(images, texts, metadata=chosen).scores.numpy()
    echo = ShapesPromptEcho(path=path)(images, texts).scores.numpy()
    scored = time.time() - start
    by_tag = {}
    for tag in sorted({m["tag"] for m in chosen}):
        sel = np.array([m["tag"] == tag for m in chosen])
        if sel.sum() > 2 and np.ptp(partial[sel]) > 0:
            by_tag[tag] = {"n": int(sel.sum()), "echo": spearman(echo[sel], partial[sel])}
    group = np.array([texts.index(t) for t in texts])  # one group per prompt
    means = {key: {g: values[group == g].mean() for g in set(group)} for key, values in (("e", echo), ("p", partial))}
    within = spearman(echo - np.array([means["e"][g] for g in group]),
                      partial - np.array([means["p"][g] for g in group]))
    return {"n": samples, "spearman_echo": spearman(echo, partial), "spearman_within": within,
            "mean_partial": float(partial.mean()), "by_tag": by_tag,
            "seconds_sampling": sampled, "seconds_scoring": scored}


@torch.inference_mode()
def throughput_report(path=None, n: int = 128, repeats: int = 3, seed: int = 99) -> dict:
    """Images/s of shapes_prompt_echo, a yes/no judge (``vlm_yes_no``, VQAScore template) on the SAME
    captioner (its answers are untrained: a speed number only) and shapes_clip_score, on ``n``
    clean held-out scenes; best of ``repeats`` wall-clock passes after one warm-up. The machine is
    shared, so these are lower bounds on an idle one."""
    from rewards import build_reward
    from rewards.shapes_vlm import ShapesPromptEcho, held_out_pairs, load_shapes_vlm
    from rewards.vlm import YesNoJudge

    pairs = held_out_pairs(per_kind=max(1, n // 4), seed=seed)
    images, texts = pairs["images"][:n], pairs["prompts"][:n]
    vlm = load_shapes_vlm(path)
    rewards = {"shapes_prompt_echo": ShapesPromptEcho(path=path),
               "vlm_yes_no (same model)": YesNoJudge(vlm.model, vlm.processor, dtype="fp32", batch_size=64),
               "shapes_clip_score": build_reward("shapes_clip_score")}
    out = {}
    for name, reward in rewards.items():
        reward(images[:8], texts[:8])  # warm-up
        best = math.inf
        for _ in range(repeats):
            start = time.time()
            reward(images, texts)
            best = min(best, time.time() - start)
        out[name] = len(images) / best
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", default=None, help="captioner folder (default: the shipped one)")
    parser.add_argument("--per-kind", type=int, default=64)
    parser.add_argument("--samples", type=int, default=384, help="base-model samples per prompt set (0: skip)")
    parser.add_argument("--seed", type=int, default=1234, help="held-out pairs' seed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bench", type=int, default=0, help="also time the rewards on this many images")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.bench:
        print(f"throughput, images/s ({args.threads} thread(s), shared machine):")
        for name, rate in throughput_report(args.path, args.bench).items():
            print(f"  {name:26s} {rate:8.1f}")
    splits = {"test": "held-out compositions", "train": "trained captions"}
    preference = {split: preference_report(args.path, args.per_kind, args.seed, split) for split in splits}
    print("clean new scenes: how often PromptEcho prefers the true prompt to a corrupted one")
    print(f"{'kind':10s} {'n':>4s} " + " ".join(f"{name:>22s}" for name in splits.values()))
    for kind in preference["test"]:
        print(f"{kind:10s} {preference['test'][kind]['n']:4d} "
              + " ".join(f"{preference[split][kind]['echo_prefers_true']:22.3f}" for split in splits))
    if args.samples <= 0:
        return
    for split, name in splits.items():
        base = base_model_report(args.path, args.samples, split=split)
        print(f"\nbase-model samples, {name} ({base['n']} {split}-split prompt/seed pairs, "
              f"mean partial {base['mean_partial']:.3f}):")
        print(f"Spearman(shapes_prompt_echo, verifier partial) = {base['spearman_echo']:.3f}; "
              f"within prompts (both centred on the prompt's mean) {base['spearman_within']:.3f}")
        for tag, row in base["by_tag"].items():
            print(f"  {tag:14s} n={row['n']:3d} echo {row['echo']:+.3f}")
        print(f"(sampling {base['seconds_sampling']:.1f} s, scoring {base['seconds_scoring']:.1f} s)")


if __name__ == "__main__":
    main()

"""Euphonium's claim against its unguided baseline, over seeds: training steps to the same outcome reward.

    python -m eval.euphonium_claim --baseline runs/claim/dance_{0,1,2} --euphonium runs/claim/euphonium_{0,1,2} \\
        [--smooth 3] [--out runs/claim]

Each argument is an ``output_dir`` of ``align train`` (``variant: dance`` and ``variant:
euphonium``, otherwise the same config). The outcome reward of an epoch is the mean reward of its
rollouts (``reward_mean``; for Euphonium these rollouts are guided), smoothed by a trailing mean
over ``--smooth`` epochs and averaged over seeds. The claim (Zhong et al. 2026): Euphonium reaches
the baseline's final outcome reward in <= 1/1.5 of its training steps. The held-out metrics come
from the plain ODE sampler with no process reward, so they measure what the trained (distilled)
model keeps. Writes OUT/euphonium_claim.md (table) and OUT/euphonium_claim.png (curves: seed mean,
band = min..max over seeds).
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import numpy as np

HELD_OUT = ("eval_reward_mean", "eval_strict_mean", "eval_direction_mean", "eval_shapes_quality_mean")


def read_run(run: Path) -> tuple[np.ndarray, dict[str, dict[int, float]]]:
    """(training outcome reward per epoch [E], {held-out metric: {epoch: value}}) of one run."""
    path = run / "metrics.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run} an output_dir of `align train`?")
    with path.open() as f:
        rows = list(csv.DictReader(f))

    def value(row, key):
        try:
            return float(row.get(key) or "nan")
        except ValueError:
            return math.nan

    train = np.array([value(r, "reward_mean") for r in rows if not math.isnan(value(r, "reward_mean"))])
    held = {key: {int(r["epoch"]): value(r, key) for r in rows if not math.isnan(value(r, key))} for key in HELD_OUT}
    return train, held


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last `window` values at each position (fewer at the start)."""
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, len(values) + 1)
    return (cumulative[idx] - cumulative[np.maximum(idx - window, 0)]) / np.minimum(idx, window)


def steps_to_reach(curve: np.ndarray, target: float) -> int | None:
    """Epochs of training (1-based) until the curve first reaches `target`, None if never."""
    hits = np.nonzero(curve >= target)[0]
    return int(hits[0]) + 1 if len(hits) else None


def summarise(baseline: list[Path], euphonium: list[Path], smooth: int = 3) -> dict:
    """Seed-mean smoothed outcome curves, steps to the baseline's final value and held-out means."""
    out = {}
    for name, runs in (("baseline", baseline), ("euphonium", euphonium)):
        data = [read_run(r) for r in runs]
        length = min(len(train) for train, _ in data)
        curves = np.stack([trailing_mean(train[:length], smooth) for train, _ in data])  # [seeds, E]
        epochs = sorted(set.intersection(*(set(h["eval_reward_mean"]) for _, h in data)))
        held = {key: np.array([[h[key].get(e, math.nan) for e in epochs] for _, h in data]) for key in HELD_OUT}
        raw = np.stack([train[:length] for train, _ in data])  # [seeds, E]
        out[name] = {"curves": curves, "mean": curves.mean(0), "raw": raw, "eval_epochs": epochs, "held": held}
    target = float(out["baseline"]["mean"][-1])
    base_steps = steps_to_reach(out["baseline"]["mean"], target)
    euph_steps = steps_to_reach(out["euphonium"]["mean"], target)
    out["target"], out["steps"] = target, {"baseline": base_steps, "euphonium": euph_steps}
    out["speedup"] = base_steps / euph_steps if euph_steps else math.nan
    out["per_seed_steps"] = [steps_to_reach(c, target) for c in out["euphonium"]["curves"]]
    base = out["baseline"]["raw"].mean(0)
    third = max(1, len(base) // 3)
    out["baseline_gain"] = float(base[-third:].mean() - base[:third].mean())  # last third minus first third
    # runs of the same seed draw the same prompts and initial noise each epoch: paired differences
    length = min(out["baseline"]["raw"].shape[1], out["euphonium"]["raw"].shape[1])
    if len(baseline) == len(euphonium):
        diff = out["euphonium"]["raw"][:, :length] - out["baseline"]["raw"][:, :length]  # [seeds, E]
        out["paired_difference"] = [float(d.mean()) for d in diff]
    return out


def write_report(summary: dict, out: Path, smooth: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, colour in (("baseline", "tab:blue"), ("euphonium", "tab:orange")):
        s = summary[name]
        x = np.arange(1, s["curves"].shape[1] + 1)
        left.plot(x, s["mean"], color=colour, label=name)
        left.fill_between(x, s["curves"].min(0), s["curves"].max(0), color=colour, alpha=0.2)
        held = s["held"]["eval_reward_mean"]
        right.plot(s["eval_epochs"], np.nanmean(held, 0), "o-", color=colour, label=name)
        right.fill_between(s["eval_epochs"], np.nanmin(held, 0), np.nanmax(held, 0), color=colour, alpha=0.2)
    left.axhline(summary["target"], color="grey", ls="--", lw=1, label="baseline final")
    left.set(xlabel="epoch", ylabel=f"training outcome reward (trailing mean of {smooth})",
             title="rollouts (Euphonium's are guided)")
    right.set(xlabel="epoch", ylabel="held-out partial credit", title="held-out, ODE, no process reward")
    left.legend(), right.legend()
    fig.tight_layout()
    fig.savefig(out / "euphonium_claim.png", dpi=110)
    plt.close(fig)

    lines = [f"Outcome reward target (baseline's final, seed mean, trailing mean of {smooth}): {summary['target']:.3f}",
             f"Epochs to reach it: baseline {summary['steps']['baseline']}, Euphonium {summary['steps']['euphonium']} "
             f"(per seed {summary['per_seed_steps']}); speed-up {summary['speedup']:.2f}x (claim: >= 1.5x)",
             f"Baseline's own gain, last third minus first third of its epochs: {summary['baseline_gain']:+.3f}"
             + (" (it did not improve: the speed-up is not informative)" if summary["baseline_gain"] <= 0 else "")]
    if "paired_difference" in summary:
        lines.append("Euphonium minus baseline, outcome reward of the same epoch's prompts and noise, mean over "
                     "epochs, per seed: " + ", ".join(f"{d:+.3f}" for d in summary["paired_difference"]))
    lines += ["",
              "| held-out (ODE, no process reward) | " + " | ".join(
                 f"{n} epoch {e}" for n in ("baseline", "euphonium") for e in (summary[n]["eval_epochs"][0],
                                                                             summary[n]["eval_epochs"][-1])) + " |",
             "|---|" + "---|" * 4]
    for key in HELD_OUT:
        if all(np.isnan(summary[name]["held"][key]).all() for name in ("baseline", "euphonium")):
            continue  # a metric these runs do not log (direction: video only)
        cells = []
        for name in ("baseline", "euphonium"):
            values = summary[name]["held"][key]
            for col in (0, -1):
                v = values[:, col]
                cells.append(f"{np.nanmean(v):.3f} ({np.nanmin(v):.3f}-{np.nanmax(v):.3f})")
        lines.append(f"| {key.removeprefix('eval_').removesuffix('_mean')} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "euphonium_claim.md").write_text(text)
    print(text, end="")
    return out / "euphonium_claim.md"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m eval.euphonium_claim", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", nargs="+", type=Path, required=True, help="unguided runs (one per seed)")
    parser.add_argument("--euphonium", nargs="+", type=Path, required=True,
                        help="Euphonium runs (one per seed, in the baseline's seed order: runs are paired)")
    parser.add_argument("--smooth", type=int, default=3, help="trailing-mean window over epochs")
    parser.add_argument("--out", type=Path, default=Path("runs/claim"))
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error("--smooth must be >= 1")
    summary = summarise(args.baseline, args.euphonium, args.smooth)
    write_report(summary, args.out, args.smooth)
    return summary


if __name__ == "__main__":
    main()

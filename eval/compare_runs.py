"""Held-out accuracy and quality against training CPU time, for runs of different algorithms.

    python -m eval.compare_runs RUN_DIR [RUN_DIR ...] [--labels A B ...] [--budget MIN] [--out runs/compare]

Each RUN_DIR is an ``output_dir`` of ``align train`` (Flow-GRPO, GDRO or CRD). For every held-out
evaluation in its ``metrics.csv`` the cost is the CPU seconds spent training before it: the sum of
``cpu_train`` over the earlier epochs (rollouts, rewards, updates; evaluations excluded), plus, for
GDRO, the CPU seconds of generating its rollout store (the store's ``manifest.json``). CPU seconds
are those of the process and all its threads (``time.process_time``), so runs sharing a machine are
still comparable; with several ranks the log holds rank 0's.

Writes ``OUT/compare.md`` (a table: held-out strict accuracy with its standard error, held-out
quality, GDRO's corrected score r (u - 3) + 0.2 with u = 1 + 4 * quality, and the CPU minutes each
run needs to reach the first run's final accuracy) and ``OUT/compare.png`` (accuracy and quality
against CPU minutes). ``--budget`` keeps the evaluations made within that many training CPU
minutes, for a comparison at an equal budget.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import yaml

from eval.monitor import corrected_score, quality_to_likert

STRICT, QUALITY, REWARD = "eval_strict_mean", "eval_shapes_quality_mean", "eval_reward_mean"


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def store_cpu_seconds(store: Path) -> float:
    """CPU seconds that generating a rollout store took (wall seconds for stores written before
    ``cpu_seconds`` was recorded)."""
    manifest = json.loads((store / "manifest.json").read_text())
    return sum(s.get("cpu_seconds", s["seconds"]) for s in manifest["shards"].values())


def load_curve(run: Path, budget_minutes: float = math.inf) -> dict:
    """{"algorithm", "evals": [{epoch, cpu_minutes, strict, quality, reward, n}], "setup_minutes"}."""
    metrics = run / "metrics.csv"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run}: no metrics.csv (not an `align train` output directory?)")
    config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    rows = list(csv.DictReader(metrics.open()))
    if rows and "cpu_train" not in rows[0]:
        raise ValueError(f"{run}/metrics.csv has no cpu_train column (written by an older genalign)")
    setup = 0.0
    if config.get("algorithm") == "gdro":
        store = Path(config["store"])  # relative to where `align train` ran, as in the config
        if not (store / "manifest.json").is_file():
            raise FileNotFoundError(f"{run}: its rollout store {store} has no manifest.json (run from the "
                                    "directory the training ran in)")
        setup = store_cpu_seconds(store)
    spent, evals = setup, []
    for row in sorted(rows, key=lambda r: int(r["epoch"])):
        if math.isfinite(_float(row.get(STRICT))):
            evals.append({"epoch": int(row["epoch"]), "cpu_minutes": spent / 60, "strict": _float(row[STRICT]),
                          "quality": _float(row.get(QUALITY)), "reward": _float(row.get(REWARD)),
                          "n": _float(row.get("eval_num_samples"))})
        spent += _float(row.get("cpu_train")) if math.isfinite(_float(row.get("cpu_train"))) else 0.0
    evals = [e for e in evals if e["cpu_minutes"] <= budget_minutes]
    if not evals:
        raise ValueError(f"{run}/metrics.csv has no held-out evaluation rows (within the budget)")
    return {"algorithm": config.get("algorithm", "?"), "evals": evals, "setup_minutes": setup / 60}


def _se(p: float, n: float) -> float:
    return math.sqrt(p * (1 - p) / n) if n and math.isfinite(n) else math.nan


def _corrected(e: dict) -> float:
    return float(corrected_score(e["reward"], quality_to_likert(e["quality"])))


def minutes_to_reach(curve: dict, target: float) -> float:
    """CPU minutes of the first evaluation at or above ``target`` (NaN if none)."""
    return next((e["cpu_minutes"] for e in curve["evals"] if e["strict"] >= target), math.nan)


def table(curves: dict[str, dict]) -> str:
    first = next(iter(curves.values()))
    target = first["evals"][-1]["strict"]
    lines = [f"| run | algorithm | CPU min | strict before | strict after (± SE) | best | quality before -> after "
             f"| corrected score before -> after | CPU min to reach {target:.3f} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, c in curves.items():
        e0, e1 = c["evals"][0], c["evals"][-1]
        best = max(c["evals"], key=lambda e: e["strict"])
        lines.append(f"| {label} | {c['algorithm']} | {e1['cpu_minutes']:.1f} | {e0['strict']:.3f} | "
                     f"{e1['strict']:.3f} ± {_se(e1['strict'], e1['n']):.3f} | {best['strict']:.3f} "
                     f"(ep {best['epoch']}) | {e0['quality']:.3f} -> {e1['quality']:.3f} | "
                     f"{_corrected(e0):.3f} -> {_corrected(e1):.3f} | {minutes_to_reach(c, target):.1f} |")
    return "\n".join(lines)


def plot(curves: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    algorithms = list(dict.fromkeys(c["algorithm"] for c in curves.values()))
    seen: dict[str, int] = {}
    for label, c in curves.items():  # one colour per algorithm, one line style per run of it
        style = dict(color=f"C{algorithms.index(c['algorithm'])}", linestyle=["-", "--", ":", "-."][seen.get(
            c["algorithm"], 0) % 4], marker="o", markersize=4, label=label)
        seen[c["algorithm"]] = seen.get(c["algorithm"], 0) + 1
        x = [e["cpu_minutes"] for e in c["evals"]]
        strict = [e["strict"] for e in c["evals"]]
        se = [_se(e["strict"], e["n"]) for e in c["evals"]]
        axes[0].plot(x, strict, **style)
        axes[0].fill_between(x, [s - d for s, d in zip(strict, se)], [s + d for s, d in zip(strict, se)],
                             color=style["color"], alpha=0.08)
        axes[1].plot(x, [e["quality"] for e in c["evals"]], **style)
    axes[0].set(xlabel="training CPU minutes", ylabel="held-out strict accuracy (± 1 SE)")
    axes[1].set(xlabel="training CPU minutes", ylabel="held-out shapes_quality (not optimised)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.compare_runs", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="output directories of `align train`; the first "
                        "run's final accuracy is the target the others are timed to")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: the directory names)")
    parser.add_argument("--budget", type=float, default=math.inf, metavar="MIN",
                        help="keep evaluations made within MIN training CPU minutes (default: all)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="folder for compare.md/.png")
    args = parser.parse_args(argv)
    labels = args.labels or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(labels)} labels for {len(args.runs)} runs")
    try:
        curves = {label: load_curve(run, args.budget) for label, run in zip(labels, args.runs)}
    except (OSError, ValueError, KeyError) as err:
        parser.error(str(err))
    text = table(curves)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.md").write_text(text + "\n")
    plot(curves, args.out / "compare.png")
    print(text)
    print(f"wrote {args.out / 'compare.md'} and {args.out / 'compare.png'}")


if __name__ == "__main__":
    main()

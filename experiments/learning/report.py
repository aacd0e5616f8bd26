"""Table and curves of the learning benchmark's results.json (see benchmark.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPLITS = (("train", "train prompts"), ("test", "held-out"))


def _stats(values: list[float]) -> str:
    v = np.asarray(values, dtype=float)
    if len(v) == 1:
        return f"{v[0]:.3f}"
    se = v.std(ddof=1) / np.sqrt(len(v))
    return f"{v.mean():.3f} ({v.min():.3f}-{v.max():.3f}) ±{se:.3f}"


def table_rows(results: dict) -> list[str]:
    """Markdown rows: each method x evaluation CFG at the budget, base rows, control rows."""
    lines = ["| method | eval CFG | CPU-min | train strict | held-out strict | held-out partial | quality | "
             "render gap |", "|---|---|---|---|---|---|---|---|"]
    for g, base in sorted(results["base"].items()):
        lines.append(f"| base model | {float(g):g} | 0 | {base['train']['strict']:.3f} ±{base['train']['strict_se']:.3f} | "
                     f"{base['test']['strict']:.3f} ±{base['test']['strict_se']:.3f} | {base['test']['partial']:.3f} | "
                     f"{base['test']['quality']:.3f} | {base['test']['render_gap']:.3f} |")
    for name, method in results["methods"].items():
        for g in method["guidances"]:
            finals = [[p for p in points if p["guidance"] == g][-1] for points in method["runs"].values()]
            cpu = np.mean([p["cpu_minutes"] for p in finals])
            lines.append(f"| {name} | {g:g} | {cpu:.1f} | {_stats([p['train']['strict'] for p in finals])} | "
                         f"{_stats([p['test']['strict'] for p in finals])} | "
                         f"{_stats([p['test']['partial'] for p in finals])} | "
                         f"{_stats([p['test']['quality'] for p in finals])} | "
                         f"{_stats([p['test']['render_gap'] for p in finals])} |")
    for source, runs in results.get("controls", {}).items():
        finals = [rows[-1] for rows in runs.values()]
        label = "flow matching on own correct samples" if source == "own" else "flow matching on renders"
        lines.append(f"| control: {label}, {finals[0]['round']} rounds | 4.5 | "
                     f"{np.mean([r['cpu_minutes'] for r in finals]):.1f} | {_stats([r['train']['strict'] for r in finals])} | "
                     f"{_stats([r['test']['strict'] for r in finals])} | {_stats([r['test']['partial'] for r in finals])} | "
                     f"{_stats([r['test']['quality'] for r in finals])} | {_stats([r['test']['render_gap'] for r in finals])} |")
    return lines


def hacking_verdicts(results: dict) -> list[str]:
    """Per method and CFG: flagged if the quality monitor falls by more than 0.01 while train strict rises."""
    out = []
    for name, method in results["methods"].items():
        for g in method["guidances"]:
            base = results["base"][str(g)]
            finals = [[p for p in points if p["guidance"] == g][-1] for points in method["runs"].values()]
            d_quality = np.mean([p["test"]["quality"] for p in finals]) - base["test"]["quality"]
            d_train = np.mean([p["train"]["strict"] for p in finals]) - base["train"]["strict"]
            flagged = d_quality < -0.01 and d_train > 0
            out.append(f"- {name} (CFG {g:g}): train strict {d_train:+.3f}, quality {d_quality:+.3f}: "
                       f"{'FLAGGED (quality falls while the reward rises)' if flagged else 'no hacking signal'}")
    return out


def write_report(results: dict, out: str | Path) -> None:
    """OUT/table.md and OUT/curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    lines = [f"Budget {results['budget_cpu_minutes']:g} training CPU-minutes per run, seeds {results['seeds']}; "
             "mean (min-max) ±SE over seeds; 384 samples per split, 10-step ODE.", "", *table_rows(results), "",
             "Hacking monitor:", *hacking_verdicts(results), ""]
    (out / "table.md").write_text("\n".join(lines))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (split, title) in zip(axes, SPLITS):
        for i, (g, base) in enumerate(sorted(results["base"].items())):
            ax.axhline(base[split]["strict"], color="grey", ls=":" if float(g) == 4.5 else "--", lw=1,
                       label=f"base, CFG {float(g):g}")
        k = 0
        for name, method in results["methods"].items():
            for g in method["guidances"]:
                colour = colours[k % len(colours)]
                k += 1
                for j, points in enumerate(method["runs"].values()):
                    pts = [p for p in points if p["guidance"] == g]
                    x = [0.0] + [p["cpu_minutes"] for p in pts]
                    y = [results["base"][str(g)][split]["strict"]] + [p[split]["strict"] for p in pts]
                    ax.plot(x, y, "o-", color=colour, alpha=0.8, ms=3, label=f"{name}, CFG {g:g}" if j == 0 else None)
        ax.set_title(f"{title}: strict accuracy")
        ax.set_xlabel("training CPU-minutes")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("strict (mean of 6 categories)")
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)

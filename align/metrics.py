"""Per-epoch metrics of a training run: a CSV, TensorBoard (if installed), a reward-curve PNG and
a progress bar with ETA.

    logger = MetricsLogger(run_dir, keep_through_epoch=None)   # fresh run: starts a new CSV
    with TrainingProgress(num_epochs, start_epoch) as progress:
        for epoch in ...:
            logger.log(epoch, {"reward_mean": 0.41, ...})
            progress.advance(epoch, "reward 0.410")
    logger.close()

`metrics.csv` has one row per epoch with an `epoch` column; columns appear as metrics do (a
metric logged only at evaluation epochs leaves the other rows empty). On resume,
`keep_through_epoch=e` drops the rows of epochs > e (logged after the checkpoint the run
resumes from), so every epoch appears exactly once; TensorBoard gets `purge_step` for the same.
The CSV is rewritten through a temporary file and `os.replace`, never left half-written.
Only the main process should create a logger (pass `enabled=False` elsewhere).
"""

from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "TrainingProgress", "read_metrics_csv", "plot_reward_curve", "held_out_summary",
           "write_summary", "METRICS_CSV"]

METRICS_CSV = "metrics.csv"
REWARD_PNG = "reward_curve.png"


def read_metrics_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics CSV as dicts (numbers parsed, empty cells dropped); [] if absent."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            parsed = {}
            for key, value in row.items():
                if value in (None, ""):
                    continue
                try:
                    number = float(value)
                    parsed[key] = int(number) if key in ("epoch", "global_step") else number
                except ValueError:
                    parsed[key] = value
            rows.append(parsed)
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = ["epoch"]
    for row in rows:
        columns += [key for key in row if key not in columns]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _format(v) for k, v in row.items()})
    os.replace(tmp, path)


def _format(value: Any) -> Any:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return value


def plot_reward_curve(rows: list[dict[str, Any]], out: str | Path, title: str = "") -> Path | None:
    """Train reward (mean +- std) per epoch and held-out reward at evaluation epochs -> PNG."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    train = [(r["epoch"], r["reward_mean"], r.get("reward_std", 0.0)) for r in rows if "reward_mean" in r]
    if train:
        epochs, means, stds = zip(*train)
        ax.plot(epochs, means, label="train reward", color="tab:blue")
        ax.fill_between(epochs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        color="tab:blue", alpha=0.15, linewidth=0)
    held_out = [(r["epoch"], r["eval_reward_mean"]) for r in rows if "eval_reward_mean" in r]
    if held_out:
        epochs, means = zip(*held_out)
        ax.plot(epochs, means, "o-", label="held-out reward", color="tab:orange")
    ax.set_xlabel("epoch")
    ax.set_ylabel("reward")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def held_out_summary(rows: list[dict[str, Any]], prefix: str = "eval_") -> list[tuple[str, float, float]]:
    """(metric, first evaluation, last evaluation) for every `prefix*` metric of the run's rows
    (e.g. held-out strict accuracy before and after training); [] with fewer than 2 evaluations."""
    evals = [r for r in rows if any(k.startswith(prefix) for k in r)]
    if len(evals) < 2:
        return []
    first, last = evals[0], evals[-1]
    return [(k.removeprefix(prefix), first[k], last[k]) for k in first
            if k.startswith(prefix) and k in last and isinstance(first[k], (int, float)) and k != f"{prefix}num_samples"]


def write_summary(rows: list[dict[str, Any]], out: str | Path, title: str = "", echo: bool = True) -> Path | None:
    """held_out_summary as a Markdown table (OUTPUT_DIR/summary.md); printed too with rich if `echo`."""
    table = held_out_summary(rows)
    if not table:
        return None
    start = next(r["epoch"] for r in rows if any(k.startswith("eval_") for k in r))
    end = [r["epoch"] for r in rows if any(k.startswith("eval_") for k in r)][-1]
    lines = [f"| held-out metric | epoch {start} | epoch {end} | change |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {a:.3f} | {b:.3f} | {b - a:+.3f} |" for name, a, b in table]
    out = Path(out)
    text = (f"# {title}\n\n" if title else "") + "\n".join(lines) + "\n"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    if not echo:
        return out
    try:
        from rich.console import Console
        from rich.table import Table

        rich_table = Table(title=title or "held-out evaluation")
        for column in ("metric", f"epoch {start}", f"epoch {end}", "change"):
            rich_table.add_column(column, justify="left" if column == "metric" else "right")
        for name, a, b in table:
            rich_table.add_row(name, f"{a:.3f}", f"{b:.3f}", f"{b - a:+.3f}")
        Console(stderr=False).print(rich_table)
    except ImportError:  # rich is a dependency, but the Markdown file is what matters
        print(text)
    return out


class MetricsLogger:
    """Writes per-epoch metrics to OUTPUT_DIR/metrics.csv (+ tensorboard/, reward_curve.png).

    keep_through_epoch: rows of epochs <= this are kept from an existing CSV (resume); None
    starts a fresh CSV. tensorboard: log there too if `torch.utils.tensorboard` imports.
    plot_every: redraw the PNG every N logged epochs (and at close); 0 disables it.
    wandb_project: also log to Weights & Biases under this project if `wandb` is installed (a
    warning otherwise); the run id is kept in OUTPUT_DIR/wandb_id so a resumed run continues it.
    """

    def __init__(self, output_dir: str | Path, keep_through_epoch: int | None = None, tensorboard: bool = True,
                 plot_every: int = 1, title: str = "", enabled: bool = True, wandb_project: str | None = None,
                 run_config: dict | None = None):
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self.csv_path = self.output_dir / METRICS_CSV
        self.plot_every, self.title = plot_every, title
        self.rows: list[dict[str, Any]] = []
        self.writer = None
        self.wandb = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if keep_through_epoch is not None:
            self.rows = [r for r in read_metrics_csv(self.csv_path) if r.get("epoch", math.inf) <= keep_through_epoch]
        _write_csv(self.csv_path, self.rows)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                purge = None if keep_through_epoch is None else keep_through_epoch + 1
                self.writer = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"), purge_step=purge)
        if wandb_project:
            self.wandb = _start_wandb(wandb_project, self.output_dir, title, run_config)

    def log(self, epoch: int, metrics: dict[str, float]) -> None:
        """Append epoch `epoch`'s row (replacing an existing row of the same epoch)."""
        if not self.enabled:
            return
        row = {"epoch": int(epoch), **{k: _plain(v) for k, v in metrics.items()}}
        self.rows = [r for r in self.rows if r.get("epoch") != epoch] + [row]
        _write_csv(self.csv_path, self.rows)
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, epoch)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=int(epoch))
        if self.plot_every and len(self.rows) % self.plot_every == 0:
            self.plot()

    def plot(self) -> Path | None:
        if not self.enabled:
            return None
        return plot_reward_curve(self.rows, self.output_dir / REWARD_PNG, self.title)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.plot_every:
            self.plot()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _start_wandb(project: str, output_dir: Path, name: str, config: dict | None):
    """A wandb run that a resumed training continues (same id), or None with a warning."""
    import importlib.util
    import warnings

    if importlib.util.find_spec("wandb") is None:
        warnings.warn("wandb_project is set but wandb is not installed (pip install wandb); logging to "
                      "metrics.csv and TensorBoard only", stacklevel=3)
        return None
    import wandb

    id_file = output_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
    id_file.write_text(run_id)
    return wandb.init(project=project, id=run_id, resume="allow", name=name or None, config=config,
                      dir=str(output_dir))


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):  # 0-d tensors / numpy scalars
        value = value.item()
    return value


class TrainingProgress:
    """Progress over epochs (`samplers.progress.Progress`: a rich bar with ETA on a terminal,
    plain flushed lines elsewhere, at least every GENALIGN_PROGRESS_SECONDS while an epoch runs)
    plus a one-line summary per epoch (unless `quiet`). Use as a context manager; `phase(text)`
    says what the current epoch is doing; `enabled=False` on non-main ranks."""

    def __init__(self, total_epochs: int, start_epoch: int = 0, enabled: bool = True, quiet: bool = False,
                 description: str = "training"):
        from samplers.progress import Progress

        self.total, self.start, self.quiet = total_epochs, start_epoch, quiet
        self.bar = Progress(total_epochs, description, unit="epochs", start=start_epoch, enabled=enabled,
                            quiet=quiet)
        self.started = time.monotonic()

    def __enter__(self) -> "TrainingProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def phase(self, text: str) -> None:
        """What the current epoch is doing, e.g. "epoch 3: sampling"."""
        self.bar.phase(text)

    def advance(self, epoch: int, summary: str = "") -> None:
        """Epoch `epoch` (0-based) is done; print `summary` with a plain-text ETA."""
        self.bar.phase("")
        self.bar.update(epoch + 1)
        if not self.quiet and summary:
            done = epoch + 1 - self.start
            left = self.total - epoch - 1
            eta = (time.monotonic() - self.started) / max(done, 1) * left
            from samplers.progress import format_duration

            self.bar.print(f"epoch {epoch + 1}/{self.total} {summary} | eta {format_duration(eta)}")

"""The learning benchmark: does a trainer make the ShapesWorld model better, at an equal CPU budget?

    python -m experiments.learning.benchmark --out runs/learning \
        --method nft=configs/shapes/nft.yaml \
        --method "flow_grpo=configs/shapes/flow_grpo.yaml variant=fast" \
        --seeds 0 1 2 --cpu-minutes 30 --eval-every 5 [--control own --control renders]

Each (method, seed) trains with `align train CONFIG [overrides] seed=S` in its own process (one thread
by default, `--parallel` at a time), a checkpoint after every epoch, until the run's training CPU time
(rollouts + updates, as the trainer logs it in metrics.csv; evaluation excluded) reaches the budget.
Then the checkpoints nearest each `--eval-every` CPU-minute mark are evaluated on (a) train prompts
with fresh seeds and (b) held-out compositions, 64 per category each (384), with the 10-step ODE at
CFG 4.5 and, for CFG-free methods (sampler.guidance 1), also at CFG 1; plus the unoptimised monitors
(shapes_quality, the render gap). `--control` adds the self-consumption control rows
(experiments/learning/self_consumption.py). Everything is cached under --out: a killed benchmark
resumes. Writes OUT/results.json, OUT/table.md (mean, min-max over seeds, standard error over seeds)
and OUT/curves.png (strict accuracy against CPU minutes).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from .measure import cumulative_cpu_minutes, evaluate_model, load_run_weights, write_json

GUIDANCE = 4.5  # the base model's default sampler: 10-step ODE, CFG 4.5


def parse_method(text: str) -> tuple[str, str, list[str]]:
    """'name=CONFIG [key=value ...]' -> (name, config path, overrides)."""
    name, _, rest = text.partition("=")
    parts = shlex.split(rest)
    if not name or not parts or not Path(parts[0]).is_file():
        raise SystemExit(f"--method must be NAME=CONFIG [key=value ...] with an existing config, got {text!r}")
    return name, parts[0], parts[1:]


def train_until(config: str, overrides: list[str], seed: int, run_dir: Path, cpu_minutes: float,
                threads: int) -> subprocess.Popen | None:
    """Start (or resume) a training run that the caller stops once `cpu_minutes` are spent; None if done."""
    if (run_dir / "budget_done").exists():
        return None
    resume = ["--resume"] if (run_dir / "checkpoints").is_dir() else []
    cmd = [sys.executable, "-m", "align", "train", config, *overrides, f"seed={seed}", f"output_dir={run_dir}",
           "num_epochs=100000", "eval_every=0", "checkpoint_every=1", "keep_checkpoints=0", "quiet=true", *resume]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "train.log", "a")
    # a benchmark started in the background (nohup ... &) has SIGINT ignored, and children inherit that:
    # restore it so that stopping a run at the budget is a Ctrl-C (the trainer saves and exits)
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))


def spent(run_dir: Path) -> float:
    cpu = cumulative_cpu_minutes(run_dir) if (run_dir / "metrics.csv").is_file() else {}
    return max(cpu.values(), default=0.0)


def run_training(jobs: list[tuple[str, str, list[str], int, Path]], cpu_minutes: float, threads: int,
                 parallel: int) -> None:
    """Train every job to the budget, `parallel` at a time; prints progress every ~30 s."""
    pending, active = list(jobs), {}
    last_print = 0.0
    while pending or active:
        while pending and len(active) < parallel:
            name, config, overrides, seed, run_dir = pending.pop(0)
            proc = train_until(config, overrides, seed, run_dir, cpu_minutes, threads)
            if proc is not None:
                active[run_dir] = (name, seed, proc)
                print(f"[train] {name} seed {seed}: started ({run_dir})", flush=True)
        time.sleep(5)
        for run_dir, (name, seed, proc) in list(active.items()):
            used = spent(run_dir)
            if used >= cpu_minutes and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if proc.poll() is not None:
                if used < cpu_minutes:
                    raise SystemExit(f"{name} seed {seed} stopped after {used:.1f} CPU-min (exit {proc.returncode}); "
                                     f"see {run_dir / 'train.log'}")
                (run_dir / "budget_done").write_text(f"{used:.3f}\n")
                print(f"[train] {name} seed {seed}: done, {used:.1f} CPU-min", flush=True)
                del active[run_dir]
        if time.monotonic() - last_print > 30 and active:
            last_print = time.monotonic()
            status = ", ".join(f"{n} s{s} {spent(d):.1f}/{cpu_minutes:g}" for d, (n, s, _) in active.items())
            print(f"[train] CPU-min: {status}; {len(pending)} waiting", flush=True)


def checkpoints_at_marks(run_dir: Path, marks: list[float]) -> dict[float, tuple[int, float]]:
    """mark -> (epoch, CPU minutes) of the first checkpoint at or past the mark (the last one for marks
    beyond the run)."""
    cpu = cumulative_cpu_minutes(run_dir)
    saved = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("epoch_*"))
    out = {}
    for mark in marks:
        past = [e for e in saved if cpu.get(e, 0.0) >= mark - 1e-9]
        epoch = past[0] if past else saved[-1]
        out[mark] = (epoch, cpu[epoch])
    return out


def evaluate_point(run_dir: Path | None, epoch: int | None, guidance: float, cache: Path) -> dict:
    """Metrics on train and held-out prompts of a checkpoint (or of the base model: run_dir None), cached."""
    import json

    if cache.is_file():
        return json.loads(cache.read_text())
    from samplers.models import load_model

    model = load_model("shapesworld")
    if run_dir is not None:
        load_run_weights(model, run_dir / "checkpoints" / f"epoch_{epoch:06d}")
    model.eval().requires_grad_(False)
    result = {split: evaluate_model(model, split, guidance) for split in ("train", "test")}
    write_json(cache, result)
    return result


def method_guidances(config: str, overrides: list[str]) -> list[float]:
    """CFG scales to evaluate a method at: 4.5 always, and its training guidance if it is CFG-free."""
    import yaml

    cfg = yaml.safe_load(Path(config).read_text())
    g = float((cfg.get("sampler") or {}).get("guidance", GUIDANCE))
    for item in overrides:
        if item.startswith("sampler.guidance="):
            g = float(item.split("=", 1)[1])
    return [GUIDANCE] if g == GUIDANCE else [g, GUIDANCE]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/learning"))
    p.add_argument("--method", action="append", default=[], help="NAME=CONFIG [key=value ...] (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cpu-minutes", type=float, default=30.0, help="training CPU budget per run")
    p.add_argument("--eval-every", type=float, default=5.0, help="evaluate at every this many CPU minutes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    p.add_argument("--parallel", type=int, default=2, help="training runs at a time")
    p.add_argument("--control", action="append", default=[], choices=["own", "renders"],
                   help="add the self-consumption control trained on the model's own correct samples / renders")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    methods = [parse_method(m) for m in args.method]
    jobs = [(name, config, overrides, seed, args.out / name / f"seed_{seed}")
            for name, config, overrides in methods for seed in args.seeds]
    run_training(jobs, args.cpu_minutes, args.threads, args.parallel)

    marks = [round(args.eval_every * k, 6) for k in range(1, int(args.cpu_minutes / args.eval_every + 1e-9) + 1)]
    results = {"budget_cpu_minutes": args.cpu_minutes, "seeds": args.seeds, "base": {}, "methods": {},
               "controls": {}}
    for g in {g for _, c, o in methods for g in method_guidances(c, o)} | {GUIDANCE}:
        results["base"][str(g)] = evaluate_point(None, None, g, args.out / "base" / f"g{g}.json")
    for name, config, overrides in methods:
        rows = results["methods"][name] = {"guidances": method_guidances(config, overrides), "runs": {}}
        for seed in args.seeds:
            run_dir = args.out / name / f"seed_{seed}"
            points = []
            for mark, (epoch, cpu) in checkpoints_at_marks(run_dir, marks).items():
                for g in rows["guidances"]:
                    print(f"[eval] {name} seed {seed}: epoch {epoch} ({cpu:.1f} CPU-min), CFG {g}", flush=True)
                    metrics = evaluate_point(run_dir, epoch, g, run_dir / "eval" / f"epoch_{epoch}_g{g}.json")
                    points.append({"mark": mark, "epoch": epoch, "cpu_minutes": cpu, "guidance": g, **metrics})
            rows["runs"][str(seed)] = points
    if args.control:
        from .self_consumption import run_control

        for source in args.control:
            results["controls"][source] = {str(seed): run_control(source, seed, args.out / f"control_{source}")
                                           for seed in args.seeds}
    write_json(args.out / "results.json", results)
    from .report import write_report

    write_report(results, args.out)
    print((args.out / "table.md").read_text())


if __name__ == "__main__":
    main()

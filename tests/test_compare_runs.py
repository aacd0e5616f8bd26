"""eval.compare_runs: CPU-time accounting of held-out evaluations across algorithms."""

import csv
import json
import math

import pytest
import yaml

from eval import compare_runs


def _run(tmp_path, name, algorithm, rows, **config):
    run = tmp_path / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"algorithm": algorithm, **config}))
    keys = sorted({k for row in rows for k in row}, key=lambda k: (k != "epoch", k))
    with (run / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    return run


def _eval(epoch, strict, quality=0.86, cpu=None):
    row = {"epoch": epoch, "eval_strict_mean": strict, "eval_reward_mean": strict + 0.1,
           "eval_shapes_quality_mean": quality, "eval_num_samples": 384}
    return {**row, "cpu_train": cpu} if cpu is not None else row


def test_costs_exclude_evaluation_and_count_the_rollout_store(tmp_path, monkeypatch):
    grpo = _run(tmp_path, "grpo", "flow_grpo", [
        _eval(0, 0.40, cpu=60), {"epoch": 1, "cpu_train": 60}, _eval(2, 0.46, cpu=60), {"epoch": 3, "cpu_train": 60},
        _eval(4, 0.50),  # the final evaluation-only row
    ])
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps({"shards": {
        "a": {"seconds": 99.0, "cpu_seconds": 30.0}, "b": {"seconds": 45.0}}}))  # b: wall time only (older store)
    monkeypatch.chdir(tmp_path)  # the store path is relative to where training ran
    gdro = _run(tmp_path, "gdro", "gdro", [_eval(0, 0.40, cpu=15), _eval(1, 0.52, 0.80, cpu=15), _eval(2, 0.53)],
                store="store")

    g = compare_runs.load_curve(grpo)
    assert [e["cpu_minutes"] for e in g["evals"]] == [0.0, 2.0, 4.0]
    d = compare_runs.load_curve(gdro)
    assert d["setup_minutes"] == pytest.approx(75 / 60)
    assert [e["cpu_minutes"] for e in d["evals"]] == pytest.approx([1.25, 1.5, 1.75])
    assert compare_runs.minutes_to_reach(d, 0.50) == pytest.approx(1.5)
    assert math.isnan(compare_runs.minutes_to_reach(g, 0.9))

    budgeted = compare_runs.load_curve(grpo, budget_minutes=2.5)
    assert [e["epoch"] for e in budgeted["evals"]] == [0, 2]

    out = tmp_path / "cmp"
    compare_runs.main([str(grpo), str(gdro), "--labels", "Flow-GRPO", "GDRO", "--out", str(out)])
    text = (out / "compare.md").read_text()
    assert "| Flow-GRPO | flow_grpo | 4.0 | 0.400 | 0.500 ± 0.026 |" in text
    # GDRO reaches Flow-GRPO's final 0.500 after 1.5 CPU minutes (store generation included)
    gdro_line = next(line for line in text.splitlines() if line.startswith("| GDRO"))
    assert gdro_line.endswith("| 1.5 |")
    # corrected score r (u - 3) + 0.2 with u = 1 + 4 q: r = 0.5, q = 0.86 before
    assert f"{0.5 * (1 + 4 * 0.86 - 3) + 0.2:.3f}" in gdro_line
    assert (out / "compare.png").stat().st_size > 10_000


def test_bad_run_directories_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare_runs.main([str(tmp_path / "missing")])
    assert "missing: no metrics.csv" in capsys.readouterr().err
    old = _run(tmp_path, "old", "flow_grpo", [_eval(0, 0.4)])
    with pytest.raises(SystemExit):
        compare_runs.main([str(old)])
    assert "no cpu_train column" in capsys.readouterr().err


def test_gradient_signal_to_noise_estimate():
    """eval.grad_snr.signal_and_noise on per-sample gradients of known mean and spread."""
    import torch

    from eval.grad_snr import signal_and_noise

    gen = torch.Generator().manual_seed(0)
    n, p = 4000, 50
    mean = torch.zeros(p)
    mean[0] = 0.5  # ||E g||^2 = 0.25; per-sample noise: trace of the covariance = p * 1.0
    grads = mean + torch.randn(n, p, generator=gen)
    halves = (torch.arange(n // 2), torch.arange(n // 2, n))
    r = signal_and_noise(grads, halves)
    assert r["noise_per_sample"] == pytest.approx(p, rel=0.05)
    assert r["samples_for_snr_1"] == pytest.approx(p / 0.25, rel=0.2)
    assert r["split_half_cosine"] > 0.8  # 2000 samples per half >> 200: both halves see the mean
    pure_noise = signal_and_noise(torch.randn(n, p, generator=gen), halves)
    assert abs(pure_noise["split_half_cosine"]) < 0.2


def test_ode_completion_values_are_the_scores_of_deterministic_completions():
    """eval.grad_snr's step values: V(x_S) scores the final latents, V(x_k) the Euler ODE run
    from x_k (from x_0 it is the ODE sampler's own sample)."""
    import torch

    from samplers.generate import encode_prompts
    from eval.grad_snr import ode_completion_values
    from samplers.models.shapesworld import toy_components
    from samplers.rollout import rollout
    from samplers.schedules import flow_sigmas

    model = toy_components("test", seed=0).eval().requires_grad_(False)
    prompts = ["a photo of a red circle", "a photo of two squares"]
    cond = encode_prompts(model, prompts, 3.0, "")
    sigmas = flow_sigmas(4, shift=3.0)
    traj = rollout(model, cond, sigmas, step_types="flow_grpo_sde", step_params={"noise_level": 0.7},
                   guidance=3.0, batch_size=2, generator=torch.Generator().manual_seed(0))

    def score(latents):  # any deterministic function of the completed latents
        return latents.flatten(1).mean(1)

    values = ode_completion_values(model, cond, traj.latents, sigmas, 3.0, score)
    assert values.shape == (2, 5)
    torch.testing.assert_close(values[:, 4], score(traj.latents[:, 4]))
    with torch.no_grad():
        last = traj.latents[:, 3] + (sigmas[4] - sigmas[3]) * model.velocity(traj.latents[:, 3], sigmas[3], cond, 3.0)
    torch.testing.assert_close(values[:, 3], score(last))
    ode = rollout(model, cond, sigmas, step_types="ode", guidance=3.0, batch_size=2,
                  generator=torch.Generator().manual_seed(0))  # same initial noise, deterministic steps
    torch.testing.assert_close(values[:, 0], score(ode.final), atol=1e-5, rtol=1e-5)

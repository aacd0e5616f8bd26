"""`align eval` and the report folder: two checkpoints side by side, resume, monitor, bad input."""

from __future__ import annotations

import csv
import json

import pytest

from align.cli import main
from eval.dense import dense_prompts, dense_scene
from eval.report import Checkpoint, run_suite, write_report
from eval.shapes import scene_for_prompt
from tests.test_eval_geneval import blank_sampler, render_sampler, shapes_items
from tests.test_eval_monitor import HACKED


def any_scene(meta, seed):
    return dense_scene(meta, seed) if "objects" in meta else scene_for_prompt(meta, seed)


def build_report(out):
    """A report of a perfect 'model' (A) against a blank one (B), without any network."""
    items, dense = shapes_items(2), dense_prompts(6, seed=0)
    perfect = render_sampler(items + dense, scene=any_scene)
    checkpoints = [Checkpoint("A", "perfect renderer", perfect), Checkpoint("B", "blank", blank_sampler)]
    from rewards import build_reward

    results = run_suite(checkpoints, ["geneval", "dense"], out, geneval_items=items, dense_items=dense,
                        rewards={"shapes_quality": build_reward("shapes_quality"),
                                 "shapes_saturation": build_reward("shapes_saturation")},
                        optimised="shapes_saturation")
    return results, write_report(out, results)


def test_report_folder(tmp_path):
    results, paths = build_report(tmp_path)
    assert results["benchmarks"]["geneval"]["A"]["overall"] == 1.0
    assert results["benchmarks"]["geneval"]["B"]["overall"] == 0.0
    assert results["benchmarks"]["dense"]["net"]["net_win_rate"] == 1.0
    assert not results["monitor"]["flagged"]  # saturation fell from A to B: no hacking
    page = paths["html"].read_text()
    assert page.count("<table>") == 4 and "grids/geneval_A.png" in page and "grids/geneval_B.png" in page
    assert (tmp_path / "grids" / "dense_pairs.png").is_file()
    md = paths["markdown"].read_text()
    assert "| colors | 2 | 1.000 |" in md and "net win rate of A over B | 1.000" in md
    assert json.loads(paths["metrics"].read_text())["checkpoints"][1]["name"] == "blank"
    tables = sorted((tmp_path / "tables").glob("*.csv"))
    assert len(tables) == 4 and list(csv.reader(open(tables[1])))[0][:3] == ["category", "n", "A strict"]


def test_align_eval_end_to_end(tmp_path, capsys):
    from samplers.models.shapesworld import toy_components

    lora = toy_components("test", seed=0)
    lora.add_lora(rank=2)
    lora.save_lora(tmp_path / "lora")
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.csv", "w", newline="") as handle:  # a hacked training run's metrics
        writer = csv.DictWriter(handle, fieldnames=list(HACKED[0]))
        writer.writeheader()
        writer.writerows(HACKED)
    out = tmp_path / "report"
    argv = ["eval", "--model", "toy:test", "--lora", str(tmp_path / "lora"), "--compare-base", "--benchmark", "geneval",
            "--benchmark", "dense", "--per-tag", "1", "--dense-prompts", "3", "--num-steps", "2", "--out", str(out),
            "--optimised-reward", "shapes_saturation", "--monitor-run", str(run)]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "report:" in printed.out and "WARNING: reward hacking suspected" in printed.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["checkpoints"][0]["name"].endswith("lora") and metrics["checkpoints"][1]["name"] == "toy:test"
    assert set(metrics["rewards"]["A"]["means"]) == {"shapes_quality", "shapes_saturation", "verifier_strict",
                                                   "verifier_partial"}
    assert metrics["run_monitor"]["flagged"] and "WARNING (reward hacking" in (out / "index.html").read_text()
    png = out / "model_a" / "geneval" / "00000.png"
    stamp = png.stat().st_mtime_ns
    assert main(argv) == 0  # rerun: resumes, nothing is sampled again
    assert png.stat().st_mtime_ns == stamp
    assert main(argv[:-4] + ["--seed", "3"]) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--benchmark", "drawbench"], "unknown benchmark 'drawbench'"),
    (["--benchmark", "dense"], "pairwise"),
    (["--model", "/no/such/model"], "model '/no/such/model' not found"),
    (["--lora", "/no/such/lora"], "LoRA '/no/such/lora' not found"),
    (["--monitor-run", "/no/run"], "no metrics.csv"),
    (["--compare-base"], "pass --lora"),
])
def test_align_eval_bad_input(tmp_path, capsys, extra, message):
    argv = ["eval", "--model", "toy:test", "--out", str(tmp_path), "--per-tag", "1"]
    assert main(argv + extra) == 2
    assert message in capsys.readouterr().err


def test_align_eval_malformed_files(tmp_path, capsys):
    captions = tmp_path / "c.jsonl"
    captions.write_text('{"caption": "a red car"}\n{"caption": 3}\n')
    assert main(["eval", "--model", "toy:test", "--compare", "toy:test", "--benchmark", "dense",
                 "--captions", str(captions), "--out", str(tmp_path / "r")]) == 2
    assert "c.jsonl:2: no 'caption'" in capsys.readouterr().err
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"tag": "colors", "prompt": "a red car", "include": [{"class": "car", "count": 1}]}\n{oops\n')
    assert main(["eval", "--model", "toy:test", "--prompts", str(prompts), "--out", str(tmp_path / "s")]) == 2
    assert "p.jsonl:2: malformed JSON" in capsys.readouterr().err

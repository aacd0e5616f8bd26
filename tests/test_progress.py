"""samplers/progress.py: off a terminal, long commands print plain, flushed progress lines (phase,
done/total, rate, ETA) at least every GENALIGN_PROGRESS_SECONDS, and say what they load."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from samplers.progress import Progress, format_duration, status, track

REPO = Path(__file__).resolve().parents[1]


def test_plain_lines_start_at_once_repeat_while_a_step_is_slow_and_end_with_the_total(capsys):
    with Progress(4, "sampling", unit="images", interval=0.1) as bar:
        bar.phase("decoding")
        time.sleep(0.35)  # one slow step: the heartbeat keeps printing
        bar.advance(2)
        bar.print("a summary line")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "sampling: 0/4 images (0%) | elapsed 0:00"  # said at once, before any step ends
    assert sum(line.startswith("sampling (decoding): 0/4 images") for line in lines) >= 2  # heartbeats
    assert "a summary line" in lines
    assert re.fullmatch(r"sampling: 2/4 images \(50%\) \| [\d.]+ images/s \| took 0:00", lines[-1])


def test_rate_and_eta_of_a_resumed_task_count_only_this_run(capsys):
    bar = Progress(10, "training", unit="epochs", start=4, interval=1000)
    with bar:
        bar._started -= 20  # 20 s ago
        bar.update(6)  # 2 epochs in 20 s: 10 s per epoch, 4 left
        line = bar.summary()
    assert line == "training: 6/10 epochs (60%) | 10 s per epoch | elapsed 0:20 | eta 0:40"
    assert format_duration(3725) == "1:02:05" and format_duration(65) == "1:05"


def test_track_status_disabled_and_quiet(capsys):
    assert list(track(range(3), "steps", quiet=True)) == [0, 1, 2]
    assert list(track(iter([5, 6]), "unknown total", enabled=False)) == [5, 6]
    assert capsys.readouterr().err == ""
    status("loading model x on cpu ...")
    assert capsys.readouterr().err == "loading model x on cpu ...\n"
    assert list(track(range(2), "counting", unit="items")) == [0, 1]
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "counting: 0/2 items (0%) | elapsed 0:00" and err[-1].startswith("counting: 2/2 items (100%)")


def test_align_train_to_a_pipe_says_what_it_does_and_shows_progress(tmp_path):
    overrides = ["model=toy:test", "reward=shapes_saturation", "group_size=2", "groups_per_epoch=2", "num_epochs=2",
                 "sampler.num_steps=2", "micro_batch_size=4", "eval_every=1", "prompts.eval_num_prompts=2",
                 "sampler.eval_num_steps=2", "lora.rank=2", f"output_dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "GENALIGN_PROGRESS_SECONDS": "0.5"}
    run = subprocess.run([sys.executable, "-m", "align", "train", str(REPO / "configs/shapes/flow_grpo.yaml"),
                          *overrides], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()  # progress goes to stderr, as with tqdm; stdout keeps the results
    assert lines[0].startswith("align train: importing torch")  # before the slow imports
    assert "loading model toy:test on cpu ..." in lines
    assert "training: 0/2 epochs (0%) | elapsed" in "\n".join(lines)
    assert any(re.match(r"held-out evaluation: \d+/1 batches", line) for line in lines)
    assert any(line.startswith("epoch 1/2 reward") and "| eta " in line for line in lines)
    # the bar's last line (a heartbeat may print "2/2 ... elapsed" while the last checkpoint is saved)
    assert re.match(r"training: 2/2 epochs \(100%\) \| .* \| took \d+:\d\d$",
                    [line for line in lines if line.startswith("training: 2/2")][-1])

"""The `align` command line: sampling, scoring and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from align.cli import main
from eval.shapes import prompts, render, scene_for_prompt


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from samplers.models.shapesworld import toy_components

    path = tmp_path_factory.mktemp("tiny") / "model"
    toy_components("test", seed=0).save_pretrained(path)
    return path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert not any(line.startswith(("Traceback", "  File")) for line in err), err  # no traceback
    errors = [line for line in err if line.startswith("align: error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err  # one error line, the last (after progress lines)
    return errors[0]


def test_sample_folder_and_grid(tiny_model_dir, tmp_path):
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(tiny_model_dir), "--prompt", "a photo of a red circle",
                 "--prompt", "a photo of two squares", "--num", "3", "--seed", "5", "--out", str(out),
                 "num_steps=2"]) == 0
    lines = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert [l["file"] for l in lines] == ["00000.png", "00001.png", "00002.png"]
    assert [l["seed"] for l in lines] == [5, 6, 7]
    assert [l["prompt"] for l in lines] == ["a photo of a red circle", "a photo of two squares",
                                           "a photo of a red circle"]
    assert Image.open(out / "00000.png").size == (16, 16)
    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", str(tiny_model_dir), "--num", "2", "--prompt", "a photo of a circle",
                 "--out", str(grid), "num_steps=2"]) == 0
    assert Image.open(grid).size[0] > 32


def test_sample_videos_to_mp4_folder_and_filmstrip_grid(tmp_path):
    """A Wan-family model through `align sample`: one .mp4 per video (decodable, ~lossless) and a
    grid of filmstrips."""
    import torch

    from rewards.video_io import read_video
    from samplers.generate import generate
    from samplers.models.shapesworld_video import toy_video_components

    model = toy_video_components("test", seed=0)
    model.save_pretrained(tmp_path / "video_model")
    out = tmp_path / "clips"
    prompt = "a red circle moving left"
    assert main(["sample", "--model", str(tmp_path / "video_model"), "--prompt", prompt, "--num", "2",
                 "--out", str(out), "num_steps=2"]) == 0
    lines = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert [l["file"] for l in lines] == ["00000.mp4", "00001.mp4"]
    frames, height, width = model.video_size
    clip = read_video(out / "00001.mp4", fps=1000, max_frames=frames, max_pixels=10**6).frames  # (T, H, W, 3)
    assert clip.shape == (frames, height, width, 3)
    expected = generate(model, [prompt], seeds=[1], num_steps=2)[0]  # [3, T, H, W], seed 0 + 1
    expected = (expected.clamp(0, 1) * 255).round().permute(1, 2, 3, 0).numpy()
    assert np.abs(clip.astype(float) - expected).max() <= 4  # RGB <-> YUV 4:4:4 rounding only
    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", str(tmp_path / "video_model"), "--prompt", prompt, "--num", "2",
                 "--out", str(grid), "num_steps=2"]) == 0
    assert Image.open(grid).size[0] > 2 * frames * width  # two filmstrips side by side


def test_sample_per_tag_is_balanced(tiny_model_dir, tmp_path):
    out = tmp_path / "balanced"
    assert main(["sample", "--model", str(tiny_model_dir), "--per-tag", "2", "--out", str(out), "num_steps=1"]) == 0
    tags = [json.loads(l)["meta"]["tag"] for l in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted(set(tags)) == sorted(["single_object", "two_object", "counting", "colors", "position", "color_attr"])
    assert all(tags.count(t) == 2 for t in set(tags))


def _write_ground_truth_folder(folder, n=12):
    folder.mkdir()
    metas = prompts("test")[:n]
    lines = []
    for i, meta in enumerate(metas):
        Image.fromarray(render(scene_for_prompt(meta, i))).save(folder / f"{i:05d}.png")
        lines.append(json.dumps({"file": f"{i:05d}.png", "prompt": meta["prompt"], "seed": i}))
    (folder / "samples.jsonl").write_text("\n".join(lines) + "\n")


def test_score_ground_truth_folder(tmp_path, capsys):
    folder = tmp_path / "gt"
    _write_ground_truth_folder(folder)
    assert main(["score", str(folder), "--out", str(tmp_path / "s.jsonl")]) == 0
    rows = [json.loads(l) for l in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["strict"] for r in rows)
    assert "overall" in capsys.readouterr().out
    assert main(["score", str(folder)]) == 0
    assert (folder / "scores.csv").read_text().startswith("file,prompt,tag,strict,partial")


def test_bad_input_gives_one_line_errors(tmp_path, capsys, tiny_model_dir):
    assert main(["sample", "--model", str(tmp_path / "missing"), "--prompt", "x", "--out", str(tmp_path / "a.png")]) == 2
    assert "not found" in _error_line(capsys)

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("algorithm: sample\nnum_steps: [1,\n")
    assert main(["sample", str(bad_yaml), "--out", str(tmp_path / "a.png")]) == 2
    assert "bad.yaml" in _error_line(capsys)

    assert main(["sample", "num_stepz=3", "--out", str(tmp_path / "a.png")]) == 2
    assert "num_stepz" in _error_line(capsys)

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["sample", "--model", str(tiny_model_dir), "--prompts", str(empty), "--out", str(tmp_path / "a.png")]) == 2
    assert "no prompts" in _error_line(capsys)

    folder = tmp_path / "gt"
    _write_ground_truth_folder(folder, n=3)
    Image.new("RGB", (32, 32)).save(folder / "00001.png")
    assert main(["score", str(folder)]) == 2
    assert "00001.png" in (line := _error_line(capsys)) and "32x32" in line

    (folder / "00001.png").write_bytes(b"not a png")
    assert main(["score", str(folder)]) == 2
    assert "00001.png" in (line := _error_line(capsys)) and "not a readable image" in line

    (folder / "samples.jsonl").write_text('{"file": "00000.png", "prompt": "a photo of a circle"}\n{oops\n')
    assert main(["score", str(folder)]) == 2
    assert "samples.jsonl:2" in _error_line(capsys)


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "align", "sample", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--num" in result.stdout


def test_score_a_file_or_missing_folder_says_what_to_do(tmp_path, capsys):
    grid = tmp_path / "samples.png"
    Image.new("RGB", (64, 64)).save(grid)
    assert main(["score", str(grid)]) == 2
    line = _error_line(capsys)
    assert "not a folder" in line and "align sample --out DIR" in line
    assert main(["score", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in _error_line(capsys)
    assert main(["score", str(tmp_path / "nowhere"), "--reward", "shapes_saturation"]) == 2
    assert "does not exist" in _error_line(capsys)


TRAIN_YAML = str(Path(__file__).resolve().parents[1] / "configs" / "shapes" / "flow_grpo.yaml")


def test_help_config_shows_effective_values_and_their_source(capsys):
    assert main(["train", TRAIN_YAML, "num_epochs=7", "--help-config"]) == 0
    rows = {line.split()[0]: line.split(None, 1)[1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["num_epochs"] == "7  [override]"
    assert rows["lora.rank"] == f"16  [{TRAIN_YAML}:10]"  # the file's value, not the dataclass default 32
    assert rows["group_size"].startswith("8  [") and rows["sampler.eval_num_steps"].startswith("10  [")
    assert rows["sampler.eta"] == "0.3  [default]"
    assert rows["kl_beta"] == f"0.04  [{TRAIN_YAML}:33, null -> resolved]"  # the variant's paper default
    # without a file: every trainer's keys with their defaults and documentation
    assert main(["train", "--help-config"]) == 0
    text = capsys.readouterr().out
    assert "FlowGRPOConfig (algorithm: flow_grpo)" in text and "  lora.rank (int; default: 32)" in text
    assert "CRDConfig" in text and "GDROConfig" in text
    # an algorithm named by override alone: the defaults plus that override
    assert main(["train", "algorithm=flow_grpo", "num_epochs=3", "--help-config"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines()[1:]}
    assert "effective values from defaults + " in out.splitlines()[0]
    assert rows["lora.rank"] == "32  [default]" and rows["num_epochs"] == "3  [override]"

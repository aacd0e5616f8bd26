"""`align score --reward / --reward-config`: any reward over a folder of images and videos."""

from __future__ import annotations

import csv
import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

from align.cli import main, parse_reward_arg
from eval.score import load_video
from eval.shapes import prompts, render, scene_for_prompt
from rewards import build_reward
from rewards.base import IMAGE, Reward

FRAMES, SIZE = 6, 32


def _write_mp4(path, frames: np.ndarray) -> None:
    """(T, H, W, 3) uint8 -> an mpeg4 mp4 written with PyAV."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _clip() -> np.ndarray:
    """A grey square sliding over a red background, FRAMES x SIZE x SIZE."""
    frames = np.zeros((FRAMES, SIZE, SIZE, 3), np.uint8)
    frames[..., 0] = 200
    for t in range(FRAMES):
        frames[t, 8:20, 2 + 3 * t:14 + 3 * t] = 128
    return frames


@pytest.fixture
def media_folder(tmp_path):
    """Two ShapesWorld renders (64 px), one 32 px PNG, one mp4, a corrupt PNG and a text file."""
    folder = tmp_path / "media"
    folder.mkdir()
    metas = prompts("test")[:2]
    for i, meta in enumerate(metas):
        Image.fromarray(render(scene_for_prompt(meta, i))).save(folder / f"a{i}.png")
    Image.new("RGB", (SIZE, SIZE), (0, 90, 200)).save(folder / "b_small.png")
    _write_mp4(folder / "c_clip.mp4", _clip())
    (folder / "d_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("ignored")
    return folder


def _tensor(path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float()[None] / 255


def _read_csv(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _problems(err: str) -> list[str]:
    """The skipped-file and error lines of stderr (without the progress and "loading ..." lines)."""
    return [line for line in err.strip().splitlines() if line.startswith("align:")]


def test_single_reward_images_video_and_corrupt_file(media_folder, capsys):
    assert main(["score", str(media_folder), "--reward", "shapes_saturation", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    errors = _problems(captured.err)
    assert len(errors) == 1 and "d_corrupt.png" in errors[0] and "not a readable image" in errors[0]
    assert "4 read, 1 skipped" in captured.out

    rows = {row["file"]: row for row in _read_csv(media_folder / "scores.csv")}
    assert sorted(rows) == ["a0.png", "a1.png", "b_small.png", "c_clip.mp4", "d_corrupt.png"]
    saturation = build_reward("shapes_saturation")
    for name in ("a0.png", "b_small.png"):
        expected = float(saturation(_tensor(media_folder / name)).scores[0])
        assert float(rows[name]["score"]) == pytest.approx(expected, abs=1e-6)
        assert rows[name]["error"] == ""
    assert float(rows["c_clip.mp4"]["score"]) > 0.2  # red background, grey square: clearly saturated
    assert rows["d_corrupt.png"]["score"] == "" and "d_corrupt.png" in rows["d_corrupt.png"]["error"]


class ImageOnlyBrightness(Reward):
    """Mean pixel value; images only (for the per-file modality error below)."""

    name = "brightness"
    modalities = (IMAGE,)
    requires_prompts = False

    def score(self, samples, prompts=None, **kwargs):
        return samples.flatten(1).mean(1)


def test_weighted_sum_jsonl_and_shape_mismatch(media_folder, capsys):
    out = media_folder.parent / "scores.jsonl"
    assert main(["score", str(media_folder), "--reward", "shapes_saturation:0.5", "--reward", "shapes_quality:2",
                 "--out", str(out)]) == 0
    rows = {row["file"]: row for row in map(json.loads, out.read_text().splitlines())}
    for name in ("a0.png", "a1.png", "b_small.png", "c_clip.mp4"):  # shapes_quality scores videos per frame
        row = rows[name]
        assert row["score"] == pytest.approx(0.5 * row["shapes_saturation"] + 2 * row["shapes_quality"])
        assert "shapes_quality/mean_residual" in row and row["error"] is None
    assert rows["a0.png"]["shapes_quality"] == 1.0  # a clean render
    capsys.readouterr()

    # an image-only reward: the video is rejected with its own line, the rest are scored
    assert main(["score", str(media_folder), "--reward", "tests.test_score_cli:ImageOnlyBrightness",
                 "--out", str(out)]) == 0
    errors = _problems(capsys.readouterr().err)
    assert len(errors) == 2
    assert any("c_clip.mp4" in line and "expected images" in line for line in errors)
    rows = {row["file"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert rows["c_clip.mp4"]["score"] is None and rows["c_clip.mp4"]["error"]
    assert all(rows[name]["error"] is None for name in ("a0.png", "a1.png", "b_small.png"))


def test_reward_config_with_listing_and_metadata(tmp_path):
    folder = tmp_path / "gt"
    folder.mkdir()
    lines = []
    for i, meta in enumerate(prompts("test")[:4]):
        Image.fromarray(render(scene_for_prompt(meta, i))).save(folder / f"{i:05d}.png")
        lines.append(json.dumps({"file": f"{i:05d}.png", "prompt": meta["prompt"], "meta": meta}))
    (folder / "samples.jsonl").write_text("\n".join(lines) + "\n")
    config = tmp_path / "reward.yaml"
    config.write_text("# an experiment-style file: only `reward:` is read\nreward:\n  type: shapes_geneval\n"
                      "  mode: strict\nseed: 3\n")
    assert main(["score", str(folder), "--reward-config", str(config), "--out", str(tmp_path / "r.csv")]) == 0
    rows = _read_csv(tmp_path / "r.csv")
    assert [r["file"] for r in rows] == [f"{i:05d}.png" for i in range(4)]
    assert all(float(r["score"]) == 1.0 and float(r["strict"]) == 1.0 for r in rows)
    assert rows[0]["prompt"] == prompts("test")[0]["prompt"]


def test_nothing_scorable_is_an_error(tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"garbage")
    (folder / "y.mp4").write_bytes(b"garbage")
    assert main(["score", str(folder), "--reward", "shapes_saturation"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("x.png" in line for line in err) and any("y.mp4" in line and "not a readable video" in line
                                                        for line in err)
    assert err[-1].startswith("align: error: nothing could be scored")


def test_bad_reward_specs_are_one_line_errors(media_folder, tmp_path, capsys):
    assert main(["score", str(media_folder), "--reward", "no_such_reward"]) == 2
    err = _problems(capsys.readouterr().err)
    assert len(err) == 1 and "unknown reward 'no_such_reward'" in err[0] and "shapes_saturation" in err[0]

    config = tmp_path / "bad.yaml"
    config.write_text("reward: [1,\n")
    assert main(["score", str(media_folder), "--reward-config", str(config)]) == 2
    assert "bad.yaml: malformed YAML" in capsys.readouterr().err

    assert main(["score", str(media_folder), "--reward", "http_judge"]) == 2  # needs arguments: use a config
    assert "base_url" in capsys.readouterr().err


def test_parse_reward_arg():
    assert parse_reward_arg("shapes_geneval") == {"name": "shapes_geneval", "weight": 1.0}
    assert parse_reward_arg("shapes_geneval:0.5") == {"name": "shapes_geneval", "weight": 0.5}
    assert parse_reward_arg("pkg.mod:attr") == {"name": "pkg.mod:attr", "weight": 1.0}
    assert parse_reward_arg("pkg.mod:attr:-2") == {"name": "pkg.mod:attr", "weight": -2.0}
    reward = build_reward({"type": "weighted_sum", "rewards": [parse_reward_arg("rewards.shapes:SaturationReward:2")]})
    assert reward(torch.ones(1, 3, 4, 4)).scores.item() == 0.0


def test_video_decoders_agree(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    _write_mp4(path, _clip())
    decord_frames = load_video(path, num_frames=4)
    assert decord_frames.shape == (4, SIZE, SIZE, 3) and decord_frames.dtype == np.uint8
    expected = _clip()[[0, 2, 3, 5]].astype(float)  # evenly spaced: linspace(0, 5, 4) rounded
    assert np.abs(decord_frames - expected).mean() < 8  # lossy codec

    import eval.score

    def no_decord(*args):
        raise ImportError("decord missing")

    monkeypatch.setattr(eval.score, "_read_decord", no_decord)
    pyav_frames = load_video(path, num_frames=4)
    assert pyav_frames.shape == decord_frames.shape
    assert np.abs(pyav_frames.astype(float) - decord_frames).mean() < 2

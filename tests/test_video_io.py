"""rewards/video_io.py: real files written with PyAV / PIL and decoded with decord and PyAV."""

import numpy as np
import pytest

from rewards.video_io import VideoReadError, read_video, select_frames, write_video

H, W = 48, 64


def clip(num=10):
    """Frames whose index is readable back from the pixels: frame i has a bar at x = 6 i."""
    frames = np.full((num, H, W, 3), 40, dtype=np.uint8)
    for i in range(num):
        frames[i, 8:40, 6 * i:6 * i + 6] = (250, 200, 20)
    return frames


def bar_position(frame):
    """Index of the frame the bar comes from (frames may be downscaled)."""
    row = frame[frame.shape[0] // 2, :, 0] > 150
    return int(round(np.argmax(row) * W / frame.shape[1] / 6))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    return {suffix: write_video(root / f"clip{suffix}", clip(), fps=2.0) for suffix in (".mp4", ".webm", ".gif")}


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".gif"])
def test_reads_at_target_fps(files, suffix):
    video = read_video(files[suffix], fps=1.0, max_frames=50)
    # 10 frames at 2 fps = 5 s: one frame per second, the frame on screen at t = 0, 1, 2, 3, 4
    assert video.frames.shape == (5, H, W, 3) and video.frames.dtype == np.uint8
    np.testing.assert_allclose(video.timestamps, [0, 1, 2, 3, 4], atol=1e-3)
    assert [bar_position(f) for f in video.frames] == [0, 2, 4, 6, 8]
    assert abs(video.source_fps - 2.0) < 1e-3 and abs(video.duration - 5.0) < 1e-3
    assert np.abs(video.frames.astype(float) - clip()[::2]).mean() < 3  # near-lossless


def test_decord_and_pyav_agree(files):
    a = read_video(files[".mp4"], fps=None, backend="decord")
    b = read_video(files[".mp4"], fps=None, backend="pyav")
    assert a.frames.shape == b.frames.shape == (10, H, W, 3)
    np.testing.assert_allclose(a.timestamps, b.timestamps, atol=1e-3)
    assert np.abs(a.frames.astype(float) - b.frames).mean() < 1


def test_max_frames_and_pixel_budget(files):
    video = read_video(files[".mp4"], fps=None, max_frames=4, max_pixels=32 * 24)
    assert video.frames.shape == (4, 24, 32, 3)  # 64 x 48 halved: aspect kept
    assert [bar_position(f) for f in video.frames] == [0, 3, 6, 9]  # evenly spaced, first and last kept
    assert select_frames(np.arange(10) / 2, fps=None, max_frames=4).tolist() == [0, 3, 6, 9]
    assert select_frames(np.arange(10) / 30, fps=1.0, max_frames=50).tolist() == [0]


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(VideoReadError, match="missing.mp4: video file not found"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoReadError, match="empty.mp4: empty file"):
        read_video(tmp_path / "empty.mp4")
    (tmp_path / "corrupt.webm").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(VideoReadError, match=r"corrupt.webm: not a readable video \(decord: .*; pyav: "):
        read_video(tmp_path / "corrupt.webm")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(VideoReadError, match="notes.txt: unsupported video type '.txt'"):
        read_video(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="fps must be > 0"):
        select_frames(np.arange(3.0), fps=0, max_frames=None)

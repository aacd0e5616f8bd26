"""Reading (and writing) videos for video rewards: target fps, frame cap, pixel budget.

    clip = read_video("run.mp4", fps=1.0, max_frames=50, max_pixels=1280 * 720)
    clip.frames      # uint8 [T, H, W, 3]
    clip.timestamps  # float64 [T], seconds from the start of the file

decord decodes first (fast seeking); PyAV is the fallback (and the reader for GIFs, which
decord does not open). Frames are chosen by timestamp: one every ``1 / fps`` seconds (the frame
shown at that time), then, if more than ``max_frames`` remain, ``max_frames`` evenly spaced
ones (first and last included). Frames larger than ``max_pixels`` are downscaled keeping the
aspect ratio. Missing, empty, corrupt or unsupported files raise :class:`VideoReadError`, whose
message starts with the file's path.

:func:`write_video` writes mp4 (H.264), webm (VP9) or gif with PyAV, for tests and the
synthetic GUI recordings (eval/gui_videos.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["VIDEO_SUFFIXES", "VideoClip", "VideoReadError", "read_video", "write_video", "select_frames"]

VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".mov", ".avi", ".mkv")


class VideoReadError(ValueError):
    """A video could not be read; the message names the file."""


@dataclass
class VideoClip:
    """Sampled frames of one video.

    frames:     uint8 [T, H, W, 3] RGB.
    timestamps: float64 [T], seconds of each frame in the source.
    source_fps: the file's average frame rate; duration: seconds covered by the file.
    path:       where it came from (for messages).
    """

    frames: np.ndarray
    timestamps: np.ndarray
    source_fps: float
    duration: float
    path: str = ""

    def __len__(self) -> int:
        return len(self.frames)


def select_frames(timestamps: np.ndarray, fps: float | None, max_frames: int | None) -> np.ndarray:
    """Indices of the frames to keep, given each source frame's start time [N] (seconds, sorted).

    ``fps``: one frame every 1/fps s, the frame on screen at that time (None: every frame);
    then at most ``max_frames`` evenly spaced ones (first and last kept).
    """
    timestamps = np.asarray(timestamps, dtype=np.float64)
    if len(timestamps) == 0:
        return np.zeros(0, dtype=np.int64)
    if fps is None:
        indices = np.arange(len(timestamps))
    else:
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        start, stop = timestamps[0], timestamps[-1]
        # A small tolerance: timestamps from containers are rounded to their time base.
        targets = start + np.arange(int(math.floor((stop - start) * fps + 1e-6)) + 1) / fps
        indices = np.searchsorted(timestamps, targets + 1e-6, side="right") - 1
        indices = np.unique(indices.clip(0, len(timestamps) - 1))
    if max_frames is not None and len(indices) > max_frames:
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        picks = np.unique(np.linspace(0, len(indices) - 1, max_frames).round().astype(np.int64))
        indices = indices[picks]
    return indices


def _resize_to_budget(frames: np.ndarray, max_pixels: int | None) -> np.ndarray:
    """Downscale [T, H, W, 3] so that H * W <= max_pixels (aspect kept, sizes rounded down)."""
    height, width = frames.shape[1:3]
    if max_pixels is None or height * width <= max_pixels:
        return frames
    from PIL import Image

    scale = math.sqrt(max_pixels / (height * width))
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return np.stack([np.asarray(Image.fromarray(frame).resize(size, Image.BILINEAR)) for frame in frames])


def _read_decord(path: Path) -> tuple[np.ndarray, float, "callable"]:
    from decord import VideoReader, cpu

    reader = VideoReader(str(path), ctx=cpu(0), num_threads=1)
    count = len(reader)
    if count == 0:
        return np.zeros(0), 0.0, None
    starts = reader.get_frame_timestamp(np.arange(count))[:, 0].astype(np.float64)
    return starts, float(reader.get_avg_fps()), lambda idx: reader.get_batch(list(map(int, idx))).asnumpy()


def _read_pyav(path: Path) -> tuple[np.ndarray, float, "callable"]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames, starts = [], []
        for frame in container.decode(stream):  # sequential decode: fine for recordings of minutes
            frames.append(frame.to_ndarray(format="rgb24"))
            starts.append(float(frame.time) if frame.time is not None else len(starts) / float(stream.average_rate or 1))
        rate = float(stream.average_rate) if stream.average_rate else 0.0
    if not frames:
        return np.zeros(0), 0.0, None
    starts = np.asarray(starts, dtype=np.float64)
    order = np.argsort(starts, kind="stable")  # presentation order
    starts = starts[order]
    return starts, rate, lambda idx: np.stack([frames[order[i]] for i in idx])


_BACKENDS = {"decord": _read_decord, "pyav": _read_pyav}


def read_video(path: str | Path, fps: float | None = 1.0, max_frames: int | None = 50,
               max_pixels: int | None = 1280 * 720, backend: str = "auto") -> VideoClip:
    """Decode ``path`` (mp4, webm, gif, mov, avi, mkv) into a :class:`VideoClip`.

    fps:        target sampling rate in frames per second (None: every frame). ExeVRM uses 1.
    max_frames: cap on the number of frames (evenly spaced over the sampled ones). ExeVRM: 50.
    max_pixels: per-frame pixel budget, larger frames are downscaled (720p = 1280 * 720).
    backend:    "auto" (decord, then PyAV), "decord" or "pyav".
    Raises VideoReadError naming the file when it is missing, empty, not a video, or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"{path}: video file not found")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise VideoReadError(f"{path}: unsupported video type {path.suffix or '(no suffix)'!r}; "
                             f"supported: {', '.join(VIDEO_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise VideoReadError(f"{path}: empty file (0 bytes)")
    if backend == "auto":
        # decord cannot open GIFs (and sometimes reports 0 frames instead of failing)
        names = ["pyav"] if path.suffix.lower() == ".gif" else ["decord", "pyav"]
    elif backend in _BACKENDS:
        names = [backend]
    else:
        raise ValueError(f"backend must be 'auto', 'decord' or 'pyav', got {backend!r}")
    failures = []
    for name in names:
        try:
            starts, rate, fetch = _BACKENDS[name](path)
            if fetch is None:
                failures.append(f"{name}: no frames")
                continue
            indices = select_frames(starts, fps, max_frames)
            frames = fetch(indices)
        except ValueError as err:
            if "fps" in str(err) or "max_frames" in str(err):
                raise
            failures.append(f"{name}: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}")
            continue
        except Exception as err:  # decord / PyAV raise their own types (or are not installed)
            failures.append(f"{name}: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}")
            continue
        if frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
            failures.append(f"{name}: decoded an unexpected array of shape {frames.shape}")
            continue
        if len(starts) > 1:
            step = float(np.median(np.diff(starts)))
            duration = float(starts[-1] - starts[0]) + (step if step > 0 else 0.0)
        else:
            duration = 1.0 / rate if rate else 0.0
        return VideoClip(_resize_to_budget(np.ascontiguousarray(frames, dtype=np.uint8), max_pixels),
                         starts[indices], rate or (1.0 / step if len(starts) > 1 and step > 0 else 0.0), duration,
                         str(path))
    raise VideoReadError(f"{path}: not a readable video ({'; '.join(failures)})")


def write_video(path: str | Path, frames: np.ndarray, fps: float = 2.0, quality: int = 10) -> Path:
    """Write uint8 frames [T, H, W, 3] to ``path``: .mp4 (H.264, yuv444p so 1-px GUI edges
    survive), .webm (VP9) or .gif. ``quality``: CRF for mp4/webm (lower = better).
    H and W must be even for mp4 / webm."""
    import av
    from fractions import Fraction

    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_video: frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        from PIL import Image

        images = [Image.fromarray(frame) for frame in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(round(1000 / fps)), loop=0)
        return path
    codecs = {".mp4": ("libx264", "yuv444p"), ".webm": ("libvpx-vp9", "yuv444p")}
    if suffix not in codecs:
        raise ValueError(f"write_video: {path}: write .mp4, .webm or .gif")
    codec, pixel_format = codecs[suffix]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pixel_format
        stream.options = {"crf": str(quality)} | ({"b:v": "0", "deadline": "realtime", "cpu-used": "8"}
                                                  if codec == "libvpx-vp9" else {"preset": "veryfast"})
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path

"""ShapesWorld-Video: clips of moving ShapesWorld objects, captions, splits and a pixel verifier.

Pure numpy + Pillow on top of ``eval.shapes`` (same bottom layer of the import graph).

    >>> from eval.shapes_video import video_prompts, clip_for_prompt, render_clip, evaluate_clip
    >>> meta = video_prompts("train")[0]                      # "a red circle moving left"
    >>> frames = render_clip(clip_for_prompt(meta, rng=0))    # (8, 64, 64, 3) uint8
    >>> evaluate_clip(frames, meta)["strict"]
    True
"""

from .verify import Track, aggregate_video, evaluate_clip, evaluate_tracks, motion_direction, track_objects
from .world import (
    DIRECTIONS,
    HELD_OUT_COLOR_DIRECTION,
    NUM_FRAMES,
    SPEED_RANGES,
    SPEED_THRESHOLD,
    VIDEO_TAGS,
    Clip,
    MovingObject,
    all_video_prompts,
    clip_for_prompt,
    filmstrip,
    is_held_out,
    render_clip,
    render_clips,
    video_prompt,
    video_prompts,
)

__all__ = [
    "DIRECTIONS",
    "HELD_OUT_COLOR_DIRECTION",
    "NUM_FRAMES",
    "SPEED_RANGES",
    "SPEED_THRESHOLD",
    "VIDEO_TAGS",
    "Clip",
    "MovingObject",
    "Track",
    "aggregate_video",
    "all_video_prompts",
    "clip_for_prompt",
    "evaluate_clip",
    "evaluate_tracks",
    "filmstrip",
    "is_held_out",
    "motion_direction",
    "render_clip",
    "render_clips",
    "track_objects",
    "video_prompt",
    "video_prompts",
]

"""Scoring: one reward signature, a registry, compositions and every reward model.

    from rewards import build_reward
    reward = build_reward("shapes_geneval")            # or a dict / "pkg.module:attr"
    out = reward(samples, prompts)                     # samples [B, 3, H, W] in [0, 1]
    out.scores, out.extras, out.nan_count              # scores [B] float32, NaN = not scored

Importing ``rewards`` registers every built-in reward (a module defining rewards must be
imported here for its names to be buildable).
"""

from rewards.base import (
    FunctionReward,
    Reward,
    RewardOutput,
    as_scores,
    build_reward,
    build_weighted_reward,
    register_reward,
    registered_rewards,
)
from rewards.compose import BaseAndBonus, Ensemble, WeightedSum, zscore
import rewards.clip  # noqa: F401  registers clip_score, vlm_rm, pickscore, hpsv2, aesthetic (lazy heavy imports)
from rewards.shapes import SaturationReward, ShapesGenEvalReward, lookup_shapes_metadata, to_uint8_images
import rewards.vlm  # noqa: F401  (registers the VLM rewards; transformers is imported lazily)
import rewards.http  # noqa: F401  (registers "http_judge")
import rewards.remote  # noqa: F401  (registers "remote": a reward served by `align serve`)
import rewards.shapes_clip  # noqa: F401  (registers "shapes_clip_score"; the shipped CLIP loads on first use)
import rewards.shapes_video  # noqa: F401  (registers "shapes_video_verifier", "shapes_video_motion")
import rewards.shapes_soft  # noqa: F401  (registers "shapes_soft_geneval")
import rewards.shapes_vlm  # noqa: F401  (registers "shapes_prompt_echo"; weights load on first use)
import rewards.artifact  # noqa: F401  (registers "artifact_classifier"; the shipped head loads on construction)
import rewards.video_exec  # noqa: F401  (registers "video_exec"; transformers is imported lazily)

__all__ = [
    "BaseAndBonus",
    "Ensemble",
    "FunctionReward",
    "Reward",
    "RewardOutput",
    "SaturationReward",
    "ShapesGenEvalReward",
    "WeightedSum",
    "as_scores",
    "build_reward",
    "build_weighted_reward",
    "lookup_shapes_metadata",
    "register_reward",
    "registered_rewards",
    "to_uint8_images",
    "zscore",
]

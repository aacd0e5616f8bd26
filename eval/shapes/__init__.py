"""ShapesWorld: the embedded toy world with GenEval-style prompts and an exact verifier.

Pure numpy + Pillow; imports nothing else from the project (bottom of the import layering).

    >>> from eval.shapes import prompts, scene_for_prompt, render, evaluate
    >>> meta = prompts("train")[0]
    >>> image = render(scene_for_prompt(meta, rng=0))  # (64, 64, 3) uint8
    >>> evaluate(image, meta)["strict"]
    True
"""

from .fidelity import render_gap, residual_quantiles
from .verifier import (
    Detection,
    aggregate,
    classify_pixels,
    palette_residual,
    connected_components,
    detect,
    evaluate,
    evaluate_batch,
    evaluate_detections,
    group_by_class,
)
from .world import (
    BACKGROUND,
    COLORS,
    HELD_OUT_COLOR_SHAPE,
    HELD_OUT_COUNTS,
    HELD_OUT_POSITIONS,
    IMAGE_SIZE,
    PALETTE,
    RELATIONS,
    SHAPES,
    TAGS,
    ObjectSpec,
    Scene,
    all_prompts,
    as_rng,
    caption,
    color_attr_prompt,
    colors_prompt,
    counting_prompt,
    is_held_out,
    position_prompt,
    prompts,
    relative_position,
    render,
    scene_for_prompt,
    single_object_prompt,
    two_object_prompt,
)

__all__ = [
    "render_gap",
    "residual_quantiles",
    "BACKGROUND",
    "COLORS",
    "HELD_OUT_COLOR_SHAPE",
    "HELD_OUT_COUNTS",
    "HELD_OUT_POSITIONS",
    "IMAGE_SIZE",
    "PALETTE",
    "RELATIONS",
    "SHAPES",
    "TAGS",
    "Detection",
    "ObjectSpec",
    "Scene",
    "aggregate",
    "all_prompts",
    "as_rng",
    "caption",
    "classify_pixels",
    "palette_residual",
    "color_attr_prompt",
    "colors_prompt",
    "connected_components",
    "counting_prompt",
    "detect",
    "evaluate",
    "evaluate_batch",
    "evaluate_detections",
    "group_by_class",
    "is_held_out",
    "position_prompt",
    "prompts",
    "relative_position",
    "render",
    "scene_for_prompt",
    "single_object_prompt",
    "two_object_prompt",
]

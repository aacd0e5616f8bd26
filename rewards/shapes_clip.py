"""ShapesCLIP: a tiny CLIP trained contrastively on ShapesWorld, so CLIP rewards carry real
signal on a CPU (rewards/clip.py runs it like any other CLIP).

The model is a transformers ``CLIPModel`` (64 px ViT, patch 8, width 96, 4 layers; text tower
width 64, 3 layers, 32-token context; 0.63 M parameters besides the token table) with the exact
CLIP BPE tokenizer rebuilt offline (samplers/models/clip_tokenizer.py). Shipped in
``rewards/models/weights/shapes_clip/`` (7.6 MB, with its train_log.csv and shapes_clip.json),
made by

    align train-shapes-clip     # the shipped run (defaults): 1,500 steps of 64, ~8.3 CPU-min on 1 thread

and used as

    reward = build_reward("shapes_clip_score")        # clip_score with the shipped model
    reward = build_reward({"name": "clip_score", "model": load_shapes_clip()})   # the same
    model = CLIPModel.from_pretrained(SHAPES_CLIP_DIR)                             # plain transformers

Training (``train_shapes_clip``): random scenes of TRAIN-split prompts rendered on the fly,
each captioned in one of its GenEval phrasings ("a triangle above a square" / "a square below
a triangle"), half of them with clip_score's "A photo depicts " prefix; every other scene is
one of a hard negative of the scene before it (its counterfactual). No caption or hard
negative ever contains a held-out composition; as for the SD3 base model, they are held out
as text (a "triangle and square" scene may show the triangle above the square; with
``strict_holdout`` the images avoid them too). The loss is CLIP's symmetric InfoNCE with
two changes:

- hard negatives (NegCLIP, Yuksekgonul et al. 2023, "When and why vision-language models
  behave like bags-of-words"): each image also sees K corruptions of its own caption
  (another colour, colours swapped between the objects, another count, the relation flipped or
  the objects swapped, another shape), so it must learn composition, not a bag of words;
- several positives: a caption is a positive for every image in the batch it is true of
  (checked with the verifier's GenEval semantics on the scene's ground truth), so
  "a photo of a circle" is not pushed away from a second single-circle image.

Three settings helped composition in a short run (1,000 steps without them left colour binding at
chance even on trained captions): position and colour-attribution prompts drawn 30% of the time
each (``focus``), image position embeddings started from a 2-D sine-cosine table (``sincos``)
and an initial temperature of 0.03 (``temperature``).

What the previous weights (the same run without the two probes below: ``--relation-weight 0
--layout-weight 0``, 15.6 CPU-min) learnt (``preference_accuracy``: how often clip_score prefers
the true caption of a scene over one corruption; 200 scenes per kind, two scene seeds):

    kind        held-out (test-split prompts)   trained captions, new scenes
    colour      0.99                            1.00
    shape       1.00                            1.00
    binding     0.68-0.77                       0.90
    count       0.76-0.79                       0.95
    position    0.46-0.50 (chance)              0.54 (chance)
    relation    -                               0.91  (left/right vs above/below)

So it reads colours, shapes, counts and colour binding, and tells horizontal from vertical
layouts, but not which object is left / above: the swap of a relation is invisible to it.
On 128 images of the SD3 toy model (test-split prompts) it separates the verifier's
strict-correct images from the rest with AUC 0.79.

Why, and the fix (the defaults, and the shipped weights since session 9). In those weights
both towers collapse a relation flip: "a triangle above a square" / "a triangle below a square"
/ "a square above a triangle" have text cosines 0.994-0.998, and a position scene and its
mirror image have image cosine 0.98 on average. InfoNCE does not break this symmetry on its
own: while the image cannot tell a flip apart, the loss is lowest with flipped captions equal.
Two throw-away linear probes on the unit-norm image embedding (discarded after training; the
saved model is a plain CLIPModel and CLIPScore is unchanged) make the image side read layout,
and InfoNCE then pulls the text side along:

- relation probe (``relation_weight``, default 3): for each pair of distinct shapes shown once
  each, the sign of their x and y offset (``scene_relation_targets``, logistic
  ``relation_probe_loss``);
- layout probe (``layout_weight``, default 1): each shape's centroid (``scene_layout_targets``,
  ``layout_probe_loss``).

Measured (``preference_accuracy``, seeds 1 and 2, 200 scenes per kind; 1,500 steps of 64,
8.3-8.8 CPU-min on 1 thread, the same seed; rerunning the command gives bit-identical weights):

    kind        held-out: previous -> shipped   trained captions, new scenes: previous -> shipped
    colour      0.97-0.99 -> 0.93-0.97          1.00 -> 0.985
    shape       1.00 -> 0.99-1.00               1.00 -> 1.00
    binding     0.69-0.72 -> 0.83-0.89          0.92 -> 0.93-0.96
    count       0.82-0.88 -> 0.81               0.92-0.93 -> 0.96
    position    0.49-0.53 -> 0.97-0.99          0.48-0.54 -> 0.955-0.98

The held-out text "a triangle above a square" now has cosine 0.965 with its other phrasing "a
square below a triangle" and 0.41-0.45 with its two flips; a scene and its mirror image 0.23.
Count stays short of 0.9 on held-out compositions (three triangles, four squares).

What did not work (600-step runs, 60 scenes per kind): either probe alone at weight 1 left
trained-caption position at chance (0.38-0.57); a per-patch object-class probe on the patch
tokens (``patch_weight``) cost shape accuracy (0.77 held-out). A third image probe regressing
each shape's count (full length) lowered held-out count to 0.56-0.65 and position to 0.81.
Training the relation head on the caption embeddings (``relation_text``, from
``caption_relation_targets``) reaches
trained-caption position fast, and in the full-length run lifts held-out count to 0.95-0.97 and
binding to 0.96-0.97, but held-out position only to 0.71-0.72: every trained caption about a
square and a triangle one above the other says the square is above (the others are held out),
so the text probe teaches the text tower that layout for all of them; alone on the position
captions it gets all four held-out captions exactly backwards.

Why these sizes: the token-embedding table (49,408 x 64) is most of the model, so it stays
frozen at its random init (only ~40 rows are ever used) and every tensor is stored in fp16
(7.6 MB); the model is loaded and run in fp32 (its config's dtype).
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rewards.base import cosine_lr, register_reward
from rewards.clip import OPENAI_MEAN, OPENAI_STD, ClipEncoder, ClipScoreReward

SHAPES_CLIP_DIR = Path(__file__).parent / "models" / "weights" / "shapes_clip"
# weights_checksum() (samplers.models.shapesworld) of the shipped weights: `align train-shapes-clip`.
SHIPPED_SHA256 = "51ec8195bc8e6fdf690108353b01b1963eb233d489932974bd60c3022f24bfea"
CONTEXT_LENGTH = 32  # ShapesWorld captions with the prefix are at most ~20 tokens
PREFIX = "A photo depicts "  # ClipScoreReward's default prefix
# Model sizes: "shapes_clip" is the shipped one, "test" a smaller one for unit tests.
SIZES = {
    "shapes_clip": dict(vision_width=96, vision_layers=4, text_width=64, text_layers=3, heads=4, projection=64),
    "test": dict(vision_width=32, vision_layers=1, text_width=32, text_layers=1, heads=2, projection=16),
}
# Corruption kinds, see `corruptions`. The preference test reports each of the first five.
CORRUPTIONS = ("color", "binding", "count", "position", "shape", "relation")


# ----------------------------------------------------------------------------- captions


def _fields(meta: dict) -> tuple:
    """The free parameters of a ShapesWorld prompt (the arguments of its constructor)."""
    tag, include = meta["tag"], meta["include"]
    if tag == "single_object":
        return (include[0]["class"],)
    if tag == "two_object":
        return include[0]["class"], include[1]["class"]
    if tag == "counting":
        return include[0]["class"], include[0]["count"]
    if tag == "colors":
        return include[0]["color"], include[0]["class"]
    if tag == "position":  # (subject, relation, reference)
        return include[1]["class"], include[1]["position"][0], include[0]["class"]
    if tag == "color_attr":
        return include[0]["color"], include[0]["class"], include[1]["color"], include[1]["class"]
    raise ValueError(f"not a ShapesWorld prompt tag: {tag!r}")


def _build(tag: str, *fields) -> dict:
    from eval.shapes import world

    return {"single_object": world.single_object_prompt, "two_object": world.two_object_prompt,
            "counting": world.counting_prompt, "colors": world.colors_prompt,
            "position": world.position_prompt, "color_attr": world.color_attr_prompt}[tag](*fields)


def phrasings(meta: dict) -> list[dict]:
    """The prompt and its other GenEval phrasing of the same content, when it has one:
    "a circle and a square" / "a square and a circle", "a red circle and a blue square" /
    "a blue square and a red circle", "a triangle above a square" / "a square below a triangle"."""
    from eval.shapes.world import INVERSE_RELATION

    tag, f = meta["tag"], _fields(meta)
    if tag == "two_object":
        return [meta, _build(tag, f[1], f[0])]
    if tag == "color_attr":
        return [meta, _build(tag, f[2], f[3], f[0], f[1])]
    if tag == "position":
        return [meta, _build(tag, f[2], INVERSE_RELATION[f[1]], f[0])]
    return [meta]


def corruptions(meta: dict) -> dict[str, list[dict]]:
    """Corrupted versions of a prompt, by kind (a kind a prompt does not support is empty):

    color:    one colour replaced ("a red circle" -> "a blue circle"; in colour attribution by a
              colour neither object has);
    binding:  colours swapped between the two objects ("a red circle and a blue square" ->
              "a blue circle and a red square"): the same words, bound differently;
    count:    another number ("three triangles" -> "two triangles");
    position: the layout flipped: the inverse relation ("a circle left of a square" -> "a circle
              right of a square") or the objects swapped ("a square left of a circle");
    shape:    one shape replaced by one the prompt does not name;
    relation: a perpendicular relation ("a circle above a square").

    Every corruption is false of any scene that satisfies ``meta``.
    """
    from eval.shapes.world import COLORS, COUNTS, INVERSE_RELATION, SHAPES

    tag, f = meta["tag"], _fields(meta)
    out: dict[str, list[dict]] = {kind: [] for kind in CORRUPTIONS}
    named = {f[i] for i in range(len(f)) if f[i] in SHAPES}
    others = [s for s in SHAPES if s not in named]
    if tag == "single_object":
        out["shape"] = [_build(tag, s) for s in others]
    elif tag == "two_object":
        out["shape"] = [_build(tag, s, f[1]) for s in others] + [_build(tag, f[0], s) for s in others]
    elif tag == "counting":
        out["count"] = [_build(tag, f[0], n) for n in COUNTS if n != f[1]]
        out["shape"] = [_build(tag, s, f[1]) for s in others]
    elif tag == "colors":
        out["color"] = [_build(tag, c, f[1]) for c in COLORS if c != f[0]]
        out["shape"] = [_build(tag, f[0], s) for s in others]
    elif tag == "position":
        subject, relation, reference = f
        out["position"] = [_build(tag, subject, INVERSE_RELATION[relation], reference),
                           _build(tag, reference, relation, subject)]
        perpendicular = [r for r in INVERSE_RELATION if r not in (relation, INVERSE_RELATION[relation])]
        out["relation"] = [_build(tag, subject, r, reference) for r in perpendicular]
        out["shape"] = [_build(tag, s, relation, reference) for s in others] + \
                       [_build(tag, subject, relation, s) for s in others]
    elif tag == "color_attr":
        ca, a, cb, b = f
        spare = [c for c in COLORS if c not in (ca, cb)]
        out["color"] = [_build(tag, c, a, cb, b) for c in spare] + [_build(tag, ca, a, c, b) for c in spare]
        out["binding"] = [_build(tag, cb, a, ca, b)]
        out["shape"] = [_build(tag, ca, s, cb, b) for s in others] + [_build(tag, ca, a, cb, s) for s in others]
    return out


def scene_detections(scene) -> dict:
    """The scene's ground-truth objects as the verifier's detections, grouped by class."""
    from eval.shapes.verifier import Detection, group_by_class

    return group_by_class(Detection(o.shape, o.color, o.bbox, int(o.size ** 2), 1.0) for o in scene.objects)


def scene_satisfies(scene, meta: dict) -> bool:
    """True if ``meta`` holds for the scene's ground-truth objects (the verifier's GenEval
    semantics, strict, applied to the scene instead of detections). ``scene`` may also be
    its ``scene_detections``."""
    from eval.shapes.verifier import evaluate_detections

    detections = scene if isinstance(scene, dict) else scene_detections(scene)
    return evaluate_detections(detections, meta)["strict"]


def shows_held_out(scene) -> bool:
    """True if the scene shows a held-out composition: a held-out colour-shape pair, count or
    layout (any two objects in a held-out relation, by GenEval's relative_position)."""
    from eval.shapes.world import HELD_OUT_COLOR_SHAPE, HELD_OUT_COUNTS, HELD_OUT_POSITIONS, relative_position

    objects = scene.objects
    if any((o.color, o.shape) in HELD_OUT_COLOR_SHAPE for o in objects):
        return True
    if any(sum(o.shape == shape for o in objects) == n for n, shape in HELD_OUT_COUNTS):
        return True
    return any((a.shape, relation, b.shape) in HELD_OUT_POSITIONS
               for a in objects for b in objects if a is not b
               for relation in relative_position(a.bbox, b.bbox))


def train_scene(meta: dict, rng: np.random.Generator, strict_holdout: bool = False):
    """A random scene for a train prompt. With ``strict_holdout`` it shows no held-out
    composition either (resampled); else held-out compositions are held out as text only,
    as for the SD3 base model: a scene of "a triangle and a square" may show the triangle
    above the square, captioned only with train-split text."""
    from eval.shapes.world import HELD_OUT_COLOR_SHAPE, scene_for_prompt

    if not strict_holdout:
        return scene_for_prompt(meta, rng)
    for _ in range(100):
        scene = scene_for_prompt(meta, rng, avoid_color_shape=HELD_OUT_COLOR_SHAPE)
        if not shows_held_out(scene):
            return scene
    raise RuntimeError(f"no scene without held-out compositions for {meta['prompt']!r}")


def images_tensor(scenes: Sequence) -> Tensor:
    """Renders scenes -> float images in [0, 1], [N, 3, 64, 64]."""
    from eval.shapes.world import render

    return torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255.0


# ----------------------------------------------------------------------------- model


def sincos_positions(grid: int, width: int) -> Tensor:
    """Fixed 2-D sine-cosine position embedding (MAE, He et al. 2022), [grid * grid, width],
    patches in row-major order; width % 4 == 0."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # [quarter]
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                          indexing="ij")
    x, y = x.flatten()[:, None] * omega, y.flatten()[:, None] * omega  # [grid * grid, quarter]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], 1)


def build_shapes_clip(size: str = "shapes_clip", seed: int = 0, sincos: bool = False,
                      temperature: float | None = None):
    """A freshly initialised (seeded) ``CLIPModel`` of the given size, 64 px input, 32-token
    context; the token embedding is rounded to fp16 (it is stored so and never trained).
    sincos: start the (trainable) image position embeddings from ``sincos_positions``
    instead of N(0, 0.02^2), which is small next to the patch features: layout is then
    linearly readable from the first layer on. temperature: initial 1 / exp(logit_scale)
    (default: CLIPConfig's, about 0.07; lower sharpens the softmax between a caption and its
    near-duplicates)."""
    from transformers import CLIPConfig, CLIPModel

    s = SIZES[size]
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=s["text_width"], intermediate_size=4 * s["text_width"],
                         num_hidden_layers=s["text_layers"], num_attention_heads=s["heads"],
                         max_position_embeddings=CONTEXT_LENGTH, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
        vision_config=dict(image_size=64, patch_size=8, hidden_size=s["vision_width"],
                           intermediate_size=4 * s["vision_width"], num_hidden_layers=s["vision_layers"],
                           num_attention_heads=s["heads"]),
        projection_dim=s["projection"],
        **({"logit_scale_init_value": math.log(1 / temperature)} if temperature else {}))
    model = CLIPModel(config)
    with torch.no_grad():
        embedding = model.text_model.embeddings.token_embedding.weight
        embedding.copy_(embedding.half().float())
        if sincos:
            positions = model.vision_model.embeddings.position_embedding.weight  # [1 + 64, width]
            positions[0].zero_()  # the class token
            positions[1:].copy_(sincos_positions(64 // 8, s["vision_width"]))
    return model


def save_shapes_clip(model, folder: str | Path) -> None:
    """config.json (dtype float32: loaded and run in fp32) + model.safetensors in fp16."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.dtype = torch.float32  # from_pretrained's dtype="auto" reads this, not the fp16 tensors
    config.save_pretrained(str(folder))
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()
             if v.is_floating_point()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def load_shapes_clip(path: str | Path | None = None, device: str | torch.device = "cpu"):
    """The shipped ShapesWorld CLIP (or one saved by `align train-shapes-clip --out`), a
    transformers ``CLIPModel`` in fp32, eval mode."""
    from transformers import CLIPModel

    root = Path(path) if path else SHAPES_CLIP_DIR
    if not (root / "model.safetensors").is_file():
        raise FileNotFoundError(f"ShapesWorld CLIP weights not found in {root}; "
                                f"rebuild them with `align train-shapes-clip --out {root}`")
    return CLIPModel.from_pretrained(str(root), dtype=torch.float32).to(device).eval()


@functools.lru_cache(maxsize=4)
def shapes_clip_encoder(path: str | None = None, device: str = "cpu") -> ClipEncoder:
    """A cached ClipEncoder over the ShapesWorld CLIP (loaded once per path and device)."""
    from samplers.models.clip_tokenizer import build_clip_tokenizer

    return ClipEncoder(load_shapes_clip(path, device), build_clip_tokenizer(CONTEXT_LENGTH))


@register_reward("shapes_clip_score")
def shapes_clip_score(path: str | Path | None = None, device: str | torch.device = "cpu",
                      **kwargs: Any) -> ClipScoreReward:
    """CLIPScore (2.5 * max(cos(image, "A photo depicts " + prompt), 0)) with the ShapesWorld
    CLIP: the shipped model, or the one in ``path``; loaded on first use and cached. kwargs go
    to ClipScoreReward (scale, prefix). Raw range [0, 2.5]; on held-out ShapesWorld renders a
    true caption scores about 1.2-1.3, one with a wrong colour or shape 0.6-0.75 lower, a wrong
    count about 0.35 lower, swapped colours about 0.2 lower and a flipped relation the same
    (see the module docstring)."""
    return ClipScoreReward(shapes_clip_encoder(str(path) if path else None, str(device)), **kwargs)


# ----------------------------------------------------------------------------- training


def _hard_negatives(meta: dict, scene, count: int, rng: np.random.Generator,
                    kinds: Sequence[str] | None = None) -> list[dict]:
    """Up to ``count`` train-split corruptions of ``meta`` that are false of ``scene``: kinds in
    random order (each equally likely, so the one binding swap of a colour attribution prompt
    is not drowned by its eight colour changes), a random corruption of each. ``kinds``: only
    these kinds when the prompt has any of them."""
    from eval.shapes.world import is_held_out

    by_kind = {name: [c for c in kind if not is_held_out(c) and not scene_satisfies(scene, c)]
               for name, kind in corruptions(meta).items()}
    if kinds and any(by_kind[name] for name in kinds):
        by_kind = {name: by_kind[name] for name in kinds}
    by_kind = [kind for kind in by_kind.values() if kind]
    order = rng.permutation(len(by_kind))
    chosen: list[dict] = []
    for r in range(min(count, sum(map(len, by_kind)))):
        options = [c for c in by_kind[order[r % len(by_kind)]] if c not in chosen]
        if options:
            chosen.append(options[rng.integers(len(options))])
    return chosen


# Tag frequencies with ``focus``: relations and colour binding are what a bag of words misses.
FOCUS_TAG_WEIGHTS = {"single_object": 0.05, "two_object": 0.1, "counting": 0.15, "colors": 0.1, "position": 0.3,
                     "color_attr": 0.3}


def sample_train_batch(n: int, negatives: int, rng: np.random.Generator, prefix_prob: float = 0.5,
                       paired: bool = True, strict_holdout: bool = False, focus: bool = False):
    """n train scenes with their captions and up to ``negatives`` hard-negative captions each.

    Prompts are category-balanced (a tag uniformly, then a prompt of it). With ``paired``,
    every other item is a scene of a hard negative of the item before it (e.g. "a circle left
    of a square" then a scene of "a square left of a circle"): each caption then meets its
    counterfactual image in the batch too, which teaches the image side what a relation,
    binding or count is. strict_holdout: see ``train_scene``. focus: tags drawn with
    FOCUS_TAG_WEIGHTS instead of uniformly, and counterfactuals are position or binding
    corruptions whenever the prompt has one.

    Returns (scenes, metas [n] (each caption's metadata), captions [n], negative captions:
    n lists of <= K)."""
    from eval.shapes.world import TAGS, prompts

    by_tag = {tag: [m for m in prompts("train") if m["tag"] == tag] for tag in TAGS}
    scenes, metas, captions, negative_captions = [], [], [], []
    while len(scenes) < n:
        tag = TAGS[rng.choice(len(TAGS), p=[FOCUS_TAG_WEIGHTS[t] for t in TAGS])] if focus else \
            TAGS[rng.integers(len(TAGS))]
        pool = by_tag[tag]
        meta = pool[rng.integers(len(pool))]
        scene = train_scene(meta, rng, strict_holdout)
        items = [(meta, scene)]
        if paired and len(scenes) + 1 < n:
            counterfactual = _hard_negatives(meta, scene, 1, rng, ("position", "binding") if focus else None)
            items += [(c, train_scene(c, rng, strict_holdout)) for c in counterfactual]
        for meta, scene in items:
            options = phrasings(meta)
            meta = options[rng.integers(len(options))]
            prefix = PREFIX if rng.random() < prefix_prob else ""
            scenes.append(scene)
            metas.append(meta)
            captions.append(prefix + meta["prompt"])
            negative_captions.append([prefix + c["prompt"] for c in _hard_negatives(meta, scene, negatives, rng)])
    return scenes, metas, captions, negative_captions


def positive_mask(scenes: Sequence, metas: Sequence[dict], cache: dict | None = None) -> Tensor:
    """[N, N] bool: caption j (metadata ``metas[j]``) is true of scene i.

    cache: a dict kept across calls; verdicts that depend only on the scene's objects'
    shapes and colours in order (every prompt without a position clause) are memoised there."""
    cache = {} if cache is None else cache
    unique = {meta["prompt"]: meta for meta in metas}
    columns = {prompt: k for k, prompt in enumerate(unique)}

    def true_of(scene, detections: dict, meta: dict) -> bool:
        # necessary conditions checked inline first (most pairs fail them): enough objects of
        # each class, the colour present among them; the verifier decides the rest
        for clause in meta["include"]:
            found = detections.get(clause["class"], ())
            if len(found) < clause["count"] or ("color" in clause and
                                                all(d.color != clause["color"] for d in found)):
                return False
        if any("position" in clause for clause in meta["include"]):
            return scene_satisfies(detections, meta)
        key = (meta["prompt"], tuple((o.shape, o.color) for o in scene.objects))
        if key not in cache:
            cache[key] = scene_satisfies(detections, meta)
        return cache[key]

    truth = torch.tensor([[true_of(scene, detections, meta) for meta in unique.values()]
                          for scene, detections in zip(scenes, map(scene_detections, scenes))])  # [N, prompts]
    return truth[:, [columns[meta["prompt"]] for meta in metas]]


def augment(images: Tensor, gen: torch.Generator, blur_prob: float = 0.5, max_sigma: float = 1.2,
            max_noise: float = 0.04) -> Tensor:
    """Mild corruption so the model also reads generated (blurry, noisy) images: a Gaussian
    blur of random width on ``blur_prob`` of the images, then pixel noise of random std.
    [N, 3, H, W] in [0, 1] -> same."""
    n = images.shape[0]
    sigma = torch.rand(n, generator=gen) * (max_sigma - 0.3) + 0.3  # [N]
    sigma = torch.where(torch.rand(n, generator=gen) < blur_prob, sigma, torch.full_like(sigma, 1e-3))
    offsets = torch.arange(-2, 3, dtype=torch.float32)  # 5-tap kernel
    kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)  # [N, 5]
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(3, 0)  # [N*3, 5]
    x = images.reshape(1, n * 3, *images.shape[-2:])
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=n * 3)
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), kernel[:, None, :, None], groups=n * 3)
    noise = torch.randn(x.shape, generator=gen) * (torch.rand(n, generator=gen) * max_noise).repeat_interleave(3)[None, :, None, None]
    return (x + noise).clamp(0, 1).reshape(images.shape)


def embed(model, tokenizer, images: Tensor, texts: Sequence[str], patches: bool = False):
    """Unit-norm embeddings with gradients: images [N, 3, 64, 64] in [0, 1] -> [N, D];
    texts (each distinct one encoded once) -> [len(texts), D]. With ``patches``, also the
    vision tower's last-layer patch tokens [N, 64, vision width] (row-major, no class token)."""
    mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
    image = model.get_image_features(pixel_values=(images - mean) / std)
    tokens_out = image.last_hidden_state[:, 1:] if patches else None
    unique = list(dict.fromkeys(texts))
    tokens = tokenizer(unique, padding=True, truncation=True, max_length=CONTEXT_LENGTH, return_tensors="pt")
    text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    image, text = (getattr(x, "pooler_output", x) for x in (image, text))
    row = {t: i for i, t in enumerate(unique)}
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)[[row[t] for t in texts]]
    return (image, text, tokens_out) if patches else (image, text)


def contrastive_loss(images: Tensor, texts: Tensor, negatives: Tensor, negative_valid: Tensor, mask: Tensor,
                     logit_scale: Tensor) -> tuple[Tensor, dict]:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021) with several positives per row and
    per-image hard negatives (NegCLIP): image i is contrasted with every caption of the batch
    and its own K hard negatives; caption j with every image.

    images [N, D], texts [N, D] (caption i belongs to image i), negatives [N, K, D] unit-norm;
    negative_valid [N, K] bool; mask [N, N] bool, caption j true of image i (diagonal set);
    logit_scale: log of the inverse temperature. Returns (loss, detached metrics).
    """
    scale = logit_scale.exp().clamp(max=100)
    logits = scale * images @ texts.T  # [N, N]
    hard = scale * torch.einsum("nd,nkd->nk", images, negatives)  # [N, K]
    hard = hard.masked_fill(~negative_valid, -math.inf)
    image_logits = torch.cat([logits, hard], 1)  # [N, N + K]
    image_positive = torch.cat([mask, torch.zeros_like(negative_valid)], 1)  # [N, N + K]
    image_loss = (image_logits.logsumexp(1) - image_logits.masked_fill(~image_positive, -math.inf).logsumexp(1)).mean()
    text_loss = (logits.T.logsumexp(1) - logits.T.masked_fill(~mask.T, -math.inf).logsumexp(1)).mean()
    loss = (image_loss + text_loss) / 2
    own = logits.diagonal()[:, None]  # [N, 1]
    beaten = ((own > hard) & negative_valid).sum() / negative_valid.sum().clamp_min(1)
    metrics = {"loss": loss.item(), "hard_negative_accuracy": beaten.item(), "logit_scale": scale.item()}
    return loss, metrics


def shape_pairs() -> list[tuple[str, str]]:
    """The unordered pairs of distinct shapes, in SHAPES order: the rows of the relation probe."""
    from eval.shapes.world import SHAPES

    return [(a, b) for i, a in enumerate(SHAPES) for b in SHAPES[i + 1:]]


def _signs(relations: set[str] | Sequence[str]) -> tuple[int, int]:
    """(x, y) signs of a set of GenEval relations of A relative to B: +1 right of / below,
    -1 left of / above, 0 neither."""
    x = 1 if "right of" in relations else -1 if "left of" in relations else 0
    y = 1 if "below" in relations else -1 if "above" in relations else 0
    return x, y


def scene_relation_targets(scenes: Sequence) -> Tensor:
    """[N, 2 * len(shape_pairs())] in {-1, 0, +1}: for each pair (a, b) of shapes the scene shows
    exactly once each, the sign of a's offset from b in x and in y by GenEval's relative_position
    (+1: a right of / below b, -1: left of / above, 0: neither or not one of each: no target)."""
    from eval.shapes.world import relative_position

    rows = []
    for scene in scenes:
        row = []
        for a, b in shape_pairs():
            first = [o for o in scene.objects if o.shape == a]
            second = [o for o in scene.objects if o.shape == b]
            row += _signs(relative_position(first[0].bbox, second[0].bbox)) if len(first) == len(second) == 1 \
                else (0, 0)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


def caption_relation_targets(metas: Sequence[dict]) -> Tensor:
    """The same targets as ``scene_relation_targets``, read off the captions: a position caption
    ("a triangle above a square", or its phrasing "a square below a triangle") sets the sign of
    its pair on its axis; everything else is 0 (no target)."""
    from eval.shapes.world import INVERSE_RELATION

    pairs = shape_pairs()
    rows = torch.zeros(len(metas), 2 * len(pairs))
    for i, meta in enumerate(metas):
        if meta["tag"] != "position":
            continue
        subject, relation, reference = _fields(meta)
        if (subject, reference) not in pairs:  # state it as the reference relative to the subject
            subject, relation, reference = reference, INVERSE_RELATION[relation], subject
        x, y = _signs({relation})
        k = pairs.index((subject, reference))
        rows[i, 2 * k], rows[i, 2 * k + 1] = x, y
    return rows


def relation_probe_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Logistic loss of a relation probe: logits [N, P] against targets [N, P] in {-1, 0, +1},
    averaged over the non-zero targets (0 with a zero gradient when there are none)."""
    known = targets != 0
    if not known.any():
        return logits.sum() * 0.0
    return F.softplus(-targets[known] * logits[known]).mean()


def scene_layout_targets(scenes: Sequence) -> tuple[Tensor, Tensor]:
    """Per shape, the centroid of its objects, x and y scaled to [-1, 1] ([N, 2 * len(SHAPES)]),
    and a mask [N, 2 * len(SHAPES)] that is False where the scene has no such shape."""
    from eval.shapes.world import SHAPES

    targets = torch.zeros(len(scenes), 2 * len(SHAPES))
    mask = torch.zeros(len(scenes), 2 * len(SHAPES), dtype=torch.bool)
    for i, scene in enumerate(scenes):
        for k, shape in enumerate(SHAPES):
            objects = [o for o in scene.objects if o.shape == shape]
            if objects:
                half = scene.size / 2
                targets[i, 2 * k] = sum(o.cx for o in objects) / len(objects) / half - 1
                targets[i, 2 * k + 1] = sum(o.cy for o in objects) / len(objects) / half - 1
                mask[i, 2 * k:2 * k + 2] = True
    return targets, mask


def patch_labels(scenes: Sequence, grid: int = 8) -> Tensor:
    """[N * grid * grid] labels of a ``grid x grid`` patch grid, row-major (the vision tower's
    token order): 0 = background, else 1 + shape index * len(COLORS) + colour index of the object
    whose bounding box holds the patch centre (boxes never overlap)."""
    from eval.shapes.world import COLORS, SHAPES

    labels = torch.zeros(len(scenes), grid, grid, dtype=torch.long)
    for i, scene in enumerate(scenes):
        centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * scene.size / grid
        for o in scene.objects:
            x0, y0, x1, y1 = o.bbox
            inside_x, inside_y = (centres >= x0) & (centres < x1), (centres >= y0) & (centres < y1)
            label = 1 + SHAPES.index(o.shape) * len(COLORS) + COLORS.index(o.color)
            labels[i][inside_y[:, None] & inside_x[None, :]] = label
    return labels.flatten()


def layout_probe_loss(predictions: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error of a layout probe over the masked-in entries ([N, P] each)."""
    if not mask.any():
        return predictions.sum() * 0.0
    return (predictions[mask] - targets[mask]).pow(2).mean()


def train_shapes_clip(out_dir: str | Path, steps: int = 1500, seed: int = 0, batch: int = 64, negatives: int = 3,
                      lr: float = 1e-3, weight_decay: float = 0.1, warmup: int = 100, size: str = "shapes_clip",
                      threads: int = 1, strict_holdout: bool = False, focus: bool = True, sincos: bool = True,
                      temperature: float | None = 0.03, relation_weight: float = 3.0, relation_text: bool = False,
                      layout_weight: float = 1.0, patch_weight: float = 0.0, eval_scenes: int = 60,
                      monitor_every: int = 100, progress: bool = True) -> Path:
    """Trains a ShapesWorld CLIP from scratch and saves it to ``out_dir`` (written to
    ``out_dir.partial`` and swapped in at the end), with train_log.csv (loss, in-batch
    hard-negative accuracy, wall and CPU seconds; every ``monitor_every`` steps also the
    held-out preference accuracy on 20 scenes per kind, for watching only) and
    shapes_clip.json (settings, time, held-out preference accuracy of the saved fp16 weights
    on ``eval_scenes`` per corruption kind, 0 to skip). Seeded: same arguments, same weights.

    Throw-away probes (their heads are trained with the model and never saved; the logged
    ``loss`` is the contrastive one): ``relation_weight`` * the relation probe's loss, a linear
    head on the image embeddings (with ``relation_text`` the same head also on the caption
    embeddings, the two losses averaged); ``layout_weight`` * the layout probe's loss on the image embeddings;
    ``patch_weight`` * the cross-entropy of a per-patch object-class probe (``patch_labels``)
    on the vision tower's last patch tokens (off by default). See the module docstring."""
    from samplers.progress import Progress

    from eval.shapes.world import COLORS, SHAPES
    from samplers.models.clip_tokenizer import build_clip_tokenizer

    torch.set_num_threads(threads)
    out = Path(out_dir)
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_shapes_clip(size, seed, sincos, temperature)
    model.text_model.embeddings.token_embedding.requires_grad_(False)
    tokenizer = build_clip_tokenizer(CONTEXT_LENGTH)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if p.ndim >= 2 and "embedding" not in n], "weight_decay": weight_decay},
              {"params": [p for n, p in trainable if p.ndim < 2 or "embedding" in n], "weight_decay": 0.0}]
    # throw-away probes on the unit-norm joint embeddings (times sqrt(D): unit-size coordinates)
    dim = model.config.projection_dim
    relation_head = torch.nn.Linear(dim, 2 * len(shape_pairs())) if relation_weight else None
    layout_head = torch.nn.Linear(dim, 2 * len(SHAPES)) if layout_weight else None
    patch_head = (torch.nn.Linear(model.config.vision_config.hidden_size, 1 + len(SHAPES) * len(COLORS))
                  if patch_weight else None)
    heads = [p for head in (relation_head, layout_head, patch_head) if head is not None for p in head.parameters()]
    if heads:
        groups.append({"params": heads, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, steps, warmup))
    model.train()
    verdicts: dict = {}  # positive_mask's memo
    start, cpu_start = time.time(), time.process_time()
    monitor_kinds = ("color", "binding", "count", "position", "shape")

    @torch.no_grad()
    def cosine(images: Tensor, texts: list[str]) -> Tensor:  # ranks like clip_score, without the clamp
        image, text = embed(model.eval(), tokenizer, images, [PREFIX + t for t in texts])
        model.train()
        return (image * text).sum(-1)

    with open(work / "train_log.csv", "w", newline="") as log_file, \
            Progress(steps, "train-shapes-clip", enabled=progress) as bar:
        writer = csv.writer(log_file)
        writer.writerow(["step", "elapsed_s", "cpu_s", "loss", "hard_negative_accuracy", "logit_scale", "lr",
                         "relation_image_loss", "relation_text_loss", "layout_loss", "patch_loss"]
                        + [f"held_out_{kind}" for kind in monitor_kinds])
        for step in range(steps):
            scenes, metas, captions, negative_captions = sample_train_batch(batch, negatives, rng,
                                                                            strict_holdout=strict_holdout, focus=focus)
            images = augment(images_tensor(scenes), gen)  # [N, 3, 64, 64]
            valid = torch.tensor([[k < len(c) for k in range(negatives)] for c in negative_captions])  # [N, K]
            padded = [c[k] if k < len(c) else captions[i] for i, c in enumerate(negative_captions)
                      for k in range(negatives)]  # N * K texts, placeholders masked out by `valid`
            image_emb, text_emb, patch_tokens = embed(model, tokenizer, images, captions + padded, patches=True)
            text_emb, negative_emb = text_emb[:batch], text_emb[batch:].view(batch, negatives, -1)
            loss, metrics = contrastive_loss(image_emb, text_emb, negative_emb, valid,
                                             positive_mask(scenes, metas, verdicts), model.logit_scale)
            if relation_head is not None:
                relation = relation_probe_loss(relation_head(image_emb * math.sqrt(dim)),
                                               scene_relation_targets(scenes))
                metrics["relation_image_loss"] = relation.item()
                if relation_text:
                    text_relation = relation_probe_loss(relation_head(text_emb * math.sqrt(dim)),
                                                        caption_relation_targets(metas))
                    metrics["relation_text_loss"] = text_relation.item()
                    relation = (relation + text_relation) / 2
                loss = loss + relation_weight * relation
            if layout_head is not None:
                layout = layout_probe_loss(layout_head(image_emb * math.sqrt(dim)), *scene_layout_targets(scenes))
                loss = loss + layout_weight * layout
                metrics["layout_loss"] = layout.item()
            if patch_head is not None:
                patch = F.cross_entropy(patch_head(patch_tokens).flatten(0, 1), patch_labels(scenes))
                loss = loss + patch_weight * patch
                metrics["patch_loss"] = patch.item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in trainable] + heads, 1.0)
            optimizer.step()
            scheduler.step()
            if step % 25 == 0 or step == steps - 1:
                held_out = {}
                if monitor_every and (step % monitor_every == 0 or step == steps - 1):
                    held_out = preference_accuracy(cosine, 20, seed=seed + 2, kinds=monitor_kinds)
                writer.writerow([step, f"{time.time() - start:.1f}", f"{time.process_time() - cpu_start:.1f}",
                                 f"{metrics['loss']:.5g}", f"{metrics['hard_negative_accuracy']:.4f}",
                                 f"{metrics['logit_scale']:.4g}", f"{scheduler.get_last_lr()[0]:.3g}"]
                                + [f"{metrics[name]:.4g}" if name in metrics else "" for name in
                                   ("relation_image_loss", "relation_text_loss", "layout_loss", "patch_loss")]
                                + [held_out[kind]["accuracy"] if held_out else "" for kind in monitor_kinds])
                log_file.flush()
                bar.phase(f"loss {metrics['loss']:.3f}, hard negatives beaten {metrics['hard_negative_accuracy']:.2f}")
            bar.advance()
    minutes, cpu_minutes = (time.time() - start) / 60, (time.process_time() - cpu_start) / 60
    model.eval()
    save_shapes_clip(model, work)
    info = {"settings": dict(steps=steps, seed=seed, batch=batch, negatives=negatives, lr=lr,
                             weight_decay=weight_decay, warmup=warmup, size=size, threads=threads,
                             strict_holdout=strict_holdout, focus=focus, sincos=sincos, temperature=temperature,
                             relation_weight=relation_weight, relation_text=relation_text,
                             layout_weight=layout_weight, patch_weight=patch_weight),
            "train_minutes": round(minutes, 2), "train_cpu_minutes": round(cpu_minutes, 2)}
    if eval_scenes:  # the weights as saved (fp16), on held-out scenes
        reward = ClipScoreReward(ClipEncoder(load_shapes_clip(work), tokenizer))
        info["held_out_preference"] = preference_accuracy(reward, eval_scenes, seed=seed + 1)
    (work / "shapes_clip.json").write_text(json.dumps(info, indent=2) + "\n")
    # A training job, run from the `align` CLI: the one upward import, kept lazy, rather than a
    # second copy of the atomic swap.
    from align.checkpoint import replace_dir

    replace_dir(work, out)
    return out


# ----------------------------------------------------------------------------- evaluation


def preference_scenes(per_kind: int = 60, seed: int = 1,
                      kinds: Sequence[str] = ("color", "binding", "count", "position", "shape"), split: str = "test"):
    """Caption-preference pairs: for each kind, ``per_kind`` random scenes of ``split`` prompts
    that have that corruption, each with its true caption and one random corruption of that
    kind. In the test split, colour / binding / count / position prompts are all held-out
    compositions (shape uses every test prompt, mostly the shared single/two-object ones);
    the train split gives the in-distribution comparison (new scenes of trained captions).
    Returns a list of (kind, scene, true meta, corrupted meta)."""
    from eval.shapes.world import prompts, scene_for_prompt

    rng = np.random.default_rng(seed)
    pairs = []
    for kind in kinds:
        pool = [m for m in prompts(split) if corruptions(m)[kind]]
        for _ in range(per_kind):
            meta = pool[rng.integers(len(pool))]
            scene = scene_for_prompt(meta, rng)
            options = corruptions(meta)[kind]
            pairs.append((kind, scene, meta, options[rng.integers(len(options))]))
    return pairs


@torch.no_grad()
def preference_accuracy(reward, per_kind: int = 60, seed: int = 1, kinds: Sequence[str] | None = None,
                        split: str = "test") -> dict:
    """How often ``reward`` (a Reward, or any ``(images, prompts) -> scores [N]``) scores a
    scene higher with its true caption than with a corrupted one (a tie counts as a failure),
    per corruption kind, on ``preference_scenes`` (held-out by default). Returns
    {kind: {"accuracy", "n", "margin" (mean score difference)}} plus "overall"."""
    pairs = preference_scenes(per_kind, seed, split=split, **({"kinds": kinds} if kinds else {}))
    images = images_tensor([scene for _, scene, _, _ in pairs])
    true, wrong = (reward(images, [pair[column]["prompt"] for pair in pairs]) for column in (2, 3))
    true, wrong = (getattr(out, "scores", out) for out in (true, wrong))  # [N] each
    results = {}
    for kind in dict.fromkeys(kind for kind, *_ in pairs):
        rows = torch.tensor([k == kind for k, *_ in pairs])
        results[kind] = {"accuracy": round(float((true[rows] > wrong[rows]).float().mean()), 4), "n": int(rows.sum()),
                         "margin": round(float((true[rows] - wrong[rows]).mean()), 4)}
    results["overall"] = {"accuracy": round(float((true > wrong).float().mean()), 4), "n": len(pairs),
                          "margin": round(float((true - wrong).mean()), 4)}
    return results


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`align train-shapes-clip` options; the defaults are the shipped run's except the two probes
    (``--relation-weight 0 --layout-weight 0`` reproduce the shipped weights)."""
    parser.add_argument("--out", type=Path, default=SHAPES_CLIP_DIR,
                        help="output folder (default: the package's shipped weights folder)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64, help="images per step")
    parser.add_argument("--negatives", type=int, default=3, help="hard negatives per image")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--strict-holdout", action="store_true",
                        help="keep held-out compositions out of the images too, not only out of the text")
    parser.add_argument("--relation-weight", type=float, default=3.0,
                        help="weight of the relation probe on the image embeddings (0: off)")
    parser.add_argument("--relation-text", action="store_true",
                        help="train the relation probe on the caption embeddings too (hurts held-out position)")
    parser.add_argument("--layout-weight", type=float, default=1.0,
                        help="weight of the layout (per-shape centroid) probe on the image embedding (0: off)")
    parser.add_argument("--patch-weight", type=float, default=0.0,
                        help="weight of the per-patch object-class probe on the vision tower's patch tokens (0: off)")
    parser.add_argument("--eval-scenes", type=int, default=60, help="held-out scenes per corruption kind (0: skip)")


def main(args: argparse.Namespace) -> None:
    from samplers.models.shapesworld import weights_checksum

    out = train_shapes_clip(args.out, steps=args.steps, seed=args.seed, batch=args.batch, negatives=args.negatives,
                            lr=args.lr, threads=args.threads, strict_holdout=args.strict_holdout,
                            relation_weight=args.relation_weight, relation_text=args.relation_text,
                            layout_weight=args.layout_weight,
                            patch_weight=args.patch_weight, eval_scenes=args.eval_scenes)
    info = json.loads((out / "shapes_clip.json").read_text())
    print(f"saved {out}: {info['train_minutes']:.1f} min ({info['train_cpu_minutes']:.1f} CPU min), "
          f"sha256 {weights_checksum(out)}")
    for kind, row in info.get("held_out_preference", {}).items():
        print(f"held-out preference {kind:9s} {row['accuracy']:.3f} (n={row['n']}, margin {row['margin']:+.3f})")

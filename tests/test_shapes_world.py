"""ShapesWorld: rendering, prompt splits and the exact verifier.

Measured verifier accuracy on fresh ground-truth scenes (scene_for_prompt over all 243
prompts): clean renders 1.000 strict and partial == 1 (2430 images, 10 seeds); mildly
perturbed renders (PIL GaussianBlur radius 0.8 + Gaussian pixel noise std 8/255) 1.000
strict (2430 images). The perturbed test asserts a floor of 0.99.
"""

import collections
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from eval.shapes import (
    BACKGROUND,
    COLORS,
    HELD_OUT_COLOR_SHAPE,
    HELD_OUT_COUNTS,
    HELD_OUT_POSITIONS,
    PALETTE,
    SHAPES,
    TAGS,
    Detection,
    ObjectSpec,
    Scene,
    aggregate,
    all_prompts,
    caption,
    classify_pixels,
    connected_components,
    color_attr_prompt,
    colors_prompt,
    counting_prompt,
    detect,
    evaluate,
    evaluate_batch,
    position_prompt,
    prompts,
    relative_position,
    render,
    scene_for_prompt,
    single_object_prompt,
)
from eval.shapes.world import GAP, INVERSE_RELATION, MARGIN

GENEVAL_METADATA = Path(__file__).resolve().parents[2] / "shared/data/geneval/evaluation_metadata.jsonl"
PERTURBED_ACCURACY_FLOOR = 0.99
N_SEEDS = 5  # x 243 prompts = 1215 ground-truth scenes


def perturb(image: np.ndarray, rng: np.random.Generator, radius: float = 0.8, noise_std: float = 8.0):
    """Gaussian blur (PIL radius) then Gaussian pixel noise (std in uint8 units)."""
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)), dtype=np.float64)
    return np.clip(blurred + rng.normal(0.0, noise_std, blurred.shape), 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def ground_truth():
    """``[(meta, scene, image)]`` for every prompt and N_SEEDS seeds."""
    return [
        (meta, scene, render(scene))
        for seed in range(N_SEEDS)
        for index, meta in enumerate(all_prompts())
        for scene in [scene_for_prompt(meta, np.random.default_rng([seed, index]))]
    ]


def _object_scene(*objects: tuple[str, str, float, float, float]) -> np.ndarray:
    return render(Scene([ObjectSpec(*obj) for obj in objects]))


# ----------------------------------------------------------------------------- world


def test_render_is_deterministic_by_seed():
    meta = counting_prompt("circle", 3)
    first = render(scene_for_prompt(meta, 7))
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, render(scene_for_prompt(meta, np.random.default_rng(7))))
    assert not np.array_equal(first, render(scene_for_prompt(meta, 8)))


def test_objects_inside_image_and_separated(ground_truth):
    for _, scene, image in ground_truth:
        boxes = [obj.bbox for obj in scene.objects]
        for x0, y0, x1, y1 in boxes:
            assert min(x0, y0) >= MARGIN and max(x1, y1) <= scene.size - MARGIN
        for a, b in itertools.combinations(boxes, 2):
            assert max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) >= GAP
        # Every non-background pixel lies inside some object's box.
        covered = np.zeros(image.shape[:2], dtype=bool)
        for x0, y0, x1, y1 in boxes:
            covered[int(np.floor(y0)) : int(np.ceil(y1)), int(np.floor(x0)) : int(np.ceil(x1))] = True
        assert np.all(image[~covered] == BACKGROUND)


def test_object_sizes_depend_on_object_count(ground_truth):
    for _, scene, _ in ground_truth:
        low, high = (20, 26) if len(scene.objects) <= 2 else (16, 20)
        assert all(low <= obj.size <= high for obj in scene.objects)


def test_prompt_space_covers_categories_and_counts():
    metas = all_prompts()
    assert all_prompts() == metas  # deterministic order
    assert len({m["prompt"] for m in metas}) == len(metas)
    assert {m["tag"] for m in metas} == set(TAGS)
    assert {m["include"][0]["count"] for m in metas if m["tag"] == "counting"} == {1, 2, 3, 4}
    for meta in metas:
        assert caption(meta) == meta["prompt"] and meta["prompt"].startswith("a photo of ")
        if meta["tag"] in ("two_object", "position", "color_attr"):
            assert meta["include"][0]["class"] != meta["include"][1]["class"]
        if meta["tag"] == "color_attr":
            assert meta["include"][0]["color"] != meta["include"][1]["color"]


def test_prompts_use_geneval_schema_and_phrasing():
    assert single_object_prompt("circle") == {
        "tag": "single_object",
        "include": [{"class": "circle", "count": 1}],
        "prompt": "a photo of a circle",
    }
    assert counting_prompt("triangle", 3) == {
        "tag": "counting",
        "include": [{"class": "triangle", "count": 3}],
        "exclude": [{"class": "triangle", "count": 4}],
        "prompt": "a photo of three triangles",
    }
    assert counting_prompt("circle", 1)["prompt"] == "a photo of one circle"
    assert colors_prompt("orange", "square")["prompt"] == "a photo of an orange square"
    assert position_prompt("square", "right of", "circle") == {
        "tag": "position",
        "include": [
            {"class": "circle", "count": 1},
            {"class": "square", "count": 1, "position": ["right of", 0]},
        ],
        "prompt": "a photo of a square right of a circle",
    }
    color_attr = color_attr_prompt("red", "circle", "blue", "square")
    assert color_attr["prompt"] == "a photo of a red circle and a blue square"
    assert list(counting_prompt("circle", 2)) == ["tag", "include", "exclude", "prompt"]  # GenEval key order


def _compositions(meta):
    """Colour-shape pairs, count-shape pairs and position triples (both phrasings) of a prompt."""
    found = {(clause.get("color"), clause["class"]) for clause in meta["include"]}
    if meta["tag"] == "counting":
        found.add((meta["include"][0]["count"], meta["include"][0]["class"]))
    if meta["tag"] == "position":
        reference, subject = meta["include"][0]["class"], meta["include"][1]["class"]
        relation = meta["include"][1]["position"][0]
        found |= {(subject, relation, reference), (reference, INVERSE_RELATION[relation], subject)}
    return found


def test_splits_hold_out_compositions():
    train, test = prompts("train"), prompts("test")
    held_out = set(HELD_OUT_COLOR_SHAPE) | set(HELD_OUT_COUNTS) | set(HELD_OUT_POSITIONS)
    for meta in train:
        assert not _compositions(meta) & held_out, meta["prompt"]
    in_test = set().union(*(_compositions(m) for m in test))
    assert held_out <= in_test
    counts = {
        "train": collections.Counter(m["tag"] for m in train),
        "test": collections.Counter(m["tag"] for m in test),
    }
    print("split counts:", counts)
    for tag in TAGS:
        assert counts["train"][tag] > 0 and counts["test"][tag] > 0, tag
    # Only the shared tags are in both splits; together the splits cover everything.
    shared = {m["prompt"] for m in train} & {m["prompt"] for m in test}
    assert shared == {m["prompt"] for m in all_prompts() if m["tag"] in ("single_object", "two_object")}
    assert {m["prompt"] for m in train} | {m["prompt"] for m in test} == {m["prompt"] for m in all_prompts()}
    with pytest.raises(ValueError):
        prompts("val")


def test_scene_for_prompt_adds_only_prompted_objects(ground_truth):
    for meta, scene, _ in ground_truth:
        expected = collections.Counter()
        for clause in meta["include"]:
            expected[clause["class"]] += clause["count"]
        assert collections.Counter(obj.shape for obj in scene.objects) == expected
        for clause in meta["include"]:
            if "color" in clause:
                assert any(o.shape == clause["class"] and o.color == clause["color"] for o in scene.objects)
        if meta["tag"] == "position":
            by_shape = {obj.shape: obj for obj in scene.objects}
            reference, subject = (by_shape[clause["class"]] for clause in meta["include"])
            assert relative_position(subject.bbox, reference.bbox) == {meta["include"][1]["position"][0]}


def test_scene_for_prompt_can_avoid_held_out_colors():
    meta = single_object_prompt("triangle")
    scenes = [scene_for_prompt(meta, seed, avoid_color_shape=HELD_OUT_COLOR_SHAPE) for seed in range(200)]
    colors = {scene.objects[0].color for scene in scenes}
    assert colors == set(COLORS) - {"purple"}


# ----------------------------------------------------------------------------- verifier


def test_verifier_exact_on_clean_renders(ground_truth):
    metas = [meta for meta, _, _ in ground_truth]
    results = evaluate_batch([image for _, _, image in ground_truth], metas)
    summary = aggregate(results, metas)
    print(f"clean strict accuracy {summary['overall_images']:.4f} on {len(results)} images")
    assert len(results) >= 1000
    assert summary["overall_images"] >= 0.99
    assert all(r["partial"] == 1.0 for r in results), [r["reason"] for r in results if r["partial"] < 1][:5]


def test_verifier_under_mild_perturbation(ground_truth):
    rng = np.random.default_rng(0)
    metas = [meta for meta, _, _ in ground_truth]
    results = evaluate_batch([perturb(image, rng) for _, _, image in ground_truth], metas)
    summary = aggregate(results, metas)
    per_tag = {tag: round(v["strict"], 4) for tag, v in summary["per_tag"].items()}
    print(f"perturbed strict accuracy {summary['overall_images']:.4f} ({per_tag})")
    assert summary["overall_images"] >= PERTURBED_ACCURACY_FLOOR


def test_edge_pixels_keep_their_colour():
    """Mixes of a colour with the background never read as another colour."""
    background = np.asarray(BACKGROUND, dtype=np.float64)
    alphas = np.linspace(0.0, 1.0, 41)
    for index, name in enumerate(COLORS):
        mix = background + alphas[:, None] * (np.asarray(PALETTE[name]) - background)  # (41, 3)
        labels = classify_pixels(mix.round().astype(np.uint8)[None])[0]
        assert set(labels[alphas >= 0.52]) == {index}, name
        assert set(labels[alphas <= 0.48]) == {-1}, name
    red_circle = _object_scene(("circle", "red", 32, 32, 24))
    blurred = perturb(red_circle, np.random.default_rng(0), radius=1.5, noise_std=0)
    assert set(np.unique(classify_pixels(blurred))) == {-1, COLORS.index("red")}


def _flood_fill_components(labels):
    """Reference 8-connected labelling by breadth-first search: set of (label, pixels)."""
    seen, components = np.zeros(labels.shape, dtype=bool), set()
    for start in zip(*np.nonzero(labels >= 0)):
        if seen[start]:
            continue
        seen[start], queue, pixels = True, [start], []
        while queue:
            y, x = queue.pop()
            pixels.append((int(y), int(x)))
            for ny, nx in itertools.product((y - 1, y, y + 1), (x - 1, x, x + 1)):
                inside = 0 <= ny < labels.shape[0] and 0 <= nx < labels.shape[1]
                if inside and not seen[ny, nx] and labels[ny, nx] == labels[start]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        components.add((int(labels[start]), frozenset(pixels)))
    return components


def test_connected_components_match_flood_fill():
    rng = np.random.default_rng(0)
    for density in (0.3, 0.6, 0.9):
        labels = np.where(rng.random((24, 31)) < density, rng.integers(0, 3, (24, 31)), -1)
        found = set()
        for label, mask, (x0, y0, _, _) in connected_components(labels):
            ys, xs = np.nonzero(mask)
            found.add((label, frozenset(zip((ys + y0).tolist(), (xs + x0).tolist()))))
        assert found == _flood_fill_components(labels)
    assert connected_components(np.full((5, 5), -1)) == []


def test_detect_accepts_image_formats():
    image = _object_scene(("triangle", "green", 20, 20, 22), ("square", "yellow", 44, 44, 20))
    expected = [(d.shape, d.color) for d in detect(image)]
    assert sorted(expected) == [("square", "yellow"), ("triangle", "green")]
    for variant in (image / 255.0, (image / 255.0).transpose(2, 0, 1), Image.fromarray(image)):
        assert [(d.shape, d.color) for d in detect(variant)] == expected


def test_wrong_colour_fails_with_half_credit():
    result = evaluate(_object_scene(("circle", "blue", 32, 32, 24)), colors_prompt("red", "circle"))
    assert not result["strict"]
    assert result["partial"] == pytest.approx(0.5)  # count 1, colour 0


def test_swapped_colour_binding_fails():
    image = _object_scene(("circle", "blue", 16, 32, 22), ("square", "red", 48, 32, 22))
    result = evaluate(image, color_attr_prompt("red", "circle", "blue", "square"))
    assert not result["strict"]
    assert result["partial"] == pytest.approx(0.5)  # (1 + 0 + 1 + 0) / 4


def test_wrong_count_fails_with_count_credit():
    two = _object_scene(("square", "red", 16, 16, 18), ("square", "blue", 46, 46, 18))
    result = evaluate(two, counting_prompt("square", 3))
    assert not result["strict"] and "found 2" in result["reason"]
    assert result["partial"] == pytest.approx(2 / 3)  # 1 - |3 - 2| / 3
    four = _object_scene(*[("square", "red", x, y, 18) for x in (16, 46) for y in (16, 46)])
    result = evaluate(four, counting_prompt("square", 3))
    assert not result["strict"] and "square<4" in result["reason"]  # the exclude clause
    assert result["partial"] == pytest.approx(2 / 3)


def test_wrong_relation_fails_with_position_term_zero():
    image = _object_scene(("circle", "red", 16, 32, 22), ("square", "blue", 48, 32, 22))
    passing = evaluate(image, position_prompt("circle", "left of", "square"))
    assert passing == {"strict": True, "partial": 1.0, "reason": ""}
    result = evaluate(image, position_prompt("circle", "right of", "square"))
    assert not result["strict"] and "left of" in result["reason"]
    assert result["partial"] == pytest.approx(2 / 3)  # counts 1 and 1, position 0


def test_extra_object_passes_strict_but_costs_partial():
    """GenEval only needs >= count for single objects; the partial count term is exact."""
    image = _object_scene(("circle", "red", 16, 32, 22), ("circle", "blue", 48, 32, 22))
    result = evaluate(image, single_object_prompt("circle"))
    assert result["strict"] and result["partial"] == 0.0  # 1 - |1 - 2| / 1


def test_relative_position_matches_geneval():
    assert relative_position((40, 10, 50, 20), (10, 10, 20, 20)) == {"right of"}
    assert relative_position((10, 10, 20, 20), (40, 10, 50, 20)) == {"left of"}
    assert relative_position((10, 0, 20, 10), (12, 40, 22, 50)) == {"above"}  # x offset absorbed
    assert relative_position((12, 40, 22, 50), (10, 0, 20, 10)) == {"below"}
    assert relative_position((30, 30, 40, 40), (0, 0, 10, 10)) == {"right of", "below"}  # 0.66 each
    assert relative_position((3, 4, 3, 4), (0, 0, 0, 0)) == {"right of", "below"}  # (0.6, 0.8)
    assert relative_position((0, 0, 10, 10), (1, 0, 11, 10)) == set()  # revised offset 0
    # Offset (10, 10), dims sum 40: revised (6, 6) / 14.14 = 0.42 per axis: no relation.
    assert relative_position((10, 10, 30, 30), (0, 0, 20, 20)) == set()


def test_aggregate_overall_is_mean_over_tags():
    metas = [{"tag": "colors"}] * 3 + [{"tag": "position"}]
    results = [{"strict": s, "partial": p} for s, p in [(True, 1.0), (False, 0.5), (False, 0.0), (True, 1.0)]]
    summary = aggregate(results, metas)
    colors = summary["per_tag"]["colors"]
    assert colors == {"strict": pytest.approx(1 / 3), "partial": pytest.approx(0.5), "n": 3}
    assert summary["overall"] == pytest.approx((1 / 3 + 1) / 2)
    assert summary["overall_images"] == pytest.approx(0.5)
    assert summary["overall_partial"] == pytest.approx(0.75)


def _stub_detections(meta):
    """Detections satisfying ``meta``'s include clauses exactly (boxes 20 px, 60 px apart)."""
    step = {"left of": (-60, 0), "right of": (60, 0), "above": (0, -60), "below": (0, 60)}
    detections, centres = {}, []
    for clause in meta["include"]:
        if "position" in clause:
            relation, target = clause["position"]
            base = np.add(centres[target], step[relation])
        else:
            base = np.array([200.0 * (len(centres) + 1), 200.0])
        centres.append(base)
        for k in range(clause["count"]):
            x, y = base + (0, 30 * k)
            box = (x - 10, y - 10, x + 10, y + 10)
            detections.setdefault(clause["class"], []).append(
                Detection(clause["class"], clause.get("color"), box, 400, 1.0)
            )
    return detections


def test_evaluator_runs_on_real_geneval_metadata():
    if not GENEVAL_METADATA.exists():
        pytest.skip(f"GenEval metadata not found at {GENEVAL_METADATA}")
    metas = [json.loads(line) for line in GENEVAL_METADATA.read_text().splitlines() if line.strip()]
    assert len(metas) == 553
    assert {m["tag"] for m in metas} == set(TAGS)
    for meta in metas:
        result = evaluate(_stub_detections(meta), meta)
        assert result == {"strict": True, "partial": 1.0, "reason": ""}, meta["prompt"]
    # The pixel detector knows no COCO class: an empty image fails every real prompt.
    blank = render(Scene([]))
    assert not any(evaluate(blank, meta)["strict"] for meta in metas[:20])
    assert not {c["class"] for m in metas for c in m["include"]} & set(SHAPES)

"""GenEval-style benchmark: metadata files, resumable sampling, scoring, intervals, pluggable detector."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from eval.geneval import (bootstrap_overall, load_detector, load_metadata, model_sampler, plan_samples, run_geneval,
                          sample_folder, wilson_interval)
from eval.score import ScoreInputError
from eval.shapes import Detection, TAGS, prompts, render, scene_for_prompt


def render_sampler(items, calls=None, scene=scene_for_prompt):
    """A perfect 'model': renders a scene satisfying each prompt (seeded), as a sampler."""
    by_prompt = {item["prompt"]: item["meta"] for item in items}

    def sample(texts, seeds):
        if calls is not None:
            calls.append(len(texts))
        arrays = np.stack([render(scene(by_prompt[t], int(s))) for t, s in zip(texts, seeds)])
        return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255

    return sample


def blank_sampler(texts, seeds):
    return torch.full((len(texts), 3, 64, 64), 240 / 255)


def shapes_items(per_tag=2):
    by_tag = {tag: [m for m in prompts("test") if m["tag"] == tag][:per_tag] for tag in TAGS}
    return [{"prompt": m["prompt"], "meta": m} for tag in TAGS for m in by_tag[tag]]


def test_perfect_and_blank_models(tmp_path):
    items = shapes_items()
    perfect = run_geneval(render_sampler(items), items, tmp_path / "a", images_per_prompt=2)
    assert perfect["overall"] == 1.0 and perfect["n"] == 24 and perfect["num_prompts"] == 12
    assert all(v["strict"] == 1.0 and v["ci"][1] == 1.0 and v["ci"][0] > 0.5 for v in perfect["per_tag"].values())
    blank = run_geneval(blank_sampler, items, tmp_path / "b")
    assert blank["overall"] == 0.0 and blank["overall_ci"] == (0.0, 0.0)
    saved = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert saved["overall"] == 1.0 and len((tmp_path / "a" / "results.jsonl").read_text().splitlines()) == 24


def test_sampling_resumes_after_interruption(tmp_path):
    items = shapes_items(1)
    plan = plan_samples(items, 1, seed=5)
    assert [p["seed"] for p in plan] == list(range(5, 11))
    inner, calls = render_sampler(items), []

    def dies_after_one_batch(texts, seeds):
        if calls:
            raise KeyboardInterrupt
        calls.append(len(texts))
        return inner(texts, seeds)

    with pytest.raises(KeyboardInterrupt):
        sample_folder(dies_after_one_batch, plan, tmp_path, batch_size=4)
    listing = tmp_path / "samples.jsonl"
    assert len(listing.read_text().splitlines()) == 4  # the finished batch is kept
    listing.write_text(listing.read_text() + '{"file": "00004.png", "pro')  # a line cut off mid-write
    rest = []
    rows = sample_folder(render_sampler(items, rest), plan, tmp_path, batch_size=4)
    assert rest == [2] and [r["file"] for r in rows] == [p["file"] for p in plan]
    with pytest.raises(ScoreInputError, match="another evaluation"):
        sample_folder(blank_sampler, plan_samples(items, 1, seed=99), tmp_path)


def test_intervals():
    low, high = wilson_interval(8, 10)
    assert 0.45 < low < 0.8 < high < 0.97
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    # prompts are the resampled units: two images of one prompt are one cluster
    results = [{"tag": t, "prompt_index": i, "prompt": str(i), "strict": i % 2 == 0}
               for t in ("a", "b") for i in range(20) for j in range(2)]
    low, high = bootstrap_overall(results, seed=0)
    assert 0.3 < low < 0.5 < high < 0.7
    mixed = [dict(r, strict=(r["prompt_index"] + j) % 2 == 0) for j, r in enumerate(results)]
    assert bootstrap_overall(mixed) == (0.5, 0.5)  # every prompt at 1/2: no between-prompt variance
    assert bootstrap_overall(results, seed=0) == (low, high)  # seeded


def test_real_geneval_metadata(shared_data, tmp_path):
    path = shared_data / "geneval" / "evaluation_metadata.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    items = load_metadata(path)
    assert len(items) == 553
    assert set(Counter(i["meta"]["tag"] for i in items)) == set(TAGS)
    # the same evaluator with a pluggable detector: one that "sees" exactly what each prompt asks for
    position_item = next(i for i in items if i["meta"]["tag"] == "position")

    def oracle(image):
        boxes = [(0, 0, 10, 10), (40, 0, 50, 10)]  # second object right of the first
        clauses = position_item["meta"]["include"]
        return [Detection(c["class"], c.get("color"), boxes[k], 100, 1.0) for k, c in enumerate(clauses)]

    assert load_detector(oracle) is oracle
    relation = position_item["meta"]["include"][1]["position"][0]
    result = run_geneval(blank_sampler, [position_item], tmp_path, detector=oracle)
    assert result["overall"] == float(relation == "right of")


def test_malformed_metadata_names_the_line(tmp_path):
    bad = tmp_path / "meta.jsonl"
    bad.write_text('{"tag": "colors", "include": [{"class": "cat", "count": 1}], "prompt": "a cat"}\n{not json\n')
    with pytest.raises(ScoreInputError, match=r"meta.jsonl:2: malformed JSON"):
        load_metadata(bad)
    bad.write_text('{"tag": "colors", "include": [{"class": "cat", "count": 1}], "prompt": "a cat"}\n'
                   '{"tag": "colors", "include": [{"class": "cat"}], "prompt": "a dog"}\n')
    with pytest.raises(ScoreInputError, match=r"meta.jsonl:2: every clause needs"):
        load_metadata(bad)
    with pytest.raises(ValueError, match="pkg.module:attr"):
        load_detector("nonsense")


def test_real_model_sampler(tiny_sd3, tmp_path):
    items = shapes_items(1)[:3]
    summary = run_geneval(model_sampler(tiny_sd3, num_steps=2), items, tmp_path)
    assert summary["n"] == 3 and 0.0 <= summary["overall"] <= 1.0

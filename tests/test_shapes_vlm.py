"""The shipped ShapesWorld captioner (rewards/shapes_vlm.py): present, unchanged, loadable by
transformers' Auto classes, and giving PromptEcho / the yes/no judge real signal on held-out scenes.
Numbers on more pairs and on base-model samples: `python -m eval.shapes_vlm_report`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eval.shapes import HELD_OUT_COLOR_SHAPE, all_prompts, is_held_out, prompts, render, scene_for_prompt, evaluate
from rewards import build_reward, registered_rewards
from rewards.shapes_vlm import (
    CORRUPTIONS,
    SHAPES_VLM_DIR,
    SHIPPED_SHA256,
    ShapesPromptEcho,
    ShapesYesNo,
    applicable_corruptions,
    corrupt_prompt,
    held_out_pairs,
    load_shapes_vlm,
    sample_examples,
    shapes_vlm_components,
    train_shapes_captioner,
    training_inputs,
)
from samplers.models.shapesworld import weights_checksum


def test_shipped_weights_checksum_size_and_auto_classes():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    files = list(SHAPES_VLM_DIR.glob("*.safetensors"))
    assert len(files) == 1 and files[0].stat().st_size <= 12 * 2**20
    assert weights_checksum(SHAPES_VLM_DIR) == SHIPPED_SHA256
    model = AutoModelForImageTextToText.from_pretrained(SHAPES_VLM_DIR)
    processor = AutoProcessor.from_pretrained(SHAPES_VLM_DIR)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2VLProcessor" and processor.chat_template


def test_caption_words_are_single_tokens_and_any_text_tokenises():
    tokenizer = load_shapes_vlm().tokenizer
    for meta in all_prompts():
        assert len(tokenizer(meta["prompt"], add_special_tokens=False)["input_ids"]) == len(meta["prompt"].split())
    assert tokenizer.decode(tokenizer("a photo of a zebra ☂", add_special_tokens=False)["input_ids"]) == \
        "a photo of a zebra ☂"  # unknown words fall back to bytes


@pytest.fixture(scope="module")
def pairs():
    return held_out_pairs(per_kind=64, seed=1234)  # 256 fresh scenes of test-split prompts


def test_prompt_echo_prefers_the_true_prompt_on_held_out_scenes(pairs):
    echo = build_reward("shapes_prompt_echo")
    true, wrong = echo(pairs["images"], pairs["prompts"]).scores, echo(pairs["images"], pairs["corrupted"]).scores
    kinds = np.array(pairs["kinds"])
    prefers = (true > wrong).numpy()
    rates = {kind: prefers[kinds == kind].mean() for kind in CORRUPTIONS}
    assert prefers.mean() >= 0.9, rates
    assert min(rates.values()) >= 0.8, rates


def test_yes_no_judge_separates_true_from_corrupted_prompts(pairs):
    judge = build_reward("shapes_yes_no")
    true, wrong = judge(pairs["images"], pairs["prompts"]).scores, judge(pairs["images"], pairs["corrupted"]).scores
    accuracy = torch.cat([true > 0.5, wrong < 0.5]).float().mean()
    assert accuracy >= 0.85, float(accuracy)


def test_rewards_share_one_cached_model():
    echo, judge = ShapesPromptEcho(), ShapesYesNo()
    assert echo.vlm is judge.vlm is load_shapes_vlm()
    assert registered_rewards()["shapes_prompt_echo"] is ShapesPromptEcho
    assert registered_rewards()["shapes_yes_no"] is ShapesYesNo
    with pytest.raises(FileNotFoundError, match="train-shapes-vlm"):
        load_shapes_vlm("/nonexistent/shapes_vlm")


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corruptions_are_false_for_the_scene(kind):
    rng = np.random.default_rng(0)
    metas = [m for m in all_prompts() if kind in applicable_corruptions(m)]
    assert metas
    for meta in metas:
        wrong = corrupt_prompt(meta, kind, rng)
        scene = render(scene_for_prompt(meta, rng))
        assert wrong["prompt"] != meta["prompt"] and wrong["tag"] == meta["tag"]
        assert evaluate(scene, meta)["strict"] and not evaluate(scene, wrong)["strict"]
        strict = corrupt_prompt(meta, kind, rng, allow_held_out=False)
        assert strict is None or not is_held_out(strict)
    assert corrupt_prompt(prompts("train")[0], "count", rng) is None  # "a photo of a circle" has no count


def test_training_examples_respect_the_split_and_label_only_answers():
    rng = np.random.default_rng(0)
    images, questions, answers = sample_examples(200, rng, yes_no_fraction=0.5)
    train = {m["prompt"] for m in prompts("train")}
    for question, answer in zip(questions, answers):
        text = answer if answer not in ("Yes", "No") else question.split("show ", 1)[1].split("?")[0]
        assert text in train
    assert {"Yes", "No"} <= set(answers)
    _, processor = shapes_vlm_components("test")
    inputs = training_inputs(processor, images[:4], questions[:4], answers[:4])
    for i, answer in enumerate(answers[:4]):
        labelled = inputs["labels"][i][inputs["labels"][i] != -100]
        assert processor.tokenizer.decode(labelled) == answer + "<|im_end|>"


def test_training_smoke_run(tmp_path):
    out = tmp_path / "vlm"
    train_shapes_captioner(out, steps=3, seed=0, size="test", batch=4, log_every=1, progress=False)
    assert not (tmp_path / "vlm.partial").exists()
    assert len((out / "train_log.csv").read_text().splitlines()) == 4  # header + 3 steps
    initial, _ = shapes_vlm_components("test", seed=0)
    trained = load_shapes_vlm(out).model
    changed = [not torch.equal(p, initial.state_dict()[name]) for name, p in trained.state_dict().items()]
    assert all(changed)
    images = torch.from_numpy(np.stack([render(scene_for_prompt(m, 0, avoid_color_shape=HELD_OUT_COLOR_SHAPE))
                                         for m in prompts("train")[:2]])).permute(0, 3, 1, 2) / 255
    scores = ShapesPromptEcho(path=out)(images, [m["prompt"] for m in prompts("train")[:2]]).scores
    assert bool(torch.isfinite(scores).all() and (scores < 0).all())

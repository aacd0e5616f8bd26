"""The video execution reward (rewards/video_exec.py) and synthetic GUI videos (eval/gui_videos.py)."""

import math

import numpy as np
import pytest
import torch

from eval.gui_videos import NOTHING_DONE, generate_dataset, generate_example, judge_metrics, temporal_iou, vocabulary
from rewards import build_reward, registered_rewards
from rewards.video_exec import (SHIPPED_JUDGE_DIR, SHIPPED_JUDGE_SHA256, VideoExecJudge, answer_text, parse_interval, tiny_video_vlm,
                                train_video_judge)


@pytest.fixture(scope="module")
def tiny():
    return tiny_video_vlm(hidden_size=32, num_heads=2, vision_dim=32, max_pixels=224 * 168)


def test_generator_is_deterministic_and_annotated():
    a, b = generate_example(7), generate_example(7)
    assert np.array_equal(a["frames"], b["frames"]) and a["instruction"] == b["instruction"]
    assert not np.array_equal(generate_example(8)["frames"][:1], a["frames"][:1])  # other seed, other screen
    kinds = {}
    for seed in range(40):
        example = generate_example(seed)
        kinds[example["kind"]] = kinds.get(example["kind"], 0) + 1
        frames, interval = example["frames"], example["interval"]
        assert frames.dtype == np.uint8 and frames.shape[1:] == (168, 224, 3) and 4 <= len(frames) <= 16
        assert example["label"] == (example["kind"] == "positive") == (interval is None)
        assert example["instruction"].startswith(("click ", "type ", "open the "))
        if example["kind"] == "translated":  # same video as a success, other instruction
            assert example["executed"] != example["instruction"]
        if interval is not None:
            assert 0 <= interval[0] <= interval[1] < len(frames)
        if interval is not None and example["kind"] != "incomplete":  # (incomplete: nothing happens there)
            # the screen changes inside the deviation interval: the wrong action is visible
            span = frames[interval[0]:interval[1] + 1]
            assert len(span) == 1 or np.abs(np.diff(span.astype(int), axis=0)).sum() > 0
    assert set(kinds) == {"positive", "wrong_target", "incomplete", "translated"}


def test_metrics():
    assert temporal_iou((2, 4), (2, 4)) == 1.0
    assert temporal_iou((2, 3), (3, 5)) == pytest.approx(1 / 4)
    assert temporal_iou(None, (1, 2)) == 0.0
    metrics = judge_metrics([0.9, 0.2, 0.6, 0.1], [1, 1, 0, 0], [None, (0, 1), None, (2, 3)], [None, [0, 1], [1, 2], [2, 4]])
    assert metrics["accuracy"] == 0.5 and metrics["recall"] == 0.5
    assert metrics["temporal_iou"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert parse_interval("No 3-5") == (3.0, 5.0) and parse_interval("no idea") is None
    assert answer_text(1, None) == "Yes" and answer_text(0, [3, 5]) == "No 3-5"


def test_reward_signature_and_pruning_report(tiny):
    assert "video_exec" in registered_rewards()
    model, processor = tiny
    reward = build_reward({"type": "video_exec", "model": model, "processor": processor, "batch_size": 2})
    examples = [generate_example(seed) for seed in (1, 2, 3)]
    length = min(len(e["frames"]) for e in examples)
    samples = torch.stack([torch.from_numpy(e["frames"][:length]).permute(3, 0, 1, 2) for e in examples]).float() / 255
    out = reward(samples, [e["instruction"] for e in examples])
    assert out.scores.shape == (3,) and ((out.scores > 0) & (out.scores < 1)).all()
    assert (out.extras["kept_token_ratio"] < 0.5).all()  # GUI recordings: most tokens pruned
    assert (out.extras["visual_tokens"] == (length + length % 2) // 2 * 48).all()  # 8 x 6 tokens per frame pair
    unpruned = VideoExecJudge(model, processor, pruning=False)(samples, [e["instruction"] for e in examples])
    assert (unpruned.extras["kept_token_ratio"] == 1).all()
    with pytest.raises(ValueError, match="videos"):
        reward(samples[:, :, 0], [e["instruction"] for e in examples])  # images are refused


def test_judge_files_names_bad_files(tiny, tmp_path):
    model, processor = tiny
    judge = VideoExecJudge(model, processor, interval=True)
    path = generate_dataset(tmp_path, 2, seed=5)
    import json

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    result = judge.judge_files([tmp_path / r["video"] for r in rows], [r["instruction"] for r in rows])
    assert result["p_success"].shape == (2,) and len(result["intervals"]) == 2
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="broken.mp4: not a readable video"):
        judge.judge_files([tmp_path / "broken.mp4"], ["click Save"])


def test_training_fits_a_few_examples(tiny):
    model, processor = tiny_video_vlm(hidden_size=32, num_heads=2, vision_dim=32, max_pixels=112 * 84, seed=1)
    rows = []
    for seed, kind in ((11, "positive"), (12, "translated"), (13, "positive"), (14, "wrong_target")):
        example = generate_example(seed, kind)
        frames = example["frames"][:, ::2, ::2]  # 112 x 84: fast
        rows.append({"video": frames, "instruction": example["instruction"], "label": example["label"],
                     "interval": example["interval"]})
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    history = train_video_judge(model, processor, rows, steps=80, batch_size=4, lr=1e-2, template="{instruction}",
                                max_pixels=112 * 84, interval_weight=0.0, log=None)  # the judgement token only
    # the loss is the judgement token's CE itself (ln 2 = chance on this balanced set)
    assert history["losses"] == history["judgement_losses"]
    assert np.mean(history["losses"][-3:]) < 0.1 < math.log(2) < np.mean(history["losses"][:3])
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) == len(before)  # every parameter trained (the patch embedding too)
    judge = VideoExecJudge(model, processor, template="{instruction}")
    p = judge.judge([r["video"] for r in rows], [r["instruction"] for r in rows])["p_success"]
    labels = torch.tensor([r["label"] == 1 for r in rows])
    assert p[labels].min() > 0.5 > p[~labels].max()  # the training videos are judged right


def test_describe_task_and_word_tokens():
    words = vocabulary()
    model, processor = tiny_video_vlm(hidden_size=32, num_heads=2, vision_dim=32, max_pixels=112 * 84, seed=2,
                                      words_from=words)
    tokens = processor.tokenizer.tokenize(" open the File menu and choose Export")
    assert tokens == ["Ġopen", "Ġthe", "ĠFile", "Ġmenu", "Ġand", "Ġchoose", "ĠExport"]  # a token per word
    assert processor.tokenizer.tokenize("Yes")[0] != processor.tokenizer.tokenize("No")[0]
    rows = []
    for seed in range(4):
        example = generate_example(100 + seed)
        assert example["description"] == (NOTHING_DONE if example["kind"] == "incomplete" else example["executed"])
        rows.append({"video": example["frames"][:, ::2, ::2], "instruction": example["instruction"],
                     "label": example["label"], "description": example["description"]})
    history = train_video_judge(model, processor, rows, steps=3, batch_size=4, lr=1e-3, template=" {instruction}",
                                max_pixels=112 * 84, describe_weight=1.0, log=None)
    # half of each batch is a description example: the total loss adds their CE to the judgement's
    assert all(total > judgement for total, judgement in zip(history["losses"], history["judgement_losses"]))
    with pytest.raises(ValueError, match="description"):
        train_video_judge(model, processor, [{k: v for k, v in r.items() if k != "description"} for r in rows],
                          steps=1, describe_weight=1.0, max_pixels=112 * 84, log=None)


def test_shipped_judge_checksum():
    from samplers.models.shapesworld import weights_checksum

    assert weights_checksum(SHIPPED_JUDGE_DIR) == SHIPPED_JUDGE_SHA256, \
        "shipped video_exec judge changed: rebuild with `align train-exevrm` and update SHIPPED_JUDGE_SHA256"


def test_shipped_judge_meets_the_targets_on_fresh_videos():
    """Issue targets (accuracy and recall >= 0.9, pruning costs <= 1 point) on 96 GUI videos of
    seeds never used in training or in the held-out report, judged pruned (the default) and not;
    the deviation intervals of the failures (temporal IoU, reported by the issue) at IoU >= 0.5."""
    examples = [generate_example(10_000_000 + seed) for seed in range(96)]
    labels = [e["label"] for e in examples]
    metrics = {}
    for label, pruning in (("pruned", True), ("unpruned", None)):
        judge = VideoExecJudge(pruning=pruning)  # rewards/models/weights/video_exec_judge with its settings
        p = judge.judge([e["frames"] for e in examples], [e["instruction"] for e in examples])["p_success"]
        assert not math.isnan(float(p.sum()))
        metrics[label] = judge_metrics(p.numpy(), labels)
    assert metrics["pruned"]["accuracy"] >= 0.9 and metrics["pruned"]["recall"] >= 0.9, metrics
    assert metrics["unpruned"]["accuracy"] - metrics["pruned"]["accuracy"] <= 0.01, metrics
    # temporal attribution: the deviation interval of failures judged failed, against the generator's annotation
    judge, failed = VideoExecJudge(), [e for e in examples if e["interval"] is not None]
    found = [parse_interval(judge.continue_answer(e["frames"], e["instruction"], judge.no_words[0])) for e in failed]
    iou = float(np.mean([temporal_iou(f, e["interval"]) for f, e in zip(found, failed)]))
    assert len(failed) >= 30 and iou >= 0.5, (len(failed), iou)  # IoU 0.5: the usual localisation criterion


def test_pruning_benchmark_reports_a_shorter_sequence():
    """eval.bench_video_exec's numbers are consistent (the timings themselves are for the script to print)."""
    from eval.bench_video_exec import ARCHITECTURES, bench_pruning

    assert set(ARCHITECTURES) == {"tiny", "8b-slice"}
    result = bench_pruning("tiny", videos=2, batch=2, repeats=1)
    assert 0 < result["kept_ratio[stp+ttp]"] <= min(result["kept_ratio[stp]"], result["kept_ratio[ttp]"]) <= 1
    assert result["mean_sequence_length[pruned]"] < result["mean_sequence_length[unpruned]"]
    assert result["forward_time_ratio"] > 0


def test_train_exevrm_command_and_fine_tuning_a_saved_judge(tmp_path):
    """`align train-exevrm` end to end on a few synthetic videos; a judge it saved is fine-tuned further with its
    own question and pixel budget, and the new settings keep how the base was made."""
    import json

    from align.cli import main
    from align.train_exevrm import TINY_TEMPLATE
    from rewards.video_exec import SETTINGS_FILE

    common = ["--workdir", str(tmp_path / "data"), "--train-videos", "4", "--test-videos", "2", "--batch", "2"]
    judge = tmp_path / "judge"
    assert main(["train-exevrm", *common, "--steps", "2", "--out", str(judge)]) == 0
    base = json.loads((judge / SETTINGS_FILE).read_text())
    # in place, as README's recipe does: the save is atomic, so the folder is whole before and after
    assert main(["train-exevrm", *common, "--steps", "1", "--interval-weight", "1", "--model", str(judge),
                 "--out", str(judge)]) == 0
    tuned = json.loads((judge / SETTINGS_FILE).read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "judge"]  # no .partial or .old folder left
    assert tuned["template"] == base["template"] == TINY_TEMPLATE
    assert tuned["max_pixels"] == base["max_pixels"] == 112 * 84
    assert tuned["training"]["base"] == base["training"] and "--interval-weight 1.0" in tuned["training"]["command"]
    assert set(tuned["metrics"]) >= {"pruned", "unpruned", "forward_time_ratio"}

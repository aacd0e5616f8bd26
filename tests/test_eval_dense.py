"""DenseAlignBench-style benchmark: dense ShapesWorld prompts, caption files, pairwise judging statistics."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from eval.dense import (PAIR_TEMPLATE, ChatPairJudge, VerifierJudge, build_judge, dense_clauses, dense_prompts,
                        dense_scene, load_captions, net_win_rate, order_flips, parse_pair_verdict, parse_preference,
                        run_dense)
from rewards.prompts.densealignbench import PAIRWISE_PROMPT_FOLLOWING
from eval.score import ScoreInputError
from eval.shapes import render
from tests.test_eval_geneval import blank_sampler, render_sampler


def always_first(pairs, items):
    return ["first"] * len(pairs)


def test_dense_prompts_are_verifiable():
    items = dense_prompts(40, seed=3)
    assert items == dense_prompts(40, seed=3) and items != dense_prompts(40, seed=4)
    counts = [item["meta"]["n_clauses"] for item in items]
    assert min(counts) >= 3 and max(counts) <= 6 and len(set(counts)) >= 3
    assert not any("a orange" in i["prompt"] for i in items)
    for k, item in enumerate(items[:12]):  # clean renders satisfy every clause
        assert all(dense_clauses(render(dense_scene(item["meta"], k)), item["meta"]))
    blank = np.full((64, 64, 3), 240, np.uint8)
    assert not any(dense_clauses(blank, items[0]["meta"]))


def test_correct_model_beats_blank_model(tmp_path):
    items = dense_prompts(12, seed=0)
    result = run_dense(render_sampler(items, scene=dense_scene), blank_sampler, items, tmp_path, "verifier", seed=1)
    net = result["net"]
    assert net["net_win_rate"] == 1.0 and net["win"] == 1.0 and net["ci"] == (1.0, 1.0)
    assert result["clauses"]["A"]["all_correct"] == 1.0 and result["clauses"]["B"]["clause_accuracy"] == 0.0
    bias = result["position_bias"]  # an order-blind judge picks the slot A is in
    assert bias["a_first"]["first_slot_rate"] == 1.0 and bias["b_first"]["first_slot_rate"] == 0.0
    assert 0 < bias["a_first"]["n"] < 12
    swapped = run_dense(blank_sampler, render_sampler(items, scene=dense_scene), items, tmp_path / "swap", seed=1)
    assert swapped["net"]["net_win_rate"] == -1.0


def test_position_biased_judge_is_exposed(tmp_path):
    items = dense_prompts(40, seed=0)
    flips = order_flips(40, seed=0)
    assert flips == order_flips(40, seed=0) and 10 < sum(flips) < 30  # seeded, about half flipped
    result = run_dense(blank_sampler, blank_sampler, items, tmp_path, always_first, seed=0, both_orders=True)
    assert result["net"]["net_win_rate"] == 0.0  # judged in both orders, the bias cancels
    bias = result["position_bias"]
    assert bias["overall"]["first_slot_rate"] == 1.0 and bias["overall"]["ci"][0] > 0.9
    assert bias["both_orders"] == {"pairs": 40, "consistent": 0.0, "same_slot_both_times": 1.0}
    single = run_dense(blank_sampler, blank_sampler, items, tmp_path / "one", always_first, seed=0)
    assert single["net"]["net_win_rate"] == pytest.approx(1 - 2 * sum(flips) / 40)  # order randomisation


def test_net_win_rate_bootstrap():
    outcomes = [1] * 30 + [-1] * 10 + [0] * 10 + [None] * 2
    net = net_win_rate(outcomes, seed=0)
    assert net["net_win_rate"] == pytest.approx(0.4) and net["failed"] == 2 and net["judged"] == 50
    assert net["ci"][0] < 0.4 < net["ci"][1] and net["ci"] == net_win_rate(outcomes, seed=0)["ci"]
    assert np.isnan(net_win_rate([None, None])["net_win_rate"])


def test_win_minus_loss_is_net_when_orders_disagree():
    # pair outcomes 0.5, -1, 0 from verdicts (A wins, tie), (B wins twice), (A wins, B wins)
    net = net_win_rate([[1, 0], [-1, -1], [1, -1]])
    assert net["net_win_rate"] == pytest.approx(-1 / 6) == pytest.approx(np.mean([0.5, -1, 0]))
    assert (net["win"], net["loss"], net["tie"]) == pytest.approx((1 / 3, 1 / 2, 1 / 6))
    assert net["win"] - net["loss"] == pytest.approx(net["net_win_rate"]) and net["verdicts"] == 6
    assert net_win_rate([[1, 0], [-1], [1, -1], []])["net_win_rate"] == pytest.approx(-1 / 6)  # one order each
    single = net_win_rate([1, -1, 0, 0])  # one verdict per pair: plain counts, as the released evaluator
    assert (single["win"], single["loss"], single["tie"], single["net_win_rate"]) == (0.25, 0.25, 0.5, 0.0)
    with pytest.raises(ValueError, match="verdict outcomes"):
        net_win_rate([0.5, -1, 0])  # averaged pair outcomes are not verdicts


def test_both_orders_counts_reconcile_end_to_end(tmp_path):
    items = dense_prompts(12, seed=0)
    calls = iter(range(10**6))

    def fickle(pairs, its):  # first slot, second slot or tie, in turn: orders often disagree
        return [("first", "second", "same")[next(calls) % 3] for _ in pairs]

    net = run_dense(blank_sampler, blank_sampler, items, tmp_path, fickle, both_orders=True)["net"]
    assert net["verdicts"] == 24 and net["win"] + net["loss"] + net["tie"] == pytest.approx(1)
    assert net["win"] - net["loss"] == pytest.approx(net["net_win_rate"])


def test_chat_judge_parsing_and_failures(tmp_path):
    assert parse_pair_verdict('Image 2 has the cat. {"better": "2"}') == "second"
    assert parse_pair_verdict("<think>image 2?</think> Image 1 is better") == "first"
    assert parse_pair_verdict('{"better": "same"}') == "same"
    assert parse_pair_verdict("no idea") is None and parse_pair_verdict(None) is None
    seen = []

    def fake_endpoint(conversations):
        seen.extend(conversations)
        return ['{"better": "1"}', None] * (len(conversations) // 2) + ['{"better": "1"}'] * (len(conversations) % 2)

    items = dense_prompts(6, seed=0)
    result = run_dense(blank_sampler, blank_sampler, items, tmp_path, ChatPairJudge(fake_endpoint, layout="genalign"))
    assert result["net"]["failed"] == 3 and result["net"]["judged"] == 3
    parts = seen[0][0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    assert parts[2]["text"] == PAIR_TEMPLATE.replace("{prompt}", items[0]["prompt"])
    assert isinstance(build_judge("verifier"), VerifierJudge)
    with pytest.raises(ValueError, match="unknown judge"):
        build_judge("gpt")


# SHA-256 of DenseAlignBench's judge prompt as the judge reads it (str.format applied, {prompt} kept),
# checked against roooobotx/prompt_echo@6c8a934bf97682a25e25969a0a8fbe73443b4fe5.
DENSEALIGN_PROMPT_SHA256 = "c288d8a237938bea7024bbd8a8b34ac790aa57125c2959b125e0e29d46b93690"


def test_chat_judge_reference_layout(tmp_path):
    assert hashlib.sha256(PAIRWISE_PROMPT_FOLLOWING.encode()).hexdigest() == DENSEALIGN_PROMPT_SHA256
    answer = {"reasoning": "Image A has the red cube; Image B misses it.", "preference": "image_a"}
    assert parse_preference(json.dumps(answer)) == "first"
    assert parse_preference('```json\n{"reasoning": "...", "preference": "image_b"}\n```') == "second"
    assert parse_preference('{"reasoning": "...", "preference": "tie"}') == "same"
    assert parse_preference('{"reasoning": "both "good"", "preference": "image_b"}') == "second"  # broken JSON
    assert parse_preference('{"preference": "image_c"}') is None  # the evaluator accepts only its three words
    assert parse_preference("Image A is better.") is None and parse_preference(None) is None
    seen = []

    def fake_endpoint(conversations):
        seen.extend(conversations)
        return ['{"reasoning": "", "preference": "image_a"}'] * len(conversations)

    items = dense_prompts(8, seed=0)
    result = run_dense(blank_sampler, blank_sampler, items, tmp_path, ChatPairJudge(fake_endpoint), seed=0)
    flips = order_flips(8, seed=0)
    assert result["net"]["net_win_rate"] == pytest.approx(1 - 2 * sum(flips) / 8)  # "image_a" = the first slot
    parts = seen[0][0]["content"]
    assert [p["type"] for p in parts] == ["text", "text", "image_url", "text", "image_url"]
    assert parts[0]["text"] == PAIRWISE_PROMPT_FOLLOWING.replace("{prompt}", items[0]["prompt"])
    assert (parts[1]["text"], parts[3]["text"]) == ("**Image A:**", "**Image B:**")
    with pytest.raises(ValueError, match="layout must be"):
        ChatPairJudge(fake_endpoint, layout="side_by_side")


def test_judging_resumes(tmp_path):
    items = dense_prompts(20, seed=0)
    calls = []

    def flaky(pairs, its):
        calls.append(len(pairs))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return ["same"] * len(pairs)

    with pytest.raises(KeyboardInterrupt):
        run_dense(blank_sampler, blank_sampler, items, tmp_path, flaky)
    assert len((tmp_path / "judgments.jsonl").read_text().splitlines()) == 16
    result = run_dense(blank_sampler, blank_sampler, items, tmp_path, flaky)
    assert calls == [16, 4, 4] and result["net"]["tie"] == 1.0


def test_caption_files(tmp_path, shared_data):
    bad = tmp_path / "captions.jsonl"
    bad.write_text('{"caption": "a red car"}\n\n{"caption": ""}\n')
    with pytest.raises(ScoreInputError, match=r"captions.jsonl:3: no 'caption'"):
        load_captions(bad)
    bad.write_text('{"caption": "a red car"}\n["a list"]\n')
    with pytest.raises(ScoreInputError, match=r"captions.jsonl:2: expected a JSON object"):
        load_captions(bad)
    path = shared_data / "densealignbench" / "metadata.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    items = load_captions(path)
    assert len(items) == 2000
    words = [len(item["prompt"].split()) for item in items]  # a CLIP BPE token per word at least
    assert min(words) > 77 and np.median(words) >= 150  # all past CLIP's context: its encoders truncate
    assert len(load_captions(path, limit=5)) == 5

"""DenseAlignBench-style benchmark: dense ShapesWorld prompts, caption files, pairwise judging statistics."""

from __future__ import annotations

import numpy as np
import pytest

from eval.dense import (ChatPairJudge, VerifierJudge, build_judge, dense_clauses, dense_prompts, dense_scene,
                        load_captions, net_win_rate, order_flips, parse_pair_verdict, run_dense)
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
    result = run_dense(blank_sampler, blank_sampler, items, tmp_path, ChatPairJudge(fake_endpoint))
    assert result["net"]["failed"] == 3 and result["net"]["judged"] == 3
    parts = seen[0][0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"] and items[0]["prompt"] in parts[2]["text"]
    assert isinstance(build_judge("verifier"), VerifierJudge)
    with pytest.raises(ValueError, match="unknown judge"):
        build_judge("gpt")


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

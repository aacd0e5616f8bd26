"""DenseAlignBench-style benchmark: pairwise judging of model A vs model B on dense captions.

Prompts: ShapesWorld dense scenes (2-4 distinct coloured shapes plus 1-2 spatial relations,
3-6 clauses in all, verifiable exactly) for the toy world; for real models a JSONL file with a
``caption`` (or ``prompt``) per line, such as DenseAlignBench's 2,000 captions. Those run
200-400 words, far past CLIP's 77 tokens (and the ShapesWorld model's 16): CLIP-only text
encoders read a truncated caption, SD3's T5 slot reads up to its max_sequence_length.

Both models sample every prompt with the same seeds (paired), into resumable folders (see
``eval.geneval.sample_folder``). A judge sees the two images of a pair in an order drawn from
a seeded generator per pair (the released evaluator shuffles without a seed) and answers
which one follows the prompt better, "first", "second" or "same" (None = could not judge;
counted, never a tie). Judges are batched callables ``judge(pairs, items) -> verdicts``, with
``pairs`` a list of (first, second) uint8 (H, W, 3) images:

- :class:`VerifierJudge`: ShapesWorld clause accuracy of each image (exact, order-blind).
- :class:`RewardJudge`: any reward of the rewards suite scored per image (a VLM yes/no
  judge, PromptEcho, CLIP...), compared with a margin.
- :class:`ChatPairJudge`: both images in one conversation to a generate function, e.g.
  ``rewards.http.ChatCompletionsClient(...).generate`` (an OpenAI-compatible endpoint) or
  ``rewards.vlm.LocalVLM(...).generate``; by default in the layout, prompt and answer words
  of DenseAlignBench's released evaluator (roooobotx/prompt_echo,
  dense_align_bench/evaluator.py), so its numbers compare with the paper's.

Win, loss and tie are counted per verdict, each pair weighing one: a pair's judged orders
split its unit (judged A-first and B-first with verdicts A and tie: half a win, half a tie),
so win - loss = net win rate always; with one order per pair (the released evaluator) these
are plain verdict counts. Ties count in the denominator; a 95% percentile bootstrap interval
over pairs. Position bias: how often the judge picks the first slot, separately for pairs
shown in order (A first) and flipped (B first); with ``both_orders`` every pair is judged in
both orders and order consistency is reported too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from rewards.parsing import json_objects

from .geneval import (Sampler, finished_rows, numbered_jsonl, plan_samples, sample_folder, shapes_detector,
                      wilson_interval)
from .score import ScoreInputError, load_image
from .shapes import COLORS, IMAGE_SIZE, SHAPES, ObjectSpec, Scene, as_rng, detect, relative_position

Verdict = str | None  # "first" | "second" | "same" | None
JUDGMENTS_FILE = "judgments.jsonl"
MIN_CLAUSES, MAX_CLAUSES = 3, 6


# ----------------------------------------------------------------------------- ShapesWorld dense scenes


def _noun(obj: dict) -> str:
    return f"{obj['color']} {obj['shape']}"


SIDE = 16.0  # object side (px) of dense scenes: four fit on a 64 px canvas with room to move
CLEAR = 0.2  # relations are chosen (and scenes accepted) at this stricter GenEval threshold than 0.1


def _layout(n: int, rng: np.random.Generator, attempts: int = 2000) -> list[tuple[float, float, float, float]]:
    """Boxes of ``n`` objects, pairwise >= 3 px apart along x or y."""
    for _ in range(attempts):
        centres = rng.uniform(SIDE / 2 + 2, IMAGE_SIZE - SIDE / 2 - 2, size=(n, 2)).round()
        boxes = [(x - SIDE / 2, y - SIDE / 2, x + SIDE / 2, y + SIDE / 2) for x, y in centres]
        if all(abs(a[0] - b[0]) >= SIDE + 3 or abs(a[1] - b[1]) >= SIDE + 3
               for k, a in enumerate(boxes) for b in boxes[k + 1:]):
            return boxes
    raise ValueError(f"cannot place {n} objects")


def dense_prompt(rng) -> dict:
    """A random dense ShapesWorld prompt: 2-4 objects (distinct colour-shape pairs) and 1-2
    relations that a random layout satisfies with a clear margin: 3-6 clauses in all."""
    rng = as_rng(rng)
    while True:
        n_objects = int(rng.integers(2, 5))
        n_relations = int(rng.integers(max(1, MIN_CLAUSES - n_objects), min(2, MAX_CLAUSES - n_objects) + 1))
        pairs = [(c, s) for c in COLORS for s in SHAPES]
        chosen = rng.choice(len(pairs), n_objects, replace=False)
        objects = [{"color": pairs[i][0], "shape": pairs[i][1]} for i in chosen]
        boxes = _layout(n_objects, rng)
        candidates = [(i, sorted(relative_position(boxes[i], boxes[j], CLEAR)), j)
                      for i in range(n_objects) for j in range(i + 1, n_objects)]
        candidates = [c for c in candidates if c[1]]
        if len(candidates) >= n_relations:
            break
    relations = []
    for k in rng.choice(len(candidates), n_relations, replace=False):
        i, options, j = candidates[int(k)]
        relations.append([i, options[int(rng.integers(len(options)))], j])
    names = [("an " if _noun(o)[0] in "aeiou" else "a ") + _noun(o) for o in objects]
    text = "a photo of " + ", ".join(names[:-1]) + " and " + names[-1]
    text += "".join(f"; the {_noun(objects[i])} is {rel} the {_noun(objects[j])}" for i, rel, j in relations)
    return {"tag": "dense", "prompt": text, "objects": objects, "relations": relations,
            "n_clauses": n_objects + n_relations}


def dense_prompts(n: int, seed: int = 0) -> list[dict]:
    """``n`` dense prompts (items ``{"prompt", "meta"}``), reproducible from ``seed``."""
    return [{"prompt": meta["prompt"], "meta": meta} for meta in (dense_prompt((seed, i)) for i in range(n))]


def dense_scene(meta: dict, rng, attempts: int = 500) -> Scene:
    """A random scene satisfying every clause of a dense prompt with a clear margin (rejection sampling)."""
    rng = as_rng(rng)
    for _ in range(attempts):
        boxes = _layout(len(meta["objects"]), rng)
        if all(rel in relative_position(boxes[i], boxes[j], CLEAR) for i, rel, j in meta["relations"]):
            return Scene([ObjectSpec(o["shape"], o["color"], (b[0] + b[2]) / 2, (b[1] + b[3]) / 2, SIDE)
                          for o, b in zip(meta["objects"], boxes)], IMAGE_SIZE)
    raise ValueError(f"no scene found for {meta['prompt']!r}")


def dense_clauses(image: np.ndarray, meta: dict, detector=detect) -> list[bool]:
    """Per clause (objects, then relations): is it satisfied in ``image``?

    An object clause holds if some detection has its shape and colour; a relation holds if the
    most confident detections of its two objects are in that relation (GenEval's rule).
    """
    detections = detector(image)
    found = []
    for obj in meta["objects"]:
        found.append(next((d for d in detections if (d.shape, d.color) == (obj["shape"], obj["color"])), None))
    clauses = [d is not None for d in found]
    for i, rel, j in meta["relations"]:
        clauses.append(found[i] is not None and found[j] is not None
                       and rel in relative_position(found[i].bbox, found[j].bbox))
    return clauses


# ----------------------------------------------------------------------------- captions for real models


def load_captions(path: str | Path, limit: int | None = None) -> list[dict]:
    """Items ``{"prompt", "meta"?}`` from a JSONL of captions (``caption`` or ``prompt`` per line).

    Malformed JSON, non-objects and missing or empty captions are errors naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise ScoreInputError(f"{path}: caption file not found")
    items = []
    for number, row in numbered_jsonl(path):
        text = row.get("caption", row.get("prompt"))
        if not isinstance(text, str) or not text.strip():
            raise ScoreInputError(f"{path}:{number}: no 'caption' (or 'prompt') string")
        items.append({"prompt": text.strip(), **({"meta": row["meta"]} if isinstance(row.get("meta"), dict) else {})})
    if not items:
        raise ScoreInputError(f"{path}: no captions")
    return items[:limit]


# ----------------------------------------------------------------------------- judges


class VerifierJudge:
    """ShapesWorld judge: the image with the higher clause accuracy wins (exact, order-blind)."""

    def __init__(self, detector=shapes_detector, margin: float = 0.0):
        self.detector, self.margin = detector, margin

    def score(self, image: np.ndarray, meta: dict) -> float:
        """Share of the prompt's clauses satisfied in ``image``."""
        return float(np.mean(dense_clauses(image, meta, self.detector)))

    def __call__(self, pairs, items) -> list[Verdict]:
        out = []
        for (first, second), item in zip(pairs, items):
            if item.get("meta") is None or "objects" not in item["meta"]:
                out.append(None)
                continue
            out.append(compare(self.score(first, item["meta"]), self.score(second, item["meta"]), self.margin))
        return out


def compare(first: float, second: float, margin: float = 0.0) -> Verdict:
    if not (np.isfinite(first) and np.isfinite(second)):
        return None
    return "first" if first > second + margin else "second" if second > first + margin else "same"


class RewardJudge:
    """Any reward (``rewards.build_reward`` spec or object) scored per image; higher wins by > margin."""

    def __init__(self, reward, margin: float = 0.0):
        if isinstance(reward, (str, dict)):
            from rewards import build_reward
            reward = build_reward(reward)
        self.reward, self.margin = reward, margin

    def __call__(self, pairs, items) -> list[Verdict]:
        import torch

        images = np.stack([im for pair in pairs for im in pair])  # [2n, H, W, 3]: first, second, ...
        samples = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        prompts = [item["prompt"] for item in items for _ in range(2)]
        metas = [item.get("meta") for item in items for _ in range(2)]
        kwargs = {"metadata": metas} if any(m is not None for m in metas) else {}
        scores = self.reward(samples, prompts, **kwargs).scores.float().tolist()
        return [compare(scores[2 * k], scores[2 * k + 1], self.margin) for k in range(len(pairs))]


PAIR_TEMPLATE = (
    "Two images were generated from the same description. Judge prompt following only (not beauty): "
    "which image depicts the description more faithfully?\nDescription: {prompt}\n"
    'The first image is Image 1, the second Image 2. Answer with JSON: {"better": "1", "2" or "same"}.'
)


def parse_pair_verdict(text: str | None) -> Verdict:
    """genalign layout: "1"/"2"/"same" (JSON "better" key, else the last such word) -> first/second/same; else None."""
    if not isinstance(text, str):
        return None
    text = text.rsplit("</think>", 1)[-1]
    found = re.findall(r'"better"\s*:\s*"?\s*(1|2|same|tie)', text, flags=re.IGNORECASE) \
        or re.findall(r"\b(image\s*1|image\s*2|same|tie)\b", text, flags=re.IGNORECASE)
    if not found:
        return None
    word = found[-1].lower().replace(" ", "")
    return {"1": "first", "image1": "first", "2": "second", "image2": "second"}.get(word, "same")


_PREFERENCE = {"image_a": "first", "image_b": "second", "tie": "same"}


def parse_preference(text: str | None) -> Verdict:
    """Reference layout: the JSON ``"preference"`` ("image_a" / "image_b" / "tie", as the released
    evaluator requires) -> first / second / same; anything else -> None (not judged).

    The last JSON object with that key decides; a ``"preference": "..."`` pair still counts when
    the JSON around it does not parse (a stray quote in the reasoning). No bare-word fallback: the
    reasoning names both images.
    """
    if not isinstance(text, str):
        return None
    text = text.rsplit("</think>", 1)[-1]
    for obj in reversed(json_objects(text)):
        if "preference" in obj:
            return _PREFERENCE.get(str(obj["preference"]).strip().lower())
    found = re.findall(r'"preference"\s*:\s*"\s*(image_a|image_b|tie)\s*"', text, flags=re.IGNORECASE)
    return _PREFERENCE[found[-1].lower()] if found else None


class ChatPairJudge:
    """Both images in one chat turn to ``generate_fn(conversations) -> [str | None]``.

    layout:   "reference" (default): DenseAlignBench's released evaluator (roooobotx/prompt_echo,
              dense_align_bench/evaluator.py; text in rewards/prompts/densealignbench.py): its
              instructions, then "**Image A:**", the first image, "**Image B:**", the second;
              answer JSON ``"preference"``: "image_a" / "image_b" / "tie" (:func:`parse_preference`).
              "genalign": both images first, then :data:`PAIR_TEMPLATE`; answer "1" / "2" / "same"
              (:func:`parse_pair_verdict`).
    template: replaces the layout's text (``{prompt}`` is replaced; other braces are literal).

    The released evaluator also sends JPEG (quality 95) at temperature 0.3; set those on the
    backend (images here go as PNG data URLs).
    """

    def __init__(self, generate_fn: Callable, layout: str = "reference", template: str | None = None):
        from rewards.prompts.densealignbench import PAIRWISE_PROMPT_FOLLOWING

        if layout not in ("reference", "genalign"):
            raise ValueError(f"ChatPairJudge: layout must be 'reference' or 'genalign', got {layout!r}")
        self.generate_fn, self.layout = generate_fn, layout
        self.template = template or (PAIRWISE_PROMPT_FOLLOWING if layout == "reference" else PAIR_TEMPLATE)
        self.parse = parse_preference if layout == "reference" else parse_pair_verdict

    def conversation(self, first: np.ndarray, second: np.ndarray, prompt: str) -> list[dict]:
        """One user turn with the two images (uint8 (H, W, 3)) in this layout."""
        from rewards.http import image_part
        from rewards.prompts.densealignbench import IMAGE_LABELS

        text = {"type": "text", "text": self.template.replace("{prompt}", prompt)}
        if self.layout == "genalign":
            return [{"role": "user", "content": [image_part(first), image_part(second), text]}]
        label_a, label_b = ({"type": "text", "text": label} for label in IMAGE_LABELS)
        return [{"role": "user", "content": [text, label_a, image_part(first), label_b, image_part(second)]}]

    def __call__(self, pairs, items) -> list[Verdict]:
        conversations = [self.conversation(a, b, item["prompt"]) for (a, b), item in zip(pairs, items)]
        return [self.parse(answer) for answer in self.generate_fn(conversations)]


def build_judge(spec: str | Callable):
    """"verifier"; "reward:NAME" (a registered reward); "http:BASE_URL@MODEL" (OpenAI-compatible endpoint)."""
    if callable(spec):
        return spec
    if spec == "verifier":
        return VerifierJudge()
    if spec.startswith("reward:"):
        return RewardJudge(spec.removeprefix("reward:"))
    if spec.startswith("http:"):
        from rewards.http import ChatCompletionsClient

        url, _, model = spec.removeprefix("http:").rpartition("@")
        if not url:
            raise ValueError(f"judge {spec!r}: expected http:BASE_URL@MODEL")
        return ChatPairJudge(ChatCompletionsClient(url, model).generate)
    raise ValueError(f"unknown judge {spec!r}: use verifier, reward:NAME or http:BASE_URL@MODEL")


# ----------------------------------------------------------------------------- judging and statistics


def order_flips(n: int, seed: int) -> list[bool]:
    """Per pair: show B first? One seeded generator per pair, so resuming or subsetting changes nothing."""
    return [bool(np.random.default_rng((seed, 7, i)).integers(2)) for i in range(n)]


def _outcome(verdict: Verdict, flipped: bool) -> int | None:
    """+1 A wins, -1 B wins, 0 tie, None not judged."""
    if verdict is None:
        return None
    if verdict == "same":
        return 0
    return (1 if verdict == "first" else -1) * (-1 if flipped else 1)


def judge_pairs(judge, rows_a: list[dict], rows_b: list[dict], folder_a: Path, folder_b: Path, items: list[dict],
                out: Path, seed: int = 0, both_orders: bool = False, batch_size: int = 16,
                progress: Callable[[int], None] | None = None) -> list[dict]:
    """Judges pair i = (A's image i, B's image i); resumable through ``out`` (judgments.jsonl)."""
    done = {r["pair"]: r for r in finished_rows(out)}
    flips = order_flips(len(rows_a), seed)
    todo = [i for i in range(len(rows_a)) if i not in done]
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        pairs, its, shown = [], [], []
        for i in batch:
            a, b = load_image(folder_a / rows_a[i]["file"], None), load_image(folder_b / rows_b[i]["file"], None)
            orders = [flips[i], not flips[i]] if both_orders else [flips[i]]
            for flipped in orders:
                pairs.append((b, a) if flipped else (a, b))
                its.append(items[rows_a[i]["prompt_index"]])
                shown.append((i, flipped))
        verdicts = judge(pairs, its)
        records = {}
        for (i, flipped), verdict in zip(shown, verdicts):
            record = records.setdefault(i, {"pair": i, "file": rows_a[i]["file"],
                                            "prompt_index": rows_a[i]["prompt_index"], "verdicts": []})
            record["verdicts"].append({"flipped": flipped, "verdict": verdict, "outcome": _outcome(verdict, flipped)})
        with open(out, "a") as handle:
            handle.write("".join(json.dumps(records[i]) + "\n" for i in batch))
        done.update(records)
        if progress:
            progress(len(batch))
    return [done[i] for i in range(len(rows_a))]


def pair_outcomes(record: dict) -> list[int]:
    """Outcomes (+1 A wins, -1 B wins, 0 tie) of the orders a pair was judged in ([] if none)."""
    return [v["outcome"] for v in record["verdicts"] if v["outcome"] is not None]


def net_win_rate(outcomes: Sequence[int | Sequence[int] | None], n_boot: int = 2000, seed: int = 0) -> dict:
    """win%, loss%, tie% and net win rate = win% - loss% of A over B, with a 95% percentile
    bootstrap interval of the net over judged pairs.

    outcomes: per pair, the verdict outcomes of its judged orders (a list of +1 / -1 / 0), one
    outcome, or None / [] (not judged: counted as failed). Each judged pair weighs one, split
    evenly over its verdicts: win = mean over pairs of the share of its verdicts A wins (loss,
    tie likewise), so win + loss + tie = 1 and win - loss = net = the mean of the pairs' mean
    outcomes. Pairs [+1, 0], [-1, -1] and [+1, -1]: win 1/3, loss 1/2, tie 1/6, net -1/6.
    """
    per_pair = [[] if o is None else [o] if np.isscalar(o) else list(o) for o in outcomes]
    for verdicts in per_pair:
        if any(v not in (-1, 0, 1) for v in verdicts):
            raise ValueError(f"net_win_rate: verdict outcomes are +1, -1 or 0, got {verdicts}")
    judged = [np.array(v, dtype=float) for v in per_pair if v]
    result = {"pairs": len(per_pair), "judged": len(judged), "failed": len(per_pair) - len(judged),
              "verdicts": int(sum(v.size for v in judged))}
    if not judged:
        return {**result, "win": float("nan"), "loss": float("nan"), "tie": float("nan"), "net_win_rate": float("nan"),
                "ci": (float("nan"), float("nan"))}
    shares = np.array([[(v > 0).mean(), (v < 0).mean(), (v == 0).mean()] for v in judged])  # [pairs, 3]
    net = shares[:, 0] - shares[:, 1]  # [pairs]: each pair's mean outcome
    boot = net[np.random.default_rng(seed).integers(0, net.size, (n_boot, net.size))].mean(1)
    win, loss, tie = (float(x) for x in shares.mean(0))
    return {**result, "win": win, "loss": loss, "tie": tie, "net_win_rate": float(net.mean()),
            "ci": tuple(float(x) for x in np.percentile(boot, [2.5, 97.5]))}


def position_bias(records: list[dict]) -> dict:
    """How often the judge picks the first slot (decisive verdicts), overall and per shown order."""
    verdicts = [v for r in records for v in r["verdicts"] if v["verdict"] in ("first", "second")]

    def rate(vs):
        firsts = sum(v["verdict"] == "first" for v in vs)
        return {"first_slot_rate": firsts / len(vs) if vs else float("nan"), "n": len(vs),
                "ci": wilson_interval(firsts, len(vs))}

    out = {"overall": rate(verdicts), "a_first": rate([v for v in verdicts if not v["flipped"]]),
           "b_first": rate([v for v in verdicts if v["flipped"]])}
    twice = [r for r in records if len(r["verdicts"]) == 2 and all(v["verdict"] for v in r["verdicts"])]
    if twice:
        out["both_orders"] = {
            "pairs": len(twice),
            "consistent": float(np.mean([r["verdicts"][0]["outcome"] == r["verdicts"][1]["outcome"] for r in twice])),
            "same_slot_both_times": float(np.mean([r["verdicts"][0]["verdict"] == r["verdicts"][1]["verdict"] != "same"
                                                   for r in twice])),
        }
    return out


def clause_accuracy(folder: Path, rows: list[dict], items: list[dict]) -> dict | None:
    """Mean clause accuracy and all-clauses-correct rate of one model (ShapesWorld prompts only)."""
    judge = VerifierJudge()
    scored = [(judge.score(load_image(folder / r["file"], None), items[r["prompt_index"]]["meta"]),
               items[r["prompt_index"]]["meta"]["n_clauses"]) for r in rows
              if "objects" in (items[r["prompt_index"]].get("meta") or {})]
    if not scored:
        return None
    by_n = {}
    for score, n in scored:
        by_n.setdefault(n, []).append(score)
    return {"clause_accuracy": float(np.mean([s for s, _ in scored])),
            "all_correct": float(np.mean([s == 1 for s, _ in scored])),
            "by_clauses": {n: float(np.mean(v)) for n, v in sorted(by_n.items())}, "n": len(scored)}


def run_dense(sampler_a: Sampler, sampler_b: Sampler, items: list[dict], out: str | Path, judge="verifier", *,
              seed: int = 0, images_per_prompt: int = 1, both_orders: bool = False, batch_size: int = 32,
              folders: tuple[str, str] = ("model_a/dense", "model_b/dense"), progress=None) -> dict:
    """Samples both models (paired seeds), judges every pair, returns net win rate + position bias."""
    out = Path(out)
    plan = plan_samples(items, images_per_prompt, seed)
    folder_a, folder_b = out / folders[0], out / folders[1]
    rows_a = sample_folder(sampler_a, plan, folder_a, batch_size, progress)
    rows_b = sample_folder(sampler_b, plan, folder_b, batch_size, progress)
    records = judge_pairs(build_judge(judge), rows_a, rows_b, folder_a, folder_b, list(items), out / JUDGMENTS_FILE,
                          seed, both_orders, progress=progress)
    result = {"net": net_win_rate([pair_outcomes(r) for r in records], seed=seed),
              "position_bias": position_bias(records),
              "judge": judge if isinstance(judge, str) else type(judge).__name__, "seed": seed,
              "prompts": len(items), "images_per_prompt": images_per_prompt, "both_orders": both_orders,
              "words_per_prompt_median": float(np.median([len(i["prompt"].split()) for i in items])),
              "clauses": {"A": clause_accuracy(folder_a, rows_a, list(items)),
                          "B": clause_accuracy(folder_b, rows_b, list(items))}}
    (out / "dense_summary.json").write_text(json.dumps(result, indent=1))
    return result

"""GenEval-style benchmark: per-category strict accuracy and partial credit, with intervals.

One evaluator serves ShapesWorld prompts and real GenEval metadata files (the 553-prompt
``evaluation_metadata.jsonl``: ``tag``, ``include`` [{class, count, color?, position?}],
``exclude``?, ``prompt``). Images come from any ``sampler(prompts, seeds) -> [N, 3, H, W]`` in
[0, 1] (:func:`model_sampler` wraps a flow-model adapter); each prompt gets
``images_per_prompt`` images with fixed seeds, so two checkpoints see the same noise.
Detection is pluggable: the ShapesWorld detector by default, any callable
``image (H, W, 3) uint8 -> [eval.shapes.Detection]`` (e.g. a COCO detector wrapped to emit
class names and colours) for real images, given as an object or "pkg.module:attr".

Sampling is resumable: PNGs and their ``samples.jsonl`` line are written batch by batch, and
a rerun keeps every finished image (a line cut off by an interruption is dropped). Scores are
recomputed from the PNGs (milliseconds per image).

Intervals: per category a 95% Wilson interval on strict accuracy; overall (mean of
categories, GenEval's score) a 95% percentile bootstrap that resamples prompts within each
category (images of one prompt are correlated, so prompts, not images, are the units).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .score import SAMPLES_FILE, ScoreInputError, load_image, read_jsonl
from .shapes import IMAGE_SIZE, TAGS, aggregate, detect, evaluate

Sampler = Callable[[list[str], list[int]], "object"]  # (prompts, seeds) -> float [N, 3, H, W] in [0, 1]
Detector = Callable[[np.ndarray], list]
RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"


# ----------------------------------------------------------------------------- inputs


def check_metadata(row: dict, where: str) -> dict:
    """A GenEval metadata line, validated; errors name ``where`` (file:line)."""
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise ScoreInputError(f"{where}: no 'prompt' string")
    if not isinstance(row.get("tag"), str):
        raise ScoreInputError(f"{where}: no 'tag' (one of {', '.join(TAGS)})")
    include = row.get("include")
    if not isinstance(include, list) or not include:
        raise ScoreInputError(f"{where}: 'include' must be a non-empty list of {{class, count}} objects")
    for clause in include + list(row.get("exclude", [])):
        if not isinstance(clause, dict) or not isinstance(clause.get("class"), str) \
                or not isinstance(clause.get("count"), int) or clause["count"] < 1:
            raise ScoreInputError(f"{where}: every clause needs a 'class' string and a 'count' >= 1, got {clause!r}")
    return row


def numbered_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) per non-blank line (``read_jsonl`` checks each line)."""
    rows = read_jsonl(path)
    numbers = [n for n, line in enumerate(Path(path).read_text().splitlines(), start=1) if line.strip()]
    return list(zip(numbers, rows))


def load_metadata(path: str | Path) -> list[dict]:
    """GenEval metadata JSONL -> items ``{"prompt", "meta"}``; malformed lines are errors with line numbers."""
    path = Path(path)
    if not path.is_file():
        raise ScoreInputError(f"{path}: metadata file not found")
    items = [{"prompt": row["prompt"], "meta": check_metadata(row, f"{path}:{n}")}
             for n, row in numbered_jsonl(path)]
    if not items:
        raise ScoreInputError(f"{path}: no prompts")
    return items


def load_detector(spec: str | Detector | None) -> Detector:
    """None / "shapes": the ShapesWorld detector (images resized to 64 px); a callable; or "pkg.module:attr"."""
    if spec is None or spec == "shapes":
        return shapes_detector
    if callable(spec):
        return spec
    module, _, attr = str(spec).partition(":")
    if not attr:
        raise ValueError(f"detector must be 'shapes' or 'pkg.module:attr', got {spec!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"detector {spec!r} cannot be imported ({err})") from None


def shapes_detector(image: np.ndarray) -> list:
    """``eval.shapes.detect`` on the image resized to 64x64 (its area thresholds are in 64 px units)."""
    if image.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        image = np.asarray(Image.fromarray(image).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR))
    return detect(image)


def model_sampler(model, *, num_steps: int | None = None, guidance: float | None = None, shift: float | None = None,
                  batch_size: int = 64, resolution: int | None = None) -> Sampler:
    """``sampler(prompts, seeds)`` from a flow-model adapter: the deterministic ODE sampler."""
    from samplers.generate import generate

    def sample(prompts: list[str], seeds: list[int]):
        return generate(model, prompts, seeds, num_steps=num_steps, guidance=guidance, shift=shift,
                        batch_size=batch_size, resolution=resolution)

    return sample


# ----------------------------------------------------------------------------- resumable sampling


def plan_samples(items: Sequence[dict], images_per_prompt: int = 1, seed: int = 0) -> list[dict]:
    """One row per image: file, prompt, prompt_index and seed (seed + image index), plus meta."""
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    plan = []
    for p, item in enumerate(items):
        for k in range(images_per_prompt):
            i = len(plan)
            plan.append({"file": f"{i:05d}.png", "prompt": item["prompt"], "prompt_index": p, "seed": seed + i,
                         **({"meta": item["meta"]} if item.get("meta") is not None else {})})
    return plan


def finished_rows(listing: Path) -> list[dict]:
    """Complete lines of a samples.jsonl being appended to (a last line without newline is dropped)."""
    if not listing.is_file():
        return []
    text = listing.read_text()
    complete = text[: text.rfind("\n") + 1]
    if len(complete) != len(text):  # cut off mid-write: rewrite without the partial line
        listing.write_text(complete)
    return read_jsonl(listing) if complete else []


def sample_folder(sampler: Sampler, plan: list[dict], folder: str | Path, batch_size: int = 32,
                  progress: Callable[[int], None] | None = None) -> list[dict]:
    """Generates every planned image into ``folder`` (PNGs + samples.jsonl), skipping finished ones.

    A folder holding other samples (different prompt or seed at some file) is an error.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    listing = folder / SAMPLES_FILE
    done, by_file = {}, {p["file"]: p for p in plan}
    for n, row in enumerate(finished_rows(listing), start=1):
        planned = by_file.get(row.get("file"))
        if planned is None or (planned["prompt"], planned["seed"]) != (row.get("prompt"), row.get("seed")):
            raise ScoreInputError(f"{listing}:{n}: holds samples of another evaluation (prompt/seed differ); "
                                  "use a fresh output folder")
        if (folder / row["file"]).is_file():
            done[row["file"]] = row
    todo = [p for p in plan if p["file"] not in done]
    if progress and done:
        progress(len(done))
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        images = sampler([p["prompt"] for p in batch], [p["seed"] for p in batch])
        arrays = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for row, array in zip(batch, arrays):
            Image.fromarray(array).save(folder / row["file"])
        with open(listing, "a") as handle:  # only after the PNGs exist
            handle.write("".join(json.dumps(row) + "\n" for row in batch))
            handle.flush()
            os.fsync(handle.fileno())
        done.update({row["file"]: row for row in batch})
        if progress:
            progress(len(batch))
    return [done[p["file"]] for p in plan]


# ----------------------------------------------------------------------------- scoring


def score_samples(folder: str | Path, rows: list[dict], detector: Detector | None = None) -> list[dict]:
    """Verifier result per image: file, prompt, prompt_index, tag, strict, partial, reason."""
    folder, detector = Path(folder), load_detector(detector)
    results = []
    for row in rows:
        meta = row.get("meta")
        if meta is None:
            raise ScoreInputError(f"{folder / row['file']}: no GenEval metadata for prompt {row['prompt']!r}")
        result = evaluate(load_image(folder / row["file"], size=None), meta, detector)
        results.append({"file": row["file"], "prompt": row["prompt"], "prompt_index": row.get("prompt_index"),
                        "tag": meta["tag"], "strict": bool(result["strict"]), "partial": float(result["partial"]),
                        "reason": result["reason"]})
    return results


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sensible at 0 and 1, unlike p +- 2 SE)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))


def bootstrap_overall(results: list[dict], n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean-of-categories strict accuracy, resampling prompts per category."""
    by_tag: dict[str, dict] = {}
    for r in results:
        by_tag.setdefault(r["tag"], {}).setdefault(r.get("prompt_index", r["prompt"]), []).append(float(r["strict"]))
    if not by_tag:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    overall = np.zeros(n_boot)
    for clusters in by_tag.values():
        sums = np.array([sum(v) for v in clusters.values()])
        counts = np.array([len(v) for v in clusters.values()])
        pick = rng.integers(0, len(sums), size=(n_boot, len(sums)))
        overall += sums[pick].sum(1) / counts[pick].sum(1)
    overall /= len(by_tag)
    low, high = np.percentile(overall, [2.5, 97.5])
    return (float(low), float(high))


def summarize(results: list[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """``eval.shapes.aggregate`` plus intervals: per_tag[tag]["ci"] (Wilson) and "overall_ci" (bootstrap)."""
    summary = aggregate(results, [{"tag": r["tag"]} for r in results])
    for tag, v in summary["per_tag"].items():
        v["ci"] = wilson_interval(v["strict"] * v["n"], v["n"])
        v["se"] = float(np.sqrt(v["strict"] * (1 - v["strict"]) / v["n"]))
    summary["overall_ci"] = bootstrap_overall(results, n_boot, seed)
    summary["num_prompts"] = len({r.get("prompt_index", r["prompt"]) for r in results})
    return summary


def run_geneval(sampler: Sampler, items: Sequence[dict], out: str | Path, *, images_per_prompt: int = 1,
                seed: int = 0, detector: Detector | str | None = None, batch_size: int = 32,
                progress: Callable[[int], None] | None = None) -> dict:
    """Samples (resumably) into ``out``, scores, writes results.jsonl and summary.json; returns the summary."""
    out = Path(out)
    missing = [i for i, item in enumerate(items) if item.get("meta") is None]
    if missing:
        raise ScoreInputError(f"prompt {missing[0] + 1} ({items[missing[0]]['prompt']!r}) has no GenEval metadata")
    rows = sample_folder(sampler, plan_samples(items, images_per_prompt, seed), out, batch_size, progress)
    results = score_samples(out, rows, detector)
    summary = summarize(results, seed=seed)
    (out / RESULTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in results))
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    return summary

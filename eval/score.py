"""Score a folder of generated images against their prompts with the ShapesWorld verifier.

The folder is what `align sample --out DIR` writes: PNGs plus `samples.jsonl`, one line per
file with `file`, `prompt`, `seed` and (for ShapesWorld / GenEval prompts) `meta`. A separate
metadata file in the same JSONL form may be given instead. Prompts without `meta` are looked
up among ShapesWorld's prompts by text.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from rewards.shapes import lookup_shapes_metadata

from .shapes import IMAGE_SIZE, aggregate, detect, evaluate

SAMPLES_FILE = "samples.jsonl"


class ScoreInputError(ValueError):
    """Bad input to scoring: the message names the file (and line) at fault."""


def read_jsonl(path: Path) -> list[dict]:
    """Reads a JSONL file; a malformed line is an error naming the file and line number."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ScoreInputError(f"{path}:{number}: malformed JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ScoreInputError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _meta_for(row: dict, where: str) -> dict:
    if isinstance(row.get("meta"), dict):
        return row["meta"]
    if "include" in row and "tag" in row:  # a GenEval metadata line itself
        return row
    prompt = row.get("prompt")
    meta = lookup_shapes_metadata(prompt) if isinstance(prompt, str) else None
    if meta is not None:
        return meta
    raise ScoreInputError(f"{where}: no GenEval-style metadata for prompt {prompt!r} "
                          "(not a ShapesWorld prompt; add a 'meta' field)")


def load_image(path: Path, size: int | None = IMAGE_SIZE) -> np.ndarray:
    """Loads an RGB image as uint8 HWC; unreadable files and wrong sizes are errors naming the file."""
    if not path.is_file():
        raise ScoreInputError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise ScoreInputError(f"{path}: not a readable image ({err.__class__.__name__})") from None
    if size is not None and array.shape[:2] != (size, size):
        raise ScoreInputError(f"{path}: image is {array.shape[1]}x{array.shape[0]}, the ShapesWorld verifier "
                              f"needs {size}x{size}")
    return array


def score_folder(folder: str | Path, metadata: str | Path | None = None) -> tuple[list[dict], dict]:
    """Scores every image listed for `folder`. Returns (per-image rows, aggregate summary)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ScoreInputError(f"{folder}: not a folder")
    listing = Path(metadata) if metadata else folder / SAMPLES_FILE
    if not listing.is_file():
        raise ScoreInputError(f"{listing}: not found (score a folder written by `align sample --out DIR`, "
                              "or pass --metadata FILE)")
    rows = read_jsonl(listing)
    if not rows:
        raise ScoreInputError(f"{listing}: lists no images")
    results, metas = [], []
    for number, row in enumerate(rows, start=1):
        where = f"{listing}:{number}"
        if "file" not in row:
            raise ScoreInputError(f"{where}: missing 'file'")
        meta = _meta_for(row, where)
        image = load_image(folder / row["file"])
        detections = detect(image)
        result = evaluate(detections, meta)
        results.append({"file": row["file"], "prompt": meta.get("prompt", row.get("prompt")), "tag": meta["tag"],
                        "strict": bool(result["strict"]), "partial": float(result["partial"]),
                        "color_present": color_presence(detections, meta), "reason": result["reason"]})
        metas.append(meta)
    summary = aggregate(results, metas)
    colored = [r["color_present"] for r in results if r["color_present"] is not None]
    summary["color_correct"] = float(np.mean(colored)) if colored else None
    return results, summary


def color_presence(detections, meta: dict) -> float | None:
    """Fraction of the prompt's colour words that some detected object has (shape ignored).

    A colour-only diagnostic: separates "the model draws the right colours" from "the right
    shapes". None when the prompt names no colour.
    """
    wanted = [clause["color"] for clause in meta.get("include", []) if "color" in clause]
    if not wanted:
        return None
    present = {d.color for d in detections}
    return float(np.mean([c in present for c in wanted]))


def write_results(rows: list[dict], path: str | Path) -> Path:
    """Per-image results as CSV (by default) or JSONL (a .jsonl path), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        if path.suffix == ".jsonl":
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        else:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    tmp.replace(path)
    return path


def _strict_cell(p: float, n: int) -> str:
    """Accuracy with its binomial standard error."""
    return f"{p:.3f} ± {np.sqrt(p * (1 - p) / max(n, 1)):.3f}"


def summary_table(summary: dict) -> list[tuple[str, str, str, str]]:
    """Rows (category, n, strict ± standard error, partial) for printing, overall last."""
    rows = [(tag, str(v["n"]), _strict_cell(v["strict"], v["n"]), f"{v['partial']:.3f}")
            for tag, v in summary["per_tag"].items()]
    rows.append(("overall (mean of categories)", str(summary["n"]), f"{summary['overall']:.3f}",
                 f"{summary['overall_partial']:.3f}"))
    if summary.get("color_correct") is not None:
        rows.append(("colour correct (colour words drawn)", "", f"{summary['color_correct']:.3f}", ""))
    return rows

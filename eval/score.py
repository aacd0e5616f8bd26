"""Score a folder of generated images (and videos) against their prompts.

Two modes:

- :func:`score_folder`: the ShapesWorld verifier (GenEval semantics), strict about its input.
  The folder is what `align sample --out DIR` writes: PNGs plus `samples.jsonl`, one line per
  file with `file`, `prompt`, `seed` and (for ShapesWorld / GenEval prompts) `meta`. A
  separate metadata file in the same JSONL form may be given instead. Prompts without `meta`
  are looked up among ShapesWorld's prompts by text.
- :func:`score_media`: any reward (``rewards.build_reward``) over images and videos listed by
  :func:`list_media`. Files that cannot be read or scored get a per-file error and the rest
  are still scored.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from rewards.base import Reward
from rewards.shapes import lookup_shapes_metadata

from .shapes import IMAGE_SIZE, aggregate, detect, evaluate

SAMPLES_FILE = "samples.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".avi", ".mkv")


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


def _require_folder(folder: str | Path) -> Path:
    """`folder` as a Path; ScoreInputError saying what to do if it is missing or a file."""
    folder = Path(folder)
    if not folder.exists():
        raise ScoreInputError(f"{folder}: folder does not exist (write one with `align sample --out DIR`)")
    if not folder.is_dir():
        raise ScoreInputError(f"{folder}: is a file, not a folder; `align score` scores a folder of samples: "
                              f"write one with `align sample --out DIR` (a folder, not a .png grid)")
    return folder


def score_folder(folder: str | Path, metadata: str | Path | None = None) -> tuple[list[dict], dict]:
    """Scores every image listed for `folder`. Returns (per-image rows, aggregate summary)."""
    folder = _require_folder(folder)
    listing = Path(metadata) if metadata else folder / SAMPLES_FILE
    if not listing.is_file():
        raise ScoreInputError(f"{listing}: not found (score a folder written by `align sample --out DIR`, "
                              "or pass --metadata FILE)")
    rows = read_jsonl(listing)
    if not rows:
        raise ScoreInputError(f"{listing}: lists no images")
    from samplers.progress import track

    results, metas = [], []
    for number, row in enumerate(track(rows, "scoring with the ShapesWorld verifier", unit="images"), start=1):
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
    """Per-file results as CSV (by default) or JSONL (a .jsonl path), written atomically.

    CSV columns are the union of the rows' keys in first-seen order; missing cells and None are empty.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        if path.suffix == ".jsonl":
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        else:
            writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
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


# ----------------------------------------------------------------------------- any reward


def list_media(folder: str | Path, metadata: str | Path | None = None) -> list[dict]:
    """What to score in ``folder``: ``[{"file", "prompt", "meta"}, ...]``.

    From the listing (``metadata``, else ``folder/samples.jsonl`` if present; lines as for
    :func:`score_folder`, ``meta`` optional), else every image / video file in the folder by
    suffix (sorted by name), without prompts.
    """
    folder = _require_folder(folder)
    listing = Path(metadata) if metadata else folder / SAMPLES_FILE
    if metadata and not listing.is_file():
        raise ScoreInputError(f"{listing}: not found")
    if not listing.is_file():
        items = [{"file": p.name, "prompt": None, "meta": None} for p in sorted(folder.iterdir())
                 if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES]
        if not items:
            raise ScoreInputError(f"{folder}: no image ({', '.join(IMAGE_SUFFIXES)}) or video "
                                  f"({', '.join(VIDEO_SUFFIXES)}) files")
        return items
    items = []
    for number, row in enumerate(read_jsonl(listing), start=1):
        if not isinstance(row.get("file"), str):
            raise ScoreInputError(f"{listing}:{number}: missing 'file'")
        meta = row["meta"] if isinstance(row.get("meta"), dict) else (row if "include" in row and "tag" in row else None)
        prompt = row.get("prompt", (meta or {}).get("prompt"))
        items.append({"file": row["file"], "prompt": prompt if isinstance(prompt, str) else None, "meta": meta})
    if not items:
        raise ScoreInputError(f"{listing}: lists no files")
    return items


def _frame_indices(total: int, num_frames: int) -> list[int]:
    """Up to ``num_frames`` evenly spaced frame indices out of ``total`` (first and last included)."""
    return sorted(set(np.linspace(0, total - 1, min(total, num_frames)).round().astype(int).tolist()))


def _read_decord(path: Path, num_frames: int) -> np.ndarray:
    from decord import VideoReader, cpu

    reader = VideoReader(str(path), ctx=cpu(0), num_threads=1)
    return reader.get_batch(_frame_indices(len(reader), num_frames)).asnumpy() if len(reader) else np.empty(0)


def _read_pyav(path: Path, num_frames: int) -> np.ndarray:
    import av

    with av.open(str(path)) as container:  # decodes every frame: fine for generated clips
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return np.stack([frames[i] for i in _frame_indices(len(frames), num_frames)]) if frames else np.empty(0)


def load_video(path: Path, num_frames: int = 16) -> np.ndarray:
    """Up to ``num_frames`` evenly spaced frames as uint8 (T, H, W, 3); decord, else PyAV."""
    if not path.is_file():
        raise ScoreInputError(f"{path}: video file not found")
    failures = []
    for name, reader in (("decord", _read_decord), ("PyAV", _read_pyav)):
        try:
            frames = reader(path, num_frames)
        except Exception as err:  # decord and PyAV raise their own error types (or are not installed)
            failures.append(f"{name}: {type(err).__name__}")
            continue
        if len(frames):
            return frames
        failures.append(f"{name}: no frames")
    raise ScoreInputError(f"{path}: not a readable video ({'; '.join(failures)})")


def load_sample(path: Path, num_frames: int = 16) -> torch.Tensor:
    """A file as a reward input in [0, 1]: an image [3, H, W] or a video [3, T, H, W]."""
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return torch.from_numpy(load_video(path, num_frames)).permute(3, 0, 1, 2).float() / 255
    return torch.from_numpy(load_image(path, size=None).copy()).permute(2, 0, 1).float() / 255


def _per_sample_columns(extras: dict, batch: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """The [B] tensors in a reward's extras (nested dicts flattened with '/'), as output columns."""
    columns = {}
    for key, value in extras.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            columns.update(_per_sample_columns(value, batch, name.removesuffix("/extras") + "/"))
        elif isinstance(value, torch.Tensor) and tuple(value.shape) == (batch,):
            columns[name] = value.detach().float().cpu()
    return columns


def _number(value: float) -> float | None:
    return value if np.isfinite(value) else None  # NaN -> None: empty in CSV, null in JSONL


def score_media(folder: str | Path, items: list[dict], reward: Reward, *, batch_size: int = 16,
                num_frames: int = 16, on_error: Callable[[str], None] | None = None,
                on_progress: Callable[[int], None] | None = None) -> list[dict]:
    """Scores every item of :func:`list_media` with ``reward``; one row per item, in order.

    Files of the same shape are batched (``batch_size``). Row keys: ``file``, ``prompt``,
    ``score`` (None where the reward gave NaN), one column per ``[B]`` tensor in the reward's
    extras, and ``error``: None, or a message naming the file when it could not be read or
    scored (a failing batch is re-scored file by file, so one bad file spoils nothing else).
    """
    folder = Path(folder)
    if reward.requires_prompts and not any(item["prompt"] for item in items):
        raise ScoreInputError(f"reward {reward.name!r} needs prompts: give {folder} a {SAMPLES_FILE} "
                              "(one JSON line per file: file, prompt) or pass --metadata FILE")
    rows: list[dict | None] = [None] * len(items)
    pending: dict[tuple, list[tuple[int, torch.Tensor]]] = {}

    def fail(index: int, message: str) -> None:
        rows[index] = {"file": items[index]["file"], "prompt": items[index]["prompt"], "score": None, "error": message}
        if on_error:
            on_error(message)
        if on_progress:
            on_progress(1)

    def run(batch: list[tuple[int, torch.Tensor]]) -> None:
        indices = [i for i, _ in batch]
        prompts = [items[i]["prompt"] for i in indices]
        metas = [items[i]["meta"] for i in indices]
        kwargs = {"metadata": metas} if any(m is not None for m in metas) else {}
        try:
            out = reward(torch.stack([s for _, s in batch]), None if not any(prompts) else prompts, **kwargs)
        except Exception as err:
            if len(batch) > 1:  # find the culprit(s): score one by one
                for one in batch:
                    run([one])
                return
            kind = "" if isinstance(err, ValueError) else f"{type(err).__name__}: "
            fail(indices[0], f"{folder / items[indices[0]]['file']}: {kind}{err}")
            return
        columns = {"score": out.scores.detach().float().cpu(), **_per_sample_columns(out.extras, len(batch))}
        for j, i in enumerate(indices):
            rows[i] = {"file": items[i]["file"], "prompt": items[i]["prompt"],
                       **{k: _number(float(v[j])) for k, v in columns.items()}, "error": None}
        if on_progress:
            on_progress(len(batch))

    for index, item in enumerate(items):
        try:
            sample = load_sample(folder / item["file"], num_frames)
        except ScoreInputError as err:
            fail(index, str(err))
            continue
        group = pending.setdefault(tuple(sample.shape), [])
        group.append((index, sample))
        if len(group) == batch_size:
            run(pending.pop(tuple(sample.shape)))
    for group in pending.values():
        run(group)
    return rows


def summarize_scores(rows: list[dict]) -> list[tuple[str, int, int, float, float, float, float]]:
    """Per numeric column of :func:`score_media` rows: (column, scored, NaN, mean, std, min, max).

    Files with an error are left out; NaN counts read files the reward gave no score.
    """
    read = [row for row in rows if row["error"] is None]
    columns = dict.fromkeys(k for row in read for k in row if k not in ("file", "prompt", "error"))
    table = []
    for column in columns:
        values = [row.get(column) for row in read]
        scored = np.array([v for v in values if v is not None], dtype=float)
        stats = (scored.mean(), scored.std(), scored.min(), scored.max()) if scored.size else (np.nan,) * 4
        table.append((column, int(scored.size), len(values) - int(scored.size), *map(float, stats)))
    return table

"""Reading a numeric score out of a judge's free-text answer (local VLMs and HTTP judges alike)."""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable

__all__ = ["parse_score", "parse_scores", "json_objects", "REDUCTIONS"]

_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_LIST = rf"\[\s*{_NUMBER}(?:\s*,\s*{_NUMBER})*\s*\]"  # [4] or [4, 2, 5]

# How a list of several numbers becomes one score (parse_score's ``reduce``).
REDUCTIONS: dict[str, Callable[[list[float]], float]] = {
    "first": lambda values: values[0],
    "min": min,
    "max": max,
    "mean": lambda values: sum(values) / len(values),
}


def json_objects(text: str) -> list[dict]:
    """Every JSON object that parses in ``text``, in order (nested objects are not searched)."""
    decoder, found, start = json.JSONDecoder(), [], text.find("{")
    while start != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            found.append(value)
        start = text.find("{", end)
    return found


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        match = re.fullmatch(rf"\s*({_NUMBER})\s*(?:/\s*\d+(?:\.\d+)?)?\s*", value)
        return float(match.group(1)) if match else None
    return None


def _as_numbers(value: Any) -> list[float] | None:
    """A number or numeric string -> [x]; a non-empty list of them -> the list; anything else -> None."""
    if isinstance(value, list):
        numbers = [_as_number(v) for v in value]
        return numbers if numbers and None not in numbers else None
    number = _as_number(value)
    return None if number is None else [number]


def parse_scores(text: str, key: str = "score") -> list[float] | None:
    """Every number a judge wrote for ``key`` in ``text``: [x] for a number, the list for a list
    (``"score": [4, 2, 5]``: sub-scores), or None if there is none.

    Looks, in this order, for (the LAST occurrence wins; models draft before concluding):
    1. a JSON object with ``key`` (case-insensitive): a number, a numeric string ("4", "4/5") or
       a non-empty list of them (``{"score": [4]}``, FIRM's trained format);
    2. for ``key="score"``: ``\\boxed{4}`` (also ``\\boxed{[4]}``, ``\\boxed{4/5}``,
       ``\\boxed{\\text{4}}``), or the whole answer being one number ("4", " 3.5.");
    3. ``key: 4`` / ``"key" : [4]`` / ``"key": [4, 2, 5]`` / ``Final Score: 4`` as free text; for
       ``key="score"`` also ``Final Alignment Rating: 4`` (FIRM-Gen's instruction answer).
    A reasoning block ``<think>...</think>`` is dropped first; reasoning never closed (cut off
    by the token limit) gives None. "4/5" reads as 4 (the range is the caller's to check); an
    unfilled template such as ``[1/2/3/4/5]`` is no answer. Pure function.
    """
    if not isinstance(text, str) or ("<think>" in text and "</think>" not in text):
        return None  # no text, or reasoning cut off before the answer
    text = text.rsplit("</think>", 1)[-1]
    for obj in reversed(json_objects(text)):
        values = {str(k).strip().lower(): v for k, v in obj.items()}
        if key.lower() in values:
            numbers = _as_numbers(values[key.lower()])
            if numbers is not None:
                return numbers
    if key.lower() == "score":
        boxed = re.findall(rf"\\boxed\{{+\s*(?:\\text\{{)?\s*(?:\[\s*)?({_NUMBER})", text)
        if boxed:
            return [float(boxed[-1])]
        bare = re.fullmatch(rf"\s*({_NUMBER})\s*\.?\s*", text)
        if bare:
            return [float(bare.group(1))]
    names = re.escape(key) + (r"|final\s+alignment\s+rating" if key.lower() == "score" else "")
    free = re.findall(rf"\b(?:{names})\b[\"'*]*\s*[:=]\s*[\"'*]*\s*({_LIST}|{_NUMBER})", text, flags=re.IGNORECASE)
    return [float(x) for x in re.findall(_NUMBER, free[-1])] if free else None


def parse_score(text: str, key: str = "score", reduce: str | None = None) -> float | None:
    """The score a judge wrote for ``key`` in ``text`` (found as in :func:`parse_scores`), or None.

    One number, or a one-element list (``"score" : [4]``), is the score. A list of several
    numbers becomes one through ``reduce`` ("first", "min", "max" or "mean"; see REDUCTIONS);
    without ``reduce`` it is no score (None), since nothing says which number is meant.
    Pure function.
    """
    if reduce is not None and reduce not in REDUCTIONS:
        raise ValueError(f"parse_score: reduce must be one of {sorted(REDUCTIONS)} or None, got {reduce!r}")
    numbers = parse_scores(text, key)
    if numbers is None:
        return None
    if len(numbers) == 1:
        return numbers[0]
    return REDUCTIONS[reduce](numbers) if reduce is not None else None

"""Reading a numeric score out of a judge's free-text answer (local VLMs and HTTP judges alike)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["parse_score"]

_NUMBER = r"[-+]?\d+(?:\.\d+)?"


def _json_objects(text: str) -> list[dict]:
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


def parse_score(text: str, key: str = "score") -> float | None:
    """The score a judge wrote for ``key`` in ``text``, or None if there is none.

    Looks, in this order, for (the LAST occurrence wins; models draft before concluding):
    1. a JSON object with ``key`` (case-insensitive), a number or a numeric string ("4", "4/5");
    2. for ``key="score"``: ``\\boxed{4}`` (also ``\\boxed{4/5}``, ``\\boxed{\\text{4}}``), or the
       whole answer being one number ("4", " 3.5.");
    3. ``key: 4`` / ``"key" = 4`` / ``Final Score: 4`` as free text.
    A reasoning block ``<think>...</think>`` is dropped first; reasoning never closed (cut off
    by the token limit) gives None. "4/5" reads as 4 (the range is the caller's to check).
    Pure function.
    """
    if not isinstance(text, str) or ("<think>" in text and "</think>" not in text):
        return None  # no text, or reasoning cut off before the answer
    text = text.rsplit("</think>", 1)[-1]
    for obj in reversed(_json_objects(text)):
        values = {str(k).strip().lower(): v for k, v in obj.items()}
        if key.lower() in values:
            number = _as_number(values[key.lower()])
            if number is not None:
                return number
    if key.lower() == "score":
        boxed = re.findall(rf"\\boxed\{{\s*(?:\\text\{{)?\s*({_NUMBER})", text)
        if boxed:
            return float(boxed[-1])
        bare = re.fullmatch(rf"\s*({_NUMBER})\s*\.?\s*", text)
        if bare:
            return float(bare.group(1))
    free = re.findall(rf"\b{re.escape(key)}\b[\"'*]*\s*[:=]\s*[\"'*]*\s*({_NUMBER})",
                      text, flags=re.IGNORECASE)
    return float(free[-1]) if free else None

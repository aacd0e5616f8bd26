"""Synthetic GUI execution videos: desktop-like screen recordings with scripted trajectories.

A seeded generator of small screen recordings (224 x 168 by default) of a desktop window with a
menu bar, labelled text fields and buttons, a mouse cursor, drop-down menus, typed text and
result dialogs. Three task kinds, each a scripted trajectory of steps:

- click:  "click Save"                               move -> press -> a "Save" dialog appears
- type:   "type 42 into Quantity"                    move -> focus the field -> one char per second
- menu:   "open the File menu and choose Export"     move -> open menu -> move -> choose -> dialog

Each example is (video, instruction, label, interval, description):

- ``positive``:    the trajectory carries out the instruction (label 1, no interval);
- ``wrong_target``: the agent acts on another element of the same window (label 0);
- ``incomplete``:  the agent stops before the final action (label 0);
- ``translated``:  adversarial instruction translation: a successful video paired with a
  plausible mismatched instruction about an element present on screen (label 0).

``description`` is what the video carries out (the executed instruction, or "nothing completed"),
the answer of the judge's auxiliary describe task. For every negative, ``interval`` = [first, last] second of the step where the video deviates
from what the instruction requires (step-level annotation; the missing step's slot to the end
of the video for ``incomplete``). Videos hold each state for 1 s (``fps`` frames), so sampling
at 1 fps (the reward's default) sees every state. Every label word has its own icon colour
(as toolbar icons do), besides its text, so a tiny judge trained on CPU can tell elements
apart; reading typed digits is not required (typed values never differ between instruction
and video). For the same reason the evidence of a completed action is large, as in many real
applications: a result dialog is drawn in its element's colour (title bar, tinted body) and an
edited field is highlighted with its field's tint. Without these (8 px icons only) a tiny judge
trained from scratch stayed at chance (first-token loss ln 2 for 600 steps).

    python -m eval.gui_videos OUT_DIR --num 200 --seed 0      # OUT_DIR/data.jsonl + videos/
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rewards.video_io import write_video
from samplers.progress import track

__all__ = ["GuiTask", "Screen", "generate_example", "vocabulary", "NOTHING_DONE", "generate_dataset", "render", "temporal_iou",
           "judge_metrics", "evaluate_judge", "KINDS"]

WIDTH, HEIGHT = 224, 168
BUTTONS = ("Save", "Cancel", "Open", "Delete", "Print", "Apply")
FIELDS = ("Quantity", "Price", "Name", "Email")
MENUS = {"File": ("New", "Export", "Print", "Close"), "Edit": ("Undo", "Copy", "Paste"), "View": ("Zoom", "Grid")}
WORD_COLOURS = {
    "Save": (30, 160, 60), "Cancel": (210, 40, 40), "Open": (240, 170, 0), "Delete": (120, 30, 140),
    "Print": (20, 110, 220), "Apply": (0, 170, 170), "Quantity": (230, 90, 160), "Price": (140, 100, 40),
    "Name": (90, 200, 90), "Email": (60, 60, 200), "New": (250, 120, 40), "Export": (200, 200, 30),
    "Close": (90, 90, 90), "Undo": (170, 60, 220), "Copy": (40, 200, 230), "Paste": (230, 150, 150),
    "Zoom": (100, 140, 60), "Grid": (180, 40, 110), "File": (60, 110, 150), "Edit": (150, 80, 60),
    "View": (70, 150, 120),
}
DESKTOPS = ((40, 90, 130), (70, 70, 80), (30, 110, 90), (110, 60, 100))
KINDS = ("positive", "wrong_target", "incomplete", "translated")
NOTHING_DONE = "nothing completed"  # the description of an incomplete trajectory
_FONT = None


def vocabulary() -> list[str]:
    """Every word of the instructions, descriptions and judge questions (a tiny judge's tokenizer
    gives each one token)."""
    words = ["click", "type", "into", "open", "the", "menu", "and", "choose", "What", "did", "agent", "do", "Yes", "No",
             *NOTHING_DONE.split(), *BUTTONS, *FIELDS, *MENUS, *(w for items in MENUS.values() for w in items)]
    return [" " + w for w in words]  # each after a space (one merge chain from "Ġ": no chain cuts another)


def _font():
    global _FONT
    if _FONT is None:
        _FONT = ImageFont.load_default(size=10)
    return _FONT


# ----------------------------------------------------------------------------- tasks and scenes


@dataclass(frozen=True)
class GuiTask:
    """One instruction. kind: "click" (target = button), "type" (target = field, value),
    "menu" (menu, target = item)."""

    kind: str
    target: str
    value: str = ""
    menu: str = ""

    @property
    def instruction(self) -> str:
        if self.kind == "click":
            return f"click {self.target}"
        if self.kind == "type":
            return f"type {self.value} into {self.target}"
        return f"open the {self.menu} menu and choose {self.target}"

    def phases(self) -> list[tuple[str, str]]:
        """The (action, object) steps a correct trajectory goes through."""
        if self.kind == "click":
            return [("click", self.target)]
        if self.kind == "type":
            return [("focus", self.target), ("type", self.value)]
        return [("open", self.menu), ("choose", self.target)]


@dataclass
class Layout:
    """Where things are in one window (fixed for a video)."""

    window: tuple[int, int, int, int]
    desktop: tuple[int, int, int]
    menus: list[tuple[str, tuple[int, int, int, int]]]
    fields: list[tuple[str, tuple[int, int, int, int]]]
    buttons: list[tuple[str, tuple[int, int, int, int]]]


@dataclass
class Screen:
    """The state drawn in one frame."""

    cursor: tuple[int, int]
    pressed: str | None = None
    focused: str | None = None
    texts: dict = field(default_factory=dict)
    open_menu: str | None = None
    hovered: str | None = None
    dialog: str | None = None


def make_layout(rng: random.Random) -> Layout:
    x0, y0 = rng.randint(2, 16), rng.randint(2, 8)
    w, h = rng.randint(190, WIDTH - x0 - 2), rng.randint(140, HEIGHT - y0 - 2)
    menus, x = [], x0 + 4
    for name in rng.sample(list(MENUS), k=len(MENUS)):
        width = 8 + 6 * len(name)
        menus.append((name, (x, y0 + 14, x + width, y0 + 27)))
        x += width + 4
    fields, y = [], y0 + 36
    for name in rng.sample(FIELDS, k=2):
        fields.append((name, (x0 + 70, y, x0 + w - 10, y + 16)))
        y += 26
    buttons, x = [], x0 + 8
    names = rng.sample(BUTTONS, k=3)
    by = y0 + h - 26
    for name in names:
        width = 16 + 6 * len(name)
        buttons.append((name, (x, by, x + width, by + 18)))
        x += width + 6
    return Layout((x0, y0, x0 + w, y0 + h), rng.choice(DESKTOPS), menus, fields, buttons)


def _menu_items(layout: Layout, menu: str) -> list[tuple[str, tuple[int, int, int, int]]]:
    box = dict(layout.menus)[menu]
    items, y = [], box[3] + 1
    for name in MENUS[menu]:
        items.append((name, (box[0], y, box[0] + 64, y + 14)))
        y += 14
    return items


def _centre(box) -> tuple[int, int]:
    return ((box[0] + box[2]) // 2, (box[1] + box[3]) // 2)


def _tint(colour: tuple[int, int, int], amount: float = 0.45) -> tuple[int, int, int]:
    """``colour`` blended with white (a light background that keeps black text readable)."""
    return tuple(int(round(255 - amount * (255 - c))) for c in colour)


def _icon(draw: ImageDraw.ImageDraw, x: int, y: int, word: str, size: int = 8) -> None:
    draw.rectangle((x, y, x + size, y + size), fill=WORD_COLOURS[word])


def render(layout: Layout, screen: Screen) -> np.ndarray:
    """One frame, uint8 [HEIGHT, WIDTH, 3]."""
    image = Image.new("RGB", (WIDTH, HEIGHT), layout.desktop)
    draw, font = ImageDraw.Draw(image), _font()
    x0, y0, x1, y1 = layout.window
    draw.rectangle(layout.window, fill=(236, 236, 236), outline=(20, 20, 20))
    draw.rectangle((x0, y0, x1, y0 + 12), fill=(50, 60, 90))
    draw.text((x0 + 4, y0 + 1), "Editor", fill=(255, 255, 255), font=font)
    for name, box in layout.menus:
        if screen.open_menu == name:
            draw.rectangle(box, fill=(190, 205, 235))
        draw.text((box[0] + 2, box[1] + 1), name, fill=(0, 0, 0), font=font)
    for name, box in layout.fields:
        draw.text((x0 + 6, box[1] + 3), name, fill=(0, 0, 0), font=font)
        outline = (30, 90, 230) if screen.focused == name else (120, 120, 120)
        fill = _tint(WORD_COLOURS[name]) if screen.texts.get(name) else (255, 255, 255)  # edited: highlighted
        draw.rectangle(box, fill=fill, outline=outline, width=2 if screen.focused == name else 1)
        _icon(draw, box[0] + 3, box[1] + 4, name)
        if screen.texts.get(name):
            draw.text((box[0] + 16, box[1] + 2), screen.texts[name], fill=(0, 0, 0), font=font)
    for name, box in layout.buttons:
        pressed = screen.pressed == name
        draw.rectangle(box, fill=(150, 170, 210) if pressed else (215, 215, 215), outline=(60, 60, 60),
                       width=2 if pressed else 1)
        _icon(draw, box[0] + 4, box[1] + 5, name)
        draw.text((box[0] + 15, box[1] + 4), name, fill=(0, 0, 0), font=font)
    if screen.open_menu:
        for name, box in _menu_items(layout, screen.open_menu):
            draw.rectangle(box, fill=(190, 205, 235) if screen.hovered == name else (250, 250, 250),
                           outline=(150, 150, 150))
            _icon(draw, box[0] + 3, box[1] + 3, name)
            draw.text((box[0] + 14, box[1] + 1), name, fill=(0, 0, 0), font=font)
    if screen.dialog:
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        box = (cx - 46, cy - 24, cx + 46, cy + 24)
        draw.rectangle(box, fill=_tint(WORD_COLOURS[screen.dialog]), outline=(20, 20, 20), width=2)
        draw.rectangle((box[0], box[1], box[2], box[1] + 11), fill=WORD_COLOURS[screen.dialog])
        _icon(draw, box[0] + 6, box[1] + 18, screen.dialog, size=14)
        draw.text((box[0] + 26, box[1] + 20), f"{screen.dialog} done", fill=(0, 0, 0), font=font)
    cx, cy = screen.cursor
    draw.polygon([(cx, cy), (cx, cy + 11), (cx + 3, cy + 8), (cx + 7, cy + 8)], fill=(0, 0, 0),
                 outline=(255, 255, 255))
    return np.asarray(image)


# ----------------------------------------------------------------------------- trajectories


def _move(states: list, phase: int, screen: Screen, target: tuple[int, int]) -> Screen:
    """Two seconds of cursor motion: halfway, then there."""
    (x, y), (tx, ty) = screen.cursor, target
    for point in (((x + tx) // 2, (y + ty) // 2), (tx, ty)):
        screen = replace(screen, cursor=point)
        states.append((screen, phase))
    return screen


def execute(layout: Layout, task: GuiTask, rng: random.Random, stop_before_last: bool = False
            ) -> tuple[list[tuple[Screen, int]], int]:
    """Script the trajectory of ``task``: [(state, phase index)] per second, and the number of
    phases actually carried out. ``stop_before_last``: the final phase is started but not done
    (the cursor goes there, nothing is clicked / typed; a menu is closed again)."""
    start = (rng.randint(20, WIDTH - 20), rng.randint(40, HEIGHT - 20))
    screen = Screen(cursor=start)
    states = [(screen, -1)] * rng.randint(1, 2)  # idle lead-in
    last = len(task.phases()) - 1
    if task.kind == "click":
        box = dict(layout.buttons)[task.target]
        screen = _move(states, 0, screen, _centre(box))
        if not stop_before_last:
            screen = replace(screen, pressed=task.target)
            states.append((screen, 0))
            screen = replace(screen, pressed=None, dialog=task.target)
            states += [(screen, 0)] * 2
    elif task.kind == "type":
        box = dict(layout.fields)[task.target]
        screen = _move(states, 0, screen, (box[0] + 30, _centre(box)[1]))
        screen = replace(screen, focused=task.target)
        states.append((screen, 0))
        if stop_before_last:
            states.append((screen, 1))
        else:
            for i in range(1, len(task.value) + 1):
                screen = replace(screen, texts={task.target: task.value[:i]})
                states.append((screen, 1))
    else:
        screen = _move(states, 0, screen, _centre(dict(layout.menus)[task.menu]))
        screen = replace(screen, open_menu=task.menu)
        states.append((screen, 0))
        item = dict(_menu_items(layout, task.menu))[task.target]
        screen = _move(states, 1, replace(screen, hovered=None), _centre(item))
        screen = replace(screen, hovered=task.target)
        states.append((screen, 1))
        if stop_before_last:
            screen = replace(screen, open_menu=None, hovered=None)
            states.append((screen, 1))
        else:
            screen = replace(screen, open_menu=None, hovered=None, dialog=task.target)
            states += [(screen, 1)] * 2
    states += [(screen, -2)] * rng.randint(1, 2)  # idle tail
    return states, last + (0 if stop_before_last else 1)


def _phase_span(states: list[tuple[Screen, int]], phase: int) -> tuple[int, int]:
    seconds = [i for i, (_, p) in enumerate(states) if p == phase]
    return seconds[0], seconds[-1]


def deviation_interval(states: list[tuple[Screen, int]], executed: GuiTask, asked: GuiTask,
                       incomplete: bool = False) -> tuple[int, int]:
    """[first, last] second of the step where the video stops doing what ``asked`` requires."""
    if incomplete:
        return _phase_span(states, len(executed.phases()) - 1)[0], len(states) - 1
    done, wanted = executed.phases(), asked.phases()
    for index, (a, b) in enumerate(zip(done, wanted)):
        if a != b:
            return _phase_span(states, index)
    return _phase_span(states, len(done) - 1)


def _random_task(layout: Layout, rng: random.Random, kind: str | None = None) -> GuiTask:
    kind = kind or rng.choice(("click", "type", "menu"))
    if kind == "click":
        return GuiTask("click", rng.choice(layout.buttons)[0])
    if kind == "type":
        return GuiTask("type", rng.choice(layout.fields)[0], value=str(rng.randint(1, 999)))
    menu = rng.choice(list(MENUS))
    return GuiTask("menu", rng.choice(MENUS[menu]), menu=menu)


def _mismatch(layout: Layout, task: GuiTask, rng: random.Random) -> GuiTask:
    """A plausible other instruction of the same kind about something on screen."""
    if task.kind == "click":
        return GuiTask("click", rng.choice([b for b, _ in layout.buttons if b != task.target]))
    if task.kind == "type":
        return GuiTask("type", next(f for f, _ in layout.fields if f != task.target), value=task.value)
    if rng.random() < 0.6:  # same menu, other item
        return GuiTask("menu", rng.choice([i for i in MENUS[task.menu] if i != task.target]), menu=task.menu)
    menu = rng.choice([m for m in MENUS if m != task.menu])
    return GuiTask("menu", rng.choice(MENUS[menu]), menu=menu)


def generate_example(seed: int, kind: str | None = None) -> dict:
    """One example (deterministic in ``seed``): frames uint8 [T, H, W, 3] at 1 state per second,
    instruction, label, interval, kind, executed instruction, task kind."""
    rng = random.Random(seed)
    kind = kind or rng.choice(KINDS[:1] * 3 + KINDS[1:])  # half positives
    layout = make_layout(rng)
    asked = _random_task(layout, rng)
    executed, incomplete = asked, kind == "incomplete"
    if kind == "wrong_target":
        executed = _mismatch(layout, asked, rng)
    states, _ = execute(layout, executed, rng, stop_before_last=incomplete)
    if kind == "translated":  # the video is a success; the instruction is translated away from it
        asked = _mismatch(layout, executed, rng)
    interval = None if kind == "positive" else list(deviation_interval(states, executed, asked, incomplete))
    frames = np.stack([render(layout, screen) for screen, _ in states])
    return {"frames": frames, "instruction": asked.instruction, "label": int(kind == "positive"),
            "interval": interval, "kind": kind, "executed": executed.instruction, "task": asked.kind,
            "description": NOTHING_DONE if incomplete else executed.instruction}


def generate_dataset(out: str | Path, num: int, seed: int = 0, fps: float = 2.0, suffix: str = ".mp4") -> Path:
    """Write ``num`` examples to ``out/videos/*.mp4`` + ``out/data.jsonl``; returns the JSONL path.

    Example i uses seed ``seed * 1_000_003 + i`` (train and test sets: different seeds). Each
    state is held 1 s (``fps`` frames per state)."""
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in track(range(num), f"writing {num} synthetic GUI videos to {out}", unit="videos"):
        example = generate_example(seed * 1_000_003 + i)
        repeat = max(1, int(round(fps)))
        name = f"videos/{i:05d}{suffix}"
        write_video(out / name, np.repeat(example.pop("frames"), repeat, axis=0), fps=fps)
        rows.append({"video": name, **example})
    path = out / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ----------------------------------------------------------------------------- metrics


def temporal_iou(predicted: tuple[float, float] | None, target: tuple[float, float] | None) -> float:
    """IoU of two inclusive [first, last] second intervals (each second a unit slot); 0 if either is None."""
    if predicted is None or target is None:
        return 0.0
    (a0, a1), (b0, b1) = sorted(predicted), sorted(target)
    inter = max(0.0, min(a1, b1) - max(a0, b0) + 1)
    union = (a1 - a0 + 1) + (b1 - b0 + 1) - inter
    return float(inter / union) if union > 0 else 0.0


def judge_metrics(p_success, labels, predicted_intervals=None, target_intervals=None, threshold: float = 0.5) -> dict:
    """accuracy, recall (positive = task completed), precision, mean temporal IoU over the
    negatives that have a target interval (when predicted intervals are given), counts."""
    p = np.asarray(p_success, dtype=float)
    y = np.asarray(labels, dtype=int)
    scored = ~np.isnan(p)
    pred = p >= threshold
    tp = int((pred & (y == 1) & scored).sum())
    metrics = {
        "n": int(len(y)), "unscored": int((~scored).sum()),
        "accuracy": float(((pred == (y == 1)) & scored).sum() / max(1, len(y))),
        "recall": float(tp / max(1, int((y == 1).sum()))),
        "precision": float(tp / max(1, int((pred & scored).sum()))),
    }
    if predicted_intervals is not None and target_intervals is not None:
        ious = [temporal_iou(p_i, t_i) for p_i, t_i in zip(predicted_intervals, target_intervals) if t_i is not None]
        metrics["temporal_iou"] = float(np.mean(ious)) if ious else float("nan")
        metrics["temporal_iou_n"] = len(ious)
    return metrics


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write synthetic GUI execution videos + data.jsonl")
    parser.add_argument("out", type=Path)
    parser.add_argument("--num", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--suffix", default=".mp4", choices=[".mp4", ".webm", ".gif"])
    args = parser.parse_args(argv)
    print(generate_dataset(args.out, args.num, args.seed, args.fps, args.suffix))


if __name__ == "__main__":
    main()


def evaluate_judge(judge, rows: list[dict], root: str | Path | None = None, interval: bool = True) -> dict:
    """Run a VideoExecJudge over JSONL rows (videos read from files under ``root``): judge_metrics
    + mean kept-token ratio + forward seconds (judging only, decoding excluded)."""
    root = Path(root) if root is not None else None
    from rewards.video_io import read_video

    videos = [read_video(root / r["video"] if root else r["video"], judge.fps, judge.max_frames,
                         judge.max_pixels).frames for r in rows]
    import time

    start = time.perf_counter()
    result = judge.judge(videos, [r["instruction"] for r in rows], interval=False)
    seconds = time.perf_counter() - start
    intervals = None
    if interval:
        intervals = [None] * len(rows)
        for i, row in enumerate(rows):  # temporal attribution only for true failures judged failed
            if row.get("interval") is not None and float(result["p_success"][i]) < 0.5:
                found = judge.continue_answer(videos[i], row["instruction"], judge.no_words[0])
                from rewards.video_exec import parse_interval

                intervals[i] = parse_interval(found)
    metrics = judge_metrics(result["p_success"].numpy(), [r["label"] for r in rows], intervals,
                            [r.get("interval") for r in rows] if interval else None)
    metrics["kept_token_ratio"] = float(result["kept_token_ratio"].mean())
    metrics["forward_seconds"] = seconds
    return metrics

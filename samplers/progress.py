"""Progress of long commands: what is happening, how far it got, how fast, how long still.

On a terminal (stderr is a TTY) a rich bar. Elsewhere (a pipe, a log file, CI) plain lines on
stderr, flushed at once: one when a task starts, then one at least every `interval` seconds
while it runs, even while a single step takes longer (a heartbeat thread prints the state),
and one when it ends:

    sampling: 24/64 images (38%) | 1.92 images/s | elapsed 0:13 | eta 0:21

    status("loading model shapesworld on cpu")        # one line, at once
    with Progress(64, "sampling", unit="images") as bar:
        for batch in batches:
            bar.phase("decoding")                      # optional: what the current step does
            bar.advance(len(batch))
    for step in track(range(steps), "training"):       # the same, around a loop
        ...

The line interval is `GENALIGN_PROGRESS_SECONDS` (default 10). This module sits low in the
package layers (samplers, rewards, eval and align all use it) and imports rich lazily.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Iterable, Iterator, TypeVar

__all__ = ["Progress", "track", "status", "interval_seconds", "format_duration"]

INTERVAL_ENV = "GENALIGN_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 10.0
T = TypeVar("T")

_live: list["Progress"] = []  # open bars, innermost last: status() prints above a live rich bar
_lock = threading.Lock()


def interval_seconds() -> float:
    """Seconds between plain progress lines: $GENALIGN_PROGRESS_SECONDS, else 10."""
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def _singular(unit: str) -> str:
    """'batches' -> 'batch', 'images' -> 'image', 'epochs' -> 'epoch'."""
    for plural, singular in (("ches", "ch"), ("shes", "sh"), ("s", "")):
        if unit.endswith(plural):
            return unit[: -len(plural)] + singular
    return unit


def format_duration(seconds: float) -> str:
    """3725 -> '1:02:05', 65 -> '1:05'."""
    seconds = int(round(max(0.0, seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def status(message: str) -> None:
    """Say at once what is happening ("loading model X on cpu"): one line on stderr, flushed;
    above the bar if one is live on the terminal."""
    with _lock:
        live = next((bar for bar in reversed(_live) if bar._rich is not None), None)
        if live is not None:
            live._rich.console.print(message, highlight=False, markup=False)
        else:
            print(message, file=sys.stderr, flush=True)


class Progress:
    """Progress of one task of `total` units (None: unknown). A context manager.

    enabled=False makes every method a no-op (e.g. on non-main ranks); quiet=True keeps the
    terminal bar but prints no plain lines. `start` units count as done before this run (a
    resumed training) and do not enter the rate.
    """

    def __init__(self, total: int | None, description: str, unit: str = "steps", start: int = 0,
                 enabled: bool = True, quiet: bool = False, interval: float | None = None):
        self.total, self.description, self.unit = total, description, unit
        self.completed = self.start = start
        self.enabled, self.quiet = enabled, quiet
        self.interval = interval_seconds() if interval is None else interval
        self.terminal = enabled and sys.stderr.isatty()
        self._phase = ""
        self._rich = None  # a rich.progress.Progress on a terminal (an outer bar's when nested)
        self._owns_rich = True
        self._task = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = self._last_line = time.monotonic()

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> "Progress":
        if not self.enabled:
            return self
        self._started = time.monotonic()
        if self.terminal:
            outer = next((bar for bar in reversed(_live) if bar._rich is not None), None)
            if outer is not None:  # nested (e.g. evaluation inside an epoch): one more row of the live bar
                self._rich, self._owns_rich = outer._rich, False
            else:
                from rich.console import Console
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                           TimeElapsedColumn, TimeRemainingColumn)

                self._rich = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                          TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TextColumn("eta"),
                                          TimeRemainingColumn(), console=Console(stderr=True))
                self._rich.__enter__()
            self._task = self._rich.add_task(self._label(), total=self.total, completed=self.completed,
                                             unit=self.unit)
        elif not self.quiet:
            self._line()
            if self.interval > 0:
                self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="progress")
                self._thread.start()
        _live.append(self)
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self in _live:
            _live.remove(self)
        if self._rich is not None:
            if self._owns_rich:
                self._rich.__exit__(*exc)
            else:
                self._rich.remove_task(self._task)
        elif not self.quiet and exc[0] is None:
            self._line(final=True)

    # ---------------------------------------------------------------- updates
    def advance(self, n: int = 1) -> None:
        """`n` more units done."""
        self.update(self.completed + n)

    def update(self, completed: int) -> None:
        """Set the number of units done."""
        if not self.enabled:
            return
        self.completed = completed
        if self._rich is not None:
            self._rich.update(self._task, completed=completed)
        elif not self.quiet and time.monotonic() - self._last_line >= self.interval:
            self._line()

    def phase(self, text: str) -> None:
        """What the current unit is doing ("sampling", "scoring"); shown beside the description."""
        if not self.enabled:
            return
        self._phase = text
        if self._rich is not None:
            self._rich.update(self._task, description=self._label())

    def print(self, message: str) -> None:
        """A line of its own (e.g. an epoch's summary): above the bar, or plain and flushed."""
        if self.enabled and not (self.quiet and self._rich is None):
            status(message)

    # ---------------------------------------------------------------- plain lines
    def _label(self) -> str:
        return f"{self.description} ({self._phase})" if self._phase else self.description

    def summary(self, final: bool = False) -> str:
        """'sampling: 24/64 images (38%) | 1.92 images/s | elapsed 0:13 | eta 0:21'."""
        elapsed = time.monotonic() - self._started
        done = self.completed - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        count = f"{self.completed}/{self.total}" if self.total is not None else f"{self.completed}"
        parts = [f"{self.description if final else self._label()}: {count} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.completed / self.total:.0f}%)"
        if done > 0:
            parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 1 else f"{1 / rate:.3g} s per {_singular(self.unit)}")
        parts.append(f"{'took' if final else 'elapsed'} {format_duration(elapsed)}")
        if not final and self.total is not None and done > 0:
            parts.append(f"eta {format_duration((self.total - self.completed) / rate)}")
        return " | ".join(p for p in parts if p)

    def _line(self, final: bool = False) -> None:
        self._last_line = time.monotonic()
        with _lock:
            print(self.summary(final), file=sys.stderr, flush=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(0.05, self.interval - (time.monotonic() - self._last_line))):
            if time.monotonic() - self._last_line >= self.interval:
                self._line()


def track(items: Iterable[T], description: str, total: int | None = None, unit: str = "steps",
          enabled: bool = True, quiet: bool = False) -> Iterator[T]:
    """Iterate `items` with a Progress over them (total: len(items) if it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, description, unit=unit, enabled=enabled, quiet=quiet) as bar:
        for item in items:
            yield item
            bar.advance()

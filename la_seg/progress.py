"""Progress of long work (done / total, time left), drawn for where it runs: the one owner of how la-seg
reports progress.

On a terminal, a bar that redraws in place (tqdm). Without one (a log file, a batch job, `make demo > log`),
plain lines at a modest rate: one when the work starts, then at most one every `MIN_GAP_S` seconds, and only
once a tenth more of the work is done or `MAX_GAP_S` seconds have passed; one when it ends. A carriage-return
bar in a log is hundreds of kilobytes of redraws. Lightning's own bar follows the same rule
(la_seg.callbacks.progress). Imports no Lightning: `evaluate` and `export-nnunet` report through it too.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO, TypeVar

from tqdm import tqdm

MIN_GAP_S = 10.0  # without a terminal, never two lines closer than this
MAX_GAP_S = 30.0  # ... and a line at least this often while work goes on (if it advances)
STEP = 0.1  # ... or once this share more of the work is done
Item = TypeVar("Item")


def on_terminal(stream: TextIO) -> bool:
    """Whether `stream` is a terminal (a redrawn bar shows there; in a file it is noise)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def duration(seconds: float) -> str:
    """`2 h 05 min`, `3 min 20 s`, `12 s`: how a person reads time left."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


class Progress:
    """Reports `done / total` of `what` with the time left; thread-safe (a writer thread may advance it).

    Args:
        what: what is counted, as the line starts: "evaluate: cases scored".
        total: how many there are (None: unknown, no time left shown).
        stream: where to report; default sys.stderr, so that results printed on stdout stay clean.
        enabled: False reports nothing (e.g. on every DDP rank but zero).
        clock: seconds, monotonic (tests pass a fake one).
        done: how many were done before (a resumed fit's epochs): counted, but not in the time left.
    """

    def __init__(
        self,
        what: str,
        total: int | None,
        stream: TextIO | None = None,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
        done: int = 0,
    ) -> None:
        self.what, self.total, self.done, self._before = what, total, done, done
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.clock = clock
        self.start = self._last = clock()
        self._done_at_last = done
        self._lock = threading.Lock()
        self._closed = False
        self._bar = None
        if enabled and on_terminal(self.stream):
            self._bar = tqdm(total=total, initial=done, desc=what, file=self.stream, dynamic_ncols=True)
        elif enabled:
            self._line(f"{what}: {done}/{total}" if total is not None else f"{what}: started")

    def advance(self, count: int = 1, note: str = "") -> None:
        """`count` more done; `note` (e.g. the latest metrics) is shown with the next line or on the bar."""
        with self._lock:
            self.done += count
            if self._bar is not None:
                if note:
                    self._bar.set_postfix_str(note, refresh=False)
                self._bar.update(count)
            elif self.enabled and self._due():
                self._line(self._status(note))

    def close(self, completed: bool = True, note: str = "") -> None:
        """The work has ended: its last line (none where it failed: the error says why) or the bar's last
        state; repeated calls do nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._bar.close()
            elif self.enabled and completed and self.done != self._done_at_last:
                self._line(self._status(note, final=True))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(completed=kind is None)

    def _due(self) -> bool:
        if self.total is not None and self.done >= self.total:
            return True  # the last one: the line that says it ended
        since = self.clock() - self._last
        if since < MIN_GAP_S:
            return False
        stepped = self.total is not None and self.done - self._done_at_last >= STEP * self.total
        return stepped or since >= MAX_GAP_S

    def _status(self, note: str, final: bool = False) -> str:
        elapsed = self.clock() - self.start
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        if final or (self.total is not None and self.done >= self.total):
            timing = f"in {duration(elapsed)}"
        elif self.total is not None and self.done > self._before:
            left = elapsed / (self.done - self._before) * (self.total - self.done)
            timing = f"{duration(elapsed)} so far, about {duration(left)} left"
        else:
            timing = f"{duration(elapsed)} so far"
        return f"{self.what}: {count}, {timing}" + (f"; {note}" if note else "")

    def _line(self, text: str) -> None:
        self._last, self._done_at_last = self.clock(), self.done
        print(text, file=self.stream, flush=True)


def tracked(items: Iterable[Item], what: str, total: int | None = None, **options) -> Iterator[Item]:
    """Yields `items`, counting each as done when the loop body has finished with it."""
    progress = Progress(what, total if total is not None else _length(items), **options)
    completed = False
    try:
        for item in items:
            yield item
            progress.advance()
        completed = True
    finally:
        progress.close(completed)


def _length(items: Iterable) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None

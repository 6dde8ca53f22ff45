"""Progress bars of the commands, drawn by tqdm (the ``apps`` extra) on stderr.

Every command that shows progress (``flexemr demo``, ``rank``, ``gen``,
``bench``, ``serve``) takes ``--progress`` / ``--no-progress`` (:func:`add_option`).
Without either, bars are shown only when stderr is a terminal (and tqdm is
installed), and only for work that lasts longer than a second
(:attr:`Bars.delay`); ``--progress`` shows them at once, also into a pipe or
a file; ``--no-progress`` never.  tqdm is imported only when a bar is drawn:
with bars off, nothing needs it, and a missing tqdm with ``--progress`` is one
:class:`~flexemr.ConfigError` line naming the extra.

>>> bars = Bars.from_flag(False)
>>> with bars.bar(total=3, desc="demo") as bar:
...     bar.update(3)
>>> bars.enabled
False
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from typing import Any, TextIO

from .extras import require

__all__ = ["AUTO_DELAY", "Bars", "add_option", "as_callback"]

#: Seconds a bar waits before it appears when shown because stderr is a terminal (not forced by --progress).
AUTO_DELAY = 1.0


def _have_tqdm() -> bool:
    try:
        return importlib.util.find_spec("tqdm") is not None
    except (ImportError, ValueError):
        return False


def add_option(p: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress`` (default: bars when stderr is a terminal)."""
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr: --progress also into a pipe or file, --no-progress never "
                        "(default: when stderr is a terminal, for work of more than a second)")


class _Off:
    """What :meth:`Bars.bar` returns when bars are off: takes every call, draws nothing."""

    n = 0
    total: float | None = None

    def __enter__(self) -> _Off:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: float = 1) -> None:
        self.n += int(n)

    def set_description_str(self, desc: str) -> None:
        return None

    def set_postfix_str(self, text: str) -> None:
        return None

    def refresh(self) -> None:
        return None

    def close(self) -> None:
        return None


@dataclass(frozen=True)
class Bars:
    """Whether progress bars are drawn, where, and how long each waits before it appears."""

    enabled: bool
    delay: float = AUTO_DELAY
    file: TextIO | None = None          # None: sys.stderr at the time a bar is made

    @classmethod
    def from_flag(cls, flag: bool | None, stream: TextIO | None = None) -> Bars:
        """From ``--progress`` (``True``), ``--no-progress`` (``False``) or neither (``None``: when ``stream``,
        default stderr, is a terminal, after :data:`AUTO_DELAY`)."""
        if flag is not None:
            return cls(bool(flag), 0.0, stream)
        out = stream if stream is not None else sys.stderr
        try:
            tty = out.isatty()
        except (AttributeError, ValueError):   # closed or not a real stream
            tty = False
        return cls(tty and _have_tqdm(), AUTO_DELAY, stream)   # not asked for: no bars rather than an error

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Bars:
        """From the ``progress`` attribute :func:`add_option` adds (``None`` when absent)."""
        return cls.from_flag(getattr(args, "progress", None))

    def bar(self, *, total: float | None = None, desc: str = "", unit: str = "it", unit_scale: bool = False,
            leave: bool = False, delay: float | None = None, bar_format: str | None = None) -> Any:
        """A ``tqdm`` bar (a context manager; ``update(n)``, ``total``, ``n``), or a silent stand-in when off.

        ``delay``: seconds before it appears (default :attr:`delay`); ``leave``: keep the finished bar.
        """
        if not self.enabled:
            return _Off()
        require("tqdm", "progress bars (--progress)")
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, leave=leave,
                    delay=self.delay if delay is None else delay, file=self.file or sys.stderr,
                    dynamic_ncols=True, mininterval=0.2, bar_format=bar_format)

    @contextmanager
    def ticker(self, desc: str, *, interval: float = 0.5) -> Iterator[Any]:
        """A bar without a total for work that reports no steps: the time it has run, redrawn every
        ``interval`` seconds by a daemon thread until the ``with`` block ends -- or until the block first
        prints to stdout (its results), so that the bar never mixes with them."""
        bar = self.bar(desc=desc, bar_format="{desc}: running for {elapsed}")
        if not self.enabled:
            yield bar
            return
        stop = threading.Event()
        lock = threading.Lock()

        def redraw() -> None:
            while not stop.wait(interval):
                with lock:
                    if not stop.is_set():
                        bar.update(0)        # redraws (after the bar's delay); close() then clears the line

        def finish() -> None:
            with lock:
                if not stop.is_set():
                    stop.set()
                    bar.close()

        thread = threading.Thread(target=redraw, name="flexemr-progress", daemon=True)
        thread.start()
        try:
            with redirect_stdout(_FirstWrite(sys.stdout, finish)):
                yield bar
        finally:
            finish()
            thread.join()


class _FirstWrite(io.TextIOBase):
    """A text stream that calls ``before()`` once, before the first write, then writes to ``out``."""

    def __init__(self, out: TextIO, before: Callable[[], None]) -> None:
        super().__init__()
        self._out = out
        self._before: Callable[[], None] | None = before

    def write(self, text: str) -> int:
        if self._before is not None and text:
            before, self._before = self._before, None
            before()
        return self._out.write(text)

    def flush(self) -> None:
        self._out.flush()

    def isatty(self) -> bool:
        return self._out.isatty()

    def fileno(self) -> int:
        return self._out.fileno()


def as_callback(bar: Any) -> Callable[[int, int], None]:
    """``callback(done, total)`` that moves ``bar`` to ``done`` of ``total`` (what :meth:`Ranker.run
    <flexemr.apps.rank.Ranker.run>`, :func:`~flexemr.apps.criteo.read_criteo` and
    :func:`~flexemr.apps.criteo.write_sample` call); a ``total`` of 0 or less: not known."""

    def callback(done: int, total: int) -> None:
        want = total if total > 0 else None
        if bar.total != want:
            bar.total = want
        if done > bar.n:
            bar.update(done - bar.n)

    return callback

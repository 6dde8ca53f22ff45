"""What every ``flexemr`` command shares: one-line usage errors, option checks, signals, error lines.

:class:`ArgumentParser` (usage errors in one line, exit code 2),
:func:`check_range` (a :class:`~flexemr.ConfigError` naming the option),
:func:`run_interruptible` and :func:`blocking_section` (SIGINT/SIGTERM stop a
command cleanly: :class:`Interrupted`), :func:`describe_os_error`.  The
command table is :mod:`flexemr.apps.cli`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, NoReturn, TypeVar

import rdmaio

from ..client.options import ClientOptions
from ..core.errors import ConfigError

__all__ = ["ArgumentParser", "Interrupted", "blocking_section", "check_range", "describe_os_error",
           "client_option_names", "parse_client_options", "parse_pairs", "run_interruptible"]

T = TypeVar("T")


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line (and exit code 2).

    >>> ArgumentParser(prog="flexemr x").format_usage().startswith("usage: flexemr x")
    True
    """

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def parse_pairs(items: Sequence[str], option: str, form: str = "KEY=VALUE") -> dict[str, str]:
    """Repeated ``option`` values ``KEY=VALUE`` as a dict (a later key wins); key and value both non-empty.

    >>> parse_pairs(["a=1", "b=x=y"], "--npy")
    {'a': '1', 'b': 'x=y'}
    """
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"{option} expects {form}, got {item!r}")
        out[key] = value
    return out


def client_option_names(reserved: frozenset[str] = frozenset()) -> list[str]:
    """The :class:`~flexemr.ClientOptions` fields a ``--client-option`` may set, less the ``reserved`` ones."""
    return sorted(f.name for f in dataclasses.fields(ClientOptions) if f.name not in reserved)


def parse_client_options(items: Sequence[str], reserved: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Repeated ``--client-option KEY=VALUE`` as client keywords: each key is checked up front against
    :class:`~flexemr.ClientOptions` (less ``reserved``, the keywords the command sets itself), each value
    decoded as JSON when it is JSON and kept as a string otherwise.

    >>> parse_client_options(["cache_bytes=1048576", "coalesce_window_us=200"])
    {'cache_bytes': 1048576, 'coalesce_window_us': 200}
    """
    names = client_option_names(reserved)
    out: dict[str, Any] = {}
    for key, raw in parse_pairs(items, "--client-option").items():
        if key not in names:
            raise ConfigError(f"--client-option: EmbeddingClient has no option {key!r}; options: {', '.join(names)}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def check_range(option: str, value: float | None, lo: float | None = None, hi: float | None = None, *,
                above: float | None = None) -> None:
    """:class:`ConfigError` unless ``lo <= value <= hi`` (and ``value > above``); ``None`` passes.

    >>> check_range("--batch-size", 0, 1)
    Traceback (most recent call last):
        ...
    flexemr.core.errors.ConfigError: --batch-size must be >= 1, got 0
    """
    if value is None:
        return
    if above is not None and not value > above:
        raise ConfigError(f"{option} must be > {above:g}, got {value:g}")
    if lo is not None and value < lo:
        raise ConfigError(f"{option} must be >= {lo:g}, got {value:g}")
    if hi is not None and value > hi:
        raise ConfigError(f"{option} must be <= {hi:g}, got {value:g}")


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped a command (:func:`run_interruptible`); ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def run_interruptible(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``make()`` on rdmaio's event loop; SIGINT/SIGTERM cancel it and raise :class:`Interrupted`.

    Cancelling (instead of dying at once) lets every ``async with`` of the
    command unwind: a :class:`~flexemr.LocalCluster` stops its servers and
    removes its temporary directory, clients close their connections.  A
    second signal while that happens is ignored.
    """

    async def guarded() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        got: list[int] = []

        def on_signal(signum: int) -> None:
            if not got:
                got.append(signum)
                task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            return await make()
        except asyncio.CancelledError:
            if got:
                raise Interrupted(got[0]) from None
            raise
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    return rdmaio.run(guarded())


@contextlib.contextmanager
def blocking_section() -> Iterator[None]:
    """Long synchronous work inside :func:`run_interruptible` (generating or reading requests, building
    tables): a signal raises :class:`Interrupted` at once, since the event loop, blocked here, could
    not run its handler until the work ends.  Hold no resource that needs an ``await`` to release."""

    def raise_now(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous: dict[int, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, raise_now)
    except ValueError:  # not the main thread: nothing to catch here
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def describe_os_error(exc: OSError) -> str:
    """One line for an ``OSError``: what failed and on which file."""
    what = exc.strerror or str(exc)
    if exc.filename is not None:
        hint = ""
        if exc.errno == errno.ENOENT:
            hint = " (does the directory exist?)" if os.path.dirname(os.fspath(exc.filename)) else ""
        return f"{what}: {os.fspath(exc.filename)}{hint}"
    return what

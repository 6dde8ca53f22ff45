"""A LocalCluster kept running on a background thread, for tests whose callers have no event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import rdmaio
from flexemr import ClusterConfig, LocalCluster, TableSpec


class BackgroundCluster:
    """``LocalCluster(specs, **kwargs)`` started on its own thread and event loop; :meth:`close` stops it."""

    def __init__(self, specs: Sequence[TableSpec], weights: Mapping[str, np.ndarray] | None = None,
                 **kwargs: Any) -> None:
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._config: ClusterConfig | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                async with LocalCluster(specs, weights=weights, **kwargs) as cluster:
                    self._config = cluster.config
                    self._started.set()
                    await self._stop.wait()
            except BaseException as exc:
                self._error = exc
                raise
            finally:
                self._started.set()

        self._thread = threading.Thread(target=lambda: rdmaio.run(main()), name="test-cluster", daemon=True)
        self._thread.start()
        self._started.wait(120)
        if self._error is not None or self._config is None:
            raise RuntimeError(f"the test cluster did not start: {self._error!r}")

    @property
    def config(self) -> ClusterConfig:
        assert self._config is not None
        return self._config

    def close(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

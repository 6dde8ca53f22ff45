"""What frees an :class:`~flexemr.EmbeddingClient` that is never closed.

A client that connected holds an rdmaio engine (or endpoints on the caller's
engine), registered staging memory and maybe background tasks; they are
released by :meth:`~flexemr.EmbeddingClient.aclose`.  If the client is
garbage collected without it, the ``weakref.finalize`` the client registered
when it connected calls :func:`leaked`: it cancels the tasks, frees the
staging memory, aborts the engine or endpoints, and warns with
:class:`ResourceWarning`, naming where the client was created
(:func:`creation_site`; asyncpg and ucx-py do the same for their
connections).  The finalizer holds the client's components, never the client.
"""

from __future__ import annotations

import logging
import sys
import warnings

from .batcher import Batcher
from .peers import Peers

__all__ = ["creation_site", "leaked"]

log = logging.getLogger(__name__)


def creation_site() -> str:
    """``file:line`` of the first caller outside flexemr (where a client is created)."""
    frame = sys._getframe(2)  # 0: here, 1: EmbeddingClient.__init__
    while frame is not None and frame.f_globals.get("__name__", "").startswith("flexemr."):
        frame = frame.f_back  # type: ignore[assignment]
    return "?" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"


def leaked(where: str, peers: Peers, *batchers: Batcher) -> None:
    """Finalizer of a client that was connected and never closed: free what can be freed now, then warn."""
    peers.closed = True  # background tasks end at their next step
    for task in [*(t for b in batchers for t in b.tasks), *peers.background_tasks()]:
        try:
            task.get_loop().call_soon_threadsafe(task.cancel)
        except RuntimeError:  # its loop is closed: the task is gone with it
            pass
    for free in (*(b.close for b in batchers), peers.abort):
        try:
            free()
        except Exception:  # noqa: BLE001 - a finalizer must not raise; what is left is freed at exit
            log.debug("freeing a leaked EmbeddingClient: %s failed", free, exc_info=True)
    warnings.warn(f"unclosed EmbeddingClient created at {where}; close it ('async with' or 'await "
                  f"client.aclose()'): its engine or endpoints and staging memory were freed by the garbage "
                  f"collector", ResourceWarning, stacklevel=2)

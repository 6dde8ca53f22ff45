"""Testing helpers for rdmaio: a Soft-RoCE VM runner, in-guest verbs/perftest checks,
and :func:`threads_stopped` for tests that freeze a peer with SIGSTOP."""

from __future__ import annotations

import os

__all__ = ["threads_stopped"]


def threads_stopped(pid: int) -> bool:
    """Whether every thread of process ``pid`` is stopped (state ``T``/``t`` in /proc).

    ``kill(pid, SIGSTOP)`` returns before the threads stop: one busy on another
    CPU can still serve a request or two.  Poll this until it is true.  Also
    true when there is nothing left to wait for: the process is gone, or there
    is no /proc.

    >>> import os
    >>> threads_stopped(os.getpid())
    False
    """
    task_dir = f"/proc/{pid}/task"
    try:
        tids = os.listdir(task_dir)
        states = []
        for tid in tids:
            with open(f"{task_dir}/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
    except OSError:  # gone (or a thread exited while we looked: look again)
        return not os.path.isdir(task_dir)
    return all(s in ("T", "t") for s in states)

"""Headless Debian Chromium driven over the DevTools protocol, for the docs site's browser test.

:class:`Chromium` starts ``/usr/bin/chromium --headless`` with a fresh profile
and ``--remote-debugging-port=0``, reads the port it picked from the
profile's ``DevToolsActivePort`` file, and talks to its one page over a
WebSocket (``websocket-client``, in the docs extra)::

    with Chromium(tmp_path) as page:
        page.open("http://127.0.0.1:8000/")
        page.wait_for("document.title")          # a JavaScript expression, polled until truthy

The flags keep it off the network (this machine has none but loopback):
without ``--disable-background-networking`` and friends Chromium waits on
component updates and sync and the page load hangs.  :func:`unavailable`
names what is missing (the browser, or the WebSocket client).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1024",
)


def unavailable() -> str | None:
    """Why a browser test cannot run here, or None."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is not installed (apt-get install --no-install-recommends chromium)"
    if importlib.util.find_spec("websocket") is None:
        return "websocket-client is not installed (pip install -e '.[docs]')"
    return None


class ChromiumError(RuntimeError):
    """Chromium did not start, or a DevTools call failed or timed out."""


class Chromium:
    """One headless Chromium with one page; a context manager that kills the browser on exit."""

    def __init__(self, profile: Path, *, timeout: float = 30.0) -> None:
        self.profile = Path(profile)
        self.timeout = timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._ws: Any = None
        self._next_id = 0

    def __enter__(self) -> Chromium:
        import websocket  # the docs extra's websocket-client

        self.profile.mkdir(parents=True, exist_ok=True)
        log = open(self.profile / "chromium.log", "wb")  # noqa: SIM115 - kept for the life of the process
        self._proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )
        log.close()
        try:
            port = self._port()
            ws_url = self._page_target(port)
            self._ws = websocket.create_connection(ws_url, timeout=self.timeout, suppress_origin=True)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None
        if self._proc is not None:
            # the browser's own process group (start_new_session): its renderers and helpers go too
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait(timeout=10)
            self._proc = None

    # -- start-up ----------------------------------------------------------------------

    def _port(self) -> int:
        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise ChromiumError(f"chromium exited with {self._proc.returncode}: {self._log_tail()}")
            if active.exists():
                first = active.read_text().split("\n", 1)[0].strip()
                if first.isdigit():
                    return int(first)
            time.sleep(0.05)
        raise ChromiumError(f"chromium did not open its DevTools port in {self.timeout:.0f} s: {self._log_tail()}")

    def _page_target(self, port: int) -> str:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=self.timeout) as resp:
                targets = json.load(resp)
            pages = [t for t in targets if t.get("type") == "page" and "webSocketDebuggerUrl" in t]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
            time.sleep(0.05)
        raise ChromiumError("chromium opened no page")

    def _log_tail(self) -> str:
        try:
            return (self.profile / "chromium.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    # -- DevTools calls ----------------------------------------------------------------

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result (events in between are dropped)."""
        self._next_id += 1
        call_id = self._next_id
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv())
            if msg.get("id") != call_id:
                continue
            if "error" in msg:
                raise ChromiumError(f"{method}: {msg['error']}")
            return dict(msg.get("result", {}))

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable results only)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise ChromiumError(f"{expression!r} threw: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float | None = None) -> Any:
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise ChromiumError(f"timed out waiting for {expression!r} (last value {value!r})")
            time.sleep(0.1)

    def open(self, url: str) -> None:
        """Navigate and wait until the page has loaded."""
        self.call("Page.navigate", url=url)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    def type_text(self, text: str) -> None:
        """Type into the focused element: the text, then a key-up (what search boxes listen to)."""
        self.call("Input.insertText", text=text)
        self.call("Input.dispatchKeyEvent", type="keyUp", key="End", code="End", windowsVirtualKeyCode=35)

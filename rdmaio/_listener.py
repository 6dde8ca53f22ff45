"""Listeners: accepting peers for an engine.

Each accepted connection gets a :class:`~rdmaio._control.ServerProtocol`;
this module is the socket glue around it and the application behind it.  A
``hello`` opens a *session*: the transport's
:class:`~rdmaio.transports.base.ServerLink` plus the channels the client
opens; the session then answers ``get_key``, ``channel_open`` (admission:
handler, channel ids, the memory budget) and ``qp_reset`` until the client
says ``bye`` or goes away.  An ``attach``/``attach_reverse`` connection is
handed to its session's link.  A peer that breaks the protocol gets an
``error`` frame and is disconnected; nobody else notices.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._channel import MAX_CHANNELS, Channel, bind_channel, make_rings, route_imm
from ._control import ServerProtocol
from ._errors import AuthenticationError, ClosedError, EndpointBrokenError, ProtocolError, UsageError
from ._keys import Access, RemoteKey
from ._sockets import receive
from .transports.base import ServerLink, SessionHooks

if TYPE_CHECKING:
    from ._core import Core, Placement

__all__ = ["Listener"]

log = logging.getLogger(__name__)


class _Session:
    """One client's control session: its transport link and the channels it opened."""

    __slots__ = ("token", "nqp", "link", "channels", "placement")

    def __init__(self, token: bytes, nqp: int) -> None:
        self.token = token
        self.nqp = nqp
        self.link: ServerLink | None = None
        self.channels: dict[int, Channel] = {}
        #: the session's worker group (the NIC that reached us) and home worker
        self.placement: Placement | None = None

    def route_imm(self, imm: int) -> None:
        route_imm(self.channels, imm)

    def fail_channels(self, exc: BaseException, qp_index: int | None = None) -> None:
        """The link can no longer write to the client on queue pair ``qp_index`` (None: on any)."""
        for chan, ch in list(self.channels.items()):
            if qp_index is None or chan % self.nqp == qp_index:
                ch._fail(EndpointBrokenError(f"client connection broke: {exc}"))


class Listener:
    """Accepts peers for an engine: answers handshakes, serves exposed keys, attaches queue pairs.

    Each accepted connection is handled on its own; a peer that sends garbage
    gets a protocol error and is disconnected, and the listener keeps serving.
    """

    def __init__(self, core: Core, host: str, port: int, backlog: int) -> None:
        self._core = core
        self._opts = core.check_started()
        self._loop = self._opts.loop
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, type_, proto, _, addr = infos[0]
        self._sock = socket.socket(family, type_, proto)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind(addr)
            self._sock.listen(backlog)
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise
        self.host, self.port = self._sock.getsockname()[:2]
        # what the transport adds: more sockets to accept on (tcp: the same-host UNIX socket)
        self._side = core.transport.listen(backlog)
        self._sessions: dict[bytes, _Session] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._answer: dict[str, Callable[[_Session, dict[str, Any]], dict[str, Any]]] = {
            "get_key": self._get_key, "channel_open": self._open_channel, "qp_reset": self._qp_reset}
        self._accepters = [self._loop.create_task(self._accept_loop(s)) for s in [self._sock, *self._side.sockets]]
        core.listeners.add(self)

    def __repr__(self) -> str:
        return f"<Listener {self.host}:{self.port}{' closed' if self._closed else ''}>"

    async def _accept_loop(self, lsock: socket.socket) -> None:
        while True:
            try:
                sock, _ = await self._loop.sock_accept(lsock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if self._closed:
                    return
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.05)
                continue
            sock.setblocking(False)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = self._loop.create_task(self._serve(sock))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    # -- socket glue ----------------------------------------------------------------------
    async def _serve(self, sock: socket.socket) -> None:
        proto = ServerProtocol(self._core.transport.name, self._core.config.secret)
        handed_off = False
        try:
            try:  # the first message, authenticated if we have a secret
                first = await asyncio.wait_for(receive(self._loop, sock, proto), self._core.config.handshake_timeout)
            except asyncio.TimeoutError:
                return
            if first is None:
                return
            if first["t"] == "hello":
                await self._serve_control(sock, proto, first)
            else:
                self._attach(sock, proto, first)
                handed_off = True
                try:
                    sock.send(proto.send({"t": "attached", "qp": first.get("qp", -1)}))
                except OSError:
                    pass  # the link's connection notices the peer is gone
        except AuthenticationError as exc:
            log.warning("%s", exc)
            self._send_last(sock, proto.data_to_send())
        except ProtocolError as exc:
            self._send_last(sock, proto.fail(exc))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            if not handed_off:
                sock.close()

    @staticmethod
    def _send_last(sock: socket.socket, data: bytes) -> None:
        try:
            sock.send(data)
        except OSError:
            pass

    async def _serve_control(self, sock: socket.socket, proto: ServerProtocol, hello: dict[str, Any]) -> None:
        core = self._core
        if len(self._sessions) >= core.config.max_sessions:
            raise ProtocolError(f"listener busy: {core.config.max_sessions} sessions already")
        hb = hello.get("hb", 0)
        # a client that announced heartbeats and then stays silent this long is gone
        silence = 10.0 * hb if isinstance(hb, (int, float)) and 0 < hb <= 60 else None
        token = secrets.token_bytes(16)
        session = _Session(token, hello["nqp"])
        self._sessions[token] = session
        try:
            local, peer = sock.getsockname(), sock.getpeername()
            session.placement = core.place(core.group_of(None, str(local[0]) if isinstance(local, tuple) else None),
                                           f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer))
            session.link = core.transport.accept(hello, session.placement.options(self._opts),
                                                 SessionHooks(session.fail_channels, session.route_imm))
            welcome = {"t": "welcome", "v": 1, "session": token, "nqp": session.nqp, **self._side.welcome,
                       **session.link.welcome()}
            await self._loop.sock_sendall(sock, proto.send(welcome))
            while True:
                try:
                    msg = await receive(self._loop, sock, proto, idle=silence)
                except asyncio.TimeoutError:
                    log.info("session closed: no heartbeat from the client for %.1f s", silence)
                    return
                if msg is None or msg["t"] == "bye":
                    return
                reply = self._answer[msg["t"]](session, msg)
                await self._loop.sock_sendall(sock, proto.send(reply))
        finally:
            self._end_session(session)

    def _attach(self, sock: socket.socket, proto: ServerProtocol, msg: dict[str, Any]) -> None:
        """Hand a data connection to its session's link (ProtocolError, the socket untouched, if refused)."""
        token = msg["session"]
        session = self._sessions.get(token) if isinstance(token, bytes) else None
        if session is None or session.link is None:
            raise ProtocolError(f"{msg['t']} names no live session")
        if proto.buffered():
            raise ProtocolError(f"data sent before the {msg['t']} connection was attached")
        if msg["t"] == "attach":
            session.link.attach(sock, msg["qp"])
        else:
            session.link.attach_reverse(sock, pull=msg.get("pull") is True)

    # -- the application: a session's requests ------------------------------------------------
    def _get_key(self, session: _Session, msg: dict[str, Any]) -> dict[str, Any]:
        mr = self._core.regions.lookup(msg["name"])
        if mr is None:
            return {"t": "error", "id": msg["id"], "code": "not_found", "message": "no such region"}
        assert session.link is not None
        return {"t": "key", "id": msg["id"], "key": session.link.key_for(mr).to_bytes()}

    def _qp_reset(self, session: _Session, msg: dict[str, Any]) -> dict[str, Any]:
        assert session.link is not None
        return session.link.reset(msg)

    def _open_channel(self, session: _Session, msg: dict[str, Any]) -> dict[str, Any]:
        """Admit a channel: a handler serves the name, a channel id and a link to write on are free,
        the client's ring key is usable, the memory budget allows our rings; then start the handler."""
        rid = msg["id"]
        core = self._core
        handler = core.channel_handlers.get(msg["name"]) if isinstance(msg["name"], str) else None
        if handler is None:
            return {"t": "error", "id": rid, "code": "no_channel", "message": f"no channel named {msg['name']!r}"}
        free = [i for i in range(MAX_CHANNELS) if i not in session.channels]
        if not free:
            return {"t": "error", "id": rid, "code": "too_many", "message": f"at most {MAX_CHANNELS} channels"}
        chan = free[0]
        assert session.link is not None
        qp = session.link.imm_qp(chan)
        if qp is None:
            return {"t": "error", "id": rid, "code": "no_reverse", "message": "attach a reverse queue pair first"}
        try:
            slots, slot_size = msg["slots"], msg["slot_size"]
            recv_ring, send_ring = make_rings(slots, slot_size)
            remote = RemoteKey.from_bytes(msg["ring"]) if isinstance(msg["ring"], bytes) else None
            if remote is None or remote.length < slots * slot_size or not remote.access & Access.WRITE \
                    or remote.transport != core.transport.name:
                raise UsageError("the client's ring key does not cover its ring with write access")
        except (UsageError, TypeError) as exc:
            return {"t": "error", "id": rid, "code": "bad_request", "message": str(exc)}
        need = recv_ring.nbytes + send_ring.nbytes
        if core.channel_bytes + need > core.config.channel_memory:
            return {"t": "error", "id": rid, "code": "busy",
                    "message": f"channel memory budget ({core.config.channel_memory} bytes) exhausted"}
        recv_mr = core.regions.register(recv_ring, Access.WRITE)
        send_mr = core.regions.register(send_ring, Access.NONE)
        core.channel_bytes += need

        def release_budget() -> None:
            core.channel_bytes -= need

        ch = bind_channel(msg["name"], chan, slots, slot_size, (recv_ring, send_ring), (recv_mr, send_mr), qp,
                          remote, session.channels, close_handshake=core.transport.close_handshake,
                          on_release=release_budget)

        async def run() -> None:
            try:
                await handler(ch)
            except (EndpointBrokenError, ClosedError):
                pass
            except Exception:
                log.exception("channel handler %r failed", msg["name"])
            finally:
                await ch.aclose()

        t = self._loop.create_task(run())
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return {"t": "channel", "id": rid, "chan": chan, "ring": session.link.key_for(recv_mr).to_bytes()}

    def _end_session(self, session: _Session) -> None:
        self._sessions.pop(session.token, None)
        for ch in list(session.channels.values()):
            ch._fail(ClosedError("the client closed its endpoint"))
            ch._abort()
        if session.link is not None:
            session.link.close()
            session.link = None
        if session.placement is not None:
            session.placement.release()

    # -- closing ------------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Stop accepting and close the sessions this listener serves. Idempotent."""
        if self._closed:
            return
        self._abort()
        tasks = [*self._accepters, *self._tasks]
        await asyncio.gather(*tasks, return_exceptions=True)

    def _abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        for t in self._accepters:
            t.cancel()
        for t in list(self._tasks):
            t.cancel()
        for s in list(self._sessions.values()):
            self._end_session(s)
        self._sock.close()
        self._side.close()
        self._core.listeners.discard(self)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def sessions(self) -> int:
        """Control sessions open now (one per connected endpoint of a peer); read-only."""
        return len(self._sessions)

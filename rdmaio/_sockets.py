"""Socket glue for the control plane (:mod:`rdmaio._control` does the protocol).

:func:`receive` pumps bytes from a socket into a protocol end until it has an
event, sending what the protocol answers by itself on the way; :func:`dial`
opens a connection and runs the client's handshake; :class:`PeerDialer` is how
an endpoint's transport reaches the peer's listener (:class:`rdmaio.transports.base.Peer`).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from ._control import ClientProtocol, ServerProtocol
from ._errors import EndpointBrokenError, ProtocolError

__all__ = ["PeerDialer", "dial", "receive"]


async def receive(loop: asyncio.AbstractEventLoop, sock: socket.socket, proto: ClientProtocol | ServerProtocol,
                  idle: float | None = None) -> dict[str, Any] | None:
    """The next event of ``proto`` from ``sock`` (None at EOF); :class:`asyncio.TimeoutError` when
    the peer sends nothing at all (not even what the protocol answers by itself) for ``idle`` s."""
    while True:
        msg = proto.next_event()
        out = proto.data_to_send()
        if out:
            await loop.sock_sendall(sock, out)
        if msg is not None:
            return msg
        if idle is None:
            data = await loop.sock_recv(sock, 65536)
        else:
            data = await _recv_within(loop, sock, idle)
        if not data:
            return None
        proto.receive_data(data)


async def _recv_within(loop: asyncio.AbstractEventLoop, sock: socket.socket, idle: float) -> bytes:
    """``sock_recv``, or :class:`asyncio.TimeoutError` after ``idle`` s of silence counted while this
    event loop was responsive: time the loop itself was stalled (a long callback, a flood of
    completions, an emulated CPU) is not held against the peer, which could not be read meanwhile."""
    recv = asyncio.ensure_future(loop.sock_recv(sock, 65536))
    step = min(idle, 0.5)
    quiet = 0.0
    try:
        while True:
            started = loop.time()
            done, _ = await asyncio.wait({recv}, timeout=step)
            if done:
                return recv.result()
            quiet += min(loop.time() - started, step)
            if quiet >= idle:
                raise asyncio.TimeoutError
    finally:
        if not recv.done():
            recv.cancel()


async def dial(loop: asyncio.AbstractEventLoop, host: str, port: int, first: dict[str, Any], *,
               secret: bytes | None, bufsize: int = 0, unix: str | None = None
               ) -> tuple[socket.socket, ClientProtocol, dict[str, Any]]:
    """Connect (to the abstract UNIX socket ``unix`` if given), send ``first``, run the handshake;
    the socket, the protocol end and the listener's answer."""
    addr: str | tuple[Any, ...]
    if unix is not None:
        family, type_, proto_no, addr = socket.AF_UNIX, socket.SOCK_STREAM, 0, "\0" + unix
    else:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, type_, proto_no, _, addr = infos[0]
    sock = socket.socket(family, type_, proto_no)
    try:
        sock.setblocking(False)
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if bufsize:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        await loop.sock_connect(sock, addr)
        proto = ClientProtocol(secret)
        await loop.sock_sendall(sock, proto.send(first))
        msg = await receive(loop, sock, proto)
        if msg is None:
            raise EndpointBrokenError("peer closed the connection during the handshake")
        return sock, proto, msg
    except BaseException:
        sock.close()
        raise


class PeerDialer:
    """One endpoint's way to its peer's listener: the control connection, then attached ones."""

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int, hello: dict[str, Any],
                 secret: bytes | None, bufsize: int) -> None:
        self._loop = loop
        self._host, self._port = host, port
        self._hello = hello
        self._secret = secret
        self._bufsize = bufsize
        #: the control connection once :meth:`hello` succeeded
        self.control: tuple[socket.socket, ClientProtocol] | None = None

    async def hello(self, fields: dict[str, Any]) -> dict[str, Any]:
        sock, proto, welcome = await dial(self._loop, self._host, self._port, {**self._hello, **fields},
                                          secret=self._secret)
        self.control = (sock, proto)
        return welcome

    async def attach(self, first: dict[str, Any], unix: str | None = None) -> socket.socket:
        sock, proto, _ = await dial(self._loop, self._host, self._port, first, secret=self._secret,
                                    bufsize=self._bufsize, unix=unix)
        if proto.buffered():
            sock.close()
            raise ProtocolError(f"peer sent data before the {first['t']} connection was attached")
        return sock

    def close(self) -> None:
        if self.control is not None:
            self.control[0].close()

"""The server metadata protocol (sans I/O).

Every embedding server exposes one read-only rdmaio region named
:data:`META_REGION` (``"flexemr/meta"``) holding exactly one blob::

    offset 0   4 bytes  magic b"FXEM"
    offset 4   u16      format version (1)
    offset 6   u16      flags (0)
    offset 8   u64      body length n
    offset 16  n bytes  msgpack map (the body)

all little-endian; the region is exactly ``16 + n`` bytes long, so a client
fetches it with ``key = await ep.remote_key("flexemr/meta")`` and one
``ep.read(..., key, 0, key.length)``.  The body is::

    {"server": "s0",                  # the server's name in the plan
     "transport": "tcp",              # the server engine's transport
     "plan": {...},                   # ShardingPlan.to_dict() of the whole plan
     "init": {"kind": "random", "seed": 0} | {"kind": "mixed", ...},
     "arena": <40-byte RemoteKey> | None,   # region holding many shards back to back
     "incarnation": 8181..,           # random u63 drawn at every server start (optional, 0 if absent)
     "layout": "plain" | "versioned", # row layout of the shard regions (optional, "plain")
     "shards": [{"region": "user/0", "table": "user", "index": 0,
                 "rows": [0, 500], "cols": [0, 64], "nbytes": 128000,
                 "key": <40-byte RemoteKey of the shard's own region>,
                 "arena_offset": 0 | None}, ...]}

With ``"versioned"`` every shard region holds slots (8-byte header + row) and
a control block (:mod:`flexemr.core.versioned`); ``nbytes`` is then the region's
size.  A client compares ``incarnation`` across reconnects to tell a restarted
server (fresh memory) from one that was only unreachable.

``key`` is the capability of the shard's own region (also exposed under its
``region_name``); when ``arena_offset`` is not ``None`` the shard's bytes also
sit at that offset of the arena region, so a client can read rows of several
shards of one server in a single ``read_batch`` on the arena key.
:func:`decode_meta` validates everything and raises
:class:`~flexemr.core.errors.MetadataError` on any malformed input.

>>> m = ServerMeta("s0", "tcp", {"servers": ["s0"]}, {"kind": "random", "seed": 1}, None, ())
>>> decode_meta(encode_meta(m)) == m
True
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import MetadataError

__all__ = ["ARENA_REGION", "HEADER", "LAYOUTS", "MAGIC", "MAX_META_BYTES", "META_REGION", "META_VERSION", "ServerMeta",
           "ShardEntry", "decode_meta", "encode_meta"]

META_REGION = "flexemr/meta"
ARENA_REGION = "flexemr/arena"
MAGIC = b"FXEM"
META_VERSION = 1
HEADER = struct.Struct("<4sHHQ")
#: Largest metadata blob a client accepts.
MAX_META_BYTES = 64 << 20


@dataclass(frozen=True)
class ShardEntry:
    """One shard a server holds: its placement, its own region key and (maybe) its arena offset."""

    region: str
    table: str
    index: int
    rows: tuple[int, int]
    cols: tuple[int, int]
    nbytes: int
    key: bytes
    arena_offset: int | None

    def to_wire(self) -> dict[str, Any]:
        return {"region": self.region, "table": self.table, "index": self.index, "rows": list(self.rows),
                "cols": list(self.cols), "nbytes": self.nbytes, "key": self.key, "arena_offset": self.arena_offset}


@dataclass(frozen=True)
class ServerMeta:
    """Decoded metadata of one server."""

    server: str
    transport: str
    plan: dict[str, Any]
    init: dict[str, Any]
    arena_key: bytes | None
    shards: tuple[ShardEntry, ...]
    incarnation: int = 0
    layout: str = "plain"


#: Row layouts a server may announce.
LAYOUTS = ("plain", "versioned")


def encode_meta(meta: ServerMeta) -> bytes:
    """Header + msgpack body, ready to be registered as the ``flexemr/meta`` region."""
    body = msgpack.packb(
        {"server": meta.server, "transport": meta.transport, "plan": meta.plan, "init": meta.init,
         "arena": meta.arena_key, "shards": [s.to_wire() for s in meta.shards],
         "incarnation": meta.incarnation, "layout": meta.layout},
        use_bin_type=True,
    )
    return HEADER.pack(MAGIC, META_VERSION, 0, len(body)) + body


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pair(v: object, what: str) -> tuple[int, int]:
    if not (isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x >= 0 for x in v) and v[0] < v[1]):
        raise MetadataError(f"shard {what} must be [start, end) with 0 <= start < end, got {v!r}")
    return int(v[0]), int(v[1])


def _shard(d: object) -> ShardEntry:
    if not isinstance(d, dict):
        raise MetadataError("shard entry is not a map")
    try:
        region, table, index, nbytes, key, off = (d["region"], d["table"], d["index"], d["nbytes"], d["key"],
                                                  d["arena_offset"])
        rows, cols = _pair(d["rows"], "rows"), _pair(d["cols"], "cols")
    except KeyError as exc:
        raise MetadataError(f"shard entry lacks {exc}") from None
    if not isinstance(region, str) or not isinstance(table, str):
        raise MetadataError("shard region and table must be strings")
    if not _is_int(index) or index < 0 or not _is_int(nbytes) or nbytes < 1:
        raise MetadataError("shard index/nbytes must be non-negative integers")
    if not isinstance(key, bytes):
        raise MetadataError("shard key must be bytes")
    if off is not None and (not _is_int(off) or off < 0):
        raise MetadataError("arena_offset must be a non-negative integer or nil")
    return ShardEntry(region, table, index, rows, cols, nbytes, key, off)


def decode_meta(blob: bytes | bytearray | memoryview) -> ServerMeta:
    """Parse a metadata region; :class:`MetadataError` on anything malformed."""
    data = bytes(blob)
    if len(data) < HEADER.size:
        raise MetadataError(f"metadata region of {len(data)} bytes is shorter than its header")
    magic, version, _flags, n = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MetadataError("not a flexemr metadata region (bad magic)")
    if version != META_VERSION:
        raise MetadataError(f"metadata format {version} is not supported (this client reads {META_VERSION})")
    if n > MAX_META_BYTES or HEADER.size + n > len(data):
        raise MetadataError(f"metadata body of {n} bytes does not fit the {len(data)}-byte region")
    try:
        body = msgpack.unpackb(data[HEADER.size : HEADER.size + n], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise MetadataError(f"undecodable metadata body: {exc}") from None
    if not isinstance(body, dict):
        raise MetadataError("metadata body is not a map")
    try:
        server, transport, plan, init, arena, shards = (body["server"], body["transport"], body["plan"],
                                                        body["init"], body["arena"], body["shards"])
    except KeyError as exc:
        raise MetadataError(f"metadata lacks {exc}") from None
    if not isinstance(server, str) or not isinstance(transport, str):
        raise MetadataError("metadata server/transport must be strings")
    if not isinstance(plan, dict) or not isinstance(init, dict):
        raise MetadataError("metadata plan/init must be maps")
    if arena is not None and not isinstance(arena, bytes):
        raise MetadataError("metadata arena key must be bytes or nil")
    if not isinstance(shards, list):
        raise MetadataError("metadata shards must be a list")
    incarnation = body.get("incarnation", 0)
    layout = body.get("layout", "plain")
    if not _is_int(incarnation) or not 0 <= incarnation < 1 << 64:
        raise MetadataError("metadata incarnation must be an unsigned 64-bit integer")
    if layout not in LAYOUTS:
        raise MetadataError(f"metadata layout must be one of {list(LAYOUTS)}, got {layout!r}")
    return ServerMeta(server, transport, plan, init, arena, tuple(_shard(s) for s in shards), incarnation, layout)

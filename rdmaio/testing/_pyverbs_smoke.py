"""RDMA READ/WRITE smoke test with pyverbs between two RC QPs on one (Soft-RoCE) device.

Run inside the Soft-RoCE VM::

    python -m rdmaio.testing.softroce -- python -m rdmaio.testing._pyverbs_smoke

Two RC QPs on the same device are connected to each other over RoCEv2 (GID index
``RDMAIO_SOFTROCE_GID_INDEX``, default 1).  QP A RDMA-WRITEs a pattern into B's
memory region, then RDMA-READs a different pattern out of B's region; both
transfers are verified byte for byte.  Prints ``OK`` and exits 0 on success,
prints ``FAIL: ...`` and exits 1 otherwise.

Uses Debian's python3-pyverbs from /usr/lib/python3/dist-packages (appended to
sys.path so it never shadows the interpreter's own packages).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

DIST_PACKAGES = "/usr/lib/python3/dist-packages"


def _import_pyverbs() -> None:
    if DIST_PACKAGES not in sys.path:
        sys.path.append(DIST_PACKAGES)


class _Side:
    """PD + CQ + MR + RC QP on a shared context."""

    def __init__(self, ctx: Any, size: int) -> None:
        import pyverbs.enums as e
        from pyverbs.cq import CQ
        from pyverbs.mr import MR
        from pyverbs.pd import PD
        from pyverbs.qp import QP, QPCap, QPInitAttr

        self.pd = PD(ctx)
        self.cq = CQ(ctx, 16)
        access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_REMOTE_READ
        self.mr = MR(self.pd, size, access)
        cap = QPCap(max_send_wr=8, max_recv_wr=8, max_send_sge=1, max_recv_sge=1)
        init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap, sq_sig_all=1)
        self.qp = QP(self.pd, init)

    def connect(self, peer_qpn: int, gid: Any, gid_index: int, port: int) -> None:
        import pyverbs.enums as e
        from pyverbs.addr import AHAttr, GlobalRoute
        from pyverbs.qp import QPAttr

        attr = QPAttr(port_num=port)
        attr.qp_access_flags = (
            e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_REMOTE_READ
        )
        attr.path_mtu = e.IBV_MTU_1024
        attr.dest_qp_num = peer_qpn
        attr.rq_psn = 0
        attr.sq_psn = 0
        attr.max_dest_rd_atomic = 4
        attr.max_rd_atomic = 4
        attr.min_rnr_timer = 12
        attr.timeout = 14
        attr.retry_cnt = 7
        attr.rnr_retry = 7
        gr = GlobalRoute(dgid=gid, sgid_index=gid_index, hop_limit=64)
        attr.ah_attr = AHAttr(port_num=port, is_global=1, gr=gr, dlid=0)
        self.qp.to_rts(attr)


def _complete(cq: Any, what: str, timeout_s: float = 10.0) -> None:
    import pyverbs.enums as e

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        n, wcs = cq.poll()
        if n:
            wc = wcs[0]
            if wc.status != e.IBV_WC_SUCCESS:
                raise RuntimeError(f"{what} completed with status {wc.status}")
            return
    raise RuntimeError(f"{what}: no completion within {timeout_s} s")


def _rdma(side: _Side, opcode: int, local_off: int, remote: _Side, remote_off: int, length: int, what: str) -> None:
    from pyverbs.wr import SGE, SendWR

    sge = SGE(side.mr.buf + local_off, length, side.mr.lkey)
    wr = SendWR(opcode=opcode, num_sge=1, sg=[sge])
    wr.set_wr_rdma(remote.mr.rkey, remote.mr.buf + remote_off)
    side.qp.post_send(wr)
    _complete(side.cq, what)


def run(device: str, gid_index: int, size: int = 4096, port: int = 1) -> None:
    """Connect two QPs on ``device`` and verify an RDMA WRITE and an RDMA READ of ``size`` bytes."""
    _import_pyverbs()
    import pyverbs.enums as e
    from pyverbs.device import Context

    ctx = Context(name=device)
    gid = ctx.query_gid(port, gid_index)
    a, b = _Side(ctx, 2 * size), _Side(ctx, 2 * size)
    a.connect(b.qp.qp_num, gid, gid_index, port)
    b.connect(a.qp.qp_num, gid, gid_index, port)

    pattern_w = bytes((i * 7 + 3) % 251 for i in range(size))
    pattern_r = bytes((i * 13 + 5) % 241 for i in range(size))
    a.mr.write(pattern_w, size, 0)
    b.mr.write(b"\0" * (2 * size), 2 * size, 0)
    b.mr.write(pattern_r, size, size)

    _rdma(a, e.IBV_WR_RDMA_WRITE, 0, b, 0, size, "RDMA WRITE")
    got_w = b.mr.read(size, 0)
    if got_w != pattern_w:
        raise RuntimeError(f"RDMA WRITE moved wrong bytes (first 16: {got_w[:16]!r})")

    _rdma(a, e.IBV_WR_RDMA_READ, size, b, size, size, "RDMA READ")
    got_r = a.mr.read(size, size)
    if got_r != pattern_r:
        raise RuntimeError(f"RDMA READ moved wrong bytes (first 16: {got_r[:16]!r})")
    if b.mr.read(size, size) != pattern_r:
        raise RuntimeError("RDMA READ modified the source buffer")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rdmaio.testing._pyverbs_smoke", description=__doc__.split("\n")[0])
    p.add_argument("--device", default=os.environ.get("RDMAIO_SOFTROCE_DEVICE", "rxe0"))
    p.add_argument("--gid-index", type=int, default=int(os.environ.get("RDMAIO_SOFTROCE_GID_INDEX", "1")))
    p.add_argument("--size", type=int, default=4096)
    args = p.parse_args(argv)
    try:
        run(args.device, args.gid_index, args.size)
    except Exception as exc:  # noqa: BLE001 - report any failure as FAIL
        print(f"FAIL: {type(exc).__name__}: {exc}")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())

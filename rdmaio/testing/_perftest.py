"""Run a perftest (ib_read_lat, ib_write_bw, ...) server and client on one RDMA device and parse the result.

Meant for use inside the Soft-RoCE VM (``rdmaio.testing.softroce``), where the device
is ``rxe0`` with RoCEv2 GID index 1 on 10.0.2.15; the defaults come from the
``RDMAIO_SOFTROCE_*`` environment variables the VM sets.  Both ends run on the same
host: the server is started in the background, the client connects to it once it
listens, and the client's result table is parsed.

From the command line (prints JSON)::

    python -m rdmaio.testing.softroce -- python -m rdmaio.testing._perftest ib_read_lat 64 1000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence

_LAT_RENAMES = (
    ("99.9% percentile[usec]", "p99.9[usec]"),
    ("99% percentile[usec]", "p99[usec]"),
)
_BW_RENAMES = (
    ("BW peak[MB/sec]", "bw_peak[MB/sec]"),
    ("BW average[MB/sec]", "bw_avg[MB/sec]"),
    ("BW peak[Gb/sec]", "bw_peak[Gb/sec]"),
    ("BW average[Gb/sec]", "bw_avg[Gb/sec]"),
)


class PerftestError(RuntimeError):
    """perftest failed to run or its output could not be parsed."""


def parse_result_table(output: str) -> dict[str, float]:
    """Parse the last result row under a ``#bytes ...`` header of perftest's output.

    Column names are kept as perftest prints them (``t_avg[usec]``, ...) except that
    multi-word headers are joined (``p99[usec]``, ``bw_avg[MB/sec]``).
    """
    header: list[str] | None = None
    row: list[str] | None = None
    for raw in output.splitlines():
        line = raw.strip()
        if line.startswith("#bytes"):
            for old, new in (*_LAT_RENAMES, *_BW_RENAMES):
                line = line.replace(old, new)
            header = line.split()
            continue
        if header is not None:
            fields = line.split()
            if len(fields) >= 2 and all(re.fullmatch(r"[-+0-9.eE]+", f) for f in fields[:2]):
                row = fields
    if header is None or row is None:
        raise PerftestError("no result table in perftest output:\n" + output[-2000:])
    result: dict[str, float] = {}
    for name, value in zip(header, row, strict=False):
        try:
            result[name] = float(value)
        except ValueError:
            continue
    return result


def _port_listening(port: int) -> bool:
    needle = f":{port:04X} "
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    if len(cols) > 3 and cols[1].endswith(needle.strip()) and cols[3] == "0A":
                        return True
        except OSError:
            continue
    return False


def run_perftest(
    tool: str,
    size: int,
    iters: int,
    *,
    device: str | None = None,
    gid_index: int | None = None,
    server_ip: str | None = None,
    port: int = 18515,
    extra_args: Sequence[str] = (),
    timeout: float = 120.0,
) -> dict[str, float | str | int]:
    """Run ``tool`` (e.g. ``ib_read_lat``) as server + client on one device and return the result.

    The returned dict holds every parsed column plus:

    * ``t_avg_usec`` (average latency, microseconds) for ``*_lat`` tools;
    * ``bw_avg_MBps`` (average bandwidth, MB/sec) for ``*_bw`` tools;
    * ``tool``, ``size``, ``iters``.
    """
    device = device or os.environ.get("RDMAIO_SOFTROCE_DEVICE", "rxe0")
    gid_index = gid_index if gid_index is not None else int(os.environ.get("RDMAIO_SOFTROCE_GID_INDEX", "1"))
    server_ip = server_ip or os.environ.get("RDMAIO_SOFTROCE_IP", "10.0.2.15")
    if shutil.which(tool) is None:
        raise PerftestError(f"{tool} not found (install the perftest package)")
    common = [tool, "-d", device, "-x", str(gid_index), "-s", str(size), "-n", str(iters), "-p", str(port), *extra_args]
    server = subprocess.Popen(common, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + min(timeout, 30.0)
        while not _port_listening(port):
            if server.poll() is not None:
                out = server.stdout.read() if server.stdout else ""
                raise PerftestError(f"{tool} server exited {server.returncode} before listening:\n{out[-2000:]}")
            if time.monotonic() > deadline:
                raise PerftestError(f"{tool} server did not listen on port {port}")
            time.sleep(0.05)
        try:
            client = subprocess.run(
                [*common, server_ip], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            raise PerftestError(f"{tool} client timed out after {timeout} s") from exc
        if client.returncode != 0:
            raise PerftestError(f"{tool} client exited {client.returncode}:\n{client.stdout[-2000:]}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if server.stdout:
            server.stdout.close()
    parsed = parse_result_table(client.stdout)
    result: dict[str, float | str | int] = {"tool": tool, "size": size, "iters": iters, **parsed}
    if tool.endswith("_lat"):
        if "t_avg[usec]" not in parsed:
            raise PerftestError(f"no t_avg[usec] column in {tool} output:\n{client.stdout[-2000:]}")
        result["t_avg_usec"] = parsed["t_avg[usec]"]
    elif tool.endswith("_bw"):
        if "bw_avg[MB/sec]" not in parsed:
            raise PerftestError(f"no BW average[MB/sec] column in {tool} output:\n{client.stdout[-2000:]}")
        result["bw_avg_MBps"] = parsed["bw_avg[MB/sec]"]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rdmaio.testing._perftest", description=__doc__.split("\n")[0])
    p.add_argument("tool", help="perftest binary, e.g. ib_read_lat, ib_read_bw, ib_write_lat, ib_write_bw")
    p.add_argument("size", type=int, help="message size in bytes")
    p.add_argument("iters", type=int, help="iterations")
    p.add_argument("--port", type=int, default=18515)
    args = p.parse_args(argv)
    try:
        result = run_perftest(args.tool, args.size, args.iters, port=args.port)
    except PerftestError as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

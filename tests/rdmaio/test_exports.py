"""The public surface of rdmaio: what ``__all__`` exports, and what ``import rdmaio`` leaves alone."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import rdmaio

# Public-looking classes and functions of rdmaio's private modules that are internal on
# purpose (transport machinery, the reference wire codec, helpers).  A new public name
# in a private module must be exported from rdmaio or added here, deliberately.
INTERNAL = {
    "rdmaio._auth": {"client_mac", "context", "new_nonce", "resolve_secret", "server_proof", "verify"},
    "rdmaio._channel": {"bind_channel", "make_rings", "pack_imm", "route_imm", "unpack_imm"},
    "rdmaio._control": {"ClientProtocol", "ServerProtocol", "State"},
    "rdmaio._core": {"Config", "Core", "Placement", "creation_site", "warn_unclosed"},
    "rdmaio._endpoint": {"open_endpoint"},
    "rdmaio._errors": {"error_for_status"},
    "rdmaio._progress": {"CompletionSink", "Connection", "Router", "Worker"},
    "rdmaio._region": {"RegionBackend", "RegionTable"},
    "rdmaio._sockets": {"PeerDialer", "dial", "receive"},
    "rdmaio._wire": {"ControlCodec", "Op", "Request", "RequestDecoder", "Response", "ResponseDecoder", "Status",
                     "encode_request", "encode_response"},
    "rdmaio.transports": {"open_transport"},
    "rdmaio.transports.base": {"ClientLink", "LinkHooks", "ListenSide", "Peer", "Pending", "QpOptions", "QueuePair",
                               "ServerLink", "SessionHooks", "Transport", "TransportOptions"},
    "rdmaio.transports.tcp": {"TcpClientLink", "TcpQueuePair", "TcpResponder", "TcpServerLink", "TcpTransport",
                              "can_pull", "describe_death", "host_identity", "peer_pid"},
    "rdmaio.transports._ibv": {"VerbsContext", "VerbsWorker", "as_int", "check_device_args", "check_remote",
                               "check_remote_batch", "parse_qp_attrs", "unavailable_reason"},
    "rdmaio.transports.verbs": {"VerbsClientLink", "VerbsQueuePair", "VerbsServerLink", "VerbsTransport"},
}

#: subpackages that are internal as a whole (their modules need not start with "_")
INTERNAL_PACKAGES = ["rdmaio.transports"]


def _private_modules() -> list[str]:
    mods = [f"rdmaio.{m.name}" for m in pkgutil.iter_modules(rdmaio.__path__) if m.name.startswith("_") and not m.ispkg]
    for pkg in INTERNAL_PACKAGES:
        path = importlib.import_module(pkg).__path__
        mods += [pkg] + [f"{pkg}.{m.name}" for m in pkgutil.iter_modules(path) if not m.ispkg]
    return sorted(mods)


def _public_defs(modname: str) -> set[str]:
    mod = importlib.import_module(modname)
    return {name for name, obj in vars(mod).items()
            if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
            and getattr(obj, "__module__", None) == modname}


def test_every_exported_name_exists_and_looks_public() -> None:
    for name in rdmaio.__all__:
        assert hasattr(rdmaio, name), name
        assert not name.startswith("_"), name
        assert getattr(rdmaio, name).__module__.startswith("rdmaio."), name


def test_all_is_sorted_without_duplicates() -> None:
    assert len(set(rdmaio.__all__)) == len(rdmaio.__all__)
    assert list(rdmaio.__all__) == sorted(rdmaio.__all__)


def test_public_definitions_of_private_modules_are_exported_or_known_internal() -> None:
    exported = {id(getattr(rdmaio, n)) for n in rdmaio.__all__}
    for modname in _private_modules():
        mod = importlib.import_module(modname)
        for name in sorted(_public_defs(modname)):
            if id(getattr(mod, name)) in exported:
                continue
            assert name in INTERNAL.get(modname, set()), (
                f"{modname}.{name} is public-looking but neither in rdmaio.__all__ nor in INTERNAL")


def test_internal_allowlist_is_not_stale() -> None:
    for modname, names in INTERNAL.items():
        missing = names - _public_defs(modname)
        assert not missing, f"INTERNAL lists names {modname} no longer defines: {sorted(missing)}"


def test_exports_are_re_exported_from_where_they_are_defined() -> None:
    for name in rdmaio.__all__:
        obj = getattr(rdmaio, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            home = importlib.import_module(obj.__module__)
            assert getattr(home, name) is obj, name
            assert name in getattr(home, "__all__", ()), f"{obj.__module__}.__all__ lacks {name}"


def test_import_changes_nothing_global_and_loads_no_verbs() -> None:
    code = """
import json, logging, os, sys
handlers, level, env = list(logging.root.handlers), logging.root.level, dict(os.environ)
import rdmaio
print(json.dumps({
    "handlers_same": logging.root.handlers == handlers,
    "level_same": logging.root.level == level,
    "rdmaio_handlers": [type(h).__name__ for h in logging.getLogger("rdmaio").handlers],
    "env_same": dict(os.environ) == env,
    "verbs_modules": sorted(m for m in sys.modules if "pyverbs" in m or m.endswith("_rdmaio_verbs")),
}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    state = json.loads(out.stdout)
    assert state == {"handlers_same": True, "level_same": True, "rdmaio_handlers": [], "env_same": True,
                     "verbs_modules": []}


def test_package_is_typed() -> None:
    assert (Path(rdmaio.__file__).parent / "py.typed").is_file()

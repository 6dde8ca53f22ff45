"""Every shell command of docs/quickstart.md and docs/deployment.md runs as written, from a fresh checkout.

The tracked files of this checkout are copied to a temporary directory, so
the docs' own install commands (``make demo``, ``bash scripts/install.sh``)
create a new ``.venv`` there; nothing of the developer's ``.venv`` is used
(it is taken off ``PATH``, ``VIRTUAL_ENV`` and ``PYTHONPATH`` are dropped).

Convention of the docs (HTML comments at the top of both pages repeat it):

* every ```` ```sh ```` block holds commands to run, one per line (``\\``
  continues a line), in order; comment lines are not commands. Anything else
  goes in a block of another language (``text``, ``console``, ``toml``,
  ``ini``, ``python``); a block without a language is an error;
* commands run with bash in a *shell*, whose environment and working
  directory carry over from one command to the next (``source
  .venv/bin/activate`` works as in a terminal). A shell starts at the top of
  the checkout;
* quickstart.md: one shell on this machine;
* deployment.md: a line ``# on HOST`` runs the commands below it on that
  host, ``# on every host`` on each host in turn. The hosts (emb0, emb1, emb2,
  ranker) are network namespaces on one bridge that resolve each other's
  names (:class:`tests.flexemr.netns.HostsLab`), each with its own shell.
  They share this machine's file system, so a file written on one host is
  there on every host. They have no route off this machine: their
  ``scripts/install.sh`` finds everything in the checkout's ``.venv``, which
  the quickstart's ``make demo`` made (when the deployment test runs alone,
  it runs ``bash scripts/install.sh`` on this machine first), and their
  shells set ``PIP_RETRIES=0`` so that pip's look-ups of unreachable indexes
  fail at once instead of after a minute of retries;
* ``flexemr serve ...`` runs in the background; the test goes on once it has
  printed its ready line. Every other command must exit with code 0. At the
  end each server gets SIGTERM and must exit with code 0, as documented;
* no sh block may force ``--transport verbs``: there is no RDMA device here
  (the verbs suite runs in the Soft-RoCE VM).

README.md's commands are ``make demo`` (run here through the quickstart, which
must contain it) and ``make test`` (the suite this test belongs to; only its
Makefile target is checked, with ``make -n``).

Each test prints how many commands it ran and checks that this is the number
of commands its page contains.  The deployment test needs root for the
namespaces: it skips with the reason elsewhere and fails under ``CI=true``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from .netns import HostsLab, require

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "docs" / "quickstart.md"
DEPLOYMENT = ROOT / "docs" / "deployment.md"
README = ROOT / "README.md"

HOSTS = ("emb0", "emb1", "emb2", "ranker")
EVERY_HOST = "every host"
LANGUAGES = {"sh", "text", "console", "toml", "ini", "python"}
FENCE = re.compile(r"^```(.*)$")
ON_LINE = re.compile(r"^#\s*on\s", re.IGNORECASE)
ON = re.compile(r"^# on (every host|[a-z][a-z0-9-]*)$")
SERVE = re.compile(r"^(\S*/)?flexemr serve\b")
READY = re.compile(r"^flexemr: server (\S+) ready on (\S+):(\d+) ", re.MULTILINE)

COMMAND_TIMEOUT = 360.0  # make demo: a fresh install and the demo, on a loaded 2-core machine
READY_TIMEOUT = 120.0
STOP_TIMEOUT = 20.0

pytestmark = pytest.mark.timeout(600)


# ------------------------------------------------------------------ parsing the docs


@dataclass(frozen=True)
class DocCommand:
    """One command of a sh block: where it is, which host runs it (``None``: this machine), its text."""

    doc: str
    line: int
    host: str | None
    text: str

    @property
    def background(self) -> bool:
        return bool(SERVE.match(self.text))

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def doc_commands(path: Path) -> list[DocCommand]:
    """The commands of ``path``'s sh blocks, in order (module docstring: the convention)."""
    lines = path.read_text().splitlines()
    out: list[DocCommand] = []
    lang: str | None = None  # language of the open block, None outside blocks
    host: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if lang is None:
            if fence:
                lang = fence.group(1).strip()
                assert lang in LANGUAGES, (
                    f"{path.name}:{i + 1}: a code block needs one of the languages {sorted(LANGUAGES)}, got {lang!r}")
            i += 1
            continue
        if fence:
            assert fence.group(1).strip() == "", f"{path.name}:{i + 1}: a block opens inside a block"
            lang = None
            i += 1
            continue
        text = line.strip()
        if lang != "sh" or not text:
            i += 1
            continue
        if text.startswith("#"):
            if ON_LINE.match(text):
                on = ON.match(text)
                assert on, f"{path.name}:{i + 1}: write '# on HOST' or '# on every host', got {text!r}"
                host = on.group(1)
            i += 1
            continue
        start = i
        while lines[i].endswith("\\"):
            i += 1
            assert i < len(lines) and not FENCE.match(lines[i]), f"{path.name}:{start + 1}: '\\' before the end"
        out.append(DocCommand(path.name, start + 1, host, "\n".join(lines[start : i + 1])))
        i += 1
    assert lang is None, f"{path.name}: a code block is not closed"
    for cmd in out:
        assert not re.search(r"--transport[ =]verbs", cmd.text), (
            f"{cmd}: sh blocks run on hosts without RDMA; describe verbs in prose or a text block")
    return out


def test_docs_parse_as_the_convention_says(tmp_path: Path) -> None:
    """The parser itself: hosts, continuations, comments, other languages, and what it rejects."""
    page = tmp_path / "page.md"
    page.write_text("text\n\n```sh\nmake demo   # comment\n# a comment\n\n```\n\n```text\nnot run\n```\n"
                    "```sh\n# on every host\nbash x.sh\n# on emb0\nflexemr serve --config c \\\n"
                    "    --server s0\n.venv/bin/flexemr rank\n```\n")
    cmds = doc_commands(page)
    assert [(c.line, c.host, c.text, c.background) for c in cmds] == [
        (4, None, "make demo   # comment", False),
        (14, "every host", "bash x.sh", False),
        (16, "emb0", "flexemr serve --config c \\\n    --server s0", True),
        (18, "emb0", ".venv/bin/flexemr rank", False)]
    for bad, why in [("```\nls\n```\n", "needs one of the languages"),
                     ("```sh\n# On Emb0\nls\n```\n", "write '# on HOST'"),
                     ("```sh\nflexemr rank --transport verbs\n```\n", "without RDMA"),
                     ("```sh\nls\n", "not closed")]:
        page.write_text(bad)
        with pytest.raises(AssertionError, match=why):
            doc_commands(page)


# ------------------------------------------------------------------ running them


def _clean_env() -> dict[str, str]:
    """This process's environment without any trace of the developer's venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP") and not k.startswith("PYTEST_")}
    drop = {str(ROOT / ".venv" / "bin")}
    if os.environ.get("VIRTUAL_ENV"):
        drop.add(str(Path(os.environ["VIRTUAL_ENV"]) / "bin"))
    if sys.prefix != sys.base_prefix:  # pytest runs from a venv: its bin/ stays out too
        drop.add(str(Path(sys.prefix) / "bin"))
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", os.defpath).split(os.pathsep)
                                  if p and os.path.normpath(p) not in drop)
    return env


def _tail(path: Path, n: int = 60) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(lines[-n:])


def _kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


@dataclass
class Server:
    """A ``flexemr serve`` started from the docs."""

    command: DocCommand
    host: str
    proc: subprocess.Popen[bytes]
    log: Path
    name: str = ""


@dataclass
class Shell:
    """A terminal on one host: environment and working directory carry over from command to command."""

    host: str
    prefix: list[str]       # e.g. ["ip", "netns", "exec", NS]
    env: dict[str, str]
    cwd: Path
    logs: Path
    runs: int = 0

    def _log(self, tag: str) -> Path:
        self.runs += 1
        return self.logs / f"{self.host.replace(' ', '_')}-{self.runs:02d}-{tag}.log"

    def run(self, cmd: DocCommand) -> None:
        """Run ``cmd`` to completion; it must exit 0."""
        log, state = self._log("run"), self.logs / f"{self.host.replace(' ', '_')}.state"
        script = (f"{cmd.text}\n__doc_rc=$?\nenv -0 > {state}.env\npwd > {state}.cwd\nexit $__doc_rc\n")
        t0 = time.monotonic()
        with open(log, "wb") as out:
            proc = subprocess.Popen([*self.prefix, "bash", "-c", script], cwd=self.cwd, env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(COMMAND_TIMEOUT)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.wait()
                raise AssertionError(f"[{self.host}] {cmd}\ndid not finish within {COMMAND_TIMEOUT:.0f} s; "
                                     f"output:\n{_tail(log)}") from None
            finally:
                _kill_group(proc)  # nothing a command started outlives it (a server is not run this way)
        assert rc == 0, f"[{self.host}] {cmd}\nexited with {rc}; output:\n{_tail(log)}"
        raw = Path(f"{state}.env").read_bytes().split(b"\0")
        env = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
        self.env = {k: v for k, v in env.items() if k not in ("_", "SHLVL", "PWD", "OLDPWD")}
        self.cwd = Path(Path(f"{state}.cwd").read_text().strip())
        first, *more = cmd.text.splitlines()
        print(f"  [{self.host}] {first}{' ...' if more else ''}  ok ({time.monotonic() - t0:.1f} s)", flush=True)

    def start(self, cmd: DocCommand) -> Server:
        """Start a ``flexemr serve`` command in the background and wait for its ready line."""
        log = self._log("serve")
        t0 = time.monotonic()
        with open(log, "wb") as out:
            proc = subprocess.Popen([*self.prefix, "bash", "-c", cmd.text], cwd=self.cwd, env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        server = Server(cmd, self.host, proc, log)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            ready = READY.search(log.read_text(errors="replace"))
            if ready:
                server.name = ready.group(1)
                assert ready.group(2) == self.host, (
                    f"[{self.host}] {cmd}\nserver {server.name} is ready on {ready.group(2)}: it belongs on that host")
                break
            assert proc.poll() is None, f"[{self.host}] {cmd}\nexited with {proc.returncode}:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"[{self.host}] {cmd}\nno ready line in {READY_TIMEOUT:.0f} s"
            time.sleep(0.1)
        print(f"  [{self.host}] {cmd.text}  ready ({time.monotonic() - t0:.1f} s; runs in the background)",
              flush=True)
        return server


def stop_servers(servers: Sequence[Server]) -> None:
    """SIGTERM every server; each must exit with code 0 (docs: SIGINT/SIGTERM shut it down cleanly)."""
    for s in servers:
        _kill_group(s.proc, signal.SIGTERM)
    for s in servers:
        try:
            rc = s.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"[{s.host}] server {s.name} ignored SIGTERM for {STOP_TIMEOUT:.0f} s") from None
        assert rc == 0, f"[{s.host}] server {s.name} exited with {rc} on SIGTERM:\n{_tail(s.log)}"


def check_secret(lab: HostsLab, ranker: Shell, config: Path) -> None:
    """What section 1 says of the secret: the file has one and is private; without it, or with another, a ranker is refused."""
    text = config.read_text()
    assert re.search(r'^\[cluster\]\nsecret = "[0-9a-f]{32}"$', text, re.MULTILINE), "no [cluster] secret"
    assert config.stat().st_mode & 0o077 == 0, f"{config} is readable by others: {oct(config.stat().st_mode)}"
    flexemr = config.parent / ".venv" / "bin" / "flexemr"
    for name, edit, says in [
            ("none", lambda t: re.sub(r"^\[cluster\]\nsecret = .*\n", "", t, flags=re.MULTILINE),
             "the cluster file has no [cluster] secret"),
            ("wrong", lambda t: re.sub(r'^secret = ".*"$', 'secret = "not-the-secret"', t, flags=re.MULTILINE),
             "the cluster file's [cluster] secret differs from the server's")]:
        other = config.with_name(f"cluster-{name}-secret.toml")
        other.write_text(edit(text))
        proc = subprocess.run(lab.argv("ranker", [str(flexemr), "rank", "--config", str(other), "--generate", "1"]),
                              env=ranker.env, cwd=ranker.cwd, capture_output=True, text=True, timeout=120)
        lines = proc.stderr.splitlines()
        assert proc.returncode == 1 and len(lines) == 1, (proc.returncode, proc.stderr)
        assert lines[0].startswith("flexemr rank: error: cannot connect to server") and says in lines[0], lines[0]
        other.unlink()


# ------------------------------------------------------------------ the checkout


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A copy of this checkout's tracked files (as they are in the work tree), without any .venv."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        reason = f"{ROOT} is not a git checkout (or git is missing): its tracked files cannot be listed"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("docs")
    dest = base / "flexemr"
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], check=True, capture_output=True).stdout
    for name in filter(None, listed.split(b"\0")):
        src = ROOT / os.fsdecode(name)
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the work tree
        dst = dest / os.fsdecode(name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst, follow_symlinks=False)
    assert (dest / "Makefile").exists() and not (dest / ".venv").exists()
    (base / "logs").mkdir()
    try:
        yield dest
    finally:
        shutil.rmtree(base, ignore_errors=True)  # the fresh .venv is a few hundred MB


def _report(doc: Path, cmds: Sequence[DocCommand], ran: int, runs: int, hosts: int, seconds: float) -> None:
    where = f"{runs} runs on {hosts} hosts" if hosts > 1 else "on this machine"
    print(f"{doc.relative_to(ROOT)}: ran {ran} of its {len(cmds)} commands ({where}) in {seconds:.0f} s")
    assert ran == len(cmds), f"ran {ran} commands, {doc.name} has {len(cmds)}"


# ------------------------------------------------------------------ the tests


def test_quickstart_commands(checkout: Path) -> None:
    readme = [c.text.split("#")[0].strip() for c in doc_commands(README)]
    assert readme == ["make demo", "make test"], f"README.md's commands changed: {readme}; update this test"
    cmds = doc_commands(QUICKSTART)
    assert "make demo" in [c.text.split("#")[0].strip() for c in cmds], "quickstart.md must run README's make demo"
    assert all(c.host is None for c in cmds), "quickstart.md runs on one machine: no '# on HOST' lines"
    # make test is the suite this test runs in: only its target is checked
    dry = subprocess.run(["make", "-n", "test"], cwd=checkout, capture_output=True, text=True, timeout=60,
                         env=_clean_env())
    assert dry.returncode == 0 and "scripts/test.sh" in dry.stdout, dry.stdout + dry.stderr

    shell = Shell("this machine", [], _clean_env(), checkout, checkout.parent / "logs")
    t0 = time.monotonic()
    ran = 0
    print(f"\n{QUICKSTART.relative_to(ROOT)}: {len(cmds)} commands, in {checkout}")
    servers: list[Server] = []
    try:
        for cmd in cmds:
            if cmd.background:
                servers.append(shell.start(cmd))
            else:
                shell.run(cmd)
            ran += 1
        stop_servers(servers)
    finally:
        for s in servers:
            _kill_group(s.proc)
            s.proc.wait()
    # what the page promises: the fresh .venv, the demo's report in the checkout, flexemr on PATH afterwards
    assert (checkout / ".venv" / "bin" / "python").exists()
    for name in ("report.json", "report.png"):
        assert (checkout / name).stat().st_size > 0, f"make demo wrote no {name}"
    flexemr = shutil.which("flexemr", path=shell.env.get("PATH"))
    assert flexemr == str(checkout / ".venv" / "bin" / "flexemr"), f"flexemr on the shell's PATH: {flexemr}"
    _report(QUICKSTART, cmds, ran, shell.runs, 1, time.monotonic() - t0)


def test_deployment_commands(checkout: Path) -> None:
    require(bridge=True)
    cmds = doc_commands(DEPLOYMENT)
    used = {c.host for c in cmds}
    assert None not in used, [str(c) for c in cmds if c.host is None][:1]
    assert used - {EVERY_HOST} == set(HOSTS), f"deployment.md uses hosts {sorted(map(str, used))}, the lab {HOSTS}"
    for want in ("flexemr gen cluster", "flexemr serve", "flexemr rank"):
        assert any(want in c.text for c in cmds), f"deployment.md has no {want!r} command"

    t0 = time.monotonic()
    if not (checkout / ".venv" / ".installed").exists():  # run alone: the hosts cannot download (module docstring)
        print("\nno .venv from the quickstart: bash scripts/install.sh on this machine first")
        Shell("this machine", [], _clean_env(), checkout, checkout.parent / "logs").run(
            DocCommand("(set-up)", 0, None, "bash scripts/install.sh"))
    ran = 0
    servers: list[Server] = []
    with HostsLab(HOSTS) as lab:
        print(f"\n{DEPLOYMENT.relative_to(ROOT)}: {len(cmds)} commands on hosts {', '.join(HOSTS)} "
              f"({lab.subnet}, bridge {lab.bridge}), in {checkout}")
        env = {**_clean_env(), "PIP_RETRIES": "0"}  # no route off the lab: pip's index look-ups fail at once
        shells = {h: Shell(h, lab.argv(h, []), env, checkout, checkout.parent / "logs") for h in HOSTS}
        try:
            for cmd in cmds:
                assert cmd.host is not None
                for host in HOSTS if cmd.host == EVERY_HOST else (cmd.host,):
                    if cmd.background:
                        servers.append(shells[host].start(cmd))
                    else:
                        shells[host].run(cmd)
                ran += 1
            assert sorted(s.name for s in servers) == ["s0", "s1", "s2"], [s.name for s in servers]
            check_secret(lab, shells["ranker"], checkout / "cluster.toml")
            stop_servers(servers)
        finally:
            for s in servers:
                _kill_group(s.proc)
                s.proc.wait()
    runs = sum(s.runs for s in shells.values())
    _report(DEPLOYMENT, cmds, ran, runs, len(HOSTS), time.monotonic() - t0)

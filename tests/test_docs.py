"""The documentation stays true: the site builds strictly and renders, and docstring examples run.

The docs site (mkdocs.yml; ``make docs``) renders the API pages from the
docstrings.  The tests that build it or open it in headless Chromium skip with
the exact reason when the docs extra (``pip install -e '.[docs]'``) or
``/usr/bin/chromium`` is missing, and fail instead under CI (``CI=true``),
where ``scripts/test.sh`` installs both.
"""

from __future__ import annotations

import doctest
import functools
import http.server
import importlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import chromium

# building the site takes ~10 s on an idle machine; give the first test that needs it room on a busy one
pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rdmaio", "flexemr", "flexemr.torch", "flexemr.ray")
DOCS_TOOLS = (("mkdocs", "mkdocs"), ("material", "mkdocs-material"), ("mkdocstrings_handlers.python", "mkdocstrings[python]"))


def require(what: str, reason: str | None) -> None:
    """Skip the calling test with ``reason``; under ``CI=true`` fail instead (CI installs the docs tools)."""
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} unavailable in CI: {reason}")
    pytest.skip(reason)


def docs_tools_missing() -> str | None:
    for module, dist in DOCS_TOOLS:
        if importlib.util.find_spec(module) is None:
            return f"{dist} is not installed (pip install -e '.[docs]', or make docs)"
    return None


def mkdocs_build(config: Path, site_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site_dir)],
        cwd=config.parent, capture_output=True, text=True, timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def html_text(site: Path, package: str) -> str:
    return (site / "api" / package / "index.html").read_text()


def html_ids(page: Path) -> set[str]:
    return set(re.findall(r'\bid="([^"]+)"', page.read_text()))


# -- docstring examples and the index ----------------------------------------------------


# the Engine example is a real round trip over loopback (two engines, one listener)
@pytest.mark.parametrize("module", ["rdmaio._keys", "rdmaio._wire", "rdmaio._run", "rdmaio._engine"])
def test_docstring_examples_run(module: str) -> None:
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0, f"{module} has no doctest examples any more"
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {module} (output above)"


def test_docs_index_links_resolve() -> None:
    """Every relative link in docs/index.md names an existing file (planned pages are not linked)."""
    index = (ROOT / "docs" / "index.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", index):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / "docs" / target).exists(), f"docs/index.md links to missing {target}"


# -- the site ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built with ``mkdocs build --strict`` (any warning fails it: broken links, anchors, references)."""
    require("the docs tools", docs_tools_missing())
    out = tmp_path_factory.mktemp("site")
    proc = mkdocs_build(ROOT / "mkdocs.yml", out)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}{proc.stderr[-6000:]}"
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_api_page_lists_every_export(site: Path, package: str) -> None:
    """The API page has a heading (anchor ``package.Name``) for each name in ``__all__``, and no other top-level name."""
    if package == "flexemr.torch":
        pytest.importorskip("torch", reason="the torch extra is not installed here (make torch); CI installs it")
    exports = importlib.import_module(package).__all__
    ids = html_ids(site / "api" / package / "index.html")
    missing = [name for name in exports if f"{package}.{name}" not in ids]
    assert not missing, f"docs/api/{package}.md does not render {missing} from {package}.__all__"
    top_level = {i[len(package) + 1:] for i in ids if re.fullmatch(rf"{re.escape(package)}\.\w+", i)}
    assert top_level == set(exports), f"names on the page that are not in __all__: {sorted(top_level - set(exports))}"
    raw_roles = sorted(set(re.findall(r":(?:class|func|meth|attr|data|mod|exc|obj):`[^`]*`", html_text(site, package))))
    assert not raw_roles, f"reST roles left unconverted on the {package} API page: {raw_roles}"


def test_api_page_has_members_and_docstrings(site: Path) -> None:
    page = html_text(site, "rdmaio")
    assert 'id="rdmaio.Endpoint.read_batch"' in page
    import rdmaio

    first_line = (rdmaio.Endpoint.__doc__ or "").strip().splitlines()[0]
    assert first_line and first_line in page, "Endpoint's docstring is not on the rdmaio API page"


def test_strict_build_fails_on_broken_links(tmp_path: Path) -> None:
    """The configuration turns broken links, anchors and cross-references into failures of the strict build."""
    require("the docs tools", docs_tools_missing())
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    for package in PACKAGES:  # the API pages are the slow part and beside the point here
        (tmp_path / "docs" / "api" / f"{package}.md").write_text(f"# {package}\n")
    with (tmp_path / "docs" / "index.md").open("a") as f:
        f.write("\n[a](no-such-page.md) [b](quickstart.md#no-such-anchor) [c][rdmaio.NoSuchName]\n")
    proc = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"the strict build passed with broken links:\n{out[-3000:]}"
    warnings = [line for line in out.splitlines() if line.startswith("WARNING")]
    for needle in ("no-such-page.md", "#no-such-anchor", "rdmaio.NoSuchName"):
        assert any(needle in w for w in warnings), f"no warning about {needle}:\n{out[-3000:]}"
    assert len(warnings) == 3, "\n".join(warnings)


# -- the docstring extension (docs/rst_docstrings.py) ---------------------------------------

FAKE_INIT = '''"""Fake package: see :class:`Thing`."""
from ._impl import Thing, helper

__all__ = ["Thing", "helper"]
'''

FAKE_IMPL = '''
class _Private:
    """Not on the page."""


class Thing:
    """A thing: :meth:`run`, :class:`_Private`, :func:`asyncio.run` and :class:`KeyError`.

    Make one::

        t = Thing()

    >>> [[64]]
    [[64]]

    Parameters
    ----------
    x:
        The x.

    Use it with care (prose after the parameters).
    """

    def __init__(self, x: int = 0) -> None:
        self.x = x

    def run(self) -> None:
        """Run :func:`~fakepkg._impl.helper`."""


def helper() -> None:
    """See :class:`NoSuchThing`."""
'''


def test_docstring_extension(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Roles become cross-references (public), code (private, external) or a warning (missing)."""
    require("the docs tools", docs_tools_missing())
    import griffe

    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(FAKE_INIT)
    (pkg / "_impl.py").write_text(FAKE_IMPL)
    extensions = griffe.load_extensions({str(ROOT / "docs" / "rst_docstrings.py"): {"packages": ["fakepkg"]}})
    with caplog.at_level(logging.INFO, logger="griffe"):
        loaded = griffe.load("fakepkg", search_paths=[str(tmp_path)], extensions=extensions)
    thing = loaded["Thing"].docstring.value
    assert "[`run()`][fakepkg.Thing.run]" in thing
    assert "`_Private`" in thing and "[`_Private`]" not in thing
    assert "`asyncio.run()`" in thing and "`KeyError`" in thing
    assert "Make one:\n" in thing and "::" not in thing
    assert "```pycon\n>>> [[64]]\n[[64]]\n```" in thing
    assert "Notes\n-----\nUse it with care" in thing
    assert "[`helper()`][fakepkg.helper]" in loaded["Thing.run"].docstring.value
    assert "[`Thing`][fakepkg.Thing]" in loaded.docstring.value
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("fakepkg._impl.helper" in w and "NoSuchThing" in w for w in warnings), warnings
    assert len(warnings) == 1, warnings


# -- the site in a browser ---------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    """The built site over HTTP on 127.0.0.1 (search needs http: it fetches its index)."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="docs-site", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def page(served: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[chromium.Chromium]:
    require("headless Chromium", chromium.unavailable())
    with chromium.Chromium(tmp_path_factory.mktemp("chromium-profile")) as browser:
        yield browser


def test_browser_renders_index(served: str, page: chromium.Chromium) -> None:
    page.open(f"{served}/")
    assert "FlexEMR" in page.evaluate("document.title")
    heading = page.wait_for("document.querySelector('article h1')?.innerText")
    assert heading.strip(), "the index has no heading"
    links = page.evaluate("[...document.querySelectorAll('article a')].map(a => a.getAttribute('href'))")
    assert any(h.startswith("api/rdmaio") for h in links), f"the index does not link the rdmaio API page: {links}"


def test_browser_renders_endpoint_api(served: str, page: chromium.Chromium) -> None:
    import rdmaio

    page.open(f"{served}/api/rdmaio/#rdmaio.Endpoint")
    text = page.wait_for("document.getElementById('rdmaio.Endpoint')?.parentElement.innerText")
    first_line = (rdmaio.Endpoint.__doc__ or "").strip().splitlines()[0]
    assert first_line in " ".join(text.split()), f"Endpoint's docstring is not rendered:\n{text[:1000]}"
    assert "read_batch" in text
    box = page.evaluate(
        "(r => [r.top, r.height])(document.getElementById('rdmaio.Endpoint').getBoundingClientRect())"
    )
    assert box[1] > 0 and 0 <= box[0] < 1024, f"the Endpoint heading is not shown in the window: {box}"


def test_browser_search_finds_read_batch(served: str, page: chromium.Chromium) -> None:
    page.open(f"{served}/")
    page.wait_for("!!document.querySelector('input.md-search__input')")
    page.evaluate("document.querySelector('input.md-search__input').focus()")
    page.type_text("read_batch")
    hrefs = page.wait_for(
        "(items => items.length && items.map(li => li.querySelector('a').getAttribute('href')))"
        "([...document.querySelectorAll('.md-search-result__item')].filter(li => li.innerText.includes('read_batch')))"
    )
    assert any("api/rdmaio/" in href for href in hrefs), f"no search result on the rdmaio API page: {hrefs}"

"""Griffe extension: read rdmaio's and flexemr's reST-flavoured docstrings as Markdown.

The docstrings are numpy-style (``Parameters`` sections, parsed by griffe) with
reST inline markup, which Markdown does not know.  Before mkdocstrings renders a
package, this rewrites every docstring in it:

* Sphinx roles (``:class:`X```, ``:meth:`~a.b```, ...) are resolved the way
  Python resolves the name in the docstring's scope (class, then module, then
  absolute).  A target that is on one of the API pages (a name in a package's
  ``__all__``, or a public member defined in such a class) becomes a
  cross-reference to it, which the strict build checks; a private or external
  target (``flexemr._cache.RowCache``, ``asyncio.run``, ``KeyError``) becomes
  inline code.  A target of rdmaio or flexemr that does not exist at all is a
  broken reference: it is logged as a warning, so ``mkdocs build --strict``
  fails.
* Doctest blocks (``>>>`` lines and their output) become ``pycon`` code
  fences, and a reST ``text::`` literal-block marker becomes ``text:`` (the
  indented block after it is already a Markdown code block).
* Prose that follows a ``Parameters`` section without a section header of its
  own would be read as more parameters; it is put under a ``Notes`` header and
  logged (info), so the docstring can be fixed at its source.

Loaded by mkdocs.yml (mkdocstrings ``extensions``); not part of the packages.
"""

from __future__ import annotations

import builtins
import importlib.util
import re
from typing import Any

import griffe

logger = griffe.get_logger("griffe")

DEFAULT_PACKAGES = ("rdmaio", "flexemr")

_ROLE = re.compile(r":(?:py:)?(class|func|meth|attr|data|const|mod|exc|obj):`([^`]+)`")
_FENCE = re.compile(r"^\s*```")
_PARAM_SPEC = re.compile(r"^\*{0,2}\w+(\s*,\s*\*{0,2}\w+)*\s*(:.*)?$")
_SECTION_HEADS = ("parameters", "other parameters")


def _target(obj: Any) -> Any:
    """The object an alias (an import) stands for, or None when it cannot be resolved."""
    try:
        return obj.final_target if obj.is_alias else obj
    except Exception:  # noqa: BLE001 - unresolvable (external) alias
        return None


def _member(obj: Any, name: str) -> Any:
    """Member ``name`` of ``obj`` (inherited ones too for classes), resolved; None if absent."""
    try:
        members = obj.all_members if obj.is_class else obj.members
    except Exception:  # noqa: BLE001
        return None
    child = members.get(name)
    return None if child is None else _target(child)


def _external(dotted: str, packages: tuple[str, ...]) -> bool:
    """A builtin (``KeyError``) or a name in an importable module other than ours (``numpy.dtype``)."""
    first = dotted.split(".", 1)[0]
    if hasattr(builtins, first):
        return True
    if first in packages:
        return False
    try:
        return importlib.util.find_spec(first) is not None
    except (ImportError, ValueError):
        return False


class RstDocstrings(griffe.Extension):
    """Rewrite the docstrings of a loaded package from reST markup to Markdown."""

    def __init__(self, packages: list[str] | tuple[str, ...] = DEFAULT_PACKAGES) -> None:
        super().__init__()
        self.packages = tuple(packages)
        self._public: dict[str, dict[str, str]] = {}  # package -> {canonical path: documented path}

    # -- where an object is documented -------------------------------------------------

    def _documented(self, loader: griffe.GriffeLoader, root: str) -> dict[str, str]:
        """Canonical path -> path on the API page, for the names the page of ``root`` renders."""
        if root not in self._public:
            pages: dict[str, str] = {}
            pkg = self._load(loader, root)
            for name in sorted(pkg.exports or ()) if pkg is not None else ():
                obj = _target(pkg.members[name]) if name in pkg.members else None
                if obj is None:
                    continue
                pages[obj.path] = f"{root}.{name}"
                if obj.is_class:
                    for mname, member in obj.members.items():  # own members only: inherited are not rendered
                        if not mname.startswith("_") and not member.is_alias:
                            pages.setdefault(member.path, f"{root}.{name}.{mname}")
            self._public[root] = pages
        return self._public[root]

    def _is_documented(self, loader: griffe.GriffeLoader, obj: Any) -> bool:
        """Whether ``obj``'s docstring is shown on an API page (the package, or a documented object)."""
        root = obj.path.split(".", 1)[0]
        if obj.path == root:
            return True
        documented = self._documented(loader, root)
        parent = obj.parent
        # __init__ is merged into its class
        return obj.path in documented or (obj.name == "__init__" and parent is not None and parent.path in documented)

    def _load(self, loader: griffe.GriffeLoader, root: str) -> Any:
        if root in loader.modules_collection:
            return loader.modules_collection[root]
        if root not in self.packages:
            return None
        return loader.load(root)

    # -- roles -------------------------------------------------------------------------

    def _resolve(self, loader: griffe.GriffeLoader, scope: Any, dotted: str) -> Any:
        """The object ``dotted`` names in the docstring of ``scope`` (None: not found)."""
        parts = dotted.split(".")
        scopes = []
        s = scope
        while s is not None:
            if s.is_class or s.is_module:
                scopes.append(s)
            s = s.parent
        root = self._load(loader, parts[0])
        if root is not None:
            scopes.insert(0, None)
        for start in scopes:
            obj = root if start is None else _member(start, parts[0])
            for part in parts[1:]:
                if obj is None:
                    break
                obj = _member(obj, part)
            if obj is not None:
                return obj
        return None

    def _role(self, loader: griffe.GriffeLoader, owner: Any, match: re.Match[str]) -> str:
        text = match.group(2).strip()
        short = text.startswith("~")
        dotted = text.lstrip("~.")
        shown = dotted.rsplit(".", 1)[-1] if short else dotted
        if match.group(1) in ("func", "meth"):
            shown += "()"
        obj = self._resolve(loader, owner, dotted)
        if obj is None:
            if not _external(dotted, self.packages) and self._is_documented(loader, owner):
                logger.warning(f"{owner.path}: the docstring refers to {match.group(0)}, which does not exist")
            return f"`{shown}`"
        root = obj.path.split(".", 1)[0]
        documented = self._documented(loader, root).get(obj.path) if root in self.packages else None
        if documented is None:
            return f"`{shown}`"
        return f"[`{shown}`][{documented}]"

    # -- blocks ------------------------------------------------------------------------

    @staticmethod
    def _blocks(text: str) -> str:
        """Doctests to pycon fences, ``::`` markers to ``:``."""
        lines = text.split("\n")
        out: list[str] = []
        i = 0
        in_fence = False
        while i < len(lines):
            line = lines[i]
            if _FENCE.match(line):
                in_fence = not in_fence
            if not in_fence and line.lstrip().startswith(">>>"):
                indent = line[: len(line) - len(line.lstrip())]
                if out and out[-1].strip():
                    out.append("")
                out.append(f"{indent}```pycon")
                while i < len(lines) and lines[i].strip():
                    out.append(lines[i])
                    i += 1
                out.append(f"{indent}```")
                continue
            if not in_fence and line.rstrip().endswith("::"):
                stripped = line.rstrip()[:-2].rstrip()
                line = f"{stripped}:" if stripped else ""
            out.append(line)
            i += 1
        return "\n".join(out)

    @staticmethod
    def _trailing_prose(owner: Any, text: str) -> str:
        """Put prose that follows a Parameters section under a ``Notes`` header."""
        lines = text.split("\n")
        section = None
        for i, line in enumerate(lines):
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if line.strip() and set(nxt.strip()) == {"-"}:
                section = line.strip().lower()
                continue
            if (
                section in _SECTION_HEADS
                and line.strip()
                and not line.startswith(" ")
                and not set(line.strip()) <= {"-"}
                and (i == 0 or not lines[i - 1].strip())
                and not _PARAM_SPEC.match(line.strip())
            ):
                logger.info(
                    f"{owner.path}: prose after the {section.title()} section of the docstring "
                    "is shown under Notes; give it a section header (or move it above) in the code"
                )
                return "\n".join([*lines[:i], "Notes", "-----", *lines[i:]])
        return text

    # -- the hook ----------------------------------------------------------------------

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.path not in self.packages:
            return
        seen: set[str] = set()

        def visit(obj: Any) -> None:
            if obj.is_alias or obj.path in seen:
                return
            seen.add(obj.path)
            if obj.docstring is not None:
                text = obj.docstring.value
                text = _ROLE.sub(lambda m: self._role(loader, obj, m), text)
                text = self._blocks(text)
                text = self._trailing_prose(obj, text)
                obj.docstring.value = text
            for member in obj.members.values():
                visit(member)

        visit(pkg)

"""Generate a Markdown API reference from a package's ``__all__``.

    python docs/gen_api.py rdmaio > docs/api/rdmaio.md
    python docs/gen_api.py flexemr > docs/api/flexemr.md

For every name in ``__all__`` (in ``__all__`` order) the page gives its
signature and docstring; for classes also their own public methods, properties
and attributes (alphabetical), each with signature and docstring.  Enum classes
list their members instead of a constructor signature.  The output depends only
on the package's code, so ``tests/test_docs.py`` can regenerate it in memory and
compare with the committed file.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import re
import sys
from typing import Any

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|exc|obj):`~?([^`]+)`")
_UNDERLINE = re.compile(r"^(\s*)(\S.*)\n\1-{3,}\s*$", re.MULTILINE)


def _annotation(a: Any) -> str:
    return a if isinstance(a, str) else inspect.formatannotation(a)


def _default(v: Any) -> str:
    if isinstance(v, enum.Enum):
        return f"{type(v).__name__}.{v.name}"
    return repr(v)


def format_signature(sig: inspect.Signature, *, drop_self: bool = False) -> str:
    """Like ``str(sig)`` but with string annotations unquoted and enum defaults by name."""
    parts: list[str] = []
    params = list(sig.parameters.values())
    if drop_self and params and params[0].name in ("self", "cls"):
        params = params[1:]
    star_done = False
    for i, p in enumerate(params):
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        if p.kind is p.VAR_POSITIONAL:
            star_done = True
        prefix = "*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else ""
        s = prefix + p.name
        if p.annotation is not p.empty:
            s += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            s += f" = {_default(p.default)}" if p.annotation is not p.empty else f"={_default(p.default)}"
        parts.append(s)
        if p.kind is p.POSITIONAL_ONLY and (i + 1 == len(params) or params[i + 1].kind is not p.POSITIONAL_ONLY):
            parts.append("/")
    out = f"({', '.join(parts)})"
    if sig.return_annotation is not sig.empty and _annotation(sig.return_annotation) != "None":
        out += f" -> {_annotation(sig.return_annotation)}"
    return out


def _signature(obj: Any, *, drop_self: bool = False) -> str | None:
    try:
        return format_signature(inspect.signature(obj), drop_self=drop_self)
    except (TypeError, ValueError):
        return None


def render_doc(doc: str | None) -> str:
    """A docstring as Markdown: roles become code, doctests and ``::`` blocks become fences."""
    if not doc:
        return "*(no docstring)*"
    doc = _ROLE.sub(r"`\1`", doc)
    doc = _UNDERLINE.sub(lambda m: f"{m.group(1)}**{m.group(2).strip()}**", doc)
    lines = doc.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("**") and line.endswith("**") and i + 1 < len(lines) and lines[i + 1].strip():
            # a numpy-style section: "name:" lines with indented descriptions -> a bullet list
            out += [line, ""]
            i += 1
            while i < len(lines) and lines[i].strip():
                item = lines[i].strip()
                i += 1
                desc: list[str] = []
                while i < len(lines) and lines[i].startswith((" ", "\t")) and lines[i].strip():
                    desc.append(lines[i].strip())
                    i += 1
                names = ", ".join(f"`{n.strip()}`" for n in item.rstrip(":").split(","))
                out.append(f"- {names}: {' '.join(desc)}")
            continue
        if line.lstrip().startswith(">>>"):
            out.append("```pycon")
            while i < len(lines) and lines[i].strip():
                out.append(lines[i].strip() if lines[i].lstrip().startswith(("...", ">>>")) else lines[i])
                i += 1
            out.append("```")
            continue
        if line.rstrip().endswith("::"):
            text = line.rstrip()[:-1]
            out.append(text[:-1] if text.endswith(" :") else text)
            i += 1
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            while block and not block[0].strip():
                block.pop(0)
            if block:
                indent = min(len(b) - len(b.lstrip()) for b in block if b.strip())
                out += ["", "```python", *(b[indent:] for b in block), "```", ""]
            continue
        out.append(line)
        i += 1
    return "\n".join(out).strip()


def _bases(cls: type) -> str:
    names = []
    for b in cls.__bases__:
        if b is object:
            continue
        mod = b.__module__
        names.append(b.__qualname__ if mod == "builtins" else f"{mod}.{b.__qualname__}")
    return ", ".join(names)


def _members(cls: type, qual: str) -> list[str]:
    out: list[str] = []
    own = vars(cls)
    fields = getattr(cls, "__dataclass_fields__", {})
    for name in sorted(own):
        if name.startswith("_"):
            continue
        raw = own[name]
        if isinstance(raw, property):
            out += [f"#### `{qual}.{name}` *(property)*", "", render_doc(inspect.getdoc(raw)), ""]
        elif isinstance(raw, (staticmethod, classmethod)) or inspect.isfunction(raw):
            func = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
            kind = ("*(async)* " if inspect.iscoroutinefunction(func) else "") + (
                "*(classmethod)* " if isinstance(raw, classmethod) else
                "*(staticmethod)* " if isinstance(raw, staticmethod) else "")
            sig = _signature(func, drop_self=not isinstance(raw, staticmethod)) or "(...)"
            out += [f"#### {kind}`{qual}.{name}{sig}`", "", render_doc(inspect.getdoc(func)), ""]
        elif inspect.ismemberdescriptor(raw) or inspect.isdatadescriptor(raw):
            if name in fields:
                continue  # a dataclass field: shown in the class signature
            out += [f"#### `{qual}.{name}` *(attribute)*", ""]
        elif isinstance(raw, (int, str, float, bool, type(None))) and not isinstance(raw, enum.Enum):
            out += [f"#### `{qual}.{name} = {raw!r}`", ""]
    return out


def render_class(qual: str, cls: type) -> list[str]:
    out: list[str] = []
    if issubclass(cls, enum.Enum):
        out += [f"### class `{qual}`", ""]
    else:
        sig = _signature(cls)
        out += [f"### class `{qual}{sig or ''}`", ""]
    bases = _bases(cls)
    if bases:
        out += [f"Bases: `{bases}`", ""]
    out += [render_doc(inspect.getdoc(cls)), ""]
    if issubclass(cls, enum.Enum):
        out += ["| member | value |", "| --- | --- |"]
        out += [f"| `{m.name}` | `{m.value!r}` |" for m in cls.__members__.values()]
        out.append("")
    out += _members(cls, qual)
    return out


def generate(package: str) -> str:
    """The Markdown reference for ``package`` (imported by name)."""
    mod = importlib.import_module(package)
    names = getattr(mod, "__all__", None)
    if names is None:
        raise SystemExit(f"{package} defines no __all__")
    out = [
        f"# `{package}` API reference",
        "",
        f"Generated from `{package}.__all__` by `python docs/gen_api.py {package} > docs/api/{package}.md`;",
        "do not edit by hand (`tests/test_docs.py` checks that it is current).",
        "",
    ]
    summary = render_doc(inspect.getdoc(mod)).split("\n\n")[0]
    out += [summary, "", "## Contents", ""]
    for name in names:
        out.append(f"- [`{name}`](#{name.lower()})")
    out.append("")
    for name in names:
        obj = getattr(mod, name)
        qual = f"{package}.{name}"
        out += [f"## {name}", ""]
        if inspect.isclass(obj):
            out += render_class(qual, obj)
        elif callable(obj):
            kind = "*(async)* " if inspect.iscoroutinefunction(obj) else ""
            out += [f"### {kind}`{qual}{_signature(obj) or '(...)'}`", "", render_doc(inspect.getdoc(obj)), ""]
        else:
            out += [f"### `{qual} = {obj!r}`", ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python docs/gen_api.py PACKAGE > docs/api/PACKAGE.md", file=sys.stderr)
        return 2
    sys.stdout.write(generate(argv[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))

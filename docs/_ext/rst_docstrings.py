"""Griffe extension: render danlu's reStructuredText-flavoured docstrings as Markdown.

danlu's docstrings are written for Sphinx as well as for ``help()``: ``.. math::`` blocks,
``:math:`` / ``:class:`` / ``:func:`` roles and ``Grammar::`` literal blocks. mkdocstrings reads
docstrings as Markdown, so this extension rewrites, at documentation build time only:

* ``.. math::`` blocks -> ``$$ ... $$`` (one display block per paragraph; MathJax renders them);
* ``:math:`x``` -> ``$x$``;
* ``:class:`X```, ``:func:``, ``:meth:``, ``:mod:``, ``:attr:``, ``:data:``, ``:exc:`` -> an optional
  cross-reference (a link when the target is documented on the site, plain code otherwise);
  a leading ``~`` shows the last component only, as in Sphinx;
* a paragraph ending in ``::`` -> ``:`` followed by the indented literal block;
* an ``Example:`` section -> ``Examples:``, which griffe parses into console code blocks.

The source docstrings are left untouched.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(class|func|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_EXAMPLE_HEADER = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _math_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == ".. math::":
            base = _indent(line)
            i += 1
            body: list[str] = []
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
                body.append(lines[i])
                i += 1
            while body and not body[-1].strip():
                body.pop()
            paragraphs: list[list[str]] = [[]]
            for b in body:
                if b.strip():
                    paragraphs[-1].append(b.strip())
                elif paragraphs[-1]:
                    paragraphs.append([])
            pad = " " * base
            for paragraph in paragraphs:
                if paragraph:
                    out.extend([pad + "$$", *(pad + p for p in paragraph), pad + "$$", ""])
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def _literal_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    for i, line in enumerate(lines):
        if line.rstrip().endswith("::") and not line.strip().startswith(".."):
            nxt = next((lines[j] for j in range(i + 1, len(lines)) if lines[j].strip()), "")
            if _indent(nxt) > _indent(line):
                stripped = line.rstrip()[:-2].rstrip()
                out.append(stripped + ":" if stripped else "")
                continue
        out.append(line)
    return "\n".join(out)


def _top_level() -> set[str]:
    try:
        import danlu

        return set(danlu.__all__)
    except ImportError:  # pragma: no cover - docs are built with danlu installed
        return set()


_TOP = _top_level()


def _resolve(obj: griffe.Object, target: str) -> str:
    """A full path for a role's target: danlu's public names, else relative to the class or module."""
    if target.startswith("danlu"):
        return target
    if target.split(".", maxsplit=1)[0] in _TOP:
        return f"danlu.{target}"
    if target.startswith(("torch", "re.", "optax")):
        return target
    if isinstance(obj, griffe.Class) and target[:1].islower():
        return f"{obj.path}.{target}"
    if obj.parent is not None and isinstance(obj.parent, griffe.Class) and target[:1].islower():
        return f"{obj.parent.path}.{target}"
    module = obj if isinstance(obj, griffe.Module) else obj.module
    return f"{module.path}.{target}"


def convert(text: str, obj: griffe.Object | None = None) -> str:
    """Rewrite one docstring (see the module docstring)."""
    text = _EXAMPLE_HEADER.sub(r"\1Examples:", text)
    text = _math_blocks(text)
    text = _literal_blocks(text)
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)

    def role(match: re.Match[str]) -> str:
        short, target = match.group(2), match.group(3).rstrip("()")
        label = target.rsplit(".", 1)[-1] if short else target
        if match.group(1) in ("func", "meth"):
            label += "()"
        full = _resolve(obj, target) if obj is not None else target
        return f'<autoref identifier="{full}" optional><code>{label}</code></autoref>'

    return _ROLE.sub(role, text)


class RstDocstrings(griffe.Extension):
    """Convert every loaded docstring (static analysis and runtime inspection alike)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and obj.path.startswith("danlu"):
            obj.docstring.value = convert(obj.docstring.value, obj)


class DynamicClasses(griffe.Extension):
    """Document the classes that danlu builds at import time (``AdamW = extend_with_weight_decay(Adam)``).

    Static analysis sees them as module attributes without docstrings; this replaces each such
    attribute of ``danlu.ready`` by a class carrying the runtime docstring.
    """

    modules = ("danlu.ready",)

    def on_module_members(self, *, mod: griffe.Module, **kwargs: Any) -> None:
        if mod.path not in self.modules:
            return
        import importlib

        runtime = importlib.import_module(mod.path)
        for name, member in list(mod.members.items()):
            value = getattr(runtime, name, None)
            if member.is_alias or not isinstance(value, type) or not value.__doc__:
                continue
            cls = griffe.Class(name, lineno=member.lineno, endlineno=member.endlineno)
            root = getattr(value, "_danlu_root", value.__mro__[1])
            cls.bases = [f"{root.__module__}.{root.__qualname__}"]
            cls.docstring = griffe.Docstring(convert(value.__doc__.strip("\n")), lineno=member.lineno, parent=cls)
            import inspect

            cls.docstring.value = inspect.cleandoc(cls.docstring.value)
            mod.set_member(name, cls)

"""
Markup with C{twisted.web.template}: the pages' templates are XML files in
C{web/templates}, filled by L{Template} elements; the few fragments drawn in
code (SVG charts, a badge, a one-button form) are L{Tag}s made by L{h}.
Escaping is never done here: text and attribute values are escaped by
Twisted's flattener when the page is written, whatever they hold.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

from twisted.python.failure import Failure
from twisted.web.template import Element, Tag, flattenString, renderer

DOCTYPE = b"<!DOCTYPE html>\n"
_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9:_-]*$")


def content(value: Any) -> Any:
    """
    A value as something the flattener takes: numbers as text, None and
    False as nothing, lists item by item; text, tags and elements as they
    are (dicts and True stay too: data for the renderers, never a slot).
    """
    if value is None or value is False:
        return ""
    if value is True or isinstance(value, (str, Tag, dict)):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [content(v) for v in value]
    return value


def h(name: str, attrs: Mapping[str, Any] | None = None, *children: Any) -> Tag:
    """
    One element built in code: C{h("td", {"class": "num"}, "12")}.  An
    attribute that is None or False is left out, True writes it empty;
    children are text, numbers, tags, lists of those, or None.
    """
    if not _NAME.match(name):
        raise ValueError(f"bad tag {name!r}")
    tag = Tag(name)
    for key, value in (attrs or {}).items():
        key = key.rstrip("_")  # class_ -> class
        if not _NAME.match(key):
            raise ValueError(f"bad attribute {key!r}")
        if value is None or value is False:
            continue
        tag.attributes[key] = "" if value is True else content(value)
    tag.children.extend(content(list(children)))
    return tag


class Template(Element):
    """
    A template of C{web/templates} (C{template}, without C{.xml}) filled
    from C{data}: each key is a slot at the template's root; the renderer
    C{each:<key>} repeats its tag once per dict of the list C{data[key]}
    (the dict's items are that copy's slots); C{if:<key>} keeps its tag only
    when C{data[key]} is true, C{unless:<key>} only when it is false;
    C{flag:<key>} gives its tag the empty attribute C{key} (C{open},
    C{checked}, C{disabled}) when C{data[key]} is true; C{csrf} is the
    session's form token on a hidden input.
    """

    template: ClassVar[str]

    def __init__(self, ctx: Any, **data: Any) -> None:
        self._document = ctx.templates.loader(self.template)
        super().__init__(loader=self._document)
        self.ctx = ctx
        self.data = data

    def render(self, request):
        root = Tag("")
        root.children.extend(self._document.load())
        root.fillSlots(**{k: content(v) for k, v in self.data.items()})
        return root

    def lookupRenderMethod(self, name):
        kind, _, key = name.partition(":")
        if kind == "each" and key:
            return lambda request, tag: [
                tag.clone().fillSlots(**{k: content(v) for k, v in item.items()}) for item in self.data[key]
            ]
        if kind == "if" and key:
            return lambda request, tag: tag if self.data[key] else ""
        if kind == "unless" and key:
            return lambda request, tag: "" if self.data[key] else tag
        if kind == "flag" and key:
            return lambda request, tag: tag(**{key: ""}) if self.data[key] else tag
        return super().lookupRenderMethod(name)

    @renderer
    def csrf(self, request, tag: Tag):
        """The session's form token (forms of a page without a session have none)."""
        return tag(value=self.ctx.csrf) if self.ctx.csrf else ""


def flatten_bytes(root: Any, *, doctype: bool = False) -> bytes:
    """
    C{root} written out.  Nothing in a page waits on I/O, so the flattener
    finishes at once; an error in a template raises here.
    """
    results: list[Any] = []
    flattenString(None, root).addBoth(results.append)
    if not results:
        raise RuntimeError("a page waited on something while it was written")
    [result] = results
    if isinstance(result, Failure):
        result.raiseException()
    return (DOCTYPE if doctype else b"") + result

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

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.error import FlattenerError
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
            # Shallow copies: the flattener never changes a template's tags.
            return lambda request, tag: in_turns(
                getattr(self.ctx, "clock", None),
                [tag.clone(deep=False).fillSlots(**{k: content(v) for k, v in item.items()}) for item in self.data[key]],
            )
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


ROWS_AT_ONCE = 15


def in_turns(clock: IReactorTime | None, items: list, size: int = ROWS_AT_ONCE) -> Any:
    """
    C{items} (rows, cards) for the flattener, C{size} at a time: before
    each batch the reactor gets a turn (the flattener waits for a
    Deferred fired by C{clock}), so a long page never holds up the proxy on
    the same reactor for more than a batch.  Without a clock, all at once.
    """
    if clock is None or len(items) <= size:
        return items

    def batches():
        for start in range(0, len(items), size):
            yield _after_a_turn(clock, items[start : start + size])

    return batches()


def next_turn(clock: IReactorTime | None, value: Any) -> Any:
    """C{value} for the flattener after the reactor had a turn (at once without a clock)."""
    return value if clock is None else _after_a_turn(clock, value)


def _after_a_turn(clock: IReactorTime, value: Any) -> Deferred[Any]:
    """
    Fires with C{value} at the reactor's next turn.  Cancelled (the page's
    client went away), the flattener hears of it through the copy it waits
    on; this one keeps no unhandled failure behind.
    """

    def cancel(waiting: Deferred[Any]) -> None:
        call.cancel()
        waiting.addErrback(lambda failure: failure.trap(CancelledError))

    turn: Deferred[Any] = Deferred(cancel)
    call = clock.callLater(0, turn.callback, value)
    return turn


def write_page(root: Any) -> Deferred[bytes]:
    """An HTML document: fires once C{root} is written out (in turns, see L{in_turns})."""
    return flattenString(None, root).addCallbacks(lambda body: DOCTYPE + body, _gone)


def _gone(failure: Failure) -> Failure:
    """
    A page cancelled between two turns (its client went away) fails as
    cancelled, as Klein expects of a request nobody waits for, not as a
    broken template.
    """
    error = failure.value
    if isinstance(error, FlattenerError) and isinstance(error.args[0], CancelledError):
        return Failure(error.args[0])
    return failure


def flatten_bytes(root: Any, *, doctype: bool = False) -> bytes:
    """
    C{root} written out at once: for the pages and fragments that hold no
    long list (L{in_turns}), which the flattener finishes without waiting;
    an error in a template raises here.
    """
    results: list[Any] = []
    flattenString(None, root).addBoth(results.append)
    if not results:
        raise RuntimeError("a page waited on something while it was written")
    [result] = results
    if isinstance(result, Failure):
        result.raiseException()
    return (DOCTYPE if doctype else b"") + result

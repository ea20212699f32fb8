"""
Model mappings: a requested name that no rule of the resolution order
knows, mapped to a model that is available here, by an operator (the
mappings API) or by the LLM resolver.  Pure records and their checks; the
store that keeps them is L{cllama_tx.governance.mapping_store}.

A mapping's C{source} says who made it:

  - C{operator}: set through C{PUT /_api/mappings/{name}}; confirmed when set.
  - C{llm}: the resolver model's answer; unconfirmed (and marked so in the
    UI) until an operator confirms it.
  - C{alias}: not stored here: the operator model table's public names and
    C{model_group_alias}es, listed beside the stored mappings (read-only;
    they are changed in the table file).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from cllama_tx.store.records import rfc3339_ms

__all__ = [
    "ALIAS",
    "LLM",
    "OPERATOR",
    "SOURCES",
    "MappingError",
    "ModelMapping",
    "check_name",
]

OPERATOR = "operator"
LLM = "llm"
ALIAS = "alias"
SOURCES = (OPERATOR, LLM, ALIAS)

#: The longest name a mapping may have (requested names are echoed).
MAX_NAME = 200


class MappingError(ValueError):
    """A mapping's name or target is not acceptable; the message says why."""


def check_name(value: Any, what: str = "name") -> str:
    """
    C{value} as a mapping's name or target: a non-empty string of at most
    L{MAX_NAME} printable characters, without surrounding space.

    @raise MappingError: anything else.
    """
    if not isinstance(value, str):
        raise MappingError(f"the {what} must be a string")
    text = value.strip()
    if not text:
        raise MappingError(f"the {what} is empty")
    if len(text) > MAX_NAME:
        raise MappingError(f"the {what} is longer than {MAX_NAME} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise MappingError(f"the {what} holds a control character")
    return text


def _stamp(at: float | None) -> str | None:
    return None if at is None else rfc3339_ms(at)


@attrs.frozen
class ModelMapping:
    """
    One mapping: requests for C{name} go to C{target} (a name the
    resolution order knows: a model table name or C{<provider>/<model>}).
    C{detail} keeps what explains an LLM mapping: the resolver model, the
    caller whose request asked, the context it gave.
    """

    name: str
    target: str
    source: str
    created_at: float
    updated_at: float
    confirmed_at: float | None = None
    created_by: str | None = None
    detail: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def confirmed(self) -> bool:
        return self.confirmed_at is not None

    def row(self) -> tuple:
        """The store's row (L{cllama_tx.store.mapping_rows.Row})."""
        return (self.name, self.target, self.source, self.created_at, self.updated_at, self.confirmed_at,
                self.created_by, dict(self.detail))

    @classmethod
    def from_row(cls, row: tuple) -> ModelMapping:
        name, target, source, created, updated, confirmed, created_by, detail = row
        return cls(name, target, source, created, updated, confirmed, created_by, dict(detail or {}))

    def to_json(self) -> dict:
        """The mapping as the mappings API and the debug page show it."""
        return {
            "name": self.name,
            "target": self.target,
            "source": self.source,
            "confirmed": self.confirmed,
            "created_at": _stamp(self.created_at),
            "updated_at": _stamp(self.updated_at),
            "confirmed_at": _stamp(self.confirmed_at),
            "created_by": self.created_by,
            **{key: self.detail[key] for key in ("resolver_model", "prompt", "surface") if key in self.detail},
        }


def alias_mapping(name: str, target: str, loaded_at: float | None) -> dict:
    """A model table name as the mappings API lists it (source C{alias}, read-only)."""
    stamp = _stamp(loaded_at)
    return {
        "name": name,
        "target": target,
        "source": ALIAS,
        "confirmed": True,
        "created_at": stamp,
        "updated_at": stamp,
        "confirmed_at": stamp,
        "created_by": "model table",
        "read_only": True,
    }

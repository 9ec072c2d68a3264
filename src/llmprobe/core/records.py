"""Typed result rows.

Every table llmprobe writes is a list of one :class:`Record` subclass. Subclasses register
themselves by name so that ``llmprobe schema NAME`` can print their JSON Schema, and so the
writers can derive column order from the model's fields.
"""

from __future__ import annotations

import re
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from .errors import LLMProbeError

_REGISTRY: dict[str, type[Record]] = {}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class Record(BaseModel):
    """Base class of every result row. Fields are the columns, in declaration order."""

    # Extra fields are allowed so that tables with data-dependent columns (one alpha per
    # precision, say) can still be one record type.
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    table: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _REGISTRY[_snake(cls.__name__)] = cls

    def row(self) -> dict:
        """The record as a flat dict: declared fields first, then extra columns."""
        return self.model_dump(mode="json")


def record_types() -> dict[str, type[Record]]:
    """Registered record types by snake_case name (importing analyses registers theirs)."""
    return dict(sorted(_REGISTRY.items()))


def record_type(name: str) -> type[Record]:
    key = _snake(name) if any(c.isupper() for c in name) else name.replace("-", "_")
    if key not in _REGISTRY:
        raise LLMProbeError(f"unknown record '{name}'; known records: {', '.join(record_types())}")
    return _REGISTRY[key]

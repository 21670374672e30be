"""Typed reading of one TOML table: a section parser names each key once.

A :class:`Table` records every key its parser reads; :meth:`Table.done` then
refuses any other key the table holds, so the list of known keys is the reads
themselves and cannot drift from them.  Every mistake is a
:class:`~csrproxy.errors.ConfigError` naming ``section.key``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, TypeVar, overload

from csrproxy.errors import ConfigError

T = TypeVar("T")
D = TypeVar("D")

#: The default of a required key: no default.
REQUIRED: Any = object()

KIND_NAMES: dict[type[Any], str] = {
    str: "a string",
    bool: "true or false",
    int: "an integer",
    float: "a number",
    list: "a list",
}


class Table:
    """One TOML table (``name`` is its dotted path, ``""`` for the document) being read."""

    def __init__(self, data: Mapping[str, Any], name: str = "") -> None:
        self.data = data
        self.name = name
        self._known: set[str] = set()

    def where(self, key: str) -> str:
        """The dotted name of ``key`` in this table, as errors name it."""
        return f"{self.name}.{key}" if self.name else key

    def error(self, key: str, detail: str) -> ConfigError:
        return ConfigError(self.where(key), detail)

    @overload
    def get(self, key: str, kind: type[T]) -> T: ...

    @overload
    def get(self, key: str, kind: type[T], default: D) -> T | D: ...

    def get(self, key: str, kind: type[T], default: Any = REQUIRED) -> Any:
        """The value of ``key``, which must be of ``kind`` (an integer is a float too);
        ``default`` when absent, an error when absent and required."""
        self._known.add(key)
        if key not in self.data:
            if default is REQUIRED:
                raise self.error(key, "missing required key" + self._typo_hint(key))
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(
                key, f"must be {KIND_NAMES.get(kind, kind.__name__)}, not {type(value).__name__}"
            )
        return value

    def strings(self, key: str, default: tuple[str, ...] = REQUIRED) -> tuple[str, ...]:
        """A list of strings, as a tuple."""
        if key not in self.data and default is not REQUIRED:
            self._known.add(key)
            return default
        value = self.get(key, list)
        for item in value:
            if not isinstance(item, str):
                raise self.error(key, f"must be a list of strings, found {item!r}")
        return tuple(value)

    def positive(self, key: str, default: float) -> float:
        """A number greater than 0."""
        value = self.get(key, float, default)
        if value <= 0:
            raise self.error(key, f"must be greater than 0, not {value}")
        return float(value)

    def positive_int(self, key: str, default: int) -> int:
        """An integer greater than 0."""
        value = self.get(key, int, default)
        if value <= 0:
            raise self.error(key, f"must be greater than 0, not {value}")
        return value

    def table(self, key: str, required: bool = True) -> Table:
        """The sub-table ``[key]``; when absent, an error if required, else an empty table."""
        found = self.optional_table(key)
        if found is not None:
            return found
        if required:
            raise self.error(key, f"missing section [{self.where(key)}]" + self._typo_hint(key))
        return Table({}, self.where(key))

    def optional_table(self, key: str) -> Table | None:
        """The sub-table ``[key]``, or None when absent."""
        self._known.add(key)
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            where = self.where(key)
            raise ConfigError(where, f"must be a table [{where}], not {type(value).__name__}")
        return Table(value, self.where(key))

    def done(self) -> None:
        """Refuse every key of the table that was not read: it is unknown."""
        for key in self.data:
            if key not in self._known:
                raise self.error(key, f"unknown key (known: {', '.join(sorted(self._known))})")

    def _typo_hint(self, key: str) -> str:
        # A required key read before done() would report the misspelt one: say so here.
        unread = [k for k in self.data if k not in self._known]
        close = difflib.get_close_matches(key, unread, n=1)
        return f" (is {close[0]!r} a misspelling of it?)" if close else ""

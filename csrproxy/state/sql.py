"""SQL the state database's query modules share."""

from __future__ import annotations

from csrproxy.state.rows import UNFINISHED

#: The unfinished statuses as literals: only then can SQLite use the partial index.
UNFINISHED_SQL = ", ".join(f"'{s}'" for s in UNFINISHED)


def upsert(table: str, key: str, columns: str) -> str:
    """``INSERT`` of a row by named parameters that replaces the row of the same ``key``
    (both engines say ``ON CONFLICT ... DO UPDATE``); ``columns``: the others, by spaces."""
    names = [key, *columns.split()]
    updates = ", ".join(f"{c} = excluded.{c}" for c in names[1:])
    return (
        f"INSERT INTO {table} ({', '.join(names)}) VALUES "
        f"({', '.join(':' + c for c in names)}) ON CONFLICT ({key}) DO UPDATE SET {updates}"
    )

"""The row of a statement that always returns one.

psycopg types `fetchone()` as `Row | None`, rightly in general; but an aggregate without GROUP BY,
`SELECT now()`, `nextval(...)` or an `INSERT ... RETURNING` with no ON CONFLICT clause returns
exactly one row. `one_row` says so where the row is read, and turns a None there (a bug: the
statement was changed) into an error that names it instead of a TypeError on unpacking.
"""

from __future__ import annotations

from typing import TypeVar

Row = TypeVar("Row")


def one_row(row: Row | None, statement: str = "the statement") -> Row:
    """`row`, the result of `fetchone()` on a statement that always yields a row."""
    if row is None:
        raise RuntimeError(f"{statement} returned no row")
    return row

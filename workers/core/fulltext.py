"""How a query of what was said is read: one parser for `bcfy search` and alert rules.

Web-search syntax, read by PostgreSQL's websearch_to_tsquery with the English configuration:
words are ANDed and stemmed ("fires" finds "fire"), "quoted phrases" match in order, `or` and
`-word` work. The same configuration makes the transcripts' `search` column (sql/004), and an
alert rule's stored `tsquery` (sql/007) is this expression over its query.

websearch_to_tsquery accepts any text, so "cannot parse" means: it reads as nothing to look for
(only stop words or punctuation: it would match no call), or only as words to exclude (it would
match nearly every call). `check_query` refuses both, saying which.
"""

from __future__ import annotations

from typing import Any

import psycopg

# The SQL expression of a query given as the parameter %(query)s.
TSQUERY_SQL = "websearch_to_tsquery('english', %(query)s)"


class QueryError(ValueError):
    """A query that reads as nothing useful to look for; the message says why."""


def check_query(conn: psycopg.Connection[Any], query: str) -> str:
    """The query as PostgreSQL reads it (its tsquery text), or QueryError."""
    if not query.strip():
        raise QueryError("the query is empty: give some words to look for")
    row = conn.execute(
        f"SELECT q::text, numnode(q), querytree(q) FROM {TSQUERY_SQL} AS q",
        {"query": query},
    ).fetchone()
    assert row is not None
    parsed, nodes, tree = row
    if nodes == 0:
        raise QueryError(
            f"the query {query!r} has no words to look for (only stop words such as 'the' or "
            "punctuation): it would match no call"
        )
    if tree == "T":
        raise QueryError(
            f"the query {query!r} only excludes words: it would match nearly every call; "
            "add a word to look for"
        )
    return str(parsed)

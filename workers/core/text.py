"""Text from outside (the service's names and descriptions, transcripts, error messages that
quote an answer) made safe to print on an operator's terminal, and error texts cut to the length
the pipeline stores.

What is stored stays as received (less what error_text cuts); terminal_safe is applied where a
command prints it.
"""

from __future__ import annotations

import unicodedata

# What a terminal must not receive raw: controls (C0, DEL and C1, which start escape sequences:
# ESC, CSI, OSC, BEL...), format characters (bidi overrides and isolates such as U+202E,
# zero-width characters, the BOM), lone surrogates, and the line and paragraph separators.
UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def terminal_safe(text: str | None) -> str:
    """`text` with each unsafe character replaced by its visible escape (ESC becomes `\\x1b`,
    a newline `\\x0a`, U+202E `\\u202e`), on one line; letters, accents, CJK, symbols and
    spaces are kept as they are. None gives ""."""
    if text is None:
        return ""
    if text.isprintable():  # the common case: nothing to replace
        return text
    return "".join(
        _escape(char) if unicodedata.category(char) in UNSAFE_CATEGORIES else char for char in text
    )


# The most of an error message stored anywhere (job_runs.error, the poll log, last_error of
# calls, back-fill gaps and transcriptions, the audio attempts' log): enough for any traceback
# line or service answer quoted in it, and a bound on what one failure can write.
ERROR_TEXT_CHARS = 2000


def error_text(text: str) -> str:
    """An error message as it is stored: its first ERROR_TEXT_CHARS characters."""
    return text[:ERROR_TEXT_CHARS]

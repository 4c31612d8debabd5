"""Model text as people read it, in figures, tables and printed answers: no Python reprs, the
invisible characters drawn (a newline as ⏎, a tab as ⇥, a no-break space as ⍽, a token of spaces
as ␣), and a "…" wherever text is cut.

    shorten("The capital\\nis Paris.", 12)   # -> 'The capital…'
"""

from __future__ import annotations

import unicodedata

VISIBLE = {"\n": "⏎", "\r": "", "\t": "⇥", "\xa0": "⍽"}
ELLIPSIS = "…"


def visible(s: str) -> str:
    """`s` with its invisible characters drawn: the marks above, other control and format
    characters as <U+XXXX>, a string of spaces alone as ␣ per space (an empty cell says nothing)."""
    s = str(s)
    if s and not s.strip(" "):
        return "␣" * len(s)
    out = []
    for ch in s:
        if ch in VISIBLE:
            out.append(VISIBLE[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(f"<U+{ord(ch):04X}>")
        else:
            out.append(ch)
    return "".join(out)


PLAIN_SPACE = " \t\r\n"


def shorten(s: str, width: int | None = None, strip: bool = True) -> str:
    """`visible(s)` (stripped of surrounding spaces, tabs and newlines unless strip=False), cut to
    at most `width` characters with a final "…" when anything was cut. A no-break space is not
    stripped: an answer of 46 of them must show them (⍽), not look empty."""
    s = visible(str(s).strip(PLAIN_SPACE) if strip else s)
    if width is not None and len(s) > width:
        return s[:max(0, width - 1)].rstrip() + ELLIPSIS
    return s

"""Text for people: ``did you mean ...?`` hints for unknown names in user input, and units."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(word: object, options: Iterable[str]) -> str:
    """``" (did you mean 'a100-40g' or 'a100-80g'?)"``, or ``""`` when nothing is close.

    Options that start with ``word`` win (``dgx-a100`` -> ``dgx-a100-80g``, ``dgx-a100-40g``);
    otherwise the closest by :func:`difflib.get_close_matches`.
    """
    word = str(word)
    options = list(options)
    close = [o for o in options if word and o.startswith(word)][:3]
    if not close:
        close = difflib.get_close_matches(word, options, n=1)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def bytes_text(n: float) -> str:
    """Decimal units, as device datasheets use (80 GB = 80e9 bytes)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"

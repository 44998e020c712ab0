"""``did you mean ...?`` hints for unknown names in user input."""

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

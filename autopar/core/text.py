"""Text for people: ``did you mean ...?`` hints for unknown names in user input, and numbers with units.

Every number the CLI, the report and the planner's explanations print goes through one of these:

* bytes: :func:`byte_unit`, :func:`bytes_text`, :func:`gb_text`. All decimal, as device datasheets
  use (``kB`` = 1e3, ``MB`` = 1e6, ``GB`` = 1e9, ``TB`` = 1e12 bytes); nothing prints GiB.
* seconds: :func:`time_unit`, :func:`seconds_text`.
* other quantities: :func:`si_text` (SI prefixes on any unit, e.g. FLOP/s, B/s) and :func:`count_text`
  (parameter counts: K, M, B, T).

Each function's docstring gives its output for an example, which the tests of the CLI and report
rely on; change one only together with them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

_BYTE_UNITS = (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3))


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


# ------------------------------------------------------------------------------------ bytes
def byte_unit(n: float) -> tuple[float, str]:
    """(size, label) of the largest decimal unit not above ``n`` bytes: ``3e10`` -> ``(1e9, "GB")``;
    ``(1.0, "B")`` below 1 kB (and for negative ``n``). Divide by ``size`` to write in ``label``."""
    for unit, size in _BYTE_UNITS:
        if n >= size:
            return size, unit
    return 1.0, "B"


def bytes_text(n: float | None, decimals: int = 1) -> str:
    """Bytes in the decimal unit that fits (80 GB = 80e9 bytes, as device datasheets use):
    ``8.1e10`` -> ``"81.0 GB"`` (``"81.00 GB"`` with ``decimals=2``), ``512`` -> ``"512 B"``,
    ``None`` -> ``"-"``. Negative amounts take the unit of their size."""
    if n is None:
        return "-"
    size, unit = byte_unit(abs(n))
    if unit == "B":
        return f"{n:.0f} B"
    return f"{n / size:.{decimals}f} {unit}"


def gb_text(n: float, spec: str = ".3g", *, unit: bool = True) -> str:
    """Bytes always in decimal gigabytes (GB = 1e9 bytes), formatted by ``spec``: ``8e10`` ->
    ``"80 GB"``; ``gb_text(8e10, ",.2f")`` -> ``"80.00 GB"``. ``unit=False`` leaves off ``" GB"``
    (for a column whose header names the unit)."""
    return f"{n / 1e9:{spec}}" + (" GB" if unit else "")


# ---------------------------------------------------------------------------------- seconds
def time_unit(seconds: float) -> tuple[float, str]:
    """(scale, label) so that ``seconds * scale`` reads well: s from 1 s, ms from 1 ms, else µs."""
    if seconds >= 1.0:
        return 1.0, "s"
    if seconds >= 1e-3:
        return 1e3, "ms"
    return 1e6, "µs"


def seconds_text(t: float | None, *, micro: str = "µs", fixed: bool = False) -> str:
    """Seconds in s, ms or µs, 3 significant digits: ``0.0123`` -> ``"12.3 ms"``; ``None`` -> ``"-"``.

    ``micro`` spells microseconds (``"us"`` where the text stays ASCII). ``fixed=True`` is for
    right-aligned columns: fixed decimals with thousands separators, s from 1 s and ms below
    (``1234.5`` -> ``"1,234.500 s"``, ``0.0123`` -> ``"12.30 ms"``)."""
    if t is None:
        return "-"
    if fixed:
        return f"{t:,.3f} s" if t >= 1 else f"{t * 1e3:,.2f} ms"
    scale, unit = time_unit(t)
    return f"{t * scale:.3g} {micro if unit == 'µs' else unit}"


# ------------------------------------------------------------------------------ other units
def si_text(value: float, unit: str) -> str:
    """Any quantity with an SI prefix (k, M, G, T, P; decimal), 4 significant digits:
    ``3.12e14, "FLOP/s"`` -> ``"312 TFLOP/s"``; ``8e10, "B"`` -> ``"80 GB"``."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.4g} {prefix}{unit}"
    return f"{value:.4g} {unit}"


def count_text(n: float) -> str:
    """A count (parameters) with K, M, B (1e9) or T: ``1.3e9`` -> ``"1.3B"``, ``12`` -> ``"12"``."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"

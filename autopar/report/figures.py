"""Shared drawing helpers: matplotlib loaded lazily, figures rendered to PNG bytes without pyplot.

Figures are built from :class:`matplotlib.figure.Figure` directly (no pyplot, no global backend
switch), so writing a report never changes the backend of the program that asked for it.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.typing import ColorType

DPI = 110
WIDTH_IN = 12.0
FORWARD = "#4c8ed9"
BACKWARD = "#f0a04b"
P2P = "#3b3b3b"
DP_SYNC = "#8e6bbf"
OPTIMIZER = "#59a14f"
CAPACITY = "#d62728"
IDLE = "#eeeeee"


def new_figure(width_in: float, height_in: float, **kwargs: Any) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained", **kwargs)


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No Software/URL metadata: the report must not contain any external address.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def stage_colors(n: int) -> list:
    """One colour per pipeline stage: qualitative for up to 20 stages, a ramp beyond."""
    from matplotlib import colormaps

    if n <= 10:
        cmap = colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = colormaps["tab20"]
        return [cmap(i) for i in range(n)]
    cmap = colormaps["turbo"]
    return [cmap(0.05 + 0.9 * i / (n - 1)) for i in range(n)]


def lighten(color: ColorType, amount: float) -> tuple[float, float, float]:
    """Blend ``color`` towards white by ``amount`` (0 = unchanged, 1 = white)."""
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(color)
    return (r + (1 - r) * amount, g + (1 - g) * amount, b + (1 - b) * amount)


def text_color(color: ColorType) -> str:
    """Black or white, whichever reads better on ``color``."""
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(color)
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"

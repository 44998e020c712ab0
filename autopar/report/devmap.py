"""Figure 1, the device map: nodes x devices, each device labelled with its rank and mesh
coordinates, coloured by pipeline stage.

Up to :data:`FULL_NODES` nodes are drawn in full. Larger clusters get an overview strip of every
node (colour only) above a labelled close-up of the first nodes, enough to show one whole
``dp = 0`` pipeline where that fits.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from autopar.report import figures as F
from autopar.report.context import ReportData

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.typing import ColorType

FULL_NODES = 16
DETAIL_NODES = 8
ROW_IN = 0.62
"""Height of one node row in the labelled map (inches)."""


def _layout(data: ReportData) -> tuple[int, int, list[str]]:
    """(nodes, devices per node, device kind per node); a pseudo-layout without a cluster."""
    c = data.cluster
    if c is not None:
        kinds = [c.device_of(c.ranks_of_node(n)[0]).name for n in range(c.nodes)]
        return c.nodes, c.devices_per_node, kinds
    per = min(8, data.plan.world_size)
    nodes = math.ceil(data.plan.world_size / per)
    return nodes, per, ["?"] * nodes


def _cell(data: ReportData, rank: int) -> tuple[int | None, str]:
    """(stage, label) of the device holding ``rank``; (None, 'idle') past the plan's ranks."""
    plan = data.plan
    if rank >= plan.world_size:
        return None, f"r{rank}\nidle"
    coords = plan.coords(rank)
    return coords.get("pp", 0), f"r{rank}\n(" + ",".join(str(v) for v in coords.values()) + ")"


def _draw_labelled(
    ax: Axes,
    data: ReportData,
    first_node: int,
    nodes: int,
    per: int,
    kinds: list[str],
    colors: list[ColorType],
) -> None:
    from matplotlib.patches import Rectangle

    font = 8 if per <= 8 else max(5, 8 - (per - 8) // 4)
    for i in range(nodes):
        node = first_node + i
        y = nodes - 1 - i
        for d in range(per):
            stage, label = _cell(data, node * per + d)
            color = colors[stage] if stage is not None else F.IDLE
            ax.add_patch(Rectangle((d + 0.04, y + 0.06), 0.92, 0.88, facecolor=color, edgecolor="white"))
            ax.text(
                d + 0.5, y + 0.5, label, ha="center", va="center", fontsize=font, color=F.text_color(color)
            )
    ax.set_xlim(0, per)
    ax.set_ylim(0, nodes)
    ax.set_xticks([d + 0.5 for d in range(per)], [f"dev {d}" for d in range(per)], fontsize=8)
    hetero = len(set(kinds)) > 1
    labels = [
        f"node {first_node + i}" + (f"\n{kinds[first_node + i]}" if hetero else "") for i in range(nodes)
    ]
    ax.set_yticks([nodes - 1 - i + 0.5 for i in range(nodes)], labels, fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if hetero:  # a rule between node groups of different device kinds
        for i in range(1, nodes):
            if kinds[first_node + i] != kinds[first_node + i - 1]:
                ax.axhline(nodes - i, color="black", linewidth=2.0)


def _draw_overview(ax: Axes, data: ReportData, nodes: int, per: int, colors: list[ColorType]) -> None:
    import numpy as np
    from matplotlib.colors import ListedColormap

    grid = np.full((per, nodes), len(colors), dtype=float)
    for r in range(min(data.plan.world_size, nodes * per)):
        grid[r % per, r // per] = data.plan.coords(r).get("pp", 0)
    cmap = ListedColormap([*colors, F.IDLE])
    ax.imshow(grid, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(colors) + 0.5, interpolation="nearest")
    step = max(1, nodes // 16)
    ax.set_xticks(range(0, nodes, step), [str(n) for n in range(0, nodes, step)], fontsize=8)
    ax.set_yticks(range(per), [f"dev {d}" for d in range(per)], fontsize=7)
    ax.set_xlabel("node", fontsize=9)
    ax.set_title(f"all {nodes} nodes (colour = pipeline stage)", fontsize=10, loc="left")


def _legend(fig: Figure, colors: list[ColorType], pp: int) -> None:
    from matplotlib.patches import Patch

    if pp > 24:
        return  # the labels in the cells carry the stage; 24+ swatches would not help
    handles = [Patch(facecolor=colors[s], label=f"stage {s}") for s in range(pp)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(pp, 12), fontsize=8, frameon=False)


def _title(data: ReportData) -> str:
    names = ", ".join(a.name for a in data.plan.mesh)
    c = data.cluster
    where = f"{c.name}: {c.nodes} node(s) x {c.devices_per_node}" if c is not None else "cluster unknown"
    return f"Device map — {where}; labels: rank, ({names})"


def device_map(data: ReportData) -> Figure:
    """The figure (a matplotlib Figure)."""
    nodes, per, kinds = _layout(data)
    pp = data.plan.pp
    colors = F.stage_colors(pp)
    if nodes <= FULL_NODES:
        fig = F.new_figure(F.WIDTH_IN, 1.1 + ROW_IN * nodes)
        ax = fig.add_subplot()
        _draw_labelled(ax, data, 0, nodes, per, kinds, colors)
        ax.set_title(_title(data), fontsize=11, loc="left")
        _legend(fig, colors, pp)
        return fig
    need = math.ceil(min(data.plan.world_size, pp * data.plan.tp * max(1, data.plan.degree("ep"))) / per)
    detail = max(2, min(DETAIL_NODES, need))
    overview_in = 0.16 * per + 0.9
    fig = F.new_figure(F.WIDTH_IN, overview_in + 0.6 + ROW_IN * detail)
    top, bottom = fig.subfigures(2, 1, height_ratios=[overview_in, 0.6 + ROW_IN * detail])
    _draw_overview(top.add_subplot(), data, nodes, per, colors)
    ax = bottom.add_subplot()
    _draw_labelled(ax, data, 0, detail, per, kinds, colors)
    shown = "one whole dp=0 pipeline" if detail >= need else f"the first {detail} of the {need} nodes of dp=0"
    ax.set_title(f"nodes 0-{detail - 1} in detail ({shown})", fontsize=10, loc="left")
    fig.suptitle(_title(data), fontsize=11, x=0.01, ha="left")
    _legend(fig, colors, pp)
    return fig

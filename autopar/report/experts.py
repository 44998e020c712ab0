"""The report's mixture-of-experts part, for plans of models with MoE layers (issue 15 item 5).

Three things a person checking an expert-parallel plan wants to see:

* **all-to-all volume per step**: per pipeline stage, the MoE layers it runs and the all-to-alls
  one of its ranks makes in a step (count, bytes of their input buffers, bytes that leave the rank),
  from :func:`autopar.estimator.moe.all_to_all_volume` (balanced routing; the same calls the
  lowering makes, ``tests/test_moe_cost.py``);
* **expert placement**: which experts each rank holds (:func:`autopar.estimator.moe.expert_placement`,
  every MoE layer alike), as a table per ep position and as a figure on the device map;
* **per-expert load when measured**: a run's routed token-expert slots per expert and MoE layer
  (``measured["expert_tokens"]``, see :mod:`autopar.report.measured`), with each layer's
  imbalance max/mean, the factor the cost model reads as ``meta["moe"]["imbalance"]``. The runtime
  does not record expert token counts yet, so a report shows this only when a caller passes them.

:func:`moe_facts` computes the facts from a traced graph (JSON-able: ``autopar plan --out`` stores
them with the plan, so ``autopar report plan.json`` shows them without re-tracing);
:func:`moe_tables` and :func:`placement_figure` present them. A plan of a dense model gets none of
this.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autopar.core.ir import OpGraph
from autopar.core.plan import Plan
from autopar.core.text import bytes_text, count_text
from autopar.report.table import Table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from autopar.cluster import Cluster

MAX_PLACEMENT_ROWS = 64
"""Ep positions listed in the placement table (ep is at most the expert count, usually <= 64)."""


def moe_facts(plan: Plan, graph: OpGraph, *, act: float = 1.0) -> dict | None:
    """The plan's MoE facts from ``graph`` (None for a dense model): experts and MoE layers, the
    all-to-all volume of one rank of each pipeline stage per step, and the placement by ep
    position. ``act`` converts the graph's activation bytes to the costed dtype (the estimator's
    :func:`~autopar.estimator.stages.compute_dtype` factor; 1: the graph's own dtype)."""
    from autopar.estimator.moe import all_to_all_volume, expert_count, moe_nodes

    experts = expert_count(graph)
    if experts is None:
        return None
    stages = []
    for s in range(plan.pp):
        v = all_to_all_volume(graph, plan, act=act, stage=s)
        stages.append({"stage": s, **v.to_dict()})
    per = experts // max(plan.ep, 1)
    placement = [list(range(i * per, (i + 1) * per)) for i in range(plan.ep)]
    return {
        "experts": experts,
        "top_k": int(moe_nodes(graph)[0].meta["moe"]["top_k"]),
        "layers": len(moe_nodes(graph)),
        "ep": plan.ep,
        "act": act,
        "stages": stages,
        "placement": placement,
    }


def _ranks_text(ranks: list[int], limit: int = 12) -> str:
    """``[0, 8, 16, ...]`` -> ``0, 8, 16, ... (n ranks)`` when long."""
    shown = ", ".join(str(r) for r in ranks[:limit])
    return shown + (f", ... ({len(ranks)} ranks)" if len(ranks) > limit else "")


def _experts_text(experts: list[int]) -> str:
    if not experts:
        return "-"
    if experts == list(range(experts[0], experts[-1] + 1)) and len(experts) > 2:
        return f"{experts[0]}-{experts[-1]}"
    return ", ".join(str(e) for e in experts)


def volume_table(facts: dict, plan: Plan) -> Table:
    """All-to-all calls and bytes of one rank per pipeline stage and step."""
    t = Table(
        "Expert all-to-all per step (one rank of each pipeline stage)",
        ["stage", "MoE layers", "all-to-alls", "bytes in buffers", "bytes sent to other ranks", "per layer"],
    )
    calls = 5 if plan.mode == "train" else 3
    rec = " (+3 recomputed)" if plan.mode == "train" and plan.recompute == "full" else ""
    t.note = (
        f"Per MoE layer and micro-batch: the per-expert counts, the dispatch and the combine "
        f"(T·k·h bytes each){' and their two backward transposes' if plan.mode == 'train' else ''}: "
        f"{calls} calls{rec}; x {plan.num_micro_batches} micro-batches. Balanced routing: "
        f"(ep-1)/ep of each buffer leaves the rank."
    )
    if facts["ep"] == 1:
        t.note = "ep=1: every rank holds every expert, tokens stay on their rank (no all-to-all)."
    for s in facts["stages"]:
        per_layer = s["sent_bytes"] / s["layers"] if s["layers"] else 0.0
        t.rows.append([
            str(s["stage"]), str(s["layers"]), count_text(s["count"]), bytes_text(s["bytes"]),
            bytes_text(s["sent_bytes"]), bytes_text(per_layer),
        ])  # fmt: skip
    return t


def placement_table(facts: dict, plan: Plan) -> Table:
    """Per ep position: the experts held (in every MoE layer) and the ranks at that position."""
    t = Table("Expert placement (every MoE layer alike)", ["ep position", "experts", "ranks"])
    ep = facts["ep"]
    by_pos: dict[int, list[int]] = {i: [] for i in range(ep)}
    for r in range(plan.world_size):
        by_pos[plan.ep_index(r) if ep > 1 else 0].append(r)
    t.note = (
        f"{facts['experts']} experts, top-{facts['top_k']}, {facts['layers']} MoE layers; ep={ep} folded "
        f"into dp: each dp group splits into groups of {ep} consecutive dp ranks that exchange tokens; "
        f"ranks at the same position hold the same experts and reduce their gradients together."
    )
    for i in range(min(ep, MAX_PLACEMENT_ROWS)):
        t.rows.append([str(i), _experts_text(facts["placement"][i]), _ranks_text(by_pos[i])])
    return t


def load_table(expert_tokens: list[list[float]]) -> Table:
    """Measured routed slots per expert and MoE layer, with the layer's max/mean imbalance."""
    t = Table(
        "Measured load per expert (routed token-expert slots per step)",
        ["MoE layer", "min", "mean", "max", "max/mean (imbalance)", "hottest expert"],
    )
    t.note = (
        "From the run's measurements. The cost model assumes balanced routing (imbalance 1.0) unless "
        "a graph node carries meta['moe']['imbalance']; the busiest rank then holds "
        "1 + (imbalance - 1)·ep/E times the balanced work (docs/moe_cost.md)."
    )
    for layer, counts in enumerate(expert_tokens):
        mean = sum(counts) / len(counts)
        top = max(counts)
        ratio = f"{top / mean:.2f}" if mean > 0 else "-"
        t.rows.append([
            str(layer), count_text(min(counts)), count_text(mean), count_text(top), ratio,
            str(counts.index(top)),
        ])  # fmt: skip
    return t


def moe_tables(facts: dict | None, plan: Plan, measured: dict | None = None) -> list[Table]:
    """The report's MoE tables (empty for a dense model): ``facts`` from :func:`moe_facts`,
    ``measured`` a run's checked measurements (:func:`autopar.report.measured.check_measured`)."""
    if not facts:
        return []
    out = [volume_table(facts, plan), placement_table(facts, plan)]
    load = (measured or {}).get("expert_tokens")
    if load:
        out.append(load_table(load))
    return out


def placement_figure(facts: dict | None, plan: Plan, cluster: Cluster | None = None) -> Figure | None:
    """The device map coloured by ep position, each device labelled with the experts it holds
    (the first nodes in full; None for a dense model)."""
    if not facts:
        return None
    from matplotlib.patches import Rectangle

    from autopar.report import figures as F

    c = cluster
    per = c.devices_per_node if c is not None else min(8, plan.world_size)
    nodes = min(-(-plan.world_size // per), 8)
    colors = F.stage_colors(max(facts["ep"], 1))
    fig = F.new_figure(F.WIDTH_IN, 1.0 + 0.55 * nodes)
    ax = fig.add_subplot()
    font = 8 if per <= 8 else 6
    for n in range(nodes):
        y = nodes - 1 - n
        for d in range(per):
            r = n * per + d
            if r >= plan.world_size:
                color, label = F.IDLE, f"r{r}\nidle"
            else:
                i = plan.ep_index(r) if facts["ep"] > 1 else 0
                color, label = colors[i], f"r{r}\ne{_experts_text(facts['placement'][i])}"
            ax.add_patch(Rectangle((d + 0.04, y + 0.06), 0.92, 0.88, facecolor=color, edgecolor="white"))
            ax.text(
                d + 0.5, y + 0.5, label, ha="center", va="center", fontsize=font, color=F.text_color(color)
            )
    ax.set_xlim(0, per)
    ax.set_ylim(0, nodes)
    ax.set_xticks([d + 0.5 for d in range(per)], [f"dev {d}" for d in range(per)], fontsize=8)
    ax.set_yticks(
        [nodes - 1 - n + 0.5 for n in range(nodes)], [f"node {n}" for n in range(nodes)], fontsize=8
    )
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    total = -(-plan.world_size // per)
    shown = f"nodes 0-{nodes - 1} of {total}" if total > nodes else "all nodes"
    ax.set_title(
        f"Expert placement ({shown}): colour = ep position, label = rank and the experts it holds",
        fontsize=11,
        loc="left",
    )
    return fig

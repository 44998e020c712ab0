"""``Plan.explain()``: the plan's predicted cost against the runner-ups the planner stored on
``Plan.search`` (see :mod:`autopar.solve.explain`), as a table for terminals. Plain data in, text out."""

from __future__ import annotations

from autopar.core.text import bytes_text

BREAKDOWN_LABELS = {
    "compute": "compute",
    "recompute": "recompute",
    "tp_comm": "TP comm",
    "zero_comm_exposed": "ZeRO comm",
    "pp_p2p": "PP p2p",
    "pp_bubble": "PP bubble",
    "dp_comm_exposed": "DP sync",
    "optimizer": "optimizer",
    "ep_comm": "EP all-to-all",
}


def _blocks_per_stage(plan) -> list[int]:
    return [plan.layer_stages.count(s) for s in range(max(plan.layer_stages) + 1)]


def explain_text(plan) -> str:
    """A terminal table: the plan, its breakdown, the runner-ups and the rejected configurations."""
    lines = [f"plan: {plan.summary()}"]
    if getattr(plan, "ep", 1) > 1:
        lines.append(
            f"expert parallelism: ep={plan.ep} folded into dp={plan.dp}; each MoE layer's experts are "
            f"split over ep groups {plan.groups('ep')[:4]}{' ...' if len(plan.groups('ep')) > 4 else ''} "
            f"(E/{plan.ep} per rank, tokens exchanged by all-to-all), expert gradients reduced over "
            f"the dp/ep={plan.dp // plan.ep} ranks holding the same experts"
        )
    if plan.predicted:
        p = plan.predicted
        lines.append(
            f"predicted step {p.step_time_s:.4g} s, MFU {100 * p.mfu:.1f}%, "
            f"memory {bytes_text(p.memory_bytes_per_device)} / {bytes_text(p.memory_capacity_bytes)}"
        )
        parts = ", ".join(f"{BREAKDOWN_LABELS.get(k, k)} {v:.3g}s" for k, v in p.breakdown_s.items() if v > 0)
        lines.append(f"  breakdown: {parts}")
    if not plan.search:
        lines.append("(hand-written plan: no search to explain)")
        return "\n".join(lines)
    st = plan.search["stats"]
    experts = plan.search.get("expert_parallel")
    if experts:  # the planner's notes (autopar.solve.explain.expert_parallel_notes)
        lines.append(f"why ep={experts['chosen']}: {experts['why']}")
    tensor_parallel = plan.search.get("tensor_parallel")
    if tensor_parallel:
        lines.append(
            f"tensor parallelism shards {100 * tensor_parallel['param_share']:.1f}% of the parameter elements"
        )
        lines += [f"  replicated (no sharding rule): {line}" for line in tensor_parallel["replicated"]]
    prof = plan.search.get("profiled")
    if prof:
        lines.append(
            f"profiled on this machine ({prof['ranks']} ranks x {prof['threads_per_rank']} thread(s), "
            f"{prof['measured_at']}): compute x{prof['compute_slowdown']:.2f} when all ranks run, gloo "
            f"all-reduce {1e6 * prof['all_reduce_latency_s_per_hop']:.0f} us/hop and "
            f"{prof['all_reduce_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s, AdamW "
            f"{1e9 * prof['adamw_s_per_element']:.1f} ns/element; {prof['profiled_ops']} ops profiled"
        )
    lines.append(
        f"searched {st['space_size']} configurations: {st['evaluated']} costed, {st['pruned']} pruned "
        f"by bounds, {st.get('screened', 0)} out of memory, {st['invalid']} invalid; "
        f"{st['solve_time_s']:.2f} s ({st['status']}"
        + (f", optimality gap <= {100 * st['gap']:.0f}%)" if st.get("gap") else ")")
    )
    if st.get("ilp_solves"):
        lines.append(
            f"inter-op ILP: {st['ilp_solves']} solved, {st.get('refined', 0)} found a better split"
            + (f"; this plan's blocks per stage: {_blocks_per_stage(plan)}" if plan.layer_stages else "")
        )
    for tp, c in sorted(st.get("intra_op", {}).items(), key=lambda kv: int(kv[0])):
        ilp = f"{c['ilp_step_time_s']:.4g} s" if c.get("ilp_step_time_s") is not None else "n/a"
        lines.append(
            f"intra-op ILP at tp={tp}: {c['note']} (rules default {c['default_step_time_s']:.4g} s, "
            f"ILP placements {ilp}, solved in {c['solve_time_s']:.2f} s)"
        )
    if plan.search["alternatives"]:
        lines.append("runner-ups:")
        lines += [
            f"  {a['summary']:<60} {a['step_time_s']:.4g} s  {a['why']}" for a in plan.search["alternatives"]
        ]
    if plan.search["rejected"]:
        lines.append("other meshes:")
        for r in plan.search["rejected"][:12]:
            lines.append(f"  {r['config']:<24} {'fits' if r['fits'] else 'no':<5} {r['why']}")
    return "\n".join(lines)

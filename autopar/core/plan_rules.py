"""The legality rules of a plan, and the short plan keys of the CLI (``--plan tp=8,pp=8,dp=16``).

This module is the one home of the rules a plan must follow: :func:`divisors`, the predicates
:func:`tp_divides_heads`, :func:`pp_fits_layers`, :func:`batch_splits`, :func:`interleaving_fits`,
:func:`sequence_parallel_allowed`, :func:`ep_fits`, :func:`moe_knobs_fit` and the checkers :func:`check_ep`,
:func:`check_moe_knobs`, :func:`check_world_size`,
:func:`check_tp_splits_heads`, :func:`check_tp_splits_width`. :func:`resolve_plan` (the CLI), the
planner's search space (:mod:`autopar.solve.space`) and the estimator's validation
(:mod:`autopar.estimator.stages`) all use them.

Keys: ``dp tp pp`` (mesh degrees), ``ep`` (expert parallelism, folded into dp: divides dp and the
expert count), ``mbs`` (micro-batch size), ``vpp`` (virtual pipeline stages),
``schedule`` (gpipe | 1f1b | interleaved), ``recompute`` (none | selective | full), ``sp`` (sequence
parallel 0 | 1), ``zero`` (ZeRO stage 0..3).

:func:`resolve_plan` fills keys left out with fixed defaults (``tp=pp=1``, ``dp`` = the rest of the
devices, ``mbs=1``, ``1f1b``, no recompute, ``sp=0``, ``zero=0``); the planner replaces these
defaults with its own choice for the missing keys. Every rule a value breaks raises a
:class:`~autopar.core.errors.PlanError` naming the value, the rule and the values that would work.
"""

from __future__ import annotations

from autopar.core.errors import PlanError
from autopar.core.plan import RECOMPUTE, SCHEDULES, Plan
from autopar.core.text import did_you_mean

PLAN_KEYS = ("dp", "tp", "pp", "ep", "mbs", "vpp", "schedule", "recompute", "sp", "zero")
_DEGREE_KEYS = ("dp", "tp", "pp", "ep", "mbs", "vpp")
_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")


# ------------------------------------------------------------------------------ the rules
def divisors(n: int) -> list[int]:
    """The divisors of ``n`` in increasing order."""
    return [d for d in range(1, n + 1) if n % d == 0]


def tp_divides_heads(tp: int, heads: int | None, kv_heads: int | None = None) -> bool:
    """Tensor parallelism splits attention by heads: ``tp`` divides the (key/value) head counts
    (an unknown count, None or 0, is no constraint)."""
    return not (heads and heads % tp) and not (kv_heads and kv_heads % tp)


def pp_fits_layers(pp: int, num_layers: int, vpp: int = 1) -> bool:
    """Every one of the ``pp * vpp`` pipeline stages (model chunks) holds at least one layer."""
    return pp * vpp <= num_layers


def batch_splits(global_batch: int, dp: int, mbs: int = 1) -> bool:
    """The global batch splits evenly over ``dp`` replicas and each replica's into micro-batches."""
    return global_batch % dp == 0 and (global_batch // dp) % mbs == 0


def interleaving_fits(num_micro_batches: int, pp: int) -> bool:
    """The interleaved schedule needs the micro-batch count to be a multiple of ``pp``."""
    return num_micro_batches % pp == 0


def sequence_parallel_allowed(tp: int) -> bool:
    """Sequence parallelism splits along the tensor-parallel axis, so it needs ``tp > 1``."""
    return tp > 1


def ep_fits(ep: int, dp: int, experts: int | None = None) -> bool:
    """Expert parallelism folds into dp (``ep`` divides ``dp``) and shards every MoE layer's
    experts evenly (``ep`` divides the expert count; None or 0: no constraint)."""
    return dp % ep == 0 and not (experts and experts % ep)


def moe_knobs_fit(*, ep: int, zero: int, sp: bool) -> bool:
    """The knobs the expert-parallel runtime builds for a model with mixture-of-experts layers:
    no sequence parallelism (the layer needs its tokens whole on every tp rank) and, with
    ``ep > 1``, no ZeRO (ZeRO shards over the whole dp group, whose ep ranks hold different experts;
    ZeRO over the expert-data-parallel ranks is not built). A dense model has no such rule."""
    return not sp and not (ep > 1 and zero > 0)


def check_moe_knobs(*, ep: int, zero: int, sp: bool) -> None:
    """:func:`moe_knobs_fit` for a model with MoE layers, with a message naming the fix."""
    if sp:
        raise PlanError(
            "sequence parallelism with MoE layers is not supported yet (the MoE layer needs its "
            "tokens whole on every tp rank); use sp=0"
        )
    if ep > 1 and zero > 0:
        raise PlanError(
            f"zero={zero} with ep={ep}: ZeRO shards over the whole dp group, whose ep ranks hold "
            "different experts (ZeRO over the expert-data-parallel ranks is not built); use zero=0 "
            "with expert parallelism, or ep=1 with ZeRO"
        )


def check_ep(ep: int, dp: int, experts: list[int]) -> None:
    """:func:`ep_fits` for every MoE layer's expert count, with a message naming the fix."""
    if dp % ep:
        raise PlanError(
            f"ep={ep} does not divide dp={dp}: expert parallelism folds into data parallelism; "
            f"choose ep in {_choices(divisors(dp))}"
        )
    for e in experts:
        if e % ep:
            ok = [d for d in divisors(e) if dp % d == 0]
            raise PlanError(
                f"ep={ep} does not divide the {e} experts of a MoE layer (each ep rank holds E/ep "
                f"experts); choose ep in {_choices(ok)}"
            )


def check_world_size(plan: Plan, num_devices: int, cluster_name: str) -> None:
    """The product of the plan's degrees is the device count of the cluster ``cluster_name``."""
    if plan.world_size != num_devices:
        degrees = " x ".join(f"{a.name}={a.size}" for a in plan.mesh)
        raise PlanError(
            f"plan degrees {degrees} = {plan.world_size} devices, but cluster {cluster_name!r} has "
            f"{num_devices}; the product of the degrees must equal the device count"
        )


def check_tp_splits_heads(tp: int, heads: list[int]) -> None:
    """``tp`` divides every head count of a traced graph (:func:`tp_divides_heads` per count)."""
    for h in heads:
        if not tp_divides_heads(tp, h):
            raise PlanError(
                f"tp={tp} does not divide the {h} attention heads; tensor parallelism splits heads "
                f"evenly: choose tp in {divisors(h)}"
            )


def check_tp_splits_width(tp: int, width: int, where: str) -> None:
    """``tp`` divides the output features ``width`` of the Linear ``where``."""
    if width % tp:
        raise PlanError(
            f"tp={tp} does not divide the {width} output features of {where}; "
            "choose a tp that divides every Linear's width (and the vocabulary)"
        )


def _choices(values: list[int], limit: int = 12) -> str:
    shown = ", ".join(map(str, values[:limit]))
    return "{" + shown + (", ..." if len(values) > limit else "") + "}"


def _value(key: str, raw: object) -> object:
    """One key's value, typed and range-checked."""
    text = str(raw).strip().lower()
    if key in _DEGREE_KEYS:
        if isinstance(raw, bool) or not (isinstance(raw, int) or text.isdigit()) or int(text) < 1:
            raise PlanError(f"plan key {key}={raw!r}: must be a whole number >= 1")
        return int(text)
    if key == "zero":
        if text not in ("0", "1", "2", "3"):
            raise PlanError(f"plan key zero={raw!r}: the ZeRO stage must be 0, 1, 2 or 3")
        return int(text)
    if key == "sp":
        if text not in _TRUE + _FALSE:
            raise PlanError(f"plan key sp={raw!r}: sequence parallelism is 0 or 1")
        return int(text in _TRUE)
    options = SCHEDULES if key == "schedule" else RECOMPUTE
    if text not in options:
        raise PlanError(f"plan key {key}={raw!r}: choose one of {', '.join(options)}")
    return text


def check_keys(keys: dict) -> dict:
    """Validate names and values of a keys dict (typed copy)."""
    out = {}
    for key, raw in keys.items():
        if key not in PLAN_KEYS:
            hint = did_you_mean(str(key), PLAN_KEYS)
            raise PlanError(f"unknown plan key {key!r}{hint}; known keys: {', '.join(PLAN_KEYS)}")
        out[key] = _value(key, raw)
    return out


def parse_plan_arg(text: str | None) -> dict:
    """``"tp=8,pp=8,dp=16"`` -> ``{"tp": 8, "pp": 8, "dp": 16}`` (typed and validated)."""
    keys: dict = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not value:
            raise PlanError(f"--plan item {item!r} is not key=value; example: --plan tp=8,pp=4,mbs=1")
        if key in keys:
            raise PlanError(f"--plan gives {key} twice")
        keys[key] = value
    return check_keys(keys)


def resolve_plan(
    keys: dict,
    cluster,
    num_layers: int,
    heads: int | None,
    global_batch: int,
    *,
    kv_heads: int | None = None,
) -> Plan:
    """A full :class:`Plan` from the keys given; the rest take the documented defaults.

    ``heads`` may be None for a model whose head count is unknown (the tp rule is then skipped);
    ``kv_heads`` (grouped-query attention) must be divisible by tp as well, as in Megatron-LM.
    """
    k = check_keys(keys)
    devices = cluster.num_devices
    where = f"cluster {cluster.name!r} has {devices} devices"
    tp, pp = k.get("tp", 1), k.get("pp", 1)
    if "dp" in k:
        dp = k["dp"]
        if dp * tp * pp != devices:
            hint = ""
            if dp * tp * pp == devices * cluster.devices_per_node:
                hint = (
                    f"; note that PRESET:{devices} means {devices} devices in all: for {devices} nodes "
                    f"write PRESET:nodes={devices}"
                )
            raise PlanError(
                f"dp*tp*pp = {dp}*{tp}*{pp} = {dp * tp * pp} but {where}; the degrees must multiply to "
                f"{devices} (leave dp out to use all the devices left after tp and pp){hint}"
            )
    elif devices % (tp * pp):
        raise PlanError(
            f"tp*pp = {tp}*{pp} = {tp * pp} does not divide the {devices} devices of cluster {cluster.name!r}; "
            f"choose tp*pp in {_choices(divisors(devices))}"
        )
    else:
        dp = devices // (tp * pp)
    if not tp_divides_heads(tp, heads):
        ok = [d for d in divisors(heads) if devices % d == 0]
        raise PlanError(
            f"tp={tp} does not divide the model's {heads} attention heads (tensor parallelism splits "
            f"attention by heads); choose tp in {_choices(ok)}"
        )
    if not tp_divides_heads(tp, None, kv_heads):
        ok = [d for d in divisors(kv_heads) if devices % d == 0]
        raise PlanError(
            f"tp={tp} does not divide the model's {kv_heads} key/value heads (grouped-query attention "
            f"splits key/value heads across tp ranks); choose tp in {_choices(ok)}"
        )
    vpp = k.get("vpp", 1)
    schedule = k.get("schedule", "interleaved" if vpp > 1 else "1f1b")
    _check_pipeline(pp, vpp, schedule, num_layers)
    mbs = _check_batch(global_batch, dp, k.get("mbs", 1))
    micro_batches = global_batch // (dp * mbs)
    if schedule == "interleaved" and not interleaving_fits(micro_batches, pp):
        raise PlanError(
            f"schedule=interleaved needs the {micro_batches} micro-batches per step (global batch "
            f"{global_batch} / (dp={dp} * mbs={mbs})) to be a multiple of pp={pp}; change mbs or the batch"
        )
    ep = k.get("ep", 1)
    if dp % ep:
        raise PlanError(
            f"ep={ep} does not divide dp={dp}: expert parallelism folds into data parallelism (the "
            f"dp group splits into dp/ep replicas of ep ranks); choose ep in {_choices(divisors(dp))}"
        )
    sp = k.get("sp", 0)
    if sp and not sequence_parallel_allowed(tp):
        raise PlanError("sp=1 needs tp > 1: sequence parallelism splits along the tensor-parallel axis")
    return Plan.manual(
        dp=dp,
        tp=tp,
        pp=pp,
        global_batch=global_batch,
        micro_batch_size=mbs,
        schedule=schedule,
        virtual_stages=vpp,
        recompute=k.get("recompute", "none"),
        sequence_parallel=bool(sp),
        zero_stage=k.get("zero", 0),
        ep=ep,
    )


def _check_pipeline(pp: int, vpp: int, schedule: str, num_layers: int) -> None:
    if vpp > 1 and schedule != "interleaved":
        raise PlanError(f"vpp={vpp} needs schedule=interleaved (got {schedule}); drop vpp or the schedule")
    if schedule == "interleaved" and vpp < 2:
        raise PlanError(
            "schedule=interleaved needs vpp >= 2 model chunks per pipeline rank; set vpp=2 or more"
        )
    if schedule == "interleaved" and pp < 2:
        raise PlanError(
            f"vpp={vpp} (schedule=interleaved) needs pp >= 2 pipeline stages, got pp={pp}; "
            "set pp=2 or more, or drop vpp and use schedule=1f1b"
        )
    if not pp_fits_layers(pp, num_layers, vpp):
        raise PlanError(
            f"pp*vpp = {pp}*{vpp} = {pp * vpp} stages exceed the model's {num_layers} layers; "
            f"choose pp*vpp <= {num_layers}"
        )


def _check_batch(global_batch: int, dp: int, mbs: int) -> int:
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise PlanError(f"global batch {global_batch!r}: must be a whole number >= 1")
    if not batch_splits(global_batch, dp):
        ok = [d for d in divisors(global_batch) if d <= dp]
        raise PlanError(
            f"global batch {global_batch} does not split over dp={dp} data-parallel replicas; choose a "
            f"global batch divisible by {dp} (or a dp in {_choices(ok)})"
        )
    per_replica = global_batch // dp
    if not batch_splits(global_batch, dp, mbs):
        raise PlanError(
            f"mbs={mbs} does not divide the per-replica batch {global_batch}/dp={dp} = {per_replica}; "
            f"choose mbs in {_choices(divisors(per_replica))}"
        )
    return mbs


def mesh_label(keys: dict) -> str:
    """``dp=2 tp=4 pp=1`` (with the axis order when the keys carry one): a mesh's name in reports."""
    label = f"dp={keys['dp']} tp={keys['tp']} pp={keys['pp']}"
    return label + f" ({','.join(keys['order'])})" if "order" in keys else label


def plan_keys(plan: Plan) -> dict:
    """The resolved short keys of ``plan`` (what ``--json`` prints under ``plan``)."""
    return {
        "dp": plan.dp,
        "tp": plan.tp,
        "pp": plan.pp,
        "mbs": plan.micro_batch_size,
        "vpp": plan.virtual_stages,
        "schedule": plan.schedule,
        "recompute": plan.recompute,
        "sp": int(plan.sequence_parallel),
        "zero": plan.zero_stage,
        "micro_batches": plan.num_micro_batches,
        "global_batch": plan.global_batch,
        **({"ep": plan.ep} if plan.ep > 1 else {}),
    }

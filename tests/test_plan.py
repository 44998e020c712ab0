"""The Plan type: rank layout, JSON round-trip and the errors for bad plan files (no processes)."""

import pytest

from autopar.core.errors import PlanError
from autopar.core.plan import NodePlacement, Partial, Plan, PredictedCost, Replicate, Shard, parse_placement


def test_rank_groups_follow_the_documented_row_major_layout():
    plan = Plan.manual(dp=2, pp=2, tp=2, global_batch=8, micro_batch_size=1)
    assert plan.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert plan.groups("pp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert plan.groups("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert plan.coords(5) == {"dp": 1, "pp": 0, "tp": 1}
    assert plan.num_micro_batches == 4


def test_json_round_trip_keeps_placements_costs_and_search():
    placements = {
        "fc1": NodePlacement(output=Shard(1), params={"fc1.weight": Shard(0)}),
        "fc2": NodePlacement(
            output=Replicate(),
            params={"fc2.weight": Shard(1)},
            collective="all_reduce",
            comms=[{"kind": "all_reduce", "bytes": 1024, "phase": "fwd"}],
        ),
    }
    plan = Plan.manual(
        dp=2, tp=2, pp=2, global_batch=16, micro_batch_size=2, schedule="interleaved", virtual_stages=2,
        recompute="selective", sequence_parallel=True, zero_stage=1, layer_stages=[0, 1, 2, 3],
        placements=placements, predicted=PredictedCost(step_time_s=1.5, breakdown_s={"compute": 1.5}),
        search={"stats": {"evaluated": 3}},
    )  # fmt: skip
    again = Plan.from_json(plan.to_json())
    assert again.to_dict() == plan.to_dict()
    assert again.placements["fc2"].comms[0]["bytes"] == 1024
    assert [str(parse_placement(s)) for s in ("R", "P", "S(2)")] == ["R", "P", "S(2)"]
    assert isinstance(parse_placement("P"), Partial)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"version": 99}, "plan version 99 is not supported"),
        ({"mesh": [{"size": 2}]}, "mesh[0] is missing 'name'"),
        ({"mesh": []}, "'mesh' must be a non-empty list"),
        ({"predicted": {"step_time_s": 1.0, "bogus": 2}}, "unknown key(s) ['bogus']"),
        ({"predicted": {"fits": True}}, "missing 'step_time_s'"),
        ({"schedule": "zigzag"}, "schedule='zigzag'"),
        ({"placements": {"x": {"output": "Q"}}}, "placements['x']: placement 'Q'"),
        ({"colour": "red"}, "unknown field(s) ['colour']"),
    ],
)
def test_bad_plan_files_name_the_field(change, message):
    d = Plan.manual(dp=2, global_batch=8).to_dict()
    d.update(change)
    with pytest.raises(PlanError) as e:
        Plan.from_dict(d)
    assert message in str(e.value)


def test_missing_required_field_is_named():
    d = Plan.manual(dp=2, global_batch=8).to_dict()
    del d["micro_batch_size"]
    with pytest.raises(PlanError, match="missing the field 'micro_batch_size'"):
        Plan.from_dict(d)


def test_batch_that_does_not_split_is_rejected_with_the_rule():
    with pytest.raises(PlanError, match="does not split into dp=4"):
        Plan.manual(dp=4, global_batch=6, micro_batch_size=1)

"""StagePlan alone: the stage lengths each growth and back-off visits, on scripted stage outcomes."""

import pytest

from cram_sweep.config import MethodConfig
from cram_sweep.methods.stages import StagePlan
from cram_sweep.results.columns import StageRecord


def visit(method: MethodConfig, cap: int, fits_up_to: int, budget_stages: int = 100) -> tuple[list, StagePlan]:
    """Run a plan as the engine does, with a stage converging exactly when its length is <= `fits_up_to`:
    the (length, phase, restore) of every stage, and the plan."""
    plan, visited, restore = StagePlan(method, cap), [], False
    while True:
        length = plan.length
        visited.append((length, plan.phase, restore))
        record = StageRecord(len(plan.records), length, plan.phase, length <= fits_up_to, 10, 10 * len(visited), 1.0, 0.0)
        following = plan.next(record, budget_left=len(visited) < budget_stages)
        if following is None:
            return visited, plan
        restore = following.restore


def test_linear_growth_adds_the_step_until_a_stage_fails_or_the_cap_converges():
    visited, plan = visit(MethodConfig(name="progressive", min_length=2, step=4), cap=16, fits_up_to=11)
    assert [v[0] for v in visited] == [2, 6, 10, 14] and plan.horizon == 10 and plan.first_failed.length == 14
    visited, plan = visit(MethodConfig(name="progressive", min_length=2, step=4), cap=12, fits_up_to=99)
    assert [v[0] for v in visited] == [2, 6, 10, 12] and plan.horizon == 12 and plan.first_failed is None
    assert {v[1] for v in visited} == {"grow"} and not any(v[2] for v in visited)


def test_geometric_bisect_doubles_then_bisects_from_the_snapshot():
    method = MethodConfig(name="progressive", growth="geometric", backoff="bisect", min_length=2, step=1)
    visited, plan = visit(method, cap=64, fits_up_to=21)
    lengths = [v[0] for v in visited]
    assert lengths[:5] == [2, 4, 8, 16, 32], "doubling until the first failure"
    assert lengths[5:] == [24, 20, 22, 21] and plan.horizon == 21, "bisection of (16, 32) down to one token"
    assert all(v[2] for v in visited[5:]) and all(v[1] == "bisect" for v in visited[5:]), "each probe from the snapshot"


def test_geometric_linear_backoff_walks_up_by_one_from_the_snapshot_once():
    method = MethodConfig(name="progressive", growth="geometric", backoff="linear", min_length=2)
    visited, plan = visit(method, cap=64, fits_up_to=19)
    assert [v[0] for v in visited] == [2, 4, 8, 16, 32, 17, 18, 19, 20] and plan.horizon == 19
    assert [v[2] for v in visited[5:]] == [True, False, False, False], "restored once, when the walk starts"


@pytest.mark.parametrize("growth", ["linear", "geometric"])
def test_a_failing_first_stage_and_a_spent_budget_end_the_sample(growth):
    method = MethodConfig(name="progressive", growth=growth, min_length=2, step=2)
    visited, plan = visit(method, cap=32, fits_up_to=1)
    assert [v[0] for v in visited] == [2] and plan.horizon == 0
    visited, plan = visit(method, cap=32, fits_up_to=99, budget_stages=2)
    assert len(visited) == 2 and plan.horizon == visited[-1][0]

import numpy as np
import pytest

from distgen.parallel.plan import assign_to_ranks, decode_order


def as_lists(shards) -> list[list[int]]:
    return [shard.tolist() for shard in shards]


def test_every_prompt_assigned_once_and_loads_balanced():
    costs = [50, 10, 10, 10, 10, 10, 40, 5, 5, 3]
    shards = as_lists(assign_to_ranks(costs, 3))
    flat = sorted(i for shard in shards for i in shard)
    assert flat == list(range(len(costs)))
    loads = [sum(costs[i] for i in shard) for shard in shards]
    assert max(loads) - min(loads) <= max(costs[i] for i in range(len(costs)) if costs[i] < 50)
    assert all(shard == sorted(shard) for shard in shards)


def test_plan_is_deterministic_and_longest_goes_first_to_rank0():
    costs = [3, 9, 9, 1]
    assert as_lists(assign_to_ranks(costs, 2)) == as_lists(assign_to_ranks(np.array(costs), 2)) == [[0, 1], [2, 3]]


def test_fewer_prompts_than_ranks_leaves_ranks_empty():
    assert as_lists(assign_to_ranks([7], 3)) == [[0], [], []]
    assert as_lists(assign_to_ranks([], 2)) == [[], []]


def test_bad_world_size():
    with pytest.raises(ValueError, match="world_size=0"):
        assign_to_ranks([1], 0)


def test_decode_order_is_largest_budget_then_longest_prompt_ties_by_index():
    lengths = {0: 5, 2: 50, 4: 7, 6: 49, 8: 7}
    full = [lengths.get(i, 0) for i in range(9)]
    same = [16] * 9
    assert decode_order([0, 2, 4, 6, 8], full, same).tolist() == [2, 6, 4, 8, 0]
    assert decode_order([], full, same).tolist() == []
    budgets = [16, 0, 8, 0, 64, 0, 8, 0, 16]
    assert decode_order([0, 2, 4, 6, 8], full, budgets).tolist() == [4, 8, 0, 2, 6]


def test_decode_order_groups_prompts_by_adapter_first():
    lengths = [5, 0, 50, 0, 7, 0, 49, 0, 7]
    adapters = [2, 0, 1, 0, 0, 0, 2, 0, 1]  # 0: the base model, k: model.lora's k-th adapter
    # the base model's prompts, then adapter 1's, then adapter 2's; within a group as before
    assert decode_order([0, 2, 4, 6, 8], lengths, [16] * 9, adapters).tolist() == [4, 2, 8, 6, 0]


def reference_assign(costs: list[int], world_size: int) -> list[list[int]]:
    """The plan as first written: a Python loop over every rank for every prompt."""
    loads, shards = [0] * world_size, [[] for _ in range(world_size)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        loads[rank] += costs[index]
        shards[rank].append(index)
    return [sorted(shard) for shard in shards]


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_plan_equals_the_reference_greedy_on_many_prompts(world_size):
    rng = np.random.default_rng(world_size)
    costs = rng.integers(1, 40, size=5000)  # many ties: the tie rules decide
    assert as_lists(assign_to_ranks(costs, world_size)) == reference_assign(costs.tolist(), world_size)
    lengths, budgets = rng.integers(1, 9, size=5000), rng.integers(1, 4, size=5000)
    mine = np.flatnonzero(rng.random(5000) < 0.5)
    expected = sorted(mine.tolist(), key=lambda i: (-budgets[i], -lengths[i], i))
    assert decode_order(mine, lengths, budgets).tolist() == expected

import pytest

from distgen.parallel.plan import assign_to_ranks, decode_order


def test_every_prompt_assigned_once_and_loads_balanced():
    costs = [50, 10, 10, 10, 10, 10, 40, 5, 5, 3]
    shards = assign_to_ranks(costs, 3)
    flat = sorted(i for shard in shards for i in shard)
    assert flat == list(range(len(costs)))
    loads = [sum(costs[i] for i in shard) for shard in shards]
    assert max(loads) - min(loads) <= max(costs[i] for i in range(len(costs)) if costs[i] < 50)
    assert all(shard == sorted(shard) for shard in shards)


def test_plan_is_deterministic_and_longest_goes_first_to_rank0():
    costs = [3, 9, 9, 1]
    assert assign_to_ranks(costs, 2) == assign_to_ranks(list(costs), 2)
    assert assign_to_ranks(costs, 2) == [[0, 1], [2, 3]]


def test_fewer_prompts_than_ranks_leaves_ranks_empty():
    assert assign_to_ranks([7], 3) == [[0], [], []]
    assert assign_to_ranks([], 2) == [[], []]


def test_bad_world_size():
    with pytest.raises(ValueError, match="world_size=0"):
        assign_to_ranks([1], 0)


def test_decode_order_is_largest_budget_then_longest_prompt_ties_by_index():
    lengths = {0: 5, 2: 50, 4: 7, 6: 49, 8: 7}
    full = [lengths.get(i, 0) for i in range(9)]
    same = [16] * 9
    assert decode_order([0, 2, 4, 6, 8], full, same) == [2, 6, 4, 8, 0]
    assert decode_order([], full, same) == []
    budgets = [16, 0, 8, 0, 64, 0, 8, 0, 16]
    assert decode_order([0, 2, 4, 6, 8], full, budgets) == [4, 8, 0, 2, 6]

"""zero3, device_map and sharded groups with replicas (hybrid fsdp/zero3), on gloo ranks,
checked against single-process `model.generate`."""
import pytest

from distgen.common.errors import ConfigError
from distgen.catalog.load import load_config
from tests.helpers import (DEFAULT_BUDGET, PROMPTS, job_args, read_outputs, read_stats, reference_greedy,
                           run_deepspeed, run_module, write_prompts)

# The unsharded remainder a ZeRO-3 partition may carry: each parameter padded to a multiple of the ranks.
PADDING_SLACK_BYTES = 4096


def assert_equals_generate(out, model, tokenizer, prompts, eos):
    records = read_outputs(out)
    assert [r["id"] for r in records] == [p["id"] for p in prompts]
    for record, prompt in zip(records, prompts):
        want = reference_greedy(model, tokenizer, prompt["prompt"], prompt.get("max_new_tokens", DEFAULT_BUDGET), eos)
        assert record["completion_token_ids"] == want, prompt["id"]


def assert_lockstep(ranks):
    """Every rank of a lockstep group made the same number of forwards, some of them dummy ones."""
    steps = [s["forward_steps"] for s in ranks]
    assert steps[0] != steps[1], "the prompts should make the ranks finish at different steps"
    assert len({s["forward_steps"] + s["idle_steps"] for s in ranks}) == 1
    assert max(s["idle_steps"] for s in ranks) > 0


def resident(rank_stats) -> int:
    return sum(size for where, size in rank_stats["param_bytes"].items() if where != "disk")


def test_zero3_sharded_offloaded_equals_generate_under_torchrun_and_deepspeed(tiny_model_dir, tiny_model, tokenizer,
                                                                              prompts_file, tmp_path):
    eos = [reference_greedy(tiny_model, tokenizer, "The capital of France is", DEFAULT_BUDGET, [])[2]]
    args = ["layout=zero3", "layout.offload_param=cpu", "layout.param_persistence_threshold=0",
            "generation.sync_every=3", f"generation.eos_token_ids=[{eos[0]}]"]
    by_torchrun, by_deepspeed = tmp_path / "torchrun", tmp_path / "deepspeed"
    result = run_module("distgen.run", job_args(tiny_model_dir, prompts_file, by_torchrun, *args), nproc=2)
    assert result.returncode == 0, result.stderr
    assert_equals_generate(by_torchrun, tiny_model, tokenizer, PROMPTS, eos)
    assert read_outputs(by_torchrun)[1]["finish_reason"] == "eos"
    ranks = read_stats(by_torchrun)["ranks"]
    assert_lockstep(ranks)
    full = ranks[0]["model_param_bytes"]
    assert full == sum(p.numel() * p.element_size() for p in tiny_model.parameters())
    for rank in ranks:  # ZeRO-3 partitions: each rank holds half the model (cpu offload: in host memory)
        assert set(rank["param_bytes"]) == {"cpu"} and resident(rank) <= full / 2 + PADDING_SLACK_BYTES

    result = run_deepspeed("distgen.run", job_args(tiny_model_dir, prompts_file, by_deepspeed, *args), gpus=2)
    assert result.returncode == 0, result.stderr
    assert read_outputs(by_deepspeed) == read_outputs(by_torchrun)


def test_zero3_gather_for_generation_equals_generate_and_runs_free(tiny_model_dir, tiny_model, tokenizer,
                                                                     prompts_file, tmp_path):
    out = tmp_path / "out"
    result = run_module("distgen.run", job_args(tiny_model_dir, prompts_file, out, "layout=zero3",
                                                "layout.gather_for_generation=true",
                                                "layout.param_persistence_threshold=0"), nproc=2)
    assert result.returncode == 0, result.stderr
    assert_equals_generate(out, tiny_model, tokenizer, PROMPTS, [tokenizer.eos_token_id])
    ranks = read_stats(out)["ranks"]
    assert all(s["idle_steps"] == 0 for s in ranks)  # each rank generates with its own full copy
    assert all(resident(s) <= s["model_param_bytes"] / 2 + PADDING_SLACK_BYTES for s in ranks)


def test_device_map_disk_offload_equals_generate(tiny_model_dir, tiny_model, tokenizer, prompts_file, tmp_path):
    out, offload = tmp_path / "out", tmp_path / "offload"
    # Room for the embeddings and one decoder block in memory: the rest of the model goes to disk.
    result = run_module("distgen.run", job_args(tiny_model_dir, prompts_file, out, "layout=device_map",
                                                "+layout.max_memory.cpu=400000", f"layout.offload_folder={offload}"),
                        nproc=2)
    assert result.returncode == 0, result.stderr
    assert_equals_generate(out, tiny_model, tokenizer, PROMPTS, [tokenizer.eos_token_id])
    ranks = read_stats(out)["ranks"]
    full = ranks[0]["model_param_bytes"]
    for rank in ranks:
        assert set(rank["device_map"].values()) == {"cpu", "disk"}
        assert 0 < rank["param_bytes"]["disk"] < full and sum(rank["param_bytes"].values()) == full
        assert all(s["idle_steps"] == 0 for s in ranks)
    assert "rank 0 device map: " in result.stdout and ": disk" in result.stdout
    assert not any(offload.iterdir()), "offloaded weights are removed after generation"


@pytest.mark.parametrize("layout", ["fsdp", "zero3"])
def test_two_groups_of_two_ranks_each_shard_one_copy(layout, tiny_model_dir, tiny_model, tokenizer, tmp_path):
    # 3 prompts over 2 groups of 2 ranks: one group gets one prompt (so one of its ranks none), and
    # the groups finish at different steps: each group's all-reduce must run on that group alone.
    prompts = write_prompts(tmp_path / "p.jsonl", [PROMPTS[2], PROMPTS[1], PROMPTS[6]])
    out = tmp_path / "out"
    extra = ["layout.param_persistence_threshold=0"] if layout == "zero3" else []
    result = run_module("distgen.run", job_args(tiny_model_dir, prompts, out, f"layout={layout}",
                                                "layout.shard_group_size=2", *extra), nproc=4, timeout=400)
    assert result.returncode == 0, result.stderr
    assert_equals_generate(out, tiny_model, tokenizer, [PROMPTS[2], PROMPTS[1], PROMPTS[6]], [tokenizer.eos_token_id])
    ranks = read_stats(out)["ranks"]
    assert sorted(s["prompts"] for s in ranks) == [0, 1, 1, 1]
    first, second = ranks[:2], ranks[2:]
    for group in (first, second):
        assert len({s["forward_steps"] + s["idle_steps"] for s in group}) == 1
    assert first[0]["forward_steps"] + first[0]["idle_steps"] != second[0]["forward_steps"] + second[0]["idle_steps"]
    full = ranks[0]["model_param_bytes"]
    for rank in ranks:  # each group holds one copy: half of it per rank, plus what a layout leaves unsharded
        assert resident(rank) <= full / 2 + PADDING_SLACK_BYTES


@pytest.mark.parametrize("overrides, message", [
    (["layout=replicate", "layout.shard_group_size=2"],
     r"unknown config key 'layout.shard_group_size'; keys allowed under layout: name$"),
    (["layout=zero3", "layout.offload_param=disk"],
     r"layout.offload_param='disk' is not allowed: expected one of none, cpu, nvme"),
    (["layout=zero3", "layout.offload_param=nvme"], r"layout.nvme_path=None is not allowed: .*needs layout.nvme_path"),
    (["layout=zero3", "layout.max_memory={cpu: 1GiB}"], r"unknown config key 'layout.max_memory'; keys allowed "
                                                        r"under layout: name, offload_param"),
    (["layout=device_map", "+layout.max_memory.gpu=1GiB"],
     r"layout.max_memory.gpu='1GiB' is not allowed: max_memory keys are cuda, cpu"),
    (["layout=device_map", "layout.devices_per_replica=0"], r"layout.devices_per_replica=0 is not allowed"),
    (["layout=fsdp", "layout.shard_group_size=0"], r"layout.shard_group_size=0 is not allowed"),
    (["generation.sync_every=0"], r"generation.sync_every=0 is not allowed: must be >= 1"),
])
def test_layout_settings_are_checked_before_start(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["model=tiny", "dataset=demo", *overrides])


def test_prompts_split_over_groups_then_over_ranks_of_a_group():
    from types import SimpleNamespace

    import numpy as np

    from distgen.parallel.layouts.base import contiguous_groups
    from distgen.job.worker import rank_shard, split_costs

    groups = [contiguous_groups(4, 2, rank) for rank in range(4)]
    assert groups[3].groups == ((0, 1), (2, 3)) and groups[3].members == (2, 3)
    job = SimpleNamespace(lengths=np.array([9, 1, 5, 3, 7]), budgets=np.zeros(5, dtype=np.int32), todo=np.arange(5),
                          adapters=np.zeros(5, dtype=np.int32),
                          cfg=SimpleNamespace(generation=SimpleNamespace(max_new_tokens=1)),
                          left=np.ones(5, dtype=np.int64))
    shards = [rank_shard(job, groups[rank], rank) for rank in range(4)]
    assert sorted(i for shard in shards for i in shard) == list(range(5))
    # costs 10, 2, 6, 4, 8: groups get {0, 3, 1} (16) and {4, 2} (14); then each group balances its own.
    assert [shard.tolist() for shard in shards] == [[0], [3, 1], [4], [2]]
    # generation.n: a prompt costs its length plus its budget per sample left (prefilled once, n decoded):
    # costs 10, 2, 6, 4, 16 put the 9-sample prompt 4 with prompt 3 (20) against {0, 1, 2} (18)
    job.left = np.array([1, 1, 1, 1, 9])
    assert [part.tolist() for part in split_costs(np.arange(5), job, 2)] == [[3, 4], [0, 1, 2]]


def test_deepspeed_builds_its_ops_outside_the_package_folder():
    """An installed wheel's folder is site-packages: DeepSpeed's JIT-built ops go to the user's cache."""
    from pathlib import Path

    import distgen
    from distgen.parallel.layouts.zero3 import EXTENSIONS_DIR

    assert not EXTENSIONS_DIR.is_relative_to(Path(distgen.__file__).resolve().parents[1]), EXTENSIONS_DIR
    assert EXTENSIONS_DIR.is_relative_to(Path.home())


def test_deepspeed_config_from_layout_settings():
    import torch

    from distgen.parallel.layouts.zero3 import Zero3Layout, deepspeed_config

    ds = deepspeed_config(Zero3Layout(offload_param="nvme", nvme_path="/nvme", param_persistence_threshold=0,
                                      stage3_prefetch_bucket_size=1000), torch.bfloat16)
    assert ds["zero_optimization"] == {"stage": 3, "offload_param": {"device": "nvme", "pin_memory": False,
                                                                     "nvme_path": "/nvme"},
                                       "stage3_prefetch_bucket_size": 1000, "stage3_param_persistence_threshold": 0}
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False} and "optimizer" not in ds
    assert deepspeed_config(Zero3Layout(), torch.float32)["zero_optimization"] == {"stage": 3}


def test_half_built_nvme_op_is_detected(tmp_path):
    from distgen.parallel.layouts.zero3 import check_nvme_offload

    lock = tmp_path / "py311_cpu" / "async_io" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    with pytest.raises(RuntimeError, match=r"async_io/lock exists: an earlier build .* stopped halfway"):
        check_nvme_offload(tmp_path)


def test_device_map_is_printed_as_runs():
    from distgen.outputs.coordinator import compact_map

    assert compact_map({"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                        "model.norm": "disk", "lm_head": "cuda:0"}) == \
        "model.embed_tokens..model.layers.0: cpu, model.layers.1..model.norm: disk, lm_head: cuda:0"

"""The pipelined engine (engine/core.py): where the cache addresses rows by slot id, step N+1 is launched from
device state before step N's tokens are read, and every device->host read goes through one counted function
(engine/host.py). Finishes seen a step late (EOS, stop strings) drop the extra token: outputs do not change."""
from dataclasses import replace

import pytest
import torch

from distgen.config import GenerationConfig
from distgen.engine.host import READS, Pending, read, upload_all
from distgen.engine.stops import StopStrings
from tests.helpers import DEFAULT_BUDGET, PROMPTS, assert_matches_generate, engine_for, generate_all, reads_per_step

CPU = torch.device("cpu")


@pytest.mark.parametrize("scheduler", ["continuous", "chunked", "static"])
def test_one_host_read_per_step_and_late_finishes_change_nothing(tiny_model, tokenizer, scheduler):
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=3, cache="static", compile="off",
                           scheduler=scheduler, prefill_chunk_tokens=24, cpu_kernels="torch",
                           attention="varlen_reference")
    free = generate_all(engine_for(tiny_model, tokenizer, PROMPTS, cfg))
    eos = free["france"].token_ids[2]  # an EOS the engine learns of one step after it was sampled
    engine = engine_for(tiny_model, tokenizer, PROMPTS, cfg, eos_ids=[eos])
    assert engine.pipelined and "pipelined steps" in engine.choice
    counts = reads_per_step(engine)
    got = generate_all(engine)
    assert_matches_generate(tiny_model, tokenizer, got, PROMPTS, eos_ids=[eos])
    assert got["france"].finish_reason == "eos" and len(got["france"].token_ids) == 3
    assert max(counts) == 1 and engine.host_reads == sum(counts) <= engine.forwards + 1
    assert not engine.inflight and all(r.inflight == 0 for r in engine.running)
    assert sorted(engine.kv.free) == [0, 1, 2] and not engine.kv.owners


def test_stop_strings_and_sampling_are_the_same_pipelined(tiny_model, tokenizer):
    """Seeded sampling draws from each prompt's own generator; a stop string found a step late cuts the same
    tokens. Pipelined (varlen_reference) against the synchronous torch_sdpa path."""
    stops = StopStrings(tokenizer)
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=3, cache="static", compile="off",
                           do_sample=True, temperature=0.9, top_k=20, seed=3, cpu_kernels="torch")

    def run(name, records):
        engine = engine_for(tiny_model, tokenizer, records, replace(cfg, attention=name), stop_check=stops.hit)
        assert engine.pipelined == (name == "varlen_reference")
        return {k: (c.token_ids, c.finish_reason) for k, c in generate_all(engine).items()}
    free = run("torch_sdpa", PROMPTS)
    # every other record stops at a piece of its own sampled text
    records = [dict(r, stop=[stops.decode(free[r["id"]][0])[2:4]]) if i % 2 else r for i, r in enumerate(PROMPTS)]
    want = run("torch_sdpa", records)
    assert run("varlen_reference", records) == want
    assert sum(reason == "stop" for _, reason in want.values()) >= 2, want


def test_synchronous_caches_count_their_reads_too(tiny_model, tokenizer):
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=3, cache="dynamic", compile="off")
    engine = engine_for(tiny_model, tokenizer, PROMPTS, cfg)
    assert not engine.pipelined
    generate_all(engine)
    assert engine.host_reads >= engine.forwards  # the tokens every step, and the dynamic cache's column trims


def test_uploads_and_pending_reads_round_trip():
    a, b = torch.arange(6).view(2, 3), torch.tensor([7])
    got = upload_all([a, b, torch.zeros((3, 0), dtype=torch.long)], CPU)
    assert torch.equal(got[0], a) and torch.equal(got[1], b) and got[2].shape == (3, 0)
    before = READS.count
    pending = Pending(torch.tensor([[1, 2], [0, 1]]))
    assert pending.ready() and read(pending) == [[1, 2], [0, 1]] and READS.count == before + 1

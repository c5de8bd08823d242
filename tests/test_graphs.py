"""The decode step over rows addressed by slot id, padded to row buckets and captured as CUDA graphs
(engine/graphs.py). On a CPU the padded step runs eagerly through the same code; a stand-in capturer
(helpers.ReplayingCapturer) runs the capture / replay bookkeeping; tests/test_gpu.py replays real graphs."""
import pytest
import torch

from distgen.config import GenerationConfig
from distgen.engine.graphs import graphs_blocker
from distgen.engine.kv.slots import bucket_of, row_buckets
from tests.helpers import DEFAULT_BUDGET, PROMPTS, ReplayingCapturer, assert_matches_generate, engine_for, generate_all

CUDA = torch.device("cuda")


def test_row_buckets_are_vllms_capture_sizes():
    assert row_buckets(1) == [1] and row_buckets(3) == [1, 2, 4]
    assert row_buckets(128) == [1, 2, 4, *range(8, 129, 8)] and len(row_buckets(128)) == 19
    assert row_buckets(130)[-2:] == [128, 136]
    assert row_buckets(300)[-4:] == [256, 272, 288, 304]
    sizes = row_buckets(512)
    assert sizes[-1] == 512 and [bucket_of(n, sizes) for n in (1, 3, 5, 9, 255, 257, 512)] == \
        [1, 4, 8, 16, 256, 272, 512]


def varlen_engine(model, tokenizer, records=PROMPTS, eos_ids=(), **settings):
    cfg = GenerationConfig(**{**dict(max_new_tokens=DEFAULT_BUDGET, batch_size=3, cache="static", compile="off",
                                     cpu_kernels="torch", attention="varlen_reference"), **settings})
    return engine_for(model, tokenizer, records, cfg, eos_ids=eos_ids)


@pytest.mark.parametrize("scheduler", ["continuous", "chunked"])
def test_the_padded_step_runs_eagerly_on_cpu_and_changes_no_token(tiny_model, tokenizer, scheduler):
    engine = varlen_engine(tiny_model, tokenizer, scheduler=scheduler, prefill_chunk_tokens=24)
    assert "decode rows padded to 3 buckets of 1..4 rows, eager: no CUDA graphs on cpu" in engine.choice
    assert_matches_generate(tiny_model, tokenizer, generate_all(engine), PROMPTS)
    counters = engine.decoder.counters
    assert counters.eager_steps > 0 and counters.padding_rows > 0 and counters.replays == counters.captured == 0


def test_replayed_graphs_change_no_token(tiny_model, tokenizer):
    """Captured on padding rows only (no real state moves), replayed with the staged rows: tokens as generate's,
    one capture per bucket used, every decode step a replay."""
    free = generate_all(varlen_engine(tiny_model, tokenizer))
    eos = [free["france"].token_ids[2]]  # one request finishes by EOS, seen a step late
    engine = varlen_engine(tiny_model, tokenizer, eos_ids=eos)
    capturer = ReplayingCapturer()
    engine.decoder.capture, engine.decoder.capturer = True, capturer
    used = []
    run = engine.decoder.run
    engine.decoder.run = lambda kv, requests: (used.append(bucket_of(len(requests), kv.buckets)), run(kv, requests))[1]
    assert_matches_generate(tiny_model, tokenizer, generate_all(engine), PROMPTS, eos_ids=eos)
    counters = engine.decoder.counters
    assert counters.replays == len(used) > 0 and counters.eager_steps == 0
    assert counters.captured == capturer.captures == len(set(used)) >= 2


def test_a_capture_that_fails_falls_back_to_the_eager_step(tiny_model, tokenizer):
    engine = varlen_engine(tiny_model, tokenizer)
    engine.decoder.capture, engine.decoder.capturer = True, ReplayingCapturer(fail=True)
    assert_matches_generate(tiny_model, tokenizer, generate_all(engine), PROMPTS)
    decoder = engine.decoder
    assert not decoder.capture and decoder.why.startswith("capture failed (RuntimeError: operation not permitted")
    assert decoder.counters.replays == 0 and decoder.counters.eager_steps > 0


def test_sampling_rows_replace_the_greedy_next_input(tiny_model, tokenizer):
    """A sampled row's token is drawn after the (replayed) step and becomes its next input: the same draws as the
    synchronous torch_sdpa path."""
    settings = dict(do_sample=True, temperature=0.9, top_k=20, seed=5)
    want = {k: c.token_ids for k, c in generate_all(engine_for(tiny_model, tokenizer, PROMPTS, GenerationConfig(
        max_new_tokens=DEFAULT_BUDGET, batch_size=3, cache="static", compile="off", attention="torch_sdpa",
        **settings))).items()}
    engine = varlen_engine(tiny_model, tokenizer, **settings)
    engine.decoder.capture, engine.decoder.capturer = True, ReplayingCapturer()
    assert {k: c.token_ids for k, c in generate_all(engine).items()} == want


def test_graphs_say_why_not(tiny_model):
    blocker = lambda device="cuda", **kw: graphs_blocker(torch.device(device), **{**dict(
        lockstep=False, compiling=False, autocast=None, model=tiny_model, capturable=True, assisted=False,
        disabled=False), **kw})
    assert blocker() is None
    assert blocker("cpu") == "no CUDA graphs on cpu"
    assert "lockstep" in blocker(lockstep=True) and "compiled" in blocker(compiling=True)
    assert "autocast" in blocker(autocast=torch.bfloat16) and "DISTGEN_CUDA_GRAPHS=0" in blocker(disabled=True)
    assert "cannot be captured" in blocker(capturable=False)

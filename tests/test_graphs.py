"""The decode step over rows addressed by slot id, padded to row buckets and captured as CUDA graphs
(engine/graphs.py). On a CPU the padded step runs eagerly through the same code; a stand-in capturer
(helpers.ReplayingCapturer) runs the capture / replay bookkeeping; tests/test_gpu.py replays real graphs."""
import pytest
import torch

from transformers import LlamaForCausalLM

from distgen.config import GenerationConfig, TinyModelConfig
from distgen.engine.graphs import DecodeRunner, graphs_blocker, replay_bucket
from distgen.engine.kv.attention import ATTENTIONS
from distgen.engine.kv.slots import SlotKV, bucket_of, row_buckets
from distgen.engine.runner import CompilePlan, Runner
from distgen.models.tiny import tiny_llama_config
from tests.helpers import (DEFAULT_BUDGET, FLASH_211_KEYWORDS, FLASH_211_POSITIONAL, PROMPTS, DeviceTraffic,
                           ReplayingCapturer, assert_matches_generate, engine_for, generate_all, on_meta)

CUDA = torch.device("cuda")


def test_row_buckets_are_vllms_capture_sizes():
    assert row_buckets(1) == [1] and row_buckets(3) == [1, 2, 4]
    assert row_buckets(128) == [1, 2, 4, *range(8, 129, 8)] and len(row_buckets(128)) == 19
    assert row_buckets(130)[-2:] == [128, 136]
    assert row_buckets(300)[-4:] == [256, 272, 288, 304]
    sizes = row_buckets(512)
    assert sizes[-1] == 512 and [bucket_of(n, sizes) for n in (1, 3, 5, 9, 255, 257, 512)] == \
        [1, 4, 8, 16, 256, 272, 512]


def test_a_captured_bucket_up_to_twice_the_rows_is_replayed_instead_of_capturing():
    assert replay_bucket(8, []) == 8 and replay_bucket(8, [16]) == 16 and replay_bucket(8, [24, 16]) == 16
    assert replay_bucket(8, [24]) == 8 and replay_bucket(4, [2, 16]) == 4 and replay_bucket(2, [1]) == 2
    # 512 rows finishing one by one: 7 captures instead of one per bucket (51)
    sizes, captured = row_buckets(512), set()
    for rows in range(512, 0, -1):
        captured.add(replay_bucket(bucket_of(rows, sizes), captured))
    assert sorted(captured) == [2, 8, 24, 56, 120, 248, 512] and len(set(sizes)) == 51


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
    one capture per bucket run (a captured bucket replayed for a step of fewer rows), every decode step a replay."""
    free = generate_all(varlen_engine(tiny_model, tokenizer))
    eos = [free["france"].token_ids[2]]  # one request finishes by EOS, seen a step late
    engine = varlen_engine(tiny_model, tokenizer, eos_ids=eos)
    capturer = ReplayingCapturer()
    engine.decoder.capture, engine.decoder.capturer = True, capturer
    used = []
    run = engine.decoder.run
    engine.decoder.run = lambda kv, requests: (used.append(len(requests)), run(kv, requests))[1]
    assert_matches_generate(tiny_model, tokenizer, generate_all(engine), PROMPTS, eos_ids=eos)
    counters = engine.decoder.counters
    assert counters.replays == len(used) > 0 and counters.eager_steps == 0
    assert set(engine.decoder.graphs) == {4, 1} and {1, 2, 3} <= set(used)  # 2 and 3 rows replay bucket 4
    assert counters.captured == capturer.captures == 2 and counters.padding_rows > 0


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


@pytest.mark.parametrize("attention", ["cuda_varlen", "varlen_reference"])
def test_the_captured_step_reads_no_host_value_and_calls_torch_2_11s_flash_op(tokenizer, attention):
    """What a CUDA graph captures (DecodeRunner.step: forward, greedy tokens, EOS, the cache's lengths and next
    inputs), run on meta tensors, bf16, GQA 8/2, 5 slots padded to a bucket of 8 rows: no value read on the host
    (meta tensors have none: .item(), .tolist(), nonzero or Python control flow on a tensor raise), no host tensor
    copied in (a pageable copy; inside a graph a host address baked in); cuda_varlen's FlashAttention calls pass
    only the arguments torch 2.11's aten::_flash_attention_forward has (the GPU machine's torch), int32 contiguous
    metadata, one query per row (FlashAttention's decode path); the same buffers as outputs every step."""
    meta = torch.device("meta")
    model = on_meta(LlamaForCausalLM(tiny_llama_config(TinyModelConfig(layers=2, hidden_size=256, heads=8, kv_heads=2,
                                                                       intermediate_size=512), tokenizer)).eval(),
                    torch.bfloat16)
    kv = SlotKV(2, 5, 40, tokenizer.pad_token_id, meta, torch.bfloat16, full_width=False,
                attention=ATTENTIONS.get(attention))
    for layer in kv.cache.layers:
        states = torch.empty((1, 2, 1, 32), dtype=torch.bfloat16, device=meta)
        layer.lazy_initialization(states, states)
    decoder = DecodeRunner(Runner(model, CompilePlan(False)), torch.empty(1, dtype=torch.long, device=meta), True)
    decoder.bind(kv)
    rows = bucket_of(5, kv.buckets)
    assert rows == 8 and kv.buckets[-1] == 8
    first = decoder.step(rows)  # the capturer's warm-up
    traffic = DeviceTraffic()
    with traffic:
        outputs = decoder.step(rows)  # the capture
    assert traffic.host_inputs == []
    assert [tuple(o.shape) for o in outputs] == [(8, model.config.vocab_size), (8,), (8,)]
    assert outputs[0].data_ptr() == first[0].data_ptr()  # logits: one buffer every bucket's step writes
    if attention != "cuda_varlen":
        return
    assert len(traffic.flash_calls) == 2  # one per layer
    for args, kwargs in traffic.flash_calls:
        assert len(args) <= FLASH_211_POSITIONAL and set(kwargs) <= FLASH_211_KEYWORDS, sorted(kwargs)
        query, key, value, cu_q, cu_k, max_q, max_k = args[:7]
        assert query.shape == (8, 8, 32) and key.shape == value.shape == (5 * 41, 2, 32)
        assert key.stride(-1) == query.stride(-1) == 1
        assert max_q == 1 and max_k == kv.columns
        for meta_tensor in (cu_q, cu_k, kwargs["seqused_k"]):
            assert meta_tensor.dtype == torch.int32 and meta_tensor.is_contiguous()
        assert cu_q.shape == cu_k.shape == (9,) and kwargs["seqused_k"].shape == (8,)

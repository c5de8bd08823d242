"""The slot-attention seam (distgen/engine/kv/attention.py): implementations picked by name, the varlen metadata
that torch's FlashAttention reads (built right, read by its plain-torch reference), and every path that runs on
a CPU against the others and against `model.generate`."""
import pytest
import torch

from distgen.backends.cpu import kernels
from distgen.common.errors import ConfigError
from distgen.config import GenerationConfig
from distgen.engine.kv.attention import ATTENTIONS, attention_context, plan_attention
from distgen.engine.kv.slots import SlotKV
from distgen.engine.request import Request, Status
from distgen.engine.scheduler import StepPlan
from distgen.inputs.records import Prompt
from tests.helpers import DEFAULT_BUDGET, PROMPTS, assert_matches_generate, attention_case, engine_for, generate_all

CPU = torch.device("cpu")
F32, BF16 = torch.float32, torch.bfloat16


def test_every_implementation_is_named_once_and_auto_says_why(tiny_model, monkeypatch):
    assert ATTENTIONS.names() == ("torch_sdpa", "sdpa_folded", "cuda_varlen", "varlen_reference", "flash_attn",
                                  "cpu_kernels")
    context = lambda device, dtype, **kw: attention_context(tiny_model.config, torch.device(device), dtype, F32, **kw)
    want = "cpu_kernels" if kernels.load_kernel()[0] is not None else "torch_sdpa"
    assert plan_attention(context("cpu", F32))[0].name == want
    assert plan_attention(context("cpu", F32, cpu_kernels="torch"))[0].name == "torch_sdpa"
    assert plan_attention(context("cpu", BF16, autocast="bf16"))[0].name == "torch_sdpa"
    # On CUDA (the plan reads the device type and capability only): half precision takes FlashAttention varlen,
    # fp32 keeps torch_sdpa, a compiled decode the masked path; each line says why the others were passed over.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    impl, why = plan_attention(context("cuda", BF16))
    assert impl.name == "cuda_varlen" and impl.addressed and "flash-attn package is not installed" in why
    impl, why = plan_attention(context("cuda", F32))
    assert impl.name == "torch_sdpa" and "fp32 keeps torch_sdpa" in why
    assert plan_attention(context("cuda", BF16, compiling=True))[0].name == "torch_sdpa"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    impl, why = plan_attention(context("cuda", BF16))
    assert impl.name == "sdpa_folded" and "compute capability 7.5" in why


def test_a_forced_implementation_must_exist_and_run_here(tiny_model):
    ctx = attention_context(tiny_model.config, CPU, F32, F32)
    with pytest.raises(ConfigError, match="generation.attention='paged' is not allowed: expected one of auto, "
                                          "torch_sdpa"):
        plan_attention(ctx, "paged")
    with pytest.raises(ConfigError, match="generation.attention=cuda_varlen cannot run here: the cache is on cpu"):
        plan_attention(ctx, "cuda_varlen")
    impl, why = plan_attention(ctx, "varlen_reference")
    assert impl.name == "varlen_reference" and why.endswith("(generation.attention=varlen_reference)")


def test_a_config_naming_no_slot_attention_is_refused_with_the_names():
    """generation.attention is checked by the catalog against the slot-attention table, like every other choice."""
    from distgen.catalog import check_section
    with pytest.raises(ConfigError) as refused:
        check_section("generation", GenerationConfig(attention="paged"))
    assert str(refused.value) == ("generation.attention='paged' is not allowed: expected one of auto, "
                                  + ", ".join(ATTENTIONS.names()))
    assert check_section("generation", GenerationConfig(attention="torch_sdpa")).attention == "torch_sdpa"


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (8, 1)])
def test_the_paths_agree_on_one_mixed_step(heads, kv_heads):
    """torch_sdpa (mask over slots 0..n-1), sdpa_folded (GQA in the query axis, bias for the continuation) and the
    varlen reference (cu_q/cu_k/seqused_k over token-major buffers) compute the same attention."""
    query, (sdpa, sdpa_layer), (varlen, varlen_layer) = attention_case(CPU, F32, heads, kv_heads)
    want = ATTENTIONS.get("torch_sdpa").attend(sdpa, sdpa_layer, query, 0.25)
    folded = ATTENTIONS.get("sdpa_folded").attend(sdpa, sdpa_layer, query, 0.25)
    reference = ATTENTIONS.get("varlen_reference").attend(varlen, varlen_layer, query, 0.25)
    assert want.shape == (1, 9, heads, 16)
    torch.testing.assert_close(folded, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference, want, rtol=1e-5, atol=1e-5)
    varlen.seqused_k[1] = 0  # a padding row reads no column: zeros, as FlashAttention writes
    assert not ATTENTIONS.get("varlen_reference").attend(varlen, varlen_layer, query, 0.25)[0, 1].any()


def windowed_reference(query, keys, values, slots, positions, window, scale):
    """Token t (slot slots[t], position positions[t]) attends to its slot's columns (positions[t] - window,
    positions[t]], one token at a time: what transformers' sliding-window mask means."""
    out = []
    for t, (slot, pos) in enumerate(zip(slots, positions)):
        first = max(0, pos - window + 1)
        k, v = keys[slot, :, first:pos + 1], values[slot, :, first:pos + 1]  # (kv_heads, n, dim)
        group = query.shape[1] // k.shape[0]
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        weights = torch.softmax(query[0, :, t:t + 1] @ k.transpose(-1, -2) * scale, dim=-1)  # (heads, 1, n)
        out.append((weights @ v)[:, 0])
    return torch.stack(out)[None]  # (1, tokens, heads, dim)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 1)])
@pytest.mark.parametrize("window", [2, 3])
def test_the_paths_apply_a_layers_window(heads, kv_heads, window):
    """A local layer's window in each path (torch_sdpa's decode mask narrowed by the decode positions, sdpa_folded's,
    the varlen reference's from seqused_k and each segment's band) equals attention over exactly the window."""
    query, (sdpa, sdpa_layer), (varlen, varlen_layer) = attention_case(CPU, F32, heads, kv_heads)
    sdpa.decode_positions = torch.tensor([2, 4])
    slots, positions = [0, 1, 2, 2, 2, 2, 3, 3, 3], [2, 4, 0, 1, 2, 3, 2, 3, 4]  # attention_case's tokens
    want = windowed_reference(query, sdpa_layer.keys, sdpa_layer.values, slots, positions, window, 0.25)
    for name, plan, layer in (("torch_sdpa", sdpa, sdpa_layer), ("sdpa_folded", sdpa, sdpa_layer),
                              ("varlen_reference", varlen, varlen_layer)):
        got = ATTENTIONS.get(name).attend(plan, layer, query, 0.25, window=window)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
    assert not torch.allclose(ATTENTIONS.get("torch_sdpa").attend(sdpa, sdpa_layer, query, 0.25), want, atol=1e-3)


def request(index: int, prompt: int, row: int, prefilled: int = 0) -> Request:
    status = Status.DECODING if prefilled == prompt else Status.PREFILLING
    return Request(Prompt(index, str(index), ""), [7] * prompt, 4, None, status=status, prefilled=prefilled, row=row)


def test_varlen_metadata_points_each_sequence_at_its_own_slot():
    kv = SlotKV(1, 4, 20, 0, CPU, F32, full_width=False, attention=ATTENTIONS.get("varlen_reference"))
    assert kv.addressed and not kv.compacts and kv.columns == 21
    # a prefill of two prompts in slots 2 and 0 (admission order), one of them a second chunk at positions 3..6
    first, second = request(0, 5, row=2), request(1, 9, row=0, prefilled=3)
    batch = kv.prefill_inputs(StepPlan("prefill", [first, second], [5, 4]))
    plan = batch.inputs["attention_plan"]
    assert plan.cu_q.tolist() == [0, 5, 9] and plan.cu_k.tolist() == [2 * 21, 0, 4 * 21]
    assert plan.seqused_k.tolist() == [5, 7] and (plan.max_q, plan.max_k) == (5, 21)
    assert {t.dtype for t in (plan.cu_q, plan.cu_k, plan.seqused_k)} == {torch.int32}
    assert plan.write_slots.tolist() == [2] * 5 + [0] * 4 and plan.write_cols.tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6]
    kv.lengths[2], kv.lengths[0] = 5, 7
    # a mixed step: slot 2 decodes (its 6th column), slot 0 runs two more prompt tokens
    first.status, first.prefilled, second.prefilled = Status.DECODING, 5, 7
    batch = kv.mixed_inputs(StepPlan("mixed", [first, second], [1, 2], decodes=1))
    plan = batch.inputs["attention_plan"]
    assert plan.cu_q.tolist() == [0, 1, 3] and plan.cu_k.tolist() == [2 * 21, 0, 4 * 21]
    assert plan.seqused_k.tolist() == [6, 9] and plan.max_q == 2 and batch.rows == [0, 1]
    assert plan.write_slots.tolist() == [2, 0, 0] and plan.write_cols.tolist() == [5, 7, 8]
    assert batch.inputs["position_ids"].tolist() == [[5, 7, 8]] and batch.decode_rows.tolist() == [2]
    # a padded decode: rows are slots 3 and 2, then a padding row (the spare state entry, slot index 4)
    kv.lengths[3] = 2
    inputs = kv.addressed_decode(torch.tensor([3, 2, 4]), torch.tensor([True, True, False]))
    plan = inputs["attention_plan"]
    assert plan.cu_q.tolist() == [0, 1, 2, 3] and plan.cu_k.tolist() == [3 * 21, 2 * 21, 3 * 21, 4 * 21]
    assert plan.seqused_k.tolist() == [3, 6, 0] and plan.write_cols.tolist() == [2, 5, 20]  # 20: scratch
    assert inputs["position_ids"].tolist() == [[2, 5, 0]] and inputs["input_ids"][0, 2] == 0
    kv.advance(torch.tensor([3, 2, 4]), torch.tensor([True, True, False]), torch.tensor([11, 12, 13]))
    assert kv.lengths[:4].tolist() == [7, 0, 6, 3] and kv.last_tokens[:4].tolist() == [0, 0, 12, 11]


@pytest.mark.parametrize("scheduler", ["continuous", "chunked"])
@pytest.mark.parametrize("name", ["torch_sdpa", "sdpa_folded", "varlen_reference"])
def test_each_path_equals_generate(tiny_model, tokenizer, monkeypatch, name, scheduler):
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=3, cache="static", compile="off",
                           scheduler=scheduler, prefill_chunk_tokens=24, cpu_kernels="torch", attention=name)
    engine = engine_for(tiny_model, tokenizer, PROMPTS, cfg)
    assert f"decode attention: {name} (" in engine.choice
    moves, move = [], engine.kv.move
    engine.kv.move = lambda src, dst: (moves.append((src, dst)), move(src, dst))
    assert_matches_generate(tiny_model, tokenizer, generate_all(engine), PROMPTS)
    assert sorted(engine.kv.free) == [0, 1, 2] and not engine.kv.owners
    if name == "varlen_reference":  # rows addressed by slot id: nothing moved; buffers token-major
        assert not moves and engine.kv.cache.layers[0].keys.transpose(1, 2).is_contiguous()
    else:
        assert moves  # finished rows were compacted (the highest slot moved down)

"""generation.cpu_kernels: distgen's AVX2 CPU kernels (packed linear, slot attention, KV writes, fused norms/MLPs,
the owned decoder stack) against torch's own ops and model.generate; their checked C boundary; a sanitizer
run of this file; rows whose logits do not depend on what shares their forward."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from distgen.catalog import check_section
from distgen.config import GenerationConfig
from distgen.backends.cpu import kernels
from distgen.backends.cpu import model as cpu_model
from distgen.backends.cpu.kernels import pack, pack_linears, packed_linear, plan_kernels, unpack, unpack_linears
from distgen.common.errors import ConfigError
from distgen.engine.kv import varlen
from tests.helpers import DEFAULT_BUDGET, PROMPTS, assert_matches_generate, engine_for, generate_all

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parent.parent
needs_kernel = pytest.mark.skipif(kernels.load_kernel()[0] is None,
                                  reason=f"distgen's CPU kernels cannot run here: {kernels.load_kernel()[1]}")


def llama_pair(tokenizer, seed: int, **config):
    """A random 2-layer, 4-head Llama of `config` and an untouched copy of it (the generate reference)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, initializer_range=0.2,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **config)
    model, reference = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()
    reference.load_state_dict(model.state_dict())
    return model, reference


@needs_kernel
@pytest.mark.parametrize("n,k,bias", [(16, 8, False), (48, 37, True), (24, 13, False), (259, 64, True),
                                      (5, 16, False), (1536, 512, True)])
def test_packed_linear_matches_torch_and_rows_do_not_depend_on_their_batch(n, k, bias):
    # n % 16 features form a narrow last panel (259: the tiny model's vocabulary, its lm_head).
    torch.manual_seed(n + k)
    weight, b = torch.randn(n, k), (torch.randn(n) if bias else None)
    packed = pack(weight)
    assert torch.equal(unpack(packed), weight)
    for rows in (1, 5, 6, 7, 13, 40):
        x = torch.randn(2, rows, k)  # a leading batch dimension, as in a model
        got = packed_linear(x, packed, b)
        torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-4)
        # Each row alone equals that row among the others, bit for bit, wherever it sits in its block of 6.
        for row in range(rows):
            assert torch.equal(packed_linear(x[1, row:row + 1], packed, b)[0], got[1, row])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # threads split the panels: the same results
    try:
        assert torch.equal(packed_linear(x, packed, b), got)
    finally:
        torch.set_num_threads(threads)
    assert packed_linear(torch.randn(0, k), packed, b).shape == (0, n)


@needs_kernel
def test_pack_linears_swaps_modules_holding_the_same_parameters_and_swaps_them_back(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    params = dict(model.named_parameters())
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    ids = torch.tensor([[5, 9, 11, 30, 7]])
    with torch.no_grad():
        want = model(ids).logits
        packed, total = pack_linears(model)
        assert packed == total == len(linears)  # the lm_head too (259 features: 16 panels and a narrow one)
        assert pack_linears(model) == (packed, total)
        # Same Parameter objects under the same names: state dicts and ties are untouched.
        assert {name: id(p) for name, p in model.named_parameters()} == {name: id(p) for name, p in params.items()}
        assert all(type(m) is kernels.PackedLinear for name, m in model.named_modules() if name in linears)
        assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters())
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
        unpack_linears(model)
        assert all(m is linears[name] for name, m in model.named_modules() if name in linears)
        assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
        assert torch.equal(model(ids).logits, want)


@needs_kernel
@pytest.mark.parametrize("scheduler", ["continuous", "chunked"])
def test_engine_on_the_kernels_equals_torch_generate(tiny_model_dir, tokenizer, scheduler, monkeypatch):
    # The engine's model runs distgen's own decoder stack, one C call per forward (prefill, decode and
    # mixed steps); the reference is an untouched model's generate (MKL).
    calls = []
    real = cpu_model.LlamaStack.run
    monkeypatch.setattr(cpu_model.LlamaStack, "run", lambda *args: calls.append(1) or real(*args))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base, keys = model.model, set(model.state_dict())
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=3, scheduler=scheduler, cache="static",
                           compile="off", cpu_kernels="distgen", prefill_chunk_tokens=8)
    engine = engine_for(model, tokenizer, PROMPTS, cfg)
    assert "distgen CPU kernels" in engine.choice and "norms/MLPs fused" in engine.choice
    assert "decoder stack: distgen's" in engine.choice and isinstance(model.model, cpu_model.LlamaStack)
    assert set(model.state_dict()) == keys and model.model.config is base.config
    assert kernels.is_packed(model.model.layers[0].mlp.down_proj)
    got = generate_all(engine)
    assert_matches_generate(reference, tokenizer, got)
    assert len(calls) >= DEFAULT_BUDGET  # every forward of the job ran as one C call
    made = cpu_model.arithmetic(model)  # what a resumed sampled job keys on
    assert made.batch_invariant and made.kernels.startswith("distgen-")
    # A later engine that compiles or is told torch swaps the model's own modules back.
    engine_for(model, tokenizer, PROMPTS, GenerationConfig(cpu_kernels="torch", compile="off"))
    assert cpu_model.arithmetic(model) == cpu_model.Arithmetic("torch", batch_invariant=False)
    assert model.model is base and not any(isinstance(m, (kernels.PackedLinear, kernels.FusedRMSNorm))
                                           for m in model.modules())
    assert set(model.state_dict()) == keys


def test_plans_say_why_and_bad_settings_are_config_errors(tiny_model, monkeypatch, tmp_path):
    def plan(name, **kw):
        args = dict(device=CPU, lockstep=False, compiling=False, autocast=None) | kw
        return plan_kernels(name, tiny_model, **args)
    assert not plan("auto", lockstep=True).enabled and "lockstep" in plan("auto", lockstep=True).reason
    assert "compiled step" in plan("auto", compiling=True).reason
    assert "autocast" in plan("auto", autocast=torch.bfloat16).reason
    assert plan("auto", device=torch.device("cuda")) == kernels.KernelPlan(False, "")
    assert not plan("torch").enabled
    with pytest.raises(ConfigError, match="generation.cpu_kernels=distgen is not possible: a lockstep"):
        plan("distgen", lockstep=True)
    with pytest.raises(ConfigError, match="generation.cpu_kernels='mkl' is not allowed: expected one of auto, distgen, torch"):
        check_section("generation", GenerationConfig(cpu_kernels="mkl"))
    if kernels.cpu_blocker() is not None:
        return
    # Each way the build can fail falls back to torch's kernels, saying why (a fresh cache forces a build).
    cases = [(dict(compiler=lambda: None), "torch kernels (no C compiler to build the kernel: set CC or install gcc)"),
             (dict(compiler=lambda: "/bin/false"), "torch kernels (/bin/false could not build cpu_kernels.c (exit 1)"),
             (dict(SOURCE=tmp_path / "gone.c"), f"torch kernels (the kernel source {tmp_path / 'gone.c'} is missing"),
             (dict(cache_dir=lambda: Path("/proc/no-such-cache")), "torch kernels (the kernel cache /proc/no-such-cache "
                                                                   "cannot be written")]
    try:
        for patches, why in cases:
            with monkeypatch.context() as patched:
                patched.setenv("DISTGEN_KERNEL_CACHE", str(tmp_path / "cache"))
                for name, value in patches.items():
                    patched.setattr(kernels, name, value)
                kernels.load_kernel.cache_clear()
                got = plan("auto")
                assert not got.enabled and got.reason.startswith(why), got.reason
                with pytest.raises(ConfigError, match="generation.cpu_kernels=distgen is not possible"):
                    plan("distgen")
    finally:
        kernels.load_kernel.cache_clear()


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 4, 64), (4, 4, 16), (6, 2, 32), (4, 2, 12)])  # 12: a scalar tail
def test_decode_attention_reads_each_slots_own_columns(heads, kv_heads, dim):
    torch.manual_seed(heads * dim)
    slots, columns = 5, 40
    keys, values = torch.randn(slots, kv_heads, columns + 1, dim), torch.randn(slots, kv_heads, columns + 1, dim)
    lengths = torch.tensor([1, 17, 40, 0, 9])
    query = torch.randn(4, heads, dim)  # the first 4 slots decode; slot 3 is idle (length 0)
    got = kernels.decode_attention(query, keys, values, lengths[:4], 0.125)
    for i, length in enumerate(lengths[:4].tolist()):
        if length == 0:
            assert torch.equal(got[i], torch.zeros(heads, dim))
            continue
        k, v = keys[i, :, :length], values[i, :, :length]
        want = F.scaled_dot_product_attention(query[i].unsqueeze(1), k, v, scale=0.125,
                                              enable_gqa=heads != kv_heads).squeeze(1)
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
    # Half-precision buffers (autocast) are not the kernel's: SDPA answers, nothing is read as fp32.
    half = kernels.decode_attention(query.bfloat16(), keys.bfloat16(), values.bfloat16(), lengths[:4], 0.125)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half[:3].float(), got[:3], rtol=0.05, atol=0.05)
    # A column past a slot's length never counts: the kernel never reads it, so even NaN changes nothing.
    keys[:, :, 40:], values[:, :, 40:] = float("nan"), float("nan")
    keys[1, :, 17:], values[1, :, 17:] = 1e6, 1e6
    assert torch.equal(kernels.decode_attention(query, keys, values, lengths[:4], 0.125), got)


class OffsetRMSNorm(torch.nn.Module):
    """A Gemma-style norm, (1 + weight) * normed: the fused kernel computes weight * normed, so the
    probe check must leave this one alone."""

    def __init__(self, width: int):
        super().__init__()
        self.weight, self.eps = torch.nn.Parameter(torch.zeros(width)), 1e-6

    def forward(self, x):
        return (1 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


@needs_kernel
def test_fused_norms_and_mlps_match_the_modules_they_replace_and_only_those(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    odd = OffsetRMSNorm(model.config.hidden_size)
    model.model.extra_norm = odd  # not called by the model; only the fusing pass looks at it
    mlp = model.model.layers[0].mlp
    ids = torch.tensor([[5, 9, 11, 30, 7, 12]])
    with torch.no_grad():
        want = model(ids).logits
        pack_linears(model)
        fused = kernels.fuse_modules(model)
        layers = len(model.model.layers)
        assert fused == 3 * layers + 1  # two norms and the MLP per layer, the final norm
        assert kernels.fuse_modules(model) == fused and model.model.extra_norm is odd
        assert isinstance(model.model.layers[0].mlp, kernels.FusedGatedMLP) and model.model.layers[0].mlp.down_proj is mlp.down_proj
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
        x = torch.randn(4, 2 * 96)
        torch.testing.assert_close(kernels.silu_mul(x), F.silu(x[:, :96]) * x[:, 96:], rtol=1e-5, atol=1e-6)
        kernels.unfuse_modules(model)
        unpack_linears(model)
        assert model.model.layers[0].mlp is mlp
        assert torch.equal(model(ids).logits, want)


@needs_kernel
def test_write_kv_writes_what_indexing_writes():
    torch.manual_seed(1)
    keys, values = torch.randn(4, 2, 10, 16), torch.randn(4, 2, 10, 16)
    want_k, want_v = keys.clone(), values.clone()
    key = torch.randn(1, 5, 2, 16).transpose(1, 2)[0]  # (kv_heads, tokens, head_dim), as a model hands it over
    value = torch.randn(1, 5, 2, 16).transpose(1, 2)[0]
    slots, cols = torch.tensor([0, 0, 3, 1, 2]), torch.tensor([4, 5, 0, 9, 2])
    want_k[slots, :, cols], want_v[slots, :, cols] = key.transpose(0, 1), value.transpose(0, 1)
    assert kernels.write_kv(key, value, keys, values, slots, cols)
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)
    assert not kernels.write_kv(key.double(), value.double(), keys, values, slots, cols)  # the caller indexes


@needs_kernel
def test_the_c_boundary_raises_on_every_bad_call_and_writes_nothing():
    """Shapes, strides, dtypes and overlaps: a ValueError naming the argument; slots, columns, lengths and
    token ids out of range: an IndexError naming the entry, with the buffers untouched (the C code checks
    them all before it writes)."""
    keys, values = torch.zeros(4, 2, 10, 16), torch.zeros(4, 2, 10, 16)
    key = value = torch.ones(2, 3, 16)
    ok = torch.tensor([0, 1, 2])
    for slots, cols, match in ((torch.tensor([0, 4, 1]), ok, r"write_kv: entry 1's slot is 4, outside \[0, 4\)"),
                               (torch.tensor([0, -1, 1]), ok, r"entry 1's slot is -1"),
                               (ok, torch.tensor([0, 1, 10]), r"write_kv: entry 2's column is 10, outside \[0, 10\)")):
        with pytest.raises(IndexError, match=match):
            kernels.write_kv(key, value, keys, values, slots, cols)
    assert not keys.any() and not values.any()
    with pytest.raises(ValueError, match=r"slots must be int64 on the CPU shaped \(3,\)"):
        kernels.write_kv(key, value, keys, values, ok[:2], ok)
    with pytest.raises(ValueError, match=r"key must be fp32 on the CPU shaped \(2, None, 16\)"):
        kernels.write_kv(torch.ones(2, 3, 8), torch.ones(2, 3, 8), keys, values, ok, ok)
    query, out = torch.randn(3, 4, 16), torch.full((3, 4, 16), 7.0)
    with pytest.raises(IndexError, match=r"decode_attention: entry 2's length is 11, outside \[0, 11\)"):
        kernels.decode_attention(query, keys, values, torch.tensor([1, 2, 11]), 0.25, out=out)
    with pytest.raises(IndexError, match=r"entry 4's slot is 4, outside \[0, 4\)"):  # 5 queries, 4 slots
        kernels.decode_attention(torch.randn(5, 4, 16), keys, values, torch.ones(5, dtype=torch.long), 0.25)
    assert torch.equal(out, torch.full((3, 4, 16), 7.0))
    with pytest.raises(ValueError, match=r"out must be fp32 on the CPU shaped \(3, 4, 16\), contiguous"):
        kernels.decode_attention(query, keys, values, ok, 0.25, out=torch.empty(3, 16, 4).transpose(1, 2))
    with pytest.raises(ValueError, match=r"keys must be \(slots, a divisor of 3 heads"):
        kernels.decode_attention(torch.randn(3, 3, 16), keys, values, ok, 0.25)
    # The dtype mismatches of da6c3bf: a bf16 input or weight is refused before any pointer reaches C.
    with pytest.raises(ValueError, match="x must be fp32 on the CPU"):
        kernels.rms_norm(torch.ones(2, 16, dtype=torch.bfloat16), torch.ones(16), 1e-6)
    with pytest.raises(ValueError, match=r"the norm's weight must be fp32 on the CPU shaped \(16,\)"):
        kernels.rms_norm(torch.ones(2, 16), torch.ones(16, dtype=torch.float16), 1e-6)
    with pytest.raises(ValueError, match=r"the norm's weight must be fp32 on the CPU shaped \(16,\)"):
        kernels.rms_norm(torch.ones(2, 16), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="gate_up must be fp32"):
        kernels.silu_mul(torch.ones(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"gate_up must be \(\.\.\., 2I\)"):
        kernels.silu_mul(torch.ones(2, 15))
    weight = pack(torch.randn(32, 16))
    with pytest.raises(ValueError, match=r"x must be fp32 on the CPU shaped \(None, 16\)"):
        packed_linear(torch.randn(4, 8), weight, None)  # would have been read as (2, 16)
    with pytest.raises(ValueError, match=r"bias must be fp32 on the CPU shaped \(32,\)"):
        packed_linear(torch.randn(4, 16), weight, torch.zeros(16))
    buffer = torch.randn(8, 16)
    with pytest.raises(ValueError, match="out must be rows of contiguous features apart from x"):
        packed_linear(buffer[:4], weight, None, out=buffer.view(4, 32))  # panels would overwrite rows still read
    with pytest.raises(ValueError, match="residual must be rows of contiguous features, out itself or apart from it"):
        shifted = torch.empty(4 * 32 + 1)  # residual one feature behind out: it would read outputs already written
        packed_linear(torch.randn(4, 16), weight, None, out=shifted[1:].view(4, 32), residual=shifted[:-1].view(4, 32))
    with pytest.raises(ValueError, match="out must be apart from query, keys and values"):
        kernels.decode_attention(query, keys, values, ok, 0.25, out=query)
    with pytest.raises(IndexError, match=r"packed_embedding: entry 1's token id is 32, outside \[0, 32\)"):
        kernels.packed_embedding(torch.tensor([0, 32]), weight)
    # A tensor of the wrong rank is named as well (not "not enough values to unpack").
    for call, match in ((lambda: kernels.rotary(torch.ones(2, 16), torch.ones(2, 16), torch.ones(2, 16)),
                         r"x must be \(tokens, heads, head_dim\)"),
                        (lambda: kernels.decode_attention(torch.ones(3, 64), keys, values, ok, 0.25),
                         r"query must be \(n, heads, head_dim\)"),
                        (lambda: kernels.write_kv(torch.ones(3, 16), torch.ones(3, 16), keys, values, ok, ok),
                         r"key must be \(kv_heads, tokens, head_dim\)"),
                        (lambda: kernels.packed_embedding(ok, torch.ones(32)), "the packed weight must be fp32"),
                        (lambda: kernels.rms_norm(torch.tensor(1.0), torch.ones(1), 1e-6), r"x must be \(\.\.\., hidden\)"),
                        (lambda: packed_linear(torch.randn(4, 16), weight, None, residual=torch.randn(4, 31)),
                         r"residual must be x's shape 32 wide")):
        with pytest.raises(ValueError, match=match):
            call()
    assert not keys.any() and not values.any()


def test_no_assert_guards_the_c_boundary():
    """`python -O` strips asserts: the backend checks with raises only."""
    for path in (REPO / "distgen" / "backends" / "cpu").glob("*.py"):
        tree = ast.parse(path.read_text())
        assert not [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)], path


@needs_kernel
def test_rotary_and_residual_linear_round_as_transformers_does():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    torch.manual_seed(3)
    tokens, heads, kv_heads, dim = 5, 6, 2, 40  # 20 per half: the vector loop and its scalar tail
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
    cos, sin = torch.randn(tokens, dim), torch.randn(tokens, dim)  # not duplicated halves: any rotary table
    q, k = qkv[:, :heads * dim].view(tokens, heads, dim), qkv[:, heads * dim:(heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    v = qkv[:, (heads + kv_heads) * dim:].clone()
    kernels.rotary(qkv[:, :(heads + kv_heads) * dim].view(tokens, -1, dim), cos, sin)  # strided rows, in place
    assert torch.equal(q, want_q[0].transpose(0, 1)) and torch.equal(k, want_k[0].transpose(0, 1))
    assert torch.equal(qkv[:, (heads + kv_heads) * dim:], v)  # the values are not touched
    with pytest.raises(ValueError, match="rotary takes fp32"):
        kernels.rotary(q.double(), cos, sin)
    weight, bias, x, residual = torch.randn(48, 24), torch.randn(48), torch.randn(2, 7, 24), torch.randn(2, 7, 48)
    packed = pack(weight)
    assert torch.equal(packed_linear(x, packed, bias, residual=residual), residual + packed_linear(x, packed, bias))


@needs_kernel
def test_owned_stack_computes_transformers_forward_and_a_different_one_is_refused(tiny_model_dir, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base = model.model
    pack_linears(model)
    kernels.fuse_modules(model)
    assert cpu_model.own_stack(model) == "decoder stack: distgen's (one C call per forward)"
    assert cpu_model.own_stack(model) == "decoder stack: distgen's (one C call per forward)"  # idempotent
    stack = model.model
    assert isinstance(stack, cpu_model.LlamaStack) and stack.layers is base.layers
    assert stack.get_input_embeddings() is base.embed_tokens  # anything else is the base model's
    ids = torch.tensor([[5, 9, 11, 30, 7, 12]])
    with torch.no_grad():  # outside a slot-cache forward it is transformers' own forward
        owned = model(ids).logits
        cpu_model.release_stack(model)
        assert model.model is base and torch.equal(model(ids).logits, owned)
    # A stack computing something else (here one that does nothing) fails the probe and is not used.
    monkeypatch.setattr(cpu_model.LlamaStack, "run", lambda self, plan, ids, positions: self.embed_tokens(ids))
    assert cpu_model.own_stack(model) == ("decoder stack: transformers' forward (its forward differs from a "
                                          "Llama-style stack's on a probe)")
    assert model.model is base and not cpu_model.arithmetic(model).batch_invariant
    # A layer that is not Llama-style is named.
    model.model.layers[0].extra = torch.nn.Identity()
    assert "holds extra, input_layernorm" in cpu_model.own_stack(model)


@needs_kernel
def test_owned_stack_refuses_slots_out_of_range(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pack_linears(model)
    kernels.fuse_modules(model)
    cpu_model.own_stack(model)
    layers = [cpu_model.ProbeLayer(torch.zeros(2, 2, 6, 16), torch.zeros(2, 2, 6, 16)) for _ in model.model.layers]
    for slots, cols, match in (([0, 2], [0, 1], "entry 1's slot is 2"), ([0, 1], [0, 6], "entry 1's column is 6")):
        plan = varlen.AttentionPlan(layers, write_slots=torch.tensor(slots), write_cols=torch.tensor(cols),
                                    cpu_kernels=True, segments=[varlen.Segment(0, 2, 0, 0)])
        with torch.no_grad(), varlen.activated(model, plan), pytest.raises(IndexError, match=match):
            model(input_ids=torch.tensor([[5, 9]]), position_ids=torch.tensor([[0, 1]]), use_cache=False)
    # Positions: int64 (C reads lengths, positions + 1, as int64: int32 ones read past their buffer), each inside
    # the columns (one far past them grew the rotary table for minutes).
    plan = varlen.AttentionPlan(layers, write_slots=torch.tensor([0, 1]), write_cols=torch.tensor([0, 1]),
                                cpu_kernels=True, segments=[varlen.Segment(0, 2, 0, 0)])
    for positions, error, match in (([[0, 1]], ValueError, "got positions \\(2,\\) torch.int32: int64"),
                                    ([[0, 1 << 40]], IndexError, f"entry 1's position is {1 << 40}, outside \\[0, 6\\)"),
                                    ([[-1, 0]], IndexError, r"entry 0's position is -1")):
        dtype = torch.int32 if error is ValueError else torch.long
        with torch.no_grad(), varlen.activated(model, plan), pytest.raises(error, match=match):
            model(input_ids=torch.tensor([[5, 9]]), position_ids=torch.tensor(positions, dtype=dtype), use_cache=False)
    assert not any(layer.keys.any() for layer in layers)


@needs_kernel
def test_a_tied_lm_head_is_packed_and_its_embedding_reads_the_packed_table(tokenizer):
    model, reference = llama_pair(tokenizer, seed=5, vocab_size=272, hidden_size=64, intermediate_size=128,
                                  num_key_value_heads=2, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    table = model.lm_head.weight.detach().clone()
    embedding = model.model.embed_tokens
    ids = torch.tensor([[5, 9, 11, 30, 7, 271, 0]])
    with torch.no_grad():
        want = model(ids).logits
        packed, total = pack_linears(model)
        assert packed == total and kernels.is_packed(model.lm_head)
        assert isinstance(model.model.embed_tokens, kernels.PackedRowsEmbedding)
        assert model.lm_head.weight is model.model.embed_tokens.weight and not torch.equal(model.lm_head.weight, table)
        assert torch.equal(model.model.embed_tokens(ids), F.embedding(ids, table))
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
        with pytest.raises(IndexError, match=r"packed_embedding: entry 1's token id is 272, outside \[0, 272\)"):
            model.model.embed_tokens(torch.tensor([0, 272]))
        unpack_linears(model)
        assert torch.equal(model.lm_head.weight, table) and model.model.embed_tokens is embedding
        assert torch.equal(model(ids).logits, want)
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=3, scheduler="continuous", cache="static",
                           compile="off", cpu_kernels="distgen")
    engine = engine_for(model, tokenizer, PROMPTS, cfg)
    assert f"{total} of {total} linear layers packed" in engine.choice
    got = generate_all(engine)
    assert_matches_generate(reference, tokenizer, got)


@needs_kernel
def test_owned_stack_with_a_head_dim_off_the_vector_width_equals_generate(tokenizer):
    # head_dim 12 (not a multiple of 8): the attention's scalar tail, in the same one-call stack.
    model, reference = llama_pair(tokenizer, seed=6, vocab_size=len(tokenizer), hidden_size=48,
                                  intermediate_size=96, num_key_value_heads=4)
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=3, scheduler="chunked", cache="static",
                           compile="off", cpu_kernels="distgen", prefill_chunk_tokens=8)
    engine = engine_for(model, tokenizer, PROMPTS, cfg)
    assert "decoder stack: distgen's" in engine.choice
    got = generate_all(engine)
    assert_matches_generate(reference, tokenizer, got)


def sampled_logits(model, tokenizer, records, threads: int = 1, **settings) -> tuple[dict, dict]:
    """Run a sampled job of `records` ((index, record) pairs: the index seeds the record's draws) at
    temperature 1; ({(record id, token index): logits row}, {record id: tokens})."""
    from distgen.engine import build_engine
    from distgen.inputs.records import Prompt
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, cache="static", compile="off", cpu_kernels="distgen",
                           do_sample=True, temperature=1.0, seed=11, **settings)
    prompts = [Prompt(i, r["id"], r["prompt"], r.get("max_new_tokens")) for i, r in records]
    engine = build_engine(model, [(p, tokenizer(p.text)["input_ids"]) for p in prompts], cfg,
                          tokenizer.pad_token_id, [], CPU)
    rows, execute = {}, engine.execute

    def spy(plan):  # each forward's logits rows of the requests that take a token (run before they do)
        batch, logits = execute(plan)
        for index, (request, chunk, row) in enumerate(zip(plan.requests, plan.chunks, batch.rows)):
            if not (plan.prefills(index) and request.prefilled + chunk < request.prompt_length):
                rows[(request.prompt.id, len(request.generated))] = logits[row].clone()
        return batch, logits
    engine.execute = spy
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = generate_all(engine)
    finally:
        torch.set_num_threads(previous)
    return rows, {key: c.token_ids for key, c in got.items()}


BATCH_RECORDS = list(enumerate([*PROMPTS, {"id": "long", "prompt": "A prompt long enough to be chunked several ways " * 2}]))


def same_inputs_same_logits(run: tuple[dict, dict], base: tuple[dict, dict]) -> int:
    """Assert that wherever a record's tokens so far equal the base run's, its next logits are bit for bit
    the base run's; how many logits rows that compared."""
    (rows, tokens), (base_rows, base_tokens) = run, base
    compared = 0
    for record, want in base_tokens.items():
        got = tokens[record]
        for index in range(min(len(got), len(want))):
            assert torch.equal(rows[(record, index)], base_rows[(record, index)]), (record, index)
            compared += 1
            if got[index] != want[index]:
                break
    return compared


@needs_kernel
def test_a_rows_logits_do_not_depend_on_what_shares_its_forward(tiny_model, tokenizer):
    """Issue 21 item 8: a record's logits, bit for bit, and so its sampled tokens, are the same alone, in
    any batch, in mixed or separate steps, in any order and thread count (the tiny model's lm_head has 259
    outputs: MKL's GEMM, which it ran before, rounds a row by the rows beside it)."""
    base = sampled_logits(tiny_model, tokenizer, BATCH_RECORDS, batch_size=3, scheduler="continuous")
    alone_rows, alone_tokens = {}, {}
    for record in BATCH_RECORDS:
        rows, tokens = sampled_logits(tiny_model, tokenizer, [record], batch_size=1, scheduler="continuous")
        alone_rows.update(rows)
        alone_tokens.update(tokens)
    runs = {"alone": (alone_rows, alone_tokens),
            "separate steps": sampled_logits(tiny_model, tokenizer, BATCH_RECORDS, batch_size=3, mixed_steps=False),
            "batch 5": sampled_logits(tiny_model, tokenizer, BATCH_RECORDS, batch_size=5),
            "reversed, 2 threads": sampled_logits(tiny_model, tokenizer, BATCH_RECORDS[::-1], threads=2, batch_size=3)}
    for name, run in runs.items():
        assert run[1] == base[1], name
        assert same_inputs_same_logits(run, base) == len(base[0]), name


@needs_kernel
def test_a_prompts_logits_do_not_depend_on_how_it_was_chunked(tiny_model, tokenizer):
    """Chunk boundaries follow the token budget and what else runs: a prompt token attends like a decode
    token (its slot's columns 0..its position), so the logits after the prompt, and after every generated
    token the runs share, are the same bit for bit."""
    base = sampled_logits(tiny_model, tokenizer, BATCH_RECORDS, batch_size=3, scheduler="continuous")
    for settings in (dict(batch_size=3, prefill_chunk_tokens=8), dict(batch_size=4, prefill_chunk_tokens=5,
                                                                      mixed_steps=False)):
        run = sampled_logits(tiny_model, tokenizer, BATCH_RECORDS, scheduler="chunked", **settings)
        assert same_inputs_same_logits(run, base) >= len(BATCH_RECORDS)  # at least every first token's


@needs_kernel
def test_a_chunked_prompts_sampled_tokens_do_not_depend_on_its_chunks(tiny_model, tokenizer):
    base = sampled_logits(tiny_model, tokenizer, BATCH_RECORDS, batch_size=3, scheduler="continuous")
    run = sampled_logits(tiny_model, tokenizer, BATCH_RECORDS, batch_size=3, scheduler="chunked",
                         prefill_chunk_tokens=8)
    assert run[1] == base[1]


@pytest.mark.skipif(os.environ.get("DISTGEN_SANITIZED") == "1", reason="this is the sanitized run")
def test_the_kernels_pass_this_file_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    """This file's tests, against the kernels built with -fsanitize=address,undefined into their own cache;
    any sanitizer report fails."""
    if kernels.load_kernel()[0] is None:
        pytest.skip(f"distgen's CPU kernels cannot run here: {kernels.load_kernel()[1]}")
    cc = kernels.compiler()
    runtimes = [subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
                for name in ("libasan.so", "libstdc++.so")]
    if not all(os.path.isabs(path) and os.path.exists(path) for path in runtimes):
        pytest.skip(f"{cc} has no AddressSanitizer runtime (libasan.so) or libstdc++.so: install gcc's libasan to run this")
    env = dict(os.environ, DISTGEN_SANITIZED="1", DISTGEN_KERNEL_CACHE=str(tmp_path / "kernels"),
               DISTGEN_KERNEL_CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all -g",
               # A sanitized library in an unsanitized python: its runtime loads first, and libstdc++ with it
               # (else ASan's __cxa_throw interceptor finds no real one and torch's first C++ exception aborts).
               LD_PRELOAD=" ".join(runtimes),
               # Reports go to files: pytest's capture of an aborted test's stderr would be lost.
               ASAN_OPTIONS=f"detect_leaks=0:abort_on_error=1:log_path={tmp_path / 'asan'}",  # python keeps memory
               UBSAN_OPTIONS=f"print_stacktrace=1:halt_on_error=1:log_path={tmp_path / 'ubsan'}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", __file__],
                            cwd=REPO / "tests", env=env, capture_output=True, text=True, timeout=600)
    reports = "\n".join(path.read_text(errors="replace") for path in sorted(tmp_path.glob("*san.*")))
    output = reports + result.stdout[-3000:] + result.stderr[-3000:]
    assert not reports and "runtime error:" not in output, output[:8000]
    assert result.returncode == 0 and " passed" in result.stdout, output[-6000:]
    assert list((tmp_path / "kernels").glob("cpu_kernels-*.so")), "the sanitized kernels were not built"


@needs_kernel
def test_the_owned_stack_takes_the_bench_models_shape(tokenizer):
    """An 8-layer, hidden-512 Llama (bench/common.py's `large`, init std 0.2): its values grow to ~15 over the
    layers and the stack's sums run in another order than torch's SDPA, so its probe must compare at the
    tensors' own scale (an element-wise tolerance refused this model: the job then ran transformers' forward)."""
    from distgen.models.tiny import build_tiny_model
    from distgen.config import TinyModelConfig
    model = build_tiny_model(TinyModelConfig(layers=8, hidden_size=512, heads=8, kv_heads=4, intermediate_size=1536),
                             tokenizer).eval()
    said = cpu_model.apply_kernels(plan_kernels("distgen", model, CPU, False, False, None), model)
    assert "decoder stack: distgen's (one C call per forward)" in said, said

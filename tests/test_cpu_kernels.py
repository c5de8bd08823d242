"""generation.cpu_kernels: distgen's AVX2 CPU kernels (packed linear, decode attention, KV writes, fused norms/MLPs)
against torch's own ops and model.generate."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import DEFAULT_BUDGET, PROMPTS, assert_matches_generate
from distgen.config import GenerationConfig
from distgen.backends.cpu import kernels
from distgen.backends.cpu import model as cpu_model
from distgen.backends.cpu.kernels import pack, pack_linears, packed_linear, plan_kernels, unpack, unpack_linears
from distgen.common.errors import ConfigError
from helpers import engine_for, generate_all

CPU = torch.device("cpu")
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
@pytest.mark.parametrize("n,k,bias", [(16, 8, False), (48, 37, True), (64, 128, False), (1536, 512, True)])
def test_packed_linear_matches_torch_and_rows_do_not_depend_on_their_batch(n, k, bias):
    torch.manual_seed(n + k)
    weight, b = torch.randn(n, k), (torch.randn(n) if bias else None)
    packed = pack(weight)
    assert torch.equal(unpack(packed), weight)
    for rows in (1, 5, 6, 7, 13, 40):
        x = torch.randn(2, rows, k)  # a leading batch dimension, as in a model
        got = packed_linear(x, packed, b)
        torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-4)
        # Row 0 alone equals row 0 among the others, bit for bit (one FMA chain per output).
        assert torch.equal(packed_linear(x[:1, :1], packed, b)[0, 0], got[0, 0])
    assert packed_linear(torch.randn(0, k), packed, b).shape == (0, n)


@needs_kernel
def test_pack_linears_in_place_is_idempotent_and_undone(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.tensor([[5, 9, 11, 30, 7]])
    with torch.no_grad():
        want = model(ids).logits
        packed, total = pack_linears(model)
        assert 0 < packed <= total and pack_linears(model) == (packed, total)
        assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters())
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
        unpack_linears(model)
        assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
        assert torch.equal(model(ids).logits, want)


@needs_kernel
@pytest.mark.parametrize("scheduler", ["continuous", "chunked"])
def test_engine_with_packed_linears_equals_torch_generate(tiny_model_dir, tokenizer, scheduler, monkeypatch):
    # The engine's model packs its linears and runs distgen's own decoder stack (decode-only steps as one
    # C call); the reference is an untouched model's generate (MKL).
    calls = []
    real = cpu_model.decode_stack
    monkeypatch.setattr(cpu_model, "decode_stack", lambda *args: calls.append(1) or real(*args))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=3, scheduler=scheduler, cache="static",
                           compile="off", cpu_kernels="distgen", prefill_chunk_tokens=8)
    engine = engine_for(model, tokenizer, PROMPTS, cfg)
    assert "distgen CPU kernels" in engine.choice and "norms/MLPs fused" in engine.choice
    assert "decoder stack: distgen's forward" in engine.choice and model.model._distgen_owned
    assert kernels.is_packed(model.model.layers[0].mlp.down_proj)
    got = generate_all(engine)
    assert_matches_generate(reference, tokenizer, got)
    assert len(calls) >= DEFAULT_BUDGET - 1  # decode steps ran as one C call
    # A later engine that compiles or is told torch unpacks them again.
    engine_for(model, tokenizer, PROMPTS, GenerationConfig(cpu_kernels="torch", compile="off"))
    assert not any(kernels.is_packed(m) for m in model.modules())
    assert "forward" not in vars(model.model) and not model.model._distgen_owned


def test_plans_say_why_and_bad_settings_are_config_errors(tiny_model, monkeypatch):
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
        GenerationConfig(cpu_kernels="mkl").check()
    # No compiler: auto falls back to torch and says so (a fresh cache folder forces a build).
    monkeypatch.setenv("DISTGEN_KERNEL_CACHE", "/nonexistent/none")
    monkeypatch.setattr(kernels, "compiler", lambda: None)
    kernels.load_kernel.cache_clear()
    try:
        if kernels.cpu_blocker() is None:
            assert plan("auto") == kernels.KernelPlan(False, "torch kernels (no C compiler to build the kernel: set CC or install gcc)")
    finally:
        kernels.load_kernel.cache_clear()


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 4, 64), (4, 4, 16), (6, 2, 32), (4, 2, 12)])  # 12: SDPA fallback
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
    # A column past a slot's length never counts: garbage there changes nothing (the kernel never reads
    # it, so even NaN; SDPA's masked fallback multiplies masked values by 0, so a finite one).
    # Half-precision buffers (autocast) are not the kernel's: SDPA answers, nothing is read as fp32.
    half = kernels.decode_attention(query.bfloat16(), keys.bfloat16(), values.bfloat16(), lengths[:4], 0.125)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half[:3].float(), got[:3], rtol=0.05, atol=0.05)
    garbage = float("nan") if dim % 8 == 0 else 1e6
    keys[:, :, 40:], values[:, :, 40:] = garbage, garbage
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
def test_fused_norms_and_mlps_match_their_modules_and_only_those(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    odd = OffsetRMSNorm(model.config.hidden_size)
    model.model.extra_norm = odd  # not called by the model; only the fusing pass looks at it
    ids = torch.tensor([[5, 9, 11, 30, 7, 12]])
    with torch.no_grad():
        want = model(ids).logits
        pack_linears(model)
        fused = kernels.fuse_modules(model)
        layers = len(model.model.layers)
        assert fused == 3 * layers + 1  # two norms and the MLP per layer, the final norm
        assert kernels.fuse_modules(model) == fused and not getattr(odd, "_distgen_fused", False)
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
        x = torch.randn(4, 2 * 96)
        torch.testing.assert_close(kernels.silu_mul(x), F.silu(x[:, :96]) * x[:, 96:], rtol=1e-5, atol=1e-6)
        kernels.unfuse_modules(model)
        unpack_linears(model)
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
    pack_linears(model)
    kernels.fuse_modules(model)
    assert cpu_model.own_stack(model) == "decoder stack: distgen's forward"
    assert cpu_model.own_stack(model) == "decoder stack: distgen's forward"  # idempotent
    ids = torch.tensor([[5, 9, 11, 30, 7, 12]])
    with torch.no_grad():  # outside a slot-cache forward it is transformers' own forward
        owned = model(ids).logits
        cpu_model.release_stack(model)
        assert "forward" not in vars(model.model) and torch.equal(model(ids).logits, owned)
    # A stack computing something else (here a layer that does nothing) fails the probe and is not used.
    monkeypatch.setattr(cpu_model, "layer_forward", lambda layer, x, cos, sin: x)
    assert cpu_model.own_stack(model) == ("decoder stack: transformers' forward (its forward differs from a "
                                          "Llama-style stack's on a probe)")
    assert "forward" not in vars(model.model)
    # A layer that is not Llama-style is named.
    model.model.layers[0].extra = torch.nn.Identity()
    assert "holds extra, input_layernorm" in cpu_model.own_stack(model)


@needs_kernel
def test_a_tied_lm_head_is_packed_and_its_embedding_reads_the_packed_table(tokenizer):
    model, reference = llama_pair(tokenizer, seed=5, vocab_size=272, hidden_size=64, intermediate_size=128,
                                  num_key_value_heads=2, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    table = model.lm_head.weight.detach().clone()
    ids = torch.tensor([[5, 9, 11, 30, 7, 271, 0]])
    with torch.no_grad():
        want = model(ids).logits
        packed, total = pack_linears(model)
        assert packed == total and kernels.is_packed(model.lm_head)
        assert model.model.embed_tokens._distgen_packed_rows and not torch.equal(model.lm_head.weight, table)
        assert torch.equal(model.model.embed_tokens(ids), F.embedding(ids, table))
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
        with pytest.raises(IndexError, match=r"token ids must lie in \[0, 272\), got 0..272"):
            model.model.embed_tokens(torch.tensor([0, 272]))
        unpack_linears(model)
        assert torch.equal(model.lm_head.weight, table) and "forward" not in vars(model.model.embed_tokens)
        assert torch.equal(model(ids).logits, want)
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=3, scheduler="continuous", cache="static",
                           compile="off", cpu_kernels="distgen")
    engine = engine_for(model, tokenizer, PROMPTS, cfg)
    assert f"{total} of {total} linear layers packed" in engine.choice
    got = generate_all(engine)
    assert_matches_generate(reference, tokenizer, got)


@needs_kernel
def test_owned_stack_without_the_one_call_decode_still_equals_generate(tokenizer, monkeypatch):
    # head_dim 12: the decode-attention kernel needs multiples of 8, so decode steps run the owned stack's
    # Python layers (attention by SDPA) instead of one decode_stack call.
    model, reference = llama_pair(tokenizer, seed=6, vocab_size=len(tokenizer), hidden_size=48,
                                  intermediate_size=96, num_key_value_heads=4)
    calls = []
    monkeypatch.setattr(cpu_model, "decode_stack", lambda *args: calls.append(1))
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=3, scheduler="continuous", cache="static",
                           compile="off", cpu_kernels="distgen")
    engine = engine_for(model, tokenizer, PROMPTS, cfg)
    assert "decoder stack: distgen's forward" in engine.choice and not model.model._distgen_uniform
    got = generate_all(engine)
    assert_matches_generate(reference, tokenizer, got)
    assert not calls

"""distgen's own forward of a Llama-style decoder stack, over its CPU kernels (cpu_kernels.py).

A decode step of a small model on one CPU thread spends as long in transformers' small ops as in its
attention: each layer's forward is ~40 ops (views, transposes, rotate_half's concatenations and
negations, residual adds) and a dozen module calls, for 16 rows of 512 features. vLLM owns its models'
forwards for this reason. Here, inside a slot-cache forward that runs distgen's kernels (varlen.ACTIVE
with `cpu_kernels`), a Llama-style base model (embed_tokens, rotary_emb, norm, and layers of exactly
self_attn (q/k/v/o_proj) + mlp + input/post-attention RMSNorms) runs `stack_forward` instead: per layer,
the fused norm; the q, k and v projections written into one buffer; rotary embedding in place (a kernel,
bit for bit transformers' `x * cos + rotate_half(x) * sin`); the slot attention (varlen.attend) over
views of that buffer; the output projection adding the residual in its store; then the same for the
MLP (gate/up into one buffer, silu * up, down adding the residual). Same arithmetic in the same order,
so the same tokens. Every other forward (generate, SDPA and mask paths, other caches) is transformers'.

Before it is used the stack is run beside transformers' own forward on a probe (decode tokens and a
prompt segment over scratch slot buffers); a model whose forward computes something else (scaled
embeddings, partial rotary, extra norms) keeps its own, and the engine line says why.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Optional

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from distgen.backends.cpu.kernels import gated_activation, is_packed, load_kernel, packed_linear, rms_norm, rotary
from distgen.engine.kv import varlen

LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
ATTENTION_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP_PARTS = {"gate_proj", "up_proj", "down_proj", "act_fn"}
STACK_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")


def base_model(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    return getattr(model, getattr(model, "base_model_prefix", "model"), None)


def fused(module: torch.nn.Module) -> bool:
    return getattr(module, "_distgen_fused", False)


def children(module: torch.nn.Module) -> set[str]:
    return {name for name, _ in module.named_children()}


def layer_blocker(layer: torch.nn.Module) -> Optional[str]:
    """Why this decoder layer is not one `layer_forward` computes, or None."""
    name = type(layer).__name__
    if children(layer) != LAYER_PARTS:
        return f"{name} holds {', '.join(sorted(children(layer)))}, not a Llama-style layer"
    attn, mlp = layer.self_attn, layer.mlp
    if children(attn) != ATTENTION_PARTS or not all(is_packed(getattr(attn, part)) for part in ATTENTION_PARTS):
        return f"{type(attn).__name__} is not four packed projections (q/k/v/o_proj)"
    if children(mlp) != MLP_PARTS or not fused(mlp) or not is_packed(mlp.down_proj):
        return f"{type(mlp).__name__} is not a fused gated MLP with a packed down_proj"
    if not (fused(layer.input_layernorm) and fused(layer.post_attention_layernorm)):
        return f"{name}'s norms are not fused RMSNorms"
    dim = getattr(attn, "head_dim", None)
    if not isinstance(dim, int) or dim % 2 or not isinstance(getattr(attn, "scaling", None), float) \
            or not isinstance(getattr(attn, "layer_idx", None), int) \
            or attn.q_proj.weight.shape[0] % dim or attn.k_proj.weight.shape != attn.v_proj.weight.shape \
            or attn.k_proj.weight.shape[0] % dim:
        return f"{type(attn).__name__} has no even head_dim, scaling and layer_idx that fit its projections"
    return None


def stack_blocker(model: torch.nn.Module) -> Optional[str]:
    """Why this model's decoder stack keeps transformers' forward, or None (before the probe)."""
    base = base_model(model)
    if base is None or not all(isinstance(getattr(base, part, None), torch.nn.Module) for part in STACK_PARTS):
        return "not a Llama-style decoder stack (embed_tokens, rotary_emb, layers, norm)"
    if not fused(base.norm):
        return "its final norm is not a fused RMSNorm"
    for layer in base.layers:
        blocker = layer_blocker(layer)
        if blocker:
            return blocker
    return None


def attention(attn: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              residual: torch.Tensor) -> torch.Tensor:
    """residual + o_proj(slot attention of x's q/k/v with rotary), x and residual (tokens, hidden)."""
    tokens, dim = x.shape[0], attn.head_dim
    q_width, kv_width = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
    qkv = torch.empty((tokens, q_width + 2 * kv_width), dtype=torch.float32)
    for proj, start, width in ((attn.q_proj, 0, q_width), (attn.k_proj, q_width, kv_width),
                               (attn.v_proj, q_width + kv_width, kv_width)):
        packed_linear(x, proj.weight, proj.bias, out=qkv[:, start:start + width])
    rotary(qkv[:, :q_width + kv_width].view(tokens, -1, dim), cos, sin)
    # (1, heads, tokens, head_dim) views, as transformers' attention passes them
    query, key, value = (qkv[:, start:start + width].view(tokens, -1, dim).transpose(0, 1).unsqueeze(0)
                         for start, width in ((0, q_width), (q_width, kv_width), (q_width + kv_width, kv_width)))
    out = varlen.attend(query, key, value, attn.layer_idx, attn.scaling)  # (1, tokens, heads, head_dim)
    return packed_linear(out.view(tokens, q_width), attn.o_proj.weight, attn.o_proj.bias, residual=residual)


def layer_forward(layer: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One Llama-style decoder layer over x (tokens, hidden); a new tensor (x is not written)."""
    norm = layer.input_layernorm
    x = attention(layer.self_attn, rms_norm(x, norm.weight, norm._distgen_eps), cos, sin, residual=x)
    norm, mlp = layer.post_attention_layernorm, layer.mlp
    h = gated_activation(mlp, rms_norm(x, norm.weight, norm._distgen_eps))
    return packed_linear(h, mlp.down_proj.weight, mlp.down_proj.bias, residual=x)


def owns(input_ids: Optional[torch.Tensor], position_ids: Optional[torch.Tensor], kwargs: dict) -> bool:
    """Does this call run distgen's stack (a slot-cache forward on the kernels, one packed row of ids)?"""
    plan = varlen.ACTIVE[0]
    return plan is not None and plan.cpu_kernels and input_ids is not None and position_ids is not None \
        and input_ids.shape[0] == 1 and kwargs.get("inputs_embeds") is None and kwargs.get("cache") is None \
        and kwargs.get("past_key_values") is None \
        and not any(kwargs.get(flag) for flag in ("output_hidden_states", "output_attentions"))


def stack_forward(self: torch.nn.Module, input_ids: Optional[torch.Tensor] = None,
                  position_ids: Optional[torch.Tensor] = None, **kwargs) -> BaseModelOutputWithPast:
    """The base model's forward (set per instance by `own_stack`); transformers' own outside `owns`."""
    if not owns(input_ids, position_ids, kwargs):
        return type(self).forward(self, input_ids=input_ids, position_ids=position_ids, **kwargs)
    hidden = self.embed_tokens(input_ids)
    cos, sin = self.rotary_emb(hidden, position_ids=position_ids)
    x, cos, sin = hidden[0], cos[0], sin[0]
    table = decode_table(self, varlen.ACTIVE[0], x, cos)
    if table is not None:
        return BaseModelOutputWithPast(last_hidden_state=decode_stack(self, table, x, cos, sin)[None])
    for layer in self.layers:
        x = layer_forward(layer, x, cos, sin)
    return BaseModelOutputWithPast(last_hidden_state=rms_norm(x, self.norm.weight, self.norm._distgen_eps)[None])


# The per-layer addresses decode_stack (kernels/cpu_kernels.c) reads, in its enum's order.
LAYER_POINTERS = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.q_proj.bias",
                  "self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight",
                  "self_attn.v_proj.bias", "self_attn.o_proj.weight", "self_attn.o_proj.bias",
                  "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                  "mlp.down_proj.weight", "mlp.down_proj.bias")


def layer_tensor(layer: torch.nn.Module, name: str) -> Optional[torch.Tensor]:
    module, attr = name.rsplit(".", 1)
    return getattr(layer.get_submodule(module), attr)


def uniform(base: torch.nn.Module) -> bool:
    """Do all layers share one geometry (what one decode_stack call assumes), with contiguous fp32 tensors?"""
    def geometry(layer):
        attn, mlp = layer.self_attn, layer.mlp
        return (attn.head_dim, attn.scaling, attn.q_proj.weight.shape, attn.k_proj.weight.shape,
                mlp.gate_proj.weight.shape, mlp.down_proj.weight.shape)
    tensors = [layer_tensor(layer, name) for layer in base.layers for name in LAYER_POINTERS]
    return len({geometry(layer) for layer in base.layers}) == 1 and base.layers[0].self_attn.head_dim % 8 == 0 \
        and all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors if t is not None)


@dataclass(frozen=True)
class StackTable:
    """What one decode_stack call reads besides the step's tensors, for one set of cache buffers."""
    buffers: tuple[int, ...]  # the cache layers' key and value addresses it was built for
    pointers: torch.Tensor    # (layers, 16) int64 addresses, in LAYER_POINTERS order, then keys and values
    eps: torch.Tensor         # (layers * 2,) fp32: each layer's two norms' eps
    strides: tuple[int, ...]  # the key/value buffers' (slot, head, column) strides


def decode_table(base: torch.nn.Module, plan: varlen.AttentionPlan, x: torch.Tensor,
                 cos: torch.Tensor) -> Optional[StackTable]:
    """The table of a decode-only forward that one decode_stack call runs, or None (prefill segments, the
    SDPA decode path, a cache not yet or differently laid out, a rotary table not head_dim wide)."""
    dim = base.layers[0].self_attn.head_dim
    if not getattr(base, "_distgen_uniform", False) or plan.segments or plan.decode_lengths is None \
            or plan.decode != x.shape[0] or len(plan.layers) < len(base.layers) or cos.shape != (x.shape[0], dim) \
            or {plan.write_slots.dtype, plan.write_cols.dtype, plan.decode_lengths.dtype} != {torch.long}:
        return None
    layers = plan.layers[:len(base.layers)]
    if not all(layer.is_initialized and layer.keys.dtype == torch.float32 and layer.keys.stride(-1) == 1
               and layer.keys.stride() == layers[0].keys.stride() == layer.values.stride() for layer in layers):
        return None
    buffers = tuple(layer.keys.data_ptr() for layer in layers) + tuple(layer.values.data_ptr() for layer in layers)
    table = getattr(base, "_distgen_table", None)
    if table is None or table.buffers != buffers:
        rows = [[0 if tensor is None else tensor.data_ptr()
                 for tensor in [layer_tensor(layer, name) for name in LAYER_POINTERS] + [cache.keys, cache.values]]
                for layer, cache in zip(base.layers, layers)]
        eps = [norm._distgen_eps for layer in base.layers
               for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
        base._distgen_table = table = StackTable(buffers, torch.tensor(rows, dtype=torch.long),
                                                 torch.tensor(eps, dtype=torch.float32), layers[0].keys.stride())
    return table


def decode_stack(base: torch.nn.Module, table: StackTable, x: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> torch.Tensor:
    """The whole stack of a decode-only forward in one C call (kernels/cpu_kernels.c's decode_stack); x is
    the step's embeddings (tokens, hidden), written in place; the final norm's output."""
    pointers, eps, strides = table.pointers, table.eps, table.strides
    plan, attn, mlp = varlen.ACTIVE[0], base.layers[0].self_attn, base.layers[0].mlp
    x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    slots, cols, lengths = plan.write_slots.contiguous(), plan.write_cols.contiguous(), plan.decode_lengths.contiguous()
    out = torch.empty_like(x)
    tokens, hidden = x.shape
    load_kernel()[0].decode_stack(
        x.data_ptr(), out.data_ptr(), tokens, hidden, len(base.layers), pointers.data_ptr(), eps.data_ptr(),
        base.norm.weight.data_ptr(), base.norm._distgen_eps, attn.q_proj.weight.shape[0] // attn.head_dim,
        attn.k_proj.weight.shape[0] // attn.head_dim, attn.head_dim, mlp.gate_proj.weight.shape[0], attn.scaling,
        cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), cols.data_ptr(), lengths.data_ptr(), strides[0],
        strides[1], strides[2], torch.get_num_threads())
    return out


class ProbeLayer:
    """A slot cache layer of scratch buffers (what varlen.attend reads and writes)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values, self.is_initialized = keys, values, True


@torch.no_grad()
def agrees(model: torch.nn.Module, base: torch.nn.Module) -> bool:
    """Does `stack_forward` compute what transformers' forward does on two probes over scratch slot buffers
    (hidden states and the keys and values written)? A mixed forward: two decode tokens (slots 0 and 1,
    over 3 and 5 cached columns) and a 3-token prompt in slot 2; and a decode-only one (one C call)."""
    generator = torch.Generator().manual_seed(0)
    attn = base.layers[0].self_attn
    shape = (3, attn.k_proj.weight.shape[0] // attn.head_dim, 8, attn.head_dim)  # slots, kv heads, columns, dim
    init = [(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)) for _ in base.layers]
    ids = torch.randint(0, base.embed_tokens.weight.shape[0], (1, 5), generator=generator)
    positions = torch.tensor([[2, 4, 0, 1, 2]])
    for tokens, segments in ((5, [varlen.Segment(2, 5, 2, 0)]), (2, [])):
        results = []
        for forward in (type(base).forward, stack_forward):
            layers = [ProbeLayer(keys.clone(), values.clone()) for keys, values in init]
            plan = varlen.AttentionPlan(layers, write_slots=torch.tensor([0, 1, 2, 2, 2][:tokens]),
                                        write_cols=positions[0, :tokens].clone(), decode=2, width=8,
                                        decode_lengths=torch.tensor([3, 5]), cpu_kernels=True, segments=segments)
            try:
                with varlen.activated(model, plan):
                    hidden = forward(base, input_ids=ids[:, :tokens], position_ids=positions[:, :tokens],
                                     use_cache=False).last_hidden_state
            except (RuntimeError, ValueError):
                return False
            finally:
                base._distgen_table = None  # addresses of the probe's buffers
            results.append([hidden] + [buffer for layer in layers for buffer in (layer.keys, layer.values)])
        want, got = results
        if want[0].shape != got[0].shape or not all(torch.allclose(a, b, rtol=1e-4, atol=1e-5)
                                                     for a, b in zip(want, got)):
            return False
    return True


def own_stack(model: torch.nn.Module) -> str:
    """Give the model's Llama-style decoder stack distgen's forward (idempotent); what the engine line says."""
    base = base_model(model)
    if base is not None and getattr(base, "_distgen_owned", False):
        return "decoder stack: distgen's forward"
    blocker = stack_blocker(model)
    if blocker is None:
        base.forward = types.MethodType(stack_forward, base)
        base._distgen_uniform = uniform(base)
        if agrees(model, base):
            base._distgen_owned = True
            return "decoder stack: distgen's forward"
        del base.forward
        blocker = "its forward differs from a Llama-style stack's on a probe"
    return f"decoder stack: transformers' forward ({blocker})"


def release_stack(model: torch.nn.Module) -> None:
    base = base_model(model)
    if base is not None and getattr(base, "_distgen_owned", False):
        del base.forward
        base._distgen_owned, base._distgen_table = False, None

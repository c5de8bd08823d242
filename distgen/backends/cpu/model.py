"""distgen's own Llama-style decoder stack over its CPU kernels: `LlamaStack`, one C call per forward.

A decode step of a small model on one CPU thread spends as long in transformers' small ops as in its
attention: each layer's forward is ~40 ops (views, transposes, rotate_half's concatenations and
negations, residual adds) and a dozen module calls, for 16 rows of 512 features. vLLM and gpt-fast own
their models' forwards for this reason. `LlamaStack` is gpt-fast's `Transformer` for a transformers
Llama-style checkpoint already on the kernels (kernels.py: packed linears, fused norms and MLPs): it holds
the checkpoint's own modules (the same weight tensors, no copy) and runs a slot-cache forward on the
kernels (varlen.ACTIVE with `cpu_kernels`) as ONE C call, `llama_stack`: per layer the fused norm; q, k and
v into one buffer; rotary embedding in place (transformers' `x * cos + rotate_half(x) * sin`, its
roundings); each token's key and value into its slot; each token's attention over exactly its own slot's
columns; the output projection adding the residual in its store; then the same for the MLP.

Measured on this CPU (8 layers, h512, 16 rows, one thread, CPU time per decode step, medians): the one C
call 9.3-10.3 ms; the same kernels layer by layer from Python (what this module did before for mixed
steps) 10.6-10.9 ms; transformers' forward over the same swapped-in kernel modules 10.7-11.3 ms. So the
Python-level stack did not pay and is gone; the C stack does, and serves every slot-cache forward
(decode, prefill and mixed steps alike), so a decode row takes the same path whatever shares its forward.
Whole jobs (bench/engine.py's 128 prompts, continuous, static cache, one thread; 3 alternating pairs,
medians of tokens per CPU second, same tokens both ways): the 8-layer h512 model 714.5 with the stack vs
617.7 without (1.16x); the tests' tiny model (2 layers, h64) 30451 vs 14627 (2.08x). A 2000-token prefill
is ~5% slower than transformers' SDPA (1.33-1.39 s vs 1.26-1.32 s); prompts of 8-255 tokens are faster.

Batch invariance: every op of the C stack is computed per row in a fixed order (see cpu_kernels.c), the
rotary table is computed once per block of positions (`RotaryTable`), and a prompt token attends like
a decode token (its own slot's columns 0..position), so a token's hidden state does not depend on the
other tokens in the forward, nor on how its prompt was chunked.

The stack is swapped in for the model's base model (`model.model`, under the same name, so the model's
parameters keep their names); every other forward (generate, SDPA and mask paths, other caches) is the
base model's own, which it keeps (`replaced`) and swaps back on release. Before it is used the stack is
run beside transformers' forward on a probe (decode tokens and a prompt segment over scratch slot
buffers); a model whose forward computes something else (scaled embeddings, partial rotary, extra norms)
keeps its own, and the engine line says why.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from distgen.backends.cpu.kernels import (FusedGatedMLP, FusedRMSNorm, KernelPlan, build_flags, build_key, checked,
                                          compiler, fuse_modules, is_packed, kernel, pack_linears, unfuse_modules,
                                          unpack_linears)
from distgen.engine.kv import varlen

LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
ATTENTION_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj"}
STACK_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")
# RoPE variants whose tables change with the forward's longest position (transformers' dynamic_rope_update)
# would make a token's rotary depend on its batch.
DYNAMIC_ROPE = ("dynamic", "longrope")
# The per-layer tensors llama_stack (cpu_kernels.c) reads, in its enum's order; then the cache's keys, values.
LAYER_POINTERS = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.q_proj.bias",
                  "self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight",
                  "self_attn.v_proj.bias", "self_attn.o_proj.weight", "self_attn.o_proj.bias",
                  "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                  "mlp.down_proj.weight", "mlp.down_proj.bias")


def base_model(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    return getattr(model, getattr(model, "base_model_prefix", "model"), None)


def children(module: torch.nn.Module) -> set[str]:
    return {name for name, _ in module.named_children()}


def layer_blocker(layer: torch.nn.Module) -> Optional[str]:
    """Why this decoder layer is not one llama_stack computes, or None."""
    name = type(layer).__name__
    if children(layer) != LAYER_PARTS:
        return f"{name} holds {', '.join(sorted(children(layer)))}, not a Llama-style layer"
    attn, mlp = layer.self_attn, layer.mlp
    if children(attn) != ATTENTION_PARTS or not all(is_packed(getattr(attn, part)) for part in ATTENTION_PARTS):
        return f"{type(attn).__name__} is not four packed projections (q/k/v/o_proj)"
    if not isinstance(mlp, FusedGatedMLP) or not is_packed(mlp.down_proj):
        return f"{type(mlp).__name__} is not a fused gated MLP with a packed down_proj"
    if not (isinstance(layer.input_layernorm, FusedRMSNorm) and isinstance(layer.post_attention_layernorm, FusedRMSNorm)):
        return f"{name}'s norms are not fused RMSNorms"
    dim = getattr(attn, "head_dim", None)
    if not isinstance(dim, int) or dim % 2 or not isinstance(getattr(attn, "scaling", None), float) \
            or attn.q_proj.weight.shape[0] % dim or attn.k_proj.weight.shape != attn.v_proj.weight.shape \
            or attn.k_proj.weight.shape[0] % dim or (attn.q_proj.weight.shape[0] // dim) % (attn.k_proj.weight.shape[0] // dim):
        return f"{type(attn).__name__} has no even head_dim and scaling that fit its projections"
    return None


def geometry(layer: torch.nn.Module) -> tuple:
    attn, mlp = layer.self_attn, layer.mlp
    return (attn.head_dim, attn.scaling, attn.q_proj.weight.shape, attn.k_proj.weight.shape,
            mlp.gate_proj.weight.shape, mlp.down_proj.weight.shape)


def stack_blocker(model: torch.nn.Module) -> Optional[str]:
    """Why this model's decoder stack keeps transformers' forward, or None (before the probe)."""
    base = base_model(model)
    if base is None or children(base) != set(STACK_PARTS) or any(True for _ in base.named_parameters(recurse=False)) \
            or any(True for _ in base.named_buffers(recurse=False)):
        return "not a Llama-style decoder stack (exactly embed_tokens, rotary_emb, layers, norm)"
    if not isinstance(base.norm, FusedRMSNorm):
        return "its final norm is not a fused RMSNorm"
    rope = str(getattr(base.rotary_emb, "rope_type", "default"))
    if any(kind in rope for kind in DYNAMIC_ROPE):
        return f"its rotary embedding ({rope}) changes with the forward's length"
    if len(base.layers) == 0:
        return "it has no layers"
    for layer in base.layers:
        blocker = layer_blocker(layer)
        if blocker:
            return blocker
    if len({geometry(layer) for layer in base.layers}) != 1:
        return "its layers differ in shape (one llama_stack call runs one geometry)"
    return None


def layer_tensor(layer: torch.nn.Module, name: str) -> Optional[torch.Tensor]:
    module, attr = name.rsplit(".", 1)
    return getattr(layer.get_submodule(module), attr)


class RotaryTable:
    """cos/sin rows by position, from the model's own rotary embedding, computed once per block of BLOCK
    positions (always the same call shape), so a position's row never depends on the forward it is in."""
    BLOCK = 256

    def __init__(self, rotary_emb: torch.nn.Module):
        self.rotary_emb = rotary_emb
        self.cos: Optional[torch.Tensor] = None  # (positions, head_dim)
        self.sin: Optional[torch.Tensor] = None

    def rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, head_dim) cos and sin of `positions` (int64, >= 0)."""
        need = int(positions.max()) + 1 if positions.numel() else 0
        while self.cos is None or self.cos.shape[0] < need:
            first = 0 if self.cos is None else self.cos.shape[0]
            block = torch.arange(first, first + self.BLOCK)[None]
            cos, sin = self.rotary_emb(torch.empty(0, dtype=torch.float32), block)  # (1, BLOCK, head_dim)
            self.cos = cos[0].contiguous() if self.cos is None else torch.cat([self.cos, cos[0]])
            self.sin = sin[0].contiguous() if self.sin is None else torch.cat([self.sin, sin[0]])
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)


def check_positions(positions: torch.Tensor, columns: int) -> None:
    """Each token's position is the column it writes: one outside [0, columns) is an IndexError naming it (one
    far past them would grow the rotary table without end; C would read past int32 positions as int64 lengths)."""
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= columns):
        index = int(torch.nonzero((positions < 0) | (positions >= columns))[0, 0])
        raise IndexError(f"the owned decoder stack: entry {index}'s position is {int(positions[index])}, "
                         f"outside [0, {columns})")


class LlamaStack(torch.nn.Module):
    """A Llama-style base model's forward as one llama_stack call (see the module docstring)."""

    def __init__(self, base: torch.nn.Module):
        super().__init__()
        for part in STACK_PARTS:  # the checkpoint's modules, under their own names
            setattr(self, part, getattr(base, part))
        self.replaced = (base,)
        self.config = base.config
        attn, mlp = base.layers[0].self_attn, base.layers[0].mlp
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.heads, self.kv_heads = attn.q_proj.weight.shape[0] // attn.head_dim, attn.k_proj.weight.shape[0] // attn.head_dim
        self.intermediate = mlp.gate_proj.weight.shape[0]
        self.rotary = RotaryTable(base.rotary_emb)
        # The weights llama_stack reads (their addresses are checked before each call: a weight moved or
        # replaced since is never read through a stale address) and the norms' eps.
        self.weights = [layer_tensor(layer, name) for layer in self.layers for name in LAYER_POINTERS]
        self.weight_addresses = [0 if t is None else t.data_ptr() for t in self.weights]
        self.eps = torch.tensor([norm.eps for layer in self.layers
                                 for norm in (layer.input_layernorm, layer.post_attention_layernorm)],
                                dtype=torch.float32)
        self.table: Optional[torch.Tensor] = None  # (layers, 16) int64 addresses, for `table_buffers`
        self.table_buffers: tuple[int, ...] = ()
        self.scratch = torch.empty(0, dtype=torch.float32)

    def __getattr__(self, name: str) -> Any:
        """Anything else (attributes transformers or callers read) is the replaced base model's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            replaced = self.__dict__.get("replaced")
            if replaced is None:
                raise
            return getattr(replaced[0], name)

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, **kwargs) -> BaseModelOutputWithPast:
        plan = varlen.ACTIVE[0]
        if not self.owns(plan, input_ids, attention_mask, position_ids, kwargs):
            return self.replaced[0](input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.run(plan, input_ids[0], position_ids[0])[None])

    def owns(self, plan: Optional[varlen.AttentionPlan], input_ids: Optional[torch.Tensor],
             attention_mask: Optional[torch.Tensor], position_ids: Optional[torch.Tensor], kwargs: dict) -> bool:
        """Does this call run the C stack (a slot-cache forward on the kernels, one packed row of ids, fp32
        slot buffers of one layout)? Otherwise the base model's own forward runs."""
        if plan is None or not plan.cpu_kernels or input_ids is None or position_ids is None \
                or attention_mask is not None or input_ids.dim() != 2 or input_ids.shape[0] != 1 \
                or position_ids.shape != input_ids.shape or len(plan.layers) < len(self.layers) \
                or (plan.decode and plan.decode_lengths is None) \
                or any(kwargs.get(key) is not None for key in ("inputs_embeds", "cache", "past_key_values")) \
                or any(kwargs.get(flag) for flag in ("output_hidden_states", "output_attentions")) \
                or any(getattr(layer, "window", None) is not None for layer in plan.layers):
            return False  # (a binding sliding window: llama_stack reads every column; the kernels' blocker refuses)
        for layer in plan.layers[:len(self.layers)]:
            if not layer.is_initialized:  # what varlen.attend does on a layer's first forward
                empty = torch.empty((1, self.kv_heads, 0, self.head_dim), dtype=torch.float32)
                layer.lazy_initialization(empty, empty)
        first = plan.layers[0].keys
        return first.dtype == torch.float32 and first.device.type == "cpu" and first.stride(-1) == 1 \
            and first.shape[1] == self.kv_heads and first.shape[3] == self.head_dim \
            and all(layer.keys.shape == first.shape and layer.keys.stride() == first.stride() == layer.values.stride()
                    and layer.values.shape == first.shape and {layer.keys.dtype, layer.values.dtype} == {torch.float32}
                    for layer in plan.layers[:len(self.layers)])

    def addresses(self, layers: list) -> torch.Tensor:
        """The (layers, 16) address table for these cache layers; a RuntimeError where a weight moved."""
        if [0 if t is None else t.data_ptr() for t in self.weights] != self.weight_addresses:
            raise RuntimeError("a weight of the owned decoder stack moved or was replaced since it was built; "
                               "rebuild the engine (apply_kernels) after changing the model's weights")
        buffers = tuple(b.data_ptr() for layer in layers for b in (layer.keys, layer.values))
        if self.table is None or buffers != self.table_buffers:
            per_layer = len(LAYER_POINTERS)
            rows = [self.weight_addresses[i * per_layer:(i + 1) * per_layer] + [layer.keys.data_ptr(),
                                                                              layer.values.data_ptr()]
                    for i, layer in enumerate(layers)]
            self.table, self.table_buffers = torch.tensor(rows, dtype=torch.long), buffers
        return self.table

    def run(self, plan: varlen.AttentionPlan, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The final norm's output (tokens, hidden) of a slot-cache forward of `ids` at `positions`."""
        lib = kernel()
        layers = plan.layers[:len(self.layers)]
        table = self.addresses(layers)
        keys = layers[0].keys
        n_slots, columns = keys.shape[0], keys.shape[2]
        if positions.dtype != torch.long or positions.shape != ids.shape:  # C reads lengths (positions + 1) as int64
            raise ValueError(f"the owned stack's forward of {tuple(ids.shape)} ids got positions "
                             f"{tuple(positions.shape)} {positions.dtype}: int64 (tokens,) positions")
        check_positions(positions, columns)
        x = self.embed_tokens(ids).contiguous()  # (tokens, hidden), a fresh tensor: the residual stream
        tokens, hidden = x.shape
        cos, sin = self.rotary.rows(positions)
        # Each token reads its slot's columns 0..its position: decode tokens as the plan says (0: an idle slot).
        lengths = positions + 1
        if plan.decode:
            lengths[:plan.decode] = plan.decode_lengths
        slots, cols = plan.write_slots.contiguous(), plan.write_cols.contiguous()
        if slots.shape != (tokens,) or cols.shape != (tokens,) or {slots.dtype, cols.dtype} != {torch.long} \
                or x.dtype != torch.float32 or cos.shape != (tokens, self.head_dim):
            raise ValueError(f"the owned stack's forward of {tokens} tokens got write slots {tuple(slots.shape)} "
                             f"{slots.dtype}, columns {tuple(cols.shape)} {cols.dtype}, embeddings {x.dtype}, rotary "
                             f"{tuple(cos.shape)}")
        threads = torch.get_num_threads()
        need = lib.stack_scratch(tokens, hidden, self.heads, self.kv_heads, self.head_dim, self.intermediate, columns,
                                 threads)
        if self.scratch.numel() < need:
            self.scratch = torch.empty(need, dtype=torch.float32)
        out = torch.empty_like(x)
        checked("the owned decoder stack", lambda info: lib.llama_stack(
            x.data_ptr(), out.data_ptr(), tokens, hidden, len(layers), table.data_ptr(), self.eps.data_ptr(),
            self.norm.weight.data_ptr(), self.norm.eps, self.heads, self.kv_heads, self.head_dim, self.intermediate,
            self.scaling, cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), cols.data_ptr(), lengths.data_ptr(),
            n_slots, columns, keys.stride(0), keys.stride(1), keys.stride(2), self.scratch.data_ptr(), threads, info))
        return out


class ProbeLayer:
    """A slot cache layer of scratch buffers (what varlen.attend and the stack read and write)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values, self.is_initialized = keys, values, True


@torch.no_grad()
def agrees(model: torch.nn.Module, stack: LlamaStack) -> bool:
    """Does the stack compute what transformers' forward does on two probes over scratch slot buffers
    (hidden states and the keys and values written)? A mixed forward: two decode tokens (slots 0 and 1,
    over 3 and 5 cached columns) and a 3-token prompt in slot 2; and a decode-only one."""
    generator = torch.Generator().manual_seed(0)
    base = stack.replaced[0]
    shape = (3, stack.kv_heads, 8, stack.head_dim)  # slots, kv heads, columns, head_dim
    init = [(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)) for _ in base.layers]
    ids = torch.randint(0, base.embed_tokens.weight.shape[0], (1, 5), generator=generator)
    positions = torch.tensor([[2, 4, 0, 1, 2]])
    for tokens, segments in ((5, [varlen.Segment(2, 5, 2, 0)]), (2, [])):
        results = []
        for forward in (base, stack):
            layers = [ProbeLayer(keys.clone(), values.clone()) for keys, values in init]
            plan = varlen.AttentionPlan(layers, write_slots=torch.tensor([0, 1, 2, 2, 2][:tokens]),
                                        write_cols=positions[0, :tokens].clone(), decode=2, width=8,
                                        decode_lengths=torch.tensor([3, 5]), cpu_kernels=True, segments=segments)
            try:
                with varlen.activated(model, plan):
                    hidden = forward(input_ids=ids[:, :tokens], position_ids=positions[:, :tokens],
                                     use_cache=False).last_hidden_state
            except (RuntimeError, ValueError, IndexError):
                return False
            results.append([hidden] + [buffer for layer in layers for buffer in (layer.keys, layer.values)])
        want, got = results
        if want[0].shape != got[0].shape or not all(close(a, b) for a, b in zip(want, got)):
            return False
    return True


def close(want: torch.Tensor, got: torch.Tensor) -> bool:
    """Within float noise of each other, at the tensor's own scale: the stack sums in another order than torch's
    SDPA (an 8-layer h512 model's values reach ~15 with differences ~4e-5 where an element is near 0), while a
    stack that computes something else (a norm's (1 + weight), another rotary) is off by the values themselves."""
    return bool((want - got).abs().max() <= 1e-4 * want.abs().max() + 1e-6)


def own_stack(model: torch.nn.Module) -> str:
    """Swap a LlamaStack in for the model's Llama-style base model (idempotent); what the engine line says."""
    if isinstance(base_model(model), LlamaStack):
        return "decoder stack: distgen's (one C call per forward)"
    blocker = stack_blocker(model)
    if blocker is None:
        stack = LlamaStack(base_model(model))
        if agrees(model, stack):
            setattr(model, getattr(model, "base_model_prefix", "model"), stack)
            return "decoder stack: distgen's (one C call per forward)"
        blocker = "its forward differs from a Llama-style stack's on a probe"
    return f"decoder stack: transformers' forward ({blocker})"


def release_stack(model: torch.nn.Module) -> None:
    """Swap the model's own base model back in (nothing where no LlamaStack is in)."""
    stack = base_model(model)
    if isinstance(stack, LlamaStack):
        setattr(model, getattr(model, "base_model_prefix", "model"), stack.replaced[0])


@dataclass(frozen=True)
class Arithmetic:
    """What computes a model's forwards once apply_kernels ran: what a resume fingerprint of a sampled job
    keys on. `kernels`: "torch", or "distgen-<build key>" (source, compiler, flags); `batch_invariant`:
    a row's logits do not depend on the other rows of its forward nor on how its prompt is chunked (the
    owned stack runs it; elsewhere torch's GEMMs and SDPA pick their blocking by the rows they get)."""
    kernels: str
    batch_invariant: bool


def arithmetic(model: torch.nn.Module) -> Arithmetic:
    if not any(is_packed(module) for module in model.modules()):
        return Arithmetic("torch", False)
    return Arithmetic(f"distgen-{build_key(compiler() or '', build_flags())}", isinstance(base_model(model), LlamaStack))


def apply_kernels(plan: KernelPlan, model: torch.nn.Module) -> str:
    """Swap the kernels' modules in (or, with a plan that is off, back out); what the engine line adds."""
    release_stack(model)  # swapped in last: out first, so the swaps below reach the model's own modules
    if not plan.enabled:
        unfuse_modules(model)
        unpack_linears(model)
        return plan.reason
    packed, total = pack_linears(model)
    fused = fuse_modules(model)
    return f"{plan.reason}: {packed} of {total} linear layers packed in place, {fused} norms/MLPs fused, " \
        f"{own_stack(model)}"

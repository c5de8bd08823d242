"""The slot-attention seam: how a slot-cache forward writes its new keys/values and attends, picked by name.

Every forward of the varlen slot cache calls `varlen.attend`, which runs the `SlotAttention` its
`AttentionPlan` names. The implementations (the name table `ATTENTIONS`):
- `torch_sdpa`: the decode tokens in one SDPA over their slots' first `width` columns with an additive mask,
  each prefill segment in one SDPA of its own (GQA through `enable_gqa`). On CUDA the mask and GQA together
  rule out flash and memory-efficient attention, so SDPA falls to cuDNN or math; it is kept for fp32 (whose
  tokens equal `generate`'s) and CPU.
- `sdpa_folded`: the same forward without that fallback: the GQA group folded into the query axis (so the
  decode tokens' masked SDPA may take the memory-efficient kernel, no K/V repeated per query head), whole
  prompts causal without a mask (flash), continuation chunks through a lower-right causal bias.
- `cuda_varlen`: ONE torch FlashAttention varlen call per layer for the decode tokens and prefill chunks of a
  step (`aten::_flash_attention_forward` with `cum_seq_k` pointing at each row's own slot and `seqused_k`
  its length; causal is bottom-right, so a chunk continuing a prompt needs no mask): no mask tensors, no
  per-segment loop, native GQA. The buffers are token-major so that (slots x columns) rows are keys.
- `flash_attn`: as cuda_varlen, the decode-only forwards through the flash-attn package's
  `flash_attn_with_kvcache` when it is installed (auto-detected, never required).
- `varlen_reference`: cuda_varlen's metadata read by plain torch (a gathered, masked SDPA for the decode rows,
  one causal SDPA per segment): what the CPU tests run to check the metadata and the padded decode path.
- `cpu_kernels`: distgen's CPU kernels, registered by distgen/backends/cpu (above the engine).

Sliding windows and soft-capping: the model's attention passes each layer's `sliding_window` and `softcap` (what
its own attention would apply) and `varlen.attend` hands them on: a local layer's query at position p reads the
keys at (p - window, p] (transformers' mask); the keys of every layer stay in the slot (column = position), so a
window is a mask (torch_sdpa, sdpa_folded, varlen_reference) or FlashAttention's `window_size_left = window - 1`
(cuda_varlen, flash_attn). Gemma 2's `softcap` (scores -> cap * tanh(scores / cap) before the mask) is computed
only by torch_sdpa and varlen_reference (transformers' eager arithmetic: SDPA takes no softcap); the others refuse
such models (`AttentionContext.softcap`), and distgen's CPU kernels refuse binding windows
(`AttentionContext.window`), so auto selection passes on to one that applies them.

The builder picks one per engine (`plan_attention`): generation.attention=<name> forces one (the bench's variants,
the tests); auto (the default) takes the first of AUTO_ORDER that can run here, and the engine line says which and
why.
Implementations that read "varlen" metadata address rows by slot id: decode rows need not be slots 0..n-1, so
the cache never moves a row's keys to compact them, and a decode step's inputs come from device state alone
(what CUDA graphs and steps launched before the last one's tokens are read need).
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn.functional as F

from distgen.common.errors import ConfigError
from distgen.common.registry import Registry
from distgen.engine.windows import LayerWindows, attention_softcap

if TYPE_CHECKING:
    from distgen.engine.kv.varlen import AttentionPlan, Segment

# The config key that names an implementation (auto: plan_attention picks).
ATTENTION_KEY = "generation.attention"
# Tried in this order under auto; names not registered (cpu_kernels without its backend imported) are skipped.
AUTO_ORDER = ("cpu_kernels", "flash_attn", "cuda_varlen", "sdpa_folded", "torch_sdpa")
HALF = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class AttentionContext:
    """What decides which implementation can run: the device, the dtype attention computes in and the heads."""
    device: torch.device
    dtype: torch.dtype          # autocast's dtype, else the weights'
    weights_dtype: torch.dtype
    head_dim: int
    heads: int
    kv_heads: int
    cpu_kernels: str = "auto"   # generation.cpu_kernels
    autocast: str = "none"      # generation.autocast
    compiling: bool = False     # torch.compile wraps the decode step
    window: Optional[int] = None     # the smallest sliding window this job's sequences reach (None: none binds)
    softcap: Optional[float] = None  # attention logit soft-capping (Gemma 2's attn_logit_softcapping)


# (plan, cache layer, query (1, heads, tokens, head_dim), scale, *, window, softcap) -> (1, tokens, heads, head_dim);
# window: the layer's sliding window where it binds (a query at p reads keys (p - window, p]), else None;
# softcap: scores -> softcap * tanh(scores / softcap) before the mask, else None.
Attend = Callable[..., torch.Tensor]
# (plan, cache layer, key, value), key/value (1, kv_heads, tokens, head_dim): store the new tokens' keys/values
Write = Callable[["AttentionPlan", Any, torch.Tensor, torch.Tensor], None]


def write_columns(plan: "AttentionPlan", layer: Any, key: torch.Tensor, value: torch.Tensor) -> None:
    """Token t's key/value go to (write_slots[t], :, write_cols[t]) of the layer's buffers (index_put)."""
    layer.keys[plan.write_slots, :, plan.write_cols] = key[0].transpose(0, 1)
    layer.values[plan.write_slots, :, plan.write_cols] = value[0].transpose(0, 1)


@dataclass(frozen=True)
class SlotAttention:
    name: str
    attend: Attend
    blocker: Callable[[AttentionContext], Optional[str]]  # why it cannot run here, or None
    describe: str  # what the engine line says it does
    # Why auto selection passes it over although it could run (None: auto takes it when it is its turn).
    unwanted: Callable[[AttentionContext], Optional[str]] = lambda ctx: None
    write: Write = write_columns
    # What a decode token reads besides its query: "mask" (an additive mask over the first `width` columns of
    # slots 0..n-1), "lengths" (each slot's length, `AttentionPlan.decode_lengths`; slots 0..n-1) or "varlen"
    # (cu_q/cu_k/seqused_k: rows addressed by slot id, see the module docstring).
    decode_reads: str = "mask"
    token_major: bool = False  # buffers stored (slots, columns, kv_heads, head_dim) (a transposed view is kept)
    capturable: bool = False   # a decode-only forward through it can be captured in a CUDA graph
    owns_stack: bool = False   # the CPU backend's decoder stack may take the forward (AttentionPlan.cpu_kernels)

    @property
    def addressed(self) -> bool:
        return self.decode_reads == "varlen"


# generation.attention's names (the catalog checks a config's name against them; --help lists them).
ATTENTIONS: Registry[SlotAttention] = Registry(ATTENTION_KEY, valued=True, also={
    "auto": f"the first of {', '.join(AUTO_ORDER)} that can run here (the engine line says which and why)"})


def register(impl: SlotAttention, doc: type) -> SlotAttention:
    """`doc`: a class whose docstring is the one-line summary `ATTENTIONS.describe()` prints."""
    return ATTENTIONS.register(impl.name, doc, impl)


# --- shared arithmetic ---

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
              softcap: Optional[float] = None, is_causal: bool = False) -> torch.Tensor:
    """SDPA (GQA through enable_gqa), or with `softcap` transformers' eager arithmetic (Gemma 2's
    eager_attention_forward: scores * scale, soft-capped, the mask added, an fp32 softmax) that SDPA cannot do.
    q (rows, heads, q, head_dim), k/v (rows, kv_heads, k, head_dim), mask bool (True: attend) or additive."""
    gqa = q.shape[1] != k.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=gqa)
    if gqa:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        mask = causal_continuation(q.shape[-2], k.shape[-2], q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool \
            else scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def require_plain(name: str, window: Optional[int] = None, softcap: Optional[float] = None,
                  windows: bool = True) -> None:
    """What an implementation's blocker keeps away (AttentionContext.window/softcap) never reaches it."""
    if softcap is not None or (window is not None and not windows):
        raise RuntimeError(f"slot attention {name} got " + (f"softcap={softcap}" if softcap is not None else
                           f"a sliding window of {window}") + ", which it does not compute (its blocker should "
                           "have kept this model away)")


def windowed_decode_mask(plan: "AttentionPlan", window: Optional[int]) -> Optional[torch.Tensor]:
    """The decode mask (decode, 1, 1, width) with a local layer's window: column c (= position c) is read by the
    decode token at position p only if c > p - window. Built once per forward and window."""
    if window is None or plan.decode_mask is None:
        return plan.decode_mask
    if window not in plan.window_masks:
        assert plan.decode_positions is not None, "a windowed decode needs the decode tokens' positions"
        cols = torch.arange(plan.decode_mask.shape[-1], device=plan.decode_mask.device)
        inside = cols > (plan.decode_positions.unsqueeze(-1) - window)  # (decode, width)
        plan.window_masks[window] = torch.where(inside[:, None, None], plan.decode_mask,
                                                torch.finfo(plan.decode_mask.dtype).min)
    return plan.window_masks[window]


# --- torch_sdpa (today's path) ---

def sdpa_decode(plan: "AttentionPlan", layer: Any, query: torch.Tensor, scale: float, window: Optional[int] = None,
                softcap: Optional[float] = None) -> torch.Tensor:
    """(n, heads, head_dim): the first n tokens, slot i's over its first `width` columns under the plan's mask
    (and the layer's window)."""
    n = plan.decode
    q = query[0, :, :n].transpose(0, 1).unsqueeze(2)  # (n, heads, 1, head_dim)
    keys, values = layer.keys[:n, :, :plan.width], layer.values[:n, :, :plan.width]
    o = attention(q, keys, values, windowed_decode_mask(plan, window), scale, softcap)
    return o.squeeze(2)


def causal_continuation(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """(queries, keys) bool: query i (the key at keys - queries + i) sees keys up to its own."""
    return torch.ones((queries, keys), dtype=torch.bool, device=device).tril(keys - queries)


def window_start(seg: "Segment", window: Optional[int]) -> int:
    """The first column a segment's queries may read: with a window, its first query's (p - window, p]."""
    return 0 if window is None else max(0, seg.start - window + 1)


def segment_band(seg: "Segment", first: int, window: int, device: torch.device) -> torch.Tensor:
    """(q, end - first) bool: query i (position start + i) reads column first + j (its position) if it lies in
    (start + i - window, start + i]."""
    q_pos = torch.arange(seg.start, seg.end, device=device).unsqueeze(-1)
    k_pos = torch.arange(first, seg.end, device=device)
    return (k_pos <= q_pos) & (k_pos > q_pos - window)


def sdpa_segment(query: torch.Tensor, layer: Any, seg: "Segment", scale: float, window: Optional[int] = None,
                 softcap: Optional[float] = None) -> torch.Tensor:
    """(q, heads, head_dim): segment `seg`'s queries over its slot's columns 0..end, causal (with a window: only
    the columns its queries' windows reach, under a band mask)."""
    q = query[:, :, seg.q0:seg.q1]
    first = window_start(seg, window)
    k, v = layer.keys[seg.slot:seg.slot + 1, :, first:seg.end], layer.values[seg.slot:seg.slot + 1, :, first:seg.end]
    if window is not None:
        o = attention(q, k, v, segment_band(seg, first, window, query.device), scale, softcap)
    elif seg.start == 0:  # a whole prompt (or its first chunk): plain causal
        o = attention(q, k, v, None, scale, softcap, is_causal=True)
    else:
        o = attention(q, k, v, causal_continuation(seg.q1 - seg.q0, seg.end, query.device), scale, softcap)
    return o[0].transpose(0, 1)


def segments_into(out: torch.Tensor, plan: "AttentionPlan", layer: Any, query: torch.Tensor, scale: float,
                  segment: Callable[..., torch.Tensor] = sdpa_segment, window: Optional[int] = None,
                  softcap: Optional[float] = None) -> torch.Tensor:
    for seg in plan.segments:
        out[0, seg.q0:seg.q1] = segment(query, layer, seg, scale, window, softcap)
    return out


def new_out(query: torch.Tensor) -> torch.Tensor:
    """(1, tokens, heads, head_dim) for a query (1, heads, tokens, head_dim)."""
    return query.new_empty((1, query.shape[2], query.shape[1], query.shape[3]))


def attend_sdpa(plan: "AttentionPlan", layer: Any, query: torch.Tensor, scale: float, window: Optional[int] = None,
                softcap: Optional[float] = None) -> torch.Tensor:
    out = new_out(query)
    if plan.decode:
        out[0, :plan.decode] = sdpa_decode(plan, layer, query, scale, window, softcap)
    return segments_into(out, plan, layer, query, scale, window=window, softcap=softcap)


class TorchSdpa:
    """SDPA with an additive decode mask and enable_gqa, one SDPA per prefill segment (CPU and fp32 default).

    Sliding windows as masks, soft-capping in transformers' eager arithmetic."""


register(SlotAttention("torch_sdpa", attend_sdpa, lambda ctx: None,
                       "torch_sdpa (decode: one masked SDPA over the slots in use; one SDPA per prompt)"), TorchSdpa)


def softcap_blocker(ctx: AttentionContext) -> Optional[str]:
    if ctx.softcap is not None:
        return f"the model soft-caps attention scores (attn_logit_softcapping={ctx.softcap:g}), which this kernel " \
               "does not compute (torch_sdpa does)"
    return None


# --- sdpa_folded: the same forward, kept off SDPA's math fallback ---

def folded_decode(plan: "AttentionPlan", layer: Any, query: torch.Tensor, scale: float,
                  window: Optional[int] = None) -> torch.Tensor:
    """sdpa_decode with the GQA group as the query axis: q (n, kv_heads, group, head_dim) over the slot's own
    kv heads, so SDPA sees equal head counts (the memory-efficient kernel takes a mask then; math is not needed)."""
    n, keys, values = plan.decode, layer.keys[:plan.decode, :, :plan.width], layer.values[:plan.decode, :, :plan.width]
    q = query[0, :, :n].transpose(0, 1)  # (n, heads, head_dim)
    heads, kv_heads, dim = q.shape[1], keys.shape[1], q.shape[2]
    q = q.reshape(n, kv_heads, heads // kv_heads, dim)  # query head h reads kv head h // group (repeat_interleave)
    o = F.scaled_dot_product_attention(q, keys, values, attn_mask=windowed_decode_mask(plan, window), scale=scale)
    return o.reshape(n, heads, dim)


def folded_segment(query: torch.Tensor, layer: Any, seg: "Segment", scale: float, window: Optional[int] = None,
                   softcap: Optional[float] = None) -> torch.Tensor:
    """sdpa_segment without mask tensors: a whole prompt plain causal (flash), a continuation chunk through a
    lower-right causal bias (K/V repeated for GQA: the bias takes no enable_gqa on every torch). A local layer's
    segment takes sdpa_segment's band mask."""
    if seg.start == 0 or window is not None:
        return sdpa_segment(query, layer, seg, scale, window)
    from torch.nn.attention.bias import causal_lower_right
    q = query[:, :, seg.q0:seg.q1]
    k, v = layer.keys[seg.slot:seg.slot + 1, :, :seg.end], layer.values[seg.slot:seg.slot + 1, :, :seg.end]
    if q.shape[1] != k.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(seg.q1 - seg.q0, seg.end), scale=scale)
    return o[0].transpose(0, 1)


def attend_folded(plan: "AttentionPlan", layer: Any, query: torch.Tensor, scale: float, window: Optional[int] = None,
                  softcap: Optional[float] = None) -> torch.Tensor:
    require_plain("sdpa_folded", window, softcap)
    out = new_out(query)
    if plan.decode:
        out[0, :plan.decode] = folded_decode(plan, layer, query, scale, window)
    return segments_into(out, plan, layer, query, scale, folded_segment, window)


def half_on_cuda(ctx: AttentionContext) -> Optional[str]:
    if ctx.device.type != "cuda":
        return f"the cache is on {ctx.device.type}"
    if ctx.dtype not in HALF:
        return f"attention computes in {str(ctx.dtype).replace('torch.', '')} (fp32 keeps torch_sdpa, " \
               "whose tokens equal generate's)"
    return None


class SdpaFolded:
    """SDPA without its math fallback: GQA folded into the query axis, no mask for prompts (CUDA, bf16/fp16)."""


register(SlotAttention("sdpa_folded", attend_folded, softcap_blocker,
                       "sdpa_folded (decode: GQA folded into the query axis, masked SDPA off the math kernel; "
                       "prompts: causal SDPA without masks)", unwanted=half_on_cuda), SdpaFolded)


# --- varlen: one call over the step's sequences, rows addressed by slot id ---

def token_rows(buffer: torch.Tensor) -> torch.Tensor:
    """(slots * columns, kv_heads, head_dim): a token-major layer buffer's rows (a view, no copy)."""
    slots, kv_heads, columns, dim = buffer.shape
    return buffer.transpose(1, 2).view(slots * columns, kv_heads, dim)


def flash_forward(plan: "AttentionPlan", layer: Any, query: torch.Tensor, scale: float, window: Optional[int] = None,
                  softcap: Optional[float] = None) -> torch.Tensor:
    """One aten::_flash_attention_forward call: sequence b's queries cu_q[b]:cu_q[b+1] attend (bottom-right
    causal) to keys rows cu_k[b]:cu_k[b]+seqused_k[b], i.e. its slot's columns 0..seqused_k[b]-1; a local layer's
    through window_size_left = window - 1 (a query at p reads p - window + 1..p, transformers' window)."""
    require_plain("cuda_varlen", window, softcap)
    q = query[0].transpose(0, 1)  # (tokens, heads, head_dim): only the last dimension needs stride 1
    out = torch.ops.aten._flash_attention_forward(
        q, token_rows(layer.keys), token_rows(layer.values), plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, 0.0,
        True, False, scale=scale, seqused_k=plan.seqused_k,
        window_size_left=None if window is None else window - 1, window_size_right=None if window is None else 0)[0]
    return out.unsqueeze(0)


@functools.cache
def flash_op_blocker() -> Optional[str]:
    """Why this torch has no FlashAttention varlen op with per-sequence key lengths, or None."""
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    try:
        names = {argument.name for argument in op.default._schema.arguments} if op is not None else set()
    except (AttributeError, RuntimeError):
        names = set()
    if "seqused_k" not in names:
        return f"torch {torch.__version__} has no aten::_flash_attention_forward with seqused_k"
    return None


def flash_blocker(ctx: AttentionContext) -> Optional[str]:
    """Why torch's FlashAttention varlen kernel cannot run this cache, or None."""
    blocker = half_on_cuda(ctx) or flash_op_blocker() or softcap_blocker(ctx)
    if blocker:
        return blocker
    if ctx.compiling:
        return "the decode step is compiled (torch.compile keeps the masked path)"
    if ctx.head_dim % 8 or ctx.head_dim > 256:
        return f"head_dim {ctx.head_dim} (FlashAttention takes multiples of 8 up to 256)"
    if ctx.heads % ctx.kv_heads:
        return f"{ctx.heads} query heads are not a multiple of {ctx.kv_heads} kv heads"
    if not torch.backends.cuda.flash_sdp_enabled():
        return "flash attention is disabled (torch.backends.cuda.enable_flash_sdp(False))"
    major, minor = torch.cuda.get_device_capability(ctx.device)
    if major < 8:
        return f"the GPU's compute capability {major}.{minor} is below FlashAttention's 8.0"
    return None


class CudaVarlen:
    """torch's FlashAttention varlen kernel: one call per layer for a step's decode tokens and prompt chunks."""


register(SlotAttention("cuda_varlen", flash_forward, flash_blocker,
                       "cuda_varlen (torch FlashAttention varlen: one call per layer, each row reads its own slot's "
                       "columns through cum_seq_k/seqused_k, no masks, native GQA)",
                       decode_reads="varlen", token_major=True, capturable=True), CudaVarlen)


def reference_forward(plan: "AttentionPlan", layer: Any, query: torch.Tensor, scale: float,
                      window: Optional[int] = None, softcap: Optional[float] = None) -> torch.Tensor:
    """What flash_forward computes, in plain torch: the decode rows gathered from the metadata (row b's slot
    rows cu_k[b].. under `arange(max_k) < seqused_k[b]`: no host read, so it can be captured too; a local layer's
    from seqused_k[b] - window), each segment one SDPA causal to the bottom right (banded by the window). Rows
    reading no column give zeros, as FlashAttention does. Soft-capping in transformers' eager arithmetic."""
    out = new_out(query).zero_()
    n, keys, values = plan.decode, token_rows(layer.keys), token_rows(layer.values)
    if n:
        cols = torch.arange(plan.max_k, device=query.device)
        index = plan.cu_k[:n].long().unsqueeze(1) + cols  # (n, max_k) rows of the token-major buffer
        used = plan.seqused_k[:n].long().unsqueeze(1)
        seen = cols < used  # (n, max_k)
        if window is not None:  # the decode token is at position used - 1: it reads (used - 1 - window, used - 1]
            seen = seen & (cols >= used - window)
        k, v = (rows[index].transpose(1, 2) for rows in (keys, values))  # (n, kv_heads, max_k, head_dim)
        q = query[0, :, :n].transpose(0, 1).unsqueeze(2)  # (n, heads, 1, head_dim)
        o = attention(q, k, v, seen[:, None, None] | ~seen.any(-1)[:, None, None, None], scale, softcap).squeeze(2)
        out[0, :n] = torch.where(seen.any(-1)[:, None, None], o, 0)
    return segments_into(out, plan, layer, query, scale, window=window, softcap=softcap)


class VarlenReference:
    """cuda_varlen's metadata read by plain torch (tests; runs anywhere, never picked by auto)."""


register(SlotAttention("varlen_reference", reference_forward, lambda ctx: None,
                       "varlen_reference (cuda_varlen's metadata read by plain torch)",
                       unwanted=lambda ctx: f"a reference for tests, named by {ATTENTION_KEY} only",
                       decode_reads="varlen", token_major=True, capturable=True), VarlenReference)


# --- flash-attn (the package), where installed ---

def flash_attn_forward(plan: "AttentionPlan", layer: Any, query: torch.Tensor, scale: float,
                       window: Optional[int] = None, softcap: Optional[float] = None) -> torch.Tensor:
    """Decode-only forwards through flash-attn's kv-cache kernel (rows -> slots by cache_batch_idx; a local layer
    through window_size (window - 1, 0)); others as cuda_varlen."""
    if plan.segments or plan.rows is None:
        return flash_forward(plan, layer, query, scale, window, softcap)
    require_plain("flash_attn", window, softcap)
    from flash_attn import flash_attn_with_kvcache
    q = query[0].transpose(0, 1).unsqueeze(1)  # (n, 1, heads, head_dim)
    out = flash_attn_with_kvcache(q, layer.keys.transpose(1, 2), layer.values.transpose(1, 2),
                                  cache_seqlens=plan.seqused_k, cache_batch_idx=plan.rows.to(torch.int32),
                                  softmax_scale=scale, causal=True,
                                  window_size=(-1, -1) if window is None else (window - 1, 0))
    return out.transpose(0, 1)  # (1, n, heads, head_dim)


def flash_attn_blocker(ctx: AttentionContext) -> Optional[str]:
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed"
    return flash_blocker(ctx)


class FlashAttnPackage:
    """flash-attn's kv-cache kernel for decode steps, where the package is installed (never required)."""


register(SlotAttention("flash_attn", flash_attn_forward, flash_attn_blocker,
                       "flash_attn (flash-attn's kv-cache kernel for decode steps, torch FlashAttention varlen for "
                       "prompts)", decode_reads="varlen", token_major=True, capturable=True), FlashAttnPackage)


# --- choosing one ---

def plan_attention(ctx: AttentionContext, name: str = "auto") -> tuple[SlotAttention, str]:
    """(the implementation, what the engine line says): the one `name` (generation.attention) forces, else (auto)
    the first of AUTO_ORDER that can run; on CUDA the line names why the ones before it could not."""
    if name != "auto":
        impl = ATTENTIONS.get(name)
        blocker = impl.blocker(ctx)
        if blocker:
            raise ConfigError(f"{ATTENTION_KEY}={name} cannot run here: {blocker}; use {ATTENTION_KEY}=auto, or "
                              "one of " + ", ".join(ATTENTIONS.names()))
        return impl, f"{impl.describe} ({ATTENTION_KEY}={name})"
    if ctx.compiling and ctx.device.type == "cuda":
        return ATTENTIONS.get("torch_sdpa"), ATTENTIONS.get("torch_sdpa").describe + \
            " (the compiled CUDA decode reads a fixed-width mask)"
    passed = []
    for name in AUTO_ORDER:
        if name not in ATTENTIONS.entries:
            continue
        impl = ATTENTIONS.get(name)
        blocker = impl.blocker(ctx) or impl.unwanted(ctx)
        if blocker is None:
            why = f" (not {'; '.join(passed)})" if passed and ctx.device.type == "cuda" else ""
            return impl, impl.describe + why
        passed.append(f"{name}: {blocker}")
    raise AssertionError("torch_sdpa runs everywhere")


def attention_context(model_config, device: torch.device, dtype: torch.dtype, weights_dtype: torch.dtype,
                      cpu_kernels: str = "auto", autocast: str = "none", compiling: bool = False,
                      columns: Optional[int] = None) -> AttentionContext:
    """The context of a model config (its text config's heads and head_dim, its sliding windows that a sequence of
    `columns` tokens reaches (None: any length), its attention soft-capping)."""
    config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    windows = LayerWindows.of(config)
    if columns is not None:
        windows = windows.binding(columns)
    return AttentionContext(device, dtype, weights_dtype, head_dim, heads, kv_heads, cpu_kernels, autocast, compiling,
                            windows.smallest, attention_softcap(config))

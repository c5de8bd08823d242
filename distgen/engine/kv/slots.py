"""A static slot cache: fixed-shape per-layer buffers plus a cached length per slot.

Each layer holds keys/values shaped (slots, kv_heads, columns + 1, head_dim). A request owns
one slot; its token at position p lives in column p % columns, and `col_pos` (slots, columns)
records which position each column holds (-1: none). The attention mask is "the column holds
a position <= mine" (and, in a layer with a sliding window, "> mine - window": engine/windows.py).

Sliding windows, per layer: every layer keeps every column (column = position) and a local layer applies its
window in attention (a mask, or FlashAttention's window_size_left: attention.py), so global and local layers
share one layout, one set of write columns and one memory figure per column; what a ring would save on the
local layers (the columns before the window) is spent for this simplicity. Each SlotLayer carries its layer's
window where a sequence of the job reaches it (`window`) and the config's (`config_window`, checked against what
the model's attention passes). The `sliding_window` kind is the exception, for models whose every layer attends
over one window: its columns form a ring of window + chunk - 1, so only the window is cached (the mask-and-read
path below). A request that takes
a slot clears its `col_pos` row, so it never attends to the previous tenant's columns. The
last column is scratch: padding tokens write there and no mask ever reads it. Nothing is
reshaped or copied between steps, so a compiled decode step keeps one shape for the job.

A prefill packs its prompts (or chunks) into ONE row with no padding: each token writes to its own
slot's column. Attention is varlen (varlen.py: each packed chunk attends to its own slot's columns,
the decode tokens to theirs, through the custom op distgen::slot_attention); the int8 layers and the
sliding-window ring instead read the (slot, column) pairs of every packed sequence with a mask that
lets a token see only its own sequence's earlier positions (the token budget keeps that square small); a model
whose layers differ in window gets a mask per layer type there (transformers' `causal_mask_mapping`).
Eager decode reads only the slots and columns in use; when a row finishes, the highest slot in
use moves into the freed one, so the rows a decode reads have no idle holes. Attention implementations that
address rows by slot id (attention.py: cuda_varlen) need no such move: a decode step reads the decoding rows'
slots, padded to a bucket of rows with padding rows that read nothing and write a scratch column
(`addressed_decode`), its inputs gathered on the device from the slots' lengths and last tokens. The state
tensors hold one more entry than there are slots: the padding rows' (`self.slots`), which nothing reads.
"""
from __future__ import annotations

import bisect
import itertools
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Collection, Iterator, Optional, Union

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from distgen.common.errors import ConfigError
from distgen.engine.host import read, upload, upload_all, upload_lists
from distgen.engine.kv.base import ForwardBatch, KVCache, additive_mask, kv_geometry, model_dtype, round_up
from distgen.engine.kv.kinds import CacheKind, CacheSpec, QueueShape, register
from distgen.engine.kv.attention import ATTENTIONS, SlotAttention
from distgen.engine.kv.varlen import AttentionPlan, Segment
from distgen.engine.request import Request
from distgen.engine.scheduler import StepPlan
from distgen.engine.windows import LayerWindows

if TYPE_CHECKING:
    from distgen.config import GenerationConfig

# Eager decode reads only the columns in use, rounded up to this many (few distinct shapes).
WIDTH_BUCKET = 64


def row_buckets(max_rows: int) -> list[int]:
    """The row counts an addressed decode is padded to (vLLM's CUDA-graph capture sizes): 1, 2, 4, then every
    multiple of 8 up to 256, then of 16, up to the first one that holds `max_rows`."""
    sizes = []
    for size in itertools.chain((1, 2, 4), range(8, 257, 8), itertools.count(272, 16)):
        sizes.append(size)
        if size >= max_rows:
            return sizes
    raise AssertionError("unreachable")


def bucket_of(rows: int, sizes: list[int]) -> int:
    """The smallest bucket that holds `rows`."""
    return sizes[bisect.bisect_left(sizes, rows)]


class SlotLayer(CacheLayerMixin):
    """One decoder layer's buffers; `update` writes each row's tokens at that row's own columns."""
    is_compileable = True
    is_sliding = False
    window: Optional[int] = None         # the sliding window attention applies here (None: global, or not reached)
    config_window: Optional[int] = None  # the layer's window in the model config (engine/windows.py)

    def __init__(self, owner: "SlotCache"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        slots, cols = self.owner.slots, self.owner.max_len + 1
        if self.owner.token_major:  # stored (slots, cols, kv_heads, head_dim); kept as the transposed view
            self.keys = key_states.new_zeros((slots, cols, key_states.shape[1], key_states.shape[3])).transpose(1, 2)
            self.values = value_states.new_zeros((slots, cols, value_states.shape[1],
                                                  value_states.shape[3])).transpose(1, 2)
        else:
            self.keys = key_states.new_zeros((slots, key_states.shape[1], cols, key_states.shape[3]))
            self.values = value_states.new_zeros((slots, value_states.shape[1], cols, value_states.shape[3]))
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states: (rows, heads, q, head_dim) -> the rows' whole buffers (rows, heads, width, head_dim)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.write(self.keys, key_states)
        self.write(self.values, value_states)
        return self.read(self.keys), self.read(self.values)

    def write(self, buffer: torch.Tensor, states: torch.Tensor) -> None:
        # (rows, 1) x (rows, q) index -> (rows, q, heads, head_dim) targets
        buffer[self.owner.write_rows, :, self.owner.write_cols] = states.transpose(1, 2)

    def read(self, buffer: torch.Tensor) -> torch.Tensor:
        rows, width, cols = self.owner.read_rows, self.owner.width, self.owner.read_cols
        if cols is not None:  # packed: (keys,) slots x (keys,) columns -> (1, heads, keys, head_dim)
            return buffer[rows, :, cols].transpose(0, 1).unsqueeze(0)
        return buffer[:rows, :, :width] if isinstance(rows, int) else buffer[rows, :, :width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.width, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return self.owner.max_len


class Int8SlotLayer(SlotLayer):
    """Keys/values stored as int8 with one absmax scale per (slot, head, column): about 1/4 of fp32.

    Attention reads a dequantized copy of the columns in use, one layer at a time.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys, self.values = self.keys.to(torch.int8), self.values.to(torch.int8)
        scale_shape = (*self.keys.shape[:3], 1)  # (slots, heads, cols, 1)
        self.key_scales = key_states.new_zeros(scale_shape)
        self.value_scales = value_states.new_zeros(scale_shape)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        out = []
        for codes, scales, states in ((self.keys, self.key_scales, key_states),
                                      (self.values, self.value_scales, value_states)):
            scale = states.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127
            self.write(codes, torch.round(states / scale).clamp(-127, 127).to(torch.int8))
            self.write(scales, scale)
            out.append(self.read(codes).to(states.dtype) * self.read(scales))
        return out[0], out[1]


class SlotCache(Cache):
    """The transformers Cache the model writes into; the engine points it at this step's rows."""

    def __init__(self, layers: int, slots: int, max_len: int, layer_class: type = SlotLayer, token_major: bool = False,
                 windows: Optional[LayerWindows] = None, binding: Optional[LayerWindows] = None):
        """windows: each layer's window in the config; binding: those a sequence reaches (default: none)."""
        self.slots, self.max_len, self.token_major = slots, max_len, token_major
        super().__init__(layers=[layer_class(self) for _ in range(layers)])
        for layer, declared, window in zip(self.layers, (windows or LayerWindows.none(layers)).windows,
                                           (binding or LayerWindows.none(layers)).windows, strict=True):
            layer.config_window, layer.window = declared, window
        # Set before each forward:
        self.write_rows: torch.Tensor = torch.zeros((0, 1), dtype=torch.long)  # (rows, 1) slot of each input row
        self.write_cols: torch.Tensor = torch.zeros((0, 0), dtype=torch.long)  # (rows, q) column of each token
        self.read_rows: Union[int, torch.Tensor] = 0  # the first n slots, or these slots
        self.width = 0                                # columns attention reads
        self.read_cols: Optional[torch.Tensor] = None  # packed prefill: the column of each read_rows slot


class SlotKV(KVCache):
    fixed_shape = True
    supports_chunks = True
    verifies_drafts = True
    packs_prefill = True

    def __init__(self, layers: int, slots: int, max_len: int, pad_id: int, device: torch.device,
                 dtype: torch.dtype, full_width: bool, window: Optional[int] = None, layer_class: type = SlotLayer,
                 compacts: bool = True, varlen: bool = True, attention: Optional[SlotAttention] = None,
                 windows: Optional[LayerWindows] = None):
        """max_len: columns per slot (the longest prompt + budget, or the ring size with a window).
        window: the ring's (every layer attends over it; only it and one chunk are cached), or None.
        compacts: move rows down into freed slots (only without full_width; off when a draft model's
        cache shares these slot numbers). varlen: attend through distgen::slot_attention (varlen.py).
        attention: with varlen, the implementation that writes and attends (attention.py; default torch_sdpa).
        windows: each layer's sliding window from the model config (engine/windows.py; default: none)."""
        self.slots, self.max_len, self.pad_id, self.device, self.dtype = slots, max_len, pad_id, device, dtype
        # full_width: decode every slot over every column (one shape: what compile needs).
        self.full_width, self.window = full_width, window
        declared = windows or LayerWindows.none(layers)
        # The windows attention applies: a ring's in every layer; else each layer's where a position reaches it.
        self.windows = LayerWindows((window,) * layers, declared.types) if window is not None \
            else declared.binding(max_len)
        # Prefill and decode forwards attend through distgen::slot_attention (varlen.py): per sequence,
        # over its own slot. The int8 layers and the sliding-window ring keep the mask-and-read path.
        self.varlen = varlen and layer_class is SlotLayer and window is None
        self.attention = attention if attention is not None and self.varlen else ATTENTIONS.get("torch_sdpa")
        # Rows addressed by slot id (varlen metadata): a decode reads the decoding rows' own slots, nothing moves.
        self.addressed = self.attention.addressed
        self.cache = SlotCache(layers, slots, max_len, layer_class, token_major=self.attention.token_major,
                               windows=declared, binding=self.windows)
        self.free = list(range(slots))
        long = dict(dtype=torch.long, device=device)
        # One entry more than slots: the padding rows' of an addressed decode (nothing reads it).
        self.lengths = torch.zeros(slots + 1, **long)       # cached tokens per slot
        self.last_tokens = torch.zeros(slots + 1, **long)   # each slot's next decode input
        self.decoding = torch.zeros(slots + 1, dtype=torch.bool, device=device)
        self.all_rows = torch.arange(slots, **long).unsqueeze(-1)  # (slots, 1)
        self.col_pos = torch.full((slots, max_len + 1), -1, **long)  # position each column holds
        self.owners: dict[int, Request] = {}  # slot -> the request holding it
        # full_width decode reads every slot anyway; addressed rows never move
        self.compacts = compacts and not full_width and not self.addressed
        self.mixes = self.varlen  # the attention plan takes decode tokens and segments in one packed row
        # Addressed decode: rows 0..B-1 of a bucket (cu_q) and their logits rows, for every bucket's rows.
        self.buckets = row_buckets(slots)
        self.row_index = torch.arange(self.buckets[-1] + 1, **long)
        self.cu_rows = self.row_index.to(torch.int32)

    @property
    def decode_kernel(self) -> bool:
        """Decode tokens read each slot's length (distgen's CPU kernels) instead of a mask."""
        return self.attention.decode_reads == "lengths"

    @property
    def columns(self) -> int:
        """Columns a slot's buffers hold: max_len and the scratch column."""
        return self.max_len + 1

    @property
    def free_rows(self) -> int:
        return len(self.free)

    @property
    def copies_prefix(self) -> bool:
        """Whether a slot's first columns can be copied into another (`copy_prefix`): not in a sliding-window
        ring, whose columns do not hold positions 0.. once it wraps."""
        return self.window is None

    def buffers(self) -> Iterator[torch.Tensor]:
        """Every slot-indexed buffer of every layer that holds some (keys, values, and an int8 cache's scales)."""
        for layer in self.cache.layers:
            if layer.is_initialized:
                for name in ("keys", "values", "key_scales", "value_scales"):
                    buffer = getattr(layer, name, None)
                    if buffer is not None:
                        yield buffer

    def admit(self, request: Request, slot: Optional[int] = None, avoid: Collection[int] = ()) -> None:
        """A free slot for the request: `slot` (a freed slot it reuses in place, engine.prefix), else the lowest
        free one not in `avoid` (the lowest of all when every free one is), so eager decode reads a prefix."""
        self.free.sort()
        if slot is None:
            slot = next((s for s in self.free if s not in avoid), self.free[0])
        self.free.remove(slot)
        request.row = slot
        self.col_pos[request.row] = -1
        self.owners[request.row] = request

    def copy_prefix(self, src: int, dsts: list[int], columns: int) -> None:
        """Slots `dsts` (just admitted) take slot `src`'s columns 0..columns-1, positions 0..columns-1: every
        layer's keys and values (and int8 scales), what a prefill of those tokens writes; a slot in `dsts` that is
        `src` itself (a freed slot reused in place) keeps its columns. On the device, before the step's forward
        (which reads them: the owned CPU stack and the attention read `col_pos` and the slots' lengths)."""
        targets = [dst for dst in dsts if dst != src]
        rows = upload(torch.tensor(dsts, dtype=torch.long), self.device)
        if targets:
            index = upload(torch.tensor(targets, dtype=torch.long), self.device)
            for buffer in self.buffers():  # (targets, heads, columns, head_dim) <- (heads, columns, head_dim)
                buffer[index, :, :columns] = buffer[src, :, :columns]
        self.col_pos[rows, :columns] = torch.arange(columns, dtype=torch.long, device=self.device)
        self.lengths[rows] = columns

    def place(self, rows: torch.Tensor, positions: torch.Tensor, real: torch.Tensor, read: Union[int, torch.Tensor],
              width: int, masked: bool = True, windowed: bool = True) -> Union[None, torch.Tensor, dict]:
        """Point the cache at this forward's columns; return the additive mask (rows, 1, q, width) (a model
        `attention_mask`: a mask per layer type where local layers differ, unless not `windowed`: the causal mask
        alone, which slot attention narrows per layer), or None when not `masked` (the decode-attention kernel reads
        each slot's length instead).

        rows: (rows, 1) slots; positions, real: (rows, q) each token's position and whether it is a real token.
        """
        cols = torch.where(real, positions % self.max_len, self.max_len)  # padding writes to scratch
        self.col_pos[rows, cols] = positions
        self.point(rows, cols, read, width)
        if not masked:
            return None
        held, pos = self.col_pos[rows.squeeze(-1), :width].unsqueeze(1), positions.unsqueeze(-1)  # (rows, 1, width)
        allowed = (held >= 0) & (held <= pos)
        if not windowed:
            return additive_mask(allowed, self.dtype).unsqueeze(1)
        return self.layer_masks(allowed, held, pos, lambda mask: mask.unsqueeze(1))

    def layer_masks(self, allowed: torch.Tensor, held: torch.Tensor, pos: torch.Tensor,
                    shape: Callable[[torch.Tensor], torch.Tensor]) -> Union[torch.Tensor, dict[str, torch.Tensor]]:
        """The additive `attention_mask` of a mask-and-read forward: `allowed` (causal: key position `held` <= query
        position `pos`), narrowed in each local layer to (pos - window, pos], shaped by `shape`; one mask where every
        layer attends alike, else one per layer type (engine/windows.py LayerWindows.masks)."""
        by_window = {window: shape(additive_mask(allowed if window is None else allowed & (held > pos - window),
                                                 self.dtype)) for window in set(self.windows.windows)}
        return self.windows.masks(by_window)

    def prefill_inputs(self, plan: StepPlan) -> ForwardBatch:
        """Every request's next chunk packed into one row: token t of request i writes position
        prefilled_i + t of slot i; attention reads, per request, the columns its chunk may see."""
        long = dict(dtype=torch.long)
        starts = [r.prefilled for r in plan.requests]
        ends = [start + chunk for start, chunk in zip(starts, plan.chunks)]
        ids = torch.tensor([t for r, start, end in zip(plan.requests, starts, ends) for t in r.token_ids[start:end]],
                           **long)
        q_pos = torch.cat([torch.arange(start, end, **long) for start, end in zip(starts, ends)])
        queries = torch.tensor(plan.chunks, **long)
        slots = torch.tensor([r.row for r in plan.requests], **long)
        q_slot = slots.repeat_interleave(queries)
        last = queries.cumsum(0) - 1  # each sequence's last token in the packed row
        firsts = list(itertools.accumulate(plan.chunks, initial=0))  # each chunk's first index in the row
        # varlen metadata (addressed): sequence b is queries firsts[b].., keys its slot's columns 0..ends[b]
        meta = torch.tensor([firsts, [r.row * self.columns for r in plan.requests] + [self.slots * self.columns],
                             ends + [0]], **long) if self.addressed else torch.zeros((3, 0), **long)
        ids, q_pos, q_slot, last, meta = upload_all([ids, q_pos, q_slot, last, meta], self.device)  # one copy
        q_col = q_pos % self.max_len
        self.col_pos[q_slot, q_col] = q_pos
        inputs = dict(input_ids=ids.unsqueeze(0), position_ids=q_pos.unsqueeze(0), logits_to_keep=last)
        if self.varlen:  # each chunk attends to its own slot's columns 0..its end
            segments = [Segment(q0, q0 + chunk, r.row, start)
                        for r, start, chunk, q0 in zip(plan.requests, starts, plan.chunks, firsts)]
            attention = AttentionPlan(self.cache.layers, q_slot, q_col, segments=segments, impl=self.attention,
                                      cpu_kernels=self.attention.owns_stack)
            if self.addressed:
                meta = meta.to(torch.int32)
                attention.cu_q, attention.cu_k, attention.seqused_k = meta[0], meta[1], meta[2, :-1]
                attention.max_q, attention.max_k = max(plan.chunks), self.columns
            inputs.update(use_cache=False, attention_plan=attention)
        else:  # the keys each chunk may see, gathered into one row: its sequence from 0 (a ring: the window)
            firsts = [0 if self.window is None else max(0, start - self.window + 1) for start in starts]
            k_pos = torch.cat([torch.arange(first, end, **long) for first, end in zip(firsts, ends)])
            keys = torch.tensor([end - first for first, end in zip(firsts, ends)], **long)
            seqs = torch.arange(len(plan.requests))
            q_seq, k_seq, k_slot = seqs.repeat_interleave(queries), seqs.repeat_interleave(keys), \
                slots.repeat_interleave(keys)
            q_seq, k_seq, k_slot, k_pos = (t.to(self.device) for t in (q_seq, k_seq, k_slot, k_pos))
            allowed = (q_seq.unsqueeze(1) == k_seq) & (k_pos <= q_pos.unsqueeze(1))  # (queries, keys)
            self.point(q_slot.unsqueeze(0), q_col.unsqueeze(0), k_slot, len(k_pos), read_cols=k_pos % self.max_len)
            mask = self.layer_masks(allowed, k_pos, q_pos.unsqueeze(1), lambda mask: mask[None, None])
            inputs.update(attention_mask=mask, cache=self.cache)
        return ForwardBatch(inputs, list(range(len(plan.requests))))

    def chunk_inputs(self, slots: list[int], chunks: list[list[int]], starts: list[int], keep: int) -> dict:
        """Model inputs that write `chunks[i]` at positions `starts[i]`.. of slot `slots[i]`, left-padded;
        the logits of the last `keep` columns come back (a prefill keeps 1, an assisted verify k + 1)."""
        n, width = len(slots), max(len(chunk) for chunk in chunks)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        positions = torch.zeros((n, width), dtype=torch.long)
        real = torch.zeros((n, width), dtype=torch.bool)
        for i, (chunk, start) in enumerate(zip(chunks, starts)):
            input_ids[i, width - len(chunk):] = torch.tensor(chunk, dtype=torch.long)
            positions[i, width - len(chunk):] = torch.arange(start, start + len(chunk))
            real[i, width - len(chunk):] = True
        read = max(start + len(chunk) for chunk, start in zip(chunks, starts))
        rows = torch.tensor(slots, dtype=torch.long).unsqueeze(-1)
        input_ids, positions, real, rows = (t.to(self.device) for t in (input_ids, positions, real, rows))
        mask = self.place(rows, positions, real, rows.squeeze(-1), min(self.max_len, round_up(read, WIDTH_BUCKET)))
        return dict(input_ids=input_ids, position_ids=positions, attention_mask=mask, cache=self.cache,
                    logits_to_keep=keep)

    def decode_inputs(self, requests: list[Request]) -> ForwardBatch:
        """Every slot up to the highest in use (all slots when full_width) reads one token; addressed: the
        requests' own slots, in their order."""
        if self.addressed:
            slots = upload(torch.tensor([r.row for r in requests], dtype=torch.long), self.device)
            inputs = self.addressed_decode(slots, torch.ones_like(slots, dtype=torch.bool))
            return ForwardBatch(inputs, list(range(len(requests))), decode_rows=slots)
        longest = max(r.prompt_length + len(r.generated) for r in requests)
        width = min(self.max_len, round_up(longest, WIDTH_BUCKET))
        count = self.slots if self.full_width else max(r.row for r in requests) + 1
        if self.full_width and not self.varlen:
            width = self.max_len  # the model reads the keys: one shape for the compiled step
        decoding = self.decoding[:count].unsqueeze(-1)  # (count, 1); idle slots write to scratch
        positions = torch.where(decoding, self.lengths[:count].unsqueeze(-1), 0)
        mask = self.place(self.all_rows[:count], positions, decoding, count, width, masked=not self.decode_kernel,
                          windowed=not self.varlen)
        if self.varlen:  # one packed row, a token per slot; the op reads the first `width` columns
            attention = AttentionPlan(self.cache.layers, self.all_rows[:count, 0], self.cache.write_cols[:, 0],
                                      decode=count, width=width, decode_mask=mask, impl=self.attention,
                                      cpu_kernels=self.attention.owns_stack)
            if self.decode_kernel:  # each slot reads its own columns: through the new token's, none when idle
                attention.decode_lengths = torch.where(decoding[:, 0], positions[:, 0] + 1, 0)
            if self.windows.local:  # local layers read only their window of the columns
                attention.decode_positions = positions[:, 0]
            inputs = dict(input_ids=self.last_tokens[:count].unsqueeze(0), position_ids=positions.view(1, -1),
                          logits_to_keep=self.all_rows[:count, 0], use_cache=False, attention_plan=attention)
            return ForwardBatch(inputs, [r.row for r in requests])
        inputs = dict(input_ids=self.last_tokens[:count].unsqueeze(-1), position_ids=positions, attention_mask=mask,
                      cache=self.cache, logits_to_keep=1)
        return ForwardBatch(inputs, [r.row for r in requests])

    def addressed_decode(self, slots: torch.Tensor, active: torch.Tensor) -> dict:
        """The inputs of a decode forward whose row i is slot slots[i] (B rows), built on the device from the
        slots' lengths and last tokens (no host value, so a CUDA graph replays it): rows where `active` is False
        are padding: slot index `self.slots` (state nobody reads), no column read, their key/value written to
        the scratch column of the last slot."""
        count, columns = len(slots), self.columns
        kv_slot = slots.clamp(max=self.slots - 1)
        pos = self.lengths[slots]
        cols = torch.where(active, pos, self.max_len)  # padding writes the scratch column
        attention = AttentionPlan(self.cache.layers, kv_slot, cols, decode=count, width=columns, impl=self.attention,
                                  cu_q=self.cu_rows[:count + 1],
                                  cu_k=torch.cat([kv_slot * columns, kv_slot.new_full((1,), self.slots * columns)])
                                  .to(torch.int32),
                                  seqused_k=torch.where(active, pos + 1, 0).to(torch.int32), max_q=1, max_k=columns,
                                  rows=kv_slot)
        ids = torch.where(active, self.last_tokens[slots], self.pad_id or 0)
        return dict(input_ids=ids.unsqueeze(0), position_ids=torch.where(active, pos, 0).unsqueeze(0),
                    logits_to_keep=self.row_index[:count], use_cache=False, attention_plan=attention)

    def advance(self, slots: torch.Tensor, active: torch.Tensor, tokens: torch.Tensor) -> None:
        """After an addressed decode: each active row's slot takes its token and grows by one column
        (padding rows write the spare state entry); no host value, so a CUDA graph replays it."""
        self.last_tokens[slots] = tokens
        self.lengths[slots] += active

    def mixed_inputs(self, plan: StepPlan) -> ForwardBatch:
        """The decode part's packed row (a token per slot up to the highest decoding one; slots that are
        not decoding, those prefilling in this step among them, write to scratch), then the prefill part's
        chunks, as one packed row: the attention plan's decode tokens, then its segments."""
        decode = self.decode_inputs(plan.part("decode").requests)
        prefill = self.prefill_inputs(plan.part("prefill"))
        first, second = decode.inputs, prefill.inputs
        count = first["input_ids"].shape[1]
        attention, chunks = first["attention_plan"], second["attention_plan"]
        attention.write_slots = torch.cat([attention.write_slots, chunks.write_slots])
        attention.write_cols = torch.cat([attention.write_cols, chunks.write_cols])
        attention.segments = [replace(seg, q0=seg.q0 + count, q1=seg.q1 + count) for seg in chunks.segments]
        if self.addressed:  # the decode rows' sequences, then the chunks' (their queries after the decode rows')
            attention.cu_q = torch.cat([attention.cu_q[:count], chunks.cu_q + count])
            attention.cu_k = torch.cat([attention.cu_k[:count], chunks.cu_k])
            attention.seqused_k = torch.cat([attention.seqused_k, chunks.seqused_k])
            attention.max_q = max(attention.max_q, chunks.max_q)
        inputs = dict(first, input_ids=torch.cat([first["input_ids"], second["input_ids"]], dim=1),
                      position_ids=torch.cat([first["position_ids"], second["position_ids"]], dim=1),
                      logits_to_keep=torch.cat([first["logits_to_keep"], second["logits_to_keep"] + count]))
        return ForwardBatch(inputs, decode.rows + [count + row for row in prefill.rows], decode_slots=count,
                            decode_rows=decode.decode_rows)

    def point(self, rows: torch.Tensor, cols: torch.Tensor, read: Union[int, torch.Tensor], width: int,
              read_cols: Optional[torch.Tensor] = None) -> None:
        """This forward writes rows (rows, 1) x cols (rows, q); attention reads `read` slots x `width` columns.

        `read` is a count (the first slots: a view) or the slots themselves (a gather); with `read_cols`
        (a packed prefill) attention reads the pairs (read[k], read_cols[k]) as one row of `width` keys.
        """
        cache = self.cache
        cache.write_rows, cache.write_cols, cache.read_rows, cache.width = rows, cols, read, width
        cache.read_cols = read_cols

    def commit(self, plan: StepPlan, batch: ForwardBatch, tokens: torch.Tensor, finished: list[bool]) -> None:
        """The state moved on at `advance_state`: only finished rows are freed."""
        self.release([r.row for r, done in zip(plan.requests, finished) if done])

    def advance_state(self, plan: StepPlan, batch: ForwardBatch, tokens: torch.Tensor) -> None:
        """The device state after a forward (next inputs, lengths), whatever the tokens are."""
        if plan.kind == "decode":
            self.commit_decode(tokens, batch)
        elif plan.kind == "prefill":
            self.commit_prefill(plan, tokens)
        else:  # mixed: the decode part first (it reads which slots were decoding before this step)
            self.commit_decode(tokens[:batch.decode_slots], batch)
            self.commit_prefill(plan.part("prefill"), tokens[batch.decode_slots:])

    def commit_decode(self, tokens: torch.Tensor, batch: Optional[ForwardBatch] = None) -> None:
        """tokens: one per slot 0..len(tokens)-1; the decoding ones take theirs and grow by one column
        (addressed: one per row of batch.decode_rows)."""
        if batch is not None and batch.decode_rows is not None:
            self.advance(batch.decode_rows, torch.ones_like(batch.decode_rows, dtype=torch.bool), tokens)
            return
        count = len(tokens)
        self.last_tokens[:count] = tokens
        self.lengths[:count] += self.decoding[:count]

    def commit_prefill(self, plan: StepPlan, tokens: torch.Tensor) -> None:
        """tokens: one per planned request; a request whose whole prompt is now cached starts decoding."""
        rows, ends, done = upload_lists([
            [r.row for r in plan.requests], [r.prefilled + c for r, c in zip(plan.requests, plan.chunks)],
            [r.prefilled + c == r.prompt_length for r, c in zip(plan.requests, plan.chunks)]], torch.long, self.device)
        self.last_tokens[rows] = tokens
        self.lengths[rows] = ends
        self.decoding[rows] = done.bool()

    def release(self, slots: list[int]) -> None:
        """Free finished requests' slots (then move the highest rows down into them, when compacting)."""
        if slots:
            self.decoding[slots] = False
            self.free.extend(slots)
            for slot in slots:
                self.owners.pop(slot, None)
            if self.compacts:
                self.compact()

    def compact(self) -> None:
        """While a free slot lies below the highest slot in use, move that row down into it."""
        self.free.sort()
        while self.free and self.owners and self.free[0] < max(self.owners):
            low, high = self.free.pop(0), max(self.owners)
            self.move(high, low)
            self.free.append(high)
            self.free.sort()

    def move(self, src: int, dst: int) -> None:
        """Row `src` (its columns, length, next input and request) becomes row `dst`; `src` is free."""
        held = self.col_pos[src]
        used = self.max_len if self.window is not None else max(1, read(held.max()) + 1)  # columns in use
        for buffer in self.buffers():
            buffer[dst, :, :used] = buffer[src, :, :used]
        for state in (self.col_pos, self.lengths, self.last_tokens, self.decoding):
            state[dst] = state[src]
        self.col_pos[src], self.decoding[src] = -1, False
        request = self.owners.pop(src)
        request.row, self.owners[dst] = dst, request

    def verify_inputs(self, requests: list[Request], chunks: list[list[int]], keep: int) -> dict:
        starts = [r.prompt_length + len(r.generated) - 1 for r in requests]  # the last token is not cached yet
        return self.chunk_inputs([r.row for r in requests], chunks, starts, keep)

    def verified(self, requests: list[Request], chunks: list[list[int]], kept: list[int],
                 finished: list[bool]) -> None:
        """Rewinding is setting lengths back: columns past a length hold rejected draft tokens, whose
        positions are above every later query until a forward writes those positions again, so the
        mask never lets a query read them."""
        going = [r for r, done in zip(requests, finished) if not done]
        if going:
            slots, lengths, tokens = upload_lists([
                [r.row for r in going], [r.prompt_length + len(r.generated) - 1 for r in going],
                [r.generated[-1] for r in going]], torch.long, self.device)
            self.lengths[slots] = lengths
            self.last_tokens[slots] = tokens
        self.release([r.row for r, done in zip(requests, finished) if done])

    def close(self) -> None:
        for layer in self.cache.layers:
            layer.keys = layer.values = layer.key_scales = layer.value_scales = None
            layer.is_initialized = False
        self.col_pos = self.col_pos.new_empty((0, 0))


def ring_columns(window: int, shape: QueueShape, gen: "GenerationConfig", verify_tokens: int = 1) -> int:
    """The columns of a `sliding_window` ring: the window and one chunk less a column (a prefill chunk of q tokens
    must not overwrite what its first token still needs), at most what the longest sequence needs."""
    longest_chunk = shape.longest_prompt
    if gen.scheduler == "chunked":
        longest_chunk = min(longest_chunk, gen.prefill_chunk_tokens)
    longest_chunk = max(longest_chunk, verify_tokens)
    return min(shape.columns, window + longest_chunk - 1)


def ring_blocker(windows: LayerWindows) -> Optional[str]:
    """Why a model cannot use the `sliding_window` ring (every layer must attend over one window), or None."""
    if windows.uniform is not None:
        return None
    if not windows.local:
        return "its config has no sliding_window"
    globals_ = [str(i) for i, window in enumerate(windows.windows) if window is None]
    return f"layers {', '.join(globals_)} attend globally (the static cache applies each layer's window)"


def build_slots(spec: CacheSpec, layer_class: type = SlotLayer, sliding: bool = False) -> SlotKV:
    layers = kv_geometry(spec.model)[0]
    windows = LayerWindows.of(spec.model.config)
    columns, window = spec.shape.columns, None
    if sliding:
        blocker = ring_blocker(windows)
        if blocker:
            raise ConfigError(f"generation.cache=sliding_window is not possible: {blocker}; use generation.cache="
                              "static or auto")
        window = windows.uniform
        columns = ring_columns(window, spec.shape, spec.gen, spec.verify_tokens)
    return SlotKV(layers, spec.rows, columns, spec.pad_id, spec.device, model_dtype(spec.model),
                  full_width=spec.compiling, window=window, layer_class=layer_class,
                  compacts=spec.verify_tokens == 1,  # assisted: the draft's cache uses the same slots
                  # CUDA graphs would replay the op's per-step plan tensors stale: compiled CUDA keeps the mask path
                  varlen=not (spec.compiling and spec.device.type == "cuda"), attention=spec.attention,
                  windows=windows)


class StaticSlots:
    """Fixed-shape slot buffers (slots x heads x columns x head_dim) plus a length per slot: a finished row
    frees its slot, a queued prompt is prefilled into it; what compile and chunked prefill need."""


class SlidingWindowSlots:
    """The slot cache as a ring holding only the sliding window (models whose every layer attends over one)."""


register(CacheKind("static", build_slots, slots=lambda gen: True), StaticSlots)
register(CacheKind("sliding_window", lambda spec: build_slots(spec, sliding=True), slots=lambda gen: True),
         SlidingWindowSlots)

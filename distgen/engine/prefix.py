"""A shared prefix prefilled once: a prompt admitted while a slot holds the KV of its first tokens copies those
columns into its own slot and prefills only the rest (generation.prefix_sharing; the samples of one prompt,
generation.n, share its whole prompt but the last token the same way).

vLLM's automatic prefix caching keys KV blocks by hashes of their token ids; distgen's cache holds one slot per
sequence, so this index keys the requests that hold a slot instead: each by its prompt's index (its samples) and
by the chained hashes of its prompt's BLOCK-token blocks (other prompts). A holder is a running request (its slot
holds its prompt's first `prefilled` tokens), or a finished one whose freed slot nobody took yet (its prompt's
columns are intact until a new tenant's forward writes there): such a slot is reused in place by one request
that shares its prefix (nothing copied), while a running holder's columns are copied into any number of new
slots (`SlotKV.copy_prefix`, on the device, before the step's forward). Copies read only running slots and write
only newly admitted ones, so no copy reads what another copy of the same step wrote.

Before each schedule `admissible` gives the front waiting requests their share (`Request.share`: which slot, how
many tokens, and so `prefilled` starts there) and says how many may be admitted now: a request waits (with those
behind it) while a request ahead of it, admitted in this same step or still prefilling its chunks, would hold
more of its prompt than any slot holds now: a prompt's samples wait for their first to be prefilled, and
prompts of one system prompt for the first of them. A request always prefills at least its last prompt token,
whose logits draw its first token (so each sample draws its own).

The copied columns are the same KV a prefill of those tokens writes (positions 0..L-1, the same rotary), so the
tokens are the same as without sharing (fp32 greedy equals `generate`).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Hashable, Iterable, Optional, Sequence

from distgen.common.checks import require
from distgen.common.registry import Registry
from distgen.engine.kv.kinds import CACHES
from distgen.engine.request import PrefixShare, Request, Status

# Tokens per hashed block of a prompt (a shared prefix is found block by block, then token by token).
BLOCK = 16
# generation.prefix_sharing=auto|on: other prompts share a prefix of at least this many tokens (a system prompt,
# few-shot examples); a shorter one (a chat template's header) is not worth a copy.
MIN_SHARED_TOKENS = 64


@dataclass(frozen=True)
class Sharing:
    """A generation.prefix_sharing policy."""
    # Another prompt's prefix is shared from this many tokens on; None: only a prompt's own samples share.
    min_tokens: Optional[int]
    # Where the cache cannot copy: a config error (else the engine line says why it does not share).
    required: bool = False


def check_on(cfg) -> None:
    """generation.prefix_sharing=on: the cache named (when one is) can copy a prefix, and no assistant drafts."""
    gen = cfg.generation
    blocker = (f"generation.cache={gen.cache} is not a slot cache" if gen.cache != "auto"
               and not CACHES.get(gen.cache).slots(gen) else "generation.cache=sliding_window keeps a ring"
               if gen.cache == "sliding_window" else f"model.assistant={cfg.model.assistant} drafts from a cache "
               "of its own" if cfg.model.assistant != "none" else None)
    require(blocker is None, "generation.prefix_sharing", gen.prefix_sharing,
            f"{blocker}; a prefix is copied between the slots of a slot cache (generation.cache=auto, static or "
            "quantized with int8), without model.assistant; use generation.prefix_sharing=auto or off")


PREFIX_SHARING: Registry[Sharing] = Registry("generation.prefix_sharing", valued=True)
PREFIX_SHARING.register("auto", None, Sharing(MIN_SHARED_TOKENS),
                        doc=f"prompts sharing >= {MIN_SHARED_TOKENS} tokens with a slot copy its KV, where the cache "
                            "can (a slot cache without a sliding window, no model.assistant)")
PREFIX_SHARING.register("on", None, Sharing(MIN_SHARED_TOKENS, required=True),
                        doc="as auto, and a config error where the cache cannot copy", check=check_on)
PREFIX_SHARING.register("off", None, Sharing(None),
                        doc="each prompt prefills its own tokens (a prompt's samples, generation.n, still share it)")


def sharing_blocker(kv, assisted: bool) -> Optional[str]:
    """Why this cache cannot share prefixes between its slots, or None."""
    if getattr(kv, "window", None) is not None:
        return "the sliding-window ring's columns stop holding a prompt's first tokens once it wraps"
    if not getattr(kv, "copies_prefix", False):
        return f"the {type(kv).__name__} cache does not copy KV between rows"
    if assisted:
        return "model.assistant's draft keeps a cache of its own"
    return None


def block_keys(ids: Sequence[int], seed: Hashable = None) -> list[int]:
    """The chained hash of each full BLOCK-token block of `ids`: key k stands for tokens 0..(k+1)*BLOCK-1 (of a
    prompt run with the weights `seed` names: its LoRA adapter, None for the base model)."""
    keys, key = [], hash(seed)
    for end in range(BLOCK, len(ids) + 1, BLOCK):
        key = hash((key, tuple(ids[end - BLOCK:end])))
        keys.append(key)
    return keys


def sibling_key(request: Request) -> Hashable:
    """What the samples of one prompt share: the prompt (its index in the dataset)."""
    return ("prompt", request.prompt.index)


def common_length(a: Sequence[int], b: Sequence[int], start: int, stop: int) -> int:
    """The first position in start..stop where `a` and `b` differ (stop when none does)."""
    while start < stop and a[start] == b[start]:
        start += 1
    return start


@dataclass
class Candidate:
    """The best holder found so far: its slot, the prompt tokens it holds for the request, whether in place."""
    slot: int = -1
    tokens: int = 0
    in_place: bool = False

    def offer(self, slot: int, tokens: int, in_place: bool) -> None:
        if tokens > self.tokens or tokens == self.tokens and tokens and in_place and not self.in_place:
            self.slot, self.tokens, self.in_place = slot, tokens, in_place


class PrefixIndex:
    """The requests holding a slot (or whose freed slot still holds their prompt), by the prefixes they hold."""

    def __init__(self, min_tokens: Optional[int]):
        self.min_tokens = min_tokens  # other prompts' prefixes shared from this many tokens; None: samples only
        self.holders: dict[Hashable, dict[int, Request]] = {}  # key -> {id: request}
        self.retired: dict[int, Request] = {}  # free slot -> the finished request whose prompt columns it holds
        self.left: dict[int, int] = {}         # id of such a request -> its slot
        self.shared_tokens = 0                 # prompt tokens copied (or reused in place) instead of prefilled

    def keys(self, request: Request) -> list[Hashable]:
        if request.prefix_keys is None:
            # The KV of a prompt's tokens is the weights': a prompt shares only with prompts of its own LoRA adapter
            # (records choosing adapters by name; the engine swaps them in between requests).
            blocks = block_keys(request.token_ids, request.prompt.lora) if self.min_tokens is not None else []
            request.prefix_keys = [sibling_key(request), *blocks]
        return request.prefix_keys

    def clear(self) -> None:
        """The cache was rebuilt (an out-of-memory back-off): no slot holds anything."""
        self.holders, self.retired, self.left = {}, {}, {}

    # ------------------------------------------------------------------ where a holder's prompt columns are

    def place(self, holder: Request, kv) -> Optional[tuple[int, int, bool]]:
        """(slot, prompt tokens its columns hold, whether it is a freed slot) of a holder; None when its slot holds
        it no more (it is then dropped from the index)."""
        cached = min(holder.prefilled, holder.prompt_length)
        if holder.status is not Status.FINISHED and holder.row >= 0 and kv.owners.get(holder.row) is holder:
            return holder.row, cached, False
        slot = self.left.get(id(holder))
        if slot is not None and self.retired.get(slot) is holder and slot not in kv.owners:
            return slot, cached, True
        self.drop(holder)  # e.g. a row compacted into its freed slot
        return None

    def drop(self, holder: Request) -> None:
        for key in self.keys(holder):
            holders = self.holders.get(key)
            if holders is not None:
                holders.pop(id(holder), None)
                if not holders:
                    del self.holders[key]

    # ------------------------------------------------------------------ finding a request's share

    def share_of(self, request: Request, kv, ahead: dict, claimed: set[int]) -> tuple[Optional[PrefixShare], bool]:
        """The most of `request`'s prompt a slot holds now, worth sharing (or None), and whether the request should
        wait: a request ahead of it (in `ahead`, admitted in this step) or one still prefilling would hold more."""
        cap = request.prompt_length - 1  # the last prompt token is always prefilled: its logits draw a token
        # A request asking for prompt logprobs runs its whole prompt through the model (their logits), as vLLM
        # skips its prefix cache for it.
        if cap <= 0 or request.prompt_blocks is not None:
            return None, False
        best, keys = Candidate(), self.keys(request)
        # 1. the prompt's other samples: the whole prompt but its last token
        sibling = keys[0]
        coming = bool(ahead.get(sibling))
        for holder in list(self.holders.get(sibling, {}).values()):
            where = self.place(holder, kv)
            if where is None:
                continue
            slot, cached, freed = where
            if freed and slot in claimed:
                coming = True
            else:
                best.offer(slot, min(cached, cap), freed)
                coming |= cached < cap
        # 2. other prompts, block by block: the deepest block a slot holds, then token by token past it
        reach = 0
        if self.min_tokens is not None:
            found, depth, reach = self.deepest_block(keys[1:], kv, ahead, claimed)
            if found is not None:
                holder, (slot, cached, freed) = found
                start = min(depth * BLOCK, cap)
                if request.token_ids[:start] == holder.token_ids[:start]:  # not a hash collision (checked in C)
                    tokens = common_length(request.token_ids, holder.token_ids, start, min(cached, cap))
                    if tokens >= self.min_tokens:
                        best.offer(slot, tokens, freed)
        waits = coming and best.tokens < cap or self.min_tokens is not None and \
            min(reach, cap) - best.tokens >= self.min_tokens
        share = PrefixShare(best.slot, best.tokens, best.in_place) if best.tokens else None
        return share, waits

    def deepest_block(self, blocks: list[Hashable], kv, ahead: dict, claimed: set[int]):
        """((holder, its place) of the deepest block a slot holds now, or None; how many blocks that holder holds;
        the tokens of the deepest block a holder holds or will hold: one still prefilling it, a request ahead, a
        freed slot claimed by one)."""
        found, found_depth, reach = None, 0, 0
        for depth, key in enumerate(blocks):
            end = (depth + 1) * BLOCK
            here = bool(ahead.get(key))
            for holder in list(self.holders.get(key, {}).values()):
                where = self.place(holder, kv)
                if where is None:
                    continue
                here = True
                if where[1] >= end and not (where[2] and where[0] in claimed):
                    found, found_depth = (holder, where), depth + 1
                    break
            if not here:
                break
            reach = end
        return found, found_depth, reach

    def admissible(self, waiting: Iterable[Request], free_rows: int, kv) -> int:
        """How many front waiting requests may be admitted in this step (at most `free_rows`): each gets its share
        (`request.share`, `prefilled` where its prefill starts); counting stops at the first that should wait."""
        ahead: dict[Hashable, dict[int, Request]] = {}
        claimed: set[int] = set()  # freed slots a request ahead reuses in place
        count = 0
        for request in islice(waiting, free_rows):
            share, waits = self.share_of(request, kv, ahead, claimed)
            if waits:
                request.share, request.prefilled = None, 0
                break
            request.share, request.prefilled = share, share.tokens if share else 0
            if share is not None and share.in_place:
                claimed.add(share.slot)
            for key in self.keys(request):
                ahead.setdefault(key, {})[id(request)] = request
            count += 1
        return count

    # ------------------------------------------------------------------ admitting and finishing

    def admit(self, kv, requests: list[Request]) -> None:
        """Slots for the requests the scheduler admits (a freed slot reused in place by the one that shares it),
        then their shared columns copied from the holders' slots."""
        claimed = {r.share.slot for r in requests if r.share is not None and r.share.in_place}
        copies: dict[tuple[int, int], list[int]] = {}
        for request in requests:
            share = request.share
            kv.admit(request, slot=share.slot if share is not None and share.in_place else None, avoid=claimed)
            if share is not None:
                copies.setdefault((share.slot, share.tokens), []).append(request.row)
                request.shared = share.tokens
                self.shared_tokens += share.tokens
            for key in self.keys(request):
                self.holders.setdefault(key, {})[id(request)] = request
        for (slot, tokens), rows in copies.items():
            kv.copy_prefix(slot, rows, tokens)
        for request in requests:  # a freed slot taken holds its new tenant's columns from this step's forward on
            self.forget_retired(request.row, keep=request)
            request.share = None

    def retire(self, request: Request, slot: int) -> None:
        """A finished request's slot is freed: its prompt's columns stay there until a new tenant writes."""
        self.forget_retired(slot)
        self.retired[slot], self.left[id(request)] = request, slot

    def forget_retired(self, slot: int, keep: Optional[Request] = None) -> None:
        old = self.retired.pop(slot, None)
        if old is None:
            return
        self.left.pop(id(old), None)
        if old is not keep:
            self.drop(old)

"""The decode step over rows addressed by slot id: padded to a bucket of rows, captured as CUDA graphs.

One decode step (the forward, the last-position logits, greedy tokens and EOS flags, the cache's lengths and
next inputs) reads nothing but persistent device buffers: the rows' slots and which rows are real, staged
before the step (and only when they change), everything else gathered from the cache's device state
(kv/slots.py `addressed_decode`, `advance`). Row counts are padded up to a bucket (vLLM's sizes:
kv/slots.py `row_buckets`); padding rows read no column and write the cache's scratch column.

On CUDA each bucket's step is captured the first time it is needed, as a CUDA graph of our own
(torch.cuda.CUDAGraph: a warm-up on a side stream, then the capture, all buckets sharing one memory pool; no
torch.compile, so it takes seconds) and replayed from then on. Elsewhere (CPU, lockstep layouts, a model whose
forward cannot be captured) the very same padded step runs eagerly: that is what the CPU tests run. A
capture that fails turns graphs off for the rest of the run, saying why, and the step runs eagerly.

A bucket already run (captured) up to twice the one a step needs is run again rather than a new one captured
(`replay_bucket`): as a job's rows finish, its steps would otherwise pass through every bucket (~50 for 512
rows), each capture costing tens of milliseconds of a 22-layer model, while a padding row costs a decode step
little (it reads no column; the weights are streamed once whatever the rows). The eager step pads the same way,
so graphs on and off run the same shapes (bf16 matrix products round by shape) and give the same tokens.

Sampling rows are drawn after the step from its logits (engine.logits: noise keyed by seed and position) and replace
the greedy next inputs (`Engine.launch`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Collection, Optional

import torch

from distgen.engine.host import upload
from distgen.engine.kv.base import ForwardBatch
from distgen.engine.kv.slots import SlotKV, bucket_of
from distgen.engine.request import Request
from distgen.engine.runner import Runner

logger = logging.getLogger(__name__)


@dataclass
class GraphCounters:
    replays: int = 0           # decode steps replayed from a captured graph
    eager_steps: int = 0       # padded decode steps run eagerly
    captured: int = 0          # buckets captured
    capture_seconds: float = 0.0
    padding_rows: int = 0      # rows added to reach a bucket, over all steps


@dataclass
class DecodeOutput:
    batch: ForwardBatch        # rows 0..n-1: the requests, in order; decode_rows their slots
    logits: torch.Tensor       # (n, vocab), valid until the next step
    tokens: torch.Tensor       # (n,) greedy
    is_eos: torch.Tensor       # (n,)


Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # logits, tokens, is_eos of a whole bucket
# A captured bucket at most this many times the bucket a step needs is replayed instead of capturing that one.
REUSE_STRETCH = 2


def replay_bucket(wanted: int, captured: Collection[int], stretch: int = REUSE_STRETCH) -> int:
    """The bucket a step of `wanted` rows (a bucket itself) runs: the smallest captured one that holds it, if it is
    at most `stretch` times as many rows, else `wanted` (which is then captured)."""
    larger = [rows for rows in captured if rows >= wanted]
    return min(larger) if larger and min(larger) <= stretch * wanted else wanted


@dataclass
class Captured:
    replay: Callable[[], None]  # runs the captured step again (its inputs: the static buffers as they are now)
    outputs: Outputs            # where each replay leaves its results


class CudaCapturer:
    """Captures a step as a CUDA graph: a warm-up run on a side stream (lazy kernel loads, cuBLAS workspaces,
    allocations), then the capture on that stream; all graphs share one memory pool (they never run at once,
    and each keeps its outputs alive)."""

    def __init__(self):
        self.stream: Optional[torch.cuda.Stream] = None
        self.pool = None

    def __call__(self, step: Callable[[], Outputs]) -> Captured:
        if self.stream is None:
            self.stream, self.pool = torch.cuda.Stream(), torch.cuda.graph_pool_handle()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            step()
        torch.cuda.current_stream().wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the progress sampler's thread may read memory figures while this thread captures
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            outputs = step()
        return Captured(graph.replay, outputs)


class DecodeRunner:
    def __init__(self, runner: Runner, eos_ids: torch.Tensor, capture: bool, why: str = ""):
        """capture: capture each bucket's step as a CUDA graph (else run it eagerly); why: the reason either way."""
        self.runner, self.eos_ids = runner, eos_ids
        self.capture, self.why = capture, why
        self.counters = GraphCounters()
        self.kv: Optional[SlotKV] = None
        self.graphs: dict[int, Captured] = {}
        self.ran: set[int] = set()  # the buckets run so far (captured ones among them)
        self.staged: tuple = ()  # the (bucket, slots) now in the static buffers
        # step -> Captured (tests hand in one that replays by running the step again, on a CPU)
        self.capturer: Callable[[Callable[[], Outputs]], Captured] = CudaCapturer()

    def bind(self, kv: SlotKV) -> None:
        """Static buffers for this cache's buckets (again after an out-of-memory back-off built a new cache)."""
        self.kv, self.graphs, self.ran, self.staged = kv, {}, set(), ()
        rows = kv.buckets[-1]
        self.slots = torch.full((rows,), kv.slots, dtype=torch.long, device=kv.device)  # padding: the spare entry
        self.active = torch.zeros(rows, dtype=torch.bool, device=kv.device)
        self.logits: Optional[torch.Tensor] = None  # (rows, vocab), every bucket's logits (allocated by a first step)

    def run(self, kv: SlotKV, requests: list[Request]) -> DecodeOutput:
        """One decode step of `requests` (each decoding in its own slot): the cache's state has moved on."""
        if kv is not self.kv:
            self.bind(kv)
        n = len(requests)
        rows = replay_bucket(bucket_of(n, kv.buckets), self.ran)
        self.ran.add(rows)
        if self.capture and rows not in self.graphs:
            self.captured(rows)  # before staging: a capture runs padding rows through the static buffers
        self.stage(rows, [r.row for r in requests])
        logits, tokens, is_eos = self.replay(rows) if self.capture else self.eager(rows)
        self.counters.padding_rows += rows - n
        batch = ForwardBatch({}, list(range(n)), decode_rows=self.slots[:n])
        return DecodeOutput(batch, logits[:n], tokens[:n], is_eos[:n])

    def stage(self, rows: int, slots: list[int]) -> None:
        """The step's slots and real-row flags into the static buffers: one upload, only when they change."""
        key = (rows, tuple(slots))
        if key == self.staged:
            return
        padding = rows - len(slots)
        staged = upload(torch.tensor([slots + [self.kv.slots] * padding, [1] * len(slots) + [0] * padding],
                                     dtype=torch.long), self.kv.device)
        self.slots[:rows].copy_(staged[0])
        self.active[:rows].copy_(staged[1].bool())
        self.staged = key

    def step(self, rows: int) -> Outputs:
        """The step over the first `rows` static rows, on the device only (what a graph captures)."""
        slots, active = self.slots[:rows], self.active[:rows]
        logits = self.runner.decode(self.kv.addressed_decode(slots, active))  # (rows, vocab)
        tokens = logits.argmax(dim=-1)
        self.kv.advance(slots, active, tokens)
        # Sampling rows read the logits after the step: one buffer for every bucket (each graph's own logits are
        # an intermediate whose memory the next capture reuses)
        if self.logits is None or self.logits.dtype != logits.dtype:
            self.logits = logits.new_empty((len(self.slots), logits.shape[-1]))
        self.logits[:rows].copy_(logits)
        is_eos = (tokens.unsqueeze(-1) == self.eos_ids).any(-1)  # a plain comparison: nothing isin might sync
        return self.logits[:rows], tokens, is_eos

    def eager(self, rows: int) -> Outputs:
        self.counters.eager_steps += 1
        return self.step(rows)

    def replay(self, rows: int) -> Outputs:
        captured = self.graphs[rows]
        captured.replay()
        self.counters.replays += 1
        return captured.outputs

    def captured(self, rows: int) -> Optional[Captured]:
        """Capture the step of `rows` rows (padding rows only, so no real state moves), or None when it fails
        (graphs are then off for good, saying why)."""
        start = time.perf_counter()
        self.staged = ()  # the buffers hold padding rows now
        self.slots[:rows].fill_(self.kv.slots)
        self.active[:rows].fill_(False)
        try:
            captured = self.capturer(lambda: self.step(rows))
        except Exception as error:  # a forward that cannot be captured: eager from now on, saying why
            if self.kv.device.type == "cuda":
                torch.cuda.synchronize()
            self.capture, self.why = False, f"capture failed ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
            logger.warning("engine: CUDA graphs off: %s", self.why)
            return None
        finally:
            self.counters.capture_seconds += time.perf_counter() - start
        self.graphs[rows] = captured
        self.counters.captured += 1
        return captured


def graphs_blocker(device: torch.device, lockstep: bool, compiling: bool, autocast: Optional[torch.dtype],
                   model: torch.nn.Module, capturable: bool, assisted: bool, disabled: bool) -> Optional[str]:
    """Why the padded decode step runs eagerly instead of replaying CUDA graphs, or None."""
    if device.type != "cuda":
        return f"no CUDA graphs on {device.type}"
    if disabled:
        return "CUDA graphs off (DISTGEN_CUDA_GRAPHS=0)"
    if lockstep:
        return "a lockstep layout's forwards are collectives"
    if compiling:
        return "the decode step is compiled"
    if assisted:
        return "assisted decoding verifies drafts instead"
    if not capturable:
        return "its attention cannot be captured"
    if autocast is not None:
        return "the forwards autocast (capture them with half-precision weights: model.dtype=bf16)"
    if getattr(model, "hf_quantizer", None) is not None:
        return "the model is quantized"
    placed = {str(place) for place in (getattr(model, "hf_device_map", None) or {}).values()}
    if len(placed) > 1:
        return f"accelerate places the model over {', '.join(sorted(placed))}"
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return "ZeRO-3 gathers the parameters around each forward"
    return None

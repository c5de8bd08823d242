"""Engines run to the end in this process, counted, crashed or captured; attention probes."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distgen.config import GenerationConfig
from distgen.engine import build_engine
from distgen.inputs.records import RecordFields, record_to_prompt
from distgen.parallel.loop import run_loop

CPU = torch.device("cpu")


def engine_for(model, tokenizer, records, cfg: GenerationConfig, eos_ids=(), assistant=None, stop_check=None):
    """`records` may carry any per-record setting (records.OVERRIDES), checked as a dataset's are."""
    prompts = [record_to_prompt(r, i, f"record {i}", RecordFields()) for i, r in enumerate(records)]
    queue = [(p, tokenizer(p.text)["input_ids"]) for p in prompts]
    return build_engine(model, queue, cfg, tokenizer.pad_token_id, list(eos_ids), CPU, assistant=assistant,
                        stop_check=stop_check, tokenizer=tokenizer)


def reads_per_step(engine) -> list[int]:
    """Count the host reads (engine/host.py) each step of `engine` makes from now on, into the list returned."""
    from distgen.engine.host import READS
    counts, step = [], engine.step

    def counted():
        before = READS.count
        done = step()
        counts.append(READS.count - before)
        return done
    engine.step = counted
    return counts


def generate_all(engine) -> dict:
    """Run an engine to the end in this process; completions by prompt id."""
    return {c.prompt.id: c for c in run_all(engine)}


def generate_samples(engine) -> dict:
    """Run an engine to the end in this process; completions by (prompt id, sample_index), each once."""
    completions = run_all(engine)
    got = {(c.prompt.id, c.sample): c for c in completions}
    assert len(got) == len(completions), "a (prompt, sample) finished twice"
    return got


def run_all(engine) -> list:
    completions = []
    with torch.no_grad():
        run_loop(engine, lockstep=False, idle_step=lambda: None, device=CPU, on_finished=completions.extend)
    assert not engine.has_work
    return completions


def agree_on_batch(rank: int, world: int, port: int, rows: list[int], has_prompts: list[bool], results) -> None:
    """One gloo rank of a group that agrees on generation.batch_size=auto (run in a spawned process)."""
    import torch.distributed as dist
    from distgen.engine.memory import BatchChoice, agree_across_ranks
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        choice = agree_across_ranks(BatchChoice(rows[rank], "alone"), has_prompts[rank], CPU)
        results.put((rank, choice.rows, choice.reason))
    finally:
        dist.destroy_process_group()


class ProbeLayer:
    """A slot cache layer of given buffers (what the slot attention implementations read and write)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values, self.is_initialized = keys, values, True


def token_major(buffer: torch.Tensor) -> torch.Tensor:
    """The same (slots, kv_heads, columns, head_dim) values stored token-major (what cuda_varlen reads)."""
    return buffer.transpose(1, 2).contiguous().transpose(1, 2)


def attention_case(device: torch.device, dtype: torch.dtype, heads: int = 4, kv_heads: int = 2, dim: int = 16,
                   seed: int = 0):
    """One mixed step's attention, two ways: (query, (torch_sdpa plan, its layer), (varlen plan, its layer)).

    Slots 0 and 1 decode one token each over 3 and 5 cached columns (their new token's included); slot 2 prefills
    a 4-token prompt, slot 3 continues a prompt with 3 tokens at positions 2..4. The torch_sdpa plan reads slots
    0..1 under an additive mask. The varlen plan reads token-major copies of the same values stored with slots
    0<->1 and 2<->3 swapped, through cu_q / cu_k / seqused_k, its decode rows addressed by slot id: so the
    sequences' key offsets are not in increasing order (cu_k = 1, 0, 3, 2 slots), as in a real step."""
    from distgen.engine.kv.attention import ATTENTIONS
    from distgen.engine.kv.base import additive_mask
    from distgen.engine.kv.varlen import AttentionPlan, Segment
    generator = torch.Generator().manual_seed(seed)
    slots, columns = 4, 9
    keys, values = (torch.randn((slots, kv_heads, columns, dim), generator=generator).to(device, dtype)
                    for _ in range(2))
    query = torch.randn((1, heads, 9, dim), generator=generator).to(device, dtype)
    lengths = torch.tensor([3, 5], device=device)
    width = 8
    allowed = torch.arange(width, device=device) < lengths.unsqueeze(-1)
    sdpa = AttentionPlan([], torch.zeros(0), torch.zeros(0), decode=2, width=width,
                         decode_mask=additive_mask(allowed, dtype)[:, None, None],
                         segments=[Segment(2, 6, 2, 0), Segment(6, 9, 3, 2)], impl=ATTENTIONS.get("torch_sdpa"))
    swap = [1, 0, 3, 2]  # slot s's values live in varlen slot swap[s] (swap is its own inverse)
    int32 = dict(dtype=torch.int32, device=device)
    varlen = AttentionPlan([], torch.zeros(0), torch.zeros(0), decode=2, width=columns,
                           segments=[Segment(2, 6, swap[2], 0), Segment(6, 9, swap[3], 2)],
                           impl=ATTENTIONS.get("varlen_reference"),
                           cu_q=torch.tensor([0, 1, 2, 6, 9], **int32),
                           cu_k=torch.tensor(swap + [slots], **int32) * columns,
                           seqused_k=torch.tensor([3, 5, 4, 5], **int32), max_q=4, max_k=columns,
                           rows=torch.tensor(swap[:2], device=device))
    return query, (sdpa, ProbeLayer(keys, values)), (varlen, ProbeLayer(token_major(keys[swap]),
                                                                         token_major(values[swap])))


class ReplayingCapturer:
    """Stands in for CUDA-graph capture on a CPU (engine/graphs.py's capturer): the warm-up and the "capture" run
    the step (on padding rows), and a replay runs it again into the captured outputs, so the static buffers,
    padding and bookkeeping around graphs run as they would on a GPU. `fail`: every capture raises instead."""

    def __init__(self, fail: bool = False):
        self.fail, self.captures = fail, 0

    def __call__(self, step):
        from distgen.engine.graphs import Captured
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        step()
        outputs = step()
        self.captures += 1

        def replay():
            for out, new in zip(outputs, step()):
                out.copy_(new)
        return Captured(replay, outputs)


def crash_at_step(monkeypatch, step_count):
    from distgen.engine import Engine
    real_step, steps = Engine.step, []

    def step_then_fail(self):
        if len(steps) == step_count:
            raise RuntimeError("simulated crash")
        steps.append(1)
        return real_step(self)

    monkeypatch.setattr(Engine, "step", step_then_fail)


# torch 2.11's aten::_flash_attention_forward (the GPU machine's torch; 2.13 adds block_table and num_splits): its
# positional arguments (query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
# return_debug_mask) and its keyword-only ones.
FLASH_211_POSITIONAL = 10
FLASH_211_KEYWORDS = {"scale", "window_size_left", "window_size_right", "seqused_k", "alibi_slopes"}


class DeviceTraffic(TorchDispatchMode):
    """Records what a step on meta tensors would make the host do on a GPU: ops that take a host tensor (not a
    0-d scalar) into a device result (a pageable copy, inside a graph a host address baked in), and every
    FlashAttention call's arguments. Reading values (.item(), .tolist(), nonzero) fails on meta by itself."""

    def __init__(self):
        super().__init__()
        self.host_inputs: list[str] = []
        self.flash_calls: list[tuple[tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._flash_attention_forward.default:
            self.flash_calls.append((args, kwargs))
        leaves = lambda tree: [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]  # noqa
        if any(t.device.type == "cpu" and t.dim() > 0 for t in leaves((args, kwargs))) and \
                any(t.device.type != "cpu" for t in leaves(out)):
            self.host_inputs.append(str(func))
        return out


def on_meta(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The model with every parameter and buffer on the meta device (shapes, no values) in `dtype` (float ones)."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = torch.nn.Parameter(
                    torch.empty(param.shape, dtype=dtype, device="meta"), requires_grad=False)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device="meta")
    return model

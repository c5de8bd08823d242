"""The engine plan (distgen/engine/plan.py): every decision the builder makes, with its reason, as frozen values;
its `describe()` is the engine line word for word, and the Engine's state changes only through its own methods."""
import ast
import json
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import pytest

import distgen
from distgen.backends.cpu import kernels
from distgen.engine.memory import BatchChoice
from distgen.engine.plan import (AssistantChoice, AttentionChoice, AutocastChoice, CacheChoice, CacheFacts,
                                 DeviceDefaults, EnginePlan, GraphsChoice, KernelChoice, SharingChoice, mixes,
                                 pipelines, plan_graphs)
from distgen.engine.runner import CompilePlan
from distgen.run import main as run_in_process

CPU_COMPILE = ("not compiling: on CPU a compile is not measured faster (40-80 s each run, distgen's CPU kernels set "
               "aside); generation.compile=on compiles anyway")
SHARING = SharingChoice(True, 64, "prefix sharing: a prompt admitted while a slot holds >= 64 of its first tokens "
                                  "(a prompt's samples: any) copies their KV and prefills the rest")
# `python -m distgen.run model=tiny dataset=demo` on this CPU, as the builder said it before the plan existed
# (captured at dd2b0ca, where the line was concatenated piece by piece).
DEFAULT_CPU_LINE = (
    "batch_size=4 (generation.batch_size=4), scheduler=continuous, cache=static (slots need no row surgery for a "
    f"llama model); {CPU_COMPILE}; generation.batch_size=4, generation.prefill_chunk_tokens=512 (the cpu defaults: "
    "a CPU forward costs in proportion to its tokens); distgen CPU kernels: 15 of 15 linear layers packed in place, "
    "7 norms/MLPs fused, decoder stack: distgen's (one C call per forward); decode attention: distgen's CPU kernel "
    "(each slot reads its own columns); prefix sharing: a prompt admitted while a slot holds >= 64 of its first "
    "tokens (a prompt's samples: any) copies their KV and prefills the rest; mixed steps (the decoding rows ride "
    "along each prefill forward)")

DEFAULT_CPU_PLAN = EnginePlan(
    batch=BatchChoice(4, "generation.batch_size=4"), scheduler="continuous",
    cache=CacheChoice("static", "slots need no row surgery for a llama model"),
    compile=CompilePlan(False, reason=CPU_COMPILE), lockstep=False,
    defaults=DeviceDefaults((("batch_size", 4), ("prefill_chunk_tokens", 512)), "cpu"), assistant=None,
    autocast=AutocastChoice(None, ""),
    kernels=(KernelChoice("cpu", "distgen CPU kernels: 15 of 15 linear layers packed in place, 7 norms/MLPs fused, "
                                 "decoder stack: distgen's (one C call per forward)"),),
    attention=AttentionChoice("cpu_kernels", "distgen's CPU kernel (each slot reads its own columns)"), adapters=None,
    sharing=SHARING, mixed=True, pipelined=False, graphs=None, token_budget=512, batch_invariant=True)


def test_the_default_cpu_plan_says_the_line_it_always_said():
    assert DEFAULT_CPU_PLAN.describe() == DEFAULT_CPU_LINE
    with pytest.raises(FrozenInstanceError):
        DEFAULT_CPU_PLAN.pipelined = True


def test_a_cuda_plan_says_its_attention_pipelining_and_graphs():
    plan = replace(
        DEFAULT_CPU_PLAN, batch=BatchChoice(96, "the most rows whose KV cache fits 0.8 of 70000 MiB"),
        cache=CacheChoice("static", "slots need no row surgery for a llama model"),
        defaults=DeviceDefaults((("batch_size", "auto"), ("prefill_chunk_tokens", 8192)), "cuda"), kernels=(),
        compile=CompilePlan(False, reason="not compiling: about 900 decode steps are too few to repay a compile "
                                          "(auto compiles on cuda from 2048)"),
        attention=AttentionChoice("cuda_varlen", "cuda_varlen (torch FlashAttention varlen) (not flash_attn: the "
                                                 "flash-attn package is not installed)"),
        pipelined=True, graphs=GraphsChoice(11, 96, True, ""), token_budget=8192, batch_invariant=False)
    assert plan.describe() == (
        "batch_size=96 (the most rows whose KV cache fits 0.8 of 70000 MiB), scheduler=continuous, cache=static "
        "(slots need no row surgery for a llama model); not compiling: about 900 decode steps are too few to repay a "
        "compile (auto compiles on cuda from 2048); generation.batch_size=auto, generation.prefill_chunk_tokens=8192 "
        "(the cuda defaults: a GPU forward costs about the same up to thousands of tokens); decode attention: "
        "cuda_varlen (torch FlashAttention varlen) (not flash_attn: the flash-attn package is not installed); "
        f"{SHARING.reason}; mixed steps (the decoding rows ride along each prefill forward); pipelined steps (step "
        "N+1 launched before step N's tokens are read); decode rows padded to 11 buckets of 1..96 rows, each "
        "captured as a CUDA graph on first use")
    eager = replace(plan, graphs=GraphsChoice(11, 96, False, "CUDA graphs off (DISTGEN_CUDA_GRAPHS=0)"))
    assert eager.describe().endswith("decode rows padded to 11 buckets of 1..96 rows, eager: CUDA graphs off "
                                     "(DISTGEN_CUDA_GRAPHS=0)")


def test_a_lockstep_assisted_plan_with_autocast_and_adapters():
    plan = replace(
        DEFAULT_CPU_PLAN, batch=BatchChoice(2, "generation.batch_size=2"), scheduler="static",
        cache=CacheChoice("dynamic", "no compile, no sliding window"),
        compile=CompilePlan(False, reason="not compiling: model.assistant=prompt_lookup verifies a different number "
                                          "of tokens each step"), lockstep=True,
        defaults=DeviceDefaults((), "cpu"), assistant=AssistantChoice("prompt_lookup", "constant", 5),
        autocast=AutocastChoice("bf16", "autocast to bf16"),
        kernels=(KernelChoice("cpu", "torch kernels (a lockstep (sharded) layout owns the weights)"),),
        attention=None, adapters=2,
        sharing=SharingChoice(False, None, "no prefix sharing (the DynamicKV cache does not copy KV between rows): "
                                           "a prompt's samples prefill it each"),
        mixed=True, token_budget=1 << 62, batch_invariant=False)
    # mixed steps go unsaid in a static batch (it admits prompts only once no row decodes)
    assert plan.describe() == (
        "batch_size=2 (generation.batch_size=2), scheduler=static, cache=dynamic (no compile, no sliding window); "
        "not compiling: model.assistant=prompt_lookup verifies a different number of tokens each step; "
        "out-of-memory back-off off (lockstep layout); assisted by prompt_lookup (constant, 5 draft tokens); "
        "autocast to bf16; torch kernels (a lockstep (sharded) layout owns the weights); 2 LoRA adapters swapped in "
        "per record; no prefix sharing (the DynamicKV cache does not copy KV between rows): a prompt's samples "
        "prefill it each")


def test_as_dict_names_every_decision_with_its_reason():
    said = json.loads(json.dumps(DEFAULT_CPU_PLAN.as_dict()))  # plain JSON values
    assert said["line"] == DEFAULT_CPU_LINE
    assert said["cache"] == {"value": "static", "reason": "slots need no row surgery for a llama model"}
    assert said["decode_attention"]["value"] == "cpu_kernels" and said["batch_invariant"]["value"] is True
    assert said["device_defaults"]["value"] == {"batch_size": 4, "prefill_chunk_tokens": 512}
    assert said["compile"] == {"value": "off", "reason": CPU_COMPILE}
    assert all(set(d) == {"value", "reason"} for name, d in said.items() if name != "line")


def test_what_the_built_cache_decides():
    addressed = CacheFacts(varlen=True, addressed=True, mixes=True, buckets=(1, 2, 4))
    padded = CacheFacts(varlen=False, addressed=False, mixes=False, buckets=())
    assert pipelines(addressed, lockstep=False, assisted=False)
    assert not pipelines(addressed, lockstep=True, assisted=False) and not pipelines(padded, False, False)
    assert not pipelines(addressed, lockstep=False, assisted=True)
    assert mixes(True, addressed, False) and not mixes(False, addressed, False) and not mixes(True, padded, False)
    assert not mixes(True, addressed, assisted=True)
    assert plan_graphs(addressed, False, None) == GraphsChoice(3, 4, True, "")
    assert plan_graphs(addressed, False, "no CUDA graphs on cpu") == GraphsChoice(3, 4, False, "no CUDA graphs on cpu")
    assert plan_graphs(addressed, True, None) is None and plan_graphs(padded, False, None) is None


def test_the_default_cpu_job_prints_the_line_it_printed_before(tmp_path, capsys):
    if kernels.load_kernel()[0] is None:
        pytest.skip(f"distgen's CPU kernels cannot be built here ({kernels.load_kernel()[1]}): the line names torch's")
    assert run_in_process(["model=tiny", "dataset=demo", f"output.dir={tmp_path / 'out'}"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("distgen: engine: ")]
    assert lines == [f"distgen: engine: {DEFAULT_CPU_LINE}"]
    [rank] = json.loads((tmp_path / "out" / "stats.json").read_text())["ranks"]
    assert rank["engine"]["line"] == DEFAULT_CPU_LINE and rank["batch_invariant"] is True
    assert rank["engine"]["batch_size"] == {"value": 4, "reason": "generation.batch_size=4"}
    assert "<h2>Engine (rank 0)</h2>" in (tmp_path / "out" / "report.html").read_text()


# --- Engine state changes only through Engine's methods ---

ENGINE_MODULE = Path(distgen.__file__).parent / "engine" / "core.py"


def engine_rooted(target: ast.expr) -> bool:
    """Whether an assignment target reaches into an engine: `engine.x`, `engine.x.y`, `self.engine.x`."""
    while isinstance(target, (ast.Attribute, ast.Subscript)):
        target = target.value
        if isinstance(target, ast.Attribute) and target.attr == "engine":
            return True
        if isinstance(target, ast.Name):
            return target.id == "engine"
    return False


def engine_writes(source: str) -> list[int]:
    """The lines of `source` that assign (or setattr) an attribute of an engine."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            targets = [ast.Attribute(value=node.args[0], attr="?")] if node.args else []
        flat = [t for target in targets for t in (target.elts if isinstance(target, ast.Tuple) else [target])]
        lines += [node.lineno for t in flat if isinstance(t, (ast.Attribute, ast.Subscript)) and engine_rooted(t)]
    return lines


def test_the_check_finds_an_outside_write():
    assert engine_writes("engine.kv = None\nx = engine.kv\n") == [1]
    assert engine_writes("engine.backoff.label = 'rank 0: '") == [1]
    assert engine_writes("self.engine.running, y = [], 1") == [1]
    assert engine_writes("setattr(engine, 'pipelined', True)") == [1]
    assert engine_writes("engine.forwards += 1") == [1]
    assert engine_writes("engine.step()\nrank.engine = 1\nengines = 2") == []


def test_no_module_outside_core_assigns_engine_state():
    package = Path(distgen.__file__).parent
    found = {str(path.relative_to(package)): engine_writes(path.read_text())
             for path in sorted(package.rglob("*.py")) if path != ENGINE_MODULE}
    assert {path: lines for path, lines in found.items() if lines} == {}

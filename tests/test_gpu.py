"""The GPU paths: one CUDA rank over NCCL for every layout, bf16, CUDA memory stats, CUDA-graph decode,
attention selection, torch's FlashAttention varlen against SDPA, the engine's own CUDA graphs (replayed, equal to
the eager padded step, equal to generate in fp32). Marked `gpu`: skipped, saying why, where no CUDA device is visible;
`scripts/gpu_check.sh` runs them on a GPU machine. Cheapest first: the check script may stop late ones.

Features that are not on this branch yet (a layout, `generation.compile`) are skipped with the
reason, and tested as soon as they land: layouts are read from the registry, config keys probed.
"""
import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from distgen.engine.kv.attention import ATTENTIONS
from distgen.config import ModelConfig, TinyModelConfig
from distgen.parallel.layouts import get_layout
from distgen.models.loading import load_model, load_tokenizer, resolve_attn_implementation
from distgen.models.tiny import save_tiny
from tests.helpers import (DEFAULT_BUDGET, PROMPTS, attention_case, layout_names, read_outputs, read_stats,
                           reference_greedy, run_module, unknown_config_key, write_prompts)

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda", 0)
MIB = 2**20
# Wider than the CPU tests' model, so that its weights (~5 MiB in fp32) are a floor the peak memory must clear.
GPU_TINY = TinyModelConfig(layers=2, hidden_size=256, heads=8, kv_heads=4, intermediate_size=512, seed=7)
# A layout that needs a package distgen does not install by default: skipped, naming it, when absent.
# Generous bounds for a small model: a peak over this means memory is kept that should not be.
PEAK_CEILING_MIB = 2048
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("gpu-tiny"), GPU_TINY)


@pytest.fixture(scope="module")
def reference(gpu_model_dir, tokenizer):
    """HF `generate` on the GPU in fp32, one unpadded prompt at a time: (eos id, completion ids by prompt id)."""
    model = AutoModelForCausalLM.from_pretrained(gpu_model_dir, dtype=torch.float32).to(CUDA).eval()
    eos = reference_greedy(model, tokenizer, "The capital of France is", DEFAULT_BUDGET, [])[2]
    want = {p["id"]: reference_greedy(model, tokenizer, p["prompt"], p.get("max_new_tokens", DEFAULT_BUDGET), [eos])
            for p in PROMPTS}
    params = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return eos, want, params


def run_one_cuda_rank(model_dir, out, *overrides, env=None):
    """One rank under torchrun on CUDA (so NCCL), the shared prompts, greedy."""
    prompts = write_prompts(out.parent / f"{out.name}-prompts.jsonl", PROMPTS)
    args = [f"model={model_dir}", f"dataset={prompts}", f"output.dir={out}", "device=cuda",
            f"generation.max_new_tokens={DEFAULT_BUDGET}", "generation.batch_size=3", "output.progress_every_s=0",
            *overrides]
    result = run_module("distgen.run", args, nproc=1, timeout=RUN_TIMEOUT_S, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return read_outputs(out), read_stats(out)


def assert_plausible_cuda_peaks(rank: dict, weight_mib: float) -> None:
    allocated, reserved = rank["cuda_peak_allocated_mib"], rank["cuda_peak_reserved_mib"]
    assert weight_mib <= allocated <= PEAK_CEILING_MIB, (allocated, weight_mib)
    assert allocated <= reserved <= PEAK_CEILING_MIB + 512, (allocated, reserved)


def skip_unless_layout_can_run(layout: str) -> None:
    needs = get_layout(layout).needs
    if needs and importlib.util.find_spec(needs) is None:
        pytest.skip(f"layout={layout} needs {needs}, which is not installed here")


def test_auto_attention_picks_what_the_machine_has(gpu_model_dir):
    from transformers.utils import is_flash_attn_2_available
    want = "flash_attention_2" if is_flash_attn_2_available() else "sdpa"
    # without flash-attention, None: transformers picks (sdpa for Llama; eager where sdpa is refused)
    assert resolve_attn_implementation("auto", CUDA, torch.bfloat16) == (None if want == "sdpa" else want)
    assert resolve_attn_implementation("auto", CUDA, torch.float32) is None  # flash-attention is half precision only
    cfg = ModelConfig(source="pretrained", path=str(gpu_model_dir), dtype="bf16")
    model = load_model(cfg, load_tokenizer(cfg), CUDA).to(CUDA)
    assert model.config._attn_implementation == want
    ids = torch.tensor([[1, 70, 71, 72, 73]], device=CUDA)
    logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.parametrize("layout", layout_names())
def test_one_cuda_rank_equals_generate_in_fp32(layout, gpu_model_dir, reference, tmp_path):
    skip_unless_layout_can_run(layout)
    eos, want, params = reference
    records, stats = run_one_cuda_rank(gpu_model_dir, tmp_path / "out", f"layout={layout}", "model.dtype=fp32",
                                       f"generation.eos_token_ids=[{eos}]")
    assert [r["id"] for r in records] == [p["id"] for p in PROMPTS]
    for record in records:
        assert record["completion_token_ids"] == want[record["id"]], record["id"]
    assert records[1]["finish_reason"] == "eos"
    [rank] = stats["ranks"]
    assert rank["device"].startswith("cuda")
    assert_plausible_cuda_peaks(rank, params * 4 / MIB)


@pytest.mark.parametrize("layout", layout_names())
def test_one_cuda_rank_runs_in_bf16(layout, gpu_model_dir, reference, tmp_path):
    skip_unless_layout_can_run(layout)
    _, _, params = reference
    records, stats = run_one_cuda_rank(gpu_model_dir, tmp_path / "out", f"layout={layout}", "model.dtype=bf16",
                                       "generation.eos_token_ids=[]")
    assert [r["id"] for r in records] == [p["id"] for p in PROMPTS]
    for record, prompt in zip(records, PROMPTS):  # no EOS: every prompt runs to its own budget
        assert record["completion_tokens"] == prompt.get("max_new_tokens", DEFAULT_BUDGET), record["id"]
        assert record["finish_reason"] == "length"
    [rank] = stats["ranks"]
    assert rank["generated_tokens"] == sum(r["completion_tokens"] for r in records)
    assert_plausible_cuda_peaks(rank, params * 2 / MIB)


def test_compiled_decode_with_cuda_graphs_equals_eager(gpu_model_dir, reference, tmp_path):
    compiled = ("generation.compile=on", "generation.compile_mode=reduce-overhead")
    missing = unknown_config_key(*compiled)
    if missing:
        pytest.skip(f"compiled decode is not on this branch yet: {missing}")
    eos, want, _ = reference
    common = ("model.dtype=fp32", f"generation.eos_token_ids=[{eos}]")
    eager, _ = run_one_cuda_rank(gpu_model_dir, tmp_path / "eager", *common, "generation.compile=off")
    graphs, _ = run_one_cuda_rank(gpu_model_dir, tmp_path / "graphs", *common, *compiled,
                                  env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert [r["completion_token_ids"] for r in graphs] == [r["completion_token_ids"] for r in eager]
    assert [r["completion_token_ids"] for r in eager] == [want[p["id"]] for p in PROMPTS]


def test_offloaded_kv_cache_equals_generate(gpu_model_dir, reference, tmp_path):
    """generation.cache=offloaded (each layer in CPU memory between uses) changes no token; auto batch and an
    injected out-of-memory back-off on CUDA keep them too."""
    eos, want, _ = reference
    records, stats = run_one_cuda_rank(gpu_model_dir, tmp_path / "out", "model.dtype=fp32",
                                       f"generation.eos_token_ids=[{eos}]", "generation.cache=offloaded",
                                       "generation.batch_size=auto", env={"DISTGEN_INJECT_OOM_AT_STEP": "2"})
    assert {r["id"]: r["completion_token_ids"] for r in records} == want
    assert stats["summary"]["oom_backoffs"] == 1


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 1), (4, 4)])
def test_flash_varlen_attention_equals_sdpa_in_bf16(heads, kv_heads):
    """One mixed step (two decode rows, a prompt, a continuation chunk) through torch's FlashAttention varlen
    (cuda_varlen: one call, cum_seq_k/seqused_k, bottom-right causal) against masked SDPA, both in bf16, each
    within bf16's rounding of the same attention in fp32; a padding row (seqused_k 0) reads nothing."""
    query, (sdpa, sdpa_layer), (varlen, varlen_layer) = attention_case(CUDA, torch.bfloat16, heads, kv_heads)
    flash = ATTENTIONS.get("cuda_varlen").attend(varlen, varlen_layer, query, 0.25)
    masked = ATTENTIONS.get("torch_sdpa").attend(sdpa, sdpa_layer, query, 0.25)
    query32, (sdpa32, layer32), _ = attention_case(CUDA, torch.float32, heads, kv_heads)
    want = ATTENTIONS.get("torch_sdpa").attend(sdpa32, layer32, query32, 0.25)
    error = lambda got: ((got.float() - want).norm() / want.norm()).item()  # noqa: E731
    assert flash.shape == want.shape and torch.isfinite(flash).all()
    assert error(flash) < 1e-2 and error(flash) < 2 * error(masked) + 1e-3, (error(flash), error(masked))
    varlen.seqused_k[1] = 0
    assert not ATTENTIONS.get("cuda_varlen").attend(varlen, varlen_layer, query, 0.25)[0, 1].any()


@pytest.mark.parametrize("window", [2, 3])
def test_flash_varlen_applies_a_layers_window_as_masked_sdpa_does(window):
    """A local layer's window through FlashAttention's window_size_left (cuda_varlen) against torch_sdpa's narrowed
    mask on the same mixed step, in bf16, within bf16's rounding of the fp32 masked attention."""
    query, (sdpa, sdpa_layer), (varlen, varlen_layer) = attention_case(CUDA, torch.bfloat16, 4, 2)
    query32, (sdpa32, layer32), _ = attention_case(CUDA, torch.float32, 4, 2)
    for plan in (sdpa, sdpa32):
        plan.decode_positions = torch.tensor([2, 4], device=CUDA)
    flash = ATTENTIONS.get("cuda_varlen").attend(varlen, varlen_layer, query, 0.25, window=window)
    want = ATTENTIONS.get("torch_sdpa").attend(sdpa32, layer32, query32, 0.25, window=window)
    unwindowed = ATTENTIONS.get("torch_sdpa").attend(sdpa32, layer32, query32, 0.25)
    error = lambda got: ((got.float() - want).norm() / want.norm()).item()  # noqa: E731
    assert error(flash) < 1e-2 < error(unwindowed), (error(flash), error(unwindowed))


def test_bf16_decode_replays_cuda_graphs_and_equals_its_eager_step(gpu_model_dir, tmp_path):
    """bf16 on one GPU: FlashAttention varlen, pipelined steps and CUDA graphs replayed (asserted from the rank's
    stats); the same job with graphs off runs the same padded step eagerly and gives the same tokens."""
    common = ("model.dtype=bf16", "generation.eos_token_ids=[]")
    graphs, stats = run_one_cuda_rank(gpu_model_dir, tmp_path / "graphs", *common)
    [rank] = stats["ranks"]
    assert rank["cuda_graph_replays"] > 0 and rank["cuda_graph_capture_seconds"] > 0, rank
    assert rank["host_reads"] <= rank["forward_steps"] + 1, rank  # one host read per step at most
    eager, stats = run_one_cuda_rank(gpu_model_dir, tmp_path / "eager", *common, env={"DISTGEN_CUDA_GRAPHS": "0"})
    [rank] = stats["ranks"]
    assert rank["cuda_graph_replays"] == 0 and rank["eager_decode_steps"] > 0, rank
    assert [r["completion_token_ids"] for r in graphs] == [r["completion_token_ids"] for r in eager]


def test_fp32_graphs_through_the_varlen_metadata_equal_generate(gpu_model_dir, reference, tmp_path):
    """fp32 on one GPU with the varlen path forced (its plain-torch reference kernel reads the same metadata and
    can be captured): rows addressed by slot id, pipelined, replayed from CUDA graphs, tokens equal generate's."""
    eos, want, _ = reference
    records, stats = run_one_cuda_rank(gpu_model_dir, tmp_path / "out", "model.dtype=fp32",
                                       f"generation.eos_token_ids=[{eos}]", "generation.attention=varlen_reference")
    assert {r["id"]: r["completion_token_ids"] for r in records} == want
    [rank] = stats["ranks"]
    assert rank["cuda_graph_replays"] > 0, rank
    assert rank["engine"]["decode_attention"]["value"] == "varlen_reference" and rank["engine"]["pipelined"]["value"]

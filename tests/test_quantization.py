"""Quantized weights: each quantizer that runs on CPU loads the saved tiny model through distgen's own
loading path (from_pretrained, then the quantizer, then the layout) and generates; its parameter bytes
drop. Weights are random, so outputs are not compared with fp32: they are checked for shape, budget and
finish reason. Combinations that cannot work are ConfigErrors before any worker starts."""
import importlib.util

import re

import pytest
import torch

from distgen.common.errors import ConfigError
from distgen.catalog.load import load_config
from distgen.parallel.layouts import LAYOUTS
from distgen.models.quantizers import QUANTIZERS, base as quantizer_base
from distgen.run import main as run_main
from tests.helpers import DEFAULT_BUDGET, PROMPTS, read_outputs, read_stats

# Fraction of the fp32 parameter bytes each quantizer must stay under on the tiny model (its fp32
# embeddings and head, about half of it, are not quantized).
MOST_BYTES = {"int8_dynamic": 0.75, "bnb_8bit": 0.75, "bnb_4bit": 0.65, "quanto_int8": 0.75, "quanto_int4": 0.65}
# Bits per quantized weight, not counting scales: the bytes can not be less than these.
BITS = {"int8_dynamic": 8, "bnb_8bit": 8, "bnb_4bit": 4, "quanto_int8": 8, "quanto_int4": 4}
CPU_QUANTIZERS = [name for name in QUANTIZERS.names() if name != "none" and "cpu" in QUANTIZERS.get(name).devices]
# Every CPU quantizer under replicate; one per backend under device_map (dispatched by accelerate).
CASES = [(name, "replicate") for name in CPU_QUANTIZERS] + [
    pytest.param(name, "device_map", marks=pytest.mark.skipif("device_map" not in LAYOUTS.names(),
                                                               reason="no device_map layout on this branch"))
    for name in ("int8_dynamic", "bnb_4bit", "quanto_int8")]


def rank_bytes(out_dir) -> int:
    """Parameter bytes rank 0 held (on every device) once placed."""
    return sum(read_stats(out_dir)["ranks"][0]["param_bytes"].values())


def run_job(model_dir, prompts_file, out_dir, *overrides, device="cpu") -> int:
    return run_main([f"model={model_dir}", f"dataset={prompts_file}", f"device={device}", "generation.batch_size=3",
                     f"generation.max_new_tokens={DEFAULT_BUDGET}", f"output.dir={out_dir}", "output.resume=false",
                     "output.print_table=false", *overrides])


@pytest.fixture(scope="module")
def fp32_bytes(tiny_model_dir, tmp_path_factory) -> int:
    work = tmp_path_factory.mktemp("fp32")
    from tests.helpers import write_prompts
    prompts = write_prompts(work / "prompts.jsonl", PROMPTS[:2])
    assert run_job(tiny_model_dir, prompts, work / "out", "model.quantization=none") == 0
    return rank_bytes(work / "out")


def test_every_cpu_quantizer_is_tested():
    assert set(CPU_QUANTIZERS) == set(MOST_BYTES) == set(BITS)


@pytest.mark.parametrize("name, layout", CASES)
def test_quantized_model_generates_and_its_parameter_bytes_drop(name, layout, tiny_model_dir, prompts_file, tmp_path,
                                                                 fp32_bytes, tiny_model):
    assert run_job(tiny_model_dir, prompts_file, tmp_path / "out", f"model.quantization={name}", f"layout={layout}") == 0
    records = read_outputs(tmp_path / "out")
    assert [r["id"] for r in records] == [p["id"] for p in PROMPTS]
    for record, prompt in zip(records, PROMPTS):
        budget = prompt.get("max_new_tokens", DEFAULT_BUDGET)
        tokens = record["completion_token_ids"]
        assert record["completion_tokens"] == len(tokens) and 1 <= len(tokens) <= budget
        assert all(0 <= t < tiny_model.config.vocab_size for t in tokens)
        eos = tokens[-1] == tiny_model.config.eos_token_id
        assert record["finish_reason"] == ("eos" if eos else "length")
        assert eos or len(tokens) == budget
    held = rank_bytes(tmp_path / "out")
    head = tiny_model.get_output_embeddings()
    quantized = sum(m.weight.numel() for m in tiny_model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    least = fp32_bytes - quantized * 4 + quantized * BITS[name] // 8
    assert least <= held < MOST_BYTES[name] * fp32_bytes, (least, held, fp32_bytes)
    fp32_params = sum(p.numel() * p.element_size() for p in tiny_model.parameters())
    assert fp32_bytes == fp32_params


@pytest.mark.gpu
@pytest.mark.parametrize("name", [n for n in QUANTIZERS.names() if n != "none" and "cuda" in QUANTIZERS.get(n).devices])
def test_quantized_model_generates_on_cuda(name, tiny_model_dir, prompts_file, tmp_path, fp32_bytes):
    package = QUANTIZERS.get(name).package
    if package and importlib.util.find_spec(package[0]) is None:
        pytest.skip(f"{name} needs {package[1]}, which this machine lacks")
    assert run_job(tiny_model_dir, prompts_file, tmp_path / "out", f"model.quantization={name}", "model.dtype=fp32",
                   device="cuda") == 0
    assert [r["id"] for r in read_outputs(tmp_path / "out")] == [p["id"] for p in PROMPTS]
    assert rank_bytes(tmp_path / "out") < MOST_BYTES[name] * fp32_bytes


def test_four_bits_take_less_than_eight(tiny_model_dir):
    from distgen.config import ModelConfig
    from distgen.models.loading import ModelSource, load_tokenizer
    from distgen.parallel.layouts.base import full_param_bytes

    def loaded_bytes(name: str) -> int:
        cfg = ModelConfig(source="pretrained", path=str(tiny_model_dir), quantization=name)
        return full_param_bytes(ModelSource(cfg, load_tokenizer(cfg), torch.device("cpu")).full())

    assert loaded_bytes("bnb_4bit") < loaded_bytes("bnb_8bit")
    assert loaded_bytes("quanto_int4") < loaded_bytes("quanto_int8")


@pytest.mark.parametrize("overrides, message", [
    (["model.quantization=int4"], r"model.quantization='int4' is not allowed: expected one of none, int8_dynamic, "
                                  r"bnb_8bit, bnb_4bit, quanto_int8, quanto_int4"),
    (["model.quantization=bnb_4bit", "layout=fsdp"],
     r"model.quantization='bnb_4bit' is not allowed: layout=fsdp cannot shard bnb_4bit weights; layouts that can "
     r"place them: replicate, device_map"),
    (["model.quantization=quanto_int8", "layout=fsdp"], r"layout=fsdp cannot shard quanto_int8 weights"),
    (["model.quantization=int8_dynamic", "layout=fsdp"], r"layout=fsdp cannot shard int8_dynamic weights"),
    (["model.quantization=int8_dynamic", "device=cuda"],
     r"model.quantization='int8_dynamic' is not allowed: int8_dynamic runs on cpu, not on device=cuda .cuda.; "
     r"use device=cpu"),
    (["model.quantization=int8_dynamic", "model.dtype=bf16"], r"int8_dynamic.*needs model.dtype in auto, fp32, not bf16"),
])
def test_impossible_combinations_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["model=tiny", "dataset=demo", *overrides])


@pytest.mark.skipif("device_map" not in LAYOUTS.names(), reason="no device_map layout on this branch")
def test_quantized_weights_are_not_offloaded(tiny_model_dir, prompts_file, tmp_path, capsys):
    # The map is known only once the layout places the model, inside the rank: a config error, status 2.
    assert run_job(tiny_model_dir, prompts_file, tmp_path / "out", "model.quantization=bnb_4bit", "layout=device_map",
                   "+layout.max_memory.cpu=150000") == 2
    assert re.search(r"distgen: config error: model.quantization='bnb_4bit' is not allowed with an offloading "
                     r"layout=device_map .* quantized weights cannot be offloaded", capsys.readouterr().err)


def test_missing_package_is_named(monkeypatch, capsys):
    real = quantizer_base.importlib.util.find_spec
    monkeypatch.setattr(quantizer_base.importlib.util, "find_spec",
                        lambda name, *a: None if name == "optimum.quanto" else real(name, *a))
    with pytest.raises(ConfigError, match=r"model.quantization='quanto_int4' is not allowed: it needs the Python "
                                          r"package optimum-quanto, which is not installed \(pip install "
                                          r"optimum-quanto==0.2.7"):
        load_config(["model=tiny", "dataset=demo", "model.quantization=quanto_int4"])
    # The run stops before any worker starts, saying why.
    assert run_main(["model=tiny", "dataset=demo", "model.quantization=quanto_int4", "--check"]) == 2
    assert "needs the Python package optimum-quanto" in capsys.readouterr().err


def test_only_unquantized_weights_are_compileable():
    assert [n for n in QUANTIZERS.names() if QUANTIZERS.get(n).compileable] == ["none"]

"""LoRA adapters (model.lora, through peft): one folder merged into the weights at load in every layout, several
chosen per record (layout=replicate); each record's completion equal to `generate` of the model merged (peft's
own merge_and_unload) with its adapter, on 2 gloo ranks and in process."""
import importlib.util
import json
import shutil

import pytest

from distgen.catalog.load import load_config
from distgen.common.errors import ConfigError
from distgen.config import ModelConfig, RunConfig
from distgen.inputs.keys import record_key
from distgen.inputs.records import Prompt
from distgen.models.lora import check_adapters
from distgen.outputs.resume import job_settings
from distgen.run import main as run_in_process
from tests.helpers import (DEFAULT_BUDGET, PROMPTS, job_args, merged_with_lora, read_outputs, read_stats,
                           reference_greedy, run_module, save_lora, write_prompts)

# Extra settings a layout needs on 2 CPU ranks (ZeRO-3 keeps small parameters whole unless told not to).
LAYOUT_ARGS = {"replicate": [], "fsdp": [], "zero3": ["layout.param_persistence_threshold=0"], "device_map": []}
# PROMPTS, each choosing an adapter (or none: the base model), interleaved so that a rank's share mixes them.
CHOICES = {"short": "a", "france": None, "story": "b", "code": "a", "haiku": "b", "primes": None, "fox": "a"}
CHOSEN = [{**p, "lora": CHOICES[p["id"]]} if CHOICES[p["id"]] else p for p in PROMPTS]
GHOST = {"id": "ghost", "prompt": "Boo", "lora": "c"}


@pytest.fixture(scope="session")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {name: save_lora(tiny_model_dir, root / name, seed) for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="session")
def merged(tiny_model_dir, adapters):
    """The reference models: the base model (None) and the model merged with each adapter."""
    return {None: merged_with_lora(tiny_model_dir, None),
            **{name: merged_with_lora(tiny_model_dir, folder) for name, folder in adapters.items()}}


def lora_job(model_dir, prompts, out, *extra):
    return job_args(model_dir, prompts, out, "output.print_table=false", *extra)


def want(model, tokenizer, prompt) -> list[int]:
    return reference_greedy(model, tokenizer, prompt["prompt"], prompt.get("max_new_tokens", DEFAULT_BUDGET),
                            [tokenizer.eos_token_id])


def assert_each_equals_its_merged_model(records, prompts, merged, tokenizer):
    """Every record equals generate of the model merged with its own adapter; the adapters matter (some record
    differs from what another adapter, or the base model, gives)."""
    assert [r["id"] for r in records] == [p["id"] for p in prompts]
    differs = False
    for record, prompt in zip(records, prompts):
        mine = want(merged[prompt.get("lora")], tokenizer, prompt)
        assert record["completion_token_ids"] == mine, prompt["id"]
        differs |= any(want(model, tokenizer, prompt) != mine for name, model in merged.items()
                       if name != prompt.get("lora"))
    assert differs, "the adapters should change the completions, or this test could not fail"


@pytest.mark.parametrize("layout", LAYOUT_ARGS)
def test_one_adapter_is_merged_at_load_in_every_layout(layout, tiny_model_dir, adapters, merged, tokenizer,
                                                       prompts_file, tmp_path):
    out = tmp_path / "out"
    result = run_module("distgen.run", lora_job(tiny_model_dir, prompts_file, out, f"layout={layout}",
                                                f"model.lora={adapters['a']}", *LAYOUT_ARGS[layout]), nproc=2)
    assert result.returncode == 0, result.stderr
    records = read_outputs(out)
    assert [r["id"] for r in records] == [p["id"] for p in PROMPTS]
    for record, prompt in zip(records, PROMPTS):
        assert record["completion_token_ids"] == want(merged["a"], tokenizer, prompt), prompt["id"]
    assert any(r["completion_token_ids"] != want(merged[None], tokenizer, p) for r, p in zip(records, PROMPTS))


def test_adapters_chosen_per_record_on_two_replicate_ranks(tiny_model_dir, adapters, merged, tokenizer, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", CHOSEN + [GHOST])
    out = tmp_path / "out"
    result = run_module("distgen.run", lora_job(tiny_model_dir, prompts, out,
                                                f"model.lora={{a: {adapters['a']}, b: {adapters['b']}}}"), nproc=2)
    assert result.returncode == 0, result.stderr
    *records, ghost = read_outputs(out)
    assert_each_equals_its_merged_model(records, CHOSEN, merged, tokenizer)
    assert ghost["finish_reason"] == "error"
    assert ghost["error"] == "lora='c' is not an adapter of model.lora (its adapters: a, b)"
    for rank in read_stats(out)["ranks"]:  # a rank's prompts come grouped: each adapter swapped in once at most
        assert 1 <= rank["adapter_switches"] <= 2
    assert "2 LoRA adapters swapped in per record" in result.stdout


@pytest.mark.parametrize("extra", [
    ["generation.scheduler=static"],
    ["generation.scheduler=chunked", "generation.prefill_chunk_tokens=5", "generation.batch_size=3"],
    ["generation.cpu_kernels=torch", "generation.mixed_steps=false"],
], ids=["static", "chunked", "torch-kernels"])
def test_adapters_chosen_per_record_in_process(extra, tiny_model_dir, adapters, merged, tokenizer, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", CHOSEN)
    out = tmp_path / "out"
    # a list of folders: each adapter named by its folder's name
    assert run_in_process(lora_job(tiny_model_dir, prompts, out, f"model.lora=[{adapters['a']},{adapters['b']}]",
                                   *extra)) == 0
    assert_each_equals_its_merged_model(read_outputs(out), CHOSEN, merged, tokenizer)
    assert read_stats(out)["ranks"][0]["adapter_switches"] == 2  # base model first, then a, then b


def test_a_shared_prefix_is_shared_only_between_records_of_one_adapter(tiny_model_dir, adapters, merged, tokenizer,
                                                                      tmp_path):
    """Prompts of one long prefix, choosing different adapters: the prefix's KV is the weights', so a record copies
    it (or reuses a freed slot in place) only from a record of its own adapter; each equals its merged model."""
    prefix = " ".join(f"word{i}" for i in range(60)) + " "  # ~400 tokens: far past the 64 shared from
    records = [{"id": f"r{i}", "prompt": f"{prefix}end {i}", **({"lora": name} if name else {})}
               for i, name in enumerate([None, "a", "a", "b", None, "b"])]
    prompts = write_prompts(tmp_path / "p.jsonl", records)
    out = tmp_path / "out"
    assert run_in_process(lora_job(tiny_model_dir, prompts, out, f"model.lora={{a: {adapters['a']}, b: "
                                   f"{adapters['b']}}}", "generation.prefix_sharing=on")) == 0
    assert_each_equals_its_merged_model(read_outputs(out), records, merged, tokenizer)
    rank = read_stats(out)["ranks"][0]
    assert rank["adapter_switches"] == 2 and rank["shared_prefix_tokens"] >= 3 * 400  # the second of each adapter


def test_a_record_naming_an_adapter_without_adapters_by_name_gets_an_error_record(tiny_model_dir, adapters, merged,
                                                                                 tokenizer, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [PROMPTS[1], {**PROMPTS[6], "lora": "a"}])
    out = tmp_path / "out"
    assert run_in_process(lora_job(tiny_model_dir, prompts, out, f"model.lora={adapters['a']}")) == 0
    france, fox = read_outputs(out)
    assert france["completion_token_ids"] == want(merged["a"], tokenizer, PROMPTS[1])
    assert fox["finish_reason"] == "error" and fox["error"].startswith(
        "lora='a' is not allowed: model.lora names no adapters (adapters chosen per record are model.lora={name: ")


@pytest.mark.parametrize("overrides, message", [
    (["layout=fsdp", "model.lora={a: /x}"], r"model.lora=\{'a': '/x'\} is not allowed: adapters chosen per record "
                                           r"are swapped into a whole model between records \(layout=replicate\); "
                                           r"layout=fsdp takes one adapter folder"),
    (["layout=device_map", "model.lora=[/x]"], r"layout=device_map takes one adapter folder"),
    (["model.lora=[/x/a,/y/a]"], r"two folders of the list have the same name"),
    (["model.lora={}"], r"model.lora=\{\} is not allowed: expected a LoRA adapter folder"),
    (["model.lora=3"], r"model.lora=3 is not allowed: expected a LoRA adapter folder"),
    (["model.lora={a: 3}"], r"every adapter is a folder"),
    (["model.lora=[/x/a.b]"], r"adapter name 'a.b' is not letters, digits, _ and -"),
    (["model.lora={a: /x}", "model.quantization=quanto_int8"], r"adapters chosen per record are swapped into the "
                                                                r"weights, which model.quantization=quanto_int8"),
])
def test_lora_settings_are_checked_before_start(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["model=tiny", "dataset=demo", *overrides])


def test_adapter_folders_are_checked_before_any_worker(adapters, tiny_model_dir, tmp_path, monkeypatch):
    check_adapters({"a": str(adapters["a"]), "b": str(adapters["b"])})
    with pytest.raises(ConfigError, match=r"model.lora.b='/nowhere' is not a folder"):
        check_adapters({"a": str(adapters["a"]), "b": "/nowhere"})
    with pytest.raises(ConfigError, match=r"model.lora='.*' is not a LoRA adapter folder \(no adapter_config.json"):
        check_adapters(str(tiny_model_dir))
    ia3 = shutil.copytree(adapters["a"], tmp_path / "ia3")
    config = json.loads((ia3 / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ConfigError, match=r"is a 'IA3' adapter; model.lora takes LoRA adapters"):
        check_adapters(str(ia3))
    dora = save_lora(tiny_model_dir, tmp_path / "dora", seed=3, use_dora=True)
    check_adapters(str(dora))  # merged alone: peft's merge covers DoRA
    with pytest.raises(ConfigError, match=r"model.lora.d='.*dora' sets use_dora=True: an adapter chosen per record"):
        check_adapters({"a": str(adapters["a"]), "d": str(dora)})
    cut = shutil.copytree(adapters["a"], tmp_path / "cut")
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ConfigError, match=r"adapter_model.safetensors is not usable: its tensors need"):
        check_adapters(str(cut))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "peft" else real(name, *rest))
    with pytest.raises(ConfigError, match=r"model.lora=.* needs the peft package, which is not installed here"):
        check_adapters(str(adapters["a"]))


def test_an_adapter_that_does_not_fit_the_model_is_named(adapters, tmp_path):
    from distgen.models.tiny import build_tiny_model, build_tokenizer
    from distgen.config import TinyModelConfig
    from distgen.models.lora import merge_adapter

    wider = build_tiny_model(TinyModelConfig(hidden_size=128), build_tokenizer())
    with pytest.raises(ConfigError, match=r"model.lora='.*' cannot be loaded onto this model: RuntimeError"):
        merge_adapter(wider, str(adapters["a"]))


def test_the_job_settings_and_record_keys_cover_the_adapters(adapters, tmp_path):
    a, b = str(adapters["a"]), str(adapters["b"])
    merged = job_settings(RunConfig(model=ModelConfig(source="tiny", lora=a)))
    named = job_settings(RunConfig(model=ModelConfig(source="tiny", lora={"a": a, "b": b})))
    assert merged["model.lora_merged"] is True and named["model.lora_merged"] is False
    files = ("adapter_config.json", "adapter_model.safetensors")
    assert {k for k in named if k.startswith("model.lora.")} == {f"model.lora.{n}[{f}]" for n in "ab" for f in files}
    assert {k for k in merged if k.startswith("model.lora.")} == {f"model.lora.default[{f}]" for f in files}
    assert named["model.lora.a[adapter_model.safetensors]"] == merged["model.lora.default[adapter_model.safetensors]"]
    assert "model.lora_merged" not in job_settings(RunConfig(model=ModelConfig(source="tiny")))
    changed = shutil.copytree(adapters["b"], tmp_path / "b")
    weights = changed / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    renamed = job_settings(RunConfig(model=ModelConfig(source="tiny", lora={"a": a, "b": str(changed)})))
    assert [k for k in named if named[k] != renamed[k]] == ["model.lora.b[adapter_model.safetensors]"]
    # a record's key holds its adapter's name; a record without one keeps the key it had before `lora` existed
    assert record_key(Prompt(0, "x", "hi", lora="a")) != record_key(Prompt(0, "x", "hi", lora="b"))
    assert record_key(Prompt(0, "x", "hi")) == 1771184260806383393  # as distgen computed it before


def test_a_rerun_reruns_only_the_record_whose_adapter_changed(tiny_model_dir, adapters, merged, tokenizer, tmp_path,
                                                              capsys):
    out = tmp_path / "out"
    args = [f"model.lora={{a: {adapters['a']}, b: {adapters['b']}}}"]
    assert run_in_process(lora_job(tiny_model_dir, write_prompts(tmp_path / "p.jsonl", CHOSEN), out, *args)) == 0
    assert run_in_process(lora_job(tiny_model_dir, tmp_path / "p.jsonl", out, *args)) == 0
    assert "already finished" in capsys.readouterr().out
    changed = [{**p, "lora": "b"} if p["id"] == "fox" else p for p in CHOSEN]
    assert run_in_process(lora_job(tiny_model_dir, write_prompts(tmp_path / "p.jsonl", changed), out, *args)) == 0
    assert f"resuming: {len(CHOSEN) - 1} of {len(CHOSEN)} prompts already done" in capsys.readouterr().out
    assert_each_equals_its_merged_model(read_outputs(out), changed, merged, tokenizer)

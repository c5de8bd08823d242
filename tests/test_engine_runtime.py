"""Engine runtime options: autocast of fp32 weights, the scheduler and compile name tables, freeing the cache at the end."""
import copy

import pytest
import torch

from distgen.catalog import check_section
from distgen.config import GenerationConfig
from distgen.engine.build import COMPILE
from distgen.engine.scheduler import SCHEDULERS
from distgen.common.errors import ConfigError
from distgen.catalog.load import help_text, load_config
from tests.helpers import DEFAULT_BUDGET, PROMPTS, engine_for, generate_all


@pytest.mark.parametrize("autocast,cache,scheduler", [("bf16", "static", "continuous"), ("fp16", "dynamic", "static"),
                                                      ("bf16", "static", "chunked")])
def test_autocast_runs_with_every_budget_and_fp32_logits(tiny_model, tokenizer, autocast, cache, scheduler):
    # Half-precision compute changes a random model's tokens, so budgets, vocabulary and dtypes are checked.
    cfg = GenerationConfig(max_new_tokens=DEFAULT_BUDGET, batch_size=3, cache=cache, compile="off",
                           scheduler=scheduler, autocast=autocast, prefill_chunk_tokens=8)
    engine = engine_for(tiny_model, tokenizer, PROMPTS, cfg)
    assert f"autocast to {autocast}" in engine.choice
    assert "distgen CPU kernels" not in engine.choice and "decode attention: distgen" not in engine.choice  # fp32 only
    logits_dtypes = []
    decode = engine.runner.decode
    engine.runner.decode = lambda inputs: logits_dtypes.append(decode(inputs).dtype) or decode(inputs)
    got = generate_all(engine)
    assert [len(got[r["id"]].token_ids) for r in PROMPTS] == [r.get("max_new_tokens", DEFAULT_BUDGET) for r in PROMPTS]
    assert all(0 <= t < len(tokenizer) for c in got.values() for t in c.token_ids)
    assert set(logits_dtypes) == {torch.float32}
    if cache == "static":  # the values written under autocast are in the half dtype
        assert engine.kv.cache.layers[0].values.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[autocast]


def test_autocast_is_refused_for_half_weights_and_unknown_names(tiny_model, tokenizer):
    with pytest.raises(ConfigError, match="generation.autocast='bf16' is not allowed: autocast is for fp32 weights"):
        load_config(["model=tiny", "model.dtype=bf16", "dataset=demo", "generation.autocast=bf16"])
    with pytest.raises(ConfigError, match="generation.autocast='int8' is not allowed: expected one of none, bf16, fp16"):
        check_section("generation", GenerationConfig(autocast="int8"))
    half = engine_for(copy.deepcopy(tiny_model).to(torch.bfloat16), tokenizer, PROMPTS[:1],
                      GenerationConfig(autocast="fp16", compile="off"))
    assert "no autocast: generation.autocast=fp16 is for fp32 weights" in half.choice and half.runner.autocast is None


@pytest.mark.parametrize("table,names,key,bad", [(SCHEDULERS, ("static", "continuous", "chunked"), "scheduler", "rolling"),
                                                  (COMPILE, ("auto", "on", "off"), "compile", "always")])
def test_scheduler_and_compile_names_come_from_one_table(table, names, key, bad):
    assert table.names() == names
    with pytest.raises(ConfigError, match=f"generation.{key}='{bad}' is not allowed: expected one of "
                                          + ", ".join(names)):
        check_section("generation", GenerationConfig(**{key: bad}))
    text = help_text()
    for name in names:
        assert f"generation.{key}={name} " in text


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_close_frees_the_cache_buffers(tiny_model, tokenizer, cache):
    engine = engine_for(tiny_model, tokenizer, PROMPTS, GenerationConfig(batch_size=3, cache=cache, compile="off"))
    generate_all(engine)
    engine.close()
    if cache == "static":
        assert all(layer.keys is None and layer.values is None for layer in engine.kv.cache.layers)
        assert engine.kv.col_pos.numel() == 0
    else:
        assert not engine.kv.cache.layers or all(getattr(l, "keys", None) is None for l in engine.kv.cache.layers)
        assert engine.kv.mask.numel() == 0

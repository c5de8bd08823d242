import torch

from distgen.engine.sampling import filter_logits


def test_top_k_keeps_the_k_best():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    kept = filter_logits(logits, top_k=2, top_p=1.0).isfinite()
    assert kept.tolist() == [[False, True, True, False]]


def test_top_p_keeps_the_smallest_set_reaching_p_and_always_the_best():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_logits(probs.log(), top_k=0, top_p=0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert filter_logits(probs.log(), top_k=0, top_p=0.1).isfinite().tolist() == [[True, False, False, False]]


def test_temperature_zero_is_greedy_in_the_config_and_in_a_record(tiny_model, tokenizer):
    from conftest import DEFAULT_BUDGET, PROMPTS, assert_matches_generate
    from distgen.catalog import check_section
    from distgen.config import GenerationConfig
    from distgen.engine.sampling import row_sampling
    from distgen.inputs.records import Prompt
    from helpers import engine_for, generate_all

    cfg = check_section("generation", GenerationConfig(max_new_tokens=DEFAULT_BUDGET, do_sample=True, temperature=0.0,
                                                       compile="off"))
    assert not row_sampling(cfg, Prompt(0, "a", "x")).do_sample
    assert row_sampling(cfg, Prompt(0, "a", "x", temperature=0.7)).do_sample  # a record's own temperature decides
    assert not row_sampling(GenerationConfig(do_sample=True), Prompt(0, "a", "x", temperature=0.0)).do_sample
    assert_matches_generate(tiny_model, tokenizer, generate_all(engine_for(tiny_model, tokenizer, PROMPTS, cfg)))

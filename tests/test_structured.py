"""Structured output (generation.json_schema / regex / choice and a record's own, engine/grammar.py through xgrammar):
the random tiny model's completions follow each grammar and end with it ("stop"), greedy tokens equal the argmax of
HF's forward under the grammar's mask step by step, unconstrained records in the same batch still equal
`model.generate`, a grammar the library refuses is an error record of its record alone, and resume keys and job
settings cover the grammar."""
import json
import re
import subprocess
import sys

import jsonschema
import pytest
import torch

from distgen.common.errors import ConfigError
from distgen.config import GenerationConfig, ModelConfig, RunConfig
from distgen.inputs.keys import record_key
from distgen.inputs.records import Prompt
from distgen.run import main as run_in_process
from tests.helpers import (PROMPTS, REPO, assert_matches_generate, child_env, engine_for, generate_all, read_outputs,
                           run_module, write_prompts)

xgr = pytest.importorskip("xgrammar", reason="structured output needs xgrammar (scripts/setup.sh installs it)")

# Bounded strings and numbers: a random-init model closes them (an unbounded string runs to its budget).
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3},
    "ok": {"type": "boolean"}}, "required": ["name", "age", "ok"]}
REGEX = r"[a-c]{2,5}-[0-9]{1,3}"
CHOICES = ["yes", "no", "maybe not", "\"quoted\" \\ é"]
BUDGET = 120  # enough for the tiny model's JSON to close
RECORDS = [{"id": r["id"], "prompt": r["prompt"]} for r in PROMPTS]


def completions(model, tokenizer, records, eos_ids, **settings):
    cfg = GenerationConfig(max_new_tokens=BUDGET, batch_size=3, compile="off", **settings)
    engine = engine_for(model, tokenizer, records, cfg, eos_ids=eos_ids)
    return engine, generate_all(engine)


def text(tokenizer, completion) -> str:
    return tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def reference_constrained(model, tokenizer, prompt: str, grammar, budget: int, eos: int) -> list[int]:
    """Greedy, one token at a time: the argmax of HF's forward over the whole sequence, under the grammar's mask."""
    from distgen.engine.grammar import GrammarBook, apply_bitmask, step_bitmask
    matcher = GrammarBook(tokenizer, model.config.vocab_size, [eos]).matcher(grammar)
    ids = tokenizer(prompt)["input_ids"]
    new = []
    while len(new) < budget and not matcher.is_terminated():
        with torch.no_grad():
            logits = model(torch.tensor([ids + new])).logits[:, -1].float()
        rows, bitmask = step_bitmask([matcher], logits.shape[-1])
        apply_bitmask(logits, bitmask, rows)
        new.append(int(logits.argmax()))
        assert matcher.accept_token(new[-1])
    return new


def test_json_schema_completions_are_json_that_validates(tiny_model, tokenizer):
    from distgen.inputs.grammar import Grammar, schema_text
    eos = tokenizer.eos_token_id
    engine, got = completions(tiny_model, tokenizer, RECORDS, [eos], json_schema=SCHEMA)
    for record in RECORDS:
        completion = got[record["id"]]
        assert completion.finish_reason == "stop" and completion.token_ids[-1] == eos  # the grammar ended it
        jsonschema.validate(json.loads(text(tokenizer, completion)), SCHEMA)
        want = reference_constrained(tiny_model, tokenizer, record["prompt"], Grammar("json_schema", schema_text(SCHEMA)),
                                     BUDGET, eos)
        assert completion.token_ids == want, record["id"]
    assert engine.grammars.compiles == 1  # one distinct grammar: compiled once on this rank


def test_choice_completions_are_one_of_the_choices(tiny_model, tokenizer):
    _, got = completions(tiny_model, tokenizer, RECORDS, [tokenizer.eos_token_id], choice=CHOICES)
    assert all(c.finish_reason == "stop" and text(tokenizer, c) in CHOICES for c in got.values()), got
    assert len({text(tokenizer, c) for c in got.values()}) >= 2  # the prompts choose, not the grammar alone


def test_regex_completions_match_it_whole(tiny_model, tokenizer):
    _, got = completions(tiny_model, tokenizer, RECORDS, [tokenizer.eos_token_id], regex=REGEX)
    for c in got.values():
        assert c.finish_reason == "stop" and re.fullmatch(REGEX, text(tokenizer, c)), text(tokenizer, c)


def test_a_records_own_grammar_and_a_bad_one_each_its_own(tiny_model, tokenizer):
    """Records choose their grammar (replacing generation's); one the library cannot compile, or two grammars on a
    record, is an error record naming the field; unconstrained records in the same batch equal model.generate."""
    eos = tokenizer.eos_token_id
    plain = [dict(r, max_new_tokens=8) for r in PROMPTS[:3]]
    records = plain + [
        {"id": "schema", "prompt": "Hi", "json_schema": json.dumps(SCHEMA)},  # as a table's column: its JSON text
        {"id": "regex", "prompt": "Hi", "regex": REGEX}, {"id": "choice", "prompt": "Hi", "choice": CHOICES},
        {"id": "bad-schema", "prompt": "Hi", "json_schema": {"type": "nonsense"}},
        {"id": "bad-regex", "prompt": "Hi", "regex": "a(b"},
        {"id": "two", "prompt": "Hi", "regex": "a", "choice": ["a"]},
        {"id": "not-object", "prompt": "Hi", "json_schema": [1]}]
    engine, got = completions(tiny_model, tokenizer, records, [eos])
    assert_matches_generate(tiny_model, tokenizer, {k: got[k] for k in ("short", "france", "story")}, plain, [eos])
    assert json.loads(text(tokenizer, got["schema"])).keys() == SCHEMA["properties"].keys()
    assert re.fullmatch(REGEX, text(tokenizer, got["regex"])) and text(tokenizer, got["choice"]) in CHOICES
    errors = {k: got[k].error for k in ("bad-schema", "bad-regex", "two", "not-object")}
    assert all(got[k].finish_reason == "error" for k in errors)
    assert errors["bad-schema"] == 'json_schema is not allowed: xgrammar cannot compile it: Unsupported type "nonsense"'
    assert errors["bad-regex"].startswith("regex is not allowed: xgrammar cannot compile it: Regex parsing error")
    assert errors["two"] == "choice is not allowed with regex: a record gives at most one of json_schema, regex, choice"
    assert errors["not-object"].startswith("json_schema=[1] is not allowed: must be a JSON schema: an object")
    assert engine.grammars.compiles == 5  # each distinct grammar once, a failure too


def test_a_grammar_is_not_pipelined_and_gives_the_same_tokens(tiny_model, tokenizer):
    """Where steps are pipelined (rows addressed by slot id), a constrained row's step lands before the next is
    scheduled (its mask needs every token it was launched with): the same tokens as the synchronous path, greedy
    and sampled, constrained and not, with chunked prefills mixing in."""
    records = [dict(r, choice=CHOICES) if i % 3 == 0 else dict(r, regex=REGEX) if i % 3 == 1 else r
               for i, r in enumerate(RECORDS)]
    sampled = [dict(r, temperature=0.9, seed=i) for i, r in enumerate(records)]

    def run(attention, records):
        cfg = GenerationConfig(max_new_tokens=12, batch_size=3, cache="static", compile="off", scheduler="chunked",
                               prefill_chunk_tokens=10, cpu_kernels="torch", attention=attention)
        engine = engine_for(tiny_model, tokenizer, records, cfg, eos_ids=[tokenizer.eos_token_id])
        assert engine.pipelined == (attention == "varlen_reference")
        return {k: (c.token_ids, c.finish_reason) for k, c in generate_all(engine).items()}
    for batch in (records, sampled):
        assert run("varlen_reference", batch) == run("torch_sdpa", batch)


def test_an_out_of_memory_back_off_after_a_constrained_step_landed_loses_no_record(tiny_model, tokenizer,
                                                                                  monkeypatch):
    """A pipelined engine lands a constrained step before scheduling the next; a request that step finished is not
    running any more, so when the next step runs out of memory its completion must still be returned (the back-off
    requeues only the running requests). Whatever step the error comes at: every record once, the clean tokens."""
    from distgen.engine.backoff import INJECT_ENV
    cfg = GenerationConfig(max_new_tokens=20, batch_size=4, cache="static", compile="off", cpu_kernels="torch",
                           attention="varlen_reference", choice=CHOICES)

    def run():
        engine = engine_for(tiny_model, tokenizer, RECORDS, cfg, eos_ids=[tokenizer.eos_token_id])
        assert engine.pipelined
        return engine, {k: (c.token_ids, c.finish_reason) for k, c in generate_all(engine).items()}
    clean = run()[1]
    for step in range(1, 10):
        monkeypatch.setenv(INJECT_ENV, str(step))
        engine, faulted = run()
        assert engine.backoff.count == 1
        assert faulted == clean, step


def test_an_assisted_engine_refuses_a_records_grammar(tiny_model, tokenizer):
    from distgen.engine.assist import AssistantSpec
    cfg = GenerationConfig(max_new_tokens=6, batch_size=2, compile="off", cache="static")
    records = [{"id": "g", "prompt": "Hi", "regex": REGEX}, {"id": "plain", "prompt": "Hi"}]
    got = generate_all(engine_for(tiny_model, tokenizer, records, cfg, assistant=AssistantSpec("prompt_lookup")))
    assert got["g"].finish_reason == "error" and "not allowed with model.assistant" in got["g"].error
    assert got["plain"].finish_reason != "error"


def test_resume_keys_and_job_settings_cover_the_grammar(tmp_path):
    from distgen.outputs.resume import job_settings
    keys = {record_key(Prompt(0, "a", "x", **grammar)) for grammar in (
        {}, {"json_schema": json.dumps(SCHEMA)}, {"json_schema": json.dumps({**SCHEMA, "required": ["name"]})},
        {"regex": "a"}, {"regex": "b"}, {"choice": ("a",)})}
    assert len(keys) == 6
    # a record without a grammar keeps the key it had before records could have one
    assert record_key(Prompt(0, "a", "x")) == record_key(Prompt(0, "a", "x", json_schema=None, regex=None))
    def settings(**generation):
        return job_settings(RunConfig(model=ModelConfig(source="tiny"), generation=GenerationConfig(**generation)))
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    before = settings(json_schema=str(schema))
    schema.write_text(json.dumps({**SCHEMA, "required": ["age"]}))  # the file edited: another job
    assert settings(json_schema=str(schema)) != before
    inline = settings(json_schema={**SCHEMA, "required": ["age"]})
    assert inline == settings(json_schema=str(schema))  # by content, whether a file or inline
    assert settings(regex="a") != settings(regex="b") != settings(choice=["b"])
    assert not any(key.split(".")[-1] in ("json_schema", "regex", "choice") for key in settings())  # as before


def test_config_checks_name_the_key(tmp_path, monkeypatch):
    from distgen.catalog.load import load_config
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    assert load_config(["model=tiny", "dataset=demo", f"generation.json_schema={schema}"]).generation.json_schema
    cfg = load_config(["model=tiny", "dataset=demo", "generation.json_schema={type: object}"])
    assert cfg.generation.json_schema == {"type": "object"}
    (tmp_path / "list.json").write_text("[1]")
    for overrides, message in [
            (["generation.regex=a", "generation.choice=[a]"], "generation.choice=['a'] is not allowed: "
                                                             "generation.regex is set too"),
            (["generation.regex=a", "generation.min_tokens=2"], "generation.min_tokens=2 is not allowed: must be 0 "
                                                                "with generation.regex"),
            (["generation.regex='a(b'"], "generation.regex='a(b' is not allowed: xgrammar cannot compile it: Regex "
                                         "parsing error at position 4"),
            ([f"generation.json_schema={tmp_path / 'none.json'}"], "cannot be read as a JSON schema file"),
            ([f"generation.json_schema={tmp_path / 'list.json'}"], "holds a list: a JSON schema is an object"),
            (["generation.choice=[]"], "generation.choice=[] is not allowed: expected a non-empty list"),
            (["generation.regex=a", "model.assistant=prompt_lookup"], "model.assistant=prompt_lookup verifies drafts")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(["model=tiny", "dataset=demo", *overrides])
    monkeypatch.setattr("distgen.inputs.grammar.PACKAGE", "xgrammar_not_installed")
    with pytest.raises(ConfigError, match=r"generation.regex is not possible: structured output needs the "
                                          r"xgrammar_not_installed package, which is not installed: pip install"):
        load_config(["model=tiny", "dataset=demo", "generation.regex=a"])


def test_a_records_grammar_without_the_library_is_an_error_record(tiny_model, tokenizer, monkeypatch):
    monkeypatch.setattr("distgen.inputs.grammar.PACKAGE", "xgrammar_not_installed")
    records = [{"id": "g", "prompt": "Hi", "regex": REGEX}, {"id": "plain", "prompt": "Hi", "max_new_tokens": 8}]
    _, got = completions(tiny_model, tokenizer, records, [tokenizer.eos_token_id])
    assert got["g"].finish_reason == "error" and got["g"].error.startswith(
        "structured output needs the xgrammar_not_installed package, which is not installed: pip install")
    assert_matches_generate(tiny_model, tokenizer, {"plain": got["plain"]}, records[1:], [tokenizer.eos_token_id])


def test_distgen_runs_without_the_grammar_library():
    """Nothing imports xgrammar until a grammar is asked for: a plain job runs where it is not installed."""
    code = ("import sys, distgen.run, distgen.catalog, distgen.engine.grammar, distgen.api; "
            "assert 'xgrammar' not in sys.modules, 'xgrammar imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), check=True)


def check_outputs(out, budget):
    records = read_outputs(out)
    assert [r["id"] for r in records] == [r["id"] for r in RECORDS] + ["own"]
    for record in records[:-1]:
        if record["finish_reason"] == "stop":
            jsonschema.validate(json.loads(record["completion"]), SCHEMA)
        else:
            assert record["finish_reason"] == "length" and record["completion_tokens"] == budget
    assert records[-1]["completion"] in CHOICES  # its own grammar replaces the job's
    return records


@pytest.mark.parametrize("ranks", [None, 2], ids=["in-process", "torchrun-2-ranks"])
def test_a_real_job_with_a_schema_file(tiny_model_dir, tmp_path, ranks):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    prompts = write_prompts(tmp_path / "prompts.jsonl", RECORDS + [{"id": "own", "prompt": "Hi", "choice": CHOICES}])
    out = tmp_path / "out"
    args = [f"model={tiny_model_dir}", f"dataset={prompts}", f"output.dir={out}", f"generation.json_schema={schema}",
            f"generation.max_new_tokens={BUDGET}", "generation.batch_size=2", "output.print_table=false"]
    if ranks is None:
        assert run_in_process(args) == 0
    else:
        result = run_module("distgen.run", args, nproc=ranks)
        assert result.returncode == 0, result.stderr[-3000:]
    records = check_outputs(out, BUDGET)
    assert sum(r["finish_reason"] == "stop" for r in records) >= len(records) - 1

"""Bad input never kills a job: a bad record gets an error record, a bad file stops before any worker."""
import importlib.util
import re
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from distgen.common.errors import ConfigError
from distgen.launch import main as launch_main
from distgen.launchers import LAUNCHERS
from distgen.parallel.layouts import LAYOUTS
from distgen.catalog.load import load_config
from distgen.inputs.source import open_prompts
from distgen.outputs.resume import job_fingerprint
from distgen.job.prepare import dataset_cache
from distgen.run import main as run_in_process
from tests.helpers import (REPO, Tmpfs, child_env, journaled, read_outputs, read_stats, reference_greedy,
                           save_architecture, unreadable_runner, write_prompts)

CONTEXT = 128  # gpt2's n_positions in tests/helpers/models.py
# A tmpfs that holds the dataset's Arrow cache and the manifest, but not the outputs of 300 records.
DISK_BYTES = 96 * 1024
BUDGET = 4
LONG = "x" * 140
RECORDS = [
    {"id": "ok", "prompt": "The quick brown fox"},
    {"id": "long", "prompt": "The end: " + LONG},
    {"id": "empty", "prompt": ""},
    {"id": "budget", "prompt": "Hi", "max_new_tokens": -2},
    {"id": "last", "prompt": "def f(x):", "max_new_tokens": 2},
]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_architecture("gpt2", tmp_path_factory.mktemp("gpt2") / "m")


def job(model_dir, prompts, out, *extra):
    return [f"model={model_dir}", f"dataset={prompts}", f"output.dir={out}", f"generation.max_new_tokens={BUDGET}",
            "generation.eos_token_ids=[]", "output.print_table=false", *extra]


def test_bad_records_get_error_records_and_the_job_goes_on(gpt2_dir, tokenizer, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", RECORDS)
    assert run_in_process(job(gpt2_dir, prompts, tmp_path / "out")) == 0
    records = read_outputs(tmp_path / "out")
    assert [r["id"] for r in records] == [r["id"] for r in RECORDS]
    assert [r["finish_reason"] for r in records] == ["length", "error", "error", "error", "length"]
    assert records[1] == {
        "index": 1, "id": "long", "sample_index": 0, "prompt": RECORDS[1]["prompt"], "completion": "",
        "prompt_tokens": 149,
        "completion_tokens": 0, "finish_reason": "error", "completion_token_ids": [],
        "error": "prompt of 149 tokens plus max_new_tokens=4 exceeds the model's context of 128 tokens "
                 "(max_position_embeddings=128)",
        "max_new_tokens": None}  # an input column: a field another record has is null where this one lacks it
    assert records[2]["error"] == "prompt tokenizes to nothing"
    assert records[3]["error"] == "max_new_tokens=-2 is not allowed: must be an integer in [1, 2147483646]"
    assert "error" not in records[0]
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir, dtype=torch.float32).eval()
    assert records[0]["completion_token_ids"] == reference_greedy(model, tokenizer, RECORDS[0]["prompt"], BUDGET, [])
    assert read_stats(tmp_path / "out")["summary"]["errors"] == 3


def test_too_long_truncate_left_and_fail(gpt2_dir, tokenizer, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", RECORDS[:2])
    assert run_in_process(job(gpt2_dir, prompts, tmp_path / "t", "dataset.too_long=truncate_left")) == 0
    kept = read_outputs(tmp_path / "t")[1]
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir, dtype=torch.float32).eval()
    # byte-level tokenizer: the last CONTEXT - BUDGET tokens are the last CONTEXT - BUDGET characters
    assert kept["prompt_tokens"] == CONTEXT - BUDGET and kept["finish_reason"] == "length"
    assert kept["completion_token_ids"] == reference_greedy(model, tokenizer, RECORDS[1]["prompt"][-(CONTEXT - BUDGET):],
                                                            BUDGET, [])
    assert run_in_process(job(gpt2_dir, prompts, tmp_path / "f", "dataset.too_long=fail")) == 2
    assert ("config error: 1 prompts do not fit (dataset.too_long=fail; error_record or truncate_left keep the job "
            "going): id 'long': prompt of 149 tokens") in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


def save_tokenizer_without_specials(folder):
    core = Tokenizer(models.WordLevel(vocab={"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core).save_pretrained(folder)


def test_tokenizer_without_pad_or_eos_pads_with_id_0_and_says_so(gpt2_dir, tmp_path, capsys):
    shutil.copytree(gpt2_dir, tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "m" / name).unlink()
    save_tokenizer_without_specials(tmp_path / "m")
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "a b a"}, {"prompt": "b"}])
    assert run_in_process(job(tmp_path / "m", prompts, tmp_path / "out", "generation.eos_token_ids=null")) == 0
    assert "has neither a pad nor an EOS token: padding with token id 0 ('a', masked out)" in capsys.readouterr().err
    assert [r["completion_tokens"] for r in read_outputs(tmp_path / "out")] == [BUDGET, BUDGET]


@pytest.mark.parametrize("case, message", [
    ("no-tokenizer", r"model.path='.*/m' has no usable tokenizer \(no vocabulary"),
    ("model-name", r"model='llama-7b' is neither a model folder \(saved with save_pretrained\) that exists .* nor one "
                   r"of the model configs: pretrained, tiny"),
    ("plus-key", r"unknown config key 'generation.temprature' \(added with '\+'\); keys allowed under generation: "
                 r"max_new_tokens"),
    ("bad-json", r"p.jsonl:2: not valid JSON"),
])
def test_unusable_inputs_stop_before_any_worker(case, message, gpt2_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", RECORDS[:1])
    model = tmp_path / "m"
    shutil.copytree(gpt2_dir, model)
    args = job(model, prompts, tmp_path / "out")
    if case == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (model / name).unlink()
    elif case == "model-name":
        args[0] = "model=llama-7b"
    elif case == "plus-key":
        args.append("+generation.temprature=0.5")
    elif case == "bad-json":
        prompts.write_text(prompts.read_text() + "{'prompt': 'single quotes'}\n")
    assert run_in_process(args) == 2
    assert capsys.readouterr().err.startswith("distgen: config error: ")
    with pytest.raises(Exception, match=message):
        from distgen.job.prepare import prepare_job
        prepare_job(load_config(args))
    assert not (tmp_path / "out").exists()


def test_a_layout_whose_package_is_missing_is_refused_before_start(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"layout='zero3' is not allowed: it needs the deepspeed package"):
        load_config(["model=tiny", "dataset=demo", "layout=zero3"])


def test_outputs_are_readable_by_others(gpt2_dir, tmp_path):
    old = os.umask(0o022)
    try:
        assert run_in_process(job(gpt2_dir, write_prompts(tmp_path / "p.jsonl", RECORDS[:1]), tmp_path / "out")) == 0
    finally:
        os.umask(old)
    for name in ("outputs.jsonl", "stats.json"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o644


def fingerprint(*overrides):
    cfg = load_config(list(overrides))
    return job_fingerprint(cfg, open_prompts(cfg.dataset, dataset_cache(cfg)).digest())


def test_fingerprint_follows_content_not_spelling_or_batching(gpt2_dir, tmp_path, monkeypatch):
    prompts = write_prompts(tmp_path / "p.jsonl", RECORDS[:2])
    base = fingerprint(f"model={gpt2_dir}", f"dataset={prompts}")
    monkeypatch.chdir(gpt2_dir.parent)
    copy = shutil.copytree(gpt2_dir, tmp_path / "copy")
    for spelling in (f"{gpt2_dir}/", f"./{gpt2_dir.name}", f"{gpt2_dir}/../{gpt2_dir.name}", str(copy)):
        assert fingerprint(f"model={spelling}", f"dataset={prompts}", "generation.batch_size=1",
                           "generation.scheduler=static", "generation.prefill_chunk_tokens=64",
                           "layout=fsdp") == base, spelling
    assert fingerprint(f"model={gpt2_dir}", f"dataset={prompts}", "generation.max_new_tokens=3") != base
    assert fingerprint(f"model={gpt2_dir}", f"dataset={prompts}", "dataset.too_long=truncate_left") != base
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert fingerprint(f"model={copy}", f"dataset={prompts}") != base


def test_fingerprint_counts_the_assistant_and_its_settings():
    """A draft changes sampled tokens (not greedy ones); a record may sample on its own, so it always counts."""
    base = load_config(["model=tiny", "dataset=demo"])

    def of(model=None, **generation):
        cfg = replace(base, model=replace(base.model, **(model or {})),
                      generation=replace(base.generation, **generation))
        return job_fingerprint(cfg, "prompts digest")

    tiny = {"assistant": "tiny"}
    plain = of()
    assert of(num_assistant_tokens=2, prompt_lookup_ngram=2) == plain  # no assistant: its settings do nothing
    assisted = {of({"assistant": "prompt_lookup"}), of(tiny), of({**tiny, "assistant_seed": 2}),
                of(tiny, num_assistant_tokens=2), of(tiny, assistant_schedule="heuristic"),
                of(tiny, assistant_confidence_threshold=0.5), of({"assistant": "prompt_lookup"}, prompt_lookup_ngram=2)}
    assert len(assisted) == 7 and plain not in assisted
    assert of(do_sample=True, temperature=0.7) != of(tiny, do_sample=True, temperature=0.7)
    assert of(tiny, batch_size=1) == of(tiny)
    assert of({"quantization": "int8"}) != plain  # quantized weights change the tokens


def test_help_lists_groups_keys_and_defaults(capsys):
    assert launch_main(["--help"]) == 0  # `python -m distgen.launch --help`
    out = capsys.readouterr().out
    for line in ("layout=" + "|".join(LAYOUTS.names()), "launcher=" + "|".join(LAUNCHERS.names()),
                 "generation.max_new_tokens=32",
                 "dataset.too_long=error_record", "launcher.max_restarts=0", "model.path=null"):
        assert f"  {line}\n" in out, line
    assert "python -m distgen.launch launcher=torchrun" in out


def test_help_into_a_closed_pipe_is_no_traceback(tmp_path):
    """`python -m distgen.launch --help | head -3`: the reader leaves before the help is written."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "distgen.launch", "--help"], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        os.close(write)
    assert "Traceback" not in done.stderr and "stopped on an error" not in done.stderr, done.stderr
    assert done.returncode == 141  # as a process a SIGPIPE stopped (what `set -o pipefail` reports)


def test_print_config_works_before_a_model_is_named(capsys):
    assert run_in_process(["--print-config"]) == 0
    assert "path: null" in capsys.readouterr().out


# Records whose settings are out of the range the job can hold; each gets an error record naming the field.
POISON = [
    {"id": 10, "prompt": "A fine first prompt"},
    {"id": 11, "prompt": "A seed past any generator", "temperature": 1.0, "seed": 1e30},
    {"id": 12, "prompt": "A budget past int32", "max_new_tokens": 3000000000},
    {"id": 13, "prompt": "A temperature that is 0 in fp32", "temperature": 1e-300},
    {"id": 14, "prompt": "A negative seed", "temperature": 1.0, "seed": -1},
    {"id": 15, "prompt": "A tiny temperature is greedy", "temperature": 1e-30},
    {"id": 16, "prompt": "The tiniest one too", "temperature": 1.2e-38},
    {"id": 17, "prompt": "A top_k past int64", "top_k": 1e30},
    {"id": "last", "prompt": "And a fine last one", "seed": 2**63, "temperature": 0.7},  # a float column: exact
]
BAD_FIELD = {11: "seed", 12: "max_new_tokens", 13: "temperature", 14: "seed", 17: "top_k"}


def tiny_job(model_dir, prompts, out, *extra):
    return [f"model={model_dir}", f"dataset={prompts}", f"output.dir={out}", f"generation.max_new_tokens={BUDGET}",
            "generation.eos_token_ids=[]", "output.print_table=false", "output.progress_every_s=0", *extra]


def test_poison_records_get_error_records_and_the_job_finishes(tiny_model_dir, tiny_model, tokenizer, tmp_path,
                                                               capsys):
    args = tiny_job(tiny_model_dir, write_prompts(tmp_path / "p.jsonl", POISON), tmp_path / "out")
    assert run_in_process(args) == 0
    records = read_outputs(tmp_path / "out")
    assert [r["id"] for r in records] == [r["id"] for r in POISON]  # every id once, an int id still an int
    for record in records:
        field = BAD_FIELD.get(record["id"])
        if field:
            assert record["finish_reason"] == "error" and record["error"].startswith(f"{field}="), record
            assert "is not allowed: must be" in record["error"]
        else:
            assert "error" not in record and record["completion_tokens"] == BUDGET, record
    # A tiny temperature samples the argmax (a logit overflowing fp32 is held at its largest number, not NaN).
    for tiny in (5, 6):
        assert records[tiny]["completion_token_ids"] == reference_greedy(tiny_model, tokenizer, POISON[tiny]["prompt"],
                                                                         BUDGET, [])
    assert read_stats(tmp_path / "out")["summary"]["errors"] == len(BAD_FIELD)
    capsys.readouterr()
    assert run_in_process(args) == 0
    assert "already finished" in capsys.readouterr().out


@pytest.mark.parametrize("seed", [10_000_000_000_000_000, 2**64 - 1])
def test_a_large_generation_seed_samples(seed, tiny_model_dir, tmp_path):
    """seed * 1_000_003 + index once overflowed torch's 64-bit seed at the first sampled token."""
    args = tiny_job(tiny_model_dir, write_prompts(tmp_path / "p.jsonl", POISON[:1] + POISON[-1:]), tmp_path / "out",
                    "generation.do_sample=true", f"generation.seed={seed}")
    assert run_in_process(args) == 0
    assert [r["finish_reason"] for r in read_outputs(tmp_path / "out")] == ["length", "length"]


@pytest.mark.parametrize("override, message", [
    ("generation.seed=18446744073709551616", "generation.seed=18446744073709551616 is not allowed: must be an integer "
                                             "in [0, 18446744073709551615]"),
    ("generation.seed=-1", "generation.seed=-1 is not allowed"),
    ("generation.max_new_tokens=3000000000", "generation.max_new_tokens=3000000000 is not allowed: must be >= 1 and "
                                             "<= 2147483646"),
    ("generation.temperature=1e-300", "generation.temperature=1e-300 is not allowed: must be 0 (greedy) or a finite number"),
    ("dataset.shuffle_seed=-3", "dataset.shuffle_seed=-3 is not allowed"),
    ("generation.eos_token_ids=[-1]", "generation.eos_token_ids=[-1] is not allowed"),
])
def test_config_values_out_of_range_stop_before_start(override, message, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", POISON[:1])
    assert run_in_process(["model=tiny", f"dataset={prompts}", f"output.dir={tmp_path / 'out'}", override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, data, message", [
    ("empty.jsonl", b"", r"empty.jsonl' holds no prompts: the file is empty"),
    ("blank.jsonl", b"\n  \n\n", r"blank.jsonl' holds no prompts: the file holds only blank lines"),
    ("blank.txt", b"\xef\xbb\xbf\n\t\n", r"blank.txt' holds no prompts: the file holds only blank lines"),
    ("empty.csv", b"", r"empty.csv' holds no prompts: the file is empty"),
    ("header.csv", b"id,prompt\n\n", r"header.csv' holds no prompts: the file holds only its header line"),
    ("surrogate.jsonl", b'{"prompt": "fine"}\n{"prompt": "half \\ud800 a pair"}\n',
     r"surrogate.jsonl:2: field 'prompt' holds a lone surrogate \('\\ud800' at character 6\), which is not Unicode"),
    ("surrogate-id.jsonl", b'{"id": "\\udfff", "prompt": "x"}\n', r"surrogate-id.jsonl:1: field 'id' holds a lone"),
    ("folder.jsonl", None, r"dataset.path='.*folder.jsonl' is not a file"),
])
def test_unusable_prompts_files_get_a_clear_message(name, data, message, tmp_path, capsys):
    path = tmp_path / name
    if data is None:
        path.mkdir()  # a folder where the file should be
    else:
        path.write_bytes(data)
    fmt = ["dataset.format=jsonl"] if data is None else []
    assert run_in_process(["model=tiny", f"dataset={path}", f"output.dir={tmp_path / 'out'}", *fmt]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distgen: config error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_an_unreadable_prompts_file_gets_a_clear_message(tmp_path):
    runner = unreadable_runner()
    if runner is None:
        pytest.skip("running as root without setpriv: root reads a file of mode 000, so nothing is unreadable")
    path = write_prompts(tmp_path / "locked.jsonl", POISON[:1])
    path.chmod(0)
    done = subprocess.run([*runner, sys.executable, "-m", "distgen.run", "model=tiny", f"dataset={path}",
                           f"output.dir={tmp_path / 'out'}"], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (f"distgen: config error: dataset.path: {path} cannot be read (Permission denied); check "
                           "that it is a file this user may read\n")
    assert not (tmp_path / "out").exists()


def test_a_full_disk_says_what_was_kept_and_a_rerun_finishes(tiny_model_dir, tmp_path, capsys):
    reason = Tmpfs.missing()
    if reason:
        pytest.skip(reason)
    records = [{"id": f"r{i}", "prompt": f"prompt number {i} " + "x" * 40} for i in range(300)]
    prompts = write_prompts(tmp_path / "p.jsonl", records)
    args = lambda out: tiny_job(tiny_model_dir, prompts, out, "generation.batch_size=32")  # noqa: E731
    assert run_in_process(args(tmp_path / "whole")) == 0
    with Tmpfs(tmp_path / "disk", DISK_BYTES) as disk:
        out = disk.path / "out"
        capsys.readouterr()
        assert run_in_process(args(out)) == 1
        err = capsys.readouterr().err
        assert (f"distgen: output.dir='{out}': no space left on device while rank 0 wrote "
                "part-00000-00000.open.jsonl. Kept: what this rank wrote before (at least ") in err, err
        assert "Traceback" not in err
        kept = {r["id"] for r in journaled(out)}
        assert 0 < len(kept) < len(records)
        disk.grow(8 << 20)
        assert run_in_process(args(out)) == 0
        assert f"resuming: {len(kept)} of {len(records)} prompts already done" in capsys.readouterr().out
        assert read_outputs(out) == read_outputs(tmp_path / "whole")


def test_a_disk_too_full_for_the_dataset_cache_is_a_config_error(tiny_model_dir, tmp_path, capsys):
    reason = Tmpfs.missing()
    if reason:
        pytest.skip(reason)
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": f"prompt number {i} " + "x" * 40} for i in range(300)])
    with Tmpfs(tmp_path / "disk", 8 * 1024) as disk:
        assert run_in_process(tiny_job(tiny_model_dir, prompts, disk.path / "out")) == 2
        err = capsys.readouterr().err
        assert err == (f"distgen: config error: dataset.path='{prompts}': its Arrow cache cannot be written to "
                       f"{disk.path}/out/.distgen/datasets (No space left on device); free space under output.dir or "
                       "give another output.dir\n")
        assert not (disk.path / "out").exists()

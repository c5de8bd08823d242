import re

import pytest

from distgen.common.errors import ConfigError
from distgen.catalog.load import expand_path_shorthands, help_text, hydra_value, load_config, split_job_file
from distgen.job.prepare import check_output_dir
from distgen.launch import main as launch_main
from distgen.run import main as run_main
from tests.helpers import run_module, write_prompts

TINY = ["model=tiny", "dataset=demo"]


def test_defaults_compose_into_typed_config():
    cfg = load_config([*TINY, "layout=fsdp", "generation.max_new_tokens=5"])
    assert cfg.layout.name == "fsdp" and cfg.generation.max_new_tokens == 5
    assert cfg.dataset.path.endswith("demo_prompts.jsonl")


@pytest.mark.parametrize("overrides, message", [
    (["generation.max_new_tokens=-1"], r"generation.max_new_tokens=-1 is not allowed: must be >= 1"),
    (["generation.batch_size=0"], r"generation.batch_size=0 is not allowed"),
    (["generation.top_p=1.5"], r"generation.top_p=1.5 is not allowed"),
    (["layout=zero9"], r"Could not find 'layout/zero9'[\s\S]*fsdp[\s\S]*replicate"),
    (["layout.name=zero9"], r"layout.name='zero9' is not allowed: expected one of replicate, fsdp"),
    (["model.dtype=fp8"], r"model.dtype='fp8' is not allowed: expected one of auto, fp32, bf16, fp16"),
    (["generation.max_new_token=3"], r"unknown config key 'generation.max_new_token'; keys allowed under "
                                     r"generation: max_new_tokens, batch_size"),
    (["colour=red"], r"unknown config key 'colour'; keys allowed under the top level: model, layout"),
    (["generation.batch_size=many"], r"generation.batch_size='many' is not allowed: expected auto or an integer >= 1"),
    (["generation.batch_size=2.5"], r"generation.batch_size=2.5 is not allowed"),
    (["output.log_level=loud"],
     r"output.log_level='loud' is not allowed: expected one of debug, info, warning, error$"),
    (["generation.memory_fraction=0"], r"generation.memory_fraction=0.* must be in \(0, 1\]"),
    (["generation.cache=offloaded", "device=cpu"], r"generation.cache='offloaded' is not allowed: it runs on cuda "
                                                   r"only, and this job runs on cpu; caches for cpu: auto, dynamic, "
                                                   r"static, sliding_window, quantized"),
    (["generation.cache=quantized", "generation.cache_quant_backend=quanto", "generation.cache_quant_bits=8"],
     r"generation.cache_quant_bits=8 is not allowed: generation.cache_quant_backend=quanto takes 4 or 2"),
    (["generation.cache_quant_backend=nf4"], r"generation.cache_quant_backend='nf4' is not allowed: expected one "
                                             r"of int8, fp8, quanto, hqq"),
    (["device=tpu"], r"device='tpu' is not allowed: expected one of auto, cpu, cuda"),
    # A value of the wrong type, in the words of the other checks (Hydra said "Error merging override ...").
    (["output.columns=category"], r"^output.columns='category' is not allowed: expected a list, e.g. "
                                  r"output.columns=\[category\]$"),
    (["generation.max_new_tokens=abc"], r"^generation.max_new_tokens='abc' is not allowed: expected an integer$"),
    (["generation.do_sample=maybe"], r"^generation.do_sample='maybe' is not allowed: expected true or false$"),
    # A setting that only other choices read would be ignored: the choice that reads it is named.
    (["generation.compile=off", "generation.compile_mode=max-autotune"],
     r"generation.compile_mode='max-autotune' is not allowed with generation.compile=off, which does not read it: "
     r"it is a setting of generation.compile=auto or on"),
    (["generation.num_assistant_tokens=9"], r"generation.num_assistant_tokens=9 is not allowed with "
                                            r"model.assistant=none, .* model.assistant=tiny or prompt_lookup or draft"),
    (["model.assistant=prompt_lookup", "generation.assistant_confidence_threshold=0.5"],
     r"generation.assistant_confidence_threshold=0.5 is not allowed with model.assistant=prompt_lookup, .* "
     r"model.assistant=tiny or draft"),
    (["generation.cache=static", "generation.cache_quant_backend=fp8"],
     r"generation.cache_quant_backend='fp8' is not allowed with generation.cache=static, .* generation.cache=quantized"),
    (["generation.cache=quantized", "generation.cache_residual_length=64"],
     r"generation.cache_residual_length=64 is not allowed with generation.cache_quant_backend=int8, .* "
     r"generation.cache_quant_backend=quanto or hqq"),
])
def test_bad_keys_and_values_name_the_key_and_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config([*TINY, *overrides])


@pytest.mark.parametrize("overrides", [
    ["generation.compile=on", "generation.compile_mode=max-autotune"],
    ["generation.compile_mode=reduce-overhead"],  # compile=auto may compile
    ["generation.cache_quant_backend=quanto", "generation.cache_quant_bits=2"],  # cache=auto may quantize
    ["model.assistant=prompt_lookup", "generation.prompt_lookup_ngram=2", "generation.num_assistant_tokens=3"],
    ["model.assistant=tiny", "generation.assistant_confidence_threshold=0.5", "generation.assistant_schedule=heuristic"],
])
def test_a_setting_is_accepted_where_the_choice_reads_it(overrides):
    load_config([*TINY, *overrides])


def test_help_says_which_settings_a_choice_reads():
    text = help_text()
    assert "generation.compile=on" in text and "(reads compile_mode, compile_cache_dir)" in text
    assert "(reads num_assistant_tokens, assistant_schedule, prompt_lookup_ngram)" in text


def test_pretrained_model_needs_a_path():
    with pytest.raises(ConfigError, match=r"model.path=None is not allowed: model.source=pretrained needs "
                                          r"model=<model folder, or org/name in the Hugging Face cache>"):
        load_config([])


def test_dataset_and_model_path_shorthands(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    assert expand_path_shorthands([f"dataset={prompts}", "dataset=demo", "model=tiny", "model=./m"]) == [
        f"dataset.path={prompts}", "dataset=demo", "model=tiny", "model.path=./m"]


def test_bad_config_stops_launcher_before_any_worker(tmp_path):
    out = tmp_path / "out"
    result = run_module("distgen.launch", [*TINY, "launcher=torchrun", "generation.max_new_tokens=-1",
                                           f"output.dir={out}"], timeout=120)
    assert result.returncode == 2
    assert "config error: generation.max_new_tokens=-1 is not allowed" in result.stderr
    assert "launching" not in result.stdout and not out.exists()


def test_bad_config_under_torchrun_exits_before_process_group(tmp_path):
    out = tmp_path / "out"
    result = run_module("distgen.run", [*TINY, "layout=fsdp", "generation.typo=1", f"output.dir={out}"],
                        nproc=2, timeout=120)
    assert result.returncode != 0
    assert "unknown config key 'generation.typo'" in result.stderr
    assert not out.exists()


def test_missing_model_folder_is_reported_before_start(tmp_path):
    result = run_module("distgen.run", [f"model={tmp_path / 'no-model'}", "dataset=demo", "--check"], timeout=120)
    assert result.returncode == 2 and "is not a folder with a saved model" in result.stderr


def test_unwritable_output_dir_is_reported_before_start(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"output.dir='.*a-file/out' cannot be written: .*a-file is not a writable"):
        check_output_dir(str(blocker / "out"))
    check_output_dir(str(tmp_path / "new" / "deeper"))
    assert not (tmp_path / "new").exists()


def test_print_config_and_check_flags(capsys, tmp_path):
    assert run_main([*TINY, "layout=fsdp", "--print-config"]) == 0
    assert "name: fsdp" in capsys.readouterr().out
    assert run_main([*TINY, f"output.dir={tmp_path}", "--check"]) == 0
    assert "distgen: config ok, 12 prompts" in capsys.readouterr().out
    assert run_main([*TINY, "generation.max_new_tokens=0", "--check"]) == 2
    assert "config error: generation.max_new_tokens=0" in capsys.readouterr().err


def test_a_log_level_typo_stops_the_launcher_before_anything_starts(tmp_path, capsys):
    out = tmp_path / "out"
    assert launch_main([*TINY, "launcher=torchrun", "output.log_level=verbose", f"output.dir={out}"]) == 2
    assert capsys.readouterr() == ("", "distgen: config error: output.log_level='verbose' is not allowed: expected "
                                       "one of debug, info, warning, error\n")
    assert not out.exists()


def test_quiet_shows_warnings_and_errors_only(tiny_model_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    job = [f"model={tiny_model_dir}", f"dataset={prompts_file}", f"output.dir={out}", "generation.max_new_tokens=2"]
    assert launch_main(job) == 0
    said = capsys.readouterr()
    assert "distgen: engine: " in said.out and f"distgen: wrote 7 records to {out}" in said.out and said.err == ""
    # Another job in the same folder: its earlier outputs are moved aside, a warning, the one line --quiet shows.
    assert launch_main([*job, "generation.max_new_tokens=3", "output.overwrite=true", "--quiet"]) == 0
    said = capsys.readouterr()
    assert said.out == "" and said.err.startswith("distgen: output.overwrite=true: moved the earlier outputs aside ")
    assert said.err.count("\n") == 1
    # The ranks' own command line takes it too (-q), and an error still shows.
    assert run_main([*job, "-q", "generation.max_new_tokens=0"]) == 2
    said = capsys.readouterr()
    assert said.out == "" and said.err.startswith("distgen: config error: generation.max_new_tokens=0 is not allowed")


def test_quiet_still_says_a_job_had_error_records(tiny_model_dir, tmp_path, capsys):
    # A record the engine fails (a logit_bias token past the vocabulary): its own warning line, and the `wrote`
    # line is a warning too, so --quiet does not hide that the job has an error record.
    prompts = write_prompts(tmp_path / "p.jsonl", [{"id": "ok", "prompt": "Hi"},
                                                   {"id": "bad", "prompt": "Hi", "logit_bias": {"999999": 1}}])
    out = tmp_path / "out"
    assert launch_main([f"model={tiny_model_dir}", f"dataset={prompts}", f"output.dir={out}",
                        "generation.max_new_tokens=2", "--quiet"]) == 0
    said = capsys.readouterr()
    assert said.out == "" and said.err == (
        "distgen: record 'bad' (index 1): logit_bias token id 999999 is not allowed: must be below the model's "
        "vocabulary of 259 tokens; it gets an error record\n"
        f"distgen: wrote 2 records to {out / 'outputs.jsonl'} (1 errors)\n")


def test_debug_shows_each_ranks_engine_line(tiny_model_dir, prompts_file, tmp_path, capsys):
    job = [f"model={tiny_model_dir}", f"dataset={prompts_file}", f"output.dir={tmp_path}",
           "generation.max_new_tokens=2"]
    assert run_main([*job, "output.log_level=debug", "output.print_table=false"]) == 0
    assert capsys.readouterr().out.count("distgen: engine: ") == 1  # each rank's once (rank 0's at info)
    assert run_main([*job, "output.print_table=false", f"output.dir={tmp_path / 'info'}"]) == 0
    assert capsys.readouterr().out.count("distgen: engine: ") == 1


@pytest.mark.parametrize("overrides, message", [
    (["layout=replicate", "layout.reshard_after_forward=false"],
     r"unknown config key 'layout.reshard_after_forward'; keys allowed under layout: name$"),
    (["layout=fsdp", "layout.reshard=false"],
     r"unknown config key 'layout.reshard'; keys allowed under layout: name, reshard_after_forward"),
    (["launcher=none", "launcher.nproc_per_node=2"], r"unknown config key 'launcher.nproc_per_node'"),
    (["layout.name=fsdp"], r"layout.name='fsdp' is not allowed: it does not match the selected layout settings "
                           r"\(ReplicateLayout\); choose it with layout=fsdp"),
    (["launcher=torchrun", "launcher.nnodes=2"], r"launcher.rdzv_endpoint='' is not allowed"),
])
def test_each_layout_and_launcher_takes_only_its_own_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config([*TINY, *overrides])


def test_layout_and_launcher_options_come_from_their_tables():
    from distgen.launchers import LAUNCHERS
    from distgen.parallel.layouts import LAYOUTS
    from distgen.catalog.load import compose_config

    assert LAYOUTS.names()[:2] == ("replicate", "fsdp") and LAUNCHERS.names()[:2] == ("none", "torchrun")
    for name in LAYOUTS.names():
        assert type(load_config([*TINY, f"layout={name}"]).layout) is LAYOUTS.entry(name).config
    assert compose_config([*TINY, "layout=fsdp"]).layout.reshard_after_forward is True
    assert "layout=fsdp" in LAYOUTS.describe()


def test_printed_config_is_a_job_file_and_command_line_overrides_win(tmp_path, capsys):
    odd = "/data/my prompts's \\ file.jsonl"  # a space, a quote and a backslash survive the round trip
    assert run_main([*TINY, "layout=fsdp", "generation.max_new_tokens=5", f"dataset.path={hydra_value(odd)}",
                     "--print-config"]) == 0
    (tmp_path / "job.yaml").write_text(capsys.readouterr().out)
    cfg = load_config(["generation.temperature=0.5"], job_file=tmp_path / "job.yaml", check=False)
    assert cfg.layout.name == "fsdp" and cfg.model.source == "tiny"
    assert cfg.generation.max_new_tokens == 5 and cfg.generation.temperature == 0.5
    assert cfg.dataset.path == odd
    assert run_main(["--config-dir", str(tmp_path), "--config-name", "job", "generation.max_new_tokens=7",
                     "--print-config"]) == 0
    assert "max_new_tokens: 7" in capsys.readouterr().out
    # A short job file: the command line's group and path shorthands work as keys of it.
    (tmp_path / "short.yaml").write_text("model: tiny\ndataset: demo\nlayout:\n  name: fsdp\n  shard_group_size: 2\n")
    args, job_file = split_job_file(["-cd", str(tmp_path), "-cn", "short.yaml", "output.dir=x"])
    assert args == ["output.dir=x"] and job_file == tmp_path / "short.yaml"
    short = load_config(args, job_file=job_file)
    assert short.layout.shard_group_size == 2 and short.dataset.path.endswith("demo_prompts.jsonl")


def test_printed_config_keeps_text_that_reads_like_an_interpolation(tmp_path):
    """A stop string or chat template holding `${` is text: printed as a job file and read back, it is the same text,
    not an interpolation OmegaConf fails to resolve (`Interpolation key 'x' not found`)."""
    import dataclasses

    from distgen.catalog.load import config_to_dict, config_to_yaml

    texts = ["${x}", "a\\${y}", "\\\\${z} and ${w}", "$ {not}", "echo $HOME"]
    cfg = load_config(TINY, check=False)
    cfg = dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, stop=texts),
                              dataset=dataclasses.replace(cfg.dataset, chat_template="{{ '${' }}{{ messages }}"))
    (tmp_path / "job.yaml").write_text(config_to_yaml(cfg))
    again = load_config([], job_file=tmp_path / "job.yaml", check=False)
    assert again.generation.stop == texts and again.dataset.chat_template == "{{ '${' }}{{ messages }}"
    assert config_to_dict(again) == config_to_dict(cfg)


def test_a_section_chosen_on_the_command_line_wins_over_the_job_file(tmp_path, capsys):
    """`launcher=torchrun`, `layout=replicate`, `generation=greedy`, `model=tiny` on top of a job file printed with
    other choices: the command line's choice, not a refusal of the file's keys or the file's values silently kept."""
    assert run_main(["model=/models/m", "dataset=demo", "layout=fsdp", "launcher=slurm", "launcher.partition=cpu",
                     "generation=sample", "generation.max_new_tokens=9", "--print-config"]) == 0
    (tmp_path / "job.yaml").write_text(capsys.readouterr().out)
    job = tmp_path / "job.yaml"
    cfg = load_config(["launcher=torchrun", "layout=replicate", "generation=greedy", "model=tiny"], job_file=job,
                      check=False)
    assert (cfg.launcher.name, cfg.layout.name, cfg.generation.do_sample, cfg.model.source) == (
        "torchrun", "replicate", False, "tiny")
    assert cfg.generation.max_new_tokens == 9  # what the chosen option does not set stays the file's
    same = load_config(["launcher=slurm", "launcher.nodes=2", "layout=fsdp"], job_file=job, check=False)
    assert (same.launcher.partition, same.launcher.nodes, same.generation.do_sample) == ("cpu", 2, True)


@pytest.mark.parametrize("text, args, message", [
    ("generation:\n  max_new_token: 3\n", [], r"^job file .*job.yaml: unknown config key 'generation.max_new_token'"),
    ("generation:\n  max_new_tokens: four\n", [], r"^job file .*job.yaml: .*generation.max_new_tokens='four' is not allowed: expected an integer"),
    ("- a\n- b\n", [], r"holds no keys"),
    ("generation: [\n", [], r"is not valid YAML"),
    ("{}\n", ["--config-name", "nowhere"], r"--config-name='nowhere' is not allowed: no job file .*nowhere.yaml"),
    ("{}\n", ["--config-dir", "."], r"needs --config-name NAME"),
])
def test_bad_job_files_name_the_file_and_the_key(text, args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        rest, job_file = split_job_file(args or ["--config-name", "job"])
        load_config([*TINY, *rest], job_file=job_file)


def test_every_name_table_is_checked_and_listed_by_the_catalog():
    """A choice is a Registry in catalog.TABLES: checked by name and listed in --help (the kernel backends are not a
    choice: every registered one prepares the model)."""
    import sys

    from distgen.catalog import TABLES
    from distgen.common.registry import Registry
    from distgen.engine.kernels import KERNEL_BACKENDS

    found = {id(value): value for module in list(sys.modules.values()) if module.__name__.startswith("distgen.")
             for value in vars(module).values() if isinstance(value, Registry)}
    assert [table.key for table in found.values() if table not in TABLES] == [KERNEL_BACKENDS.key]


@pytest.mark.parametrize("option, key, allowed", [
    ("launcher=slurm", "launcher.mode", "torchrun, srun"),
    ("launcher=ray", "launcher.placement", "STRICT_PACK, PACK, SPREAD, STRICT_SPREAD"),
    ("layout=zero3", "layout.offload_param", "none, cpu, nvme"),
])
def test_a_key_of_one_option_is_a_name_table_checked_under_that_option(option, key, allowed, capsys):
    from distgen.catalog import TABLES
    from distgen.config import RunConfig

    table = next(table for table in TABLES if table.key == key)
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}='bogus' is not allowed: expected one of {allowed}$"):
        load_config([*TINY, option, f"{key}=bogus"])
    table.check_name(RunConfig())  # the default layout and launcher have no such key: nothing to check
    assert launch_main(["--help"]) == 0
    help_lines = capsys.readouterr().out.splitlines()
    for name in table.names():
        assert any(line.startswith(f"  {key}={name} ") and f"({option}) " in line for line in help_lines), name

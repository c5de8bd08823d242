"""distgen from Python: distgen.generate runs the command line's job (in process, or through a launcher) and
returns the records in input order; distgen.read_outputs reads a finished or partial job back."""
import json
import logging

import pytest

import distgen
from distgen.common import log
from distgen.common.errors import ConfigError
from tests.helpers import DEFAULT_BUDGET, PROMPTS, reference_greedy

QUIET = ["output.print_table=false", "output.report=false", f"generation.max_new_tokens={DEFAULT_BUDGET}"]


def test_generate_strings_in_process_equals_generate(tiny_model_dir, tiny_model, tokenizer):
    texts = [p["prompt"] for p in PROMPTS]
    records = distgen.generate(texts, model=str(tiny_model_dir), overrides=QUIET)
    assert [r["index"] for r in records] == list(range(len(texts)))
    assert [r["prompt"] for r in records] == texts
    eos = [tokenizer.eos_token_id]
    for record, text in zip(records, texts):
        assert record["completion_token_ids"] == reference_greedy(tiny_model, tokenizer, text, DEFAULT_BUDGET, eos)


def test_generate_records_through_torchrun_keeps_ids_budgets_and_order(tiny_model_dir, tmp_path):
    records = distgen.generate(PROMPTS, model=str(tiny_model_dir),
                               overrides=[*QUIET, "launcher=torchrun", "launcher.nproc_per_node=2",
                                          f"output.dir={tmp_path / 'out'}"])
    assert [r["id"] for r in records] == [p["id"] for p in PROMPTS]
    for record, prompt in zip(records, PROMPTS):
        assert 1 <= record["completion_tokens"] <= prompt.get("max_new_tokens", DEFAULT_BUDGET)
    assert len(json.loads((tmp_path / "out" / "stats.json").read_text())["ranks"]) == 2
    assert list(distgen.read_outputs(tmp_path / "out")) == records


def test_generate_takes_a_dataset_and_read_outputs_reads_a_partial_job(tiny_model_dir, tmp_path):
    from datasets import Dataset
    table = Dataset.from_list([{"id": p["id"], "prompt": p["prompt"]} for p in PROMPTS])
    out = tmp_path / "out"
    records = distgen.generate(table, model=str(tiny_model_dir), overrides=[*QUIET, f"output.dir={out}"])
    assert [r["id"] for r in records] == [p["id"] for p in PROMPTS]
    # As an interrupted run leaves it: no merged file, an open shard holding a record twice, out of order.
    (out / "outputs.jsonl").unlink()
    manifest = json.loads((out / "outputs" / "manifest.json").read_text())
    (out / "outputs" / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    [shard] = sorted((out / "outputs").glob("part-*.jsonl"))
    lines = shard.read_text().splitlines()
    shard.unlink()
    (out / "outputs" / "part-00000-00009.open.jsonl").write_text("\n".join([lines[3], *lines[::-1]]) + "\n")
    assert list(distgen.read_outputs(out)) == records


def test_generate_errors_are_the_command_lines(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="generation.scheduler='rolling' is not allowed: expected one of"):
        distgen.generate(["x"], model=str(tiny_model_dir), overrides=["generation.scheduler=rolling"])
    with pytest.raises(ConfigError, match="dataset= is not allowed among the overrides"):
        distgen.generate(["x"], model=str(tiny_model_dir), overrides=["dataset=demo"])
    with pytest.raises(ConfigError, match="model= is not allowed among the overrides .* name the model once"):
        distgen.generate(["x"], model=str(tiny_model_dir), overrides=["model=tiny"])
    with pytest.raises(ConfigError, match="a list of strings or of records"):
        distgen.generate(["x", 3], model=str(tiny_model_dir))
    with pytest.raises(ConfigError, match="holds no distgen outputs"):
        list(distgen.read_outputs(tmp_path))
    # A job that fails in its rank (a prompt past the context with dataset.too_long=fail, found once the ranks have
    # measured the prompts): no promise about a temporary folder it removes.
    with pytest.raises(distgen.JobFailed, match=r"^the job exited with status 2 \(its lines above say why\); without "
                                                r"output.dir= its temporary folder is removed: give output.dir="):
        distgen.generate(["x", "y" * 5000], model=str(tiny_model_dir), overrides=["dataset.too_long=fail"])
    # A record without a prompt is an error record; the others are generated.
    records = distgen.generate([{"prompt": "x"}, {"prompt": None}], model=str(tiny_model_dir), overrides=QUIET)
    assert [r["finish_reason"] == "error" for r in records] == [False, True]
    # A string where a list belongs: named as given, with the list it was meant to be.
    with pytest.raises(ConfigError, match=r"prompts='Tell me a joke' is not allowed: not a file or folder here .*"
                                          r"one prompt is passed as a list: prompts=\['Tell me a joke'\]"):
        distgen.generate("Tell me a joke", model=str(tiny_model_dir))
    with pytest.raises(ConfigError, match=r"overrides='generation.max_new_tokens=2' is not allowed: a list of .*"
                                          r"overrides=\['generation.max_new_tokens=2'\]"):
        distgen.generate(["x"], model=str(tiny_model_dir), overrides="generation.max_new_tokens=2")


def no_logging_configured(monkeypatch) -> tuple[logging.Logger, logging.Logger]:
    """A host application's process before it configures logging: no handler on the root logger or distgen's
    (the test fixture's and pytest's own taken away for the test)."""
    log.unconfigure()
    root, ours = logging.getLogger(), logging.getLogger("distgen")
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(ours, "handlers", [])
    return root, ours


def test_generate_shows_its_lines_during_the_call_where_the_host_configured_no_logging(tiny_model_dir, monkeypatch,
                                                                                      capsys):
    root, ours = no_logging_configured(monkeypatch)
    assert len(distgen.generate(["Hi"], model=str(tiny_model_dir), overrides=["generation.max_new_tokens=2"])) == 1
    said = capsys.readouterr()
    assert "distgen: engine: " in said.out and "distgen: wrote 1 records to " in said.out and said.err == ""
    # Nothing stays behind: no handler on the root logger or on distgen's, no level set.
    assert root.handlers == [] and ours.handlers == [] and ours.level == logging.NOTSET and ours.propagate


def test_generate_adds_no_handler_where_the_host_configured_logging(tiny_model_dir, monkeypatch, capsys):
    root, ours = no_logging_configured(monkeypatch)
    seen = []

    class HostHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append((record.name, record.getMessage(), list(ours.handlers)))

    host = HostHandler()
    root.addHandler(host)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        # The host's levels decide, not output.log_level (that is the level of distgen's own handler).
        distgen.generate(["Hi"], model=str(tiny_model_dir), overrides=["generation.max_new_tokens=2",
                                                                       "output.log_level=error"])
    finally:
        root.setLevel(level)
    assert any(name == "distgen.report" and message.startswith("wrote 1 records to ") for name, message, _ in seen)
    assert any(name == "distgen.job.worker" and message.startswith("engine: ") for name, message, _ in seen)
    assert all(handlers == [] for *_, handlers in seen)  # during the call, too
    assert root.handlers == [host] and ours.handlers == [] and ours.level == logging.NOTSET
    assert capsys.readouterr() == ("", "")


def test_generate_takes_chat_records_and_keeps_their_messages(tiny_model_dir, tiny_model, tokenizer, tmp_path):
    """Records of `messages` are chat records without an override naming the column: rendered by the chat
    template, equal to generate on the rendered text, the messages kept in the output."""
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    (tmp_path / "chat.jinja").write_text(template)
    chats = [{"id": "a", "messages": [{"role": "user", "content": "the sky is"}]},
             {"id": "b", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}]
    records = distgen.generate(chats, model=str(tiny_model_dir),
                               overrides=[*QUIET, f"dataset.chat_template={tmp_path / 'chat.jinja'}"])
    assert [r["id"] for r in records] == ["a", "b"] and [r["messages"] for r in records] == [c["messages"] for c in chats]
    eos = [tokenizer.eos_token_id]
    for record, chat in zip(records, chats):
        text = tokenizer.apply_chat_template(chat["messages"], tokenize=False, chat_template=template,
                                             add_generation_prompt=True)
        assert record["completion_token_ids"] == reference_greedy(tiny_model, tokenizer, text, DEFAULT_BUDGET, eos)


def test_generate_takes_the_command_lines_quiet_and_names_a_flag_it_does_not_take(tiny_model_dir, monkeypatch,
                                                                                  capsys):
    """`--quiet` among the overrides is the command line's (it was a Hydra lexer error, LexerNoViableAltException);
    a flag only the command line has is named, with what generate takes."""
    no_logging_configured(monkeypatch)  # distgen's own handler shows its lines (at info without -q: the test above)
    records = distgen.generate(["Hi"], model=str(tiny_model_dir), overrides=["generation.max_new_tokens=2", "-q"])
    assert len(records) == 1 and records[0]["completion_tokens"] == 2
    assert capsys.readouterr() == ("", "")
    with pytest.raises(ConfigError, match=r"overrides: '--check' is not allowed: distgen.generate takes the command "
                                          r"line's key=value overrides, --quiet \(-q\) and a job file"):
        distgen.generate(["Hi"], model=str(tiny_model_dir), overrides=["--check"])


def test_generate_takes_records_with_numpy_pandas_and_datetime_values(tiny_model_dir):
    """A DataFrame's to_dict("records") holds numpy numbers and pandas timestamps: they reach the outputs as the
    Arrow readers give a parquet file's (a number, ISO 8601 text, base64), not a TypeError from json.dumps."""
    import datetime

    import numpy as np
    import pandas as pd

    records = [{"id": np.int64(7), "prompt": "Hi", "when": pd.Timestamp("2024-01-02 03:04:05"),
                "day": datetime.date(2024, 1, 2), "score": np.float32(0.5), "raw": b"\x00\x01",
                "vec": np.array([1, 2])}]
    out = distgen.generate(records, model=str(tiny_model_dir), overrides=QUIET)
    assert len(out) == 1 and out[0]["id"] == 7 and type(out[0]["id"]) is int and out[0]["finish_reason"] != "error"
    assert (out[0]["when"], out[0]["day"], out[0]["score"], out[0]["raw"], out[0]["vec"]) == (
        "2024-01-02T03:04:05", "2024-01-02", 0.5, "AAE=", [1, 2])


def test_a_dataframes_gaps_are_null_in_the_prompts_it_writes(tmp_path):
    """A DataFrame's to_dict("records") marks a missing time NaT (and a row's own
    values may hold pandas' NA): they are null, as
    the Arrow readers give a parquet file's gaps (they were the text 'NaT' and '<NA>')."""
    import pandas as pd

    from distgen.api import write_prompts

    frame = pd.DataFrame({"prompt": ["a", "b"], "when": pd.to_datetime(["2024-01-02", None])})
    records = [*frame.to_dict("records"), {"prompt": "c", "when": pd.NA, "tags": [pd.NaT, 1]}]
    lines = open(write_prompts(records, tmp_path), encoding="utf-8").read().splitlines()
    assert [json.loads(line) for line in lines] == [{"prompt": "a", "when": "2024-01-02T00:00:00"},
                                                    {"prompt": "b", "when": None},
                                                    {"prompt": "c", "when": None, "tags": [None, 1]}]

"""Every input format gives the prompts the same records give in JSON lines; chat records
render through the tokenizer's chat template."""
import datetime
import decimal
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from distgen.config import DatasetConfig
from distgen.common.errors import ConfigError
from distgen.inputs.source import open_prompts
from distgen.run import main as run_in_process
from distgen.outputs.shards import list_shards
from tests.helpers import (CHAT_TEMPLATE, DEFAULT_BUDGET, PROMPTS, assert_prompts_greedy, read_outputs,
                           reference_greedy, write_prompts)



def write_format(fmt, tmp_path):
    """PROMPTS written in `fmt`; returns the dataset path."""
    table = Dataset.from_list(PROMPTS)
    if fmt == "csv":
        return table.to_csv(tmp_path / "p.csv", index=False) and tmp_path / "p.csv"
    if fmt == "parquet":
        return table.to_parquet(tmp_path / "p.parquet") and tmp_path / "p.parquet"
    if fmt == "saved":
        table.save_to_disk(tmp_path / "saved")
        return tmp_path / "saved"
    folder = tmp_path / "folder"  # a local dataset folder of data files
    folder.mkdir()
    write_prompts(folder / "train.jsonl", PROMPTS)
    return folder


def read_all(path, tmp_path, **settings):
    source = open_prompts(DatasetConfig(path=str(path), **settings), str(tmp_path / "cache"))
    return source.prompts(range(len(source)))


@pytest.mark.parametrize("fmt", ["csv", "parquet", "saved", "folder"])
def test_each_format_gives_the_jsonl_prompts(fmt, prompts_file, tmp_path):
    assert read_all(write_format(fmt, tmp_path), tmp_path) == read_all(prompts_file, tmp_path)


def test_text_lines_and_shuffle_with_limit(tmp_path):
    lines = tmp_path / "p.txt"
    lines.write_text("".join(p["prompt"] + "\n\n" for p in PROMPTS))
    jsonl = write_prompts(tmp_path / "plain.jsonl", [{"prompt": p["prompt"]} for p in PROMPTS])
    assert read_all(lines, tmp_path) == read_all(jsonl, tmp_path)
    shuffled = read_all(jsonl, tmp_path, shuffle_seed=3, limit=4)
    assert [p.index for p in shuffled] == [0, 1, 2, 3]
    assert {p.text for p in shuffled} < {p["prompt"] for p in PROMPTS} and len({p.text for p in shuffled}) == 4
    assert shuffled == read_all(jsonl, tmp_path, shuffle_seed=3, limit=4)


def test_columns_that_mix_types_still_load(tmp_path):
    mixed = write_prompts(tmp_path / "mixed.jsonl", [{"id": 1, "prompt": "a", "stop": "x"},
                                                     {"id": "b", "prompt": "b", "stop": ["y", "z"]}])
    assert [(p.id, p.stop) for p in read_all(mixed, tmp_path)] == [(1, ("x",)), ("b", ("y", "z"))]


@pytest.mark.parametrize("records, settings, message", [
    ([{"text": "x"}], {}, "dataset.prompt_field='prompt' is not allowed: .* has columns text"),
    ([{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}], {}, "id 'a' appears 2 times"),
    ([{"prompt": "x"}], {"messages_field": "messages"}, "dataset.messages_field='messages' is not allowed"),
])
def test_bad_datasets_name_the_problem(records, settings, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        read_all(write_prompts(tmp_path / "bad.jsonl", records), tmp_path, **settings)


def test_text_that_reads_as_a_date_stays_the_text_it_is(tmp_path):
    """Arrow's JSON reader makes timestamps of ISO-looking text ("2024-01-02" came back "2024-01-02T00:00:00", a
    "Z" zone dropped); JSON has no dates, so a JSON-lines column is the text written, at any depth."""
    rows = [{"id": 1, "prompt": "a", "day": "2024-01-02", "at": "2024-01-02T03:04:05Z", "meta": {"w": "2024-01-02"},
             "seen": ["2024-01-02 03:04:05"]},
            {"id": 2, "prompt": "b", "day": "2024-02-03", "at": "2024-02-03 04:05:06", "meta": {"w": "x"}, "seen": []}]
    lines = write_prompts(tmp_path / "dates.jsonl", rows)
    assert [p.columns for p in read_all(lines, tmp_path)] == [
        {k: v for k, v in row.items() if k not in ("id", "prompt")} for row in rows]
    assert [p.id for p in read_all(lines, tmp_path)] == [1, 2]


def test_bad_override_marks_only_that_record(tmp_path):
    prompts = read_all(write_prompts(tmp_path / "bad.jsonl", [{"prompt": "x"}, {"prompt": "y", "temperature": -1}]),
                       tmp_path)
    assert [p.error for p in prompts] == [None, "temperature=-1 is not allowed: must be 0 (greedy) or a finite "
                                                "number >= 1.1754943508222875e-38"]


def test_a_setting_column_of_mixed_types_keeps_each_records_value(tmp_path):
    """A column Arrow can read only as text (a number beside a string) lost Infinity there: its record ran with
    the job's temperature. Each record's own value is checked, as in a column of one type."""
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"prompt": "a", "temperature": 0.5}\n{"prompt": "b", "temperature": "hot"}\n'
                    '{"prompt": "c", "temperature": Infinity}\n{"prompt": "d", "max_new_tokens": true}\n'
                    '{"prompt": "e", "max_new_tokens": 3}\n')
    prompts = read_all(path, tmp_path)
    assert [p.temperature for p in prompts] == [0.5, None, None, None, None]
    assert [p.max_new_tokens for p in prompts] == [None, None, None, None, 3]
    assert [p.error for p in prompts] == [
        None, "temperature='hot' is not allowed: must be 0 (greedy) or a finite number >= 1.1754943508222875e-38",
        "temperature=inf is not allowed: must be 0 (greedy) or a finite number >= 1.1754943508222875e-38",
        "max_new_tokens=True is not allowed: must be an integer in [1, 2147483646]", None]


@pytest.mark.parametrize("others", ["", ', "top_k": "x"'], ids=["one-type", "mixed"])
def test_an_explicit_nan_setting_in_json_gets_an_error_record(others, tmp_path):
    """JSON has null for a value left out; a NaN written there is a value, and no setting allows it (a CSV or
    parquet gap, which the readers give as NaN, stays a gap)."""
    path = tmp_path / "nan.jsonl"
    path.write_text('{"prompt": "a", "temperature": 0.5}\n{"prompt": "b", "temperature": NaN' + others + '}\n'
                    '{"prompt": "c"}\n')
    prompts = read_all(path, tmp_path)
    assert [p.temperature for p in prompts] == [0.5, None, None]
    assert prompts[1].error.startswith("temperature=nan is not allowed") and [prompts[0].error, prompts[2].error] \
        == [None, None]


def test_bad_json_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{"prompt": \n')
    with pytest.raises(ConfigError, match="bad.jsonl:2: not valid JSON"):
        read_all(bad, tmp_path)


def test_parquet_in_and_out_match_greedy_generate(tiny_model_dir, tiny_model, tokenizer, tmp_path):
    out = tmp_path / "out"
    args = [f"model={tiny_model_dir}", f"dataset={write_format('parquet', tmp_path)}", f"output.dir={out}",
            f"generation.max_new_tokens={DEFAULT_BUDGET}", "generation.batch_size=3", "output.format=parquet",
            "output.shard_size=3"]
    assert run_in_process(args) == 0
    assert [p.name for p in list_shards(out)] == [f"part-00000-0000{n}.parquet" for n in range(3)]
    assert_prompts_greedy(read_outputs(out), tiny_model, tokenizer)
    manifest = json.loads((out / "outputs" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["records"] == len(PROMPTS) and len(manifest["shards"]) == 3


def test_chat_records_render_through_the_template(tiny_model_dir, tiny_model, tokenizer, tmp_path):
    chat_model = shutil.copytree(tiny_model_dir, tmp_path / "chat-model")
    templated = tokenizer.__class__.from_pretrained(tiny_model_dir)
    templated.chat_template = CHAT_TEMPLATE
    templated.save_pretrained(chat_model)
    chats = [{"id": "c1", "messages": [{"role": "user", "content": "Hi there"}]},
             {"id": "c2", "messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Name a colour"}]}]
    out = tmp_path / "out"
    assert run_in_process([f"model={chat_model}", f"dataset={write_prompts(tmp_path / 'chat.jsonl', chats)}",
                           "dataset.messages_field=messages", f"output.dir={out}", "generation.max_new_tokens=5"]) == 0
    records = read_outputs(out)
    assert records[0]["prompt"] == "<s><user>Hi there</s><assistant>"
    assert records[1]["prompt"] == "<s><system>Be brief.</s><user>Name a colour</s><assistant>"
    assert [r["messages"] for r in records] == [c["messages"] for c in chats]  # the messages as given, beside
    for record in records:
        assert record["prompt_tokens"] == len(tokenizer(record["prompt"], add_special_tokens=False)["input_ids"])
        assert record["completion_token_ids"] == reference_greedy(tiny_model, tokenizer, record["prompt"], 5,
                                                                  [tokenizer.eos_token_id])


@pytest.mark.parametrize("suffix", [".jsonl", ".txt", ".csv"])
def test_a_text_file_that_is_not_utf8_names_line_and_byte_before_any_worker(suffix, tmp_path):
    lines = {".jsonl": [b'{"prompt": "fine"}', b'{"prompt": "caf\xe9"}'], ".txt": [b"fine", b"caf\xe9"],
             ".csv": [b"prompt", b"caf\xe9"]}[suffix]
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(b"\n".join(lines) + b"\n")
    byte = lines[1].index(b"\xe9") + 1
    with pytest.raises(ConfigError, match=rf"latin1\{suffix}:2: byte {byte} \(b'\\xe9'\) is not UTF-8"):
        open_prompts(DatasetConfig(path=str(path)), str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert run_in_process(["model=tiny", f"dataset={path}", f"output.dir={out}"]) == 2
    assert not out.exists()


def mixed_folder(root):
    """Two .jsonl, a .csv, a .parquet and a .txt in a subfolder: 13 records, ids of both types and none."""
    root.mkdir()
    write_prompts(root / "b.jsonl", [{"id": 7, "prompt": "b one"}, {"id": 8, "prompt": "b two", "max_new_tokens": 3}])
    write_prompts(root / "a.jsonl", [{"id": "a1", "prompt": "alpha one"}, {"prompt": "alpha two"},
                                     {"id": "a3", "prompt": "alpha three", "temperature": 0}])
    (root / "c.csv").write_text("id,prompt\nc1,see one\nc2,see two\n")
    Dataset.from_list([{"id": "p1", "prompt": "par one"}, {"id": "p2", "prompt": "par two"},
                       {"id": "p3", "prompt": "par three"}]).to_parquet(root / "d.parquet")
    (root / "a").mkdir()  # sorted as text: "a.jsonl" < "a/t.txt" < "b.jsonl"
    (root / "a" / "t.txt").write_text("just text\n\nmore text\n")
    (root / ".cache").mkdir()  # hidden: left out
    write_prompts(root / ".cache" / "x.jsonl", [{"prompt": "hidden"}])
    (root / "empty.jsonl").write_text("")  # no records: nothing to read
    return root


MIXED_ORDER = [("a1", "alpha one"), (1, "alpha two"), ("a3", "alpha three"), (3, "just text"), (4, "more text"),
               (7, "b one"), (8, "b two"), ("c1", "see one"), ("c2", "see two"), ("p1", "par one"),
               ("p2", "par two"), ("p3", "par three")]


def test_a_folder_of_mixed_files_reads_every_file_in_path_order(tmp_path):
    folder = mixed_folder(tmp_path / "data")
    prompts = read_all(folder, tmp_path)
    assert [(p.id, p.text) for p in prompts] == MIXED_ORDER
    assert [p.index for p in prompts] == list(range(len(MIXED_ORDER)))
    assert prompts[6].max_new_tokens == 3 and prompts[2].temperature == 0.0
    again = open_prompts(DatasetConfig(path=str(folder)), str(tmp_path / "other-cache"))
    assert again.prompts(range(len(again))) == prompts and again.digest() == open_prompts(
        DatasetConfig(path=str(folder)), str(tmp_path / "cache")).digest()


def test_a_folder_of_one_format_is_concatenated_in_path_order(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("train-00001.jsonl", "train-00000.jsonl", "test.jsonl"):  # no split is picked from names
        write_prompts(folder / name, [{"id": f"{name}:{k}", "prompt": f"{name} {k}"} for k in range(2)])
    assert [p.id for p in read_all(folder, tmp_path)] == [
        "test.jsonl:0", "test.jsonl:1", "train-00000.jsonl:0", "train-00000.jsonl:1", "train-00001.jsonl:0",
        "train-00001.jsonl:1"]


def test_a_folder_of_mixed_files_runs_every_record_once(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    args = [f"model={tiny_model_dir}", f"dataset={mixed_folder(tmp_path / 'data')}", f"output.dir={out}",
            "generation.max_new_tokens=2", "output.print_table=false"]
    assert run_in_process(args) == 0
    records = read_outputs(out)
    assert [(r["id"], r["prompt"]) for r in records] == MIXED_ORDER
    assert all(r["finish_reason"] in ("eos", "length") for r in records)


@pytest.mark.parametrize("setup, settings, message", [
    (lambda f: (f / "README.md").write_text("about"), {},
     r"holds files that are not prompts files: README.md, notes/x.py\. Every file of a folder is read"),
    (lambda f: None, {"split": "test"}, r"dataset.split='test' is not allowed: .* is a plain folder"),
])
def test_a_folder_with_other_files_or_a_split_is_refused_naming_them(setup, settings, message, tmp_path):
    folder = mixed_folder(tmp_path / "data")
    (folder / "notes").mkdir()
    (folder / "notes" / "x.py").write_text("")
    setup(folder)
    if not settings:
        with pytest.raises(ConfigError, match=message):
            read_all(folder, tmp_path)
        return
    (folder / "notes" / "x.py").unlink()
    with pytest.raises(ConfigError, match=message):
        read_all(folder, tmp_path, **settings)


def test_a_folder_holding_output_dir_is_refused(tmp_path):
    folder = mixed_folder(tmp_path / "data")
    with pytest.raises(ConfigError, match="holds output.dir .*: put output.dir outside the dataset folder"):
        open_prompts(DatasetConfig(path=str(folder)), str(folder / "out" / ".distgen" / "datasets"))


def test_a_saved_dataset_dict_keeps_its_splits(tmp_path):
    DatasetDict({"train": Dataset.from_list(PROMPTS[:2]), "test": Dataset.from_list(PROMPTS[2:3])}).save_to_disk(
        tmp_path / "saved")
    assert [p.id for p in read_all(tmp_path / "saved", tmp_path, split="test")] == [PROMPTS[2]["id"]]


@pytest.mark.parametrize("suffix, body", [(".txt", "first\nsecond\n"),
                                          (".jsonl", '{"prompt": "first"}\n{"prompt": "second"}\n'),
                                          (".csv", "prompt\nfirst\nsecond\n")])
def test_a_byte_order_mark_is_not_part_of_the_first_prompt(suffix, body, tmp_path):
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert [p.text for p in read_all(path, tmp_path)] == ["first", "second"]
    folder = tmp_path / "folder"  # the same file among others of another format (read record by record)
    folder.mkdir()
    path.rename(folder / path.name)
    write_prompts(folder / "z.json" if suffix == ".jsonl" else folder / "z.jsonl", [{"prompt": "third", "id": 9}])
    assert [p.text for p in read_all(folder, tmp_path)] == ["first", "second", "third"]


def test_ids_keep_their_type_and_records_without_one_get_their_row(tiny_model_dir, tmp_path):
    records = [{"id": 100, "prompt": "an int id"}, {"prompt": "no id"}, {"id": "s", "prompt": "a str id"},
               {"prompt": "no id either"}]
    out = tmp_path / "out"
    args = [f"model={tiny_model_dir}", f"dataset={write_prompts(tmp_path / 'p.jsonl', records)}", f"output.dir={out}",
            "generation.max_new_tokens=2", "output.print_table=false"]
    assert run_in_process(args) == 0
    assert [r["id"] for r in read_outputs(out)] == [100, 1, "s", 3]
    ints = write_prompts(tmp_path / "ints.jsonl", [{"id": 5, "prompt": "x"}, {"id": 6, "prompt": "y"}])
    assert [p.id for p in read_all(ints, tmp_path)] == [5, 6]
    # Shuffled, a record without an id keeps the one its row gives it.
    shuffled = read_all(write_prompts(tmp_path / "rows.jsonl", [{"prompt": f"p{k}"} for k in range(6)]), tmp_path,
                        shuffle_seed=3, limit=4)
    assert [p.id for p in shuffled] == [int(p.text[1:]) for p in shuffled] and len({p.id for p in shuffled}) == 4


@pytest.mark.parametrize("records, message", [
    ([{"id": "1", "prompt": "x"}, {"prompt": "y"}],
     r"id '1' appears 2 times \(records 0, 1; 1 ids repeat\); dataset.id_field='id' must be unique \(a record "
     r"without an id gets its row"),
    ([{"id": 1, "prompt": "x"}, {"id": "1", "prompt": "y"}], r"id '1' appears 2 times"),  # unique by their text
    ([{"id": 2.5, "prompt": "x"}], r"record 0: id 2.5 is not allowed: an id .* is a string or an integer"),
    ([{"id": [1], "prompt": "x"}, {"id": "a", "prompt": "y"}], r"record 0: id \[1\] is not allowed"),
    # Arrow reads these columns as floats: an integer past 2**53 there is not the one the file holds.
    ([{"id": 2**70, "prompt": "x"}, {"id": -3, "prompt": "y"}], r"record 0: id 1\.1805\d+e\+21 is not allowed"),
    ([{"id": 1e30, "prompt": "x"}, {"id": "a", "prompt": "y"}], r"record 0: id 1e\+30 is not allowed"),
])
def test_ids_that_could_collide_or_are_not_ids_are_refused(records, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        read_all(write_prompts(tmp_path / "ids.jsonl", records), tmp_path)


def test_an_integer_id_a_csv_gap_turns_into_an_inexact_float_is_refused(tmp_path):
    """A CSV id column with a gap is read as floats: 9007199254740993 would come back as ...992."""
    path = tmp_path / "ids.csv"
    path.write_text("id,prompt\n9007199254740993,x\n,y\n")
    with pytest.raises(ConfigError, match=r"record 0: id 9007199254740992(\.0)? is not allowed: .* integer"):
        read_all(path, tmp_path)


def test_parquet_shards_hold_ids_of_mixed_types_as_text(tiny_model_dir, tmp_path):
    records = [{"id": 100, "prompt": "an int id"}, {"id": "s", "prompt": "a str id"}, {"id": 7, "prompt": "x"}]
    out = tmp_path / "out"
    args = [f"model={tiny_model_dir}", f"dataset={write_prompts(tmp_path / 'p.jsonl', records)}", f"output.dir={out}",
            "generation.max_new_tokens=2", "output.format=parquet", "output.shard_size=2", "output.print_table=false"]
    assert run_in_process(args) == 0
    assert [r["id"] for r in read_outputs(out)] == ["100", "s", 7]  # the first shard mixes them; the second does not


def test_chat_messages_the_template_refuses_get_an_error_record(tiny_model_dir, tokenizer, tmp_path):
    chat_model = shutil.copytree(tiny_model_dir, tmp_path / "chat-model")
    templated = tokenizer.__class__.from_pretrained(tiny_model_dir)
    templated.chat_template = ("{% for m in messages %}{% if m['role'] not in ('user', 'system') %}"
                               "{{ raise_exception('roles are user or system') }}{% endif %}{% endfor %}"
                               + CHAT_TEMPLATE)
    templated.save_pretrained(chat_model)
    chats = [{"id": "ok", "messages": [{"role": "user", "content": "Hi there"}]},
             {"id": "bad", "messages": [{"role": "robot", "content": "Beep"}]}]
    out = tmp_path / "out"
    assert run_in_process([f"model={chat_model}", f"dataset={write_prompts(tmp_path / 'chat.jsonl', chats)}",
                           "dataset.messages_field=messages", f"output.dir={out}", "generation.max_new_tokens=2",
                           "output.print_table=false"]) == 0
    ok, bad = read_outputs(out)
    assert ok["finish_reason"] in ("eos", "length") and ok["prompt"] == "<s><user>Hi there</s><assistant>"
    assert bad["finish_reason"] == "error"
    assert bad["error"] == "messages could not be rendered by the chat template: TemplateError: roles are user or system"


# Records whose other columns mix types (category), hold objects and lists, and clash with output fields.
COLUMNS = [{"id": 10, "prompt": "Hello there", "category": "greet", "metadata": {"src": "web", "score": 0.5},
            "tags": ["a", "b"], "rating": 4, "completion": "a reference answer", "error": None},
           {"id": 11, "prompt": "The sky is", "category": 7, "metadata": {"src": "book", "score": 1.25},
            "tags": [], "rating": 2, "completion": "blue", "error": "typo", "max_new_tokens": 3}]


def test_input_columns_reach_the_outputs_with_their_types(tiny_model_dir, tiny_model, tokenizer, tmp_path, capsys):
    out = tmp_path / "out"
    args = [f"model={tiny_model_dir}", f"dataset={write_prompts(tmp_path / 'p.jsonl', COLUMNS)}", f"output.dir={out}",
            f"generation.max_new_tokens={DEFAULT_BUDGET}", "output.print_table=false"]
    assert run_in_process(args) == 0
    assert ("input column(s) completion, error share a name with an output field: written as input_completion, "
            "input_error") in capsys.readouterr().out
    for record, given in zip(read_outputs(out), COLUMNS):
        kept = {key: record[key] for key in ("category", "metadata", "tags", "rating", "input_completion",
                                             "input_error", "max_new_tokens")}
        assert json.dumps(kept) == json.dumps({"category": given["category"], "metadata": given["metadata"],
                                               "tags": given["tags"], "rating": given["rating"],
                                               "input_completion": given["completion"], "input_error": given["error"],
                                               "max_new_tokens": given.get("max_new_tokens")})  # types too: 7 not "7"
        assert type(record["id"]) is int and "error" not in record and record["finish_reason"] != "error"
        budget = given.get("max_new_tokens", DEFAULT_BUDGET)
        assert record["completion_token_ids"] == reference_greedy(tiny_model, tokenizer, given["prompt"], budget,
                                                                  [tokenizer.eos_token_id])


def test_output_columns_chooses_them_and_keep_prompt_drops_the_prompt(tiny_model_dir, tmp_path, capsys):
    path = write_prompts(tmp_path / "p.jsonl", COLUMNS)
    out = tmp_path / "out"
    args = [f"model={tiny_model_dir}", f"dataset={path}", f"output.dir={out}", "generation.max_new_tokens=2",
            "output.print_table=false"]
    assert run_in_process([*args, "output.columns=[metadata,completion]", "output.keep_prompt=false"]) == 0
    records = read_outputs(out)
    assert [sorted(r) for r in records] == [sorted(["index", "id", "sample_index", "completion", "prompt_tokens", "completion_tokens",
                                                    "finish_reason", "completion_token_ids", "metadata",
                                                    "input_completion"])] * 2
    assert [r["metadata"] for r in records] == [c["metadata"] for c in COLUMNS]
    # Another choice of columns is another shape of record: refused before anything starts, naming it.
    assert run_in_process([*args, "output.columns=[tags]"]) == 2
    assert ('other settings: output.columns: ["metadata", "completion"] -> ["tags"]; output.keep_prompt: false -> '
            'true') in capsys.readouterr().err
    for keep, message in ((["rating", "nope"], r"output.columns=\['rating', 'nope'\] is not allowed: .*p.jsonl has no "
                                               r"column 'nope' \(its columns: id, prompt, category"),
                          (["id"], "output.columns: 'id' is not allowed: it is dataset.id_field"),
                          (["prompt"], "output.columns: 'prompt' is not allowed: it is dataset.prompt_field")):
        with pytest.raises(ConfigError, match=message):
            open_prompts(DatasetConfig(path=str(path)), str(tmp_path / "cache"), keep=keep)


def test_a_changed_column_value_runs_that_record_again(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = [f"model={tiny_model_dir}", f"output.dir={out}", "generation.max_new_tokens=2", "output.print_table=false"]
    assert run_in_process([*args, f"dataset={write_prompts(tmp_path / 'p.jsonl', COLUMNS)}"]) == 0
    first = read_outputs(out)
    changed = [COLUMNS[0], {**COLUMNS[1], "metadata": {"src": "web", "score": 2}}]
    capsys.readouterr()
    assert run_in_process([*args, f"dataset={write_prompts(tmp_path / 'p.jsonl', changed)}"]) == 0
    said = capsys.readouterr().out
    assert "resuming: 1 of 2 prompts already done" in said and "1 earlier record(s) match no prompt of the dataset now" in said
    again = read_outputs(out)
    assert again[0] == first[0] and again[1]["metadata"] == {"src": "web", "score": 2}
    assert {**again[1], "metadata": None} == {**first[1], "metadata": None}  # the same completion


def test_every_format_keeps_its_columns_as_its_reader_types_them(tmp_path):
    rows = [{"id": "a", "prompt": "x", "n": 1, "label": "p"}, {"id": "b", "prompt": "y", "n": 2, "label": None}]
    Dataset.from_list(rows).to_parquet(tmp_path / "p.parquet")
    (tmp_path / "p.csv").write_text("id,prompt,n,label\na,x,1,p\nb,y,2,\n")
    lines = write_prompts(tmp_path / "p.jsonl", rows)
    for path in (tmp_path / "p.parquet", tmp_path / "p.csv", lines):
        assert [p.columns for p in read_all(path, tmp_path)] == [{"n": 1, "label": "p"}, {"n": 2, "label": None}]
        assert [type(p.columns["n"]) for p in read_all(path, tmp_path)] == [int, int]
    assert [p.columns for p in read_all(tmp_path / "p.csv", tmp_path, limit=1)] == [{"n": 1, "label": "p"}]
    typed = pa.table({"prompt": ["x"], "when": pa.array([datetime.datetime(2024, 5, 1, 12, 30)], pa.timestamp("s")),
                      "price": pa.array([decimal.Decimal("1.50")], pa.decimal128(5, 2)), "blob": pa.array([b"\x00\x01"])})
    pq.write_table(typed, tmp_path / "typed.parquet")  # values JSON does not hold: as text
    assert [p.columns for p in read_all(tmp_path / "typed.parquet", tmp_path)] == [
        {"when": "2024-05-01T12:30:00", "price": "1.50", "blob": "AAE="}]
    text = tmp_path / "t.txt"
    text.write_text("one\ntwo\n")
    assert [p.columns for p in read_all(text, tmp_path)] == [{}, {}]
    # Read record by record (a folder of several formats): each record keeps the fields it has.
    folder = mixed_folder(tmp_path / "data")
    write_prompts(folder / "z.jsonl", [{"prompt": "zed", "meta": {"k": [1, "2"]}}])
    prompts = read_all(folder, tmp_path)
    assert prompts[0].columns == {} and prompts[6].columns == {"max_new_tokens": 3}
    assert prompts[-1].columns == {"meta": {"k": [1, "2"]}}
    kept = open_prompts(DatasetConfig(path=str(folder)), str(tmp_path / "cache"), keep=["meta"])
    assert [p.columns for p in kept.prompts([0, len(kept) - 1])] == [{"meta": None}, {"meta": {"k": [1, "2"]}}]
    with pytest.raises(ConfigError, match="output.columns=\\['nope'\\] is not allowed: .* has no column 'nope'"):
        open_prompts(DatasetConfig(path=str(folder)), str(tmp_path / "cache"), keep=["nope"])


def test_parquet_shards_hold_columns_of_mixed_types_as_text(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    args = [f"model={tiny_model_dir}", f"dataset={write_prompts(tmp_path / 'p.jsonl', COLUMNS)}",
            f"output.dir={out}", "generation.max_new_tokens=2", "output.format=parquet", "output.shard_size=2",
            "output.print_table=false"]
    assert run_in_process(args) == 0
    records = read_outputs(out)
    # One shard: category mixes a string and an integer, the metadata objects' scores an integer and a float (kept
    # as floats by JSON here: 0.5, 1.25) - one Arrow type each: metadata stays an object, category is text.
    assert [r["category"] for r in records] == ["greet", "7"]
    assert [r["metadata"] for r in records] == [c["metadata"] for c in COLUMNS]
    assert [r["tags"] for r in records] == [["a", "b"], []] and [r["rating"] for r in records] == [4, 2]

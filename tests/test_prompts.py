import re

import pytest

from distgen.config import DatasetConfig
from distgen.common.errors import ConfigError
from distgen.inputs.records import Prompt, RecordFields, parse_prompts, read_prompts, record_to_prompt


def test_jsonl_records_keep_order_ids_and_budgets():
    lines = ['{"id": "a", "prompt": "x"}\n', "\n", '{"prompt": "y", "max_new_tokens": 4}\n']
    assert parse_prompts(lines, "jsonl", "f") == [Prompt(0, "a", "x"), Prompt(1, 1, "y", 4)]


def test_txt_lines_are_prompts_and_limit_applies():
    assert parse_prompts(["one\n", "two\n", "three\n"], "txt", "f", limit=2) == [
        Prompt(0, 0, "one"), Prompt(1, 1, "two")]


def test_per_record_overrides_are_read():
    record = {"prompt": "x", "temperature": 0, "top_p": 0.5, "top_k": 3, "seed": 9, "stop": "\n"}
    assert record_to_prompt(record, 0, "f:1", RecordFields()) == Prompt(
        0, 0, "x", temperature=0.0, top_p=0.5, top_k=3, seed=9, stop=("\n",))


@pytest.mark.parametrize("line, message", [
    ("{not json", r"f:2: not valid JSON \(Expecting property name"),
    ('{"text": "x"}', r"f:2: needs a string field 'prompt' \(dataset.prompt_field\); found 'text'"),
    ('["x"]', r"f:2: expected a JSON object with a string field 'prompt', found list"),
])
def test_bad_records_name_the_line_and_field(line, message):
    with pytest.raises(ConfigError, match=message):
        parse_prompts(['{"prompt": "fine"}', line], "jsonl", "f")


def test_bad_per_record_budget_marks_only_that_record():
    prompts = parse_prompts(['{"prompt": "x", "max_new_tokens": 0}', '{"prompt": "y", "max_new_tokens": "4"}',
                             '{"prompt": "z", "max_new_tokens": 2}'], "jsonl", "f")
    allowed = "is not allowed: must be an integer in [1, 2147483646]"
    assert [p.error for p in prompts] == [f"max_new_tokens=0 {allowed}", f"max_new_tokens='4' {allowed}", None]
    assert prompts[2].max_new_tokens == 2


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x", "top_p": 2}', "top_p=2 is not allowed: must be a number in"),
    ('{"prompt": "x", "stop": [""]}', "stop=.* is not allowed: must be a non-empty string"),
])
def test_bad_per_record_override_marks_the_record(line, message):
    prompt = parse_prompts([line], "jsonl", "f")[0]
    assert prompt.error is not None and re.match(message, prompt.error)


def test_repeated_ids_are_refused():
    with pytest.raises(ConfigError, match="f:3: id 'a' repeats the id at line 1"):
        parse_prompts(['{"id": "a", "prompt": "x"}', "\n", '{"id": "a", "prompt": "y"}'], "jsonl", "f")


def test_json_array_file_is_read_and_its_errors_name_the_line(tmp_path):
    good = tmp_path / "p.json"
    good.write_text('[\n  {"id": "a", "prompt": "x"},\n  {"prompt": "y", "max_new_tokens": 3}\n]\n')
    assert read_prompts(DatasetConfig(path=str(good))) == [Prompt(0, "a", "x"), Prompt(1, 1, "y", 3)]
    lines = tmp_path / "lines.json"  # JSON lines in a .json file still work
    lines.write_text('{"prompt": "x"}\n{"prompt": "y"}\n')
    assert len(read_prompts(DatasetConfig(path=str(lines)))) == 2
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"prompt": "x"},\n  {"text": "y"}\n]')
    with pytest.raises(ConfigError, match=r"bad.json:3: needs a string field 'prompt'"):
        read_prompts(DatasetConfig(path=str(bad)))
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"prompt": "x"}\n  {"prompt": "y"}\n]')
    with pytest.raises(ConfigError, match=r"broken.json:3: expected ',' or '\]' in the JSON array"):
        read_prompts(DatasetConfig(path=str(broken)))


def test_bytes_that_are_not_utf8_name_line_and_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "ok"}\n{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.jsonl:2: byte 16 \(b'\\xe9'\) is not UTF-8"):
        read_prompts(DatasetConfig(path=str(path)))


@pytest.mark.parametrize("text, limit", [("\n\n", None), ('{"prompt": "x"}\n', 0)])
def test_empty_dataset_is_refused(tmp_path, text, limit):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"empty.jsonl' holds no prompts"):
        read_prompts(DatasetConfig(path=str(path), limit=limit))


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="dataset.path=.*is not a file"):
        read_prompts(DatasetConfig(path=str(tmp_path / "nope.jsonl")))


def test_a_given_id_equal_to_a_row_is_refused():
    """A record without an id gets its row: a given id equal to it would make two records one."""
    with pytest.raises(ConfigError, match=r"f:2: id 0 repeats the id at line 1 \(dataset.id_field='id' must be "
                                          r"unique; a record without an id gets its row \(from 0\) as its id"):
        parse_prompts(['{"prompt": "x"}', '{"id": 0, "prompt": "y"}'], "jsonl", "f")
    with pytest.raises(ConfigError, match=r"f:2: id '1' repeats the id at line 1"):  # unique by their text
        parse_prompts(['{"id": 1, "prompt": "x"}', '{"id": "1", "prompt": "y"}'], "jsonl", "f")


@pytest.mark.parametrize("record, message", [
    ({"prompt": "x", "id": 1.5}, r"f:1: id 1.5 is not allowed: an id \('id', dataset.id_field\) is a string or an "
                                 r"integer"),
    ({"prompt": "x", "id": True}, r"f:1: id True is not allowed"),
    ({"prompt": "x\ud800"}, r"f:1: field 'prompt' holds a lone surrogate \('\\ud800' at character 2\)"),
    ({"prompt": "x", "stop": ["ok", "\udc00"]}, r"f:1: field 'stop' holds a lone surrogate"),
])
def test_ids_and_text_that_no_output_can_hold_are_refused(record, message):
    with pytest.raises(ConfigError, match=message):
        record_to_prompt(record, 0, "f:1", RecordFields())


def test_a_whole_float_id_is_an_int():
    assert record_to_prompt({"prompt": "x", "id": 3.0}, 0, "f:1", RecordFields()).id == 3


@pytest.mark.parametrize("key, value, allowed", [
    ("seed", 2**64, "an integer in [0, 18446744073709551615]"),
    ("seed", -1, "an integer in [0, 18446744073709551615]"),
    ("seed", 1e30, "an integer in [0, 18446744073709551615]"),
    ("max_new_tokens", 2**31 - 1, "an integer in [1, 2147483646]"),
    ("temperature", float("inf"), "0 (greedy) or a finite number >= 1.1754943508222875e-38"),
    ("temperature", 1e-39, "0 (greedy) or a finite number >= 1.1754943508222875e-38"),
    ("top_k", 2**63, "an integer >= 0 (0 disables top-k)"),
    ("top_p", float("inf"), "a number in (0, 1]"),
])
def test_per_record_values_out_of_range_mark_the_record(key, value, allowed):
    prompt = record_to_prompt({"prompt": "x", key: value}, 0, "f:1", RecordFields())
    assert prompt.error == f"{key}={value!r} is not allowed: must be {allowed}"
    assert getattr(prompt, key) is None


def test_a_byte_order_mark_is_dropped_and_an_unreadable_file_named(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "first"}\n')
    assert [p.text for p in read_prompts(DatasetConfig(path=str(path)))] == ["first"]
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    with pytest.raises(ConfigError, match="dataset.path=.*folder.jsonl' is not a file"):
        read_prompts(DatasetConfig(path=str(folder)))

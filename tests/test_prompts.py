"""Prompt records as the job reads them (distgen.inputs.source.open_prompts, the datasets/Arrow path with its
line-by-line fallback): order, ids, per-record settings, and errors that name the file, line and field."""
import re

import pytest

from distgen.common.errors import ConfigError
from distgen.config import DatasetConfig
from distgen.inputs.records import Prompt, RecordFields, record_to_prompt
from distgen.inputs.source import open_prompts


def basics(prompts: list[Prompt]) -> list[tuple]:
    """(index, id, text, own budget) of each prompt (its kept input columns are checked in tests/test_inputs.py)."""
    return [(p.index, p.id, p.text, p.max_new_tokens) for p in prompts]


def read(tmp_path, name: str, data, **dataset) -> list[Prompt]:
    """Every prompt of a prompts file `name` holding `data` (text or bytes), read as a job reads it."""
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    source = open_prompts(DatasetConfig(path=str(path), **dataset), str(tmp_path / "cache"))
    return source.prompts(range(len(source)))


def test_jsonl_records_keep_order_ids_and_budgets(tmp_path):
    text = '{"id": "a", "prompt": "x"}\n\n{"prompt": "y", "max_new_tokens": 4}\n'
    assert basics(read(tmp_path, "p.jsonl", text)) == [(0, "a", "x", None), (1, 1, "y", 4)]


def test_txt_lines_are_prompts_and_limit_applies(tmp_path):
    assert basics(read(tmp_path, "p.txt", "one\ntwo\nthree\n", limit=2)) == [(0, 0, "one", None), (1, 1, "two", None)]


def test_per_record_overrides_are_read():
    record = {"prompt": "x", "temperature": 0, "top_p": 0.5, "top_k": 3, "seed": 9, "stop": "\n"}
    assert record_to_prompt(record, 0, "f:1", RecordFields()) == Prompt(
        0, 0, "x", temperature=0.0, top_p=0.5, top_k=3, seed=9, stop=("\n",))


@pytest.mark.parametrize("line, message", [
    ("{not json", r"p.jsonl:2: not valid JSON \(Expecting property name"),
    ('{"text": "x"}', r"p.jsonl: record 1: needs a string field 'prompt' \(dataset.prompt_field\)"),
    ('["x"]', r"p.jsonl:2: expected a JSON object with a string field 'prompt', found list"),
    # Where the field is there, the message says what it holds rather than listing it among the fields found.
    ('{"id": "n", "prompt": null}', r"record 1: needs a string field 'prompt' \(dataset.prompt_field\); it holds null"),
    ('{"id": "n", "prompt": 5}', r"record 1: needs a string field 'prompt' \(dataset.prompt_field\); it holds 5"),
])
def test_bad_records_name_the_line_and_field(tmp_path, line, message):
    with pytest.raises(ConfigError, match=message):
        read(tmp_path, "p.jsonl", '{"prompt": "fine"}\n' + line + "\n")


def test_bad_per_record_budget_marks_only_that_record(tmp_path):
    text = ('{"prompt": "x", "max_new_tokens": 0}\n{"prompt": "y", "max_new_tokens": "four"}\n'
            '{"prompt": "z", "max_new_tokens": 2}\n')
    prompts = read(tmp_path, "p.jsonl", text)
    allowed = "is not allowed: must be an integer in [1, 2147483646]"
    assert [p.error for p in prompts] == [f"max_new_tokens=0 {allowed}", f"max_new_tokens='four' {allowed}", None]
    assert prompts[2].max_new_tokens == 2


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x", "top_p": 2}', "top_p=2 is not allowed: must be a number in"),
    ('{"prompt": "x", "stop": [""]}', "stop=.* is not allowed: must be a non-empty string"),
])
def test_bad_per_record_override_marks_the_record(tmp_path, line, message):
    [prompt] = read(tmp_path, "p.jsonl", line + "\n")
    assert prompt.error is not None and re.match(message, prompt.error)


def test_repeated_ids_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"p.jsonl: id 'a' appears 2 times \(records 0, 1; 1 ids repeat\); "
                                          r"dataset.id_field='id' must be unique"):
        read(tmp_path, "p.jsonl", '{"id": "a", "prompt": "x"}\n\n{"id": "a", "prompt": "y"}\n')


def test_json_array_file_is_read_and_its_errors_name_the_line(tmp_path):
    text = '[\n  {"id": "a", "prompt": "x"},\n  {"prompt": "y", "max_new_tokens": 3}\n]\n'
    assert basics(read(tmp_path, "p.json", text)) == [(0, "a", "x", None), (1, 1, "y", 3)]
    assert len(read(tmp_path, "lines.json", '{"prompt": "x"}\n{"prompt": "y"}\n')) == 2  # JSON lines in a .json
    with pytest.raises(ConfigError, match=r"bad.json: record 1: needs a string field 'prompt'"):
        read(tmp_path, "bad.json", '[\n  {"prompt": "x"},\n  {"text": "y"}\n]')
    with pytest.raises(ConfigError, match=r"broken.json:3: expected ',' or '\]' in the JSON array"):
        read(tmp_path, "broken.json", '[\n  {"prompt": "x"}\n  {"prompt": "y"}\n]')


def test_bytes_that_are_not_utf8_name_line_and_byte(tmp_path):
    data = '{"prompt": "ok"}\n{"prompt": "caf\u00e9"}\n'.encode("latin-1")
    with pytest.raises(ConfigError, match=r"latin1.jsonl:2: byte 16 \(b'\\xe9'\) is not UTF-8"):
        read(tmp_path, "latin1.jsonl", data)


@pytest.mark.parametrize("text, limit", [("\n\n", None), ('{"prompt": "x"}\n', 0)])
def test_empty_dataset_is_refused(tmp_path, text, limit):
    with pytest.raises(ConfigError, match=r"empty.jsonl.* (holds no prompts|is empty|holds only blank lines)"):
        read(tmp_path, "empty.jsonl", text, limit=limit)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="dataset.path=.*nope.jsonl' is not a file"):
        open_prompts(DatasetConfig(path=str(tmp_path / "nope.jsonl")), str(tmp_path / "cache"))


def test_a_given_id_equal_to_a_row_is_refused(tmp_path):
    """A record without an id gets its row: a given id equal to it would make two records one."""
    with pytest.raises(ConfigError, match=r"p.jsonl: id '0' appears 2 times .*a record without an id gets its row "
                                          r"\(from 0\) as its id"):
        read(tmp_path, "p.jsonl", '{"prompt": "x"}\n{"id": 0, "prompt": "y"}\n')
    with pytest.raises(ConfigError, match=r"q.jsonl: id '1' appears 2 times"):  # unique by their text
        read(tmp_path, "q.jsonl", '{"id": 1, "prompt": "x"}\n{"id": "1", "prompt": "y"}\n')


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


def test_a_byte_order_mark_is_dropped_and_a_folder_named(tmp_path):
    assert [p.text for p in read(tmp_path, "bom.jsonl", b'\xef\xbb\xbf{"prompt": "first"}\n')] == ["first"]
    assert [p.text for p in read(tmp_path, "bom.txt", b'\xef\xbb\xbffirst\nsecond\n')] == ["first", "second"]
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    with pytest.raises(ConfigError, match="dataset.path=.*folder.jsonl' is not a file"):
        open_prompts(DatasetConfig(path=str(folder), format="jsonl"), str(tmp_path / "cache"))

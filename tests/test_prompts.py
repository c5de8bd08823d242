import pytest

from distgen.config import DatasetConfig
from distgen.errors import ConfigError
from distgen.prompts import Prompt, parse_prompts, read_prompts


def test_jsonl_records_keep_order_ids_and_budgets():
    lines = ['{"id": "a", "prompt": "x"}\n', "\n", '{"prompt": "y", "max_new_tokens": 4}\n']
    assert parse_prompts(lines, "jsonl", "f") == [Prompt(0, "a", "x"), Prompt(1, "1", "y", 4)]


def test_txt_lines_are_prompts_and_limit_applies():
    assert parse_prompts(["one\n", "two\n", "three\n"], "txt", "f", limit=2) == [
        Prompt(0, "0", "one"), Prompt(1, "1", "two")]


@pytest.mark.parametrize("line, message", [
    ("{not json", "f:1: not valid JSON"),
    ('{"text": "x"}', "needs a string field 'prompt'"),
    ('{"prompt": "x", "max_new_tokens": 0}', "max_new_tokens=0 must be an integer >= 1"),
])
def test_bad_records_name_the_line_and_field(line, message):
    with pytest.raises(ConfigError, match=message):
        parse_prompts([line], "jsonl", "f")


def test_repeated_ids_are_refused():
    with pytest.raises(ConfigError, match="id 'a' repeats"):
        parse_prompts(['{"id": "a", "prompt": "x"}', '{"id": "a", "prompt": "y"}'], "jsonl", "f")


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="dataset.path=.*is not a file"):
        read_prompts(DatasetConfig(path=str(tmp_path / "nope.jsonl")))

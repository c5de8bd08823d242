"""Every input format gives the prompts the same records give in JSON lines; chat records
render through the tokenizer's chat template."""
import json
import shutil

import pytest
from datasets import Dataset

from conftest import DEFAULT_BUDGET, PROMPTS, assert_prompts_greedy, read_outputs, reference_greedy, write_prompts
from distgen.config import DatasetConfig
from distgen.common.errors import ConfigError
from distgen.inputs.source import open_prompts
from distgen.run import main as run_in_process
from distgen.outputs.shards import list_shards

# Chat markers the tiny byte-level tokenizer spells out byte by byte; BOS/EOS are its own special tokens.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


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
    assert [(p.id, p.stop) for p in read_all(mixed, tmp_path)] == [("1", ("x",)), ("b", ("y", "z"))]


@pytest.mark.parametrize("records, settings, message", [
    ([{"text": "x"}], {}, "dataset.prompt_field='prompt' is not allowed: .* has columns text"),
    ([{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}], {}, "id 'a' appears 2 times"),
    ([{"prompt": "x"}], {"messages_field": "messages"}, "dataset.messages_field='messages' is not allowed"),
])
def test_bad_datasets_name_the_problem(records, settings, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        read_all(write_prompts(tmp_path / "bad.jsonl", records), tmp_path, **settings)


def test_bad_override_marks_only_that_record(tmp_path):
    prompts = read_all(write_prompts(tmp_path / "bad.jsonl", [{"prompt": "x"}, {"prompt": "y", "temperature": -1}]),
                       tmp_path)
    assert [p.error for p in prompts] == [None, "temperature=-1 is not allowed: must be a number >= 0 (0 is greedy)"]


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

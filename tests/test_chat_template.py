"""Chat options: dataset.chat_template (a file, the template, a name), dataset.chat_template_kwargs and a record's
own, dataset.continue_final_message; each prompt as transformers' apply_chat_template renders it, and a job's
completions equal `generate` of those token ids."""
import json
import shutil

import pytest
import torch

from distgen.catalog.load import load_config
from distgen.common.errors import ConfigError
from distgen.config import DatasetConfig, ModelConfig, RunConfig
from distgen.inputs.source import open_prompts
from distgen.models.tiny import build_tokenizer
from distgen.outputs.resume import job_settings
from distgen.run import main as run_in_process
from tests.helpers import read_outputs, write_prompts

PLAIN = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}"
         "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
# Qwen3's switch: thinking off leaves an empty think block after the generation prompt.
THINKING = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% if enable_thinking is defined and not enable_thinking %}"
            "<think></think>{% endif %}{% if style %}({{ style }}) {% endif %}{% endif %}")
CHATS = [
    {"id": "hi", "messages": [{"role": "user", "content": "Hi there"}]},
    {"id": "own", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A colour?"}],
     "chat_template_kwargs": {"enable_thinking": True, "style": "terse"}},
    {"id": "open", "messages": [{"role": "user", "content": "Count to five"},
                                {"role": "assistant", "content": "One, two,"}]},
]


@pytest.fixture
def templated():
    """The tiny tokenizer with a template of its own (PLAIN)."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = PLAIN
    return tokenizer


def rendered(cfg: DatasetConfig, tokenizer, tmp_path) -> list[str]:
    source = open_prompts(cfg, str(tmp_path / "cache"), tokenizer)
    return [p.text for p in source.prompts(range(len(source)))]


def expected(tokenizer, chats, template, kwargs, continued) -> list[str]:
    """apply_chat_template's own text for each chat: the config's variables, the record's on top."""
    return [tokenizer.apply_chat_template(c["messages"], tokenize=False, chat_template=template,
                                          add_generation_prompt=not continued, continue_final_message=continued,
                                          **{**kwargs, **c.get("chat_template_kwargs", {})}) for c in chats]


@pytest.mark.parametrize("given, kwargs, continued", [
    ("text", {}, False),
    ("file", {"enable_thinking": False}, False),
    ("json", {"enable_thinking": False, "style": "plain"}, False),
    ("text", {"enable_thinking": False}, True),
])
def test_chat_options_render_as_apply_chat_template(given, kwargs, continued, templated, tmp_path):
    chats = CHATS if continued else CHATS[:2]
    value = {"text": THINKING, "file": tmp_path / "t.jinja", "json": tmp_path / "chat_template.json"}[given]
    (tmp_path / "t.jinja").write_text(THINKING)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": THINKING}))
    cfg = DatasetConfig(path=str(write_prompts(tmp_path / "c.jsonl", chats)), messages_field="messages",
                        chat_template=str(value), chat_template_kwargs=kwargs, continue_final_message=continued)
    texts = rendered(cfg, templated, tmp_path)
    assert texts == expected(templated, chats, THINKING, kwargs, continued)
    assert texts[0].startswith("[user] Hi there")  # the dataset's template, not the tokenizer's own
    assert ("<think></think>" in texts[0]) == (kwargs.get("enable_thinking") is False and not continued)
    if not continued:
        assert texts[1].endswith("[assistant] (terse) ")  # the record's variables over the config's
    else:
        assert texts[2].endswith("[assistant] One, two,")  # the last message left open, no generation prompt


def test_the_tokenizers_template_and_its_named_templates(templated, tmp_path):
    path = str(write_prompts(tmp_path / "c.jsonl", CHATS[:2]))
    assert rendered(DatasetConfig(path=path, messages_field="messages"), templated, tmp_path) == \
        expected(templated, CHATS[:2], None, {}, False)
    templated.chat_template = {"default": PLAIN, "thinking": THINKING}
    cfg = DatasetConfig(path=path, messages_field="messages", chat_template="thinking",
                        chat_template_kwargs={"enable_thinking": False})
    texts = rendered(cfg, templated, tmp_path)
    assert texts == expected(templated, CHATS[:2], "thinking", {"enable_thinking": False}, False)
    assert texts[0] == "[user] Hi there</s>[assistant] <think></think>"
    with pytest.raises(ConfigError, match=r"dataset.chat_template='other' is not allowed: not a file, not a template "
                                          r".* not one of the tokenizer's templates \(default, thinking\)"):
        rendered(DatasetConfig(path=path, messages_field="messages", chat_template="other"), templated, tmp_path)


def test_record_variables_through_an_arrow_table_and_normalized_records(templated, tmp_path):
    """Records whose variables differ in keys (Arrow fills the others with nulls), and a folder of files whose
    columns differ (its records are normalized): each record still renders with exactly its own."""
    chats = [CHATS[0], {**CHATS[1], "chat_template_kwargs": {"style": "terse"}},
             {**CHATS[0], "id": "think", "chat_template_kwargs": {"enable_thinking": True}}]
    folder = tmp_path / "folder"
    folder.mkdir()
    write_prompts(folder / "a.jsonl", chats)
    write_prompts(folder / "b.jsonl", [{**CHATS[0], "id": "plain"}])
    for path, normalized in ((write_prompts(tmp_path / "c.jsonl", chats), False), (folder, True)):
        cfg = DatasetConfig(path=str(path), messages_field="messages", chat_template=THINKING,
                            chat_template_kwargs={"enable_thinking": False})
        source = open_prompts(cfg, str(tmp_path / "cache"), templated)
        assert (source.fields.error is not None) == normalized
        records = chats + [{**CHATS[0], "id": "plain"}] * normalized
        assert [p.text for p in source.prompts(range(len(source)))] == \
            expected(templated, records, THINKING, {"enable_thinking": False}, False)


def cut_after_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def test_a_job_with_chat_options_equals_generate_of_apply_chat_template(tiny_model_dir, tiny_model, tokenizer,
                                                                       tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")  # its tokenizer has no template of its own
    (tmp_path / "t.jinja").write_text(THINKING)
    bad = {"id": "bad", "messages": CHATS[0]["messages"], "chat_template_kwargs": {"tokenize": True}}
    records = [*CHATS, bad, {"id": "list", "messages": CHATS[0]["messages"], "chat_template_kwargs": [1]}]
    out = tmp_path / "out"
    assert run_in_process([f"model={model}", f"dataset={write_prompts(tmp_path / 'c.jsonl', records)}",
                           "dataset.messages_field=messages", f"dataset.chat_template={tmp_path / 't.jinja'}",
                           "dataset.chat_template_kwargs={enable_thinking: false}",
                           "dataset.continue_final_message=true", f"output.dir={out}",
                           "generation.max_new_tokens=6", "output.print_table=false"]) == 0
    *done, bad_out, list_out = read_outputs(out)
    for record, chat in zip(done, CHATS):
        ids = tokenizer.apply_chat_template(chat["messages"], chat_template=THINKING, add_generation_prompt=False,
                                            continue_final_message=True, return_dict=False,
                                            **{"enable_thinking": False, **chat.get("chat_template_kwargs", {})})
        prompt = torch.tensor([ids])
        new = tiny_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                                  eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
        assert record["prompt_tokens"] == len(ids), chat["id"]
        assert record["completion_token_ids"] == cut_after_eos(new[0, len(ids):].tolist(), tokenizer.eos_token_id)
    assert done[2]["prompt"].endswith("[assistant] One, two,")
    assert bad_out["error"] == ("chat_template_kwargs={'tokenize': True} is not allowed: 'tokenize' is an argument of "
                                "apply_chat_template that distgen sets, not a template variable (dataset.chat_template"
                                " and dataset.continue_final_message choose the template and how it ends)")
    assert list_out["error"] == ("chat_template_kwargs=[1] is not allowed: expected an object of template variables "
                                 "({name: value, ...})")


@pytest.mark.parametrize("overrides, message", [
    (["dataset.chat_template=x"], r"dataset.messages_field=None is not allowed: dataset.chat_template, "
                                  r"chat_template_kwargs and continue_final_message render chat records"),
    (["dataset.continue_final_message=true"], r"dataset.messages_field=None is not allowed"),
    (["dataset.messages_field=m", "dataset.chat_template_kwargs={add_generation_prompt: false}"],
     r"dataset.chat_template_kwargs=\{'add_generation_prompt': False\} is not allowed: 'add_generation_prompt' is "
     r"an argument of apply_chat_template that distgen sets"),
    (["dataset.messages_field=m", "dataset.chat_template_kwargs=3"],
     r"dataset.chat_template_kwargs=3 is not allowed: expected an object of template variables"),
    (["dataset.messages_field=m", "dataset.chat_template=' '"], r"dataset.chat_template=' ' is not allowed"),
])
def test_chat_settings_are_checked_before_start(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["model=tiny", "dataset=demo", *overrides])


def test_a_template_that_is_not_jinja_or_not_there_is_refused_before_any_record(templated, tmp_path):
    path = str(write_prompts(tmp_path / "c.jsonl", CHATS[:1]))
    with pytest.raises(ConfigError, match=r"dataset.chat_template='\{% for m in messages %\}': the template is not "
                                          r"valid Jinja: line 1: "):
        rendered(DatasetConfig(path=path, messages_field="messages", chat_template="{% for m in messages %}"),
                 templated, tmp_path)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"x.json' is a .json file without a \"chat_template\" string"):
        rendered(DatasetConfig(path=path, messages_field="messages", chat_template=str(tmp_path / "x.json")),
                 templated, tmp_path)
    templated.chat_template = None
    with pytest.raises(ConfigError, match=r"the tokenizer has no chat template; give dataset.chat_template="):
        rendered(DatasetConfig(path=path, messages_field="messages"), templated, tmp_path)


def test_the_job_settings_hold_the_chat_options_that_are_set(tmp_path):
    def settings(**chat) -> dict:
        found = job_settings(RunConfig(model=ModelConfig(source="tiny"), dataset=DatasetConfig(**chat)))
        return {k: v for k, v in found.items() if k.startswith("dataset.") and k != "dataset.too_long"}

    assert settings() == {}
    template = tmp_path / "t.jinja"
    template.write_text(THINKING)
    found = settings(chat_template=str(template), chat_template_kwargs={"enable_thinking": False},
                     continue_final_message=True)
    assert found == {"dataset.chat_template": found["dataset.chat_template"],
                     "dataset.chat_template_kwargs.enable_thinking": False, "dataset.continue_final_message": True}
    assert settings(chat_template=THINKING)["dataset.chat_template"] == found["dataset.chat_template"]
    template.write_text(PLAIN)
    assert settings(chat_template=str(template))["dataset.chat_template"] != found["dataset.chat_template"]

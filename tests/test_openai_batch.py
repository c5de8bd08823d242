"""OpenAI batch files in and out: request lines become distgen records (custom_id -> id, messages through the chat
template, body fields -> the record's own settings), a request distgen cannot run becomes an error line for its
custom_id, and outputs.jsonl holds OpenAI batch output lines, one per request in input order."""
import json

import pytest

import distgen
from distgen.common.errors import ConfigError
from distgen.config import DatasetConfig
from distgen.inputs.source import open_prompts
from distgen.run import main as run_in_process
from tests.helpers import read_outputs, reference_greedy, write_prompts

CHAT, TEXT = "/v1/chat/completions", "/v1/completions"


def request(custom_id, url, **body):
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "gpt-4o-mini", **body}}


REQUESTS = [
    request("chat-1", CHAT, messages=[{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Name a colour"}], max_tokens=5, temperature=0),
    request("text-1", TEXT, prompt="The capital of France is", max_tokens=3, seed=4, stop=None),
    request("bad-tools", CHAT, messages=[{"role": "user", "content": "Hi"}], tools=[{"type": "function"}]),
    request("chat-2", CHAT, messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                                    {"type": "text", "text": "there"}]}],
            max_completion_tokens=4, n=1, stream=False),
    request("text-2", TEXT, prompt="def fibonacci(n):", top_p=0.5, temperature=0.0),
]


def read_all(path, tmp_path, **settings):
    source = open_prompts(DatasetConfig(path=str(path), **settings), str(tmp_path / "cache"))
    return source, source.prompts(range(len(source)))


@pytest.mark.parametrize("line, error", [
    (request("x", "/v1/embeddings", input="hi"), "url='/v1/embeddings' is not allowed: distgen runs "
                                                 "/v1/chat/completions and /v1/completions"),
    ({**request("x", TEXT, prompt="p"), "method": "GET"}, "method='GET' is not allowed: must be POST"),
    (request("x", TEXT, prompt="p", temperature=-1), "body.temperature=-1 is not allowed: must be 0 (greedy) or"),
    (request("x", TEXT, prompt="p", max_tokens=0), "body.max_tokens=0 is not allowed: must be an integer in [1,"),
    (request("x", TEXT, prompt="p", max_tokens=3, max_completion_tokens=4),
     "body.max_completion_tokens=4 disagrees with the other field setting max_new_tokens (3)"),
    (request("x", TEXT, prompt=["a", "b"]), "body.prompt must be a string (one prompt a request"),
    (request("x", TEXT, messages=[{"role": "user", "content": "p"}]), "body.messages is not supported for "
                                                                      "/v1/completions"),
    (request("x", CHAT, messages=[]), "body.messages must be a non-empty list of {role, content} messages"),
    (request("x", CHAT, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "body.messages[0].content[0] is a 'image_url' part: distgen runs text parts only"),
    (request("x", CHAT, messages=[{"role": "user", "content": "p"}], logprobs=1), "body.logprobs=1 is not allowed: "
                                                                                  "must be true or false"),
    (request("x", CHAT, messages=[{"role": "user", "content": "p"}], top_logprobs=2), "body.top_logprobs=2 is not "
                                                                                      "allowed without body.logprobs"),
    (request("x", TEXT, prompt="p", top_logprobs=2), "body.top_logprobs is not supported for /v1/completions"),
    (request("x", TEXT, prompt="p", logprobs=True), "body.logprobs=True is not allowed: must be an integer >= 0"),
    (request("x", TEXT, prompt="p", presence_penalty=3), "body.presence_penalty=3 is not allowed: must be a number "
                                                         "in [-2, 2]"),
    (request("x", TEXT, prompt="p", logit_bias={"a": 1}), "body.logit_bias={'a': 1} is not allowed"),
    (request("x", TEXT, prompt="p", response_format={"type": "grammar"}), "body.response_format={'type': 'grammar'} "
                                                                          "is not supported"),
    (request("x", TEXT, prompt="p", response_format={"type": "json_schema", "json_schema": {"name": "n"}}),
     "body.response_format.json_schema.schema must be a JSON schema (an object)"),
    ({"custom_id": "x", "method": "POST", "url": CHAT, "body": "text"}, "body must be a JSON object"),
])
def test_a_request_distgen_cannot_run_is_an_error_record_naming_the_field(line, error, tmp_path):
    source, prompts = read_all(write_prompts(tmp_path / "batch.jsonl", [REQUESTS[1], line]), tmp_path)
    assert source.format == "openai_batch"  # found by its first line
    assert [p.id for p in prompts] == ["text-1", "x"] and prompts[0].error is None
    assert prompts[1].error.startswith(error), prompts[1].error
    assert prompts[1].columns == {"method": line["method"], "url": line["url"], "body": line["body"]}


def test_logprobs_penalties_and_response_formats_are_the_records_own(tmp_path):
    """vLLM's knobs a body sets: penalties and logit_bias as they are; a chat request's logprobs=true with
    top_logprobs=K (0 without), a completion request's logprobs=K; response_format json_schema -> its schema,
    json_object -> any JSON object, text -> none."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    messages = [{"role": "user", "content": "p"}]
    lines = [request("chat", CHAT, messages=messages, logprobs=True, top_logprobs=3, presence_penalty=0.5,
                     frequency_penalty=-1, logit_bias={"17": -100},
                     response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}),
             request("chat-0", CHAT, messages=messages, logprobs=True, response_format={"type": "json_object"}),
             request("chat-off", CHAT, messages=messages, logprobs=False, response_format={"type": "text"}),
             request("text", TEXT, prompt="p", logprobs=2, presence_penalty=0)]
    _, prompts = read_all(write_prompts(tmp_path / "batch.jsonl", lines), tmp_path)
    chat, plain, off, text = prompts
    assert all(p.error is None for p in prompts), [p.error for p in prompts]
    assert (chat.logprobs, chat.presence_penalty, chat.frequency_penalty, chat.logit_bias) == (3, 0.5, -1.0,
                                                                                                ((17, -100.0),))
    assert json.loads(chat.json_schema) == schema and json.loads(plain.json_schema) == {"type": "object"}
    assert plain.logprobs == 0 and (off.logprobs, off.json_schema) == (None, None)
    assert (text.logprobs, text.presence_penalty, text.json_schema) == (2, 0.0, None)


def test_n_is_the_records_own_n(tmp_path):
    """body.n asks for n choices: the record's own n (generation.n's per-record form), its choices its samples."""
    line = request("x", CHAT, messages=[{"role": "user", "content": "p"}], n=2)
    source, prompts = read_all(write_prompts(tmp_path / "batch.jsonl", [REQUESTS[1], line]), tmp_path)
    assert prompts[1].error is None and prompts[1].n == 2


def test_request_lines_become_records_with_their_settings(tmp_path):
    _, prompts = read_all(write_prompts(tmp_path / "requests.jsonl", REQUESTS), tmp_path)
    chat, text, bad, parts, greedy = prompts
    assert [p.id for p in prompts] == [r["custom_id"] for r in REQUESTS]
    assert chat.templated and (chat.max_new_tokens, chat.temperature) == (5, 0.0)
    assert not text.templated and text.text == "The capital of France is"
    assert (text.max_new_tokens, text.seed, text.stop) == (3, 4, ())  # stop: null asks for the default
    assert bad.error.startswith("body.tools is not supported for /v1/chat/completions")
    assert parts.max_new_tokens == 4 and parts.error is None
    assert (greedy.top_p, greedy.temperature) == (0.5, 0.0)
    assert [p.columns["body"] for p in prompts] == [r["body"] for r in REQUESTS]  # model is recorded there


@pytest.mark.parametrize("lines, message", [
    (['{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}', '{"custom_id": '],
     r"requests.jsonl:2: not valid JSON"),
    ([json.dumps(REQUESTS[1]), json.dumps({**REQUESTS[0], "custom_id": None})],
     r"requests.jsonl:2: needs a custom_id \(a non-empty string naming the request\), found None"),
    ([json.dumps(REQUESTS[1]), json.dumps(REQUESTS[1])], r"id 'text-1' appears 2 times .* custom_id must be unique"),
])
def test_a_file_that_is_not_requests_stops_before_start(lines, message, tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=message):
        read_all(path, tmp_path, format="openai_batch")


def test_chat_requests_need_a_chat_template(tiny_model_dir, tmp_path, capsys):
    path = write_prompts(tmp_path / "requests.jsonl", REQUESTS[:2])
    assert run_in_process(["model=" + str(tiny_model_dir), f"dataset={path}", f"output.dir={tmp_path / 'out'}"]) == 2
    assert "holds /v1/chat/completions requests, which are rendered with the tokenizer's chat template, and the " \
           "model's tokenizer has none" in capsys.readouterr().err


def test_a_batch_file_in_gives_batch_output_lines_out(chat_model_dir, tiny_model, tokenizer, tmp_path):
    path = write_prompts(tmp_path / "requests.jsonl", REQUESTS)
    out = tmp_path / "out"
    args = [f"model={chat_model_dir}", f"dataset={path}", f"output.dir={out}", "generation.max_new_tokens=6",
            "generation.batch_size=2", "output.print_table=false", "output.shard_size=2"]
    assert run_in_process(args) == 0
    lines = read_outputs(out)
    assert [line["custom_id"] for line in lines] == [r["custom_id"] for r in REQUESTS]  # one each, in input order
    records = list(distgen.read_outputs(out))  # the shards keep distgen's records
    assert [r["id"] for r in records] == [line["custom_id"] for line in lines]
    eos = [tokenizer.eos_token_id]
    for line, record, sent in zip(lines, records, REQUESTS):
        assert set(line) == {"id", "custom_id", "response", "error"} and line["id"].startswith("batch_req_")
        if sent["custom_id"] == "bad-tools":
            assert line["response"] is None and line["error"]["code"] == "invalid_request"
            assert line["error"]["message"].startswith("body.tools is not supported")
            continue
        assert line["error"] is None and line["response"]["status_code"] == 200
        assert line["response"]["request_id"].startswith("req_")
        body = line["response"]["body"]
        chat = sent["url"] == CHAT
        assert body["object"] == ("chat.completion" if chat else "text_completion")
        assert body["id"].startswith("chatcmpl-" if chat else "cmpl-") and body["model"] == str(chat_model_dir)
        [choice] = body["choices"]
        assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
        text = choice["message"]["content"] if chat else choice["text"]
        assert (choice["message"]["role"] == "assistant") if chat else "message" not in choice
        assert text == record["completion"]
        budget = sent["body"].get("max_tokens") or sent["body"].get("max_completion_tokens") or 6
        assert record["completion_token_ids"] == reference_greedy(tiny_model, tokenizer, record["prompt"], budget, eos)
        assert body["usage"] == {"prompt_tokens": record["prompt_tokens"],
                                 "completion_tokens": len(record["completion_token_ids"]),
                                 "total_tokens": record["prompt_tokens"] + len(record["completion_token_ids"])}
        assert choice["finish_reason"] == ("length" if record["finish_reason"] == "length" else "stop")
    assert records[0]["prompt"] == "<s><system>Be brief.</s><user>Name a colour</s><assistant>"
    assert records[3]["prompt"] == "<s><user>Hi\nthere</s><assistant>"  # text parts joined by newlines
    assert json.loads((out / "stats.json").read_text())["summary"]["errors"] == 1
    # Written again (another merge of the same job), the ids are the same.
    (out / "outputs" / "manifest.json").write_text(json.dumps(
        {**json.loads((out / "outputs" / "manifest.json").read_text()), "complete": False}))
    assert run_in_process(args) == 0
    assert [line["id"] for line in read_outputs(out)] == [line["id"] for line in lines]


def test_any_dataset_can_be_answered_in_batch_output_lines(chat_model_dir, tmp_path):
    chats = [{"id": 7, "messages": [{"role": "user", "content": "Hi"}]}]
    out = tmp_path / "out"
    assert run_in_process([f"model={chat_model_dir}", f"dataset={write_prompts(tmp_path / 'c.jsonl', chats)}",
                           "dataset.messages_field=messages", f"output.dir={out}", "generation.max_new_tokens=2",
                           "output.merge_format=openai_batch", "output.print_table=false"]) == 0
    [line] = read_outputs(out)
    assert line["custom_id"] == "7" and line["response"]["body"]["object"] == "chat.completion"
    assert run_in_process([f"model={chat_model_dir}", f"dataset={write_prompts(tmp_path / 'r.jsonl', REQUESTS)}",
                           f"output.dir={tmp_path / 'o2'}", "output.columns=[body]"]) == 2


def test_structured_output_and_logprobs_in_batch_output_lines(chat_model_dir, tokenizer, tmp_path):
    """A json_schema response_format gives JSON that validates; logprobs come back in OpenAI's forms: a chat
    choice's {"content": [{token, logprob, bytes, top_logprobs}]}, a completion's legacy {tokens, token_logprobs,
    top_logprobs, text_offset}, one entry per completion token (EOS included), the raw logprobs distgen recorded."""
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("xgrammar", reason="structured output needs xgrammar (scripts/setup.sh installs it)")
    schema = {"type": "object", "properties": {"word": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["word", "n"]}
    lines = [request("chat", CHAT, messages=[{"role": "user", "content": "Give JSON"}], logprobs=True, top_logprobs=2,
                     response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}),
             request("text", TEXT, prompt="Pick", logprobs=1, max_tokens=4)]
    out = tmp_path / "out"
    assert run_in_process([f"model={chat_model_dir}", f"dataset={write_prompts(tmp_path / 'r.jsonl', lines)}",
                           f"output.dir={out}", "generation.max_new_tokens=60", "output.print_table=false"]) == 0
    chat_line, text_line = read_outputs(out)
    records = {r["id"]: r for r in distgen.read_outputs(out)}
    [chat] = chat_line["response"]["body"]["choices"]
    assert chat["finish_reason"] == "stop" and records["chat"]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(chat["message"]["content"]), schema)
    content = chat["logprobs"]["content"]
    kept = records["chat"]["logprobs"]
    assert [c["token"] for c in content] == [tokenizer.decode([t]) for t in records["chat"]["completion_token_ids"]]
    assert "".join(c["token"] for c in content[:-1]) == chat["message"]["content"] and content[-1]["token"] == "</s>"
    for entry, own in zip(content, kept):
        assert entry["logprob"] == own["logprob"] and entry["bytes"] == list(entry["token"].encode("utf-8"))
        assert [t["logprob"] for t in entry["top_logprobs"]] == [t["logprob"] for t in own["top"]]
        assert [t["token"] for t in entry["top_logprobs"]] == [tokenizer.decode([t["token_id"]]) for t in own["top"]]
    [text] = text_line["response"]["body"]["choices"]
    legacy, own = text["logprobs"], records["text"]["logprobs"]
    assert legacy["tokens"] == [tokenizer.decode([t]) for t in records["text"]["completion_token_ids"]]
    assert legacy["token_logprobs"] == [e["logprob"] for e in own] and len(legacy["tokens"]) == 4
    assert legacy["top_logprobs"] == [{tokenizer.decode([t["token_id"]]): t["logprob"] for t in e["top"]} for e in own]
    assert legacy["text_offset"] == [sum(len(t) for t in legacy["tokens"][:k]) for k in range(4)]

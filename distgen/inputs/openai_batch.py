"""OpenAI batch files (what `vllm run-batch` and the hosted batch APIs read), one request a line:

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64, "temperature": 0.7}}

Each line becomes a distgen record: custom_id -> id; body.messages (rendered through the tokenizer's chat
template) or body.prompt (/v1/completions) -> the prompt; the body's sampling fields -> the record's own
settings (presence/frequency penalties and logit_bias as vLLM's knobs; logprobs: a chat request's
logprobs=true with top_logprobs=K, a completion request's logprobs=K -> the record's logprobs=K;
response_format json_schema {"schema": {...}} -> its json_schema, json_object -> any JSON object); method, url
and body as given -> the record's columns (body.model is recorded there, not acted on).
A request distgen cannot run as asked (another url or method, a body field it does not support, a value out
of range, messages it cannot read) gets an error record naming the field, answered by an error line for its
custom_id. Only what makes the file unusable stops the job: a line that is not a JSON object, a line without
a custom_id, a custom_id given twice (distgen/inputs/source.py checks ids).
"""
from __future__ import annotations

from typing import Any, Optional

from distgen.common.errors import ConfigError
from distgen.inputs.records import OVERRIDES

CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
# The request fields a line's record keeps as its columns (the id is custom_id).
REQUEST_COLUMNS = ("method", "url", "body")
# A body field -> the record setting it sets (distgen.inputs.records.OVERRIDES); one whose setting that table does
# not hold is supported only at its neutral value (below).
SETTINGS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "temperature": "temperature",
            "top_p": "top_p", "top_k": "top_k", "seed": "seed", "stop": "stop", "n": "n",
            "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
            "logit_bias": "logit_bias"}
# Body fields whose form differs from the setting they set: read by `shaped` (logprobs and top_logprobs ->
# logprobs; response_format -> json_schema).
SHAPED = ("logprobs", "top_logprobs", "response_format")
# Body fields supported only at the value that asks nothing of distgen.
NEUTRAL: dict[str, Any] = {"n": 1, "stream": False, "echo": False, "best_of": 1}
# Body fields that do not change what is generated: kept in the record's body column, not acted on.
IGNORED = ("model", "user", "metadata", "store", "service_tier")
# What each url's body holds besides the fields above.
TEXT_FIELDS = {CHAT_URL: "messages", COMPLETIONS_URL: "prompt"}
URL_ONLY = {CHAT_URL: ("top_logprobs",), COMPLETIONS_URL: ("echo", "best_of")}
# response_format {"type": "json_object"}: any JSON object.
JSON_OBJECT = {"type": "object"}


class Refused(ValueError):
    """Why distgen cannot run one request as asked: its line gets an error line, the job goes on."""


def batch_request(line: Any, where: str) -> tuple[dict, dict, Optional[str]]:
    """A request line as (a distgen JSON-lines record, its columns, why it cannot run or None). A line that is
    not a JSON object or has no custom_id is a ConfigError naming `where` (file:line)."""
    if not isinstance(line, dict):
        raise ConfigError(f"{where}: expected a JSON object with custom_id, method, url and body (an OpenAI batch "
                          f"request), found {type(line).__name__}")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise ConfigError(f"{where}: needs a custom_id (a non-empty string naming the request), found "
                          f"{custom_id!r}")
    columns = {key: line.get(key) for key in REQUEST_COLUMNS}
    try:
        return {"id": custom_id, **request_record(line)}, columns, None
    except Refused as why:
        return {"id": custom_id, "prompt": ""}, columns, str(why)


def request_record(line: dict) -> dict:
    """The record of a request distgen runs as asked: its prompt or messages and its own settings."""
    if line.get("method") != "POST":
        raise Refused(f"method={line.get('method')!r} is not allowed: must be POST")
    url = line.get("url")
    if url not in TEXT_FIELDS:
        raise Refused(f"url={url!r} is not allowed: distgen runs {CHAT_URL} and {COMPLETIONS_URL}")
    body = line.get("body")
    if not isinstance(body, dict):
        raise Refused(f"body must be a JSON object of the request's fields, found {type(body).__name__}")
    given = {key: value for key, value in body.items() if value is not None}  # null asks for the default
    check_fields(given, url)
    text = TEXT_FIELDS[url]
    record = {"messages": chat_messages(given.get(text))} if text == "messages" else {"prompt": prompt_text(given)}
    return {**record, **settings(given), **shaped(given, url)}


def check_fields(given: dict, url: str) -> None:
    known = {TEXT_FIELDS[url], *SETTINGS, *SHAPED, *NEUTRAL, *IGNORED}
    known -= {other for u, other in TEXT_FIELDS.items() if u != url}
    known -= {field for u, fields in URL_ONLY.items() if u != url for field in fields}
    unknown = [key for key in given if key not in known]
    if unknown:
        read = sorted({*SETTINGS, *SHAPED} - {"n"} - {f for u, fields in URL_ONLY.items() if u != url for f in fields})
        raise Refused(f"body.{unknown[0]} is not supported for {url} (distgen reads {TEXT_FIELDS[url]}, "
                      f"{', '.join(read)}; model is recorded, not acted on)")
    for key, neutral in NEUTRAL.items():
        if key in given and given[key] != neutral and SETTINGS.get(key) not in OVERRIDES:
            raise Refused(f"body.{key}={given[key]!r} is not supported: distgen runs a request only as "
                          f"{key}={neutral!r}")


def checked(setting: str, value: Any, field: str) -> Any:
    """A body field's value for a record setting, range-checked as a record's own (records.OVERRIDES)."""
    ok, allowed, _ = OVERRIDES[setting]
    if not ok(value):
        raise Refused(f"body.{field}={value!r} is not allowed: must be {allowed}")
    return value


def settings(given: dict) -> dict:
    """The record settings the body's sampling fields set, each range-checked as a record's own."""
    found: dict[str, Any] = {}
    for key, setting in SETTINGS.items():
        if key not in given or setting not in OVERRIDES:
            continue
        value = checked(setting, given[key], key)
        if setting in found and found[setting] != value:
            raise Refused(f"body.{key}={value!r} disagrees with the other field setting {setting} "
                          f"({found[setting]!r}); give one of them")
        found[setting] = value
    return found


def shaped(given: dict, url: str) -> dict:
    """The record settings of the body fields whose form differs from theirs: logprobs (a completion request's
    logprobs=K; a chat request's logprobs=true with top_logprobs=K, 0 without) and response_format (json_schema)."""
    found: dict[str, Any] = {}
    if url == COMPLETIONS_URL:
        if "logprobs" in given:
            found["logprobs"] = checked("logprobs", given["logprobs"], "logprobs")
    elif not isinstance(given.get("logprobs", False), bool):
        raise Refused(f"body.logprobs={given['logprobs']!r} is not allowed: must be true or false (top_logprobs=K "
                      "asks for alternatives)")
    elif given.get("logprobs"):
        found["logprobs"] = checked("logprobs", given.get("top_logprobs", 0), "top_logprobs")
    elif "top_logprobs" in given:
        raise Refused(f"body.top_logprobs={given['top_logprobs']!r} is not allowed without body.logprobs=true")
    schema = response_schema(given.get("response_format", {"type": "text"}))
    if schema is not None:
        found["json_schema"] = checked("json_schema", schema, "response_format.json_schema.schema")
    return found


def response_schema(form: Any) -> Optional[dict]:
    """body.response_format as the record's json_schema: text -> None, json_object -> any JSON object,
    json_schema -> its schema."""
    kind = form.get("type") if isinstance(form, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT
    if kind == "json_schema":
        spec = form.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise Refused("body.response_format.json_schema.schema must be a JSON schema (an object)")
        return schema
    raise Refused(f"body.response_format={form!r} is not supported: distgen runs the types text, json_object and "
                  "json_schema (with json_schema.schema)")


def prompt_text(given: dict) -> str:
    prompt = given.get("prompt")
    if not isinstance(prompt, str):
        raise Refused(f"body.prompt must be a string (one prompt a request; lists of prompts or of token ids are "
                      f"not supported), found {type(prompt).__name__}")
    return prompt


def chat_messages(messages: Any) -> list[dict]:
    """The messages as the chat template reads them: each content as text (text parts joined by newlines)."""
    if not isinstance(messages, list) or not messages:
        raise Refused("body.messages must be a non-empty list of {role, content} messages")
    found = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise Refused(f"body.messages[{k}] must be a {{role, content}} message")
        found.append({**message, "content": message_text(message.get("content"), k)})
    return found


def message_text(content: Any, k: int) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Refused(f"body.messages[{k}].content must be text or a list of text parts, found "
                      f"{type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise Refused(f"body.messages[{k}].content[{j}] is a {kind!r} part: distgen runs text parts only")
        texts.append(part["text"])
    return "\n".join(texts)

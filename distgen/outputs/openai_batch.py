"""outputs.jsonl as OpenAI batch output lines (output.merge_format=openai_batch; `auto` picks it for an OpenAI batch
file): one line per request, in input order, as `vllm run-batch` and the hosted batch APIs write them:

    {"id": "batch_req_...", "custom_id": "r1", "error": null,
     "response": {"status_code": 200, "request_id": "req_...",
                  "body": {"id": "chatcmpl-...", "object": "chat.completion", "created": 1700000000, "model": "...",
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": "..."},
                                        "logprobs": null, "finish_reason": "stop"}],
                           "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}}}}

A /v1/completions request gets a `text_completion` body (`choices[i].text`). A record with logprobs (a request's
logprobs) gets them as OpenAI writes them: a chat choice's `logprobs` is {"content": [{"token", "logprob", "bytes",
"top_logprobs": [{"token", "logprob", "bytes"}, ...]}, ...]}; a completion choice's the legacy {"tokens",
"token_logprobs", "top_logprobs": [{token: logprob, ...}, ...], "text_offset"} (offsets into the completion text).
A token's text is the tokenizer's decode of that one token (a byte of a character cut in two decodes to U+FFFD). A request that got an error record gets
`{"id", "custom_id", "response": null, "error": {"code": "invalid_request", "message": why}}`. `model` is the model
distgen ran (a request's own body.model stays in its record's body column); the ids are digests of the job and
the custom_id, so a merge written again writes the same ids. The shards keep distgen's records.
"""
from __future__ import annotations

import hashlib
from itertools import accumulate, groupby
from typing import Callable, Iterable, Iterator, Optional

from distgen.inputs.openai_batch import CHAT_URL, COMPLETIONS_URL
from distgen.outputs.records import ERROR, MergeInfo

# distgen's finish reasons as OpenAI's: an EOS token or a stop string is "stop".
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
ERROR_CODE = "invalid_request"


def batch_output_lines(records: Iterable[dict], info: MergeInfo) -> Iterator[dict]:
    """One output line per request (the records of one prompt index: one, or one per sample), in order."""
    for _, group in groupby(records, key=lambda record: record["index"]):
        yield batch_output(list(group), info)


def is_chat(record: dict, info: MergeInfo) -> bool:
    """A request's url (its column, for an OpenAI batch file) says which it was; else the dataset does."""
    url = record.get("url")
    return url == CHAT_URL if url in (CHAT_URL, COMPLETIONS_URL) else info.chat


def batch_output(samples: list[dict], info: MergeInfo) -> dict:
    first = samples[0]
    custom_id = str(first["id"])
    digest = hashlib.sha256(f"{info.job}\0{custom_id}".encode("utf-8", "surrogatepass")).hexdigest()
    line = {"id": f"batch_req_{digest[:24]}", "custom_id": custom_id}
    failed = next((s for s in samples if s.get("finish_reason") == ERROR), None)
    if failed is not None:
        return {**line, "response": None, "error": {"code": ERROR_CODE, "message": failed.get("error") or ""}}
    chat = is_chat(first, info)
    ordered = sorted(samples, key=lambda s: s.get("sample_index", 0))
    completion_tokens = sum(s["completion_tokens"] for s in ordered)
    body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{digest[24:48]}",
            "object": "chat.completion" if chat else "text_completion", "created": info.created, "model": info.model,
            "choices": [choice(s, k, chat, info) for k, s in enumerate(ordered)],
            "usage": {"prompt_tokens": first["prompt_tokens"], "completion_tokens": completion_tokens,
                      "total_tokens": first["prompt_tokens"] + completion_tokens}}
    return {**line, "response": {"status_code": 200, "request_id": f"req_{digest[48:]}", "body": body}, "error": None}


def choice(record: dict, k: int, chat: bool, info: MergeInfo) -> dict:
    reason = FINISH_REASONS.get(record["finish_reason"], record["finish_reason"])
    text = record["completion"]
    found = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
    logprobs = openai_logprobs(record.get("logprobs"), chat, info.token_text or str)
    return {"index": record.get("sample_index", k), **found, "logprobs": logprobs, "finish_reason": reason}


def openai_logprobs(entries: Optional[list[dict]], chat: bool, text: Callable[[int], str]) -> Optional[dict]:
    """A record's logprobs (per token {"token_id", "logprob", "top": [{"token_id", "logprob"}, ...]}) in OpenAI's
    form for a chat or a text completion; None where the record has none."""
    if entries is None:
        return None
    if chat:
        return {"content": [{**token_logprob(e, text), "top_logprobs": [token_logprob(t, text) for t in e["top"]]}
                            for e in entries]}
    tokens = [text(e["token_id"]) for e in entries]
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{text(t["token_id"]): t["logprob"] for t in e["top"]} for e in entries],
            "text_offset": [0, *accumulate(len(token) for token in tokens)][:len(tokens)]}


def token_logprob(entry: dict, text: Callable[[int], str]) -> dict:
    token = text(entry["token_id"])
    return {"token": token, "logprob": entry["logprob"], "bytes": list(token.encode("utf-8"))}

"""Output records: a completion, or an error record for a prompt that could not run, each with the input
columns its record keeps (output.columns), flat beside the output fields. An input column named like an output
field (`completion`, `error`, ...) is kept as `input_<name>` (`input_` again while that is taken too)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

from distgen.engine.request import Completion, RequestFailed
from distgen.inputs.records import Prompt, RecordId

ERROR = "error"
# A record's keys that its JSON holds only when set (an output without them stays as it was before they existed).
OPTIONAL_FIELDS = ("logprobs", "prompt_logprobs", "error")


@dataclass(frozen=True)
class OutputRecord:
    """One output line: a completion, or an error record for a prompt that could not run."""
    # which prompt
    index: int
    id: RecordId  # the record's own id, a string or an integer as given, or its row
    sample_index: int  # which of the prompt's n completions (generation.n): 0..n-1
    prompt: str
    # what was generated
    completion: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "eos", "length", "stop" or "error"
    completion_token_ids: list[int] = field(default_factory=list)
    # per kept token {"token_id", "logprob", "top": [{"token_id", "logprob"}, ...]} when the record's settings
    # ask for logprobs (generation.logprobs or its own); absent from other records' JSON
    logprobs: Optional[list[dict]] = None
    # per prompt token (the first null: nothing predicts it) {"token_id", "logprob", "top": [...]} when the record's
    # settings ask for prompt logprobs (generation.prompt_logprobs or its own); absent from other records' JSON
    prompt_logprobs: Optional[list] = None
    # why an error record has no completion; absent from other records' JSON
    error: Optional[str] = None
    # the input record's kept columns (output.columns), by their names in the dataset: flat in the JSON
    columns: dict[str, Any] = field(default_factory=dict)

    def as_json(self, keep_prompt: bool = True) -> dict:
        """The record's JSON object (its optional fields only where set); without the prompt text when not
        `keep_prompt` (output.keep_prompt)."""
        record = {name: getattr(self, name) for name in OWN_FIELDS
                  if not (name in OPTIONAL_FIELDS and getattr(self, name) is None)}
        if not keep_prompt:
            del record["prompt"]
        return {**record, **{output_name(name, self.columns): value for name, value in self.columns.items()}}


# Every name an output record's own fields take (whether or not a record holds it), in their order.
OWN_FIELDS = tuple(f.name for f in fields(OutputRecord) if f.name != "columns")


def output_name(name: str, columns: dict) -> str:
    """An input column's name in the outputs: its own, or `input_<name>` where an output field has it (again while
    another input column or an output field has that)."""
    found = name
    while found in OWN_FIELDS or (found != name and found in columns):
        found = f"input_{found}"
    return found


def renamed_columns(names) -> dict[str, str]:
    """Of these input columns, those whose output name is not their own: {name: output name}."""
    columns = dict.fromkeys(names)
    return {name: output_name(name, columns) for name in names if output_name(name, columns) != name}


def completion_record(completion: Completion, text: str, token_ids: list[int], keep_prompt: bool = True) -> dict:
    """`text` and `token_ids` are the completion as kept (cut before a stop string; its logprobs cut with it)."""
    prompt = completion.prompt
    logprobs = None if completion.logprobs is None else completion.logprobs[:len(token_ids)]
    return OutputRecord(prompt.index, prompt.id, completion.sample, prompt.text, text, completion.prompt_token_count,
                        len(token_ids), completion.finish_reason, list(token_ids), logprobs,
                        completion.prompt_logprobs, columns=prompt.columns).as_json(keep_prompt)


def error_record(prompt: Prompt, reason: str, prompt_tokens: int = 0, keep_prompt: bool = True,
                 sample: int = 0) -> dict:
    """An error record of one sample of the prompt (each of its n samples gets one: every (index, sample_index)
    has exactly one record)."""
    return OutputRecord(prompt.index, prompt.id, sample, prompt.text, "", prompt_tokens, 0, ERROR, error=reason,
                        columns=prompt.columns).as_json(keep_prompt)


@dataclass(frozen=True)
class MergeInfo:
    """What a form of outputs.jsonl may need besides the records (distgen/outputs/shards.py MERGE_FORMATS)."""
    model: str = ""  # the model that generated (its hub id or folder as configured)
    job: str = ""  # the job's fingerprint
    chat: bool = False  # records without a url of their own are chat records (dataset.messages_field)
    created: int = 0  # unix time of the merge
    # A token id's text (the tokenizer's decode of that one token), for logprobs in OpenAI's form; None: its id as text
    token_text: Optional[Callable[[int], str]] = field(default=None, compare=False)


# How a completion is kept: (prompt, token ids) -> (text, token ids) cut before a stop string
# (distgen.engine.stops.StopStrings.cut).
Cut = Callable[[Prompt, list[int]], tuple[str, list[int]]]


def output_record(completion: Completion, cut: Cut, keep_prompt: bool = True) -> dict:
    """A finished request's record: its completion as kept, or an error record when it failed (in the
    engine, or here when its tokens cannot be decoded)."""
    if completion.error is None:
        try:
            return completion_record(completion, *cut(completion.prompt, completion.token_ids), keep_prompt)
        except RequestFailed as err:
            completion = Completion(completion.prompt, completion.prompt_token_count, [], ERROR, str(err),
                                    completion.sample)
    return error_record(completion.prompt, completion.error, completion.prompt_token_count, keep_prompt,
                        completion.sample)

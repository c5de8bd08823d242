"""Output records: a completion, or an error record for a prompt that could not run."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from distgen.engine.request import Completion, RequestFailed
from distgen.inputs.records import Prompt, RecordId

ERROR = "error"
# A record's keys that its JSON holds only when set (an output without them stays as it was before they existed).
OPTIONAL_FIELDS = ("logprobs", "error")


@dataclass(frozen=True)
class OutputRecord:
    """One output line: a completion, or an error record for a prompt that could not run."""
    # which prompt
    index: int
    id: RecordId  # the record's own id, a string or an integer as given, or its row
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
    # why an error record has no completion; absent from other records' JSON
    error: Optional[str] = None

    def as_json(self) -> dict:
        record = asdict(self)
        for optional in OPTIONAL_FIELDS:
            if record[optional] is None:
                del record[optional]
        return record


def completion_record(completion: Completion, text: str, token_ids: list[int]) -> dict:
    """`text` and `token_ids` are the completion as kept (cut before a stop string; its logprobs cut with it)."""
    logprobs = None if completion.logprobs is None else completion.logprobs[:len(token_ids)]
    return OutputRecord(completion.prompt.index, completion.prompt.id, completion.prompt.text, text,
                        completion.prompt_token_count, len(token_ids), completion.finish_reason,
                        list(token_ids), logprobs).as_json()


def error_record(prompt: Prompt, reason: str, prompt_tokens: int = 0) -> dict:
    return OutputRecord(prompt.index, prompt.id, prompt.text, "", prompt_tokens, 0, ERROR, error=reason).as_json()


# How a completion is kept: (prompt, token ids) -> (text, token ids) cut before a stop string
# (distgen.engine.stops.StopStrings.cut).
Cut = Callable[[Prompt, list[int]], tuple[str, list[int]]]


def output_record(completion: Completion, cut: Cut) -> dict:
    """A finished request's record: its completion as kept, or an error record when it failed (in the
    engine, or here when its tokens cannot be decoded)."""
    if completion.error is None:
        try:
            return completion_record(completion, *cut(completion.prompt, completion.token_ids))
        except RequestFailed as err:
            completion = Completion(completion.prompt, completion.prompt_token_count, [], ERROR, str(err))
    return error_record(completion.prompt, completion.error, completion.prompt_token_count)

"""Stop strings: a completion ends where one of its record's stop strings (else generation.stop's) first appears in
the decoded text, and the stop string is not part of the completion. With min_tokens (the record's, else
generation.min_tokens) only a stop string that ends past the text of the completion's first min_tokens tokens counts,
as vLLM's detokenizer has it (vllm-project/vllm#22014): stop strings, like EOS and stop_token_ids, wait for
min_tokens."""
from __future__ import annotations

from typing import Sequence

from distgen.engine.request import RequestFailed
from distgen.inputs.records import Prompt

# Tokens decoded per character of the longest stop string (a UTF-8 character is at most 4
# bytes, and a byte-level token at least one), plus slack for tokens that decode to no text.
TOKENS_PER_CHAR, TAIL_SLACK = 4, 4


def first_stop(text: str, stops: Sequence[str], floor: int = 0) -> int:
    """Where the earliest stop string that ends past `text[:floor]` starts in `text`, or -1."""
    found = [at for at in (text.find(stop, max(0, floor - len(stop) + 1)) for stop in stops) if at >= 0]
    return min(found, default=-1)


class StopStrings:
    def __init__(self, tokenizer, default: Sequence[str] = (), min_tokens: int = 0):
        self.tokenizer = tokenizer
        self.default = tuple(default)  # generation.stop: for records without a stop of their own
        self.min_tokens = min_tokens  # generation.min_tokens: for records without a min_tokens of their own

    def of(self, prompt: Prompt) -> tuple[str, ...]:
        return prompt.stop or self.default

    def floor(self, prompt: Prompt) -> int:
        """The completion's first tokens no stop string may end within (min_tokens)."""
        return self.min_tokens if prompt.min_tokens is None else prompt.min_tokens

    def decode(self, token_ids: Sequence[int]) -> str:
        """One request's tokens as text; a tokenizer that cannot decode them fails that request only."""
        try:
            return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        except Exception as err:  # only this request's tokens went in: attributable to it
            raise RequestFailed(f"its tokens could not be decoded to look for its stop strings: "
                                f"{type(err).__name__}: {err}") from err

    def hit(self, prompt: Prompt, generated: list[int]) -> bool:
        """Checked after every token on the decoded tail only: a stop string that just appeared
        lies within the last 4 * len(stop) tokens (a character cut at the tail's start decodes
        to a replacement character, before the stop string), past the text of the first min_tokens tokens (when
        the tail reaches back into them). Run per row per step: `of` and `floor` inlined."""
        stops = prompt.stop or self.default
        if not stops:
            return False
        floor = self.min_tokens if prompt.min_tokens is None else prompt.min_tokens
        if len(generated) <= floor:
            return False
        start = max(0, len(generated) - TOKENS_PER_CHAR * max(len(stop) for stop in stops) - TAIL_SLACK)
        held = len(self.decode(generated[start:floor])) if floor > start else 0
        return first_stop(self.decode(generated[start:]), stops, held) >= 0

    def cut(self, prompt: Prompt, token_ids: list[int]) -> tuple[str, list[int]]:
        """The completion text before the first stop string (past the first min_tokens tokens' text), and the tokens
        whose text ends before it."""
        text = self.decode(token_ids)
        floor = self.floor(prompt)
        at = first_stop(text, self.of(prompt), len(self.decode(token_ids[:floor])) if floor else 0)
        if at < 0:
            return text, token_ids
        keep = len(token_ids)
        while keep > 0 and len(self.decode(token_ids[:keep])) > at:
            keep -= 1
        return text[:at], token_ids[:keep]

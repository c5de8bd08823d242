"""Prompt logprobs (`generation.prompt_logprobs=K`, or a record's `prompt_logprobs`), as vLLM's
SamplingParams.prompt_logprobs: per prompt token its raw log-probability under the model (log_softmax of the
logits at the position before it: no penalty, no temperature) and the K most likely tokens' there.

A prefill forward returns only each prompt's last logits (`logits_to_keep`). A step that runs prompt tokens of a
request asking for them keeps, besides those, the logits of that request's chunk positions that predict a prompt
token (`widen`): a packed row (the slot cache) appends those positions to its `logits_to_keep` index, a
left-padded batch (whole prompts) keeps its last positions. Right after the forward each asking request's rows
are reduced on the device to its (positions, 1 + 2K) block (logits.top_logprobs) and kept on the request, so no
(tokens, vocab) logits outlive the step; the other rows' logits are the step's usual ones (`split`). A chunk's
last position predicts the next chunk's first token, so the blocks of a chunked prompt follow each other. The
host reads a request's blocks once, when it finishes (`entries`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from distgen.engine.host import read, upload
from distgen.engine.logits import logprob_entry, top_logprobs
from distgen.engine.request import Request
from distgen.engine.scheduler import StepPlan

# Rows of one log_softmax (bounds the temporaries of a long prompt chunk beside its (positions, vocab) logits).
SLICE = 512


@dataclass(frozen=True)
class Pick:
    """One asking request's kept logits: rows `first`.. of the widened logits (packed: of the kept rows; padded:
    of its own row's kept positions), `count` of them, predicting its prompt tokens `start + 1`.. ."""
    request: Request
    row: int      # padded: its batch row; packed: unused (-1)
    first: int
    count: int
    start: int


@dataclass(frozen=True)
class Widened:
    """A forward whose logits keep the asking requests' positions too: `kept` the step's usual rows (packed: the
    first `kept` kept rows; padded: None, the last position of every row)."""
    picks: list[Pick]
    kept: Optional[int]


def asking(plan: StepPlan) -> list[int]:
    """The plan's requests that run prompt tokens in this step and ask for prompt logprobs."""
    return [index for index, request in enumerate(plan.requests)
            if plan.prefills(index) and request.prompt_blocks is not None]


def predicted(request: Request, chunk: int) -> int:
    """How many of a chunk's positions predict a prompt token (the prompt's last position predicts a completion's)."""
    return max(0, min(chunk, request.prompt_length - 1 - request.prefilled))


def widen(inputs: dict[str, Any], plan: StepPlan, decode_slots: int, indices: list[int],
          device: torch.device) -> tuple[dict[str, Any], Widened]:
    """The forward's inputs keeping the asking requests' positions (before the step moves `prefilled` on)."""
    keep = inputs.get("logits_to_keep")
    if isinstance(keep, torch.Tensor):  # one packed row: each prefilling request's chunk after the decode tokens
        offsets, at = {}, decode_slots
        for index, chunk in enumerate(plan.chunks):
            if plan.prefills(index):
                offsets[index], at = at, at + chunk
        picks, extra, first = [], [], len(keep)
        for index in indices:
            request = plan.requests[index]
            count = predicted(request, plan.chunks[index])
            if count:
                picks.append(Pick(request, -1, first, count, request.prefilled))
                extra.extend(range(offsets[index], offsets[index] + count))
                first += count
        if not extra:
            return inputs, Widened([], len(keep))
        rows = upload(torch.tensor(extra, dtype=torch.long), device)
        return dict(inputs, logits_to_keep=torch.cat([keep, rows.to(keep.dtype)])), Widened(picks, len(keep))
    # left-padded whole prompts (one row each, the prompt right-aligned): keep the last positions of every row
    assert all(plan.requests[i].prefilled == 0 and plan.chunks[i] == plan.requests[i].prompt_length
               for i in indices), "a padded prefill runs whole prompts"
    width = max(plan.requests[i].prompt_length for i in indices)
    picks = [Pick(plan.requests[i], i, width - plan.requests[i].prompt_length, plan.requests[i].prompt_length - 1, 0)
             for i in indices]
    return dict(inputs, logits_to_keep=width), Widened(picks, None)


def split(logits: torch.Tensor, widened: Widened, rows: list[int]) -> torch.Tensor:
    """The model's logits of a widened forward -> the step's usual (rows, vocab) logits; each pick's rows reduced
    to its block, appended to its request's blocks. rows: the batch's logits row of each planned request (a padded
    batch's rows are its planned requests)."""
    if widened.kept is not None:
        kept = logits[0]
        for pick in widened.picks:
            keep_block(pick, kept[pick.first:pick.first + pick.count])
        return kept[:widened.kept]
    for pick in widened.picks:
        keep_block(pick, logits[rows[pick.row], pick.first:pick.first + pick.count])
    return logits[:, -1, :]


def keep_block(pick: Pick, logits: torch.Tensor) -> None:
    """(count, vocab) logits of one request's positions -> its (count, 1 + 2K) block (logits.top_logprobs)."""
    request = pick.request
    most = min(request.sampling.prompt_logprobs, logits.shape[-1])
    targets = torch.tensor(request.token_ids[pick.start + 1:pick.start + 1 + pick.count], dtype=torch.long)
    targets = upload(targets, logits.device)
    for at in range(0, pick.count, SLICE):
        raw = logits[at:at + SLICE].float().log_softmax(-1)
        request.prompt_blocks.append(top_logprobs(raw, targets[at:at + SLICE], most))


def entries(request: Request) -> Optional[list[Optional[dict]]]:
    """A finished request's prompt logprobs: None for its first prompt token (nothing predicts it), then per prompt
    token {"token_id", "logprob", "top": [{"token_id", "logprob"}, ... K]}; None where it did not ask. One host read."""
    if request.prompt_blocks is None:
        return None
    values = read(torch.cat(request.prompt_blocks)) if request.prompt_blocks else []
    found: list[Optional[dict]] = [None]
    for token, block in zip(request.token_ids[1:], values):
        found.append(logprob_entry(token, block, (len(block) - 1) // 2))  # its K, capped at the vocabulary
    return found

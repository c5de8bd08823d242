"""What `model.generate` gives: the references the equality tests compare distgen's tokens with."""
from __future__ import annotations

import torch

from .prompts import DEFAULT_BUDGET, PROMPTS


class OpenAIPenalties:
    """A plain reference of OpenAI's (and vLLM's) presence and frequency penalties as an HF logits processor:
    each token's count in the completion so far (not the prompt), counted one row at a time in Python."""

    def __init__(self, prompt_length: int, presence: float, frequency: float):
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        for row, ids in enumerate(input_ids[:, self.prompt_length:].tolist()):
            for token in set(ids):
                scores[row, token] -= self.frequency * ids.count(token) + self.presence
        return scores


def reference_generate(model, tokenizer, prompt: str, budget: int, eos_ids=(), presence: float = 0.0,
                       frequency: float = 0.0, **settings) -> list[int]:
    """Greedy `model.generate` with HF's own knobs (repetition_penalty, sequence_bias, min_new_tokens, ...) and the
    reference presence/frequency penalties, cut after the first EOS."""
    from transformers import LogitsProcessorList
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=model.device)
    processors = LogitsProcessorList([OpenAIPenalties(ids.shape[1], presence, frequency)] if presence or frequency
                                     else [])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget, do_sample=False,
                         eos_token_id=list(eos_ids) or None, pad_token_id=tokenizer.pad_token_id,
                         logits_processor=processors, **settings)
    new = out[0, ids.shape[1]:].tolist()
    ends = [at for at, token in enumerate(new) if token in eos_ids]
    return new[:ends[0] + 1] if ends else new


def reference_greedy(model, tokenizer, prompt: str, max_new_tokens: int, eos_ids) -> list[int]:
    """Single-process, unpadded `model.generate`, cut after the first EOS."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=list(eos_ids) or None, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    for position, token in enumerate(new):
        if token in eos_ids:
            return new[:position + 1]
    return new


def assert_matches_generate(model, tokenizer, got: dict, records=PROMPTS, eos_ids=()) -> None:
    """In-process engine completions (by prompt id) equal `model.generate`'s greedy tokens, each record's budget."""
    for record in records:
        budget = record.get("max_new_tokens", DEFAULT_BUDGET)
        want = reference_greedy(model, tokenizer, record["prompt"], budget, list(eos_ids))
        assert got[record["id"]].token_ids == want, record["id"]


def assert_prompts_greedy(records, model, tokenizer) -> None:
    """`records` are PROMPTS' outputs, in order, each equal to `model.generate` (the tokenizer's EOS)."""
    assert [r["id"] for r in records] == [p["id"] for p in PROMPTS]
    for record, prompt in zip(records, PROMPTS):
        budget = prompt.get("max_new_tokens", DEFAULT_BUDGET)
        want = reference_greedy(model, tokenizer, prompt["prompt"], budget, [tokenizer.eos_token_id])
        assert record["completion_token_ids"] == want, prompt["id"]

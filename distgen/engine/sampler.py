"""The sampler seam: logits rows -> next token per row, and which rows hit EOS, on the device; with the logprobs
of the rows that ask, packed into the step's one copy to the host (`Sampled.for_host`, `Sampled.unpack`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from distgen.config import GenerationConfig
from distgen.engine.host import upload
from distgen.engine.logits import TokenHistory, choose, logprob_entry, plan_rows
from distgen.engine.request import Request
from distgen.engine.sampling import GREEDY, RowSampling, row_sampling


@dataclass
class Sampled:
    """A step's tokens on the device, and what the host reads of them."""
    tokens: torch.Tensor   # (logits rows,) long
    is_eos: torch.Tensor   # (logits rows,) bool
    # The rows that asked for logprobs: their logits rows and K each (host), and their block (device,
    # logits.top_logprobs: (rows, 1 + 2 * max K) float64)
    logprob_rows: Sequence[int] = ()
    logprob_top: Sequence[int] = ()
    logprobs: Optional[torch.Tensor] = None

    def for_host(self) -> torch.Tensor:
        """What the step's one read copies: tokens and EOS flags (2, rows) as int64; with logprobs, those and the
        logprobs block flattened into one float64 vector (token ids are exact in float64)."""
        flags = torch.stack([self.tokens, self.is_eos.long()])
        if self.logprobs is None:
            return flags
        return torch.cat([flags.double().reshape(-1), self.logprobs.reshape(-1)])

    def unpack(self, values: Any) -> tuple[list[int], list[bool], dict[int, dict]]:
        """The read values as (tokens, EOS flags, each asking logits row's logprobs entry)."""
        if self.logprobs is None:
            return values[0], values[1], {}
        rows = len(self.tokens)
        tokens, flags = [int(v) for v in values[:rows]], [bool(v) for v in values[rows:2 * rows]]
        width, most = self.logprobs.shape[-1], (self.logprobs.shape[-1] - 1) // 2
        entries = {}
        for n, (row, k) in enumerate(zip(self.logprob_rows, self.logprob_top)):
            block = values[2 * rows + n * width:2 * rows + (n + 1) * width]
            entries[row] = logprob_entry(tokens[row], block, k, most)
        return tokens, flags, entries


class Sampler:
    def __init__(self, cfg: GenerationConfig, eos_ids: Sequence[int], device: torch.device):
        # generation.* for a row without settings of its own (temperature 0 is greedy, as row_sampling says)
        self.default = row_sampling(cfg)
        self.eos = sorted(set(eos_ids))
        self.eos_ids = torch.tensor(self.eos, dtype=torch.long, device=device)
        self.history = TokenHistory(device)  # the penalized sequences' token history (logits.py)

    def row_settings(self, requests: Sequence[Optional[Request]]) -> list[RowSampling]:
        """Each planned row's settings, worked out once per step for `needed` and the call: its request's, else
        generation.*'s (None: the row takes no token this step, so greedy and no draw)."""
        default = self.default
        return [GREEDY if r is None else r.sampling or default for r in requests]

    @staticmethod
    def needed(settings: Sequence[RowSampling]) -> bool:
        """Whether any row needs more than the argmax: it samples, or takes the logits path (logits.py)."""
        return any(s.chooses for s in settings)

    def __call__(self, logits: torch.Tensor, rows: list[int], requests: Sequence[Optional[Request]],
                 settings: Optional[Sequence[RowSampling]] = None) -> Sampled:
        """logits: (logits rows, vocab); `rows`: each planned request's logits row; `requests`: each planned
        request, None where it takes no token from this step (a chunk short of its prompt's end); `settings`:
        theirs (`row_settings`), when the caller has them already.

        Greedy takes every row's argmax; rows that sample, or have vLLM's knobs or logprobs, take the logits path
        (logits.py), all at once.
        """
        if settings is None:
            settings = self.row_settings(requests)
        chosen = [k for k, s in enumerate(settings) if s.chooses]
        logprobs, asking, top = None, [], []
        if not chosen:
            tokens = logits.argmax(dim=-1)
        else:
            batch = plan_rows([settings[k] for k in chosen], [requests[k] for k in chosen], self.eos,
                              logits.shape[-1], self.history, logits.device)
            selected = [rows[k] for k in chosen]
            if selected == list(range(logits.shape[0])):  # every logits row: no gather
                own = batch.processed and logits.dtype == torch.float32  # processors write in place: not the step's
                tokens, logprobs = choose(logits.clone() if own else logits, batch)
            else:
                tokens = logits.argmax(dim=-1)
                index = upload(torch.tensor(selected, dtype=torch.long), logits.device)
                tokens[index], logprobs = choose(logits.index_select(0, index), batch)
            asking, top = [rows[k] for k in chosen if settings[k].logprobs is not None], batch.logprob_top
        return Sampled(tokens, torch.isin(tokens, self.eos_ids), asking, top, logprobs)

    def release(self, requests: Sequence[Request]) -> None:
        """Finished (or requeued) requests give back their token history row."""
        for request in requests:
            self.history.release(request)

    def close(self) -> None:
        self.history.close()

"""Shared test helpers: tiny models of several decoder-only architectures, process-tree tools."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import (BloomConfig, GPT2Config, MptConfig, OPTConfig, PhiConfig, Qwen2Config,
                          AutoModelForCausalLM)

from distgen.tiny import build_tokenizer

# name -> config builder (vocab, bos, eos, pad); each a different way of encoding positions.
ARCHITECTURES: dict[str, Callable[..., object]] = {
    # learned absolute positions, tied input/output embeddings
    "gpt2": lambda v, b, e, p: GPT2Config(vocab_size=v, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                                          bos_token_id=b, eos_token_id=e, pad_token_id=p, tie_word_embeddings=True),
    # rotary, sliding-window attention (window wider than any test sequence)
    "qwen2": lambda v, b, e, p: Qwen2Config(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                            sliding_window=64, max_window_layers=1, max_position_embeddings=256,
                                            bos_token_id=b, eos_token_id=e, pad_token_id=p),
    # ALiBi, no position_ids argument, no sdpa
    "bloom": lambda v, b, e, p: BloomConfig(vocab_size=v, hidden_size=32, n_layer=2, n_head=4,
                                            bos_token_id=b, eos_token_id=e, pad_token_id=p),
    # learned positions with an offset of 2
    "opt": lambda v, b, e, p: OPTConfig(vocab_size=v, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                        num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128,
                                        bos_token_id=b, eos_token_id=e, pad_token_id=p),
    # partial rotary, parallel attention and MLP
    "phi": lambda v, b, e, p: PhiConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=256, partial_rotary_factor=0.5,
                                        bos_token_id=b, eos_token_id=e, pad_token_id=p),
    # ALiBi, no position_ids argument
    "mpt": lambda v, b, e, p: MptConfig(vocab_size=v, d_model=32, n_heads=4, n_layers=2, max_seq_len=128,
                                        bos_token_id=b, eos_token_id=e, pad_token_id=p),
}


def save_architecture(name: str, out: Path, seed: int = 0) -> Path:
    tokenizer = build_tokenizer()
    config = ARCHITECTURES[name](len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                 tokenizer.pad_token_id)
    config.initializer_range = 0.2
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def parent_pids() -> dict[int, int]:
    """pid -> parent pid for every process visible in /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # the command name (field 2) may hold spaces; the fields after its ')' are fixed
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    return parents


def descendants(pid: int) -> list[int]:
    parents = parent_pids()
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found.extend(children)
        frontier = children
    return found


def environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the distgen workers started under `launcher_pid`."""
    return {int(env["RANK"]): pid for pid in descendants(launcher_pid) if "RANK" in (env := environ_of(pid))}


def wait_until(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.05) -> float:
    """Seconds it took; fails naming `what` after `timeout`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)
    return time.monotonic() - start


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

"""The prompt set most tests run (PROMPTS, each record's budget) and prompt files."""
from __future__ import annotations

import json
from pathlib import Path

# Prompts of different lengths; some carry their own budget so batches and ranks end at different steps.
PROMPTS = [
    {"id": "short", "prompt": "Hi", "max_new_tokens": 3},
    {"id": "france", "prompt": "The capital of France is"},
    {"id": "story", "prompt": "Once upon a time, in a land far away, there lived a dragon who", "max_new_tokens": 14},
    {"id": "code", "prompt": "def fibonacci(n):", "max_new_tokens": 5},
    {"id": "haiku", "prompt": "Write a haiku about distributed systems."},
    {"id": "primes", "prompt": "A short list of prime numbers: 2, 3, 5,", "max_new_tokens": 2},
    {"id": "fox", "prompt": "The quick brown fox"},
]
DEFAULT_BUDGET = 8
# Chat markers the tiny byte-level tokenizer spells out byte by byte; BOS/EOS are its own special tokens.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


def write_prompts(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path

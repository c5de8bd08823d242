"""Structured output on a rank, through xgrammar (vLLM's default grammar library):

- `GrammarBook`: the tokenizer's info for xgrammar built once per rank from the HF tokenizer (its vocabulary as wide
  as the model's logits, which may exceed the tokenizer's; the engine's EOS ids as the grammar's end), and each
  distinct grammar compiled once (cached by its text, a failure too). A request owns a `GrammarMatcher`.
- `step_bitmask`: one step's constrained rows, all at once: one (rows, ceil(vocab / 32)) int32 bitmask on the
  host, each constrained row's filled by its matcher (1: allowed); `apply_bitmask` sets the disallowed logits to
  -inf on the device (xgrammar's CPU kernel on CPU, its Triton kernel on CUDA, torch ops where Triton is missing).
- The matcher takes each token on the host once the step's tokens are read (engine.core); the grammar's end
  (`is_terminated`: it took an EOS the grammar allowed once complete) finishes the completion with "stop".

JSON is generated compact, on one line (any_whitespace=False: one space after ',' and ':', none elsewhere), and
in strict mode (no property or item the schema does not name), so a model cannot pad a completion with whitespace
until its budget runs out. The library is imported only when a grammar is asked for.
"""
from __future__ import annotations

import importlib.util
import json
import re
from typing import Any, Optional, Sequence

import torch

from distgen.common.checks import require
from distgen.common.errors import ConfigError
from distgen.config import GRAMMAR_KEYS, RunConfig
from distgen.engine.request import RequestFailed
from distgen.inputs.grammar import Grammar, job_grammar, missing_package

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:line: ": the library's own words follow.
CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
# A JSON schema's form (see the module docstring).
JSON_FORM = dict(any_whitespace=False, strict_mode=True)


def library():
    import xgrammar
    return xgrammar


def library_words(err: BaseException) -> str:
    return CPP_PREFIX.sub("", str(err).strip()).strip()


def choice_ebnf(choices: Sequence[str]) -> str:
    """The choices as an EBNF grammar: root ::= "a" | "b" (JSON's string escapes are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def grammar_of(grammar: Grammar):
    """The grammar as xgrammar's tokenizer-free Grammar (raises the library's error for an invalid one)."""
    xgr = library()
    if grammar.kind == "json_schema":
        return xgr.Grammar.from_json_schema(grammar.text, **JSON_FORM)
    if grammar.kind == "regex":
        return xgr.Grammar.from_regex(grammar.text)
    return xgr.Grammar.from_ebnf(choice_ebnf(json.loads(grammar.text)))


def grammar_problem(grammar: Grammar) -> Optional[str]:
    """The library's words on why it cannot compile this grammar, or None."""
    try:
        grammar_of(grammar)
    except Exception as err:  # xgrammar raises RuntimeError/ValueError with its parser's message
        return library_words(err)
    return None


def check_grammar(cfg: RunConfig) -> None:
    """A job asking for a grammar (generation.json_schema, regex, choice): the library is installed, the schema file
    reads, and the grammar compiles; each a ConfigError naming the key, before any process starts."""
    given = [key for key in GRAMMAR_KEYS if getattr(cfg.generation, key) is not None]
    if not given:
        return
    missing = missing_package()
    if missing:
        raise ConfigError(f"generation.{given[0]} is not possible: {missing}")
    grammar = job_grammar(cfg.generation)
    problem = grammar_problem(grammar)
    require(problem is None, f"generation.{given[0]}", getattr(cfg.generation, given[0]),
            f"xgrammar cannot compile it: {problem}")
    require(cfg.model.assistant == "none", f"generation.{given[0]}", getattr(cfg.generation, given[0]),
            f"model.assistant={cfg.model.assistant} verifies drafts against the model's plain logits, which no grammar "
            "masks; use model.assistant=none")


def tokenizer_info(tokenizer: Any, vocab: int, stop_ids: Sequence[int]):
    """xgrammar's view of the tokenizer: each token's bytes (xgrammar decodes the HF vocabulary), `vocab` wide (the
    model's logits; ids past the tokenizer's are never allowed), `stop_ids` (the engine's EOS ids; none: xgrammar's
    guess) ending the grammar. The tokenizer's special tokens other than those are made empty, which xgrammar never
    allows: the engine decodes completions without them, so a grammar must not count on their text."""
    xgr = library()
    found = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=list(stop_ids) or None)
    decoded = list(found.decoded_vocab)
    for token in set(getattr(tokenizer, "all_special_ids", ())) - set(found.stop_token_ids):
        if 0 <= token < len(decoded):
            decoded[token] = b""
    return xgr.TokenizerInfo(decoded, xgr.VocabType.RAW, vocab_size=vocab, stop_token_ids=found.stop_token_ids,
                             add_prefix_space=found.add_prefix_space)


class GrammarBook:
    """A rank's grammars: the tokenizer's info (built on first use), each grammar compiled once, a matcher each."""

    def __init__(self, tokenizer: Any, vocab: int, stop_ids: Sequence[int]):
        self.tokenizer, self.vocab, self.stop_ids = tokenizer, vocab, sorted(set(stop_ids))
        self.compiler = None
        self.compiled: dict[Grammar, Any] = {}  # a CompiledGrammar, or the library's words on why not (str)
        self.compiles = 0  # grammars compiled (each distinct one once)

    def start(self) -> None:
        missing = missing_package()
        if missing:
            raise RequestFailed(missing)
        if self.tokenizer is None:
            raise RequestFailed("structured output needs the tokenizer: build_engine(tokenizer=...)")
        self.compiler = library().GrammarCompiler(tokenizer_info(self.tokenizer, self.vocab, self.stop_ids),
                                                  max_threads=1)

    def compile(self, grammar: Grammar):
        if self.compiler is None:
            self.start()
        if grammar not in self.compiled:
            self.compiles += 1
            try:
                self.compiled[grammar] = self.compiler.compile_grammar(grammar_of(grammar))
            except Exception as err:  # the library's error on this grammar: the record's own
                self.compiled[grammar] = library_words(err)
        return self.compiled[grammar]

    def matcher(self, grammar: Grammar):
        """A new matcher of the grammar; a grammar xgrammar cannot compile fails the request, in its words."""
        compiled = self.compile(grammar)
        if isinstance(compiled, str):
            raise RequestFailed(f"{grammar.kind} is not allowed: xgrammar cannot compile it: {compiled}")
        return library().GrammarMatcher(compiled)


def step_bitmask(matchers: Sequence[Optional[Any]], vocab: int) -> tuple[list[int], torch.Tensor]:
    """The rows whose request has a matcher, and a (rows, ceil(vocab / 32)) int32 host bitmask, each of those
    rows filled by its matcher (other rows stay all ones: allowed)."""
    rows = [k for k, matcher in enumerate(matchers) if matcher is not None]
    bitmask = library().allocate_token_bitmask(len(matchers), vocab)
    for k in rows:
        matchers[k].fill_next_token_bitmask(bitmask, k)
    return rows, bitmask


def kernel(device: torch.device) -> str:
    """xgrammar's kernel for logits on this device: its CPU path, Triton on CUDA (a CUDA torch brings triton), torch
    ops where Triton is missing."""
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "torch_native"


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """logits (batch rows, vocab) fp32, in place: each of `rows` at -inf where its bitmask row has a 0 bit."""
    library().apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1], indices=rows,
                                          backend=kernel(logits.device))

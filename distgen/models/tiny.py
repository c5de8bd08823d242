"""Tiny random-init Llama models and a byte-level tokenizer, built offline.

`python -m distgen.models.tiny OUT_DIR` saves one with `save_pretrained`, so the demo and the
tests exercise the same `from_pretrained` path a real model takes.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from distgen.config import TinyModelConfig

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: one token per UTF-8 byte plus BOS/EOS/PAD; needs no training data."""
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate([*SPECIAL_TOKENS, *byte_symbols])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_llama_config(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=4096,
        initializer_range=cfg.init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """The same weights on every call with the same `cfg.seed` (so on every rank)."""
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    try:
        model = LlamaForCausalLM(tiny_llama_config(cfg, tokenizer))
    finally:
        torch.random.set_rng_state(rng_state)
    return model.eval()


def save_tiny(out_dir: str | Path, cfg: TinyModelConfig = TinyModelConfig()) -> Path:
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    build_tiny_model(cfg, tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Save a tiny random-init Llama and its tokenizer.")
    parser.add_argument("out_dir")
    defaults = TinyModelConfig()
    for name in ("layers", "hidden_size", "heads", "kv_heads", "intermediate_size", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--init-std", type=float, default=defaults.init_std)
    args = vars(parser.parse_args(argv))
    out_dir = args.pop("out_dir")
    cfg = TinyModelConfig(**args)
    cfg.check()
    print(f"saved tiny Llama to {save_tiny(out_dir, cfg)}")


if __name__ == "__main__":
    main()

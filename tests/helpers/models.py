"""Tiny models of several decoder-only architectures (sliding windows among them), LoRA adapters, a hub cache."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import (AutoModelForCausalLM, BloomConfig, Gemma2Config, Gemma3TextConfig, GPT2Config, MistralConfig,
                          MptConfig, OPTConfig, PhiConfig, Qwen2Config)

from distgen.models.tiny import build_tokenizer

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


# Tiny sliding-window models, window 6 (PROMPTS run past it), 4 layers, each way of saying which layers are local.
WINDOW = 6
WINDOW_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
WINDOW_ARCHITECTURES: dict[str, Callable[..., object]] = {
    # every layer local
    "mistral": lambda **ids: MistralConfig(**WINDOW_COMMON, **ids, sliding_window=WINDOW),
    # layers from max_window_layers=2 on local (layer_types derived from use_sliding_window)
    "qwen2": lambda **ids: Qwen2Config(**WINDOW_COMMON, **ids, use_sliding_window=True, sliding_window=WINDOW,
                                       max_window_layers=2),
    # local and global alternating (local first); scores soft-capped, query_pre_attn_scalar != head_dim
    "gemma2": lambda **ids: Gemma2Config(**WINDOW_COMMON, **ids, head_dim=16, sliding_window=WINDOW,
                                         query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                                         final_logit_softcapping=8.0),
    # every second layer global through the config's sliding_window_pattern
    "gemma3": lambda **ids: Gemma3TextConfig(**WINDOW_COMMON, **ids, head_dim=16, sliding_window=WINDOW,
                                             query_pre_attn_scalar=24, sliding_window_pattern=2),
}


def window_config(name: str, tokenizer, **changes):
    config = WINDOW_ARCHITECTURES[name](vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.initializer_range = 0.2
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def build_window_model(name: str, tokenizer, seed: int = 3, **changes) -> torch.nn.Module:
    """A tiny sliding-window model in fp32, eval; Gemma's norms (1 + weight, zero at init) drawn at random so
    its greedy tokens vary. `changes`: config attributes set after the config is built (same weights by seed)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(window_config(name, tokenizer, **changes), dtype=torch.float32)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if name.startswith("gemma") and "norm" in key:
                param.normal_(0, 0.5)
    return model.eval()


def save_window_model(name: str, out: Path, **changes) -> Path:
    build_window_model(name, build_tokenizer(), **changes).save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


def save_lora(model_dir: Path, out: Path, seed: int, targets=("q_proj", "v_proj"), **settings) -> Path:
    """A LoRA adapter for the model saved in `model_dir`, saved by peft into `out`: rank 4 on `targets`, A and B
    random (init_lora_weights=False, so B is not zero and the adapter changes the outputs), seeded."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False, **settings)
    get_peft_model(base, config).save_pretrained(out)
    return out


def merged_with_lora(model_dir: Path, adapter: Optional[Path]):
    """The model of `model_dir` with `adapter` merged in by peft's own merge_and_unload (None: the base model)."""
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return base if adapter is None else PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()


def fake_hub_cache(cache: Path, repo_id: str, model_dir: Path, commit: str = "0" * 40) -> Path:
    """`model_dir`'s files laid out as huggingface_hub caches a download of `repo_id` at `commit` (refs/main)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot

"""Load the tokenizer and the model (whole on CPU, or as a weightless meta skeleton); layouts place or shard it."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PretrainedConfig
from transformers.utils import is_flash_attn_2_available

from distgen.common.errors import ConfigError
from distgen.common.hub import names_hub_id, snapshot
from distgen.common.registry import Registry
from distgen.config import ModelConfig
from distgen.models.files import SAFETENSORS, read_json_object, weight_file_problem
from distgen.models.lora import check_adapters, load_adapter_bank, merge_adapter
from distgen.models.quantizers import get_quantizer
from distgen.models.tiny import build_tiny_model, build_tokenizer, tiny_llama_config

logger = logging.getLogger(__name__)

# model.source: where the weights come from.
MODEL_SOURCES: Registry[None] = Registry("model.source", valued=True)
MODEL_SOURCES.register("pretrained", None, None,
                       doc="model.path: a folder saved with save_pretrained, or a hub id (org/name) in the HF cache")
MODEL_SOURCES.register("tiny", None, None, doc="a 2-layer random-init Llama built in memory (model.tiny.*)")
# model.dtype -> the weights' dtype (auto: bf16 on CUDA, fp32 on CPU).
DTYPES: Registry[torch.dtype] = Registry("model.dtype", valued=True, also={"auto": "bf16 on CUDA, fp32 on CPU"})
DTYPES.register("fp32", None, torch.float32, doc="float32")
DTYPES.register("bf16", None, torch.bfloat16, doc="bfloat16")
DTYPES.register("fp16", None, torch.float16, doc="float16")
# model.attn_implementation -> what transformers is asked for (auto: see resolve_attn_implementation).
ATTENTION: Registry[str] = Registry("model.attn_implementation", valued=True, also={
    "auto": "flash_attention_2 where it can run, else what transformers picks (sdpa, or eager)"})
ATTENTION.register("eager", None, "eager", doc="transformers' eager attention")
ATTENTION.register("sdpa", None, "sdpa", doc="torch's scaled_dot_product_attention")
ATTENTION.register("flash_attention_2", None, "flash_attention_2", doc="the flash-attn package (CUDA, fp16/bf16)")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES.get(name)


def resolve_attn_implementation(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """auto: flash-attention 2 where it can run (transformers' check: flash_attn installed in a version
    it supports, CUDA visible; and a half-precision model, all it takes), else None, so transformers
    picks what the architecture supports (sdpa where it can, eager for ALiBi models such as Bloom
    and MPT, which refuse an explicit sdpa)."""
    if name != "auto":
        return ATTENTION.get(name)
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and is_flash_attn_2_available():
        return "flash_attention_2"
    return None


# Weight files from_pretrained reads, and the index files that list a sharded checkpoint's parts.
BIN = ".bin"
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def read_model_config(folder: Path, key: str) -> dict:
    """config.json as a dict; a missing or unreadable one is a ConfigError naming `key` and the file."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{key}={str(folder)!r} is not a folder with a saved model (no config.json there)")
    return read_json_object(path, folder, key)


def weight_files(folder: Path, key: str) -> list[Path]:
    """The checkpoint's weight files: those an index lists (each must exist), else the top-level
    .safetensors (preferred, as from_pretrained does) or .bin files."""
    for name in WEIGHT_INDEXES:
        index = folder / name
        if index.is_file():
            try:
                parts = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise ConfigError(f"{key}={str(folder)!r}: {index} is not a weight index ({err!r})") from None
            missing = [p for p in parts if not (folder / p).is_file()]
            if missing:
                raise ConfigError(f"{key}={str(folder)!r}: {index.name} lists weight files that are not there: "
                                  f"{', '.join(missing[:5])}")
            return [folder / p for p in parts]
    for suffix in (SAFETENSORS, BIN):
        found = sorted(p for p in folder.glob(f"*{suffix}") if p.is_file() and p.name != "training_args.bin")
        if found:
            return found
    raise ConfigError(f"{key}={str(folder)!r} has no weight files (*.safetensors or *.bin, or an index of them); "
                      "save the model there with save_pretrained")


def check_weights(folder: Path, key: str) -> None:
    for path in weight_files(folder, key):
        problem = weight_file_problem(path)
        if problem:
            raise ConfigError(f"{key}={str(folder)!r}: the weight file {path.name} is not usable: {problem}")


def check_model_folder(folder: Path, key: str, trust_remote_code: bool) -> None:
    """config.json parses, the weight files are there with valid headers, and a model that needs its own
    code (auto_map in config.json) is run only with model.trust_remote_code=true."""
    config = read_model_config(folder, key)
    if config.get("auto_map") and not trust_remote_code:
        raise ConfigError(f"{key}={str(folder)!r} needs its own Python code (auto_map in config.json: "
                          f"{', '.join(sorted(config['auto_map']))}), which distgen runs only with "
                          "model.trust_remote_code=true; read that code first")
    check_weights(folder, key)


HUB_KEYS = ("path", "tokenizer_path", "assistant_path")


def hub_snapshot(key: str, repo_id: str, cfg: ModelConfig) -> str:
    """The local folder of hub model `repo_id` at model.revision (distgen.common.hub)."""
    return snapshot(f"model.{key}", repo_id, cfg.revision, cfg.allow_download)


def resolve_hub_ids(cfg: ModelConfig) -> ModelConfig:
    """model.path (and tokenizer_path, assistant_path) as local folders: a value that is not a folder here but
    reads as a hub id (`org/name`) becomes its snapshot folder in the Hugging Face cache."""
    found = {}
    for key in HUB_KEYS:
        value = getattr(cfg, key)
        if names_hub_id(value):
            found[key] = hub_snapshot(key, value, cfg)
    if cfg.revision is not None and not found:  # as dataset.revision for a local dataset (distgen.inputs.source)
        what = "model=tiny builds its model" if cfg.source == "tiny" else f"model.path={cfg.path!r} is a folder here"
        raise ConfigError(f"model.revision={cfg.revision!r} is not allowed: it picks a hub model's version, and {what}")
    return replace(cfg, **found) if found else cfg


def check_model_source(cfg: ModelConfig) -> None:
    """Fail before any worker starts, and before output.dir is touched, when a model folder cannot
    load: no or broken config.json, missing or cut weight files, remote code without the flag, LoRA
    adapters that are not (or without peft)."""
    if cfg.source == "pretrained":
        check_model_folder(Path(cfg.path), "model.path", cfg.trust_remote_code)
    if cfg.assistant == "draft":
        check_model_folder(Path(cfg.assistant_path), "model.assistant_path", cfg.trust_remote_code)
    check_adapters(cfg.lora)


def read_tokenizer(cfg: ModelConfig):
    """The saved tokenizer; a folder without a usable one is a ConfigError naming it."""
    folder = cfg.tokenizer_path or cfg.path
    key = "model.tokenizer_path" if cfg.tokenizer_path else "model.path"
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    except Exception as err:  # transformers raises OSError, ValueError, TypeError, ... depending on what is missing
        reason = str(err).strip().split("\n")[0][:300]
        raise ConfigError(f"{key}={folder!r} has no usable tokenizer ({type(err).__name__}: {reason}); save one there "
                          "with tokenizer.save_pretrained, or give model.tokenizer_path=<folder>") from None
    if not getattr(tokenizer, "vocab_size", 0):  # transformers builds an empty one when the files are missing
        raise ConfigError(f"{key}={folder!r} has no usable tokenizer (no vocabulary: tokenizer.json or vocab files "
                          "are missing); save one there with tokenizer.save_pretrained, or give "
                          "model.tokenizer_path=<folder>")
    return tokenizer


def ensure_pad_token(tokenizer, where: str) -> None:
    """Padding needs a token id; its positions are masked out, so any id in the vocabulary works."""
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
        return
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    logger.warning("the tokenizer of %s has neither a pad nor an EOS token: padding with token id 0 (%r, masked "
                   "out); completions end only at max_new_tokens unless generation.eos_token_ids is set", where,
                   tokenizer.pad_token)


def load_tokenizer(cfg: ModelConfig):
    if cfg.source == "tiny":
        tokenizer = build_tokenizer()
    else:
        tokenizer = read_tokenizer(cfg)
    ensure_pad_token(tokenizer, cfg.tokenizer_path or cfg.path or "model=tiny")
    return tokenizer


def load_model_config(cfg: ModelConfig, tokenizer) -> PretrainedConfig:
    """The architecture's settings (context length, sliding window) without loading weights."""
    if cfg.source == "tiny":
        return tiny_llama_config(cfg.tiny, tokenizer)
    return AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)


def load_model(cfg: ModelConfig, tokenizer, device: torch.device) -> PreTrainedModel:
    """The whole model with its weights, on CPU."""
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.source == "tiny":
        model = build_tiny_model(cfg.tiny, tokenizer).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.path, dtype=dtype, attn_implementation=resolve_attn_implementation(cfg.attn_implementation, device, dtype),
            trust_remote_code=cfg.trust_remote_code)
    return model.eval()


def build_unloaded(cfg: ModelConfig, tokenizer, device: torch.device) -> PreTrainedModel:
    """The architecture built from its config, no checkpoint read; the caller's context decides
    where its tensors go (the meta device, DeepSpeed's zero.Init)."""
    if cfg.source == "tiny":  # built from config, so building it in the caller's context is enough
        return load_model(cfg, tokenizer, device)
    config = AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    dtype = resolve_dtype(cfg.dtype, device)
    model = AutoModelForCausalLM.from_config(
        config, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
        attn_implementation=resolve_attn_implementation(cfg.attn_implementation, device, dtype))
    return model.eval()


def build_skeleton(cfg: ModelConfig, tokenizer, device: torch.device) -> PreTrainedModel:
    """The same architecture on the meta device: shapes and dtypes, no memory, no weights."""
    with torch.device("meta"):
        return build_unloaded(cfg, tokenizer, device)


@dataclass(frozen=True)
class ModelSource:
    """How a layout gets the model: whole with weights, or as a weightless skeleton."""
    cfg: ModelConfig
    tokenizer: object
    device: torch.device

    def full(self) -> PreTrainedModel:
        """The weights as read, with one LoRA adapter (model.lora=<folder>) merged into them, their Linear
        layers then quantized by model.quantization (if not none). Adapters chosen per record are not merged
        (`adapters`)."""
        model = load_model(self.cfg, self.tokenizer, self.device)
        if isinstance(self.cfg.lora, str):
            model = merge_adapter(model, self.cfg.lora)
        return get_quantizer(self.cfg.quantization).apply(model, self.device)

    def adapters(self, model: PreTrainedModel):
        """Adapters chosen per record (model.lora by name) over `model` as placed, the base model active (an
        AdapterBank); None for one merged adapter or none."""
        return load_adapter_bank(model, self.cfg.lora)

    @property
    def reads_whole(self) -> bool:
        """Whether the weights must be read whole before placement (merged with an adapter, or quantized)."""
        return self.cfg.lora is not None or self.cfg.quantization != "none"

    def skeleton(self) -> PreTrainedModel:
        return build_skeleton(self.cfg, self.tokenizer, self.device)

    def unloaded(self) -> PreTrainedModel:
        return build_unloaded(self.cfg, self.tokenizer, self.device)

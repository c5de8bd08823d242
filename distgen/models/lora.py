"""LoRA adapters (model.lora, through the peft package): one merged into the weights at load, or several held
beside the base weights and swapped in, one at a time, for the records that choose them.

One folder: `merge_adapter` is peft's own `PeftModel.from_pretrained(model, folder).merge_and_unload()` on the
whole weights as read, before any quantization, sharding or placement (ModelSource.full), so every layout runs
the merged model: what `generate` of that merged model gives.

Several (`AdapterBank`, layout=replicate): the base model stays as loaded; the bank keeps a copy of the base
weight of every layer an adapter targets, and each adapter's peft layer (its A and B factors and scaling).
`activate(name)` writes `base + delta(name)` into those layers (`base` for None), with `delta` from peft's own
`get_delta_weight` and the same in-place add peft's merge makes, so the weights are bit for bit those of
`merge_and_unload` with that adapter. A layer whose module keeps its weight in a layout of its own (the CPU
kernels' packed linears) takes the new weight through its `assign_weight(weight)`; others by a copy into their
weight, so the tensors (and anything holding their addresses: CUDA graphs, the owned CPU stack) stay put.
"""
from __future__ import annotations

import importlib.util
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from distgen.common.errors import ConfigError
from distgen.config import adapter_folders, named_adapters
from distgen.models.files import read_json_object, weight_file_problem

PEFT = "peft"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# The files of an adapter folder that decide its outputs (the job's settings hold their digests).
ADAPTER_FILES = (ADAPTER_CONFIG, *ADAPTER_WEIGHTS)
# adapter_config.json settings an adapter swapped per record must leave off: each changes more than the
# targeted linear layers' weights (a magnitude vector, biases, whole modules, embedding rows).
SWAP_BLOCKERS = ("use_dora", "lora_bias", "modules_to_save", "trainable_token_indices")


def adapter_key(lora: Any, name: str) -> str:
    """How an adapter's folder is named in messages: model.lora, or model.lora.<name> among several."""
    return "model.lora" if named_adapters(lora) is None else f"model.lora.{name}"


def read_adapter_config(folder: Path, key: str) -> dict:
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise ConfigError(f"{key}={str(folder)!r} is not a LoRA adapter folder (no {ADAPTER_CONFIG} there); save one "
                          "with peft's save_pretrained")
    return read_json_object(path, folder, key)


def swap_blocker(config: dict) -> Optional[str]:
    """Why an adapter cannot be swapped in per record (its delta is more than its linear layers' B @ A), or None."""
    found = [name for name in SWAP_BLOCKERS if config.get(name)]
    return f"{found[0]}={config[found[0]]!r}" if found else None


def check_adapter_folder(folder: Path, key: str, swapped: bool) -> None:
    """adapter_config.json of a LoRA adapter, a usable weight file; `swapped`: chosen per record (SWAP_BLOCKERS)."""
    config = read_adapter_config(folder, key)
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{key}={str(folder)!r} is a {config.get('peft_type')!r} adapter; model.lora takes LoRA "
                          "adapters (peft_type LORA)")
    weights = [folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()]
    if not weights:
        raise ConfigError(f"{key}={str(folder)!r} has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    problem = weight_file_problem(weights[0])
    if problem:
        raise ConfigError(f"{key}={str(folder)!r}: {weights[0].name} is not usable: {problem}")
    blocker = swap_blocker(config) if swapped else None
    if blocker:
        raise ConfigError(f"{key}={str(folder)!r} sets {blocker}: an adapter chosen per record is swapped into the "
                          "targeted linear layers' weights, which this one changes beyond; merge it alone "
                          "(model.lora=<folder>)")


def check_adapters(lora: Any) -> None:
    """model.lora's folders before any worker starts: peft installed, each a LoRA adapter peft can load."""
    if lora is None:
        return
    if importlib.util.find_spec(PEFT) is None:
        raise ConfigError(f"model.lora={lora!r} needs the peft package, which is not installed here (pip install "
                          "'distgen[lora]', or peft as pinned in requirements.txt)")
    swapped = named_adapters(lora) is not None
    for name, folder in adapter_folders(lora).items():
        if not Path(folder).is_dir():
            raise ConfigError(f"{adapter_key(lora, name)}={folder!r} is not a folder; give a LoRA adapter folder "
                              "saved with peft's save_pretrained")
        check_adapter_folder(Path(folder), adapter_key(lora, name), swapped)


def load_peft(model: nn.Module, adapters: dict[str, str], lora: Any):
    """The model wrapped by peft with every adapter loaded (unmerged), each under its name."""
    from peft import PeftModel

    wrapped = None
    for name, folder in adapters.items():
        try:
            with warnings.catch_warnings():
                # peft asks transformers 5 a deprecated question (is_gradient_checkpointing) on every load
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                if wrapped is None:
                    wrapped = PeftModel.from_pretrained(model, folder, adapter_name=name)
                else:
                    wrapped.load_adapter(folder, adapter_name=name)
        except Exception as err:  # peft raises many kinds: the adapter does not fit this model
            raise ConfigError(f"{adapter_key(lora, name)}={folder!r} cannot be loaded onto this model: "
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    return wrapped


def merge_adapter(model: nn.Module, lora: str) -> nn.Module:
    """The model with one adapter merged into its weights (peft's merge_and_unload): a plain model again."""
    return load_peft(model, {"default": lora}, lora).merge_and_unload().eval()


def assign_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write `weight` (the nn.Linear layout) into the module's weight in place, in the module's own layout."""
    assign = getattr(module, "assign_weight", None)
    if assign is not None:
        assign(weight)
    else:
        module.weight.copy_(weight)


@dataclass
class AdapterBank:
    """Named adapters over one model's weights; one (or none: the base model) active at a time."""
    model: nn.Module
    # module path (in `model`) -> its peft LoRA layer: each adapter's A, B and scaling, `get_delta_weight`
    layers: dict[str, Any]
    # module path -> its base weight (a copy: what `activate(None)` restores)
    base: dict[str, torch.Tensor]
    names: tuple[str, ...]
    active: Optional[str] = None
    switches: int = 0
    seconds: float = 0.0
    # per adapter: the module paths it targets
    targets: dict[str, frozenset[str]] = field(default_factory=dict)

    @torch.no_grad()
    def activate(self, name: Optional[str]) -> None:
        """Weights of the base model merged with adapter `name` (None: the base model's)."""
        start = time.perf_counter()
        for path, layer in self.layers.items():
            weight = self.base[path].clone()
            if name is not None and path in self.targets[name]:
                weight += layer.get_delta_weight(name)  # peft's merge: base_layer.weight.data += delta
            assign_weight(self.model.get_submodule(path), weight)
        self.active = name
        self.switches += 1
        self.seconds += time.perf_counter() - start

    def base_bytes(self) -> int:
        """Memory the bank holds beside the model: the targeted base weights' copies (the factors are small)."""
        return sum(w.numel() * w.element_size() for w in self.base.values())


def lora_layers(wrapped) -> dict[str, Any]:
    """Each LoRA layer of a peft-wrapped model by its module path in the unwrapped model."""
    from peft.tuners.lora import LoraLayer

    return {path: module for path, module in wrapped.base_model.model.named_modules() if isinstance(module, LoraLayer)}


def load_adapter_bank(model: nn.Module, lora: Any) -> Optional[AdapterBank]:
    """Several adapters (model.lora by name) over `model`, the base model active; None for one adapter or none."""
    adapters = named_adapters(lora)
    if adapters is None:
        return None
    wrapped = load_peft(model, adapters, lora)
    layers = lora_layers(wrapped)
    for path, layer in layers.items():
        base = layer.get_base_layer()
        if type(base) is not nn.Linear:
            raise ConfigError(f"model.lora={lora!r}: {path} is a {type(base).__name__}; adapters chosen per record "
                              "target linear layers only (merge one adapter alone with model.lora=<folder>)")
    targets = {name: frozenset(path for path, layer in layers.items() if name in layer.lora_A) for name in adapters}
    model = wrapped.unload()  # the base modules back in place, unmerged; `layers` keep the factors
    base = {path: model.get_submodule(path).weight.detach().clone() for path in layers}
    return AdapterBank(model.eval(), layers, base, tuple(adapters), targets=targets)

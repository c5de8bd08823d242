"""Which decoder layers attend over a sliding window, read from the model config as transformers reads it.

transformers' mask for a local layer (masking_utils.sliding_window_overlay): a query at position p sees the keys at
positions (p - window, p], i.e. its own and the window - 1 before it; a global ("full_attention") layer sees 0..p.
Which layers are local:
- a config with `layer_types` (Qwen2, Gemma 2/3, and the models built like them): the "sliding_attention" layers
  attend over `sliding_window`, the others over everything. Qwen2's config derives them from `use_sliding_window`
  and `max_window_layers` (layers from max_window_layers on are local), Gemma 3's from `sliding_window_pattern`
  (every pattern-th layer is global), Gemma 2's alternate (local first);
- otherwise (Mistral, Mixtral, Phi-3, Starcoder2) every layer attends over `sliding_window` when it is set; so do
  the models whose attention reads `config.sliding_window` in every layer although their config has `layer_types`
  (UNIFORM_WINDOW_TYPES: Mistral's config keeps a stray `layer_types` it was given).
A window binds only where a sequence is longer than it (a position p >= window): a job whose every prompt plus
budget fits the window attends exactly as a model without one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, TypeVar, Union

T = TypeVar("T")
SLIDING = "sliding_attention"
# Model types whose every layer attends over config.sliding_window whatever `layer_types` says.
UNIFORM_WINDOW_TYPES = ("mistral", "ministral3", "minimax")


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def config_window(config) -> Optional[int]:
    """config.sliding_window where it is a positive int and not switched off (`use_sliding_window=False`)."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0 \
            or getattr(config, "use_sliding_window", True) is False:
        return None
    return window


def layer_windows(config) -> tuple[Optional[int], ...]:
    """Each decoder layer's window (None: a global layer), in layer order."""
    config = text_config(config)
    layers, window = config.num_hidden_layers, config_window(config)
    types = getattr(config, "layer_types", None)
    if window is None:
        return (None,) * layers
    if isinstance(types, (list, tuple)) and len(types) == layers \
            and getattr(config, "model_type", "") not in UNIFORM_WINDOW_TYPES:
        return tuple(window if kind == SLIDING else None for kind in types)
    return (window,) * layers


def layer_type_names(config) -> Optional[tuple[str, ...]]:
    """The model's `layer_types` where its forward picks each layer's mask by them (a dict of masks), else None."""
    config = text_config(config)
    types = getattr(config, "layer_types", None)
    if not isinstance(types, (list, tuple)) or len(types) != config.num_hidden_layers \
            or getattr(config, "model_type", "") in UNIFORM_WINDOW_TYPES:
        return None
    return tuple(types)


def binding(windows: tuple[Optional[int], ...], columns: int) -> tuple[Optional[int], ...]:
    """The windows a sequence of at most `columns` tokens can reach (position p >= window); the others None."""
    return tuple(window if window is not None and window < columns else None for window in windows)


def attention_softcap(config) -> Optional[float]:
    """Gemma 2's attention logit soft-capping (scores -> cap * tanh(scores / cap) before the mask), or None."""
    cap = getattr(text_config(config), "attn_logit_softcapping", None)
    return float(cap) if isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap > 0 else None


@dataclass(frozen=True)
class LayerWindows:
    """A model's per-layer windows (None: a global layer) and the layer type names its forward picks masks by."""
    windows: tuple[Optional[int], ...]
    types: Optional[tuple[str, ...]] = None

    @classmethod
    def of(cls, config) -> "LayerWindows":
        return cls(layer_windows(config), layer_type_names(config))

    @classmethod
    def none(cls, layers: int) -> "LayerWindows":
        return cls((None,) * layers)

    def binding(self, columns: int) -> "LayerWindows":
        """The same layers with only the windows a sequence of at most `columns` tokens reaches."""
        return LayerWindows(binding(self.windows, columns), self.types)

    @property
    def local(self) -> bool:
        """Some layer attends over a window."""
        return any(window is not None for window in self.windows)

    @property
    def uniform(self) -> Optional[int]:
        """The window every layer attends over, or None (a global layer, or windows that differ)."""
        distinct = set(self.windows)
        return next(iter(distinct)) if len(distinct) == 1 else None

    @property
    def smallest(self) -> Optional[int]:
        return min((window for window in self.windows if window is not None), default=None)

    def masks(self, by_window: dict[Optional[int], T]) -> Union[T, dict[str, T]]:
        """What the model's forward takes as `attention_mask` given each distinct window's mask: the one mask where
        every layer reads the same, else a mask per layer type name (transformers' `causal_mask_mapping`)."""
        if len(set(self.windows)) == 1:
            return by_window[self.windows[0]]
        assert self.types is not None, "layers of different windows without layer_types"
        return {kind: by_window[window] for kind, window in zip(self.types, self.windows)}

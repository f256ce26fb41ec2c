"""What this project relies on inside the installed transformers (pinned 5.24): the cache keyword, per-layer cache
tensors and lengths, and the causal-mask builders. Kept in one module so that a transformers upgrade is one edit.

- Decoder stacks take the KV cache as ``cache=`` (``past_key_values=`` is the deprecated spelling; both are read).
- ``DynamicCache.layers[j]`` holds that layer's ``keys`` / ``values`` [B, KV heads, T, head dim]; its ``update`` only
  concatenates, so layers may hold different lengths.
- ``create_causal_mask`` / ``create_sliding_window_causal_mask`` build the stock mask for a layer type; ``layer_idx``
  sizes it against that layer's cache (taken only where the installed signature has it).
- Each attention family's module defines ``apply_rotary_pos_emb(q, k, cos, sin)``, which its attention forward applies
  to the projected queries and keys [B, heads, T, head dim] before caching them.
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any, Callable

from torch import Tensor

CACHE_KEYWORDS = ("cache", "past_key_values")


def cache_of(kwargs: dict[str, Any]) -> Any:
    """The KV cache a forward was called with (None when it has none)."""
    for key in CACHE_KEYWORDS:
        if kwargs.get(key) is not None:
            return kwargs[key]
    return None


def output_cache(output: Any) -> Any:
    """The KV cache a model output carries (None when it has none)."""
    for key in CACHE_KEYWORDS:
        cache = getattr(output, key, None)
        if cache is not None:
            return cache
    return None


def cached_length(cache: Any, layer: int | None = None) -> int:
    """Tokens already cached (in ``layer``, else in layer 0); 0 for no cache."""
    if cache is None:
        return 0
    return int(cache.get_seq_length() if layer is None else cache.get_seq_length(layer))


def layer_kv(cache: Any, layer: int) -> tuple[Tensor, Tensor]:
    entry = cache.layers[layer]
    return entry.keys, entry.values


def set_layer_kv(cache: Any, layer: int, keys: Tensor, values: Tensor) -> None:
    entry = cache.layers[layer]
    entry.keys, entry.values = keys, values


def kv_cache_bytes(cache: Any) -> int:
    """Bytes held by a cache's keys and values (all layers, whole batch)."""
    total = 0
    for entry in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(entry, name, None)
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
    return total


@functools.lru_cache(maxsize=None)
def _takes(fn: Callable, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def make_mask(kind: str, config: Any, hidden: Tensor, pad2d: Tensor | None, cache: Any, layer_idx: int):
    """The stock mask for ``kind`` layers ("full_attention" / "sliding_attention"), sized against ``layer_idx``'s
    cache. ``position_ids=None`` on purpose: gapped ids (merged tokens keep their first member's position) would be
    taken for packed sequences and give a block-diagonal mask."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    fn = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
    kwargs = {"config": config, "inputs_embeds": hidden, "attention_mask": pad2d, "cache": cache, "position_ids": None}
    if _takes(fn, "layer_idx"):
        kwargs["layer_idx"] = layer_idx
    return fn(**kwargs)


def new_cache(config: Any = None) -> Any:
    """An empty dynamic cache (for adapters that run their own decoding loop)."""
    from transformers import DynamicCache

    return DynamicCache(config=config) if config is not None else DynamicCache()


def rotate_keys(attention: Any, keys: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``keys`` [B, KV heads, T, head dim] rotated as ``attention``'s own forward rotates them (the
    ``apply_rotary_pos_emb`` of the module that defines its class), i.e. as its cache holds them."""
    rotate = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    if rotate is None:
        raise NotImplementedError(f"{type(attention).__name__}: its module has no apply_rotary_pos_emb")
    return rotate(keys, keys, cos, sin)[1]

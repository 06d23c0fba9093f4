"""attnjax: functional attention for JAX.

Pure functions for scaled dot-product attention, masks and position encodings; thin Flax
modules in ``attnjax.linen`` and ``attnjax.nnx``. Those two are imported on first use
(``attnjax.linen.MultiHeadAttention`` works after ``import attnjax``), so the pure core
never imports Flax.
"""

import importlib
from typing import TYPE_CHECKING

from attnjax import blockwise, masks, parallel, positional, score_mods
from attnjax.attention import attention_weights, dot_product_attention, merge_attention
from attnjax.masks import (
    causal_mask,
    combine_masks,
    lengths_mask,
    padding_mask,
    segment_mask,
    sliding_window_mask,
)
from attnjax.multihead import init_kv_cache, init_multi_head_attention, multi_head_attention
from attnjax.positional import apply_rotary, sinusoidal_position_encoding

if TYPE_CHECKING:
  from attnjax import linen as linen
  from attnjax import nnx as nnx

__version__ = "0.1.0"

# Submodules that import Flax, loaded by ``__getattr__`` on first access (PEP 562). They are
# not in ``__all__``, so that ``from attnjax import *`` does not import Flax either.
_LAZY_SUBMODULES = ("linen", "nnx")

__all__ = [
    "apply_rotary",
    "attention_weights",
    "blockwise",
    "causal_mask",
    "combine_masks",
    "dot_product_attention",
    "init_kv_cache",
    "init_multi_head_attention",
    "lengths_mask",
    "masks",
    "merge_attention",
    "multi_head_attention",
    "padding_mask",
    "parallel",
    "positional",
    "score_mods",
    "segment_mask",
    "sinusoidal_position_encoding",
    "sliding_window_mask",
]


def __getattr__(name: str):
  if name in _LAZY_SUBMODULES:
    return importlib.import_module(f"attnjax.{name}")  # Also sets the attribute.
  raise AttributeError(f"module 'attnjax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__) | set(_LAZY_SUBMODULES))

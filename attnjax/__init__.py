"""attnjax: functional attention for JAX.

Pure functions for scaled dot-product attention, masks and position encodings; thin Flax
modules in ``attnjax.linen`` and ``attnjax.nnx``.
"""

from attnjax import blockwise, masks, positional, score_mods
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

__version__ = "0.1.0"

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
    "positional",
    "score_mods",
    "segment_mask",
    "sinusoidal_position_encoding",
    "sliding_window_mask",
]
